// Serving throughput on one GPU (serve::GeneratorGpu: ModelGpu::decode over paged latent caches,
// kernels::mla_decode; continuous batching) against the naive anchor in the same run: the same
// generator serving one request at a time. Random weights (init_parameters_gpu: the CPU model's
// initialisation), random prompts of --prompt tokens, --new tokens each (end-of-sequence
// ignored), greedy. Rows: decoding tokens/s (every running sequence's token of a step / the
// steps' wall time, host sampling and the logits copy included), prefill tokens/s, the mean
// decoding step with CUDA graphs (the default) and without; the anchor's tokens/s (graphs on)
// and the ratio.
// With --devices 0,1 (several entries; repeats: ranks sharing a GPU): serving over those ranks
// (serve::GeneratorGroup: data-parallel attention, expert-parallel MoE, lockstep), each rank
// `batch` requests, against one GPU alone (world 1, every expert local) at the same per-GPU
// batch in the same run: rows of the group's decoding tokens/s (every rank's tokens / the slowest
// rank's decoding wall time) and end-to-end tokens/s (new tokens / generate()'s wall time), and
// the ratio to the one-GPU run.
// With --disaggregate P,D: prefill/decode disaggregation (serve::DisaggregatedGeneratorGpu:
// prefill on GPU P, decoding on GPU D) against one GPU alone and against the same two GPUs as a
// data-parallel / expert-parallel group, on a queue of --requests prompts with max_batch = each
// --batches entry (requests join as others finish): new tokens/s over the wall time, time to
// first token (median, p90) and the gaps between a request's tokens (median, p99).
// With --arrival-rates R1,R2,...: an open-loop load (GeneratorGpu::serve) — --requests prompts
// (default 256) arriving as a Poisson process of each rate (requests/s), max_batch the largest
// --batches entry: served tokens/s, time to first token from each request's arrival (median,
// p99: queueing included) and the gaps between its tokens (median, p99).
// With --devices 0,1 --eplb N: redundant experts (serve/expert_placement_plan.h) — the group
// serves a first set of requests, EPLB plans N redundant slots a MoE layer from the load it
// observed (summed over the ranks), and the group serving over that plan is timed against the
// plain group on the same new requests (the anchor), in the same run. --skew B adds B to the
// router's selection bias of an eighth of the experts, drawn from the first half of the ids (V3's
// layers have hot experts, and with many GPUs some GPUs hold more of them; random weights route
// evenly, and at 2 to 4 GPUs randomly placed hot experts mostly even out, so the hot ones sit on
// the first GPUs here): rows give the GPUs' load max / mean without and with the plan (the
// planned figure from the timed run's own load), prefill and decoding tokens/s of both.
// With --devices 0,1 --low-latency-ab 1 (or --devices 0: one GPU's MoE layers over a one-rank
// EP group): the group's decoding passes over the low-latency EP
// kernels (GeneratorOptions::low_latency_ep) against the same group over the normal kernels (the
// anchor), both groups built side by side and timed in turns (--rounds N, default 3, each batch
// off then on; medians): decoding tokens/s, step ms, end-to-end tokens/s and the ratio.
// --prefill-chunk N: prompt tokens a prefill pass (default: the prompt length, one sequence).
// With --prefill-batch B (one GPU): prompts prefilled B together (GeneratorOptions::prefill_batch,
// prefill_chunk = B x the prompt) against one at a time (the anchor: prefill_batch 1, a pass one
// prompt), `batch` requests of --prompt tokens and --new new tokens: prefill tokens/s (prompt
// tokens over the prefill passes' wall time), the passes, time to first token (median, p90) and
// end-to-end new tokens/s. Run (from the repository root): serve_bench [--configs
// small-gpu,v3-slice] [--batches 1,8,32,64]
//   [--prompt 128] [--new 64] [--vocab V] [--devices 0,1 [--eplb N [--skew B] [--prefill-chunk N]]
//   |
//   --disaggregate 0,1 [--requests N] | --arrival-rates 100,200 [--requests N] | --prefill-batch B]
//   [--tensor-core-products on|off] (GeneratorOptions::tensor_core_products, every generator)
//   [--low-latency-ab 1 [--rounds N]] (with --devices)
//   [--out rows.jsonl] [--date D] [--commit C]
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "bench_args.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/core/json.h"
#include "fp8moe/eplb/eplb.h"
#include "fp8moe/model/config.h"
#include "fp8moe/serve/disaggregated_gpu.h"
#include "fp8moe/serve/expert_placement_plan.h"
#include "fp8moe/serve/generator_gpu.h"
#include "fp8moe/serve/generator_group.h"
#include "fp8moe/train/train_state_gpu.h"

