// MlaBlockGpu (fp8moe/model/mla_block_gpu.h): the MLA block as a sequence of the device-tested
// pieces, plus two elementwise kernels of its own (dk_pe FP32 -> BF16 into kv_a's gradient
// columns, and the two input branches' dx sum).
#include "fp8moe/model/mla_block_gpu.h"

#include <cuda_runtime.h>

#include <algorithm>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/kernels/mla_absorb.h"
#include "fp8moe/kernels/mla_attention.h"
#include "fp8moe/kernels/rmsnorm.h"

namespace fp8moe {
namespace {

int64_t round_up(int64_t v, int64_t to) {
  return (v + to - 1) / to * to;
}

// dst[t * ld_dst + i] = bf16(src[t * dim + i]) (round to nearest even), i < dim.
__global__ void f32_to_bf16_rows_kernel(const float* src, int64_t rows, int64_t dim, bf16* dst,
                                        int64_t ld_dst) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * dim) return;
  const int64_t r = i / dim, c = i % dim;
  dst[r * ld_dst + c] = to_bf16(src[i]);
}

// a[i] = bf16(float(a[i]) + float(b[i])).
__global__ void add_bf16_kernel(bf16* a, const bf16* b, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  a[i] = to_bf16(to_float(a[i]) + to_float(b[i]));
}

unsigned blocks_for(int64_t n, int threads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}

}  // namespace

class MlaProjection {
 public:
  MlaProjection(int64_t max_rows, int64_t n, int64_t k, bool pow2, bool bf16) {
    if (bf16) {
      bf16_ = std::make_unique<LinearBf16Gpu>(max_rows, n, k);
    } else {
      w_ = std::make_unique<LinearWeightsDevice>(n, k);
      fp8_ = std::make_unique<LinearFp8Gpu>(max_rows, n, k, LinearGpuOptions{pow2});
    }
  }
  void refresh(const float* master, cudaStream_t stream) {
    if (bf16_)
      bf16_->refresh_weight(master, stream);
    else
      w_->refresh(master, stream);
  }
  void forward(const bf16* x, int64_t m, bf16* y, cudaStream_t stream) {
    if (bf16_)
      bf16_->forward(x, m, y, stream);
    else
      fp8_->forward(x, m, w_->view(), y, stream);
  }
  // The FP8 Fprop form (the latent decode's absorbed products read it); null in BF16 mode.
  const LinearWeightsDevice* fp8_weights() const { return w_.get(); }
  void backward(const bf16* dy, bf16* dx, float* dw, cudaStream_t stream,
                kernels::WgradOutput out) {
    if (bf16_)
      bf16_->backward(dy, dx, dw, stream, out);
    else
      fp8_->backward(dy, w_->view(), dx, dw, stream, out);
  }

 private:
  std::unique_ptr<LinearWeightsDevice> w_;
  std::unique_ptr<LinearFp8Gpu> fp8_;
  std::unique_ptr<LinearBf16Gpu> bf16_;
};

