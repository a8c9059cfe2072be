// Tests of the V3-architecture model: finite-difference gradient checks of every parameter
// (every layer's backward) on a micro config, the FP8 linear layer against the numerics core
// bit for bit, thread-count independence, and the blocked GEMM against a naive one.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>

#include "fp8moe/core/philox.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/fp8/gemm_reference.h"
#include "fp8moe/model/config.h"
#include "fp8moe/model/linear.h"
#include "fp8moe/model/model.h"
#include "fp8moe/model/ops.h"

namespace fp8moe {
namespace {

// q_lora_rank null: DeepSeek-V2-Lite's direct query projection (q_proj).
ModelConfig micro_config(double init_std = 0.3, Json rope_scaling = nullptr,
                         Json q_lora_rank = 12) {
  Json j = {{"vocab_size", 48},
            {"hidden_size", 16},
            {"intermediate_size", 24},
            {"moe_intermediate_size", 8},
            {"num_hidden_layers", 2},
            {"first_k_dense_replace", 1},
            {"n_routed_experts", 4},
            {"n_shared_experts", 1},
            {"num_experts_per_tok", 2},
            {"n_group", 2},
            {"topk_group", 1},
            {"routed_scaling_factor", 1.5},
            {"num_attention_heads", 2},
            {"num_key_value_heads", 2},
            {"q_lora_rank", q_lora_rank},
            {"kv_lora_rank", 8},
            {"qk_nope_head_dim", 4},
            {"qk_rope_head_dim", 4},
            {"v_head_dim", 6},
            {"num_nextn_predict_layers", 1},
            {"max_position_embeddings", 64},
            {"rope_scaling", rope_scaling},
            {"initializer_range", init_std},
            {"aux_loss_alpha", 0.05}};
  return parse_model_config(j, "micro");
}

std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint64_t seed) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) t[i] = static_cast<int32_t>(philox_u32(seed, 3, i) % vocab);
  return t;
}

// NOTE: the model computes in FP32, so the central difference uses a step that keeps the
// rounding noise of the loss (~1e-7 relative) well below the derivative being measured.
void check_gradients_by_finite_differences(const ModelConfig& c) {
  Model model(c, 7);
  // Non-zero router biases, so the bias path of the selection is exercised as well.
  for (auto& b : model.buffers())
    for (size_t e = 0; e < b.value.size(); ++e) b.value[e] = 0.01f * static_cast<float>(e);
  const int64_t batch = 2, window = 5 + c.num_nextn_predict_layers + 1;
  const auto tokens = random_tokens(batch * window, c.vocab_size, 11);
  const float mtp_weight = 0.5f;
  model.zero_grad();
  model.forward_backward(tokens.data(), batch, window, Precision::kFp32, mtp_weight, true);
  auto loss = [&] {
    return model.forward_backward(tokens.data(), batch, window, Precision::kFp32, mtp_weight, false)
        .loss;
  };
  int checked = 0, failed = 0;
  for (auto& p : model.parameters()) {
    // The entry with the largest gradient and two more spread over the tensor.
    size_t big = 0;
    for (size_t i = 0; i < p.grad.size(); ++i)
      if (std::fabs(p.grad[i]) > std::fabs(p.grad[big])) big = i;
    for (size_t idx : {big, p.grad.size() / 3, (2 * p.grad.size()) / 3 + 1}) {
      if (idx >= p.grad.size()) continue;
      const float orig = p.value[idx];
      const float eps = 1e-2f * std::max(1.0f, std::fabs(orig));
      p.value[idx] = orig + eps;
      const double lp = loss();
      p.value[idx] = orig - eps;
      const double lm = loss();
      p.value[idx] = orig;
      const double fd = (lp - lm) / (2.0 * eps);
      const double an = p.grad[idx];
      ++checked;
      if (std::fabs(fd - an) > 3e-2 * std::max(std::fabs(fd), std::fabs(an)) + 3e-4) {
        ++failed;
        ADD_FAILURE() << p.name << "[" << idx << "]: analytic " << an << ", finite difference "
                      << fd;
      }
    }
  }
  EXPECT_GT(checked, 3 * 40);
  EXPECT_EQ(failed, 0);
}

