// The training loop of the CPU reference: batches from the corpus, forward/backward in the
// chosen precision, gradient clipping, AdamW, the router's bias update, the EMA thread,
// JSON-lines metrics, an SVG loss plot, and checkpoints that resume bit for bit.
//
// Files in the output folder: checkpoint.safetensors, metrics.jsonl, loss.svg, tokenizer.model.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "fp8moe/model/config.h"
#include "fp8moe/model/linear.h"
#include "fp8moe/model/model.h"
#include "fp8moe/train/optimizer.h"

namespace fp8moe {

struct TrainOptions {
  ModelConfig model;
  Precision precision = Precision::kFp8;
  std::string out_dir;
  std::string corpus = "data/kjv.txt";
  std::string tokenizer = "data/kjv_sp2048.model";
  int64_t steps = 300;     // total steps of the run (the schedule's length)
  int64_t stop_after = 0;  // > 0: stop (with a checkpoint) after this many steps
  int64_t batch = 4;
  int64_t seq = 128;
  uint64_t seed = 1;
  AdamWConfig adam;  // total_steps is set from `steps`
  float mtp_weight = 0.3f;
  double bias_update_speed = 0.001;
  double ema_decay = 0.99;
  int64_t checkpoint_every = 0;  // 0: only at the end
  bool checkpoint = true;        // false: none at all (timing runs; --stop-after then refused)
  int64_t eval_batches = 8;
  bool resume = false;
  bool progress = true;
  int threads = 0;  // 0: all hardware threads
};

struct TrainResult {
  std::vector<double> losses;  // per step (all steps, including those before a resume)
  double final_loss = 0;       // mean training loss over the last 10% of the steps
  double valid_loss = 0;       // held-out loss after the last step
  double seconds = 0;          // wall time of this run
  double cpu_seconds = 0;      // CPU time of the process (all threads) during this run
  double tokens_per_s = 0;
  // Over the steps after this run's first two (the first compiles, allocates and, on the GPU,
  // captures the step's graph): the rate a long run settles at. 0 with fewer than 3 steps.
  double steady_tokens_per_s = 0;
  // GPU runs: the device memory in use on the (lead) rank's GPU after the training loop (its
  // total less its free memory, cudaMemGetInfo), GB; 0 for CPU runs.
  double device_memory_gb = 0;
  int64_t steps_done = 0;
};

TrainResult train(const TrainOptions& options);

// Loss curves as an SVG line plot (one polyline per series).
std::string loss_plot_svg(const std::vector<std::string>& names,
                          const std::vector<std::vector<double>>& series, const std::string& title);

// Sampling from a checkpoint folder written by train().
struct GenerateOptions {
  std::string checkpoint_dir;
  std::string prompt;
  int64_t max_new_tokens = 64;
  double temperature = 0.0;  // 0: greedy
  double top_p = 1.0;
  uint64_t seed = 1;
  bool use_ema = false;
  int threads = 0;
  // The model sees at most `context` tokens (capped at max_position_embeddings); when the text
  // outgrows it, the oldest tokens are dropped down to the last context/2 and the window is
  // re-read from position 0 (with or without the cache, so both give the same text).
  int64_t context = 512;
  bool use_cache = true;  // false: recompute the whole window for every token
  // The cache's form (model.h KvCache): latent as V3 serves (up to rounding the recomputation's
  // logits), or expanded (bit-identical to the recomputation).
  KvCacheForm cache_form = KvCacheForm::kLatent;
  bool ignore_eos = false;  // keep going past end-of-sequence (fixed-length runs, timing)
};
std::string generate_text(const GenerateOptions& options);

class Tokenizer;

// A checkpoint's CPU model and tokenizer loaded once, generating for one request after another
// (generate_text is one request; `fp8moe serve --device cpu` serves a stream of them).
class CheckpointGenerator {
 public:
  // `options`: checkpoint_dir, use_ema, threads (the rest is per request).
  explicit CheckpointGenerator(const GenerateOptions& options);
  ~CheckpointGenerator();
  CheckpointGenerator(const CheckpointGenerator&) = delete;
  CheckpointGenerator& operator=(const CheckpointGenerator&) = delete;

  const Tokenizer& tokenizer() const;
  // The new tokens after `prompt` (ids; empty: one end-of-sequence token stands for it) drawn as
  // generate_text draws them with options g (its prompt and checkpoint fields unused) from the
  // Philox stream (g.seed, 7 + stream); end-of-sequence ends it unseen unless g.ignore_eos.
  // on_token(t) after each.
  std::vector<int32_t> generate(std::vector<int32_t> prompt, const GenerateOptions& g,
                                uint64_t stream = 0,
                                const std::function<void(int32_t)>& on_token = {});

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};
// The CPU model a checkpoint folder holds (`fp8moe train`'s model.safetensors: its config, the
// parameters or their EMA), and the precision it was trained in. The GPU generator
// (serve/generator_gpu.h) starts from it.
std::unique_ptr<Model> load_checkpoint_model(const std::string& checkpoint_dir, bool use_ema,
                                             Precision* precision = nullptr);

}  // namespace fp8moe
