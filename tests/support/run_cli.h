// Runs the fp8moe command line (its path comes from the FP8MOE_CLI macro) for tests that check
// exit codes and output. Standard error is captured together with standard output.
#pragma once

#include <sys/wait.h>

#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

namespace fp8moe::test {

struct CliResult {
  int exit_code = -1;
  std::string output;
};

inline CliResult run_cli(const std::string& args, const std::string& stdin_text = "") {
  std::string command = std::string(FP8MOE_CLI) + " " + args + " 2>&1";
  if (!stdin_text.empty()) {
    // Feed stdin through a here-document-free path: a temporary file.
    char path[] = "/tmp/fp8moe_cli_stdinXXXXXX";
    const int fd = mkstemp(path);
    if (fd >= 0) {
      FILE* f = fdopen(fd, "w");
      fwrite(stdin_text.data(), 1, stdin_text.size(), f);
      fclose(f);
      command += std::string(" < ") + path;
    }
  }
  CliResult result;
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) return result;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), pipe)) > 0) result.output.append(buf.data(), n);
  const int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

// Exit code only, standard error discarded (tests that read the output files instead).
inline int run_cli_status(const std::string& args) {
  const std::string command = std::string(FP8MOE_CLI) + " " + args + " 2>/dev/null";
  const int status = std::system(command.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// An empty directory of its own for the running test (prefix, test seed and name), so that
// tests running in parallel never share files.
inline std::filesystem::path fresh_test_dir(const std::string& prefix) {
  const auto* unit = ::testing::UnitTest::GetInstance();
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / (prefix + "_" + std::to_string(unit->random_seed()) +
                                                "_" + unit->current_test_info()->name());
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

}  // namespace fp8moe::test
