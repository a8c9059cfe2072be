// fp8moe train: trains the V3-architecture model on the CPU in fp32, bf16 or fp8 (the
// DeepSeek-V3 recipe, emulated exactly as the GPU kernels compute it), or on one GPU in fp8.
//   fp8moe train --config F --precision fp8 --steps N --out DIR [--resume] [--device gpu]
//   fp8moe launch -n R -- fp8moe train --device gpu ...   (R GPUs; train/trainer_gpu.h)
//   fp8moe train compare --config F --steps N --out DIR   (fp8 then bf16, prints the gap)
#include <cmath>
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>

#include "command.h"
#include "fp8moe/comm/launcher.h"
#include "fp8moe/core/file_io.h"
#include "fp8moe/core/json.h"
#include "fp8moe/train/trainer.h"
#if FP8MOE_HAVE_CUDA
#include "fp8moe/train/trainer_gpu.h"
#endif

namespace {

std::string fmt_double(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

// The CPU trainer is one process: as ranks of a launched job, each would train its own copy into
// the same folder.
void refuse_cpu_ranks(const char* what) {
  using namespace fp8moe;
  if (!comm::launched_as_rank()) return;
  const comm::RankEnv env = comm::rank_env();
  FM_CHECK_ARG(env.world_size == 1, what, " runs as one process, not as rank ", env.rank, " of ",
               env.world_size, " of `fp8moe launch` (only --device gpu trains across ranks)");
}

struct Flags {
  std::string config, out, precision = "fp8", device = "cpu";
  bool no_graph = false;
  bool phase_times = false;
  bool no_overlap = false;
  bool replicate_optimizer = false;
  fp8moe::TrainOptions opts;
};

void add_common(CLI::App* app, Flags& f) {
  app->add_option("--config", f.config, "Model config.json (e.g. configs/tiny.json)");
  app->add_option("--steps", f.opts.steps, "Training steps (the schedule's length)")
      ->capture_default_str();
  app->add_option("--out", f.out, "Output folder (checkpoint, metrics.jsonl, loss.svg)");
  app->add_option("--batch", f.opts.batch, "Sequences per step")->capture_default_str();
  app->add_option("--seq", f.opts.seq, "Tokens per sequence")->capture_default_str();
  app->add_option("--seed", f.opts.seed, "Seed of the weights and the data order")
      ->capture_default_str();
  app->add_option("--lr", f.opts.adam.lr, "Peak learning rate")->capture_default_str();
  app->add_option("--warmup", f.opts.adam.warmup_steps, "Warm-up steps")->capture_default_str();
  app->add_option("--weight-decay", f.opts.adam.weight_decay, "AdamW weight decay")
      ->capture_default_str();
  app->add_option("--clip", f.opts.adam.clip_norm, "Gradient-norm clipping (0 = off)")
      ->capture_default_str();
  app->add_option("--mtp-weight", f.opts.mtp_weight, "MTP loss weight (lambda)")
      ->capture_default_str();
  app->add_option("--bias-update-speed", f.opts.bias_update_speed,
                  "Router bias update speed (gamma)")
      ->capture_default_str();
  app->add_option("--ema-decay", f.opts.ema_decay, "EMA decay of the weights")
      ->capture_default_str();
  app->add_option("--corpus", f.opts.corpus, "Training text, one document per line")
      ->capture_default_str();
  app->add_option("--tokenizer", f.opts.tokenizer, "SentencePiece model")->capture_default_str();
  app->add_option("--eval-batches", f.opts.eval_batches, "Held-out batches evaluated at the end")
      ->capture_default_str();
  app->add_option("--threads", f.opts.threads, "CPU threads (0 = all)")->capture_default_str();
  app->add_flag(
      "--no-progress", [&f](int64_t) { f.opts.progress = false; }, "No progress bar");
}

void check_common(const Flags& f) {
  FM_CHECK_ARG(!f.config.empty(), "--config is required");
  FM_CHECK_ARG(!f.out.empty(), "--out is required");
  FM_CHECK_ARG(f.opts.steps > 0, "--steps must be positive (got ", f.opts.steps, ")");
  FM_CHECK_ARG(f.opts.batch > 0 && f.opts.seq > 0, "--batch and --seq must be positive");
  FM_CHECK_ARG(f.opts.threads >= 0, "--threads must be >= 0");
}

void setup(CLI::App& app) {
  auto f = std::make_shared<Flags>();
  add_common(&app, *f);
  app.add_option("--precision", f->precision, "fp32 | bf16 | fp8")->capture_default_str();
  app.add_option("--stop-after", f->opts.stop_after,
                 "Stop after this many steps of this run (with a checkpoint)");
  app.add_option("--checkpoint-every", f->opts.checkpoint_every, "Checkpoint interval (0 = end)");
  app.add_flag("--resume", f->opts.resume, "Continue from DIR/checkpoint.safetensors");
  app.add_flag(
      "--no-checkpoint", [f](int64_t) { f->opts.checkpoint = false; },
      "Write no checkpoint (timing runs)");
  app.add_option("--device", f->device,
                 "cpu | gpu (the FP8 recipe; under `fp8moe launch -n R`, R GPUs: expert-parallel "
                 "MoE, data-parallel rest, --batch is the whole job's)")
      ->capture_default_str();
  app.add_flag("--no-cuda-graph", f->no_graph, "GPU: launch every step eagerly");
  app.add_flag("--phase-times", f->phase_times,
               "GPU: each metrics line gains the step's phase times (fb_ms, reduce_ms, ...)");
  app.add_flag("--no-overlap-reduce", f->no_overlap,
               "several GPUs, replicated optimizer: average the gradients after the backward, "
               "not beside it");
  app.add_flag("--replicate-optimizer", f->replicate_optimizer,
               "several GPUs: every rank keeps the whole optimizer state (default: ZeRO-1, a "
               "share of the replicated tensors' each)");

  auto c = std::make_shared<Flags>();
  CLI::App* compare =
      app.add_subcommand("compare", "Train fp8 then bf16 with the same data; print both losses");
  add_common(compare, *c);

  app.callback([f, compare] {
    using namespace fp8moe;
    if (compare->parsed()) return;
    check_common(*f);
    TrainOptions o = f->opts;
    o.model = load_model_config(f->config);
    o.precision = parse_precision(f->precision);
    o.out_dir = f->out;
    FM_CHECK_ARG(f->device == "cpu" || f->device == "gpu", "--device must be cpu or gpu, not '",
                 f->device, "'");
    TrainResult r;
    if (f->device == "gpu") {
#if FP8MOE_HAVE_CUDA
      GpuTrainOptions g;
      g.cuda_graph = !f->no_graph;
      g.phase_times = f->phase_times;
      g.overlap_reduce = !f->no_overlap;
      g.shard_optimizer = !f->replicate_optimizer;
      r = train_gpu(o, g);
#else
      FM_THROW(ErrorKind::kInvalidArgument, "--device gpu: this build has no CUDA");
#endif
    } else {
      refuse_cpu_ranks("the CPU trainer");
      r = train(o);
    }
    // Ranks of a launched job other than 0 hold no metrics (rank 0 reports the job's).
    if (fp8moe::comm::launched_as_rank() && fp8moe::comm::rank_env().rank != 0) return;
    const std::string held_out =
        o.eval_batches > 0 ? fmt_double(r.valid_loss, 4) : std::string("not measured");
    std::string steady = r.steady_tokens_per_s > 0 ? " (" + fmt_double(r.steady_tokens_per_s, 0) +
                                                         " after the first 2 steps)"
                                                   : std::string();
    if (r.device_memory_gb > 0)
      steady += ", " + fmt_double(r.device_memory_gb, 1) + " GB of GPU memory in use";
    std::printf(
        "%s%s: final loss %.4f (mean of the last %lld steps), held-out loss %s, "
        "%.1f s wall, %.1f s CPU, %.0f tokens/s%s\n",
        precision_name(o.precision), f->device == "gpu" ? " (gpu)" : "", r.final_loss,
        static_cast<long long>(std::max<int64_t>(1, r.steps_done / 10)), held_out.c_str(),
        r.seconds, r.cpu_seconds, r.tokens_per_s, steady.c_str());
  });
  compare->callback([c] {
    using namespace fp8moe;
    check_common(*c);
    refuse_cpu_ranks("fp8moe train compare");
    TrainOptions base = c->opts;
    base.model = load_model_config(c->config);
    TrainResult res[2];
    const Precision precisions[2] = {Precision::kFp8, Precision::kBf16};
    for (int i = 0; i < 2; ++i) {
      TrainOptions o = base;
      o.precision = precisions[i];
      o.out_dir = c->out + "/" + precision_name(o.precision);
      std::fprintf(stderr, "training %s -> %s\n", precision_name(o.precision), o.out_dir.c_str());
      res[i] = train(o);
    }
    const double gap = (res[0].final_loss - res[1].final_loss) / res[1].final_loss;
    const double vgap = (res[0].valid_loss - res[1].valid_loss) / res[1].valid_loss;
    write_file_atomic(c->out + "/loss.svg",
                      loss_plot_svg({"fp8", "bf16"}, {res[0].losses, res[1].losses},
                                    "training loss: fp8 vs bf16"));
    OrderedJson summary = {{"config", c->config},
                           {"steps", base.steps},
                           {"tokens_per_step", base.batch * base.seq},
                           {"fp8",
                            {{"final_loss", res[0].final_loss},
                             {"valid_loss", res[0].valid_loss},
                             {"seconds", res[0].seconds},
                             {"cpu_seconds", res[0].cpu_seconds},
                             {"tokens_per_s", res[0].tokens_per_s}}},
                           {"bf16",
                            {{"final_loss", res[1].final_loss},
                             {"valid_loss", res[1].valid_loss},
                             {"seconds", res[1].seconds},
                             {"cpu_seconds", res[1].cpu_seconds},
                             {"tokens_per_s", res[1].tokens_per_s}}},
                           {"relative_gap", gap},
                           {"valid_relative_gap", vgap}};
    write_file_atomic(c->out + "/compare.json", summary.dump(2) + "\n");
    std::printf("fp8  final loss %.4f  held-out %.4f  (%.1f s wall, %.1f s CPU)\n",
                res[0].final_loss, res[0].valid_loss, res[0].seconds, res[0].cpu_seconds);
    std::printf("bf16 final loss %.4f  held-out %.4f  (%.1f s wall, %.1f s CPU)\n",
                res[1].final_loss, res[1].valid_loss, res[1].seconds, res[1].cpu_seconds);
    std::printf("relative gap (fp8 - bf16) / bf16: training %+.3f%%, held-out %+.3f%%\n", 100 * gap,
                100 * vgap);
  });
}

}  // namespace

FM_REGISTER_COMMAND("train", "Train the V3-architecture model (CPU: fp32, bf16, fp8; GPU: fp8)",
                    setup);
