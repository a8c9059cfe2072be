// ModelGpu (fp8moe/model/model_gpu.h): the CPU Model's forward_backward (src/model/model.cpp)
// composed from the device-tested pieces, plus three small kernels of its own (the token windows'
// per-depth ids, a BF16 add for the MTP chain's gradient, the LossGpu writer).
//
// Memory: the parameters' FP32 values (then the buffers') in one arena, their gradients in a
// second with the same offsets (tensors 256-byte aligned); activations and workspaces in a third,
// all allocated at construction. Per call: the layer inputs (num_hidden_layers + 1 BF16 [T, H]
// tensors, kept for the layers' backward), the final norm's output, (1 + depth) BF16 logits
// [T, vocab] (cross_entropy_gpu writes each one's dlogits over it: the main head's must survive the
// MTP forward), and per MTP depth its embedding, [T, 2H] concatenation, eh_proj output, block
// output and shared_head.norm output.
// Gradients: the whole gradient arena is zeroed (one cudaMemsetAsync) at the start of backward and
// every piece then ACCUMULATES (the lm_head and the embedding get 1 + depth contributions each,
// in the CPU's order: MTP depths last to first, then the main model). Cost: one write of 4 bytes
// per parameter (13 MB, ~5 us at ~3 TB/s, for the test config's 3.25 M parameters).
// The output head: one LinearBf16Gpu per use (main, each MTP depth: LinearBf16Gpu keeps its
// forward's input for its backward, and the main head's backward runs after the MTP depths'),
// all reading the main head's one BF16 copy of lm_head (share_weight).
#include "fp8moe/model/model_gpu.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <deque>
#include <map>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/kernels/rmsnorm.h"
#include "fp8moe/model/decoder_layer_gpu.h"
#include "fp8moe/model/linear_gpu.h"
#include "fp8moe/model/model_kernels_gpu.h"
#include "fp8moe/model/parameter_table.h"

namespace fp8moe {
namespace {

int64_t round_up(int64_t v, int64_t to) {
  return (v + to - 1) / to * to;
}
unsigned blocks_for(int64_t n, int threads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}

// ids[d * T + b * seq + s] = tokens[b * window + s + d], d < depths (the CPU's gather_ids(d)).
__global__ void gather_ids_kernel(const int32_t* tokens, int64_t batch, int64_t window, int64_t seq,
                                  int64_t depths, int32_t* ids) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t T = batch * seq;
  if (i >= depths * T) return;
  const int64_t d = i / T, t = i % T, b = t / seq, s = t % seq;
  ids[i] = tokens[b * window + s + d];
}

// a[i] = bf16(float(a[i]) + float(b[i])) (the CPU's add_into of the MTP chain's dh_next).
// dst[b] = src[b * queries + queries - 1] (rows of H): each sequence's last new token.
__global__ void last_rows_kernel(const bf16* src, int64_t batch, int64_t queries, int64_t H,
                                 bf16* dst) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch * H) return;
  const int64_t b = i / H;
  dst[i] = src[(b * queries + queries - 1) * H + i % H];
}

__global__ void add_bf16_kernel(bf16* a, const bf16* b, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  a[i] = to_bf16(to_float(a[i]) + to_float(b[i]));
}

// LossReport's arithmetic (Model::forward_backward): means over T rows, the MTP mean weighted.
__global__ void write_loss_kernel(const double* loss_sums, const double* balance, int depth,
                                  int64_t rows, float mtp_weight, LossGpu* out) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  const double main_loss = loss_sums[0] / static_cast<double>(rows);
  double mtp_sum = 0;
  for (int k = 0; k < LossGpu::kMaxMtpDepth; ++k) {
    const double l = k < depth ? loss_sums[1 + k] / static_cast<double>(rows) : 0.0;
    out->mtp_loss[k] = l;
    if (k < depth) mtp_sum += l;
  }
  double loss = main_loss + (depth > 0 ? mtp_weight * mtp_sum / static_cast<double>(depth) : 0.0);
  loss += *balance;
  out->loss = loss;
  out->main_loss = main_loss;
  out->balance_loss = *balance;
}

}  // namespace

struct ModelGpu::Impl {
  ModelConfig config;
  int64_t batch = 0, seq = 0, window = 0, T = 0, H = 0, V = 0, depth = 0, layers_n = 0;

  // Parameters: arenas and the lookup by name.
  std::vector<ParameterGpu> params, buffers;
  std::unordered_map<std::string, ParameterGpu*> by_name;
  float* values = nullptr;        // params then buffers
  float* grad_scratch = nullptr;  // the MoE layers' (DecoderLayerGpu::grad_scratch_floats)
  float* grads = nullptr;         // params only: the replicated tensors', then the sharded ones'
  size_t grad_bytes = 0;
  int64_t replicated_floats = 0;  // the arena's first run (the rest: sharded)
  ModelGpuParallel par;
  std::vector<FloatSpan> block_grads;  // per decoder block: its replicated gradients' run
  std::function<void(FloatSpan, cudaStream_t)> grad_ready;
  int64_t param_count = 0;

  ParameterGpu *embed = nullptr, *final_norm = nullptr, *lm_head = nullptr;
  struct MtpParams {
    ParameterGpu *enorm, *hnorm, *eh, *shared_norm;
  };
  std::vector<MtpParams> mtp_params;

