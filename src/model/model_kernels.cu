// RoPE, embedding and cross-entropy kernels of model/model_kernels_gpu.h (the arithmetic contract
// is there). Checked by test_model_gpu --gtest_filter='ModelKernelsGpu*'; timed by
// model_kernels_bench against naive kernels.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <bit>
#include <cmath>
#include <cub/device/device_radix_sort.cuh>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/model/model_kernels_gpu.h"

namespace fp8moe {
namespace {

constexpr unsigned kMaxGrid = 1u << 30;

__device__ __forceinline__ void unpack8(const uint4& v, float* out) {
  const uint32_t q[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(q[i] << 16);
    out[2 * i + 1] = __uint_as_float(q[i] & 0xFFFF0000u);
  }
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(float_to_bf16_bits(lo)) |
         (static_cast<uint32_t>(float_to_bf16_bits(hi)) << 16);
}
__device__ __forceinline__ uint4 pack8(const float* f) {
  return make_uint4(pack2(f[0], f[1]), pack2(f[2], f[3]), pack2(f[4], f[5]), pack2(f[6], f[7]));
}
bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}
unsigned blocks_for(int64_t n, int threads) {
  return static_cast<unsigned>(std::min<int64_t>((n + threads - 1) / threads, kMaxGrid));
}

// ---- RoPE ----
struct RopeTarget {
  bf16* x;
  int64_t heads, ld_token, ld_head;
};

// One thread per 8 values (4 pairs) of a (token, head) row; rows of target a, then of target b.
__global__ void rope_kernel(RopeTableView table, RopeTarget a, RopeTarget b, int64_t tokens,
                            const int32_t* __restrict__ pos, bool inverse, uint32_t* status) {
  const int vecs = static_cast<int>(table.dim / 8);
  const int64_t rows_a = tokens * a.heads, rows = rows_a + tokens * b.heads;
  const int64_t total = rows * vecs;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < total;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t r = g / vecs;
    const int v = static_cast<int>(g - r * vecs);
    // Field by field (a reference to a or b would put the parameters in local memory).
    const bool in_a = r < rows_a;
    bf16* const base = in_a ? a.x : b.x;
    const int64_t heads = in_a ? a.heads : b.heads;
    const int64_t ld_token = in_a ? a.ld_token : b.ld_token;
    const int64_t ld_head = in_a ? a.ld_head : b.ld_head;
    if (!in_a) r -= rows_a;
    const int64_t t = r / heads, h = r - t * heads;
    const int32_t p = __ldg(pos + t);
    if (p < 0 || p >= table.positions) {
      if (status != nullptr && v == 0 && h == 0) atomicOr(status, kStatusBadPosition);
      continue;
    }
    uint4* ptr = reinterpret_cast<uint4*>(base + t * ld_token + h * ld_head) + v;
    float x[8];
    unpack8(*ptr, x);
    const int64_t half = table.dim / 2;
    const float4 c = __ldg(reinterpret_cast<const float4*>(table.cos + p * half) + v);
    const float4 s4 = __ldg(reinterpret_cast<const float4*>(table.sin + p * half) + v);
    const float cs[4] = {c.x, c.y, c.z, c.w};
    const float sn[4] = {s4.x, s4.y, s4.z, s4.w};
    float y[8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float si = inverse ? -sn[i] : sn[i];
      y[2 * i] = __fsub_rn(__fmul_rn(x[2 * i], cs[i]), __fmul_rn(x[2 * i + 1], si));
      y[2 * i + 1] = __fadd_rn(__fmul_rn(x[2 * i], si), __fmul_rn(x[2 * i + 1], cs[i]));
    }
    *ptr = pack8(y);
  }
}

