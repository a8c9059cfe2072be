// The JSON lines of `fp8moe serve` (apps/fp8moe/cmd_serve.cpp): one request an input line, one
// result (or error) an output line. CPU code, tested in tests/serve/request_json_test.cpp.
//
// Request: {"id": <any JSON, echoed back; default: the line number>, "prompt": "text",
//           "max_new_tokens": n >= 1, "temperature": t >= 0, "top_p": p in (0, 1],
//           "seed": s >= 0, "ignore_eos": bool}
// Absent fields take the server's defaults (its flags); an unknown key, a wrong type or a value
// out of range is an error naming it (the server answers the line with an error and goes on).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "fp8moe/core/json.h"
#include "fp8moe/serve/sampling_options.h"

namespace fp8moe::serve {

struct RequestLine {
  Json id;
  std::string prompt;
  SamplingOptions sampling;
};

// Throws kInvalidArgument naming the problem ("line 3: key 'top_p' ...").
RequestLine parse_request_line(std::string_view line, int64_t line_number,
                               const SamplingOptions& defaults);
// The id an answer to the line carries: its "id" where the line is a JSON object that has one
// (also when another field is bad), else the line number. Never throws.
Json request_id(std::string_view line, int64_t line_number);

// {"id": ..., "completion": "...", "new_tokens": n, "ttft_ms": x, "latency_ms": y} (one line, no
// newline); {"id": ..., "error": "..."}; with streaming, {"id": ..., "delta": "..."}.
std::string result_line(const Json& id, const std::string& completion, int64_t new_tokens,
                        double ttft_ms, double latency_ms);
std::string error_line(const Json& id, const std::string& error);
std::string delta_line(const Json& id, const std::string& delta);

}  // namespace fp8moe::serve