  std::unique_ptr<RopeTableGpu> rope;
  std::vector<std::unique_ptr<DecoderLayerGpu>> layers;  // main, then the MTP blocks
  std::vector<DecoderLayerGpu*> moe_layers;              // expert_load's order
  bool low_latency_ep = false;                           // reserve_low_latency_ep ran
  // Its masked endpoints (one-rank groups, or the maker's) and the MoE layers over them, shared
  // by the decoder layers (destroyed before the decoder layers, the MoE layers before their
  // endpoints).
  std::vector<std::unique_ptr<comm::DeviceEpGroup>> ll_groups;
  std::vector<std::unique_ptr<comm::DeviceEpRank>> ll_ranks;
  std::vector<std::unique_ptr<comm::MoeLayerGpu>> ll_layers;
  std::vector<std::unique_ptr<LinearWeightsDevice>> eh_w;  // per depth
  std::vector<std::unique_ptr<LinearFp8Gpu>> eh;           // per depth
  std::vector<std::unique_ptr<LinearBf16Gpu>> heads;       // main, then per depth

  // Workspace (one allocation).
  void* ws = nullptr;
  int32_t* ids = nullptr;  // [depth + 2][T]
  int32_t* pos = nullptr;  // [T]
  bf16* hs = nullptr;      // [layers + 1][T, H]: the embedding, then each main layer's output
  bf16* hn = nullptr;      // final norm output [T, H]
  float* rstd_main = nullptr;
  bf16* logits = nullptr;  // [1 + depth][T, V]
  float* row_loss = nullptr;
  double* loss_sums = nullptr;  // [1 + depth]
  double* balance = nullptr;
  struct MtpActs {
    bf16 *e, *cat, *hp, *hk, *fk;
    float *rstd_e, *rstd_h, *rstd_f;
  };
  std::vector<MtpActs> mtp;
  bf16 *da = nullptr, *db = nullptr, *dh_next = nullptr, *dcat = nullptr;
  float* norm_ws = nullptr;
  void* emb_ws = nullptr;
  size_t emb_ws_bytes = 0;
  uint32_t* status = nullptr;

  bf16* h_layer(int64_t l) const { return hs + l * T * H; }
  bf16* logits_of(int64_t k) const { return logits + k * T * V; }  // 0 main, 1 + k MTP depth k
  const int32_t* ids_of(int64_t d) const { return ids + d * T; }

  ParameterGpu& lookup(const std::string& name) {
    auto it = by_name.find(name);
    FM_CHECK_ARG(it != by_name.end(), "ModelGpu: no parameter or buffer named '", name, "'");
    return *it->second;
  }

  ~Impl() {
    if (values != nullptr) cudaFree(values);
    if (grads != nullptr) cudaFree(grads);
    if (ws != nullptr) cudaFree(ws);
    if (grad_scratch != nullptr) cudaFree(grad_scratch);
  }
};

