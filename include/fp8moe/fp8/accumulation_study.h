// The reproducible form of the DeepSeek-V3 report's accumulation-precision experiment: random
// fine-grained-scaled E4M3 operands, multiplied with (a) an accumulator that keeps
// `mantissa_bits` for the whole K and (b) the same accumulator promoted to FP32 every
// `interval` elements, both compared with an FP64 product of the same FP8 values.
//
// Relative error per output element, |out - ref| / |ref|, over the elements with
// |ref| > 0.1 * rms(ref) (so that outputs near zero, whose relative error is meaningless, do
// not dominate the maximum; shared/ANCHORS.md measures the real tensor cores the same way).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "fp8moe/fp8/gemm_reference.h"

namespace fp8moe {

enum class InputDistribution { kUniform01, kNormal };
const char* distribution_name(InputDistribution d);

struct AccumulationStudyOptions {
  std::vector<int64_t> ks = {512, 1024, 2048, 4096, 8192, 16384};
  int mantissa_bits = 14;
  AccumRounding rounding = AccumRounding::kTruncate;
  int interval = 128;
  int group = 1;  // products per accumulator step
  int trials = 2;
  int64_t m = 128, n = 128;
  uint64_t seed = 0;
  InputDistribution distribution = InputDistribution::kUniform01;
  int threads = 2;
};

struct RelativeErrorStats {
  double max_rel_err = 0.0;
  double mean_rel_err = 0.0;
};

struct AccumulationStudyRow {
  int64_t k = 0;
  RelativeErrorStats limited;
  RelativeErrorStats promoted;
  int64_t elements = 0;  // elements that entered the statistics
};

// Throws kInvalidArgument for options outside their ranges (K < 1, bits outside 1..23, ...).
void validate(const AccumulationStudyOptions& options);
std::vector<AccumulationStudyRow> run_accumulation_study(const AccumulationStudyOptions& options);

}  // namespace fp8moe
