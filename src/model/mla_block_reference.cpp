// mla_block_reference (fp8moe/model/mla_block_reference.h): the MLA block from the public CPU
// pieces, in FP32 or with the GPU block's BF16 rounding points and FP8 linears.
#include "fp8moe/model/mla_block_reference.h"

#include <algorithm>
#include <utility>

#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/kernels/mla_attention.h"
#include "fp8moe/kernels/rmsnorm.h"
#include "fp8moe/model/attend_row.h"
#include "fp8moe/model/linear.h"

namespace fp8moe {

MlaBlockDims MlaBlockDims::from(const ModelConfig& c) {
  MlaBlockDims d;
  d.hidden = c.hidden_size;
  d.heads = c.num_attention_heads;
  d.q_lora_rank = c.q_lora_rank;
  d.kv_lora_rank = c.kv_lora_rank;
  d.dn = c.qk_nope_head_dim;
  d.dr = c.qk_rope_head_dim;
  d.dv = c.v_head_dim;
  d.eps = c.rms_norm_eps;
  d.scale = static_cast<float>(attention_softmax_scale(d.dn + d.dr, c.rope_scaling));
  return d;
}

MlaBlockParams MlaBlockParams::zeros(const MlaBlockDims& d) {
  MlaBlockParams p;
  auto z = [](int64_t n) { return std::vector<float>(static_cast<size_t>(n), 0.0f); };
  const int64_t qr = d.q_lora_rank, kvr = d.kv_lora_rank;
  if (qr > 0) {
    p.q_a = z(qr * d.hidden);
    p.q_a_norm = z(qr);
    p.q_b = z(d.heads * d.qd() * qr);
  } else {
    p.q_proj = z(d.heads * d.qd() * d.hidden);
  }
  p.kv_a = z((kvr + d.dr) * d.hidden);
  p.kv_a_norm = z(kvr);
  p.kv_b = z(d.heads * d.kvd() * kvr);
  p.o = z(d.hidden * d.heads * d.dv);
  return p;
}

std::vector<std::pair<const char*, const std::vector<float>*>> MlaBlockParams::list() const {
  std::vector<std::pair<const char*, const std::vector<float>*>> out;
  if (!q_a.empty()) {
    out.emplace_back("q_a", &q_a);
    out.emplace_back("q_a_norm", &q_a_norm);
    out.emplace_back("q_b", &q_b);
  } else {
    out.emplace_back("q_proj", &q_proj);
  }
  out.emplace_back("kv_a", &kv_a);
  out.emplace_back("kv_a_norm", &kv_a_norm);
  out.emplace_back("kv_b", &kv_b);
  out.emplace_back("o", &o);
  return out;
}

std::vector<std::pair<const char*, std::vector<float>*>> MlaBlockParams::list() {
  std::vector<std::pair<const char*, std::vector<float>*>> out;
  for (const auto& [name, v] : std::as_const(*this).list())
    out.emplace_back(name, const_cast<std::vector<float>*>(v));
  return out;
}

namespace {

using Vec = std::vector<float>;

Vec zeros(int64_t n) {
  return Vec(static_cast<size_t>(n), 0.0f);
}

std::vector<bf16> to_bf16_vec(const Vec& v) {
  std::vector<bf16> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = to_bf16(v[i]);
  return out;
}
Vec to_f32_vec(const std::vector<bf16>& v) {
  Vec out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = to_float(v[i]);
  return out;
}

struct Ctx {
  const MlaBlockDims& d;
  bool gpu;
  void round(Vec& v) const {
    if (gpu)
      for (float& e : v) e = round_to_bf16(e);
  }
  LinearOptions lin(bool pow2) const {
    LinearOptions o;
    o.precision = gpu ? Precision::kFp8 : Precision::kFp32;
    o.pow2_activation_scales = pow2;
    return o;
  }
  // y [rows, n] = x [rows, k] W^T; the cache for backward.
  Vec linear(const Vec& x, int64_t rows, const Vec& w, int64_t n, int64_t k, bool pow2,
             LinearCache* cache) const {
    Vec y = zeros(rows * n);
    linear_forward(lin(pow2), x.data(), rows, w.data(), n, k, y.data(), cache);
    return y;  // kFp8: already BF16 values
  }
  Vec linear_back(const LinearCache& cache, const Vec& w, const Vec& dy, bool pow2, Vec& dw) const {
    Vec dx = zeros(cache.m * cache.k);
    linear_backward(lin(pow2), cache, w.data(), dy.data(), dx.data(), dw.data());
    return dx;
  }
  // RMSNorm of x [rows, dim] (contiguous) -> y, rstd.
  Vec norm(const Vec& x, int64_t rows, int64_t dim, const Vec& w, Vec& rstd) const {
    Vec y = zeros(rows * dim);
    rstd.assign(static_cast<size_t>(rows), 0.0f);
    if (gpu) {
      const std::vector<bf16> xb = to_bf16_vec(x);
      std::vector<bf16> yb(y.size());
      kernels::rmsnorm_forward_reference(xb.data(), dim, w.data(), rows, dim, d.eps, yb.data(), dim,
                                         rstd.data());
      y = to_f32_vec(yb);
    } else {
      rmsnorm_forward(x.data(), w.data(), rows, dim, d.eps, y.data(), rstd.data());
    }
    return y;
  }
  Vec norm_back(const Vec& x, int64_t rows, int64_t dim, const Vec& w, const Vec& rstd,
                const Vec& dy, Vec& dw) const {
    Vec dx = zeros(rows * dim);
    if (gpu) {
      const std::vector<bf16> xb = to_bf16_vec(x), dyb = to_bf16_vec(dy);
      std::vector<bf16> dxb(dx.size());
      kernels::rmsnorm_backward_reference(dyb.data(), dim, xb.data(), dim, w.data(), rstd.data(),
                                          rows, dim, dxb.data(), dim, dw.data(), true);
      dx = to_f32_vec(dxb);
    } else {
      rmsnorm_backward(x.data(), w.data(), rstd.data(), dy.data(), rows, dim, dx.data(), dw.data());
    }
    return dx;
  }
};

void check_dims(const MlaBlockDims& d, MlaReferenceMode mode, const RopeTable& rope,
                const MlaBlockParams& w) {
  FM_CHECK_ARG(d.hidden > 0 && d.heads > 0 && d.kv_lora_rank > 0 && d.q_lora_rank >= 0 &&
                   d.dn > 0 && d.dr > 0 && d.dv > 0 && d.dr % 2 == 0,
               "mla_block_reference: bad dims");
  FM_CHECK_ARG(rope.dim == d.dr, "mla_block_reference: RoPE table dim ", rope.dim, " != dr ", d.dr);
  if (mode == MlaReferenceMode::kGpu)
    FM_CHECK_ARG(d.dn == kernels::kMlaNopeDim && d.dr == kernels::kMlaRopeDim &&
                     d.dv == kernels::kMlaValueDim,
                 "mla_block_reference (kGpu): the attention kernel's head dims are 128/64/128");
  const MlaBlockParams z = MlaBlockParams::zeros(d);
  const auto zl = z.list();
  const auto wl = w.list();
  FM_CHECK_ARG(zl.size() == wl.size(), "mla_block_reference: parameter set does not match dims");
  for (size_t i = 0; i < zl.size(); ++i)
    FM_CHECK_ARG(zl[i].second->size() == wl[i].second->size(), "mla_block_reference: ", zl[i].first,
                 " has ", wl[i].second->size(), " values, expected ", zl[i].second->size());
}

}  // namespace

void mla_block_reference(const MlaBlockDims& d, MlaReferenceMode mode, const RopeTable& rope,
                         const MlaBlockParams& w, const float* x_in, const int32_t* pos,
                         int64_t batch, int64_t seq, float* out, const float* dout_in, float* dx,
                         MlaBlockParams* grads) {
  check_dims(d, mode, rope, w);
  FM_CHECK_ARG(batch > 0 && seq > 0, "mla_block_reference: batch and seq must be positive");
  const Ctx c{d, mode == MlaReferenceMode::kGpu};
  const int64_t T = batch * seq, H = d.heads, hid = d.hidden, qr = d.q_lora_rank;
  const int64_t kvr = d.kv_lora_rank, dn = d.dn, dr = d.dr, dv = d.dv, qd = d.qd(), kvd = d.kvd(),
                kr = kvr + dr;
  for (int64_t t = 0; t < T; ++t)
    FM_CHECK_ARG(pos[t] >= 0 && pos[t] < rope.positions, "mla_block_reference: pos[", t,
                 "] = ", pos[t], " outside the RoPE table");

  // ---- forward ----
  Vec x(x_in, x_in + T * hid);
  c.round(x);
  LinearCache c_qa, c_qb, c_q, c_kva, c_kvb, c_o;
  Vec cq, cqn, rstd_q, q;
  if (qr > 0) {
    cq = c.linear(x, T, w.q_a, qr, hid, false, &c_qa);
    cqn = c.norm(cq, T, qr, w.q_a_norm, rstd_q);
    q = c.linear(cqn, T, w.q_b, H * qd, qr, false, &c_qb);
  } else {
    q = c.linear(x, T, w.q_proj, H * qd, hid, false, &c_q);
  }
  const Vec kva = c.linear(x, T, w.kv_a, kr, hid, false, &c_kva);
  Vec ckv = zeros(T * kvr), kpe = zeros(T * dr), rstd_kv;
  for (int64_t t = 0; t < T; ++t) {
    std::copy_n(kva.data() + t * kr, kvr, ckv.data() + t * kvr);
    std::copy_n(kva.data() + t * kr + kvr, dr, kpe.data() + t * dr);
  }
  const Vec ckvn = c.norm(ckv, T, kvr, w.kv_a_norm, rstd_kv);
  const Vec kv = c.linear(ckvn, T, w.kv_b, H * kvd, kvr, false, &c_kvb);
  for (int64_t t = 0; t < T; ++t) {
    rope_apply(rope, kpe.data() + t * dr, pos[t], false);
    for (int64_t h = 0; h < H; ++h)
      rope_apply(rope, q.data() + (t * H + h) * qd + dn, pos[t], false);
  }
  c.round(kpe);
  c.round(q);

  const kernels::MlaAttentionShape shape{batch, seq, H};
  Vec attn = zeros(T * H * dv), probs, lse;
  if (c.gpu) {
    const std::vector<bf16> qb = to_bf16_vec(q), kvb = to_bf16_vec(kv), kpb = to_bf16_vec(kpe);
    std::vector<bf16> ab(attn.size());
    lse = zeros(H * T);
    kernels::mla_attention_forward_reference(qb.data(), kvb.data(), kpb.data(), shape, d.scale,
                                             ab.data(), lse.data());
    attn = to_f32_vec(ab);
  } else {
    probs = zeros(batch * H * seq * seq);
    Vec scratch(static_cast<size_t>(seq));
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t s = 0; s < seq; ++s)
          attend_row(q.data() + ((b * seq + s) * H + h) * qd,
                     kv.data() + b * seq * H * kvd + h * kvd, H * kvd, kpe.data() + b * seq * dr,
                     s + 1, dn, dr, dv, d.scale, scratch.data(),
                     probs.data() + ((b * H + h) * seq + s) * seq,
                     attn.data() + ((b * seq + s) * H + h) * dv);
  }
  const Vec y = c.linear(attn, T, w.o, hid, H * dv, true, &c_o);
  std::copy(y.begin(), y.end(), out);
  if (dout_in == nullptr) return;

