// NCCL all-reductions (fp8moe/comm/nccl_collectives.h).
#include "fp8moe/comm/nccl_collectives.h"

#if defined(FP8MOE_HAVE_NCCL)

#include <nccl.h>

#include "fp8moe/core/error.h"

namespace fp8moe::comm {
namespace {

void all_reduce(void* comm, void* data, int64_t count, ncclDataType_t type, ReduceOp op,
                cudaStream_t stream) {
  FM_CHECK_ARG(comm != nullptr, "nccl_all_reduce: no communicator");
  FM_CHECK_ARG(count >= 0 && (count == 0 || data != nullptr), "nccl_all_reduce: ", count,
               " elements at ", data);
  if (count == 0) return;
  const ncclResult_t r = ncclAllReduce(data, data, static_cast<size_t>(count), type,
                                       op == ReduceOp::kAvg ? ncclAvg : ncclSum,
                                       static_cast<ncclComm_t>(comm), stream);
  if (r != ncclSuccess)
    FM_THROW(ErrorKind::kNccl, "ncclAllReduce of ", count,
             " elements failed: ", ncclGetErrorString(r));
}

void check(ncclResult_t r, const char* what, int64_t count) {
  if (r != ncclSuccess)
    FM_THROW(ErrorKind::kNccl, what, " of ", count, " elements failed: ", ncclGetErrorString(r));
}

}  // namespace

void nccl_reduce_scatter(void* comm, float* data, int64_t share, ReduceOp op, int rank,
                         cudaStream_t stream) {
  FM_CHECK_ARG(comm != nullptr && data != nullptr && share >= 0 && rank >= 0,
               "nccl_reduce_scatter: comm ", comm, ", data ", data, ", share ", share, ", rank ",
               rank);
  if (share == 0) return;
  check(ncclReduceScatter(data, data + rank * share, static_cast<size_t>(share), ncclFloat32,
                          op == ReduceOp::kAvg ? ncclAvg : ncclSum, static_cast<ncclComm_t>(comm),
                          stream),
        "ncclReduceScatter", share);
}

void nccl_all_gather(void* comm, float* data, int64_t share, int rank, cudaStream_t stream) {
  FM_CHECK_ARG(comm != nullptr && data != nullptr && share >= 0 && rank >= 0,
               "nccl_all_gather: comm ", comm, ", data ", data, ", share ", share, ", rank ", rank);
  if (share == 0) return;
  check(ncclAllGather(data + rank * share, data, static_cast<size_t>(share), ncclFloat32,
                      static_cast<ncclComm_t>(comm), stream),
        "ncclAllGather", share);
}

void nccl_all_reduce(void* comm, float* data, int64_t count, ReduceOp op, cudaStream_t stream) {
  all_reduce(comm, data, count, ncclFloat32, op, stream);
}
void nccl_all_reduce(void* comm, double* data, int64_t count, ReduceOp op, cudaStream_t stream) {
  all_reduce(comm, data, count, ncclFloat64, op, stream);
}
void nccl_all_reduce(void* comm, int32_t* data, int64_t count, ReduceOp op, cudaStream_t stream) {
  all_reduce(comm, data, count, ncclInt32, op, stream);
}

}  // namespace fp8moe::comm

#endif  // FP8MOE_HAVE_NCCL
