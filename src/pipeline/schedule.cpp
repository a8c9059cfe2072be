// Schedule generators for 1F1B, ZB-H1, DualPipe and DualPipeV, and the schedule's text and JSON
// forms. DualPipe/DualPipeV are checked operation for operation against the public reference's
// orders in tests/pipeline/fixtures (scripts/pipeline/dump_reference_orders.py made them).
// Test: build-pipeline/tests/test_pipeline --gtest_filter='Schedule*'
#include "fp8moe/pipeline/schedule.h"

#include <array>
#include <charconv>
#include <deque>

namespace fp8moe::pipeline {

const char* method_name(Method method) {
  switch (method) {
    case Method::k1F1B:
      return "1f1b";
    case Method::kZB1P:
      return "zb1p";
    case Method::kDualPipe:
      return "dualpipe";
    case Method::kDualPipeV:
      return "dualpipev";
  }
  return "?";
}

Method parse_method(std::string_view name) {
  for (Method m : kAllMethods)
    if (name == method_name(m)) return m;
  FM_THROW(ErrorKind::kInvalidArgument, "unknown pipeline method '", name,
           "' (expected 1f1b, zb1p, dualpipe or dualpipev)");
}

namespace {

char kind_letter(OpKind kind) {
  switch (kind) {
    case OpKind::kF:
      return 'F';
    case OpKind::kB:
      return 'B';
    case OpKind::kI:
      return 'I';
    case OpKind::kW:
      return 'W';
  }
  return '?';
}

bool parse_int(std::string_view text, int& out) {
  if (text.empty()) return false;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), out);
  return ec == std::errc() && end == text.data() + text.size() && out >= 0;
}

Op parse_op(std::string_view text, std::string_view whole) {
  Op op;
  const size_t dot = text.find('.');
  bool ok = text.size() >= 4 && dot != std::string_view::npos;
  if (ok) {
    switch (text[0]) {
      case 'F':
        op.kind = OpKind::kF;
        break;
      case 'B':
        op.kind = OpKind::kB;
        break;
      case 'I':
        op.kind = OpKind::kI;
        break;
      case 'W':
        op.kind = OpKind::kW;
        break;
      default:
        ok = false;
    }
  }
  ok = ok && parse_int(text.substr(1, dot - 1), op.chunk) &&
       parse_int(text.substr(dot + 1), op.micro);
  if (!ok)
    FM_THROW(ErrorKind::kFormat, "bad pipeline operation '", whole,
             "' (expected F<chunk>.<micro>, B, I or W likewise, or two joined by '|')");
  return op;
}

// ---- 1F1B and ZB-H1 ----------------------------------------------------------------------

// Rank r runs P-1-r warm-up forwards, then alternates forward and backward, then drains the
// backwards. With `split` (ZB-H1), each backward is I and its W waits behind `w_delay` later
// backwards, w_delay = r: a deeper rank passes input gradients up sooner (the cool-down's
// critical path then runs through I alone) and runs the deferred Ws in its own tail, which would
// otherwise sit idle while the shallower ranks finish. In-flight activations stay 1F1B's.
std::vector<Step> one_f_one_b_rank(int ranks, int micro_batches, int rank, bool split) {
  std::vector<Step> out;
  std::deque<int> pending_w;
  const int warmup = std::min(ranks - 1 - rank, micro_batches);
  const int w_delay = rank;
  auto backward = [&](int m) {
    if (!split) {
      out.push_back({{OpKind::kB, 0, m}, {}});
      return;
    }
    out.push_back({{OpKind::kI, 0, m}, {}});
    pending_w.push_back(m);
    if (static_cast<int>(pending_w.size()) > w_delay) {
      out.push_back({{OpKind::kW, 0, pending_w.front()}, {}});
      pending_w.pop_front();
    }
  };
  for (int m = 0; m < warmup; ++m) out.push_back({{OpKind::kF, 0, m}, {}});
  for (int j = 0; j < micro_batches - warmup; ++j) {
    out.push_back({{OpKind::kF, 0, warmup + j}, {}});
    backward(j);
  }
  for (int j = micro_batches - warmup; j < micro_batches; ++j) backward(j);
  for (int m : pending_w) out.push_back({{OpKind::kW, 0, m}, {}});
  return out;
}

// ---- DualPipe and DualPipeV --------------------------------------------------------------

