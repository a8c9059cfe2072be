// The sm_90a FP8 GEMM kernel shared by every form (dense, grouped contiguous / masked, wgrad,
// k-grouped wgrad): D = A * B^T with E4M3 operands, one persistent CTA per multiprocessor, a
// producer warpgroup that feeds a ring of shared-memory stages through TMA (mbarrier complete_tx),
// one math warpgroup per 64 rows issuing wgmma m64nNk32 over each 128-wide K block and promoting
// the partial sums into FP32 registers with the scales (FFMA), then a direct register epilogue.
// Checked against gemm_fp8_reference: tests/kernels/fp8_gemm_gpu_test.cu
// (`build-device/tests/test_kernels_gpu --gtest_filter='Fp8Gemm*'`).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fp8moe/kernels/fp8_gemm.h"
#include "sm90_ptx.cuh"
#include "sm90_wgmma.cuh"

namespace fp8moe::kernels::sm90 {

enum class Form : int { kDense = 0, kContiguous = 1, kMasked = 2, kKGrouped = 3 };

struct GemmParams {
  Form form;
  int m;            // rows (masked: max_m per group)
  int n, k;         // k: total K (k-grouped: the sum of the groups)
  int num_groups;
  int num_stages;
  const int32_t* grouped_layout;  // contiguous: expert of each row
  const int32_t* masked_m;        // masked: valid rows of each group
  const float* sb;                // 1x128 x 128x128: B scales [G][ceil(N/128)][K/128]
  void* d;
  int k_block_offsets[kMaxKGroups + 1];  // k-grouped: first K block of each group
};

struct Tile {
  int group, m_base, n_base;
  int k_block_begin, num_k_blocks;
  int m_end;  // rows < m_end (in the group's row space) are real
};

// Tiles are numbered linearly; consecutive numbers sweep 16 N-blocks across the M-blocks so that
// the CTAs running at once share A and B tiles in L2.
__device__ __forceinline__ void rasterise(int t, int tiles_m, int tiles_n, int& mb, int& nb) {
  constexpr int kBand = 16;
  const int band = t / (kBand * tiles_m);
  const int in_band = t - band * kBand * tiles_m;
  const int band_n = min(kBand, tiles_n - band * kBand);
  mb = in_band / band_n;
  nb = band * kBand + in_band % band_n;
}

// Returns false when t is past the last tile; `skip` marks tiles with no work (padding tiles of
// the contiguous form, groups with no K).
template <int kBlockM, int kBlockN>
__device__ __forceinline__ bool get_tile(const GemmParams& p, int t, Tile& tile, bool& skip) {
  const int tiles_n = (p.n + kBlockN - 1) / kBlockN;
  const int kb_total = p.k / 128;
  skip = false;
  int mb, nb;
  if (p.form == Form::kMasked) {
    for (int g = 0; g < p.num_groups; ++g) {
      const int mg = __ldg(p.masked_m + g);
      const int count = (mg + kBlockM - 1) / kBlockM * tiles_n;
      if (t < count) {
        rasterise(t, (mg + kBlockM - 1) / kBlockM, tiles_n, mb, nb);
        tile = Tile{g, mb * kBlockM, nb * kBlockN, 0, kb_total, mg};
        return true;
      }
      t -= count;
    }
    return false;
  }
  const int tiles_m = (p.m + kBlockM - 1) / kBlockM;
  const int per_group = tiles_m * tiles_n;
  int g = 0;
  if (p.form == Form::kKGrouped) {
    g = t / per_group;
    if (g >= p.num_groups) return false;
    t -= g * per_group;
  } else if (t >= per_group) {
    return false;
  }
  rasterise(t, tiles_m, tiles_n, mb, nb);
  tile = Tile{g, mb * kBlockM, nb * kBlockN, 0, kb_total, p.m};
  if (p.form == Form::kContiguous) {
    tile.group = __ldg(p.grouped_layout + tile.m_base);
    skip = tile.group < 0;
  } else if (p.form == Form::kKGrouped) {
    tile.k_block_begin = p.k_block_offsets[g];
    tile.num_k_blocks = p.k_block_offsets[g + 1] - tile.k_block_begin;
    skip = tile.num_k_blocks == 0;
  }
  return true;
}

template <int kBlockM, int kBlockN, bool kWgrad>
struct SmemLayout {
  static constexpr int kABytes = kBlockM * 128;
  static constexpr int kBBytes = kBlockN * 128;
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kTxBytes = kABytes + kBBytes + kBlockM * 4 + (kWgrad ? kBlockN * 4 : 0);
  uint8_t* base;
  int stages;
  __device__ uint8_t* a(int s) const { return base + s * kStageBytes; }
  __device__ uint8_t* b(int s) const { return base + s * kStageBytes + kABytes; }
  __device__ float* sa(int s) const {
    return reinterpret_cast<float*>(base + stages * kStageBytes) + s * kBlockM;
  }
  __device__ float* sb(int s) const {
    return reinterpret_cast<float*>(base + stages * (kStageBytes + kBlockM * 4)) + s * kBlockN;
  }
  __device__ uint64_t* full(int s) const {
    return reinterpret_cast<uint64_t*>(base + stages * (kStageBytes + kBlockM * 4 +
                                                        (kWgrad ? kBlockN * 4 : 0))) + s;
  }
  __device__ uint64_t* empty(int s) const { return full(stages) + s; }
};

struct PipeState {
  int stage = 0;
  uint32_t phase = 0;
  __device__ void advance(int stages) {
    if (++stage == stages) {
      stage = 0;
      phase ^= 1u;
    }
  }
};

// ---- producer: one thread issues every TMA load ----
template <int kBlockM, int kBlockN, bool kWgrad>
__device__ __forceinline__ void produce(const GemmParams& p, const SmemLayout<kBlockM, kBlockN, kWgrad>& sm,
                                        const CUtensorMap* map_a, const CUtensorMap* map_b,
                                        const CUtensorMap* map_sa, const CUtensorMap* map_sb) {
  using Layout = SmemLayout<kBlockM, kBlockN, kWgrad>;
  const int kb_total = p.k / 128;
  PipeState pipe;
  Tile tile;
  bool skip;
  for (int t = blockIdx.x; get_tile<kBlockM, kBlockN>(p, t, tile, skip); t += gridDim.x) {
    if (skip) continue;
    const bool per_group_a = p.form == Form::kMasked;
    const bool per_group_b = p.form == Form::kContiguous || p.form == Form::kMasked;
    const int a_row = (per_group_a ? tile.group * p.m : 0) + tile.m_base;
    const int b_row = (per_group_b ? tile.group * p.n : 0) + tile.n_base;
    for (int kb = 0; kb < tile.num_k_blocks; ++kb) {
      const int kbg = tile.k_block_begin + kb;
      mbar_wait(sm.empty(pipe.stage), pipe.phase ^ 1u);
      uint64_t* full = sm.full(pipe.stage);
      mbar_arrive_expect_tx(full, Layout::kTxBytes);
      tma_load_2d(sm.a(pipe.stage), map_a, full, kbg * 128, a_row);
      tma_load_2d(sm.b(pipe.stage), map_b, full, kbg * 128, b_row);
      tma_load_2d(sm.sa(pipe.stage), map_sa, full, tile.m_base,
                  (per_group_a ? tile.group * kb_total : 0) + kbg);
      if constexpr (kWgrad) tma_load_2d(sm.sb(pipe.stage), map_sb, full, tile.n_base, kbg);
      pipe.advance(sm.stages);
    }
  }
}

// ---- math: one warpgroup per 64 rows ----
template <int kBlockM, int kBlockN, bool kWgrad>
__device__ __forceinline__ void compute(const GemmParams& p,
                                        const SmemLayout<kBlockM, kBlockN, kWgrad>& sm) {
  using Mma = WgmmaE4M3<kBlockN>;
  constexpr int kRegs = Mma::kRegs;
  const int wg = threadIdx.x / 128;
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int row_in_tile = wg * 64 + warp * 16 + lane / 4;  // and + 8
  const int col_in_frag = 2 * (lane % 4);
  const int kb_total = p.k / 128;
  const int n_scale_blocks = (p.n + 127) / 128;

  PipeState pipe;
  Tile tile;
  bool skip;
  float acc[kRegs];
  float part[kRegs];
  for (int t = blockIdx.x; get_tile<kBlockM, kBlockN>(p, t, tile, skip); t += gridDim.x) {
    if (skip) continue;
#pragma unroll
    for (int i = 0; i < kRegs; ++i) acc[i] = 0.0f;
    const float* sb_ptr = nullptr;
    if constexpr (!kWgrad)
      sb_ptr = p.sb + (static_cast<int64_t>(tile.group) * n_scale_blocks + tile.n_base / 128) * kb_total;

    for (int kb = 0; kb < tile.num_k_blocks; ++kb) {
      float sb_block = 0.0f;
      if constexpr (!kWgrad) sb_block = __ldg(sb_ptr + kb);
      mbar_wait(sm.full(pipe.stage), pipe.phase);
      const float* sa = sm.sa(pipe.stage);
      const float sa0 = sa[row_in_tile], sa1 = sa[row_in_tile + 8];

      const uint64_t desc_a = make_desc_kmajor_sw128(sm.a(pipe.stage) + wg * 64 * 128);
      const uint64_t desc_b = make_desc_kmajor_sw128(sm.b(pipe.stage));
#pragma unroll
      for (int i = 0; i < kRegs; ++i) fence_operand(part[i]);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) Mma::mma(part, desc_a + 2 * kk, desc_b + 2 * kk, kk > 0);
      wgmma_commit();
      wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < kRegs; ++i) fence_operand(part[i]);

      // Promotion: acc += partial * (sa * sb), the reference's fmaf.
      if constexpr (kWgrad) {
        const float* sbs = sm.sb(pipe.stage);
        float sbv[kRegs / 2];
#pragma unroll
        for (int c = 0; c < kBlockN / 8; ++c) {
          const float2 v = *reinterpret_cast<const float2*>(sbs + 8 * c + col_in_frag);
          sbv[2 * c] = v.x;
          sbv[2 * c + 1] = v.y;
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(sm.empty(pipe.stage));
#pragma unroll
        for (int c = 0; c < kBlockN / 8; ++c) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            acc[4 * c + j] = fmaf(part[4 * c + j], sa0 * sbv[2 * c + j], acc[4 * c + j]);
            acc[4 * c + 2 + j] = fmaf(part[4 * c + 2 + j], sa1 * sbv[2 * c + j], acc[4 * c + 2 + j]);
          }
        }
      } else {
        __syncwarp();
        if (lane == 0) mbar_arrive(sm.empty(pipe.stage));
        const float s0 = sa0 * sb_block, s1 = sa1 * sb_block;
#pragma unroll
        for (int c = 0; c < kBlockN / 8; ++c) {
          acc[4 * c + 0] = fmaf(part[4 * c + 0], s0, acc[4 * c + 0]);
          acc[4 * c + 1] = fmaf(part[4 * c + 1], s0, acc[4 * c + 1]);
          acc[4 * c + 2] = fmaf(part[4 * c + 2], s1, acc[4 * c + 2]);
          acc[4 * c + 3] = fmaf(part[4 * c + 3], s1, acc[4 * c + 3]);
        }
      }
      pipe.advance(sm.stages);
    }

    // ---- epilogue: registers straight to global memory ----
    int64_t row_base = tile.m_base;
    if (p.form == Form::kMasked || p.form == Form::kKGrouped)
      row_base += static_cast<int64_t>(tile.group) * p.m;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = tile.m_base + row_in_tile + 8 * i;
      bool row_ok = r < tile.m_end;
      if (row_ok && p.form == Form::kContiguous) row_ok = __ldg(p.grouped_layout + r) >= 0;
      if (!row_ok) continue;
      const int64_t grow = row_base + row_in_tile + 8 * i;
