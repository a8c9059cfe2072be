#include "fp8moe/model/model.h"

#include <algorithm>
#include <cmath>

#include "fp8moe/core/error.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/kernels/mla_decode.h"
#include "fp8moe/model/attend_row.h"
#include "fp8moe/model/ops.h"
#include "fp8moe/moe/balance.h"
#include "fp8moe/moe/router.h"

namespace fp8moe {

namespace {

using Vec = std::vector<float>;

Vec zeros(int64_t n) {
  return Vec(static_cast<size_t>(n), 0.0f);
}
void add_into(float* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

// The model's modules. Each forward keeps what its backward needs; backward returns the input
// gradient and adds parameter gradients. One forward per backward.
struct Ctx {
  Precision precision = Precision::kFp32;
  int64_t batch = 0, seq = 0;  // tokens = batch * seq, row t = b * seq + s
  const RopeTable* rope = nullptr;
  int64_t tokens() const { return batch * seq; }
};

}  // namespace

// NOTE: not file-local since session 20: kernels' MLA attention reference is tested against it
// (model/attend_row.h).
// One query row of causal attention over keys [0, n): scores q.k (nope and rope parts) times
// scale, softmax, and the probability-weighted sum of the values into out (zero on entry).
// kv points at key 0's row for this head (nope key, then value; rows kv_stride apart), kpe at
// key 0's rotated k_pe (rows dr apart). NOTE: the full forward and the cached decode both call
// this, so a cached row does the same arithmetic in the same order as the recomputed one.
void attend_row(const float* qv, const float* kv, int64_t kv_stride, const float* kpe, int64_t n,
                int64_t dn, int64_t dr, int64_t dv, float scale, float* scratch, float* probs,
                float* out) {
  float mx = -INFINITY;
  for (int64_t s2 = 0; s2 < n; ++s2) {
    const float* kn = kv + s2 * kv_stride;
    const float* kp = kpe + s2 * dr;
    float dot = 0;
    for (int64_t i = 0; i < dn; ++i) dot += qv[i] * kn[i];
    for (int64_t i = 0; i < dr; ++i) dot += qv[dn + i] * kp[i];
    scratch[s2] = dot * scale;
    mx = std::max(mx, scratch[s2]);
  }
  double sum = 0;
  for (int64_t s2 = 0; s2 < n; ++s2) {
    scratch[s2] = std::exp(scratch[s2] - mx);
    sum += scratch[s2];
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t s2 = 0; s2 < n; ++s2) {
    probs[s2] = scratch[s2] * inv;
    const float* vv = kv + s2 * kv_stride + dn;
    for (int64_t i = 0; i < dv; ++i) out[i] += probs[s2] * vv[i];
  }
}

namespace {

struct ParamStore {
  std::deque<Parameter> params, buffers;
  uint64_t seed = 0;
  double init_std = 0.02;

  Parameter* add(const std::string& name, std::vector<int64_t> shape, bool is_norm) {
    Parameter p;
    p.name = name;
    p.shape = std::move(shape);
    int64_t n = 1;
    for (int64_t d : p.shape) n *= d;
    p.value.resize(static_cast<size_t>(n));
    p.grad.assign(static_cast<size_t>(n), 0.0f);
    p.weight_decay = !is_norm;
    if (is_norm) {
      std::fill(p.value.begin(), p.value.end(), 1.0f);
    } else {
      PhiloxStream rng(seed, params.size());
      for (auto& v : p.value) v = static_cast<float>(init_std * rng.normal());
    }
    params.push_back(std::move(p));
    return &params.back();
  }
  Parameter* add_buffer(const std::string& name, int64_t n) {
    Parameter p;
    p.name = name;
    p.shape = {n};
    p.value.assign(static_cast<size_t>(n), 0.0f);
    p.weight_decay = false;
    buffers.push_back(std::move(p));
    return &buffers.back();
  }
};

struct Norm {
  Parameter* w = nullptr;
  int64_t dim = 0;
  double eps = 1e-6;
  Vec x, rstd;
  int64_t rows = 0;

  void init(ParamStore& s, const std::string& name, int64_t d, double e) {
    w = s.add(name, {d}, true);
    dim = d;
    eps = e;
  }
  Vec forward(const float* in, int64_t r) {
    rows = r;
    x.assign(in, in + r * dim);
    rstd.resize(static_cast<size_t>(r));
    Vec y(static_cast<size_t>(r * dim));
    rmsnorm_forward(in, w->value.data(), r, dim, eps, y.data(), rstd.data());
    return y;
  }
  Vec backward(const float* dy) {
    Vec dx(static_cast<size_t>(rows * dim));
    rmsnorm_backward(x.data(), w->value.data(), rstd.data(), dy, rows, dim, dx.data(),
                     w->grad.data());
    return dx;
  }
};

struct Lin {
  Parameter* w = nullptr;
  int64_t in = 0, out = 0;
  bool pow2 = false;
  LinearCache cache;
  LinearOptions opts;

  void init(ParamStore& s, const std::string& name, int64_t i, int64_t o,
            bool pow2_scales = false) {
    w = s.add(name, {o, i}, false);
    in = i;
    out = o;
    pow2 = pow2_scales;
  }
  Vec forward(const float* x, int64_t m, Precision p) {
    opts.precision = p;
    opts.pow2_activation_scales = pow2;
    Vec y(static_cast<size_t>(m * out));
    linear_forward(opts, x, m, w->value.data(), out, in, y.data(), &cache);
    return y;
  }
  Vec backward(const float* dy, bool need_dx = true) {
    Vec dx(need_dx ? static_cast<size_t>(cache.m * in) : 0);
    linear_backward(opts, cache, w->value.data(), dy, need_dx ? dx.data() : nullptr,
                    w->grad.data());
    return dx;
  }
};

// SwiGLU FFN: down(silu(gate(x)) * up(x)).
struct Mlp {
  Lin gate, up, down;
  bool fp8_cache_swiglu = false;  // MoE FFNs: the SwiGLU inputs are cached in FP8
  Vec g, u;
  int64_t rows = 0;

