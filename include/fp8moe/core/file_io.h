// File helpers that never leave a half-written file behind: writes go to a temporary file in
// the same folder, are fsync'ed, then renamed over the target (and the folder is fsync'ed).
#pragma once

#include <string>
#include <string_view>

namespace fp8moe {

// Whole file as bytes; "-" reads standard input. Errors name the path.
std::string read_file(const std::string& path);

// Atomically replace `path` with `data`. "-" writes to standard output instead.
void write_file_atomic(const std::string& path, std::string_view data);

}  // namespace fp8moe
