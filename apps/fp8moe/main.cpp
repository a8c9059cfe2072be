// fp8moe: the command line front end. A thin layer over libfp8moe: each subcommand lives in
// its own cmd_<name>.cpp and registers itself (command.h).
#include <algorithm>
#include <iostream>

#include "command.h"

namespace fp8moe::cli {

std::vector<CommandEntry>& command_registry() {
  static std::vector<CommandEntry> registry;
  return registry;
}

std::vector<long long> parse_int_list(const std::string& text, const std::string& flag) {
  std::vector<long long> out;
  size_t pos = 0;
  while (pos <= text.size()) {
    const size_t comma = text.find(',', pos);
    const std::string item =
        text.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(item, &used);
    } catch (...) {
      used = 0;
    }
    FM_CHECK_ARG(!item.empty() && used == item.size(), flag, ": '", item, "' is not an integer");
    out.push_back(v);
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

}  // namespace fp8moe::cli

int main(int argc, char** argv) {
  using namespace fp8moe;
  CLI::App app{
      "fp8moe: FP8 mixture-of-experts training and inference infrastructure "
      "(DeepSeek-V3 recipe)"};
  app.require_subcommand(1);
  app.set_help_all_flag("--help-all", "Print help for all subcommands");
  auto& registry = cli::command_registry();
  std::sort(registry.begin(), registry.end(),
            [](const auto& a, const auto& b) { return a.name < b.name; });
  for (auto& entry : registry) {
    CLI::App* sub = app.add_subcommand(entry.name, entry.description);
    entry.setup(*sub);
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // One clear line, exit 2, whatever CLI11's own code for the error would be.
    std::cerr << "fp8moe: " << e.what() << " (try --help)\n";
    return 2;
  } catch (const Error& e) {
    std::cerr << "fp8moe: " << e.message() << "\n";
    const bool usage = e.kind() == ErrorKind::kInvalidArgument || e.kind() == ErrorKind::kFormat;
    return usage ? 2 : 1;
  } catch (const std::exception& e) {
    std::cerr << "fp8moe: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
