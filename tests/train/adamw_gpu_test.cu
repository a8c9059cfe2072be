// AdamWGpu (src/train/sm90_adamw.cu) against fp8moe::AdamW::step (src/train/optimizer.cpp):
// weights, BF16 moments and the BF16 weight copy equal BIT FOR BIT over several steps (warm-up,
// cosine, weight decay on and off, clipped and unclipped steps), tensors of awkward sizes, some
// misaligned (the scalar path); the grad norm within 1e-12 of the CPU's sequential double sum
// (the CPU step clips with the GPU's norm so that the bits can be compared) and the same bits on a
// second run; a NaN gradient skips the step; bad tensors are rejected.
// Run: test_train_gpu --gtest_filter='AdamWGpu*'
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <random>
#include <vector>

#include "../kernels/gpu_test_util.cuh"
#include "fp8moe/train/adamw_gpu.h"

namespace fp8moe {
namespace {

using test::DeviceBuffer;

struct Layout {
  std::vector<int64_t> sizes, offsets;  // offsets into the pools (elements)
  int64_t pool = 0;
};

// Tensors of awkward sizes; every third one starts one element past 16-byte alignment.
Layout make_layout() {
  Layout l;
  l.sizes = {1, 3, 4, 7, 128, 8191, 8192, 8193, 20000, 100003, 5, 65536 + 12};
  for (size_t t = 0; t < l.sizes.size(); ++t) {
    l.pool = (l.pool + 7) / 8 * 8 + (t % 3 == 2 ? 1 : 0);
    l.offsets.push_back(l.pool);
    l.pool += l.sizes[t];
  }
  return l;
}

void fill_grads(std::deque<Parameter>& params, uint64_t seed, float mag) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (auto& p : params)
    for (float& g : p.grad) g = mag * normal(rng);
}

template <typename T>
int64_t diffs(const T* a, const T* b, int64_t n) {
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += std::memcmp(a + i, b + i, sizeof(T)) != 0;
  return bad;
}

TEST(AdamWGpu, MatchesCpuStepBitForBit) {
  AdamWConfig cfg;
  cfg.lr = 1e-2;
  cfg.warmup_steps = 2;
  cfg.total_steps = 6;
  cfg.clip_norm = 40.0;
  const Layout l = make_layout();
  std::deque<Parameter> params;
  std::mt19937_64 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> value_pool(l.pool, NAN), grad_pool(l.pool, NAN);
  for (size_t t = 0; t < l.sizes.size(); ++t) {
    Parameter p;
    p.name = "t" + std::to_string(t);
    p.value.resize(l.sizes[t]);
    p.grad.resize(l.sizes[t]);
    for (float& v : p.value) v = 0.1f * normal(rng);
    p.weight_decay = t % 4 != 1;
    params.push_back(std::move(p));
  }
  AdamW cpu(cfg, params);
  for (size_t t = 0; t < params.size(); ++t)
    std::memcpy(value_pool.data() + l.offsets[t], params[t].value.data(), l.sizes[t] * 4);
  DeviceBuffer<float> dvalue(value_pool), dgrad(l.pool);
  DeviceBuffer<uint16_t> dm(l.pool), dv(l.pool), dcopy(l.pool);
  dm.poison(0);
  dv.poison(0);
  dcopy.poison();
  std::vector<AdamWGpuTensor> tensors;
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t o = l.offsets[t];
    tensors.push_back({dvalue.get() + o, dgrad.get() + o, dm.get() + o, dv.get() + o, l.sizes[t],
                       params[t].weight_decay,
                       t % 2 == 0 ? reinterpret_cast<bf16*>(dcopy.get()) + o : nullptr});
  }
  AdamWGpu gpu(cfg, tensors);
  for (int64_t step = 0; step < 6; ++step) {
    // Steps 1 and 4 have large gradients: clipped.
    fill_grads(params, 100 + step, step == 1 || step == 4 ? 1.0f : 0.05f);
    for (size_t t = 0; t < params.size(); ++t)
      std::memcpy(grad_pool.data() + l.offsets[t], params[t].grad.data(), l.sizes[t] * 4);
    dgrad.upload(grad_pool);
    gpu.step(step, nullptr);
    const AdamWGpuState st = gpu.state(nullptr);
    double ss = 0;  // clip_gradients' norm
    for (const auto& p : params)
      for (float g : p.grad) ss += static_cast<double>(g) * g;
    const double cpu_norm = std::sqrt(ss);
    EXPECT_NEAR(st.grad_norm, cpu_norm, 1e-12 * cpu_norm) << "step " << step;
    EXPECT_EQ(st.clipped, st.grad_norm > cfg.clip_norm ? 1 : 0);
    EXPECT_EQ(st.skipped, 0);
    if (st.grad_norm > cfg.clip_norm) {  // clip_gradients with the GPU's norm
      const float s = static_cast<float>(cfg.clip_norm / st.grad_norm);
      for (auto& p : params)
        for (float& g : p.grad) g *= s;
    }
    cpu.step(params, step);
    const auto got_w = dvalue.download();
    const auto got_c = dcopy.download();
    const auto got_m = dm.download(), got_v = dv.download();
    int64_t bad_w = 0, bad_m = 0, bad_v = 0, bad_c = 0;
    for (size_t t = 0; t < params.size(); ++t) {
      const int64_t o = l.offsets[t], n = l.sizes[t];
      bad_w += diffs(got_w.data() + o, params[t].value.data(), n);
      bad_m += diffs(got_m.data() + o, cpu.m()[t].data(), n);
      bad_v += diffs(got_v.data() + o, cpu.v()[t].data(), n);
      if (t % 2 == 0)
        for (int64_t i = 0; i < n; ++i)
          bad_c += got_c[o + i] != float_to_bf16_bits(params[t].value[i]);
    }
    EXPECT_EQ(bad_w + bad_m + bad_v + bad_c, 0) << "step " << step;
    std::printf(
        "adamw step %lld: norm %.6f (cpu %.6f, rel %.1e)%s: %lld w, %lld m, %lld v, "
        "%lld bf16-copy elements differ (bit) of %lld\n",
        static_cast<long long>(step), st.grad_norm, cpu_norm,
        std::fabs(st.grad_norm - cpu_norm) / cpu_norm, st.clipped ? " clipped" : "",
        static_cast<long long>(bad_w), static_cast<long long>(bad_m), static_cast<long long>(bad_v),
        static_cast<long long>(bad_c), static_cast<long long>(gpu.total_numel()));
  }
  // The norm again: the same bits.
  const double first = gpu.state(nullptr).grad_norm;
  gpu.grad_norm(nullptr);
  EXPECT_EQ(gpu.state(nullptr).grad_norm, first);
}

