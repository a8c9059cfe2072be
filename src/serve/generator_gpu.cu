// GeneratorGpu (serve/generator_gpu.h).
#include "fp8moe/serve/generator_gpu.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "fp8moe/comm/nccl_collectives.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/kernels/mla_decode.h"
#include "fp8moe/kernels/sampling.h"
#include "fp8moe/model/sampling.h"

namespace fp8moe::serve {
namespace {

// dst row dst_rows[i] = src row src_rows[i] (vocab BF16 each): each drafting request's draft
// distribution kept in its slot until the next step's verify reads it.
__global__ void copy_rows_kernel(const bf16* __restrict__ src, const int32_t* __restrict__ src_rows,
                                 bf16* __restrict__ dst, const int32_t* __restrict__ dst_rows,
                                 int64_t cols) {
  const bf16* from = src + static_cast<int64_t>(src_rows[blockIdx.x]) * cols;
  bf16* to = dst + static_cast<int64_t>(dst_rows[blockIdx.x]) * cols;
  for (int64_t c = blockIdx.y * blockDim.x + threadIdx.x; c < cols;
       c += static_cast<int64_t>(gridDim.y) * blockDim.x)
    to[c] = from[c];
}

// A request in flight (generate's, or a handoff's on the decoding GPU).
struct Request {
  std::vector<int32_t> prompt, out;
  PhiloxStream rng{0, 0};  // host sampling's draws
  uint64_t id = 0;
  int seq = -1;
  int32_t draft = 0;            // the MTP module's guess at the token after out.back() ...
  std::vector<double> draft_q;  // ... and the distribution it was drawn from (host sampling;
  int slot = -1;                // on the device: the row of d_q)
  uint64_t draws = 0;           // device sampling's next uniform index
  double last_emit = 0;         // steady-clock seconds of its last token
  SamplingOptions s;            // its own (a served request's; generate's: the call's)
  double arrival = 0;           // steady-clock seconds its first-token time counts from
};

double now_s() {
  return steady_seconds();
}

}  // namespace

struct GeneratorGpu::Impl {
  GeneratorOptions o;
  GeneratorParallel par;
  ModelConfig config;
  int64_t step_tokens = 0, vocab = 0;
  int sms = 0;
  std::unique_ptr<ModelGpu> model;
  std::unique_ptr<PagedLatentCacheGpu> cache;
  cudaStream_t stream = nullptr;
  int32_t *d_ids = nullptr, *d_pos = nullptr, *h_ids = nullptr, *h_pos = nullptr;
  uint32_t* h_status = nullptr;
  bf16 *d_logits = nullptr, *h_logits = nullptr;
  void* ws = nullptr;
  size_t ws_bytes = 0;
  // Decoding steps by kind (plain, verify, draft) and batch size: how many ran, and the graph
  // made on the second.
  // (Twice: over the normal EP kernels, then over the low-latency ones.)
  static constexpr int kKinds = 6;
  std::vector<int> decode_runs[kKinds];
  std::vector<cudaGraphExec_t> graphs[kKinds];
  std::vector<MlaLatentCacheView> views;  // the last prepare_step's
  int idle_seq = -1;  // world > 1: the dummy sequence of idle passes (its first positions)
  // The MoE layers hold low-latency endpoints (GeneratorOptions::low_latency_ep), and the running
  // pass takes them (no rank prefills in it).
  bool low_latency_ready = false, low_latency_pass = false;
  // Sampling on the device (GeneratorOptions::device_sampling): per-row parameters and row
  // indices up, tokens (and a verify's kept flags and bonus tokens) back; d_q holds each drafting
  // request's draft distribution row in its slot (max_batch slots).
  kernels::SampleRow *d_rows = nullptr, *h_rows = nullptr;
  int32_t *d_tok = nullptr, *h_tok = nullptr;      // [3 * step_tokens]
  int32_t *d_index = nullptr, *h_index = nullptr;  // [2 * step_tokens]
  bf16* d_q = nullptr;
  std::vector<int> free_slots;

  ~Impl() {
    for (auto& kind : graphs)
      for (cudaGraphExec_t g : kind)
        if (g != nullptr) cudaGraphExecDestroy(g);
    cudaFree(d_ids);
    cudaFree(d_pos);
    cudaFree(d_logits);
    cudaFree(ws);
    cudaFree(d_rows);
    cudaFree(d_tok);
    cudaFree(d_index);
    cudaFree(d_q);
    cudaFreeHost(h_rows);
    cudaFreeHost(h_tok);
    cudaFreeHost(h_index);
    cudaFreeHost(h_ids);
    cudaFreeHost(h_pos);
    cudaFreeHost(h_logits);
    cudaFreeHost(h_status);
    if (stream != nullptr) cudaStreamDestroy(stream);
  }

  kernels::MlaDecodePlan plan_for(int64_t batch, int64_t queries, const MlaLatentCacheView& view) {
    const kernels::MlaDecodeShape shape = model->attention(0).decode_shape(batch, queries, view);
    const kernels::MlaDecodePlan plan = o.split_tokens > 0
                                            ? kernels::mla_decode_plan_fixed(shape, o.split_tokens)
                                            : kernels::mla_decode_plan(shape, sms);
    FM_CHECK(plan.workspace_bytes <= ws_bytes, "GeneratorGpu: the attention plan for batch ", batch,
             " x ", queries, " needs ", plan.workspace_bytes, " bytes of workspace (", ws_bytes,
             " held)");
    return plan;
  }

