// MLA's decoding attention in latent form (kernels/mla_decode.h) on sm_90a: FlashDecoding.
// A CTA = 64 query rows (queries x heads of one sequence) x one key range (split) of that
// sequence; two warpgroups share each 64-token key tile of the paged latent cache: warpgroup w
// computes the scores of keys [32 w, 32 w + 32) against all 64 rows (wgmma m64n32, Q and K from
// shared memory), the two halves' row maxima meet in shared memory, P (BF16) goes to shared
// memory, and warpgroup w adds P . c for the output columns [w L / 2, (w + 1) L / 2) (wgmma
// m64n128, P from registers, c = the K tile itself read N-major: the latent is both key and
// value). Key tiles arrive by cp.async, double-buffered. With several splits, each writes its
// normalised FP32 partial and lse to the workspace and mla_decode_combine_kernel merges them.
// Reference: src/kernels/mla_decode_reference.cpp. Test: test_kernels_gpu
// --gtest_filter='MlaDecodeGpu*'. Bench: bench/gpu/mla_decode_bench.cu.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/kernels/mla_decode.h"
#include "sm90_mla_attention_common.cuh"
#include "sm90_ptx.cuh"
#include "sm90_wgmma_bf16.cuh"

namespace fp8moe::kernels {
namespace {

using namespace mla;  // NOLINT(build/namespaces): sm90_mla_attention_common.cuh
using sm90::cp_async_16;
using sm90::cp_async_commit;
using sm90::cp_async_wait;
using sm90::fence_proxy_async;
using sm90::smem_addr;
using sm90::wgmma_commit;
using sm90::wgmma_fence;
using sm90::wgmma_wait;

constexpr int kRowsCta = 64, kKeys = 64, kThreads = 256;

template <int kL, int kR>
struct Tile {
  static constexpr int kD = kL + kR;
  static constexpr int kChunks = kD / 8;  // 16-byte chunks a row
  static constexpr int kQBytes = kRowsCta * kD * 2;
  static constexpr int kKBytes = kKeys * kD * 2;
  static constexpr int kPBytes = kRowsCta * kKeys * 2;
  // Q, two K stages, P, the two warpgroups' row maxima and row sums.
  static constexpr int kSmem = kQBytes + 2 * kKBytes + kPBytes + 4 * kRowsCta * 4;
  static constexpr int kOutTiles = kL / 256;  // m64n128 accumulators a warpgroup
  static_assert(kD % 64 == 0 && kL % 256 == 0, "whole 64-column panels; 128-column output tiles");
};

struct Params {
  const bf16 *q, *cache;
  const int32_t *page_table, *seq_lens;
  bf16* out;
  float *lse, *o_part, *lse_part;
  int queries, heads, rows, page_tokens, max_pages, splits, split_tokens;
  float scale_log2;
};

// Rows [0, kRows) of a panel tile from src + r * ld (r < rows_valid; else zero-filled, so that
// padding rows of a page, which may hold anything, never reach the tensor cores as NaN).
template <int kRows, int kChunks>
__device__ __forceinline__ void load_panel_rows(uint8_t* tile, const bf16* src, int64_t ld,
                                                int rows_valid) {
  for (int idx = static_cast<int>(threadIdx.x); idx < kRows * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    const bool valid = r < rows_valid;
    cp_async_16(tile + panel_off<kRows>(r, c), src + (valid ? r * ld + c * 8 : 0),
                valid ? 16u : 0u);
  }
}

// A CTA's keys of sequence b: split `split`'s range [k_begin, k_end), whole 64-key tiles (a tile
// never leaves its page: page_tokens % 64 == 0), and the end of the keys each of the thread's two
// rows (r_local, r_local + 8) sees: its query's position (causal among the step's new tokens) or
// the split's end.
struct CtaKeys {
  int k_begin, k_end, n_tiles, key_end[2];
};

__device__ __forceinline__ CtaKeys cta_keys(const Params& p, int len, int split, int row0,
                                            int r_local) {
  const int chunk = p.split_tokens > 0
                        ? p.split_tokens
                        : ((len + p.splits - 1) / p.splits + kKeys - 1) / kKeys * kKeys;
  CtaKeys k;
  k.k_begin = split * chunk;
  k.k_end = min(len, k.k_begin + chunk);
  k.n_tiles = k.k_end > k.k_begin ? (k.k_end - k.k_begin + kKeys - 1) / kKeys : 0;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = row0 + r_local + 8 * i;
    k.key_end[i] = row < p.rows ? min(k.k_end, len - p.queries + row / p.heads + 1) : 0;
  }
  return k;
}

// Row `row` of sequence b (the thread's accumulator row i of o: columns col0 + 128 t + 8 c + {0,
// 1}) normalised by its sum l and written: BF16 out and lse with one split, else the FP32 partial
// and its lse for the merge. lse = ln 2 * (max + log2 l) (scores in log2 units); an empty row: 0
// and -inf.
template <int kL, int kTiles>
__device__ __forceinline__ void store_row(const Params& p, const float (&o)[kTiles][16][4], int i,
                                          int b, int row, int split, int col0, float mx, float l,
                                          bool writes_lse) {
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  const float lse = l > 0.0f ? (mx + log2f(l)) * kLn2 : -INFINITY;
  const int64_t grow = static_cast<int64_t>(b) * p.rows + row;
  if (p.splits == 1) {
    bf16* dst = p.out + grow * kL + col0;
#pragma unroll
    for (int t = 0; t < kTiles; ++t)
#pragma unroll
      for (int c = 0; c < 16; ++c)
        *reinterpret_cast<uint32_t*>(dst + t * 128 + c * 8) =
            pack_bf16x2(o[t][c][2 * i] * inv, o[t][c][2 * i + 1] * inv);
    if (writes_lse) p.lse[grow] = lse;
  } else {
    const int64_t part = grow * p.splits + split;
    float* dst = p.o_part + part * kL + col0;
#pragma unroll
    for (int t = 0; t < kTiles; ++t)
#pragma unroll
      for (int c = 0; c < 16; ++c)
        *reinterpret_cast<float2*>(dst + t * 128 + c * 8) =
            make_float2(o[t][c][2 * i] * inv, o[t][c][2 * i + 1] * inv);
    if (writes_lse) p.lse_part[part] = lse;
  }
}

template <int kL, int kR>
__global__ void __launch_bounds__(kThreads, 1) mla_decode_kernel(Params p) {
  using T = Tile<kL, kR>;
  extern __shared__ __align__(1024) uint8_t smem[];
  uint8_t* sq = smem;
  uint8_t* sk = sq + T::kQBytes;
  uint8_t* sp = sk + 2 * T::kKBytes;
  float* smax = reinterpret_cast<float*>(sp + T::kPBytes);  // [2 warpgroups][64 rows]
  float* ssum = smax + 2 * kRowsCta;
  const int split = blockIdx.x, row0 = blockIdx.y * kRowsCta, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wg = warp / 4;
  const int r_local = (warp % 4) * 16 + lane / 4;  // this thread's rows: r_local, r_local + 8
  const CtaKeys keys = cta_keys(p, p.seq_lens[b], split, row0, r_local);
  const int k_begin = keys.k_begin, k_end = keys.k_end, n_tiles = keys.n_tiles;
  const int(&key_end)[2] = keys.key_end;
  const auto load_tile = [&](int j, int stage) {
    const int k0 = k_begin + j * kKeys;
    const int page = p.page_table[static_cast<int64_t>(b) * p.max_pages + k0 / p.page_tokens];
    const bf16* src =
        p.cache + (static_cast<int64_t>(page) * p.page_tokens + k0 % p.page_tokens) * T::kD;
    load_panel_rows<kKeys, T::kChunks>(sk + stage * T::kKBytes, src, T::kD, k_end - k0);
  };

  load_panel_rows<kRowsCta, T::kChunks>(sq, p.q + (static_cast<int64_t>(b) * p.rows + row0) * T::kD,
                                        T::kD, p.rows - row0);
  if (n_tiles > 0) load_tile(0, 0);
  cp_async_commit();
  cp_async_wait<0>();
  fence_proxy_async();  // cp.async wrote what the tensor cores read next
  __syncthreads();

  float o[T::kOutTiles][16][4];
#pragma unroll
  for (int t = 0; t < T::kOutTiles; ++t) zero(o[t]);
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
  const uint32_t tq = smem_addr(sq), tp = smem_addr(sp);
  for (int j = 0; j < n_tiles; ++j) {
    const int stage = j & 1, k0 = k_begin + j * kKeys;
    if (j + 1 < n_tiles) load_tile(j + 1, stage ^ 1);
    cp_async_commit();
    const uint32_t tk = smem_addr(sk + stage * T::kKBytes);

    // S = Q K^T for this warpgroup's 32 keys.
    float s[4][4];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < T::kD / 16; ++kk)
      sm90::WgmmaBf16Ss<32>::mma(s, desc_k<kRowsCta>(tq, 0, kk), desc_k<kKeys>(tk, 32 * wg, kk),
                                 kk > 0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_acc(s);

    // Scale to log2 units, mask, and this half's row maxima.
    float half_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + 32 * wg + nt * 8 + (lane % 4) * 2 + (e & 1), i = e >> 1;
        s[nt][e] = key < key_end[i] ? s[nt][e] * p.scale_log2 : -INFINITY;
        half_max[i] = fmaxf(half_max[i], s[nt][e]);
      }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      half_max[i] = quad_max(half_max[i]);
      if (lane % 4 == 0) smax[wg * kRowsCta + r_local + 8 * i] = half_max[i];
    }
    __syncthreads();
    float alpha[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = r_local + 8 * i;
      const float mx = fmaxf(row_max[i], fmaxf(smax[r], smax[kRowsCta + r]));
      // NOTE: a row with every key so far masked keeps -inf; exp2 must not see -inf - -inf.
      const float base = mx == -INFINITY ? 0.0f : mx;
      alpha[i] = exp2f(row_max[i] - base);
      row_max[i] = mx;
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        s[nt][2 * i] = exp2f(s[nt][2 * i] - base);
        s[nt][2 * i + 1] = exp2f(s[nt][2 * i + 1] - base);
        sum += s[nt][2 * i] + s[nt][2 * i + 1];
      }
      row_sum[i] = row_sum[i] * alpha[i] + sum;
    }
    // P (BF16) of this half into the shared 64 x 64 tile (one panel).
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = r_local + 8 * i, col = 32 * wg + nt * 8 + (lane % 4) * 2;
        *reinterpret_cast<uint32_t*>(sp + panel_off<kRowsCta>(r, col / 8) + (col % 8) * 2) =
            pack_bf16x2(s[nt][2 * i], s[nt][2 * i + 1]);
      }
    __syncthreads();
    uint32_t pa[kKeys / 16][4];
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      const int mi = lane >> 3;
      ldsm_x4(pa[kk], tp + panel_off<kRowsCta>((warp % 4) * 16 + (mi & 1) * 8 + (lane & 7),
                                               2 * kk + (mi >> 1)));
    }