TEST(ModelGradients, EveryParameterMatchesFiniteDifferences) {
  check_gradients_by_finite_differences(micro_config());
}

// YaRN (V3's rope_scaling) changes the RoPE frequencies, the cos/sin magnitude (mscale !=
// mscale_all_dim here) and the softmax scale; the gradients must follow.
TEST(ModelGradients, EveryParameterMatchesFiniteDifferencesWithYarn) {
  check_gradients_by_finite_differences(
      micro_config(0.3, {{"type", "yarn"},
                         {"factor", 4},
                         {"beta_fast", 8},
                         {"beta_slow", 1},
                         {"mscale", 0.8},
                         {"mscale_all_dim", 1},
                         {"original_max_position_embeddings", 16}}));
}

// q_lora_rank null: the queries come from q_proj; its gradient (and the input gradient through
// it) must be right as well.
TEST(ModelGradients, EveryParameterMatchesFiniteDifferencesWithDirectQueryProjection) {
  const ModelConfig c = micro_config(0.3, nullptr, nullptr);
  ASSERT_EQ(c.q_lora_rank, 0);
  Model model(c, 1);
  int q_proj = 0, low_rank = 0;
  for (const auto& p : model.parameters()) {
    q_proj += p.name.find(".self_attn.q_proj.weight") != std::string::npos;
    low_rank +=
        p.name.find(".q_a_") != std::string::npos || p.name.find(".q_b_") != std::string::npos;
  }
  EXPECT_EQ(q_proj, 3);  // two layers and the MTP block
  EXPECT_EQ(low_rank, 0);
  check_gradients_by_finite_differences(c);
}

TEST(ModelParameters, CountMatchesTheModelForBothQueryPaths) {
  for (Json qr : {Json(12), Json(nullptr)}) {
    const ModelConfig c = micro_config(0.3, nullptr, qr);
    Model model(c, 1);
    const ParameterReport r = count_parameters(c);
    EXPECT_EQ(model.parameter_count(), r.main_total + r.mtp_total) << qr.dump();
  }
}

TEST(ModelGradients, BackwardDoesNotChangeTheLoss) {
  const ModelConfig c = micro_config();
  Model model(c, 3);
  const int64_t batch = 2, window = 8;
  const auto tokens = random_tokens(batch * window, c.vocab_size, 5);
  for (Precision p : {Precision::kFp32, Precision::kBf16, Precision::kFp8}) {
    const double a = model.forward_backward(tokens.data(), batch, window, p, 0.3f, false).loss;
    const double b = model.forward_backward(tokens.data(), batch, window, p, 0.3f, true).loss;
    EXPECT_EQ(a, b) << precision_name(p);
    EXPECT_TRUE(std::isfinite(a) && a > 1.0) << precision_name(p);
  }
}

// The low-precision backward passes compute FP32's gradients up to their rounding. NOTE: at
// these tiny widths (K of 8..24) FP8 rounding does not average out and the gradients at
// initialisation cancel heavily, so FP8 errors reach ~25%; a mis-wired pass (a wrong transpose,
// a missing term) is off by 100% or more.
TEST(ModelGradients, Bf16AndFp8GradientsFollowFp32) {
  const ModelConfig c = micro_config(0.02);
  const int64_t batch = 4, window = 33;
  const auto tokens = random_tokens(batch * window, c.vocab_size, 13);
  std::vector<std::vector<float>> ref;
  for (Precision p : {Precision::kFp32, Precision::kBf16, Precision::kFp8}) {
    Model model(c, 21);
    model.forward_backward(tokens.data(), batch, window, p, 0.3f, true);
    if (p == Precision::kFp32) {
      for (auto& prm : model.parameters()) ref.push_back(prm.grad);
      continue;
    }
    size_t i = 0;
    for (auto& prm : model.parameters()) {
      double err = 0, norm = 0;
      for (size_t j = 0; j < prm.grad.size(); ++j) {
        err += std::pow(prm.grad[j] - ref[i][j], 2);
        norm += std::pow(ref[i][j], 2);
      }
      const double rel = std::sqrt(err / std::max(norm, 1e-30));
      EXPECT_LT(rel, p == Precision::kBf16 ? 0.05 : 0.5) << precision_name(p) << " " << prm.name;
      ++i;
    }
  }
}

