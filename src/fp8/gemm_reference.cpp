#include "fp8moe/fp8/gemm_reference.h"

#include <algorithm>
#include <array>
#include <bit>
#include <climits>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

#include "fp8moe/fp8/codec.h"

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
// and six operand vectors fit the 16 AVX registers.
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

// Rows [m0, m1) of D in the fast (FP32, lane-ordered) model. Blocked: B is walked in panels of
// kPanel rows (kept in cache while every 2-row block of A passes over it), outputs in 2x4
// register blocks; ragged edges reuse a valid row whose results are discarded.
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

template <typename Fn>
void parallel_rows(int64_t rows, int threads, Fn&& fn) {
  const int64_t t = std::clamp<int64_t>(threads, 1, std::max<int64_t>(rows, 1));
  if (t == 1) {
    fn(0, rows);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t chunk = (rows + t - 1) / t;
  for (int64_t i = 0; i < t; ++i) {
    const int64_t r0 = i * chunk, r1 = std::min(rows, r0 + chunk);
    if (r0 < r1) pool.emplace_back([&, r0, r1] { fn(r0, r1); });
  }
  for (auto& th : pool) th.join();
}

}  // namespace

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
  std::vector<float> b_dec(static_cast<size_t>(b.rows * b.cols));
  for (int64_t n = 0; n < b.rows; ++n) decode_row(b, n, b_dec.data() + n * b.cols);

  const int64_t interval = model.promotion_interval > 0 ? model.promotion_interval : a.cols;
  const bool scales_inside = windows_inside_tiles(a, interval) && windows_inside_tiles(b, interval);
  const bool fast =
      model.mantissa_bits == 23 && model.rounding == AccumRounding::kNearestEven && scales_inside;
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
