// Subcommands register themselves: each apps/fp8moe/cmd_<name>.cpp defines one
// FM_REGISTER_COMMAND, so adding a capability never edits main.cpp.
//
// Exit codes: 0 success; 2 bad usage or bad input (unknown flag, bad value, malformed file);
// 1 anything else. A UsageError or an fp8moe::Error of kind kInvalidArgument/kFormat gives 2.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <string>
#include <vector>

#include "fp8moe/core/error.h"

namespace fp8moe::cli {

// Set up a subcommand of `app` (options and callback). The callback throws on failure.
using CommandSetup = std::function<void(CLI::App& app)>;

struct CommandEntry {
  std::string name;
  std::string description;
  CommandSetup setup;
};

std::vector<CommandEntry>& command_registry();

struct CommandRegistrar {
  CommandRegistrar(std::string name, std::string description, CommandSetup setup) {
    command_registry().push_back({std::move(name), std::move(description), std::move(setup)});
  }
};

// Bad usage found after parsing (a value out of range, inconsistent flags): FM_CHECK_ARG from
// fp8moe/core/error.h (kInvalidArgument, exit 2).

// Parse "1,2,3" into integers; errors name the flag.
std::vector<long long> parse_int_list(const std::string& text, const std::string& flag);

}  // namespace fp8moe::cli

#define FM_CLI_CONCAT2(a, b) a##b
#define FM_CLI_CONCAT(a, b) FM_CLI_CONCAT2(a, b)
#define FM_REGISTER_COMMAND(name, description, setup)                                            \
  static ::fp8moe::cli::CommandRegistrar FM_CLI_CONCAT(fm_command_, __LINE__)(name, description, \
                                                                              setup)