namespace {

using namespace fp8moe;

// --tensor-core-products: every generator's GeneratorOptions::tensor_core_products.
bool tensor_core_products = false;

using bench::split_list;

std::vector<std::vector<int32_t>> prompts(int64_t n, int64_t len, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> d(0, static_cast<int32_t>(vocab - 1));
  std::vector<std::vector<int32_t>> p(static_cast<size_t>(n), std::vector<int32_t>(len));
  for (auto& q : p)
    for (auto& t : q) t = d(rng);
  return p;
}

struct Rates {
  double decode = 0, end_to_end = 0, step_ms = 0, prefill = 0;
  int64_t idle = 0;
  std::vector<int64_t> load;  // the ranks' expert load summed
};

// One generate() of `batch` requests a rank: decoding tokens/s over the slowest rank's decoding
// time, and new tokens/s over the call's wall time.
Rates time_group(serve::GeneratorGroup* group, serve::GeneratorGpu* one, int64_t batch,
                 int64_t prompt, const serve::SamplingOptions& s, int64_t vocab,
                 uint64_t seed = 2000) {
  const int ranks = group != nullptr ? group->ranks() : 1;
  const auto p = prompts(batch * ranks, prompt, vocab, seed + batch);
  std::vector<serve::GenerationStats> st(1);
  const auto t0 = std::chrono::steady_clock::now();
  FM_CHECK((group != nullptr) != (one != nullptr), "time_group: a group or one generator");
  if (group != nullptr)
    group->generate(p, s, &st);
  else if (one != nullptr)
    one->generate(p, s, &st[0]);
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  Rates r;
  double tokens = 0, decode_s = 0, steps = 0, prefill_tokens = 0, prefill_s = 0;
  r.load.assign(st[0].expert_load.size(), 0);
  for (const auto& x : st) {
    tokens += static_cast<double>(x.decode_tokens);
    decode_s = std::max(decode_s, x.decode_s);
    prefill_tokens += static_cast<double>(x.prefill_tokens);
    prefill_s = std::max(prefill_s, x.prefill_s);
    steps = std::max(steps, static_cast<double>(x.decode_steps + x.idle_steps));
    r.idle += x.idle_steps;
    for (size_t i = 0; i < r.load.size(); ++i) r.load[i] += x.expert_load[i];
  }
  r.prefill = prefill_tokens / prefill_s;
  r.decode = tokens / decode_s;
  r.end_to_end = static_cast<double>(batch * ranks * s.max_new_tokens) / wall;
  r.step_ms = 1e3 * decode_s / steps;
  return r;
}

// configs/<name>.json, its vocabulary replaced by `vocab` (> 0).
ModelConfig bench_config(const std::string& name, int64_t vocab) {
  const std::string path = "configs/" + name + ".json";
  Json j = read_json_file(path);
  if (vocab > 0) j["vocab_size"] = vocab;
  return parse_model_config(j, path);
}

// A generator's options for `max_batch` requests of `prompt` + `fresh` tokens: a context that holds
// them, prefill passes of prefill_chunk tokens (one prompt by default), --tensor-core-products.
serve::GeneratorOptions bench_options(const ModelConfig& cfg, int64_t max_batch, int64_t prompt,
                                      int64_t fresh, int64_t prefill_chunk) {
  serve::GeneratorOptions o;
  o.max_batch = max_batch;
  o.tensor_core_products = tensor_core_products;
  o.context = std::min<int64_t>(cfg.max_position_embeddings, prompt + fresh + 64);
  o.prefill_chunk = prefill_chunk;
  return o;
}

// The init_parameters_gpu initialisation of serve_bench's generators (random weights).
std::function<void(ModelGpu&)> random_weights(const ModelConfig& cfg) {
  return [init = cfg.initializer_range](ModelGpu& m) {
    init_parameters_gpu(m.parameters(), m.buffers(), 1, init, nullptr);
  };
}

// random_weights, then `skew` added to the selection bias of an eighth of each MoE layer's
// experts drawn from the first half of the ids (hot experts; the same ones on every rank).
std::function<void(ModelGpu&)> skewed_weights(const ModelConfig& cfg, float skew) {
  return [cfg, skew](ModelGpu& m) {
    random_weights(cfg)(m);
    if (skew == 0.0f) return;
    std::mt19937_64 rng(77);
    for (ParameterGpu& b : m.buffers()) {
      if (b.name.find("e_score_correction_bias") == std::string::npos) continue;
      std::vector<float> bias(static_cast<size_t>(b.numel), 0.0f);
      std::vector<int> ids(bias.size() / 2);
      for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int>(i);
      std::shuffle(ids.begin(), ids.end(), rng);
      for (size_t i = 0; i < std::max<size_t>(1, bias.size() / 8); ++i) bias[ids[i]] = skew;
      FM_CHECK_CUDA(cudaMemcpy(b.value, bias.data(), bias.size() * 4, cudaMemcpyHostToDevice));
    }
  };
}

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(q * static_cast<double>(v.size() - 1) + 0.5)];
}

