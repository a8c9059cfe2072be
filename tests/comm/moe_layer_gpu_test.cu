// One routed-expert layer across EP ranks on the GPU, end to end, the way the model will run it:
// FP8 dispatch (quantised at the sender) -> activation scales into the GEMM's M-major layout ->
// grouped-contiguous FP8 GEMM over the dispatch's own m_indices (each expert a linear map H -> H
// with 128x128-scaled weights) -> weighted combine back to the sources. The pieces are tested
// alone elsewhere; this checks that their layouts and bounds fit together:
//   - the GEMM output equals gemm_fp8_reference on the reference dispatch's rows (rel. error);
//   - combine of the GPU's expert outputs equals combine_reference of the same outputs bit for
//     bit, and the layer's output equals the all-CPU layer (rel. error);
//   - the whole layer captured in one CUDA graph per rank replays to the same bits.
// And the gathered path (session 10): dispatch stops at the layout (expand_payload off), the
// grouped GEMM reads its rows from the received records through row_record; it must equal the
// expanded path bit for bit (the layout, the records against the expanded rows, the expert rows
// of y, the combine output) over two rounds, 2 GPUs (NVLink and NCCL) and ranks sharing a GPU.
// And the experts as the model runs them (session 19): ExpertFfnGpu (up GEMM -> SwiGLU + 1x128
// quantisation -> down GEMM) on the gathered path, against expert_ffn_reference on the reference
// dispatch's rows and the all-CPU layer.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "device_copy.h"
#include "ep_test_util.h"
#include "fp8moe/comm/device_ep.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/fp8/gemm_reference.h"
#include "fp8moe/fp8/quantize.h"
#include "fp8moe/kernels/fp8_gemm.h"
#include "fp8moe/kernels/scale_layout.h"
#include "fp8moe/moe/expert_ffn_gpu.h"
#include "moe_layer_test_util.h"

namespace fp8moe::comm {
namespace {

using testing::gpu_count;
using testing::reference_expert_outputs;
using testing::rel_error;
using testing::to_device;
using testing::to_host;

struct Layer {
  EpConfig cfg;
  std::vector<int> devices;
  std::vector<int64_t> tokens;
  std::vector<std::vector<uint16_t>> x;
  std::vector<std::vector<int32_t>> idx;
  std::vector<std::vector<float>> w;
  std::vector<std::vector<QuantizedMatrix>> weights;  // [rank][local expert] H x H, 128x128
  std::unique_ptr<DeviceEpGroup> group;
  using Dev = testing::LayerDevice;
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
      dev[r].free();
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

// ---- the gathered path against the expanded path ----
// Two groups on the same devices with the same options except expand_payload; the same batch,
// weights and phases through both, one after the other (one group's kernels in flight per GPU).
struct GatheredVsExpanded {
  EpConfig cfg;
  std::vector<int> devices;
  bool nccl = false;
  std::unique_ptr<DeviceEpGroup> expanded, gathered;
  struct Dev {
    cudaStream_t stream = nullptr;
    uint16_t *x = nullptr, *y_e = nullptr, *y_g = nullptr, *out_e = nullptr, *out_g = nullptr;
    int32_t* idx = nullptr;
    float *w = nullptr, *sa_e = nullptr, *sa_g = nullptr, *sb = nullptr;
    uint8_t* b = nullptr;
  };
  std::vector<Dev> dev;
  std::vector<testing::RankData> in;
  bool token_slots = false;  // where the option applies (one node, NVLink)

