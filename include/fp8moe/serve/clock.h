// The serving code's clock: steady-clock seconds (ServeRequest::arrival, first-token and
// token-gap times). Header-only so that the CPU serving path (`fp8moe serve --device cpu`) has it.
#pragma once

#include <chrono>

namespace fp8moe::serve {

inline double steady_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace fp8moe::serve
