// CPU references of model/model_kernels_gpu.h: the GPU kernels' meaning on host pointers, built on
// the CPU model's own functions (ops.h rope_apply) or its order of operations (embed_backward).
#include <algorithm>
#include <cmath>
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/model/model_kernels_gpu.h"

namespace fp8moe {

void rope_apply_bf16_reference(const RopeTable& table, bf16* x, int64_t tokens, int64_t heads,
                               int64_t ld_token, int64_t ld_head, const int32_t* pos,
                               bool inverse) {
  FM_CHECK_ARG(table.dim > 0 && table.dim % 2 == 0, "rope reference: table dim ", table.dim);
  std::vector<float> row(static_cast<size_t>(table.dim));
  for (int64_t t = 0; t < tokens; ++t) {
    FM_CHECK_ARG(pos[t] >= 0 && pos[t] < table.positions, "rope reference: token ", t,
                 " at position ", pos[t], " outside the table's ", table.positions);
    for (int64_t h = 0; h < heads; ++h) {
      bf16* p = x + t * ld_token + h * ld_head;
      for (int64_t i = 0; i < table.dim; ++i) row[i] = to_float(p[i]);
      rope_apply(table, row.data(), pos[t], inverse);
      for (int64_t i = 0; i < table.dim; ++i) p[i] = to_bf16(row[i]);
    }
  }
}

void embedding_forward_reference(const float* table, int64_t vocab, int64_t hidden,
                                 const int32_t* ids, int64_t tokens, bf16* out, int64_t ld_out) {
  for (int64_t t = 0; t < tokens; ++t) {
    FM_CHECK_ARG(ids[t] >= 0 && ids[t] < vocab, "embedding reference: token ", t, " has id ",
                 ids[t], " outside the vocabulary ", vocab);
    for (int64_t c = 0; c < hidden; ++c) out[t * ld_out + c] = to_bf16(table[ids[t] * hidden + c]);
  }
}

void embedding_backward_reference(const bf16* dy, int64_t ld_dy, const int32_t* ids, int64_t tokens,
                                  int64_t vocab, int64_t hidden, float* dtable) {
  // The CPU model's embed_backward: for each token in order, add its row into the id's row.
  for (int64_t t = 0; t < tokens; ++t) {
    FM_CHECK_ARG(ids[t] >= 0 && ids[t] < vocab, "embedding reference: token ", t, " has id ",
                 ids[t], " outside the vocabulary ", vocab);
    float* g = dtable + static_cast<int64_t>(ids[t]) * hidden;
    for (int64_t c = 0; c < hidden; ++c) g[c] += to_float(dy[t * ld_dy + c]);
  }
}

double cross_entropy_sum_reference(const float* row_loss, int64_t rows) {
  double lane[1024];
  for (int p = 0; p < 1024; ++p) {
    double s = 0.0;
    for (int64_t r = p; r < rows; r += 1024) s += static_cast<double>(row_loss[r]);
    lane[p] = s;
  }
  double total = 0.0;
  for (int w = 0; w < 32; ++w) {
    double v[32];
    for (int i = 0; i < 32; ++i) v[i] = lane[w * 32 + i];
    for (int o = 16; o > 0; o >>= 1) {
      double n[32];
      for (int i = 0; i < 32; ++i) n[i] = v[i] + v[i ^ o];
      std::copy(n, n + 32, v);
    }
    total += v[0];
  }
  return total;
}

}  // namespace fp8moe
