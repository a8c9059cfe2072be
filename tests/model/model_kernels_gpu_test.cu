// model/model_kernels_gpu.h against its CPU meaning on fresh random inputs, outputs poisoned:
// RoPE and the embedding bit for bit (rope_apply_bf16_reference = ops.h rope_apply on the widened
// values; the CPU model's embed_rows / embed_backward order), cross-entropy within the stated
// tolerance of ops.h cross_entropy (its loss sum bit for bit to cross_entropy_sum_reference, and
// run to run), bad indices flagged, bad shapes thrown.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "../kernels/gpu_test_util.cuh"
#include "../support/expect_invalid.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/model/model_kernels_gpu.h"
#include "fp8moe/model/ops.h"

namespace fp8moe {
namespace {

using test::DeviceBuffer;
using test::expect_invalid;

std::vector<bf16> random_bf16(size_t n, std::mt19937_64& rng, float sigma) {
  std::normal_distribution<float> normal(0.0f, sigma);
  std::vector<bf16> v(n);
  for (auto& x : v) x = to_bf16(normal(rng));
  return v;
}

size_t count_bits_differ(const std::vector<bf16>& a, const std::vector<bf16>& b) {
  size_t n = 0;
  for (size_t i = 0; i < a.size(); ++i) n += a[i].bits != b[i].bits;
  return n;
}

RopeTable v3_table(int64_t positions) {
  const RopeScaling yarn{"yarn", 40.0, 32.0, 1.0, 1.0, 1.0, 4096};
  return make_rope_table(64, positions, 10000.0, yarn);
}

uint32_t read_status(const DeviceBuffer<uint32_t>& s) {
  return s.download()[0];
}

// ---- RoPE ----
TEST(ModelKernelsGpu, RopeQkMatchesReferenceBitForBit) {
  struct Case {
    int64_t tokens, heads, positions;
    bool packed;
  };
  const Case cases[] = {
      {777, 16, 4096, false}, {64, 128, 4096, true}, {1, 1, 1, false}, {3000, 4, 8192, true}};
  std::mt19937_64 rng(20261127);
  for (const Case& c : cases) {
    const RopeTable table = v3_table(c.positions);
    RopeTableGpu dtable(table);
    const int64_t qd = 192, ldk = 576, T = c.tokens, H = c.heads;
    std::vector<bf16> q = random_bf16(T * H * qd, rng, 2.0f), kv = random_bf16(T * ldk, rng, 1.0f);
    std::vector<int32_t> pos(T);
    std::uniform_int_distribution<int32_t> any(0, static_cast<int32_t>(c.positions - 1));
    for (int64_t t = 0; t < T; ++t)
      pos[t] = c.packed ? static_cast<int32_t>(t % 1000 + (t / 1000) * 7) : any(rng);
    for (const bool inverse : {false, true}) {
      std::vector<bf16> q_ref = q, kv_ref = kv;
      rope_apply_bf16_reference(table, q_ref.data() + (qd - 64), T, H, H * qd, qd, pos.data(),
                                inverse);
      rope_apply_bf16_reference(table, kv_ref.data() + 512, T, 1, ldk, 64, pos.data(), inverse);
      DeviceBuffer<bf16> dq(q), dkv(kv);
      DeviceBuffer<int32_t> dpos(pos);
      DeviceBuffer<uint32_t> status(std::vector<uint32_t>{0});
      rope_apply_qk_gpu(dtable.view(), dq.get(), T, H, qd, dkv.get() + 512, ldk, dpos.get(),
                        inverse, status.get(), nullptr);
      EXPECT_EQ(count_bits_differ(dq.download(), q_ref), 0u) << T << "x" << H << " inv " << inverse;
      EXPECT_EQ(count_bits_differ(dkv.download(), kv_ref), 0u) << T << " inv " << inverse;
      EXPECT_EQ(read_status(status), 0u);
      // The inverse of the forward: the backward. Forward then inverse returns near x.
      if (!inverse) {
        rope_apply_gpu(dtable.view(), dq.get() + (qd - 64), T, H, H * qd, qd, dpos.get(), true,
                       status.get(), nullptr);
        const std::vector<bf16> back = dq.download();
        // Two BF16 roundings of a rotation by a unit-norm (cos, sin): within 1% of the pair.
        double worst = 0;
        for (size_t i = 0; i < back.size(); ++i) {
          const double err = std::fabs(static_cast<double>(to_float(back[i])) - to_float(q[i]));
          const double pair = std::fabs(to_float(q[i])) + std::fabs(to_float(q[i ^ 1]));
          worst = std::max(worst, err / (0.01 * pair + 1e-30));
        }
        EXPECT_LT(worst, 1.0) << "forward then inverse";
      }
    }
    std::printf("rope %lld x %lld heads: bit-equal forward and inverse\n",
                static_cast<long long>(T), static_cast<long long>(H));
  }
}

TEST(ModelKernelsGpu, RopeBadPositionsFlaggedAndLeftUnchanged) {
  const RopeTable table = v3_table(256);
  RopeTableGpu dtable(table);
  std::mt19937_64 rng(7);
  const int64_t T = 40, H = 2, ld = H * 64;
  std::vector<bf16> x = random_bf16(T * ld, rng, 1.0f);
  std::vector<int32_t> pos(T);
  for (int64_t t = 0; t < T; ++t) pos[t] = static_cast<int32_t>(t * 5);
  pos[3] = 256;
  pos[9] = -1;
  std::vector<int32_t> ok_pos = pos;
  ok_pos[3] = ok_pos[9] = 0;
  std::vector<bf16> ref = x;
  rope_apply_bf16_reference(table, ref.data(), T, H, ld, 64, ok_pos.data(), false);
  for (const int64_t t : {3, 9})
    for (int64_t i = 0; i < ld; ++i) ref[t * ld + i] = x[t * ld + i];
  DeviceBuffer<bf16> dx(x);
  DeviceBuffer<int32_t> dpos(pos);
  DeviceBuffer<uint32_t> status(std::vector<uint32_t>{0});
  rope_apply_gpu(dtable.view(), dx.get(), T, H, ld, 64, dpos.get(), false, status.get(), nullptr);
  EXPECT_EQ(count_bits_differ(dx.download(), ref), 0u);
  EXPECT_EQ(read_status(status), kStatusBadPosition);
  expect_invalid([&] { check_model_kernels_status(status.get(), "rope", nullptr); },
                 "RoPE position outside the table");
  EXPECT_THROW(rope_apply_bf16_reference(table, x.data(), T, H, ld, 64, pos.data(), false), Error);
}

TEST(ModelKernelsGpu, RopeBadShapesThrow) {
  const RopeTable t12 = make_rope_table(12, 16, 10000.0);
  RopeTableGpu d12(t12);
  const RopeTable table = v3_table(16);
  RopeTableGpu dtable(table);
  DeviceBuffer<bf16> x(1024);
  DeviceBuffer<int32_t> pos(std::vector<int32_t>(4, 0));
  expect_invalid(
      [&] { rope_apply_gpu(d12.view(), x.get(), 4, 1, 16, 16, pos.get(), false, nullptr, 0); },
      "multiple of 8");
  expect_invalid(
      [&] {
        rope_apply_gpu(dtable.view(), x.get() + 1, 4, 1, 64, 64, pos.get(), false, nullptr, 0);
      },
      "16-byte aligned");
  expect_invalid(
      [&] { rope_apply_gpu(dtable.view(), x.get(), 4, 2, 128, 60, pos.get(), false, nullptr, 0); },
      "multiples of 8");
  expect_invalid(
      [&] {
        rope_apply_qk_gpu(dtable.view(), x.get(), 4, 1, 32, nullptr, 0, pos.get(), false, nullptr,
                          0);
      },
      "q_head_dim");
}

// ---- Embedding ----
TEST(ModelKernelsGpu, EmbeddingForwardBackwardBitForBit) {
  struct Case {
    int64_t vocab, hidden, tokens;
  };
  const Case cases[] = {{1000, 7168, 4096}, {129280, 1024, 8192}, {3, 8, 5}, {50, 64, 1}};
  std::mt19937_64 rng(99);
  for (const Case& c : cases) {
    const int64_t V = c.vocab, Hd = c.hidden, T = c.tokens, ld = Hd + 8;
    std::normal_distribution<float> normal(0.0f, 0.02f);
    std::vector<float> table(V * Hd);
    for (auto& v : table) v = normal(rng);
    std::vector<bf16> table16(table.size());
    for (size_t i = 0; i < table.size(); ++i) table16[i] = to_bf16(table[i]);
    // Ids with heavy repeats: a third from 5 frequent ids, the rest uniform.
    std::vector<int32_t> ids(T);
    std::uniform_int_distribution<int32_t> any(0, static_cast<int32_t>(V - 1));
    for (auto& id : ids)
      id = (rng() % 3 == 0) ? static_cast<int32_t>(rng() % std::min<int64_t>(5, V)) : any(rng);
    DeviceBuffer<float> dtab(table);
    DeviceBuffer<bf16> dtab16(table16);
    DeviceBuffer<int32_t> dids(ids);
    DeviceBuffer<uint32_t> status(std::vector<uint32_t>{0});
    // Forward, FP32 and BF16 tables.
    std::vector<bf16> ref(T * ld, bf16{0x7FC0});
    embedding_forward_reference(table.data(), V, Hd, ids.data(), T, ref.data(), ld);
    DeviceBuffer<bf16> out(T * ld);
    out.poison();
    embedding_forward_gpu(dtab.get(), V, Hd, dids.get(), T, out.get(), ld, status.get(), nullptr);
    std::vector<bf16> got = out.download();
    size_t diff = 0;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < Hd; ++i) diff += got[t * ld + i].bits != ref[t * ld + i].bits;
    EXPECT_EQ(diff, 0u) << "fp32 table";
    out.poison();
    embedding_forward_gpu(dtab16.get(), V, Hd, dids.get(), T, out.get(), ld, status.get(), nullptr);
    got = out.download();
    diff = 0;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < Hd; ++i)
        diff += got[t * ld + i].bits != table16[ids[t] * Hd + i].bits;
    EXPECT_EQ(diff, 0u) << "bf16 table";
    // Backward into a non-zero dtable (accumulation), BF16 and FP32 dy.
    std::vector<bf16> dy = random_bf16(T * ld, rng, 1.0f);
    std::vector<float> grad0(V * Hd);
    for (auto& v : grad0) v = normal(rng);
    std::vector<float> gref = grad0;
    embedding_backward_reference(dy.data(), ld, ids.data(), T, V, Hd, gref.data());
    const size_t ws_bytes = embedding_backward_workspace_bytes(T, V);
    DeviceBuffer<uint8_t> ws(ws_bytes);
    ws.poison();
    DeviceBuffer<bf16> ddy(dy);
    DeviceBuffer<float> grad(grad0);
    embedding_backward_gpu(ddy.get(), ld, dids.get(), T, V, Hd, grad.get(), ws.get(), ws_bytes,
                           status.get(), nullptr);
    std::vector<float> g = grad.download();
    EXPECT_EQ(std::memcmp(g.data(), gref.data(), g.size() * 4), 0) << "bf16 dy";
    // FP32 dy: the CPU model's embed_backward (add_into per token in order).
    std::vector<float> dy32(T * ld);
    for (auto& v : dy32) v = normal(rng) * 50.0f;
    gref = grad0;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < Hd; ++i) gref[ids[t] * Hd + i] += dy32[t * ld + i];
    grad.upload(grad0);
    DeviceBuffer<float> ddy32(dy32);
    embedding_backward_gpu(ddy32.get(), ld, dids.get(), T, V, Hd, grad.get(), ws.get(), ws_bytes,
                           status.get(), nullptr);
    g = grad.download();
    EXPECT_EQ(std::memcmp(g.data(), gref.data(), g.size() * 4), 0) << "fp32 dy";
    EXPECT_EQ(read_status(status), 0u);
    std::printf("embedding V %lld hidden %lld tokens %lld: bit-equal (workspace %zu bytes)\n",
                static_cast<long long>(V), static_cast<long long>(Hd), static_cast<long long>(T),
                ws_bytes);
  }
}

