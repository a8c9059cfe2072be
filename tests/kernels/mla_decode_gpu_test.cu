// MLA's decoding attention in latent form on the GPU (src/kernels/sm90_mla_decode.cu: the wgmma
// FlashDecoding kernel and the naive anchor) against the CPU reference
// (src/kernels/mla_decode_reference.cpp): fresh random queries and cache rows, pages shuffled,
// every cache row that no sequence owns (unused pages, the tail of a sequence's last page) NaN, the
// outputs poisoned (NaN) first; sequences of 1 .. 4097 keys (tile and page edges), 1 and 2
// queries a sequence (causal among them, a row that sees no key), 8 / 16 / 128 heads, latent 256
// and 512, the planned split count and forced ones. Bounds: P is rounded to BF16 before P . c
// (~2^-9 relative a term, averaging out over the keys) and out is BF16, so
// ||out - ref|| / ||ref|| <= 1e-2; lse (FP32 scores) within 1e-3 absolute; every output finite
// where the reference is.
// Run: test_kernels_gpu --gtest_filter='MlaDecodeGpu*'
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/kernels/mla_decode.h"
#include "gpu_test_util.cuh"

namespace fp8moe {
namespace {

using kernels::MlaDecodePlan;
using kernels::MlaDecodeShape;
using test::DeviceBuffer;

constexpr float kScale = 0.1352f;  // V3's: 192^-0.5 times YaRN's mscale^2

// A batch of sequences in a paged cache: the host side.
struct DecodeHost {
  MlaDecodeShape shape;
  std::vector<int32_t> lens, table;
  std::vector<bf16> q, cache;
};

DecodeHost make_host(int64_t queries, int64_t heads, int64_t latent, std::vector<int32_t> lens,
                     uint64_t seed) {
  DecodeHost h;
  h.lens = std::move(lens);
  MlaDecodeShape& s = h.shape;
  s.batch = static_cast<int64_t>(h.lens.size());
  s.queries = queries;
  s.heads = heads;
  s.latent_dim = latent;
  s.rope_dim = 64;
  s.page_tokens = 64;
  s.softmax_scale = kScale;
  const int64_t longest = *std::max_element(h.lens.begin(), h.lens.end());
  s.max_pages = std::max<int64_t>(1, (longest + 63) / 64 + 1);  // one page never used
  const int64_t D = s.key_dim();
  std::mt19937_64 rng(seed);
  // Pages: every sequence's, in shuffled order, plus 3 nobody owns.
  int64_t pages = 3;
  for (int32_t len : h.lens) pages += (len + 63) / 64;
  std::vector<int32_t> order(static_cast<size_t>(pages));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  h.table.assign(static_cast<size_t>(s.batch * s.max_pages), -1);
  h.cache.assign(static_cast<size_t>(pages * 64 * D), to_bf16(std::nanf("")));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  size_t next = 0;
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t t = 0; t < h.lens[b]; ++t) {
      if (t % 64 == 0) h.table[b * s.max_pages + t / 64] = order[next++];
      bf16* row = h.cache.data() + (h.table[b * s.max_pages + t / 64] * 64 + t % 64) * D;
      for (int64_t d = 0; d < D; ++d) row[d] = to_bf16(normal(rng));
    }
  h.q.resize(static_cast<size_t>(s.batch * s.rows() * D));
  for (auto& v : h.q) v = to_bf16(0.3f * normal(rng));
  return h;
}

// ... and the device copies.
struct DecodeInputs : DecodeHost {
  DeviceBuffer<bf16> d_q, d_cache;
  DeviceBuffer<int32_t> d_table, d_lens;

  DecodeInputs(int64_t queries, int64_t heads, int64_t latent, std::vector<int32_t> seq_lens,
               uint64_t seed)
      : DecodeHost(make_host(queries, heads, latent, std::move(seq_lens), seed)),
        d_q(q),
        d_cache(cache),
        d_table(table),
        d_lens(lens) {}

