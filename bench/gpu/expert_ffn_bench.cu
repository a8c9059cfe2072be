// The routed experts' FFN on one GPU (moe/expert_ffn_gpu.h): ExpertFfnGpu::forward_contiguous and
// backward_contiguous, each timed whole and step by step, against the naive composition of the
// same run:
//   forward  naive = up GEMM -> a plain BF16 SwiGLU kernel written here (h to BF16) ->
//            kernels::quantize_1x128 of h -> down GEMM;
//   backward naive = the library's steps with a plain elementwise SwiGLU backward (+ a per-row
//            pass for d_row_scale) and the h recompute as naive SwiGLU + quantize_1x128.
// Shapes: V3 routed experts of one EP rank (H 7168, I 2048): a) 4 experts x 8192 rows, b) 32 x
// 1024, c) 128 experts with random counts in [193, 319] (about 32768 / 128), each padded to 128
// (the dispatch's layout), d) the tests' 4 experts with {0, 1, 130, 300} rows (768 rows, 431 real).
// Row scale (the router's weight) on, d_row_scale on, 1x128 scales not pow2.
// Data: weights, transposes and x are random E4M3 codes (no NaN codes) written on the device with
// constant scales; dy random BF16 in about [-4, 4]; the values do not matter to the times.
// Timing: every op (whole call, each step, each naive form) is captured once into a CUDA graph;
// a replay = an L2 flush (a kernel reading 256 MB, outside the timed interval), then a gate kernel
// (bench/gpu/gated_timing.cuh), start event, the graph, end event, the gate opened: so each
// replay starts from a cold L2 and no host launch latency. Median of --reps replays, the graphs
// interleaved replay by replay. TFLOPS = the GEMMs' flops on the real rows / time (forward
// 2 r (2IH + HI), backward twice that). The wgrads accumulate into dW over the replays (+=).
// Correctness is the tests' job (test_moe_gpu --gtest_filter='ExpertFfn*').
// Run: expert_ffn_bench [--out rows.jsonl] [--reps 20] [--shapes abcd] [--no-gate] [--date D]
//      [--commit C]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "bench_args.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/kernels/fp8_gemm.h"
#include "fp8moe/kernels/quantize.h"
#include "fp8moe/kernels/requantize.h"
#include "fp8moe/kernels/swiglu.h"
#include "fp8moe/moe/expert_ffn_gpu.h"
#include "gated_timing.cuh"
#include "naive_swiglu.cuh"

namespace {

using namespace fp8moe;
using kernels::ScaleLayout;

using namespace fp8moe::bench;  // the naive anchors (naive_swiglu.cuh)

// The backward's step 1 as the library writes it (src/moe/expert_ffn_gpu.cu, file-local there):
// dst row r = src row r where grouped_layout[r] >= 0, else zeros; 8 BF16 a thread.
__global__ void copy_real_rows_kernel(const bf16* src, const int32_t* grouped_layout,
                                      int64_t vectors_per_row, int64_t vectors, bf16* dst) {
  const int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v >= vectors) return;
  const bool real = __ldg(grouped_layout + v / vectors_per_row) >= 0;
  reinterpret_cast<uint4*>(dst)[v] =
      real ? __ldg(reinterpret_cast<const uint4*>(src) + v) : make_uint4(0, 0, 0, 0);
}

// ---- data and the L2 flush ----
__global__ void fill_bf16_kernel(bf16* x, int64_t n, uint64_t seed) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // Values in about [-4, 4]: sign, exponent 2^-2..2^1, random mantissa.
    const uint32_t bits = philox_u32(seed, 3, static_cast<uint64_t>(i));
    x[i] = bf16{static_cast<uint16_t>(0x3E80u + (bits & 0x1FFu) + ((bits >> 9) & 0x8000u))};
  }
}

// Random E4M3 codes, 4 a thread step (n a multiple of 4); the NaN codes 0x7F / 0xFF become 0x7E /
// 0xFE.
__global__ void fill_e4m3_kernel(uint8_t* p, int64_t n, uint64_t seed) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n / 4;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t bits = philox_u32(seed, 5, static_cast<uint64_t>(i));
    for (int b = 0; b < 4; ++b)
      if (((bits >> (8 * b)) & 0x7Fu) == 0x7Fu) bits ^= 1u << (8 * b);
    reinterpret_cast<uint32_t*>(p)[i] = bits;
  }
}