#pragma unroll
    for (int t = 0; t < T::kOutTiles; ++t)
#pragma unroll
      for (int c = 0; c < 16; ++c) {
        o[t][c][0] *= alpha[0];
        o[t][c][1] *= alpha[0];
        o[t][c][2] *= alpha[1];
        o[t][c][3] *= alpha[1];
      }
    // O += P c over this warpgroup's output columns (the K tile's panels, N-major).
    wgmma_fence();
#pragma unroll
    for (int t = 0; t < T::kOutTiles; ++t) {
      const uint32_t panel0 = (wg * (kL / 2) + t * 128) / 64;
#pragma unroll
      for (int kk = 0; kk < kKeys / 16; ++kk)
        sm90::WgmmaBf16RsT<128>::mma(o[t], pa[kk], desc_n<kKeys>(tk + panel0 * kKeys * 128, kk),
                                     true);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_frag(pa);
#pragma unroll
    for (int t = 0; t < T::kOutTiles; ++t) fence_acc(o[t]);
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
  }

  // Epilogue: the two halves' sums, O / l, lse = ln 2 * (max + log2 l).
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    row_sum[i] = quad_sum(row_sum[i]);
    if (lane % 4 == 0) ssum[wg * kRowsCta + r_local + 8 * i] = row_sum[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = r_local + 8 * i, row = row0 + r;
    if (row >= p.rows) continue;
    store_row<kL>(p, o, i, b, row, split, wg * (kL / 2) + (lane % 4) * 2, row_max[i],
                  ssum[r] + ssum[kRowsCta + r], wg == 0 && lane % 4 == 0);
  }
}