TEST(ModelKernelsGpu, EmbeddingBadIdsFlagged) {
  const int64_t V = 100, Hd = 16, T = 10;
  std::mt19937_64 rng(5);
  std::vector<float> table(V * Hd, 1.0f);
  std::vector<int32_t> ids = {1, 2, 100, 3, -5, 1, 99, 0, 2147483647, 1};
  DeviceBuffer<float> dtab(table);
  DeviceBuffer<int32_t> dids(ids);
  DeviceBuffer<uint32_t> status(std::vector<uint32_t>{0});
  DeviceBuffer<bf16> out(T * Hd);
  out.poison();
  embedding_forward_gpu(dtab.get(), V, Hd, dids.get(), T, out.get(), Hd, status.get(), nullptr);
  const std::vector<bf16> got = out.download();
  for (int64_t t = 0; t < T; ++t) {
    const bool bad = ids[t] < 0 || ids[t] >= V;
    EXPECT_EQ(to_float(got[t * Hd]), bad ? 0.0f : 1.0f) << t;
  }
  EXPECT_EQ(read_status(status), kStatusBadTokenId);
  expect_invalid([&] { check_model_kernels_status(status.get(), "embedding", nullptr); },
                 "token id outside the vocabulary");
  // Backward: bad tokens add nothing.
  std::vector<bf16> dy = random_bf16(T * Hd, rng, 1.0f);
  std::vector<float> gref(V * Hd, 0.0f);
  for (int64_t t = 0; t < T; ++t)
    if (ids[t] >= 0 && ids[t] < V)
      for (int64_t i = 0; i < Hd; ++i) gref[ids[t] * Hd + i] += to_float(dy[t * Hd + i]);
  const size_t wb = embedding_backward_workspace_bytes(T, V);
  DeviceBuffer<uint8_t> ws(wb);
  DeviceBuffer<bf16> ddy(dy);
  DeviceBuffer<float> grad(std::vector<float>(V * Hd, 0.0f));
  DeviceBuffer<uint32_t> status2(std::vector<uint32_t>{0});
  embedding_backward_gpu(ddy.get(), Hd, dids.get(), T, V, Hd, grad.get(), ws.get(), wb,
                         status2.get(), nullptr);
  const std::vector<float> g = grad.download();
  EXPECT_EQ(std::memcmp(g.data(), gref.data(), g.size() * 4), 0);
  EXPECT_EQ(read_status(status2), kStatusBadTokenId);
  EXPECT_THROW(embedding_backward_reference(dy.data(), Hd, ids.data(), T, V, Hd, gref.data()),
               Error);
  // Shapes.
  expect_invalid(
      [&] {
        embedding_forward_gpu(dtab.get(), V, 12, dids.get(), T, out.get(), 16, nullptr, nullptr);
      },
      "multiple of 8");
  expect_invalid(
      [&] {
        embedding_backward_gpu(ddy.get(), Hd, dids.get(), T, V, Hd, grad.get(), ws.get(), wb - 1,
                               nullptr, nullptr);
      },
      "workspace");
}

