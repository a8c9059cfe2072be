// What the GPU tests that run a whole MoE layer (dispatch, the expert FP8 GEMM, combine) against
// the CPU share: the error measure, the CPU expert outputs, and one rank's device buffers.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "fp8moe/comm/ep.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/fp8/gemm_reference.h"
#include "fp8moe/fp8/quantize.h"

namespace fp8moe::comm::testing {

// ||got - want|| / ||want|| over BF16 bit patterns.
inline double rel_error(const std::vector<uint16_t>& got, const std::vector<uint16_t>& want) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = bf16_bits_to_float(got[i]), w = bf16_bits_to_float(want[i]);
    diff += (g - w) * (g - w);
    norm += w * w;
  }
  return std::sqrt(diff / std::max(norm, 1e-30));
}

// The CPU expert outputs on the reference dispatch's rows (BF16, row bound x H; padding rows 0):
// each local expert's grouped rows through gemm_fp8_reference_bf16 with its 128x128 weights.
inline std::vector<uint16_t> reference_expert_outputs(const EpConfig& cfg, const DispatchResult& d,
                                                      const std::vector<QuantizedMatrix>& weights) {
  const int64_t H = cfg.hidden, KB = H / 128;
  std::vector<uint16_t> y(cfg.row_bound() * H, 0);
  for (int e = 0; e < cfg.experts_per_rank(); ++e) {
    const int64_t off = d.grouped.expert_offsets[e], rows = d.grouped.expert_counts[e];
    if (rows == 0) continue;
    Fp8MatrixRef a;
    a.codes = d.grouped.x_fp8.data() + off * H;
    a.rows = rows;
    a.cols = H;
    a.ld = H;
    a.scales = d.grouped.x_scales.data() + off * KB;
    a.granularity = ScaleGranularity::k1x128;
    a.scale_row_stride = KB;
    a.scale_col_stride = 1;
    gemm_fp8_reference_bf16(a, weights[e].ref(), reinterpret_cast<bf16*>(y.data() + off * H), H);
  }
  return y;
}

// One rank's buffers of a layer test: its stream, tokens, ids, weights, the GEMM's operands
// (A scales, B codes and scales), the expert outputs and the combined output. free() after the
// stream is synchronised, with the rank's device current.
struct LayerDevice {
  cudaStream_t stream = nullptr;
  uint16_t *x = nullptr, *y = nullptr, *out = nullptr;
  int32_t* idx = nullptr;
  float *w = nullptr, *sa = nullptr, *sb = nullptr;
  uint8_t* b = nullptr;

  void free() {
    cudaStreamSynchronize(stream);
    for (void* p : {static_cast<void*>(x), static_cast<void*>(y), static_cast<void*>(out),
                    static_cast<void*>(idx), static_cast<void*>(w), static_cast<void*>(sa),
                    static_cast<void*>(sb), static_cast<void*>(b)})
      cudaFree(p);
    cudaStreamDestroy(stream);
  }
};

}  // namespace fp8moe::comm::testing