  void reference(std::vector<float>& out, std::vector<float>& lse) const {
    std::vector<float> qf(q.size()), cf(cache.size());
    for (size_t i = 0; i < q.size(); ++i) qf[i] = to_float(q[i]);
    for (size_t i = 0; i < cache.size(); ++i) cf[i] = to_float(cache[i]);
    out.assign(static_cast<size_t>(shape.batch * shape.rows() * shape.latent_dim), 0.0f);
    lse.assign(static_cast<size_t>(shape.batch * shape.rows()), 0.0f);
    kernels::mla_decode_reference(shape, qf.data(), cf.data(), table.data(), lens.data(),
                                  out.data(), lse.data());
  }
};

struct Errors {
  double out_rel = 0, lse_abs = 0;
  int64_t bad = 0;  // non-finite where the reference is finite, or an lse -inf mismatch
};

Errors compare(const std::vector<bf16>& out, const std::vector<float>& lse,
               const std::vector<float>& ref_out, const std::vector<float>& ref_lse) {
  Errors e;
  double num = 0, den = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const double g = to_float(out[i]), w = ref_out[i];
    if (!std::isfinite(g)) {
      ++e.bad;
      continue;
    }
    num += (g - w) * (g - w);
    den += w * w;
  }
  e.out_rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  for (size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(ref_lse[i]) || std::isinf(lse[i])) {
      if (lse[i] != ref_lse[i]) ++e.bad;
      continue;
    }
    if (!std::isfinite(lse[i])) {
      ++e.bad;
      continue;
    }
    e.lse_abs = std::max(e.lse_abs, std::abs(static_cast<double>(lse[i]) - ref_lse[i]));
  }
  return e;
}