// --disaggregate: one GPU, the two-GPU group and the disaggregated pair on the same queue.
void run_disaggregate(const std::vector<std::string>& configs, const std::vector<int64_t>& bs,
                      const std::vector<int>& pair, int64_t prompt, int64_t fresh, int64_t vocab,
                      int64_t requests, FILE* f, const std::string& gpu, const std::string& date,
                      const std::string& commit) {
  std::printf("%-10s %5s %8s %-14s %5s %12s %10s %10s %10s %10s\n", "config", "batch", "requests",
              "mode", "gpus", "tokens/s", "ttft p50", "ttft p90", "gap p50", "gap p99");
  for (const std::string& name : configs) {
    const ModelConfig cfg = bench_config(name, vocab);
    const auto load = random_weights(cfg);
    serve::SamplingOptions s;
    s.max_new_tokens = fresh;
    s.ignore_eos = true;
    for (const int64_t b : bs) {
      const serve::GeneratorOptions o = bench_options(
          cfg, b, prompt, fresh, std::max<int64_t>(std::min<int64_t>(prompt, 512), 64));
      const int64_t n = requests > 0 ? requests : 4 * b;
      const auto p = prompts(n, prompt, cfg.vocab_size, 3000 + b);
      for (int mode = 0; mode < 3; ++mode) {
        std::vector<serve::GenerationStats> st;
        double wall = 0;
        const auto timed = [&](const std::function<void()>& fn) {
          fn();  // warm-up: graphs captured, lazy set-up done
          st.clear();
          const auto t0 = std::chrono::steady_clock::now();
          fn();
          wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        };
        if (mode == 0) {
          FM_CHECK_CUDA(cudaSetDevice(pair[0]));
          serve::GeneratorGpu one(cfg, o, load);
          timed([&] {
            st.assign(1, {});
            one.generate(p, s, &st[0]);
          });
        } else if (mode == 1) {
          serve::GeneratorGroup group(cfg, o, pair, load);
          timed([&] { group.generate(p, s, &st); });
        } else {
          serve::DisaggregatedGeneratorGpu dis(cfg, o, pair[0], pair[1], load);
          timed([&] {
            st.assign(2, {});
            dis.generate(p, s, &st[0], &st[1]);
          });
          st.erase(st.begin());  // the decoding half holds every request's times
        }
        std::vector<double> ttft, gaps;
        for (const auto& x : st) {
          ttft.insert(ttft.end(), x.first_token_ms.begin(), x.first_token_ms.end());
          gaps.insert(gaps.end(), x.token_gap_ms.begin(), x.token_gap_ms.end());
        }
        const char* modes[3] = {"one_gpu", "dp_ep_group", "disaggregated"};
        const int gpus = mode == 0 ? 1 : 2;
        const double rate = static_cast<double>(n * fresh) / wall;
        std::printf("%-10s %5lld %8lld %-14s %5d %12.0f %10.2f %10.2f %10.3f %10.3f\n",
                    name.c_str(), static_cast<long long>(b), static_cast<long long>(n), modes[mode],
                    gpus, rate, percentile(ttft, 0.5), percentile(ttft, 0.9), percentile(gaps, 0.5),
                    percentile(gaps, 0.99));
        if (f != nullptr)
          std::fprintf(
              f,
              "{\"bench\":\"serve_disaggregated\",\"gpu\":\"%s\",\"gpus\":%d,\"date\":\"%s\","
              "\"commit\":\"%s\",\"impl\":\"%s\",\"config\":\"%s\",\"max_batch\":%lld,"
              "\"requests\":%lld,\"prompt\":%lld,\"new_tokens\":%lld,\"tokens_per_s\":%.1f,"
              "\"ttft_p50_ms\":%.3f,\"ttft_p90_ms\":%.3f,\"gap_p50_ms\":%.4f,"
              "\"gap_p99_ms\":%.4f,\"us\":%.1f}\n",
              gpu.c_str(), gpus, date.c_str(), commit.c_str(), modes[mode], name.c_str(),
              static_cast<long long>(b), static_cast<long long>(n), static_cast<long long>(prompt),
              static_cast<long long>(fresh), rate, percentile(ttft, 0.5), percentile(ttft, 0.9),
              percentile(gaps, 0.5), percentile(gaps, 0.99), 1e6 * wall);
      }
    }
  }
}

// --arrival-rates: open-loop Poisson arrivals into one GPU's serving loop.
void run_arrivals(const std::vector<std::string>& configs, int64_t max_batch,
                  const std::vector<double>& rates, int64_t prompt, int64_t fresh, int64_t vocab,
                  int64_t requests, FILE* f, const std::string& gpu, const std::string& date,
                  const std::string& commit) {
  std::printf("%-10s %6s %9s %9s %12s %10s %10s %10s %10s %9s\n", "config", "batch", "rate/s",
              "requests", "tokens/s", "ttft p50", "ttft p99", "gap p50", "gap p99", "running");
  for (const std::string& name : configs) {
    const ModelConfig cfg = bench_config(name, vocab);
    const serve::GeneratorOptions o = bench_options(
        cfg, max_batch, prompt, fresh, std::max<int64_t>(std::min<int64_t>(prompt, 512), 64));
    serve::GeneratorGpu gen(cfg, o, random_weights(cfg));
    const int64_t n = requests > 0 ? requests : 256;
    const auto p = prompts(n, prompt, cfg.vocab_size, 4000);
    serve::SamplingOptions s;
    s.max_new_tokens = fresh;
    s.ignore_eos = true;
    gen.generate(prompts(max_batch, prompt, cfg.vocab_size, 5), s);  // warm-up: every graph
    for (const double rate : rates) {
      std::mt19937_64 rng(static_cast<uint64_t>(rate * 1000) + 11);
      std::exponential_distribution<double> gap(rate);
      std::vector<double> at(static_cast<size_t>(n));
      double t = 0;
      for (double& x : at) x = (t += gap(rng));
      size_t given = 0;
      const double t0 = serve::steady_seconds();
      serve::GenerationStats st;
      gen.serve(
          [&](serve::ServeRequest* r, bool wait) {
            if (given == at.size()) return serve::Arrival::kClosed;
            double now = serve::steady_seconds() - t0;
            if (at[given] > now) {
              if (!wait) return serve::Arrival::kNone;
              std::this_thread::sleep_for(std::chrono::duration<double>(at[given] - now));
            }
            r->id = static_cast<int64_t>(given);
            r->prompt = p[given];
            r->sampling = s;
            r->arrival = t0 + at[given];
            ++given;
            return serve::Arrival::kRequest;
          },
          [](const serve::TokenEvent&) {}, &st);
      const double wall = serve::steady_seconds() - t0;
      const double rate_out = static_cast<double>(n * fresh) / wall;
      std::printf("%-10s %6lld %9.0f %9lld %12.0f %10.2f %10.2f %10.3f %10.3f %9lld\n",
                  name.c_str(), static_cast<long long>(max_batch), rate, static_cast<long long>(n),
                  rate_out, percentile(st.first_token_ms, 0.5), percentile(st.first_token_ms, 0.99),
                  percentile(st.token_gap_ms, 0.5), percentile(st.token_gap_ms, 0.99),
                  static_cast<long long>(st.max_running));
      if (f != nullptr)
        std::fprintf(f,
                     "{\"bench\":\"serve_arrivals\",\"gpu\":\"%s\",\"gpus\":1,\"date\":\"%s\","
                     "\"commit\":\"%s\",\"impl\":\"fp8moe\",\"config\":\"%s\",\"max_batch\":%lld,"
                     "\"arrival_rate\":%.1f,\"requests\":%lld,\"prompt\":%lld,\"new_tokens\":%lld,"
                     "\"tokens_per_s\":%.1f,\"ttft_p50_ms\":%.3f,\"ttft_p99_ms\":%.3f,"
                     "\"gap_p50_ms\":%.4f,\"gap_p99_ms\":%.4f,\"us\":%.1f}\n",
                     gpu.c_str(), date.c_str(), commit.c_str(), name.c_str(),
                     static_cast<long long>(max_batch), rate, static_cast<long long>(n),
                     static_cast<long long>(prompt), static_cast<long long>(fresh), rate_out,
                     percentile(st.first_token_ms, 0.5), percentile(st.first_token_ms, 0.99),
                     percentile(st.token_gap_ms, 0.5), percentile(st.token_gap_ms, 0.99),
                     1e6 * wall);
    }
  }
}