  void init(ParamStore& s, const std::string& prefix, int64_t hidden, int64_t inter, bool moe,
            bool routed) {
    // NOTE: routed experts receive FP8 tokens with power-of-two scales (the dispatch format).
    gate.init(s, prefix + ".gate_proj.weight", hidden, inter, routed);
    up.init(s, prefix + ".up_proj.weight", hidden, inter, routed);
    down.init(s, prefix + ".down_proj.weight", inter, hidden);
    fp8_cache_swiglu = moe;
  }
  Vec forward(const float* x, int64_t m, Precision p) {
    rows = m;
    g = gate.forward(x, m, p);
    u = up.forward(x, m, p);
    Vec a(g.size());
    swiglu_forward(g.data(), u.data(), static_cast<int64_t>(g.size()), a.data());
    if (p == Precision::kFp8 && fp8_cache_swiglu && m > 0) {
      g = dequantize(quantize(g.data(), m, gate.out, gate.out, ScaleGranularity::k1x128));
      u = dequantize(quantize(u.data(), m, up.out, up.out, ScaleGranularity::k1x128));
    }
    return down.forward(a.data(), m, p);
  }
  Vec backward(const float* dy) {
    Vec da = down.backward(dy);
    Vec dg(g.size()), du(u.size());
    swiglu_backward(g.data(), u.data(), da.data(), static_cast<int64_t>(g.size()), dg.data(),
                    du.data());
    Vec dx = gate.backward(dg.data());
    Vec dx2 = up.backward(du.data());
    add_into(dx.data(), dx2.data(), static_cast<int64_t>(dx.size()));
    return dx;
  }
};

// Multi-head latent attention with decoupled RoPE and a causal softmax. Queries come through
// the low-rank path q_a_proj -> q_a_layernorm -> q_b_proj, or, with q_lora_rank 0 (HF's null,
// DeepSeek-V2-Lite), straight from q_proj.
struct Mla {
  int64_t hidden = 0, heads = 0, qr = 0, kvr = 0, dn = 0, dr = 0, dv = 0;
  float scale = 1;
  Lin q_a, q_b, q_proj, kv_a, kv_b, o;
  Norm q_norm, kv_norm;
  Vec q, kv, kpe, p, attn;  // q with rotated pe, kv, rotated k_pe [T,dr], probs [B,H,S,S], out
  Vec ckvn;                 // latent cache: kv_a_layernorm's output [T, kvr] as kv_b sees it
  Ctx ctx;
  bool cached = false;  // the last forward was a cached decode (no backward)

  void init(ParamStore& s, const std::string& pre, const ModelConfig& c) {
    hidden = c.hidden_size;
    heads = c.num_attention_heads;
    qr = c.q_lora_rank;
    kvr = c.kv_lora_rank;
    dn = c.qk_nope_head_dim;
    dr = c.qk_rope_head_dim;
    dv = c.v_head_dim;
    scale = static_cast<float>(attention_softmax_scale(dn + dr, c.rope_scaling));
    if (qr > 0) {
      q_a.init(s, pre + ".q_a_proj.weight", hidden, qr);
      q_norm.init(s, pre + ".q_a_layernorm.weight", qr, c.rms_norm_eps);
      q_b.init(s, pre + ".q_b_proj.weight", qr, heads * (dn + dr));
    } else {
      q_proj.init(s, pre + ".q_proj.weight", hidden, heads * (dn + dr));
    }
    kv_a.init(s, pre + ".kv_a_proj_with_mqa.weight", hidden, kvr + dr);
    kv_norm.init(s, pre + ".kv_a_layernorm.weight", kvr, c.rms_norm_eps);
    kv_b.init(s, pre + ".kv_b_proj.weight", kvr, heads * (dn + dv));
    // NOTE: the report keeps this input (the attention output) with power-of-two scales.
    o.init(s, pre + ".o_proj.weight", heads * dv, hidden, true);
  }

  // Queries, keys and values of the tokens of x, RoPE applied (token t at position pos0 + t % S).
  // Without `expand` (the latent cache) kv_b is not run: the latent c of each token is left in
  // ckvn, as kv_b's input would see it in the model's precision.
  void project(const float* x, const Ctx& c, int64_t pos0, bool expand = true) {
    const int64_t t_count = c.tokens(), S = c.seq;
    const int64_t qd = dn + dr;
    if (qr > 0) {
      Vec cq = q_a.forward(x, t_count, c.precision);
      Vec cqn = q_norm.forward(cq.data(), t_count);
      q = q_b.forward(cqn.data(), t_count, c.precision);
    } else {
      q = q_proj.forward(x, t_count, c.precision);
    }
    Vec kva = kv_a.forward(x, t_count, c.precision);
    Vec ckv(static_cast<size_t>(t_count * kvr));
    kpe.resize(static_cast<size_t>(t_count * dr));
    for (int64_t t = 0; t < t_count; ++t) {
      std::copy_n(kva.data() + t * (kvr + dr), kvr, ckv.data() + t * kvr);
      std::copy_n(kva.data() + t * (kvr + dr) + kvr, dr, kpe.data() + t * dr);
    }
    Vec cn = kv_norm.forward(ckv.data(), t_count);
    if (expand) {
      kv = kv_b.forward(cn.data(), t_count, c.precision);
    } else {
      if (c.precision == Precision::kBf16) {
        for (auto& v : cn) v = round_to_bf16(v);
      } else if (c.precision == Precision::kFp8 && t_count > 0) {
        QuantizeOptions qo;
        qo.pow2_scales = kv_b.pow2;
        cn = dequantize(quantize(cn.data(), t_count, kvr, kvr, ScaleGranularity::k1x128, qo));
      }
      ckvn = std::move(cn);
    }
    for (int64_t t = 0; t < t_count; ++t) {
      const int64_t pos = pos0 + t % S;
      rope_apply(*c.rope, kpe.data() + t * dr, pos, false);
      for (int64_t h = 0; h < heads; ++h)
        rope_apply(*c.rope, q.data() + t * heads * qd + h * qd + dn, pos, false);
    }
  }