ModelGpu::ModelGpu(const ModelConfig& config, int64_t batch, int64_t seq,
                   const ModelGpuParallel& par, int64_t rope_positions)
    : impl_(std::make_unique<Impl>()) {
  config.validate();
  Impl& m = *impl_;
  m.config = config;
  const int64_t depth = config.num_nextn_predict_layers;
  FM_CHECK_ARG(batch > 0 && seq > 0, "ModelGpu: batch ", batch, " x seq ", seq, " holds no tokens");
  FM_CHECK_ARG(depth <= LossGpu::kMaxMtpDepth, "ModelGpu: num_nextn_predict_layers ", depth,
               " exceeds LossGpu::kMaxMtpDepth (", LossGpu::kMaxMtpDepth, ")");
  FM_CHECK_ARG(seq <= config.max_position_embeddings, "ModelGpu: seq ", seq,
               " exceeds max_position_embeddings ", config.max_position_embeddings);
  FM_CHECK_ARG(config.vocab_size % 8 == 0, "ModelGpu: vocab_size ", config.vocab_size,
               " is not a multiple of 8 (the logits' rows are 16-byte aligned)");
  FM_CHECK_ARG(config.hidden_size % 128 == 0, "ModelGpu: hidden_size ", config.hidden_size,
               " is not a multiple of 128 (eh_proj's FP8 reduction over 2 * hidden)");
  m.batch = batch;
  m.seq = seq;
  m.depth = depth;
  m.window = seq + depth + 1;
  m.T = batch * seq;
  m.H = config.hidden_size;
  m.V = config.vocab_size;
  m.layers_n = config.num_hidden_layers;
  const int64_t T = m.T, H = m.H, V = m.V;

  // Parameters and buffers: the CPU Model's table, 256-byte aligned slots (64 floats); under
  // expert parallelism only this rank's routed experts, placed after every replicated tensor.
  FM_CHECK_ARG(par.world >= 1 && par.rank >= 0 && par.rank < par.world, "ModelGpu: rank ", par.rank,
               " of ", par.world);
  FM_CHECK_ARG(par.world == 1 || par.make_ep_rank, "ModelGpu: ", par.world,
               " ranks need ModelGpuParallel::make_ep_rank");
  // The MoE blocks' layers (main, then the MTP modules'), in expert_load's order.
  std::vector<int64_t> moe_layer_ids;
  for (int64_t l = 0; l < config.num_hidden_layers + depth; ++l)
    if (config.is_moe_layer(l)) moe_layer_ids.push_back(l);
  const bool has_placements = !par.placements.empty();
  FM_CHECK_ARG(!has_placements || par.placements.size() == moe_layer_ids.size(),
               "ModelGpu: ", par.placements.size(), " expert placements for ", moe_layer_ids.size(),
               " MoE blocks");
  FM_CHECK_ARG(has_placements || config.n_routed_experts % par.world == 0,
               "ModelGpu: ", config.n_routed_experts, " routed experts do not split evenly over ",
               par.world, " ranks");
  m.par = par;
  // The routed experts this rank holds, per layer (several ranks): its share of the plain layout,
  // or with redundant experts the logical experts of its slots.
  std::map<int64_t, std::set<int64_t>> held;
  if (par.world > 1) {
    for (size_t b = 0; b < moe_layer_ids.size(); ++b) {
      std::set<int64_t>& h = held[moe_layer_ids[b]];
      if (has_placements) {
        for (int32_t e : par.placements[b].rank_slots(par.rank, par.world)) h.insert(e);
      } else {
        const int64_t local = config.n_routed_experts / par.world;
        for (int64_t e = par.rank * local; e < (par.rank + 1) * local; ++e) h.insert(e);
      }
    }
  }
  const ParameterTable table = model_parameter_table(config);
  // The routed expert a tensor belongs to ("model.layers.<l>.mlp.experts.<e>...."), -1 for every
  // other tensor; *layer: its l.
  auto expert_of = [](const std::string& name, int64_t* layer) -> int64_t {
    const std::string key = ".mlp.experts.";
    const size_t at = name.find(key);
    if (at == std::string::npos) return -1;
    const std::string lkey = "model.layers.";
    *layer = std::stoll(name.substr(lkey.size(), at - lkey.size()));
    return std::stoll(name.substr(at + key.size()));
  };
  struct Placed {
    const ParameterSpec* spec;
    int64_t index;
    bool sharded;
  };
  std::vector<Placed> kept;
  int64_t value_floats = 0, grad_floats = 0;
  for (int pass = 0; pass < 2; ++pass) {  // replicated tensors first, then the sharded experts
    for (size_t i = 0; i < table.parameters.size(); ++i) {
      int64_t layer = -1;
      const int64_t e = expert_of(table.parameters[i].name, &layer);
      const bool sharded = e >= 0 && par.world > 1;
      if (sharded != (pass == 1)) continue;
      if (sharded && held[layer].count(e) == 0) continue;
      kept.push_back({&table.parameters[i], static_cast<int64_t>(i), sharded});
      value_floats += round_up(table.parameters[i].numel(), 64);
    }
    if (pass == 0) {  // equal shares of the replicated run (the padding is never read)
      value_floats = round_up(value_floats, 64 * par.world);
      m.replicated_floats = value_floats;
    }
  }
  grad_floats = value_floats;
  for (const auto& s : table.buffers) value_floats += round_up(s.numel(), 64);
  FM_CHECK_CUDA(cudaMalloc(&m.values, static_cast<size_t>(value_floats) * sizeof(float)));
  FM_CHECK_CUDA(cudaMalloc(&m.grads, static_cast<size_t>(grad_floats) * sizeof(float)));
  m.grad_bytes = static_cast<size_t>(grad_floats) * sizeof(float);
  FM_CHECK_CUDA(cudaMemset(m.grads, 0, m.grad_bytes));
  int64_t off = 0;
  auto make = [&](const ParameterSpec& s, bool with_grad, int64_t index, bool sharded) {
    ParameterGpu p;
    p.name = s.name;
    p.shape = s.shape;
    p.numel = s.numel();
    p.weight_decay = s.weight_decay;
    p.value = m.values + off;
    p.grad = with_grad ? m.grads + off : nullptr;
    p.index = index;
    p.sharded = sharded;
    off += round_up(p.numel, 64);
    return p;
  };
  std::vector<ParameterGpu> placed;
  placed.reserve(kept.size());
  for (const Placed& k : kept) {
    if (k.sharded) off = std::max(off, m.replicated_floats);
    placed.push_back(make(*k.spec, true, k.index, k.sharded));
  }
  off = std::max(off, m.replicated_floats);  // the buffers after the padding too
  // parameters() in the CPU table's order (the arena's order differs under expert parallelism).
  std::vector<size_t> order(placed.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return placed[a].index < placed[b].index; });
  m.params.reserve(placed.size());
  for (size_t i : order) {
    m.params.push_back(placed[i]);
    m.param_count += m.params.back().numel;
  }
  // Each decoder block's replicated tensors (not the MTP modules' own enorm / hnorm / eh_proj /
  // shared_head) sit next to each other in the table, so their gradients form one run.
  m.block_grads.assign(static_cast<size_t>(m.layers_n + depth), FloatSpan{});
  {
    std::vector<int64_t> member_floats(m.block_grads.size(), 0);
    const std::string key = "model.layers.";
    for (const ParameterGpu& p : m.params) {
      if (p.sharded || p.name.rfind(key, 0) != 0) continue;
      const size_t dot = p.name.find('.', key.size());
      const int64_t l = std::stoll(p.name.substr(key.size(), dot - key.size()));
      const std::string rest = p.name.substr(dot + 1);
      if (rest.rfind("enorm.", 0) == 0 || rest.rfind("hnorm.", 0) == 0 ||
          rest.rfind("eh_proj.", 0) == 0 || rest.rfind("shared_head.", 0) == 0)
        continue;
      FloatSpan& b = m.block_grads[static_cast<size_t>(l)];
      const int64_t n = round_up(p.numel, 64);
      float* end = b.data == nullptr ? p.grad + n : std::max(b.data + b.count, p.grad + n);
      b.data = b.data == nullptr ? p.grad : std::min(b.data, p.grad);
      b.count = end - b.data;
      member_floats[static_cast<size_t>(l)] += n;
    }
    for (size_t l = 0; l < m.block_grads.size(); ++l)
      FM_CHECK(m.block_grads[l].count == member_floats[l], "ModelGpu: block ", l,
               "'s gradients are not one run of the arena");
  }
  m.buffers.reserve(table.buffers.size());
  for (size_t i = 0; i < table.buffers.size(); ++i)
    m.buffers.push_back(make(table.buffers[i], false, static_cast<int64_t>(i), false));
  for (auto& p : m.params) m.by_name[p.name] = &p;
  for (auto& p : m.buffers) m.by_name[p.name] = &p;
  m.embed = &m.lookup("model.embed_tokens.weight");
  m.final_norm = &m.lookup("model.norm.weight");
  m.lm_head = &m.lookup("lm_head.weight");
  for (int64_t k = 0; k < depth; ++k) {
    const std::string pre = "model.layers." + std::to_string(m.layers_n + k);
    m.mtp_params.push_back({&m.lookup(pre + ".enorm.weight"), &m.lookup(pre + ".hnorm.weight"),
                            &m.lookup(pre + ".eh_proj.weight"),
                            &m.lookup(pre + ".shared_head.norm.weight")});
  }

  // Workspace.
  const kernels::RmsNormPlan plan = kernels::rmsnorm_plan(T, H);
  m.emb_ws_bytes = embedding_backward_workspace_bytes(T, V);
  struct Slot {
    void** ptr;
    int64_t bytes;
  };
  std::vector<Slot> slots;
  auto slot = [&](auto** p, int64_t bytes) {
    slots.push_back({reinterpret_cast<void**>(p), bytes});
  };
  const int64_t act = T * H * 2;  // one BF16 [T, H]
  slot(&m.ids, (depth + 2) * T * 4);
  slot(&m.pos, T * 4);
  slot(&m.hs, (m.layers_n + 1) * act);
  slot(&m.hn, act);
  slot(&m.rstd_main, T * 4);
  slot(&m.logits, (1 + depth) * T * V * 2);
  slot(&m.row_loss, T * 4);
  slot(&m.loss_sums, (1 + depth) * 8);
  slot(&m.balance, 8);
  m.mtp.resize(static_cast<size_t>(depth));
  for (auto& a : m.mtp) {
    slot(&a.e, act);
    slot(&a.cat, 2 * act);
    slot(&a.hp, act);
    slot(&a.hk, act);
    slot(&a.fk, act);
    slot(&a.rstd_e, T * 4);
    slot(&a.rstd_h, T * 4);
    slot(&a.rstd_f, T * 4);
  }
  slot(&m.da, act);
  slot(&m.db, act);
  slot(&m.dh_next, act);
  slot(&m.dcat, 2 * act);
  slot(&m.norm_ws, plan.workspace_floats * 4);
  slot(&m.emb_ws, static_cast<int64_t>(m.emb_ws_bytes));
  slot(&m.status, 4);
  int64_t total = 0;
  for (const auto& s : slots) total += round_up(std::max<int64_t>(s.bytes, 1), 256);
  FM_CHECK_CUDA(cudaMalloc(&m.ws, static_cast<size_t>(total)));
  FM_CHECK_CUDA(cudaMemset(m.ws, 0, static_cast<size_t>(total)));
  {
    char* p = static_cast<char*>(m.ws);
    for (const auto& s : slots) {
      *s.ptr = p;
      p += round_up(std::max<int64_t>(s.bytes, 1), 256);
    }
  }
  {
    std::vector<int32_t> pos(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) pos[t] = static_cast<int32_t>(t % seq);
    FM_CHECK_CUDA(cudaMemcpy(m.pos, pos.data(), pos.size() * 4, cudaMemcpyHostToDevice));
  }

  // Pieces.
  m.rope = std::make_unique<RopeTableGpu>(make_rope_table(config.qk_rope_head_dim,
                                                          std::max(seq, rope_positions),
                                                          config.rope_theta, config.rope_scaling));
  const ParameterLookup lookup = [&m](const std::string& name) -> ParameterGpu& {
    return m.lookup(name);
  };
  // One gradient scratch for every MoE layer: a layer uses it inside its own backward only.
  bool any_moe = false;
  for (int64_t l = 0; l < m.layers_n + depth; ++l) any_moe = any_moe || config.is_moe_layer(l);
  if (any_moe) {
    const int64_t floats = DecoderLayerGpu::grad_scratch_floats(config, par.world);
    FM_CHECK_CUDA(cudaMalloc(&m.grad_scratch, static_cast<size_t>(floats) * sizeof(float)));
  }
  for (int64_t l = 0; l < m.layers_n + depth; ++l) {
    const bool moe = config.is_moe_layer(l);
    const int block = static_cast<int>(m.moe_layers.size());
    EpRankMaker make_ep;
    if (par.world > 1)
      make_ep = [&m, block](const comm::EpConfig& cfg) { return m.par.make_ep_rank(block, cfg); };
    const ExpertPlacement* placement =
        moe && has_placements ? &par.placements[static_cast<size_t>(block)] : nullptr;
    m.layers.push_back(std::make_unique<DecoderLayerGpu>(
        config, "model.layers." + std::to_string(l), moe, batch, seq, m.rope->view(), lookup,
        par.world, make_ep, moe ? m.grad_scratch : nullptr, placement));
    if (moe) m.moe_layers.push_back(m.layers.back().get());
  }
  for (int64_t k = 0; k < depth; ++k) {
    m.eh_w.push_back(std::make_unique<LinearWeightsDevice>(H, 2 * H));
    m.eh.push_back(std::make_unique<LinearFp8Gpu>(T, H, 2 * H));
  }
  for (int64_t k = 0; k < 1 + depth; ++k) {
    m.heads.push_back(std::make_unique<LinearBf16Gpu>(T, V, H));
    if (k > 0) m.heads.back()->share_weight(*m.heads[0]);  // one BF16 copy of lm_head
  }
  FM_CHECK_CUDA(cudaDeviceSynchronize());
}

