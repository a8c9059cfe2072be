// sample_token (model/sampling.h). Tested by tests/model/sampling_test.cpp.
#include "fp8moe/model/sampling.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
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

void token_probs(const float* logits, int64_t vocab, double temperature, double top_p,
                 std::vector<double>& probs) {
  FM_CHECK_ARG(vocab > 0, "token_probs: vocab=", vocab, " must be positive");
  FM_CHECK_ARG(temperature >= 0, "token_probs: temperature=", temperature, " must be >= 0");
  FM_CHECK_ARG(top_p > 0 && top_p <= 1, "token_probs: top_p=", top_p, " must lie in (0, 1]");
  probs.assign(static_cast<size_t>(vocab), 0.0);
  if (temperature == 0) {
    probs[std::max_element(logits, logits + vocab) - logits] = 1.0;
    return;
  }
  // sample_token's nucleus: the same weights, order and cut.
  const float mx = *std::max_element(logits, logits + vocab);
  std::vector<std::pair<double, int32_t>> sorted;
  sorted.reserve(static_cast<size_t>(vocab));
  double sum = 0;
  for (int64_t v = 0; v < vocab; ++v) {
    const double w = std::exp((logits[v] - mx) / temperature);
    sorted.emplace_back(w, static_cast<int32_t>(v));
    sum += w;
  }
  if (top_p >= 1) {  // every token: no order needed
    for (const auto& [w, v] : sorted) probs[v] = w / sum;
    return;
  }
  // The nucleus is usually a small head of the order: sort a growing prefix (partial_sort with
  // the same total order gives full sorting's prefix) until its mass reaches top_p.
  const auto before = [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  };
  for (size_t head = std::min<size_t>(64, sorted.size());;
       head = std::min(4 * head, sorted.size())) {
    std::partial_sort(sorted.begin(), sorted.begin() + static_cast<std::ptrdiff_t>(head),
                      sorted.end(), before);
    double cum = 0;
    size_t keep = 0;
    while (keep < head && cum < top_p * sum) cum += sorted[keep++].first;
    if (cum >= top_p * sum || head == sorted.size()) {
      for (size_t k = 0; k < keep; ++k) probs[sorted[k].second] = sorted[k].first / cum;
      return;
    }
  }
}

int32_t sample_probs(const std::vector<double>& probs, PhiloxStream& rng) {
  double total = 0;
  int64_t nonzero = 0, last = -1;
  for (size_t v = 0; v < probs.size(); ++v)
    if (probs[v] > 0) {
      total += probs[v];
      ++nonzero;
      last = static_cast<int64_t>(v);
    }
  FM_CHECK_ARG(nonzero > 0, "sample_probs: no token has a positive probability");
  if (nonzero == 1) return static_cast<int32_t>(last);
  const double r = rng.uniform() * total;
  double acc = 0;
  for (size_t v = 0; v < probs.size(); ++v) {
    acc += probs[v];
    if (probs[v] > 0 && r < acc) return static_cast<int32_t>(v);
  }
  return static_cast<int32_t>(last);
}

int32_t speculative_pick(const std::vector<double>& p, const std::vector<double>& q, int32_t draft,
                         PhiloxStream& rng, bool* kept) {
  FM_CHECK_ARG(
      p.size() == q.size() && draft >= 0 && static_cast<size_t>(draft) < q.size() && q[draft] > 0,
      "speculative_pick: the draft ", draft, " must have a positive draft probability");
  const double keep = std::min(1.0, p[draft] / q[draft]);
  *kept = keep >= 1.0 || (keep > 0.0 && rng.uniform() < keep);
  if (*kept) return draft;
  std::vector<double> residual(p.size());
  double mass = 0;
  for (size_t v = 0; v < p.size(); ++v) {
    residual[v] = std::max(0.0, p[v] - q[v]);
    mass += residual[v];
  }
  // NOTE: p[draft] < q[draft] leaves mass in p - q exactly; rounding could only empty it when p
  // and q agree to the last bits, where keeping the draft is what p says.
  if (mass <= 0) {
    *kept = true;
    return draft;
  }
  return sample_probs(residual, rng);
}

}  // namespace fp8moe