  Vec forward(const float* x, const Ctx& c) {
    ctx = c;
    cached = false;
    const int64_t t_count = c.tokens(), S = c.seq, B = c.batch;
    const int64_t qd = dn + dr, kvd = dn + dv;
    project(x, c, 0);
    p.assign(static_cast<size_t>(B * heads * S * S), 0.0f);
    attn.assign(static_cast<size_t>(t_count * heads * dv), 0.0f);
    parallel_for(B * heads, [&](int64_t i0, int64_t i1) {
      Vec row(static_cast<size_t>(S));
      for (int64_t bh = i0; bh < i1; ++bh) {
        const int64_t b = bh / heads, h = bh % heads;
        for (int64_t s = 0; s < S; ++s)
          attend_row(q.data() + (b * S + s) * heads * qd + h * qd,
                     kv.data() + b * S * heads * kvd + h * kvd, heads * kvd,
                     kpe.data() + b * S * dr, s + 1, dn, dr, dv, scale, row.data(),
                     p.data() + ((b * heads + h) * S + s) * S,
                     attn.data() + (b * S + s) * heads * dv + h * dv);
      }
    });
    return o.forward(attn.data(), t_count, c.precision);
  }

  // Generation: the c.seq tokens of x (batch 1) follow the layer.length... tokens cached in
  // `layer`; their keys and values are appended to it and they attend to all cached tokens.
  Vec forward_cached(const float* x, const Ctx& c, int64_t pos0, KvCache::Layer& layer) {
    FM_CHECK(c.batch == 1, "cached attention runs one sequence");
    ctx = c;
    cached = true;
    const int64_t S = c.seq, qd = dn + dr, kvd = dn + dv;
    project(x, c, pos0);
    FM_CHECK(static_cast<int64_t>(layer.k_pe.size()) == pos0 * dr, "KV cache holds ",
             layer.k_pe.size() / dr, " tokens, expected ", pos0);
    layer.kv.insert(layer.kv.end(), kv.begin(), kv.end());
    layer.k_pe.insert(layer.k_pe.end(), kpe.begin(), kpe.end());
    const int64_t n_keys = pos0 + S;
    attn.assign(static_cast<size_t>(S * heads * dv), 0.0f);
    parallel_for(S * heads, [&](int64_t i0, int64_t i1) {
      Vec row(static_cast<size_t>(n_keys)), probs(static_cast<size_t>(n_keys));
      for (int64_t sh = i0; sh < i1; ++sh) {
        const int64_t s = sh / heads, h = sh % heads;
        attend_row(q.data() + s * heads * qd + h * qd, layer.kv.data() + h * kvd, heads * kvd,
                   layer.k_pe.data(), pos0 + s + 1, dn, dr, dv, scale, row.data(), probs.data(),
                   attn.data() + s * heads * dv + h * dv);
      }
    });
    return o.forward(attn.data(), S, c.precision);
  }

  // kv_b's weight [heads * (dn + dv), kvr] as the model's precision multiplies by it (bf16:
  // rounded; fp8: its 128x128 E4M3 round trip), for the latent form's absorbed products.
  Vec kv_b_weight_as_seen(Precision precision) const {
    const Vec& w = kv_b.w->value;
    switch (precision) {
      case Precision::kFp32:
        return w;
      case Precision::kBf16: {
        Vec r(w.size());
        for (size_t i = 0; i < w.size(); ++i) r[i] = round_to_bf16(w[i]);
        return r;
      }
      case Precision::kFp8:
        return dequantize(quantize(w.data(), kv_b.out, kvr, kvr, ScaleGranularity::k128x128));
    }
    return w;
  }

