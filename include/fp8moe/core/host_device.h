// Marks functions usable from both host and CUDA device code. Plain C++ builds see nothing.
#pragma once

#if defined(__CUDACC__)
#define FM_HD __host__ __device__
#define FM_HD_INLINE __host__ __device__ __forceinline__
#else
#define FM_HD
#define FM_HD_INLINE inline
#endif