// Both methods run the same eight-phase order per rank, over a "half" of n ranks: DualPipe
// folds its P ranks in two (n = P/2, rank r and P-1-r behave alike, half_rank = min(r, P-1-r)),
// DualPipeV is the unfolded V (n = P, half_rank = r). A rank sees its two chunks as "phase 0"
// (the one whose micro-batches it meets first) and "phase 1"; `flip` maps phase to chunk (the
// second half of DualPipe's ranks meets chunk 1 first). `per_phase` micro-batches pass each
// chunk; `middle` marks the ranks where the two directions meet (DualPipe's ranks P/2-1 and
// P/2, DualPipeV's last rank), which do not pair their first forward with a backward.
class DualRankOrder {
 public:
  DualRankOrder(int n, int half_rank, int per_phase, bool middle, int flip)
      : n_(n), h_(half_rank), per_phase_(per_phase), middle_(middle), flip_(flip) {}

  std::vector<Step> build() {
    const int lead = n_ - h_ - 1;  // how far this rank is from the meeting point
    // Phase 1: fill the pipe from this rank's shallow side.
    for (int i = 0; i < 2 * lead; ++i) emit(forward(0));
    // Phase 2: alternate the two directions until the first backward can arrive.
    for (int i = 0; i < h_ + 1; ++i) {
      emit(forward(0));
      emit(forward(1));
    }
    // Phase 3: the first backwards of the deep chunk, split so that their weight gradients
    // fill the wait for the next forward.
    for (int i = 0; i < lead; ++i) {
      emit(backward(1, true));
      emit(weight());
      emit(forward(1));
    }
    // Phase 4 (steady state): forward of one chunk overlapped with backward of the other.
    const int steady = per_phase_ - 2 * n_ + h_ + 1;
    for (int i = 0; i < steady; ++i) {
      if (i == 0 && middle_) {
        // The meeting ranks run their first forward and backward one after the other, not as
        // a pair: the reference found this leaves a smaller bubble.
        emit(forward(0));
        emit(backward(1, false));
      } else {
        pair(0, 1);
      }
      pair(1, 0);
    }
    // Phase 5: the shallow side has no forwards left to overlap with.
    for (int i = 0; i < lead; ++i) {
      emit(backward(1, false));
      pair(1, 0);
    }
    // Phase 6: drain backwards of both chunks; the second half are split (zero bubble).
    bool split = false;
    const int drain = h_ + 1;
    for (int i = 0; i < drain; ++i) {
      if (i == drain / 2 && h_ % 2 == 1) split = true;
      emit(backward(1, split));
      if (i == drain / 2 && h_ % 2 == 0) split = true;
      emit(backward(0, split));
    }
    // Phase 7: weight gradients fill the waits between the last backwards of chunk 0.
    for (int i = 0; i < lead; ++i) {
      emit(weight());
      emit(backward(0, true));
    }
    // Phase 8: the remaining weight gradients.
    while (!pending_w_.empty()) emit(weight());
    return std::move(out_);
  }

 private:
  Op forward(int phase) {
    const int c = phase ^ flip_;
    return {OpKind::kF, c, next_f_[c]++};
  }
  Op backward(int phase, bool split) {
    const int c = phase ^ flip_;
    Op op{split ? OpKind::kI : OpKind::kB, c, next_b_[c]++};
    if (split) pending_w_.push_back({OpKind::kW, c, op.micro});
    return op;
  }
  Op weight() {
    FM_CHECK(!pending_w_.empty(), "DualPipe order: weight gradient with none pending");
    Op op = pending_w_.front();
    pending_w_.pop_front();
    return op;
  }
  void emit(Op op) { out_.push_back({op, {}}); }
  void pair(int forward_phase, int backward_phase) {
    Op f = forward(forward_phase);
    out_.push_back({f, backward(backward_phase, false)});
  }

  int n_, h_, per_phase_;
  bool middle_;
  int flip_;
  std::array<int, 2> next_f_{0, 0}, next_b_{0, 0};
  std::deque<Op> pending_w_;
  std::vector<Step> out_;
};

}  // namespace

std::string to_string(const Op& op) {
  return std::string(1, kind_letter(op.kind)) + std::to_string(op.chunk) + "." +
         std::to_string(op.micro);
}

std::string to_string(const Step& step) {
  std::string s = to_string(step.first);
  if (step.second) s += "|" + to_string(*step.second);
  return s;
}

Step parse_step(std::string_view text) {
  const size_t bar = text.find('|');
  if (bar == std::string_view::npos) return {parse_op(text, text), {}};
  return {parse_op(text.substr(0, bar), text), parse_op(text.substr(bar + 1), text)};
}