  // Generation with the latent cache (KvCache::kLatent): the c.seq tokens of x (batch 1) follow
  // the pos0 tokens cached in `layer`; their latent rows [c, k_pe] are appended (pages of
  // page_tokens rows, allocated as needed) and the queries attend in latent space through
  // kernels::mla_decode_reference (causal among the new tokens), kv_b folded into the query
  // (q_lat[h] = W_UK[h]^T q_nope[h]) and the output (attn[h] = W_UV[h] out_lat[h]), in FP32.
  Vec forward_latent(const float* x, const Ctx& c, int64_t pos0, int64_t page_tokens,
                     KvCache::Layer& layer) {
    FM_CHECK(c.batch == 1, "cached attention runs one sequence");
    ctx = c;
    cached = true;
    const int64_t S = c.seq, qd = dn + dr, kvd = dn + dv, D = kvr + dr;
    FM_CHECK(layer.kv.empty() && layer.k_pe.empty(), "latent KV cache holds expanded rows");
    const int64_t pages_held = static_cast<int64_t>(layer.page_table.size());
    FM_CHECK(pages_held == (pos0 + page_tokens - 1) / page_tokens &&
                 static_cast<int64_t>(layer.latent.size()) == pages_held * page_tokens * D,
             "latent KV cache holds ", pages_held, " pages of ", page_tokens, " tokens, expected ",
             pos0, " tokens");
    project(x, c, pos0, false);
    // Append the new rows, a page at a time.
    for (int64_t s = 0; s < S; ++s) {
      const int64_t t = pos0 + s;
      if (t / page_tokens >= static_cast<int64_t>(layer.page_table.size())) {
        layer.page_table.push_back(static_cast<int32_t>(layer.page_table.size()));
        layer.latent.resize(layer.latent.size() + static_cast<size_t>(page_tokens * D), 0.0f);
      }
      float* row = layer.latent.data() +
                   (layer.page_table[t / page_tokens] * page_tokens + t % page_tokens) * D;
      std::copy_n(ckvn.data() + s * kvr, kvr, row);
      std::copy_n(kpe.data() + s * dr, dr, row + kvr);
    }
    // Queries in latent space: [q_lat[h], q_pe[h]] per token and head.
    const Vec w = kv_b_weight_as_seen(c.precision);
    Vec ql(static_cast<size_t>(S * heads * D));
    for (int64_t h = 0; h < heads; ++h) {
      gemm_f32(S, kvr, dn, q.data() + h * qd, heads * qd, false, w.data() + h * kvd * kvr, kvr,
               false, ql.data() + h * D, heads * D, false);
      for (int64_t s = 0; s < S; ++s)
        std::copy_n(q.data() + s * heads * qd + h * qd + dn, dr,
                    ql.data() + (s * heads + h) * D + kvr);
    }
    // Attention over the latent rows, then each head's output through W_UV.
    kernels::MlaDecodeShape shape;
    shape.batch = 1;
    shape.queries = S;
    shape.heads = heads;
    shape.latent_dim = kvr;
    shape.rope_dim = dr;
    shape.page_tokens = page_tokens;
    shape.max_pages = static_cast<int64_t>(layer.page_table.size());
    shape.softmax_scale = scale;
    const int32_t seq_len = static_cast<int32_t>(pos0 + S);
    Vec out_lat(static_cast<size_t>(S * heads * kvr)), lse(static_cast<size_t>(S * heads));
    kernels::mla_decode_reference(shape, ql.data(), layer.latent.data(), layer.page_table.data(),
                                  &seq_len, out_lat.data(), lse.data());
    attn.assign(static_cast<size_t>(S * heads * dv), 0.0f);
    for (int64_t h = 0; h < heads; ++h)
      gemm_f32(S, dv, kvr, out_lat.data() + h * kvr, heads * kvr, false,
               w.data() + (h * kvd + dn) * kvr, kvr, true, attn.data() + h * dv, heads * dv, false);
    return o.forward(attn.data(), S, c.precision);
  }

  Vec backward(const float* dy) {
    FM_CHECK(!cached, "no backward through a cached (generation) forward");
    const int64_t t_count = ctx.tokens(), S = ctx.seq, B = ctx.batch;
    const int64_t qd = dn + dr, kvd = dn + dv;
    Vec dattn = o.backward(dy);
    Vec dq = zeros(t_count * heads * qd), dkv = zeros(t_count * heads * kvd);
    Vec dkpe_h = zeros(heads * t_count * dr);  // per head, summed in order below
    parallel_for(B * heads, [&](int64_t i0, int64_t i1) {
      Vec dp(static_cast<size_t>(S));
      for (int64_t bh = i0; bh < i1; ++bh) {
        const int64_t b = bh / heads, h = bh % heads;
        float* dkp_head = dkpe_h.data() + h * t_count * dr;
        for (int64_t s = 0; s < S; ++s) {
          const int64_t t = b * S + s;
          const float* prow = p.data() + ((b * heads + h) * S + s) * S;
          const float* dout = dattn.data() + t * heads * dv + h * dv;
          double dot_pd = 0;
          for (int64_t s2 = 0; s2 <= s; ++s2) {
            const float* vv = kv.data() + (b * S + s2) * heads * kvd + h * kvd + dn;
            float d = 0;
            for (int64_t i = 0; i < dv; ++i) d += dout[i] * vv[i];
            dp[s2] = d;
            dot_pd += static_cast<double>(prow[s2]) * d;
          }
          const float* qv = q.data() + t * heads * qd + h * qd;
          float* dqv = dq.data() + t * heads * qd + h * qd;
          for (int64_t s2 = 0; s2 <= s; ++s2) {
            const int64_t t2 = b * S + s2;
            float* dvv = dkv.data() + t2 * heads * kvd + h * kvd + dn;
            for (int64_t i = 0; i < dv; ++i) dvv[i] += prow[s2] * dout[i];
            const float ds = prow[s2] * (dp[s2] - static_cast<float>(dot_pd)) * scale;
            if (ds == 0.0f) continue;
            const float* kn = kv.data() + t2 * heads * kvd + h * kvd;
            const float* kp = kpe.data() + t2 * dr;
            float* dkn = dkv.data() + t2 * heads * kvd + h * kvd;
            float* dkp = dkp_head + t2 * dr;
            for (int64_t i = 0; i < dn; ++i) {
              dqv[i] += ds * kn[i];
              dkn[i] += ds * qv[i];
            }
            for (int64_t i = 0; i < dr; ++i) {
              dqv[dn + i] += ds * kp[i];
              dkp[i] += ds * qv[dn + i];
            }
          }
        }
      }
    });
    Vec dkva = zeros(t_count * (kvr + dr));
    for (int64_t t = 0; t < t_count; ++t) {
      const int64_t pos = t % S;
      float* dkp = dkva.data() + t * (kvr + dr) + kvr;
      for (int64_t h = 0; h < heads; ++h) add_into(dkp, dkpe_h.data() + (h * t_count + t) * dr, dr);
      rope_apply(*ctx.rope, dkp, pos, true);
      for (int64_t h = 0; h < heads; ++h)
        rope_apply(*ctx.rope, dq.data() + t * heads * qd + h * qd + dn, pos, true);
    }
    Vec dckvn = kv_b.backward(dkv.data());
    Vec dckv = kv_norm.backward(dckvn.data());
    for (int64_t t = 0; t < t_count; ++t)
      std::copy_n(dckv.data() + t * kvr, kvr, dkva.data() + t * (kvr + dr));
    Vec dx = kv_a.backward(dkva.data());
    Vec dx2;
    if (qr > 0) {
      Vec dcqn = q_b.backward(dq.data());
      Vec dcq = q_norm.backward(dcqn.data());
      dx2 = q_a.backward(dcq.data());
    } else {
      dx2 = q_proj.backward(dq.data());
    }
    add_into(dx.data(), dx2.data(), static_cast<int64_t>(dx.size()));
    return dx;
  }
};

// DeepSeekMoE: shared experts on every token plus the router's top-k routed experts.
struct Moe {
  int64_t hidden = 0, experts_n = 0, top_k = 0;
  RouterConfig rc;
  Parameter* gate = nullptr;
  Parameter* bias = nullptr;
  std::unique_ptr<Mlp> shared;
  std::vector<Mlp> experts;
  RouterOutput routed;
  Vec x;
  int64_t rows = 0;
  std::vector<std::vector<int64_t>> slots;  // per expert: t * top_k + slot, in token order
  std::vector<Vec> ye;                      // per expert outputs
  std::vector<int64_t> load;
  float balance_alpha = 0;  // the sequence-wise balance loss's weight (0 = off)
  int64_t seq_len = 0;
  double balance_loss = 0;