// ---- Cross-entropy ----
struct CeResult {
  std::vector<float> loss;
  std::vector<bf16> d;
  double sum;
  int64_t valid;
};

CeResult run_ce(const std::vector<bf16>& logits, int64_t ld, const std::vector<int32_t>& tgt,
                int64_t V, float scale, bool in_place, uint32_t* status_out) {
  const int64_t R = static_cast<int64_t>(tgt.size());
  DeviceBuffer<bf16> dl(logits), dd(logits.size());
  dd.poison();
  DeviceBuffer<int32_t> dt(tgt);
  DeviceBuffer<float> loss(R);
  loss.poison();
  DeviceBuffer<double> sum(1);
  sum.poison();
  DeviceBuffer<int64_t> valid(1);
  valid.poison();
  DeviceBuffer<uint32_t> status(std::vector<uint32_t>{0});
  bf16* d = in_place ? dl.get() : dd.get();
  cross_entropy_gpu(dl.get(), ld, dt.get(), R, V, scale, d, ld, loss.get(), sum.get(), valid.get(),
                    status.get(), nullptr);
  CeResult r{loss.download(), in_place ? dl.download() : dd.download(), sum.download()[0],
             valid.download()[0]};
  *status_out = read_status(status);
  return r;
}

TEST(ModelKernelsGpu, CrossEntropyWithinToleranceDeterministic) {
  struct Case {
    int64_t rows, vocab;
  };
  const Case cases[] = {{48, 129280}, {300, 1000}, {37, 1003}, {5, 1}, {1, 7}};
  std::mt19937_64 rng(31337);
  for (const Case& c : cases) {
    const int64_t R = c.rows, V = c.vocab, ld = (V + 7) / 8 * 8 + 8;
    std::normal_distribution<float> normal(0.0f, 3.0f);
    std::vector<bf16> logits(R * ld, bf16{0x7FC0});  // padding NaN: must not be read
    std::vector<int32_t> tgt(R);
    int64_t valid = 0;
    for (int64_t r = 0; r < R; ++r) {
      const float shift = (r % 4 == 1) ? 40.0f : 0.0f;
      for (int64_t i = 0; i < V; ++i) logits[r * ld + i] = to_bf16(normal(rng) + shift);
      tgt[r] = static_cast<int32_t>(rng() % V);
      if (r % 4 == 2) logits[r * ld + tgt[r]] = to_bf16(30.0f);  // a confident row
      if (r % 7 == 3) tgt[r] = kCrossEntropyIgnoreIndex;
      valid += tgt[r] != kCrossEntropyIgnoreIndex;
    }
    const float scale = valid > 0 ? 1.0f / static_cast<float>(valid) : 1.0f;
    uint32_t st = 0;
    const CeResult a = run_ce(logits, ld, tgt, V, scale, false, &st);
    EXPECT_EQ(st, 0u);
    uint32_t st2 = 0;
    const CeResult b = run_ce(logits, ld, tgt, V, scale, true, &st2);  // in place, second run
    EXPECT_EQ(a.valid, valid);
    EXPECT_EQ(std::memcmp(&a.sum, &b.sum, 8), 0) << "loss sum run to run";
    EXPECT_EQ(std::memcmp(a.loss.data(), b.loss.data(), R * 4), 0) << "row losses run to run";
    size_t ddiff = 0;
    for (int64_t r = 0; r < R; ++r)
      for (int64_t i = 0; i < V; ++i) ddiff += a.d[r * ld + i].bits != b.d[r * ld + i].bits;
    EXPECT_EQ(ddiff, 0u) << "dlogits in place vs out of place";
    const double sum_ref = cross_entropy_sum_reference(a.loss.data(), R);
    EXPECT_EQ(std::memcmp(&a.sum, &sum_ref, 8), 0) << a.sum << " vs " << sum_ref;
    // Against ops.h cross_entropy, a row at a time.
    double worst_loss = 0, worst_d = 0, cpu_total = 0;
    size_t d_bad = 0;
    std::vector<float> row(V), drow(V);
    for (int64_t r = 0; r < R; ++r) {
      if (tgt[r] == kCrossEntropyIgnoreIndex) {
        EXPECT_EQ(a.loss[r], 0.0f);
        for (int64_t i = 0; i < V; ++i) d_bad += a.d[r * ld + i].bits != 0;
        continue;
      }
      for (int64_t i = 0; i < V; ++i) row[i] = to_float(logits[r * ld + i]);
      const double l = cross_entropy(row.data(), &tgt[r], 1, V, drow.data(), scale);
      cpu_total += l;
      const double e = std::fabs(a.loss[r] - l);
      worst_loss = std::max(worst_loss, e / (2e-5 + 1e-6 * std::fabs(l)));
      for (int64_t i = 0; i < V; ++i) {
        const double g = to_float(a.d[r * ld + i]);
        const double tol = std::ldexp(std::fabs(drow[i]), -8) + 4e-6 * scale;
        const double err = std::fabs(g - drow[i]);
        worst_d = std::max(worst_d, err / tol);
        d_bad += !(err <= tol);
      }
    }
    EXPECT_LE(worst_loss, 1.0) << "row loss error / tolerance";
    EXPECT_EQ(d_bad, 0u) << "dlogits outside tolerance (worst error/tol " << worst_d << ")";
    EXPECT_NEAR(a.sum, cpu_total, 1e-5 * std::max(1.0, std::fabs(cpu_total)));
    std::printf(
        "cross-entropy %lld x %lld: mean %.6f (cpu %.6f), loss err/tol %.3f, "
        "dlogits err/tol %.3f\n",
        static_cast<long long>(R), static_cast<long long>(V), a.sum / std::max<int64_t>(1, valid),
        cpu_total / std::max<int64_t>(1, valid), worst_loss, worst_d);
  }
}