MlaBlockGpu::MlaBlockGpu(const MlaBlockDims& dims, int64_t max_tokens, const RopeTableView& rope,
                         MlaBlockGpuOptions options)
    : d_(dims), max_tokens_(max_tokens), rope_(rope) {
  const int64_t H = d_.heads, qr = d_.q_lora_rank, kvr = d_.kv_lora_rank, hid = d_.hidden;
  FM_CHECK_ARG(max_tokens > 0, "MlaBlockGpu: max_tokens=", max_tokens, " must be positive");
  FM_CHECK_ARG(H > 0, "MlaBlockGpu: heads=", H, " must be positive");
  FM_CHECK_ARG(d_.dn == kernels::kMlaNopeDim && d_.dr == kernels::kMlaRopeDim &&
                   d_.dv == kernels::kMlaValueDim,
               "MlaBlockGpu: head dims dn/dr/dv = ", d_.dn, "/", d_.dr, "/", d_.dv,
               ", the attention kernel's are 128/64/128");
  FM_CHECK_ARG(hid > 0 && hid % 128 == 0, "MlaBlockGpu: hidden=", hid,
               " must be a positive multiple of 128");
  FM_CHECK_ARG(qr >= 0 && qr % 128 == 0, "MlaBlockGpu: q_lora_rank=", qr,
               " must be 0 or a multiple of 128");
  FM_CHECK_ARG(kvr > 0 && kvr % 128 == 0, "MlaBlockGpu: kv_lora_rank=", kvr,
               " must be a positive multiple of 128");
  FM_CHECK_ARG(rope.cos != nullptr && rope.sin != nullptr && rope.dim == d_.dr,
               "MlaBlockGpu: the RoPE table must be on the device with dim ", d_.dr, " (got ",
               rope.dim, ")");
  const int64_t T = max_tokens, qd = d_.qd(), kvd = d_.kvd(), dv = d_.dv, kr = kvr + d_.dr;
  const bool b16 = options.bf16_projections;
  if (qr > 0) {
    q_a_ = std::make_unique<MlaProjection>(T, qr, hid, false, b16);
    q_b_ = std::make_unique<MlaProjection>(T, H * qd, qr, false, b16);
  } else {
    q_proj_ = std::make_unique<MlaProjection>(T, H * qd, hid, false, b16);
  }
  kv_a_ = std::make_unique<MlaProjection>(T, kr, hid, false, b16);
  kv_b_ = std::make_unique<MlaProjection>(T, H * kvd, kvr, false, b16);
  // NOTE: o_proj's input (the attention output) with power-of-two scales, as the CPU model's.
  o_ = std::make_unique<MlaProjection>(T, hid, H * dv, true, b16);

  const kernels::MlaAttentionShape shape{1, T, H};
  attn_ws_bytes_ = kernels::mla_attention_backward_workspace_bytes(shape);
  // The norms' dw chunks: rmsnorm_plan(rows, dim).chunks <= min(rows, kDwChunksTarget).
  const int64_t norm_ws_floats =
      std::min<int64_t>(T, kernels::RmsNormPlan::kDwChunksTarget) * std::max(qr, kvr);
  // One allocation, 256-byte aligned slots.
  struct Slot {
    void** ptr;
    int64_t bytes;
  };
  const int64_t b2 = sizeof(bf16), b4 = sizeof(float);
  const Slot slots[] = {
      {reinterpret_cast<void**>(&cq_), T * qr * b2},
      {reinterpret_cast<void**>(&cqn_), T * qr * b2},
      {reinterpret_cast<void**>(&q_), T * H * qd * b2},
      {reinterpret_cast<void**>(&kva_), T * kr * b2},
      {reinterpret_cast<void**>(&ckvn_), T * kvr * b2},
      {reinterpret_cast<void**>(&kv_), T * H * kvd * b2},
      {reinterpret_cast<void**>(&kpe_), T * d_.dr * b2},
      {reinterpret_cast<void**>(&attn_), T * H * dv * b2},
      {reinterpret_cast<void**>(&rstd_q_), T * b4},
      {reinterpret_cast<void**>(&rstd_kv_), T * b4},
      {reinterpret_cast<void**>(&lse_), H * T * b4},
      {reinterpret_cast<void**>(&dattn_), T * H * dv * b2},
      {reinterpret_cast<void**>(&dq_), T * H * qd * b2},
      {reinterpret_cast<void**>(&dkv_), T * H * kvd * b2},
      {reinterpret_cast<void**>(&dkva_), T * kr * b2},
      {reinterpret_cast<void**>(&dckvn_), T * kvr * b2},
      {reinterpret_cast<void**>(&dcqn_), T * qr * b2},
      {reinterpret_cast<void**>(&dcq_), T * qr * b2},
      {reinterpret_cast<void**>(&dx2_), T * hid * b2},
      {reinterpret_cast<void**>(&dkpe_), T * d_.dr * b4},
      {reinterpret_cast<void**>(&norm_ws_), norm_ws_floats * b4},
      {&attn_ws_, static_cast<int64_t>(attn_ws_bytes_)},
  };
  int64_t total = 0;
  for (const Slot& s : slots) total += round_up(std::max<int64_t>(s.bytes, 1), 256);
  FM_CHECK_CUDA(cudaMalloc(&buffer_, static_cast<size_t>(total)));
  char* p = static_cast<char*>(buffer_);
  for (const Slot& s : slots) {
    *s.ptr = p;
    p += round_up(std::max<int64_t>(s.bytes, 1), 256);
  }
}