TEST(ModelThreads, ResultsDoNotDependOnTheThreadCount) {
  const ModelConfig c = micro_config();
  std::vector<std::vector<float>> grads[2];
  double losses[2];
  for (int i = 0; i < 2; ++i) {
    set_model_threads(i == 0 ? 1 : 3);
    Model model(c, 9);
    const auto tokens = random_tokens(3 * 9, c.vocab_size, 2);
    losses[i] = model.forward_backward(tokens.data(), 3, 9, Precision::kFp8, 0.3f, true).loss;
    for (auto& p : model.parameters()) grads[i].push_back(p.grad);
  }
  set_model_threads(0);
  EXPECT_EQ(losses[0], losses[1]);
  EXPECT_EQ(grads[0], grads[1]);
}

TEST(Gemm, BlockedMatchesNaiveForEveryLayout) {
  const int64_t m = 37, n = 300, k = 45;
  std::vector<float> a(m * k), b(k * n);
  for (size_t i = 0; i < a.size(); ++i) a[i] = philox_normal(1, 0, i);
  for (size_t i = 0; i < b.size(); ++i) b[i] = philox_normal(1, 1, i);
  std::vector<float> at(k * m), bt(n * k);
  transpose(a.data(), m, k, at.data());
  transpose(b.data(), k, n, bt.data());
  std::vector<double> ref(m * n, 0.0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t p = 0; p < k; ++p) ref[i * n + j] += double(a[i * k + p]) * b[p * n + j];
  std::vector<float> first;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb)
      for (int threads : {1, 2, 5}) {
        std::vector<float> c(m * n, 1.0f);
        gemm_f32(m, n, k, ta ? at.data() : a.data(), ta ? m : k, ta, tb ? bt.data() : b.data(),
                 tb ? k : n, tb, c.data(), n, true, threads);
        for (int64_t i = 0; i < m * n; ++i) ASSERT_NEAR(c[i], ref[i] + 1.0, 1e-3) << i;
        if (first.empty()) first = c;
        EXPECT_EQ(c, first) << "ta " << ta << " tb " << tb << " threads " << threads;
      }
}