void check_rope(const char* what, const RopeTableView& t, const RopeTarget& x, int64_t tokens) {
  FM_CHECK_ARG(t.cos != nullptr && t.sin != nullptr && t.positions > 0, what,
               ": the RoPE table is empty");
  FM_CHECK_ARG(t.dim > 0 && t.dim % 8 == 0 && t.dim <= 1024, what, ": table dim ", t.dim,
               " must be a positive multiple of 8 up to 1024");
  FM_CHECK_ARG(tokens >= 0 && tokens < (int64_t{1} << 31), what, ": tokens ", tokens);
  FM_CHECK_ARG(x.heads >= 0, what, ": heads ", x.heads);
  if (tokens == 0 || x.heads == 0) return;
  FM_CHECK_ARG(x.x != nullptr && aligned16(x.x) && x.ld_token % 8 == 0 && x.ld_head % 8 == 0, what,
               ": x must be 16-byte aligned with ld_token (", x.ld_token, ") and ld_head (",
               x.ld_head, ") multiples of 8");
  FM_CHECK_ARG(x.heads == 1 || x.ld_head >= t.dim, what, ": ld_head ", x.ld_head, " < dim ", t.dim);
  FM_CHECK_ARG(tokens == 1 || x.ld_token >= x.heads * t.dim, what, ": ld_token ", x.ld_token,
               " too small");
}

void launch_rope(const RopeTableView& table, RopeTarget a, RopeTarget b, int64_t tokens,
                 const int32_t* pos, bool inverse, uint32_t* status, cudaStream_t stream) {
  const int64_t total = tokens * (a.heads + b.heads) * (table.dim / 8);
  if (total == 0) return;
  FM_CHECK_ARG(pos != nullptr, "rope: pos is null");
  rope_kernel<<<blocks_for(total, 256), 256, 0, stream>>>(table, a, b, tokens, pos, inverse,
                                                          status);
  FM_CHECK_LAUNCH();
}

// ---- Embedding ----
template <typename T>
__device__ __forceinline__ void load8(const T* p, float* out);
template <>
__device__ __forceinline__ void load8<float>(const float* p, float* out) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
  out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}
template <>
__device__ __forceinline__ void load8<bf16>(const bf16* p, float* out) {
  unpack8(__ldg(reinterpret_cast<const uint4*>(p)), out);
}

// A block per token (grid-strided), a thread per 8 columns.
template <typename T>
__global__ void embedding_forward_kernel(const T* __restrict__ table, int64_t vocab, int64_t hidden,
                                         const int32_t* __restrict__ ids, int64_t tokens,
                                         bf16* __restrict__ out, int64_t ld_out, uint32_t* status) {
  const int64_t vecs = hidden / 8;
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const int32_t id = __ldg(ids + t);
    const bool ok = id >= 0 && id < vocab;
    if (!ok && status != nullptr && threadIdx.x == 0) atomicOr(status, kStatusBadTokenId);
    for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) {
      float f[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (ok) load8(table + static_cast<int64_t>(id) * hidden + 8 * v, f);
      reinterpret_cast<uint4*>(out + t * ld_out)[v] = pack8(f);
    }
  }
}

__global__ void embedding_keys_kernel(const int32_t* __restrict__ ids, int64_t tokens,
                                      int64_t vocab, uint32_t* keys, int32_t* vals,
                                      uint32_t* status) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < tokens;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t id = ids[t];
    const bool ok = id >= 0 && id < vocab;
    if (!ok && status != nullptr) atomicOr(status, kStatusBadTokenId);
    keys[t] = ok ? static_cast<uint32_t>(id) : static_cast<uint32_t>(vocab);  // sentinel: last
    vals[t] = static_cast<int32_t>(t);
  }
}

template <typename T>
__device__ __forceinline__ float4 load4(const T* p);
template <>
__device__ __forceinline__ float4 load4<float>(const float* p) {
  return __ldg(reinterpret_cast<const float4*>(p));
}
template <>
__device__ __forceinline__ float4 load4<bf16>(const bf16* p) {
  const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
  return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xFFFF0000u),
                     __uint_as_float(u.y << 16), __uint_as_float(u.y & 0xFFFF0000u));
}

// Block (j, y) for sorted position j when j starts a run of equal ids, and the y-th chunk of
// kSegCols columns: each thread owns 4 columns and adds the run's rows in sorted (= token) order
// onto dtable's row, with kSegUnroll rows' loads in flight ahead of the (ordered) adds. Column
// chunks in grid.y spread a frequent id's long run over several blocks.
constexpr int kSegThreads = 128, kSegCols = 4 * kSegThreads, kSegUnroll = 8;