ModelGpu::~ModelGpu() = default;

const ModelConfig& ModelGpu::config() const {
  return impl_->config;
}
int64_t ModelGpu::batch() const {
  return impl_->batch;
}
int64_t ModelGpu::seq() const {
  return impl_->seq;
}
int64_t ModelGpu::window() const {
  return impl_->window;
}
std::vector<ParameterGpu>& ModelGpu::parameters() {
  return impl_->params;
}
std::vector<ParameterGpu>& ModelGpu::buffers() {
  return impl_->buffers;
}
int64_t ModelGpu::parameter_count() const {
  return impl_->param_count;
}
int ModelGpu::moe_blocks() const {
  return static_cast<int>(impl_->moe_layers.size());
}
std::vector<int64_t> ModelGpu::expert_load_totals() const {
  const int64_t E = impl_->config.n_routed_experts;
  std::vector<unsigned long long> raw(static_cast<size_t>(E));
  std::vector<int64_t> out;
  out.reserve(impl_->moe_layers.size() * static_cast<size_t>(E));
  for (DecoderLayerGpu* layer : impl_->moe_layers) {
    FM_CHECK_CUDA(
        cudaMemcpy(raw.data(), layer->expert_load_total(), raw.size() * 8, cudaMemcpyDeviceToHost));
    for (unsigned long long v : raw) out.push_back(static_cast<int64_t>(v));
  }
  return out;
}

