// Linked into every GPU test executable: without a usable CUDA device the program says so and
// exits with kSkipExitCode, which CTest reports as "skipped" (SKIP_RETURN_CODE in
// tests/CMakeLists.txt), never as passed or failed. scripts/test.sh leaves the "gpu" label out
// on such machines anyway.
// NOTE: not GTEST_SKIP in the environment: gtest 1.12 then reports every test as PASSED.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>

namespace {

constexpr int kSkipExitCode = 77;

class RequireGpu : public ::testing::Environment {
 public:
  void SetUp() override {
    int count = 0;
    const cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess || count == 0) {
      std::printf("no CUDA device (%s): GPU tests skipped\n", cudaGetErrorString(status));
      std::fflush(stdout);
      std::exit(kSkipExitCode);
    }
  }
};

[[maybe_unused]] ::testing::Environment* const require_gpu =
    ::testing::AddGlobalTestEnvironment(new RequireGpu);

}  // namespace
