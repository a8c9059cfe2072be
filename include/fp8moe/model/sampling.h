// The next token from a row of logits, as `fp8moe generate` (CPU, train/trainer.h) and the GPU
// generator (serve/generator_gpu.h) draw it: greedy at temperature 0 (the lowest id among equal
// maxima), else softmax(logits / temperature) cut to the nucleus (the smallest set of most likely
// tokens whose mass reaches top_p; ties by id) and one uniform draw from `rng`. The same
// distribution as probabilities, and speculative sampling's check of a drafted token against it
// (the GPU generator's MTP draft).
#pragma once

#include <cstdint>
#include <vector>

#include "fp8moe/core/philox.h"

namespace fp8moe {

int32_t sample_token(const float* logits, int64_t vocab, double temperature, double top_p,
                     PhiloxStream& rng);

// The distribution sample_token draws from, as probabilities [vocab] (0 outside the nucleus;
// temperature 0: 1 at the lowest id among the maxima).
void token_probs(const float* logits, int64_t vocab, double temperature, double top_p,
                 std::vector<double>& probs);
// A token drawn from probs (not necessarily normalised): one uniform draw, ids in order; a
// distribution with one nonzero entry returns it without a draw.
int32_t sample_probs(const std::vector<double>& probs, PhiloxStream& rng);

// Speculative sampling's check of a draft token (Leviathan et al.; Chen et al.): `draft` was
// drawn from q; it is kept with probability min(1, p[draft] / q[draft]) (no draw when that is 0
// or 1), else a token is drawn from max(0, p - q) normalised. The result is distributed as p
// whatever q is. Returns the token; *kept says whether it is the draft.
int32_t speculative_pick(const std::vector<double>& p, const std::vector<double>& q, int32_t draft,
                         PhiloxStream& rng, bool* kept);

}  // namespace fp8moe