// --prefill-batch: prompts prefilled together against one at a time, one GPU.
void run_prefill(const std::vector<std::string>& configs, const std::vector<int64_t>& bs,
                 int64_t prompt, int64_t fresh, int64_t vocab, int64_t together, FILE* f,
                 const std::string& gpu, const std::string& date, const std::string& commit) {
  std::printf("%-10s %5s %6s %14s %7s %10s %10s %12s %14s %7s %10s %10s %12s %8s\n", "config",
              "batch", "pb", "prefill tok/s", "passes", "ttft p50", "ttft p90", "e2e tok/s",
              "1-by-1 tok/s", "passes", "ttft p50", "ttft p90", "e2e tok/s", "x");
  for (const std::string& name : configs) {
    const ModelConfig cfg = bench_config(name, vocab);
    serve::SamplingOptions s;
    s.max_new_tokens = fresh;
    s.ignore_eos = true;
    struct Run {
      double prefill = 0, e2e = 0, p50 = 0, p90 = 0;
      int64_t passes = 0;
    };
    const auto time = [&](serve::GeneratorGpu& gen, int64_t b) {
      const auto p = prompts(b, prompt, cfg.vocab_size, 3000 + b);
      serve::GenerationStats st;
      const auto t0 = std::chrono::steady_clock::now();
      gen.generate(p, s, &st);
      const double wall =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      Run r;
      r.prefill = static_cast<double>(st.prefill_tokens) / st.prefill_s;
      r.e2e = static_cast<double>(b * fresh) / wall;
      r.p50 = percentile(st.first_token_ms, 0.5);
      r.p90 = percentile(st.first_token_ms, 0.9);
      r.passes = st.prefill_steps;
      return r;
    };
    std::vector<Run> runs[2];
    for (int form = 0; form < 2; ++form) {
      const int64_t prefill_batch = form == 0 ? 1 : together;
      serve::GeneratorOptions o =
          bench_options(cfg, *std::max_element(bs.begin(), bs.end()), prompt, fresh,
                        std::max<int64_t>(prompt, 64) * prefill_batch);
      o.prefill_batch = prefill_batch;
      serve::GeneratorGpu gen(cfg, o, random_weights(cfg));
      time(gen, std::min<int64_t>(o.max_batch, together));  // warm-up
      for (const int64_t b : bs) runs[form].push_back(time(gen, b));
    }
    for (size_t i = 0; i < bs.size(); ++i) {
      const Run& g = runs[1][i];
      const Run& a = runs[0][i];
      std::printf(
          "%-10s %5lld %6lld %14.0f %7lld %10.2f %10.2f %12.0f %14.0f %7lld %10.2f %10.2f %12.0f "
          "%7.2fx\n",
          name.c_str(), static_cast<long long>(bs[i]), static_cast<long long>(together), g.prefill,
          static_cast<long long>(g.passes), g.p50, g.p90, g.e2e, a.prefill,
          static_cast<long long>(a.passes), a.p50, a.p90, a.e2e, g.prefill / a.prefill);
      for (int form = 0; form < 2 && f != nullptr; ++form) {
        const Run& r = runs[form][i];
        std::fprintf(f,
                     "{\"bench\":\"serve_prefill\",\"gpu\":\"%s\",\"gpus\":1,\"date\":\"%s\","
                     "\"commit\":\"%s\",\"impl\":\"%s\",\"config\":\"%s\",\"batch\":%lld,"
                     "\"prefill_batch\":%lld,\"prompt\":%lld,\"new_tokens\":%lld,"
                     "\"prefill_tokens_per_s\":%.1f,\"prefill_passes\":%lld,\"ttft_p50_ms\":%.3f,"
                     "\"ttft_p90_ms\":%.3f,\"end_to_end_tokens_per_s\":%.1f,"
                     "\"prefill_ratio_vs_one_at_a_time\":%.3f}\n",
                     gpu.c_str(), date.c_str(), commit.c_str(),
                     form == 1 ? "fp8moe_batched_prefill" : "one_at_a_time", name.c_str(),
                     static_cast<long long>(bs[i]),
                     static_cast<long long>(form == 1 ? together : 1),
                     static_cast<long long>(prompt), static_cast<long long>(fresh), r.prefill,
                     static_cast<long long>(r.passes), r.p50, r.p90, r.e2e, r.prefill / a.prefill);
      }
    }
  }
}