  // ---- backward ----
  FM_CHECK_ARG(dx != nullptr && grads != nullptr, "mla_block_reference: dx and grads needed");
  check_dims(d, mode, rope, *grads);
  Vec dout(dout_in, dout_in + T * hid);
  c.round(dout);
  const Vec dattn = c.linear_back(c_o, w.o, dout, true, grads->o);
  Vec dq = zeros(T * H * qd), dkv = zeros(T * H * kvd), dkpe = zeros(T * dr);
  if (c.gpu) {
    const std::vector<bf16> qb = to_bf16_vec(q), kvb = to_bf16_vec(kv), kpb = to_bf16_vec(kpe),
                            ab = to_bf16_vec(attn), dab = to_bf16_vec(dattn);
    std::vector<bf16> dqb(dq.size()), dkvb(dkv.size());
    kernels::mla_attention_backward_reference(qb.data(), kvb.data(), kpb.data(), ab.data(),
                                              dab.data(), lse.data(), shape, d.scale, dqb.data(),
                                              dkvb.data(), dkpe.data());
    dq = to_f32_vec(dqb);
    dkv = to_f32_vec(dkvb);
    c.round(dkpe);
  } else {
    // FP32: dV = P^T dO; dP = dO V^T; dS = P (dP - rowsum(P dP)) scale; dQ = dS K; dK = dS^T Q.
    Vec dp(static_cast<size_t>(seq));
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t s = 0; s < seq; ++s) {
          const int64_t t = b * seq + s;
          const float* p = probs.data() + ((b * H + h) * seq + s) * seq;
          const float* go = dattn.data() + (t * H + h) * dv;
          double rowsum = 0;
          for (int64_t s2 = 0; s2 <= s; ++s2) {
            const float* v = kv.data() + ((b * seq + s2) * H + h) * kvd + dn;
            double acc = 0;
            for (int64_t i = 0; i < dv; ++i) acc += static_cast<double>(go[i]) * v[i];
            dp[s2] = static_cast<float>(acc);
            rowsum += static_cast<double>(p[s2]) * dp[s2];
          }
          const float* qv = q.data() + (t * H + h) * qd;
          float* gq = dq.data() + (t * H + h) * qd;
          for (int64_t s2 = 0; s2 <= s; ++s2) {
            const int64_t t2 = b * seq + s2;
            const float* kn = kv.data() + (t2 * H + h) * kvd;
            const float* kp = kpe.data() + t2 * dr;
            float* gk = dkv.data() + (t2 * H + h) * kvd;
            float* gkp = dkpe.data() + t2 * dr;
            for (int64_t i = 0; i < dv; ++i) gk[dn + i] += p[s2] * go[i];
            const float ds =
                static_cast<float>(p[s2] * (dp[s2] - rowsum) * static_cast<double>(d.scale));
            for (int64_t i = 0; i < dn; ++i) {
              gq[i] += ds * kn[i];
              gk[i] += ds * qv[i];
            }
            for (int64_t i = 0; i < dr; ++i) {
              gq[dn + i] += ds * kp[i];
              gkp[i] += ds * qv[dn + i];
            }
          }
        }
  }
  // The inverse RoPE (the rotation's transpose) on dk_pe and each head's dq_pe.
  Vec dkva = zeros(T * kr);
  for (int64_t t = 0; t < T; ++t) {
    rope_apply(rope, dkpe.data() + t * dr, pos[t], true);
    for (int64_t h = 0; h < H; ++h)
      rope_apply(rope, dq.data() + (t * H + h) * qd + dn, pos[t], true);
  }
  c.round(dkpe);
  c.round(dq);
  const Vec dckvn = c.linear_back(c_kvb, w.kv_b, dkv, false, grads->kv_b);
  const Vec dckv = c.norm_back(ckv, T, kvr, w.kv_a_norm, rstd_kv, dckvn, grads->kv_a_norm);
  for (int64_t t = 0; t < T; ++t) {
    std::copy_n(dckv.data() + t * kvr, kvr, dkva.data() + t * kr);
    std::copy_n(dkpe.data() + t * dr, dr, dkva.data() + t * kr + kvr);
  }
  Vec gx = c.linear_back(c_kva, w.kv_a, dkva, false, grads->kv_a);
  Vec gx2;
  if (qr > 0) {
    const Vec dcqn = c.linear_back(c_qb, w.q_b, dq, false, grads->q_b);
    const Vec dcq = c.norm_back(cq, T, qr, w.q_a_norm, rstd_q, dcqn, grads->q_a_norm);
    gx2 = c.linear_back(c_qa, w.q_a, dcq, false, grads->q_a);
  } else {
    gx2 = c.linear_back(c_q, w.q_proj, dq, false, grads->q_proj);
  }
  for (size_t i = 0; i < gx.size(); ++i) gx[i] += gx2[i];
  c.round(gx);
  std::copy(gx.begin(), gx.end(), dx);
}

}  // namespace fp8moe
