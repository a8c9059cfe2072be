// The model's small GPU kernels beside the GEMMs, attention and the MoE layer: RoPE (forward and
// its inverse, the backward), the token embedding (gather, and the deterministic scatter-add of
// its gradient) and the cross-entropy of the head (loss and dlogits fused). They live in `model`
// because their meaning is the CPU model's (model/ops.h: make_rope_table / rope_apply /
// cross_entropy; src/model/model.cpp: embed_rows / embed_backward), not a generic kernel.
// Device pointers; stream-ordered; no allocation (the embedding backward takes a workspace); no
// host synchronisation. Shapes are checked on the host before any launch (kInvalidArgument).
//
// Bad indices found on the device (a position outside the RoPE table, a token id outside the
// vocabulary, a target outside [0, vocab) that is not the ignore index) never read or write out of
// bounds: they OR a bit into `status` (a device uint32, may be null; the caller zeroes it) and the
// row is handled as documented per call. check_model_kernels_status() turns the flag into a
// thrown kInvalidArgument (it synchronises the stream).
//
// RoPE. The CPU model rotates FP32 values (rope_apply). The GPU contract on BF16 tensors: each
// value is widened to FP32, rotated with the CPU's arithmetic (x0' = x0 c - x1 s, x1' = x0 s + x1
// c, FP32 products and sums rounded to nearest, no FMA; inverse: s -> -s) from the same FP32 cos /
// sin tables (make_rope_table, uploaded), and rounded to BF16 (nearest even) once: equal bit for
// bit to rope_apply_bf16_reference (= widen, ops.h's rope_apply, round).
//
// Embedding. The recipe keeps the embedding table in FP32 (the master weight, as the CPU model's
// Parameter; a BF16 copy is accepted too): forward rows = bf16(table[id]) (exact for a BF16 table).
// Backward: dtable[id] += dy[t] for every token t, per element in ascending t order, FP32 adds
// rounded to nearest: exactly the CPU model's embed_backward order (for dy widened from BF16). No
// float atomics: the ids are sorted stably (CUB radix sort, keys = id, values = t) and each
// distinct id's rows are summed by one block in token order: bit-reproducible and equal bit for
// bit to embedding_backward_reference.
//
// Cross-entropy over BF16 logits [rows, vocab]: per row, an FP32 online max / sum of expf(x - m)
// (thread t of the row's block owns 8-element vectors t, t + threads, ...; then the vocab % 8
// tail; pairs (m, s) merge by a warp butterfly then warps in order), loss_r = logf(s) + m - x_t,
// dlogits = bf16((expf(x - m) * (1 / s)) * scale) and, at the target, bf16(that - scale) before
// rounding. The CPU (ops.h cross_entropy) sums exp in double: the GPU is deterministic (fixed
// order) and within the tolerance stated in docs/kernels/model_kernels.md of it (row loss
// |err| <= 2e-5 + 1e-6 |loss|; dlogits within one BF16 rounding plus 4e-6 |scale|).
// Rows whose target is kCrossEntropyIgnoreIndex contribute nothing: loss 0, dlogits 0, not counted.
// loss_sum (double) = the row losses summed in a fixed order (cross_entropy_sum_reference); the
// CPU's mean is loss_sum / valid rows (= rows when nothing is ignored).
#pragma once

#include "fp8moe/core/cuda_stream.h"

#include <cstddef>
#include <cstdint>
#include <vector>

#include "fp8moe/core/dtypes.h"
#include "fp8moe/model/ops.h"

namespace fp8moe {

// Bits of the status flag.
inline constexpr uint32_t kStatusBadPosition = 1u;  // RoPE: pos[t] outside [0, positions)
inline constexpr uint32_t kStatusBadTokenId = 2u;   // embedding: id outside [0, vocab)
inline constexpr uint32_t kStatusBadTarget = 4u;    // cross-entropy: target outside [0, vocab)
inline constexpr int32_t kCrossEntropyIgnoreIndex = -100;

// Reads the device flag (synchronising `stream`) and throws kInvalidArgument naming `what` and
// the bits set; returns quietly when it is 0.
void check_model_kernels_status(const uint32_t* status, const char* what, cudaStream_t stream);

// ---- RoPE ----
// A RopeTable (FP32 cos / sin [positions, dim / 2]) in device memory.
struct RopeTableView {
  const float* cos = nullptr;
  const float* sin = nullptr;
  int64_t dim = 0, positions = 0;
};
class RopeTableGpu {
 public:
  explicit RopeTableGpu(const RopeTable& table);  // uploads (synchronous)
  ~RopeTableGpu();
  RopeTableGpu(const RopeTableGpu&) = delete;
  RopeTableGpu& operator=(const RopeTableGpu&) = delete;
  RopeTableView view() const { return view_; }