  // One step over `seqs` (grown already), `queries` new tokens each (ids / pos in row order):
  // the main model (kMain: the logits of each sequence's last row, or of every row with
  // every_row) or the MTP draft module over the main model's last states (kDraft: every row).
  // Leaves the logits [rows, vocab] in `out` (null: not copied back, e.g. an idle pass's).
  enum class Pass { kMain, kDraft };
  // same_step: the sequences and their lengths are the previous run's (the draft pass after its
  // verify pass): the page table on the device stays.
  void run(Pass pass, const std::vector<int>& seqs, const int32_t* ids, const int32_t* pos,
           int64_t queries, bool every_row, std::vector<float>* out, bool same_step = false,
           bool defer_finish = false) {
    const int64_t batch = static_cast<int64_t>(seqs.size()), T = batch * queries;
    if (!same_step) views = cache->prepare_step(seqs, stream);
    const int64_t L = config.num_hidden_layers;
    std::copy(ids, ids + T, h_ids);
    std::copy(pos, pos + T, h_pos);
    FM_CHECK_CUDA(cudaMemcpyAsync(d_ids, h_ids, T * 4, cudaMemcpyHostToDevice, stream));
    FM_CHECK_CUDA(cudaMemcpyAsync(d_pos, h_pos, T * 4, cudaMemcpyHostToDevice, stream));
    const kernels::MlaDecodePlan plan = plan_for(batch, queries, views[0]);
    // NOTE: the head always computes at least 2 max_batch rows, so that its cuBLASLt GEMM's
    // shape (hence its summation order) follows neither the batch nor the pass.
    const int64_t rows = every_row || pass == Pass::kDraft ? T : batch;
    const int64_t head_rows = std::max(rows, 2 * o.max_batch);
    const bool ll = low_latency_pass;
    const auto go = [&] {
      if (pass == Pass::kMain)
        model->decode(d_ids, d_pos, batch, queries, {views.begin(), views.begin() + L}, plan, ws,
                      d_logits, stream, head_rows, every_row, ll);
      else
        model->decode_mtp(0, model->decode_hidden(), d_ids, d_pos, batch, queries, views[L], plan,
                          ws, d_logits, stream, head_rows, ll);
    };
    // Every pointer a decoding step reads is fixed (cache pages, tables, ids, the main states,
    // the workspace sized at construction), so a graph replays any later step of the same kind
    // and batch size: plain (1 new token a sequence), verify (2, every row's logits), draft.
    const int kind = (pass == Pass::kDraft ? 2 : every_row ? 1 : 0) + (ll ? 3 : 0);
    const bool decoding = pass == Pass::kDraft ? queries == 2 : queries == (every_row ? 2 : 1);
    if (decoding && o.cuda_graphs && ++decode_runs[kind][batch] >= 2) {
      cudaGraphExec_t& exec = graphs[kind][batch];
      if (exec == nullptr) {
        cudaGraph_t g;
        FM_CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
        go();
        FM_CHECK_CUDA(cudaStreamEndCapture(stream, &g));
        FM_CHECK_CUDA(cudaGraphInstantiate(&exec, g, 0));
        FM_CHECK_CUDA(cudaGraphDestroy(g));
      }
      FM_CHECK_CUDA(cudaGraphLaunch(exec, stream));
    } else {
      go();
    }
    if (out != nullptr)
      FM_CHECK_CUDA(cudaMemcpyAsync(h_logits, d_logits, static_cast<size_t>(rows * vocab) * 2,
                                    cudaMemcpyDeviceToHost, stream));
    if (defer_finish) return;  // the device sampling enqueued next waits once for both
    finish();
    if (out == nullptr) return;
    out->resize(static_cast<size_t>(rows * vocab));
    for (int64_t i = 0; i < rows * vocab; ++i) (*out)[i] = to_float(h_logits[i]);
  }

  // Waits for the stream's work; throws the model's error bits.
  void finish() {
    FM_CHECK_CUDA(cudaMemcpyAsync(h_status, model->status(), 4, cudaMemcpyDeviceToHost, stream));
    FM_CHECK_CUDA(cudaStreamSynchronize(stream));
    FM_CHECK(*h_status == 0, "GeneratorGpu: the model reported error bits 0x", std::hex, *h_status,
             " (a token id outside the vocabulary or a position past the RoPE table)");
  }

  // Tokens drawn on the device from rows[i] of the last pass's logits with params[i]; with
  // `slots`, row rows[i] is also kept as slot slots[i]'s draft distribution.
  std::vector<int32_t> sample(const std::vector<int32_t>& rows,
                              const std::vector<kernels::SampleRow>& params,
                              const std::vector<int32_t>& slots = {}) {
    const int64_t n = static_cast<int64_t>(rows.size());
    std::copy(params.begin(), params.end(), h_rows);
    std::copy(rows.begin(), rows.end(), h_index);
    std::copy(slots.begin(), slots.end(), h_index + n);
    const size_t idx = (rows.size() + slots.size()) * 4;
    FM_CHECK_CUDA(cudaMemcpyAsync(d_rows, h_rows, n * sizeof(kernels::SampleRow),
                                  cudaMemcpyHostToDevice, stream));
    FM_CHECK_CUDA(cudaMemcpyAsync(d_index, h_index, idx, cudaMemcpyHostToDevice, stream));
    kernels::sample_rows(d_logits, vocab, n, vocab, d_rows, d_tok, stream, d_index);
    if (!slots.empty()) {
      copy_rows_kernel<<<dim3(static_cast<unsigned>(n), 8), 256, 0, stream>>>(
          d_logits, d_index, d_q, d_index + n, vocab);
      FM_CHECK_CUDA(cudaGetLastError());
    }
    FM_CHECK_CUDA(cudaMemcpyAsync(h_tok, d_tok, n * 4, cudaMemcpyDeviceToHost, stream));
    finish();
    std::vector<int32_t> out(h_tok, h_tok + n);
    for (int64_t i = 0; i < n; ++i)
      FM_CHECK(out[i] >= 0, "GeneratorGpu: sampling row ", rows[i], " failed (",
               out[i] == kernels::kSampleBadLogits ? "NaN or infinite logits" : "bad parameters",
               ")");
    return out;
  }

  // Speculative sampling's check on the device (model/sampling.h speculative_pick's rule): for
  // request i the verify pass's rows 2i (the draft's check) and 2i + 1 (the bonus), its draft
  // drafts[i] drawn from slot slots[i]. Returns tokens, kept flags, bonus tokens.
  struct Verdicts {
    std::vector<int32_t> token, kept, bonus;
  };
  Verdicts verify(const std::vector<int32_t>& drafts, const std::vector<int32_t>& slots,
                  const std::vector<kernels::SampleRow>& params) {
    const int64_t n = static_cast<int64_t>(drafts.size());
    std::copy(params.begin(), params.end(), h_rows);
    std::copy(drafts.begin(), drafts.end(), h_index);
    std::copy(slots.begin(), slots.end(), h_index + n);
    FM_CHECK_CUDA(cudaMemcpyAsync(d_rows, h_rows, n * sizeof(kernels::SampleRow),
                                  cudaMemcpyHostToDevice, stream));
    FM_CHECK_CUDA(cudaMemcpyAsync(d_index, h_index, 2 * n * 4, cudaMemcpyHostToDevice, stream));
    kernels::speculative_check_rows(d_logits, vocab, d_q, vocab, d_index, n, vocab, d_rows, d_tok,
                                    d_tok + step_tokens, d_tok + 2 * step_tokens, stream,
                                    d_index + n);
    for (int k = 0; k < 3; ++k)
      FM_CHECK_CUDA(cudaMemcpyAsync(h_tok + k * step_tokens, d_tok + k * step_tokens, n * 4,
                                    cudaMemcpyDeviceToHost, stream));
    finish();
    Verdicts v;
    v.token.assign(h_tok, h_tok + n);
    v.kept.assign(h_tok + step_tokens, h_tok + step_tokens + n);
    v.bonus.assign(h_tok + 2 * step_tokens, h_tok + 2 * step_tokens + n);
    for (int64_t i = 0; i < n; ++i)
      FM_CHECK(v.token[i] >= 0 && (!v.kept[i] || v.bonus[i] >= 0),
               "GeneratorGpu: the draft check of request row ", i,
               " failed (NaN or infinite logits, or bad parameters)");
    return v;
  }

