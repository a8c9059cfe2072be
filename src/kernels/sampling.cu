// Token sampling on the GPU (kernels/sampling.h): one CTA of 512 threads a row; greedy = one
// argmax pass; sampling = max pass, a 4-pass radix search over the 16-bit logit keys for the
// nucleus threshold, a tie pass, a segment-mass pass and a warp's inverse-CDF pick. Plain CUDA.
// Reference: src/kernels/sampling_reference.cpp (the same float operations in the same order).
// Test: test_kernels_gpu --gtest_filter='Sampling*'
#include <cuda_runtime.h>

#include <cstdint>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/kernels/sampling.h"
#include "sampling_math.h"

namespace fp8moe::kernels {
namespace {

using namespace sampling;
static_assert(kThreads == kSampleThreads && kMaxVocab == kSampleMaxVocab,
              "sampling.h's constants are sampling_math.h's");

struct Smem {
  float acc[kDigits][kThreads];  // per-thread digit sums of a radix pass (own column only)
  float red[kDigits][kWarps];
  float mass[kDigits];
  float seg[kMaxSegs];
  int seg_cnt[kMaxSegs];
  float tile[kMaxTiles];
  float chunk[32];
  float vals[32][kVec];
  unsigned long long max_red[kWarps];
  int bad_red[kWarps];
  unsigned long long best;
  int bad;
  int64_t cut;
  float total;
  int64_t token;
};

struct DevRow {
  const uint16_t* p;
  int64_t vocab;
  bool vec;  // 16-byte loads allowed (ld % 8 == 0, 16-byte aligned base)
  // The logit bits of ids base .. base + 7 (n of them inside the vocabulary).
  __device__ __forceinline__ int load(int64_t base, uint32_t (&b)[kVec]) const {
    if (vec && base + kVec <= vocab) {
      const uint4 q = __ldg(reinterpret_cast<const uint4*>(p + base));
      const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        b[2 * i] = w[i] & 0xFFFFu;
        b[2 * i + 1] = w[i] >> 16;
      }
      return kVec;
    }
    const int64_t left = vocab - base;
    const int n = left <= 0 ? 0 : (left >= kVec ? kVec : static_cast<int>(left));
#pragma unroll
    for (int j = 0; j < kVec; ++j) b[j] = j < n ? p[base + j] : 0u;
    return n;
  }
  __device__ int tiles() const {
    return static_cast<int>((vocab + kTile - 1) / kTile);
  }
};

__device__ __forceinline__ float butterfly(float x) {
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) x = fl_add(x, __shfl_xor_sync(0xFFFFFFFFu, x, off));
  return x;
}

// --- pass A: the largest key (lowest id among equals) and whether the row is bad ---
struct RowMax {
  bool bad;
  uint32_t key;
  int64_t id;
};
__device__ RowMax row_max(const DevRow& row, Smem& sm) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  unsigned long long best = 0;
  bool bad = false;
  for (int64_t base = int64_t{kVec} * tid; base < row.vocab; base += kTile) {
    uint32_t b[kVec];
    const int n = row.load(base, b);
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      if (j < n) {
        bad = bad || bad_logit(b[j]);
        const unsigned long long cand = (static_cast<unsigned long long>(logit_key(b[j])) << 32) |
                                        (0xFFFFFFFFull - static_cast<unsigned long long>(base + j));
        best = cand > best ? cand : best;
      }
  }
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) {
    const unsigned long long o = __shfl_xor_sync(0xFFFFFFFFu, best, off);
    best = o > best ? o : best;
  }
  bad = __any_sync(0xFFFFFFFFu, bad);
  if (lane == 0) {
    sm.max_red[warp] = best;
    sm.bad_red[warp] = bad;
  }
  __syncthreads();
  if (warp == 0) {
    unsigned long long v = lane < kWarps ? sm.max_red[lane] : 0ull;
    int bv = lane < kWarps ? sm.bad_red[lane] : 0;
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) {
      const unsigned long long o = __shfl_xor_sync(0xFFFFFFFFu, v, off);
      v = o > v ? o : v;
    }
    bv = __any_sync(0xFFFFFFFFu, bv);
    if (lane == 0) {
      sm.best = v;
      sm.bad = bv;
    }
  }
  __syncthreads();
  RowMax r;
  r.key = static_cast<uint32_t>(sm.best >> 32);
  r.id = static_cast<int64_t>(0xFFFFFFFFull - (sm.best & 0xFFFFFFFFull));
  r.bad = sm.bad != 0 || r.key == kKeyMinusInf;
  __syncthreads();  // sm.best / sm.bad are rewritten by the next row_max
  return r;
}