#pragma unroll
      for (int c = 0; c < kBlockN / 8; ++c) {
        const int col = tile.n_base + 8 * c + col_in_frag;
        if (col >= p.n) continue;
        if constexpr (kWgrad) {
          float2* dst = reinterpret_cast<float2*>(static_cast<float*>(p.d) + grow * p.n + col);
          float2 v = *dst;
          v.x += acc[4 * c + 2 * i];
          v.y += acc[4 * c + 2 * i + 1];
          *dst = v;
        } else {
          *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(p.d) + grow * p.n + col) =
              __floats2bfloat162_rn(acc[4 * c + 2 * i], acc[4 * c + 2 * i + 1]);
        }
      }
    }
  }
}

template <int kBlockM, int kBlockN, bool kWgrad>
__global__ void __launch_bounds__(128 * (kBlockM / 64 + 1), 1)
    fp8_gemm_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                    const __grid_constant__ CUtensorMap map_sa,
                    const __grid_constant__ CUtensorMap map_sb, const __grid_constant__ GemmParams p) {
  static_assert(kBlockM == 64 || kBlockM == 128, "BLOCK_M: one math warpgroup per 64 rows");
  static_assert(kBlockN == 64 || kBlockN == 128,
                "BLOCK_N must divide the 128-wide B scale blocks (one scale per tile)");
  constexpr int kNumMathThreads = kBlockM / 64 * 128;
  extern __shared__ __align__(1024) uint8_t smem[];
  SmemLayout<kBlockM, kBlockN, kWgrad> sm{smem, p.num_stages};

  if (threadIdx.x == 0) {
    for (int s = 0; s < p.num_stages; ++s) {
      mbar_init(sm.full(s), 1);
      mbar_init(sm.empty(s), kNumMathThreads / 32);
    }
    fence_barrier_init();
  }
  if (threadIdx.x == kNumMathThreads) {
    tma_prefetch_desc(&map_a);
    tma_prefetch_desc(&map_b);
    tma_prefetch_desc(&map_sa);
    if constexpr (kWgrad) tma_prefetch_desc(&map_sb);
  }
  __syncthreads();

  if (threadIdx.x >= kNumMathThreads) {
    if constexpr (kBlockM == 128) setmaxnreg_dec<40>();
    if (threadIdx.x == kNumMathThreads) produce(p, sm, &map_a, &map_b, &map_sa, &map_sb);
  } else {
    if constexpr (kBlockM == 128) setmaxnreg_inc<232>();
    compute(p, sm);
  }
}

}  // namespace fp8moe::kernels::sm90
