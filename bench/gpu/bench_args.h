// The GPU benchmarks' command lines as a table of flags: each bench lists its flags and what each
// sets; an unknown flag or a flag without its value is an error that names it (kInvalidArgument).
#pragma once

#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "fp8moe/core/error.h"

namespace fp8moe::bench {

struct Flag {
  const char* name;
  std::function<void(const std::string&)> set;  // given the value ("" for a switch)
  bool takes_value = true;
};

// A comma-separated list's items ("a,b,,c" -> a, b, c).
inline std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

inline void parse_flags(int argc, char** argv, const char* program,
                        const std::vector<Flag>& flags) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const Flag* flag = nullptr;
    for (const Flag& f : flags)
      if (arg == f.name) flag = &f;
    FM_CHECK_ARG(flag != nullptr, program, ": unknown argument '", arg, "'");
    if (!flag->takes_value) {
      flag->set("");
      continue;
    }
    FM_CHECK_ARG(i + 1 < argc, program, ": ", arg, " needs a value");
    flag->set(argv[++i]);
  }
}

}  // namespace fp8moe::bench
