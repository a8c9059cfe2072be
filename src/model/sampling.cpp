// sample_token (model/sampling.h). Tested by tests/model/sampling_test.cpp.
#include "fp8moe/model/sampling.h"

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "fp8moe/core/error.h"

namespace fp8moe {

int32_t sample_token(const float* logits, int64_t vocab, double temperature, double top_p,
                     PhiloxStream& rng) {
  FM_CHECK_ARG(vocab > 0, "sample_token: vocab=", vocab, " must be positive");
  FM_CHECK_ARG(temperature >= 0, "sample_token: temperature=", temperature, " must be >= 0");
  FM_CHECK_ARG(top_p > 0 && top_p <= 1, "sample_token: top_p=", top_p, " must lie in (0, 1]");
  if (temperature == 0)
    return static_cast<int32_t>(std::max_element(logits, logits + vocab) - logits);
  const float mx = *std::max_element(logits, logits + vocab);
  std::vector<std::pair<double, int32_t>> probs;
  probs.reserve(static_cast<size_t>(vocab));
  double sum = 0;
  for (int64_t v = 0; v < vocab; ++v) {
    const double p = std::exp((logits[v] - mx) / temperature);
    probs.emplace_back(p, static_cast<int32_t>(v));
    sum += p;
  }
  std::sort(probs.begin(), probs.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  });
  // Nucleus: the smallest prefix whose probability reaches top_p.
  double cum = 0;
  size_t keep = 0;
  while (keep < probs.size() && cum < top_p * sum) cum += probs[keep++].first;
  const double r = rng.uniform() * cum;
  double acc = 0;
  for (size_t k = 0; k < keep; ++k) {
    acc += probs[k].first;
    if (r < acc) return probs[k].second;
  }
  return probs[keep - 1].second;
}

}  // namespace fp8moe
