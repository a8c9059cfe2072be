#include "fp8moe/fp8/accumulation_study.h"

#include <cmath>

#include "fp8moe/core/philox.h"
#include "fp8moe/fp8/codec.h"

namespace fp8moe {

const char* distribution_name(InputDistribution d) {
  return d == InputDistribution::kUniform01 ? "uniform01" : "normal";
}

void validate(const AccumulationStudyOptions& o) {
  FM_CHECK_ARG(!o.ks.empty(), "--k: at least one K is needed");
  for (int64_t k : o.ks)
    FM_CHECK_ARG(k >= 1 && k <= (1 << 20), "--k: K must be in 1..1048576, got ", k);
  FM_CHECK_ARG(o.mantissa_bits >= 1 && o.mantissa_bits <= 23,
               "--mantissa-bits: must be in 1..23 (FP32 keeps 23), got ", o.mantissa_bits);
  FM_CHECK_ARG(o.interval >= 0, "--interval: must be >= 0 (0 = never promote), got ", o.interval);
  FM_CHECK_ARG(o.interval % 32 == 0,
               "--interval: must be a multiple of 32 (one wgmma K step), got ", o.interval);
  FM_CHECK_ARG(o.group >= 1 && o.group <= 64, "--group: must be in 1..64, got ", o.group);
  FM_CHECK_ARG(o.trials >= 1, "--trials: must be >= 1, got ", o.trials);
  FM_CHECK_ARG(o.m >= 1 && o.n >= 1, "--m/--n: must be >= 1");
}

namespace {

std::vector<float> random_matrix(int64_t rows, int64_t cols, InputDistribution dist, uint64_t seed,
                                 uint64_t stream) {
  std::vector<float> x(static_cast<size_t>(rows * cols));
  for (size_t i = 0; i < x.size(); ++i)
    x[i] = dist == InputDistribution::kUniform01 ? philox_uniform(seed, stream, i)
                                                 : philox_normal(seed, stream, i);
  return x;
}

// Dequantised rows in double: code * scale is exact in double (4 + 24 significant bits).
std::vector<double> dequantize_exact(const Fp8MatrixRef& q) {
  std::vector<double> out(static_cast<size_t>(q.rows * q.cols));
  for (int64_t r = 0; r < q.rows; ++r)
    for (int64_t c = 0; c < q.cols; ++c)
      out[r * q.cols + c] = static_cast<double>(e4m3_bits_to_float(q.codes[r * q.ld + c])) *
                            static_cast<double>(q.scale(r, c));
  return out;
}

// FP64 product of the quantised values (the products are exact; the sum is double).
std::vector<double> exact_product(const Fp8MatrixRef& a, const Fp8MatrixRef& b) {
  const auto da = dequantize_exact(a), db = dequantize_exact(b);
  const int64_t k_total = a.cols;
  std::vector<double> d(static_cast<size_t>(a.rows * b.rows));
  for (int64_t m = 0; m < a.rows; ++m)
    for (int64_t n = 0; n < b.rows; ++n) {
      const double* x = da.data() + m * k_total;
      const double* y = db.data() + n * k_total;
      double lanes[4] = {0, 0, 0, 0};
      int64_t k = 0;
      for (; k + 4 <= k_total; k += 4)
        for (int j = 0; j < 4; ++j) lanes[j] += x[k + j] * y[k + j];
      for (; k < k_total; ++k) lanes[0] += x[k] * y[k];
      d[m * b.rows + n] = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    }
  return d;
}

struct ErrorAccumulator {
  double max = 0.0, sum = 0.0;
  int64_t count = 0;
  void add(double rel) {
    max = std::max(max, rel);
    sum += rel;
    ++count;
  }
  RelativeErrorStats stats() const { return {max, count ? sum / count : 0.0}; }
};

}  // namespace

std::vector<AccumulationStudyRow> run_accumulation_study(const AccumulationStudyOptions& o) {
  validate(o);
  std::vector<AccumulationStudyRow> rows;
  const AccumulatorModel limited{o.mantissa_bits, o.rounding, 0, o.group};
  const AccumulatorModel promoted{o.mantissa_bits, o.rounding, o.interval, o.group};
  for (int64_t k : o.ks) {
    ErrorAccumulator lim, pro;
    for (int trial = 0; trial < o.trials; ++trial) {
      const uint64_t stream = static_cast<uint64_t>(k) * 1000 + static_cast<uint64_t>(trial) * 2;
      const auto xa = random_matrix(o.m, k, o.distribution, o.seed, stream);
      const auto xb = random_matrix(o.n, k, o.distribution, o.seed, stream + 1);
      const QuantizedMatrix qa = quantize(xa.data(), o.m, k, k, ScaleGranularity::k1x128);
      const QuantizedMatrix qb = quantize(xb.data(), o.n, k, k, ScaleGranularity::k128x128);
      const auto ref = exact_product(qa.ref(), qb.ref());
      std::vector<float> d_lim(ref.size()), d_pro(ref.size());
      gemm_fp8_reference(qa.ref(), qb.ref(), d_lim.data(), o.n, limited, false, o.threads);
      gemm_fp8_reference(qa.ref(), qb.ref(), d_pro.data(), o.n, promoted, false, o.threads);
      double sq = 0.0;
      for (double v : ref) sq += v * v;
      const double threshold = 0.1 * std::sqrt(sq / static_cast<double>(ref.size()));
      for (size_t i = 0; i < ref.size(); ++i) {
        if (!(std::fabs(ref[i]) > threshold)) continue;
        lim.add(std::fabs(d_lim[i] - ref[i]) / std::fabs(ref[i]));
        pro.add(std::fabs(d_pro[i] - ref[i]) / std::fabs(ref[i]));
      }
    }
    rows.push_back({k, lim.stats(), pro.stats(), lim.count});
  }
  return rows;
}

}  // namespace fp8moe
