// cudaStream_t for headers whose CPU references are built without the CUDA toolkit: the CUDA
// runtime's own declaration where its header is on the include path, else the same type declared
// here (CUDA declares it as `typedef struct CUstream_st* cudaStream_t`), so that a CPU-only build
// (FP8MOE_ENABLE_CUDA=OFF, or no nvcc) compiles the references beside the GPU API's declarations.
#pragma once

#if __has_include(<cuda_runtime.h>)
#include <cuda_runtime.h>
#else
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;
#endif