// --- the 16 block trees of a radix pass: M[c] = above + tree(suffix[c]) ---
__device__ void block_tree16(const float (&v)[kDigits], float above, Smem& sm,
                             float (&out)[kDigits]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int c = 0; c < kDigits; ++c) {
    const float x = butterfly(v[c]);
    if (lane == 0) sm.red[c][warp] = x;
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int c = 0; c < kDigits; ++c) {
      const float x = butterfly(lane < kWarps ? sm.red[c][lane] : 0.0f);
      if (lane == 0) sm.mass[c] = fl_add(above, x);
    }
  }
  __syncthreads();
#pragma unroll
  for (int c = 0; c < kDigits; ++c) out[c] = sm.mass[c];
}

// --- radix passes + tie pass: the nucleus of a row ---
__device__ Nucleus find_nucleus(const DevRow& row, const RowMax& mx, float temperature, float top_p,
                                Smem& sm) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  Nucleus nu;
  nu.m = key_value(mx.key);
  nu.scale = weight_scale(temperature);
  if (top_p >= 1.0f) return nu;
  nu.all = false;
  uint32_t prefix = 0;
  float above = 0, target = 0;
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 12 - 4 * pass;
#pragma unroll
    for (int c = 0; c < kDigits; ++c) sm.acc[c][tid] = 0.0f;
    for (int64_t base = int64_t{kVec} * tid; base < row.vocab; base += kTile) {
      uint32_t b[kVec];
      const int n = row.load(base, b);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const uint32_t k = logit_key(b[j]);
        if (j < n && (k >> (shift + 4)) == prefix) {
          float& a = sm.acc[(k >> shift) & 15][tid];
          a = fl_add(a, weight(bf16_bits_value(b[j]), nu.m, nu.scale));
        }
      }
    }
    float suffix[kDigits];
    float s = sm.acc[kDigits - 1][tid];
    suffix[kDigits - 1] = s;
#pragma unroll
    for (int c = kDigits - 2; c >= 0; --c) {
      s = fl_add(s, sm.acc[c][tid]);
      suffix[c] = s;
    }
    float mass[kDigits];
    block_tree16(suffix, above, sm, mass);
    if (pass == 0) target = fl_mul(top_p, mass[0]);
    int digit = 0;
