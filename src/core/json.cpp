#include "fp8moe/core/json.h"

#include <algorithm>

#include "fp8moe/core/file_io.h"

namespace fp8moe {

Json parse_json(std::string_view text, const std::string& what) {
  try {
    return Json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::parse_error& e) {
    FM_THROW(ErrorKind::kFormat, what, " is not valid JSON: ", e.what());
  }
}

Json read_json_file(const std::string& path) {
  return parse_json(read_file(path), path == "-" ? std::string("stdin") : "'" + path + "'");
}

void check_known_keys(const Json& obj, std::initializer_list<std::string_view> allowed,
                      const std::string& context) {
  if (!obj.is_object()) FM_THROW(ErrorKind::kInvalidArgument, context, ": expected a JSON object");
  for (const auto& [key, value] : obj.items()) {
    if (std::find(allowed.begin(), allowed.end(), key) == allowed.end())
      FM_THROW(ErrorKind::kInvalidArgument, context, ": unknown key '", key, "'");
  }
}

}  // namespace fp8moe
