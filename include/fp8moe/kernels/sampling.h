// Token sampling on the GPU: one CTA a row of BF16 logits [rows, vocab] -> int32 token ids, so
// that only 4 bytes a row leave the device (GeneratorGpu copied every row to the host).
//   greedy (temperature 0): the lowest id among the equal maxima (model/sampling.h's rule);
//   else softmax(logits / T) cut to the nucleus (the smallest set of most likely tokens whose
//   mass reaches top_p; ties by id, as model/sampling.h) and one uniform from core/philox.h,
//   philox_uniform(seed, stream, counter), by the inverse CDF over the kept tokens in id order.
// speculative_check_rows is model/sampling.h's speculative_pick (MTP draft verify) on the device.
//
// Exactness: the CPU reference (src/kernels/sampling_reference.cpp) computes the SAME float
// operations in the SAME order as the kernel (src/kernels/sampling.cu), so its tokens equal the
// GPU's bit for bit. Every rounding step is one IEEE operation (add, sub, mul, div, fma: exact
// round-to-nearest on both sides; the device code uses __fadd_rn & co. so nvcc cannot contract,
// the reference is compiled with -ffp-contract=off); exp is our own (below), never libm/__expf.
// The order (kSampleThreads = 512 threads, "thread t"):
//   x_v      float(bf16 logit v); key(x) the order-preserving 16-bit key of its bits (-0 -> +0).
//   elements thread t owns ids tile*4096 + 8t + j (j = 0..7), visited tile by tile, j ascending:
//            "thread order". A segment is the 256 ids of one warp in one tile (32 lanes x 8).
//   tree(v)  a block sum of one value a thread: within each warp the xor butterfly (offsets 16,
//            8, 4, 2, 1: v = v + shfl_xor(v, o)), lane 0's result; then the 16 warp sums padded
//            with zeros to 32 lanes, the same butterfly.
//   m        the value of the largest key (a row with NaN or +inf, or no finite max: token -1).
//   w(x)     d = x - m; d == 0 -> 1; y = d * (log2(e) / T); y < -125 (or NaN) -> 0; else
//            n = (y + 1.5*2^23) - 1.5*2^23 (round to nearest even), f = y - n in [-0.5, 0.5],
//            2^f by the degree-7 Taylor polynomial (Horner, fma), times 2^n (exact: n >= -125).
//   nucleus  top_p == 1: every token. Else a radix search for the threshold key K* over the
//            16-bit keys, 4 bits a pass (4 passes): pass l knows the prefix P of K* and U, the
//            mass of the keys above P's range; each thread sums w of its in-range elements by
//            digit (thread order), takes suffix sums over the digits (15 down to c), and
//            M[c] = U + tree(suffix[c]). S = M[0] of pass 0 (U = 0), target = top_p * S; the
//            digit is the largest c with M[c] >= target (0 if none), U becomes M[c + 1] (c < 15).
//            Keys > K* are kept; of the tokens with key K* (weight w*), the ceil((target - U) /
//            w*) lowest ids (all if that reaches their count).
//   draw     kept weights summed a thread over its 8 ids of a segment (j order), tree within the
//            warp (butterfly, lane 0) = segment mass; tile mass = segments 0..15 in order; total C
//            = tiles in order. r = u * C; the tile whose running sum first exceeds r, r minus the
//            sum before it; the same through its segments, lanes and ids (if r passes every
//            entry: the last one of positive mass, and so on down).
// Returns per row: a token id, or kSampleBadLogits (-1), kSampleBadParams (-2: temperature < 0
// or NaN, top_p outside (0, 1]; the reference throws for these instead).
#pragma once

#include "fp8moe/core/cuda_stream.h"

#include <cstdint>
#include <vector>

#include "fp8moe/core/dtypes.h"

