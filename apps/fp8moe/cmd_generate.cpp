// fp8moe generate --checkpoint DIR --prompt "..." [--temperature T] [--top-p P]
// [--cache-form latent|expanded] [--no-cache] [--device cpu|gpu [--prompts-file F] [--max-batch
// N]]: samples text from a checkpoint written by `fp8moe train` (greedy when the temperature is 0).
// CPU: the model's KV cache (by default in V3's latent form) unless --no-cache. GPU
// (serve/generator_gpu.h): the latent paged cache, prompts prefilled and decoded together
// (continuous batching), one line per prompt; --stats adds a JSON line of throughput to stderr;
// --mtp-draft drafts a token a step with the checkpoint's MTP module (speculative decoding).
// Under `fp8moe launch -n R --no-prefix -- fp8moe generate --device gpu ...` the R ranks serve
// together (data-parallel attention, expert-parallel MoE): rank r takes prompts r, r + R, ...,
// rank 0 prints every prompt's line in the file's order. Redundant experts (GPU;
// serve/expert_placement_plan.h): --expert-load-out writes the run's expert load (summed over the
// ranks) as `fp8moe eplb`'s input, --expert-placement serves over `fp8moe eplb`'s plan.
#include <algorithm>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "command.h"
#include "fp8moe/comm/launcher.h"
#include "fp8moe/core/error.h"
#include "fp8moe/train/data.h"
#include "fp8moe/train/trainer.h"
#ifdef FP8MOE_HAVE_CUDA
#include <cuda_runtime.h>

#include "fp8moe/comm/gpu_job.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/file_io.h"
#include "fp8moe/core/json.h"
#include "fp8moe/serve/expert_placement_plan.h"
#include "fp8moe/serve/generator_gpu.h"
#endif

