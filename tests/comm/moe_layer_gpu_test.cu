// One routed-expert layer across EP ranks on the GPU, end to end, the way the model will run it:
// FP8 dispatch (quantised at the sender) -> activation scales into the GEMM's M-major layout ->
// grouped-contiguous FP8 GEMM over the dispatch's own m_indices (each expert a linear map H -> H
// with 128x128-scaled weights) -> weighted combine back to the sources. The pieces are tested
// alone elsewhere; this checks that their layouts and bounds fit together:
//   - the GEMM output equals gemm_fp8_reference on the reference dispatch's rows (rel. error);
//   - combine of the GPU's expert outputs equals combine_reference of the same outputs bit for
//     bit, and the layer's output equals the all-CPU layer (rel. error);
//   - the whole layer captured in one CUDA graph per rank replays to the same bits.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <vector>

#include "device_copy.h"
#include "fp8moe/comm/device_ep.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/fp8/gemm_reference.h"
#include "fp8moe/fp8/quantize.h"
#include "fp8moe/kernels/fp8_gemm.h"
#include "fp8moe/kernels/scale_layout.h"

namespace fp8moe::comm {
namespace {

using testing::gpu_count;
using testing::to_device;
using testing::to_host;

double rel_error(const std::vector<uint16_t>& got, const std::vector<uint16_t>& want) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = bf16_bits_to_float(got[i]), w = bf16_bits_to_float(want[i]);
    diff += (g - w) * (g - w);
    norm += w * w;
  }
  return std::sqrt(diff / std::max(norm, 1e-30));
}

struct Layer {
  EpConfig cfg;
  std::vector<int> devices;
  std::vector<int64_t> tokens;
  std::vector<std::vector<uint16_t>> x;
  std::vector<std::vector<int32_t>> idx;
  std::vector<std::vector<float>> w;
  std::vector<std::vector<QuantizedMatrix>> weights;  // [rank][local expert] H x H, 128x128
  std::unique_ptr<DeviceEpGroup> group;
  struct Dev {
    cudaStream_t stream = nullptr;
    uint16_t *x = nullptr, *y = nullptr, *out = nullptr;
    int32_t* idx = nullptr;
    float *w = nullptr, *sa = nullptr, *sb = nullptr;
    uint8_t* b = nullptr;
  };
  std::vector<Dev> dev;