  void init(ParamStore& s, const std::string& pre, const ModelConfig& c) {
    hidden = c.hidden_size;
    balance_alpha = c.seq_aux ? static_cast<float>(c.aux_loss_alpha) : 0.0f;
    experts_n = c.n_routed_experts;
    top_k = c.num_experts_per_tok;
    rc = c.router_config();
    gate = s.add(pre + ".gate.weight", {experts_n, hidden}, false);
    bias = s.add_buffer(pre + ".gate.e_score_correction_bias", experts_n);
    experts.resize(static_cast<size_t>(experts_n));
    for (int64_t e = 0; e < experts_n; ++e)
      experts[e].init(s, pre + ".experts." + std::to_string(e), hidden, c.moe_intermediate_size,
                      true, true);
    if (c.n_shared_experts > 0) {
      shared = std::make_unique<Mlp>();
      shared->init(s, pre + ".shared_experts", hidden, c.moe_intermediate_size * c.n_shared_experts,
                   true, false);
    }
  }

  Vec forward(const float* in, int64_t m, int64_t seq, Precision prec) {
    rows = m;
    seq_len = seq;
    x.assign(in, in + m * hidden);
    Vec logits(static_cast<size_t>(m * experts_n));
    gemm_f32(m, experts_n, hidden, in, hidden, false, gate->value.data(), hidden, true,
             logits.data(), experts_n, false);
    routed = route(rc, logits.data(), m, bias->value.data());
    balance_loss = balance_alpha > 0
                       ? sequence_balance_loss(rc, routed, seq_len, balance_alpha, nullptr)
                       : 0.0;
    Vec y = shared ? shared->forward(in, m, prec) : zeros(m * hidden);
    slots.assign(static_cast<size_t>(experts_n), {});
    for (int64_t t = 0; t < m; ++t)
      for (int64_t k = 0; k < top_k; ++k)
        slots[routed.topk_idx[t * top_k + k]].push_back(t * top_k + k);
    ye.assign(static_cast<size_t>(experts_n), {});
    load.assign(static_cast<size_t>(experts_n), 0);
    for (int64_t e = 0; e < experts_n; ++e) {
      const auto& sl = slots[e];
      const int64_t n = static_cast<int64_t>(sl.size());
      load[e] = n;
      if (n == 0) continue;
      Vec xe(static_cast<size_t>(n * hidden));
      for (int64_t r = 0; r < n; ++r)
        std::copy_n(in + (sl[r] / top_k) * hidden, hidden, xe.data() + r * hidden);
      ye[e] = experts[e].forward(xe.data(), n, prec);
      for (int64_t r = 0; r < n; ++r) {
        const float w = routed.topk_weight[sl[r]];
        float* yr = y.data() + (sl[r] / top_k) * hidden;
        const float* er = ye[e].data() + r * hidden;
        for (int64_t i = 0; i < hidden; ++i) yr[i] += w * er[i];
      }
    }
    return y;
  }

  Vec backward(const float* dy) {
    const int64_t m = rows;
    Vec dx = shared ? shared->backward(dy) : zeros(m * hidden);
    Vec gw = zeros(m * top_k);
    for (int64_t e = 0; e < experts_n; ++e) {
      const auto& sl = slots[e];
      const int64_t n = static_cast<int64_t>(sl.size());
      if (n == 0) continue;
      Vec dye(static_cast<size_t>(n * hidden));
      for (int64_t r = 0; r < n; ++r) {
        const float w = routed.topk_weight[sl[r]];
        const float* dyr = dy + (sl[r] / top_k) * hidden;
        const float* er = ye[e].data() + r * hidden;
        double dot = 0;
        for (int64_t i = 0; i < hidden; ++i) {
          dye[r * hidden + i] = w * dyr[i];
          dot += static_cast<double>(dyr[i]) * er[i];
        }
        gw[sl[r]] = static_cast<float>(dot);
      }
      Vec dxe = experts[e].backward(dye.data());
      for (int64_t r = 0; r < n; ++r)
        add_into(dx.data() + (sl[r] / top_k) * hidden, dxe.data() + r * hidden, hidden);
    }
    Vec dlogits(static_cast<size_t>(m * experts_n));
    route_backward(rc, routed, gw.data(), dlogits.data());
    if (balance_alpha > 0)
      sequence_balance_loss(rc, routed, seq_len, balance_alpha, dlogits.data());
    gemm_f32(experts_n, hidden, m, dlogits.data(), experts_n, true, x.data(), hidden, false,
             gate->grad.data(), hidden, true);
    gemm_f32(m, hidden, experts_n, dlogits.data(), experts_n, false, gate->value.data(), hidden,
             false, dx.data(), hidden, true);
    return dx;
  }
};

struct Block {
  Norm ln1, ln2;
  Mla attn;
  std::unique_ptr<Mlp> mlp;
  std::unique_ptr<Moe> moe;
  int64_t hidden = 0;