#pragma unroll
    for (int c = 1; c < kDigits; ++c)
      if (mass[c] >= target) digit = c;  // the largest such c (the reference scans down)
    if (digit < kDigits - 1) above = mass[digit + 1];
    prefix = (prefix << 4) | static_cast<uint32_t>(digit);
  }
  nu.kstar = prefix;
  const int32_t keep = tie_keep(target, above, weight(key_value(prefix), nu.m, nu.scale));
  // Tie pass: the threshold key's tokens counted per segment, then the keep-th lowest id.
  const int tiles = row.tiles();
  for (int t = 0; t < tiles; ++t) {
    uint32_t b[kVec];
    const int n = row.load(int64_t{t} * kTile + kVec * tid, b);
    int cnt = 0;
#pragma unroll
    for (int j = 0; j < kVec; ++j) cnt += (j < n && logit_key(b[j]) == prefix) ? 1 : 0;
    cnt = __reduce_add_sync(0xFFFFFFFFu, cnt);
    if (lane == 0) sm.seg_cnt[t * kSegsPerTile + warp] = cnt;
  }
  __syncthreads();
  if (warp == 0) {
    if (lane == 0) sm.cut = row.vocab;
    __syncwarp();
    const int segs = tiles * kSegsPerTile, per = (segs + 31) / 32;
    const int s0 = lane * per, s1 = min(segs, s0 + per);
    int mine = 0;
    for (int s = s0; s < s1; ++s) mine += sm.seg_cnt[s];
    int incl = mine;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int o = __shfl_up_sync(0xFFFFFFFFu, incl, off);
      if (lane >= off) incl += o;
    }
    const int total = __shfl_sync(0xFFFFFFFFu, incl, 31);
    if (keep < total) {
      // The lane whose segments hold the keep-th tied token, then its segment.
      const unsigned ballot = __ballot_sync(0xFFFFFFFFu, incl >= keep);
      const int owner = __ffs(ballot) - 1;
      int seg = 0, rem = 0;
      if (lane == owner) {
        int run = incl - mine;
        for (int s = s0; s < s1; ++s) {
          if (run + sm.seg_cnt[s] >= keep) {
            seg = s;
            rem = keep - run;
            break;
          }
          run += sm.seg_cnt[s];
        }
      }
      seg = __shfl_sync(0xFFFFFFFFu, seg, owner);
      rem = __shfl_sync(0xFFFFFFFFu, rem, owner);
      // Within the segment: the lanes' 8 ids in order.
      uint32_t b[kVec];
      const int64_t base = int64_t{seg} * kSegment + kVec * lane;
      const int n = row.load(base, b);
      int cnt = 0;
#pragma unroll
      for (int j = 0; j < kVec; ++j) cnt += (j < n && logit_key(b[j]) == prefix) ? 1 : 0;
      int lincl = cnt;
#pragma unroll
      for (int off = 1; off < 32; off *= 2) {
        const int o = __shfl_up_sync(0xFFFFFFFFu, lincl, off);
        if (lane >= off) lincl += o;
      }
      const int lowner = __ffs(__ballot_sync(0xFFFFFFFFu, lincl >= rem)) - 1;
      if (lane == lowner) {
        int run = lincl - cnt;
        for (int j = 0; j < n; ++j)
          if (logit_key(b[j]) == prefix && ++run == rem) {
            sm.cut = base + j;
            break;
          }
      }
    }
  }
  __syncthreads();
  nu.cut = sm.cut;
  __syncthreads();
  return nu;
}

// --- the draw: segment masses, tile masses, total; warp 0's pick ---
struct KeptSrc {
  DevRow row;
  Nucleus nu;
  __device__ void operator()(int64_t base, float (&v)[kVec]) const {
    uint32_t b[kVec];
    const int n = row.load(base, b);
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] = j < n ? nu.wk(b[j], base + j) : 0.0f;
  }
};
struct ResidualSrc {
  KeptSrc p, q;
  float inv_p, inv_q;
  __device__ void operator()(int64_t base, float (&v)[kVec]) const {
    float vp[kVec], vq[kVec];
    p(base, vp);
    q(base, vq);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float d = fl_sub(fl_mul(vp[j], inv_p), fl_mul(vq[j], inv_q));
      v[j] = d > 0.0f ? d : 0.0f;
    }
  }
};

// Fills sm.seg and sm.tile; returns the total C (every thread).
template <typename Src>
__device__ float seg_pass(const Src& src, int tiles, Smem& sm) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  for (int t = 0; t < tiles; ++t) {
    float v[kVec];
    src(int64_t{t} * kTile + kVec * tid, v);
    float c = 0;
#pragma unroll
    for (int j = 0; j < kVec; ++j) c = fl_add(c, v[j]);
    c = butterfly(c);
    if (lane == 0) sm.seg[t * kSegsPerTile + warp] = c;
  }
  __syncthreads();
  if (warp == 0) {
    for (int i = lane; i < tiles; i += 32) {
      float g = 0;
      for (int k = 0; k < kSegsPerTile; ++k) g = fl_add(g, sm.seg[i * kSegsPerTile + k]);
      sm.tile[i] = g;
    }
    __syncwarp();
    if (lane == 0) {
      float c = 0;
      for (int i = 0; i < tiles; ++i) c = fl_add(c, sm.tile[i]);
      sm.total = c;
    }
  }
  __syncthreads();
  const float total = sm.total;
  __syncthreads();
  return total;
}