// --devices --eplb: the group over EPLB's plan of the load it observed against the plain group.
void run_eplb(const std::vector<std::string>& configs, const std::vector<int64_t>& bs,
              const std::vector<int>& devices, int64_t prompt, int64_t fresh, int64_t vocab,
              int redundant, float skew, int64_t prefill_chunk, FILE* f, const std::string& gpu,
              const std::string& date, const std::string& commit) {
  std::printf("%-10s %5s %5s %4s %6s %9s %9s %14s %14s %8s %14s %14s %8s\n", "config", "ranks",
              "batch", "+exp", "skew", "imb plain", "imb plan", "prefill tok/s", "plain", "x",
              "decode tok/s", "plain", "x");
  const int ranks = static_cast<int>(devices.size());
  for (const std::string& name : configs) {
    const ModelConfig cfg = bench_config(name, vocab);
    const serve::GeneratorOptions o =
        bench_options(cfg, *std::max_element(bs.begin(), bs.end()), prompt, fresh,
                      prefill_chunk > 0 ? prefill_chunk : std::max<int64_t>(prompt, 64));
    const auto load = skewed_weights(cfg, skew);
    serve::SamplingOptions s;
    s.max_new_tokens = fresh;
    s.ignore_eos = true;
    std::vector<Rates> plain;
    std::vector<int64_t> observed;
    {
      serve::GeneratorGroup group(cfg, o, devices, load);
      time_group(&group, nullptr, 1, prompt, s, cfg.vocab_size);  // warm-up
      // The traffic EPLB plans from: other requests than the timed ones.
      observed = time_group(&group, nullptr, o.max_batch, prompt, s, cfg.vocab_size, 5000).load;
      for (const int64_t b : bs)
        plain.push_back(time_group(&group, nullptr, b, prompt, s, cfg.vocab_size));
    }
    const std::vector<ExpertPlacement> placements = serve::placements_from_plan(
        eplb::rebalance_experts(serve::expert_load_problem(cfg, observed, redundant, ranks)), cfg,
        ranks);
    serve::GeneratorGroup group(cfg, o, devices, load, placements);
    time_group(&group, nullptr, 1, prompt, s, cfg.vocab_size);  // warm-up
    for (size_t i = 0; i < bs.size(); ++i) {
      const Rates g = time_group(&group, nullptr, bs[i], prompt, s, cfg.vocab_size);
      auto worst = [](const std::vector<double>& v) {
        return *std::max_element(v.begin(), v.end());
      };
      const double imb_plain = worst(serve::gpu_imbalance(cfg, plain[i].load, {}, ranks));
      const double imb_plan = worst(serve::gpu_imbalance(cfg, g.load, placements, ranks));
      std::printf(
          "%-10s %5d %5lld %4d %6.3f %9.3f %9.3f %14.0f %14.0f %7.2fx %14.0f %14.0f %7.2fx\n",
          name.c_str(), ranks, static_cast<long long>(bs[i]), redundant, skew, imb_plain, imb_plan,
          g.prefill, plain[i].prefill, g.prefill / plain[i].prefill, g.decode, plain[i].decode,
          g.decode / plain[i].decode);
      for (int impl = 0; impl < 2 && f != nullptr; ++impl) {
        const Rates& r = impl == 0 ? g : plain[i];
        std::fprintf(f,
                     "{\"bench\":\"serve_eplb\",\"gpu\":\"%s\",\"gpus\":%d,\"ranks\":%d,"
                     "\"date\":\"%s\",\"commit\":\"%s\",\"impl\":\"%s\",\"config\":\"%s\","
                     "\"batch_per_rank\":%lld,\"prompt\":%lld,\"new_tokens\":%lld,"
                     "\"prefill_chunk\":%lld,\"redundant_experts\":%d,\"skew\":%.3f,"
                     "\"gpu_load_max_over_mean\":%.4f,"
                     "\"prefill_tokens_per_s\":%.1f,\"decode_tokens_per_s\":%.1f,\"us\":%.1f,"
                     "\"prefill_ratio_vs_plain\":%.3f,\"decode_ratio_vs_plain\":%.3f}\n",
                     gpu.c_str(), ranks, ranks, date.c_str(), commit.c_str(),
                     impl == 0 ? "fp8moe_eplb" : "plain", name.c_str(),
                     static_cast<long long>(bs[i]), static_cast<long long>(prompt),
                     static_cast<long long>(fresh), static_cast<long long>(o.prefill_chunk),
                     impl == 0 ? redundant : 0, skew, impl == 0 ? imb_plan : imb_plain, r.prefill,
                     r.decode, 1e3 * r.step_ms, impl == 0 ? g.prefill / plain[i].prefill : 1.0,
                     impl == 0 ? g.decode / plain[i].decode : 1.0);
      }
    }
  }
}

