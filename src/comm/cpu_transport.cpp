// CPU-threads back end of expert-parallel dispatch/combine (fp8moe/comm/cpu_transport.h): R
// ranks as threads, the two-stage route through per-node forwarders, counters with
// acquire/release semantics and bounded waits. Checked against dispatch_reference /
// combine_reference in tests/comm/cpu_transport_test.cpp, combine_backward_reference in
// tests/comm/combine_backward_test.cpp.
#include "fp8moe/comm/cpu_transport.h"

#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>

#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"

namespace fp8moe::comm {

namespace {

// One mailbox region: its contents are published by `arrived` (the writer's epoch) and freed for
// the next epoch by `consumed` (the reader's epoch).
struct Flag {
  std::atomic<uint64_t> arrived{0};
  std::atomic<uint64_t> consumed{0};
};

// A region of up to Tmax tokens as a sender or forwarder writes it.
struct TokenRegion {
  int32_t count = 0;
  std::vector<int32_t> src_token;  // [Tmax]
  std::vector<int32_t> topk;       // [Tmax * K] global ids (forward) or local ids (recv)
  std::vector<float> weight;       // [Tmax * K]
  std::vector<uint16_t> x_bf16;    // [Tmax * H]
  std::vector<uint8_t> x_fp8;      // [Tmax * H]
  std::vector<float> scales;       // [Tmax * H/128]
  void init(const EpConfig& cfg) {
    const int64_t T = cfg.max_tokens_per_rank;
    src_token.assign(T, -1);
    topk.assign(T * cfg.top_k, -1);
    weight.assign(T * cfg.top_k, 0.0f);
    if (cfg.payload == Payload::kBF16) {
      x_bf16.assign(T * cfg.hidden, 0);
    } else {
      x_fp8.assign(T * cfg.hidden, 0);
      scales.assign(T * cfg.scale_cols(), 0.0f);
    }
  }
};

struct RankBoxes {
  std::vector<TokenRegion> fwd_in;  // [R] stage 1: tokens from source s (forwarder role)
  std::vector<Flag> fwd_flag;       // [R]
  std::vector<TokenRegion> recv;    // [R] stage 2: tokens of source s (receiver role)
  std::vector<Flag> recv_flag;      // [R]
  std::vector<uint16_t> cg;         // [R src][G][Tmax][H] expert partials (forwarder role)
  std::vector<Flag> cg_flag;        // [R * G]
  std::vector<uint16_t> cr;         // [nodes][Tmax][H] node sums (source role)
  std::vector<Flag> cr_flag;        // [nodes]
  // Combine backward (allocated on its first call): grad_out rows on dispatch's route, the K
  // gate-weight gradients of each slot back on combine's.
  std::vector<uint16_t> bg_fwd;    // [R src][Tmax][H] rows of source s by node slot (forwarder)
  std::vector<Flag> bg_fwd_flag;   // [R]
  std::vector<uint16_t> bg_recv;   // [R src][Tmax][H] rows of source s by slot (receiver)
  std::vector<Flag> bg_recv_flag;  // [R]
  std::vector<float> bw;           // [R src][G][Tmax][K] grad_w from rank dl (forwarder)
  std::vector<uint8_t> bw_mine;    // [R src][G][Tmax][K] 1 where rank dl owns slot k
  std::vector<Flag> bw_flag;       // [R * G]
  std::vector<float> bwr;          // [nodes][Tmax][K] grad_w by node slot (source)
  std::vector<uint8_t> bwr_mine;   // [nodes][Tmax][K]
  std::vector<Flag> bwr_flag;      // [nodes]
};

}  // namespace

class CpuGroupState {
 public:
  explicit CpuGroupState(const EpConfig& c) : cfg(c), boxes(c.num_ranks) {
    validate(cfg);
    const int R = cfg.num_ranks, G = cfg.ranks_per_node(), N = cfg.nodes();
    const int64_t T = cfg.max_tokens_per_rank, H = cfg.hidden;
    for (auto& b : boxes) {
      b.fwd_in.resize(R);
      b.recv.resize(R);
      for (int s = 0; s < R; ++s) {
        b.fwd_in[s].init(cfg);
        b.recv[s].init(cfg);
      }
      b.fwd_flag = std::vector<Flag>(R);
      b.recv_flag = std::vector<Flag>(R);
      b.cg.assign(static_cast<size_t>(R) * G * T * H, 0);
      b.cg_flag = std::vector<Flag>(static_cast<size_t>(R) * G);
      b.cr.assign(static_cast<size_t>(N) * T * H, 0);
      b.cr_flag = std::vector<Flag>(N);
    }
  }
  // NOTE: the backward mailboxes double the group's memory (2 x R x Tmax x H BF16 per rank), so
  // only groups that run a backward pay for them; call_once makes the first caller allocate
  // them for every rank while the others wait.
  void ensure_backward_boxes() {
    std::call_once(backward_once, [this] {
      const int R = cfg.num_ranks, G = cfg.ranks_per_node(), N = cfg.nodes(), K = cfg.top_k;
      const size_t T = static_cast<size_t>(cfg.max_tokens_per_rank);
      const size_t H = static_cast<size_t>(cfg.hidden);
      for (auto& b : boxes) {
        b.bg_fwd.assign(R * T * H, 0);
        b.bg_fwd_flag = std::vector<Flag>(R);
        b.bg_recv.assign(R * T * H, 0);
        b.bg_recv_flag = std::vector<Flag>(R);
        b.bw.assign(static_cast<size_t>(R) * G * T * K, 0.0f);
        b.bw_mine.assign(static_cast<size_t>(R) * G * T * K, 0);
        b.bw_flag = std::vector<Flag>(static_cast<size_t>(R) * G);
        b.bwr.assign(N * T * K, 0.0f);
        b.bwr_mine.assign(N * T * K, 0);
        b.bwr_flag = std::vector<Flag>(N);
      }
    });
  }
  EpConfig cfg;
  std::vector<RankBoxes> boxes;
  std::once_flag backward_once;
};

namespace {

class CpuRank final : public EpRank {
 public:
  CpuRank(std::shared_ptr<CpuGroupState> st, int r) : st_(std::move(st)), cfg_(st_->cfg), me_(r) {}
  int rank() const override { return me_; }
  const EpConfig& config() const override { return cfg_; }
  DispatchResult dispatch(const TokenBatch& batch) override;
  std::vector<uint16_t> combine(const DispatchResult& d, const uint16_t* y) override;
  std::vector<uint16_t> combine_tokens(const DispatchResult& d, const uint16_t* rows) override;
  RankCombineBackward combine_backward(const DispatchResult& d, std::span<const uint16_t> grad_out,
                                       std::span<const uint16_t> y) override;