namespace {

struct GpuArgs {
  std::string device = "cpu", prompts_file, expert_placement, expert_load_out;
  int64_t max_batch = 8, prefill_batch = 1, prefill_chunk = 256;
  int redundant_experts = 0;
  bool stats = false, mtp_draft = false, host_sampling = false, normal_ep_decoding = false;
};

#ifdef FP8MOE_HAVE_CUDA
void generate_gpu(const fp8moe::GenerateOptions& g, const GpuArgs& a) {
  std::vector<std::string> texts;
  if (!a.prompts_file.empty()) {
    std::ifstream in(a.prompts_file);
    FM_CHECK_ARG(in.good(), "--prompts-file: cannot read '", a.prompts_file, "'");
    for (std::string line; std::getline(in, line);)
      if (!line.empty()) texts.push_back(line);
    FM_CHECK_ARG(!texts.empty(), "--prompts-file: '", a.prompts_file, "' holds no prompt");
  } else {
    texts.push_back(g.prompt);
  }
  fp8moe::comm::GpuJob job;
  fp8moe::comm::join_gpu_job(0, "the GPU generator", "generate", job);
  FM_CHECK_CUDA(cudaSetDevice(job.device));
  const std::unique_ptr<fp8moe::Model> model =
      fp8moe::load_checkpoint_model(g.checkpoint_dir, g.use_ema);
  fp8moe::Tokenizer tok(g.checkpoint_dir + "/tokenizer.model");
  // This rank's share of the prompts (all of them alone), each with its index in the file as its
  // request id (its sampling stream): the text does not depend on the rank count.
  std::vector<std::vector<int32_t>> prompts;
  std::vector<int64_t> ids;
  for (size_t r = static_cast<size_t>(job.rank); r < texts.size();
       r += static_cast<size_t>(job.world)) {
    prompts.push_back(tok.encode(texts[r]));
    if (prompts.back().empty()) prompts.back().push_back(tok.eos_id() >= 0 ? tok.eos_id() : 0);
    ids.push_back(static_cast<int64_t>(r));
  }
  fp8moe::serve::GeneratorOptions o;
  o.max_batch = a.max_batch;
  o.prefill_batch = a.prefill_batch;
  o.prefill_chunk = a.prefill_chunk;
  o.context = std::min(g.context, model->config().max_position_embeddings);
  o.mtp_draft = a.mtp_draft;
  o.low_latency_ep = !a.normal_ep_decoding;
  o.device_sampling = !a.host_sampling;
  fp8moe::serve::GeneratorParallel par = fp8moe::serve::job_parallel(job);
  if (!a.expert_placement.empty())
    par.model.placements = fp8moe::serve::placements_from_plan_json(
        fp8moe::read_json_file(a.expert_placement), model->config(), job.world);
  fp8moe::serve::GeneratorGpu gen(*model, o, par);
  fp8moe::serve::SamplingOptions s;
  s.max_new_tokens = g.max_new_tokens;
  s.temperature = g.temperature;
  s.top_p = g.top_p;
  s.seed = g.seed;
  s.eos = tok.eos_id();
  s.ignore_eos = g.ignore_eos;
  fp8moe::serve::GenerationStats st;
  const auto out = gen.generate(prompts, s, &st, ids);
  std::vector<std::string> lines(texts.size());
  for (size_t i = 0; i < out.size(); ++i) {
    std::vector<int32_t> all = prompts[i];
    all.insert(all.end(), out[i].begin(), out[i].end());
    lines[static_cast<size_t>(ids[i])] = tok.decode(all);
  }
  if (job.world > 1) {
    // Every rank's lines to rank 0 (one store value a rank: its lines, '\0' after each).
    std::string mine;
    for (size_t i = 0; i < out.size(); ++i) mine += lines[static_cast<size_t>(ids[i])] + '\0';
    const std::vector<std::string> all =
        job.store->all_gather(job.prefix + "lines", mine, fp8moe::comm::GpuJob::kStoreWaitS);
    for (int r = 0; r < job.world; ++r) {
      size_t at = 0;
      for (size_t k = static_cast<size_t>(r); k < texts.size();
           k += static_cast<size_t>(job.world)) {
        const size_t end = all[r].find('\0', at);
        FM_CHECK(end != std::string::npos, "rank ", r, " sent fewer lines than its prompts");
        lines[k] = all[r].substr(at, end - at);
        at = end + 1;
      }
    }
  }
  if (!a.expert_load_out.empty()) {
    // The ranks' loads summed (one store value a rank: its counts, space-separated).
    std::vector<int64_t> load = st.expert_load;
    if (job.world > 1) {
      std::string mine;
      for (int64_t v : load) mine += std::to_string(v) + " ";
      const std::vector<std::string> all =
          job.store->all_gather(job.prefix + "load", mine, fp8moe::comm::GpuJob::kStoreWaitS);
      std::fill(load.begin(), load.end(), 0);
      for (const std::string& text : all) {
        std::istringstream in(text);
        for (int64_t& v : load) {
          int64_t x = 0;
          FM_CHECK(static_cast<bool>(in >> x), "a rank sent fewer expert counts than ",
                   load.size());
          v += x;
        }
      }
    }
    if (job.lead())
      fp8moe::write_file_atomic(
          a.expert_load_out, fp8moe::serve::expert_load_problem_json(
                                 fp8moe::serve::expert_load_problem(model->config(), load,
                                                                    a.redundant_experts, job.world))
                                     .dump() +
                                 "\n");
  }
  if (job.lead())
    for (const std::string& line : lines) std::cout << line << "\n";
  if (a.stats)
    std::cerr << "{\"rank\":" << job.rank << ",\"ranks\":" << job.world
              << ",\"prompts\":" << prompts.size() << ",\"prefill_tokens\":" << st.prefill_tokens
              << ",\"prefill_s\":" << st.prefill_s << ",\"decode_tokens\":" << st.decode_tokens
              << ",\"decode_steps\":" << st.decode_steps << ",\"decode_s\":" << st.decode_s
              << ",\"decode_tokens_per_s\":"
              << (st.decode_s > 0 ? static_cast<double>(st.decode_tokens) / st.decode_s : 0.0)
              << ",\"max_running\":" << st.max_running << ",\"cache_bytes\":" << st.cache_bytes
              << ",\"drafted\":" << st.drafted << ",\"accepted\":" << st.accepted
              << ",\"idle_steps\":" << st.idle_steps
              << ",\"low_latency_passes\":" << st.low_latency_passes << "}\n";
}
#endif

void setup(CLI::App& app) {
  auto g = std::make_shared<fp8moe::GenerateOptions>();
  auto a = std::make_shared<GpuArgs>();
  app.add_option("--checkpoint", g->checkpoint_dir, "Folder written by fp8moe train")->required();
  app.add_option("--prompt", g->prompt, "Text to continue");
  app.add_option("--max-new-tokens", g->max_new_tokens, "Tokens to add")->capture_default_str();
  app.add_option("--temperature", g->temperature, "0 = greedy")->capture_default_str();
  app.add_option("--top-p", g->top_p, "Nucleus sampling mass")->capture_default_str();
  app.add_option("--seed", g->seed, "Sampling seed")->capture_default_str();
  app.add_flag("--ema", g->use_ema, "Use the EMA weights");
  app.add_option("--threads", g->threads, "CPU threads (0 = all)")->capture_default_str();
  app.add_option("--context", g->context,
                 "Tokens the model sees at most (CPU: then the oldest are dropped down to half; "
                 "GPU: a sequence stops there)")
      ->capture_default_str();
  auto form = std::make_shared<std::string>(fp8moe::kv_cache_form_name(g->cache_form));
  app.add_option("--cache-form", *form,
                 "KV cache: latent (V3's: c and k_pe per token, kv_b folded into query and "
                 "output; equals the recomputation up to rounding) or expanded (per-head keys "
                 "and values; bit-identical to the recomputation)")
      ->capture_default_str();
  app.add_flag_callback(
      "--no-cache", [g] { g->use_cache = false; },
      "Recompute the whole context for every new token (no KV cache)");
  app.add_flag("--ignore-eos", g->ignore_eos,
               "Do not stop at end-of-sequence: exactly --max-new-tokens tokens");
  app.add_option(
         "--device", a->device,
         "cpu, or gpu: the latent paged cache, prompts batched (under `fp8moe launch -n R`: "
         "R GPUs, data-parallel attention, expert-parallel MoE)")
      ->capture_default_str();
  app.add_option("--prompts-file", a->prompts_file, "GPU: one prompt a line, generated together");
  app.add_option("--max-batch", a->max_batch, "GPU: sequences decoded together")
      ->capture_default_str();
  app.add_option("--prefill-batch", a->prefill_batch,
                 "GPU: prompts prefilled together in one pass (1: one at a time; more: bigger "
                 "GEMMs for short prompts, each prompt's first token when the pass's last ends)")
      ->capture_default_str();
  app.add_option("--prefill-chunk", a->prefill_chunk,
                 "GPU: prompt tokens a prefill pass, over the prompts it fills")
      ->capture_default_str();
  app.add_flag("--stats", a->stats, "GPU: a JSON line of throughput on stderr");
  app.add_flag("--normal-ep-decoding", a->normal_ep_decoding,
               "GPU: decoding passes exchange MoE tokens over the normal EP kernels (default: the "
               "low-latency kernels, one GPU or several; the same text either way)");
  app.add_flag("--mtp-draft", a->mtp_draft,
               "GPU: speculative decoding with the checkpoint's MTP module as the draft");
  app.add_flag("--host-sampling", a->host_sampling,
               "GPU: draw tokens on the host from copied logits (default: on the device)");
  app.add_option("--expert-placement", a->expert_placement,
                 "GPU: serve over redundant experts, the plan `fp8moe eplb` wrote (its phy2log: "
                 "one row a MoE layer, slots a multiple of the rank count)");
  app.add_option("--expert-load-out", a->expert_load_out,
                 "GPU: write the tokens each expert got during this run (summed over the ranks) "
                 "as `fp8moe eplb`'s input");
  app.add_option("--redundant-experts", a->redundant_experts,
                 "GPU, with --expert-load-out: the extra physical slots a layer the EPLB input "
                 "asks for")
      ->capture_default_str();
  app.callback([g, form, a] {
    FM_CHECK_ARG(g->max_new_tokens >= 0, "--max-new-tokens must be >= 0");
    FM_CHECK_ARG(*form == "latent" || *form == "expanded", "--cache-form: '", *form,
                 "' is not a cache form (expected latent or expanded)");
    FM_CHECK_ARG(a->device == "cpu" || a->device == "gpu", "--device: '", a->device,
                 "' is not a device (expected cpu or gpu)");
    FM_CHECK_ARG(!g->prompt.empty() || !a->prompts_file.empty(),
                 "give --prompt (or, with --device gpu, --prompts-file)");
    g->cache_form = fp8moe::parse_kv_cache_form(*form);
    if (a->device == "cpu") {
      FM_CHECK_ARG(a->prompts_file.empty() && !a->stats && !a->mtp_draft && !a->host_sampling &&
                       a->expert_placement.empty() && a->expert_load_out.empty() &&
                       !a->normal_ep_decoding,
                   "--prompts-file, --stats, --mtp-draft, --host-sampling, --expert-placement, "
                   "--expert-load-out and --normal-ep-decoding need --device gpu");
      FM_CHECK_ARG(
          !fp8moe::comm::launched_as_rank() || fp8moe::comm::rank_env().world_size == 1,
          "started as a rank of `fp8moe launch`: only --device gpu generates across ranks");
      std::cout << fp8moe::generate_text(*g) << "\n";
      return;
    }
#ifdef FP8MOE_HAVE_CUDA
    FM_CHECK_ARG(*form == "latent" && g->use_cache,
                 "--device gpu decodes with the latent cache only (no --cache-form expanded or "
                 "--no-cache)");
    generate_gpu(*g, *a);
#else
    FM_CHECK_ARG(false, "--device gpu: this fp8moe was built without CUDA");
#endif
  });
}

}  // namespace

FM_REGISTER_COMMAND("generate", "Sample text from a trained checkpoint", setup);
