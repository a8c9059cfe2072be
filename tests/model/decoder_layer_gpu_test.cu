// DecoderLayerGpu (model/decoder_layer_gpu.h): a dense and a MoE layer at small GPU-legal dims,
// fresh random parameters and inputs, outputs poisoned. Staged checks from the GPU's own
// intermediates (DecoderLayerGpu::saved()) against the CPU pieces:
//   bit for bit: both RMSNorms (forward y / rstd, backward dx / dw), the three BF16 residual adds,
//     the router's indices / weights / scores (route() on the GPU's logits), the balance loss and
//     dlogits (route_backward + sequence_balance_loss on the GPU's routing), expert_load;
//   tolerances: the router logits (FP32 dot products, |err| <= 1e-5 sum |f g| + 1e-6), dgate and
//     the router's df term (relative 1e-5), the FFN output against the CPU FFN on the GPU's f and
//     the CPU-quantised weights (expert_ffn_reference / moe_layer_reference: relative 3e-2, the
//     MoE layer tests' kFfnTol; it also checks the device requantisation of the masters);
//   a CUDA graph of forward + backward replays to the eager bits; gradients overwritten ==
//   accumulated into zeros; dense gate/up gradients written straight (adjacent) == scattered
//   (apart); bad shapes throw. The MLA block and the MoE layer have their own tests; the end-to-end
//   check against the CPU Model is the model test's (ModelGpu).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "../kernels/gpu_test_util.cuh"
#include "../support/expect_invalid.h"
#include "fp8moe/comm/moe_layer_reference.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/fp8/quantize.h"
#include "fp8moe/kernels/rmsnorm.h"
#include "fp8moe/model/decoder_layer_gpu.h"
#include "fp8moe/model/model_kernels_gpu.h"
#include "fp8moe/moe/balance.h"
#include "fp8moe/moe/expert_ffn_reference.h"
#include "fp8moe/moe/router.h"

