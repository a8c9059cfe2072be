// A small strided tensor view (non-owning) and an owning host buffer. Views carry where their
// memory lives so that a CPU routine handed device memory fails loudly instead of crashing.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <span>
#include <string>

#include "fp8moe/core/error.h"

namespace fp8moe {

enum class Device { kCpu, kCuda };

template <typename T, int kRank>
class TensorView {
  static_assert(kRank >= 1 && kRank <= 4, "TensorView supports rank 1..4");

 public:
  using Shape = std::array<int64_t, kRank>;

  TensorView() = default;
  // Contiguous row-major view.
  TensorView(T* data, Shape shape, Device device = Device::kCpu)
      : data_(data), shape_(shape), device_(device) {
    int64_t stride = 1;
    for (int d = kRank - 1; d >= 0; --d) {
      FM_CHECK_ARG(shape[d] >= 0, "negative extent ", shape[d], " in dimension ", d);
      strides_[d] = stride;
      stride *= shape[d];
    }
  }
  TensorView(T* data, Shape shape, Shape strides, Device device = Device::kCpu)
      : data_(data), shape_(shape), strides_(strides), device_(device) {}

  T* data() const { return data_; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  int64_t size(int d) const { return shape_[d]; }
  int64_t stride(int d) const { return strides_[d]; }
  Device device() const { return device_; }
  int64_t numel() const {
    int64_t n = 1;
    for (auto s : shape_) n *= s;
    return n;
  }
  bool is_contiguous() const {
    int64_t stride = 1;
    for (int d = kRank - 1; d >= 0; --d) {
      if (shape_[d] != 1 && strides_[d] != stride) return false;
      stride *= shape_[d];
    }
    return true;
  }

  template <typename... Idx>
  T& operator()(Idx... idx) const {
    static_assert(sizeof...(Idx) == kRank, "wrong number of indices");
    const std::array<int64_t, kRank> i{static_cast<int64_t>(idx)...};
    int64_t off = 0;
    for (int d = 0; d < kRank; ++d) off += i[d] * strides_[d];
    return data_[off];
  }

  std::string shape_string() const {
    std::string s = "[";
    for (int d = 0; d < kRank; ++d) s += (d ? "," : "") + std::to_string(shape_[d]);
    return s + "]";
  }

 private:
  T* data_ = nullptr;
  Shape shape_{};
  Shape strides_{};
  Device device_ = Device::kCpu;
};

template <typename T>
using MatrixView = TensorView<T, 2>;

// Owning, 64-byte aligned host buffer. Move-only. Device buffers live with the CUDA code
// (fp8moe/kernels/device_buffer.h) so that this header never needs the CUDA toolkit.
template <typename T>
class HostBuffer {
 public:
  HostBuffer() = default;
  explicit HostBuffer(size_t n) : size_(n) {
    if (n == 0) return;
    const size_t bytes = ((n * sizeof(T) + 63) / 64) * 64;
    data_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    if (!data_) throw std::bad_alloc();
  }
  HostBuffer(size_t n, T fill) : HostBuffer(n) {
    for (size_t i = 0; i < n; ++i) data_.get()[i] = fill;
  }
  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  size_t size() const { return size_; }
  T& operator[](size_t i) { return data_.get()[i]; }
  const T& operator[](size_t i) const { return data_.get()[i]; }
  std::span<T> span() { return {data_.get(), size_}; }
  std::span<const T> span() const { return {data_.get(), size_}; }
  template <int kRank>
  TensorView<T, kRank> view(std::array<int64_t, kRank> shape) {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    FM_CHECK_ARG(static_cast<size_t>(n) == size_, "view of ", n, " elements over a buffer of ",
                 size_);
    return TensorView<T, kRank>(data_.get(), shape);
  }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
  size_t size_ = 0;
};

}  // namespace fp8moe
