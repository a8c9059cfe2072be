// What the CPU trainer (trainer.cpp) and the GPU trainer (trainer_gpu.cu) share: the corpus, the
// checkpoint file (one format, so a run on either device resumes on the other and `generate`
// reads both), the metrics file across resumes, the progress line and the run's summary numbers.
// Internal to the train module.
#pragma once

#include <chrono>
#include <cstdint>
#include <fstream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "fp8moe/model/model.h"
#include "fp8moe/train/data.h"
#include "fp8moe/train/safetensors.h"
#include "fp8moe/train/trainer.h"

namespace fp8moe::train_detail {

inline constexpr const char* kCheckpointFile = "checkpoint.safetensors";

// The tokenizer and corpus of the run, checked against the model's vocabulary.
TokenData load_run_data(const TrainOptions& o);

// Host copies of one tensor's state for a checkpoint (m, v, ema null for buffers).
struct CheckpointSlot {
  const std::string* name = nullptr;
  const std::vector<int64_t>* shape = nullptr;
  const float* value = nullptr;
  const uint16_t* m = nullptr;  // BF16 bits
  const uint16_t* v = nullptr;
  const float* ema = nullptr;
};
void save_checkpoint(const std::string& path, const std::vector<CheckpointSlot>& params,
                     const std::vector<CheckpointSlot>& buffers, const TrainOptions& o,
                     int64_t step);

// An fp8moe checkpoint (format, version and metadata checked; errors name the file).
SafetensorsFile open_checkpoint(const std::string& path);
// open_checkpoint, then checked against the run (same model config and precision); returns the
// file and its step (<= o.steps).
SafetensorsFile open_checkpoint_for(const std::string& path, const TrainOptions& o, int64_t* step);

// metrics.jsonl of the run: the rows of steps <= start are kept (a resumed run rewrites the
// rest), the file reopened for appending; returns the losses of the kept steps (NaN where missing).
std::vector<double> restart_metrics(const std::string& out_dir, int64_t start,
                                    std::ofstream& metrics);

class Progress {
 public:
  Progress(int64_t total, bool enabled);
  void update(int64_t step, double loss, double tok_s, double eta_s);

 private:
  int64_t total_;
  bool enabled_, tty_;
};

// Whether a checkpoint is due after `step` (0-based) of a loop ending at `end` (the last one is
// written after the loop).
bool checkpoint_due(const TrainOptions& o, int64_t step, int64_t end);
// Held-out window batch i: fixed windows of the validation stream, the same for both trainers.
std::vector<int32_t> eval_batch(const TokenData& data, const TrainOptions& o, int64_t window,
                                int64_t i);

// Mean of the finite losses of the last 10 % of the steps [0, end).
double tail_mean(const std::vector<double>& losses, int64_t end);

double process_cpu_seconds();

// The bookkeeping both trainers do around their loop: a metrics line and the progress line per
// step, the token rate over the loop (its clock stops at end_loop(): before the last checkpoint
// and the evaluation), the held-out line, and the run's summary and loss plot.
class RunLog {
 public:
  // Starts the run's clocks (call first thing). device: the metrics lines' "device" field
  // (empty: none, as the CPU trainer's lines have always been).
  RunLog(const TrainOptions& o, std::string device);
  // The loop runs steps [start, end); metrics is restart_metrics' stream.
  void begin_loop(int64_t start, int64_t end, std::ofstream* metrics);
  // extra: fields added to the step's metrics line (e.g. the GPU trainer's phase times).
  void step(int64_t step, const LossReport& rep, double grad_norm,
            const std::vector<std::pair<std::string, double>>& extra = {});
  void end_loop();
  void eval(double valid_loss);
  // result.losses and valid_loss set by the trainer; fills final_loss, seconds, cpu_seconds,
  // tokens_per_s, steps_done and writes loss.svg named `series`.
  void finish(TrainResult& result, const std::string& series) const;

 private:
  using Clock = std::chrono::steady_clock;
  const TrainOptions& o_;
  std::string device_;
  Clock::time_point t_start_, t_loop_, t_steady_;  // t_steady_: after the loop's second step
  double cpu_start_ = 0, loop_seconds_ = 0;
  int64_t start_ = 0, end_ = 0, tokens_ = 0, steady_tokens_ = 0;
  double steady_seconds_ = 0;
  std::ofstream* metrics_ = nullptr;
  std::unique_ptr<Progress> progress_;
};

}  // namespace fp8moe::train_detail