// The fp8 linear layer is the numerics core's GEMM on the recipe's quantisations, bit for bit.
TEST(Fp8Linear, EqualsTheNumericsCoreReferenceBitForBit) {
  const int64_t m = 256, n = 192, k = 384;
  std::vector<float> x(m * k), w(n * k), dy(m * n);
  for (size_t i = 0; i < x.size(); ++i) x[i] = philox_normal(2, 0, i) * (1 + (i % 7));
  for (size_t i = 0; i < w.size(); ++i) w[i] = 0.05f * philox_normal(2, 1, i);
  for (size_t i = 0; i < dy.size(); ++i) dy[i] = 1e-3f * philox_normal(2, 2, i);
  LinearOptions o;
  o.precision = Precision::kFp8;
  o.threads = 2;
  LinearCache cache;
  std::vector<float> y(m * n), dx(m * k), dw(n * k, 0.0f);
  linear_forward(o, x.data(), m, w.data(), n, k, y.data(), &cache);
  linear_backward(o, cache, w.data(), dy.data(), dx.data(), dw.data());

  // Fprop: 1x128 activations x 128x128 weights, BF16 output.
  const auto xq = quantize(x.data(), m, k, k, ScaleGranularity::k1x128);
  const auto wq = quantize(w.data(), n, k, k, ScaleGranularity::k128x128);
  std::vector<float> y_ref(m * n);
  gemm_fp8_reference(xq.ref(), wq.ref(), y_ref.data(), n);
  for (auto& v : y_ref) v = round_to_bf16(v);
  EXPECT_EQ(y, y_ref);
  // Dgrad: dy 1x128 x W^T quantised 128x128 directly from the transposed weight.
  std::vector<float> wt(k * n);
  transpose(w.data(), n, k, wt.data());
  const auto wtq = quantize(wt.data(), k, n, n, ScaleGranularity::k128x128);
  const auto dyq = quantize(dy.data(), m, n, n, ScaleGranularity::k1x128);
  std::vector<float> dx_ref(m * k);
  gemm_fp8_reference(dyq.ref(), wtq.ref(), dx_ref.data(), k);
  for (auto& v : dx_ref) v = round_to_bf16(v);
  EXPECT_EQ(dx, dx_ref);
  // Wgrad: dy^T and x^T (from the FP8 cache) quantised 1x128 along the tokens.
  std::vector<float> dyt(n * m), xt(k * m);
  transpose(dy.data(), m, n, dyt.data());
  const auto xd = dequantize(xq);
  transpose(xd.data(), m, k, xt.data());
  const auto dytq = quantize(dyt.data(), n, m, m, ScaleGranularity::k1x128);
  const auto xtq = quantize(xt.data(), k, m, m, ScaleGranularity::k1x128);
  std::vector<float> dw_ref(n * k, 0.0f);
  gemm_fp8_reference(dytq.ref(), xtq.ref(), dw_ref.data(), k, AccumulatorModel{}, true);
  EXPECT_EQ(dw, dw_ref);
  // And the three products are close to FP32's (E4M3 keeps 3 mantissa bits).
  LinearOptions o32;
  o32.precision = Precision::kFp32;
  LinearCache c32;
  std::vector<float> y32(m * n), dx32(m * k), dw32(n * k, 0.0f);
  linear_forward(o32, x.data(), m, w.data(), n, k, y32.data(), &c32);
  linear_backward(o32, c32, w.data(), dy.data(), dx32.data(), dw32.data());
  auto rel = [](const std::vector<float>& a, const std::vector<float>& b) {
    double e = 0, r = 0;
    for (size_t i = 0; i < a.size(); ++i) e += std::pow(a[i] - b[i], 2), r += std::pow(b[i], 2);
    return std::sqrt(e / r);
  };
  EXPECT_LT(rel(y, y32), 0.05);
  EXPECT_LT(rel(dx, dx32), 0.05);
  EXPECT_LT(rel(dw, dw32), 0.05);
}

TEST(Bf16Linear, RoundsOperandsAndOutputs) {
  const int64_t m = 8, n = 5, k = 7;
  std::vector<float> x(m * k), w(n * k);
  for (size_t i = 0; i < x.size(); ++i) x[i] = philox_normal(4, 0, i);
  for (size_t i = 0; i < w.size(); ++i) w[i] = philox_normal(4, 1, i);
  LinearOptions o;
  o.precision = Precision::kBf16;
  LinearCache cache;
  std::vector<float> y(m * n);
  linear_forward(o, x.data(), m, w.data(), n, k, y.data(), &cache);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      float acc = 0;
      for (int64_t p = 0; p < k; ++p)
        acc += round_to_bf16(x[i * k + p]) * round_to_bf16(w[j * k + p]);
      EXPECT_EQ(y[i * n + j], round_to_bf16(acc));
    }
}

TEST(TransposeBlockQuantized, EqualsQuantisingTheTranspose) {
  const int64_t r = 200, c = 300;
  std::vector<float> w(r * c), wt(c * r);
  for (size_t i = 0; i < w.size(); ++i) w[i] = philox_normal(5, 0, i) * (1 + i % 13);
  transpose(w.data(), r, c, wt.data());
  const auto a = transpose_block_quantized(quantize(w.data(), r, c, c, ScaleGranularity::k128x128));
  const auto b = quantize(wt.data(), c, r, r, ScaleGranularity::k128x128);
  EXPECT_EQ(a.codes, b.codes);
  EXPECT_EQ(a.scales, b.scales);
}