 private:
  // Bounded spin-wait; the message names this rank, the peer and the counter.
  void wait(const std::atomic<uint64_t>& counter, uint64_t expected, int peer,
            const std::string& name) const {
    using Clock = std::chrono::steady_clock;
    const auto deadline = Clock::now() + std::chrono::duration<double>(cfg_.timeout_s);
    for (uint64_t spins = 0;; ++spins) {
      const uint64_t seen = counter.load(std::memory_order_acquire);
      if (seen >= expected) return;
      if ((spins & 255) == 255) {
        if (Clock::now() > deadline)
          FM_THROW(ErrorKind::kRuntime, "rank ", me_, ": peer ", peer, " did not answer within ",
                   cfg_.timeout_s, " s: waited on ", name, ", expected >= ", expected, ", seen ",
                   seen);
        std::this_thread::yield();
      }
    }
  }
  std::string counter_name(const char* what, int owner, int src, int extra = -1) const {
    std::string s =
        std::string(what) + "[rank=" + std::to_string(owner) + "][src=" + std::to_string(src) + "]";
    if (extra >= 0) s += "[local=" + std::to_string(extra) + "]";
    return s;
  }
  std::vector<uint16_t> combine_impl(const DispatchResult& d, const uint16_t* y, bool weighted);

  std::shared_ptr<CpuGroupState> st_;
  const EpConfig& cfg_;
  int me_;
  uint64_t dispatch_epoch_ = 0, combine_epoch_ = 0, backward_epoch_ = 0;
};

DispatchResult CpuRank::dispatch(const TokenBatch& b) {
  const uint64_t n = ++dispatch_epoch_;
  const int R = cfg_.num_ranks, K = cfg_.top_k, G = cfg_.ranks_per_node(), N = cfg_.nodes();
  const int L = cfg_.experts_per_rank();
  const int64_t H = cfg_.hidden, SC = cfg_.scale_cols(), Tmax = cfg_.max_tokens_per_rank;
  const bool fp8 = cfg_.payload == Payload::kFP8;
  DispatchResult res;
  res.handle = make_send_handle(cfg_, me_, b);
  SendHandle& h = res.handle;

  // Stage 1: each token once to the forwarder of every node it touches (quantised once).
  h.node_slot.assign(b.tokens * N, -1);
  std::vector<uint8_t> codes(fp8 ? b.tokens * H : 0);
  std::vector<float> scales(fp8 ? b.tokens * SC : 0);
  if (fp8)
    for (int64_t t = 0; t < b.tokens; ++t)
      quantize_row_fp8(&b.x[t * H], H, &codes[t * H], &scales[t * SC]);
  for (int m = 0; m < N; ++m) {
    const int f = cfg_.rank_at(m, cfg_.local_of(me_));
    Flag& flag = st_->boxes[f].fwd_flag[me_];
    wait(flag.consumed, n - 1, f, counter_name("dispatch.forward.consumed", f, me_));
    TokenRegion& reg = st_->boxes[f].fwd_in[me_];
    int32_t q = 0;
    for (int64_t t = 0; t < b.tokens; ++t) {
      bool hit = false;
      for (int d = m * G; d < (m + 1) * G; ++d) hit = hit || h.slot[t * R + d] >= 0;
      if (!hit) continue;
      h.node_slot[t * N + m] = q;
      reg.src_token[q] = static_cast<int32_t>(t);
      std::memcpy(&reg.topk[q * K], &b.topk_idx[t * K], K * sizeof(int32_t));
      std::memcpy(&reg.weight[q * K], &b.topk_weight[t * K], K * sizeof(float));
      if (fp8) {
        std::memcpy(&reg.x_fp8[q * H], &codes[t * H], H);
        std::memcpy(&reg.scales[q * SC], &scales[t * SC], SC * sizeof(float));
      } else {
        std::memcpy(&reg.x_bf16[q * H], &b.x[t * H], H * sizeof(uint16_t));
      }
      ++q;
    }
    reg.count = q;
    flag.arrived.store(n, std::memory_order_release);
  }

  // Stage 2 (forwarder role): tokens of every source with my local index go on to the ranks of
  // my node, in the order they came (ascending token), so slots equal the sender's numbering.
  const int my_node = cfg_.node_of(me_);
  res.forward.count.assign(R, 0);
  res.forward.slot.assign(static_cast<size_t>(R) * Tmax * G, -1);
  for (int s = cfg_.local_of(me_); s < R; s += G) {
    Flag& in_flag = st_->boxes[me_].fwd_flag[s];
    wait(in_flag.arrived, n, s, counter_name("dispatch.forward.arrived", me_, s));
    const TokenRegion& in = st_->boxes[me_].fwd_in[s];
    res.forward.count[s] = in.count;
    for (int dl = 0; dl < G; ++dl) {
      const int d = cfg_.rank_at(my_node, dl);
      Flag& out_flag = st_->boxes[d].recv_flag[s];
      wait(out_flag.consumed, n - 1, d, counter_name("dispatch.recv.consumed", d, s));
      TokenRegion& out = st_->boxes[d].recv[s];
      int32_t j = 0;
      for (int32_t q = 0; q < in.count; ++q) {
        bool hit = false;
        for (int k = 0; k < K; ++k) {
          const int32_t e = in.topk[q * K + k];
          const bool local = e >= d * L && e < (d + 1) * L;
          out.topk[j * K + k] = local ? e - d * L : -1;
          hit = hit || local;
        }
        if (!hit) continue;
        res.forward.slot[(s * Tmax + q) * G + dl] = j;
        out.src_token[j] = in.src_token[q];
        std::memcpy(&out.weight[j * K], &in.weight[q * K], K * sizeof(float));
        if (fp8) {
          std::memcpy(&out.x_fp8[j * H], &in.x_fp8[q * H], H);
          std::memcpy(&out.scales[j * SC], &in.scales[q * SC], SC * sizeof(float));
        } else {
          std::memcpy(&out.x_bf16[j * H], &in.x_bf16[q * H], H * sizeof(uint16_t));
        }
        ++j;
      }
      out.count = j;
      out_flag.arrived.store(n, std::memory_order_release);
    }
    in_flag.consumed.store(n, std::memory_order_release);
  }

  // Receive: copy every source region out of the mailbox, then lay the tokens out per expert.
  RecvTokens& r = res.recv;
  r.count.assign(R, 0);
  r.src_token.assign(Tmax * R, -1);
  r.topk_local.assign(Tmax * R * K, -1);
  r.topk_weight.assign(Tmax * R * K, 0.0f);
  if (fp8) {
    r.x_fp8.assign(Tmax * R * H, 0);
    r.x_scales.assign(Tmax * R * SC, 0.0f);
  } else {
    r.x_bf16.assign(Tmax * R * H, 0);
  }
  for (int s = 0; s < R; ++s) {
    Flag& flag = st_->boxes[me_].recv_flag[s];
    const int via = cfg_.rank_at(my_node, cfg_.local_of(s));
    wait(flag.arrived, n, via, counter_name("dispatch.recv.arrived", me_, s));
    const TokenRegion& in = st_->boxes[me_].recv[s];
    const int32_t c = in.count;
    r.count[s] = c;
    std::memcpy(&r.src_token[s * Tmax], in.src_token.data(), c * sizeof(int32_t));
    std::memcpy(&r.topk_local[s * Tmax * K], in.topk.data(), c * K * sizeof(int32_t));
    std::memcpy(&r.topk_weight[s * Tmax * K], in.weight.data(), c * K * sizeof(float));
    if (fp8) {
      std::memcpy(&r.x_fp8[s * Tmax * H], in.x_fp8.data(), c * H);
      std::memcpy(&r.x_scales[s * Tmax * SC], in.scales.data(), c * SC * sizeof(float));
    } else {
      std::memcpy(&r.x_bf16[s * Tmax * H], in.x_bf16.data(), c * H * sizeof(uint16_t));
    }
    flag.consumed.store(n, std::memory_order_release);
  }
  build_grouped_layout(cfg_, me_, r, res.grouped);
  fill_grouped_payload(cfg_, r, res.grouped);
  return res;
}

std::vector<uint16_t> CpuRank::combine_impl(const DispatchResult& dr, const uint16_t* y,
                                            bool weighted) {
  const uint64_t c = ++combine_epoch_;
  const int R = cfg_.num_ranks, G = cfg_.ranks_per_node(), N = cfg_.nodes();
  const int64_t H = cfg_.hidden, Tmax = cfg_.max_tokens_per_rank;
  FM_CHECK_ARG(!dr.grouped.overflow || !weighted, "rank ", me_,
               ": combine of a dispatch that overflowed its row bound (", dr.grouped.rows_needed,
               " rows needed, bound ", cfg_.row_bound(), ")");
  const int my_node = cfg_.node_of(me_), my_local = cfg_.local_of(me_);

  // Expert step: one partial per received token, to the forwarder of its source in my node.
  for (int s = 0; s < R; ++s) {
    const int f = cfg_.rank_at(my_node, cfg_.local_of(s));
    Flag& flag = st_->boxes[f].cg_flag[s * G + my_local];
    wait(flag.consumed, c - 1, f, counter_name("combine.gather.consumed", f, s, my_local));
    uint16_t* region = &st_->boxes[f].cg[((static_cast<size_t>(s) * G + my_local) * Tmax) * H];
    for (int32_t j = 0; j < dr.recv.count[s]; ++j) {
      if (weighted)
        expert_partial(cfg_, dr.grouped, dr.recv, s, j, y, region + j * H);
      else
        std::memcpy(region + j * H, y + (s * Tmax + j) * H, H * sizeof(uint16_t));
    }
    flag.arrived.store(c, std::memory_order_release);
  }

  // Forwarder step: node sums for every source with my local index, back to that source.
  std::vector<float> acc(H);
  for (int s = my_local; s < R; s += G) {
    for (int dl = 0; dl < G; ++dl)
      wait(st_->boxes[me_].cg_flag[s * G + dl].arrived, c, cfg_.rank_at(my_node, dl),
           counter_name("combine.gather.arrived", me_, s, dl));
    Flag& out_flag = st_->boxes[s].cr_flag[my_node];
    wait(out_flag.consumed, c - 1, s, counter_name("combine.return.consumed", s, my_node));
    uint16_t* out = &st_->boxes[s].cr[static_cast<size_t>(my_node) * Tmax * H];
    for (int32_t q = 0; q < dr.forward.count[s]; ++q) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int dl = 0; dl < G; ++dl) {
        const int32_t j = dr.forward.slot[(s * Tmax + q) * G + dl];
        if (j < 0) continue;
        const uint16_t* row =
            &st_->boxes[me_].cg[((static_cast<size_t>(s) * G + dl) * Tmax + j) * H];
        for (int64_t x = 0; x < H; ++x) acc[x] = acc[x] + bf16_bits_to_float(row[x]);
      }
      for (int64_t x = 0; x < H; ++x) out[q * H + x] = float_to_bf16_bits(acc[x]);
    }
    out_flag.arrived.store(c, std::memory_order_release);
    for (int dl = 0; dl < G; ++dl)
      st_->boxes[me_].cg_flag[s * G + dl].consumed.store(c, std::memory_order_release);
  }

