#include "fp8moe/fp8/gemm_reference.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <climits>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "fp8moe/core/chunk_pool.h"
#include "fp8moe/fp8/codec.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace fp8moe {

const char* accum_rounding_name(AccumRounding r) {
  switch (r) {
    case AccumRounding::kTruncate:
      return "truncate";
    case AccumRounding::kTruncateSum:
      return "truncate-sum";
    case AccumRounding::kNearestEven:
      return "nearest";
  }
  return "?";
}

namespace {
int exponent_of(double x) {  // floor(log2 |x|) for normal non-zero doubles
  return static_cast<int>((std::bit_cast<uint64_t>(x) >> 52) & 0x7FF) - 1023;
}
}  // namespace

double accumulate_step(double acc, const double* p, int count, int bits, AccumRounding rounding) {
  if (rounding != AccumRounding::kTruncate) {
    double s = acc;
    for (int i = 0; i < count; ++i) s += p[i];
    return round_to_mantissa_bits(s, bits, rounding);
  }
  // Align every addend to the largest exponent and drop the bits shifted out (toward zero).
  int e_max = acc != 0.0 ? exponent_of(acc) : INT32_MIN;
  for (int i = 0; i < count; ++i)
    if (p[i] != 0.0) e_max = std::max(e_max, exponent_of(p[i]));
  if (e_max == INT32_MIN) return 0.0;
  const double quantum = std::ldexp(1.0, e_max - bits);
  const double inv_quantum = std::ldexp(1.0, bits - e_max);
  double units = std::trunc(acc * inv_quantum);  // exact: powers of two, integers < 2^53
  for (int i = 0; i < count; ++i) units += std::trunc(p[i] * inv_quantum);
  const double sum = units * quantum;
  // A carry past e_max leaves one bit too many: the normaliser truncates it.
  return (sum != 0.0 && exponent_of(sum) > e_max)
             ? round_to_mantissa_bits(sum, bits, AccumRounding::kTruncate)
             : sum;
}

double round_to_mantissa_bits(double x, int bits, AccumRounding rounding) {
  if (bits >= 52 || x == 0.0) return x;
  uint64_t u = std::bit_cast<uint64_t>(x);
  const int drop = 52 - bits;
  const uint64_t mask = (uint64_t{1} << drop) - 1;
  const uint64_t rem = u & mask;
  u &= ~mask;  // sign-magnitude: clearing low bits truncates toward zero
  if (rounding == AccumRounding::kNearestEven) {
    const uint64_t half = uint64_t{1} << (drop - 1);
    if (rem > half || (rem == half && ((u >> drop) & 1))) u += uint64_t{1} << drop;
  }
  return std::bit_cast<double>(u);
}

void check_gemm_operands(const Fp8MatrixRef& a, const Fp8MatrixRef& b,
                         const AccumulatorModel& model) {
  FM_CHECK_ARG(a.cols == b.cols, "fp8 gemm: K mismatch: A is [", a.rows, ",", a.cols, "], B is [",
               b.rows, ",", b.cols, "] (D = A * B^T needs equal K)");
  FM_CHECK_ARG(a.rows >= 0 && b.rows >= 0 && a.cols >= 0, "fp8 gemm: negative shape");
  FM_CHECK_ARG(a.ld >= a.cols && b.ld >= b.cols, "fp8 gemm: leading dimension smaller than K");
  const bool empty = a.rows == 0 || b.rows == 0 || a.cols == 0;
  FM_CHECK_ARG(empty || (a.codes && b.codes && a.scales && b.scales),
               "fp8 gemm: null codes or scales");
  FM_CHECK_ARG(model.mantissa_bits >= 1 && model.mantissa_bits <= 52,
               "fp8 gemm: mantissa_bits must be in 1..52, got ", model.mantissa_bits);
  FM_CHECK_ARG(model.promotion_interval >= 0, "fp8 gemm: negative promotion interval ",
               model.promotion_interval);
  FM_CHECK_ARG(model.group >= 1 && model.group <= 64, "fp8 gemm: group must be in 1..64, got ",
               model.group);
}

