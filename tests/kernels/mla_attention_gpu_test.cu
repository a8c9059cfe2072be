// MLA's causal attention core on the GPU (src/kernels/sm90_mla_attention.cu) against the CPU
// references (src/kernels/mla_attention_reference.cpp): fresh random inputs, outputs poisoned
// (0xFF: NaN), shapes with seq not a multiple of the blocks, batch > 1 (causality per sequence),
// 1 and 128 heads, seq 1. Bounds (docs/kernels/attention.md): the GPU rounds P to BF16 before
// P V (and dS before dS K, dS^T Q): ~2^-9 relative per term, averaging out over the keys, plus
// BF16 outputs; so ||got - want|| / ||want|| <= 1e-2 for out, dq, dkv and dk_pe, lse within
// 1e-3 absolute (FP32 scores: ~1e-6), every output finite.
// Run: test_kernels_gpu --gtest_filter='MlaAttentionGpu*'
// The backward runs once per implementation (MlaBackwardImpl: mma.sync, wgmma), same bounds; so
// does the forward (MlaForwardImpl, s21-af).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/kernels/mla_attention.h"
#include "gpu_test_util.cuh"

namespace fp8moe {
namespace {

using kernels::MlaAttentionShape;
using test::DeviceBuffer;
constexpr int64_t kDq = kernels::kMlaQDim, kDkv = kernels::kMlaKvDim, kDr = kernels::kMlaRopeDim,
                  kDv = kernels::kMlaValueDim;
constexpr float kScale = 0.1352f;  // V3's: 192^-0.5 times YaRN's mscale^2

std::vector<bf16> random_bf16(int64_t n, uint64_t seed, float std_dev) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, std_dev);
  std::vector<bf16> x(static_cast<size_t>(n));
  for (auto& v : x) v = to_bf16(normal(rng));
  return x;
}

template <typename T>
double value(T v) {
  if constexpr (std::is_same_v<T, bf16>)
    return to_float(v);
  else
    return v;
}

