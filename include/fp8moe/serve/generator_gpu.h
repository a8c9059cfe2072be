// Text generation on a GPU in V3's serving form: a ModelGpu over paged latent caches
// (serve/paged_cache_gpu.h; the attention in latent form, kernels/mla_decode.h), prompts prefilled
// in chunks (several new tokens a sequence, causal among them), then decoding steps that batch
// every running sequence (continuous batching: a finished sequence leaves, a waiting prompt is
// prefilled and joins at the next step). Sampling on the device (kernels/sampling.h: only token
// ids leave the GPU) or on the host (model/sampling.h; device_sampling off), with one Philox
// stream a request (seed, request id) and, with split_tokens (the default), batch-invariant
// arithmetic, so a request's text does not depend on what it was batched with. A sequence stops at
// end-of-sequence (unless ignore_eos), after max_new_tokens, or when it fills the context (its
// prompt is cut to the last context / 2 tokens if it is longer). The main model decodes; with
// mtp_draft, its first MTP module drafts a token a step. generate() takes a list of prompts;
// serve() takes requests as they arrive (a server's loop, `fp8moe serve`); prefill_only /
// decode_only are the halves of disaggregated serving (serve/disaggregated_gpu.h).
//
// Several ranks (GeneratorParallel; V3's decoding deployment: data-parallel attention, expert-
// parallel MoE): every rank holds every tensor but only its share of the routed experts, serves its
// own requests with its own cache, and its MoE layers exchange their tokens with the other ranks'
// over EP in every pass. So the ranks step in lockstep: each iteration every rank runs exactly one
// main pass (a prefill chunk, a decoding step, or, with nothing of its own to do while another
// rank has, an idle pass of one dummy token) and, with mtp_draft, one draft pass; they stop when
// no rank has work left (GeneratorParallel::all_sum, once an iteration). A request's tokens do not
// depend on the rank it is served by nor on what else is served (the EP combine sums in a fixed
// order of ranks), but may differ from one rank's in the last bits of the MoE output's rounding.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "fp8moe/comm/gpu_job.h"
#include "fp8moe/model/model.h"
#include "fp8moe/model/model_gpu.h"
#include "fp8moe/serve/clock.h"
#include "fp8moe/serve/paged_cache_gpu.h"
#include "fp8moe/serve/sampling_options.h"