// After seg_pass (same src): the token for uniform u, every thread.
template <typename Src>
__device__ int64_t draw_pick(const Src& src, int tiles, float total, float u, Smem& sm) {
  const int tid = threadIdx.x, lane = tid % 32;
  if (tid < 32) {
    float r = fl_mul(u, total);
    int si = 0;
    if (lane == 0) {
      const int ti = pick(sm.tile, tiles, r);
      si = ti * kSegsPerTile + pick(sm.seg + ti * kSegsPerTile, kSegsPerTile, r);
    }
    si = __shfl_sync(0xFFFFFFFFu, si, 0);
    float v[kVec];
    src(int64_t{si} * kSegment + kVec * lane, v);
    float c = 0;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      c = fl_add(c, v[j]);
      sm.vals[lane][j] = v[j];
    }
    sm.chunk[lane] = c;
    __syncwarp();
    if (lane == 0) {
      const int l = pick(sm.chunk, 32, r);
      const int j = pick(sm.vals[l], kVec, r);
      sm.token = int64_t{si} * kSegment + l * kVec + j;
    }
  }
  __syncthreads();
  const int64_t token = sm.token;
  __syncthreads();
  return token;
}

__device__ bool bad_params(const SampleRow& p) {
  return !(p.temperature >= 0.0f) || !(p.top_p > 0.0f && p.top_p <= 1.0f);
}

__device__ int32_t sample_one(const DevRow& row, const RowMax& mx, const SampleRow& p,
                              uint64_t counter, Smem& sm) {
  if (mx.bad) return kSampleBadLogits;
  if (p.temperature == 0.0f) return static_cast<int32_t>(mx.id);
  const Nucleus nu = find_nucleus(row, mx, p.temperature, p.top_p, sm);
  const KeptSrc src{row, nu};
  const int tiles = row.tiles();
  const float total = seg_pass(src, tiles, sm);
  return static_cast<int32_t>(
      draw_pick(src, tiles, total, philox_uniform(p.seed, p.stream, counter), sm));
}

__global__ void __launch_bounds__(kThreads)
    sample_rows_kernel(const uint16_t* logits, int64_t ld, int64_t vocab, bool vec,
                       const SampleRow* params, int32_t* tokens, const int32_t* row_index) {
  __shared__ Smem sm;
  const int64_t r = blockIdx.x;
  const SampleRow p = params[r];
  if (bad_params(p)) {
    if (threadIdx.x == 0) tokens[r] = kSampleBadParams;
    return;
  }
  const DevRow row{logits + (row_index != nullptr ? row_index[r] : r) * ld, vocab, vec};
  const int32_t token = sample_one(row, row_max(row, sm), p, p.counter, sm);
  if (threadIdx.x == 0) tokens[r] = token;
}