// The splits' partials of a row merged by their lse: one warp a (sequence, row).
template <int kL>
__global__ void mla_decode_combine_kernel(Params p, int64_t total_rows) {
  const int64_t grow = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (grow >= total_rows) return;
  const float* lse = p.lse_part + grow * p.splits;
  float mx = -INFINITY;
  for (int s = lane; s < p.splits; s += 32) mx = fmaxf(mx, lse[s]);
#pragma unroll
  for (int d = 16; d > 0; d /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, d));
  constexpr int kPerLane = kL / 32;  // columns lane * 4 + 128 v .. + 3
  float acc[kPerLane];
#pragma unroll
  for (int v = 0; v < kPerLane; ++v) acc[v] = 0.0f;
  float total = 0.0f;
  if (mx != -INFINITY) {
    for (int s = 0; s < p.splits; ++s) {
      const float w = expf(lse[s] - mx);  // 0 for an empty split (lse -inf)
      if (w == 0.0f) continue;
      total += w;
      const float* src = p.o_part + (grow * p.splits + s) * kL;
#pragma unroll
      for (int v = 0; v < kPerLane / 4; ++v) {
        const float4 x = *reinterpret_cast<const float4*>(src + v * 128 + lane * 4);
        acc[4 * v] += w * x.x;
        acc[4 * v + 1] += w * x.y;
        acc[4 * v + 2] += w * x.z;
        acc[4 * v + 3] += w * x.w;
      }
    }
  }
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  bf16* dst = p.out + grow * kL;
#pragma unroll
  for (int v = 0; v < kPerLane / 4; ++v) {
    uint2 packed;
    packed.x = pack_bf16x2(acc[4 * v] * inv, acc[4 * v + 1] * inv);
    packed.y = pack_bf16x2(acc[4 * v + 2] * inv, acc[4 * v + 3] * inv);
    *reinterpret_cast<uint2*>(dst + v * 128 + lane * 4) = packed;
  }
  if (lane == 0) p.lse[grow] = total > 0.0f ? mx + logf(total) : -INFINITY;
}