MlaBlockGpu::~MlaBlockGpu() {
  if (buffer_ != nullptr) cudaFree(buffer_);
  if (decode_buffer_ != nullptr) cudaFree(decode_buffer_);
}

MlaBlockSavedGpu MlaBlockGpu::saved() const {
  return MlaBlockSavedGpu{cq_,  cqn_,   q_,  kva_, ckvn_, kv_,    kpe_,  attn_, rstd_q_, rstd_kv_,
                          lse_, dattn_, dq_, dkv_, dkva_, dckvn_, dcqn_, dcq_,  dkpe_};
}

void MlaBlockGpu::refresh(const MlaBlockMastersGpu& m, cudaStream_t stream) {
  const bool lora = d_.q_lora_rank > 0;
  FM_CHECK_ARG(m.kv_a && m.kv_a_norm && m.kv_b && m.o, "MlaBlockGpu::refresh: null master");
  FM_CHECK_ARG(lora ? (m.q_a && m.q_a_norm && m.q_b) : (m.q_proj != nullptr),
               "MlaBlockGpu::refresh: null q master (q_lora_rank=", d_.q_lora_rank, ")");
  if (lora) {
    q_a_->refresh(m.q_a, stream);
    q_b_->refresh(m.q_b, stream);
  } else {
    q_proj_->refresh(m.q_proj, stream);
  }
  kv_a_->refresh(m.kv_a, stream);
  kv_b_->refresh(m.kv_b, stream);
  o_->refresh(m.o, stream);
  masters_ = m;
  refreshed_ = true;
}

// Both forms' first step: the query (q_a -> q_a_layernorm -> q_b, or q_proj) into q_, kv_a into
// kva_, its latent normed into ckvn_ (RoPE not yet applied).
void MlaBlockGpu::project(const bf16* x, int64_t T, cudaStream_t stream) {
  const int64_t qr = d_.q_lora_rank, kvr = d_.kv_lora_rank, kr = kvr + d_.dr;
  if (qr > 0) {
    q_a_->forward(x, T, cq_, stream);
    kernels::rmsnorm_forward(cq_, qr, masters_.q_a_norm, T, qr, d_.eps, cqn_, qr, rstd_q_, stream);
    q_b_->forward(cqn_, T, q_, stream);
  } else {
    q_proj_->forward(x, T, q_, stream);
  }
  kv_a_->forward(x, T, kva_, stream);
  kernels::rmsnorm_forward(kva_, kr, masters_.kv_a_norm, T, kvr, d_.eps, ckvn_, kvr, rstd_kv_,
                           stream);
}

void MlaBlockGpu::forward(const bf16* x, const int32_t* pos, int64_t batch, int64_t seq, bf16* out,
                          uint32_t* status, cudaStream_t stream) {
  FM_CHECK_ARG(refreshed_, "MlaBlockGpu::forward: refresh() the weights first");
  FM_CHECK_ARG(batch > 0 && seq > 0, "MlaBlockGpu::forward: batch=", batch, " seq=", seq,
               " must be positive");
  FM_CHECK_ARG(batch <= max_tokens_ / seq, "MlaBlockGpu::forward: batch * seq = ", batch * seq,
               " exceeds max_tokens=", max_tokens_);
  FM_CHECK_ARG(x != nullptr && pos != nullptr && out != nullptr,
               "MlaBlockGpu::forward: null pointer");
  const int64_t T = batch * seq, H = d_.heads, kvr = d_.kv_lora_rank;
  const int64_t kr = kvr + d_.dr;
  project(x, T, stream);
  kv_b_->forward(ckvn_, T, kv_, stream);
  rope_apply_qk_gpu(rope_, q_, T, H, d_.qd(), kva_ + kvr, kr, pos, false, status, stream);
  FM_CHECK_CUDA(cudaMemcpy2DAsync(kpe_, d_.dr * sizeof(bf16), kva_ + kvr, kr * sizeof(bf16),
                                  d_.dr * sizeof(bf16), T, cudaMemcpyDeviceToDevice, stream));
  const kernels::MlaAttentionShape shape{batch, seq, H};
  kernels::mla_attention_forward(q_, kv_, kpe_, shape, d_.scale, attn_, lse_, stream);
  o_->forward(attn_, T, out, stream);
  batch_ = batch;
  seq_ = seq;
  pos_ = pos;
}