__global__ void fill_f32_kernel(float* p, int64_t n, float value) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    p[i] = value;
}

// Reads n uint4 (clean lines: nothing to write back while the timed region runs).
__global__ void flush_kernel(const uint4* p, int64_t n, uint32_t* sink) {
  uint32_t acc = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint4 v = __ldcg(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9E3779B9u) *sink = acc;  // practically never: keeps the loads
}

constexpr unsigned kFillBlocks = 4096;

struct Rank {  // gated_timing.cuh's rank: one device
  int device = 0;
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, end = nullptr;
};

struct Shape {
  const char* name;
  std::vector<int64_t> counts;  // real rows per expert
};

struct Options {
  std::string out, shapes = "abcd", date = "unknown", commit = "unknown";
  int reps = 20;
  bool gate = true;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Device allocations of one shape, freed together.
class Arena {
 public:
  ~Arena() {
    for (void* p : ptrs_) cudaFree(p);
  }
  template <class T>
  T* get(int64_t n) {
    void* p = nullptr;
    FM_CHECK_CUDA(cudaMalloc(&p, std::max<int64_t>(n, 1) * sizeof(T)));
    ptrs_.push_back(p);
    return static_cast<T*>(p);
  }

 private:
  std::vector<void*> ptrs_;
};

cudaGraphExec_t capture(cudaStream_t stream, const std::function<void()>& enqueue) {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  FM_CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  enqueue();
  FM_CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
  FM_CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  FM_CHECK_CUDA(cudaGraphDestroy(graph));
  return exec;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Options o;
    bench::parse_flags(argc, argv, "expert_ffn_bench",
                       {{"--out", [&](const std::string& v) { o.out = v; }},
                        {"--reps", [&](const std::string& v) { o.reps = std::stoi(v); }},
                        {"--shapes", [&](const std::string& v) { o.shapes = v; }},
                        {"--no-gate", [&](const std::string&) { o.gate = false; }, false},
                        {"--date", [&](const std::string& v) { o.date = v; }},
                        {"--commit", [&](const std::string& v) { o.commit = v; }}});
    FM_CHECK_ARG(o.reps >= 1, "expert_ffn_bench: --reps ", o.reps);
    std::vector<Rank> ranks(1);
    Rank& rk = ranks[0];
    FM_CHECK_CUDA(cudaGetDevice(&rk.device));
    cudaDeviceProp prop{};
    FM_CHECK_CUDA(cudaGetDeviceProperties(&prop, rk.device));
    bench::create_timed_stream(rk);
    cudaStream_t stream = rk.stream;
    int* gate_flag = bench::alloc_gate_flag();
    int gate_value = 0;
    std::FILE* f = o.out.empty() ? nullptr : std::fopen(o.out.c_str(), "w");
    FM_CHECK(o.out.empty() || f != nullptr, "expert_ffn_bench: cannot open ", o.out);

    // The L2 flush: 256 MB read before every replay (H100 / H200 L2: 50 MB).
    const int64_t flush_vectors = (int64_t{256} << 20) / 16;
    uint4* flush_buf = nullptr;
    uint32_t* sink = nullptr;
    FM_CHECK_CUDA(cudaMalloc(&flush_buf, flush_vectors * 16));
    FM_CHECK_CUDA(cudaMalloc(&sink, sizeof(uint32_t)));
    FM_CHECK_CUDA(cudaMemset(flush_buf, 0, flush_vectors * 16));
    const auto replay_us = [&](cudaGraphExec_t exec) {
      flush_kernel<<<prop.multiProcessorCount * 4, 512, 0, stream>>>(flush_buf, flush_vectors,
                                                                     sink);
      FM_CHECK_LAUNCH();
      return bench::gated_slowest_us(ranks, gate_flag, gate_value, o.gate,
                                     [&] { FM_CHECK_CUDA(cudaGraphLaunch(exec, stream)); });
    };

    std::printf(
        "expert_ffn_bench on %s (%d SMs): H 7168 x I 2048, graph replays from a cold L2, "
        "median of %d\n",
        prop.name, prop.multiProcessorCount, o.reps);
    std::printf("  %-6s %-8s %-7s %-18s %10s %8s %7s\n", "shape", "op", "impl", "step", "us",
                "TFLOPS", "share");

    const int64_t H = 7168, I = 2048, I2 = 2 * I;
    std::vector<Shape> shapes;
    if (o.shapes.find('a') != std::string::npos)
      shapes.push_back({"a", std::vector<int64_t>(4, 8192)});
    if (o.shapes.find('b') != std::string::npos)
      shapes.push_back({"b", std::vector<int64_t>(32, 1024)});
    if (o.shapes.find('c') != std::string::npos) {
      std::vector<int64_t> counts(128);
      for (int64_t g = 0; g < 128; ++g) counts[g] = 193 + philox_u32(19, 1, g) % 127;
      shapes.push_back({"c", counts});
    }
    if (o.shapes.find('d') != std::string::npos) shapes.push_back({"d", {0, 1, 130, 300}});

    for (const Shape& s : shapes) {
      const int64_t G = static_cast<int64_t>(s.counts.size());
      std::vector<int64_t> expert_rows;
      std::vector<int32_t> layout_h;
      int64_t real = 0;
      for (int64_t g = 0; g < G; ++g) {
        expert_rows.push_back((s.counts[g] + 127) / 128 * 128);
        for (int64_t r = 0; r < expert_rows.back(); ++r)
          layout_h.push_back(r < s.counts[g] ? static_cast<int32_t>(g) : -1);
        real += s.counts[g];
      }
      const int64_t rows = static_cast<int64_t>(layout_h.size()), pR = padded_rows(rows);
      Arena A;
      // Weights (ExpertWeightsGpu's layouts) and their transposes.
      ExpertWeightsGpu w;
      w.groups = G;
      w.hidden = H;
      w.inter = I;
      uint8_t* w13 = A.get<uint8_t>(G * I2 * H);
      uint8_t* w2 = A.get<uint8_t>(G * H * I);
      uint8_t* w13t = A.get<uint8_t>(G * H * I2);
      uint8_t* w2t = A.get<uint8_t>(G * I * H);
      float* s13 = A.get<float>(G * (I2 / 128) * (H / 128));
      float* s2 = A.get<float>(G * (H / 128) * (I / 128));
      float* s13t = A.get<float>(G * (H / 128) * (I2 / 128));
      float* s2t = A.get<float>(G * (I / 128) * (H / 128));
      w.w13 = w13;
      w.w2 = w2;
      w.w13t = w13t;
      w.w2t = w2t;
      w.s13 = s13;
      w.s2 = s2;
      w.s13t = s13t;
      w.s2t = s2t;
      // Activations and gradients.
      uint8_t* x = A.get<uint8_t>(rows * H);
      float* sa = A.get<float>((H / 128) * pR);
      int32_t* layout = A.get<int32_t>(rows);
      float* rs = A.get<float>(rows);
      float* drs = A.get<float>(rows);
      bf16* gate_up = A.get<bf16>(rows * I2);
      bf16* y = A.get<bf16>(rows * H);
      bf16* dy = A.get<bf16>(rows * H);
      bf16* dx = A.get<bf16>(rows * H);
      float* dw13 = A.get<float>(G * I2 * H);
      float* dw2 = A.get<float>(G * H * I);
      // The steps' own buffers (the breakdown and the naive forms; ExpertFfnGpu's are private).
      bf16* hb = A.get<bf16>(rows * I);
      uint8_t* hq = A.get<uint8_t>(rows * I);
      float* hs = A.get<float>((I / 128) * pR);
      bf16* y2 = A.get<bf16>(rows * H);
      bf16* dyc = A.get<bf16>(rows * H);
      uint8_t* dy8 = A.get<uint8_t>(rows * H);
      float* dy8s = A.get<float>((H / 128) * pR);
      uint8_t* dyt = A.get<uint8_t>(H * rows);
      float* dyts = A.get<float>((rows / 128) * padded_rows(H));
      bf16* dh = A.get<bf16>(rows * I);
      bf16* dgu = A.get<bf16>(rows * I2);
      uint8_t* dgu8 = A.get<uint8_t>(rows * I2);
      float* dgu8s = A.get<float>((I2 / 128) * pR);
      uint8_t* dgut = A.get<uint8_t>(I2 * rows);
      float* dguts = A.get<float>((rows / 128) * padded_rows(I2));
      uint8_t* ht = A.get<uint8_t>(I * rows);
      float* hts = A.get<float>((rows / 128) * padded_rows(I));
      uint8_t* xt = A.get<uint8_t>(H * rows);
      float* xts = A.get<float>((rows / 128) * padded_rows(H));
      bf16* dx2 = A.get<bf16>(rows * H);

      uint64_t seed = 1000;
      for (auto [p, n] :
           {std::pair{w13, G * I2 * H}, std::pair{w2, G * H * I}, std::pair{w13t, G * H * I2},
            std::pair{w2t, G * I * H}, std::pair{x, rows * H}}) {
        fill_e4m3_kernel<<<kFillBlocks, 256, 0, stream>>>(p, n, ++seed);
        FM_CHECK_LAUNCH();
      }
      // Weight codes up to 448 at scale 2^-10; x codes at 2^-6 (|x| <= 7).
      for (auto [p, n, v] :
           {std::tuple{s13, G * (I2 / 128) * (H / 128), 1.0f / 1024},
            std::tuple{s2, G * (H / 128) * (I / 128), 1.0f / 1024},
            std::tuple{s13t, G * (H / 128) * (I2 / 128), 1.0f / 1024},
            std::tuple{s2t, G * (I / 128) * (H / 128), 1.0f / 1024},
            std::tuple{sa, (H / 128) * pR, 1.0f / 64}, std::tuple{rs, rows, 0.125f},
            std::tuple{dw13, G * I2 * H, 0.0f}, std::tuple{dw2, G * H * I, 0.0f}}) {
        fill_f32_kernel<<<kFillBlocks, 256, 0, stream>>>(p, n, v);
        FM_CHECK_LAUNCH();
      }
      fill_bf16_kernel<<<kFillBlocks, 256, 0, stream>>>(dy, rows * H, ++seed);
      FM_CHECK_LAUNCH();
      FM_CHECK_CUDA(cudaMemsetAsync(gate_up, 0, rows * I2 * sizeof(bf16), stream));
      FM_CHECK_CUDA(cudaMemcpyAsync(layout, layout_h.data(), rows * sizeof(int32_t),
                                    cudaMemcpyHostToDevice, stream));
      FM_CHECK_CUDA(cudaStreamSynchronize(stream));

      ExpertFfnGpu ffn(rows, H, I, ExpertFfnOptions{false, true});
      kernels::SwigluRows which;
      which.grouped_layout = layout;
      constexpr auto kMn = ScaleLayout::kMnMajor;
      const auto grid8 = [](int64_t n8) { return static_cast<unsigned>((n8 + 255) / 256); };

      // Each step as a launch sequence (the library's arguments, src/moe/expert_ffn_gpu.cu).
      const auto up_gemm = [&] {
        kernels::fp8_gemm_nt_grouped_contiguous(x, sa, w13, s13, gate_up, layout, rows, I2, H, G,
                                                stream);
      };
      const auto swiglu_q = [&] {
        kernels::swiglu_quantize_1x128(gate_up, I2, rows, I, rs, which, false, hq, I, hs, kMn,
                                       stream);
      };
      const auto naive_swiglu = [&] {
        naive_swiglu_kernel<<<grid8(rows * I / 8), 256, 0, stream>>>(gate_up, rows, I, rs, hb);
        FM_CHECK_LAUNCH();
      };
      const auto naive_quant = [&] {
        kernels::quantize_1x128(hb, rows, I, I, false, hq, I, hs, kMn, stream);
      };
      const auto down_gemm = [&] {
        kernels::fp8_gemm_nt_grouped_contiguous(hq, hs, w2, s2, y2, layout, rows, H, I, G, stream);
      };
      const auto dy_copy = [&] {
        copy_real_rows_kernel<<<grid8(rows * H / 8), 256, 0, stream>>>(dy, layout, H / 8,
                                                                       rows * H / 8, dyc);
        FM_CHECK_LAUNCH();
      };
      const auto dy_quant_t = [&] {
        kernels::quantize_1x128_transpose(dyc, rows, H, H, false, dy8, dy8s, dyt, dyts, kMn,
                                          stream);
      };
      const auto dgrad_dh = [&] {
        kernels::fp8_gemm_nt_grouped_contiguous(dy8, dy8s, w2t, s2t, dh, layout, rows, I, H, G,
                                                stream);
      };
      const auto swiglu_bwd = [&] {
        kernels::swiglu_backward(gate_up, I2, dh, I, rows, I, rs, which, dgu, I2, drs, stream);
      };
      const auto naive_bwd = [&] {
        naive_backward_kernel<<<grid8(rows * I / 8), 256, 0, stream>>>(gate_up, dh, rows, I, rs,
                                                                       dgu);
        FM_CHECK_LAUNCH();
        naive_row_sum_kernel<<<static_cast<unsigned>(rows), 256, 0, stream>>>(gate_up, dh, I, drs);
        FM_CHECK_LAUNCH();
      };
      const auto dgu_quant_t = [&] {
        kernels::quantize_1x128_transpose(dgu, rows, I2, I2, false, dgu8, dgu8s, dgut, dguts, kMn,
                                          stream);
      };
      const auto dgrad_dx = [&] {
        kernels::fp8_gemm_nt_grouped_contiguous(dgu8, dgu8s, w13t, s13t, dx2, layout, rows, H, I2,
                                                G, stream);
      };
      const auto h_requant_t = [&] {
        kernels::requantize_1x128_transpose(hq, I, hs, kMn, rows, I, layout, false, ht, hts,
                                            stream);
      };
      const auto wgrad_dw2 = [&] {
        kernels::fp8_gemm_nt_kgrouped_wgrad(dyt, dyts, ht, hts, dw2, H, I, expert_rows, stream);
      };
      const auto x_requant_t = [&] {
        kernels::requantize_1x128_transpose(x, H, sa, kMn, rows, H, layout, false, xt, xts, stream);
      };
      const auto wgrad_dw13 = [&] {
        kernels::fp8_gemm_nt_kgrouped_wgrad(dgut, dguts, xt, xts, dw13, I2, H, expert_rows, stream);
      };
      const auto fused_fwd = [&] {
        ffn.forward_contiguous(x, sa, layout, rows, w, y, stream, rs, gate_up);
      };
      const auto fused_bwd = [&] {
        ffn.backward_contiguous(x, sa, gate_up, layout, expert_rows, rows, w, dy, dx, dw13, dw2,
                                stream, rs, drs);
      };
      const auto naive_fwd = [&] {
        up_gemm();
        naive_swiglu();
        naive_quant();
        down_gemm();
      };
      const auto naive_bwd_all = [&] {
        dy_copy();
        dy_quant_t();
        dgrad_dh();
        naive_bwd();
        dgu_quant_t();
        dgrad_dx();
        naive_swiglu();
        naive_quant();
        h_requant_t();
        wgrad_dw2();
        x_requant_t();
        wgrad_dw13();
      };

      const double rf = static_cast<double>(real);
      const double f_up = 2 * rf * I2 * H, f_down = 2 * rf * H * I;
      struct Op {
        const char *op, *impl, *step;
        std::function<void()> run;
        double flops;
        cudaGraphExec_t exec = nullptr;
        std::vector<double> us;
      };
      std::vector<Op> ops;
      const auto add = [&](const char* op, const char* impl, const char* step,
                           std::function<void()> run, double flops) {
        ops.push_back(Op{op, impl, step, std::move(run), flops, nullptr, {}});
      };
      add("forward", "fp8moe", "total", fused_fwd, f_up + f_down);
      add("forward", "naive", "total", naive_fwd, f_up + f_down);
      add("forward", "fp8moe", "up_gemm", up_gemm, f_up);
      add("forward", "fp8moe", "swiglu_quantize", swiglu_q, 0);
      add("forward", "fp8moe", "down_gemm", down_gemm, f_down);
      add("forward", "naive", "naive_swiglu", naive_swiglu, 0);
      add("forward", "naive", "quantize_1x128", naive_quant, 0);
      add("backward", "fp8moe", "total", fused_bwd, 2 * (f_up + f_down));
      add("backward", "naive", "total", naive_bwd_all, 2 * (f_up + f_down));
      add("backward", "fp8moe", "dy_copy", dy_copy, 0);
      add("backward", "fp8moe", "dy_quantize_t", dy_quant_t, 0);
      add("backward", "fp8moe", "dgrad_dh", dgrad_dh, f_down);
      add("backward", "fp8moe", "swiglu_backward", swiglu_bwd, 0);
      add("backward", "fp8moe", "dgu_quantize_t", dgu_quant_t, 0);
      add("backward", "fp8moe", "dgrad_dx", dgrad_dx, f_up);
      add("backward", "fp8moe", "h_recompute", swiglu_q, 0);
      add("backward", "fp8moe", "h_requantize_t", h_requant_t, 0);
      add("backward", "fp8moe", "wgrad_dw2", wgrad_dw2, f_down);
      add("backward", "fp8moe", "x_requantize_t", x_requant_t, 0);
      add("backward", "fp8moe", "wgrad_dw13", wgrad_dw13, f_up);
      add("backward", "naive", "naive_swiglu_bwd", naive_bwd, 0);
      // Eagerly once in dependency order (every step's inputs hold data), then the graphs.
      fused_fwd();
      fused_bwd();
      naive_fwd();
      naive_bwd_all();
      swiglu_q();
      swiglu_bwd();
      FM_CHECK_CUDA(cudaStreamSynchronize(stream));
      for (Op& op : ops) op.exec = capture(stream, op.run);
      for (Op& op : ops) FM_CHECK_CUDA(cudaGraphLaunch(op.exec, stream));  // warm-up
      FM_CHECK_CUDA(cudaStreamSynchronize(stream));
      for (int rep = 0; rep < o.reps; ++rep)
        for (Op& op : ops) op.us.push_back(replay_us(op.exec));
      FM_CHECK_CUDA(cudaStreamSynchronize(stream));

      char shape_desc[96];
      std::snprintf(shape_desc, sizeof shape_desc, "%lld experts, %lld rows (%lld real)",
                    static_cast<long long>(G), static_cast<long long>(rows),
                    static_cast<long long>(real));
      std::printf("  shape %s: %s\n", s.name, shape_desc);
      double total_us[2][2] = {};  // [forward, backward][fp8moe, naive]
      for (const Op& op : ops)
        if (std::string(op.step) == "total")
          total_us[std::string(op.op) == "backward"][std::string(op.impl) == "naive"] =
              median(op.us);
      double sum_steps[2] = {};
      for (const Op& op : ops) {
        const bool bwd = std::string(op.op) == "backward";
        const bool total = std::string(op.step) == "total";
        const bool naive = std::string(op.impl) == "naive";
        const double us = median(op.us), tflops = op.flops / (us * 1e-6) / 1e12;
        const double share = us / total_us[bwd][naive];
        if (!total && !naive) sum_steps[bwd] += us;
        std::printf("  %-6s %-8s %-7s %-18s %10.1f %8s %6.1f%%", s.name, op.op, op.impl, op.step,
                    us, op.flops > 0 ? std::to_string(static_cast<int>(tflops + 0.5)).c_str() : "",
                    100 * share);
        if (total && naive) std::printf("   fused / naive %.3f", total_us[bwd][0] / us);
        std::printf("\n");
        if (f)
          std::fprintf(
              f,
              "{\"bench\":\"expert_ffn\",\"gpu\":\"%s\",\"gpus\":1,\"date\":\"%s\","
              "\"commit\":\"%s\",\"shape\":\"%s\",\"experts\":%lld,\"rows\":%lld,"
              "\"real_rows\":%lld,\"hidden\":%lld,\"inter\":%lld,\"op\":\"%s\",\"impl\":\"%s\","
              "\"step\":\"%s\",\"us\":%.2f,\"us_min\":%.2f,\"reps\":%d,\"tflops\":%s,"
              "\"fused_over_naive\":%s}\n",
              prop.name, o.date.c_str(), o.commit.c_str(), s.name, static_cast<long long>(G),
              static_cast<long long>(rows), static_cast<long long>(real), static_cast<long long>(H),
              static_cast<long long>(I), op.op, op.impl, op.step, us,
              *std::min_element(op.us.begin(), op.us.end()), o.reps,
              op.flops > 0 ? std::to_string(tflops).c_str() : "null",
              total ? std::to_string(total_us[bwd][0] / total_us[bwd][1]).c_str() : "null");
      }
      std::printf("  %-6s forward  sum of the fp8moe steps %.1f us; backward %.1f us\n", s.name,
                  sum_steps[0], sum_steps[1]);
      if (f) std::fflush(f);
      for (Op& op : ops) FM_CHECK_CUDA(cudaGraphExecDestroy(op.exec));
    }
    if (f) std::fclose(f);
    cudaFree(flush_buf);
    cudaFree(sink);
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "expert_ffn_bench: %s\n", e.what());
    return e.kind() == ErrorKind::kInvalidArgument ? 2 : 1;
  }
}
