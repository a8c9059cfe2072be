# Warnings as errors on our own code only (third-party headers are SYSTEM includes).
# NOTE: -Wno-restrict: GCC 12 at -O3 reports false positives inside libstdc++'s std::string
# concatenation (GCC PR105651); the warning is off until the compiler is fixed.
function(fp8moe_warnings target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Werror -Wno-restrict>
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra,-Werror,-Wno-restrict --Werror all-warnings>)
endfunction()

function(fp8moe_cuda_target target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -lineinfo>)
  set_target_properties(${target} PROPERTIES CUDA_SEPARABLE_COMPILATION OFF)
endfunction()
