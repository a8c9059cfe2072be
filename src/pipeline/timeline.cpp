// Trace-event JSON and SVG timelines of a simulated schedule.
// Test: build-pipeline/tests/test_pipeline --gtest_filter='Timeline*'
#include "fp8moe/pipeline/timeline.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

namespace fp8moe::pipeline {
namespace {

const char* kind_label(const Step& step) {
  if (step.second) return "F&B";
  switch (step.first.kind) {
    case OpKind::kF:
      return "F";
    case OpKind::kB:
      return "B";
    case OpKind::kI:
      return "I";
    case OpKind::kW:
      return "W";
  }
  return "?";
}

// Chrome's reserved colour names (Perfetto colours by name instead; both open the file).
const char* trace_colour(const Step& step) {
  if (step.second) return "bad";
  switch (step.first.kind) {
    case OpKind::kF:
      return "rail_response";
    case OpKind::kB:
      return "good";
    case OpKind::kI:
      return "yellow";
    case OpKind::kW:
      return "olive";
  }
  return "grey";
}

// Two shades per kind: chunk 0 light, chunk 1 dark.
const char* fill(const Op& op) {
  static const char* kFills[4][2] = {{"#fcd9a8", "#f0a34a"},
                                     {"#b7dfb0", "#5fae57"},
                                     {"#c3ddf3", "#6aa6d9"},
                                     {"#e0cff0", "#a77fcf"}};
  return kFills[static_cast<int>(op.kind)][op.chunk == 0 ? 0 : 1];
}

// Sums of costs carry rounding noise (59400.00000000002); the trace's clock is in microseconds,
// so nanoseconds are plenty.
double to_ns_grid(double us) {
  return std::round(us * 1000) / 1000;
}

std::string fmt(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", v);
  std::string s = buf;
  while (s.back() == '0') s.pop_back();
  if (s.back() == '.') s.pop_back();
  return s;
}

}  // namespace

OrderedJson chrome_trace(const Schedule& schedule, const SimResult& sim, double us_per_unit) {
  FM_CHECK_ARG(sim.times.size() == schedule.ranks_ops.size(), "trace: simulation has ",
               sim.times.size(), " ranks, schedule ", schedule.ranks_ops.size());
  OrderedJson events = OrderedJson::array();
  const std::string title = std::string(method_name(schedule.method)) +
                            " P=" + std::to_string(schedule.ranks) +
                            " M=" + std::to_string(schedule.micro_batches);
  events.push_back(
      {{"name", "process_name"}, {"ph", "M"}, {"pid", 0}, {"tid", 0}, {"args", {{"name", title}}}});
  for (int r = 0; r < schedule.ranks; ++r) {
    events.push_back({{"name", "thread_name"},
                      {"ph", "M"},
                      {"pid", 0},
                      {"tid", r},
                      {"args", {{"name", "rank " + std::to_string(r)}}}});
    events.push_back({{"name", "thread_sort_index"},
                      {"ph", "M"},
                      {"pid", 0},
                      {"tid", r},
                      {"args", {{"sort_index", r}}}});
  }
  for (int r = 0; r < schedule.ranks; ++r) {
    const auto& ops = schedule.ranks_ops[r];
    for (size_t k = 0; k < ops.size(); ++k) {
      const StepTime& t = sim.times[r][k];
      OrderedJson args = {{"step", k}, {"start", t.start}, {"end", t.end}};
      events.push_back({{"name", to_string(ops[k])},
                        {"cat", kind_label(ops[k])},
                        {"ph", "X"},
                        {"ts", to_ns_grid(t.start * us_per_unit)},
                        {"dur", to_ns_grid((t.end - t.start) * us_per_unit)},
                        {"pid", 0},
                        {"tid", r},
                        {"cname", trace_colour(ops[k])},
                        {"args", std::move(args)}});
    }
  }
  OrderedJson doc;
  doc["traceEvents"] = std::move(events);
  doc["displayTimeUnit"] = "ms";
  doc["otherData"] = {{"method", method_name(schedule.method)},
                      {"ranks", schedule.ranks},
                      {"micro_batches", schedule.micro_batches},
                      {"makespan", sim.makespan},
                      {"us_per_unit", us_per_unit}};
  return doc;
}

std::string timeline_svg(const Schedule& schedule, const SimResult& sim) {
  FM_CHECK_ARG(sim.times.size() == schedule.ranks_ops.size(), "svg: simulation has ",
               sim.times.size(), " ranks, schedule ", schedule.ranks_ops.size());
  const double makespan = std::max(sim.makespan, 1e-9);
  const double unit = std::clamp(1500.0 / makespan, 4.0, 48.0);  // pixels per time unit
  const double left = 64, top = 44, row = 28, box = 24;
  const double width = left + makespan * unit + 20;
  const double rows_bottom = top + schedule.ranks * row;
  const double height = rows_bottom + 78;
  std::ostringstream svg;
  svg << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << fmt(width) << "\" height=\""
      << fmt(height) << "\" viewBox=\"0 0 " << fmt(width) << " " << fmt(height)
      << "\" font-family=\"Helvetica, Arial, sans-serif\">\n"
      << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  svg << "<text x=\"" << fmt(left) << "\" y=\"24\" font-size=\"15\" font-weight=\"bold\">"
      << method_name(schedule.method) << ": " << schedule.ranks << " ranks, "
      << schedule.micro_batches << " micro-batches; makespan " << fmt(sim.makespan)
      << ", largest bubble " << fmt(sim.max_bubble()) << "</text>\n";

  // Rows and time axis.
  for (int r = 0; r < schedule.ranks; ++r) {
    const double y = top + r * row;
    svg << "<text x=\"" << fmt(left - 8) << "\" y=\"" << fmt(y + box / 2 + 4)
        << "\" font-size=\"12\" text-anchor=\"end\">rank " << r << "</text>\n";
    svg << "<rect x=\"" << fmt(left) << "\" y=\"" << fmt(y) << "\" width=\"" << fmt(makespan * unit)
        << "\" height=\"" << fmt(box) << "\" fill=\"#f4f4f4\"/>\n";
  }
  const double tick = makespan > 200 ? 50 : makespan > 60 ? 10 : makespan > 12 ? 5 : 1;
  for (double t = 0; t <= makespan + 1e-9; t += tick) {
    const double x = left + t * unit;
    svg << "<line x1=\"" << fmt(x) << "\" y1=\"" << fmt(rows_bottom) << "\" x2=\"" << fmt(x)
        << "\" y2=\"" << fmt(rows_bottom + 5) << "\" stroke=\"#444\"/>"
        << "<text x=\"" << fmt(x) << "\" y=\"" << fmt(rows_bottom + 17)
        << "\" font-size=\"10\" text-anchor=\"middle\">" << fmt(t) << "</text>\n";
  }

  // Steps: a box per operation (labelled with its micro-batch), pairs inside a black border.
  auto op_box = [&](const Op& op, double x, double w, double y) {
    svg << "<rect x=\"" << fmt(x) << "\" y=\"" << fmt(y) << "\" width=\"" << fmt(w)
        << "\" height=\"" << fmt(box) << "\" fill=\"" << fill(op)
        << "\" stroke=\"#555\" stroke-width=\"0.5\"/>";
    const double font = std::min(11.0, w * 0.55);
    if (font >= 5)
      svg << "<text x=\"" << fmt(x + w / 2) << "\" y=\"" << fmt(y + box / 2 + font * 0.35)
          << "\" font-size=\"" << fmt(font) << "\" text-anchor=\"middle\">" << op.micro
          << "</text>";
  };
  for (int r = 0; r < schedule.ranks; ++r) {
    const double y = top + r * row;
    const auto& ops = schedule.ranks_ops[r];
    for (size_t k = 0; k < ops.size(); ++k) {
      const StepTime& t = sim.times[r][k];
      const double x = left + t.start * unit, w = (t.end - t.start) * unit;
      svg << "<g><title>rank " << r << " " << to_string(ops[k]) << " [" << fmt(t.start) << ", "
          << fmt(t.end) << ")</title>";
      if (ops[k].second) {
        op_box(ops[k].first, x, w / 2, y);
        op_box(*ops[k].second, x + w / 2, w / 2, y);
        svg << "<rect x=\"" << fmt(x) << "\" y=\"" << fmt(y) << "\" width=\"" << fmt(w)
            << "\" height=\"" << fmt(box) << "\" fill=\"none\" stroke=\"black\""
            << " stroke-width=\"2\"/>";
      } else {
        op_box(ops[k].first, x, w, y);
      }
      svg << "</g>\n";
    }
  }

  // Legend.
  const double ly = rows_bottom + 34;
  double lx = left;
  const std::pair<const char*, Op> legend[] = {
      {"F chunk 0", {OpKind::kF, 0, 0}}, {"F chunk 1", {OpKind::kF, 1, 0}},
      {"B chunk 0", {OpKind::kB, 0, 0}}, {"B chunk 1", {OpKind::kB, 1, 0}},
      {"I chunk 0", {OpKind::kI, 0, 0}}, {"I chunk 1", {OpKind::kI, 1, 0}},
      {"W chunk 0", {OpKind::kW, 0, 0}}, {"W chunk 1", {OpKind::kW, 1, 0}}};
  for (const auto& [name, op] : legend) {
    svg << "<rect x=\"" << fmt(lx) << "\" y=\"" << fmt(ly)
        << "\" width=\"14\" height=\"14\" fill=\"" << fill(op)
        << "\" stroke=\"#555\" stroke-width=\"0.5\"/><text x=\"" << fmt(lx + 18) << "\" y=\""
        << fmt(ly + 11) << "\" font-size=\"11\">" << name << "</text>\n";
    lx += 86;
  }
  svg << "<rect x=\"" << fmt(lx) << "\" y=\"" << fmt(ly) << "\" width=\"28\" height=\"14\""
      << " fill=\"none\" stroke=\"black\" stroke-width=\"2\"/><text x=\"" << fmt(lx + 34)
      << "\" y=\"" << fmt(ly + 11) << "\" font-size=\"11\">overlapped pair (F&amp;B)</text>\n";
  svg << "<text x=\"" << fmt(left) << "\" y=\"" << fmt(ly + 32)
      << "\" font-size=\"11\" fill=\"#444\">numbers are micro-batches (per direction for "
         "dualpipe); time in cost units</text>\n";
  svg << "</svg>\n";
  return svg.str();
}

}  // namespace fp8moe::pipeline
