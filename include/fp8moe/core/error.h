// The one error type of fp8moe: what went wrong, where (file:line), and of which kind, so that
// front ends can map bad user input to exit code 2 and internal failures to 1.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace fp8moe {

enum class ErrorKind {
  kInvalidArgument,  // a shape, flag, key or value the caller gave is not acceptable
  kFormat,           // a file exists but its content is malformed, truncated or foreign
  kIo,               // the operating system refused a read, write, rename, ...
  kRuntime,          // a failure while running (timeouts, peers that never answered)
  kCuda,
  kNccl,
  kInternal,  // a broken invariant: a bug in fp8moe
};

const char* error_kind_name(ErrorKind kind);

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, std::string message, const char* file, int line);
  ErrorKind kind() const { return kind_; }
  // The message alone, without the source location (for one-line user-facing errors).
  const std::string& message() const { return message_; }
  const char* file() const { return file_; }
  int line() const { return line_; }

 private:
  ErrorKind kind_;
  std::string message_;
  const char* file_;
  int line_;
};

namespace detail {
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream out;
  (out << ... << std::forward<Args>(args));
  return out.str();
}
[[noreturn]] void throw_error(ErrorKind kind, const char* file, int line, std::string message);
}  // namespace detail

}  // namespace fp8moe

// FM_THROW(kind, parts...) throws fp8moe::Error; the parts are streamed together.
#define FM_THROW(kind, ...) \
  ::fp8moe::detail::throw_error((kind), __FILE__, __LINE__, ::fp8moe::detail::concat(__VA_ARGS__))

// FM_CHECK: an internal invariant. FM_CHECK_ARG: a precondition on what the caller passed.
#define FM_CHECK(cond, ...)                                                                 \
  do {                                                                                      \
    if (!(cond)) [[unlikely]]                                                               \
      FM_THROW(::fp8moe::ErrorKind::kInternal, "check failed: " #cond ": ", ##__VA_ARGS__); \
  } while (0)
#define FM_CHECK_ARG(cond, ...)                                       \
  do {                                                                \
    if (!(cond)) [[unlikely]]                                         \
      FM_THROW(::fp8moe::ErrorKind::kInvalidArgument, ##__VA_ARGS__); \
  } while (0)