TEST(ModelKernelsGpu, CrossEntropyBadTargetsAndShapes) {
  const int64_t R = 4, V = 16;
  std::mt19937_64 rng(3);
  std::vector<bf16> logits = random_bf16(R * V, rng, 1.0f);
  std::vector<int32_t> tgt = {1, 16, kCrossEntropyIgnoreIndex, -1};
  uint32_t st = 0;
  const CeResult a = run_ce(logits, V, tgt, V, 0.5f, false, &st);
  EXPECT_EQ(st, kStatusBadTarget);
  EXPECT_TRUE(std::isnan(a.loss[1]) && std::isnan(a.loss[3]));
  EXPECT_EQ(a.loss[2], 0.0f);
  EXPECT_TRUE(std::isfinite(a.loss[0]));
  EXPECT_EQ(a.valid, 3);  // bad rows are not ignored rows: the NaN sum tells
  EXPECT_TRUE(std::isnan(a.sum));
  for (int64_t i = 0; i < V; ++i) EXPECT_EQ(a.d[1 * V + i].bits, 0) << i;
  DeviceBuffer<uint32_t> status(std::vector<uint32_t>{kStatusBadTarget});
  expect_invalid([&] { check_model_kernels_status(status.get(), "ce", nullptr); },
                 "target outside");
  DeviceBuffer<bf16> dl(logits);
  DeviceBuffer<int32_t> dt(tgt);
  DeviceBuffer<float> loss(R);
  DeviceBuffer<double> sum(1);
  expect_invalid(
      [&] {
        cross_entropy_gpu(dl.get(), 12, dt.get(), R, 12, 1.0f, nullptr, 0, loss.get(), sum.get(),
                          nullptr, nullptr, nullptr);
      },
      "ld_logits");
  expect_invalid(
      [&] {
        cross_entropy_gpu(dl.get(), 16, dt.get(), R, V, 1.0f, dl.get(), 24, loss.get(), sum.get(),
                          nullptr, nullptr, nullptr);
      },
      "in place");
  expect_invalid(
      [&] {
        cross_entropy_gpu(dl.get(), 16, dt.get(), R, V, 1.0f, nullptr, 0, loss.get(), nullptr,
                          nullptr, nullptr, nullptr);
      },
      "loss_sum");
}

}  // namespace
}  // namespace fp8moe
