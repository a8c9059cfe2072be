// LinearBf16Gpu (fp8moe/model/linear_gpu.h): the BF16 linear layer through cuBLASLt. Row-major
// [M, K] is column-major [K, M], so in cuBLASLt's terms (column-major D = op(A) op(B)):
//   forward  y^T [N, M]  = (W [N, K] row-major = [K, N] col-major)^T x^T [K, M]   (T, N)
//   dgrad    dx^T [K, M] = W^T [K, N] dy^T [N, M]                                  (N, N)
//   wgrad    dW^T [K, N] += x^T [K, M] (dy^T [N, M])^T                             (N, T), beta 1
// A plan (descriptors + the heuristic's algorithm) is made on the first call of each M and kept:
// a trainer's M is fixed, so this allocates nothing after the first step (capture a graph after
// one eager call).
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <map>
#include <memory>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/model/linear_gpu.h"

namespace fp8moe {
namespace {

#define FM_CHECK_CUBLAS(call)                                                                \
  do {                                                                                       \
    const cublasStatus_t st_ = (call);                                                       \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                                        \
      FM_THROW(ErrorKind::kRuntime, #call " failed: cuBLAS status ", static_cast<int>(st_)); \
  } while (0)

constexpr size_t kWorkspaceBytes = size_t{32} << 20;

struct Matmul {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  float beta = 0.0f;
  Matmul() = default;
  Matmul(const Matmul&) = delete;
  Matmul& operator=(const Matmul&) = delete;
  ~Matmul() {
    cublasLtMatmulDescDestroy(desc);
    cublasLtMatrixLayoutDestroy(a);
    cublasLtMatrixLayoutDestroy(b);
    cublasLtMatrixLayoutDestroy(c);
  }
};

// Column-major D [m, n] = op(A) op(B) + beta D with BF16 A, B and an `out` D, FP32 compute.
void make_matmul(cublasLtHandle_t h, Matmul& mm, cublasOperation_t ta, cublasOperation_t tb,
                 int64_t m, int64_t n, int64_t k, cudaDataType_t out, float beta) {
  FM_CHECK_CUBLAS(cublasLtMatmulDescCreate(&mm.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  FM_CHECK_CUBLAS(
      cublasLtMatmulDescSetAttribute(mm.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
  FM_CHECK_CUBLAS(
      cublasLtMatmulDescSetAttribute(mm.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
  const int64_t ra = ta == CUBLAS_OP_N ? m : k, ca = ta == CUBLAS_OP_N ? k : m;
  const int64_t rb = tb == CUBLAS_OP_N ? k : n, cb = tb == CUBLAS_OP_N ? n : k;
  FM_CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&mm.a, CUDA_R_16BF, ra, ca, ra));
  FM_CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&mm.b, CUDA_R_16BF, rb, cb, rb));
  FM_CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&mm.c, out, m, n, m));
  mm.beta = beta;
  cublasLtMatmulPreference_t pref;
  FM_CHECK_CUBLAS(cublasLtMatmulPreferenceCreate(&pref));
  const size_t ws = kWorkspaceBytes;
  FM_CHECK_CUBLAS(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t st =
      cublasLtMatmulAlgoGetHeuristic(h, mm.desc, mm.a, mm.b, mm.c, mm.c, pref, 1, &result, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  FM_CHECK(st == CUBLAS_STATUS_SUCCESS && found > 0,
           "LinearBf16Gpu: cuBLASLt has no algorithm "
           "for ",
           m, " x ", n, " x ", k, " (status ", static_cast<int>(st), ")");
  mm.algo = result.algo;
}

__global__ void to_bf16_kernel(const float* x, int64_t n, __nv_bfloat16* y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    y[i] = __float2bfloat16_rn(x[i]);
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

}  // namespace

struct LinearBf16Gpu::Plans {
  struct ForM {
    Matmul fwd, dgrad, wgrad;
  };
  std::map<int64_t, std::unique_ptr<ForM>> by_m;
};

LinearBf16Gpu::LinearBf16Gpu(int64_t max_rows, int64_t n, int64_t k)
    : max_rows_(max_rows), n_(n), k_(k), plans_(std::make_unique<Plans>()) {
  FM_CHECK_ARG(max_rows >= 0 && n > 0 && k > 0, "LinearBf16Gpu: shape [", n, ", ", k,
               "], max_rows ", max_rows);
  FM_CHECK_ARG(n % 8 == 0 && k % 8 == 0, "LinearBf16Gpu: N=", n, " and K=", k,
               " must be multiples of 8 (16-byte rows)");
  FM_CHECK_CUDA(cudaMalloc(&w_, static_cast<size_t>(n * k) * sizeof(bf16)));
  FM_CHECK_CUDA(cudaMalloc(&workspace_, kWorkspaceBytes));
  cublasLtHandle_t h = nullptr;
  FM_CHECK_CUBLAS(cublasLtCreate(&h));
  handle_ = h;
}

LinearBf16Gpu::~LinearBf16Gpu() {
  plans_.reset();
  if (handle_ != nullptr) cublasLtDestroy(static_cast<cublasLtHandle_t>(handle_));
  cudaFree(workspace_);
  if (owns_weight_) cudaFree(w_);
}

void LinearBf16Gpu::share_weight(const LinearBf16Gpu& owner) {
  FM_CHECK_ARG(owner.n_ == n_ && owner.k_ == k_, "LinearBf16Gpu::share_weight: the owner's [",
               owner.n_, ", ", owner.k_, "] is not this one's [", n_, ", ", k_, "]");
  FM_CHECK_ARG(&owner != this && owner.owns_weight_,
               "LinearBf16Gpu::share_weight: the owner must hold its own weight");
  if (owns_weight_) FM_CHECK_CUDA(cudaFree(w_));
  w_ = owner.w_;
  owns_weight_ = false;
}

void LinearBf16Gpu::refresh_weight(const float* master, cudaStream_t stream) {
  FM_CHECK_ARG(owns_weight_,
               "LinearBf16Gpu::refresh_weight: this one shares another's weight (refresh that)");
  FM_CHECK_ARG(master != nullptr, "LinearBf16Gpu::refresh_weight: null master weight");
  to_bf16_kernel<<<1024, 256, 0, stream>>>(master, n_ * k_, reinterpret_cast<__nv_bfloat16*>(w_));
  FM_CHECK_LAUNCH();
}

void LinearBf16Gpu::forward(const bf16* x, int64_t m, bf16* y, cudaStream_t stream) {
  constexpr const char* kWhat = "LinearBf16Gpu::forward";
  FM_CHECK_ARG(m >= 0 && m <= max_rows_, kWhat, ": M=", m, " rows (max_rows ", max_rows_, ")");
  FM_CHECK_ARG(m == 0 || (x != nullptr && y != nullptr), kWhat, ": null x or y");
  FM_CHECK_ARG(aligned16(x) && aligned16(y), kWhat, ": x and y must be 16-byte aligned");
  m_ = m;
  x_ = x;
  if (m == 0) return;
  auto& slot = plans_->by_m[m];
  if (!slot) {
    slot = std::make_unique<Plans::ForM>();
    const auto h = static_cast<cublasLtHandle_t>(handle_);
    make_matmul(h, slot->fwd, CUBLAS_OP_T, CUBLAS_OP_N, n_, m, k_, CUDA_R_16BF, 0.0f);
    make_matmul(h, slot->dgrad, CUBLAS_OP_N, CUBLAS_OP_N, k_, m, n_, CUDA_R_16BF, 0.0f);
    make_matmul(h, slot->wgrad, CUBLAS_OP_N, CUBLAS_OP_T, k_, n_, m, CUDA_R_32F, 1.0f);
  }
  const float alpha = 1.0f;
  const Matmul& mm = slot->fwd;
  FM_CHECK_CUBLAS(cublasLtMatmul(static_cast<cublasLtHandle_t>(handle_), mm.desc, &alpha, w_, mm.a,
                                 x, mm.b, &mm.beta, y, mm.c, y, mm.c, &mm.algo, workspace_,
                                 kWorkspaceBytes, stream));
}

void LinearBf16Gpu::backward(const bf16* dy, bf16* dx, float* dw, cudaStream_t stream,
                             kernels::WgradOutput dw_output) {
  constexpr const char* kWhat = "LinearBf16Gpu::backward";
  FM_CHECK_ARG(m_ >= 0, kWhat, ": no forward to take the gradient of");
  FM_CHECK_ARG(dw != nullptr, kWhat, ": null dw");
  const bool overwrite = dw_output == kernels::WgradOutput::kOverwrite;
  if (m_ == 0) {  // no tokens: an overwritten gradient is zeros
    if (overwrite) FM_CHECK_CUDA(cudaMemsetAsync(dw, 0, static_cast<size_t>(n_ * k_) * 4, stream));
    return;
  }
  FM_CHECK_ARG(dy != nullptr, kWhat, ": null dy");
  FM_CHECK_ARG(aligned16(dy) && aligned16(dx) && aligned16(dw), kWhat,
               ": dy, dx and dw must be 16-byte aligned");
  const auto h = static_cast<cublasLtHandle_t>(handle_);
  const Plans::ForM& plan = *plans_->by_m.at(m_);
  const float alpha = 1.0f;
  if (dx != nullptr)
    FM_CHECK_CUBLAS(cublasLtMatmul(h, plan.dgrad.desc, &alpha, w_, plan.dgrad.a, dy, plan.dgrad.b,
                                   &plan.dgrad.beta, dx, plan.dgrad.c, dx, plan.dgrad.c,
                                   &plan.dgrad.algo, workspace_, kWorkspaceBytes, stream));
  const float zero = 0.0f;
  FM_CHECK_CUBLAS(cublasLtMatmul(h, plan.wgrad.desc, &alpha, x_, plan.wgrad.a, dy, plan.wgrad.b,
                                 overwrite ? &zero : &plan.wgrad.beta, dw, plan.wgrad.c, dw,
                                 plan.wgrad.c, &plan.wgrad.algo, workspace_, kWorkspaceBytes,
                                 stream));
}

}  // namespace fp8moe