namespace fp8moe {
namespace {

using test::DeviceBuffer;
using Vec = std::vector<float>;
using Bits = std::vector<uint16_t>;

constexpr double kFfnTol = 3e-2, kRouterTol = 1e-5;

double rel(const Vec& got, const Vec& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double e = static_cast<double>(got[i]) - want[i];
    num += e * e;
    den += static_cast<double>(want[i]) * want[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}
bool same(const Vec& a, const Vec& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}
template <typename T>
std::vector<T> down(const T* p, int64_t n) {
  std::vector<T> h(static_cast<size_t>(n));
  FM_CHECK_CUDA(cudaMemcpy(h.data(), p, h.size() * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}
Bits down_bits(const bf16* p, int64_t n) {
  return down(reinterpret_cast<const uint16_t*>(p), n);
}
Vec widen(const Bits& b) {
  Vec o(b.size());
  for (size_t i = 0; i < b.size(); ++i) o[i] = bf16_bits_to_float(b[i]);
  return o;
}
const bf16* as_bf16(const uint16_t* p) {
  return reinterpret_cast<const bf16*>(p);
}

// The layer's parameters in one device slab, the CPU model's order per FFN (gate, up, down
// adjacent) or, with `gap`, 64 floats apart (the dense FFN's scatter path).
struct Params {
  std::vector<ParameterGpu> list;
  std::map<std::string, size_t> index;
  std::vector<Vec> host;  // values
  std::unique_ptr<DeviceBuffer<float>> values_, grads_;
  DeviceBuffer<float>& values() { return *values_; }
  DeviceBuffer<float>& grads() { return *grads_; }

  void add(const std::string& name, std::vector<int64_t> shape, bool buffer = false) {
    ParameterGpu p;
    p.name = name;
    p.shape = shape;
    p.numel = 1;
    for (int64_t s : shape) p.numel *= s;
    p.weight_decay = !buffer;
    index[name] = list.size();
    list.push_back(p);
  }
  void allocate(bool gap, std::mt19937_64& rng) {
    int64_t total = 0;
    std::vector<int64_t> off;
    for (auto& p : list) {
      off.push_back(total);
      total += p.numel + (gap ? 64 : 0);
    }
    values_ = std::make_unique<DeviceBuffer<float>>(static_cast<size_t>(total));
    grads_ = std::make_unique<DeviceBuffer<float>>(static_cast<size_t>(total));
    std::vector<float> v(static_cast<size_t>(total), 0.0f);
    std::normal_distribution<float> n01(0.0f, 1.0f);
    host.clear();
    for (size_t i = 0; i < list.size(); ++i) {
      ParameterGpu& p = list[i];
      p.value = values().get() + off[i];
      p.grad = p.weight_decay ? grads().get() + off[i] : nullptr;
      Vec h(static_cast<size_t>(p.numel));
      const bool norm = p.name.find("layernorm") != std::string::npos;
      const bool bias = p.name.find("e_score_correction_bias") != std::string::npos;
      const float std =
          p.shape.size() == 2 ? 1.0f / std::sqrt(static_cast<float>(p.shape[1])) : 0.1f;
      for (float& e : h) e = norm ? 1.0f + 0.1f * n01(rng) : (bias ? 0.05f : std) * n01(rng);
      std::copy(h.begin(), h.end(), v.begin() + off[i]);
      host.push_back(std::move(h));
    }
    values().upload(v);
  }
  ParameterGpu& operator()(const std::string& name) { return list.at(index.at(name)); }
  // The position of a parameter among those with a gradient (all_grads()'s order).
  size_t gi(const std::string& name) {
    size_t k = 0;
    for (size_t i = 0; i < index.at(name); ++i) k += list[i].grad != nullptr;
    return k;
  }
  const Vec& value(const std::string& name) { return host[index.at(name)]; }
  // Gradients: random values (accumulate checks; drawn per parameter, so a slab with gaps draws
  // the same values) or zeros.
  void set_grads(bool random, std::mt19937_64& rng) {
    std::normal_distribution<float> n01(0.0f, 1e-3f);
    std::vector<float> g(grads().size(), 0.0f);
    if (random)
      for (auto& pr : list)
        if (pr.grad)
          for (int64_t i = 0; i < pr.numel; ++i) g[(pr.grad - grads().get()) + i] = n01(rng);
    grads().upload(g);
  }
  Vec grad(const std::string& name) {
    ParameterGpu& p = (*this)(name);
    return down(p.grad, p.numel);
  }
  std::vector<Vec> all_grads() {
    std::vector<Vec> o;
    for (auto& p : list)
      if (p.grad) o.push_back(down(p.grad, p.numel));
    return o;
  }
};

ModelConfig small_config() {
  ModelConfig c;
  c.hidden_size = 256;
  c.num_attention_heads = c.num_key_value_heads = 2;
  c.q_lora_rank = 128;
  c.kv_lora_rank = 128;
  c.intermediate_size = 384;
  c.moe_intermediate_size = 128;
  c.n_routed_experts = 8;
  c.num_experts_per_tok = 2;
  c.n_group = 4;
  c.topk_group = 2;
  c.n_shared_experts = 1;
  c.seq_aux = true;
  c.aux_loss_alpha = 0.01;
  return c;
}

void add_layer_params(Params& p, const ModelConfig& c, const std::string& pre, bool is_moe) {
  const int64_t H = c.hidden_size, heads = c.num_attention_heads, qr = c.q_lora_rank,
                kvr = c.kv_lora_rank, qd = c.qk_head_dim(), dr = c.qk_rope_head_dim,
                kvd = c.qk_nope_head_dim + c.v_head_dim, dv = c.v_head_dim;
  p.add(pre + ".input_layernorm.weight", {H});
  p.add(pre + ".self_attn.q_a_proj.weight", {qr, H});
  p.add(pre + ".self_attn.q_a_layernorm.weight", {qr});
  p.add(pre + ".self_attn.q_b_proj.weight", {heads * qd, qr});
  p.add(pre + ".self_attn.kv_a_proj_with_mqa.weight", {kvr + dr, H});
  p.add(pre + ".self_attn.kv_a_layernorm.weight", {kvr});
  p.add(pre + ".self_attn.kv_b_proj.weight", {heads * kvd, kvr});
  p.add(pre + ".self_attn.o_proj.weight", {H, heads * dv});
  p.add(pre + ".post_attention_layernorm.weight", {H});
  auto mlp = [&](const std::string& q, int64_t I) {
    p.add(q + ".gate_proj.weight", {I, H});
    p.add(q + ".up_proj.weight", {I, H});
    p.add(q + ".down_proj.weight", {H, I});
  };
  if (!is_moe) {
    mlp(pre + ".mlp", c.intermediate_size);
    return;
  }
  p.add(pre + ".mlp.gate.weight", {c.n_routed_experts, H});
  p.add(pre + ".mlp.gate.e_score_correction_bias", {c.n_routed_experts}, true);
  for (int64_t e = 0; e < c.n_routed_experts; ++e)
    mlp(pre + ".mlp.experts." + std::to_string(e), c.moe_intermediate_size);
  mlp(pre + ".mlp.shared_experts", c.moe_intermediate_size * c.n_shared_experts);
}

Bits add_ref(const Bits& a, const Bits& b) {
  Bits y(a.size());
  comm::add_bf16_reference(a.data(), b.data(), static_cast<int64_t>(a.size()), y.data());
  return y;
}

// The CPU FFN on the GPU's f: quantised 1x128 (the GPU's formula), the weights quantised from
// the masters on the CPU, expert_ffn_reference (one group) -> BF16 bits [T, H].
Bits dense_ffn_ref(const Bits& f, int64_t T, int64_t H, int64_t I, const Vec& g, const Vec& u,
                   const Vec& d) {
  const Vec fx = widen(f);
  const QuantizedMatrix q = quantize(fx.data(), T, H, H, ScaleGranularity::k1x128);
  const ExpertWeightsHost w = quantize_expert_weights(g.data(), u.data(), d.data(), 1, H, I);
  std::vector<int32_t> layout(static_cast<size_t>(T), 0);
  std::vector<bf16> y(static_cast<size_t>(T * H));
  expert_ffn_reference(q.ref(), layout.data(), w, nullptr, false, y.data());
  Bits o(y.size());
  for (size_t i = 0; i < y.size(); ++i) o[i] = y[i].bits;
  return o;
}

struct LayerRun {
  Bits out, dh;
  std::vector<Vec> grads;
  double balance = 0;
  std::vector<int32_t> load;
};

void run_case(bool is_moe, bool gap, uint64_t seed, LayerRun* result = nullptr) {
  const ModelConfig c = small_config();
  const int64_t batch = 2, seq = 64, T = batch * seq, H = c.hidden_size;
  const std::string pre = "model.layers.3";
  std::mt19937_64 rng(seed);
  Params p;
  add_layer_params(p, c, pre, is_moe);
  p.allocate(gap, rng);
  p.set_grads(true, rng);
  const std::vector<Vec> g0 = p.all_grads();
  const RopeTable rope = make_rope_table(c.qk_rope_head_dim, 1024, c.rope_theta, c.rope_scaling);
  RopeTableGpu rg(rope);
  DecoderLayerGpu layer(c, pre, is_moe, batch, seq, rg.view(),
                        [&](const std::string& n) -> ParameterGpu& { return p(n); });
  ASSERT_EQ(layer.is_moe(), is_moe);
  EXPECT_EQ(layer.expert_load() == nullptr, !is_moe);

  std::normal_distribution<float> n01(0.0f, 1.0f);
  Bits hb(static_cast<size_t>(T * H)), doutb(hb.size());
  for (auto& v : hb) v = float_to_bf16_bits(n01(rng));
  for (auto& v : doutb) v = float_to_bf16_bits(0.01f * n01(rng));
  std::vector<int32_t> pos(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) pos[t] = static_cast<int32_t>(t % seq);
  DeviceBuffer<uint16_t> h(hb), dout(doutb), out(T * H), dh(T * H);
  DeviceBuffer<int32_t> posd(pos);
  DeviceBuffer<double> bl(std::vector<double>{0.25});
  DeviceBuffer<uint32_t> status(std::vector<uint32_t>{0});
  out.poison();
  dh.poison();
  cudaStream_t stream;
  FM_CHECK_CUDA(cudaStreamCreate(&stream));
  layer.refresh(stream);
  bf16* outp = reinterpret_cast<bf16*>(out.get());
  bf16* dhp = reinterpret_cast<bf16*>(dh.get());
  layer.forward(as_bf16(h.get()), posd.get(), outp, bl.get(), status.get(), stream);
  layer.backward(as_bf16(dout.get()), dhp, status.get(), stream);
  FM_CHECK_CUDA(cudaStreamSynchronize(stream));
  check_model_kernels_status(status.get(), "DecoderLayerGpu test", stream);
  const DecoderLayerSavedGpu s = layer.saved();
  ASSERT_EQ(s.tokens, T);

  // ---- forward, staged ----
  const Bits a = down_bits(s.a, T * H), attn = down_bits(s.attn, T * H),
             h1 = down_bits(s.h1, T * H), f = down_bits(s.f, T * H),
             mlp = down_bits(s.mlp_out, T * H), outh = down_bits(outp, T * H);
  const Vec rstd1 = down(s.rstd1, T), rstd2 = down(s.rstd2, T);
  const Vec& ln1 = p.value(pre + ".input_layernorm.weight");
  const Vec& ln2 = p.value(pre + ".post_attention_layernorm.weight");
  {
    Bits y(static_cast<size_t>(T * H));
    Vec r(static_cast<size_t>(T));
    kernels::rmsnorm_forward_reference(as_bf16(hb.data()), H, ln1.data(), T, H, c.rms_norm_eps,
                                       reinterpret_cast<bf16*>(y.data()), H, r.data());
    EXPECT_EQ(y, a) << "input_layernorm y";
    EXPECT_TRUE(same(r, rstd1)) << "input_layernorm rstd";
    EXPECT_EQ(add_ref(hb, attn), h1) << "h1 = h + attn";
    kernels::rmsnorm_forward_reference(as_bf16(h1.data()), H, ln2.data(), T, H, c.rms_norm_eps,
                                       reinterpret_cast<bf16*>(y.data()), H, r.data());
    EXPECT_EQ(y, f) << "post_attention_layernorm y";
    EXPECT_TRUE(same(r, rstd2)) << "post_attention_layernorm rstd";
    EXPECT_EQ(add_ref(h1, mlp), outh) << "out = h1 + mlp";
  }
  const double balance = down(bl.get(), 1)[0];
  std::vector<int32_t> load;
  if (!is_moe) {
    const std::string q = pre + ".mlp";
    const Bits want =
        dense_ffn_ref(f, T, H, c.intermediate_size, p.value(q + ".gate_proj.weight"),
                      p.value(q + ".up_proj.weight"), p.value(q + ".down_proj.weight"));
    const double e = rel(widen(mlp), widen(want));
    std::printf("dense FFN out vs expert_ffn_reference (CPU-quantised masters): rel %.3g\n", e);
    EXPECT_LT(e, kFfnTol);
    EXPECT_EQ(balance, 0.25) << "dense layer touched balance_loss";
  } else {
    const int64_t E = c.n_routed_experts, K = c.num_experts_per_tok, I = c.moe_intermediate_size;
    const RouterConfig rc = c.router_config();
    const Vec logits = down(s.logits, T * E), scores = down(s.scores, T * E);
    const std::vector<int32_t> idx = down(s.topk_idx, T * K);
    const Vec tw = down(s.topk_w, T * K);
    const Vec& gate = p.value(pre + ".mlp.gate.weight");
    const Vec& bias = p.value(pre + ".mlp.gate.e_score_correction_bias");
    const Vec fx = widen(f);
    double worst = 0;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t e = 0; e < E; ++e) {
        double dot = 0, mag = 0;
        for (int64_t k = 0; k < H; ++k) {
          dot += static_cast<double>(fx[t * H + k]) * gate[e * H + k];
          mag += std::fabs(static_cast<double>(fx[t * H + k]) * gate[e * H + k]);
        }
        const double err = std::fabs(logits[t * E + e] - dot);
        worst = std::max(worst, err / (1e-5 * mag + 1e-6));
      }
    std::printf("router logits: worst |err| / (1e-5 sum|f g| + 1e-6) = %.3g\n", worst);
    EXPECT_LE(worst, 1.0);
    const RouterOutput ro = route(rc, logits.data(), T, bias.data());
    EXPECT_EQ(ro.topk_idx, idx) << "router indices";
    // Weights and scores: bit for bit in practice (router_cuda.h; both sigmoids in double,
    // rounded once); allowed a relative 1e-6, the bit differences counted.
    auto close = [](const Vec& got, const Vec& want, const char* what) {
      ASSERT_EQ(got.size(), want.size());
      int64_t diff = 0;
      for (size_t i = 0; i < got.size(); ++i) {
        diff += std::memcmp(&got[i], &want[i], sizeof(float)) != 0;
        EXPECT_LE(std::fabs(got[i] - want[i]), 1e-6 * std::fabs(want[i]) + 1e-30)
            << what << " " << i;
      }
      std::printf("router %s: %lld of %zu differ in bits from route()\n", what,
                  static_cast<long long>(diff), got.size());
    };
    close(tw, ro.topk_weight, "weights");
    close(scores, ro.scores, "scores");
    // Balance loss and dlogits on the GPU's routing.
    const Vec gtopk = down(s.grad_topk_w, T * K), dl = down(s.dlogits, T * E);
    RouterOutput rg_out;
    rg_out.tokens = T;
    rg_out.top_k = static_cast<int>(K);
    rg_out.topk_idx = idx;
    rg_out.topk_weight = tw;
    rg_out.scores = scores;
    Vec dl_ref(static_cast<size_t>(T * E));
    route_backward(rc, rg_out, gtopk.data(), dl_ref.data());
    const float alpha = static_cast<float>(c.aux_loss_alpha);
    const double loss_ref = sequence_balance_loss(rc, rg_out, seq, alpha, dl_ref.data());
    std::printf("balance loss GPU %.17g CPU %.17g\n", balance - 0.25, loss_ref);
    EXPECT_EQ(balance, 0.25 + loss_ref) << "balance loss added to *balance_loss";
    EXPECT_TRUE(same(dl, dl_ref)) << "dlogits (route_backward + balance gradient)";
    // expert_load.
    load = down(layer.expert_load(), E);
    const std::vector<int64_t> lref =
        expert_load(idx.data(), T, static_cast<int>(K), static_cast<int>(E));
    for (int64_t e = 0; e < E; ++e) EXPECT_EQ(load[e], lref[e]) << "expert_load " << e;
    // The MoE layer's output against its CPU reference on the GPU's routing and f.
    std::vector<Vec> eg(3);
    for (int64_t e = 0; e < E; ++e) {
      const std::string q = pre + ".mlp.experts." + std::to_string(e);
      const Vec &gg = p.value(q + ".gate_proj.weight"), &uu = p.value(q + ".up_proj.weight"),
                &dd = p.value(q + ".down_proj.weight");
      eg[0].insert(eg[0].end(), gg.begin(), gg.end());
      eg[1].insert(eg[1].end(), uu.begin(), uu.end());
      eg[2].insert(eg[2].end(), dd.begin(), dd.end());
    }
    const ExpertWeightsHost rw =
        quantize_expert_weights(eg[0].data(), eg[1].data(), eg[2].data(), E, H, I);
    const std::string q = pre + ".mlp.shared_experts";
    const ExpertWeightsHost sw = quantize_expert_weights(
        p.value(q + ".gate_proj.weight").data(), p.value(q + ".up_proj.weight").data(),
        p.value(q + ".down_proj.weight").data(), 1, H, I);
    comm::EpConfig ec;
    ec.num_ranks = 1;
    ec.num_experts = static_cast<int>(E);
    ec.top_k = static_cast<int>(K);
    ec.hidden = H;
    ec.max_tokens_per_rank = T;
    ec.payload = comm::Payload::kFP8;
    const comm::TokenBatch tb{T, f.data(), idx.data(), tw.data()};
    const comm::MoeLayerReference mr = comm::moe_layer_reference(ec, {tb}, {&rw}, {&sw}, false);
    const double e = rel(widen(mlp), widen(mr.y[0]));
    std::printf("MoE out vs moe_layer_reference (CPU-quantised masters): rel %.3g\n", e);
    EXPECT_LT(e, kFfnTol);
    // dgate: dw0 + dl^T f; the router's df term: df - moe dx = dl . gate (checked through df's
    // FP32 sum: |bf16(gx + r) - (gx + r_ref)| within one BF16 rounding + tolerance).
    const Vec dgate = p.grad(pre + ".mlp.gate.weight");
    const Vec& dg0 = g0[p.gi(pre + ".mlp.gate.weight")];
    Vec dg_got(dgate.size()), dg_want(dgate.size());
    for (int64_t e2 = 0; e2 < E; ++e2)
      for (int64_t k = 0; k < H; ++k) {
        double acc = 0;
        for (int64_t t = 0; t < T; ++t) acc += static_cast<double>(dl[t * E + e2]) * fx[t * H + k];
        dg_want[e2 * H + k] = static_cast<float>(acc);
        dg_got[e2 * H + k] = dgate[e2 * H + k] - dg0[e2 * H + k];
      }
    const double eg2 = rel(dg_got, dg_want);
    std::printf("dgate increment vs CPU dl^T f: rel %.3g\n", eg2);
    EXPECT_LT(eg2, kRouterTol * 100);  // the increment loses dg0's rounding (ulp(dg0) / |inc|)
    // df = bf16(float(moe dx) + dl . gate): within one BF16 ulp (2^-7 |r|; the rounding is at
    // most half of it) + the FP32 sum's error.
    const Bits gx = down_bits(s.moe_dx, T * H), dfb = down_bits(s.df, T * H);
    double worst_df = 0;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < H; ++k) {
        double r = bf16_bits_to_float(gx[t * H + k]), mag = 0;
        for (int64_t e2 = 0; e2 < E; ++e2) {
          const double v = static_cast<double>(dl[t * E + e2]) * gate[e2 * H + k];
          r += v;
          mag += std::fabs(v);
        }
        const double err = std::fabs(bf16_bits_to_float(dfb[t * H + k]) - r);
        worst_df =
            std::max(worst_df, err / (std::ldexp(std::fabs(r), -7) + kRouterTol * mag + 1e-30));
      }
    std::printf("df vs bf16(moe dx + dl . gate): worst |err| / (2^-7 |r| + 1e-5 mag) = %.3g\n",
                worst_df);
    EXPECT_LE(worst_df, 1.0);
  }

  // ---- backward, staged ----
  const Bits df = down_bits(s.df, T * H), dh1 = down_bits(s.dh1, T * H),
             da = down_bits(s.da, T * H), dhh = down_bits(dhp, T * H);
  {
    Bits dx(static_cast<size_t>(T * H));
    Vec dw2 = g0[p.gi(pre + ".post_attention_layernorm.weight")];
    kernels::rmsnorm_backward_reference(as_bf16(df.data()), H, as_bf16(h1.data()), H, ln2.data(),
                                        rstd2.data(), T, H, reinterpret_cast<bf16*>(dx.data()), H,
                                        dw2.data(), true);
    EXPECT_EQ(add_ref(dx, doutb), dh1) << "dh1 = ln2'(df) + dout";
    EXPECT_TRUE(same(dw2, p.grad(pre + ".post_attention_layernorm.weight"))) << "d ln2";
    Vec dw1 = g0[p.gi(pre + ".input_layernorm.weight")];
    kernels::rmsnorm_backward_reference(as_bf16(da.data()), H, as_bf16(hb.data()), H, ln1.data(),
                                        rstd1.data(), T, H, reinterpret_cast<bf16*>(dx.data()), H,
                                        dw1.data(), true);
    EXPECT_EQ(add_ref(dx, dh1), dhh) << "dh = ln1'(da) + dh1";
    EXPECT_TRUE(same(dw1, p.grad(pre + ".input_layernorm.weight"))) << "d ln1";
  }
  // Every gradient moved from its start (each parameter of the layer got its share), finite.
  {
    const std::vector<Vec> g1 = p.all_grads();
    size_t k = 0;
    for (auto& pr : p.list) {
      if (!pr.grad) continue;
      bool moved = false, finite = true;
      for (size_t i = 0; i < g1[k].size(); ++i) {
        moved |= g1[k][i] != g0[k][i];
        finite &= std::isfinite(g1[k][i]);
      }
      // An expert that received no token keeps its gradient (accumulate: += 0).
      const bool expert = pr.name.find(".experts.") != std::string::npos;
      const int64_t e = expert ? std::stoll(pr.name.substr(pr.name.find(".experts.") + 9)) : -1;
      if (!expert || load.at(static_cast<size_t>(e)) > 0) EXPECT_TRUE(moved) << pr.name;
      EXPECT_TRUE(finite) << pr.name;
      ++k;
    }
  }

  // ---- graph replay == eager; overwrite == accumulate into zeros ----
  const std::vector<Vec> g_eager = p.all_grads();
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  FM_CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  layer.forward(as_bf16(h.get()), posd.get(), outp, bl.get(), status.get(), stream);
  layer.backward(as_bf16(dout.get()), dhp, status.get(), stream);
  FM_CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
  FM_CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  {
    std::vector<float> gall(p.grads().size(), 0.0f);
    // Restore the starting gradients (g0) in place.
    size_t k = 0;
    for (auto& pr : p.list) {
      if (!pr.grad) continue;
      std::copy(g0[k].begin(), g0[k].end(), gall.begin() + (pr.grad - p.grads().get()));
      ++k;
    }
    p.grads().upload(gall);
  }
  bl.upload(std::vector<double>{0.25});
  out.poison();
  dh.poison();
  FM_CHECK_CUDA(cudaGraphLaunch(exec, stream));
  FM_CHECK_CUDA(cudaStreamSynchronize(stream));
  EXPECT_EQ(down_bits(outp, T * H), outh) << "out, graph";
  EXPECT_EQ(down_bits(dhp, T * H), dhh) << "dh, graph";
  EXPECT_EQ(down(bl.get(), 1)[0], balance) << "balance loss, graph";
  {
    const std::vector<Vec> gg = p.all_grads();
    for (size_t k = 0; k < gg.size(); ++k) EXPECT_TRUE(same(gg[k], g_eager[k])) << "grad " << k;
  }
  // Overwrite == accumulate into zeros (a forward before each backward: MoeLayerGpu takes one
  // backward per forward).
  p.set_grads(false, rng);
  layer.forward(as_bf16(h.get()), posd.get(), outp, nullptr, status.get(), stream);
  layer.backward(as_bf16(dout.get()), dhp, status.get(), stream);
  FM_CHECK_CUDA(cudaStreamSynchronize(stream));
  const std::vector<Vec> g_zero = p.all_grads();
  p.set_grads(true, rng);  // garbage to overwrite
  layer.forward(as_bf16(h.get()), posd.get(), outp, nullptr, status.get(), stream);
  layer.backward(as_bf16(dout.get()), dhp, status.get(), stream, kernels::WgradOutput::kOverwrite);
  FM_CHECK_CUDA(cudaStreamSynchronize(stream));
  {
    const std::vector<Vec> go = p.all_grads();
    for (size_t k = 0; k < go.size(); ++k)
      EXPECT_TRUE(same(go[k], g_zero[k])) << "grad " << k << " overwritten";
  }
  check_model_kernels_status(status.get(), "DecoderLayerGpu test", stream);
  std::printf("%s layer (%s): staged checks, graph replay, overwrite == accumulate done\n",
              is_moe ? "MoE" : "dense", gap ? "parameters apart" : "parameters adjacent");
  if (result) {
    result->out = outh;
    result->dh = dhh;
    result->grads = g_zero;
    result->balance = balance;
    result->load = load;
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  FM_CHECK_CUDA(cudaStreamDestroy(stream));
}

TEST(DecoderLayerGpu, DenseMatchesPiecesAndReplays) {
  const uint64_t seed = std::random_device{}();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  LayerRun adjacent, apart;
  run_case(false, false, seed, &adjacent);
  run_case(false, true, seed, &apart);
  // The same seed: the same values; the dense FFN's dW13 written straight (adjacent gate / up
  // gradients) == through the scratch and the scatter (apart), bit for bit.
  EXPECT_EQ(adjacent.out, apart.out);
  EXPECT_EQ(adjacent.dh, apart.dh);
  ASSERT_EQ(adjacent.grads.size(), apart.grads.size());
  for (size_t k = 0; k < adjacent.grads.size(); ++k)
    EXPECT_TRUE(same(adjacent.grads[k], apart.grads[k])) << "grad " << k << ": direct != scatter";
}

TEST(DecoderLayerGpu, MoeMatchesPiecesAndReplays) {
  const uint64_t seed = std::random_device{}();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  run_case(true, false, seed);
}

TEST(DecoderLayerGpu, BadShapesThrow) {
  using test::expect_invalid;
  const ModelConfig c = small_config();
  const RopeTable rope = make_rope_table(c.qk_rope_head_dim, 64, c.rope_theta, c.rope_scaling);
  RopeTableGpu rg(rope);
  std::mt19937_64 rng(1);
  Params p;
  add_layer_params(p, c, "l", true);
  add_layer_params(p, c, "d", false);
  p.allocate(false, rng);
  auto look = [&](const std::string& n) -> ParameterGpu& { return p(n); };
  auto make = [&](const ModelConfig& cc, bool moe, int64_t b, int64_t s) {
    DecoderLayerGpu l(cc, moe ? "l" : "d", moe, b, s, rg.view(), look);
  };
  ModelConfig bad = c;
  bad.hidden_size = 200;
  expect_invalid([&] { make(bad, false, 1, 16); }, "hidden_size");
  bad = c;
  bad.intermediate_size = 100;
  expect_invalid([&] { make(bad, false, 1, 16); }, "intermediate_size");
  bad = c;
  bad.moe_intermediate_size = 64;
  expect_invalid([&] { make(bad, true, 1, 16); }, "moe_intermediate_size");
  bad = c;
  bad.qk_rope_head_dim = 32;
  expect_invalid([&] { make(bad, true, 1, 16); }, "qk_rope_head_dim");
  bad = c;
  bad.n_shared_experts = 0;
  expect_invalid([&] { make(bad, true, 1, 16); }, "n_shared_experts");
  bad = c;
  bad.kv_lora_rank = 64;
  expect_invalid([&] { make(bad, true, 1, 16); }, "kv_lora_rank");
  expect_invalid([&] { make(c, true, 0, 16); }, "batch");
  bad = c;
  bad.n_routed_experts = 16;  // the table holds 8 experts: a parameter's shape differs
  expect_invalid([&] { make(bad, true, 1, 16); }, "elements");
  DecoderLayerGpu l(c, "d", false, 1, 16, rg.view(), look);
  DeviceBuffer<bf16> x(16 * 256), y(16 * 256);
  expect_invalid([&] { l.backward(x.get(), y.get(), nullptr, nullptr); }, "forward first");
  expect_invalid([&] { l.forward(x.get(), nullptr, y.get(), nullptr, nullptr, nullptr); }, "null");
}

}  // namespace
}  // namespace fp8moe