namespace {

// Decoded E4M3 values (unscaled), so the inner loops multiply floats.
const std::array<float, 256>& e4m3_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = e4m3_bits_to_float(static_cast<uint8_t>(i));
    return t;
  }();
  return table;
}

// A window [w0, w0 + interval) never straddles a scale tile of `op` along K.
bool windows_inside_tiles(const Fp8MatrixRef& op, int64_t interval) {
  const int64_t tile = op.tile_cols();
  return tile >= op.cols || (interval > 0 && tile % interval == 0);
}

void decode_row(const Fp8MatrixRef& op, int64_t r, float* out) {
  const auto& lut = e4m3_table();
  const uint8_t* codes = op.codes + r * op.ld;
  for (int64_t k = 0; k < op.cols; ++k) out[k] = lut[codes[k]];
}

// The fast model sums each window's products in 8 interleaved lanes (lane j takes k = j mod 8,
// one rounding per multiply and per add) and reduces the lanes pairwise, as the header documents.
using Lanes = float __attribute__((vector_size(32)));

inline float reduce_lanes(const Lanes& l) {
  return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

// NOTE: by out-parameter: returning a 32-byte vector by value from code built without AVX
// changes the ABI (GCC -Wpsabi).
inline void load_lanes(Lanes& v, const float* p) {
  std::memcpy(&v, p, sizeof(v));
}

// One lane-ordered dot product; a length that is not a multiple of 8 is zero-padded.
float lane_dot(const float* x, const float* y, int64_t n) {
  const int64_t body = n / 8 * 8;
  Lanes acc = {};
  Lanes xv, yv;
  for (int64_t k = 0; k < body; k += 8) {
    load_lanes(xv, x + k);
    load_lanes(yv, y + k);
    acc += xv * yv;
  }
  if (body < n) {
    float tail_x[8] = {}, tail_y[8] = {};
    std::copy(x + body, x + n, tail_x);
    std::copy(y + body, y + n, tail_y);
    load_lanes(xv, tail_x);
    load_lanes(yv, tail_y);
    acc += xv * yv;
  }
  return reduce_lanes(acc);
}

// The register-blocked micro-kernel: 2 rows of A x 4 rows of B over a window of n elements (n a
// multiple of 8), each output in exactly the lane order of lane_dot. Eight lane accumulators
// and six operand vectors fit the 16 AVX registers. Used by the general fast path below (windows
// that are not a multiple of 8 long); the packed path further down handles the common case.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void lane_dot_2x4(const float* a0, const float* a1, const float* const b[4], int64_t n,
                  float out[2][4]) {
  Lanes c00 = {}, c01 = {}, c02 = {}, c03 = {}, c10 = {}, c11 = {}, c12 = {}, c13 = {};
  for (int64_t k = 0; k < n; k += 8) {
    Lanes x0, x1, y0, y1, y2, y3;
    load_lanes(x0, a0 + k);
    load_lanes(x1, a1 + k);
    load_lanes(y0, b[0] + k);
    load_lanes(y1, b[1] + k);
    load_lanes(y2, b[2] + k);
    load_lanes(y3, b[3] + k);
    c00 += x0 * y0;
    c01 += x0 * y1;
    c02 += x0 * y2;
    c03 += x0 * y3;
    c10 += x1 * y0;
    c11 += x1 * y1;
    c12 += x1 * y2;
    c13 += x1 * y3;
  }
  out[0][0] = reduce_lanes(c00);
  out[0][1] = reduce_lanes(c01);
  out[0][2] = reduce_lanes(c02);
  out[0][3] = reduce_lanes(c03);
  out[1][0] = reduce_lanes(c10);
  out[1][1] = reduce_lanes(c11);
  out[1][2] = reduce_lanes(c12);
  out[1][3] = reduce_lanes(c13);
}