template <typename T>
__global__ void __launch_bounds__(kSegThreads)
    embedding_segment_kernel(const T* __restrict__ dy, int64_t ld_dy,
                             const uint32_t* __restrict__ keys, const int32_t* __restrict__ toks,
                             int64_t tokens, int64_t vocab, int64_t hidden, float* dtable) {
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kSegCols + 4 * threadIdx.x;
  for (int64_t j = blockIdx.x; j < tokens; j += gridDim.x) {
    const uint32_t id = keys[j];
    if (id >= vocab || (j > 0 && keys[j - 1] == id)) continue;
    if (c >= hidden) continue;
    int64_t end = j + 1;
    while (end < tokens && keys[end] == id) ++end;
    float* row = dtable + static_cast<int64_t>(id) * hidden + c;
    float4 acc = *reinterpret_cast<const float4*>(row);
    int64_t k = j;
    for (; k + kSegUnroll <= end; k += kSegUnroll) {
      float4 d[kSegUnroll];
#pragma unroll
      for (int u = 0; u < kSegUnroll; ++u)
        d[u] = load4(dy + static_cast<int64_t>(__ldg(toks + k + u)) * ld_dy + c);
#pragma unroll
      for (int u = 0; u < kSegUnroll; ++u) {
        acc.x = __fadd_rn(acc.x, d[u].x);
        acc.y = __fadd_rn(acc.y, d[u].y);
        acc.z = __fadd_rn(acc.z, d[u].z);
        acc.w = __fadd_rn(acc.w, d[u].w);
      }
    }
    for (; k < end; ++k) {
      const float4 d = load4(dy + static_cast<int64_t>(__ldg(toks + k)) * ld_dy + c);
      acc.x = __fadd_rn(acc.x, d.x);
      acc.y = __fadd_rn(acc.y, d.y);
      acc.z = __fadd_rn(acc.z, d.z);
      acc.w = __fadd_rn(acc.w, d.w);
    }
    *reinterpret_cast<float4*>(row) = acc;
  }
}

struct EmbeddingWorkspace {
  uint32_t *keys_in, *keys_out;
  int32_t *vals_in, *vals_out;
  void* temp;
  size_t temp_bytes, total;
};
size_t round256(size_t b) {
  return (b + 255) / 256 * 256;
}
int sort_bits(int64_t vocab) {
  return std::max(1, static_cast<int>(std::bit_width(static_cast<uint64_t>(vocab))));
}
EmbeddingWorkspace carve(void* base, int64_t tokens, int64_t vocab) {
  EmbeddingWorkspace w{};
  const size_t arr = round256(sizeof(uint32_t) * static_cast<size_t>(std::max<int64_t>(tokens, 1)));
  FM_CHECK_CUDA(cub::DeviceRadixSort::SortPairs(
      nullptr, w.temp_bytes, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
      static_cast<int>(std::max<int64_t>(tokens, 1)), 0, sort_bits(vocab)));
  w.total = 4 * arr + round256(w.temp_bytes);
  char* p = static_cast<char*>(base);
  if (p != nullptr) {
    w.keys_in = reinterpret_cast<uint32_t*>(p);
    w.keys_out = reinterpret_cast<uint32_t*>(p + arr);
    w.vals_in = reinterpret_cast<int32_t*>(p + 2 * arr);
    w.vals_out = reinterpret_cast<int32_t*>(p + 3 * arr);
    w.temp = p + 4 * arr;
  }
  return w;
}

void check_embedding(const char* what, const void* table, int64_t vocab, int64_t hidden,
                     int64_t tokens, const void* rows, int64_t ld) {
  FM_CHECK_ARG(vocab > 0 && vocab < (int64_t{1} << 31), what, ": vocab ", vocab,
               " must be in [1, 2^31)");
  FM_CHECK_ARG(hidden > 0 && hidden % 8 == 0 && hidden <= (int64_t{1} << 24), what, ": hidden ",
               hidden, " must be a positive multiple of 8 up to 2^24");
  FM_CHECK_ARG(tokens >= 0 && tokens < (int64_t{1} << 31), what, ": tokens ", tokens);
  FM_CHECK_ARG(ld >= hidden && ld % 8 == 0, what, ": leading dimension ", ld,
               " must be >= hidden (", hidden, ") and a multiple of 8");
  FM_CHECK_ARG(table != nullptr && aligned16(table), what, ": table null or not 16-byte aligned");
  FM_CHECK_ARG(tokens == 0 || (rows != nullptr && aligned16(rows)), what,
               ": rows null or not 16-byte aligned");
}

