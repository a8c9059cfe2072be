// FP8 GEMM benchmark: ours (dense, grouped contiguous (materialised and gathered), grouped masked,
// wgrad, k-grouped wgrad)
// against cuBLASLt in the same run: FP8 with block scaling (activations VEC128_32F, weights
// BLK128x128_32F), FP8 per-tensor, BF16. Median of CUDA-graph replays, inputs rotated over
// enough copies that L2 (50 MB) cannot hold them; ours and cuBLASLt blockwise timed in
// alternation (dense). One JSON object per line (--out), one table line per shape on stdout.
// Run: build-device/bench/gemm_bench --out gemm.jsonl
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <dlfcn.h>
#include <algorithm>
#include <array>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/json.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/fp8/gemm_reference.h"
#include "fp8moe/fp8/quantize.h"
#include "fp8moe/kernels/fp8_gemm.h"
#include "fp8moe/kernels/quantize.h"
#include "fp8moe/kernels/scale_layout.h"
#include "fp8moe/kernels/sm90_gemm_heuristic.h"

namespace {

using namespace fp8moe;
using kernels::ScaleLayout;

#define CHECK_CUBLAS(call)                                                            \
  do {                                                                                \
    cublasStatus_t st_ = (call);                                                      \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                                 \
      FM_THROW(ErrorKind::kRuntime, #call " failed: status ", static_cast<int>(st_)); \
  } while (0)

constexpr int64_t kL2Bytes = 50ll << 20;

// SM clock and board power through NVML, loaded at run time (the binary carries no link to it):
// the clocks follow the recent load by 5-15% (dev/gemm/NOTES.md v9-v14), so each timing records
// what the GPU ran at. Sampled after each graph replay of a timing; a row gets the median of the
// samples taken since the previous row. Without NVML the fields are left out.
// The median (upper of the two middle values), -1 when x is empty.
double median_or_none(std::vector<double> x) {
  if (x.empty()) return -1.0;
  std::sort(x.begin(), x.end());
  return x[x.size() / 2];
}

class ClockProbe {
 public:
  void open(int cuda_device) {
    void* lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) return;
    using InitFn = int (*)();
    using ByBusFn = int (*)(const char*, void**);
    auto init = reinterpret_cast<InitFn>(dlsym(lib, "nvmlInit_v2"));
    auto by_bus = reinterpret_cast<ByBusFn>(dlsym(lib, "nvmlDeviceGetHandleByPciBusId_v2"));
    clock_ = reinterpret_cast<ClockFn>(dlsym(lib, "nvmlDeviceGetClockInfo"));
    power_ = reinterpret_cast<PowerFn>(dlsym(lib, "nvmlDeviceGetPowerUsage"));
    char bus[32] = {};
    if (!init || !by_bus || !clock_ || !power_ || init() != 0 ||
        cudaDeviceGetPCIBusId(bus, sizeof bus, cuda_device) != cudaSuccess ||
        by_bus(bus, &dev_) != 0)
      dev_ = nullptr;
  }
  bool ok() const { return dev_ != nullptr; }
  void sample() {
    if (!ok()) return;
    unsigned mhz = 0, mw = 0;
    if (clock_(dev_, 1 /* NVML_CLOCK_SM */, &mhz) == 0) mhz_.push_back(mhz);
    if (power_(dev_, &mw) == 0) watts_.push_back(mw / 1000.0);
  }
  // Medians since the last take (negative when nothing was sampled).
  std::pair<double, double> take() {
    const std::pair<double, double> r{median_or_none(mhz_), median_or_none(watts_)};
    mhz_.clear();
    watts_.clear();
    return r;
  }

 private:
  using ClockFn = int (*)(void*, int, unsigned*);
  using PowerFn = int (*)(void*, unsigned*);
  void* dev_ = nullptr;
  ClockFn clock_ = nullptr;
  PowerFn power_ = nullptr;
  std::vector<double> mhz_, watts_;
};
ClockProbe g_clock;

// The clock and power medians of the timing just taken, appended to a row's samples (nothing when
// the probe is off).
void keep_clock_sample(std::vector<double>& mhz, std::vector<double>& watts) {
  const auto [f, w] = g_clock.take();
  if (f > 0) {
    mhz.push_back(f);
    watts.push_back(w);
  }
}

template <typename T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  Dev() = default;
  explicit Dev(size_t count) : n(count) {
    if (count) FM_CHECK_CUDA(cudaMalloc(&p, count * sizeof(T)));
  }
  Dev(Dev&& o) noexcept : p(o.p), n(o.n) { o.p = nullptr; }
  Dev& operator=(Dev&& o) noexcept {
    std::swap(p, o.p);
    std::swap(n, o.n);
    return *this;
  }
  Dev(const Dev&) = delete;
  ~Dev() {
    if (p) cudaFree(p);
  }
  std::vector<T> download() const {
    std::vector<T> h(n);
    FM_CHECK_CUDA(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
};

// Random values spread over a few binades, per row magnitude: realistic scales, no zeros.
__global__ void fill_random(float* x, int64_t count, int64_t cols, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    uint64_t h = (uint64_t(i) + seed * 0x9E3779B97F4A7C15ull) * 0xBF58476D1CE4E5B9ull;
    h ^= h >> 31;
    h *= 0x94D049BB133111EBull;
    h ^= h >> 29;
    const float u = float(h & 0xFFFFFF) / float(1 << 24) * 2.0f - 1.0f;
    const int64_t row = i / cols;
    const float mag = exp2f(float(int((row * 2654435761ull + seed) % 9)) - 4.0f);
    x[i] = u * mag;
  }
}
__global__ void to_bf16_kernel(const float* x, __nv_bfloat16* y, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x)
    y[i] = __float2bfloat16_rn(x[i]);
}

Dev<float> random_floats(int64_t rows, int64_t cols, uint64_t seed) {
  Dev<float> x(size_t(rows * cols));
  fill_random<<<1024, 256>>>(x.p, rows * cols, cols, seed);
  FM_CHECK_LAUNCH();
  return x;
}

// One operand set: A [rows_a, K] 1x128 (M-major scales), B [rows_b, K] 128x128 per group.
struct Fp8Set {
  Dev<uint8_t> a, b;
  Dev<float> sa, sb;
};
Fp8Set make_fp8_set(int64_t rows_a, int64_t n, int64_t k, int64_t groups, uint64_t seed,
                    bool b_1x128 = false) {
  Fp8Set s;
  {
    Dev<float> xa = random_floats(rows_a, k, seed);
    s.a = Dev<uint8_t>(size_t(rows_a * k));
    s.sa = Dev<float>(size_t((k / 128) * padded_rows(rows_a)));
    kernels::quantize_1x128(xa.p, rows_a, k, k, false, s.a.p, k, s.sa.p, ScaleLayout::kMnMajor,
                            nullptr);
  }
  const int64_t nb = (n + 127) / 128, kb = k / 128;
  s.b = Dev<uint8_t>(size_t(groups * n * k));
  if (b_1x128) {
    Dev<float> xb = random_floats(n, k, seed + 7);
    s.sb = Dev<float>(size_t(kb * padded_rows(n)));
    kernels::quantize_1x128(xb.p, n, k, k, false, s.b.p, k, s.sb.p, ScaleLayout::kMnMajor, nullptr);
  } else {
    s.sb = Dev<float>(size_t(groups * nb * kb));
    for (int64_t g = 0; g < groups; ++g) {
      Dev<float> xb = random_floats(n, k, seed + 7 + g);
      kernels::quantize_128x128(xb.p, n, k, k, false, s.b.p + g * n * k, k, s.sb.p + g * nb * kb,
                                nullptr);
    }
  }
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  return s;
}

// The pdl setting that is not the default (GemmTileConfig::pdl: 1 off, 2 on): the bench times
// the picks both ways.
int pdl_other() {
  return kernels::kGemmDefaultPdl == 2 ? 1 : 2;
}

int sets_for(int64_t bytes_per_set) {
  return int(std::clamp<int64_t>(
      (3 * kL2Bytes + bytes_per_set - 1) / std::max<int64_t>(bytes_per_set, 1), 1, 8));
}

// FP8MOE_BENCH_FLUSH_L2=1: time_us times single launches, each right after a 256 MB memset of a
// scratch buffer (L2 flushed, the GPU busy with a memory-bound kernel in between), with events
// around the launch alone (256 MB: the L2 flush of DeepGEMM's `bench`). FP8MOE_BENCH_FLUSH_L2=<MB>
// (>= 2) sets the memset's size: DeepGEMM's `bench_kineto`, where ANCHORS.md's DeepGEMM figures
// come from, clears 8000 MB before every call (~2.7 ms of memory-bound work on an H100 per ~0.2 ms
// GEMM: the GPU stays well under its 700 W cap; dev/gemm/NOTES.md session 8, gemm13). Not the
// default: back-to-back graph replays keep the GPU at its power limit the whole time.
size_t flush_l2_mb() {
  static const size_t mb = [] {
    const char* e = std::getenv("FP8MOE_BENCH_FLUSH_L2");
    if (e == nullptr) return size_t(0);
    const long v = std::atol(e);
    return v == 1 ? size_t(256) : size_t(std::max(v, 0L));
  }();
  return mb;
}

bool flush_l2_mode() {
  return flush_l2_mb() > 0;
}

// NOTE: warm up for >= 30 ms of back-to-back launches: after the CPU reference checks the GPU
// sits idle and its clocks need time to come back (v2 saw 15-25% between two timings of one
// configuration in one process).
void warm_up(cudaStream_t stream, int sets, const std::function<void(int)>& launch) {
  const auto warm_start = std::chrono::steady_clock::now();
  for (int i = 0;
       std::chrono::steady_clock::now() - warm_start < std::chrono::milliseconds(30) || i < sets;
       ++i) {
    launch(i % sets);
    if (i % 8 == 7) FM_CHECK_CUDA(cudaStreamSynchronize(stream));
  }
  FM_CHECK_CUDA(cudaStreamSynchronize(stream));
}

double time_us_flushed(cudaStream_t stream, int sets, const std::function<void(int)>& launch) {
  static Dev<uint8_t> scratch(flush_l2_mb() << 20);
  warm_up(stream, sets, launch);
  cudaEvent_t e0, e1;
  FM_CHECK_CUDA(cudaEventCreate(&e0));
  FM_CHECK_CUDA(cudaEventCreate(&e1));
  std::vector<double> samples;
  for (int i = 0; i < 21; ++i) {
    FM_CHECK_CUDA(cudaMemsetAsync(scratch.p, i & 0xFF, scratch.n, stream));
    FM_CHECK_CUDA(cudaEventRecord(e0, stream));
    launch(i % sets);
    FM_CHECK_CUDA(cudaEventRecord(e1, stream));
    FM_CHECK_CUDA(cudaEventSynchronize(e1));
    float ms = 0;
    FM_CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    samples.push_back(ms * 1000.0);
    g_clock.sample();
  }
  FM_CHECK_CUDA(cudaEventDestroy(e0));
  FM_CHECK_CUDA(cudaEventDestroy(e1));
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2];
}

// Median per-launch time (us) of `launch(set)` replayed from a CUDA graph.
double time_us(cudaStream_t stream, int sets, const std::function<void(int)>& launch) {
  if (flush_l2_mode()) return time_us_flushed(stream, sets, launch);
  warm_up(stream, sets, launch);
  cudaEvent_t e0, e1;
  FM_CHECK_CUDA(cudaEventCreate(&e0));
  FM_CHECK_CUDA(cudaEventCreate(&e1));
  FM_CHECK_CUDA(cudaEventRecord(e0, stream));
  for (int i = 0; i < 3; ++i) launch(i % sets);
  FM_CHECK_CUDA(cudaEventRecord(e1, stream));
  FM_CHECK_CUDA(cudaEventSynchronize(e1));
  float ms = 0;
  FM_CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
  const double first_us = ms * 1000.0 / 3;
  const int reps = int(std::clamp(3000.0 / std::max(first_us, 1.0), 4.0, 400.0));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  FM_CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
  for (int i = 0; i < reps; ++i) launch(i % sets);
  FM_CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
  FM_CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  FM_CHECK_CUDA(cudaGraphLaunch(exec, stream));
  std::vector<double> samples;
  for (int r = 0; r < 7; ++r) {
    FM_CHECK_CUDA(cudaEventRecord(e0, stream));
    FM_CHECK_CUDA(cudaGraphLaunch(exec, stream));
    FM_CHECK_CUDA(cudaEventRecord(e1, stream));
    FM_CHECK_CUDA(cudaEventSynchronize(e1));
    FM_CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    samples.push_back(ms * 1000.0 / reps);
    g_clock.sample();
  }
  FM_CHECK_CUDA(cudaGraphExecDestroy(exec));
  FM_CHECK_CUDA(cudaGraphDestroy(graph));
  FM_CHECK_CUDA(cudaEventDestroy(e0));
  FM_CHECK_CUDA(cudaEventDestroy(e1));
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2];
}

