// fp8moe moe: the router on given scores (`route`, DESIGN.md) and the load-balance study
// (`simulate`).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "command.h"
#include "fp8moe/core/file_io.h"
#include "fp8moe/core/json.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/eplb/eplb.h"
#include "fp8moe/moe/balance.h"
#include "fp8moe/moe/router.h"
#include "fp8moe/moe/router_json.h"

namespace {

fp8moe::Json read_input(const std::string& path) {
  using namespace fp8moe;
  try {
    return read_json_file(path);
  } catch (const Error& e) {
    // An input file that cannot be read is bad input too: exit 2.
    if (e.kind() != ErrorKind::kIo) throw;
    FM_THROW(ErrorKind::kInvalidArgument, e.message());
  }
}

void setup_route(CLI::App& app) {
  auto input = std::make_shared<std::string>();
  auto output = std::make_shared<std::string>();
  app.add_option("--input", *input, "router config + logits JSON ('-' = stdin)")->required();
  app.add_option("--output", *output, "top-k ids and weights JSON ('-' = stdout)")->required();
  app.callback([input, output] {
    using namespace fp8moe;
    const RouteRequest req = route_request_from_json(read_input(*input));
    const RouterOutput out = route(req.config, req.logits.data(), req.tokens,
                                   req.bias.empty() ? nullptr : req.bias.data());
    write_file_atomic(*output, route_output_to_json(out).dump() + "\n");
  });
}

// --- simulate ----------------------------------------------------------------------------------
// Synthetic gate logits: logit[t, e] = popularity[e] + theta[e] + noise[t, e]. popularity starts
// skewed (skew * N(0, 1) per expert) and drifts (a random walk of drift * N(0, 1) per step);
// theta is the variant's learnable per-expert offset (a stand-in for the gate's weights, moved
// only by the sequence-wise loss). Every variant sees the same popularity and noise.
struct SimOptions {
  int steps = 200;
  int tokens = 512;
  int seq_len = 128;
  int experts = 256;
  int top_k = 8;
  int groups = 8;
  int topk_group = 4;
  int gpus = 32;
  int nodes = 4;
  int redundant = 32;
  float gamma = 0.001f;
  float alpha = 0.01f;
  float lr = 50.0f;
  float skew = 1.0f;
  float drift = 0.02f;
  int eplb_every = 50;
  uint64_t seed = 1;
  std::string out = "-";
  std::string svg;
};

struct Variant {
  std::string name;
  bool bias_update, seq_loss, eplb;
  std::vector<float> bias, theta;
  std::vector<int64_t> window_load;
  bool have_plan = false;
  fp8moe::eplb::Plan plan;
  std::vector<double> max_vio, gpu_imbalance;
};

std::string svg_plot(const std::vector<Variant>& variants, int steps) {
  const char* colors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"};
  const double W = 900, H = 330, left = 60, right = 170, top = 30, bottom = 40;
  std::ostringstream o;
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << 2 * H
    << "\" font-family=\"sans-serif\" font-size=\"12\">\n"
    << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  for (int panel = 0; panel < 2; ++panel) {
    const double y0 = panel * H;
    double ymax = 0;
    for (const auto& v : variants)
      for (double x : panel == 0 ? v.max_vio : v.gpu_imbalance) ymax = std::max(ymax, x);
    ymax = ymax > 0 ? ymax * 1.05 : 1.0;
    const double pw = W - left - right, ph = H - top - bottom;
    o << "<text x=\"" << left << "\" y=\"" << y0 + 18 << "\" font-weight=\"bold\">"
      << (panel == 0 ? "MaxVio (expert load, max/mean - 1)" : "GPU imbalance (max GPU load / mean)")
      << " per step</text>\n";
    o << "<rect x=\"" << left << "\" y=\"" << y0 + top << "\" width=\"" << pw << "\" height=\""
      << ph << "\" fill=\"none\" stroke=\"#888\"/>\n";
    for (int tick = 0; tick <= 4; ++tick) {
      const double yv = ymax * tick / 4, yy = y0 + top + ph * (1 - tick / 4.0);
      char label[32];
      std::snprintf(label, sizeof label, "%.2f", yv);
      o << "<text x=\"" << left - 6 << "\" y=\"" << yy + 4 << "\" text-anchor=\"end\">" << label
        << "</text><line x1=\"" << left << "\" x2=\"" << left + pw << "\" y1=\"" << yy << "\" y2=\""
        << yy << "\" stroke=\"#eee\"/>\n";
    }
    o << "<text x=\"" << left + pw / 2 << "\" y=\"" << y0 + H - 8
      << "\" text-anchor=\"middle\">step (0 to " << steps - 1 << ")</text>\n";
    for (size_t i = 0; i < variants.size(); ++i) {
      const auto& series = panel == 0 ? variants[i].max_vio : variants[i].gpu_imbalance;
      o << "<polyline fill=\"none\" stroke-width=\"1.5\" stroke=\"" << colors[i % 6]
        << "\" points=\"";
      for (size_t s = 0; s < series.size(); ++s) {
        const double x = left + pw * (steps > 1 ? static_cast<double>(s) / (steps - 1) : 0.0);
        const double y = y0 + top + ph * (1 - series[s] / ymax);
        o << x << "," << y << " ";
      }
      o << "\"/>\n<text x=\"" << left + pw + 10 << "\" y=\"" << y0 + top + 16 * (i + 1)
        << "\" fill=\"" << colors[i % 6] << "\">" << variants[i].name << "</text>\n";
    }
  }
  o << "</svg>\n";
  return o.str();
}

void run_simulation(const SimOptions& o) {
  using namespace fp8moe;
  RouterConfig cfg;
  cfg.n_routed_experts = o.experts;
  cfg.num_experts_per_tok = o.top_k;
  cfg.n_group = o.groups;
  cfg.topk_group = o.topk_group;
  cfg.routed_scaling_factor = 1.0f;
  validate_router_config(cfg);
  FM_CHECK_ARG(o.steps > 0 && o.tokens > 0, "--steps and --tokens must be > 0");
  FM_CHECK_ARG(o.seq_len > 0 && o.tokens % o.seq_len == 0, "--tokens=", o.tokens,
                 " must be a multiple of --seq-len=", o.seq_len);
  FM_CHECK_ARG(o.gpus > 0 && o.experts % o.gpus == 0, "--experts=", o.experts,
                 " must be a multiple of --gpus=", o.gpus);
  FM_CHECK_ARG(o.redundant >= 0 && (o.experts + o.redundant) % o.gpus == 0,
                 "--experts + --redundant = ", o.experts + o.redundant,
                 " must be a multiple of --gpus=", o.gpus);
  FM_CHECK_ARG(o.nodes > 0 && o.gpus % o.nodes == 0, "--gpus=", o.gpus,
                 " must be a multiple of --nodes=", o.nodes);
  FM_CHECK_ARG(o.eplb_every > 0, "--eplb-every must be > 0");
  FM_CHECK_ARG(std::isfinite(o.gamma) && o.gamma >= 0 && std::isfinite(o.alpha) && o.alpha >= 0 &&
                     std::isfinite(o.lr) && o.lr >= 0 && o.skew >= 0 && o.drift >= 0,
                 "--gamma, --alpha, --lr, --skew and --drift must be finite and >= 0");
  const int E = o.experts, T = o.tokens, K = o.top_k, P = o.gpus;

  std::vector<Variant> variants;
  const auto add = [&](const char* name, bool b, bool q, bool e) {
    Variant v{name,
              b,
              q,
              e,
              std::vector<float>(E, 0.0f),
              std::vector<float>(E, 0.0f),
              std::vector<int64_t>(E, 0),
              false,
              {},
              {},
              {}};
    variants.push_back(std::move(v));
  };
  add("none", false, false, false);
  add("bias", true, false, false);
  add("seqloss", false, true, false);
  add("bias+seqloss", true, true, false);
  add("eplb", false, false, true);
  add("bias+eplb", true, false, true);

  PhiloxStream pop_rng(o.seed, 1), noise_rng(o.seed, 2);
  std::vector<float> popularity(E);
  for (auto& p : popularity) p = o.skew * pop_rng.normal();
  std::vector<float> noise(static_cast<size_t>(T) * E), logits(noise.size()), grad(noise.size());
  std::ostringstream jsonl;
  for (int step = 0; step < o.steps; ++step) {
    for (auto& x : noise) x = noise_rng.normal();
    for (Variant& v : variants) {
      for (int t = 0; t < T; ++t)
        for (int e = 0; e < E; ++e)
          logits[static_cast<size_t>(t) * E + e] =
              popularity[e] + v.theta[e] + noise[static_cast<size_t>(t) * E + e];
      const RouterOutput out = route(cfg, logits.data(), T, v.bias.data());
      const std::vector<int64_t> load = expert_load(out.topk_idx.data(), T, K, E);
      const double vio = max_violation(load);
      // GPU loads: contiguous experts, or the current EPLB plan (replicas share their expert's
      // load evenly).
      std::vector<double> gpu(P, 0.0);
      if (v.eplb && v.have_plan) {
        const std::vector<float> w(load.begin(), load.end());
        gpu = eplb::gpu_loads(v.plan, w, P);
      } else {
        for (int e = 0; e < E; ++e) gpu[e / (E / P)] += static_cast<double>(load[e]);
      }
      const double imbalance = max_violation(gpu) + 1.0;
      v.max_vio.push_back(vio);
      v.gpu_imbalance.push_back(imbalance);
      OrderedJson row;
      row["step"] = step;
      row["variant"] = v.name;
      row["max_vio"] = vio;
      row["gpu_imbalance"] = imbalance;
      row["eplb_placed"] = v.eplb && v.have_plan;
      jsonl << row.dump() << "\n";
      // Updates after the step: the bias, the sequence-wise loss on theta, EPLB statistics.
      if (v.bias_update) update_bias(v.bias, load, o.gamma);
      if (v.seq_loss && o.alpha > 0) {
        std::fill(grad.begin(), grad.end(), 0.0f);
        sequence_balance_loss(cfg, out, o.seq_len, o.alpha, grad.data());
        for (int e = 0; e < E; ++e) {
          double g = 0;
          for (int t = 0; t < T; ++t) g += grad[static_cast<size_t>(t) * E + e];
          v.theta[e] -= static_cast<float>(o.lr * g);
        }
      }
      if (v.eplb) {
        for (int e = 0; e < E; ++e) v.window_load[e] += load[e];
        if ((step + 1) % o.eplb_every == 0) {
          eplb::Problem prob;
          prob.num_layers = 1;
          prob.num_experts = E;
          prob.weight.assign(v.window_load.begin(), v.window_load.end());
          prob.num_replicas = E + o.redundant;
          prob.num_groups = o.groups;
          prob.num_nodes = o.nodes;
          prob.num_gpus = P;
          v.plan = eplb::rebalance_experts(prob);
          v.have_plan = true;
          std::fill(v.window_load.begin(), v.window_load.end(), 0);
        }
      }
    }
    for (int e = 0; e < E; ++e) popularity[e] += o.drift * pop_rng.normal();
  }
  // Everything is computed before anything is written.
  const std::string svg = o.svg.empty() ? std::string() : svg_plot(variants, o.steps);
  write_file_atomic(o.out, jsonl.str());
  if (!o.svg.empty()) write_file_atomic(o.svg, svg);
}

void setup_simulate(CLI::App& app) {
  auto o = std::make_shared<SimOptions>();
  app.add_option("--steps", o->steps, "training / serving steps")->capture_default_str();
  app.add_option("--tokens", o->tokens, "tokens per step")->capture_default_str();
  app.add_option("--seq-len", o->seq_len, "sequence length for the sequence-wise loss")
      ->capture_default_str();
  app.add_option("--experts", o->experts, "n_routed_experts")->capture_default_str();
  app.add_option("--top-k", o->top_k, "num_experts_per_tok")->capture_default_str();
  app.add_option("--groups", o->groups, "n_group")->capture_default_str();
  app.add_option("--topk-group", o->topk_group, "topk_group")->capture_default_str();
  app.add_option("--gpus", o->gpus, "GPUs the experts are spread over")->capture_default_str();
  app.add_option("--nodes", o->nodes, "nodes (EPLB's hierarchical policy)")->capture_default_str();
  app.add_option("--redundant", o->redundant, "redundant expert slots for EPLB")
      ->capture_default_str();
  app.add_option("--gamma", o->gamma, "bias update speed")->capture_default_str();
  app.add_option("--alpha", o->alpha, "sequence-wise balance loss weight")->capture_default_str();
  app.add_option("--lr", o->lr, "learning rate of the gate offsets under the sequence-wise loss")
      ->capture_default_str();
  app.add_option("--skew", o->skew, "initial popularity spread (logit std)")->capture_default_str();
  app.add_option("--drift", o->drift, "popularity random-walk step (logit std per step)")
      ->capture_default_str();
  app.add_option("--eplb-every", o->eplb_every, "re-place experts with EPLB every K steps")
      ->capture_default_str();
  app.add_option("--seed", o->seed, "random seed")->capture_default_str();
  app.add_option("--out", o->out, "JSON lines output ('-' = stdout)")->capture_default_str();
  app.add_option("--svg", o->svg, "SVG plot of MaxVio and GPU imbalance per variant");
  app.callback([o] { run_simulation(*o); });
}

void setup_moe(CLI::App& app) {
  app.require_subcommand(1);
  setup_route(*app.add_subcommand("route", "Run the router's CPU reference on given logits"));
  setup_simulate(*app.add_subcommand(
      "simulate",
      "Expert load under skewed, drifting popularity: bias update, sequence-wise "
      "loss, EPLB re-placement"));
}

}  // namespace

FM_REGISTER_COMMAND("moe", "MoE routing tools: route given logits, simulate expert load",
                    setup_moe);
