// CPU references of the latent form's per-head products (kernels/mla_absorb.h): plain loops with
// the GPU's arithmetic (weights dequantised as float(code) * scale, std::fma in index order), so
// the GPU equals them bit for bit. Tested by tests/kernels/mla_absorb_test.cpp; the GPU tests
// compare against them.
#include <cmath>

#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/kernels/mla_absorb.h"

namespace fp8moe::kernels {

void mla_absorb_check_dims(const char* who, const MlaAbsorbDims& d, int64_t tokens) {
  FM_CHECK_ARG(tokens >= 0, who, ": tokens=", tokens, " must not be negative");
  FM_CHECK_ARG(d.heads > 0, who, ": heads=", d.heads, " must be positive");
  FM_CHECK_ARG(d.nope_dim == 128 && d.value_dim == 128, who, ": nope_dim=", d.nope_dim,
               " and value_dim=", d.value_dim, " must be 128 (one scale block a head)");
  FM_CHECK_ARG(d.latent_dim > 0 && d.latent_dim % 128 == 0, who, ": latent_dim=", d.latent_dim,
               " must be a positive multiple of 128");
  FM_CHECK_ARG(d.rope_dim >= 0 && d.rope_dim % 8 == 0, who, ": rope_dim=", d.rope_dim,
               " must be a multiple of 8");
}

namespace {

// W[row, j] of kv_b's FP8 form.
float weight(const MlaAbsorbDims& d, const uint8_t* codes, const float* scales, int64_t row,
             int64_t j) {
  return e4m3_bits_to_float(codes[row * d.latent_dim + j]) *
         scales[(row / 128) * (d.latent_dim / 128) + j / 128];
}

}  // namespace

void mla_absorb_query_reference(const bf16* q, int64_t tokens, const MlaAbsorbDims& d,
                                const uint8_t* codes, const float* scales, bf16* q_lat) {
  mla_absorb_check_dims("mla_absorb_query_reference", d, tokens);
  const int64_t qd = d.nope_dim + d.rope_dim, od = d.latent_dim + d.rope_dim;
  const int64_t block = d.nope_dim + d.value_dim;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < d.heads; ++h) {
      const bf16* qh = q + (t * d.heads + h) * qd;
      bf16* oh = q_lat + (t * d.heads + h) * od;
      for (int64_t j = 0; j < d.latent_dim; ++j) {
        float acc = 0.0f;
        for (int64_t k = 0; k < d.nope_dim; ++k)
          acc = std::fma(to_float(qh[k]), weight(d, codes, scales, h * block + k, j), acc);
        oh[j] = to_bf16(acc);
      }
      for (int64_t r = 0; r < d.rope_dim; ++r) oh[d.latent_dim + r] = qh[d.nope_dim + r];
    }
}

void mla_unabsorb_output_reference(const bf16* o_lat, int64_t tokens, const MlaAbsorbDims& d,
                                   const uint8_t* codes, const float* scales, bf16* attn) {
  mla_absorb_check_dims("mla_unabsorb_output_reference", d, tokens);
  const int64_t block = d.nope_dim + d.value_dim;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < d.heads; ++h) {
      const bf16* oh = o_lat + (t * d.heads + h) * d.latent_dim;
      for (int64_t v = 0; v < d.value_dim; ++v) {
        float acc = 0.0f;
        for (int64_t j = 0; j < d.latent_dim; ++j)
          acc = std::fma(to_float(oh[j]), weight(d, codes, scales, h * block + d.nope_dim + v, j),
                         acc);
        attn[(t * d.heads + h) * d.value_dim + v] = to_bf16(acc);
      }
    }
}

}  // namespace fp8moe::kernels