// The cached forward (generation) equals the full recomputation. Bound: |cached - recomputed|
// <= 1e-5 * max(1, max |logit|) for every logit. NOTE: both paths do the same arithmetic in the
// same order (attend_row, row-independent GEMMs), so today they agree to the bit; the bound
// leaves room for a GEMM that blocks rows differently, not for a wrong position or a missing key.
void expect_cache_matches_recomputation(const ModelConfig& c, Precision precision) {
  Model model(c, 17);
  for (auto& b : model.buffers())
    for (size_t e = 0; e < b.value.size(); ++e) b.value[e] = 0.01f * static_cast<float>(e);
  const int64_t total = 23;
  const auto tokens = random_tokens(total, c.vocab_size, 29);
  double worst = 0;
  for (int64_t prompt : {1, 2, 7, 16}) {
    KvCache cache;
    int64_t len = 0;
    // The prompt at once, then one token per step, with one 3-token chunk in the middle.
    for (int64_t n = prompt; len < total; n = (len == prompt + 2 ? 3 : 1)) {
      n = std::min(n, total - len);
      const std::vector<float> cached =
          model.next_token_logits(tokens.data() + len, n, precision, cache);
      len += n;
      ASSERT_EQ(cache.length, len);
      const std::vector<float> full = model.next_token_logits(tokens.data(), len, precision);
      ASSERT_EQ(cached.size(), full.size());
      float mx = 1;
      for (float v : full) mx = std::max(mx, std::fabs(v));
      for (size_t v = 0; v < full.size(); ++v) {
        const double d = std::fabs(cached[v] - full[v]);
        worst = std::max(worst, d / mx);
        ASSERT_LE(d, 1e-5 * mx) << precision_name(precision) << " prompt " << prompt << " length "
                                << len << " logit " << v;
      }
    }
    const int64_t per_token =
        c.num_hidden_layers *
        (c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim) + c.qk_rope_head_dim) * 4;
    EXPECT_EQ(cache.bytes(), total * per_token);
  }
  std::printf(
      "KV cache %s q_lora_rank %lld: worst |cached - recomputed| / max(1, max|logit|) = %g\n",
      precision_name(precision), static_cast<long long>(c.q_lora_rank), worst);
}

TEST(KvCache, LogitsEqualFullRecomputation) {
  for (Precision p : {Precision::kFp32, Precision::kBf16, Precision::kFp8})
    expect_cache_matches_recomputation(micro_config(0.3), p);
}

TEST(KvCache, LogitsEqualFullRecomputationWithDirectQueryProjection) {
  for (Precision p : {Precision::kFp32, Precision::kBf16, Precision::kFp8})
    expect_cache_matches_recomputation(micro_config(0.3, nullptr, nullptr), p);
}

TEST(KvCache, LogitsEqualFullRecomputationWithYarn) {
  expect_cache_matches_recomputation(micro_config(0.3, {{"type", "yarn"},
                                                        {"factor", 4},
                                                        {"beta_fast", 8},
                                                        {"beta_slow", 1},
                                                        {"mscale", 0.8},
                                                        {"mscale_all_dim", 1},
                                                        {"original_max_position_embeddings", 16}}),
                                     Precision::kFp32);
}

TEST(KvCache, RefusesContextsBeyondMaxPositions) {
  const ModelConfig c = micro_config(0.3);  // max_position_embeddings 64
  Model model(c, 17);
  const auto tokens = random_tokens(65, c.vocab_size, 29);
  KvCache cache;
  model.next_token_logits(tokens.data(), 60, Precision::kFp32, cache);
  EXPECT_THROW(model.next_token_logits(tokens.data() + 60, 5, Precision::kFp32, cache), Error);
}

}  // namespace
}  // namespace fp8moe
