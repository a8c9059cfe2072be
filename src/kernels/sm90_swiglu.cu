// Fused SwiGLU + 1x128 E4M3 quantisation (forward) and its elementwise backward, BF16 in, one pass
// over gate_up: forward 8 lanes per (row, 128-column tile), 16 columns a lane (two 16-byte loads
// of g and of u, one 16-byte store of codes), amax by shuffles within the 8 lanes; backward a warp
// per row, 8 columns a lane per step, d_row_scale by a warp sum. Checked against
// swiglu_*_reference (src/kernels/swiglu_reference.cpp; codes may differ where CUDA's expf and
// glibc's differ by an ulp): `test_kernels_gpu --gtest_filter='SwigluGpu*'`.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cfloat>

#include "bf16_vector.cuh"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/fp8/exact_quotient.h"
#include "fp8moe/kernels/swiglu.h"

namespace fp8moe::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kLanesPerTile = 8;    // forward: 8 lanes x 16 columns = one 128-column tile
constexpr int kColsPerLane = 16;    // forward: two 16-byte vectors of g and of u
constexpr int kBwdColsPerLane = 8;  // backward: one 16-byte vector of g, u, dh, dg, du
static_assert(kLanesPerTile * kColsPerLane == 128, "a tile is 128 columns");
static_assert(32 % kLanesPerTile == 0, "tile lane groups must not straddle warps");

__host__ __device__ __forceinline__ int64_t pad4(int64_t x) {
  return (x + 3) / 4 * 4;
}

// How the launched rows of the forward map onto rows and scale entries: the rows form `groups`
// blocks of `group_rows` (one block unless masked); each block is launched as `launched` rows
// (group_rows rounded up to 4 for M-major scales, whose padding entries are written 0).
struct RowMap {
  const int32_t* grouped_layout;
  const int32_t* masked_m;
  uint32_t group_rows;
  uint32_t launched;
  uint32_t tiles;
  bool mn_major;
};

__device__ __forceinline__ bool row_is_real(const RowMap& m, uint32_t group, uint32_t rr,
                                            uint32_t row) {
  if (m.grouped_layout != nullptr) return __ldg(m.grouped_layout + row) >= 0;
  if (m.masked_m != nullptr) return static_cast<int32_t>(rr) < __ldg(m.masked_m + group);
  return true;
}

// The CPU's fp8_scale_for_amax, operation for operation (as sm90_fp8_quantize.cu).
__device__ __forceinline__ float scale_for_amax(float amax, bool pow2) {
  // NOTE: amax / 448 formed without a division, bit for bit (exact_quotient.h).
  float scale = amax > 0.0f ? fmaxf(exact_quotient_any(amax, e4m3_max_divisor()), FLT_MIN) : 1.0f;
  if (pow2) scale = round_up_pow2(scale);
  return scale;
}

// sigmoid as model/ops.h computes it: 1 / (1 + exp(-g)), IEEE reciprocal (= IEEE 1 / x).
__device__ __forceinline__ float sigmoid(float g) {
  return __frcp_rn(__fadd_rn(1.0f, expf(-g)));
}

// Two E4M3 codes (lo in the low byte): cvt.rn.satfinite.e4m3x2.f32, equal to the CPU's
// float_to_e4m3_bits for every finite float (SwigluGpu.HardwareE4m3MatchesCodec checks them all).
__device__ __forceinline__ uint32_t e4m3x2(float lo, float hi) {
  return __nv_cvt_float2_to_fp8x2(make_float2(lo, hi), __NV_SATFINITE, __NV_E4M3);
}

// Rare path, so plain atomics (as sm90_fp8_quantize.cu's note_nonfinite).
__device__ __noinline__ void note_nonfinite(NonFiniteReport* report, float v, int64_t row,
                                            int64_t col) {
  atomicAdd(&report->count, 1ull);
  atomicMin(&report->first_key,
            (static_cast<unsigned long long>(row) << 24) | static_cast<unsigned long long>(col));
  atomicOr(&report->kinds, isnan(v) ? 1u : (v > 0.0f ? 2u : 4u));
}