// ---- cuBLASLt anchors ----
enum class Anchor { kBf16, kFp8Tensor, kFp8Blockwise };
const char* anchor_name(Anchor a) {
  switch (a) {
    case Anchor::kBf16:
      return "cublaslt_bf16";
    case Anchor::kFp8Tensor:
      return "cublaslt_fp8_tensor";
    case Anchor::kFp8Blockwise:
      return "cublaslt_fp8_blockwise";
  }
  return "?";
}

struct Lt {
  cublasLtHandle_t handle = nullptr;
  Dev<uint8_t> workspace{size_t(64) << 20};
  Lt() { CHECK_CUBLAS(cublasLtCreate(&handle)); }
  ~Lt() { cublasLtDestroy(handle); }
};

// D[M,N] row-major = A[M,K] * B[N,K]^T, i.e. column-major D^T[N,M] = op(B)=T [N,K] x A^T [K,M].
struct LtPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, ld = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool ok = false;
  std::string why;
  LtPlan() = default;
  LtPlan(const LtPlan&) = delete;
  LtPlan& operator=(const LtPlan&) = delete;
  ~LtPlan() {
    if (desc) cublasLtMatmulDescDestroy(desc);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (ld) cublasLtMatrixLayoutDestroy(ld);
  }
};

// D^T = op(A)=T x B in cuBLASLt's column-major terms (see LtPlan).
void set_transposes(LtPlan& plan) {
  const cublasOperation_t t = CUBLAS_OP_T, nn = CUBLAS_OP_N;
  CHECK_CUBLAS(
      cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof(t)));
  CHECK_CUBLAS(
      cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &nn, sizeof(nn)));
}

// cuBLASLt's first heuristic pick for the plan's descriptor and layouts (D in place of C), or
// plan.why when it has none.
void find_algorithm(Lt& lt, LtPlan& plan) {
  cublasLtMatmulPreference_t pref;
  CHECK_CUBLAS(cublasLtMatmulPreferenceCreate(&pref));
  const size_t ws = lt.workspace.n;
  CHECK_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                    &ws, sizeof(ws)));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(
      lt.handle, plan.desc, plan.la, plan.lb, plan.ld, plan.ld, pref, 1, &result, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (st != CUBLAS_STATUS_SUCCESS || found == 0) {
    plan.why = "no algorithm (status " + std::to_string(static_cast<int>(st)) + ")";
    return;
  }
  plan.algo = result.algo;
  plan.ok = true;
}

void make_plan(Lt& lt, LtPlan& plan, Anchor anchor, int64_t m, int64_t n, int64_t k,
               const void* scale_w, const void* scale_x) {
  const bool fp8 = anchor != Anchor::kBf16;
  CHECK_CUBLAS(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  set_transposes(plan);
  if (fp8) {
    CHECK_CUBLAS(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                                                &scale_w, sizeof(scale_w)));
    CHECK_CUBLAS(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                                                &scale_x, sizeof(scale_x)));
  }
  if (anchor == Anchor::kFp8Blockwise) {
    // cuBLAS "A" is our weight matrix B (128x128 blocks), cuBLAS "B" our activations (1x128).
    const int32_t mode_w = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
    const int32_t mode_x = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    CHECK_CUBLAS(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE,
                                                &mode_w, sizeof(mode_w)));
    CHECK_CUBLAS(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
                                                &mode_x, sizeof(mode_x)));
  }
  const cudaDataType_t in = fp8 ? CUDA_R_8F_E4M3 : CUDA_R_16BF;
  CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&plan.la, in, k, n, k));
  CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&plan.lb, in, k, m, k));
  CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&plan.ld, CUDA_R_16BF, n, m, n));
  find_algorithm(lt, plan);
}

void run_plan(Lt& lt, const LtPlan& plan, const void* w, const void* x, void* d, cudaStream_t s) {
  const float alpha = 1.0f, beta = 0.0f;
  CHECK_CUBLAS(cublasLtMatmul(lt.handle, plan.desc, &alpha, w, plan.la, x, plan.lb, &beta, d,
                              plan.ld, d, plan.ld, &plan.algo, lt.workspace.p, lt.workspace.n, s));
}

// cuBLASLt wants the 128x128 scales with the N-block index fastest, [KB][NB] (unpadded: v1 padded
// NB to 4 and disagreed with our result at N = 2112); ours are [NB][KB].
__global__ void transpose_block_scales(const float* sb, float* out, int64_t nb, int64_t kb) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= kb * nb) return;
  out[i] = sb[(i % nb) * kb + i / nb];
}
// B's scales `sb` of an N x K operand, rearranged for cuBLASLt blockwise.
Dev<float> lt_block_scales(const Dev<float>& sb, int64_t n, int64_t k) {
  const int64_t nb = (n + 127) / 128, kb = k / 128;
  Dev<float> out(size_t(kb * nb));
  transpose_block_scales<<<unsigned((kb * nb + 255) / 256), 256>>>(sb.p, out.p, nb, kb);
  FM_CHECK_LAUNCH();
  return out;
}

// ---- output ----
struct Row {
  Row(std::string kind_, std::string impl_, std::string tile_, int64_t m_, int64_t n_, int64_t k_,
      int64_t groups_, double us_, double tflops_, double gbps_)
      : kind(std::move(kind_)),
        impl(std::move(impl_)),
        tile(std::move(tile_)),
        m(m_),
        n(n_),
        k(k_),
        groups(groups_),
        us(us_),
        tflops(tflops_),
        gbps(gbps_) {}
  std::string kind, impl, tile;
  std::string anchor;  // the anchor of ratio_blockwise when it is not cuBLASLt blockwise
  int64_t m, n, k, groups;
  double us, tflops, gbps, ratio_blockwise = 0, rel_err = -1, rel_diff_blockwise = -1;
  double us_first = -1;       // the heuristic's first timing, alone, before the alternated ones
  double rel_diff_pick = -1;  // grouped forced rows: output against the heuristic pick's
  // Median SM clock and board power sampled during the timings behind this row (ClockProbe).
  double sm_mhz = -1, power_w = -1;
  std::string note;
};

std::string today() {
  std::time_t t = std::time(nullptr);
  char buf[16];
  std::strftime(buf, sizeof buf, "%Y-%m-%d", std::gmtime(&t));
  return buf;
}

struct Output {
  std::vector<Row> rows;
  std::string gpu, date = today(), commit;
  int num_sms = 0;
  int64_t smem = 0;
  double dram = kernels::kDefaultDramBytesPerS;  // the heuristic's DRAM rate for this device
  std::ofstream file;
  std::string tile_for(kernels::GemmKind kind, int64_t m, int64_t n, int64_t k, int64_t g) const {
    return kernels::describe_tile_config(
        kernels::choose_gemm_tile({kind, m, n, k, g}, num_sms, smem, dram));
  }
  void add(Row r) {
    // Rows of the alternation carry their own clock medians; the others take what was sampled
    // since the previous row.
    const std::pair<double, double> sampled = g_clock.take();
    if (r.sm_mhz <= 0) std::tie(r.sm_mhz, r.power_w) = sampled;
    if (flush_l2_mode()) r.note = r.note.empty() ? "l2flush" : "l2flush, " + r.note;
    rows.push_back(r);
    std::printf("%-20s %-24s m=%-6lld n=%-6lld k=%-6lld g=%-2lld %9.1f us %7.1f TFLOPS %7.1f GB/s",
                r.kind.c_str(), r.impl.c_str(), (long long)r.m, (long long)r.n, (long long)r.k,
                (long long)r.groups, r.us, r.tflops, r.gbps);
    if (r.ratio_blockwise > 0)
      std::printf("  x%.2f vs %s", r.ratio_blockwise,
                  r.anchor.empty() ? "blockwise" : r.anchor.c_str());
    if (r.rel_err >= 0) std::printf("  rel_err %.2e", r.rel_err);
    if (r.rel_diff_blockwise >= 0) std::printf("  diff_vs_cublas %.2e", r.rel_diff_blockwise);
    if (r.rel_diff_pick >= 0) std::printf("  diff_vs_pick %.2e", r.rel_diff_pick);
    if (!r.tile.empty()) std::printf("  [%s]", r.tile.c_str());
    if (!r.note.empty()) std::printf("  (%s)", r.note.c_str());
    if (r.sm_mhz > 0) std::printf("  {%.0f MHz %.0f W}", r.sm_mhz, r.power_w);
    std::printf("\n");
    std::fflush(stdout);
    if (file.is_open()) {
      OrderedJson j;
      j["bench"] = "gemm";
      j["gpu"] = gpu;
      j["gpus"] = 1;
      j["date"] = date;
      j["commit"] = commit;
      j["impl"] = r.impl;
      j["kind"] = r.kind;
      j["m"] = r.m;
      j["n"] = r.n;
      j["k"] = r.k;
      j["groups"] = r.groups;
      j["us"] = r.us;
      j["tflops"] = r.tflops;
      j["gbps"] = r.gbps;
      if (r.ratio_blockwise > 0)
        j[r.anchor.empty() ? "ratio_vs_cublaslt_blockwise" : "ratio_vs_" + r.anchor] =
            r.ratio_blockwise;
      if (!r.anchor.empty()) j["anchor"] = r.anchor;
      if (r.rel_err >= 0) j["rel_err"] = r.rel_err;
      if (r.rel_diff_blockwise >= 0) j["rel_diff_vs_cublaslt_blockwise"] = r.rel_diff_blockwise;
      if (r.us_first >= 0) j["us_first"] = r.us_first;
      if (r.rel_diff_pick >= 0) j["rel_diff_vs_pick"] = r.rel_diff_pick;
      if (!r.tile.empty()) j["tile"] = r.tile;
      if (!r.note.empty()) j["note"] = r.note;
      if (r.sm_mhz > 0) j["sm_mhz"] = r.sm_mhz;
      if (r.power_w > 0) j["power_w"] = r.power_w;
      file << j.dump() << "\n";
      file.flush();
    }
  }
};

