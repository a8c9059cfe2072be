#include "fp8moe/core/error.h"

namespace fp8moe {

const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kInvalidArgument:
      return "invalid argument";
    case ErrorKind::kFormat:
      return "bad format";
    case ErrorKind::kIo:
      return "i/o error";
    case ErrorKind::kRuntime:
      return "runtime error";
    case ErrorKind::kCuda:
      return "CUDA error";
    case ErrorKind::kNccl:
      return "NCCL error";
    case ErrorKind::kInternal:
      return "internal error";
  }
  return "error";
}

Error::Error(ErrorKind kind, std::string message, const char* file, int line)
    : std::runtime_error(detail::concat(message, " [", file, ":", line, "]")),
      kind_(kind),
      message_(std::move(message)),
      file_(file),
      line_(line) {}

namespace detail {
void throw_error(ErrorKind kind, const char* file, int line, std::string message) {
  throw Error(kind, std::move(message), file, line);
}
}  // namespace detail

}  // namespace fp8moe