namespace fp8moe::serve {

struct GeneratorOptions {
  int64_t max_batch = 8;        // sequences decoded together
  int64_t context = 1024;       // tokens a sequence holds at most
  int64_t prefill_chunk = 256;  // prompt tokens a prefill step (over all the prompts it fills)
  // Prompts prefilled together, one pass an iteration over all of them, the same number of new
  // tokens each (the largest within prefill_chunk / prompts that no prompt runs past): bigger
  // GEMMs than one prompt's chunk when prompts are short. 1: one prompt at a time.
  int64_t prefill_batch = 1;
  // The attention's per-head products (kv_b folded into the query and the output) on tensor
  // cores: prefill 1.4-1.6x and decoding at batch 64 1.06-1.11x on one H200, but 0.87-0.95x at
  // batch 1 (docs/results/serve-absorb-slices-2026-11-27-h200.md); the CUDA-core forms (the
  // default) are the CPU reference's bits. Either way a request's text does not depend on its
  // batch.
  bool tensor_core_products = false;
  int64_t page_tokens = 64;
  int64_t num_pages = 0;  // 0: max_batch full contexts
  // Attention key ranges of split_tokens keys (kernels::mla_decode_plan_fixed) and the output head
  // over at least 2 max_batch rows every step: a request's text does not depend on its batch. 0:
  // the adaptive split plan (kernels::mla_decode_plan; batch-dependent rounding).
  int64_t split_tokens = 256;
  // Decoding steps (plain, and the MTP draft's verify and draft passes) replayed as CUDA graphs,
  // one per kind and batch size: made on a size's second step (its first runs eagerly, so that
  // every lazy setup happens outside the capture). Prefill steps run eagerly.
  bool cuda_graphs = true;
  // Speculative decoding with the model's first multi-token-prediction module as the draft
  // (V3's use of MTP at inference): each step feeds the main model the last token and one drafted
  // token in one pass (2 new tokens a sequence); the draft is kept by speculative sampling's rule
  // (model/sampling.h speculative_pick: greedy, kept when it is the main model's pick; sampled,
  // the tokens are distributed as without the draft) and, when kept, the pass yields one more.
  // Greedy text equals the text without it. Needs num_nextn_predict_layers >= 1. Settable per call
  // with set_mtp_draft.
  bool mtp_draft = false;
  // Tokens drawn on the device (kernels::sample_rows; the MTP draft's check by
  // kernels::speculative_check_rows): only 4 bytes a row come back instead of the logits. Greedy
  // text is the host's (the same lowest-id argmax); sampled, the same distributions, but each
  // draw walks the kept tokens in id order (the host: by probability), so the texts differ.
  // Settable per call with set_device_sampling.
  bool device_sampling = true;
  // A pass in which no rank prefills (one GPU: a decoding pass; several: a lockstep pass)
  // exchanges its MoE tokens over the EP kernels' low-latency form (masked layout, no notify /
  // layout chain; comm/device_ep.h, ModelGpu::reserve_low_latency_ep), a pass with a prefill over
  // the normal kernels; the same bits either way. Taken when 2 max_batch <= 1024 (the low-latency
  // kernels' bound); costs the model one masked endpoint and expert workspace for ranks x 2
  // max_batch rows an expert (shared by its MoE layers). One GPU's MoE layers run over a one-rank
  // EP group, whose low-latency form is cheaper too (1 x H100, session 27: a layer's decoding
  // step 1.01-1.19x, docs/results/moe-decode-2026-11-28-h100-s27.md).
  bool low_latency_ep = true;
};

// How a rank of a job of several takes part (world 1: alone; the default).
struct GeneratorParallel {
  // rank, world, the MoE blocks' EP endpoints (make_ep_rank); redundant experts (placements)
  ModelGpuParallel model;
  // The sum over the ranks of each rank's value: every rank calls it once an iteration of
  // generate(), the same number of times (it is how the ranks agree to go on). Needed for world >
  // 1.
  std::function<int64_t(int64_t)> all_sum;
};

// A launched job's ranks (comm/gpu_job.h): EP endpoints over CUDA IPC, the iteration's sum over
// NCCL on the job's device. `job` must outlive the generator. world 1: the default.
GeneratorParallel job_parallel(comm::GpuJob& job);

struct GenerationStats {
  int64_t prefill_tokens = 0, decode_tokens = 0, decode_steps = 0;
  int64_t prefill_steps = 0;           // prefill passes (each over up to prefill_batch prompts)
  double prefill_s = 0, decode_s = 0;  // wall time of the prefill and decoding steps
  int64_t cache_bytes = 0;
  int64_t max_running = 0;            // most sequences in one decoding step
  int64_t drafted = 0, accepted = 0;  // MTP drafts checked and kept (mtp_draft)
  int64_t idle_steps = 0;             // lockstep passes with nothing of this rank's (world > 1)
  int64_t low_latency_passes = 0;     // lockstep passes over the low-latency EP kernels
  // Latency, host clock at each token's emission: every request's time to its first token (from
  // the generate call's start) and the gaps between its successive tokens (a step emitting two
  // tokens of a request, a kept draft, gives a gap of 0).
  std::vector<double> first_token_ms, token_gap_ms;
  // generate() and serve() (empty after the disaggregated halves): tokens routed to each logical
  // expert during the call, [MoE blocks x n_routed_experts] (main blocks, then the MTP modules';
  // prefill, decoding and draft passes, an idle pass's dummy token included): this rank's
  // serving-time load, EPLB's input (`fp8moe eplb`; summed over the ranks of a group).
  std::vector<int64_t> expert_load;
};

// A request arriving at a serving loop (GeneratorGpu::serve).
struct ServeRequest {
  int64_t id = 0;  // >= 0, unique among requests in flight: its sampling stream, its events' id
  std::vector<int32_t> prompt;
  SamplingOptions sampling;  // its own (max_new_tokens >= 1)
  double arrival = 0;        // steady_seconds() (serve/clock.h) when it came (0: when taken)
};
enum class Arrival { kRequest, kNone, kClosed };
// The next request: kRequest (*r filled), kNone (none now; with wait, never: block until one
// comes or none will), kClosed (no more will come).
using RequestSource = std::function<Arrival(ServeRequest* r, bool wait)>;
// A token of request `id` as it is drawn; done: its last (token -1 and `error` set: the request
// was refused — an empty prompt, a token outside the vocabulary, bad sampling options).
struct TokenEvent {
  int64_t id = 0;
  int32_t token = -1;
  bool done = false;
  std::string error;
};
using TokenSink = std::function<void(const TokenEvent& e)>;

// A prefilled request handed from a prefilling GPU to a decoding one (disaggregated serving,
// serve/disaggregated_gpu.h): its cache rows travel beside it, [layers, length, kv_lora_rank +
// qk_rope_head_dim] BF16 (the main layers', then the MTP modules'), and with the MTP draft the
// draft distribution's logits row [vocab] BF16.
struct Handoff {
  int64_t id = 0;         // the request id (its sampling stream)
  int64_t length = 0;     // tokens in the cache rows (the prompt, cut to context / 2 if longer)
  int32_t first = 0;      // the first new token
  int32_t draft = 0;      // with the MTP draft: the module's guess at the token after `first`
  uint64_t draws = 0;     // the device sampler's draws so far
  double first_time = 0;  // steady-clock seconds when `first` was drawn
  double start_time = 0;  // steady-clock seconds when its prefill call started
};

class GeneratorGpu {
 public:
  // A ModelGpu sized for the options on the current device, `cpu`'s weights uploaded.
  GeneratorGpu(Model& cpu, const GeneratorOptions& options);
  // The same, its weights written by `load` (every parameter and buffer value: e.g. a device
  // initialisation for benchmarks); the FP8 forms are refreshed after it.
  GeneratorGpu(const ModelConfig& config, const GeneratorOptions& options,
               const std::function<void(ModelGpu&)>& load);
  // A rank of a job of several (`par`): its share of the experts, its own requests. `cpu` /
  // `load` as above (ModelGpu::upload takes the rank's share).
  GeneratorGpu(Model& cpu, const GeneratorOptions& options, const GeneratorParallel& par);
  GeneratorGpu(const ModelConfig& config, const GeneratorOptions& options,
               const std::function<void(ModelGpu&)>& load, const GeneratorParallel& par);
  ~GeneratorGpu();
  GeneratorGpu(const GeneratorGpu&) = delete;
  GeneratorGpu& operator=(const GeneratorGpu&) = delete;

