// fp8moe generate --checkpoint DIR --prompt "..." [--temperature T] [--top-p P]
// [--cache-form latent|expanded] [--no-cache]: samples text from a checkpoint written by
// `fp8moe train` (greedy when the temperature is 0), with the model's KV cache (by default in
// V3's latent form) unless --no-cache.
#include <iostream>
#include <memory>

#include "command.h"
#include "fp8moe/train/trainer.h"

namespace {

void setup(CLI::App& app) {
  auto g = std::make_shared<fp8moe::GenerateOptions>();
  app.add_option("--checkpoint", g->checkpoint_dir, "Folder written by fp8moe train")->required();
  app.add_option("--prompt", g->prompt, "Text to continue")->required();
  app.add_option("--max-new-tokens", g->max_new_tokens, "Tokens to add")->capture_default_str();
  app.add_option("--temperature", g->temperature, "0 = greedy")->capture_default_str();
  app.add_option("--top-p", g->top_p, "Nucleus sampling mass")->capture_default_str();
  app.add_option("--seed", g->seed, "Sampling seed")->capture_default_str();
  app.add_flag("--ema", g->use_ema, "Use the EMA weights");
  app.add_option("--threads", g->threads, "CPU threads (0 = all)")->capture_default_str();
  app.add_option("--context", g->context,
                 "Tokens the model sees at most (then the oldest are dropped down to half)")
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
  app.callback([g, form] {
    FM_CHECK_ARG(g->max_new_tokens >= 0, "--max-new-tokens must be >= 0");
    FM_CHECK_ARG(*form == "latent" || *form == "expanded", "--cache-form: '", *form,
                 "' is not a cache form (expected latent or expanded)");
    g->cache_form = fp8moe::parse_kv_cache_form(*form);
    std::cout << fp8moe::generate_text(*g) << "\n";
  });
}

}  // namespace

FM_REGISTER_COMMAND("generate", "Sample text from a trained checkpoint", setup);
