// Helpers for the kernels' GPU tests: owning device buffers, copies, poisoning, random inputs.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/fp8/codec.h"

namespace fp8moe::test {

// NOTE: upload, download and poison go through the legacy default stream (cudaMemcpy,
// cudaMemset), which does not order against streams created with cudaStreamNonBlocking; each
// therefore synchronises the whole device (before a download, after an upload or a poison), so that
// a test's kernels on its own stream never race them. Session 19: ExpertFfnGpu's gathered form once
// differed from the contiguous one (same inputs, identical in an earlier run) while the GPU was
// shared with another test process; a poison racing its kernels is the likely cause.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t count) : count_(count) {
    if (count > 0) FM_CHECK_CUDA(cudaMalloc(&ptr_, count * sizeof(T)));
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), count_(o.count_) {
    o.ptr_ = nullptr;
    o.count_ = 0;
  }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  T* get() const { return ptr_; }
  size_t size() const { return count_; }
  void upload(const std::vector<T>& host) {
    FM_CHECK(host.size() == count_, "upload of ", host.size(), " into ", count_);
    if (count_ > 0)
      FM_CHECK_CUDA(cudaMemcpy(ptr_, host.data(), count_ * sizeof(T), cudaMemcpyHostToDevice));
    FM_CHECK_CUDA(cudaDeviceSynchronize());
  }
  std::vector<T> download() const {
    std::vector<T> host(count_);
    FM_CHECK_CUDA(cudaDeviceSynchronize());
    if (count_ > 0)
      FM_CHECK_CUDA(cudaMemcpy(host.data(), ptr_, count_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
  // Fill every byte with `byte` (0xFF: NaN for floats, bf16 and E4M3 alike).
  void poison(int byte = 0xFF) {
    if (count_ > 0) FM_CHECK_CUDA(cudaMemset(ptr_, byte, count_ * sizeof(T)));
    FM_CHECK_CUDA(cudaDeviceSynchronize());
  }

 private:
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

// Random matrix whose rows have magnitudes spread over many binades (so scales differ), with a
// few special rows: all zero, tiny (below FLT_MIN * 448: exercises the scale floor).
inline std::vector<float> random_matrix(int64_t rows, int64_t cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> log_mag(-6.0f, 6.0f);
  std::vector<float> x(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    float mag = std::exp2(log_mag(rng));
    const int64_t kind = r % 23;
    if (kind == 5) mag = 0.0f;
    if (kind == 11) mag = 1e-39f;
    for (int64_t c = 0; c < cols; ++c) {
      // Column blocks with their own magnitude so that 1x128 scales vary along a row too.
      const float block_mag = static_cast<float>(1 + (c / 128 + r) % 5);
      x[r * cols + c] = mag * block_mag * normal(rng);
    }
  }
  return x;
}

inline int test_threads() {
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

inline std::vector<float> bf16_to_float(const std::vector<bf16>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = to_float(v[i]);
  return out;
}

}  // namespace fp8moe::test