  // generate's loop over `req` (all waiting at the start), or with io: requests arriving while
  // others run (io->arrive: 1 one came, 0 none now, -1 no more will; wait: block until one comes
  // or none will), every token reported (io->emit), or a disaggregated half: prefill only
  // (io->deliver) or decode only (io->take; handed-over requests sample with io->handoff_s).
  // req grows as requests arrive or are handed over.
  struct Io {
    std::function<int(Request* q, bool wait)> arrive;
    std::function<void(const Request& q, int32_t token, bool done)> emit;
    std::function<void(const Handoff&, int seq, int slot)> deliver;
    GeneratorGpu::HandoffTaker take;
    std::function<void(const Handoff&)> taken;
    SamplingOptions handoff_s;
  };
  void loop(std::vector<Request>& req, GenerationStats& st, const Io* io) {
    Impl& m = *this;
    const bool draft = m.o.mtp_draft, on_device = m.o.device_sampling;
    FM_CHECK_ARG(!on_device || m.vocab <= kernels::kSampleMaxVocab,
                 "GeneratorGpu: a vocabulary of ", m.vocab, " is beyond the device sampler's ",
                 kernels::kSampleMaxVocab, " (set_device_sampling(false))");
    // A request's parameters for its next device draw (its Philox stream: as the host's).
    const auto params = [&](const Request& q) {
      return kernels::SampleRow{static_cast<float>(q.s.temperature), static_cast<float>(q.s.top_p),
                                q.s.seed, 7 + q.id, q.draws};
    };
    m.free_slots.clear();
    for (int k = static_cast<int>(m.o.max_batch) - 1; k >= 0; --k) m.free_slots.push_back(k);
    std::vector<double> p0, p1;
    // The module's draft for a request from its logits row: drawn from the distribution the main
    // model's pick would be drawn from (speculative sampling; greedy: its argmax).
    const auto redraft = [&](Request& q, const float* row) {
      token_probs(row, m.vocab, q.s.temperature, q.s.top_p, q.draft_q);
      q.draft = sample_probs(q.draft_q, q.rng);
    };
    st.cache_bytes = m.cache->bytes();
    PageAllocator& pages = m.cache->pages();
    std::deque<size_t> waiting;
    for (size_t r = 0; r < req.size(); ++r)
      if (req[r].s.max_new_tokens > 0) waiting.push_back(r);
    std::vector<size_t> running;
    std::vector<float> logits, draft_logits;
    std::vector<int32_t> ids, pos;
    using clock = std::chrono::steady_clock;
    const auto seconds = [](clock::time_point a) {
      return std::chrono::duration<double>(clock::now() - a).count();
    };
    // A drafting step needs two positions: the sequence stops one short of the context.
    const int64_t room = draft ? m.o.context - 1 : m.o.context;
    // Appends a token; false (and the sequence released) when the request ends with it.
    const auto append = [&](Request& q, int32_t next, bool timed = true) {
      q.out.push_back(next);
      if (timed) {
        const double t = now_s();
        if (q.last_emit == 0)
          st.first_token_ms.push_back(1e3 * (t - q.arrival));
        else
          st.token_gap_ms.push_back(1e3 * (t - q.last_emit));
        q.last_emit = t;
      }
      const bool eos = next == q.s.eos && q.s.eos >= 0 && !q.s.ignore_eos;
      const bool done = eos || static_cast<int64_t>(q.out.size()) >= q.s.max_new_tokens ||
                        pages.length(q.seq) >= room;
      if (done) {
        pages.release(q.seq);
        if (q.slot >= 0) m.free_slots.push_back(q.slot);
        q.slot = -1;
      }
      if (io != nullptr && io->emit) io->emit(q, next, done);
      return !done;
    };
    // The prompts being prefilled (GeneratorOptions::prefill_batch at most, one pass an
    // iteration over all of them) and each one's next chunk's start.
    struct Fill {
      size_t r = 0;
      int64_t start = 0;
    };
    std::vector<Fill> filling;

    // A prefill pass over every filling prompt, the same number of new tokens each (the largest
    // that no prompt runs past and that keeps the pass within prefill_chunk tokens), with the
    // draft module's cache filled beside; after a prompt's last chunk, its first token, and the
    // request joins the running ones.
    const auto prefill_pass = [&] {
      const int64_t B = static_cast<int64_t>(filling.size());
      int64_t len = std::max<int64_t>(1, m.o.prefill_chunk / B);
      for (const Fill& f : filling)
        len = std::min(len, static_cast<int64_t>(req[f.r].prompt.size()) - f.start);
      const auto t0 = clock::now();
      std::vector<int> seqs;
      ids.clear();
      pos.clear();
      std::vector<int32_t> last_rows;  // the pass's rows that end a prompt (its logits row index)
      std::vector<size_t> ending;      // their filling indices
      for (size_t b = 0; b < filling.size(); ++b) {
        const Fill& f = filling[b];
        Request& q = req[f.r];
        FM_CHECK(pages.grow(q.seq, f.start + len), "GeneratorGpu: cache full while prefilling");
        seqs.push_back(q.seq);
        for (int64_t i = 0; i < len; ++i) {
          ids.push_back(q.prompt[static_cast<size_t>(f.start + i)]);
          pos.push_back(static_cast<int32_t>(f.start + i));
        }
        if (f.start + len == static_cast<int64_t>(q.prompt.size())) {
          last_rows.push_back(static_cast<int32_t>(b));
          ending.push_back(b);
        }
      }
      const bool any_last = !ending.empty();
      m.run(Impl::Pass::kMain, seqs, ids.data(), pos.data(), len, false,
            any_last && !on_device ? &logits : nullptr, false, any_last && on_device);
      std::vector<int32_t> first(filling.size(), 0);
      if (any_last && on_device) {
        std::vector<kernels::SampleRow> ps;
        for (size_t b : ending) ps.push_back(params(req[filling[b].r]));
        const std::vector<int32_t> drawn = m.sample(last_rows, ps);
        for (size_t k = 0; k < ending.size(); ++k) {
          first[ending[k]] = drawn[k];
          req[filling[ending[k]].r].draws += 1;
        }
      } else {
        for (size_t b : ending) {
          Request& q = req[filling[b].r];
          first[b] =
              sample_token(logits.data() + b * m.vocab, m.vocab, q.s.temperature, q.s.top_p, q.rng);
        }
      }
      if (draft) {
        // The module at position p reads the main state at p and the token at p + 1.
        std::vector<int32_t> next_ids;
        std::vector<int32_t> draft_rows, slots;
        for (size_t b = 0; b < filling.size(); ++b) {
          const Fill& f = filling[b];
          const Request& q = req[f.r];
          const bool last = f.start + len == static_cast<int64_t>(q.prompt.size());
          next_ids.insert(next_ids.end(), q.prompt.begin() + f.start + 1,
                          q.prompt.begin() + f.start + len);
          next_ids.push_back(last ? first[b] : q.prompt[static_cast<size_t>(f.start + len)]);
          if (last) {
            draft_rows.push_back(static_cast<int32_t>(b * len + len - 1));
            slots.push_back(q.slot);
          }
        }
        m.run(Impl::Pass::kDraft, seqs, next_ids.data(), pos.data(), len, true,
              any_last && !on_device ? &draft_logits : nullptr, true, any_last && on_device);
        if (any_last && on_device) {
          std::vector<kernels::SampleRow> ps;
          for (size_t b : ending) ps.push_back(params(req[filling[b].r]));
          const std::vector<int32_t> drafted = m.sample(draft_rows, ps, slots);
          for (size_t k = 0; k < ending.size(); ++k) {
            Request& q = req[filling[ending[k]].r];
            q.draft = drafted[k];
            q.draws += 1;
          }
        } else {
          for (size_t k = 0; k < ending.size(); ++k)
            redraft(req[filling[ending[k]].r], draft_logits.data() + draft_rows[k] * m.vocab);
        }
      }
      st.prefill_s += seconds(t0);
      st.prefill_steps += 1;
      std::vector<Fill> still;
      for (size_t b = 0; b < filling.size(); ++b) {
        Fill f = filling[b];
        f.start += len;
        Request& q = req[f.r];
        const int64_t n = static_cast<int64_t>(q.prompt.size());
        if (f.start < n) {
          still.push_back(f);
          continue;
        }
        st.prefill_tokens += n;
        if (io != nullptr && io->deliver) {  // prefill only: the request leaves with its rows
          Handoff h;
          h.id = static_cast<int64_t>(q.id);
          h.length = n;
          h.first = first[b];
          h.draft = q.draft;
          h.draws = q.draws;
          h.first_time = now_s();
          h.start_time = q.arrival;
          st.first_token_ms.push_back(1e3 * (h.first_time - q.arrival));
          io->deliver(h, q.seq, q.slot);
          pages.release(q.seq);
          if (q.slot >= 0) m.free_slots.push_back(q.slot);
          q.slot = -1;
          q.out.push_back(first[b]);
        } else if (append(q, first[b])) {
          running.push_back(f.r);
        }
      }
      filling = std::move(still);
    };

    // Decode only: a handed-off request taken but not yet admitted, and whether more may come.
    struct Taken {
      Handoff h;
      const bf16 *rows = nullptr, *q_row = nullptr;
    };
    std::optional<Taken> pending;
    bool source_open = io != nullptr && static_cast<bool>(io->take);
    // Takes the next handoff (waiting for one when nothing runs) and admits it when its rows fit:
    // they are copied into fresh pages, its first token appended. True when one joined.
    const auto admit_handoff = [&] {
      if (!pending && source_open) {
        Taken t;
        if (io->take(&t.h, &t.rows, &t.q_row, running.empty()))
          pending = t;
        else if (running.empty())
          source_open = false;
      }
      if (!pending) return false;
      const Taken& t = *pending;
      const int64_t need = (t.h.length + pages.page_tokens() - 1) / pages.page_tokens();
      if (need > pages.free_pages()) {
        FM_CHECK(!running.empty(), "GeneratorGpu: the cache (", pages.num_pages(),
                 " pages) cannot hold a handed-off request of ", t.h.length, " tokens");
        return false;  // wait for running sequences to free pages
      }
      Request q;
      q.s = io->handoff_s;
      q.arrival = t.h.start_time;
      q.id = static_cast<uint64_t>(t.h.id);
      q.draws = t.h.draws;
      q.draft = t.h.draft;
      q.seq = pages.add_sequence();
      FM_CHECK(pages.grow(q.seq, t.h.length), "GeneratorGpu: cache full while admitting");
      m.cache->copy_rows(q.seq, t.h.length, const_cast<bf16*>(t.rows), true, m.stream);
      if (draft) {
        FM_CHECK(t.q_row != nullptr, "GeneratorGpu: a handoff without its draft row");
        q.slot = m.free_slots.back();
        m.free_slots.pop_back();
        FM_CHECK_CUDA(cudaMemcpyAsync(m.d_q + q.slot * m.vocab, t.q_row,
                                      static_cast<size_t>(m.vocab) * 2, cudaMemcpyDefault,
                                      m.stream));
      }
      FM_CHECK_CUDA(cudaStreamSynchronize(m.stream));
      io->taken(t.h);
      st.first_token_ms.push_back(1e3 * (t.h.first_time - t.h.start_time));
      q.last_emit = t.h.first_time;
      const int32_t first = t.h.first;
      pending.reset();
      req.push_back(std::move(q));
      if (append(req.back(), first, false)) running.push_back(req.size() - 1);
      return true;
    };

    // One decoding step over every running sequence: its last token (and its draft). False when no
    // sequence could grow (the pool exhausted): then no pass ran.
    const auto decode_step = [&] {
      const int64_t queries = draft ? 2 : 1;
      std::vector<int> seqs;
      ids.clear();
      pos.clear();
      std::vector<size_t> stepping;
      for (size_t r : running) {
        Request& q = req[r];
        const int64_t len = pages.length(q.seq);
        if (!pages.grow(q.seq, len + queries)) {  // the pool is exhausted: the sequence ends here
          pages.release(q.seq);
          continue;
        }
        seqs.push_back(q.seq);
        ids.push_back(q.out.back());
        pos.push_back(static_cast<int32_t>(len));
        if (draft) {
          ids.push_back(q.draft);
          pos.push_back(static_cast<int32_t>(len + 1));
        }
        stepping.push_back(r);
      }
      running.clear();
      if (stepping.empty()) return false;
      const auto t0 = clock::now();
      m.run(Impl::Pass::kMain, seqs, ids.data(), pos.data(), queries, draft,
            on_device ? nullptr : &logits, false, on_device);
      st.decode_steps += 1;
      st.max_running = std::max<int64_t>(st.max_running, static_cast<int64_t>(stepping.size()));
      const size_t B = stepping.size();
      std::vector<kernels::SampleRow> rows_params;
      for (size_t r : stepping) rows_params.push_back(params(req[r]));
      if (!draft) {
        std::vector<int32_t> picked(B);
        if (on_device) {
          std::vector<int32_t> rows(B);
          for (size_t i = 0; i < B; ++i) rows[i] = static_cast<int32_t>(i);
          picked = m.sample(rows, rows_params);
        }
        st.decode_s += seconds(t0);
        st.decode_tokens += static_cast<int64_t>(B);
        for (size_t i = 0; i < B; ++i) {
          Request& q = req[stepping[i]];
          q.draws += 1;
          const int32_t next = on_device ? picked[i]
                                         : sample_token(logits.data() + i * m.vocab, m.vocab,
                                                        q.s.temperature, q.s.top_p, q.rng);
          if (append(q, next)) running.push_back(stepping[i]);
        }
        return true;
      }
      // Verify: row 2i's distribution checks the draft (speculative_pick: the token is distributed
      // as the main model's alone would be); where the draft is kept, row 2i + 1 gives one more.
      std::vector<int32_t> next(B), bonus(B);
      std::vector<bool> kept(B);
      if (on_device) {
        std::vector<int32_t> drafts, slots;
        for (size_t r : stepping) {
          drafts.push_back(req[r].draft);
          slots.push_back(req[r].slot);
        }
        const Impl::Verdicts v = m.verify(drafts, slots, rows_params);
        for (size_t i = 0; i < B; ++i) {
          next[i] = v.token[i];
          kept[i] = v.kept[i] != 0;
          bonus[i] = v.bonus[i];
          req[stepping[i]].draws += 3;
        }
      }
      for (size_t i = 0; i < B && !on_device; ++i) {
        Request& q = req[stepping[i]];
        token_probs(logits.data() + (2 * i) * m.vocab, m.vocab, q.s.temperature, q.s.top_p, p0);
        bool k = false;
        next[i] = speculative_pick(p0, q.draft_q, q.draft, q.rng, &k);
        kept[i] = k;
        if (k) {
          token_probs(logits.data() + (2 * i + 1) * m.vocab, m.vocab, q.s.temperature, q.s.top_p,
                      p1);
          bonus[i] = sample_probs(p1, q.rng);
        }
      }
      // The next drafts: the module at the step's two positions (the second's state is only
      // meaningful where the draft was kept).
      for (size_t i = 0; i < stepping.size(); ++i) {
        ids[2 * i] = next[i];
        ids[2 * i + 1] = kept[i] ? bonus[i] : next[i];
      }
      m.run(Impl::Pass::kDraft, seqs, ids.data(), pos.data(), 2, true,
            on_device ? nullptr : &draft_logits, true, on_device);
      if (on_device) {
        // The next drafts from rows 2i + kept_i, those rows kept in the requests' slots.
        std::vector<int32_t> rows(B), slots(B);
        for (size_t i = 0; i < B; ++i) {
          rows[i] = static_cast<int32_t>(2 * i + (kept[i] ? 1 : 0));
          slots[i] = req[stepping[i]].slot;
          rows_params[i] = params(req[stepping[i]]);
        }
        const std::vector<int32_t> drafted = m.sample(rows, rows_params, slots);
        for (size_t i = 0; i < B; ++i) {
          req[stepping[i]].draft = drafted[i];
          req[stepping[i]].draws += 1;
        }
      }
      st.decode_s += seconds(t0);
      for (size_t i = 0; i < B; ++i) {
        Request& q = req[stepping[i]];
        st.drafted += 1;
        st.accepted += kept[i] ? 1 : 0;
        if (!on_device) redraft(q, draft_logits.data() + (2 * i + (kept[i] ? 1 : 0)) * m.vocab);
        // Both caches now hold the step's rows; a rejected draft's row is dropped.
        pages.shrink(q.seq, pos[2 * i] + (kept[i] ? 2 : 1));
        st.decode_tokens += kept[i] ? 2 : 1;
        bool goes_on = append(q, next[i]);
        if (goes_on && kept[i]) goes_on = append(q, bonus[i]);
        if (goes_on) running.push_back(stepping[i]);
      }
      return true;
    };

    // One iteration: one pass (and its draft pass) on every rank, in lockstep with world > 1.
    const bool lockstep = m.par.model.world > 1;
    // Arriving requests: every one that has come joins the waiting queue; with nothing to do, wait
    // for the next (never in lockstep: the other ranks' passes need this one's).
    bool arrivals_open = io != nullptr && static_cast<bool>(io->arrive);
    const auto take_arrivals = [&] {
      while (arrivals_open) {
        const bool idle = filling.empty() && waiting.empty() && running.empty() && !pending;
        Request q;
        const int got = io->arrive(&q, idle && !lockstep);
        if (got < 0) arrivals_open = false;
        if (got <= 0) return;
        if (static_cast<int64_t>(q.prompt.size()) >= m.o.context)
          q.prompt.erase(q.prompt.begin(), q.prompt.end() - m.o.context / 2);
        q.rng = PhiloxStream(q.s.seed, 7 + q.id);
        if (q.s.max_new_tokens > 0) waiting.push_back(req.size());
        req.push_back(std::move(q));
      }
    };
    // A rank's vote on going on: 0 idle, 1 busy, kPrefillVote prefilling in this pass (so that
    // the sum also says whether any rank prefills: then the pass runs the normal EP kernels).
    constexpr int64_t kPrefillVote = int64_t{1} << 16;
    for (;;) {
      take_arrivals();
      // Admit waiting prompts while there is room (prefill_batch prompts fill together): the
      // pages of every filling prompt's whole prompt are counted as taken.
      int64_t reserved = 0;
      for (const Fill& f : filling) {
        const int64_t n = static_cast<int64_t>(req[f.r].prompt.size());
        reserved += (n + pages.page_tokens() - 1) / pages.page_tokens() -
                    (pages.length(req[f.r].seq) + pages.page_tokens() - 1) / pages.page_tokens();
      }
      while (!waiting.empty() && static_cast<int64_t>(filling.size()) < m.o.prefill_batch &&
             static_cast<int64_t>(running.size() + filling.size()) < m.o.max_batch) {
        Request& q = req[waiting.front()];
        const int64_t n = static_cast<int64_t>(q.prompt.size());
        const int64_t need = (n + pages.page_tokens() - 1) / pages.page_tokens();
        if (need > pages.free_pages() - reserved) {
          FM_CHECK(!running.empty() || !filling.empty(), "GeneratorGpu: the cache (",
                   pages.num_pages(), " pages) cannot hold one prompt of ", n, " tokens");
          break;  // wait for running sequences to free pages
        }
        reserved += need;
        filling.push_back(Fill{waiting.front(), 0});
        waiting.pop_front();
        q.seq = pages.add_sequence();
        if (draft && on_device) {
          q.slot = m.free_slots.back();
          m.free_slots.pop_back();
        }
      }
      const bool busy = !filling.empty() || !waiting.empty() || !running.empty() ||
                        pending.has_value() || source_open || arrivals_open;
      const int64_t vote = busy ? (filling.empty() ? 1 : kPrefillVote) : 0;
      const int64_t votes = lockstep ? m.par.all_sum(vote) : vote;
      if (votes == 0) break;
      m.low_latency_pass = m.low_latency_ready && votes < kPrefillVote;
      st.low_latency_passes += m.low_latency_pass ? 1 : 0;
      // Handed-off requests join between decoding steps, as many as fit.
      while (static_cast<int64_t>(running.size()) < m.o.max_batch && admit_handoff()) {
      }
      if (!filling.empty()) {
        prefill_pass();
      } else if (!(!running.empty() && decode_step()) && lockstep) {
        m.idle_pass();
        st.idle_steps += 1;
      }
    }
  }