// --devices: the group against one GPU, per config and per-rank batch.
void run_group(const std::vector<std::string>& configs, const std::vector<int64_t>& bs,
               const std::vector<int>& devices, int64_t prompt, int64_t fresh, int64_t vocab,
               FILE* f, const std::string& gpu, const std::string& date,
               const std::string& commit) {
  std::printf("%-10s %5s %5s %14s %14s %10s %14s %14s %8s %8s\n", "config", "ranks", "batch",
              "decode tok/s", "e2e tok/s", "step ms", "1-GPU decode", "1-GPU e2e", "ratio",
              "e2e x");
  for (const std::string& name : configs) {
    const ModelConfig cfg = bench_config(name, vocab);
    const serve::GeneratorOptions o = bench_options(cfg, *std::max_element(bs.begin(), bs.end()),
                                                    prompt, fresh, std::max<int64_t>(prompt, 64));
    const auto load = random_weights(cfg);
    serve::SamplingOptions s;
    s.max_new_tokens = fresh;
    s.ignore_eos = true;
    std::vector<Rates> alone;
    {
      FM_CHECK_CUDA(cudaSetDevice(devices[0]));
      serve::GeneratorGpu one(cfg, o, load);
      time_group(nullptr, &one, 1, prompt, s, cfg.vocab_size);  // warm-up
      for (const int64_t b : bs)
        alone.push_back(time_group(nullptr, &one, b, prompt, s, cfg.vocab_size));
    }
    serve::GeneratorGroup group(cfg, o, devices, load);
    time_group(&group, nullptr, 1, prompt, s, cfg.vocab_size);  // warm-up
    for (size_t i = 0; i < bs.size(); ++i) {
      const Rates g = time_group(&group, nullptr, bs[i], prompt, s, cfg.vocab_size);
      std::printf("%-10s %5d %5lld %14.0f %14.0f %10.3f %14.0f %14.0f %7.2fx %7.2fx\n",
                  name.c_str(), group.ranks(), static_cast<long long>(bs[i]), g.decode,
                  g.end_to_end, g.step_ms, alone[i].decode, alone[i].end_to_end,
                  g.decode / alone[i].decode, g.end_to_end / alone[i].end_to_end);
      for (int impl = 0; impl < 2 && f != nullptr; ++impl) {
        const Rates& r = impl == 0 ? g : alone[i];
        std::fprintf(
            f,
            "{\"bench\":\"serve\",\"gpu\":\"%s\",\"gpus\":%d,\"ranks\":%d,\"date\":\"%s\","
            "\"commit\":\"%s\",\"impl\":\"%s\",\"config\":\"%s\",\"batch_per_rank\":%lld,"
            "\"prompt\":%lld,\"new_tokens\":%lld,\"decode_tokens_per_s\":%.1f,"
            "\"end_to_end_tokens_per_s\":%.1f,\"us\":%.1f,\"ratio_vs_one_gpu\":%.3f,"
            "\"idle_steps\":%lld}\n",
            gpu.c_str(),
            impl == 0 ? static_cast<int>(std::set<int>(devices.begin(), devices.end()).size()) : 1,
            impl == 0 ? group.ranks() : 1, date.c_str(), commit.c_str(),
            impl == 0 ? "fp8moe_ep" : "one_gpu", name.c_str(), static_cast<long long>(bs[i]),
            static_cast<long long>(prompt), static_cast<long long>(fresh), r.decode, r.end_to_end,
            1e3 * r.step_ms, impl == 0 ? g.decode / alone[i].decode : 1.0,
            static_cast<long long>(r.idle));
      }
    }
  }
}