  void init(ParamStore& s, const std::string& pre, const ModelConfig& c, bool is_moe) {
    hidden = c.hidden_size;
    ln1.init(s, pre + ".input_layernorm.weight", hidden, c.rms_norm_eps);
    attn.init(s, pre + ".self_attn", c);
    ln2.init(s, pre + ".post_attention_layernorm.weight", hidden, c.rms_norm_eps);
    if (is_moe) {
      moe = std::make_unique<Moe>();
      moe->init(s, pre + ".mlp", c);
    } else {
      mlp = std::make_unique<Mlp>();
      mlp->init(s, pre + ".mlp", hidden, c.intermediate_size, false, false);
    }
  }
  // With a cache layer: generation (batch 1, tokens at positions pos0 ...; page_tokens > 0: the
  // latent form).
  Vec forward(const float* h, const Ctx& c, int64_t pos0 = 0, KvCache::Layer* cache = nullptr,
              int64_t page_tokens = 0) {
    const int64_t n = c.tokens() * hidden;
    Vec a = ln1.forward(h, c.tokens());
    Vec h1 = !cache            ? attn.forward(a.data(), c)
             : page_tokens > 0 ? attn.forward_latent(a.data(), c, pos0, page_tokens, *cache)
                               : attn.forward_cached(a.data(), c, pos0, *cache);
    add_into(h1.data(), h, n);
    Vec f = ln2.forward(h1.data(), c.tokens());
    Vec h2 = moe ? moe->forward(f.data(), c.tokens(), c.seq, c.precision)
                 : mlp->forward(f.data(), c.tokens(), c.precision);
    add_into(h2.data(), h1.data(), n);
    return h2;
  }
  Vec backward(const float* dh2) {
    const int64_t n = static_cast<int64_t>(ln2.x.size());
    Vec df = moe ? moe->backward(dh2) : mlp->backward(dh2);
    Vec dh1 = ln2.backward(df.data());
    add_into(dh1.data(), dh2, n);
    Vec da = attn.backward(dh1.data());
    Vec dh = ln1.backward(da.data());
    add_into(dh.data(), dh1.data(), n);
    return dh;
  }
};

struct Mtp {
  Norm enorm, hnorm, final_norm;
  Lin eh;
  Block block;
  Lin* head = nullptr;
  LinearCache head_cache;
};

}  // namespace

struct ModelImpl {
  ModelConfig config;
  ParamStore store;
  Parameter* embed = nullptr;
  std::vector<Block> blocks;
  Norm final_norm;
  Lin head;
  std::vector<std::unique_ptr<Mtp>> mtps;
  std::vector<std::vector<int64_t>> loads;
  // forward state
  std::vector<int32_t> inputs;  // per depth the token ids fed to the embedding
  RopeTable rope;

  Vec embed_rows(const int32_t* ids, int64_t n) {
    const int64_t h = config.hidden_size;
    Vec out(static_cast<size_t>(n * h));
    for (int64_t i = 0; i < n; ++i) {
      FM_CHECK_ARG(ids[i] >= 0 && ids[i] < config.vocab_size, "token id ", ids[i],
                   " is outside the vocabulary (", config.vocab_size, ")");
      std::copy_n(embed->value.data() + ids[i] * h, h, out.data() + i * h);
    }
    return out;
  }
  void embed_backward(const int32_t* ids, int64_t n, const float* d) {
    const int64_t h = config.hidden_size;
    for (int64_t i = 0; i < n; ++i) add_into(embed->grad.data() + ids[i] * h, d + i * h, h);
  }
  Precision head_precision(Precision p) const {
    return p == Precision::kFp32 ? Precision::kFp32 : Precision::kBf16;
  }
};

Model::Model(const ModelConfig& config, uint64_t seed) : impl_(std::make_unique<ModelImpl>()) {
  config.validate();
  ModelImpl& m = *impl_;
  m.config = config;
  m.store.seed = seed;
  m.store.init_std = config.initializer_range;
  const int64_t h = config.hidden_size;
  m.embed = m.store.add("model.embed_tokens.weight", {config.vocab_size, h}, false);
  m.blocks.resize(static_cast<size_t>(config.num_hidden_layers));
  for (int64_t l = 0; l < config.num_hidden_layers; ++l)
    m.blocks[l].init(m.store, "model.layers." + std::to_string(l), config, config.is_moe_layer(l));
  m.final_norm.init(m.store, "model.norm.weight", h, config.rms_norm_eps);
  m.head.init(m.store, "lm_head.weight", h, config.vocab_size);
  for (int64_t k = 0; k < config.num_nextn_predict_layers; ++k) {
    const int64_t layer = config.num_hidden_layers + k;
    const std::string pre = "model.layers." + std::to_string(layer);
    auto mtp = std::make_unique<Mtp>();
    mtp->enorm.init(m.store, pre + ".enorm.weight", h, config.rms_norm_eps);
    mtp->hnorm.init(m.store, pre + ".hnorm.weight", h, config.rms_norm_eps);
    mtp->eh.init(m.store, pre + ".eh_proj.weight", 2 * h, h);
    mtp->block.init(m.store, pre, config, config.is_moe_layer(layer));
    mtp->final_norm.init(m.store, pre + ".shared_head.norm.weight", h, config.rms_norm_eps);
    m.mtps.push_back(std::move(mtp));
  }
}

Model::~Model() = default;

const ModelConfig& Model::config() const {
  return impl_->config;
}
std::deque<Parameter>& Model::parameters() {
  return impl_->store.params;
}
std::deque<Parameter>& Model::buffers() {
  return impl_->store.buffers;
}
int64_t Model::parameter_count() const {
  int64_t n = 0;
  for (const auto& p : impl_->store.params) n += p.numel();
  return n;
}
const std::vector<std::vector<int64_t>>& Model::expert_load() const {
  return impl_->loads;
}

void Model::zero_grad() {
  for (auto& p : impl_->store.params) std::fill(p.grad.begin(), p.grad.end(), 0.0f);
}

LossReport Model::forward_backward(const int32_t* tokens, int64_t batch, int64_t window,
                                   Precision precision, float mtp_weight, bool backward) {
  ModelImpl& m = *impl_;
  const ModelConfig& c = m.config;
  const int64_t depth = c.num_nextn_predict_layers;
  const int64_t seq = window - depth - 1;
  FM_CHECK_ARG(batch > 0 && seq > 0, "forward: window ", window, " leaves no positions (", depth,
               " MTP depths need ", depth + 2, " tokens at least)");
  FM_CHECK_ARG(seq <= c.max_position_embeddings, "forward: sequence ", seq,
               " exceeds max_position_embeddings ", c.max_position_embeddings);
  const int64_t T = batch * seq, h = c.hidden_size, V = c.vocab_size;
  if (m.rope.positions < seq || m.rope.dim != c.qk_rope_head_dim)
    m.rope = make_rope_table(c.qk_rope_head_dim, seq, c.rope_theta, c.rope_scaling);
  Ctx ctx{precision, batch, seq, &m.rope};

  // Token ids per depth: depth d reads tokens[b, s + d] and predicts tokens[b, s + d + 1].
  auto gather_ids = [&](int64_t offset) {
    std::vector<int32_t> ids(static_cast<size_t>(T));
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t s = 0; s < seq; ++s) ids[b * seq + s] = tokens[b * window + s + offset];
    return ids;
  };