  // A lockstep pass with nothing of this rank's (world > 1): one dummy token (two with the draft,
  // so that it replays the batch-1 decoding graphs) at the idle sequence's first positions, whose
  // MoE layers take part in the other ranks' exchanges. The sequence holds exactly the pass's
  // tokens, so that its attention reads only rows the pass itself wrote.
  void idle_pass() {
    const int64_t queries = o.mtp_draft ? 2 : 1;
    PageAllocator& pages = cache->pages();
    if (pages.length(idle_seq) > queries) pages.shrink(idle_seq, queries);
    FM_CHECK(pages.grow(idle_seq, queries), "GeneratorGpu: the idle sequence lost its page");
    const int32_t ids[2] = {0, 0}, pos[2] = {0, 1};
    run(Pass::kMain, {idle_seq}, ids, pos, queries, o.mtp_draft, nullptr);
    if (o.mtp_draft) run(Pass::kDraft, {idle_seq}, ids, pos, queries, true, nullptr, true);
  }
};

GeneratorGpu::GeneratorGpu(Model& cpu, const GeneratorOptions& o)
    : GeneratorGpu(cpu, o, GeneratorParallel{}) {}

GeneratorGpu::GeneratorGpu(const ModelConfig& config, const GeneratorOptions& o,
                           const std::function<void(ModelGpu&)>& load)
    : GeneratorGpu(config, o, load, GeneratorParallel{}) {}

GeneratorGpu::GeneratorGpu(Model& cpu, const GeneratorOptions& o, const GeneratorParallel& par)
    : GeneratorGpu(
          cpu.config(), o, [&cpu](ModelGpu& gpu) { gpu.upload(cpu); }, par) {}

GeneratorGpu::GeneratorGpu(const ModelConfig& config, const GeneratorOptions& o,
                           const std::function<void(ModelGpu&)>& load, const GeneratorParallel& par)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.o = o;
  m.par = par;
  m.config = config;
  FM_CHECK_ARG(par.model.world == 1 || par.all_sum, "GeneratorGpu: ", par.model.world,
               " ranks need GeneratorParallel::all_sum");
  FM_CHECK_ARG(o.max_batch > 0, "GeneratorGpu: max_batch=", o.max_batch, " must be positive");
  FM_CHECK_ARG(o.prefill_batch >= 1, "GeneratorGpu: prefill_batch=", o.prefill_batch,
               " must be >= 1");
  FM_CHECK_ARG(o.prefill_chunk > 0, "GeneratorGpu: prefill_chunk=", o.prefill_chunk,
               " must be positive");
  FM_CHECK_ARG(o.context >= 2 && o.context <= m.config.max_position_embeddings,
               "GeneratorGpu: context=", o.context,
               " outside [2, max_position_embeddings=", m.config.max_position_embeddings, "]");
  FM_CHECK_ARG(o.page_tokens > 0 && o.page_tokens % 64 == 0,
               "GeneratorGpu: page_tokens=", o.page_tokens, " must be a positive multiple of 64");
  m.step_tokens = std::max(2 * o.max_batch, o.prefill_chunk);
  m.vocab = m.config.vocab_size;
  int dev = 0;
  FM_CHECK_CUDA(cudaGetDevice(&dev));
  FM_CHECK_CUDA(cudaDeviceGetAttribute(&m.sms, cudaDevAttrMultiProcessorCount, dev));
  m.model = std::make_unique<ModelGpu>(m.config, m.step_tokens, 1, par.model, o.context);
  load(*m.model);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  m.model->refresh(nullptr);
  m.model->reserve_decode(m.step_tokens, o.tensor_core_products);
  if (o.low_latency_ep && 2 * o.max_batch <= 1024) {
    m.model->reserve_low_latency_ep(2 * o.max_batch);
    m.low_latency_ready = true;
  }
  PagedCacheOptions co;
  co.page_tokens = o.page_tokens;
  co.max_pages_per_seq = (o.context + o.page_tokens - 1) / o.page_tokens;
  co.num_pages = o.num_pages > 0 ? o.num_pages : o.max_batch * co.max_pages_per_seq;
  const bool lockstep = par.model.world > 1;
  co.num_pages += lockstep ? 1 : 0;  // the idle sequence's page
  co.max_batch = o.max_batch;
  m.cache = std::make_unique<PagedLatentCacheGpu>(m.config, co);
  if (lockstep) {
    m.idle_seq = m.cache->pages().add_sequence();
    FM_CHECK(m.cache->pages().grow(m.idle_seq, 2), "GeneratorGpu: no page for the idle sequence");
    m.cache->pages().shrink(m.idle_seq, 0);  // its page stays; idle_pass sets the length
  }
  FM_CHECK_CUDA(cudaStreamCreateWithFlags(&m.stream, cudaStreamNonBlocking));
  // The attention workspace for every step shape, allocated once (graphs keep its address).
  MlaLatentCacheView shape_view;
  shape_view.page_tokens = co.page_tokens;
  shape_view.max_pages = co.max_pages_per_seq;
  const auto need = [&](int64_t batch, int64_t queries) {
    const kernels::MlaDecodeShape sh =
        m.model->attention(0).decode_shape(batch, queries, shape_view);
    return o.split_tokens > 0 ? kernels::mla_decode_plan_fixed(sh, o.split_tokens).workspace_bytes
                              : kernels::mla_decode_plan(sh, m.sms).workspace_bytes;
  };
  for (int64_t b = 1; b <= o.max_batch; ++b)
    m.ws_bytes = std::max({m.ws_bytes, need(b, 1), need(b, 2)});
  for (int64_t q = 1; q <= o.prefill_chunk; ++q) m.ws_bytes = std::max(m.ws_bytes, need(1, q));
  FM_CHECK_CUDA(cudaMalloc(&m.ws, std::max<size_t>(m.ws_bytes, 16)));
  for (int k = 0; k < Impl::kKinds; ++k) {
    m.decode_runs[k].assign(static_cast<size_t>(o.max_batch + 1), 0);
    m.graphs[k].assign(static_cast<size_t>(o.max_batch + 1), nullptr);
  }
  if (o.mtp_draft) set_mtp_draft(true);
  const size_t t4 = static_cast<size_t>(m.step_tokens) * 4;
  const size_t lb = static_cast<size_t>(m.step_tokens * m.vocab) * 2;
  FM_CHECK_CUDA(cudaMalloc(&m.d_ids, t4));
  FM_CHECK_CUDA(cudaMalloc(&m.d_pos, t4));
  FM_CHECK_CUDA(cudaMalloc(&m.d_logits, lb));
  FM_CHECK_CUDA(cudaMallocHost(&m.h_ids, t4));
  FM_CHECK_CUDA(cudaMallocHost(&m.h_pos, t4));
  FM_CHECK_CUDA(cudaMallocHost(&m.h_logits, lb));
  FM_CHECK_CUDA(cudaMallocHost(&m.h_status, 4));
  const size_t rows_bytes = static_cast<size_t>(m.step_tokens) * sizeof(kernels::SampleRow);
  FM_CHECK_CUDA(cudaMalloc(&m.d_rows, rows_bytes));
  FM_CHECK_CUDA(cudaMallocHost(&m.h_rows, rows_bytes));
  FM_CHECK_CUDA(cudaMalloc(&m.d_tok, 3 * t4));
  FM_CHECK_CUDA(cudaMallocHost(&m.h_tok, 3 * t4));
  FM_CHECK_CUDA(cudaMalloc(&m.d_index, 2 * t4));
  FM_CHECK_CUDA(cudaMallocHost(&m.h_index, 2 * t4));
  FM_CHECK_CUDA(cudaMalloc(&m.d_q, static_cast<size_t>(o.max_batch * m.vocab) * 2));
}