  // Source step: sum the node rows in node order.
  const SendHandle& h = dr.handle;
  for (int m = 0; m < N; ++m)
    wait(st_->boxes[me_].cr_flag[m].arrived, c, cfg_.rank_at(m, my_local),
         counter_name("combine.return.arrived", me_, m));
  std::vector<uint16_t> result(h.tokens * H, 0);
  for (int64_t t = 0; t < h.tokens; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int m = 0; m < N; ++m) {
      const int32_t q = h.node_slot[t * N + m];
      if (q < 0) continue;
      const uint16_t* row = &st_->boxes[me_].cr[(static_cast<size_t>(m) * Tmax + q) * H];
      for (int64_t x = 0; x < H; ++x) acc[x] = acc[x] + bf16_bits_to_float(row[x]);
    }
    for (int64_t x = 0; x < H; ++x) result[t * H + x] = float_to_bf16_bits(acc[x]);
  }
  for (int m = 0; m < N; ++m)
    st_->boxes[me_].cr_flag[m].consumed.store(c, std::memory_order_release);
  return result;
}

std::vector<uint16_t> CpuRank::combine(const DispatchResult& d, const uint16_t* y) {
  return combine_impl(d, y, true);
}
std::vector<uint16_t> CpuRank::combine_tokens(const DispatchResult& d, const uint16_t* rows) {
  return combine_impl(d, rows, false);
}