// Rows [m0, m1) of D in the fast (FP32, lane-ordered) model, for any window length (the general
// path: windows that are not a multiple of 8 long). Blocked: B is walked in panels of kPanel rows
// (kept in cache while every 2-row block of A passes over it), outputs in 2x4 register blocks;
// ragged edges reuse a valid row whose results are discarded.
void fast_rows(const Fp8MatrixRef& a, const Fp8MatrixRef& b, const std::vector<float>& b_dec,
               float* d, int64_t ldd, int64_t interval, bool accumulate, int64_t m0, int64_t m1) {
  constexpr int64_t kPanel = 64;
  const int64_t k_total = a.cols;
  std::vector<float> a_rows(static_cast<size_t>(2 * k_total));
  for (int64_t np = 0; np < b.rows; np += kPanel) {
    const int64_t np_end = std::min(b.rows, np + kPanel);
    for (int64_t mb = m0; mb < m1; mb += 2) {
      const int64_t rows = std::min<int64_t>(2, m1 - mb);
      decode_row(a, mb, a_rows.data());
      decode_row(a, mb + rows - 1, a_rows.data() + k_total);
      for (int64_t nb = np; nb < np_end; nb += 4) {
        const int64_t cols = std::min<int64_t>(4, np_end - nb);
        const float* b_ptr[4];
        for (int64_t j = 0; j < 4; ++j)
          b_ptr[j] = b_dec.data() + (nb + std::min(j, cols - 1)) * k_total;
        float acc[2][4] = {};
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < cols; ++j)
            if (accumulate) acc[i][j] = d[(mb + i) * ldd + nb + j];
        for (int64_t w0 = 0; w0 < k_total; w0 += interval) {
          const int64_t len = std::min(interval, k_total - w0);
          float partial[2][4];
          if (len % 8 == 0) {
            const float* b_win[4] = {b_ptr[0] + w0, b_ptr[1] + w0, b_ptr[2] + w0, b_ptr[3] + w0};
            lane_dot_2x4(a_rows.data() + w0, a_rows.data() + k_total + w0, b_win, len, partial);
          } else {
            for (int64_t i = 0; i < 2; ++i)
              for (int64_t j = 0; j < 4; ++j)
                partial[i][j] = lane_dot(a_rows.data() + i * k_total + w0, b_ptr[j] + w0, len);
          }
          for (int64_t i = 0; i < rows; ++i) {
            const float sa = a.scale(mb + i, w0);
            for (int64_t j = 0; j < cols; ++j)
              acc[i][j] = std::fma(partial[i][j], sa * b.scale(nb + j, w0), acc[i][j]);
          }
        }
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < cols; ++j) d[(mb + i) * ldd + nb + j] = acc[i][j];
      }
    }
  }
}

// ---- The packed fast path (every window a multiple of 8 long, or one window over all of K) ----
//
// Operands are decoded once into zero-padded, interleaved panels, so the micro-kernels stream
// one contiguous buffer per operand and the promotion needs no scale lookups:
//   A: per 2-row block, per 8-wide k group: a0[k..k+8), a1[k..k+8)       (16 floats)
//   B: per 4-row block, per 8-wide k group: b0[k..k+8), ..., b3[k..k+8)  (32 floats)
//   scales: per block, per window: (sa0, sa1) and (sb0, sb1, sb2, sb3)
// K is padded with zeros to kp, a multiple of 8; missing rows of a last block are zero rows with
// scale 0, whose outputs are dropped. NOTE: the padding adds 0*0 = +0 to a lane, exactly the
// zero-padded tail of lane_dot, so results are the documented ones bit for bit.
constexpr int kBlockM = 2;  // rows of A per micro-kernel block
constexpr int kBlockN = 4;  // rows of B (columns of D) per micro-kernel block