// ---- the anchor: one CTA per (sequence, row), FP32 CUDA cores, keys in chunks of 1024 ----
constexpr int kNaiveThreads = 128, kNaiveChunk = 1024;

__global__ void __launch_bounds__(kNaiveThreads)
    mla_decode_naive_kernel(Params p, int latent, int key_dim, float scale) {
  extern __shared__ float naive_smem[];
  float* qf = naive_smem;           // [key_dim]
  float* prob = qf + key_dim;       // [kNaiveChunk]
  float* red = prob + kNaiveChunk;  // [32]
  const int row = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int len = p.seq_lens[b];
  const int visible = max(0, len - p.queries + row / p.heads + 1);
  const int64_t grow = static_cast<int64_t>(b) * p.rows + row;
  for (int d = tid; d < key_dim; d += kNaiveThreads)
    qf[d] = __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p.q)[grow * key_dim + d]);
  const auto key_row = [&](int t) {
    const int page = p.page_table[static_cast<int64_t>(b) * p.max_pages + t / p.page_tokens];
    return reinterpret_cast<const __nv_bfloat16*>(p.cache) +
           (static_cast<int64_t>(page) * p.page_tokens + t % p.page_tokens) * key_dim;
  };
  const auto block_reduce = [&](float x, bool is_max) {
    for (int d = 16; d > 0; d /= 2) {
      const float y = __shfl_xor_sync(0xFFFFFFFFu, x, d);
      x = is_max ? fmaxf(x, y) : x + y;
    }
    __syncthreads();
    if (tid % 32 == 0) red[tid / 32] = x;
    __syncthreads();
    x = red[0];
    for (int w = 1; w < kNaiveThreads / 32; ++w) x = is_max ? fmaxf(x, red[w]) : x + red[w];
    return x;
  };
  constexpr int kMaxCols = 512 / kNaiveThreads;
  float acc[kMaxCols] = {};
  float m = -INFINITY, l = 0.0f;
  __syncthreads();
  for (int c0 = 0; c0 < visible; c0 += kNaiveChunk) {
    const int n = min(kNaiveChunk, visible - c0);
    float local_max = -INFINITY;
    for (int t = tid; t < n; t += kNaiveThreads) {
      const __nv_bfloat16* k = key_row(c0 + t);
      float dot = 0.0f;
      for (int d = 0; d < key_dim; ++d) dot += qf[d] * __bfloat162float(k[d]);
      prob[t] = dot * scale;
      local_max = fmaxf(local_max, prob[t]);
    }
    const float m_new = fmaxf(m, block_reduce(local_max, true));
    const float alpha = expf(m - m_new);
    float local_sum = 0.0f;
    for (int t = tid; t < n; t += kNaiveThreads) {
      prob[t] = expf(prob[t] - m_new);
      local_sum += prob[t];
    }
    l = l * alpha + block_reduce(local_sum, false);
    m = m_new;
    for (int v = 0; v < kMaxCols; ++v) {
      const int d = tid + v * kNaiveThreads;
      if (d >= latent) break;
      float a = acc[v] * alpha;
      for (int t = 0; t < n; ++t) a += prob[t] * __bfloat162float(key_row(c0 + t)[d]);
      acc[v] = a;
    }
    __syncthreads();
  }
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  for (int v = 0; v < kMaxCols; ++v) {
    const int d = tid + v * kNaiveThreads;
    if (d >= latent) break;
    reinterpret_cast<__nv_bfloat16*>(p.out)[grow * latent + d] = __float2bfloat16(acc[v] * inv);
  }
  if (tid == 0) p.lse[grow] = l > 0.0f ? m + logf(l) : -INFINITY;
}