// ||got - want|| / ||want||; non-finite got counted (the poison left anywhere fails).
template <typename T>
double rel_error(const std::vector<T>& got, const std::vector<T>& want, int64_t* nonfinite) {
  double num = 0, den = 0;
  *nonfinite = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = value(got[i]), w = value(want[i]);
    if (!std::isfinite(g)) {
      ++*nonfinite;
      continue;
    }
    num += (g - w) * (g - w);
    den += w * w;
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

struct Case {
  MlaAttentionShape shape;
  const char* what;
};

std::string name_of(const Case& c) {
  return std::to_string(c.shape.batch) + "x" + std::to_string(c.shape.seq) + "x" +
         std::to_string(c.shape.heads) + " (" + c.what + ")";
}

const Case kCases[] = {
    {{1, 1, 1}, "seq 1"},
    {{1, 200, 1}, "1 head, seq not a multiple of 64 or 128"},
    {{3, 77, 2}, "batch 3: causality per sequence"},
    {{2, 130, 4}, "two query blocks, one key past a block"},
    {{1, 256, 128}, "128 heads"},
    {{1, 64, 3}, "exactly one block"},
    {{1, 515, 2}, "many query and key blocks (both passes' pipelines)"},
};

struct Inputs {
  std::vector<bf16> q, kv, kpe, dout;
};
Inputs make_inputs(MlaAttentionShape s, uint64_t seed) {
  const int64_t T = s.tokens(), H = s.heads;
  return {random_bf16(T * H * kDq, seed, 1.0f), random_bf16(T * H * kDkv, seed + 1, 1.0f),
          random_bf16(T * kDr, seed + 2, 1.0f), random_bf16(T * H * kDv, seed + 3, 1.0f)};
}

// Every case through one forward implementation: the reference's bounds. The wgmma forms (s21-af)
// also run twice (bit for bit equal) and print their out against the default (mma.sync) kernel's.
void check_forward(kernels::MlaForwardImpl impl, const char* label) {
  const bool wgmma = impl != kernels::MlaForwardImpl::kMmaSync;
  uint64_t seed = 1000;
  for (const Case& c : kCases) {
    const MlaAttentionShape s = c.shape;
    const int64_t T = s.tokens(), H = s.heads;
    const Inputs in = make_inputs(s, seed += 10);
    std::vector<bf16> want(static_cast<size_t>(T * H * kDv));
    std::vector<float> want_lse(static_cast<size_t>(H * T));
    kernels::mla_attention_forward_reference(in.q.data(), in.kv.data(), in.kpe.data(), s, kScale,
                                             want.data(), want_lse.data());
    DeviceBuffer<bf16> q(in.q), kv(in.kv), kpe(in.kpe), out(want.size());
    DeviceBuffer<float> lse(want_lse.size());
    out.poison();
    lse.poison();
    kernels::mla_attention_forward(q.get(), kv.get(), kpe.get(), s, kScale, out.get(), lse.get(),
                                   nullptr, impl);
    FM_CHECK_CUDA(cudaDeviceSynchronize());
    int64_t bad = 0, bad_lse = 0;
    const std::vector<bf16> got = out.download();
    const double err = rel_error(got, want, &bad);
    const std::vector<float> got_lse = lse.download();
    double lse_err = 0;
    for (size_t i = 0; i < got_lse.size(); ++i) {
      if (!std::isfinite(got_lse[i]))
        ++bad_lse;
      else
        lse_err = std::max(lse_err, std::abs(static_cast<double>(got_lse[i]) - want_lse[i]));
    }
    std::printf("  forward %-6s %-50s out rel err %.3e  lse max abs err %.3e", label,
                name_of(c).c_str(), err, lse_err);
    if (wgmma) {
      // The default kernel's out on the same inputs, and a second run of this one.
      DeviceBuffer<bf16> out_mma(want.size());
      DeviceBuffer<float> lse_mma(want_lse.size());
      kernels::mla_attention_forward(q.get(), kv.get(), kpe.get(), s, kScale, out_mma.get(),
                                     lse_mma.get(), nullptr);
      out.poison();
      lse.poison();
      kernels::mla_attention_forward(q.get(), kv.get(), kpe.get(), s, kScale, out.get(), lse.get(),
                                     nullptr, impl);
      FM_CHECK_CUDA(cudaDeviceSynchronize());
      int64_t bad_mma = 0;
      std::printf("  vs mma %.3e", rel_error(got, out_mma.download(), &bad_mma));
      const std::vector<bf16> again = out.download();
      const std::vector<float> again_lse = lse.download();
      EXPECT_EQ(0, std::memcmp(got.data(), again.data(), got.size() * sizeof(bf16)))
          << label << " " << name_of(c) << ": out differs between two runs";
      EXPECT_EQ(0, std::memcmp(got_lse.data(), again_lse.data(), got_lse.size() * sizeof(float)))
          << label << " " << name_of(c) << ": lse differs between two runs";
    }
    std::printf("\n");
    EXPECT_EQ(bad, 0) << label << " " << name_of(c);
    EXPECT_EQ(bad_lse, 0) << label << " " << name_of(c);
    EXPECT_LE(err, 1e-2) << label << " " << name_of(c);
    EXPECT_LE(lse_err, 1e-3) << label << " " << name_of(c);
  }
}

TEST(MlaAttentionGpu, ForwardMatchesReference) {
  check_forward(kernels::MlaForwardImpl::kMmaSync, "mma");
}

// s21-af: the wgmma forward (TMA producer, two consumer warpgroups) without and with the
// warpgroups' ping-pong, same bounds.
TEST(MlaAttentionGpu, ForwardWgmmaMatchesReferenceAndIsDeterministic) {
  check_forward(kernels::MlaForwardImpl::kWgmma, "wgmma");
}
TEST(MlaAttentionGpu, ForwardWgmmaPingPongMatchesReferenceAndIsDeterministic) {
  check_forward(kernels::MlaForwardImpl::kWgmmaPingPong, "wg_pp");
}

// Every case through one backward implementation: the references' bounds, then a second run bit
// for bit equal to the first.
void check_backward(kernels::MlaBackwardImpl impl, const char* label) {
  uint64_t seed = 2000;
  for (const Case& c : kCases) {
    const MlaAttentionShape s = c.shape;
    const int64_t T = s.tokens(), H = s.heads;
    const Inputs in = make_inputs(s, seed += 10);
    std::vector<bf16> o(static_cast<size_t>(T * H * kDv));
    std::vector<float> l(static_cast<size_t>(H * T));
    kernels::mla_attention_forward_reference(in.q.data(), in.kv.data(), in.kpe.data(), s, kScale,
                                             o.data(), l.data());
    std::vector<bf16> want_dq(in.q.size()), want_dkv(in.kv.size());
    std::vector<float> want_dkpe(in.kpe.size());
    kernels::mla_attention_backward_reference(in.q.data(), in.kv.data(), in.kpe.data(), o.data(),
                                              in.dout.data(), l.data(), s, kScale, want_dq.data(),
                                              want_dkv.data(), want_dkpe.data());
    DeviceBuffer<bf16> q(in.q), kv(in.kv), kpe(in.kpe), out(o), dout(in.dout), dq(in.q.size()),
        dkv(in.kv.size());
    DeviceBuffer<float> lse(l), dkpe(in.kpe.size());
    const size_t ws_bytes = kernels::mla_attention_backward_workspace_bytes(s);
    DeviceBuffer<uint8_t> ws(ws_bytes);
    std::vector<float> first_dkpe;
    std::vector<bf16> first_dq, first_dkv;
    for (int run = 0; run < 2; ++run) {
      dq.poison();
      dkv.poison();
      dkpe.poison();
      ws.poison();
      kernels::mla_attention_backward(q.get(), kv.get(), kpe.get(), out.get(), dout.get(),
                                      lse.get(), s, kScale, dq.get(), dkv.get(), dkpe.get(),
                                      ws.get(), ws_bytes, nullptr, impl);
      FM_CHECK_CUDA(cudaDeviceSynchronize());
      const auto got_dq = dq.download(), got_dkv = dkv.download();
      const auto got_dkpe = dkpe.download();
      if (run == 0) {
        int64_t b1 = 0, b2 = 0, b3 = 0;
        const double e1 = rel_error(got_dq, want_dq, &b1), e2 = rel_error(got_dkv, want_dkv, &b2),
                     e3 = rel_error(got_dkpe, want_dkpe, &b3);
        std::printf("  backward %-6s %-42s dq %.3e  dkv %.3e  dk_pe %.3e\n", label,
                    name_of(c).c_str(), e1, e2, e3);
        EXPECT_EQ(b1 + b2 + b3, 0) << label << " " << name_of(c) << ": non-finite dq " << b1
                                   << " dkv " << b2 << " dk_pe " << b3;
        EXPECT_LE(e1, 1e-2) << label << " " << name_of(c) << " dq";
        EXPECT_LE(e2, 1e-2) << label << " " << name_of(c) << " dkv";
        EXPECT_LE(e3, 1e-2) << label << " " << name_of(c) << " dk_pe";
        first_dq = got_dq;
        first_dkv = got_dkv;
        first_dkpe = got_dkpe;
      } else {  // bit for bit the same: no atomics anywhere
        EXPECT_EQ(0, std::memcmp(first_dq.data(), got_dq.data(), got_dq.size() * sizeof(bf16)))
            << label << " " << name_of(c);
        EXPECT_EQ(0, std::memcmp(first_dkv.data(), got_dkv.data(), got_dkv.size() * sizeof(bf16)))
            << label << " " << name_of(c);
        EXPECT_EQ(0,
                  std::memcmp(first_dkpe.data(), got_dkpe.data(), got_dkpe.size() * sizeof(float)))
            << label << " " << name_of(c);
      }
    }
  }
}

TEST(MlaAttentionGpu, BackwardMatchesReferenceAndIsDeterministic) {
  check_backward(kernels::MlaBackwardImpl::kMmaSync, "mma");
}

// s21-ab: the wgmma variant of the dk/dv and dq passes, same bounds.
TEST(MlaAttentionGpu, BackwardWgmmaMatchesReferenceAndIsDeterministic) {
  check_backward(kernels::MlaBackwardImpl::kWgmma, "wgmma");
}

TEST(MlaAttentionGpu, BadArgumentsThrow) {
  DeviceBuffer<bf16> x(4096);
  DeviceBuffer<float> l(64);
  const MlaAttentionShape ok{1, 4, 2};
  const auto fwd = [&](const bf16* q, MlaAttentionShape s) {
    kernels::mla_attention_forward(q, x.get(), x.get(), s, kScale, x.get(), l.get(), nullptr);
  };
  EXPECT_THROW(fwd(x.get(), {1, 0, 2}), Error);
  EXPECT_THROW(fwd(x.get(), {0, 4, 2}), Error);
  EXPECT_THROW(fwd(x.get(), {1, 4, 0}), Error);
  EXPECT_THROW(fwd(x.get(), {1, int64_t{1} << 20, 4096}), Error);  // T x H >= 2^31
  EXPECT_THROW(fwd(x.get() + 1, ok), Error);                       // misaligned q
  EXPECT_THROW(fwd(nullptr, ok), Error);
  const size_t ws = kernels::mla_attention_backward_workspace_bytes(ok);
  DeviceBuffer<uint8_t> w(ws);
  DeviceBuffer<float> g(256);
  EXPECT_THROW(
      kernels::mla_attention_backward(x.get(), x.get(), x.get(), x.get(), x.get(), l.get(), ok,
                                      kScale, x.get(), x.get(), g.get(), w.get(), ws - 4, nullptr),
      Error);  // workspace too small
  try {
    fwd(x.get(), {1, 0, 2});
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("seq=0"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace fp8moe