void ModelGpu::reset_expert_load_totals(cudaStream_t stream) {
  const int64_t E = impl_->config.n_routed_experts;
  for (DecoderLayerGpu* layer : impl_->moe_layers)
    FM_CHECK_CUDA(
        cudaMemsetAsync(layer->expert_load_total(), 0, static_cast<size_t>(E) * 8, stream));
}

int32_t* ModelGpu::expert_load(int block) const {
  FM_CHECK_ARG(block >= 0 && block < moe_blocks(), "ModelGpu::expert_load: block ", block,
               " outside [0, ", moe_blocks(), ")");
  return impl_->moe_layers[static_cast<size_t>(block)]->expert_load();
}
uint32_t* ModelGpu::status() const {
  return impl_->status;
}
FloatSpan ModelGpu::replicated_grads() const {
  return {impl_->grads, impl_->replicated_floats};
}
FloatSpan ModelGpu::replicated_values() const {
  return {impl_->values, impl_->replicated_floats};
}
FloatSpan ModelGpu::sharded_grads() const {
  const Impl& m = *impl_;
  const int64_t total = static_cast<int64_t>(m.grad_bytes / sizeof(float));
  return {m.grads + m.replicated_floats, total - m.replicated_floats};
}
const ModelGpuParallel& ModelGpu::parallel() const {
  return impl_->par;
}
std::vector<FloatSpan> ModelGpu::replicated_rest() const {
  const Impl& m = *impl_;
  std::vector<FloatSpan> blocks = m.block_grads;
  std::sort(blocks.begin(), blocks.end(),
            [](const FloatSpan& a, const FloatSpan& b) { return a.data < b.data; });
  std::vector<FloatSpan> rest;
  float* at = m.grads;
  for (const FloatSpan& b : blocks) {
    if (b.data > at) rest.push_back({at, b.data - at});
    at = std::max(at, b.data + b.count);
  }
  float* const end = m.grads + m.replicated_floats;
  if (end > at) rest.push_back({at, end - at});
  return rest;
}
void ModelGpu::set_grad_ready(std::function<void(FloatSpan, cudaStream_t)> hook) {
  impl_->grad_ready = std::move(hook);
}

namespace {

// The CPU table (parameters or buffers) against the GPU's: same names and shapes, in order.
// Each GPU tensor against the CPU model's tensor at its index (ParameterGpu::index: with
// experts sharded over ranks, the GPU table holds this rank's share); `whole`: the tables match
// one for one.
void check_same_table(const std::deque<Parameter>& cpu, const std::vector<ParameterGpu>& gpu,
                      const char* what, bool whole) {
  FM_CHECK_ARG(!whole || cpu.size() == gpu.size(), "ModelGpu::", what, ": the CPU model has ",
               cpu.size(), " tensors, the GPU model ", gpu.size());
  for (size_t i = 0; i < gpu.size(); ++i) {
    const int64_t c = whole ? static_cast<int64_t>(i) : gpu[i].index;
    FM_CHECK_ARG(c >= 0 && c < static_cast<int64_t>(cpu.size()), "ModelGpu::", what,
                 ": GPU tensor '", gpu[i].name, "' has index ", c, " past the CPU model's ",
                 cpu.size(), " tensors");
    FM_CHECK_ARG(cpu[c].name == gpu[i].name && cpu[c].shape == gpu[i].shape &&
                     cpu[c].numel() == gpu[i].numel,
                 "ModelGpu::", what, ": tensor ", c, " is '", cpu[c].name, "' on the CPU, '",
                 gpu[i].name, "' on the GPU (or their shapes differ)");
  }
}

}  // namespace

void ModelGpu::upload(Model& cpu) {
  Impl& m = *impl_;
  // With several ranks, this rank's share: every replicated tensor and its own routed experts.
  const bool whole = m.par.world == 1;
  check_same_table(cpu.parameters(), m.params, "upload", whole);
  check_same_table(cpu.buffers(), m.buffers, "upload", true);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  for (size_t i = 0; i < m.params.size(); ++i)
    FM_CHECK_CUDA(
        cudaMemcpy(m.params[i].value, cpu.parameters()[whole ? i : m.params[i].index].value.data(),
                   static_cast<size_t>(m.params[i].numel) * sizeof(float), cudaMemcpyHostToDevice));
  for (size_t i = 0; i < m.buffers.size(); ++i)
    FM_CHECK_CUDA(cudaMemcpy(m.buffers[i].value, cpu.buffers()[i].value.data(),
                             static_cast<size_t>(m.buffers[i].numel) * sizeof(float),
                             cudaMemcpyHostToDevice));
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  refresh(nullptr);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
}

