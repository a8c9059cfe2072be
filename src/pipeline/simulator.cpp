// Discrete-event simulator of pipeline schedules and the published closed-form bubbles.
// Test: build-pipeline/tests/test_pipeline --gtest_filter='Simulator*:ClosedForm*'
#include "fp8moe/pipeline/simulator.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <map>
#include <sstream>

#include "fp8moe/pipeline/checker.h"
#include "replay.h"

namespace fp8moe::pipeline {
namespace {

std::string upper(std::string s) {
  for (char& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}

double parse_cost_value(const std::string& key, const std::string& text) {
  double v = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  FM_CHECK_ARG(!text.empty() && ec == std::errc() && end == text.data() + text.size() &&
                   std::isfinite(v) && v >= 0,
               "--cost: ", key, "='", text, "' is not a non-negative number");
  return v;
}

std::string number(double v) {
  std::ostringstream out;
  out << v;
  return out.str();
}

double step_cost(const Step& step, const Costs& c) {
  auto one = [&](const Op& op) {
    switch (op.kind) {
      case OpKind::kF:
        return c.f;
      case OpKind::kB:
        return c.b;
      case OpKind::kI:
        return c.i;
      case OpKind::kW:
        return c.w;
    }
    return 0.0;
  };
  if (!step.second) return one(step.first);
  const OpKind a = step.first.kind, b = step.second->kind;
  if ((a == OpKind::kF && b == OpKind::kB) || (a == OpKind::kB && b == OpKind::kF)) return c.fb;
  // NOTE: no method pairs other kinds; such a pair costs what its parts cost one after another.
  return one(step.first) + one(*step.second);
}

}  // namespace

Costs parse_costs(const std::string& text) {
  std::map<std::string, double> given;
  std::istringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    const size_t eq = item.find('=');
    FM_CHECK_ARG(eq != std::string::npos, "--cost: '", item, "' is not KEY=VALUE");
    std::string key = upper(item.substr(0, eq));
    if (key == "F&B") key = "FB";
    FM_CHECK_ARG(key == "F" || key == "B" || key == "I" || key == "W" || key == "FB",
                 "--cost: unknown key '", item.substr(0, eq), "' (expected F, B, I, W, FB)");
    FM_CHECK_ARG(!given.count(key), "--cost: key ", key, " given twice");
    given[key] = parse_cost_value(key, item.substr(eq + 1));
  }
  auto get = [&](const char* key, double fallback) {
    auto it = given.find(key);
    return it == given.end() ? fallback : it->second;
  };
  Costs c;
  c.f = get("F", 1.0);
  c.b = get("B", 2.0);
  c.w = get("W", c.b / 2);
  c.i = get("I", c.b - c.w);
  c.fb = get("FB", c.f + c.b);
  FM_CHECK_ARG(c.i >= 0, "--cost: I=B-W is negative (B=", c.b, ", W=", c.w, "); give I");
  return c;
}

std::string to_string(const Costs& c) {
  return "F=" + number(c.f) + ",B=" + number(c.b) + ",I=" + number(c.i) + ",W=" + number(c.w) +
         ",FB=" + number(c.fb);
}

double SimResult::max_bubble() const {
  return bubble.empty() ? 0.0 : *std::max_element(bubble.begin(), bubble.end());
}

SimResult simulate(const Schedule& schedule, const SimOptions& options) {
  const CheckReport report = check_schedule(schedule);
  FM_CHECK_ARG(report.ok(), "schedule does not check:\n", report.summary());
  const Topology topo(schedule.method, schedule.ranks, schedule.micro_batches);
  SimResult r;
  r.chunk_scale = options.chunk_scale.value_or(topo.chunk_size());
  FM_CHECK_ARG(r.chunk_scale > 0 && std::isfinite(r.chunk_scale), "chunk scale ", r.chunk_scale,
               " must be positive");
  FM_CHECK_ARG(options.p2p.latency >= 0 && options.p2p.bandwidth >= 0 && options.p2p.bytes >= 0,
               "p2p latency, bandwidth and bytes must be non-negative");
  const double scale = r.chunk_scale;
  const Costs costs = options.costs;
  auto duration = [&](const Step& step) { return scale * step_cost(step, costs); };
  auto replayed = detail::replay(schedule, duration, options.p2p.time());
  FM_CHECK(replayed.complete, "replay stalled on a checked schedule");
  r.times = std::move(replayed.times);

  const int ranks = schedule.ranks;
  r.busy.assign(ranks, 0.0);
  r.peak_activation_chunks.assign(ranks, 0);
  for (int k = 0; k < ranks; ++k) {
    const auto& ops = schedule.ranks_ops[k];
    int held = 0;
    for (size_t j = 0; j < ops.size(); ++j) {
      r.busy[k] += r.times[k][j].end - r.times[k][j].start;
      r.makespan = std::max(r.makespan, r.times[k][j].end);
      // Within a step, activations are taken at its start and released at its end, so a pair
      // holds its forward's new activation and its backward's old one at the same time.
      for (const Op* op : {&ops[j].first, ops[j].second ? &*ops[j].second : nullptr})
        if (op && op->kind == OpKind::kF) ++held;
      r.peak_activation_chunks[k] = std::max(r.peak_activation_chunks[k], held);
      for (const Op* op : {&ops[j].first, ops[j].second ? &*ops[j].second : nullptr})
        if (op && (op->kind == OpKind::kB || op->kind == OpKind::kI)) --held;
    }
  }
  for (int k = 0; k < ranks; ++k) {
    r.bubble.push_back(r.makespan - r.busy[k]);
    r.peak_activation_stages.push_back(r.peak_activation_chunks[k] * scale);
    r.parameters.push_back(topo.chunks_per_rank() * scale);
  }
  return r;
}

}  // namespace fp8moe::pipeline