double rel_diff(const std::vector<bf16>& x, const std::vector<bf16>& y) {
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double a = to_float(x[i]), b = to_float(y[i]);
    num += (a - b) * (a - b);
    den += b * b;
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

// Relative error of D rows `sample` against the CPU reference (the full B, sampled A rows).
double sampled_rel_err(const Fp8Set& s, int64_t m, int64_t n, int64_t k, const std::vector<bf16>& d,
                       int64_t a_row_offset = 0, int64_t b_group = 0) {
  const int64_t kb = k / 128, nb = (n + 127) / 128, pm = padded_rows(m + a_row_offset);
  std::vector<int64_t> rows;
  for (int64_t i = 0; i < 8 && i < m; ++i) rows.push_back(i * (m - 1) / std::max<int64_t>(7, 1));
  std::sort(rows.begin(), rows.end());
  rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
  const int64_t r = int64_t(rows.size());
  QuantizedMatrix qa;
  qa.rows = r;
  qa.cols = k;
  qa.granularity = ScaleGranularity::k1x128;
  qa.codes.resize(size_t(r * k));
  qa.scales.resize(size_t(r * kb));
  const std::vector<float> sa = s.sa.download();
  for (int64_t i = 0; i < r; ++i) {
    const int64_t row = rows[i] + a_row_offset;
    FM_CHECK_CUDA(
        cudaMemcpy(qa.codes.data() + i * k, s.a.p + row * k, size_t(k), cudaMemcpyDeviceToHost));
    for (int64_t b = 0; b < kb; ++b) qa.scales[i * kb + b] = sa[b * pm + row];
  }
  QuantizedMatrix qb;
  qb.rows = n;
  qb.cols = k;
  qb.granularity = ScaleGranularity::k128x128;
  qb.codes.resize(size_t(n * k));
  FM_CHECK_CUDA(
      cudaMemcpy(qb.codes.data(), s.b.p + b_group * n * k, size_t(n * k), cudaMemcpyDeviceToHost));
  qb.scales.resize(size_t(nb * kb));
  FM_CHECK_CUDA(cudaMemcpy(qb.scales.data(), s.sb.p + b_group * nb * kb, qb.scales.size() * 4,
                           cudaMemcpyDeviceToHost));
  std::vector<float> want(size_t(r * n));
  gemm_fp8_reference(qa.ref(), qb.ref(), want.data(), n, {}, false,
                     int(std::max(1u, std::thread::hardware_concurrency())));
  double num = 0, den = 0;
  for (int64_t i = 0; i < r; ++i)
    for (int64_t c = 0; c < n; ++c) {
      const double g = to_float(d[size_t((rows[i] + a_row_offset) * n + c)]);
      const double w = want[size_t(i * n + c)];
      num += (g - w) * (g - w);
      den += w * w;
    }
  return std::sqrt(num / std::max(den, 1e-30));
}

std::vector<kernels::GemmTileConfig> parse_tile_list(const char* list);

void bench_dense(Output& out, Lt& lt, cudaStream_t stream, int64_t m, int64_t n, int64_t k,
                 uint64_t seed) {
  const double flops = 2.0 * m * n * k;
  const int64_t fp8_bytes = m * k + n * k;
  const int sets = sets_for(fp8_bytes);
  std::vector<Fp8Set> fs;
  for (int i = 0; i < sets; ++i) fs.push_back(make_fp8_set(m, n, k, 1, seed + 100 * i));
  Dev<bf16> d(size_t(m * n)), d_ref(size_t(m * n));
  auto bytes_moved = [&](double in_bytes) { return in_bytes + 2.0 * m * n; };

  // Ours first: the heuristic with a workspace (it may cut the last partial wave's tiles along K,
  // the tail split).
  // At M >= 1024 the large tiles and epilogues, CTA pairs and 256-row tiles, and where the
  // shape has a partial last wave that 128x128 tail splits can take (4096x2112x7168) the tail
  // splits too: all timed in the rotated alternation below with the heuristic's pick and
  // cuBLASLt, so that every row sees the same GPU state (clocks under the power cap move rows
  // by 5-15% with their place in the run: dev/gemm/NOTES.md sessions 2-4).
  // The register-epilogue rows (slower at every M >= 1024 shape on H100 in session 5) and the
  // other slice counts only with FP8MOE_BENCH_ALL set.
  std::vector<kernels::GemmTileConfig> variants;
  const bool all = std::getenv("FP8MOE_BENCH_ALL") != nullptr;
  if (m >= 1024) {
    variants.push_back({128, 128, 0, 0, 2, 1});
    variants.push_back({256, 128, 0, 0, 2, 1});
    variants.push_back({128, 128, 0, 0, 2, 2});
    if (all) {
      variants.push_back({128, 128, 0, 0, 1, 1});
      variants.push_back({256, 128, 0, 0, 1, 1});
      variants.push_back({128, 128, 0, 0, 1, 2});
    }
    // Extra forced rows (parse_tile_list's syntax), e.g. "128x256q" beside 256x128.
    if (const char* list = std::getenv("FP8MOE_BENCH_DENSE_TILES"))
      for (const kernels::GemmTileConfig& c : parse_tile_list(list)) variants.push_back(c);
    const kernels::GemmTileConfig probe{128, 128, 0, 0, 1, 1, 1, 4};
    if (kernels::fp8_gemm_workspace_bytes(m, n, k, &probe) > 0) {
      variants.push_back({128, 128, 0, 0, 2, 1, 1, 4});
      if (all) variants.push_back({128, 128, 0, 0, 1, 1, 1, 4});
      for (int slices : {2, 4, 8}) {
        const kernels::GemmTileConfig wide{256, 128, 0, 0, 2, 1, 1, slices};
        if ((all || slices == 4) && kernels::fp8_gemm_workspace_bytes(m, n, k, &wide) > 0)
          variants.push_back(wide);
      }
    }
  }
  int64_t ws_bytes = kernels::fp8_gemm_workspace_bytes(m, n, k);
  for (const kernels::GemmTileConfig& c : variants)
    ws_bytes = std::max(ws_bytes, kernels::fp8_gemm_workspace_bytes(m, n, k, &c));
  Dev<uint8_t> ws(size_t(std::max<int64_t>(ws_bytes, 256)));
  FM_CHECK_CUDA(cudaMemset(ws.p, 0, ws.n));
  const kernels::GemmWorkspace workspace{ws.p, ws.n};
  const kernels::GemmTileConfig* none = nullptr;
  const auto launch_ours = [&](int i) {
    kernels::fp8_gemm_nt(fs[i].a.p, fs[i].sa.p, fs[i].b.p, fs[i].sb.p, d.p, m, n, k, stream, none,
                         workspace);
  };
  // With a tail split picked, its alternatives join the alternation: the pick without a
  // workspace (no tail split) and every forced tail split.
  const bool tail_pick = kernels::fp8_gemm_workspace_bytes(m, n, k) > 0;
  std::vector<std::pair<Row, std::function<void(int)>>> alts;
  if (tail_pick) {
    alts.emplace_back(Row{"dense", "fp8moe_noworkspace",
                          out.tile_for(kernels::GemmKind::kDense, m, n, k, 1), m, n, k, 1, 0, 0, 0},
                      [&](int i) {
                        kernels::fp8_gemm_nt(fs[i].a.p, fs[i].sa.p, fs[i].b.p, fs[i].sb.p, d.p, m,
                                             n, k, stream);
                      });
  }
  {
    // The heuristic's pick with pdl the other way (GemmTileConfig::pdl).
    kernels::GemmShape shape{kernels::GemmKind::kDense, m, n, k, 1};
    shape.max_split_k = 8;  // fp8_gemm_nt's kHeuristicMaxSplitK (it has a workspace here)
    kernels::GemmTileConfig pick =
        kernels::choose_gemm_tile(shape, out.num_sms, out.smem, out.dram);
    pick.pdl = pdl_other();
    alts.emplace_back(Row{"dense", "fp8moe_pick_pdl" + std::to_string(pick.pdl),
                          kernels::describe_tile_config(pick), m, n, k, 1, 0, 0, 0},
                      [&, pick](int i) {
                        kernels::fp8_gemm_nt(fs[i].a.p, fs[i].sa.p, fs[i].b.p, fs[i].sb.p, d.p, m,
                                             n, k, stream, &pick, workspace);
                      });
  }
  {
    for (const kernels::GemmTileConfig& c : variants)
      alts.emplace_back(
          Row{"dense", "fp8moe_forced_tile", kernels::describe_tile_config(c), m, n, k, 1, 0, 0, 0},
          [&, c](int i) {
            kernels::fp8_gemm_nt(fs[i].a.p, fs[i].sa.p, fs[i].b.p, fs[i].sb.p, d.p, m, n, k, stream,
                                 &c, workspace);
          });
  }
  // NOTE: this timing (the second of two) is kept only where cuBLASLt blockwise is unavailable;
  // otherwise the two are timed in alternation below. Timed alone it read 5-15% slower than the
  // same configuration timed later, and 500 ms of warm-up widened the gap (up to 70%): it follows
  // the GPU's recent load (power / clocks), not a cold start (NOTES.md v11).
  time_us(stream, sets, launch_ours);
  double us = time_us(stream, sets, launch_ours);
  launch_ours(0);
  FM_CHECK_CUDA(cudaStreamSynchronize(stream));
  const std::vector<bf16> ours = d.download();
  Row r{"dense",
        "fp8moe",
        "",
        m,
        n,
        k,
        1,
        us,
        flops / us * 1e-6,
        bytes_moved(double(fp8_bytes)) / us * 1e-3};
  r.rel_err = sampled_rel_err(fs[0], m, n, k, ours);

  // cuBLASLt blockwise (same data, scales rearranged).
  std::vector<Dev<float>> sb_lt;
  for (int i = 0; i < sets; ++i) sb_lt.push_back(lt_block_scales(fs[i].sb, n, k));
  double us_block = -1, block_mhz = -1, block_watts = -1;
  {
    std::vector<std::unique_ptr<LtPlan>> plans;
    for (int i = 0; i < sets; ++i) plans.push_back(std::make_unique<LtPlan>());
    bool ok = true;
    std::string why;
    for (int i = 0; i < sets && ok; ++i) {
      make_plan(lt, *plans[i], Anchor::kFp8Blockwise, m, n, k, sb_lt[i].p, fs[i].sa.p);
      ok = plans[i]->ok;
      why = plans[i]->why;
    }
    if (ok) {
      // NOTE: ours (the heuristic's pick) and cuBLASLt are timed in alternation, three times
      // each, medians kept, after the forced tiles: the GPU's clocks follow its recent load, and
      // a shape's first timing read 5-15% slower than the same configuration timed later
      // (NOTES.md v9-v11, v14); alternation gives both the same conditions.
      const auto launch_block = [&](int i) {
        run_plan(lt, *plans[i], fs[i].b.p, fs[i].a.p, d_ref.p, stream);
      };
      std::vector<double> u_ours, u_block;
      // The order rotates by one each round (session 4 call 2 read the same configuration 4%
      // apart at two places of a fixed order), for as many rounds as rows (at least 3): every
      // row is timed once at every place (session 5 call 2: with 5 rounds of 9-16 rows the
      // heuristic's row followed cuBLASLt's in 4 of 5 rounds and read up to 7% slower than the
      // identical forced row).
      std::vector<std::vector<double>> u_alts(alts.size());
      const int count = static_cast<int>(alts.size()) + 2;
      const int rounds = std::max(3, count);
      // SM clock and power per variant (medians of each timing's medians).
      std::vector<std::vector<double>> mhz(static_cast<size_t>(count)),
          watts(static_cast<size_t>(count));
      g_clock.take();
      for (int round = 0; round < rounds; ++round)
        for (int i = 0; i < count; ++i) {
          const int j = (i + round) % count;
          if (j == 0)
            u_ours.push_back(time_us(stream, sets, launch_ours));
          else if (j == count - 1)
            u_block.push_back(time_us(stream, sets, launch_block));
          else
            u_alts[size_t(j - 1)].push_back(time_us(stream, sets, alts[size_t(j - 1)].second));
          keep_clock_sample(mhz[size_t(j)], watts[size_t(j)]);
        }
      r.sm_mhz = median_or_none(mhz[0]);
      r.power_w = median_or_none(watts[0]);
      block_mhz = median_or_none(mhz[size_t(count - 1)]);
      block_watts = median_or_none(watts[size_t(count - 1)]);
      for (size_t j = 0; j < alts.size(); ++j) {
        alts[j].first.sm_mhz = median_or_none(mhz[j + 1]);
        alts[j].first.power_w = median_or_none(watts[j + 1]);
      }
      std::sort(u_ours.begin(), u_ours.end());
      std::sort(u_block.begin(), u_block.end());
      const size_t mid = size_t(rounds / 2);
      for (size_t j = 0; j < alts.size(); ++j) {
        std::sort(u_alts[j].begin(), u_alts[j].end());
        Row& a = alts[j].first;
        a.us = u_alts[j][mid];
        a.tflops = flops / a.us * 1e-6;
        a.gbps = bytes_moved(double(fp8_bytes)) / a.us * 1e-3;
        a.ratio_blockwise = u_block[mid] / a.us;
        a.note = "spread " +
                 std::to_string(int(std::lround(100.0 * (u_alts[j].back() / u_alts[j][0] - 1.0)))) +
                 "%";
        // Each alternative's output against cuBLASLt's (poisoned first).
        FM_CHECK_CUDA(cudaMemset(d.p, 0xFF, d.n * sizeof(bf16)));
        alts[j].second(0);
        run_plan(lt, *plans[0], fs[0].b.p, fs[0].a.p, d_ref.p, stream);
        FM_CHECK_CUDA(cudaStreamSynchronize(stream));
        a.rel_diff_blockwise = rel_diff(d.download(), d_ref.download());
      }
      r.us_first = us;
      us = u_ours[mid];
      us_block = u_block[mid];
      r.us = us;
      r.tflops = flops / us * 1e-6;
      r.gbps = bytes_moved(double(fp8_bytes)) / us * 1e-3;
      run_plan(lt, *plans[0], fs[0].b.p, fs[0].a.p, d_ref.p, stream);
      FM_CHECK_CUDA(cudaStreamSynchronize(stream));
      r.rel_diff_blockwise = rel_diff(ours, d_ref.download());
      r.ratio_blockwise = us_block / us;
    } else {
      Row a{"dense", anchor_name(Anchor::kFp8Blockwise), "", m, n, k, 1, 0, 0, 0};
      a.note = "not available: " + why;
      out.add(a);
    }
  }
  {
    kernels::GemmShape shape{kernels::GemmKind::kDense, m, n, k, 1};
    shape.max_split_k = 8;  // fp8_gemm_nt's kHeuristicMaxSplitK (it has a workspace here)
    r.tile = kernels::describe_tile_config(
        kernels::choose_gemm_tile(shape, out.num_sms, out.smem, out.dram));
  }
  out.add(r);
  for (auto& a : alts)
    if (a.first.us > 0) out.add(a.first);
  if (us_block > 0) {
    Row a{"dense",
          anchor_name(Anchor::kFp8Blockwise),
          "",
          m,
          n,
          k,
          1,
          us_block,
          flops / us_block * 1e-6,
          bytes_moved(double(fp8_bytes)) / us_block * 1e-3};
    a.ratio_blockwise = 1.0;
    a.sm_mhz = block_mhz;
    a.power_w = block_watts;
    out.add(a);
  }
  // cuBLASLt FP8 per-tensor: same codes, one scale each.
  {
    Dev<float> one(1);
    const float v = 1.0f;
    FM_CHECK_CUDA(cudaMemcpy(one.p, &v, 4, cudaMemcpyHostToDevice));
    LtPlan plan;
    make_plan(lt, plan, Anchor::kFp8Tensor, m, n, k, one.p, one.p);
    if (plan.ok) {
      const double u = time_us(
          stream, sets, [&](int i) { run_plan(lt, plan, fs[i].b.p, fs[i].a.p, d_ref.p, stream); });
      Row a{"dense",          anchor_name(Anchor::kFp8Tensor),          "", m, n, k, 1, u,
            flops / u * 1e-6, bytes_moved(double(fp8_bytes)) / u * 1e-3};
      if (us_block > 0) a.ratio_blockwise = us_block / u;
      out.add(a);
    }
  }
  fs.clear();
  sb_lt.clear();
  // cuBLASLt BF16.
  {
    const int bsets = sets_for(2 * fp8_bytes);
    std::vector<Dev<__nv_bfloat16>> xa, xb;
    for (int i = 0; i < bsets; ++i) {
      Dev<float> fa = random_floats(m, k, seed + 1000 + i),
                 fb = random_floats(n, k, seed + 2000 + i);
      xa.emplace_back(size_t(m * k));
      xb.emplace_back(size_t(n * k));
      to_bf16_kernel<<<1024, 256>>>(fa.p, xa.back().p, m * k);
      to_bf16_kernel<<<1024, 256>>>(fb.p, xb.back().p, n * k);
      FM_CHECK_CUDA(cudaDeviceSynchronize());
    }
    LtPlan plan;
    make_plan(lt, plan, Anchor::kBf16, m, n, k, nullptr, nullptr);
    if (plan.ok) {
      const double u = time_us(
          stream, bsets, [&](int i) { run_plan(lt, plan, xb[i].p, xa[i].p, d_ref.p, stream); });
      Row a{"dense",
            anchor_name(Anchor::kBf16),
            "",
            m,
            n,
            k,
            1,
            u,
            flops / u * 1e-6,
            bytes_moved(2.0 * fp8_bytes) / u * 1e-3};
      if (us_block > 0) a.ratio_blockwise = us_block / u;
      out.add(a);
    }
  }
}

// Small M (64, 128): the heuristic's pick (with a split-K workspace), the heuristic without a
// workspace (no split: the pick before split-K existed), forced tiles and splits, and cuBLASLt
// blockwise, all timed in alternation (3 rounds, medians) so that every row sees the same GPU
// state. Each forced row's `diff` is against cuBLASLt's output on the same inputs.
struct SmallVariant {
  SmallVariant(std::string impl_, std::string tile_)
      : impl(std::move(impl_)), tile(std::move(tile_)) {}
  std::string impl, tile;
  bool has_force = false;
  kernels::GemmTileConfig force{};
  bool workspace = true;
  std::vector<double> us;
};

// Extra forced rows from FP8MOE_BENCH_SMALL_TILES (e.g. "128x256,128x256e3,128x128s4q"):
// BMxBN, then options: eN epilogue N (default 2: TMA store), sN stages, kN split-K, mN CTAs,
// b CTA pairs along M sharing B (cluster 2), wN scale_prefetch N; each with pdl off and on, or
// q: pdl on only.
std::vector<kernels::GemmTileConfig> parse_tile_list(const char* list) {
  std::vector<kernels::GemmTileConfig> forced;
  const std::string l = list;
  for (size_t pos = 0; pos < l.size();) {
    const size_t comma = std::min(l.find(',', pos), l.size());
    const std::string t = l.substr(pos, comma - pos);
    const size_t x = t.find('x');
    if (x != std::string::npos) {
      kernels::GemmTileConfig c{
          std::atoi(t.substr(0, x).c_str()), std::atoi(t.substr(x + 1).c_str()), 0, 0, 2, 1, 1};
      bool pdl_on_only = false;
      size_t i = x + 1;
      while (i < t.size() && std::isdigit(static_cast<unsigned char>(t[i]))) ++i;
      while (i < t.size()) {
        const char o = t[i++];
        const int v = std::atoi(t.c_str() + i);
        while (i < t.size() && std::isdigit(static_cast<unsigned char>(t[i]))) ++i;
        switch (o) {
          case 'e':
            c.epilogue = v;
            break;
          case 's':
            c.num_stages = v;
            break;
          case 'k':
            c.split_k = v;
            break;
          case 'm':
            c.num_sms = v;
            break;
          case 'b':
            c.cluster = 2;
            break;
          case 'w':
            c.scale_prefetch = v;
            break;
          case 'q':
            pdl_on_only = true;
            break;
          default:
            std::fprintf(stderr, "FP8MOE_BENCH_SMALL_TILES: unknown option '%c' in %s\n", o,
                         t.c_str());
            std::exit(2);
        }
      }
      if (!pdl_on_only) {
        c.pdl = 1;
        forced.push_back(c);
      }
      c.pdl = 2;
      forced.push_back(c);
    }
    pos = comma + 1;
  }
  return forced;
}

void bench_dense_small(Output& out, Lt& lt, cudaStream_t stream, int64_t m, int64_t n, int64_t k,
                       uint64_t seed) {
  const double flops = 2.0 * m * n * k;
  const int64_t fp8_bytes = m * k + n * k;
  const int sets = sets_for(fp8_bytes);
  std::vector<Fp8Set> fs;
  for (int i = 0; i < sets; ++i) fs.push_back(make_fp8_set(m, n, k, 1, seed + 100 * i));
  Dev<bf16> d(size_t(m * n)), d_ref(size_t(m * n));
  auto bytes_moved = [&](double in_bytes) { return in_bytes + 2.0 * m * n; };
  const int64_t kb = k / 128;

  std::vector<SmallVariant> vars;
  {
    kernels::GemmShape shape{kernels::GemmKind::kDense, m, n, k, 1};
    shape.max_split_k = 8;  // fp8_gemm_nt's kHeuristicMaxSplitK
    vars.emplace_back("fp8moe", kernels::describe_tile_config(kernels::choose_gemm_tile(
                                    shape, out.num_sms, out.smem, out.dram)));
    vars.emplace_back("fp8moe_nosplit", out.tile_for(kernels::GemmKind::kDense, m, n, k, 1));
    vars.back().workspace = false;
    // The pick launched with programmatic dependent launch (pdl on / off, whichever the pick's
    // default is not).
    kernels::GemmTileConfig pick =
        kernels::choose_gemm_tile(shape, out.num_sms, out.smem, out.dram);
    pick.pdl = pdl_other();
    vars.emplace_back("fp8moe_pick_pdl" + std::to_string(pick.pdl),
                      kernels::describe_tile_config(pick));
    vars.back().has_force = true;
    vars.back().force = pick;
  }
  std::vector<kernels::GemmTileConfig> forced;
  if (std::getenv("FP8MOE_BENCH_LEAN") == nullptr) {
    forced = {{128, 128, 0, 0, 0, 1, 1},
              {64, 128, 0, 0, 0, 1, 1},
              {64, 64, 0, 0, 0, 1, 1},
              {128, 192, 0, 0, 2, 1, 1},
              {128, 256, 0, 0, 2, 1, 1}};
    for (int split : {2, 3, 4, 6, 8})
      if (2 * split <= kb) forced.push_back({128, 128, 0, 0, 0, 1, split});
    // Tail split (the last partial wave's tiles cut along K), where the shape has one.
    for (const kernels::GemmTileConfig c : {kernels::GemmTileConfig{128, 128, 0, 0, 2, 1, 1, 2},
                                            kernels::GemmTileConfig{128, 128, 0, 0, 1, 1, 1, 2}})
      if (kernels::fp8_gemm_workspace_bytes(m, n, k, &c) > 0) forced.push_back(c);
    for (int split : {2, 4, 8})
      if (2 * split <= kb) {
        forced.push_back({64, 128, 0, 0, 0, 1, split});
        if (split < 8) forced.push_back({64, 64, 0, 0, 0, 1, split});
      }
  }
  // Extra forced rows (parse_tile_list).
  if (const char* list = std::getenv("FP8MOE_BENCH_SMALL_TILES"))
    for (const kernels::GemmTileConfig& c : parse_tile_list(list)) forced.push_back(c);
  for (const kernels::GemmTileConfig& c : forced) {
    SmallVariant v("fp8moe_forced_tile", kernels::describe_tile_config(c));
    v.has_force = true;
    v.force = c;
    vars.push_back(v);
  }
  int64_t ws_bytes = kernels::fp8_gemm_workspace_bytes(m, n, k);
  for (const kernels::GemmTileConfig& c : forced)
    ws_bytes = std::max(ws_bytes, kernels::fp8_gemm_workspace_bytes(m, n, k, &c));
  Dev<uint8_t> ws(size_t(std::max<int64_t>(ws_bytes, 256)));
  FM_CHECK_CUDA(cudaMemset(ws.p, 0, ws.n));
  const auto launch_var = [&](const SmallVariant& v, int i) {
    kernels::fp8_gemm_nt(
        fs[i].a.p, fs[i].sa.p, fs[i].b.p, fs[i].sb.p, d.p, m, n, k, stream,
        v.has_force ? &v.force : nullptr,
        v.workspace ? kernels::GemmWorkspace{ws.p, ws.n} : kernels::GemmWorkspace{});
  };

  // The heuristic's output against the CPU reference (8 sampled rows).
  launch_var(vars[0], 0);
  FM_CHECK_CUDA(cudaStreamSynchronize(stream));
  const double heuristic_err = sampled_rel_err(fs[0], m, n, k, d.download());

  std::vector<Dev<float>> sb_lt;
  std::vector<std::unique_ptr<LtPlan>> plans;
  bool lt_ok = true;
  std::string why;
  for (int i = 0; i < sets && lt_ok; ++i) {
    sb_lt.push_back(lt_block_scales(fs[i].sb, n, k));
    plans.push_back(std::make_unique<LtPlan>());
    make_plan(lt, *plans[i], Anchor::kFp8Blockwise, m, n, k, sb_lt[i].p, fs[i].sa.p);
    lt_ok = plans[i]->ok;
    why = plans[i]->why;
  }
  std::vector<bf16> lt_out;
  if (lt_ok) {
    run_plan(lt, *plans[0], fs[0].b.p, fs[0].a.p, d_ref.p, stream);
    FM_CHECK_CUDA(cudaStreamSynchronize(stream));
    lt_out = d_ref.download();
  }
  std::vector<double> us_lt;
  // The order rotates by one each round (no variant always follows the same one).
  const int count = static_cast<int>(vars.size()) + 1;
  std::vector<std::vector<double>> mhz(static_cast<size_t>(count)),
      watts(static_cast<size_t>(count));
  g_clock.take();
  for (int round = 0; round < 3; ++round)
    for (int i = 0; i < count; ++i) {
      const int j = (i + round) % count;
      if (j < count - 1) {
        SmallVariant& v = vars[size_t(j)];
        v.us.push_back(time_us(stream, sets, [&](int x) { launch_var(v, x); }));
      } else if (lt_ok) {
        us_lt.push_back(time_us(stream, sets, [&](int x) {
          run_plan(lt, *plans[x], fs[x].b.p, fs[x].a.p, d_ref.p, stream);
        }));
      }
      keep_clock_sample(mhz[size_t(j)], watts[size_t(j)]);
    }
  const double us_block = lt_ok ? median_or_none(us_lt) : -1;
  for (size_t vi = 0; vi < vars.size(); ++vi) {
    const SmallVariant& v = vars[vi];
    const double u = median_or_none(v.us);
    Row r{"dense",
          v.impl,
          v.tile,
          m,
          n,
          k,
          1,
          u,
          flops / u * 1e-6,
          bytes_moved(double(fp8_bytes)) / u * 1e-3};
    if (us_block > 0) r.ratio_blockwise = us_block / u;
    r.sm_mhz = median_or_none(mhz[vi]);
    r.power_w = median_or_none(watts[vi]);
    if (vi == 0) r.rel_err = heuristic_err;
    if (lt_ok) {
      FM_CHECK_CUDA(cudaMemset(d.p, 0xFF, d.n * sizeof(bf16)));
      launch_var(v, 0);
      FM_CHECK_CUDA(cudaStreamSynchronize(stream));
      r.rel_diff_blockwise = rel_diff(d.download(), lt_out);
    }
    out.add(r);
  }
  if (lt_ok) {
    Row a{"dense",
          anchor_name(Anchor::kFp8Blockwise),
          "",
          m,
          n,
          k,
          1,
          us_block,
          flops / us_block * 1e-6,
          bytes_moved(double(fp8_bytes)) / us_block * 1e-3};
    a.ratio_blockwise = 1.0;
    a.sm_mhz = median_or_none(mhz[size_t(count - 1)]);
    a.power_w = median_or_none(watts[size_t(count - 1)]);
    out.add(a);
  } else {
    Row a{"dense", anchor_name(Anchor::kFp8Blockwise), "", m, n, k, 1, 0, 0, 0};
    a.note = "not available: " + why;
    out.add(a);
  }
}

// Grouped forms (no cuBLASLt anchor): the heuristic's pick and the forced tiles below, timed in
// a rotated alternation (each row once at every place, as bench_dense), medians; each forced
// row's output is compared with the pick's. FP8MOE_BENCH_GROUPED_TILES (parse_tile_list's
// syntax, e.g. "256x128q,128x256q") replaces the forced list; FP8MOE_BENCH_GROUPED_ROUNDS sets
// the least number of rounds (default 3; at least one per row).
const std::vector<kernels::GemmTileConfig>& grouped_variants() {
  static const std::vector<kernels::GemmTileConfig> v = [] {
    if (const char* list = std::getenv("FP8MOE_BENCH_GROUPED_TILES")) return parse_tile_list(list);
    return std::vector<kernels::GemmTileConfig>{{128, 256, 0, 0, 2},
                                                {128, 256, 0, 0, 2, 1, 1, 1, pdl_other()},
                                                {256, 128, 0, 0, 2},
                                                {128, 128, 0, 0, 2},
                                                {128, 128, 0, 0, 1}};
  }();
  return v;
}

int grouped_min_rounds() {
  const char* r = std::getenv("FP8MOE_BENCH_GROUPED_ROUNDS");
  return r != nullptr ? std::max(1, std::atoi(r)) : 3;
}

// launch(force, set): force null = the heuristic. Adds one row per variant to `out`.
void time_grouped(Output& out, cudaStream_t stream, int sets, Row pick, double flops, double bytes,
                  Dev<bf16>& d,
                  const std::function<void(const kernels::GemmTileConfig*, int)>& launch) {
  const std::vector<kernels::GemmTileConfig>& forced = grouped_variants();
  const int count = static_cast<int>(forced.size()) + 1;
  const auto force_of = [&](int j) { return j == 0 ? nullptr : &forced[size_t(j - 1)]; };
  const size_t rows = static_cast<size_t>(count);
  std::vector<std::vector<double>> us(rows), mhz(rows), watts(rows);
  g_clock.take();
  for (int round = 0; round < std::max(grouped_min_rounds(), count); ++round)
    for (int i = 0; i < count; ++i) {
      const int j = (i + round) % count;
      us[size_t(j)].push_back(time_us(stream, sets, [&](int x) { launch(force_of(j), x); }));
      keep_clock_sample(mhz[size_t(j)], watts[size_t(j)]);
    }
  FM_CHECK_CUDA(cudaMemset(d.p, 0xFF, d.n * sizeof(bf16)));
  launch(nullptr, 0);
  FM_CHECK_CUDA(cudaStreamSynchronize(stream));
  const std::vector<bf16> want = d.download();
  for (int j = 0; j < count; ++j) {
    Row r = pick;
    if (j > 0) {
      r.impl = "fp8moe_forced_tile";
      r.tile = kernels::describe_tile_config(forced[size_t(j - 1)]);
      r.rel_err = -1;
      FM_CHECK_CUDA(cudaMemset(d.p, 0xFF, d.n * sizeof(bf16)));
      launch(force_of(j), 0);
      FM_CHECK_CUDA(cudaStreamSynchronize(stream));
      r.rel_diff_pick = rel_diff(d.download(), want);
    }
    std::vector<double> u = us[size_t(j)];
    std::sort(u.begin(), u.end());
    r.us = median_or_none(u);
    r.tflops = flops / r.us * 1e-6;
    r.gbps = bytes / r.us * 1e-3;
    r.sm_mhz = median_or_none(mhz[size_t(j)]);
    r.power_w = median_or_none(watts[size_t(j)]);
    r.note = "spread " + std::to_string(int(std::lround(100.0 * (u.back() / u[0] - 1.0)))) + "%";
    out.add(r);
  }
}

void bench_contiguous(Output& out, cudaStream_t stream, int64_t groups, int64_t rows_per_group,
                      int64_t n, int64_t k, uint64_t seed) {
  const int64_t m = groups * rows_per_group;
  const double flops = 2.0 * m * n * k;
  const int64_t bytes = m * k + groups * n * k;
  const int sets = sets_for(bytes);
  std::vector<Fp8Set> fs;
  for (int i = 0; i < sets; ++i) fs.push_back(make_fp8_set(m, n, k, groups, seed + 100 * i));
  std::vector<int32_t> layout(static_cast<size_t>(m));
  for (int64_t r = 0; r < m; ++r) layout[size_t(r)] = int32_t(r / rows_per_group);
  Dev<int32_t> dl(static_cast<size_t>(m));
  FM_CHECK_CUDA(cudaMemcpy(dl.p, layout.data(), size_t(m) * 4, cudaMemcpyHostToDevice));
  Dev<bf16> d(size_t(m * n));
  const auto launch = [&](const kernels::GemmTileConfig* force, int i) {
    kernels::fp8_gemm_nt_grouped_contiguous(fs[i].a.p, fs[i].sa.p, fs[i].b.p, fs[i].sb.p, d.p, dl.p,
                                            m, n, k, groups, stream, force);
  };
  launch(nullptr, 0);
  FM_CHECK_CUDA(cudaStreamSynchronize(stream));
  Row r{"grouped_contiguous",
        "fp8moe",
        out.tile_for(kernels::GemmKind::kGroupedContiguous, m, n, k, groups),
        m,
        n,
        k,
        groups,
        0,
        0,
        0};
  // Check the last group (its own B).
  const std::vector<bf16> ours = d.download();
  r.rel_err =
      sampled_rel_err(fs[0], rows_per_group, n, k, ours, (groups - 1) * rows_per_group, groups - 1);
  time_grouped(out, stream, sets, r, flops, bytes + 2.0 * m * n, d, launch);
}

// ---- gathered contiguous: A rows read through a row index from received records ----
// Records as the EP dispatch leaves them: each token once, its K codes then its KB row-major
// scales, `stride` bytes apart: DeviceEp's record_stride P = align_up(K + 4 KB, 16), 7392 at
// K = 7168 and 2112 at 2048, so every row starts on a 32-byte sector. Other layouts (session 11,
// dev/gemm/NOTES.md): `align` 128 starts every row on a 128-byte line; `header` 16 is this bench's
// stride before session 11 (7408, 2128: rows 16 bytes off a sector on alternate records, which
// cost the gathered GEMM ~6 % more than the EP's stride).
int64_t record_stride(int64_t k, int64_t align = 16, int64_t header = 0) {
  return (k + 4 * (k / 128) + header + align - 1) / align * align;
}

// FP8MOE_BENCH_GATHER_RECORDS (A/B, session 11): letters of more record layouts, each a gathered
// row of its own rotated with the contiguous and the gathered GEMM on the EP's records, checked bit
// for bit first: 'a' 128-byte stride, 'h' 16 bytes of header room (the bench's old stride).
std::string gather_record_layouts() {
  std::string out;
  const char* list = std::getenv("FP8MOE_BENCH_GATHER_RECORDS");
  for (const char* c = list != nullptr ? list : ""; *c != '\0'; ++c)
    if ((*c == 'a' || *c == 'h') && out.find(*c) == std::string::npos) out += *c;
  return out;
}

// One block per source row: codes from A [rows, k], scales from the M-major sa [kb][padded].
__global__ void make_records_kernel(const uint8_t* a, const float* sa, int64_t rows, int64_t padded,
                                    int64_t k, int64_t stride, uint8_t* rec) {
  const int64_t r = blockIdx.x;
  if (r >= rows) return;
  const uint4* src = reinterpret_cast<const uint4*>(a + r * k);
  uint4* dst = reinterpret_cast<uint4*>(rec + r * stride);
  for (int64_t i = threadIdx.x; i < k / 16; i += blockDim.x) dst[i] = src[i];
  float* scales = reinterpret_cast<float*>(rec + r * stride + k);
  for (int64_t c = threadIdx.x; c < k / 128; c += blockDim.x) scales[c] = sa[c * padded + r];
}

// One block per logical row: the materialised A (what the dispatch's grouped layout holds).
__global__ void materialise_rows_kernel(const uint8_t* rec, int64_t stride, const int32_t* index,
                                        int64_t k, uint8_t* a) {
  const int64_t r = blockIdx.x;
  const int32_t src = index[r];
  if (src < 0) return;
  const uint4* from = reinterpret_cast<const uint4*>(rec + int64_t(src) * stride);
  uint4* to = reinterpret_cast<uint4*>(a + r * k);
  for (int64_t i = threadIdx.x; i < k / 16; i += blockDim.x) to[i] = from[i];
}

// The contiguous GEMM on the materialised rows and the gathered GEMM on the records, heuristic
// picks, same data and scales, timed in alternation (FP8MOE_BENCH_GROUPED_ROUNDS rounds, default
// 5, each order in turn), medians; the outputs must be bit-identical (else the bench fails). Each
// source row feeds 4 logical rows in random order (top-8 routing over 2 ranks: ~4 of a token's
// experts per rank). Also times gather_scales_to_mn_major (records -> the logical rows' sa).
// `profile` (--profile-gathered): one set, one launch of each form and record layout, for ncu.
void bench_gathered(Output& out, cudaStream_t stream, int64_t groups, int64_t rows_per_group,
                    int64_t n, int64_t k, uint64_t seed, bool profile = false) {
  const int64_t m = groups * rows_per_group, src_rows = (m + 3) / 4, kb = k / 128;
  const int64_t stride = record_stride(k), pm = padded_rows(m);
  const std::string layouts = gather_record_layouts();
  const auto layout_stride = [&](char l) {
    return l == 'a' ? record_stride(k, 128) : record_stride(k, 16, 16);
  };
  const double flops = 2.0 * m * n * k;
  const int64_t bytes = m * k + groups * n * k;
  const int sets = profile ? 1 : sets_for(bytes);
  std::vector<int32_t> index(static_cast<size_t>(m)), layout(static_cast<size_t>(m));
  {
    std::vector<int32_t> pool;
    for (int rep = 0; rep < 4; ++rep)
      for (int64_t i = 0; i < src_rows; ++i) pool.push_back(int32_t(i));
    std::mt19937_64 rng(seed);
    std::shuffle(pool.begin(), pool.end(), rng);
    for (int64_t r = 0; r < m; ++r) {
      index[size_t(r)] = pool[size_t(r)];
      layout[size_t(r)] = int32_t(r / rows_per_group);
    }
  }
  Dev<int32_t> di(static_cast<size_t>(m)), dl(static_cast<size_t>(m));
  FM_CHECK_CUDA(cudaMemcpy(di.p, index.data(), size_t(m) * 4, cudaMemcpyHostToDevice));
  FM_CHECK_CUDA(cudaMemcpy(dl.p, layout.data(), size_t(m) * 4, cudaMemcpyHostToDevice));
  struct Set {
    Fp8Set f;  // a, sa: the source rows; b, sb
    Dev<uint8_t> rec, a_mat;
    std::vector<Dev<uint8_t>> rec_other;  // one per FP8MOE_BENCH_GATHER_RECORDS layout
    Dev<float> sa_log;
  };
  std::vector<Set> ss;
  for (int i = 0; i < sets; ++i) {
    Set x;
    x.f = make_fp8_set(src_rows, n, k, groups, seed + 100 * i);
    x.rec = Dev<uint8_t>(size_t(src_rows * stride));
    x.a_mat = Dev<uint8_t>(size_t(m * k));
    x.sa_log = Dev<float>(size_t(kb * pm));
    make_records_kernel<<<unsigned(src_rows), 256>>>(x.f.a.p, x.f.sa.p, src_rows,
                                                     padded_rows(src_rows), k, stride, x.rec.p);
    FM_CHECK_LAUNCH();
    materialise_rows_kernel<<<unsigned(m), 256>>>(x.rec.p, stride, di.p, k, x.a_mat.p);
    FM_CHECK_LAUNCH();
    for (const char l : layouts) {
      x.rec_other.emplace_back(size_t(src_rows * layout_stride(l)));
      make_records_kernel<<<unsigned(src_rows), 256>>>(x.f.a.p, x.f.sa.p, src_rows,
                                                       padded_rows(src_rows), k, layout_stride(l),
                                                       x.rec_other.back().p);
      FM_CHECK_LAUNCH();
    }
    kernels::gather_scales_to_mn_major(reinterpret_cast<const float*>(x.rec.p + k), stride / 4,
                                       di.p, m, kb, x.sa_log.p, stream);
    FM_CHECK_CUDA(cudaStreamSynchronize(stream));
    ss.push_back(std::move(x));
  }
  Dev<bf16> d(size_t(m * n)), d2(size_t(m * n));
  // The picks, then each FP8MOE_BENCH_GATHERED_TILES tile (parse_tile_list's syntax, e.g.
  // "128x128,128x256e1") forced on both.
  std::vector<const kernels::GemmTileConfig*> forces = {nullptr};
  static const std::vector<kernels::GemmTileConfig> forced = [] {
    const char* list = std::getenv("FP8MOE_BENCH_GATHERED_TILES");
    return list != nullptr ? parse_tile_list(list) : std::vector<kernels::GemmTileConfig>{};
  }();
  for (const kernels::GemmTileConfig& f : forced) forces.push_back(&f);
  const kernels::GemmShape shape{kernels::GemmKind::kGroupedContiguous, m, n, k, groups};
  for (const kernels::GemmTileConfig* force : forces) {
    const auto contiguous = [&](int i) {
      kernels::fp8_gemm_nt_grouped_contiguous(ss[i].a_mat.p, ss[i].sa_log.p, ss[i].f.b.p,
                                              ss[i].f.sb.p, d.p, dl.p, m, n, k, groups, stream,
                                              force);
    };
    const auto gathered = [&](int i) {
      kernels::fp8_gemm_nt_grouped_contiguous_gathered({ss[i].rec.p, src_rows, stride, di.p},
                                                       ss[i].sa_log.p, ss[i].f.b.p, ss[i].f.sb.p,
                                                       d2.p, dl.p, m, n, k, groups, stream, force);
    };
    // The gathered GEMM on the other record layouts (FP8MOE_BENCH_GATHER_RECORDS).
    struct Timed {
      char layout;
      size_t slot;  // in Set::rec_other
      std::vector<double> us, mhz, w;
    };
    std::vector<Timed> timed;
    for (size_t j = 0; j < layouts.size(); ++j) timed.push_back({layouts[j], j, {}, {}, {}});
    const auto gathered_with = [&](const Timed& x, int i) {
      kernels::fp8_gemm_nt_grouped_contiguous_gathered(
          {ss[i].rec_other[x.slot].p, src_rows, layout_stride(x.layout), di.p}, ss[i].sa_log.p,
          ss[i].f.b.p, ss[i].f.sb.p, d2.p, dl.p, m, n, k, groups, stream, force);
    };
    if (profile) {
      contiguous(0);
      gathered(0);
      for (const Timed& x : timed) gathered_with(x, 0);
      FM_CHECK_CUDA(cudaStreamSynchronize(stream));
      continue;
    }
    // Bit for bit, on every set's data.
    int64_t mismatches = 0;
    for (int i = 0; i < sets; ++i) {
      FM_CHECK_CUDA(cudaMemsetAsync(d.p, 0xFF, d.n * sizeof(bf16), stream));
      FM_CHECK_CUDA(cudaMemsetAsync(d2.p, 0xFF, d2.n * sizeof(bf16), stream));
      contiguous(i);
      gathered(i);
      FM_CHECK_CUDA(cudaStreamSynchronize(stream));
      const std::vector<bf16> x = d.download(), y = d2.download();
      for (size_t j = 0; j < x.size(); ++j) mismatches += x[j].bits != y[j].bits;
    }
    FM_CHECK(mismatches == 0, "gathered m=", m, " n=", n, " k=", k, ": ", mismatches,
             " outputs differ from the contiguous GEMM's");
    for (const Timed& x : timed) {
      int64_t bad = 0;
      for (int i = 0; i < sets; ++i) {
        FM_CHECK_CUDA(cudaMemsetAsync(d.p, 0xFF, d.n * sizeof(bf16), stream));
        FM_CHECK_CUDA(cudaMemsetAsync(d2.p, 0xFF, d2.n * sizeof(bf16), stream));
        contiguous(i);
        gathered_with(x, i);
        FM_CHECK_CUDA(cudaStreamSynchronize(stream));
        const std::vector<bf16> a = d.download(), b = d2.download();
        for (size_t j = 0; j < a.size(); ++j) bad += a[j].bits != b[j].bits;
      }
      FM_CHECK(bad == 0, "gathered on records ", x.layout, " m=", m, " n=", n, " k=", k, ": ", bad,
               " outputs differ from the contiguous GEMM's");
    }
    const char* rounds_env = std::getenv("FP8MOE_BENCH_GROUPED_ROUNDS");
    const int rounds = rounds_env != nullptr ? std::max(2, std::atoi(rounds_env)) : 5;
    std::vector<double> us_c, us_g, mhz_c, w_c, mhz_g, w_g;
    const int count = 2 + static_cast<int>(timed.size());
    g_clock.take();
    for (int round = 0; round < rounds; ++round)
      for (int j = 0; j < count; ++j) {
        const int v = (j + round) % count;
        if (v == 0) {
          us_c.push_back(time_us(stream, sets, contiguous));
          keep_clock_sample(mhz_c, w_c);
        } else if (v == 1) {
          us_g.push_back(time_us(stream, sets, gathered));
          keep_clock_sample(mhz_g, w_g);
        } else {
          Timed& x = timed[size_t(v - 2)];
          x.us.push_back(time_us(stream, sets, [&](int i) { gathered_with(x, i); }));
          keep_clock_sample(x.mhz, x.w);
        }
      }
    std::sort(us_c.begin(), us_c.end());
    std::sort(us_g.begin(), us_g.end());
    const double c_med = median_or_none(us_c), g_med = median_or_none(us_g);
    const auto spread = [](const std::vector<double>& u) {
      return std::to_string(int(std::lround(100.0 * (u.back() / u[0] - 1.0))));
    };
    const std::string tile_c =
        force != nullptr ? kernels::describe_tile_config(*force)
                         : out.tile_for(kernels::GemmKind::kGroupedContiguous, m, n, k, groups);
    const std::string tile_g = force != nullptr
                                   ? kernels::describe_tile_config(*force)
                                   : kernels::describe_tile_config(kernels::gemm_gathered_tile(
                                         shape, out.num_sms, out.smem, out.dram));
    const char* forced_note = force != nullptr ? "forced, " : "";
    // One row of this shape: its time, rates and the clock and power sampled beside it.
    const auto shape_row = [&](const char* bench, const std::string& impl, const std::string& tile,
                               double med, const std::vector<double>& mhz,
                               const std::vector<double>& w) {
      Row r{bench,
            impl,
            tile,
            m,
            n,
            k,
            groups,
            med,
            flops / med * 1e-6,
            (bytes + 2.0 * m * n) / med * 1e-3};
      r.sm_mhz = median_or_none(mhz);
      r.power_w = median_or_none(w);
      return r;
    };
    Row rc = shape_row("grouped_contiguous", "fp8moe_materialised", tile_c, c_med, mhz_c, w_c);
    rc.note = forced_note + ("spread " + spread(us_c) + "%");
    out.add(rc);
    Row rg = shape_row("grouped_contiguous_gathered", "fp8moe_gathered", tile_g, g_med, mhz_g, w_g);
    rg.anchor = "contiguous_same_run";
    rg.ratio_blockwise = g_med / c_med;
    char buf[200];
    std::snprintf(buf, sizeof buf,
                  "%sgathered/contiguous %.4f, src rows %lld, stride %lld, spread %s%%, "
                  "bit-identical",
                  forced_note, g_med / c_med, (long long)src_rows, (long long)stride,
                  spread(us_g).c_str());
    rg.note = buf;
    out.add(rg);
    for (Timed& x : timed) {
      std::sort(x.us.begin(), x.us.end());
      const double v_med = median_or_none(x.us);
      const std::string name = std::string("rec_") + x.layout;
      const int64_t st = layout_stride(x.layout);
      Row rv = shape_row("grouped_contiguous_gathered", "fp8moe_gathered_" + name, tile_g, v_med,
                         x.mhz, x.w);
      rv.anchor = "contiguous_same_run";
      rv.ratio_blockwise = v_med / c_med;
      std::snprintf(buf, sizeof buf,
                    "%srecords %c, stride %lld, gathered/contiguous %.4f, /gathered on the EP's "
                    "records %.4f, spread %s%%, bit-identical",
                    forced_note, x.layout, (long long)st, v_med / c_med, v_med / g_med,
                    spread(x.us).c_str());
      rv.note = buf;
      out.add(rv);
    }
  }
  if (profile) return;
  // The scale gather (records -> [kb][pad(M)]): reads M rows of kb floats, writes kb x pad(M).
  const double us_s = time_us(stream, sets, [&](int i) {
    kernels::gather_scales_to_mn_major(reinterpret_cast<const float*>(ss[i].rec.p + k), stride / 4,
                                       di.p, m, kb, ss[i].sa_log.p, stream);
  });
  Row rs{"gather_scales",
         "fp8moe",
         "",
         m,
         0,
         k,
         groups,
         us_s,
         0,
         double(m * kb * 4 + kb * pm * 4 + m * 4) / us_s * 1e-3};
  out.add(rs);
}

void bench_masked(Output& out, cudaStream_t stream, int64_t groups, int64_t max_m, int64_t n,
                  int64_t k, uint64_t seed) {
  const double flops = 2.0 * groups * max_m * n * k;
  const int64_t bytes = groups * (max_m * k + n * k);
  const int sets = sets_for(bytes);
  std::vector<Fp8Set> fs;
  // A [G*max_m, K] quantised as one matrix gives sa [KB][G*max_m]; the masked layout wants
  // [G][KB][pad(max_m)], so quantise each group on its own into that layout.
  for (int i = 0; i < sets; ++i) {
    Fp8Set s = make_fp8_set(max_m, n, k, groups, seed + 100 * i);
    Dev<uint8_t> a(size_t(groups * max_m * k));
    Dev<float> sa(size_t(groups * (k / 128) * padded_rows(max_m)));
    for (int64_t g = 0; g < groups; ++g) {
      Dev<float> xa = random_floats(max_m, k, seed + 100 * i + 50 + g);
      kernels::quantize_1x128(xa.p, max_m, k, k, false, a.p + g * max_m * k, k,
                              sa.p + g * (k / 128) * padded_rows(max_m), ScaleLayout::kMnMajor,
                              stream);
    }
    FM_CHECK_CUDA(cudaDeviceSynchronize());
    s.a = std::move(a);
    s.sa = std::move(sa);
    fs.push_back(std::move(s));
  }
  std::vector<int32_t> mm(static_cast<size_t>(groups), static_cast<int32_t>(max_m));
  Dev<int32_t> dm(static_cast<size_t>(groups));
  FM_CHECK_CUDA(cudaMemcpy(dm.p, mm.data(), size_t(groups) * 4, cudaMemcpyHostToDevice));
  Dev<bf16> d(size_t(groups * max_m * n));
  const auto launch = [&](const kernels::GemmTileConfig* force, int i) {
    kernels::fp8_gemm_nt_grouped_masked(fs[i].a.p, fs[i].sa.p, fs[i].b.p, fs[i].sb.p, d.p, dm.p,
                                        groups, max_m, n, k, stream, force);
  };
  const Row r{"grouped_masked",
              "fp8moe",
              out.tile_for(kernels::GemmKind::kGroupedMasked, max_m, n, k, groups),
              max_m,
              n,
              k,
              groups,
              0,
              0,
              0};
  time_grouped(out, stream, sets, r, flops, bytes + 2.0 * groups * max_m * n, d, launch);
}

// The weight-gradient anchor: cuBLASLt FP8 with FP32 output accumulated into D (beta = 1),
// both operands scaled per 1x128 (VEC128_32F, the same contract as ours) where this cuBLASLt has
// an algorithm for it, else per-tensor scales (no promotion: cuBLASLt's fastest FP8 form).
// Operands are K-slices [k0, k0 + k) of rows `ld_k` long, so one plan serves a k-grouped launch.
void make_wgrad_plan(Lt& lt, LtPlan& plan, bool vec128, int64_t m, int64_t n, int64_t k,
                     int64_t ld_k) {
  CHECK_CUBLAS(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  set_transposes(plan);
  if (vec128) {
    const int32_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    CHECK_CUBLAS(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode,
                                                sizeof(mode)));
    CHECK_CUBLAS(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode,
                                                sizeof(mode)));
  }
  CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&plan.la, CUDA_R_8F_E4M3, k, n, ld_k));
  CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&plan.lb, CUDA_R_8F_E4M3, k, m, ld_k));
  CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&plan.ld, CUDA_R_32F, n, m, n));
  find_algorithm(lt, plan);
}