  // Main model
  const std::vector<int32_t> ids0 = gather_ids(0);
  const std::vector<int32_t> tgt0 = gather_ids(1);
  Vec hcur = m.embed_rows(ids0.data(), T);
  for (auto& blk : m.blocks) hcur = blk.forward(hcur.data(), ctx);
  const Vec h_main = hcur;
  Vec hn = m.final_norm.forward(h_main.data(), T);
  Vec logits = m.head.forward(hn.data(), T, m.head_precision(precision));
  LossReport rep;
  Vec dlogits(backward ? logits.size() : 0);
  rep.main_loss = cross_entropy(logits.data(), tgt0.data(), T, V,
                                backward ? dlogits.data() : nullptr, 1.0f / static_cast<float>(T));
  logits.clear();

  // MTP modules, sequentially: depth k combines depth k-1's hidden state with the embedding of
  // the token k positions ahead.
  const float mtp_scale = depth > 0 ? mtp_weight / static_cast<float>(depth) : 0.0f;
  std::vector<Vec> mtp_dlogits(static_cast<size_t>(depth));
  std::vector<std::vector<int32_t>> mtp_ids(static_cast<size_t>(depth));
  Vec hprev = h_main;
  for (int64_t k = 0; k < depth; ++k) {
    Mtp& mt = *m.mtps[k];
    mtp_ids[k] = gather_ids(k + 1);
    const std::vector<int32_t> tgt = gather_ids(k + 2);
    Vec e = m.embed_rows(mtp_ids[k].data(), T);
    Vec en = mt.enorm.forward(e.data(), T);
    Vec hnk = mt.hnorm.forward(hprev.data(), T);
    Vec cat(static_cast<size_t>(T * 2 * h));
    for (int64_t t = 0; t < T; ++t) {
      std::copy_n(en.data() + t * h, h, cat.data() + t * 2 * h);
      std::copy_n(hnk.data() + t * h, h, cat.data() + t * 2 * h + h);
    }
    Vec hp = mt.eh.forward(cat.data(), T, precision);
    Vec hk = mt.block.forward(hp.data(), ctx);
    Vec fk = mt.final_norm.forward(hk.data(), T);
    Vec lk(static_cast<size_t>(T * V));
    linear_forward(LinearOptions{m.head_precision(precision), false, 0}, fk.data(), T,
                   m.head.w->value.data(), V, h, lk.data(), &mt.head_cache);
    if (backward) mtp_dlogits[k].resize(lk.size());
    rep.mtp_loss.push_back(cross_entropy(lk.data(), tgt.data(), T, V,
                                         backward ? mtp_dlogits[k].data() : nullptr,
                                         mtp_scale / static_cast<float>(T)));
    hprev = std::move(hk);
  }
  double mtp_sum = 0;
  for (double l : rep.mtp_loss) mtp_sum += l;
  rep.loss = rep.main_loss + (depth > 0 ? mtp_weight * mtp_sum / static_cast<double>(depth) : 0.0);

  m.loads.clear();
  for (auto& blk : m.blocks)
    if (blk.moe) {
      m.loads.push_back(blk.moe->load);
      rep.balance_loss += blk.moe->balance_loss;
    }
  for (auto& mt : m.mtps)
    if (mt->block.moe) {
      m.loads.push_back(mt->block.moe->load);
      rep.balance_loss += mt->block.moe->balance_loss;
    }
  rep.loss += rep.balance_loss;
  if (!backward) return rep;