// ---- forward: 8 lanes per (launched row, tile) ----
__global__ void __launch_bounds__(kThreads)
    swiglu_quantize_kernel(const bf16* gate_up, int64_t ld, int64_t inter, const float* row_scale,
                           RowMap map, uint32_t units, bool pow2, uint8_t* codes, int64_t ld_codes,
                           float* scales, NonFiniteReport* nonfinite) {
  const uint32_t unit = (blockIdx.x * kThreads + threadIdx.x) / kLanesPerTile;
  const uint32_t part = threadIdx.x % kLanesPerTile;
  // NOTE: all 8 lanes of a unit take the same branches, so shuffles need only the group's mask.
  const unsigned group_mask = 0xFFu << (threadIdx.x % 32 / kLanesPerTile * kLanesPerTile);
  if (unit >= units) return;
  const uint32_t lrow = unit / map.tiles, tile = unit % map.tiles;
  const uint32_t group = lrow / map.launched, rr = lrow % map.launched;

  // Scale entry: M-major padding rows get 0 and nothing else.
  const int64_t m_entry = (static_cast<int64_t>(group) * map.tiles + tile) * map.launched + rr;
  if (rr >= map.group_rows) {
    if (part == 0) scales[m_entry] = 0.0f;
    return;
  }
  const int64_t row = static_cast<int64_t>(group) * map.group_rows + rr;
  const int64_t s_entry = map.mn_major ? m_entry : row * map.tiles + tile;
  const int64_t col = static_cast<int64_t>(tile) * 128 + part * kColsPerLane;
  uint4* out = reinterpret_cast<uint4*>(codes + row * ld_codes + col);

  // Padding rows: never read; the codes and scale of a zero row.
  if (!row_is_real(map, group, rr, static_cast<uint32_t>(row))) {
    *out = make_uint4(0, 0, 0, 0);
    if (part == 0) scales[s_entry] = 1.0f;
    return;
  }

  // Load 16 columns of g and u.
  const uint4* gp = reinterpret_cast<const uint4*>(gate_up + row * ld + col);
  const uint4* up = reinterpret_cast<const uint4*>(gate_up + row * ld + inter + col);
  const uint4 gv0 = __ldg(gp), gv1 = __ldg(gp + 1), uv0 = __ldg(up), uv1 = __ldg(up + 1);
  float g[kColsPerLane], u[kColsPerLane];
  unpack_bf16x8(gv0, g);
  unpack_bf16x8(gv1, g + 8);
  unpack_bf16x8(uv0, u);
  unpack_bf16x8(uv1, u + 8);
  if (nonfinite != nullptr) [[unlikely]] {
#pragma unroll
    for (int i = 0; i < kColsPerLane; ++i) {
      if (!isfinite(g[i])) note_nonfinite(nonfinite, g[i], row, col + i);
      if (!isfinite(u[i])) note_nonfinite(nonfinite, u[i], row, inter + col + i);
    }
  }

  // h = ((g * s) * u) * w in FP32, and the tile's amax.
  const float w = row_scale != nullptr ? __ldg(row_scale + row) : 1.0f;
  float h[kColsPerLane];
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kColsPerLane; ++i) {
    h[i] = __fmul_rn(__fmul_rn(g[i], sigmoid(g[i])), u[i]);
    if (row_scale != nullptr) h[i] = __fmul_rn(h[i], w);
    amax = fmaxf(amax, fabsf(h[i]));
  }
#pragma unroll
  for (int o = kLanesPerTile / 2; o > 0; o >>= 1)
    amax = fmaxf(amax, __shfl_xor_sync(group_mask, amax, o));

  // Codes e4m3(h / scale): the IEEE quotient without a division (exact_quotient.h); a
  // power-of-two scale divides exactly by multiplying with its reciprocal.
  const float scale = scale_for_amax(amax, pow2);
  const Divisor d = make_divisor(scale);
  float q[kColsPerLane];
#pragma unroll
  for (int i = 0; i < kColsPerLane; ++i)
    q[i] = pow2 ? __fmul_rn(h[i], d.p) : exact_quotient_any(h[i], d);
  uint32_t word[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    word[i] = e4m3x2(q[4 * i], q[4 * i + 1]) | (e4m3x2(q[4 * i + 2], q[4 * i + 3]) << 16);
  *out = make_uint4(word[0], word[1], word[2], word[3]);
  if (part == 0) scales[s_entry] = scale;
}