  // layout_send: the session-11 options of the gathered (layout-only) group's send (defaults since
  // then); false sets the send before them (so the other gathered tests keep that one covered).
  // align128 (session 11, ep15): record_align_128 on the gathered group; the expanded group keeps
  // the 16-byte stride (record_align_128 off, set here since it is a default), so the test with
  // align128 compares two strides.
  // token_slots (session 14, ep22): layout_token_slots on the gathered group (each record at its
  // token's index in the source region; row_record names that slot).
  // payload_claims (session 15, ep25): layout_payload_claims on the gathered group (its payload
  // claimed per warp in units of that many steps; the GEMM reads the records right after the
  // receive on the same stream, so a receive that ended before the payload landed shows here).
  GatheredVsExpanded(const EpConfig& c, std::vector<int> devs, Wire wire, uint64_t seed,
                     bool layout_send = false, bool align128 = false, bool token_slots = false,
                     int payload_claims = 0)
      : cfg(c),
        devices(std::move(devs)),
        nccl(wire == Wire::kNccl),
        token_slots(token_slots && wire == Wire::kNvlink && c.nodes() == 1) {
    DeviceEpOptions opt;
    opt.wire = wire;
    opt.record_align_128 = false;
    expanded = std::make_unique<DeviceEpGroup>(cfg, devices, opt);
    opt.expand_payload = false;
    opt.layout_release_only = opt.layout_claim_chunks = layout_send;
    opt.layout_send_blocks = layout_send ? 96 : 0;  // the send grid other than the combine's 64
    opt.record_align_128 = align128;
    opt.layout_token_slots = token_slots;
    opt.layout_payload_claims = payload_claims;
    gathered = std::make_unique<DeviceEpGroup>(cfg, devices, opt);
    const int R = cfg.num_ranks, L = cfg.experts_per_rank();
    const int64_t H = cfg.hidden, KB = H / 128, bound = cfg.row_bound();
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (int r = 0; r < R; ++r) {
      Dev d;
      FM_CHECK_CUDA(cudaSetDevice(devices[r]));
      FM_CHECK_CUDA(cudaStreamCreateWithFlags(&d.stream, cudaStreamNonBlocking));
      std::vector<uint8_t> b;
      std::vector<float> sb;
      for (int e = 0; e < L; ++e) {
        std::vector<float> we(H * H);
        for (float& v : we) v = 0.05f * normal(rng);
        const QuantizedMatrix q = quantize(we.data(), H, H, H, ScaleGranularity::k128x128, {});
        b.insert(b.end(), q.codes.begin(), q.codes.end());
        sb.insert(sb.end(), q.scales.begin(), q.scales.end());
      }
      d.b = to_device(devices[r], b);
      d.sb = to_device(devices[r], sb);
      for (float** sa : {&d.sa_e, &d.sa_g})
        *sa = to_device(devices[r], std::vector<float>(KB * padded_rows(bound)));
      for (uint16_t** y : {&d.y_e, &d.y_g})
        *y = to_device(devices[r], std::vector<uint16_t>(bound * H));
      for (uint16_t** o : {&d.out_e, &d.out_g})
        *o = to_device(devices[r], std::vector<uint16_t>(cfg.max_tokens_per_rank * H));
      dev.push_back(d);
    }
  }
  ~GatheredVsExpanded() {
    for (size_t r = 0; r < dev.size(); ++r) {
      cudaSetDevice(devices[r]);
      cudaStreamSynchronize(dev[r].stream);
      free_inputs(static_cast<int>(r));
      for (void* p : {static_cast<void*>(dev[r].y_e), static_cast<void*>(dev[r].y_g),
                      static_cast<void*>(dev[r].out_e), static_cast<void*>(dev[r].out_g),
                      static_cast<void*>(dev[r].sa_e), static_cast<void*>(dev[r].sa_g),
                      static_cast<void*>(dev[r].sb), static_cast<void*>(dev[r].b)})
        cudaFree(p);
      cudaStreamDestroy(dev[r].stream);
    }
  }
  void free_inputs(int r) {
    cudaFree(dev[r].x);
    cudaFree(dev[r].idx);
    cudaFree(dev[r].w);
    dev[r].x = nullptr;
    dev[r].idx = nullptr;
    dev[r].w = nullptr;
  }
  void set_inputs(const std::vector<int64_t>& tokens, testing::Routing routing, uint64_t seed) {
    in = testing::make_inputs(cfg, tokens, routing, seed);
    for (int r = 0; r < cfg.num_ranks; ++r) {
      FM_CHECK_CUDA(cudaSetDevice(devices[r]));
      FM_CHECK_CUDA(cudaStreamSynchronize(dev[r].stream));
      free_inputs(r);
      dev[r].x = to_device(devices[r], in[r].x);
      dev[r].idx = to_device(devices[r], in[r].idx);
      dev[r].w = to_device(devices[r], in[r].w);
    }
  }
  void sync(DeviceEpGroup& g) {
    for (int r = 0; r < cfg.num_ranks; ++r) {
      FM_CHECK_CUDA(cudaSetDevice(devices[r]));
      FM_CHECK_CUDA(cudaStreamSynchronize(dev[r].stream));
    }
    g.check();
  }
  // One layer through a group, phase by phase (ranks sharing a GPU must not spin on SMs a peer's
  // GEMM needs); the NCCL calls of all ranks of a phase in one group (one thread drives them).
  void layer(bool gather) {
    DeviceEpGroup& g = gather ? *gathered : *expanded;
    const int R = cfg.num_ranks, L = cfg.experts_per_rank();
    const int64_t H = cfg.hidden, KB = H / 128, bound = cfg.row_bound();
    if (nccl) nccl_group_start();
    for (int r = 0; r < R; ++r) {
      FM_CHECK_CUDA(cudaSetDevice(devices[r]));
      g.rank(r).dispatch_send({in[r].tokens, dev[r].x, dev[r].idx, dev[r].w}, dev[r].stream);
    }
    if (nccl) nccl_group_end();
    for (int r = 0; r < R; ++r) {
      FM_CHECK_CUDA(cudaSetDevice(devices[r]));
      g.rank(r).dispatch_recv(dev[r].stream);
    }
    sync(g);
    for (int r = 0; r < R; ++r) {
      FM_CHECK_CUDA(cudaSetDevice(devices[r]));
      const DeviceRecvView v = g.rank(r).view();
      Dev& d = dev[r];
      uint16_t* y = gather ? d.y_g : d.y_e;
      FM_CHECK_CUDA(cudaMemsetAsync(y, 0xFF, bound * H * 2, d.stream));  // NaN poison
      if (gather) {
        ASSERT_NE(v.row_record, nullptr);
        ASSERT_EQ(v.record_rows, static_cast<int64_t>(R) * cfg.max_tokens_per_rank);
        // The scales sit in each record after its H codes.
        kernels::gather_scales_to_mn_major(reinterpret_cast<const float*>(v.records + H),
                                           v.record_stride / 4, v.row_record, bound, KB, d.sa_g,
                                           d.stream);
        kernels::fp8_gemm_nt_grouped_contiguous_gathered(
            {v.records, v.record_rows, v.record_stride, v.row_record}, d.sa_g, d.b, d.sb,
            reinterpret_cast<bf16*>(y), v.m_indices, bound, H, H, L, d.stream);
      } else {
        ASSERT_EQ(v.row_record, nullptr);
        kernels::scales_to_mn_major(v.x_scales, 1, bound, KB, d.sa_e, d.stream);
        kernels::fp8_gemm_nt_grouped_contiguous(static_cast<const uint8_t*>(v.x), d.sa_e, d.b, d.sb,
                                                reinterpret_cast<bf16*>(y), v.m_indices, bound, H,
                                                H, L, d.stream);
      }
    }
    sync(g);
    if (nccl) nccl_group_start();
    for (int r = 0; r < R; ++r) {
      FM_CHECK_CUDA(cudaSetDevice(devices[r]));
      uint16_t* out = gather ? dev[r].out_g : dev[r].out_e;
      FM_CHECK_CUDA(
          cudaMemsetAsync(out, 0xFF, std::max<int64_t>(1, in[r].tokens) * H * 2, dev[r].stream));
      g.rank(r).combine_send(gather ? dev[r].y_g : dev[r].y_e, dev[r].stream);
    }
    if (nccl) nccl_group_end();
    for (int r = 0; r < R; ++r) {
      FM_CHECK_CUDA(cudaSetDevice(devices[r]));
      g.rank(r).combine_recv(gather ? dev[r].out_g : dev[r].out_e, dev[r].stream);
    }
    sync(g);
  }
  // Compares the round's two paths on every rank (call after layer(false) and layer(true); the
  // records and layout views stay valid: no dispatch_send has run since).
  void compare(const std::string& what) {
    const int R = cfg.num_ranks;
    const int64_t H = cfg.hidden, SC = H / 128, bound = cfg.row_bound(),
                  Tmax = cfg.max_tokens_per_rank;
    for (int r = 0; r < R; ++r) {
      SCOPED_TRACE(what + ", rank " + std::to_string(r));
      const int dv = devices[r];
      const DeviceRecvView ve = expanded->rank(r).view(), vg = gathered->rank(r).view();
      const auto m_e = to_host(dv, ve.m_indices, bound), m_g = to_host(dv, vg.m_indices, bound);
      ASSERT_EQ(m_g, m_e);
      const auto row_src = to_host(dv, vg.row_src, bound);
      const auto row_record = to_host(dv, vg.row_record, bound);
      const auto recv_count = to_host(dv, vg.recv_count, R);
      const int64_t P = vg.record_stride;
      ASSERT_EQ(P % 16, 0);
      ASSERT_GE(P, H + SC * 4);
      const auto records = to_host(dv, vg.records, vg.record_rows * P);
      const auto x_e = to_host(dv, static_cast<const uint8_t*>(ve.x), bound * H);
      const auto s_e = to_host(dv, ve.x_scales, bound * SC);
      const auto y_e = to_host(dv, dev[r].y_e, bound * H), y_g = to_host(dv, dev[r].y_g, bound * H);
      std::vector<int64_t> roff(R + 1, 0);
      for (int s = 0; s < R; ++s) roff[s + 1] = roff[s] + recv_count[s];
      // With token_slots: the index of each source's j-th token sent to this rank.
      std::vector<std::vector<int64_t>> sent(R);
      const int L = cfg.experts_per_rank(), K = cfg.top_k;
      for (int s = 0; s < R && token_slots; ++s)
        for (int64_t t = 0; t < in[s].tokens; ++t) {
          bool here = false;
          for (int k = 0; k < K; ++k) {
            const int e = in[s].idx[t * K + k];
            here = here || (e >= 0 && e / L == r);
          }
          if (here) sent[s].push_back(t);
        }
      int64_t used = 0;
      for (int64_t row = 0; row < bound; ++row) {
        if (m_e[row] < 0) {
          ASSERT_EQ(row_record[row], -1) << "padding row " << row;
          continue;
        }
        ++used;
        // row_record names the slot of row_src's token: s * Tmax + (compact index - roff[s]);
        // with token_slots s * Tmax + the token's index at its source.
        const int64_t i = row_src[row] / cfg.top_k;
        int s = 0;
        while (roff[s + 1] <= i) ++s;
        if (token_slots) {
          ASSERT_EQ(static_cast<int64_t>(sent[s].size()), recv_count[s]) << "source " << s;
          ASSERT_EQ(row_record[row], s * Tmax + sent[s][i - roff[s]]) << "row " << row;
        } else {
          ASSERT_EQ(row_record[row], s * Tmax + (i - roff[s])) << "row " << row;
        }
        const uint8_t* rec = records.data() + row_record[row] * P;
        ASSERT_TRUE(std::equal(rec, rec + H, x_e.begin() + row * H)) << "codes of row " << row;
        ASSERT_EQ(std::memcmp(rec + H, s_e.data() + row * SC, SC * 4), 0)
            << "scales of row " << row;
        ASSERT_TRUE(
            std::equal(y_g.begin() + row * H, y_g.begin() + (row + 1) * H, y_e.begin() + row * H))
            << "expert outputs of row " << row;
      }
      ASSERT_GT(used, 0);
      ASSERT_EQ(to_host(dv, dev[r].out_g, in[r].tokens * H),
                to_host(dv, dev[r].out_e, in[r].tokens * H))
          << "combine output";
      std::printf("%s, rank %d: %lld expert rows, gathered path == expanded path bit for bit\n",
                  what.c_str(), r, static_cast<long long>(used));
    }
  }
};

// gpus_per_node > 0: "nodes" of that many ranks, so every call takes the two-stage route.
// layout_send: the gathered group's send with session 11's options (GatheredVsExpanded); false:
// the send before them.
void run_gathered_vs_expanded(const std::vector<int>& devices, Wire wire, const char* name,
                              int gpus_per_node = 0, bool layout_send = false,
                              bool align128 = false, bool token_slots = false,
                              int payload_claims = 0) {
  const int R = static_cast<int>(devices.size());
  EpConfig cfg = layer_config(R);
  cfg.gpus_per_node = gpus_per_node;
  GatheredVsExpanded t(cfg, devices, wire, 21, layout_send, align128, token_slots, payload_claims);
  // Round 2: other counts (a rank's rows shrink, so stale rows past the layout must read -1)
  // and dropped slots.
  const std::vector<std::pair<std::vector<int64_t>, testing::Routing>> rounds = {
      {{384, 257, 300, 64}, testing::Routing::kRandom},
      {{100, 384, 0, 384}, testing::Routing::kHoles}};
  for (size_t round = 0; round < rounds.size(); ++round) {
    std::vector<int64_t> tokens(rounds[round].first.begin(), rounds[round].first.begin() + R);
    t.set_inputs(tokens, rounds[round].second, 31 + round);
    t.layer(false);
    if (::testing::Test::HasFatalFailure()) return;
    t.layer(true);
    if (::testing::Test::HasFatalFailure()) return;
    t.compare(std::string(name) + ", round " + std::to_string(round));
    if (::testing::Test::HasFatalFailure()) return;
  }
}

TEST(MoeLayerGpu, GatheredPathEqualsExpandedPathTwoGpus) {
  if (gpu_count() < 2) GTEST_SKIP() << "needs 2 GPUs";
  run_gathered_vs_expanded({0, 1}, Wire::kNvlink, "2 GPUs, NVLink");
}

TEST(MoeLayerGpu, GatheredPathEqualsExpandedPathNccl) {
  if (gpu_count() < 2 || !nccl_available()) GTEST_SKIP() << "needs 2 GPUs and NCCL";
  run_gathered_vs_expanded({0, 1}, Wire::kNccl, "2 GPUs, NCCL");
}

TEST(MoeLayerGpu, GatheredPathEqualsExpandedPathRanksSharingAGpu) {
  run_gathered_vs_expanded({0, 0, 0}, Wire::kNvlink, "3 ranks on GPU 0");
}

// Session 11's layout-only send options (layout_release_only, layout_claim_chunks,
// layout_send_blocks) on the gathered group: 2 GPUs over NVLink, 3 ranks on one
// GPU (the grid option does not apply there), NCCL.
TEST(MoeLayerGpu, GatheredPathEqualsExpandedPathSession11LayoutSend) {
  if (gpu_count() >= 2)
    run_gathered_vs_expanded({0, 1}, Wire::kNvlink, "2 GPUs, NVLink, session-11 send", 0, true);
  if (::testing::Test::HasFatalFailure()) return;
  run_gathered_vs_expanded({0, 0, 0}, Wire::kNvlink, "3 ranks on GPU 0, session-11 send", 0, true);
  if (::testing::Test::HasFatalFailure()) return;
  if (gpu_count() >= 2 && nccl_available())
    run_gathered_vs_expanded({0, 1}, Wire::kNccl, "2 GPUs, NCCL, session-11 send", 0, true);
}

// Session 11 (ep15): the gathered group's records on 128-byte lines (record_align_128: the
// gathered GEMM and the scales read them at that stride) against the expanded group at the
// 16-byte stride: 2 GPUs over NVLink, 3 ranks on one GPU, NCCL. (Session 11's call 1 ran it as
// ...Session11AlignedRecordsTailPieces, with the tail parts since removed.)
TEST(MoeLayerGpu, GatheredPathEqualsExpandedPathSession11AlignedRecords) {
  if (gpu_count() >= 2)
    run_gathered_vs_expanded({0, 1}, Wire::kNvlink, "2 GPUs, NVLink, 128-byte records", 0, true,
                             true);
  if (::testing::Test::HasFatalFailure()) return;
  run_gathered_vs_expanded({0, 0, 0}, Wire::kNvlink, "3 ranks on GPU 0, 128-byte records", 0, true,
                           true);
  if (::testing::Test::HasFatalFailure()) return;
  if (gpu_count() >= 2 && nccl_available())
    run_gathered_vs_expanded({0, 1}, Wire::kNccl, "2 GPUs, NCCL, 128-byte records", 0, true, true);
}

// Session 14 (ep22): layout_token_slots on the gathered group with the session-11 send and
// 128-byte records (the defaults): row_record names each record's token slot, and the gathered
// GEMM's rows, the layout and the combine equal the expanded path's; 2 GPUs over NVLink, 3 ranks
// on one GPU, and NCCL and the two-stage route, where the option does not apply.
TEST(MoeLayerGpu, GatheredPathEqualsExpandedPathSession14TokenSlots) {
  if (gpu_count() >= 2)
    run_gathered_vs_expanded({0, 1}, Wire::kNvlink, "2 GPUs, NVLink, token slots", 0, true, true,
                             true);
  if (::testing::Test::HasFatalFailure()) return;
  run_gathered_vs_expanded({0, 0, 0}, Wire::kNvlink, "3 ranks on GPU 0, token slots", 0, true, true,
                           true);
  if (::testing::Test::HasFatalFailure()) return;
  if (gpu_count() >= 2 && nccl_available())
    run_gathered_vs_expanded({0, 1}, Wire::kNccl, "2 GPUs, NCCL, token slots (ignored)", 0, true,
                             true, true);
  if (::testing::Test::HasFatalFailure()) return;
  run_gathered_vs_expanded(
      gpu_count() >= 2 ? std::vector<int>{0, 0, 1, 1} : std::vector<int>{0, 0, 0, 0}, Wire::kNvlink,
      "2 nodes of 2 ranks, token slots (ignored)", 2, false, false, true);
}

// Session 15 (ep25): layout_payload_claims on the gathered group (with the defaults' send: token
// slots, the session-11 options, 128-byte records; hidden 512 is one step a token): the gathered
// GEMM reads the records as soon as the receive ends; 2 GPUs over NVLink, 3 ranks on one GPU, and
// NCCL, where the option does not apply.
TEST(MoeLayerGpu, GatheredPathEqualsExpandedPathSession15PayloadClaims) {
  if (gpu_count() >= 2)
    run_gathered_vs_expanded({0, 1}, Wire::kNvlink, "2 GPUs, NVLink, payload claims", 0, true, true,
                             true, 1);
  if (::testing::Test::HasFatalFailure()) return;
  run_gathered_vs_expanded({0, 0, 0}, Wire::kNvlink, "3 ranks on GPU 0, payload claims 2", 0, true,
                           true, true, 2);
  if (::testing::Test::HasFatalFailure()) return;
  if (gpu_count() >= 2 && nccl_available())
    run_gathered_vs_expanded({0, 1}, Wire::kNccl, "2 GPUs, NCCL, payload claims (ignored)", 0, true,
                             true, true, 1);
}

TEST(MoeLayerGpu, GatheredPathEqualsExpandedPathTwoStageRoute) {
  // Two "nodes" of two ranks, one node per GPU where there are two: the records reach their
  // rank through the forwarder (k_fwd_recv writes row_record).
  const std::vector<int> devices =
      gpu_count() >= 2 ? std::vector<int>{0, 0, 1, 1} : std::vector<int>{0, 0, 0, 0};
  run_gathered_vs_expanded(devices, Wire::kNvlink, "2 nodes of 2 ranks", 2);
}

// Session 19: the routed experts as an FP8 SwiGLU FFN (ExpertFfnGpu::forward_gathered reading the
// dispatch's records through row_record, m_indices as its grouped layout), then the weighted
// combine; against the CPU layer: dispatch_reference -> expert_ffn_reference -> combine_reference.
// The expert rows within kFfnTol of the reference (same FP8 math; the tensor cores' in-window
// summation moves a few BF16 / E4M3 roundings: tests/moe/expert_ffn_gpu_test.cu), the combine of
// the GPU's rows bit for bit, the layer's output within the same bound.
TEST(MoeLayerGpu, ExpertFfnGatheredLayerMatchesCpu) {
  constexpr double kFfnTol = 3e-2;  // 2 x H200, session 19: 7.0e-3..8.1e-3
  const int R = 2;
  const std::vector<int> devices =
      gpu_count() >= 2 ? std::vector<int>{0, 1} : std::vector<int>{0, 0};
  const EpConfig cfg = layer_config(R);
  const int L = cfg.experts_per_rank();
  const int64_t H = cfg.hidden, I = 256, KB = H / 128, bound = cfg.row_bound();
  DeviceEpOptions opt;
  opt.expand_payload = false;  // the layout only: the FFN gathers its rows from the records
  DeviceEpGroup group(cfg, devices, opt);
  const std::vector<testing::RankData> in =
      testing::make_inputs(cfg, {384, 257}, testing::Routing::kRandom, 19);
  std::vector<TokenBatch> batches;
  for (const auto& d : in) batches.push_back(d.batch());
  const std::vector<DispatchResult> want = dispatch_reference(cfg, batches);

  struct Rank {
    cudaStream_t stream = nullptr;
    uint16_t *x = nullptr, *y = nullptr, *out = nullptr;
    int32_t* idx = nullptr;
    float *w = nullptr, *sa = nullptr;
    ExpertWeightsHost host;
    std::unique_ptr<ExpertWeightsDevice> weights;
    std::unique_ptr<ExpertFfnGpu> ffn;
  };
  std::vector<Rank> rk(R);
  std::mt19937_64 rng(1919);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int r = 0; r < R; ++r) {
    Rank& k = rk[r];
    FM_CHECK_CUDA(cudaSetDevice(devices[r]));
    FM_CHECK_CUDA(cudaStreamCreateWithFlags(&k.stream, cudaStreamNonBlocking));
    std::vector<float> gate(L * I * H), up(L * I * H), down(L * H * I);
    for (float& v : gate) v = normal(rng) / std::sqrt(float(H));
    for (float& v : up) v = normal(rng) / std::sqrt(float(H));
    for (float& v : down) v = normal(rng) / std::sqrt(float(I));
    k.host = quantize_expert_weights(gate.data(), up.data(), down.data(), L, H, I);
    k.weights = std::make_unique<ExpertWeightsDevice>(k.host);
    k.ffn = std::make_unique<ExpertFfnGpu>(bound, H, I);
    k.x = to_device(devices[r], in[r].x);
    k.idx = to_device(devices[r], in[r].idx);
    k.w = to_device(devices[r], in[r].w);
    k.sa = to_device(devices[r], std::vector<float>(KB * padded_rows(bound)));
    k.y = to_device(devices[r], std::vector<uint16_t>(bound * H, 0xFFFF));  // NaN poison
    k.out = to_device(devices[r], std::vector<uint16_t>(std::max<int64_t>(1, in[r].tokens) * H));
  }
  auto sync = [&] {
    for (int r = 0; r < R; ++r) {
      FM_CHECK_CUDA(cudaSetDevice(devices[r]));
      FM_CHECK_CUDA(cudaStreamSynchronize(rk[r].stream));
    }
    group.check();
  };
  // Phase by phase (ranks sharing a GPU must not spin on SMs a peer's GEMM needs).
  for (int r = 0; r < R; ++r) {
    FM_CHECK_CUDA(cudaSetDevice(devices[r]));
    group.rank(r).dispatch_send({in[r].tokens, rk[r].x, rk[r].idx, rk[r].w}, rk[r].stream);
    group.rank(r).dispatch_recv(rk[r].stream);
  }
  sync();
  for (int r = 0; r < R; ++r) {
    FM_CHECK_CUDA(cudaSetDevice(devices[r]));
    const DeviceRecvView v = group.rank(r).view();
    ASSERT_NE(v.row_record, nullptr) << "rank " << r;
    kernels::gather_scales_to_mn_major(reinterpret_cast<const float*>(v.records + H),
                                       v.record_stride / 4, v.row_record, bound, KB, rk[r].sa,
                                       rk[r].stream);
    rk[r].ffn->forward_gathered({v.records, v.record_rows, v.record_stride, v.row_record}, rk[r].sa,
                                v.m_indices, bound, rk[r].weights->view(),
                                reinterpret_cast<bf16*>(rk[r].y), rk[r].stream);
  }
  sync();
  for (int r = 0; r < R; ++r) {
    FM_CHECK_CUDA(cudaSetDevice(devices[r]));
    FM_CHECK_CUDA(
        cudaMemsetAsync(rk[r].out, 0xFF, std::max<int64_t>(1, in[r].tokens) * H * 2, rk[r].stream));
    group.rank(r).combine_send(rk[r].y, rk[r].stream);
    group.rank(r).combine_recv(rk[r].out, rk[r].stream);
  }
  sync();

