// fp8moe numerics accumulation: the accumulation-precision study (DESIGN.md interface).
#include <fmt/format.h>

#include <iostream>
#include <thread>

#include "command.h"
#include "fp8moe/core/json.h"
#include "fp8moe/fp8/accumulation_study.h"

namespace fp8moe::cli {
namespace {

void setup_accumulation(CLI::App& app) {
  struct Flags {
    std::string ks = "512,1024,2048,4096,8192,16384";
    int mantissa_bits = 14;
    int interval = 128;
    int trials = 2;
    int group = 1;
    long long seed = 0;
    long long m = 128, n = 128;
    std::string dist = "uniform";
    std::string rounding = "truncate";
    bool json = false;
  };
  auto flags = std::make_shared<Flags>();
  app.add_option("--k", flags->ks, "Comma-separated K values (inner dimension) to study")
      ->capture_default_str();
  app.add_option("--mantissa-bits", flags->mantissa_bits,
                 "Fraction bits the limited accumulator keeps (1..23; Hopper keeps ~14)")
      ->capture_default_str();
  app.add_option("--interval", flags->interval,
                 "Promote partial sums to FP32 every this many K elements (multiple of 32; 0 = "
                 "never)")
      ->capture_default_str();
  app.add_option("--trials", flags->trials, "Random problems per K (fresh inputs each)")
      ->capture_default_str();
  app.add_option("--seed", flags->seed, "Philox seed of the inputs")->capture_default_str();
  app.add_option("--m", flags->m, "Rows of A (outputs per trial = m*n)")->capture_default_str();
  app.add_option("--n", flags->n, "Rows of B")->capture_default_str();
  app.add_option("--dist", flags->dist,
                 "Input distribution before quantisation: uniform (0..1: products share a sign, "
                 "the worst case) or normal (0, 1)")
      ->check(CLI::IsMember({"uniform", "normal"}))
      ->capture_default_str();
  app.add_option("--rounding", flags->rounding,
                 "How the limited accumulator drops bits: truncate (addends aligned to the "
                 "largest exponent, shifted-out bits dropped: the tensor-core model), "
                 "truncate-sum (the exact sum chopped toward zero) or nearest")
      ->check(CLI::IsMember({"truncate", "truncate-sum", "nearest"}))
      ->capture_default_str();
  app.add_option("--group", flags->group, "Products added to the accumulator per step (1..64)")
      ->capture_default_str();
  app.add_flag("--json", flags->json, "Print one JSON object instead of a table");
  app.callback([flags] {
    AccumulationStudyOptions o;
    o.ks.clear();
    for (long long k : parse_int_list(flags->ks, "--k")) {
      FM_CHECK_ARG(k >= 1, "--k: K must be >= 1, got ", k);
      o.ks.push_back(k);
    }
    o.mantissa_bits = flags->mantissa_bits;
    o.interval = flags->interval;
    o.trials = flags->trials;
    FM_CHECK_ARG(flags->seed >= 0, "--seed: must be >= 0");
    o.seed = static_cast<uint64_t>(flags->seed);
    o.m = flags->m;
    o.n = flags->n;
    o.distribution =
        flags->dist == "uniform" ? InputDistribution::kUniform01 : InputDistribution::kNormal;
    o.group = flags->group;
    o.rounding = flags->rounding == "truncate"       ? AccumRounding::kTruncate
                 : flags->rounding == "truncate-sum" ? AccumRounding::kTruncateSum
                                                     : AccumRounding::kNearestEven;
    o.threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    validate(o);
    const auto rows = run_accumulation_study(o);
    if (flags->json) {
      OrderedJson out;
      out["mantissa_bits"] = o.mantissa_bits;
      out["interval"] = o.interval;
      out["rounding"] = flags->rounding;
      out["group"] = o.group;
      out["dist"] = distribution_name(o.distribution);
      out["m"] = o.m;
      out["n"] = o.n;
      out["trials"] = o.trials;
      out["seed"] = o.seed;
      out["rows"] = OrderedJson::array();
      for (const auto& r : rows) {
        OrderedJson row;
        row["k"] = r.k;
        row["limited"] = {{"max_rel_err", r.limited.max_rel_err},
                          {"mean_rel_err", r.limited.mean_rel_err}};
        row["promoted"] = {{"max_rel_err", r.promoted.max_rel_err},
                           {"mean_rel_err", r.promoted.mean_rel_err}};
        out["rows"].push_back(row);
      }
      std::cout << out.dump() << "\n";
      return;
    }
    fmt::print(
        "accumulator: {} fraction bits, {}, {} product(s) per step; promotion to FP32 "
        "every {} K elements\n",
        o.mantissa_bits, flags->rounding, o.group, o.interval);
    fmt::print(
        "inputs: {} -> E4M3 (A 1x128, B 128x128 scales), {}x{} outputs x {} trials, "
        "seed {}\n",
        distribution_name(o.distribution), o.m, o.n, o.trials, o.seed);
    fmt::print("relative error vs FP64 of the same FP8 values (outputs with |ref| > 0.1 rms)\n\n");
    fmt::print("{:>7} | {:>12} {:>12} | {:>12} {:>12} | {:>8}\n", "K", "limited max",
               "limited mean", "promoted max", "promoted mean", "gain");
    fmt::print("{:->7}-+-{:->12}-{:->12}-+-{:->12}-{:->12}-+-{:->8}\n", "", "", "", "", "", "");
    for (const auto& r : rows) {
      const double gain =
          r.promoted.max_rel_err > 0 ? r.limited.max_rel_err / r.promoted.max_rel_err : 0;
      fmt::print("{:>7} | {:>12.3e} {:>12.3e} | {:>12.3e} {:>12.3e} | {:>7.0f}x\n", r.k,
                 r.limited.max_rel_err, r.limited.mean_rel_err, r.promoted.max_rel_err,
                 r.promoted.mean_rel_err, gain);
    }
  });
}

FM_REGISTER_COMMAND("numerics", "FP8 numerics studies (accumulation precision)", [](CLI::App& app) {
  app.require_subcommand(1);
  setup_accumulation(*app.add_subcommand(
      "accumulation",
      "Max/mean relative error of limited-precision accumulation with and without promotion"));
});

}  // namespace
}  // namespace fp8moe::cli
