#include "fp8moe/core/file_io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>

#include "fp8moe/core/error.h"

namespace fp8moe {

std::string read_file(const std::string& path) {
  if (path == "-") {
    std::ostringstream s;
    s << std::cin.rdbuf();
    return s.str();
  }
  std::ifstream in(path, std::ios::binary);
  // NOTE: a path that cannot be opened is the caller's mistake (exit 2 at the CLI), unlike a
  // failing read or write of an open file.
  if (!in)
    FM_THROW(ErrorKind::kInvalidArgument, "cannot open '", path,
             "' for reading: ", std::strerror(errno));
  std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) FM_THROW(ErrorKind::kIo, "error while reading '", path, "'");
  return data;
}

namespace {
void write_all(int fd, std::string_view data, const std::string& what) {
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      FM_THROW(ErrorKind::kIo, "write to '", what, "' failed: ", std::strerror(errno));
    }
    done += static_cast<size_t>(n);
  }
}
}  // namespace

void write_file_atomic(const std::string& path, std::string_view data) {
  if (path == "-") {
    std::cout.write(data.data(), static_cast<std::streamsize>(data.size()));
    std::cout.flush();
    return;
  }
  namespace fs = std::filesystem;
  const fs::path target(path);
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  // NOTE: appended piecewise; GCC 12 at -O3 warns (-Wrestrict, a false positive) on a + chain.
  std::string tmp = dir.string();
  tmp.append("/.");
  tmp.append(target.filename().string());
  tmp.append(".tmpXXXXXX");
  const int fd = ::mkstemp(tmp.data());
  if (fd < 0)
    FM_THROW(ErrorKind::kIo, "cannot create a temporary file next to '", path,
             "': ", std::strerror(errno));
  try {
    write_all(fd, data, tmp);
    if (::fsync(fd) != 0)
      FM_THROW(ErrorKind::kIo, "fsync of '", tmp, "' failed: ", std::strerror(errno));
    if (::close(fd) != 0)
      FM_THROW(ErrorKind::kIo, "close of '", tmp, "' failed: ", std::strerror(errno));
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  ::chmod(tmp.c_str(), 0644);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    FM_THROW(ErrorKind::kIo, "cannot rename '", tmp, "' to '", path, "': ", std::strerror(err));
  }
  // Make the rename itself durable.
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace fp8moe