template <typename T>
void embedding_forward_impl(const T* table, int64_t vocab, int64_t hidden, const int32_t* ids,
                            int64_t tokens, bf16* out, int64_t ld_out, uint32_t* status,
                            cudaStream_t stream) {
  check_embedding("embedding_forward_gpu", table, vocab, hidden, tokens, out, ld_out);
  if (tokens == 0) return;
  FM_CHECK_ARG(ids != nullptr, "embedding_forward_gpu: ids is null");
  const int threads = static_cast<int>(std::min<int64_t>(256, (hidden / 8 + 31) / 32 * 32));
  embedding_forward_kernel<T>
      <<<static_cast<unsigned>(std::min<int64_t>(tokens, kMaxGrid)), threads, 0, stream>>>(
          table, vocab, hidden, ids, tokens, out, ld_out, status);
  FM_CHECK_LAUNCH();
}

template <typename T>
void embedding_backward_impl(const T* dy, int64_t ld_dy, const int32_t* ids, int64_t tokens,
                             int64_t vocab, int64_t hidden, float* dtable, void* workspace,
                             size_t workspace_bytes, uint32_t* status, cudaStream_t stream) {
  check_embedding("embedding_backward_gpu", dtable, vocab, hidden, tokens, dy, ld_dy);
  if (tokens == 0) return;
  FM_CHECK_ARG(ids != nullptr, "embedding_backward_gpu: ids is null");
  FM_CHECK_ARG(sizeof(T) == 2 || ld_dy % 4 == 0, "embedding_backward_gpu: ld_dy ", ld_dy);
  EmbeddingWorkspace w = carve(workspace, tokens, vocab);
  FM_CHECK_ARG(workspace != nullptr && reinterpret_cast<uintptr_t>(workspace) % 256 == 0 &&
                   workspace_bytes >= w.total,
               "embedding_backward_gpu: workspace of ", workspace_bytes, " bytes (needs ", w.total,
               ", 256-byte aligned)");
  embedding_keys_kernel<<<blocks_for(tokens, 256), 256, 0, stream>>>(ids, tokens, vocab, w.keys_in,
                                                                     w.vals_in, status);
  FM_CHECK_LAUNCH();
  FM_CHECK_CUDA(cub::DeviceRadixSort::SortPairs(w.temp, w.temp_bytes, w.keys_in, w.keys_out,
                                                w.vals_in, w.vals_out, static_cast<int>(tokens), 0,
                                                sort_bits(vocab), stream));
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(tokens, kMaxGrid)),
                  static_cast<unsigned>((hidden + kSegCols - 1) / kSegCols));
  embedding_segment_kernel<T><<<grid, kSegThreads, 0, stream>>>(dy, ld_dy, w.keys_out, w.vals_out,
                                                                tokens, vocab, hidden, dtable);
  FM_CHECK_LAUNCH();
}

// ---- Cross-entropy ----
constexpr int kCeThreads = 512;

struct MaxSum {
  float m, s;
};
__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  const float ta = a.m == m ? a.s : __fmul_rn(a.s, expf(__fsub_rn(a.m, m)));
  const float tb = b.m == m ? b.s : __fmul_rn(b.s, expf(__fsub_rn(b.m, m)));
  return {m, __fadd_rn(ta, tb)};
}
__device__ __forceinline__ void update(MaxSum& a, float x) {
  if (x > a.m) {
    a.s = __fadd_rn(a.m == -INFINITY ? 0.0f : __fmul_rn(a.s, expf(__fsub_rn(a.m, x))), 1.0f);
    a.m = x;
  } else {
    a.s = __fadd_rn(a.s, expf(__fsub_rn(x, a.m)));
  }
}
__device__ __forceinline__ float dlogit(float x, float m, float inv, float scale) {
  return __fmul_rn(__fmul_rn(expf(__fsub_rn(x, m)), inv), scale);
}