  Layer(const EpConfig& c, std::vector<int> devs, std::vector<int64_t> t, uint64_t seed)
      : cfg(c), devices(std::move(devs)), tokens(std::move(t)) {
    const int R = cfg.num_ranks, K = cfg.top_k, L = cfg.experts_per_rank();
    const int64_t H = cfg.hidden;
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::uniform_real_distribution<float> gate(0.05f, 1.0f), mag(-3.0f, 3.0f);
    x.resize(R);
    idx.resize(R);
    w.resize(R);
    weights.resize(R);
    for (int r = 0; r < R; ++r) {
      for (int64_t t = 0; t < tokens[r]; ++t) {
        const float m = std::exp2(mag(rng));  // token magnitudes differ: scales differ
        for (int64_t h = 0; h < H; ++h) x[r].push_back(float_to_bf16_bits(m * normal(rng)));
        std::vector<int32_t> experts(cfg.num_experts);
        for (int e = 0; e < cfg.num_experts; ++e) experts[e] = e;
        std::shuffle(experts.begin(), experts.end(), rng);
        for (int k = 0; k < K; ++k) {
          idx[r].push_back(experts[k]);
          w[r].push_back(gate(rng));
        }
      }
      for (int e = 0; e < L; ++e) {
        std::vector<float> we(H * H);
        for (float& v : we) v = 0.05f * normal(rng);
        weights[r].push_back(quantize(we.data(), H, H, H, ScaleGranularity::k128x128, {}));
      }
    }
    group = std::make_unique<DeviceEpGroup>(cfg, devices);
    const int64_t bound = cfg.row_bound(), KB = H / 128;
    for (int r = 0; r < R; ++r) {
      Dev d;
      FM_CHECK_CUDA(cudaSetDevice(devices[r]));
      FM_CHECK_CUDA(cudaStreamCreateWithFlags(&d.stream, cudaStreamNonBlocking));
      d.x = to_device(devices[r], x[r]);
      d.idx = to_device(devices[r], idx[r]);
      d.w = to_device(devices[r], w[r]);
      std::vector<uint8_t> b;
      std::vector<float> sb;
      for (const QuantizedMatrix& q : weights[r]) {
        b.insert(b.end(), q.codes.begin(), q.codes.end());
        sb.insert(sb.end(), q.scales.begin(), q.scales.end());
      }
      d.b = to_device(devices[r], b);
      d.sb = to_device(devices[r], sb);
      d.sa = to_device(devices[r], std::vector<float>(KB * padded_rows(bound)));
      d.y = to_device(devices[r], std::vector<uint16_t>(bound * H, 0xFFFF));  // NaN poison
      d.out = to_device(devices[r], std::vector<uint16_t>(std::max<int64_t>(1, tokens[r]) * H));
      dev.push_back(d);
    }
  }
  ~Layer() {
    for (size_t r = 0; r < dev.size(); ++r) {
      cudaSetDevice(devices[r]);
      cudaStreamSynchronize(dev[r].stream);
      for (void* p : {static_cast<void*>(dev[r].x), static_cast<void*>(dev[r].y),
                      static_cast<void*>(dev[r].out), static_cast<void*>(dev[r].idx),
                      static_cast<void*>(dev[r].w), static_cast<void*>(dev[r].sa),
                      static_cast<void*>(dev[r].sb), static_cast<void*>(dev[r].b)})
        cudaFree(p);
      cudaStreamDestroy(dev[r].stream);
    }
  }
  void sync() {
    for (size_t r = 0; r < dev.size(); ++r) {
      FM_CHECK_CUDA(cudaSetDevice(devices[r]));
      FM_CHECK_CUDA(cudaStreamSynchronize(dev[r].stream));
    }
    group->check();
  }
  void poison_out(int r) {
    FM_CHECK_CUDA(cudaSetDevice(devices[r]));
    FM_CHECK_CUDA(cudaMemsetAsync(dev[r].out, 0xFF,
                                  std::max<int64_t>(1, tokens[r]) * cfg.hidden * 2, dev[r].stream));
  }
  // The layer's phases for rank r, all stream-ordered.
  void dispatch(int r) {
    FM_CHECK_CUDA(cudaSetDevice(devices[r]));
    auto& ep = group->rank(r);
    ep.dispatch_send({tokens[r], dev[r].x, dev[r].idx, dev[r].w}, dev[r].stream);
    ep.dispatch_recv(dev[r].stream);
  }
  void experts(int r) {
    FM_CHECK_CUDA(cudaSetDevice(devices[r]));
    const DeviceRecvView view = group->rank(r).view();
    const int64_t bound = cfg.row_bound(), H = cfg.hidden;
    kernels::scales_to_mn_major(view.x_scales, 1, bound, H / 128, dev[r].sa, dev[r].stream);
    kernels::fp8_gemm_nt_grouped_contiguous(static_cast<const uint8_t*>(view.x), dev[r].sa,
                                            dev[r].b, dev[r].sb, reinterpret_cast<bf16*>(dev[r].y),
                                            view.m_indices, bound, H, H, cfg.experts_per_rank(),
                                            dev[r].stream);
  }
  void combine(int r) {
    FM_CHECK_CUDA(cudaSetDevice(devices[r]));
    group->rank(r).combine_send(dev[r].y, dev[r].stream);
    group->rank(r).combine_recv(dev[r].out, dev[r].stream);
  }
  std::vector<uint16_t> out(int r) {
    return to_host(devices[r], dev[r].out, tokens[r] * cfg.hidden);
  }
  std::vector<uint16_t> y(int r) {
    return to_host(devices[r], dev[r].y, cfg.row_bound() * cfg.hidden);
  }
};

EpConfig layer_config(int R) {
  EpConfig cfg;
  cfg.num_ranks = R;
  cfg.num_experts = 8 * R;
  cfg.top_k = 4;
  cfg.hidden = 512;
  cfg.max_tokens_per_rank = 384;
  cfg.payload = Payload::kFP8;
  cfg.timeout_s = 20.0;
  return cfg;
}

// The all-CPU layer: expert outputs on the reference dispatch's rows (BF16, row bound x H).
std::vector<uint16_t> reference_expert_outputs(const EpConfig& cfg, const DispatchResult& d,
                                               const std::vector<QuantizedMatrix>& weights) {
  const int64_t H = cfg.hidden, KB = H / 128;
  std::vector<uint16_t> y(cfg.row_bound() * H, 0);
  for (int e = 0; e < cfg.experts_per_rank(); ++e) {
    const int64_t off = d.grouped.expert_offsets[e], rows = d.grouped.expert_counts[e];
    if (rows == 0) continue;
    Fp8MatrixRef a;
    a.codes = d.grouped.x_fp8.data() + off * H;
    a.rows = rows;
    a.cols = H;
    a.ld = H;
    a.scales = d.grouped.x_scales.data() + off * KB;
    a.granularity = ScaleGranularity::k1x128;
    a.scale_row_stride = KB;
    a.scale_col_stride = 1;
    gemm_fp8_reference_bf16(a, weights[e].ref(), reinterpret_cast<bf16*>(y.data() + off * H), H);
  }
  return y;
}

