// How the multi-GPU benchmarks time a region on several ranks at once. Each rank's stream first
// runs a gate kernel that spins on a mapped host flag, then records its start event; the caller
// enqueues the work; the ranks record their end events; only then does the host open the gate.
// So every rank starts together, however long the host took to enqueue, and the region's time
// is the slowest rank's interval. Included by one translation unit per program (bench/gpu/*.cu).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "fp8moe/core/cuda_check.h"

namespace fp8moe::bench {

__global__ void k_gate(const volatile int* flag, int value) {
  while (*flag < value) {
  }
}

// A rank's timing resources on its (current) device: a non-blocking stream and the two events
// gated_slowest_us records on it.
template <class Rank>
void create_timed_stream(Rank& r) {
  FM_CHECK_CUDA(cudaStreamCreateWithFlags(&r.stream, cudaStreamNonBlocking));
  FM_CHECK_CUDA(cudaEventCreate(&r.start));
  FM_CHECK_CUDA(cudaEventCreate(&r.end));
}

// The flag the gate kernels spin on: mapped, portable (every device polls it), starting at 0.
inline int* alloc_gate_flag() {
  int* flag = nullptr;
  FM_CHECK_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&flag), sizeof(int),
                              cudaHostAllocMapped | cudaHostAllocPortable));
  *flag = 0;
  return flag;
}

// One gated region over `ranks` (elements with device, stream, start, end); µs of the slowest
// rank. gate = false under a profiler, which serialises kernels so that a gate would never open.
template <class Rank>
double gated_slowest_us(std::vector<Rank>& ranks, int* gate_flag, int& gate_value, bool gate,
                        const std::function<void()>& enqueue) {
  ++gate_value;
  for (auto& r : ranks) {
    FM_CHECK_CUDA(cudaSetDevice(r.device));
    if (gate) {
      k_gate<<<1, 1, 0, r.stream>>>(gate_flag, gate_value);
      FM_CHECK_LAUNCH();
    }
    FM_CHECK_CUDA(cudaEventRecord(r.start, r.stream));
  }
  enqueue();
  for (auto& r : ranks) {
    FM_CHECK_CUDA(cudaSetDevice(r.device));
    FM_CHECK_CUDA(cudaEventRecord(r.end, r.stream));
  }
  __atomic_store_n(gate_flag, gate_value, __ATOMIC_RELEASE);
  double worst = 0;
  for (auto& r : ranks) {
    FM_CHECK_CUDA(cudaSetDevice(r.device));
    FM_CHECK_CUDA(cudaEventSynchronize(r.end));
    float ms = 0;
    FM_CHECK_CUDA(cudaEventElapsedTime(&ms, r.start, r.end));
    worst = std::max(worst, 1000.0 * ms);
  }
  return worst;
}

}  // namespace fp8moe::bench