struct PackedGeometry {
  int64_t k = 0, kp = 0, interval = 0, windows = 0;
  int64_t groups() const { return kp / 8; }
};

PackedGeometry packed_geometry(int64_t k, int64_t interval) {
  PackedGeometry g;
  g.k = k;
  g.kp = (k + 7) / 8 * 8;
  g.interval = interval >= k ? g.kp : interval;  // one window over all of K: the padded K
  g.windows = (g.kp + g.interval - 1) / g.interval;
  return g;
}

bool packed_path_applies(int64_t k, int64_t interval) {
  return interval % 8 == 0 || interval >= k;
}

// Rows [r0, r0 + kRows) of `op` (rows past op.rows are zeros) into one packed block.
template <int kRows>
void pack_block(const Fp8MatrixRef& op, int64_t r0, const PackedGeometry& g, float* panel,
                float* scales) {
  const auto& lut = e4m3_table();
  for (int i = 0; i < kRows; ++i) {
    const int64_t r = r0 + i;
    float* lane_row = panel + 8 * i;  // group q of this row at lane_row + q * 8 * kRows
    if (r < op.rows) {
      const uint8_t* codes = op.codes + r * op.ld;
      const int64_t full = g.k / 8;
      for (int64_t q = 0; q < full; ++q)
        for (int l = 0; l < 8; ++l) lane_row[q * 8 * kRows + l] = lut[codes[q * 8 + l]];
      for (int64_t k = full * 8; k < g.kp; ++k)
        lane_row[full * 8 * kRows + (k - full * 8)] = k < g.k ? lut[codes[k]] : 0.0f;
      for (int64_t w = 0; w < g.windows; ++w) scales[w * kRows + i] = op.scale(r, w * g.interval);
    } else {
      for (int64_t q = 0; q < g.groups(); ++q) std::fill_n(lane_row + q * 8 * kRows, 8, 0.0f);
      for (int64_t w = 0; w < g.windows; ++w) scales[w * kRows + i] = 0.0f;
    }
  }
}

// A strip of output blocks: one packed 2-row block of A against `blocks` consecutive packed
// 4-row blocks of B. acc[blocks][2][4] holds the running FP32 sums (in: the initial values).
struct StripArgs {
  const float* a;   // packed 2-row block
  const float* sa;  // [windows][2]
  const float* b;   // first packed 4-row block of B
  const float* sb;  // [blocks][windows][4]
  int64_t blocks;
  PackedGeometry g;
  float* acc;
};

using StripKernel = void (*)(const StripArgs&);