GeneratorGpu::~GeneratorGpu() = default;

int64_t GeneratorGpu::vocab() const {
  return impl_->vocab;
}

void GeneratorGpu::set_cuda_graphs(bool on) {
  impl_->o.cuda_graphs = on;
}

void GeneratorGpu::set_device_sampling(bool on) {
  impl_->o.device_sampling = on;
}

void GeneratorGpu::set_mtp_draft(bool on) {
  FM_CHECK_ARG(!on || impl_->model->mtp_depth() >= 1,
               "GeneratorGpu: an MTP draft needs a model with num_nextn_predict_layers >= 1 (this "
               "one has ",
               impl_->model->mtp_depth(), ")");
  impl_->o.mtp_draft = on;
}

std::vector<std::vector<int32_t>> GeneratorGpu::generate(
    const std::vector<std::vector<int32_t>>& prompts, const SamplingOptions& s,
    GenerationStats* stats, const std::vector<int64_t>& request_ids) {
  Impl& m = *impl_;
  FM_CHECK_ARG(s.max_new_tokens >= 0, "GeneratorGpu::generate: max_new_tokens=", s.max_new_tokens,
               " must be >= 0");
  FM_CHECK_ARG(s.temperature >= 0 && s.top_p > 0 && s.top_p <= 1,
               "GeneratorGpu::generate: temperature must be >= 0 and top_p in (0, 1]");
  FM_CHECK_ARG(request_ids.empty() || request_ids.size() == prompts.size(),
               "GeneratorGpu::generate: ", request_ids.size(), " request ids for ", prompts.size(),
               " prompts");
  for (size_t r = 0; r < prompts.size(); ++r) {
    FM_CHECK_ARG(!prompts[r].empty(), "GeneratorGpu::generate: prompt ", r, " is empty");
    for (int32_t id : prompts[r])
      FM_CHECK_ARG(id >= 0 && id < m.vocab, "GeneratorGpu::generate: prompt ", r, " holds token ",
                   id, " outside the vocabulary [0, ", m.vocab, ")");
    FM_CHECK_ARG(request_ids.empty() || request_ids[r] >= 0, "GeneratorGpu::generate: request id ",
                 request_ids.empty() ? 0 : request_ids[r], " of prompt ", r, " is negative");
  }
  std::vector<Request> req;
  req.reserve(prompts.size());
  for (size_t r = 0; r < prompts.size(); ++r) {
    std::vector<int32_t> p = prompts[r];
    // NOTE: as the CPU generator's window rule: an overlong prompt keeps its last context / 2.
    if (static_cast<int64_t>(p.size()) >= m.o.context)
      p.erase(p.begin(), p.end() - m.o.context / 2);
    const uint64_t id = request_ids.empty() ? r : static_cast<uint64_t>(request_ids[r]);
    Request q;
    q.prompt = std::move(p);
    q.rng = PhiloxStream(s.seed, 7 + id);
    q.id = id;
    q.s = s;
    req.push_back(std::move(q));
  }
  GenerationStats st;
  const double t0 = now_s();
  for (Request& q : req) q.arrival = t0;
  m.model->reset_expert_load_totals(m.stream);
  m.loop(req, st, nullptr);
  st.expert_load = m.model->expert_load_totals();
  if (stats != nullptr) *stats = st;
  std::vector<std::vector<int32_t>> out;
  out.reserve(req.size());
  for (Request& q : req) out.push_back(std::move(q.out));
  return out;
}

