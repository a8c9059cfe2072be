// The DeepSeek-V3-architecture model on the CPU: embedding, decoder blocks (RMSNorm, MLA
// attention with decoupled RoPE (queries through q_a_proj/q_a_layernorm/q_b_proj, or q_proj when
// q_lora_rank is 0/null), dense SwiGLU FFN for the first `first_k_dense_replace` layers,
// DeepSeekMoE after: shared experts + routed experts chosen by the router of moe/router.h),
// final RMSNorm, output head, and `num_nextn_predict_layers` multi-token-prediction modules
// that share the embedding and the head. Forward and backward for every part; a KV-cached
// forward for generation.
//
// Precision (linear.h): every linear layer of the blocks and of the MTP projections runs in the
// chosen precision; the embedding, the attention core, norms and gates run in FP32; the output
// head in BF16 for bf16/fp8 (FP32 for fp32). Parameter names follow the Hugging Face checkpoint.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "fp8moe/model/config.h"
#include "fp8moe/model/linear.h"

namespace fp8moe {

struct Parameter {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> value;
  std::vector<float> grad;   // same size as value (empty for buffers)
  bool weight_decay = true;  // false for norms
  int64_t numel() const { return static_cast<int64_t>(value.size()); }
};

struct LossReport {
  double loss = 0;  // main + mtp_weight * mean(mtp) + balance
  double main_loss = 0;
  std::vector<double> mtp_loss;  // one per MTP depth
  double balance_loss = 0;       // sequence-wise balance losses of all MoE blocks (seq_aux)
};

// Generation state: per main-model layer, what attention needs of every token seen so far, in
// one of two forms (docs/model/README.md, "Generation with a KV cache"):
//   expanded (the default of the Model API) as Hugging Face's cache holds it:
//     kv    [length, heads, qk_nope_head_dim + v_head_dim]  kv_b_proj's output (the per-head key
//           without RoPE, then the value), computed once per token in the model's precision;
//     k_pe  [length, qk_rope_head_dim]  the decoupled key, rotated at its position; one per token,
//           shared by all heads as in MLA (HF stores it once per head).
//   latent (what DeepSeek-V3's inference keeps; `fp8moe generate`'s default):
//     latent      [pages, page_tokens, kv_lora_rank + qk_rope_head_dim]  per token the
//                 kv_a_layernorm output c as kv_b_proj's input sees it in the model's precision
//                 (bf16: rounded to BF16; fp8: its 1x128 E4M3 round trip), then the rotated k_pe;
//     page_table  [pages]  token t lives in page page_table[t / page_tokens], row
//                 t % page_tokens; pages are appended as the cache grows.
//     kv_b is folded into the query (q_lat = W_UK^T q_nope) and the output (W_UV . out_lat),
//     with W as the model's precision sees it, and attention is kernels::mla_decode_reference.
// NOTE: the expanded form makes the cached forward compute exactly the same products as the full
// forward (kv_b in the recipe's precision on each token's latent), so cached and recomputed
// logits agree to the bit with this CPU model's row-independent GEMMs. The latent form
// re-associates those products (FP32, no BF16 rounding of the keys and values), so it equals
// them up to rounding only, for 57x less memory with V3's shape (576 floats a token and layer
// instead of 128 x (128 + 128) + 64 = 32,832).
enum class KvCacheForm { kExpanded, kLatent };
const char* kv_cache_form_name(KvCacheForm form);
KvCacheForm parse_kv_cache_form(const std::string& name);  // "expanded" | "latent"

struct KvCache {
  struct Layer {
    std::vector<float> kv, k_pe;      // expanded
    std::vector<float> latent;        // latent: the pages' rows
    std::vector<int32_t> page_table;  // latent
  };
  KvCacheForm form = KvCacheForm::kExpanded;
  int64_t page_tokens = 64;  // latent form: tokens a page
  std::vector<Layer> layers;
  int64_t length = 0;  // tokens cached; their positions are 0 .. length-1

  void clear() {  // keeps the form and the page size
    layers.clear();
    length = 0;
  }
  // Bytes held: expanded kv + k_pe; latent the allocated pages (whole pages: up to
  // page_tokens - 1 rows of slack per layer) plus the page table.
  int64_t bytes() const;
};

struct ModelImpl;

class Model {
 public:
  // Weights initialised from `seed` (normal(0, initializer_range), norms 1, router biases 0).
  Model(const ModelConfig& config, uint64_t seed);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const;
  std::deque<Parameter>& parameters();
  // Non-trained state: the router's selection bias of each MoE block
  // ("...mlp.gate.e_score_correction_bias").
  std::deque<Parameter>& buffers();
  int64_t parameter_count() const;

  // tokens: [batch, window] row-major, window = seq + num_nextn_predict_layers + 1. The main
  // model reads positions [0, seq) and predicts [1, seq]; MTP depth k predicts [k+1, seq+k].
  // With backward, gradients are ADDED to Parameter::grad.
  LossReport forward_backward(const int32_t* tokens, int64_t batch, int64_t window,
                              Precision precision, float mtp_weight, bool backward);

  // Tokens routed to each expert by the last forward, per MoE block (main blocks, then MTP).
  const std::vector<std::vector<int64_t>>& expert_load() const;

  // Logits [vocab] of the token after tokens[0, seq) (main model only), recomputing the whole
  // sequence.
  std::vector<float> next_token_logits(const int32_t* tokens, int64_t seq, Precision precision);
  // The same with a cache: tokens[0, n) are appended at positions cache.length ..
  // cache.length + n - 1 (a prompt at once, then one token per step) and the logits of the
  // token after the last are returned. Equals next_token_logits over all cached tokens: to the
  // bit in the expanded form, up to rounding in the latent form (KvCache).
  std::vector<float> next_token_logits(const int32_t* tokens, int64_t n, Precision precision,
                                       KvCache& cache);

  void zero_grad();

 private:
  std::unique_ptr<ModelImpl> impl_;
};

}  // namespace fp8moe
