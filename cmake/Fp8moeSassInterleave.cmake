# FFMA interleave for the sm_90a GEMM kernels: once fp8moe_kernels is archived,
# tools/sass_interleave.cpp sets the yield hint on the promotion FFMAs of the GEMM kernels inside
# the archive, in place (bit flips, same size), so the CUDA runtime loads the patched kernels as
# any others. Measured on the device: dev/gemm/NOTES.md, session 3.
# NOTE: the archive, not the objects: ninja's deps log records each object's time stamp when
# nvcc writes it, and an object changed afterwards is recompiled on every build. The archive is
# rebuilt from the unpatched objects whenever one changes, then patched again (idempotent).
# The tool itself is plain C++ and always built (its self-test runs in CI without CUDA).
option(FP8MOE_GEMM_SASS_INTERLEAVE "Set the FFMA yield hints of the GEMM kernels after compiling" OFF)
set(FP8MOE_GEMM_SASS_INTERLEAVE_MODE "all" CACHE STRING "sass_interleave --mode: all, head or none")

add_executable(fp8moe_sass_interleave ${PROJECT_SOURCE_DIR}/tools/sass_interleave.cpp)
fp8moe_warnings(fp8moe_sass_interleave)
target_compile_features(fp8moe_sass_interleave PRIVATE cxx_std_20)

if(FP8MOE_HAVE_CUDA AND FP8MOE_GEMM_SASS_INTERLEAVE AND TARGET fp8moe_kernels)
  set(fp8moe_gemm_cu ${CMAKE_CURRENT_SOURCE_DIR}/kernels/sm90_fp8_gemm_1d2d.cu
                     ${CMAKE_CURRENT_SOURCE_DIR}/kernels/sm90_fp8_gemm_1d1d.cu)
  # NOTE: the tool reads the cubin inside the object's fatbin; a compressed fatbin has none
  # readable (nvcc 13.0 leaves these uncompressed by default; this keeps it so).
  set_source_files_properties(${fp8moe_gemm_cu} PROPERTIES COMPILE_OPTIONS "--no-compress")
  add_dependencies(fp8moe_kernels fp8moe_sass_interleave)
  add_custom_command(TARGET fp8moe_kernels POST_BUILD
    COMMAND $<TARGET_FILE:fp8moe_sass_interleave> --mode ${FP8MOE_GEMM_SASS_INTERLEAVE_MODE}
            $<TARGET_FILE:fp8moe_kernels>
    VERBATIM
    COMMENT "sass_interleave (${FP8MOE_GEMM_SASS_INTERLEAVE_MODE}): FFMA yield hints of the GEMM kernels")
  message(STATUS "fp8moe: GEMM kernels get the FFMA interleave (mode ${FP8MOE_GEMM_SASS_INTERLEAVE_MODE})")
endif()