__global__ void __launch_bounds__(kThreads)
    speculative_check_kernel(const uint16_t* target, int64_t ld_t, bool vec_t,
                             const uint16_t* draft_logits, int64_t ld_d, bool vec_d,
                             const int32_t* draft_tokens, int64_t vocab, const SampleRow* params,
                             int32_t* tokens, int32_t* kept_out, int32_t* bonus_out,
                             const int32_t* draft_row_index) {
  __shared__ Smem sm;
  const int64_t i = blockIdx.x;
  const SampleRow p = params[i];
  const int32_t d = draft_tokens[i];
  int32_t token = kSampleBadParams, kept = 0, bonus = -1;
  if (!bad_params(p) && d >= 0 && d < vocab) {
    const DevRow prow{target + 2 * i * ld_t, vocab, vec_t};
    const DevRow brow{target + (2 * i + 1) * ld_t, vocab, vec_t};
    const DevRow qrow{draft_logits + (draft_row_index != nullptr ? draft_row_index[i] : i) * ld_d,
                      vocab, vec_d};
    const RowMax pm = row_max(prow, sm), qm = row_max(qrow, sm);
    if (pm.bad || qm.bad) {
      token = kSampleBadLogits;
    } else if (p.temperature == 0.0f) {
      kept = pm.id == d;
      token = static_cast<int32_t>(pm.id);
    } else {
      const int tiles = prow.tiles();
      const KeptSrc ps{prow, find_nucleus(prow, pm, p.temperature, p.top_p, sm)};
      const KeptSrc qs{qrow, find_nucleus(qrow, qm, p.temperature, p.top_p, sm)};
      const float cp = seg_pass(ps, tiles, sm), cq = seg_pass(qs, tiles, sm);
      const float inv_p = fl_div(1.0f, cp), inv_q = fl_div(1.0f, cq);
      const float pd = fl_mul(ps.nu.wk(prow.p[d], d), inv_p);
      const float qd = fl_mul(qs.nu.wk(qrow.p[d], d), inv_q);
      if (qd > 0.0f) {
        const float ratio = fl_div(pd, qd);
        kept = ratio >= 1.0f || philox_uniform(p.seed, p.stream, p.counter) < ratio;
      }
      token = d;
      if (!kept) {
        const ResidualSrc rs{ps, qs, inv_p, inv_q};
        const float cr = seg_pass(rs, tiles, sm);
        if (cr > 0.0f)
          token = static_cast<int32_t>(
              draw_pick(rs, tiles, cr, philox_uniform(p.seed, p.stream, p.counter + 1), sm));
        else
          kept = 1;
      }
    }
    if (kept) bonus = sample_one(brow, row_max(brow, sm), p, p.counter + 2, sm);
  }
  if (threadIdx.x == 0) {
    tokens[i] = token;
    kept_out[i] = kept;
    bonus_out[i] = bonus;
  }
}

bool vec_ok(const bf16* base, int64_t ld) {
  return ld % kVec == 0 && reinterpret_cast<uintptr_t>(base) % 16 == 0;
}

void check_shape(const char* who, int64_t rows, int64_t vocab, int64_t ld) {
  FM_CHECK_ARG(rows >= 0, who, ": rows=", rows, " must not be negative");
  FM_CHECK_ARG(rows <= 0x7FFFFFFF, who, ": rows=", rows, " exceeds the grid");
  FM_CHECK_ARG(vocab > 0 && vocab <= kMaxVocab, who, ": vocab=", vocab, " must lie in [1, ",
               kMaxVocab, "]");
  FM_CHECK_ARG(ld >= vocab, who, ": ld=", ld, " must be >= vocab=", vocab);
}

}  // namespace

void sample_rows(const bf16* logits, int64_t ld, int64_t rows, int64_t vocab,
                 const SampleRow* params, int32_t* tokens, cudaStream_t stream,
                 const int32_t* row_index) {
  check_shape("sample_rows", rows, vocab, ld);
  if (rows == 0) return;
  sample_rows_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      reinterpret_cast<const uint16_t*>(logits), ld, vocab, vec_ok(logits, ld), params, tokens,
      row_index);
  FM_CHECK_LAUNCH();
}

void speculative_check_rows(const bf16* target, int64_t ld_target, const bf16* draft_logits,
                            int64_t ld_draft, const int32_t* draft_tokens, int64_t rows,
                            int64_t vocab, const SampleRow* params, int32_t* tokens, int32_t* kept,
                            int32_t* bonus, cudaStream_t stream, const int32_t* draft_row_index) {
  check_shape("speculative_check_rows", rows, vocab, ld_target);
  FM_CHECK_ARG(ld_draft >= vocab, "speculative_check_rows: ld_draft=", ld_draft,
               " must be >= vocab=", vocab);
  if (rows == 0) return;
  speculative_check_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      reinterpret_cast<const uint16_t*>(target), ld_target, vec_ok(target, ld_target),
      reinterpret_cast<const uint16_t*>(draft_logits), ld_draft, vec_ok(draft_logits, ld_draft),
      draft_tokens, vocab, params, tokens, kept, bonus, draft_row_index);
  FM_CHECK_LAUNCH();
}

}  // namespace fp8moe::kernels
