# NCCL (optional): the comm module's NCCL wire and the EP benchmark's anchor. Looked for under
# FP8MOE_NCCL_ROOT (e.g. the Python package nvidia.nccl: <site-packages>/nvidia/nccl) and then in
# the CUDA toolkit. Without it the NCCL wire is not built (FP8MOE_HAVE_NCCL stays OFF).
set(FP8MOE_NCCL_ROOT "" CACHE PATH "Folder with include/nccl.h and lib/libnccl.so[.2]")
set(FP8MOE_HAVE_NCCL OFF)
if(FP8MOE_HAVE_CUDA)
  find_path(FP8MOE_NCCL_INCLUDE_DIR nccl.h
            HINTS ${FP8MOE_NCCL_ROOT}/include ${CUDAToolkit_INCLUDE_DIRS})
  find_library(FP8MOE_NCCL_LIBRARY NAMES nccl libnccl.so.2
               HINTS ${FP8MOE_NCCL_ROOT}/lib ${CUDAToolkit_LIBRARY_DIR} ${CUDAToolkit_LIBRARY_ROOT}/lib)
  if(FP8MOE_NCCL_INCLUDE_DIR AND FP8MOE_NCCL_LIBRARY)
    add_library(fp8moe_nccl INTERFACE)
    target_include_directories(fp8moe_nccl SYSTEM INTERFACE ${FP8MOE_NCCL_INCLUDE_DIR})
    target_link_libraries(fp8moe_nccl INTERFACE ${FP8MOE_NCCL_LIBRARY})
    set(FP8MOE_HAVE_NCCL ON)
    message(STATUS "fp8moe: NCCL ${FP8MOE_NCCL_LIBRARY} (headers ${FP8MOE_NCCL_INCLUDE_DIR})")
  else()
    message(STATUS "fp8moe: NCCL not found (set FP8MOE_NCCL_ROOT): no NCCL wire")
  endif()
endif()