// A block of kCeThreads threads per row (grid-strided).
__global__ void __launch_bounds__(kCeThreads)
    cross_entropy_kernel(const bf16* logits, int64_t ld_logits, const int32_t* __restrict__ targets,
                         int64_t rows, int64_t vocab, float scale, bf16* dlogits,
                         int64_t ld_dlogits, float* __restrict__ row_loss, uint32_t* status) {
  __shared__ MaxSum warp_ms[kCeThreads / 32];
  const int64_t vecs = vocab / 8;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int32_t tgt = targets[r];
    const bool ignore = tgt == kCrossEntropyIgnoreIndex;
    const bool bad = !ignore && (tgt < 0 || tgt >= vocab);
    const bf16* l = logits + r * ld_logits;
    if (ignore || bad) {
      if (threadIdx.x == 0) {
        row_loss[r] = bad ? __int_as_float(0x7FC00000) : 0.0f;
        if (bad && status != nullptr) atomicOr(status, kStatusBadTarget);
      }
      if (dlogits != nullptr) {
        bf16* d = dlogits + r * ld_dlogits;
        for (int64_t v = threadIdx.x; v < vecs; v += kCeThreads)
          reinterpret_cast<uint4*>(d)[v] = make_uint4(0, 0, 0, 0);
        for (int64_t i = 8 * vecs + threadIdx.x; i < vocab; i += kCeThreads) d[i] = bf16{0};
      }
      continue;
    }
    MaxSum ms{-INFINITY, 0.0f};
    for (int64_t v = threadIdx.x; v < vecs; v += kCeThreads) {
      float x[8];
      unpack8(reinterpret_cast<const uint4*>(l)[v], x);
#pragma unroll
      for (int i = 0; i < 8; ++i) update(ms, x[i]);
    }
    for (int64_t i = 8 * vecs + threadIdx.x; i < vocab; i += kCeThreads) update(ms, to_float(l[i]));
    // Read before the barriers: in place, another thread may overwrite x_t after them.
    const float xt = to_float(l[tgt]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const MaxSum other{__shfl_xor_sync(0xFFFFFFFFu, ms.m, o),
                         __shfl_xor_sync(0xFFFFFFFFu, ms.s, o)};
      ms = merge(ms, other);
    }
    if (lane == 0) warp_ms[warp] = ms;
    __syncthreads();
    MaxSum all = warp_ms[0];
    for (int w = 1; w < kCeThreads / 32; ++w) all = merge(all, warp_ms[w]);
    __syncthreads();  // warp_ms is reused by the next row
    if (threadIdx.x == 0) row_loss[r] = __fsub_rn(__fadd_rn(logf(all.s), all.m), xt);
    if (dlogits == nullptr) continue;
    const float inv = __fdiv_rn(1.0f, all.s);
    bf16* d = dlogits + r * ld_dlogits;
    for (int64_t v = threadIdx.x; v < vecs; v += kCeThreads) {
      float x[8];
      unpack8(reinterpret_cast<const uint4*>(l)[v], x);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        x[i] = dlogit(x[i], all.m, inv, scale);
        if (8 * v + i == tgt) x[i] = __fsub_rn(x[i], scale);
      }
      reinterpret_cast<uint4*>(d)[v] = pack8(x);
    }
    for (int64_t i = 8 * vecs + threadIdx.x; i < vocab; i += kCeThreads) {
      float x = dlogit(to_float(l[i]), all.m, inv, scale);
      if (i == tgt) x = __fsub_rn(x, scale);
      d[i] = to_bf16(x);
    }
  }
}