void check_aligned(const char* name, const void* ptr, uintptr_t bytes = 16) {
  FM_CHECK_ARG(ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % bytes == 0,
               "mla_decode: ", name, " must be a ", bytes, "-byte aligned device pointer (got ",
               ptr, ")");
}

void check_supported(const MlaDecodeShape& s) {
  mla_decode_check_shape("mla_decode", s);
  FM_CHECK_ARG(s.latent_dim == 256 || s.latent_dim == 512, "mla_decode: latent_dim=", s.latent_dim,
               " (the GPU form supports 256 and 512)");
  FM_CHECK_ARG(s.rope_dim == 64, "mla_decode: rope_dim=", s.rope_dim,
               " (the GPU form supports 64)");
  FM_CHECK_ARG(s.page_tokens % kKeys == 0, "mla_decode: page_tokens=", s.page_tokens,
               " must be a multiple of ", kKeys, " (a key tile never leaves its page)");
  FM_CHECK_ARG(s.batch <= 65535, "mla_decode: batch=", s.batch, " above the grid's 65535");
  FM_CHECK_ARG(s.rows() <= (int64_t{1} << 24), "mla_decode: queries x heads=", s.rows(),
               " too large");
}

Params make_params(const MlaDecodeShape& s, int64_t splits, int64_t split_tokens, const bf16* q,
                   const bf16* cache, const int32_t* page_table, const int32_t* seq_lens, bf16* out,
                   float* lse, void* workspace) {
  Params p{};
  p.q = q;
  p.cache = cache;
  p.page_table = page_table;
  p.seq_lens = seq_lens;
  p.out = out;
  p.lse = lse;
  p.queries = static_cast<int>(s.queries);
  p.heads = static_cast<int>(s.heads);
  p.rows = static_cast<int>(s.rows());
  p.page_tokens = static_cast<int>(s.page_tokens);
  p.max_pages = static_cast<int>(s.max_pages);
  p.splits = static_cast<int>(splits);
  p.split_tokens = static_cast<int>(split_tokens);
  p.scale_log2 = s.softmax_scale * kLog2e;
  if (splits > 1) {
    p.o_part = static_cast<float*>(workspace);
    p.lse_part = p.o_part + s.batch * s.rows() * splits * s.latent_dim;
  }
  return p;
}