void check_supported(Method method, int ranks, int micro_batches) {
  const char* name = method_name(method);
  FM_CHECK_ARG(ranks >= 2, name, ": --ranks ", ranks, " must be at least 2");
  FM_CHECK_ARG(micro_batches >= 1, name, ": --micro-batches ", micro_batches,
               " must be at least 1");
  switch (method) {
    case Method::k1F1B:
    case Method::kZB1P:
      FM_CHECK_ARG(micro_batches >= ranks, name, " needs M >= P, got P=", ranks,
                   " M=", micro_batches);
      break;
    case Method::kDualPipe:
      FM_CHECK_ARG(ranks % 2 == 0, name, " needs an even number of ranks, got P=", ranks);
      FM_CHECK_ARG(micro_batches % 2 == 0 && micro_batches >= 2 * ranks, name,
                   " needs M even and M >= 2P, got P=", ranks, " M=", micro_batches);
      break;
    case Method::kDualPipeV:
      FM_CHECK_ARG(micro_batches >= 2 * ranks, name, " needs M >= 2P, got P=", ranks,
                   " M=", micro_batches);
      break;
  }
}

Schedule make_schedule(Method method, int ranks, int micro_batches) {
  check_supported(method, ranks, micro_batches);
  Schedule s{method, ranks, micro_batches, std::vector<std::vector<Step>>(ranks)};
  for (int r = 0; r < ranks; ++r) {
    switch (method) {
      case Method::k1F1B:
      case Method::kZB1P:
        s.ranks_ops[r] = one_f_one_b_rank(ranks, micro_batches, r, method == Method::kZB1P);
        break;
      case Method::kDualPipe: {
        const int half = ranks / 2;
        const bool second_half = r >= half;
        const bool middle = r == half - 1 || r == half;
        s.ranks_ops[r] = DualRankOrder(half, std::min(r, ranks - 1 - r), micro_batches / 2, middle,
                                       second_half ? 1 : 0)
                             .build();
        break;
      }
      case Method::kDualPipeV:
        s.ranks_ops[r] = DualRankOrder(ranks, r, micro_batches, r == ranks - 1, 0).build();
        break;
    }
  }
  return s;
}

OrderedJson schedule_to_json(const Schedule& schedule) {
  OrderedJson j;
  j["method"] = method_name(schedule.method);
  j["ranks"] = schedule.ranks;
  j["micro_batches"] = schedule.micro_batches;
  OrderedJson ranks = OrderedJson::array();
  for (const auto& ops : schedule.ranks_ops) {
    OrderedJson list = OrderedJson::array();
    for (const Step& step : ops) list.push_back(to_string(step));
    ranks.push_back(std::move(list));
  }
  j["ranks_ops"] = std::move(ranks);
  return j;
}

Schedule schedule_from_json(const Json& json, const std::string& context) {
  check_known_keys(json, {"method", "ranks", "micro_batches", "ranks_ops", "reference"}, context);
  Schedule s;
  s.method = parse_method(json_get<std::string>(json, "method", context));
  s.ranks = json_get<int>(json, "ranks", context);
  s.micro_batches = json_get<int>(json, "micro_batches", context);
  const auto lists = json_get<std::vector<std::vector<std::string>>>(json, "ranks_ops", context);
  FM_CHECK_ARG(static_cast<int>(lists.size()) == s.ranks, context, ": ranks_ops has ", lists.size(),
               " lists for ", s.ranks, " ranks");
  for (const auto& list : lists) {
    auto& out = s.ranks_ops.emplace_back();
    for (const auto& text : list) out.push_back(parse_step(text));
  }
  return s;
}

Topology::Topology(Method method, int ranks, int micro_batches)
    : method_(method), ranks_(ranks), micro_batches_(micro_batches) {
  FM_CHECK_ARG(ranks >= 1, "pipeline topology: ranks=", ranks);
}

Placement Topology::place(int rank, int chunk) const {
  FM_CHECK(rank >= 0 && rank < ranks_ && chunk >= 0 && chunk < chunks_per_rank(), "rank ", rank,
           " chunk ", chunk);
  switch (method_) {
    case Method::kDualPipe:
      return {chunk, chunk == 0 ? rank : ranks_ - 1 - rank};
    case Method::kDualPipeV:
      return {0, chunk == 0 ? rank : 2 * ranks_ - 1 - rank};
    default:
      return {0, rank};
  }
}

int Topology::rank_of(int flow, int stage) const {
  switch (method_) {
    case Method::kDualPipe:
      return flow == 0 ? stage : ranks_ - 1 - stage;
    case Method::kDualPipeV:
      return stage < ranks_ ? stage : 2 * ranks_ - 1 - stage;
    default:
      return stage;
  }
}

int Topology::chunk_of(int flow, int stage) const {
  switch (method_) {
    case Method::kDualPipe:
      return flow;
    case Method::kDualPipeV:
      return stage < ranks_ ? 0 : 1;
    default:
      return 0;
  }
}

}  // namespace fp8moe::pipeline