// --low-latency-ab: the group with low_latency_ep on against the same group with it off.
void run_low_latency_ab(const std::vector<std::string>& configs, const std::vector<int64_t>& bs,
                        const std::vector<int>& devices, int64_t prompt, int64_t fresh,
                        int64_t vocab, int rounds, FILE* f, const std::string& gpu,
                        const std::string& date, const std::string& commit) {
  std::printf("%-10s %5s %5s %14s %14s %10s %10s %12s %12s %8s %8s\n", "config", "ranks", "batch",
              "LL decode", "normal decode", "LL step", "step ms", "LL e2e", "normal e2e", "ratio",
              "e2e x");
  const auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  for (const std::string& name : configs) {
    const ModelConfig cfg = bench_config(name, vocab);
    serve::GeneratorOptions o = bench_options(cfg, *std::max_element(bs.begin(), bs.end()), prompt,
                                              fresh, std::max<int64_t>(prompt, 64));
    const auto load = random_weights(cfg);
    serve::SamplingOptions s;
    s.max_new_tokens = fresh;
    s.ignore_eos = true;
    o.low_latency_ep = false;
    serve::GeneratorGroup normal(cfg, o, devices, load);
    o.low_latency_ep = true;
    serve::GeneratorGroup ll(cfg, o, devices, load);
    time_group(&normal, nullptr, 1, prompt, s, cfg.vocab_size);  // warm-up
    time_group(&ll, nullptr, 1, prompt, s, cfg.vocab_size);
    for (const int64_t b : bs) {
      std::vector<double> dec[2], step[2], e2e[2];
      for (int round = 0; round < rounds; ++round)
        for (int on = 0; on < 2; ++on) {
          const Rates r = time_group(on ? &ll : &normal, nullptr, b, prompt, s, cfg.vocab_size);
          dec[on].push_back(r.decode);
          step[on].push_back(r.step_ms);
          e2e[on].push_back(r.end_to_end);
        }
      const double d0 = median(dec[0]), d1 = median(dec[1]), s0 = median(step[0]),
                   s1 = median(step[1]), e0 = median(e2e[0]), e1 = median(e2e[1]);
      std::printf("%-10s %5d %5lld %14.0f %14.0f %10.3f %10.3f %12.0f %12.0f %7.3fx %7.3fx\n",
                  name.c_str(), ll.ranks(), static_cast<long long>(b), d1, d0, s1, s0, e1, e0,
                  d1 / d0, e1 / e0);
      for (int on = 1; on >= 0 && f != nullptr; --on)
        std::fprintf(f,
                     "{\"bench\":\"serve_low_latency_ep\",\"gpu\":\"%s\",\"gpus\":%d,\"ranks\":%d,"
                     "\"date\":\"%s\",\"commit\":\"%s\",\"impl\":\"%s\",\"config\":\"%s\","
                     "\"batch_per_rank\":%lld,\"prompt\":%lld,\"new_tokens\":%lld,\"rounds\":%d,"
                     "\"decode_tokens_per_s\":%.1f,\"end_to_end_tokens_per_s\":%.1f,\"us\":%.1f,"
                     "\"ratio_vs_normal_ep\":%.4f}\n",
                     gpu.c_str(),
                     static_cast<int>(std::set<int>(devices.begin(), devices.end()).size()),
                     ll.ranks(), date.c_str(), commit.c_str(),
                     on ? "fp8moe_low_latency_ep" : "fp8moe_normal_ep", name.c_str(),
                     static_cast<long long>(b), static_cast<long long>(prompt),
                     static_cast<long long>(fresh), rounds, on ? d1 : d0, on ? e1 : e0,
                     1e3 * (on ? s1 : s0), on ? d1 / d0 : 1.0);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string configs = "small-gpu,v3-slice", batches = "1,8,32,64", out, date = "unknown",
              commit = "unknown", device_list, disaggregate, arrival_rates;
  int64_t prompt = 128, fresh = 64, vocab = 0, requests = 0;
  int64_t prefill_chunk = 0, prefill_batch = 0;
  int redundant = -1, low_latency_ab = 0, rounds = 3;
  float skew = 0.0f;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) {
      std::fprintf(stderr, "%s needs a value\n", a.c_str());
      return 2;
    }
    const std::string v = argv[++i];
    if (a == "--configs")
      configs = v;
    else if (a == "--batches")
      batches = v;
    else if (a == "--prompt")
      prompt = std::atoll(v.c_str());
    else if (a == "--new")
      fresh = std::atoll(v.c_str());
    else if (a == "--out")
      out = v;
    else if (a == "--date")
      date = v;
    else if (a == "--commit")
      commit = v;
    else if (a == "--devices")
      device_list = v;
    else if (a == "--vocab")
      vocab = std::atoll(v.c_str());
    else if (a == "--disaggregate")
      disaggregate = v;
    else if (a == "--requests")
      requests = std::atoll(v.c_str());
    else if (a == "--arrival-rates")
      arrival_rates = v;
    else if (a == "--eplb")
      redundant = std::atoi(v.c_str());
    else if (a == "--tensor-core-products")
      tensor_core_products = v == "1" || v == "on";
    else if (a == "--prefill-batch")
      prefill_batch = std::atoll(v.c_str());
    else if (a == "--prefill-chunk")
      prefill_chunk = std::atoll(v.c_str());
    else if (a == "--low-latency-ab")
      low_latency_ab = std::atoi(v.c_str());
    else if (a == "--rounds")
      rounds = std::max(1, std::atoi(v.c_str()));
    else if (a == "--skew")
      skew = static_cast<float>(std::atof(v.c_str()));
    else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "serve_bench: no GPU\n");
    return 77;
  }
  FILE* f = out.empty() ? nullptr : std::fopen(out.c_str(), "a");
  try {
    cudaDeviceProp prop{};
    FM_CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
    std::vector<int64_t> bs;
    for (const std::string& b : split_list(batches)) bs.push_back(std::atoll(b.c_str()));
    std::vector<int> group, pair;
    for (const std::string& d : split_list(device_list)) group.push_back(std::atoi(d.c_str()));
    for (const std::string& d : split_list(disaggregate)) pair.push_back(std::atoi(d.c_str()));
    if (!arrival_rates.empty()) {
      std::vector<double> rates;
      for (const std::string& r : split_list(arrival_rates)) rates.push_back(std::atof(r.c_str()));
      run_arrivals(split_list(configs), *std::max_element(bs.begin(), bs.end()), rates, prompt,
                   fresh, vocab, requests, f, prop.name, date, commit);
      if (f != nullptr) std::fclose(f);
      return 0;
    }
    if (pair.size() == 2) {
      run_disaggregate(split_list(configs), bs, pair, prompt, fresh, vocab, requests, f, prop.name,
                       date, commit);
      if (f != nullptr) std::fclose(f);
      return 0;
    }
    if (prefill_batch > 0) {
      run_prefill(split_list(configs), bs, prompt, fresh, vocab, prefill_batch, f, prop.name, date,
                  commit);
      if (f != nullptr) std::fclose(f);
      return 0;
    }
    if (group.size() >= 2 && redundant >= 0) {
      run_eplb(split_list(configs), bs, group, prompt, fresh, vocab, redundant, skew, prefill_chunk,
               f, prop.name, date, commit);
      if (f != nullptr) std::fclose(f);
      return 0;
    }
    if (!group.empty() && low_latency_ab > 0) {
      run_low_latency_ab(split_list(configs), bs, group, prompt, fresh, vocab, rounds, f, prop.name,
                         date, commit);
      if (f != nullptr) std::fclose(f);
      return 0;
    }
    if (group.size() >= 2) {
      run_group(split_list(configs), bs, group, prompt, fresh, vocab, f, prop.name, date, commit);
      if (f != nullptr) std::fclose(f);
      return 0;
    }
    std::printf("%-10s %6s %5s %12s %12s %10s %10s %14s %8s %12s %8s\n", "config", "vocab", "batch",
                "decode tok/s", "prefill tok/s", "step ms", "eager ms", "sequential", "ratio",
                "host-sampled", "x");
    for (const std::string& name : split_list(configs)) {
      const ModelConfig cfg = bench_config(name, vocab);
      const serve::GeneratorOptions o = bench_options(cfg, *std::max_element(bs.begin(), bs.end()),
                                                      prompt, fresh, std::max<int64_t>(prompt, 64));
      serve::GeneratorGpu gen(cfg, o, random_weights(cfg));
      serve::SamplingOptions s;
      s.max_new_tokens = fresh;
      s.ignore_eos = true;
      // The anchor: one request at a time (8 requests; a rate, so their count does not matter).
      double seq_tokens = 0, seq_s = 0;
      gen.generate(prompts(1, prompt, cfg.vocab_size, 99), s);  // warm-up
      for (const auto& p : prompts(8, prompt, cfg.vocab_size, 7)) {
        serve::GenerationStats st;
        gen.generate({p}, s, &st);
        seq_tokens += static_cast<double>(st.decode_tokens);
        seq_s += st.decode_s;
      }
      const double seq_rate = seq_tokens / seq_s;
      for (const int64_t b : bs) {
        serve::GenerationStats st;
        gen.generate(prompts(b, prompt, cfg.vocab_size, 1000 + b), s, &st);
        const double rate = static_cast<double>(st.decode_tokens) / st.decode_s;
        const double prefill = static_cast<double>(st.prefill_tokens) / st.prefill_s;
        const double step_ms = 1e3 * st.decode_s / static_cast<double>(st.decode_steps);
        gen.set_cuda_graphs(false);
        serve::GenerationStats eager;
        gen.generate(prompts(b, prompt, cfg.vocab_size, 1000 + b), s, &eager);
        gen.set_cuda_graphs(true);
        const double eager_ms = 1e3 * eager.decode_s / static_cast<double>(eager.decode_steps);
        gen.set_device_sampling(false);
        serve::GenerationStats host;
        gen.generate(prompts(b, prompt, cfg.vocab_size, 1000 + b), s, &host);
        gen.set_device_sampling(true);
        const double host_rate = static_cast<double>(host.decode_tokens) / host.decode_s;
        std::printf("%-10s %6lld %5lld %12.0f %12.0f %10.3f %10.3f %14.0f %7.2fx %12.0f %7.2fx\n",
                    name.c_str(), static_cast<long long>(cfg.vocab_size), static_cast<long long>(b),
                    rate, prefill, step_ms, eager_ms, seq_rate, rate / seq_rate, host_rate,
                    rate / host_rate);
        for (int impl = 0; impl < 2 && f != nullptr; ++impl)
          std::fprintf(f,
                       "{\"bench\":\"serve\",\"gpu\":\"%s\",\"gpus\":1,\"date\":\"%s\","
                       "\"commit\":\"%s\",\"impl\":\"%s\",\"config\":\"%s\",\"batch\":%lld,"
                       "\"prompt\":%lld,\"new_tokens\":%lld,\"decode_tokens_per_s\":%.1f,"
                       "\"prefill_tokens_per_s\":%.1f,\"us\":%.1f,\"speedup_vs_sequential\":%.3f,"
                       "\"eager_step_us\":%.1f,\"cache_gb\":%.3f,\"vocab\":%lld,"
                       "\"host_sampled_tokens_per_s\":%.1f}\n",
                       prop.name, date.c_str(), commit.c_str(), impl == 0 ? "fp8moe" : "sequential",
                       name.c_str(), static_cast<long long>(impl == 0 ? b : 1),
                       static_cast<long long>(prompt), static_cast<long long>(fresh),
                       impl == 0 ? rate : seq_rate, impl == 0 ? prefill : 0.0,
                       impl == 0 ? 1e3 * step_ms : 1e6 / seq_rate,
                       impl == 0 ? rate / seq_rate : 1.0, impl == 0 ? 1e3 * eager_ms : 0.0,
                       static_cast<double>(st.cache_bytes) / 1e9,
                       static_cast<long long>(cfg.vocab_size), impl == 0 ? host_rate : 0.0);
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "serve_bench: %s\n", e.what());
    return 1;
  }
  if (f != nullptr) std::fclose(f);
  return 0;
}