// One block of 1024 threads: the fixed-order double sum of cross_entropy_sum_reference.
__global__ void __launch_bounds__(1024)
    loss_sum_kernel(const float* __restrict__ row_loss, const int32_t* __restrict__ targets,
                    int64_t rows, double* loss_sum, int64_t* valid_rows) {
  __shared__ double warp_sum[32];
  __shared__ long long warp_count[32];
  double s = 0.0;
  long long n = 0;
  for (int64_t r = threadIdx.x; r < rows; r += 1024) {
    s = __dadd_rn(s, static_cast<double>(row_loss[r]));
    n += targets[r] != kCrossEntropyIgnoreIndex;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    s = __dadd_rn(s, __shfl_xor_sync(0xFFFFFFFFu, s, o));
    n += __shfl_xor_sync(0xFFFFFFFFu, n, o);
  }
  if (threadIdx.x % 32 == 0) {
    warp_sum[threadIdx.x / 32] = s;
    warp_count[threadIdx.x / 32] = n;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    long long count = 0;
    for (int w = 0; w < 32; ++w) {
      total = __dadd_rn(total, warp_sum[w]);
      count += warp_count[w];
    }
    *loss_sum = total;
    if (valid_rows != nullptr) *valid_rows = count;
  }
}

}  // namespace

void check_model_kernels_status(const uint32_t* status, const char* what, cudaStream_t stream) {
  FM_CHECK_ARG(status != nullptr, what, ": no status flag");
  uint32_t host = 0;
  FM_CHECK_CUDA(cudaMemcpyAsync(&host, status, sizeof host, cudaMemcpyDeviceToHost, stream));
  FM_CHECK_CUDA(cudaStreamSynchronize(stream));
  FM_CHECK_ARG(
      host == 0, what, ": bad indices on the device (status 0x", std::hex, host, std::dec,
      (host & kStatusBadPosition) ? "; a RoPE position outside the table" : "",
      (host & kStatusBadTokenId) ? "; a token id outside the vocabulary" : "",
      (host & kStatusBadTarget) ? "; a target outside [0, vocab), not the ignore index" : "", ")");
}

RopeTableGpu::RopeTableGpu(const RopeTable& table) {
  const size_t n = table.cos.size();
  FM_CHECK_ARG(
      table.dim > 0 && table.positions > 0 &&
          n == static_cast<size_t>(table.positions * (table.dim / 2)) && table.sin.size() == n,
      "RopeTableGpu: inconsistent table (dim ", table.dim, ", positions ", table.positions, ")");
  FM_CHECK_CUDA(cudaMalloc(&buffer_, 2 * n * sizeof(float)));
  FM_CHECK_CUDA(cudaMemcpy(buffer_, table.cos.data(), n * sizeof(float), cudaMemcpyHostToDevice));
  FM_CHECK_CUDA(
      cudaMemcpy(buffer_ + n, table.sin.data(), n * sizeof(float), cudaMemcpyHostToDevice));
  view_ = {buffer_, buffer_ + n, table.dim, table.positions};
}
RopeTableGpu::~RopeTableGpu() {
  if (buffer_ != nullptr) cudaFree(buffer_);
}

void rope_apply_gpu(const RopeTableView& table, bf16* x, int64_t tokens, int64_t heads,
                    int64_t ld_token, int64_t ld_head, const int32_t* pos, bool inverse,
                    uint32_t* status, cudaStream_t stream) {
  const RopeTarget a{x, heads, ld_token, ld_head};
  check_rope("rope_apply_gpu", table, a, tokens);
  launch_rope(table, a, RopeTarget{nullptr, 0, 0, 0}, tokens, pos, inverse, status, stream);
}

void rope_apply_qk_gpu(const RopeTableView& table, bf16* q, int64_t tokens, int64_t heads,
                       int64_t q_head_dim, bf16* k_pe, int64_t ld_k, const int32_t* pos,
                       bool inverse, uint32_t* status, cudaStream_t stream) {
  FM_CHECK_ARG(q_head_dim >= table.dim, "rope_apply_qk_gpu: q_head_dim ", q_head_dim,
               " < rope dim ", table.dim);
  const RopeTarget a{q == nullptr ? nullptr : q + (q_head_dim - table.dim),
                     q == nullptr ? 0 : heads, heads * q_head_dim, q_head_dim};
  const RopeTarget b{k_pe, k_pe == nullptr ? 0 : 1, ld_k, table.dim};
  check_rope("rope_apply_qk_gpu (q)", table, a, tokens);
  check_rope("rope_apply_qk_gpu (k_pe)", table, b, tokens);
  launch_rope(table, a, b, tokens, pos, inverse, status, stream);
}