RankCombineBackward CpuRank::combine_backward(const DispatchResult& dr,
                                              std::span<const uint16_t> grad_out,
                                              std::span<const uint16_t> y) {
  const int R = cfg_.num_ranks, K = cfg_.top_k, G = cfg_.ranks_per_node(), N = cfg_.nodes();
  const int64_t H = cfg_.hidden, Tmax = cfg_.max_tokens_per_rank;
  const SendHandle& h = dr.handle;
  check_combine_backward_args(cfg_, me_, dr, grad_out, y);
  FM_CHECK_ARG(static_cast<int64_t>(h.node_slot.size()) == h.tokens * N &&
                   static_cast<int64_t>(dr.forward.slot.size()) == R * Tmax * G,
               "rank ", me_,
               ": combine_backward needs this group's dispatch result (its forwarding handles)");
  st_->ensure_backward_boxes();
  const uint64_t b = ++backward_epoch_;
  const int my_node = cfg_.node_of(me_), my_local = cfg_.local_of(me_);
  RankBoxes& own = st_->boxes[me_];

  // Source step: each grad_out row once to the forwarder of every node its token went to, at
  // the token's node slot.
  for (int m = 0; m < N; ++m) {
    const int f = cfg_.rank_at(m, my_local);
    Flag& flag = st_->boxes[f].bg_fwd_flag[me_];
    wait(flag.consumed, b - 1, f, counter_name("combine_bwd.rows.forward.consumed", f, me_));
    uint16_t* region = &st_->boxes[f].bg_fwd[static_cast<size_t>(me_) * Tmax * H];
    for (int64_t t = 0; t < h.tokens; ++t) {
      const int32_t q = h.node_slot[t * N + m];
      if (q >= 0) std::memcpy(region + q * H, grad_out.data() + t * H, H * sizeof(uint16_t));
    }
    flag.arrived.store(b, std::memory_order_release);
  }

  // Forwarder step: rows of every source with my local index on to the ranks of my node, into
  // the slots the dispatch gave their tokens there.
  for (int s = my_local; s < R; s += G) {
    Flag& in_flag = own.bg_fwd_flag[s];
    wait(in_flag.arrived, b, s, counter_name("combine_bwd.rows.forward.arrived", me_, s));
    const uint16_t* in = &own.bg_fwd[static_cast<size_t>(s) * Tmax * H];
    for (int dl = 0; dl < G; ++dl) {
      const int d = cfg_.rank_at(my_node, dl);
      Flag& out_flag = st_->boxes[d].bg_recv_flag[s];
      wait(out_flag.consumed, b - 1, d, counter_name("combine_bwd.rows.recv.consumed", d, s));
      uint16_t* out = &st_->boxes[d].bg_recv[static_cast<size_t>(s) * Tmax * H];
      for (int32_t q = 0; q < dr.forward.count[s]; ++q) {
        const int32_t j = dr.forward.slot[(s * Tmax + q) * G + dl];
        if (j >= 0) std::memcpy(out + j * H, in + q * H, H * sizeof(uint16_t));
      }
      out_flag.arrived.store(b, std::memory_order_release);
    }
    in_flag.consumed.store(b, std::memory_order_release);
  }

  // Expert step: grad_y rows here, the slot's K scalars to the forwarder of its source.
  RankCombineBackward res;
  res.grad_y.assign(static_cast<size_t>(cfg_.row_bound() * H), 0);
  for (int s = 0; s < R; ++s) {
    Flag& in_flag = own.bg_recv_flag[s];
    const int via = cfg_.rank_at(my_node, cfg_.local_of(s));
    wait(in_flag.arrived, b, via, counter_name("combine_bwd.rows.recv.arrived", me_, s));
    Flag& out_flag = st_->boxes[via].bw_flag[s * G + my_local];
    wait(out_flag.consumed, b - 1, via,
         counter_name("combine_bwd.w.gather.consumed", via, s, my_local));
    const size_t at = (static_cast<size_t>(s) * G + my_local) * Tmax * K;
    float* w_out = &st_->boxes[via].bw[at];
    uint8_t* mine_out = &st_->boxes[via].bw_mine[at];
    for (int32_t j = 0; j < dr.recv.count[s]; ++j)
      expert_grad(cfg_, dr.grouped, dr.recv, s, j, &own.bg_recv[(s * Tmax + j) * H], y.data(),
                  res.grad_y.data(), w_out + j * K, mine_out + j * K);
    out_flag.arrived.store(b, std::memory_order_release);
    in_flag.consumed.store(b, std::memory_order_release);
  }

  // Forwarder step: per forwarded token, each k from the one rank of my node that owns it (none:
  // +0, the slot's expert is on another node or dropped), back to the source.
  for (int s = my_local; s < R; s += G) {
    for (int dl = 0; dl < G; ++dl)
      wait(own.bw_flag[s * G + dl].arrived, b, cfg_.rank_at(my_node, dl),
           counter_name("combine_bwd.w.gather.arrived", me_, s, dl));
    Flag& out_flag = st_->boxes[s].bwr_flag[my_node];
    wait(out_flag.consumed, b - 1, s, counter_name("combine_bwd.w.return.consumed", s, my_node));
    const size_t base = static_cast<size_t>(my_node) * Tmax * K;
    float* w_out = &st_->boxes[s].bwr[base];
    uint8_t* mine_out = &st_->boxes[s].bwr_mine[base];
    for (int32_t q = 0; q < dr.forward.count[s]; ++q) {
      std::fill(w_out + q * K, w_out + (q + 1) * K, 0.0f);
      std::fill(mine_out + q * K, mine_out + (q + 1) * K, 0);
      for (int dl = 0; dl < G; ++dl) {
        const int32_t j = dr.forward.slot[(s * Tmax + q) * G + dl];
        if (j < 0) continue;
        const size_t at = ((static_cast<size_t>(s) * G + dl) * Tmax + j) * K;
        for (int k = 0; k < K; ++k)
          if (own.bw_mine[at + k]) {
            w_out[q * K + k] = own.bw[at + k];
            mine_out[q * K + k] = 1;
          }
      }
    }
    out_flag.arrived.store(b, std::memory_order_release);
    for (int dl = 0; dl < G; ++dl)
      own.bw_flag[s * G + dl].consumed.store(b, std::memory_order_release);
  }

  // Source step: each slot's gradient from the node that owns its expert.
  for (int m = 0; m < N; ++m)
    wait(own.bwr_flag[m].arrived, b, cfg_.rank_at(m, my_local),
         counter_name("combine_bwd.w.return.arrived", me_, m));
  res.grad_w.assign(static_cast<size_t>(h.tokens * K), 0.0f);
  for (int64_t t = 0; t < h.tokens; ++t)
    for (int m = 0; m < N; ++m) {
      const int32_t q = h.node_slot[t * N + m];
      if (q < 0) continue;
      const size_t at = (static_cast<size_t>(m) * Tmax + q) * K;
      for (int k = 0; k < K; ++k)
        if (own.bwr_mine[at + k]) res.grad_w[t * K + k] = own.bwr[at + k];
    }
  for (int m = 0; m < N; ++m) own.bwr_flag[m].consumed.store(b, std::memory_order_release);
  return res;
}

}  // namespace

CpuThreadGroup::CpuThreadGroup(const EpConfig& cfg)
    : state_(std::make_shared<CpuGroupState>(cfg)) {}
CpuThreadGroup::~CpuThreadGroup() = default;
const EpConfig& CpuThreadGroup::config() const {
  return state_->cfg;
}
std::unique_ptr<EpRank> CpuThreadGroup::rank(int r) {
  FM_CHECK_ARG(r >= 0 && r < state_->cfg.num_ranks, "rank ", r, " out of range [0, ",
               state_->cfg.num_ranks, ")");
  return std::make_unique<CpuRank>(state_, r);
}

}  // namespace fp8moe::comm