void ModelGpu::download(Model& cpu, bool with_grads) const {
  const Impl& m = *impl_;
  FM_CHECK_ARG(m.par.world == 1, "ModelGpu::download: the model is sharded over ", m.par.world,
               " ranks");
  check_same_table(cpu.parameters(), m.params, "download", true);
  check_same_table(cpu.buffers(), m.buffers, "download", true);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  for (size_t i = 0; i < m.params.size(); ++i) {
    Parameter& p = cpu.parameters()[i];
    const size_t bytes = static_cast<size_t>(m.params[i].numel) * sizeof(float);
    FM_CHECK_CUDA(cudaMemcpy(p.value.data(), m.params[i].value, bytes, cudaMemcpyDeviceToHost));
    if (with_grads) {
      p.grad.resize(p.value.size());
      FM_CHECK_CUDA(cudaMemcpy(p.grad.data(), m.params[i].grad, bytes, cudaMemcpyDeviceToHost));
    }
  }
  for (size_t i = 0; i < m.buffers.size(); ++i)
    FM_CHECK_CUDA(cudaMemcpy(cpu.buffers()[i].value.data(), m.buffers[i].value,
                             static_cast<size_t>(m.buffers[i].numel) * sizeof(float),
                             cudaMemcpyDeviceToHost));
}

void ModelGpu::refresh(cudaStream_t stream) {
  Impl& m = *impl_;
  for (auto& l : m.layers) l->refresh(stream);
  for (int64_t k = 0; k < m.depth; ++k) m.eh_w[k]->refresh(m.mtp_params[k].eh->value, stream);
  m.heads[0]->refresh_weight(m.lm_head->value, stream);  // the MTP depths' heads share it
}

void ModelGpu::forward_backward(const int32_t* tokens, float mtp_weight, bool backward,
                                LossGpu* loss, cudaStream_t stream) {
  Impl& m = *impl_;
  FM_CHECK_ARG(tokens != nullptr && loss != nullptr,
               "ModelGpu::forward_backward: null tokens or loss");
  FM_CHECK_ARG(!backward || m.par.placements.empty(),
               "ModelGpu::forward_backward: no backward with redundant experts "
               "(ModelGpuParallel::placements are for serving)");
  const ModelConfig& c = m.config;
  const int64_t T = m.T, H = m.H, V = m.V, D = m.depth, L = m.layers_n;
  const double eps = c.rms_norm_eps;
  constexpr int kThreads = 256;

  // ---- Forward ----
  FM_CHECK_CUDA(cudaMemsetAsync(m.balance, 0, sizeof(double), stream));
  gather_ids_kernel<<<blocks_for((D + 2) * T, kThreads), kThreads, 0, stream>>>(
      tokens, m.batch, m.window, m.seq, D + 2, m.ids);
  FM_CHECK_LAUNCH();
  embedding_forward_gpu(m.embed->value, V, H, m.ids_of(0), T, m.h_layer(0), H, m.status, stream);
  for (int64_t l = 0; l < L; ++l)
    m.layers[l]->forward(m.h_layer(l), m.pos, m.h_layer(l + 1), m.balance, m.status, stream);
  kernels::rmsnorm_forward(m.h_layer(L), H, m.final_norm->value, T, H, eps, m.hn, H, m.rstd_main,
                           stream);
  m.heads[0]->forward(m.hn, T, m.logits_of(0), stream);
  cross_entropy_gpu(m.logits_of(0), V, m.ids_of(1), T, V, 1.0f / static_cast<float>(T),
                    backward ? m.logits_of(0) : nullptr, V, m.row_loss, &m.loss_sums[0], nullptr,
                    m.status, stream);
  const float mtp_scale = D > 0 ? mtp_weight / static_cast<float>(D) : 0.0f;
  for (int64_t k = 0; k < D; ++k) {
    const Impl::MtpParams& p = m.mtp_params[k];
    const Impl::MtpActs& a = m.mtp[k];
    const bf16* hprev = k == 0 ? m.h_layer(L) : m.mtp[k - 1].hk;
    embedding_forward_gpu(m.embed->value, V, H, m.ids_of(k + 1), T, a.e, H, m.status, stream);
    kernels::rmsnorm_forward(a.e, H, p.enorm->value, T, H, eps, a.cat, 2 * H, a.rstd_e, stream);
    kernels::rmsnorm_forward(hprev, H, p.hnorm->value, T, H, eps, a.cat + H, 2 * H, a.rstd_h,
                             stream);
    m.eh[k]->forward(a.cat, T, m.eh_w[k]->view(), a.hp, stream);
    m.layers[L + k]->forward(a.hp, m.pos, a.hk, m.balance, m.status, stream);
    kernels::rmsnorm_forward(a.hk, H, p.shared_norm->value, T, H, eps, a.fk, H, a.rstd_f, stream);
    m.heads[1 + k]->forward(a.fk, T, m.logits_of(1 + k), stream);
    cross_entropy_gpu(m.logits_of(1 + k), V, m.ids_of(k + 2), T, V,
                      mtp_scale / static_cast<float>(T), backward ? m.logits_of(1 + k) : nullptr, V,
                      m.row_loss, &m.loss_sums[1 + k], nullptr, m.status, stream);
  }
  write_loss_kernel<<<1, 32, 0, stream>>>(m.loss_sums, m.balance, static_cast<int>(D), T,
                                          mtp_weight, loss);
  FM_CHECK_LAUNCH();
  if (!backward) return;

  // ---- Backward (the CPU's order): zero every gradient, then accumulate ----
  FM_CHECK_CUDA(cudaMemsetAsync(m.grads, 0, m.grad_bytes, stream));
  float* embed_grad = m.embed->grad;
  for (int64_t k = D - 1; k >= 0; --k) {
    const Impl::MtpParams& p = m.mtp_params[k];
    const Impl::MtpActs& a = m.mtp[k];
    const bf16* hprev = k == 0 ? m.h_layer(L) : m.mtp[k - 1].hk;
    m.heads[1 + k]->backward(m.logits_of(1 + k), m.da, m.lm_head->grad, stream);
    kernels::rmsnorm_backward(m.da, H, a.hk, H, p.shared_norm->value, a.rstd_f, T, H, m.da, H,
                              p.shared_norm->grad, true, m.norm_ws, stream);
    if (k < D - 1) {
      add_bf16_kernel<<<blocks_for(T * H, kThreads), kThreads, 0, stream>>>(m.da, m.dh_next, T * H);
      FM_CHECK_LAUNCH();
    }
    m.layers[L + k]->backward(m.da, m.db, m.status, stream);
    if (m.grad_ready) m.grad_ready(m.block_grads[static_cast<size_t>(L + k)], stream);
    m.eh[k]->backward(m.db, m.eh_w[k]->view(), m.dcat, p.eh->grad, stream);
    kernels::rmsnorm_backward(m.dcat, 2 * H, a.e, H, p.enorm->value, a.rstd_e, T, H, m.dcat, 2 * H,
                              p.enorm->grad, true, m.norm_ws, stream);
    embedding_backward_gpu(m.dcat, 2 * H, m.ids_of(k + 1), T, V, H, embed_grad, m.emb_ws,
                           m.emb_ws_bytes, m.status, stream);
    kernels::rmsnorm_backward(m.dcat + H, 2 * H, hprev, H, p.hnorm->value, a.rstd_h, T, H,
                              m.dh_next, H, p.hnorm->grad, true, m.norm_ws, stream);
  }
  m.heads[0]->backward(m.logits_of(0), m.da, m.lm_head->grad, stream);
  kernels::rmsnorm_backward(m.da, H, m.h_layer(L), H, m.final_norm->value, m.rstd_main, T, H, m.da,
                            H, m.final_norm->grad, true, m.norm_ws, stream);
  if (D > 0) {
    add_bf16_kernel<<<blocks_for(T * H, kThreads), kThreads, 0, stream>>>(m.da, m.dh_next, T * H);
    FM_CHECK_LAUNCH();
  }
  bf16 *cur = m.da, *other = m.db;
  for (int64_t l = L - 1; l >= 0; --l) {
    m.layers[l]->backward(cur, other, m.status, stream);
    if (m.grad_ready) m.grad_ready(m.block_grads[static_cast<size_t>(l)], stream);
    std::swap(cur, other);
  }
  embedding_backward_gpu(cur, H, m.ids_of(0), T, V, H, embed_grad, m.emb_ws, m.emb_ws_bytes,
                         m.status, stream);
}

