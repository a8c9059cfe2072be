// The MLA attention block (DeepSeek-V3's multi-head latent attention with its projections) as one
// CPU function, forward and backward: the CPU model's struct Mla (src/model/model.cpp) math,
// composed from the public CPU pieces, in one of two modes:
//   kFp32  every op in FP32 (linear_forward / linear_backward with Precision::kFp32, ops.h's
//          rmsnorm and rope_apply, attend_row for the attention and its FP32 backward): the
//          exact function, what finite differences check (tests/model/mla_block_reference_test).
//   kGpu   the arithmetic of MlaBlockGpu (model/mla_block_gpu.h) piece by piece: linears with
//          Precision::kFp8 (BF16 y and dx; o_proj's input with power-of-two scales), the RMSNorms
//          with kernels::rmsnorm_*_reference (the GPU's summation order, BF16 y / dx), RoPE on
//          BF16 values (widen, rope_apply, round: rope_apply_bf16_reference), the attention with
//          kernels::mla_attention_*_reference. Every activation between ops is BF16, as on the
//          GPU; the CPU model keeps them FP32. The rounding points the CPU model lacks: x, cq, cq
//          normed, q (before and after RoPE), kv_a's output (c_kv and k_pe, k_pe after RoPE), c_kv
//          normed, kv, the attention output; backward: dout, d(attention output), dq (before and
//          after the inverse RoPE), dkv, dk_pe (the FP32 head sum rounded once before the inverse
//          RoPE), d(c_kv normed), dc_kv, d(cq normed), dcq, each branch's dx and their sum.
//          Needs the attention kernel's head dims (dn 128, dr 64, dv 128).
// Layer boundary: the block's input is the already normed hidden state (the decoder layer's
// input_layernorm stays outside, as in the CPU model's Mla); the output is o_proj's, before the
// residual add.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "fp8moe/model/config.h"
#include "fp8moe/model/ops.h"

namespace fp8moe {

struct MlaBlockDims {
  int64_t hidden = 0, heads = 0, q_lora_rank = 0, kv_lora_rank = 0, dn = 0, dr = 0, dv = 0;
  double eps = 1e-6;
  float scale = 1;  // the softmax scale (attention_softmax_scale(dn + dr, rope_scaling))
  static MlaBlockDims from(const ModelConfig& c);
  int64_t qd() const { return dn + dr; }
  int64_t kvd() const { return dn + dv; }
};

// The block's parameters, FP32, the CPU model's shapes ([out, in] row-major for the projections):
// q_a [qr, hidden], q_a_norm [qr], q_b [H*(dn+dr), qr] when q_lora_rank > 0, else q_proj
// [H*(dn+dr), hidden]; kv_a [kvr+dr, hidden], kv_a_norm [kvr], kv_b [H*(dn+dv), kvr], o [hidden,
// H*dv]. The unused form's vectors are empty.
struct MlaBlockParams {
  std::vector<float> q_a, q_a_norm, q_b, q_proj, kv_a, kv_a_norm, kv_b, o;
  static MlaBlockParams zeros(const MlaBlockDims& d);
  // The tensors in a fixed order (name, vector), the unused form left out.
  std::vector<std::pair<const char*, std::vector<float>*>> list();
  std::vector<std::pair<const char*, const std::vector<float>*>> list() const;
};

enum class MlaReferenceMode { kFp32, kGpu };

// x [T, hidden] (T = batch * seq, row t = b * seq + s), pos [T] (RoPE positions, < rope.positions)
// -> out [T, hidden]. With dout (not null): dx [T, hidden] (overwritten) and every parameter's
// gradient ADDED into *grads (shaped as MlaBlockParams::zeros).
void mla_block_reference(const MlaBlockDims& d, MlaReferenceMode mode, const RopeTable& rope,
                         const MlaBlockParams& w, const float* x, const int32_t* pos, int64_t batch,
                         int64_t seq, float* out, const float* dout, float* dx,
                         MlaBlockParams* grads);

}  // namespace fp8moe
