// The next token from a row of logits, as `fp8moe generate` (CPU, train/trainer.h) and the GPU
// generator (serve/generator_gpu.h) draw it: greedy at temperature 0 (the lowest id among equal
// maxima), else softmax(logits / temperature) cut to the nucleus (the smallest set of most likely
// tokens whose mass reaches top_p; ties by id) and one uniform draw from `rng`.
#pragma once

#include <cstdint>

#include "fp8moe/core/philox.h"

namespace fp8moe {

int32_t sample_token(const float* logits, int64_t vocab, double temperature, double top_p,
                     PhiloxStream& rng);

}  // namespace fp8moe