void ModelGpu::reserve_decode(int64_t max_tokens, bool tensor_core_products) {
  Impl& m = *impl_;
  FM_CHECK_ARG(max_tokens > 0 && max_tokens <= m.T, "ModelGpu::reserve_decode: ", max_tokens,
               " tokens outside [1, batch * seq = ", m.T, "]");
  for (auto& layer : m.layers)  // the MTP modules' too
    layer->reserve_decode(max_tokens, tensor_core_products);
}

void ModelGpu::reserve_low_latency_ep(int64_t max_tokens) {
  Impl& m = *impl_;
  FM_CHECK_ARG(!m.low_latency_ep, "ModelGpu::reserve_low_latency_ep: reserved already");
  const int blocks = static_cast<int>(m.moe_layers.size());
  // One endpoint and layer per expert-slot count, shared by the blocks of that count (they run
  // one after the other); every rank makes them in the same order (the placements are the same
  // on every rank).
  std::map<int, comm::MoeLayerGpu*> by_slots;
  for (DecoderLayerGpu* layer : m.moe_layers) {
    const comm::EpConfig cfg = layer->low_latency_ep_config(max_tokens);
    comm::MoeLayerGpu*& shared = by_slots[cfg.num_experts];
    if (shared == nullptr) {
      comm::DeviceEpRank* ep = nullptr;
      if (m.par.world > 1) {
        const int id = blocks + static_cast<int>(m.ll_ranks.size());
        m.ll_ranks.push_back(m.par.make_ep_rank(id, cfg));
        FM_CHECK_ARG(m.ll_ranks.back() != nullptr,
                     "ModelGpu::reserve_low_latency_ep: the EP maker returned no endpoint");
        ep = m.ll_ranks.back().get();
      } else {
        int device = 0;
        FM_CHECK_CUDA(cudaGetDevice(&device));
        m.ll_groups.push_back(std::make_unique<comm::DeviceEpGroup>(cfg, std::vector<int>{device}));
        ep = &m.ll_groups.back()->rank(0);
      }
      m.ll_layers.push_back(layer->make_low_latency_moe(*ep));
      shared = m.ll_layers.back().get();
    }
    layer->use_low_latency_moe(shared);
  }
  m.low_latency_ep = true;
}

bool ModelGpu::has_low_latency_ep() const {
  return impl_->low_latency_ep;
}

const bf16* ModelGpu::decode_hidden() const {
  return impl_->h_layer(impl_->layers_n);
}

int ModelGpu::mtp_depth() const {
  return static_cast<int>(impl_->depth);
}

