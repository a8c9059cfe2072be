// GPU fine-grained FP8 (E4M3) quantisation feeding the FP8 GEMMs. Bit for bit the CPU
// fp8moe::quantize (fp8moe/fp8/quantize.h): scale = amax / 448 (floored at FLT_MIN, 1 for an
// all-zero tile, rounded up to a power of two with pow2_scales), codes = e4m3(x / scale) with IEEE
// division, round-to-nearest-even, saturating. Partial tiles (cols or rows not a multiple of 128)
// get their own scale over the elements they have.
// Non-finite inputs: the CPU version throws at once; a kernel cannot, and a host round trip per
// call would break CUDA-graph capture and stall the stream. So every entry point takes an
// optional device NonFiniteReport: the kernel counts NaN/inf inputs into it (codes of such tiles
// are then meaningless) and check_nonfinite() turns it into an error naming the first one, when
// the caller chooses to synchronise (e.g. once per step). Null: not checked (no cost).
// All pointers are device pointers; element types float or bf16.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "fp8moe/core/dtypes.h"

namespace fp8moe::kernels {

// Where the 1x128 scales of a [rows, cols] matrix go.
//   kRowMajor: scales[rows][ceil(cols/128)]  (QuantizedMatrix::scales)
//   kMnMajor:  scales[ceil(cols/128)][padded_rows(rows)], padding entries written 0 (what the
//              GEMMs' TMA reads; fp8moe::scales_mn_major gives the same array from the CPU)
enum class ScaleLayout { kRowMajor, kMnMajor };

// Device-side record of non-finite inputs, accumulated over every call given it until reset.
// Positions are those of x (also for the transposing entry point); calls with a report need
// cols < 2^24 so that row and column pack into one atomically minimised key.
struct NonFiniteReport {
  unsigned long long count;      // non-finite elements seen
  unsigned long long first_key;  // min over them of (row << 24 | column): the first in row order
  unsigned int kinds;            // bit 0 NaN, bit 1 +inf, bit 2 -inf
  unsigned int unused;
};
// Zero the record (stream-ordered).
void reset_nonfinite(NonFiniteReport* report, cudaStream_t stream);
// Synchronises `stream`, reads the record, and throws Error(kInvalidArgument) if it counted any:
// "<what>: 3 non-finite input values (NaN, +inf); first at row 5, column 17".
void check_nonfinite(const NonFiniteReport* report, const char* what, cudaStream_t stream);

// Per-token 1x128: codes [rows, ld_codes].
void quantize_1x128(const float* x, int64_t rows, int64_t cols, int64_t ld, bool pow2_scales,
                    uint8_t* codes, int64_t ld_codes, float* scales, ScaleLayout layout,
                    cudaStream_t stream, NonFiniteReport* nonfinite = nullptr);
void quantize_1x128(const bf16* x, int64_t rows, int64_t cols, int64_t ld, bool pow2_scales,
                    uint8_t* codes, int64_t ld_codes, float* scales, ScaleLayout layout,
                    cudaStream_t stream, NonFiniteReport* nonfinite = nullptr);

// 128x128 blocks: codes [rows, ld_codes], scales row-major [ceil(rows/128)][ceil(cols/128)].
void quantize_128x128(const float* x, int64_t rows, int64_t cols, int64_t ld, bool pow2_scales,
                      uint8_t* codes, int64_t ld_codes, float* scales, cudaStream_t stream,
                      NonFiniteReport* nonfinite = nullptr);
void quantize_128x128(const bf16* x, int64_t rows, int64_t cols, int64_t ld, bool pow2_scales,
                      uint8_t* codes, int64_t ld_codes, float* scales, cudaStream_t stream,
                      NonFiniteReport* nonfinite = nullptr);

// FP32 weights quantised 128x128 together with their transposed copies (the Dgrad operand), many
// weights in one launch: the FP8 weight forms a training step refreshes from the FP32 masters
// (ExpertWeightsFromMasters, LinearWeightsDevice). Per job, bit for bit quantize_128x128 of
// master into (w, sw) and transpose_fp8_weight_blocks (model/linear_gpu.h) of that into
// (wt, swt): wt[c][r] = w[r][c], rows n .. round_up(n, 128) of each wt row 0; swt[kb][nb] =
// sw[nb][kb]. Strides let a job fill part of a stacked weight (gate and up in one w13).
struct WeightQuantJob {
  const float* master = nullptr;  // [n, k] row-major, k % 128 == 0, 16-byte aligned
  int64_t n = 0, k = 0;
  uint8_t* w = nullptr;   // [n, k], 4-byte aligned
  float* sw = nullptr;    // [ceil(n / 128)][k / 128]
  uint8_t* wt = nullptr;  // [k][ldt], ldt >= round_up(n, 128), ldt % 4 == 0
  int64_t ldt = 0;
  float* swt = nullptr;  // [k / 128][ldst], ldst >= ceil(n / 128)
  int64_t ldst = 0;
};

class WeightQuantizer {
 public:
  // Checks every job (kInvalidArgument naming the job and the field) and uploads the table.
  explicit WeightQuantizer(std::vector<WeightQuantJob> jobs);
  ~WeightQuantizer();
  WeightQuantizer(const WeightQuantizer&) = delete;
  WeightQuantizer& operator=(const WeightQuantizer&) = delete;
  // Every job, one launch (a CTA per 128x128 block); stream-ordered, capturable.
  void run(cudaStream_t stream) const;
  const std::vector<WeightQuantJob>& jobs() const { return jobs_; }

 private:
  std::vector<WeightQuantJob> jobs_;
  void* table_ = nullptr;  // device
  int64_t blocks_ = 0;
};

// Fused cast + transpose in one pass over x [rows, cols]:
//   codes   [rows, cols]  1x128 along cols, scales in `layout` over [rows, cols]
//   codes_t [cols, rows]  = quantize(x^T) 1x128 along rows (the K-major copy Dgrad and Wgrad
//                           read), scales_t in `layout` over [cols, rows]
// codes / scales may be null to produce the transposed copy alone.
void quantize_1x128_transpose(const float* x, int64_t rows, int64_t cols, int64_t ld,
                              bool pow2_scales, uint8_t* codes, float* scales, uint8_t* codes_t,
                              float* scales_t, ScaleLayout layout, cudaStream_t stream,
                              NonFiniteReport* nonfinite = nullptr);
void quantize_1x128_transpose(const bf16* x, int64_t rows, int64_t cols, int64_t ld,
                              bool pow2_scales, uint8_t* codes, float* scales, uint8_t* codes_t,
                              float* scales_t, ScaleLayout layout, cudaStream_t stream,
                              NonFiniteReport* nonfinite = nullptr);

}  // namespace fp8moe::kernels
