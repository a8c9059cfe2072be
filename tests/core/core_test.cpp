#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "fp8moe/core/dtypes.h"
#include "fp8moe/core/error.h"
#include "fp8moe/core/file_io.h"
#include "fp8moe/core/json.h"
#include "fp8moe/core/tensor.h"

namespace fp8moe {
namespace {

namespace fs = std::filesystem;

fs::path temp_dir() {
  fs::path dir = fs::temp_directory_path() / ("fp8moe_core_test_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  return dir;
}

TEST(Error, CarriesKindMessageAndLocation) {
  try {
    const int k = 100;
    FM_CHECK_ARG(k % 128 == 0, "K=", k, " is not a multiple of 128");
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
    EXPECT_EQ(e.message(), "K=100 is not a multiple of 128");
    EXPECT_NE(std::string(e.what()).find("core_test.cpp"), std::string::npos);
  }
  EXPECT_THROW(FM_CHECK(1 + 1 == 3, "arithmetic"), Error);
}

TEST(FileIo, AtomicWriteReplacesAndReadsBack) {
  const fs::path p = temp_dir() / "a.txt";
  write_file_atomic(p.string(), "first");
  EXPECT_EQ(read_file(p.string()), "first");
  write_file_atomic(p.string(), std::string(100000, 'x'));
  EXPECT_EQ(read_file(p.string()).size(), 100000u);
  // No temporary files are left behind.
  int entries = 0;
  for (const auto& e : fs::directory_iterator(p.parent_path())) entries += e.path() == p ? 0 : 1;
  EXPECT_EQ(entries, 0);
  fs::remove_all(p.parent_path());
}

TEST(FileIo, FailedWriteLeavesNothingAndNamesThePath) {
  try {
    write_file_atomic("/nonexistent-dir-fp8moe/x.json", "data");
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kIo);
    EXPECT_NE(e.message().find("/nonexistent-dir-fp8moe"), std::string::npos);
  }
  try {
    read_file("/nonexistent-dir-fp8moe/y.json");
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("y.json"), std::string::npos);
  }
}

TEST(Json, StrictKeysAndTypedAccessNameTheProblem) {
  const Json j = parse_json(R"({"a": 1, "b": "x", "typo": 3})", "test");
  try {
    check_known_keys(j, {"a", "b"}, "config");
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("'typo'"), std::string::npos);
  }
  EXPECT_EQ(json_get<int>(j, "a", "config"), 1);
  EXPECT_EQ(json_get_or<int>(j, "missing", 7, "config"), 7);
  EXPECT_THROW(json_get<int>(j, "b", "config"), Error);
  EXPECT_THROW(json_get<int>(j, "missing", "config"), Error);
  try {
    parse_json("{not json", "'bad.json'");
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kFormat);
    EXPECT_NE(e.message().find("bad.json"), std::string::npos);
  }
}

TEST(Tensor, ViewsIndexRowMajorAndStrided) {
  HostBuffer<float> buf(6);
  for (int i = 0; i < 6; ++i) buf[i] = static_cast<float>(i);
  auto v = buf.view<2>({2, 3});
  EXPECT_EQ(v(1, 2), 5.0f);
  EXPECT_TRUE(v.is_contiguous());
  EXPECT_EQ(v.shape_string(), "[2,3]");
  TensorView<float, 2> t(buf.data(), {3, 2}, {1, 3});  // transpose
  EXPECT_EQ(t(2, 1), 5.0f);
  EXPECT_FALSE(t.is_contiguous());
  EXPECT_THROW(buf.view<2>({4, 2}), Error);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(buf.data()) % 64, 0u);
}

TEST(Dtypes, SizesAndNames) {
  EXPECT_EQ(dtype_size(DType::kBF16), 2);
  EXPECT_EQ(dtype_size(DType::kE4M3), 1);
  EXPECT_STREQ(dtype_name(DType::kE5M2), "e5m2");
}

}  // namespace
}  // namespace fp8moe