template <int kL>
void launch(const MlaDecodeShape& s, const Params& p, cudaStream_t stream) {
  using T = Tile<kL, 64>;
  // NOTE: the attribute is per device: once for each device this process launches on (one process
  // may drive several GPUs, serve/generator_group.h; session 24's first two-GPU run failed with
  // it set once per process).
  static std::once_flag once[64];
  int dev = 0;
  FM_CHECK_CUDA(cudaGetDevice(&dev));
  FM_CHECK(dev >= 0 && dev < 64, "mla_decode: device id ", dev);
  std::call_once(once[dev], [] {
    FM_CHECK_CUDA(cudaFuncSetAttribute(mla_decode_kernel<kL, 64>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmem));
  });
  const dim3 grid(static_cast<unsigned>(p.splits),
                  static_cast<unsigned>((s.rows() + kRowsCta - 1) / kRowsCta),
                  static_cast<unsigned>(s.batch));
  mla_decode_kernel<kL, 64><<<grid, kThreads, T::kSmem, stream>>>(p);
  FM_CHECK_CUDA(cudaGetLastError());
  if (p.splits > 1) {
    const int64_t total = s.batch * s.rows();
    const int64_t blocks = (total * 32 + 255) / 256;
    mla_decode_combine_kernel<kL><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(p, total);
    FM_CHECK_CUDA(cudaGetLastError());
  }
}

}  // namespace

size_t mla_decode_workspace_bytes(const MlaDecodeShape& s, int64_t splits) {
  if (splits <= 1) return 0;
  return static_cast<size_t>(s.batch * s.rows() * splits * (s.latent_dim + 1)) * sizeof(float);
}

MlaDecodePlan mla_decode_plan(const MlaDecodeShape& s, int64_t sm_count) {
  check_supported(s);
  FM_CHECK_ARG(sm_count > 0, "mla_decode_plan: sm_count=", sm_count, " must be positive");
  MlaDecodePlan plan;
  const int64_t ctas = std::max<int64_t>(1, s.batch * ((s.rows() + kRowsCta - 1) / kRowsCta));
  // One wave at least; a split keeps 4 key tiles or more of the longest sequence, so that its Q
  // load and the merge stay small beside its keys.
  const int64_t longest = s.max_pages * s.page_tokens;
  const int64_t most = std::max<int64_t>(1, longest / (4 * kKeys));
  plan.splits = std::clamp<int64_t>((sm_count + ctas - 1) / ctas, 1, most);
  plan.workspace_bytes = mla_decode_workspace_bytes(s, plan.splits);
  return plan;
}

