// fp8moe pipeline schedule|check|simulate|compare: pipeline-parallel schedules (DESIGN.md
// "fp8moe pipeline schedule"), their checker, simulator, timelines and the comparison table.
#include <fmt/format.h>

#include <cmath>
#include <iostream>
#include <memory>
#include <optional>

#include "command.h"
#include "fp8moe/core/file_io.h"
#include "fp8moe/core/json.h"
#include "fp8moe/pipeline/checker.h"
#include "fp8moe/pipeline/schedule.h"
#include "fp8moe/pipeline/simulator.h"
#include "fp8moe/pipeline/timeline.h"

namespace fp8moe::cli {
namespace {

using namespace fp8moe::pipeline;

constexpr int kMaxRanks = 1024;
constexpr int kMaxMicroBatches = 1 << 16;

struct ShapeFlags {
  std::string method;
  int ranks = 0;
  int micro_batches = 0;
};

void add_shape(CLI::App& app, ShapeFlags& f, bool with_method) {
  if (with_method)
    app.add_option("--method", f.method, "Schedule: 1f1b, zb1p, dualpipe or dualpipev")
        ->check(CLI::IsMember({"1f1b", "zb1p", "dualpipe", "dualpipev"}));
  app.add_option("--ranks,-P", f.ranks, "Pipeline ranks P (devices)")->required();
  app.add_option("--micro-batches,-M", f.micro_batches, "Micro-batches M per step")->required();
}

void check_shape(const ShapeFlags& f) {
  FM_CHECK_ARG(f.ranks >= 2 && f.ranks <= kMaxRanks, "--ranks ", f.ranks, " must be in 2..",
                 kMaxRanks);
  FM_CHECK_ARG(f.micro_batches >= 1 && f.micro_batches <= kMaxMicroBatches, "--micro-batches ",
                 f.micro_batches, " must be in 1..", kMaxMicroBatches);
}

struct SimFlags {
  std::string cost;
  double latency = 0, bandwidth = 0, bytes = 0;
  std::optional<double> chunk_scale;
};

void add_sim(CLI::App& app, SimFlags& f) {
  app.add_option("--cost", f.cost,
                 "Operation costs per stage, e.g. F=1,B=2,I=1,W=1,FB=2.6 (FB: a forward and a "
                 "backward run as an overlapped pair). Omitted: F=1, B=2, W=B/2, I=B-W, FB=F+B");
  app.add_option("--p2p-latency", f.latency,
                 "Time from the end of an operation to its result reaching another rank, in "
                 "cost units")
      ->capture_default_str();
  app.add_option("--p2p-bandwidth", f.bandwidth,
                 "Bytes per cost unit between ranks (0 = unlimited)")
      ->capture_default_str();
  app.add_option("--p2p-bytes", f.bytes, "Bytes of one activation or gradient sent between ranks")
      ->capture_default_str();
  app.add_option("--chunk-scale", f.chunk_scale,
                 "Size of a chunk relative to a stage of the model cut into P stages, scaling "
                 "its costs, activations and parameters (default: 0.5 for dualpipev, whose 2P "
                 "stages are half as big, 1 otherwise)");
}

SimOptions sim_options(const SimFlags& f) {
  SimOptions o;
  o.costs = parse_costs(f.cost);
  FM_CHECK_ARG(std::isfinite(f.latency) && f.latency >= 0, "--p2p-latency must be >= 0");
  FM_CHECK_ARG(std::isfinite(f.bandwidth) && f.bandwidth >= 0, "--p2p-bandwidth must be >= 0");
  FM_CHECK_ARG(std::isfinite(f.bytes) && f.bytes >= 0, "--p2p-bytes must be >= 0");
  o.p2p = {f.latency, f.bandwidth, f.bytes};
  if (f.chunk_scale) {
    FM_CHECK_ARG(std::isfinite(*f.chunk_scale) && *f.chunk_scale > 0,
                   "--chunk-scale must be positive");
    o.chunk_scale = f.chunk_scale;
  }
  return o;
}

// Equal up to rounding of sums of costs.
bool agrees(double a, double b) {
  return std::abs(a - b) <= 1e-9 * std::max(1.0, std::abs(b));
}

Schedule load_or_make(const std::string& input, const ShapeFlags& shape) {
  if (!input.empty()) return schedule_from_json(read_json_file(input), input);
  FM_CHECK_ARG(!shape.method.empty(), "--method is required (or --input FILE)");
  check_shape(shape);
  return make_schedule(parse_method(shape.method), shape.ranks, shape.micro_batches);
}

void setup_schedule(CLI::App& app) {
  struct Flags {
    ShapeFlags shape;
    bool json = false;
    std::string output = "-";
  };
  auto f = std::make_shared<Flags>();
  add_shape(app, f->shape, true);
  app.get_option("--method")->required();
  app.add_flag("--json", f->json, "Print the schedule as JSON (the DESIGN.md contract)");
  app.add_option("--output,-o", f->output, "Write to this file instead of standard output")
      ->capture_default_str();
  app.callback([f] {
    check_shape(f->shape);
    const Schedule s =
        make_schedule(parse_method(f->shape.method), f->shape.ranks, f->shape.micro_batches);
    std::string text;
    if (f->json) {
      text = schedule_to_json(s).dump() + "\n";
    } else {
      for (int r = 0; r < s.ranks; ++r) {
        text += fmt::format("rank {:>2}:", r);
        for (const Step& step : s.ranks_ops[r]) text += " " + to_string(step);
        text += "\n";
      }
    }
    write_file_atomic(f->output, text);
  });
}

void setup_check(CLI::App& app) {
  auto input = std::make_shared<std::string>();
  app.add_option("--input,-i", *input, "Schedule JSON to check ('-' = standard input)")->required();
  app.callback([input] {
    const Schedule s = schedule_from_json(read_json_file(*input), *input);
    const CheckReport report = check_schedule(s);
    if (!report.ok()) {
      std::cout << report.summary() << "\n";
      FM_THROW(ErrorKind::kRuntime, *input, ": schedule does not check (", report.problems.size(),
               " problems", report.deadlock.empty() ? "" : ", deadlock", ")");
    }
    std::cout << (*input == "-" ? "stdin" : *input) << ": " << method_name(s.method)
              << " P=" << s.ranks << " M=" << s.micro_batches
              << " checks: every operation once, no deadlock\n";
  });
}

void setup_simulate(CLI::App& app) {
  struct Flags {
    ShapeFlags shape;
    SimFlags sim;
    std::string input, trace, svg;
    bool json = false;
  };
  auto f = std::make_shared<Flags>();
  add_shape(app, f->shape, true);
  // A schedule file replaces the generator, so the shape flags are optional here.
  app.get_option("--ranks")->required(false);
  app.get_option("--micro-batches")->required(false);
  app.add_option("--input,-i", f->input, "Simulate this schedule JSON instead of --method");
  add_sim(app, f->sim);
  app.add_option("--trace", f->trace, "Write a Chrome trace-event JSON (opens in Perfetto)");
  app.add_option("--svg", f->svg, "Write an SVG timeline");
  app.add_flag("--json", f->json, "Print one JSON object instead of a table");
  app.callback([f] {
    const SimOptions o = sim_options(f->sim);
    const Schedule s = load_or_make(f->input, f->shape);
    const SimResult r = simulate(s, o);
    const ClosedForm cf = closed_form(s.method, s.ranks, o.costs, o.p2p);
    if (!f->trace.empty()) write_file_atomic(f->trace, chrome_trace(s, r).dump() + "\n");
    if (!f->svg.empty()) write_file_atomic(f->svg, timeline_svg(s, r));
    if (f->json) {
      OrderedJson out;
      out["method"] = method_name(s.method);
      out["ranks"] = s.ranks;
      out["micro_batches"] = s.micro_batches;
      out["costs"] = {{"F", o.costs.f},
                      {"B", o.costs.b},
                      {"I", o.costs.i},
                      {"W", o.costs.w},
                      {"FB", o.costs.fb}};
      out["p2p"] = {
          {"latency", o.p2p.latency}, {"bandwidth", o.p2p.bandwidth}, {"bytes", o.p2p.bytes}};
      out["chunk_scale"] = r.chunk_scale;
      out["makespan"] = r.makespan;
      out["max_bubble"] = r.max_bubble();
      OrderedJson rows = OrderedJson::array();
      for (int k = 0; k < s.ranks; ++k)
        rows.push_back({{"rank", k},
                        {"busy", r.busy[k]},
                        {"bubble", r.bubble[k]},
                        {"peak_activation_chunks", r.peak_activation_chunks[k]},
                        {"peak_activation_stages", r.peak_activation_stages[k]},
                        {"parameters", r.parameters[k]}});
      out["per_rank"] = std::move(rows);
      out["closed_form"] = {{"bubble_formula", cf.bubble_formula},
                            {"bubble", cf.bubble},
                            {"agrees", agrees(r.max_bubble(), cf.bubble)},
                            {"formula_applies", cf.applies},
                            {"note", cf.note},
                            {"activation_formula", cf.activation_formula},
                            {"activation_chunks", cf.activation_chunks},
                            {"parameter_copies", cf.parameter_copies}};
      std::cout << out.dump() << "\n";
      return;
    }
    std::cout << fmt::format("{} P={} M={}  costs {}  p2p {}  chunk scale {}\n",
                             method_name(s.method), s.ranks, s.micro_batches, to_string(o.costs),
                             o.p2p.time(), r.chunk_scale);
    std::cout << fmt::format("makespan {:.6g}\n", r.makespan);
    std::cout << fmt::format("{:>4}  {:>10}  {:>10}  {:>16}  {:>16}  {:>10}\n", "rank", "busy",
                             "bubble", "peak act chunks", "peak act stages", "parameters");
    for (int k = 0; k < s.ranks; ++k)
      std::cout << fmt::format("{:>4}  {:>10.6g}  {:>10.6g}  {:>16}  {:>16.6g}  {:>10.6g}\n", k,
                               r.busy[k], r.bubble[k], r.peak_activation_chunks[k],
                               r.peak_activation_stages[k], r.parameters[k]);
    std::cout << fmt::format("largest bubble {:.6g}; closed form {} = {:.6g} ({})\n",
                             r.max_bubble(), cf.bubble_formula, cf.bubble,
                             agrees(r.max_bubble(), cf.bubble) ? "agrees" : "differs");
    if (!cf.applies)
      std::cout << "note: these costs are outside the formula's regime: " << cf.note << "\n";
  });
}

void setup_compare(CLI::App& app) {
  struct Flags {
    ShapeFlags shape;
    SimFlags sim;
    bool json = false;
  };
  auto f = std::make_shared<Flags>();
  add_shape(app, f->shape, false);
  add_sim(app, f->sim);
  app.add_flag("--json", f->json, "Print one JSON object instead of a table");
  app.callback([f] {
    check_shape(f->shape);
    const SimOptions o = sim_options(f->sim);
    OrderedJson rows = OrderedJson::array();
    std::string notes;
    std::string table = fmt::format(
        "P={} M={}  costs {}  p2p {}  (times in cost units of one stage of the model cut "
        "into P stages)\n",
        f->shape.ranks, f->shape.micro_batches, to_string(o.costs), o.p2p.time());
    table += fmt::format("{:<10} {:>9} {:>9} {:>9} {:<20} {:>6} {:>7} {:>6} {:>12} {:>12} {:>6}\n",
                         "method", "makespan", "bubble", "formula", "closed form", "agree",
                         "params", "copies", "act(chunks)", "act formula", "act(st)");
    for (Method m : kAllMethods) {
      const ClosedForm cf = closed_form(m, f->shape.ranks, o.costs, o.p2p);
      OrderedJson row;
      row["method"] = method_name(m);
      try {
        check_supported(m, f->shape.ranks, f->shape.micro_batches);
      } catch (const Error& e) {
        row["supported"] = false;
        row["reason"] = e.message();
        table += fmt::format("{:<10} unsupported: {}\n", method_name(m), e.message());
        rows.push_back(std::move(row));
        continue;
      }
      const Schedule s = make_schedule(m, f->shape.ranks, f->shape.micro_batches);
      const SimResult r = simulate(s, o);
      int peak = 0;
      double peak_stages = 0;
      for (int k = 0; k < s.ranks; ++k) {
        peak = std::max(peak, r.peak_activation_chunks[k]);
        peak_stages = std::max(peak_stages, r.peak_activation_stages[k]);
      }
      const bool agree = agrees(r.max_bubble(), cf.bubble);
      row["supported"] = true;
      row["makespan"] = r.makespan;
      row["bubble"] = r.max_bubble();
      row["bubble_closed_form"] = cf.bubble;
      row["bubble_formula"] = cf.bubble_formula;
      row["agrees"] = agree;
      row["formula_applies"] = cf.applies;
      if (!cf.applies) {
        row["note"] = cf.note;
        notes += fmt::format("{}: costs outside the closed form's regime: {}\n", method_name(m),
                             cf.note);
      }
      row["parameters"] = r.parameters[0];
      row["parameter_copies_formula"] = cf.parameter_copies;
      row["peak_activation_chunks"] = peak;
      row["activation_formula"] = cf.activation_formula;
      row["activation_formula_chunks"] = cf.activation_chunks;
      row["peak_activation_stages"] = peak_stages;
      rows.push_back(std::move(row));
      table += fmt::format(
          "{:<10} {:>9.6g} {:>9.6g} {:>9.6g} {:<20} {:>6} {:>6.3g}x {:>5.3g}x {:>12} {:>12} "
          "{:>6.3g}\n",
          method_name(m), r.makespan, r.max_bubble(), cf.bubble, cf.bubble_formula,
          agree ? "yes" : "no", r.parameters[0], cf.parameter_copies, peak,
          fmt::format("{}={}", cf.activation_formula, cf.activation_chunks), peak_stages);
    }
    if (f->json) {
      OrderedJson out;
      out["ranks"] = f->shape.ranks;
      out["micro_batches"] = f->shape.micro_batches;
      out["costs"] = {{"F", o.costs.f},
                      {"B", o.costs.b},
                      {"I", o.costs.i},
                      {"W", o.costs.w},
                      {"FB", o.costs.fb}};
      out["p2p_time"] = o.p2p.time();
      out["methods"] = std::move(rows);
      std::cout << out.dump() << "\n";
    } else {
      std::cout << table << notes;
    }
  });
}

void setup_pipeline(CLI::App& app) {
  app.require_subcommand(1);
  setup_schedule(
      *app.add_subcommand("schedule", "Print the per-rank operation order of a pipeline schedule"));
  setup_check(*app.add_subcommand(
      "check",
      "Check a schedule JSON: every operation once on its rank, no deadlock (exit 1 "
      "if not)"));
  setup_simulate(*app.add_subcommand(
      "simulate", "Simulate a schedule: makespan, per-rank bubble, memory; trace and SVG"));
  setup_compare(*app.add_subcommand(
      "compare",
      "Compare 1F1B, ZB1P, DualPipe and DualPipeV: simulated vs closed-form bubble, "
      "parameter and activation memory"));
}

}  // namespace

FM_REGISTER_COMMAND("pipeline", "Pipeline-parallel schedules: generate, check, simulate, compare",
                    setup_pipeline);

}  // namespace fp8moe::cli