void MlaBlockGpu::backward(const bf16* dout, bf16* dx, const MlaBlockGradsGpu& g, uint32_t* status,
                           cudaStream_t stream, kernels::WgradOutput grad_output) {
  FM_CHECK_ARG(batch_ > 0, "MlaBlockGpu::backward: no forward to differentiate");
  FM_CHECK_ARG(dout != nullptr && dx != nullptr && dout != dx,
               "MlaBlockGpu::backward: dout and dx must be distinct device buffers");
  const bool lora = d_.q_lora_rank > 0;
  FM_CHECK_ARG(g.kv_a && g.kv_a_norm && g.kv_b && g.o &&
                   (lora ? (g.q_a && g.q_a_norm && g.q_b) : (g.q_proj != nullptr)),
               "MlaBlockGpu::backward: null gradient");
  const int64_t T = batch_ * seq_, H = d_.heads, qr = d_.q_lora_rank, kvr = d_.kv_lora_rank;
  const int64_t kr = kvr + d_.dr, hid = d_.hidden;
  const bool acc = grad_output == kernels::WgradOutput::kAccumulate;
  o_->backward(dout, dattn_, g.o, stream, grad_output);
  const kernels::MlaAttentionShape shape{batch_, seq_, H};
  kernels::mla_attention_backward(q_, kv_, kpe_, attn_, dattn_, lse_, shape, d_.scale, dq_, dkv_,
                                  dkpe_, attn_ws_, attn_ws_bytes_, stream);
  f32_to_bf16_rows_kernel<<<blocks_for(T * d_.dr, 256), 256, 0, stream>>>(dkpe_, T, d_.dr,
                                                                          dkva_ + kvr, kr);
  FM_CHECK_CUDA(cudaGetLastError());
  rope_apply_qk_gpu(rope_, dq_, T, H, d_.qd(), dkva_ + kvr, kr, pos_, true, status, stream);
  kv_b_->backward(dkv_, dckvn_, g.kv_b, stream, grad_output);
  kernels::rmsnorm_backward(dckvn_, kvr, kva_, kr, masters_.kv_a_norm, rstd_kv_, T, kvr, dkva_, kr,
                            g.kv_a_norm, acc, norm_ws_, stream);
  kv_a_->backward(dkva_, dx, g.kv_a, stream, grad_output);
  if (lora) {
    q_b_->backward(dq_, dcqn_, g.q_b, stream, grad_output);
    kernels::rmsnorm_backward(dcqn_, qr, cq_, qr, masters_.q_a_norm, rstd_q_, T, qr, dcq_, qr,
                              g.q_a_norm, acc, norm_ws_, stream);
    q_a_->backward(dcq_, dx2_, g.q_a, stream, grad_output);
  } else {
    q_proj_->backward(dq_, dx2_, g.q_proj, stream, grad_output);
  }
  add_bf16_kernel<<<blocks_for(T * hid, 256), 256, 0, stream>>>(dx, dx2_, T * hid);
  FM_CHECK_CUDA(cudaGetLastError());
}