// ---- backward: warps_per_row warps per row (a power of two dividing the block's 8 warps) ----
// NOTE: long rows get several warps so that enough loads are in flight (one warp per row of the
// dense FFN's 18432 columns kept 4096 warps with 72 dependent iterations each: 0.89x the naive
// elementwise kernel on H200); d_row_scale then adds the warps' partial sums in warp order.
__global__ void __launch_bounds__(kThreads)
    swiglu_backward_kernel(const bf16* gate_up, int64_t ld, const bf16* dh, int64_t ld_dh,
                           int64_t rows, int64_t inter, const float* row_scale,
                           const int32_t* grouped_layout, const int32_t* masked_m,
                           int64_t group_rows, bf16* d_gate_up, int64_t ld_d, float* d_row_scale,
                           int warps_per_row) {
  __shared__ float partial[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rows_per_block = kThreads / 32 / warps_per_row;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + warp / warps_per_row;
  const int part = warp % warps_per_row;
  const int64_t stride = static_cast<int64_t>(warps_per_row) * 32 * kBwdColsPerLane;
  const int64_t first = (static_cast<int64_t>(part) * 32 + lane) * kBwdColsPerLane;
  bool real = row < rows;
  if (real && grouped_layout != nullptr) real = __ldg(grouped_layout + row) >= 0;
  if (real && masked_m != nullptr) real = row % group_rows < __ldg(masked_m + row / group_rows);
  bf16* dg_row = d_gate_up + row * ld_d;

  float sum = 0.0f;
  if (row < rows && !real) {
    // Padding rows: never read; zero gradients.
    for (int64_t c = first; c < 2 * inter; c += stride)
      *reinterpret_cast<uint4*>(dg_row + c) = make_uint4(0, 0, 0, 0);
  } else if (real) {
    const bf16* g_row = gate_up + row * ld;
    const bf16* dh_row = dh + row * ld_dh;
    const float w = row_scale != nullptr ? __ldg(row_scale + row) : 1.0f;
#pragma unroll 2
    for (int64_t c = first; c < inter; c += stride) {
      float g[8], u[8], d[8];
      unpack_bf16x8(__ldg(reinterpret_cast<const uint4*>(g_row + c)), g);
      unpack_bf16x8(__ldg(reinterpret_cast<const uint4*>(g_row + inter + c)), u);
      unpack_bf16x8(__ldg(reinterpret_cast<const uint4*>(dh_row + c)), d);
      float dg[8], du[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        // model/ops.h's swiglu_backward with da = dh * w; NOTE: __f*_rn keep nvcc from contracting
        // into FMAs the CPU does not have.
        const float s = sigmoid(g[i]);
        const float silu = __fmul_rn(g[i], s);
        const float da = row_scale != nullptr ? __fmul_rn(d[i], w) : d[i];
        du[i] = __fmul_rn(da, silu);
        const float t = __fadd_rn(1.0f, __fmul_rn(g[i], __fsub_rn(1.0f, s)));
        dg[i] = __fmul_rn(__fmul_rn(__fmul_rn(da, u[i]), s), t);
        sum = __fadd_rn(sum, __fmul_rn(__fmul_rn(d[i], silu), u[i]));
      }
      *reinterpret_cast<uint4*>(dg_row + c) =
          make_uint4(pack_bf16x2(dg[0], dg[1]), pack_bf16x2(dg[2], dg[3]),
                     pack_bf16x2(dg[4], dg[5]), pack_bf16x2(dg[6], dg[7]));
      *reinterpret_cast<uint4*>(dg_row + inter + c) =
          make_uint4(pack_bf16x2(du[0], du[1]), pack_bf16x2(du[2], du[3]),
                     pack_bf16x2(du[4], du[5]), pack_bf16x2(du[6], du[7]));
    }
  }
  if (d_row_scale == nullptr) return;  // uniform over the grid: no thread skips the barrier
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, o);
  if (lane == 0) partial[warp] = sum;
  __syncthreads();
  if (part == 0 && lane == 0 && row < rows) {
    float total = 0.0f;  // 0 for padding rows: their partials are 0
    for (int i = 0; i < warps_per_row; ++i) total += partial[warp + i];
    d_row_scale[row] = total;
  }
}

// ---- host checks: every shape and pointer before any launch ----
bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

void check_common(const char* name, int64_t rows, int64_t inter, const SwigluRows& which) {
  FM_CHECK_ARG(rows >= 0, name, ": negative rows ", rows);
  FM_CHECK_ARG(inter > 0 && inter % 128 == 0, name, ": inter=", inter,
               " must be a positive multiple of 128");
  FM_CHECK_ARG(which.grouped_layout == nullptr || which.masked_m == nullptr, name,
               ": both grouped_layout and masked_m given");
  FM_CHECK_ARG(which.masked_m != nullptr || which.group_rows == 0, name,
               ": group_rows=", which.group_rows, " without masked_m");
  FM_CHECK_ARG(which.masked_m == nullptr || (which.group_rows > 0 && rows % which.group_rows == 0),
               name, ": masked form needs group_rows > 0 dividing rows (rows=", rows,
               ", group_rows=", which.group_rows, ")");
}

}  // namespace