// The portable kernel: GCC vector extensions at the baseline ISA (SSE2 on x86-64), 2x4 blocks.
void strip_generic(const StripArgs& s) {
  const int64_t q_total = s.g.groups(), qi = s.g.interval / 8;
  for (int64_t blk = 0; blk < s.blocks; ++blk) {
    const float* bp = s.b + blk * q_total * 32;
    const float* sbp = s.sb + blk * s.g.windows * 4;
    float* acc = s.acc + blk * 8;
    for (int64_t w = 0; w < s.g.windows; ++w) {
      const int64_t q0 = w * qi, q1 = std::min(q_total, q0 + qi);
      Lanes c[2][4] = {};
      for (int64_t q = q0; q < q1; ++q) {
        Lanes x[2], y[4];
        for (int i = 0; i < 2; ++i) load_lanes(x[i], s.a + q * 16 + 8 * i);
        for (int j = 0; j < 4; ++j) load_lanes(y[j], bp + q * 32 + 8 * j);
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 4; ++j) c[i][j] += x[i] * y[j];
      }
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 4; ++j)
          acc[i * 4 + j] =
              std::fma(reduce_lanes(c[i][j]), s.sa[w * 2 + i] * sbp[w * 4 + j], acc[i * 4 + j]);
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define FM_HAVE_X86_KERNELS 1
// NOTE: GCC contracts a*b+c into an FMA in C++ whenever the target has FMA (-ffp-contract=fast is
// its default outside ISO C), intrinsics included. The header documents a multiply then an add
// per product, so contraction is switched off here; only the promotion is a fused multiply-add,
// written explicitly.
#if defined(__clang__)
#define FM_TARGET_FN(isa) __attribute__((target(isa)))
#define FM_NO_CONTRACT _Pragma("clang fp contract(off)")
#else
#define FM_TARGET_FN(isa) __attribute__((target(isa), optimize("fp-contract=off")))
#define FM_NO_CONTRACT
#endif
#define FM_AVX2_FN FM_TARGET_FN("avx2,fma")

// Four lane vectors (outputs j = 0..3) to their four partial sums, each in the documented order
// ((l0+l4)+(l2+l6))+((l1+l5)+(l3+l7)): halves first, then a 4x4 transpose so that the remaining
// pairwise adds run across outputs.
FM_AVX2_FN inline __m128 reduce4_avx2(__m256 c0, __m256 c1, __m256 c2, __m256 c3) {
  FM_NO_CONTRACT
  __m128 s0 = _mm_add_ps(_mm256_castps256_ps128(c0), _mm256_extractf128_ps(c0, 1));
  __m128 s1 = _mm_add_ps(_mm256_castps256_ps128(c1), _mm256_extractf128_ps(c1, 1));
  __m128 s2 = _mm_add_ps(_mm256_castps256_ps128(c2), _mm256_extractf128_ps(c2, 1));
  __m128 s3 = _mm_add_ps(_mm256_castps256_ps128(c3), _mm256_extractf128_ps(c3, 1));
  _MM_TRANSPOSE4_PS(s0, s1, s2, s3);  // s_l = (l+(l+4)) of outputs 0..3, l = 0..3
  return _mm_add_ps(_mm_add_ps(s0, s2), _mm_add_ps(s1, s3));
}

// AVX2: 2x4 blocks, eight 8-lane accumulators and six operand registers (of 16).
FM_AVX2_FN void strip_avx2(const StripArgs& s) {
  FM_NO_CONTRACT
  const int64_t q_total = s.g.groups(), qi = s.g.interval / 8;
  for (int64_t blk = 0; blk < s.blocks; ++blk) {
    const float* bp = s.b + blk * q_total * 32;
    const float* sbp = s.sb + blk * s.g.windows * 4;
    float* acc = s.acc + blk * 8;
    __m128 acc0 = _mm_loadu_ps(acc), acc1 = _mm_loadu_ps(acc + 4);
    for (int64_t w = 0; w < s.g.windows; ++w) {
      const int64_t q0 = w * qi, q1 = std::min(q_total, q0 + qi);
      __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c03 = c00;
      __m256 c10 = c00, c11 = c00, c12 = c00, c13 = c00;
      for (int64_t q = q0; q < q1; ++q) {
        const float* ap = s.a + q * 16;
        const float* bq = bp + q * 32;
        const __m256 x0 = _mm256_loadu_ps(ap), x1 = _mm256_loadu_ps(ap + 8);
        const __m256 y0 = _mm256_loadu_ps(bq), y1 = _mm256_loadu_ps(bq + 8);
        const __m256 y2 = _mm256_loadu_ps(bq + 16), y3 = _mm256_loadu_ps(bq + 24);
        c00 = _mm256_add_ps(c00, _mm256_mul_ps(x0, y0));
        c01 = _mm256_add_ps(c01, _mm256_mul_ps(x0, y1));
        c02 = _mm256_add_ps(c02, _mm256_mul_ps(x0, y2));
        c03 = _mm256_add_ps(c03, _mm256_mul_ps(x0, y3));
        c10 = _mm256_add_ps(c10, _mm256_mul_ps(x1, y0));
        c11 = _mm256_add_ps(c11, _mm256_mul_ps(x1, y1));
        c12 = _mm256_add_ps(c12, _mm256_mul_ps(x1, y2));
        c13 = _mm256_add_ps(c13, _mm256_mul_ps(x1, y3));
      }
      // Promotion: acc = fmaf(partial, sa * sb, acc) per output, four outputs at a time.
      const __m128 sb = _mm_loadu_ps(sbp + w * 4);
      acc0 = _mm_fmadd_ps(reduce4_avx2(c00, c01, c02, c03),
                          _mm_mul_ps(_mm_set1_ps(s.sa[w * 2]), sb), acc0);
      acc1 = _mm_fmadd_ps(reduce4_avx2(c10, c11, c12, c13),
                          _mm_mul_ps(_mm_set1_ps(s.sa[w * 2 + 1]), sb), acc1);
    }
    _mm_storeu_ps(acc, acc0);
    _mm_storeu_ps(acc + 4, acc1);
  }
}

#endif

FastSimd detect_fast_simd() {
#if defined(FM_HAVE_X86_KERNELS)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return FastSimd::kAvx2;
#endif
  return FastSimd::kGeneric;
}

std::atomic<FastSimd>& fast_simd_choice() {
  static std::atomic<FastSimd> choice{detect_fast_simd()};
  return choice;
}

StripKernel strip_kernel() {
#if defined(FM_HAVE_X86_KERNELS)
  if (fast_simd_choice().load(std::memory_order_relaxed) == FastSimd::kAvx2) return strip_avx2;
#endif
  return strip_generic;
}

// Packed panels are written in full by pack_block: no zero-filling first.
std::unique_ptr<float[]> uninitialized_floats(int64_t n) {
  return std::unique_ptr<float[]>(new float[static_cast<size_t>(n)]);
}

// B packed once per GEMM: 4-row blocks, their per-window scales.
struct PackedB {
  PackedGeometry g;
  int64_t rows = 0, blocks = 0;
  std::unique_ptr<float[]> panel, scales;
};

PackedB pack_b(const Fp8MatrixRef& b, const PackedGeometry& g) {
  PackedB p;
  p.g = g;
  p.rows = b.rows;
  p.blocks = (b.rows + kBlockN - 1) / kBlockN;
  p.panel = uninitialized_floats(p.blocks * g.kp * kBlockN);
  p.scales = uninitialized_floats(p.blocks * g.windows * kBlockN);
  for (int64_t blk = 0; blk < p.blocks; ++blk)
    pack_block<kBlockN>(b, blk * kBlockN, g, p.panel.get() + blk * g.kp * kBlockN,
                        p.scales.get() + blk * g.windows * kBlockN);
  return p;
}

// Rows [m0, m1) of D on the packed path. B is walked in panels of 64 rows, kept in cache while
// every 2-row block of A passes over it.
void packed_rows(const Fp8MatrixRef& a, const PackedB& pb, StripKernel kernel, float* d,
                 int64_t ldd, bool accumulate, int64_t m0, int64_t m1) {
  constexpr int64_t kPanelRows = 64;
  constexpr int64_t bn = kBlockN, acc_block = kBlockM * kBlockN, panel_blocks = kPanelRows / bn;
  const PackedGeometry& g = pb.g;
  const int64_t a_blocks = (m1 - m0 + kBlockM - 1) / kBlockM;
  const auto a_panel = uninitialized_floats(a_blocks * g.kp * kBlockM);
  const auto a_scales = uninitialized_floats(a_blocks * g.windows * kBlockM);
  // NOTE: a last odd row is paired with a zero row; a view ending at m1 keeps the next
  // thread's first row out of this block.
  Fp8MatrixRef a_view = a;
  a_view.rows = m1;
  for (int64_t blk = 0; blk < a_blocks; ++blk)
    pack_block<kBlockM>(a_view, m0 + kBlockM * blk, g, a_panel.get() + blk * g.kp * kBlockM,
                        a_scales.get() + blk * g.windows * kBlockM);
  float acc[kBlockM * kPanelRows];  // acc[j][i][c]: block j, row i, column c
  for (int64_t pb0 = 0; pb0 < pb.blocks; pb0 += panel_blocks) {
    const int64_t blocks = std::min(panel_blocks, pb.blocks - pb0);
    const int64_t n0 = pb0 * bn;
    for (int64_t blk = 0; blk < a_blocks; ++blk) {
      const int64_t mb = m0 + kBlockM * blk;
      const int64_t rows = std::min<int64_t>(kBlockM, m1 - mb);
      // Initial sums: zeros, or D's values when accumulating (dropped outputs stay zero).
      std::fill_n(acc, blocks * acc_block, 0.0f);
      if (accumulate)
        for (int64_t j = 0; j < blocks; ++j) {
          const int64_t cols = std::min(bn, pb.rows - (n0 + j * bn));
          for (int64_t i = 0; i < rows; ++i)
            std::copy_n(d + (mb + i) * ldd + n0 + j * bn, cols, acc + j * acc_block + i * bn);
        }
      kernel(StripArgs{a_panel.get() + blk * g.kp * kBlockM,
                       a_scales.get() + blk * g.windows * kBlockM, pb.panel.get() + pb0 * g.kp * bn,
                       pb.scales.get() + pb0 * g.windows * bn, blocks, g, acc});
      for (int64_t j = 0; j < blocks; ++j) {
        const int64_t cols = std::min(bn, pb.rows - (n0 + j * bn));
        for (int64_t i = 0; i < rows; ++i)
          std::copy_n(acc + j * acc_block + i * bn, cols, d + (mb + i) * ldd + n0 + j * bn);
      }
    }
  }
}

// Rows [m0, m1) of D in the emulated limited-accumulator model (see the header).
void emulated_rows(const Fp8MatrixRef& a, const Fp8MatrixRef& b, const std::vector<float>& b_dec,
                   float* d, int64_t ldd, const AccumulatorModel& model, bool scales_inside,
                   bool accumulate, int64_t m0, int64_t m1) {
  const int64_t k_total = a.cols;
  const int64_t interval = model.promotion_interval > 0 ? model.promotion_interval : k_total;
  std::vector<float> a_row(static_cast<size_t>(k_total));
  for (int64_t m = m0; m < m1; ++m) {
    decode_row(a, m, a_row.data());
    for (int64_t n = 0; n < b.rows; ++n) {
      const float* b_row = b_dec.data() + n * k_total;
      float acc = accumulate ? d[m * ldd + n] : 0.0f;
      for (int64_t w0 = 0; w0 < k_total; w0 += interval) {
        const int64_t w1 = std::min(k_total, w0 + interval);
        double partial = 0.0;
        double products[64];
        for (int64_t k0 = w0; k0 < w1; k0 += model.group) {
          const int count = static_cast<int>(std::min<int64_t>(model.group, w1 - k0));
          for (int i = 0; i < count; ++i) {
            const int64_t k = k0 + i;
            products[i] = static_cast<double>(a_row[k]) * static_cast<double>(b_row[k]);
            if (!scales_inside)
              products[i] *=
                  static_cast<double>(a.scale(m, k)) * static_cast<double>(b.scale(n, k));
          }
          partial = accumulate_step(partial, products, count, model.mantissa_bits, model.rounding);
        }
        if (scales_inside)
          acc = std::fma(static_cast<float>(partial), a.scale(m, w0) * b.scale(n, w0), acc);
        else
          acc = acc + static_cast<float>(partial);
      }
      d[m * ldd + n] = acc;
    }
  }
}

// fn(r0, r1) over `threads` contiguous row ranges. Every output row is computed by one call, so
// the split never changes results.
template <typename Fn>
void parallel_rows(int64_t rows, int threads, Fn&& fn) {
  const int64_t t = std::clamp<int64_t>(threads, 1, std::max<int64_t>(rows, 1));
  if (t == 1) {
    fn(0, rows);
    return;
  }
  const int64_t chunk = (rows + t - 1) / t;
  const int64_t tasks = (rows + chunk - 1) / chunk;
  const std::function<void(int64_t)> task = [&](int64_t i) {
    fn(i * chunk, std::min(rows, (i + 1) * chunk));
  };
  if (run_on_chunk_pool(tasks, task)) return;
  // NOTE: the calling thread takes the first chunk (one thread fewer to start).
  std::vector<std::thread> pool;
  for (int64_t i = 1; i < tasks; ++i) pool.emplace_back([&, i] { task(i); });
  task(0);
  for (auto& th : pool) th.join();
}

}  // namespace