void GeneratorGpu::serve(const RequestSource& next, const TokenSink& emit, GenerationStats* stats) {
  Impl& m = *impl_;
  std::vector<Request> req;
  Impl::Io io;
  io.arrive = [&](Request* q, bool wait) {
    for (;;) {
      ServeRequest r;
      const Arrival got = next(&r, wait);
      if (got == Arrival::kClosed) return -1;
      if (got == Arrival::kNone) return 0;
      // A bad request is refused (reported to the sink), never the end of the loop.
      std::string error;
      if (r.prompt.empty()) error = "empty prompt";
      for (int32_t t : r.prompt)
        if (error.empty() && (t < 0 || t >= m.vocab))
          error = "token " + std::to_string(t) + " outside the vocabulary [0, " +
                  std::to_string(m.vocab) + ")";
      if (error.empty() && r.sampling.max_new_tokens < 1) error = "max_new_tokens must be >= 1";
      if (error.empty() &&
          !(r.sampling.temperature >= 0 && r.sampling.top_p > 0 && r.sampling.top_p <= 1))
        error = "temperature must be >= 0 and top_p in (0, 1]";
      if (!error.empty()) {
        emit(TokenEvent{r.id, -1, true, error});
        continue;
      }
      q->prompt = std::move(r.prompt);
      q->id = static_cast<uint64_t>(r.id);
      q->s = r.sampling;
      q->arrival = r.arrival > 0 ? r.arrival : now_s();
      return 1;
    }
  };
  io.emit = [&](const Request& q, int32_t token, bool done) {
    emit(TokenEvent{static_cast<int64_t>(q.id), token, done, {}});
  };
  GenerationStats st;
  m.model->reset_expert_load_totals(m.stream);
  m.loop(req, st, &io);
  st.expert_load = m.model->expert_load_totals();
  if (stats != nullptr) *stats = st;
}