  // Backward: MTP depths in reverse, each passing a gradient to the previous depth's hidden.
  Vec dh_next = zeros(T * h);  // gradient w.r.t. depth k's block output from depth k+1
  for (int64_t k = depth - 1; k >= 0; --k) {
    Mtp& mt = *m.mtps[k];
    Vec dfk(static_cast<size_t>(T * h));
    linear_backward(LinearOptions{m.head_precision(precision), false, 0}, mt.head_cache,
                    m.head.w->value.data(), mtp_dlogits[k].data(), dfk.data(),
                    m.head.w->grad.data());
    mtp_dlogits[k].clear();
    Vec dhk = mt.final_norm.backward(dfk.data());
    add_into(dhk.data(), dh_next.data(), T * h);
    Vec dhp = mt.block.backward(dhk.data());
    Vec dcat = mt.eh.backward(dhp.data());
    Vec den(static_cast<size_t>(T * h)), dhn(static_cast<size_t>(T * h));
    for (int64_t t = 0; t < T; ++t) {
      std::copy_n(dcat.data() + t * 2 * h, h, den.data() + t * h);
      std::copy_n(dcat.data() + t * 2 * h + h, h, dhn.data() + t * h);
    }
    Vec de = mt.enorm.backward(den.data());
    m.embed_backward(mtp_ids[k].data(), T, de.data());
    dh_next = mt.hnorm.backward(dhn.data());
  }
  Vec dhn_main = m.head.backward(dlogits.data());
  dlogits.clear();
  Vec dh = m.final_norm.backward(dhn_main.data());
  add_into(dh.data(), dh_next.data(), T * h);
  for (int64_t l = c.num_hidden_layers - 1; l >= 0; --l) dh = m.blocks[l].backward(dh.data());
  m.embed_backward(ids0.data(), T, dh.data());
  return rep;
}

std::vector<float> Model::next_token_logits(const int32_t* tokens, int64_t seq,
                                            Precision precision) {
  ModelImpl& m = *impl_;
  const ModelConfig& c = m.config;
  FM_CHECK_ARG(seq > 0 && seq <= c.max_position_embeddings, "generate: context of ", seq,
               " tokens is outside [1, max_position_embeddings]");
  if (m.rope.positions < seq || m.rope.dim != c.qk_rope_head_dim)
    m.rope = make_rope_table(c.qk_rope_head_dim, std::max<int64_t>(seq, 256), c.rope_theta,
                             c.rope_scaling);
  Ctx ctx{precision, 1, seq, &m.rope};
  Vec hcur = m.embed_rows(tokens, seq);
  for (auto& blk : m.blocks) hcur = blk.forward(hcur.data(), ctx);
  Vec hn = m.final_norm.forward(hcur.data() + (seq - 1) * c.hidden_size, 1);
  LinearCache cache;
  std::vector<float> logits(static_cast<size_t>(c.vocab_size));
  linear_forward(LinearOptions{m.head_precision(precision), false, 0}, hn.data(), 1,
                 m.head.w->value.data(), c.vocab_size, c.hidden_size, logits.data(), &cache);
  return logits;
}

const char* kv_cache_form_name(KvCacheForm form) {
  return form == KvCacheForm::kLatent ? "latent" : "expanded";
}

KvCacheForm parse_kv_cache_form(const std::string& name) {
  if (name == "latent") return KvCacheForm::kLatent;
  if (name == "expanded") return KvCacheForm::kExpanded;
  FM_THROW(ErrorKind::kInvalidArgument, "unknown KV cache form '", name,
           "' (expected latent or expanded)");
}

int64_t KvCache::bytes() const {
  int64_t n = 0;
  for (const auto& l : layers)
    n += static_cast<int64_t>((l.kv.size() + l.k_pe.size() + l.latent.size()) * sizeof(float) +
                              l.page_table.size() * sizeof(int32_t));
  return n;
}

std::vector<float> Model::next_token_logits(const int32_t* tokens, int64_t n, Precision precision,
                                            KvCache& cache) {
  ModelImpl& m = *impl_;
  const ModelConfig& c = m.config;
  const int64_t pos0 = cache.length, total = pos0 + n;
  FM_CHECK_ARG(n > 0 && total <= c.max_position_embeddings, "generate: context of ", total,
               " tokens is outside [1, max_position_embeddings]");
  if (cache.layers.empty()) {
    FM_CHECK_ARG(pos0 == 0, "KV cache claims ", pos0, " tokens but holds no layers");
    cache.layers.resize(static_cast<size_t>(c.num_hidden_layers));
  }
  FM_CHECK_ARG(static_cast<int64_t>(cache.layers.size()) == c.num_hidden_layers, "KV cache has ",
               cache.layers.size(), " layers, the model ", c.num_hidden_layers);
  const bool latent = cache.form == KvCacheForm::kLatent;
  FM_CHECK_ARG(!latent || (cache.page_tokens > 0 && cache.page_tokens <= (1 << 20)),
               "KV cache: page_tokens=", cache.page_tokens, " outside [1, 2^20]");
  if (m.rope.positions < total || m.rope.dim != c.qk_rope_head_dim)
    m.rope = make_rope_table(c.qk_rope_head_dim,
                             std::min(c.max_position_embeddings, std::max<int64_t>(2 * total, 256)),
                             c.rope_theta, c.rope_scaling);
  Ctx ctx{precision, 1, n, &m.rope};
  Vec hcur = m.embed_rows(tokens, n);
  for (size_t l = 0; l < m.blocks.size(); ++l)
    hcur = m.blocks[l].forward(hcur.data(), ctx, pos0, &cache.layers[l],
                               latent ? cache.page_tokens : 0);
  cache.length = total;
  Vec hn = m.final_norm.forward(hcur.data() + (n - 1) * c.hidden_size, 1);
  LinearCache lcache;
  std::vector<float> logits(static_cast<size_t>(c.vocab_size));
  linear_forward(LinearOptions{m.head_precision(precision), false, 0}, hn.data(), 1,
                 m.head.w->value.data(), c.vocab_size, c.hidden_size, logits.data(), &lcache);
  return logits;
}

}  // namespace fp8moe