const char* fast_simd_name(FastSimd s) {
  switch (s) {
    case FastSimd::kGeneric:
      return "generic";
    case FastSimd::kAvx2:
      return "avx2";
  }
  return "?";
}

FastSimd gemm_fp8_reference_simd() {
  return fast_simd_choice().load(std::memory_order_relaxed);
}

bool set_gemm_fp8_reference_simd(FastSimd s) {
  // The detected code is the widest this CPU runs; every narrower one runs too.
  if (static_cast<int>(s) > static_cast<int>(detect_fast_simd())) return false;
  fast_simd_choice().store(s, std::memory_order_relaxed);
  return true;
}

void gemm_fp8_reference(const Fp8MatrixRef& a, const Fp8MatrixRef& b, float* d, int64_t ldd,
                        const AccumulatorModel& model, bool accumulate, int threads) {
  check_gemm_operands(a, b, model);
  FM_CHECK_ARG(ldd >= b.rows, "fp8 gemm: ldd=", ldd, " smaller than N=", b.rows);
  if (a.rows == 0 || b.rows == 0) return;
  if (a.cols == 0) {
    if (!accumulate)
      for (int64_t m = 0; m < a.rows; ++m) std::fill(d + m * ldd, d + m * ldd + b.rows, 0.0f);
    return;
  }
  const int64_t interval = model.promotion_interval > 0 ? model.promotion_interval : a.cols;
  const bool scales_inside = windows_inside_tiles(a, interval) && windows_inside_tiles(b, interval);
  const bool fast =
      model.mantissa_bits == 23 && model.rounding == AccumRounding::kNearestEven && scales_inside;
  if (fast && packed_path_applies(a.cols, interval)) {
    const StripKernel kernel = strip_kernel();
    const PackedB pb = pack_b(b, packed_geometry(a.cols, interval));
    parallel_rows(a.rows, threads, [&](int64_t m0, int64_t m1) {
      packed_rows(a, pb, kernel, d, ldd, accumulate, m0, m1);
    });
    return;
  }
  std::vector<float> b_dec(static_cast<size_t>(b.rows * b.cols));
  for (int64_t n = 0; n < b.rows; ++n) decode_row(b, n, b_dec.data() + n * b.cols);
  parallel_rows(a.rows, threads, [&](int64_t m0, int64_t m1) {
    if (fast)
      fast_rows(a, b, b_dec, d, ldd, interval, accumulate, m0, m1);
    else
      emulated_rows(a, b, b_dec, d, ldd, model, scales_inside, accumulate, m0, m1);
  });
}

void gemm_fp8_reference_bf16(const Fp8MatrixRef& a, const Fp8MatrixRef& b, bf16* d, int64_t ldd,
                             const AccumulatorModel& model, int threads) {
  std::vector<float> tmp(static_cast<size_t>(a.rows * b.rows));
  gemm_fp8_reference(a, b, tmp.data(), b.rows, model, false, threads);
  for (int64_t m = 0; m < a.rows; ++m)
    for (int64_t n = 0; n < b.rows; ++n) d[m * ldd + n] = to_bf16(tmp[m * b.rows + n]);
}

}  // namespace fp8moe