 private:
  float* buffer_ = nullptr;
  RopeTableView view_;
};

// Rotates in place the table.dim values at x + t * ld_token + h * ld_head (t < tokens, h < heads)
// by position pos[t] (device int32 [tokens]; packed sequences: any positions). inverse: the
// backward (rotation by the negative angle). A position outside the table: the token's values are
// left unchanged and kStatusBadPosition is set. table.dim a multiple of 8 up to 1024; x, ld_token
// and ld_head 16-byte aligned (multiples of 8 elements).
void rope_apply_gpu(const RopeTableView& table, bf16* x, int64_t tokens, int64_t heads,
                    int64_t ld_token, int64_t ld_head, const int32_t* pos, bool inverse,
                    uint32_t* status, cudaStream_t stream);
// MLA's two uses in one launch: q [tokens, heads, q_head_dim] whose last table.dim values of each
// head are q_pe, and k_pe [tokens, ld_k] (its first table.dim values; k may be null).
void rope_apply_qk_gpu(const RopeTableView& table, bf16* q, int64_t tokens, int64_t heads,
                       int64_t q_head_dim, bf16* k_pe, int64_t ld_k, const int32_t* pos,
                       bool inverse, uint32_t* status, cudaStream_t stream);
// CPU reference (host pointers): widen, rope_apply (ops.h), round to BF16. Throws on a bad pos.
void rope_apply_bf16_reference(const RopeTable& table, bf16* x, int64_t tokens, int64_t heads,
                               int64_t ld_token, int64_t ld_head, const int32_t* pos, bool inverse);

// ---- Embedding ----
// out[t] = bf16(table[ids[t]]) for t < tokens; table [vocab, hidden] row-major. An id outside
// [0, vocab): the row is written as zeros and kStatusBadTokenId set. hidden a multiple of 8;
// ld_out a multiple of 8; 16-byte aligned pointers.
void embedding_forward_gpu(const float* table, int64_t vocab, int64_t hidden, const int32_t* ids,
                           int64_t tokens, bf16* out, int64_t ld_out, uint32_t* status,
                           cudaStream_t stream);
void embedding_forward_gpu(const bf16* table, int64_t vocab, int64_t hidden, const int32_t* ids,
                           int64_t tokens, bf16* out, int64_t ld_out, uint32_t* status,
                           cudaStream_t stream);
// Device workspace the backward needs for `tokens` tokens of a `vocab`-row table.
size_t embedding_backward_workspace_bytes(int64_t tokens, int64_t vocab);
// dtable [vocab, hidden] FP32 += the rows of dy [tokens, ld_dy] (BF16 or FP32) by id, in token
// order per element (above). Tokens with a bad id add nothing and set kStatusBadTokenId.
// workspace: >= embedding_backward_workspace_bytes(tokens, vocab) bytes, 256-byte aligned.
void embedding_backward_gpu(const bf16* dy, int64_t ld_dy, const int32_t* ids, int64_t tokens,
                            int64_t vocab, int64_t hidden, float* dtable, void* workspace,
                            size_t workspace_bytes, uint32_t* status, cudaStream_t stream);
void embedding_backward_gpu(const float* dy, int64_t ld_dy, const int32_t* ids, int64_t tokens,
                            int64_t vocab, int64_t hidden, float* dtable, void* workspace,
                            size_t workspace_bytes, uint32_t* status, cudaStream_t stream);
// CPU references (host pointers). Throw on a bad id.
void embedding_forward_reference(const float* table, int64_t vocab, int64_t hidden,
                                 const int32_t* ids, int64_t tokens, bf16* out, int64_t ld_out);
void embedding_backward_reference(const bf16* dy, int64_t ld_dy, const int32_t* ids, int64_t tokens,
                                  int64_t vocab, int64_t hidden, float* dtable);

// ---- Cross-entropy ----
// logits [rows, ld_logits] BF16, targets [rows] int32 -> row_loss [rows] FP32 (0 for ignored
// rows; NaN for a bad target, which also sets kStatusBadTarget), *loss_sum (device double) and
// *valid_rows (device int64, may be null) = rows not ignored; dlogits [rows, ld_dlogits] BF16
// (null: loss only; may alias logits when ld_dlogits == ld_logits: each row is read whole before
// it is written). Ignored and bad rows get dlogits 0. vocab >= 1 (the V3 vocab is 129280);
// ld_* multiples of 8, 16-byte aligned pointers.
void cross_entropy_gpu(const bf16* logits, int64_t ld_logits, const int32_t* targets, int64_t rows,
                       int64_t vocab, float scale, bf16* dlogits, int64_t ld_dlogits,
                       float* row_loss, double* loss_sum, int64_t* valid_rows, uint32_t* status,
                       cudaStream_t stream);
// The fixed order of loss_sum: 1024 partial sums in double, partial p = sum of row_loss[p + 1024 k]
// in k order (from 0.0); then partials combined in a warp butterfly (offsets 16..1) per 32, and
// the 32 warp sums in order from 0.0. Bit-equal to the device's sum of the same row losses.
double cross_entropy_sum_reference(const float* row_loss, int64_t rows);

}  // namespace fp8moe
