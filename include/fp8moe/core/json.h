// JSON helpers over nlohmann::json: reading with errors that name the file, strict key checks
// (an unknown key is an error that names it), typed field access with context in messages.
#pragma once

#include <initializer_list>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "fp8moe/core/error.h"

namespace fp8moe {

using Json = nlohmann::json;
using OrderedJson = nlohmann::ordered_json;

// Parse text; `what` names the source in error messages (a path, "stdin", ...).
Json parse_json(std::string_view text, const std::string& what);
// Read and parse a file ("-" for stdin).
Json read_json_file(const std::string& path);

// Throws kInvalidArgument naming the first key of `obj` that is not in `allowed`.
void check_known_keys(const Json& obj, std::initializer_list<std::string_view> allowed,
                      const std::string& context);

// obj[key] converted to T; missing keys and wrong types are errors naming the key and context.
template <typename T>
T json_get(const Json& obj, const std::string& key, const std::string& context) {
  if (!obj.is_object()) FM_THROW(ErrorKind::kInvalidArgument, context, ": expected a JSON object");
  auto it = obj.find(key);
  if (it == obj.end()) FM_THROW(ErrorKind::kInvalidArgument, context, ": missing key '", key, "'");
  try {
    return it->template get<T>();
  } catch (const nlohmann::json::exception& e) {
    FM_THROW(ErrorKind::kInvalidArgument, context, ": key '", key, "' has the wrong type (",
             it->type_name(), ")");
  }
}

// Like json_get, but a missing key yields `fallback`.
template <typename T>
T json_get_or(const Json& obj, const std::string& key, T fallback, const std::string& context) {
  if (!obj.contains(key) || obj.at(key).is_null()) return fallback;
  return json_get<T>(obj, key, context);
}

}  // namespace fp8moe