// D += A * B^T for the K-slice [k0, k0 + k) of an operand set (scales [K/128][rows], rows
// fastest: per 1x128 block, the layout VEC128_32F reads; `ones` for the per-tensor fallback).
void run_wgrad_plan(Lt& lt, const LtPlan& plan, bool vec128, const Fp8Set& f, int64_t m, int64_t n,
                    int64_t k0, const float* ones, float* d, cudaStream_t s) {
  const float* sw = vec128 ? f.sb.p + (k0 / 128) * padded_rows(n) : ones;
  const float* sx = vec128 ? f.sa.p + (k0 / 128) * padded_rows(m) : ones;
  CHECK_CUBLAS(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sw,
                                              sizeof(sw)));
  CHECK_CUBLAS(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sx,
                                              sizeof(sx)));
  const float alpha = 1.0f, beta = 1.0f;
  CHECK_CUBLAS(cublasLtMatmul(lt.handle, plan.desc, &alpha, f.b.p + k0, plan.la, f.a.p + k0,
                              plan.lb, &beta, d, plan.ld, d, plan.ld, &plan.algo, lt.workspace.p,
                              lt.workspace.n, s));
}

double rel_diff_f32(const std::vector<float>& x, const std::vector<float>& y) {
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    num += (double(x[i]) - y[i]) * (double(x[i]) - y[i]);
    den += double(y[i]) * y[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

void bench_wgrad(Output& out, Lt& lt, cudaStream_t stream, int64_t m, int64_t n, int64_t k,
                 int64_t groups, uint64_t seed) {
  // k-grouped when groups > 1: K = groups x k tokens side by side.
  const int64_t kt = k * groups;
  const double flops = 2.0 * m * n * kt;
  const int64_t bytes = m * kt + n * kt;
  const int sets = sets_for(bytes);
  std::vector<Fp8Set> fs;
  for (int i = 0; i < sets; ++i) fs.push_back(make_fp8_set(m, n, kt, 1, seed + 100 * i, true));
  Dev<float> d(size_t(groups * m * n));
  FM_CHECK_CUDA(cudaMemset(d.p, 0, d.n * 4));
  std::vector<int64_t> ks(size_t(groups), k);
  // The pick, then both epilogues forced on 128x128 (1: registers, 2: TMA reduce-add), then
  // FP8MOE_BENCH_WGRAD_TILES (parse_tile_list's tokens; b: CTA pairs, dense form only).
  std::vector<kernels::GemmTileConfig> forced = {kernels::GemmTileConfig{128, 128, 0, 0, 1},
                                                 kernels::GemmTileConfig{128, 128, 0, 0, 2}};
  if (const char* list = std::getenv("FP8MOE_BENCH_WGRAD_TILES"))
    for (const kernels::GemmTileConfig& c : parse_tile_list(list)) forced.push_back(c);
  const auto ours_with = [&](const kernels::GemmTileConfig* force, int i) {
    if (groups == 1)
      kernels::fp8_gemm_nt_wgrad(fs[i].a.p, fs[i].sa.p, fs[i].b.p, fs[i].sb.p, d.p, m, n, k, stream,
                                 force);
    else
      kernels::fp8_gemm_nt_kgrouped_wgrad(fs[i].a.p, fs[i].sa.p, fs[i].b.p, fs[i].sb.p, d.p, m, n,
                                          ks, stream, force);
  };
  const auto ours = [&](int i) { ours_with(nullptr, i); };
  bool vec128 = true;
  auto owned = std::make_unique<LtPlan>();
  make_wgrad_plan(lt, *owned, true, m, n, k, kt);
  std::string anchor = "cublaslt_fp8_1x128";
  if (!owned->ok) {
    std::printf("  cuBLASLt 1x128 x 1x128 FP32-out: %s; anchor: per-tensor FP8\n",
                owned->why.c_str());
    vec128 = false;
    owned = std::make_unique<LtPlan>();
    make_wgrad_plan(lt, *owned, false, m, n, k, kt);
    anchor = "cublaslt_fp8_tensor";
  }
  const LtPlan& plan = *owned;
  Dev<float> ones(1);
  {
    const float one = 1.0f;
    FM_CHECK_CUDA(cudaMemcpy(ones.p, &one, 4, cudaMemcpyHostToDevice));
  }
  const auto theirs = [&](int i) {
    for (int64_t g = 0; g < groups; ++g)
      run_wgrad_plan(lt, plan, vec128, fs[size_t(i)], m, n, g * k, ones.p, d.p + g * m * n, stream);
  };
  // Alternated rounds (ours, the forced epilogues, the anchor) so that all see the same clocks.
  std::vector<double> us_ours, us_lt;
  std::vector<std::vector<double>> us_forced(forced.size());
  for (int round = 0; round < 3; ++round) {
    us_ours.push_back(time_us(stream, sets, ours));
    for (size_t j = 0; j < forced.size(); ++j)
      us_forced[j].push_back(time_us(stream, sets, [&](int i) { ours_with(&forced[j], i); }));
    if (plan.ok) us_lt.push_back(time_us(stream, sets, theirs));
  }
  std::sort(us_ours.begin(), us_ours.end());
  std::sort(us_lt.begin(), us_lt.end());
  const double t_ours = median_or_none(us_ours);
  Row r{groups == 1 ? "wgrad" : "kgrouped_wgrad",
        "fp8moe",
        out.tile_for(groups == 1 ? kernels::GemmKind::kWgrad : kernels::GemmKind::kKGroupedWgrad, m,
                     n, k, groups),
        m,
        n,
        kt,
        groups,
        t_ours,
        flops / t_ours * 1e-6,
        (bytes + 8.0 * groups * m * n) / t_ours * 1e-3};
  if (!plan.ok) {
    r.note = "no cuBLASLt anchor: " + plan.why;
    out.add(r);
    return;
  }
  // One launch of each from the same C (random, not zeros): the outputs' relative difference.
  // (The copies go on `stream`, a non-blocking stream that the default one does not order.)
  Dev<float> c0 = random_floats(groups * m, n, seed + 77);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  const auto reset_d = [&] {
    FM_CHECK_CUDA(cudaMemcpyAsync(d.p, c0.p, d.n * 4, cudaMemcpyDeviceToDevice, stream));
  };
  reset_d();
  ours(0);
  FM_CHECK_CUDA(cudaStreamSynchronize(stream));
  const std::vector<float> got = d.download();
  reset_d();
  theirs(0);
  FM_CHECK_CUDA(cudaStreamSynchronize(stream));
  const std::vector<float> want = d.download();
  const double t_lt = median_or_none(us_lt);
  r.ratio_blockwise = t_lt / t_ours;
  if (vec128) r.rel_diff_blockwise = rel_diff_f32(got, want);
  r.anchor = anchor;
  out.add(r);
  for (size_t j = 0; j < forced.size(); ++j) {
    std::vector<double> u = us_forced[j];
    std::sort(u.begin(), u.end());
    Row f = r;
    f.impl = "fp8moe_forced_tile";
    f.tile = kernels::describe_tile_config(forced[j]);
    f.us = median_or_none(u);
    f.tflops = flops / f.us * 1e-6;
    f.gbps = (bytes + 8.0 * groups * m * n) / f.us * 1e-3;
    f.ratio_blockwise = t_lt / f.us;
    reset_d();
    ours_with(&forced[j], 0);
    FM_CHECK_CUDA(cudaStreamSynchronize(stream));
    const std::vector<float> forced_out = d.download();
    f.rel_diff_blockwise = vec128 ? rel_diff_f32(forced_out, want) : -1;
    f.rel_diff_pick = rel_diff_f32(forced_out, got);
    out.add(f);
  }
  Row a{r.kind,
        anchor,
        "",
        m,
        n,
        kt,
        groups,
        t_lt,
        flops / t_lt * 1e-6,
        (bytes + 8.0 * groups * m * n) / t_lt * 1e-3};
  out.add(a);
}

}  // namespace

// A handful of launches of one dense shape for a profiler (ncu): ours (heuristic pick, then
// 128x128 with the registers epilogue, then with FP8MOE_BENCH_PAIRS set its CTA-pair form), then
// cuBLASLt blockwise and per-tensor on the same data. No timing, no checks.
void profile_dense(Lt& lt, cudaStream_t stream, int64_t m, int64_t n, int64_t k) {
  Fp8Set f = make_fp8_set(m, n, k, 1, 7);
  Dev<bf16> d(size_t(m * n));
  kernels::fp8_gemm_nt(f.a.p, f.sa.p, f.b.p, f.sb.p, d.p, m, n, k, stream);
  const kernels::GemmTileConfig c{128, 128, 0, 0, 1, 1};
  kernels::fp8_gemm_nt(f.a.p, f.sa.p, f.b.p, f.sb.p, d.p, m, n, k, stream, &c);
  // CTA pairs (B multicast), when asked for: their L2 traffic is 3/4 of single CTAs'.
  if (std::getenv("FP8MOE_BENCH_PAIRS") != nullptr) {
    const kernels::GemmTileConfig pair{128, 128, 0, 0, 1, 2};
    kernels::fp8_gemm_nt(f.a.p, f.sa.p, f.b.p, f.sb.p, d.p, m, n, k, stream, &pair);
  }
  // Forced configurations (parse_tile_list's tokens; pdl-on rows only), with a workspace.
  if (const char* list = std::getenv("FP8MOE_BENCH_PROFILE_TILES")) {
    std::vector<kernels::GemmTileConfig> cs;
    int64_t ws_bytes = 256;
    for (const kernels::GemmTileConfig& c : parse_tile_list(list))
      if (c.pdl == 2) {
        cs.push_back(c);
        ws_bytes = std::max(ws_bytes, kernels::fp8_gemm_workspace_bytes(m, n, k, &c));
      }
    Dev<uint8_t> ws{static_cast<size_t>(ws_bytes)};
    FM_CHECK_CUDA(cudaMemset(ws.p, 0, ws.n));
    for (const kernels::GemmTileConfig& c : cs)
      kernels::fp8_gemm_nt(f.a.p, f.sa.p, f.b.p, f.sb.p, d.p, m, n, k, stream, &c,
                           kernels::GemmWorkspace{ws.p, ws.n});
    FM_CHECK_CUDA(cudaStreamSynchronize(stream));
  }
  const Dev<float> sb_lt = lt_block_scales(f.sb, n, k);
  LtPlan block;
  make_plan(lt, block, Anchor::kFp8Blockwise, m, n, k, sb_lt.p, f.sa.p);
  if (block.ok) run_plan(lt, block, f.b.p, f.a.p, d.p, stream);
  Dev<float> one(1);
  const float v = 1.0f;
  FM_CHECK_CUDA(cudaMemcpy(one.p, &v, 4, cudaMemcpyHostToDevice));
  LtPlan tensor;
  make_plan(lt, tensor, Anchor::kFp8Tensor, m, n, k, one.p, one.p);
  if (tensor.ok) run_plan(lt, tensor, f.b.p, f.a.p, d.p, stream);
  FM_CHECK_CUDA(cudaStreamSynchronize(stream));
}

// Programmatic dependent launch in graphs: captures two back-to-back launches of cuBLASLt
// blockwise, of ours with pdl on and of ours with pdl off, and prints each graph's nodes and edge
// types (programmatic edges: the second launch may begin before the first ends).
void pdl_probe(Lt& lt, cudaStream_t stream, int64_t m, int64_t n, int64_t k, const Output& out) {
  Fp8Set f = make_fp8_set(m, n, k, 1, 7);
  Dev<bf16> d(size_t(m * n));
  const Dev<float> sb_lt = lt_block_scales(f.sb, n, k);
  LtPlan block;
  make_plan(lt, block, Anchor::kFp8Blockwise, m, n, k, sb_lt.p, f.sa.p);
  kernels::GemmShape shape{kernels::GemmKind::kDense, m, n, k, 1};
  const kernels::GemmTileConfig pick =
      kernels::choose_gemm_tile(shape, out.num_sms, out.smem, out.dram);
  kernels::GemmTileConfig on = pick, off = pick;
  on.pdl = 2;
  off.pdl = 1;
  const auto probe = [&](const char* what, const std::function<void()>& launch) {
    launch();  // plans and lazy loading outside the capture
    FM_CHECK_CUDA(cudaStreamSynchronize(stream));
    cudaGraph_t graph;
    FM_CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
    launch();
    launch();
    FM_CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
    size_t nodes = 0, edges = 0;
    FM_CHECK_CUDA(cudaGraphGetNodes(graph, nullptr, &nodes));
    FM_CHECK_CUDA(cudaGraphGetEdges(graph, nullptr, nullptr, nullptr, &edges));
    std::vector<cudaGraphNode_t> from(edges), to(edges);
    std::vector<cudaGraphEdgeData> data(edges);
    if (edges > 0)
      FM_CHECK_CUDA(cudaGraphGetEdges(graph, from.data(), to.data(), data.data(), &edges));
    std::printf("pdl probe %s m=%lld n=%lld k=%lld: %zu nodes, %zu edges:", what, (long long)m,
                (long long)n, (long long)k, nodes, edges);
    for (const cudaGraphEdgeData& e : data)
      std::printf(" [type %d from_port %d to_port %d]", int(e.type), int(e.from_port),
                  int(e.to_port));
    std::printf("\n");
    FM_CHECK_CUDA(cudaGraphDestroy(graph));
  };
  if (block.ok)
    probe("cublaslt_blockwise", [&] { run_plan(lt, block, f.b.p, f.a.p, d.p, stream); });
  probe("fp8moe pdl on",
        [&] { kernels::fp8_gemm_nt(f.a.p, f.sa.p, f.b.p, f.sb.p, d.p, m, n, k, stream, &on); });
  probe("fp8moe pdl off",
        [&] { kernels::fp8_gemm_nt(f.a.p, f.sa.p, f.b.p, f.sb.p, d.p, m, n, k, stream, &off); });
}

// Two launches of the grouped contiguous heuristic pick (equal experts) for a profiler.
void profile_contiguous(cudaStream_t stream, int64_t groups, int64_t rows, int64_t n, int64_t k) {
  const int64_t m = groups * rows;
  Fp8Set f = make_fp8_set(m, n, k, groups, 11);
  std::vector<int32_t> layout(static_cast<size_t>(m));
  for (int64_t r = 0; r < m; ++r) layout[size_t(r)] = int32_t(r / rows);
  Dev<int32_t> dl(static_cast<size_t>(m));
  FM_CHECK_CUDA(cudaMemcpy(dl.p, layout.data(), size_t(m) * 4, cudaMemcpyHostToDevice));
  Dev<bf16> d(size_t(m * n));
  for (int i = 0; i < 2; ++i)
    kernels::fp8_gemm_nt_grouped_contiguous(f.a.p, f.sa.p, f.b.p, f.sb.p, d.p, dl.p, m, n, k,
                                            groups, stream);
  FM_CHECK_CUDA(cudaStreamSynchronize(stream));
}

int main(int argc, char** argv) {
  std::string out_path, only;
  std::vector<int64_t> ms = {4096, 128, 64};
  bool quick = false;
  int64_t profile_shape[3] = {0, 0, 0};
  int64_t probe_shape[3] = {0, 0, 0};
  int64_t contiguous_shape[4] = {0, 0, 0, 0};
  int64_t gathered_shape[4] = {0, 0, 0, 0};
  std::vector<std::array<int64_t, 2>> nk_list;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--out" && i + 1 < argc)
      out_path = argv[++i];
    else if (a == "--only" && i + 1 < argc)
      only = argv[++i];
    else if (a == "--m" && i + 1 < argc) {
      // Comma-separated row counts, e.g. --m 128,64.
      ms.clear();
      std::string list = argv[++i];
      for (size_t pos = 0; pos < list.size();) {
        const size_t comma = std::min(list.find(',', pos), list.size());
        ms.push_back(std::atoll(list.substr(pos, comma - pos).c_str()));
        pos = comma + 1;
      }
    } else if (a == "--quick")
      quick = true;
    else if (a == "--profile" && i + 3 < argc) {
      for (int j = 0; j < 3; ++j) profile_shape[j] = std::atoll(argv[++i]);
    } else if (a == "--pdl-probe" && i + 3 < argc) {
      for (int j = 0; j < 3; ++j) probe_shape[j] = std::atoll(argv[++i]);
    } else if (a == "--profile-contiguous" && i + 4 < argc) {
      for (int j = 0; j < 4; ++j) contiguous_shape[j] = std::atoll(argv[++i]);
    } else if (a == "--profile-gathered" && i + 4 < argc) {
      for (int j = 0; j < 4; ++j) gathered_shape[j] = std::atoll(argv[++i]);
    } else if (a == "--nk" && i + 1 < argc) {
      // Comma-separated NxK dense shapes instead of the DeepSeek-V3 list, e.g. 256x128,7168x2048.
      const std::string list = argv[++i];
      for (size_t pos = 0; pos < list.size();) {
        const size_t comma = std::min(list.find(',', pos), list.size());
        const std::string t = list.substr(pos, comma - pos);
        const size_t x = t.find('x');
        if (x != std::string::npos)
          nk_list.push_back(
              {std::atoll(t.substr(0, x).c_str()), std::atoll(t.substr(x + 1).c_str())});
        pos = comma + 1;
      }
    } else {
      std::fprintf(
          stderr,
          "usage: gemm_bench [--out FILE.jsonl] [--only "
          "dense|grouped|contiguous|gathered|masked|wgrad] "
          "[--m 4096,128,64] "
          "[--quick] [--profile M N K] [--pdl-probe M N K] [--profile-contiguous G ROWS N K] "
          "[--profile-gathered G ROWS N K] "
          "[--nk NxK,...]\n");
      return 2;
    }
  }
  try {
    cudaDeviceProp prop{};
    FM_CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
    Output out;
    out.gpu = prop.name;
    out.num_sms = prop.multiProcessorCount;
    out.smem = int64_t(prop.sharedMemPerBlockOptin);
    {
      int mem_khz = 0, bus_bits = 0;
      FM_CHECK_CUDA(cudaDeviceGetAttribute(&mem_khz, cudaDevAttrMemoryClockRate, 0));
      FM_CHECK_CUDA(cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, 0));
      if (mem_khz > 0 && bus_bits > 0) out.dram = kernels::gemm_dram_bytes_per_s(mem_khz, bus_bits);
    }
    g_clock.open(0);
    if (const char* c = std::getenv("FP8MOE_COMMIT")) out.commit = c;
    if (!out_path.empty()) {
      out.file.open(out_path);
      FM_CHECK_ARG(out.file.good(), "cannot write ", out_path);
    }
    int lt_version = int(cublasLtGetVersion());
    std::printf(
        "gemm_bench on %s (%d SMs, heuristic DRAM %.2f TB/s), cuBLASLt %d, %s, NVML clocks %s\n",
        prop.name, prop.multiProcessorCount, out.dram * 1e-12, lt_version, out.date.c_str(),
        g_clock.ok() ? "on" : "off");
    cudaStream_t stream;
    FM_CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    Lt lt;
    if (profile_shape[0] > 0) {
      profile_dense(lt, stream, profile_shape[0], profile_shape[1], profile_shape[2]);
      return 0;
    }
    if (probe_shape[0] > 0) {
      pdl_probe(lt, stream, probe_shape[0], probe_shape[1], probe_shape[2], out);
      return 0;
    }
    if (contiguous_shape[0] > 0) {
      profile_contiguous(stream, contiguous_shape[0], contiguous_shape[1], contiguous_shape[2],
                         contiguous_shape[3]);
      return 0;
    }
    if (gathered_shape[0] > 0) {
      // One launch of the contiguous GEMM, the gathered one and each extra record layout, for ncu.
      bench_gathered(out, stream, gathered_shape[0], gathered_shape[1], gathered_shape[2],
                     gathered_shape[3], 11, true);
      return 0;
    }
    if (nk_list.empty())
      nk_list = {{2112, 7168},  {24576, 1536}, {32768, 512},
                 {7168, 16384}, {4096, 7168},  {7168, 2048}};
    const auto& nk = nk_list;
    uint64_t seed = 1;
    if (only.empty() || only == "dense") {
      for (int64_t m : ms) {
        if (quick && m != 4096) continue;
        for (const auto& s : nk) {
          seed += 1000;
          if (m < 1024)
            bench_dense_small(out, lt, stream, m, s[0], s[1], seed);
          else
            bench_dense(out, lt, stream, m, s[0], s[1], seed);
        }
      }
    }
    // --only contiguous / masked: one grouped form.
    const bool contiguous = only.empty() || only == "grouped" || only == "contiguous";
    const bool masked = only.empty() || only == "grouped" || only == "masked";
    // --only gathered: the gathered contiguous GEMM beside the contiguous one (same run).
    const bool gathered = only.empty() || only == "grouped" || only == "gathered";
    if (contiguous || masked || gathered) {
      for (const auto& s :
           {std::array<int64_t, 2>{4096, 7168}, std::array<int64_t, 2>{7168, 2048}}) {
        if (contiguous) {
          bench_contiguous(out, stream, 4, 8192, s[0], s[1], seed += 1000);
          bench_contiguous(out, stream, 8, 4096, s[0], s[1], seed += 1000);
        }
        if (gathered) {
          bench_gathered(out, stream, 4, 8192, s[0], s[1], seed += 1000);
          bench_gathered(out, stream, 8, 4096, s[0], s[1], seed += 1000);
        }
        if (masked) {
          bench_masked(out, stream, 1, 1024, s[0], s[1], seed += 1000);
          bench_masked(out, stream, 2, 512, s[0], s[1], seed += 1000);
          bench_masked(out, stream, 4, 256, s[0], s[1], seed += 1000);
        }
      }
    }
    if (only.empty() || only == "wgrad") {
      bench_wgrad(out, lt, stream, 7168, 2048, 4096, 1, seed += 1000);
      bench_wgrad(out, lt, stream, 2048, 7168, 4096, 1, seed += 1000);
      bench_wgrad(out, lt, stream, 7168, 2048, 4096, 4, seed += 1000);
    }
    FM_CHECK_CUDA(cudaStreamDestroy(stream));
    return 0;
  } catch (const fp8moe::Error& e) {
    std::fprintf(stderr, "gemm_bench: %s\n", e.what());
    return e.kind() == fp8moe::ErrorKind::kInvalidArgument ? 2 : 1;
  }
}