  std::vector<std::vector<uint16_t>> y_gpu(R), y_cpu(R);
  for (int r = 0; r < R; ++r) {
    const auto m_indices = to_host(devices[r], group.rank(r).view().m_indices, bound);
    ASSERT_EQ(m_indices, want[r].grouped.m_indices) << "rank " << r;
    y_gpu[r] = to_host(devices[r], rk[r].y, bound * H);
    // The CPU experts on the reference dispatch's rows (padding rows stay 0).
    y_cpu[r].assign(bound * H, 0);
    Fp8MatrixRef a;
    a.codes = want[r].grouped.x_fp8.data();
    a.rows = bound;
    a.cols = H;
    a.ld = H;
    a.scales = want[r].grouped.x_scales.data();
    a.granularity = ScaleGranularity::k1x128;
    a.scale_row_stride = KB;
    a.scale_col_stride = 1;
    expert_ffn_reference(a, m_indices.data(), rk[r].host, nullptr, false,
                         reinterpret_cast<bf16*>(y_cpu[r].data()), {}, 4);
    std::vector<uint16_t> got, ref;
    int64_t padding_written = 0;
    for (int64_t row = 0; row < bound; ++row) {
      const auto g0 = y_gpu[r].begin() + row * H;
      if (m_indices[row] < 0) {
        padding_written += std::count_if(g0, g0 + H, [](uint16_t b) { return b != 0xFFFF; });
        continue;
      }
      got.insert(got.end(), g0, g0 + H);
      ref.insert(ref.end(), y_cpu[r].begin() + row * H, y_cpu[r].begin() + (row + 1) * H);
    }
    ASSERT_FALSE(ref.empty());
    const double err = rel_error(got, ref);
    std::printf(
        "rank %d: %zu expert rows, ExpertFfnGpu |y-ref|/|ref| = %.3g, padding rows "
        "written %lld\n",
        r, got.size() / H, err, static_cast<long long>(padding_written));
    EXPECT_LT(err, kFfnTol) << "rank " << r;
    EXPECT_EQ(padding_written, 0) << "rank " << r;
  }
  std::vector<const uint16_t*> yg, yc;
  for (int r = 0; r < R; ++r) {
    yg.push_back(y_gpu[r].data());
    yc.push_back(y_cpu[r].data());
  }
  const auto combined_gpu_y = combine_reference(cfg, want, yg);
  const auto combined_cpu_y = combine_reference(cfg, want, yc);
  for (int r = 0; r < R; ++r) {
    const auto out = to_host(devices[r], rk[r].out, in[r].tokens * H);
    ASSERT_EQ(out, combined_gpu_y[r]) << "combine of the GPU's expert rows, rank " << r;
    const double err = rel_error(out, combined_cpu_y[r]);
    std::printf("rank %d: FFN layer |out-ref|/|ref| = %.3g (all-CPU layer)\n", r, err);
    EXPECT_LT(err, kFfnTol) << "rank " << r;
  }
  for (int r = 0; r < R; ++r) {
    FM_CHECK_CUDA(cudaSetDevice(devices[r]));
    FM_CHECK_CUDA(cudaStreamSynchronize(rk[r].stream));
    rk[r].ffn.reset();
    rk[r].weights.reset();
    for (void* p :
         {static_cast<void*>(rk[r].x), static_cast<void*>(rk[r].y), static_cast<void*>(rk[r].out),
          static_cast<void*>(rk[r].idx), static_cast<void*>(rk[r].w), static_cast<void*>(rk[r].sa)})
      cudaFree(p);
    cudaStreamDestroy(rk[r].stream);
  }
}

}  // namespace
}  // namespace fp8moe::comm