TEST(AdamWGpu, NonFiniteGradientSkipsTheStep) {
  AdamWConfig cfg;
  const int64_t n = 10000;
  std::vector<float> w(n, 0.5f), g(n, 0.01f);
  g[1234] = NAN;
  DeviceBuffer<float> dw(w), dg(g);
  DeviceBuffer<uint16_t> dm(n), dv(n);
  dm.poison(0);
  dv.poison(0);
  AdamWGpu gpu(cfg, {{dw.get(), dg.get(), dm.get(), dv.get(), n, true, nullptr}});
  gpu.step(0, nullptr);
  gpu.step(1, nullptr);
  const AdamWGpuState st = gpu.state(nullptr);
  EXPECT_TRUE(std::isnan(st.grad_norm));
  EXPECT_EQ(st.skipped, 1);
  EXPECT_EQ(st.skipped_total, 2u);
  EXPECT_EQ(dw.download(), w);
  EXPECT_EQ(dm.download(), std::vector<uint16_t>(n, 0));
  // Finite again: the step runs.
  g[1234] = 0.0f;
  dg.upload(g);
  gpu.step(2, nullptr);
  EXPECT_EQ(gpu.state(nullptr).skipped, 0);
  EXPECT_NE(dw.download(), w);
}

TEST(AdamWGpu, BadTensorsAreRejected) {
  AdamWConfig cfg;
  DeviceBuffer<float> w(64), g(64);
  DeviceBuffer<uint16_t> m(64), v(64);
  EXPECT_THROW(AdamWGpu(cfg, {}), Error);
  EXPECT_THROW(AdamWGpu(cfg, {{w.get(), g.get(), m.get(), v.get(), 0, true, nullptr}}), Error);
  EXPECT_THROW(AdamWGpu(cfg, {{w.get(), nullptr, m.get(), v.get(), 64, true, nullptr}}), Error);
  float* odd = reinterpret_cast<float*>(reinterpret_cast<char*>(w.get()) + 2);
  EXPECT_THROW(AdamWGpu(cfg, {{odd, g.get(), m.get(), v.get(), 8, true, nullptr}}), Error);
  AdamWConfig bad = cfg;
  bad.beta2 = 1.0;
  EXPECT_THROW(AdamWGpu(bad, {{w.get(), g.get(), m.get(), v.get(), 64, true, nullptr}}), Error);
}

}  // namespace
}  // namespace fp8moe