  // Each prompt's new tokens (not the prompt), in the prompts' order. request_ids (empty: 0, 1,
  // ...): each prompt's id, which picks its sampling stream, so that a request's text does not
  // depend on where in the list (or, with several ranks, on which rank) it is.
  std::vector<std::vector<int32_t>> generate(const std::vector<std::vector<int32_t>>& prompts,
                                             const SamplingOptions& sampling,
                                             GenerationStats* stats = nullptr,
                                             const std::vector<int64_t>& request_ids = {});
  // A serving loop for requests that arrive while others run (a server's engine; `fp8moe
  // serve`): arrived requests wait, are prefilled and join the decoding batch as it has room
  // (the same scheduling and batch-invariant arithmetic as generate: a request's tokens equal its
  // tokens from generate with the same id and options), each token goes to `emit` as it is drawn.
  // Returns once `next` is closed and every request has finished. stats: first-token times count
  // from each request's arrival.
  void serve(const RequestSource& next, const TokenSink& emit, GenerationStats* stats = nullptr);

  // Disaggregated serving's halves (serve/disaggregated_gpu.h drives them; device sampling only).
  // prefill_only: each prompt prefilled (request ids as generate's), its first token drawn (and
  // with mtp_draft its draft), then `deliver` gets the handoff and `write`, which copies its cache
  // rows (and draft row) to device memory this GPU can write (a peer's) and waits for the copy;
  // the request then leaves this GPU. Nothing is decoded here.
  using HandoffWriter = std::function<void(bf16* rows, bf16* q_row)>;
  void prefill_only(const std::vector<std::vector<int32_t>>& prompts,
                    const SamplingOptions& sampling, const std::vector<int64_t>& request_ids,
                    const std::function<void(const Handoff&, const HandoffWriter& write)>& deliver,
                    GenerationStats* stats = nullptr);
  // decode_only: requests taken from `take` (wait: block until one comes; false then means no
  // more will) as running sequences allow, their rows copied into this GPU's cache (then
  // `taken`: their staging may be reused), decoded with continuous batching. Returns each
  // request's new tokens (the first included) by id.
  using HandoffTaker =
      std::function<bool(Handoff* h, const bf16** rows, const bf16** q_row, bool wait)>;
  std::vector<std::pair<int64_t, std::vector<int32_t>>> decode_only(
      const SamplingOptions& sampling, const HandoffTaker& take,
      const std::function<void(const Handoff&)>& taken, GenerationStats* stats = nullptr);
  // Cache rows a handoff carries, per token ([layers, row]) in elements.
  int64_t handoff_row_elems() const;

  int64_t vocab() const;
  void set_cuda_graphs(bool on);      // GeneratorOptions::cuda_graphs, e.g. to time both
  void set_mtp_draft(bool on);        // GeneratorOptions::mtp_draft (thrown without an MTP module)
  void set_device_sampling(bool on);  // GeneratorOptions::device_sampling

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace fp8moe::serve
