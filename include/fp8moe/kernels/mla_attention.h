// MLA's attention core (DeepSeek-V3 multi-head latent attention, training form: keys and values
// expanded per head by kv_b_proj), causal within each sequence, BF16 in and out, FP32 inside.
// Tokens: T = batch * seq, row t = b * seq + s (the CPU model's layout, model.cpp struct Mla).
//   q     [T, H, 192]  BF16: q_nope [128] then q_pe [64] (RoPE already applied)
//   kv    [T, H, 256]  BF16: k_nope [128] then v [128] (kv_b_proj's output as the model lays it)
//   k_pe  [T, 64]      BF16: the decoupled RoPE key, one per token, SHARED by all heads (rotated)
//   out   [T, H, 128]  BF16
//   lse   [H, T]       FP32: the natural-log softmax normaliser of each (head, query) row,
//                      lse = max + log(sum exp(score - max)), what the backward recomputes P from.
// score(t, t2) = (q_nope . k_nope + q_pe . k_pe) * scale for t2 <= t of the same sequence;
// out = softmax(scores) . v. Forward: FlashAttention-2 (online softmax over key blocks, no [S, S]
// matrix in memory, key blocks above the diagonal skipped), BF16 tensor cores (mma.sync), P
// rounded to BF16 before P V. Backward (FlashAttention-2's, P recomputed from lse, D = rowsum(dout
// * out)): dq [T, H, 192] BF16, dkv [T, H, 256] BF16 (dk_nope then dv), dk_pe [T, 64] FP32 summed
// over heads in head order (per-head partials in the workspace, no atomics: deterministic).
// Limits (thrown on the host before launch, std::invalid_argument-kind fp8moe::Error): batch,
// seq, heads > 0; T * H < 2^31; every pointer 16-byte aligned; workspace large enough.
// Device pointers; stream-ordered, allocation-free, CUDA-graph capturable.
// NOTE: the name is MLA's, not attention.h: the layout (k_pe shared by the heads, k_nope and v
// interleaved per head in one kv_b_proj row) is MLA's own; a plain MHA would be another entry.
#pragma once

#include "fp8moe/core/cuda_stream.h"

#include <cstddef>
#include <cstdint>

#include "fp8moe/core/dtypes.h"

namespace fp8moe::kernels {

constexpr int64_t kMlaNopeDim = 128, kMlaRopeDim = 64, kMlaValueDim = 128;
constexpr int64_t kMlaQDim = kMlaNopeDim + kMlaRopeDim;    // 192
constexpr int64_t kMlaKvDim = kMlaNopeDim + kMlaValueDim;  // 256

struct MlaAttentionShape {
  int64_t batch = 0, seq = 0, heads = 0;
  int64_t tokens() const { return batch * seq; }
};

void mla_attention_forward(const bf16* q, const bf16* kv, const bf16* k_pe, MlaAttentionShape shape,
                           float scale, bf16* out, float* lse, cudaStream_t stream);

// Which kernel the forward runs (same contract, outputs and rounding points; all deterministic).
// kWgmmaPingPong (the default since session 21: 1236 us at 1 x 4096 x 128 on H200, 556 TFLOPS,
// 2.13x kMmaSync; docs/kernels/attention.md s21-af): FlashAttention-3's form — warpgroup MMAs
// from shared memory, TMA loads by a producer warpgroup, the softmax under the P V product, and
// the two consumer warpgroups' MMAs issued in turns so that one's softmax runs under the other's.
// kWgmma: the same without the turns (1496 us). kMmaSync (session 20's): mma.sync + ldmatrix,
// cp.async double buffer (2634 us).
enum class MlaForwardImpl { kMmaSync, kWgmma, kWgmmaPingPong };
void mla_attention_forward(const bf16* q, const bf16* kv, const bf16* k_pe, MlaAttentionShape shape,
                           float scale, bf16* out, float* lse, cudaStream_t stream,
                           MlaForwardImpl impl);

// Bytes of scratch the backward needs: D [H, T] FP32 and the per-head dk_pe [H, T, 64] FP32.
size_t mla_attention_backward_workspace_bytes(MlaAttentionShape shape);

void mla_attention_backward(const bf16* q, const bf16* kv, const bf16* k_pe, const bf16* out,
                            const bf16* dout, const float* lse, MlaAttentionShape shape,
                            float scale, bf16* dq, bf16* dkv, float* dk_pe, void* workspace,
                            size_t workspace_bytes, cudaStream_t stream);

// Which kernels the backward's dk/dv and dq passes run (same contract, workspace and outputs,
// both bit-for-bit deterministic). kWgmma (the default since session 21, s21-ab: 1.59x kMmaSync
// at 1 x 4096 x 128 on H200, docs/kernels/attention.md): warpgroup MMAs (wgmma) reading the
// operands straight from shared memory. kMmaSync (session 20's): mma.sync + ldmatrix.
enum class MlaBackwardImpl { kMmaSync, kWgmma };
void mla_attention_backward(const bf16* q, const bf16* kv, const bf16* k_pe, const bf16* out,
                            const bf16* dout, const float* lse, MlaAttentionShape shape,
                            float scale, bf16* dq, bf16* dkv, float* dk_pe, void* workspace,
                            size_t workspace_bytes, cudaStream_t stream, MlaBackwardImpl impl);

// CPU references (host pointers, same layouts and contract): FP32 arithmetic on the BF16 inputs
// (attend_row's order of operations: FP32 dot products, max, exp, a double sum), BF16 out and
// FP32 lse; the backward recomputes P from lse as the GPU does and writes exact-FP32 sums rounded
// once to BF16. Tested against model.cpp's attend_row
// (tests/model/mla_attention_reference_test.cpp).
void mla_attention_forward_reference(const bf16* q, const bf16* kv, const bf16* k_pe,
                                     MlaAttentionShape shape, float scale, bf16* out, float* lse);
void mla_attention_backward_reference(const bf16* q, const bf16* kv, const bf16* k_pe,
                                      const bf16* out, const bf16* dout, const float* lse,
                                      MlaAttentionShape shape, float scale, bf16* dq, bf16* dkv,
                                      float* dk_pe);

// The shape checks both forms run (throws fp8moe::Error kInvalidArgument naming the field).
void mla_attention_check_shape(const char* who, MlaAttentionShape shape);

}  // namespace fp8moe::kernels
