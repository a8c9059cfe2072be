// All-reductions, reduce-scatters and all-gathers over an NCCL communicator (one from
// nccl_bootstrap.h), for data parallelism: the GPU trainer averages the replicated tensors'
// gradients and sums the expert loads, losses and grad-norm partials of its ranks. Stream-ordered
// and capturable in a CUDA graph (NCCL's own rules: every rank enqueues the same calls in the same
// order). The communicator is a void* so that callers need no NCCL header; errors throw kNccl
// naming the call and NCCL's reason. Only in builds with NCCL (FP8MOE_HAVE_NCCL). Tested in
// tests/train/trainer_gpu_parallel_test.cu.
#pragma once

#if defined(FP8MOE_HAVE_NCCL)

#include <cuda_runtime.h>

#include <cstdint>

namespace fp8moe::comm {

enum class ReduceOp { kSum, kAvg };

// In place over `count` elements of `data` (device memory of the communicator's device).
void nccl_all_reduce(void* comm, float* data, int64_t count, ReduceOp op, cudaStream_t stream);
void nccl_all_reduce(void* comm, double* data, int64_t count, ReduceOp op, cudaStream_t stream);
void nccl_all_reduce(void* comm, int32_t* data, int64_t count, ReduceOp op, cudaStream_t stream);
// In place over data[0, ranks * share): rank r's data[r * share, (r + 1) * share) becomes the
// reduction of every rank's (the rest of its buffer is left unspecified).
void nccl_reduce_scatter(void* comm, float* data, int64_t share, ReduceOp op, int rank,
                         cudaStream_t stream);
// In place over data[0, ranks * share): every rank's data[r * share, (r + 1) * share) becomes
// rank r's.
void nccl_all_gather(void* comm, float* data, int64_t share, int rank, cudaStream_t stream);

}  // namespace fp8moe::comm

#endif  // FP8MOE_HAVE_NCCL