int64_t GeneratorGpu::handoff_row_elems() const {
  const ModelConfig& c = impl_->config;
  return (c.num_hidden_layers + c.num_nextn_predict_layers) * (c.kv_lora_rank + c.qk_rope_head_dim);
}

void GeneratorGpu::prefill_only(
    const std::vector<std::vector<int32_t>>& prompts, const SamplingOptions& s,
    const std::vector<int64_t>& request_ids,
    const std::function<void(const Handoff&, const HandoffWriter& write)>& deliver,
    GenerationStats* stats) {
  Impl& m = *impl_;
  FM_CHECK_ARG(m.o.device_sampling && m.par.model.world == 1,
               "GeneratorGpu::prefill_only: disaggregated serving needs device sampling and one "
               "rank");
  FM_CHECK_ARG(request_ids.size() == prompts.size(),
               "GeneratorGpu::prefill_only: ", request_ids.size(), " request ids for ",
               prompts.size(), " prompts");
  std::vector<Request> req;
  for (size_t r = 0; r < prompts.size(); ++r) {
    FM_CHECK_ARG(!prompts[r].empty(), "GeneratorGpu::prefill_only: prompt ", r, " is empty");
    for (int32_t id : prompts[r])
      FM_CHECK_ARG(id >= 0 && id < m.vocab, "GeneratorGpu::prefill_only: prompt ", r,
                   " holds token ", id, " outside the vocabulary [0, ", m.vocab, ")");
    Request q;
    q.prompt = prompts[r];
    if (static_cast<int64_t>(q.prompt.size()) >= m.o.context)
      q.prompt.erase(q.prompt.begin(), q.prompt.end() - m.o.context / 2);
    q.id = static_cast<uint64_t>(request_ids[r]);
    q.s = s;
    req.push_back(std::move(q));
  }
  const double t0 = now_s();
  for (Request& q : req) q.arrival = t0;
  Impl::Io io;
  io.deliver = [&](const Handoff& h, int seq, int slot) {
    deliver(h, [&](bf16* rows, bf16* q_row) {
      m.cache->copy_rows(seq, h.length, rows, false, m.stream);
      if (q_row != nullptr && slot >= 0)
        FM_CHECK_CUDA(cudaMemcpyAsync(q_row, m.d_q + slot * m.vocab,
                                      static_cast<size_t>(m.vocab) * 2, cudaMemcpyDefault,
                                      m.stream));
      FM_CHECK_CUDA(cudaStreamSynchronize(m.stream));
    });
  };
  GenerationStats st;
  m.loop(req, st, &io);
  if (stats != nullptr) *stats = st;
}