TEST(MoeLayerGpu, DispatchGroupedGemmCombineMatchesCpuAndReplaysInAGraph) {
  const int gpus = gpu_count();
  const int R = 2;
  const std::vector<int> devices = gpus >= 2 ? std::vector<int>{0, 1} : std::vector<int>{0, 0};
  const EpConfig cfg = layer_config(R);
  Layer layer(cfg, devices, {384, 257}, 11);
  std::vector<TokenBatch> batches;
  for (int r = 0; r < R; ++r)
    batches.push_back({layer.tokens[r], layer.x[r].data(), layer.idx[r].data(), layer.w[r].data()});
  const std::vector<DispatchResult> want = dispatch_reference(cfg, batches);

  // Eager, phase by phase (ranks sharing a GPU must not spin on SMs a peer's GEMM needs).
  for (int r = 0; r < R; ++r) layer.dispatch(r);
  layer.sync();
  for (int r = 0; r < R; ++r) layer.experts(r);
  layer.sync();
  for (int r = 0; r < R; ++r) {
    layer.poison_out(r);
    layer.combine(r);
  }
  layer.sync();

  std::vector<std::vector<uint16_t>> y_gpu(R), y_cpu(R), out_gpu(R);
  for (int r = 0; r < R; ++r) {
    const std::vector<int32_t> m_indices = to_host(
        devices[r], layer.group->rank(r).view().m_indices, static_cast<size_t>(cfg.row_bound()));
    ASSERT_EQ(m_indices, want[r].grouped.m_indices) << "rank " << r;
    y_gpu[r] = layer.y(r);
    y_cpu[r] = reference_expert_outputs(cfg, want[r], layer.weights[r]);
    std::vector<uint16_t> got, ref;  // rows the layout uses
    for (int64_t row = 0; row < cfg.row_bound(); ++row) {
      if (m_indices[row] < 0) continue;
      const int64_t H = cfg.hidden;
      got.insert(got.end(), y_gpu[r].begin() + row * H, y_gpu[r].begin() + (row + 1) * H);
      ref.insert(ref.end(), y_cpu[r].begin() + row * H, y_cpu[r].begin() + (row + 1) * H);
    }
    ASSERT_FALSE(ref.empty());
    const double err = rel_error(got, ref);
    std::printf("rank %d: %zu expert rows, GEMM |y-ref|/|ref| = %.3g\n", r, got.size() / cfg.hidden,
                err);
    EXPECT_LT(err, 5e-3) << "rank " << r;
    out_gpu[r] = layer.out(r);
  }
  std::vector<const uint16_t*> yg, yc;
  for (int r = 0; r < R; ++r) {
    yg.push_back(y_gpu[r].data());
    yc.push_back(y_cpu[r].data());
  }
  const auto combined_gpu_y = combine_reference(cfg, want, yg);
  const auto combined_cpu_y = combine_reference(cfg, want, yc);
  for (int r = 0; r < R; ++r) {
    ASSERT_EQ(out_gpu[r], combined_gpu_y[r]) << "combine of the GPU's expert rows, rank " << r;
    const double err = rel_error(out_gpu[r], combined_cpu_y[r]);
    std::printf("rank %d: layer |out-ref|/|ref| = %.3g (all-CPU layer)\n", r, err);
    EXPECT_LT(err, 5e-3) << "rank " << r;
  }

  if (devices[0] == devices[1]) {
    std::printf(
        "one GPU: graph replay needs a GPU per rank (a spinning receive would hold SMs "
        "that the peer's persistent GEMM needs), skipped\n");
    return;
  }
  std::vector<cudaGraphExec_t> execs(R);
  for (int r = 0; r < R; ++r) {
    FM_CHECK_CUDA(cudaSetDevice(devices[r]));
    FM_CHECK_CUDA(cudaStreamBeginCapture(layer.dev[r].stream, cudaStreamCaptureModeThreadLocal));
    layer.dispatch(r);
    layer.experts(r);
    layer.combine(r);
    cudaGraph_t graph;
    FM_CHECK_CUDA(cudaStreamEndCapture(layer.dev[r].stream, &graph));
    FM_CHECK_CUDA(cudaGraphInstantiate(&execs[r], graph, 0));
    FM_CHECK_CUDA(cudaGraphDestroy(graph));
  }
  for (int replay = 0; replay < 2; ++replay) {
    for (int r = 0; r < R; ++r) {
      layer.poison_out(r);
      FM_CHECK_CUDA(cudaGraphLaunch(execs[r], layer.dev[r].stream));
    }
    layer.sync();
    for (int r = 0; r < R; ++r) ASSERT_EQ(layer.out(r), out_gpu[r]) << "replay " << replay;
  }
  for (cudaGraphExec_t e : execs) cudaGraphExecDestroy(e);
}

}  // namespace
}  // namespace fp8moe::comm