void swiglu_quantize_1x128(const bf16* gate_up, int64_t ld, int64_t rows, int64_t inter,
                           const float* row_scale, SwigluRows which, bool pow2_scales,
                           uint8_t* codes, int64_t ld_codes, float* scales, ScaleLayout layout,
                           cudaStream_t stream, NonFiniteReport* nonfinite) {
  constexpr const char* kName = "swiglu_quantize_1x128";
  check_common(kName, rows, inter, which);
  FM_CHECK_ARG(ld >= 2 * inter, kName, ": ld=", ld, " < 2 * inter=", 2 * inter);
  FM_CHECK_ARG(ld_codes >= inter, kName, ": ld_codes=", ld_codes, " < inter=", inter);
  FM_CHECK_ARG(nonfinite == nullptr || 2 * inter < (int64_t{1} << 24), kName,
               ": 2 * inter=", 2 * inter, " too large for a NonFiniteReport (< 2^24)");
  if (rows == 0) return;
  FM_CHECK_ARG(gate_up != nullptr && codes != nullptr && scales != nullptr, kName,
               ": null gate_up, codes or scales");
  FM_CHECK_ARG(aligned16(gate_up) && ld % 8 == 0, kName,
               ": gate_up must be 16-byte aligned with ld % 8 == 0 (ld=", ld, ")");
  FM_CHECK_ARG(aligned16(codes) && ld_codes % 16 == 0, kName,
               ": codes must be 16-byte aligned with ld_codes % 16 == 0 (ld_codes=", ld_codes, ")");
  FM_CHECK_ARG(reinterpret_cast<uintptr_t>(scales) % 4 == 0, kName, ": scales misaligned");
  const bool masked = which.masked_m != nullptr;
  const bool mn = layout == ScaleLayout::kMnMajor;
  const int64_t group_rows = masked ? which.group_rows : rows;
  const int64_t launched = mn ? pad4(group_rows) : group_rows;
  const int64_t groups = masked ? rows / group_rows : 1;
  const int64_t tiles = inter / 128;
  const int64_t units = groups * launched * tiles;
  FM_CHECK_ARG(units * kLanesPerTile < (int64_t{1} << 31), kName, ": [", rows, ", ", inter,
               "] too large");
  const RowMap map{which.grouped_layout,
                   which.masked_m,
                   static_cast<uint32_t>(group_rows),
                   static_cast<uint32_t>(launched),
                   static_cast<uint32_t>(tiles),
                   mn};
  const int64_t blocks = (units * kLanesPerTile + kThreads - 1) / kThreads;
  swiglu_quantize_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      gate_up, ld, inter, row_scale, map, static_cast<uint32_t>(units), pow2_scales, codes,
      ld_codes, scales, nonfinite);
  FM_CHECK_LAUNCH();
}

void swiglu_backward(const bf16* gate_up, int64_t ld, const bf16* dh, int64_t ld_dh, int64_t rows,
                     int64_t inter, const float* row_scale, SwigluRows which, bf16* d_gate_up,
                     int64_t ld_d, float* d_row_scale, cudaStream_t stream) {
  constexpr const char* kName = "swiglu_backward";
  check_common(kName, rows, inter, which);
  FM_CHECK_ARG(ld >= 2 * inter, kName, ": ld=", ld, " < 2 * inter=", 2 * inter);
  FM_CHECK_ARG(ld_dh >= inter, kName, ": ld_dh=", ld_dh, " < inter=", inter);
  FM_CHECK_ARG(ld_d >= 2 * inter, kName, ": ld_d=", ld_d, " < 2 * inter=", 2 * inter);
  if (rows == 0) return;
  FM_CHECK_ARG(gate_up != nullptr && dh != nullptr && d_gate_up != nullptr, kName,
               ": null gate_up, dh or d_gate_up");
  FM_CHECK_ARG(aligned16(gate_up) && ld % 8 == 0, kName,
               ": gate_up must be 16-byte aligned with ld % 8 == 0 (ld=", ld, ")");
  FM_CHECK_ARG(aligned16(dh) && ld_dh % 8 == 0, kName,
               ": dh must be 16-byte aligned with ld_dh % 8 == 0 (ld_dh=", ld_dh, ")");
  FM_CHECK_ARG(aligned16(d_gate_up) && ld_d % 8 == 0, kName,
               ": d_gate_up must be 16-byte aligned with ld_d % 8 == 0 (ld_d=", ld_d, ")");
  // One warp per 2048 columns of the row (each lane then makes one pass of 8), at most the block.
  int warps_per_row = 1;
  while (warps_per_row < kThreads / 32 && inter > 2048 * warps_per_row) warps_per_row *= 2;
  const int64_t rows_per_block = kThreads / 32 / warps_per_row;
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  FM_CHECK_ARG(blocks < (int64_t{1} << 31), kName, ": too many rows (", rows, ")");
  swiglu_backward_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      gate_up, ld, dh, ld_dh, rows, inter, row_scale, which.grouped_layout, which.masked_m,
      which.group_rows, d_gate_up, ld_d, d_row_scale, warps_per_row);
  FM_CHECK_LAUNCH();
}

}  // namespace fp8moe::kernels
