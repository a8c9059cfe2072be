// Schedule checker: a census of the operations (each required one exactly once on its rank),
// then a replay of the orders against the dependencies to find deadlocks.
// Test: build-pipeline/tests/test_pipeline --gtest_filter='Checker*'
#include "fp8moe/pipeline/checker.h"

#include "replay.h"

namespace fp8moe::pipeline {
namespace {

constexpr size_t kMaxProblemLines = 20;

struct Census {
  int f = 0, b = 0, i = 0, w = 0;
};

std::string op_name(char kind, int chunk, int micro) {
  return std::string(1, kind) + std::to_string(chunk) + "." + std::to_string(micro);
}

}  // namespace

std::string CheckReport::summary() const {
  std::string out;
  for (const auto* lines : {&problems, &deadlock})
    for (const auto& line : *lines) out += (out.empty() ? "" : "\n") + line;
  return out;
}

CheckReport check_schedule(const Schedule& s) {
  CheckReport report;
  size_t extra = 0;
  auto problem = [&](std::string line) {
    if (report.problems.size() < kMaxProblemLines)
      report.problems.push_back(std::move(line));
    else
      ++extra;
  };
  if (s.ranks < 1 || static_cast<int>(s.ranks_ops.size()) != s.ranks) {
    report.problems.push_back("schedule has " + std::to_string(s.ranks_ops.size()) +
                              " rank lists for ranks=" + std::to_string(s.ranks));
    return report;
  }
  const Topology topo(s.method, s.ranks, s.micro_batches);
  const int flows = topo.num_flows(), stages = topo.stages_per_flow();
  const int micro = topo.micro_batches_per_flow();
  if (micro < 1) {
    report.problems.push_back("schedule has no micro-batches per flow (micro_batches=" +
                              std::to_string(s.micro_batches) + ")");
    return report;
  }
  std::vector<Census> census(static_cast<size_t>(flows) * stages * micro);
  auto cell = [&](int flow, int stage, int m) -> Census& {
    return census[(static_cast<size_t>(flow) * stages + stage) * micro + m];
  };

  // Census: every operation in range, counted where it belongs.
  for (int r = 0; r < s.ranks; ++r) {
    const auto& ops = s.ranks_ops[r];
    for (size_t k = 0; k < ops.size(); ++k) {
      const Step& step = ops[k];
      bool in_range = true;
      for (const Op* op : {&step.first, step.second ? &*step.second : nullptr}) {
        if (!op) continue;
        if (op->chunk < 0 || op->chunk >= topo.chunks_per_rank() || op->micro < 0 ||
            op->micro >= micro) {
          problem("rank " + std::to_string(r) + " step " + std::to_string(k) + ": '" +
                  to_string(*op) + "' is not an operation of " + method_name(s.method) +
                  " (chunks 0.." + std::to_string(topo.chunks_per_rank() - 1) +
                  ", micro-batches 0.." + std::to_string(micro - 1) + ")");
          in_range = false;
          continue;
        }
        const Placement p = topo.place(r, op->chunk);
        Census& c = cell(p.flow, p.stage, op->micro);
        switch (op->kind) {
          case OpKind::kF:
            ++c.f;
            break;
          case OpKind::kB:
            ++c.b;
            break;
          case OpKind::kI:
            ++c.i;
            break;
          case OpKind::kW:
            ++c.w;
            break;
        }
      }
      if (in_range && step.second &&
          topo.place(r, step.first.chunk).flow == topo.place(r, step.second->chunk).flow &&
          step.first.micro == step.second->micro)
        problem("rank " + std::to_string(r) + " step " + std::to_string(k) + ": pair '" +
                to_string(step) + "' joins two operations of the same micro-batch");
    }
  }

  // Every stage of every flow: F once; B once, or I and W once each.
  for (int f = 0; f < flows; ++f)
    for (int st = 0; st < stages; ++st)
      for (int m = 0; m < micro; ++m) {
        const Census& c = cell(f, st, m);
        const int r = topo.rank_of(f, st), ch = topo.chunk_of(f, st);
        const std::string where = "rank " + std::to_string(r) + ": ";
        if (c.f != 1)
          problem(where + op_name('F', ch, m) + " appears " + std::to_string(c.f) +
                  " times (expected once)");
        const bool full = c.b == 1 && c.i == 0 && c.w == 0;
        const bool split = c.b == 0 && c.i == 1 && c.w == 1;
        if (!full && !split)
          problem(where + "backward of chunk " + std::to_string(ch) + " micro-batch " +
                  std::to_string(m) + " has B x" + std::to_string(c.b) + ", I x" +
                  std::to_string(c.i) + ", W x" + std::to_string(c.w) +
                  " (expected B once, or I and W once each)");
      }
  if (extra > 0) report.problems.push_back("... and " + std::to_string(extra) + " more");
  if (!report.problems.empty()) return report;

  // Replay with unit durations: only whether the orders can finish matters here.
  const auto result = detail::replay(
      s, [](const Step&) { return 1.0; }, 0.0);
  if (!result.complete) {
    report.deadlock.push_back(std::string("deadlock: ") + method_name(s.method) + " P=" +
                              std::to_string(s.ranks) + " M=" + std::to_string(s.micro_batches));
    for (const auto& line : result.blocked) report.deadlock.push_back(line);
  }
  return report;
}

}  // namespace fp8moe::pipeline