void MlaBlockGpu::reserve_decode(int64_t max_tokens, bool tensor_core_products) {
  FM_CHECK_ARG(max_tokens > 0 && max_tokens <= max_tokens_,
               "MlaBlockGpu::reserve_decode: ", max_tokens,
               " tokens outside [1, max_tokens=", max_tokens_, "]");
  FM_CHECK_ARG(kv_b_->fp8_weights() != nullptr,
               "MlaBlockGpu::reserve_decode: the latent decode needs the FP8 projections");
  tensor_core_products_ = tensor_core_products;
  if (max_tokens <= decode_tokens_) return;
  if (decode_buffer_ != nullptr) FM_CHECK_CUDA(cudaFree(decode_buffer_));
  const int64_t T = max_tokens, H = d_.heads, kvr = d_.kv_lora_rank;
  const int64_t q_bytes = round_up(T * H * (kvr + d_.dr) * 2, 256);
  const int64_t o_bytes = round_up(T * H * kvr * 2, 256);
  FM_CHECK_CUDA(cudaMalloc(&decode_buffer_, static_cast<size_t>(q_bytes + o_bytes + T * H * 4)));
  q_lat_ = static_cast<bf16*>(decode_buffer_);
  o_lat_ = reinterpret_cast<bf16*>(static_cast<char*>(decode_buffer_) + q_bytes);
  decode_lse_ = reinterpret_cast<float*>(static_cast<char*>(decode_buffer_) + q_bytes + o_bytes);
  decode_tokens_ = max_tokens;
}

kernels::MlaDecodeShape MlaBlockGpu::decode_shape(int64_t batch, int64_t queries,
                                                  const MlaLatentCacheView& cache) const {
  kernels::MlaDecodeShape s;
  s.batch = batch;
  s.queries = queries;
  s.heads = d_.heads;
  s.latent_dim = d_.kv_lora_rank;
  s.rope_dim = d_.dr;
  s.page_tokens = cache.page_tokens;
  s.max_pages = cache.max_pages;
  s.softmax_scale = d_.scale;
  return s;
}

void MlaBlockGpu::forward_decode(const bf16* x, const int32_t* pos, int64_t batch, int64_t queries,
                                 const MlaLatentCacheView& cache,
                                 const kernels::MlaDecodePlan& plan, void* workspace, bf16* out,
                                 uint32_t* status, cudaStream_t stream) {
  FM_CHECK_ARG(refreshed_, "MlaBlockGpu::forward_decode: refresh() the weights first");
  FM_CHECK_ARG(batch > 0 && queries > 0 && batch <= decode_tokens_ / queries,
               "MlaBlockGpu::forward_decode: batch * queries = ", batch, " * ", queries,
               " outside [1, reserve_decode's ", decode_tokens_, "]");
  FM_CHECK_ARG(x != nullptr && pos != nullptr && out != nullptr && cache.pages != nullptr,
               "MlaBlockGpu::forward_decode: null pointer");
  const int64_t T = batch * queries, H = d_.heads, kvr = d_.kv_lora_rank;
  const int64_t kr = kvr + d_.dr;
  project(x, T, stream);
  rope_apply_qk_gpu(rope_, q_, T, H, d_.qd(), kva_ + kvr, kr, pos, false, status, stream);
  kernels::mla_cache_append(ckvn_, kvr, kva_ + kvr, kr, batch, queries, kvr, d_.dr,
                            cache.page_table, cache.max_pages, cache.page_tokens, cache.seq_lens,
                            cache.pages, stream);
  const LinearWeightsGpu w = kv_b_->fp8_weights()->view();
  kernels::MlaAbsorbDims ad;
  ad.heads = H;
  ad.nope_dim = d_.dn;
  ad.rope_dim = d_.dr;
  ad.value_dim = d_.dv;
  ad.latent_dim = kvr;
  if (tensor_core_products_)
    kernels::mla_absorb_query_tc(q_, T, ad, w.w, w.sw, q_lat_, stream);
  else
    kernels::mla_absorb_query(q_, T, ad, w.w, w.sw, q_lat_, stream);
  kernels::mla_decode(decode_shape(batch, queries, cache), plan, q_lat_, cache.pages,
                      cache.page_table, cache.seq_lens, o_lat_, decode_lse_, workspace, stream);
  if (tensor_core_products_)
    kernels::mla_unabsorb_output_tc(o_lat_, T, ad, w.w, w.sw, attn_, stream);
  else
    kernels::mla_unabsorb_output(o_lat_, T, ad, w.w, w.sw, attn_, stream);
  o_->forward(attn_, T, out, stream);
}

}  // namespace fp8moe