MlaDecodePlan mla_decode_plan_fixed(const MlaDecodeShape& s, int64_t split_tokens) {
  check_supported(s);
  FM_CHECK_ARG(split_tokens >= kKeys && split_tokens % kKeys == 0,
               "mla_decode_plan_fixed: split_tokens=", split_tokens,
               " must be a positive multiple of ", kKeys);
  MlaDecodePlan plan;
  plan.split_tokens = split_tokens;
  plan.splits = (s.max_pages * s.page_tokens + split_tokens - 1) / split_tokens;
  plan.workspace_bytes = mla_decode_workspace_bytes(s, plan.splits);
  return plan;
}

void mla_decode(const MlaDecodeShape& s, const MlaDecodePlan& plan, const bf16* q,
                const bf16* cache, const int32_t* page_table, const int32_t* seq_lens, bf16* out,
                float* lse, void* workspace, cudaStream_t stream) {
  check_supported(s);
  FM_CHECK_ARG(plan.splits >= 1 && plan.splits <= 4096, "mla_decode: plan.splits=", plan.splits,
               " outside [1, 4096]");
  FM_CHECK_ARG(
      plan.split_tokens == 0 || (plan.split_tokens % kKeys == 0 &&
                                 plan.splits * plan.split_tokens >= s.max_pages * s.page_tokens),
      "mla_decode: plan.split_tokens=", plan.split_tokens, " with ", plan.splits,
      " splits does not cover max_pages x page_tokens = ", s.max_pages * s.page_tokens,
      " keys in multiples of ", kKeys);
  if (s.batch == 0) return;
  for (const auto& [name, ptr] :
       {std::pair<const char*, const void*>{"q", q}, {"cache", cache}, {"out", out}})
    check_aligned(name, ptr);
  check_aligned("page_table", page_table, 4);
  check_aligned("seq_lens", seq_lens, 4);
  check_aligned("lse", lse, 4);
  if (plan.splits > 1) {
    check_aligned("workspace", workspace);
    FM_CHECK_ARG(plan.workspace_bytes >= mla_decode_workspace_bytes(s, plan.splits),
                 "mla_decode: plan.workspace_bytes=", plan.workspace_bytes, " below the ",
                 mla_decode_workspace_bytes(s, plan.splits), " that ", plan.splits, " splits need");
  }
  const Params p = make_params(s, plan.splits, plan.split_tokens, q, cache, page_table, seq_lens,
                               out, lse, workspace);
  if (s.latent_dim == 512)
    launch<512>(s, p, stream);
  else
    launch<256>(s, p, stream);
}

void mla_decode_naive(const MlaDecodeShape& s, const bf16* q, const bf16* cache,
                      const int32_t* page_table, const int32_t* seq_lens, bf16* out, float* lse,
                      cudaStream_t stream) {
  mla_decode_check_shape("mla_decode_naive", s);
  FM_CHECK_ARG(s.latent_dim <= 512, "mla_decode_naive: latent_dim=", s.latent_dim, " above 512");
  FM_CHECK_ARG(s.batch <= 65535 && s.rows() <= 0x7FFFFFFF, "mla_decode_naive: grid too large");
  if (s.batch == 0) return;
  const Params p = make_params(s, 1, 0, q, cache, page_table, seq_lens, out, lse, nullptr);
  const size_t smem = static_cast<size_t>(s.key_dim() + kNaiveChunk + 32) * sizeof(float);
  mla_decode_naive_kernel<<<dim3(static_cast<unsigned>(s.rows()), static_cast<unsigned>(s.batch)),
                            kNaiveThreads, smem, stream>>>(
      p, static_cast<int>(s.latent_dim), static_cast<int>(s.key_dim()), s.softmax_scale);
  FM_CHECK_CUDA(cudaGetLastError());
}

}  // namespace fp8moe::kernels