void embedding_forward_gpu(const float* table, int64_t vocab, int64_t hidden, const int32_t* ids,
                           int64_t tokens, bf16* out, int64_t ld_out, uint32_t* status,
                           cudaStream_t stream) {
  embedding_forward_impl(table, vocab, hidden, ids, tokens, out, ld_out, status, stream);
}
void embedding_forward_gpu(const bf16* table, int64_t vocab, int64_t hidden, const int32_t* ids,
                           int64_t tokens, bf16* out, int64_t ld_out, uint32_t* status,
                           cudaStream_t stream) {
  embedding_forward_impl(table, vocab, hidden, ids, tokens, out, ld_out, status, stream);
}

size_t embedding_backward_workspace_bytes(int64_t tokens, int64_t vocab) {
  FM_CHECK_ARG(
      tokens >= 0 && tokens < (int64_t{1} << 31) && vocab > 0 && vocab < (int64_t{1} << 31),
      "embedding_backward_workspace_bytes: tokens ", tokens, ", vocab ", vocab);
  return carve(nullptr, tokens, vocab).total;
}

void embedding_backward_gpu(const bf16* dy, int64_t ld_dy, const int32_t* ids, int64_t tokens,
                            int64_t vocab, int64_t hidden, float* dtable, void* workspace,
                            size_t workspace_bytes, uint32_t* status, cudaStream_t stream) {
  embedding_backward_impl(dy, ld_dy, ids, tokens, vocab, hidden, dtable, workspace, workspace_bytes,
                          status, stream);
}
void embedding_backward_gpu(const float* dy, int64_t ld_dy, const int32_t* ids, int64_t tokens,
                            int64_t vocab, int64_t hidden, float* dtable, void* workspace,
                            size_t workspace_bytes, uint32_t* status, cudaStream_t stream) {
  embedding_backward_impl(dy, ld_dy, ids, tokens, vocab, hidden, dtable, workspace, workspace_bytes,
                          status, stream);
}

void cross_entropy_gpu(const bf16* logits, int64_t ld_logits, const int32_t* targets, int64_t rows,
                       int64_t vocab, float scale, bf16* dlogits, int64_t ld_dlogits,
                       float* row_loss, double* loss_sum, int64_t* valid_rows, uint32_t* status,
                       cudaStream_t stream) {
  FM_CHECK_ARG(vocab > 0 && vocab < (int64_t{1} << 31), "cross_entropy_gpu: vocab ", vocab);
  FM_CHECK_ARG(rows >= 0 && rows < (int64_t{1} << 31), "cross_entropy_gpu: rows ", rows);
  FM_CHECK_ARG(ld_logits >= vocab && ld_logits % 8 == 0, "cross_entropy_gpu: ld_logits ", ld_logits,
               " must be >= vocab (", vocab, ") and a multiple of 8");
  FM_CHECK_ARG(
      dlogits == nullptr || (ld_dlogits >= vocab && ld_dlogits % 8 == 0 && aligned16(dlogits)),
      "cross_entropy_gpu: dlogits must be 16-byte aligned with ld_dlogits (", ld_dlogits,
      ") >= vocab and a multiple of 8");
  FM_CHECK_ARG(dlogits == nullptr || dlogits != logits || ld_dlogits == ld_logits,
               "cross_entropy_gpu: in place needs ld_dlogits == ld_logits");
  FM_CHECK_ARG(loss_sum != nullptr, "cross_entropy_gpu: loss_sum is null");
  FM_CHECK_ARG(rows == 0 || (logits != nullptr && aligned16(logits) && targets != nullptr &&
                             row_loss != nullptr),
               "cross_entropy_gpu: logits (16-byte aligned), targets and row_loss are needed");
  if (rows > 0) {
    cross_entropy_kernel<<<static_cast<unsigned>(std::min<int64_t>(rows, kMaxGrid)), kCeThreads, 0,
                           stream>>>(logits, ld_logits, targets, rows, vocab, scale, dlogits,
                                     ld_dlogits, row_loss, status);
    FM_CHECK_LAUNCH();
  }
  loss_sum_kernel<<<1, 1024, 0, stream>>>(row_loss, targets, rows, loss_sum, valid_rows);
  FM_CHECK_LAUNCH();
}

}  // namespace fp8moe