std::vector<std::pair<int64_t, std::vector<int32_t>>> GeneratorGpu::decode_only(
    const SamplingOptions& s, const HandoffTaker& take,
    const std::function<void(const Handoff&)>& taken, GenerationStats* stats) {
  Impl& m = *impl_;
  FM_CHECK_ARG(m.o.device_sampling && m.par.model.world == 1,
               "GeneratorGpu::decode_only: disaggregated serving needs device sampling and one "
               "rank");
  std::vector<Request> req;
  Impl::Io io;
  io.take = take;
  io.taken = taken;
  io.handoff_s = s;
  GenerationStats st;
  m.loop(req, st, &io);
  if (stats != nullptr) *stats = st;
  std::vector<std::pair<int64_t, std::vector<int32_t>>> out;
  for (Request& q : req) out.emplace_back(static_cast<int64_t>(q.id), std::move(q.out));
  return out;
}

GeneratorParallel job_parallel(comm::GpuJob& job) {
  GeneratorParallel par;
  par.model.rank = job.rank;
  par.model.world = job.world;
  if (job.world == 1) return par;
#if defined(FP8MOE_HAVE_NCCL)
  par.model.make_ep_rank = [&job](int block, const comm::EpConfig& cfg) {
    return comm::make_job_ep_rank(job, block, cfg);
  };
  // One int on the device a call, reduced over NCCL: the iteration's host wait is there anyway.
  struct Sum {
    int32_t *d = nullptr, *h = nullptr;
    cudaStream_t stream = nullptr;
    ~Sum() {
      cudaFree(d);
      cudaFreeHost(h);
      if (stream != nullptr) cudaStreamDestroy(stream);
    }
  };
  auto sum = std::make_shared<Sum>();
  FM_CHECK_CUDA(cudaMalloc(&sum->d, 4));
  FM_CHECK_CUDA(cudaMallocHost(&sum->h, 4));
  FM_CHECK_CUDA(cudaStreamCreateWithFlags(&sum->stream, cudaStreamNonBlocking));
  par.all_sum = [&job, sum](int64_t value) {
    FM_CHECK_ARG(value >= 0 && value <= (1 << 30) / job.world, "job_parallel: all_sum of ", value,
                 " would overflow its int32");
    *sum->h = static_cast<int32_t>(value);
    FM_CHECK_CUDA(cudaMemcpyAsync(sum->d, sum->h, 4, cudaMemcpyHostToDevice, sum->stream));
    comm::nccl_all_reduce(job.nccl, sum->d, 1, comm::ReduceOp::kSum, sum->stream);
    FM_CHECK_CUDA(cudaMemcpyAsync(sum->h, sum->d, 4, cudaMemcpyDeviceToHost, sum->stream));
    FM_CHECK_CUDA(cudaStreamSynchronize(sum->stream));
    return static_cast<int64_t>(*sum->h);
  };
#else
  FM_THROW(ErrorKind::kInvalidArgument, "GeneratorGpu over ", job.world,
           " ranks needs NCCL: this build has none");
#endif
  return par;
}

}  // namespace fp8moe::serve
