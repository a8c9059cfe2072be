// serve/request_json.h.
#include "fp8moe/serve/request_json.h"

#include <cmath>

#include "fp8moe/core/error.h"

namespace fp8moe::serve {

RequestLine parse_request_line(std::string_view line, int64_t line_number,
                               const SamplingOptions& defaults) {
  const std::string where = "line " + std::to_string(line_number);
  const Json j = parse_json(line, where);
  FM_CHECK_ARG(j.is_object(), where, ": a request is a JSON object");
  check_known_keys(
      j, {"id", "prompt", "max_new_tokens", "temperature", "top_p", "seed", "ignore_eos"}, where);
  RequestLine r;
  r.id = j.contains("id") ? j["id"] : Json(line_number);
  r.prompt = json_get<std::string>(j, "prompt", where);
  r.sampling = defaults;
  SamplingOptions& s = r.sampling;
  if (j.contains("max_new_tokens")) {
    FM_CHECK_ARG(j["max_new_tokens"].is_number_integer(), where,
                 ": key 'max_new_tokens' must be an integer");
    s.max_new_tokens = j["max_new_tokens"].get<int64_t>();
  }
  if (j.contains("temperature")) s.temperature = json_get<double>(j, "temperature", where);
  if (j.contains("top_p")) s.top_p = json_get<double>(j, "top_p", where);
  if (j.contains("seed")) {
    FM_CHECK_ARG(j["seed"].is_number_unsigned() ||
                     (j["seed"].is_number_integer() && j["seed"].get<int64_t>() >= 0),
                 where, ": key 'seed' must be a non-negative integer");
    s.seed = j["seed"].get<uint64_t>();
  }
  if (j.contains("ignore_eos")) s.ignore_eos = json_get<bool>(j, "ignore_eos", where);
  FM_CHECK_ARG(s.max_new_tokens >= 1, where, ": max_new_tokens=", s.max_new_tokens,
               " must be >= 1");
  FM_CHECK_ARG(std::isfinite(s.temperature) && s.temperature >= 0, where,
               ": temperature=", s.temperature, " must be >= 0");
  FM_CHECK_ARG(s.top_p > 0 && s.top_p <= 1, where, ": top_p=", s.top_p, " must lie in (0, 1]");
  return r;
}

Json request_id(std::string_view line, int64_t line_number) {
  const Json j = Json::parse(line, nullptr, false);
  return j.is_object() && j.contains("id") ? j["id"] : Json(line_number);
}

std::string result_line(const Json& id, const std::string& completion, int64_t new_tokens,
                        double ttft_ms, double latency_ms) {
  OrderedJson j;
  j["id"] = id;
  j["completion"] = completion;
  j["new_tokens"] = new_tokens;
  j["ttft_ms"] = std::round(ttft_ms * 1000) / 1000;
  j["latency_ms"] = std::round(latency_ms * 1000) / 1000;
  return j.dump(-1, ' ', false, Json::error_handler_t::replace);
}

std::string error_line(const Json& id, const std::string& error) {
  OrderedJson j;
  j["id"] = id;
  j["error"] = error;
  return j.dump(-1, ' ', false, Json::error_handler_t::replace);
}

std::string delta_line(const Json& id, const std::string& delta) {
  OrderedJson j;
  j["id"] = id;
  j["delta"] = delta;
  return j.dump(-1, ' ', false, Json::error_handler_t::replace);
}

}  // namespace fp8moe::serve
