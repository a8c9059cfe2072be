// How a request's tokens are drawn and when it stops (GeneratorGpu, `fp8moe serve`'s request
// lines). CPU-only header: the request parser (serve/request_json.h) builds without CUDA.
#pragma once

#include <cstdint>

namespace fp8moe::serve {

struct SamplingOptions {
  int64_t max_new_tokens = 64;
  double temperature = 0;  // 0: greedy
  double top_p = 1;
  uint64_t seed = 1;
  int32_t eos = -1;  // -1: none
  bool ignore_eos = false;
};

}  // namespace fp8moe::serve