int sm_count() {
  int dev = 0, sms = 0;
  FM_CHECK_CUDA(cudaGetDevice(&dev));
  FM_CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

// Runs the kernel with `splits` (0: the plan's) and the naive anchor, each against the reference.
void check_case(const char* name, int64_t queries, int64_t heads, int64_t latent,
                std::vector<int32_t> lens, int64_t splits, uint64_t seed) {
  DecodeInputs in(queries, heads, latent, std::move(lens), seed);
  std::vector<float> ref_out, ref_lse;
  in.reference(ref_out, ref_lse);
  MlaDecodePlan plan = kernels::mla_decode_plan(in.shape, sm_count());
  if (splits > 0) {
    plan.splits = splits;
    plan.workspace_bytes = kernels::mla_decode_workspace_bytes(in.shape, splits);
  }
  DeviceBuffer<bf16> out(ref_out.size());
  DeviceBuffer<float> lse(ref_lse.size());
  DeviceBuffer<uint8_t> ws(std::max<size_t>(plan.workspace_bytes, 16));
  out.poison();
  lse.poison();
  ws.poison();
  kernels::mla_decode(in.shape, plan, in.d_q.get(), in.d_cache.get(), in.d_table.get(),
                      in.d_lens.get(), out.get(), lse.get(), ws.get(), nullptr);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  const Errors e = compare(out.download(), lse.download(), ref_out, ref_lse);
  std::printf("[ mla_decode ] %-22s splits %3lld: out rel %.3e, lse abs %.2e, bad %lld\n", name,
              static_cast<long long>(plan.splits), e.out_rel, e.lse_abs,
              static_cast<long long>(e.bad));
  EXPECT_EQ(e.bad, 0) << name;
  EXPECT_LE(e.out_rel, 1e-2) << name;
  EXPECT_LE(e.lse_abs, 1e-3) << name;

  out.poison();
  lse.poison();
  kernels::mla_decode_naive(in.shape, in.d_q.get(), in.d_cache.get(), in.d_table.get(),
                            in.d_lens.get(), out.get(), lse.get(), nullptr);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  const Errors n = compare(out.download(), lse.download(), ref_out, ref_lse);
  std::printf("[ mla_decode ] %-22s naive     : out rel %.3e, lse abs %.2e, bad %lld\n", name,
              n.out_rel, n.lse_abs, static_cast<long long>(n.bad));
  EXPECT_EQ(n.bad, 0) << name << " naive";
  EXPECT_LE(n.out_rel, 1e-2) << name << " naive";
  EXPECT_LE(n.lse_abs, 1e-3) << name << " naive";
}

TEST(MlaDecodeGpu, V3HeadsOneQuery) {
  check_case("v3 q1", 1, 128, 512, {1, 63, 64, 65, 1000, 129}, 0, 11);
  check_case("v3 q1 split3", 1, 128, 512, {1, 63, 64, 65, 1000, 129}, 3, 12);
}

TEST(MlaDecodeGpu, LongSequencesSplit) {
  check_case("v3 long planned", 1, 128, 512, {4097, 2000}, 0, 21);
  check_case("v3 long split1", 1, 128, 512, {4097, 2000}, 1, 22);
  check_case("v3 long split7", 1, 128, 512, {4097, 2000}, 7, 23);
}

TEST(MlaDecodeGpu, TwoQueriesCausal) {
  // len 1 with 2 queries: query 0 sees no key (out 0, lse -inf).
  check_case("16 heads q2", 2, 16, 512, {2, 65, 300, 1}, 0, 31);
  check_case("16 heads q2 split2", 2, 16, 512, {2, 65, 300, 1}, 2, 32);
  check_case("128 heads q2", 2, 128, 512, {130, 7}, 0, 33);
}

TEST(MlaDecodeGpu, SmallGpuLatent256) {
  check_case("8 heads latent256", 1, 8, 256, {1, 64, 500, 77}, 0, 41);
  check_case("8 heads latent256 s4", 1, 8, 256, {1, 64, 500, 77}, 4, 42);
}

// The fixed-split plan: against the reference, and a sequence's output the same bits alone as in
// a batch of three (its key ranges depend on its own length only).
TEST(MlaDecodeGpu, FixedSplitsAreBatchInvariant) {
  DecodeInputs in(1, 128, 512, {300, 900, 77}, 71);
  std::vector<float> ref_out, ref_lse;
  in.reference(ref_out, ref_lse);
  const MlaDecodePlan plan = kernels::mla_decode_plan_fixed(in.shape, 256);
  EXPECT_EQ(plan.splits, 4);  // max_pages 16 x 64 keys / 256
  const int64_t rows = in.shape.rows(), L = 512;
  DeviceBuffer<bf16> out(static_cast<size_t>(in.shape.batch * rows * L));
  DeviceBuffer<float> lse(static_cast<size_t>(in.shape.batch * rows));
  DeviceBuffer<uint8_t> ws(plan.workspace_bytes);
  out.poison();
  lse.poison();
  kernels::mla_decode(in.shape, plan, in.d_q.get(), in.d_cache.get(), in.d_table.get(),
                      in.d_lens.get(), out.get(), lse.get(), ws.get(), nullptr);
  const std::vector<bf16> batched = out.download();
  const Errors e = compare(batched, lse.download(), ref_out, ref_lse);
  std::printf("[ mla_decode ] fixed splits (256 keys): out rel %.3e, lse abs %.2e, bad %lld\n",
              e.out_rel, e.lse_abs, static_cast<long long>(e.bad));
  EXPECT_EQ(e.bad, 0);
  EXPECT_LE(e.out_rel, 1e-2);
  EXPECT_LE(e.lse_abs, 1e-3);
  for (int64_t b = 0; b < in.shape.batch; ++b) {
    MlaDecodeShape one = in.shape;
    one.batch = 1;
    const MlaDecodePlan plan1 = kernels::mla_decode_plan_fixed(one, 256);
    DeviceBuffer<bf16> out1(static_cast<size_t>(rows * L));
    DeviceBuffer<float> lse1(static_cast<size_t>(rows));
    DeviceBuffer<uint8_t> ws1(plan1.workspace_bytes);
    out1.poison();
    kernels::mla_decode(one, plan1, in.d_q.get() + b * rows * in.shape.key_dim(), in.d_cache.get(),
                        in.d_table.get() + b * in.shape.max_pages, in.d_lens.get() + b, out1.get(),
                        lse1.get(), ws1.get(), nullptr);
    const std::vector<bf16> alone = out1.download();
    EXPECT_EQ(std::memcmp(alone.data(), batched.data() + b * rows * L, alone.size() * 2), 0)
        << "sequence " << b << " alone differs from its rows in the batch";
  }
}

// Captured once, replayed after the sequences grew on the device: the lengths are read there.
TEST(MlaDecodeGpu, GraphReplayReadsNewLengths) {
  DecodeInputs in(1, 128, 512, {300, 900}, 51);
  const MlaDecodePlan plan = kernels::mla_decode_plan(in.shape, sm_count());
  DeviceBuffer<bf16> out(static_cast<size_t>(in.shape.batch * in.shape.rows() * 512));
  DeviceBuffer<float> lse(static_cast<size_t>(in.shape.batch * in.shape.rows()));
  DeviceBuffer<uint8_t> ws(std::max<size_t>(plan.workspace_bytes, 16));
  cudaStream_t stream;
  FM_CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph;
  FM_CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  kernels::mla_decode(in.shape, plan, in.d_q.get(), in.d_cache.get(), in.d_table.get(),
                      in.d_lens.get(), out.get(), lse.get(), ws.get(), stream);
  FM_CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec;
  FM_CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  for (const std::vector<int32_t>& lens : {std::vector<int32_t>{300, 900}, {64, 1}}) {
    in.lens = lens;
    in.d_lens.upload(lens);
    std::vector<float> ref_out, ref_lse;
    in.reference(ref_out, ref_lse);
    out.poison();
    lse.poison();
    FM_CHECK_CUDA(cudaGraphLaunch(exec, stream));
    FM_CHECK_CUDA(cudaStreamSynchronize(stream));
    const Errors e = compare(out.download(), lse.download(), ref_out, ref_lse);
    std::printf("[ mla_decode ] graph lens %d,%d: out rel %.3e, lse abs %.2e\n", lens[0], lens[1],
                e.out_rel, e.lse_abs);
    EXPECT_EQ(e.bad, 0);
    EXPECT_LE(e.out_rel, 1e-2);
    EXPECT_LE(e.lse_abs, 1e-3);
  }
  FM_CHECK_CUDA(cudaGraphExecDestroy(exec));
  FM_CHECK_CUDA(cudaGraphDestroy(graph));
  FM_CHECK_CUDA(cudaStreamDestroy(stream));
}

TEST(MlaDecodeGpu, RejectsWhatItCannotRun) {
  DecodeInputs in(1, 16, 512, {100}, 61);
  MlaDecodePlan plan = kernels::mla_decode_plan(in.shape, sm_count());
  DeviceBuffer<bf16> out(16 * 512);
  DeviceBuffer<float> lse(16);
  DeviceBuffer<uint8_t> ws(std::max<size_t>(plan.workspace_bytes, 16) + 16);
  const auto run = [&](MlaDecodeShape s, const MlaDecodePlan& pl, const bf16* q, void* w) {
    kernels::mla_decode(s, pl, q, in.d_cache.get(), in.d_table.get(), in.d_lens.get(), out.get(),
                        lse.get(), w, nullptr);
  };
  MlaDecodeShape bad = in.shape;
  bad.latent_dim = 128;
  EXPECT_THROW(run(bad, plan, in.d_q.get(), ws.get()), Error);
  bad = in.shape;
  bad.page_tokens = 32;
  EXPECT_THROW(run(bad, plan, in.d_q.get(), ws.get()), Error);
  EXPECT_THROW(run(in.shape, plan, in.d_q.get() + 1, ws.get()), Error);  // misaligned
  MlaDecodePlan small = plan;
  small.splits = 5;
  small.workspace_bytes = kernels::mla_decode_workspace_bytes(in.shape, 4);
  EXPECT_THROW(run(in.shape, small, in.d_q.get(), ws.get()), Error);
  try {
    run(in.shape, small, in.d_q.get(), ws.get());
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("workspace"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace fp8moe