namespace fp8moe::kernels {

// Per-row parameters (device array for the kernels: requests in one batch differ).
struct SampleRow {
  float temperature = 0;  // 0: greedy
  float top_p = 1;        // (0, 1]
  uint64_t seed = 0;
  uint64_t stream = 0;
  uint64_t counter = 0;  // the uniform's index; the caller advances it per draw
};

inline constexpr int32_t kSampleBadLogits = -1;
inline constexpr int32_t kSampleBadParams = -2;
inline constexpr int kSampleThreads = 512;
inline constexpr int64_t kSampleMaxVocab = int64_t{1} << 18;  // segment masses in shared memory

// --- CPU reference (host pointers) ---
// Throws (invalid argument) for vocab <= 0 or > kSampleMaxVocab, temperature < 0 or NaN, top_p
// outside (0, 1]; returns kSampleBadLogits for a row with NaN or +inf or without a finite max.
int32_t sample_row_reference(const bf16* logits, int64_t vocab, const SampleRow& params);
void sample_rows_reference(const bf16* logits, int64_t ld, int64_t rows, int64_t vocab,
                           const SampleRow* params, int32_t* tokens,
                           const int32_t* row_index = nullptr);
// The distribution sample_row_reference draws from: probs[v] = w(x_v) / C for kept tokens, 0
// elsewhere (greedy: 1 at the token). Empty for a bad row.
void sample_row_probs_reference(const bf16* logits, int64_t vocab, const SampleRow& params,
                                std::vector<double>& probs);

// Speculative check of request i: target row p (the verify pass's row 2i), draft row q (the
// distribution the draft token was drawn from, same T / top_p), the draft token d, and the
// bonus row (row 2i + 1). p_v = wk_p(v) * (1 / C_p) (wk: kept weight, C: the draw's total),
// likewise q. Greedy: kept iff argmax(p) == d; token = kept ? d : argmax(p). Else u0 =
// philox_uniform(seed, stream, counter): q_d == 0 -> not kept; else kept iff p_d / q_d >= 1 or
// u0 < p_d / q_d. Not kept: the token is drawn from max(0, p_v - q_v) (per element, float) with
// u1 at counter + 1, by the draw above (its mass is zero: kept after all, the draft, as
// speculative_pick). Kept: bonus = the bonus row sampled as sample_row with counter + 2; else -1.
// The caller advances counter by 3 a verify. A bad row gives token -1 or -2, kept 0, bonus -1.
struct SpecResult {
  int32_t token = -1;
  int32_t kept = 0;
  int32_t bonus = -1;
};
SpecResult speculative_check_row_reference(const bf16* p_row, const bf16* q_row,
                                           const bf16* bonus_row, int64_t vocab, int32_t draft,
                                           const SampleRow& params);

// --- GPU (device pointers; stream-ordered, allocation-free, graph-capturable) ---
// Row r's logits at logits + row_index[r] * ld (row_index null: r; ld >= vocab; the indices must
// be rows of the buffer, e.g. GeneratorGpu's draft rows 2i + kept_i); params[rows]; tokens[rows].
void sample_rows(const bf16* logits, int64_t ld, int64_t rows, int64_t vocab,
                 const SampleRow* params, int32_t* tokens, cudaStream_t stream,
                 const int32_t* row_index = nullptr);
// Request i: p row target + 2i * ld_target, bonus row target + (2i + 1) * ld_target, q row
// draft_logits + draft_row_index[i] * ld_draft (null: i; the previous step's draft pass keeps
// request i's at 2i + kept_i), draft token draft_tokens[i]; outputs tokens, kept, bonus [rows].
void speculative_check_rows(const bf16* target, int64_t ld_target, const bf16* draft_logits,
                            int64_t ld_draft, const int32_t* draft_tokens, int64_t rows,
                            int64_t vocab, const SampleRow* params, int32_t* tokens, int32_t* kept,
                            int32_t* bonus, cudaStream_t stream,
                            const int32_t* draft_row_index = nullptr);

}  // namespace fp8moe::kernels