void ModelGpu::decode_mtp(int depth, const bf16* h_prev, const int32_t* ids, const int32_t* pos,
                          int64_t batch, int64_t queries, const MlaLatentCacheView& cache,
                          const kernels::MlaDecodePlan& plan, void* workspace, bf16* logits,
                          cudaStream_t stream, int64_t head_rows, bool low_latency_ep) {
  Impl& m = *impl_;
  FM_CHECK_ARG(!low_latency_ep || m.low_latency_ep,
               "ModelGpu::decode_mtp: low_latency_ep without reserve_low_latency_ep");
  const int64_t T = batch * queries, H = m.H;
  FM_CHECK_ARG(depth >= 0 && depth < m.depth, "ModelGpu::decode_mtp: depth ", depth,
               " outside [0, ", m.depth, ")");
  FM_CHECK_ARG(h_prev != nullptr && ids != nullptr && pos != nullptr && logits != nullptr,
               "ModelGpu::decode_mtp: null h_prev, ids, pos or logits");
  FM_CHECK_ARG(batch > 0 && queries > 0 && batch <= m.T / queries,
               "ModelGpu::decode_mtp: batch * queries = ", batch, " * ", queries, " outside [1, ",
               m.T, "]");
  if (head_rows == 0) head_rows = T;
  FM_CHECK_ARG(head_rows >= T && head_rows <= m.T, "ModelGpu::decode_mtp: head_rows=", head_rows,
               " outside [", T, ", ", m.T, "]");
  const Impl::MtpParams& p = m.mtp_params[depth];
  const Impl::MtpActs& a = m.mtp[depth];
  const double eps = m.config.rms_norm_eps;
  // The training forward's MTP step (forward_backward) on the decoding rows.
  embedding_forward_gpu(m.embed->value, m.V, H, ids, T, a.e, H, m.status, stream);
  kernels::rmsnorm_forward(a.e, H, p.enorm->value, T, H, eps, a.cat, 2 * H, a.rstd_e, stream);
  kernels::rmsnorm_forward(h_prev, H, p.hnorm->value, T, H, eps, a.cat + H, 2 * H, a.rstd_h,
                           stream);
  m.eh[depth]->forward(a.cat, T, m.eh_w[depth]->view(), a.hp, stream);
  m.layers[m.layers_n + depth]->forward_decode(a.hp, pos, batch, queries, cache, plan, workspace,
                                               a.hk, m.status, stream, low_latency_ep);
  kernels::rmsnorm_forward(a.hk, H, p.shared_norm->value, T, H, eps, a.fk, H, a.rstd_f, stream);
  m.heads[1 + depth]->forward(a.fk, head_rows, logits, stream);
}

const MlaBlockGpu& ModelGpu::attention(int64_t layer) const {
  FM_CHECK_ARG(layer >= 0 && layer < impl_->layers_n, "ModelGpu::attention: layer ", layer,
               " outside [0, ", impl_->layers_n, ")");
  return impl_->layers[layer]->attention();
}

void ModelGpu::decode(const int32_t* ids, const int32_t* pos, int64_t batch, int64_t queries,
                      const std::vector<MlaLatentCacheView>& caches,
                      const kernels::MlaDecodePlan& plan, void* workspace, bf16* logits,
                      cudaStream_t stream, int64_t head_rows, bool every_row, bool low_latency_ep) {
  Impl& m = *impl_;
  FM_CHECK_ARG(!low_latency_ep || m.low_latency_ep,
               "ModelGpu::decode: low_latency_ep without reserve_low_latency_ep");
  const int64_t T = batch * queries, H = m.H, L = m.layers_n;
  FM_CHECK_ARG(ids != nullptr && pos != nullptr && logits != nullptr,
               "ModelGpu::decode: null ids, pos or logits");
  FM_CHECK_ARG(batch > 0 && queries > 0 && batch <= m.T / queries, "ModelGpu::decode: batch * ",
               "queries = ", batch, " * ", queries, " outside [1, ", m.T, "]");
  const int64_t out_rows = every_row ? T : batch;
  if (head_rows == 0) head_rows = out_rows;
  FM_CHECK_ARG(head_rows >= out_rows && head_rows <= m.T, "ModelGpu::decode: head_rows=", head_rows,
               " outside [", out_rows, ", ", m.T, "]");
  FM_CHECK_ARG(static_cast<int64_t>(caches.size()) == L, "ModelGpu::decode: ", caches.size(),
               " caches for ", L, " layers");
  embedding_forward_gpu(m.embed->value, m.V, H, ids, T, m.h_layer(0), H, m.status, stream);
  for (int64_t l = 0; l < L; ++l)
    m.layers[l]->forward_decode(m.h_layer(l), pos, batch, queries, caches[l], plan, workspace,
                                m.h_layer(l + 1), m.status, stream, low_latency_ep);
  if (every_row) {
    kernels::rmsnorm_forward(m.h_layer(L), H, m.final_norm->value, T, H, m.config.rms_norm_eps,
                             m.hn, H, m.rstd_main, stream);
  } else {
    // The last rows, normed, into hn's first rows (a sequence's earlier new tokens need no
    // logits).
    bf16* last = m.h_layer(0);  // the embedding is no longer read
    last_rows_kernel<<<blocks_for(batch * H, 256), 256, 0, stream>>>(m.h_layer(L), batch, queries,
                                                                     H, last);
    FM_CHECK_LAUNCH();
    kernels::rmsnorm_forward(last, H, m.final_norm->value, batch, H, m.config.rms_norm_eps, m.hn, H,
                             m.rstd_main, stream);
  }
  m.heads[0]->forward(m.hn, head_rows, logits, stream);
}

}  // namespace fp8moe
