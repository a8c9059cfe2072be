// The dependency replay behind the checker and the simulator: a fixed-order list schedule per
// rank, advanced rank by rank until nothing can move. Because each rank's order is fixed, the
// start times are the unique solution of "start = max(rank free, dependencies done)", whatever
// the order in which ranks are visited.
#include "replay.h"

#include <algorithm>

namespace fp8moe::pipeline::detail {
namespace {

// What an operation makes available to others: its forward output, its input gradient (B or
// I). Nothing waits for a weight gradient.
enum Event { kForwardDone = 0, kInputGradDone = 1 };

struct Dependency {
  Event event;
  int flow, stage, micro;
};

class EventTable {
 public:
  EventTable(const Topology& topo)
      : flows_(topo.num_flows()),
        stages_(topo.stages_per_flow()),
        micro_(topo.micro_batches_per_flow()),
        done_(2 * static_cast<size_t>(flows_ * stages_ * micro_), -1.0) {}
  double& at(Event e, int flow, int stage, int micro) {
    return done_[((static_cast<size_t>(e) * flows_ + flow) * stages_ + stage) * micro_ + micro];
  }

 private:
  int flows_, stages_, micro_;
  std::vector<double> done_;
};

void dependencies(const Topology& topo, int rank, const Op& op, std::vector<Dependency>& out) {
  const Placement p = topo.place(rank, op.chunk);
  switch (op.kind) {
    case OpKind::kF:
      if (p.stage > 0) out.push_back({kForwardDone, p.flow, p.stage - 1, op.micro});
      break;
    case OpKind::kB:
    case OpKind::kI:
      out.push_back({kForwardDone, p.flow, p.stage, op.micro});
      if (p.stage + 1 < topo.stages_per_flow())
        out.push_back({kInputGradDone, p.flow, p.stage + 1, op.micro});
      break;
    case OpKind::kW:
      out.push_back({kInputGradDone, p.flow, p.stage, op.micro});
      break;
  }
}

std::string describe(const Topology& topo, const Dependency& d) {
  const int chunk = topo.chunk_of(d.flow, d.stage);
  const std::string id = std::to_string(chunk) + "." + std::to_string(d.micro);
  const std::string what = d.event == kForwardDone ? "F" + id : "B" + id + " or I" + id;
  return what + " on rank " + std::to_string(topo.rank_of(d.flow, d.stage));
}

}  // namespace

ReplayResult replay(const Schedule& schedule, const std::function<double(const Step&)>& duration,
                    double p2p_time) {
  const Topology topo(schedule.method, schedule.ranks, schedule.micro_batches);
  EventTable done(topo);
  const int ranks = schedule.ranks;
  ReplayResult result;
  result.times.resize(ranks);
  std::vector<size_t> next(ranks, 0);
  std::vector<double> free_at(ranks, 0.0);
  std::vector<Dependency> deps;
  for (int r = 0; r < ranks; ++r) result.times[r].resize(schedule.ranks_ops[r].size());

  bool progress = true;
  while (progress) {
    progress = false;
    for (int r = 0; r < ranks; ++r) {
      const auto& ops = schedule.ranks_ops[r];
      while (next[r] < ops.size()) {
        const Step& step = ops[next[r]];
        deps.clear();
        dependencies(topo, r, step.first, deps);
        if (step.second) dependencies(topo, r, *step.second, deps);
        double start = free_at[r];
        bool ready = true;
        for (const Dependency& d : deps) {
          const double t = done.at(d.event, d.flow, d.stage, d.micro);
          if (t < 0) {
            ready = false;
            break;
          }
          const bool remote = topo.rank_of(d.flow, d.stage) != r;
          start = std::max(start, t + (remote ? p2p_time : 0.0));
        }
        if (!ready) break;
        const double end = start + duration(step);
        result.times[r][next[r]] = {start, end};
        for (const Op* op : {&step.first, step.second ? &*step.second : nullptr}) {
          if (!op) continue;
          const Placement p = topo.place(r, op->chunk);
          if (op->kind == OpKind::kF) done.at(kForwardDone, p.flow, p.stage, op->micro) = end;
          if (op->kind == OpKind::kB || op->kind == OpKind::kI)
            done.at(kInputGradDone, p.flow, p.stage, op->micro) = end;
        }
        free_at[r] = end;
        ++next[r];
        progress = true;
      }
    }
  }

  result.complete = true;
  for (int r = 0; r < ranks; ++r) {
    const auto& ops = schedule.ranks_ops[r];
    if (next[r] == ops.size()) continue;
    result.complete = false;
    const Step& step = ops[next[r]];
    deps.clear();
    dependencies(topo, r, step.first, deps);
    if (step.second) dependencies(topo, r, *step.second, deps);
    std::string line = "rank " + std::to_string(r) + " blocked at step " + std::to_string(next[r]) +
                       " '" + to_string(step) + "' waiting for";
    const char* sep = " ";
    for (const Dependency& d : deps) {
      if (done.at(d.event, d.flow, d.stage, d.micro) >= 0) continue;
      line += sep + describe(topo, d);
      sep = ", ";
    }
    result.blocked.push_back(std::move(line));
  }
  return result;
}

}  // namespace fp8moe::pipeline::detail
