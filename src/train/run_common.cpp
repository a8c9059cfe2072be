#include "run_common.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "fp8moe/core/error.h"
#include "fp8moe/core/file_io.h"
#include "fp8moe/core/json.h"
#include "fp8moe/train/optimizer.h"

namespace fp8moe::train_detail {

namespace {

constexpr const char* kCheckpointFormat = "fp8moe-checkpoint";
constexpr const char* kCheckpointVersion = "1";

std::string format_duration(double s) {
  const int64_t t = static_cast<int64_t>(std::max(0.0, s) + 0.5);
  char buf[32];
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%lldh%02lldm", static_cast<long long>(t / 3600),
                  static_cast<long long>((t / 60) % 60));
  else
    std::snprintf(buf, sizeof buf, "%lldm%02llds", static_cast<long long>(t / 60),
                  static_cast<long long>(t % 60));
  return buf;
}

int64_t meta_int(const SafetensorsFile& f, const std::string& key) {
  try {
    return std::stoll(f.metadata().at(key));
  } catch (const std::exception&) {
    FM_THROW(ErrorKind::kFormat, f.what(), ": metadata '", key, "' is not an integer");
  }
}

}  // namespace

double process_cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         1e-6 * static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

TokenData load_run_data(const TrainOptions& o) {
  for (const auto& [path, flag] : {std::pair{o.corpus, "--corpus"}, {o.tokenizer, "--tokenizer"}})
    FM_CHECK_ARG(std::filesystem::exists(path), "'", path, "' not found (run from the repository ",
                 "root, or give its path with ", flag, ")");
  Tokenizer tok(o.tokenizer);
  FM_CHECK_ARG(tok.vocab_size() == o.model.vocab_size, "the tokenizer '", o.tokenizer, "' has ",
               tok.vocab_size(), " pieces but the model config's vocab_size is ",
               o.model.vocab_size);
  return tokenize_corpus(tok, o.corpus);
}

void save_checkpoint(const std::string& path, const std::vector<CheckpointSlot>& params,
                     const std::vector<CheckpointSlot>& buffers, const TrainOptions& o,
                     int64_t step) {
  SafetensorsWriter w;
  for (const CheckpointSlot& p : params) {
    w.add_f32("param/" + *p.name, *p.shape, p.value);
    w.add_u16("adam_m/" + *p.name, "BF16", *p.shape, p.m);
    w.add_u16("adam_v/" + *p.name, "BF16", *p.shape, p.v);
    w.add_f32("ema/" + *p.name, *p.shape, p.ema);
  }
  for (const CheckpointSlot& b : buffers) w.add_f32("buffer/" + *b.name, *b.shape, b.value);
  w.set_metadata("format", kCheckpointFormat);
  w.set_metadata("version", kCheckpointVersion);
  w.set_metadata("step", std::to_string(step));
  w.set_metadata("data_position", std::to_string(step));  // batches consumed from the stream
  w.set_metadata("rng", Json{{"generator", "philox4x32-10"},
                             {"seed", o.seed},
                             {"streams", {1, 2}},
                             {"counter", step * o.batch}}
                            .dump());
  w.set_metadata("precision", precision_name(o.precision));
  w.set_metadata("config", o.model.to_json().dump());
  w.set_metadata("train", Json{{"steps", o.steps},
                               {"batch", o.batch},
                               {"seq", o.seq},
                               {"seed", o.seed},
                               {"lr", o.adam.lr},
                               {"warmup_steps", o.adam.warmup_steps},
                               {"mtp_weight", o.mtp_weight},
                               {"bias_update_speed", o.bias_update_speed},
                               {"ema_decay", o.ema_decay}}
                              .dump());
  w.write(path);
}

SafetensorsFile open_checkpoint(const std::string& path) {
  if (!std::filesystem::exists(path))
    FM_THROW(ErrorKind::kInvalidArgument, "no checkpoint at '", path, "'");
  SafetensorsFile f = SafetensorsFile::read(path);
  auto it = f.metadata().find("format");
  if (it == f.metadata().end() || it->second != kCheckpointFormat)
    FM_THROW(ErrorKind::kFormat, "'", path,
             "' is a safetensors file but not an fp8moe checkpoint (no __metadata__ format \"",
             kCheckpointFormat, "\")");
  auto ver = f.metadata().find("version");
  if (ver == f.metadata().end() || ver->second != kCheckpointVersion)
    FM_THROW(ErrorKind::kFormat, "'", path, "': unsupported checkpoint version");
  for (const char* key : {"step", "config", "precision"})
    if (!f.metadata().count(key))
      FM_THROW(ErrorKind::kFormat, "'", path, "': checkpoint metadata lacks '", key, "'");
  return f;
}

SafetensorsFile open_checkpoint_for(const std::string& path, const TrainOptions& o, int64_t* step) {
  SafetensorsFile f = open_checkpoint(path);
  const Json saved = parse_json(f.metadata().at("config"), path + " config");
  if (saved != o.model.to_json())
    FM_THROW(ErrorKind::kInvalidArgument, "'", path,
             "' was written for a different model config; resume with the same --config");
  if (f.metadata().at("precision") != precision_name(o.precision))
    FM_THROW(ErrorKind::kInvalidArgument, "'", path, "' was trained in ",
             f.metadata().at("precision"), ", not ", precision_name(o.precision));
  *step = meta_int(f, "step");
  FM_CHECK_ARG(*step >= 0 && *step <= o.steps, "'", path, "' is at step ", *step,
               ", beyond --steps ", o.steps);
  return f;
}

std::vector<double> restart_metrics(const std::string& out_dir, int64_t start,
                                    std::ofstream& metrics) {
  const std::string path = out_dir + "/metrics.jsonl";
  std::vector<double> losses;
  std::vector<std::string> keep;
  if (start > 0) {
    std::ifstream in(path);
    std::string line;
    while (std::getline(in, line)) {
      const Json j = Json::parse(line, nullptr, false);
      if (!j.is_object() || !j.contains("step") || j["step"].get<int64_t>() > start) continue;
      if (j.contains("loss")) losses.push_back(j["loss"].get<double>());
      if (!j.contains("event")) keep.push_back(line);
    }
  }
  losses.resize(static_cast<size_t>(start), NAN);
  {
    std::ofstream out(path, std::ios::trunc);
    for (const auto& l : keep) out << l << "\n";
  }
  metrics.open(path, std::ios::app);
  return losses;
}

Progress::Progress(int64_t total, bool enabled)
    : total_(total), enabled_(enabled), tty_(isatty(2)) {}

void Progress::update(int64_t step, double loss, double tok_s, double eta_s) {
  if (!enabled_) return;
  const bool last = step == total_;
  if (!tty_ && !last && step % std::max<int64_t>(1, total_ / 10) != 0) return;
  constexpr int kWidth = 24;
  const int filled = static_cast<int>(kWidth * step / std::max<int64_t>(1, total_));
  std::string bar(static_cast<size_t>(filled), '#');
  bar.resize(kWidth, '.');
  std::fprintf(stderr, "%s[%s] step %lld/%lld  loss %.4f  %.0f tok/s  ETA %s%s", tty_ ? "\r" : "",
               bar.c_str(), static_cast<long long>(step), static_cast<long long>(total_), loss,
               tok_s, format_duration(eta_s).c_str(), (tty_ && !last) ? "" : "\n");
  std::fflush(stderr);
}

bool checkpoint_due(const TrainOptions& o, int64_t step, int64_t end) {
  return o.checkpoint && o.checkpoint_every > 0 && (step + 1) % o.checkpoint_every == 0 &&
         step + 1 < end;
}

std::vector<int32_t> eval_batch(const TokenData& data, const TrainOptions& o, int64_t window,
                                int64_t i) {
  return sample_batch(data.valid, o.batch, window, o.seed + 1000003, i);
}

double tail_mean(const std::vector<double>& losses, int64_t end) {
  const int64_t tail = std::max<int64_t>(1, end / 10);
  double s = 0;
  int64_t cnt = 0;
  for (int64_t i = std::max<int64_t>(0, end - tail); i < end; ++i)
    if (std::isfinite(losses[i])) s += losses[i], ++cnt;
  return cnt > 0 ? s / static_cast<double>(cnt) : NAN;
}

RunLog::RunLog(const TrainOptions& o, std::string device)
    : o_(o),
      device_(std::move(device)),
      t_start_(Clock::now()),
      cpu_start_(process_cpu_seconds()) {}

void RunLog::begin_loop(int64_t start, int64_t end, std::ofstream* metrics) {
  start_ = start;
  end_ = end;
  metrics_ = metrics;
  progress_ = std::make_unique<Progress>(o_.steps, o_.progress);
  t_loop_ = Clock::now();
}

void RunLog::step(int64_t step, const LossReport& rep, double grad_norm,
                  const std::vector<std::pair<std::string, double>>& extra) {
  tokens_ += o_.batch * o_.seq;
  if (step == start_ + 1) t_steady_ = Clock::now();
  if (step > start_ + 1) steady_tokens_ += o_.batch * o_.seq;
  const double elapsed = std::chrono::duration<double>(Clock::now() - t_loop_).count();
  const double tok_s = static_cast<double>(tokens_) / std::max(1e-9, elapsed);
  const double eta =
      elapsed / static_cast<double>(step + 1 - start_) * static_cast<double>(end_ - step - 1);
  OrderedJson line = {{"step", step + 1},
                      {"loss", rep.loss},
                      {"main_loss", rep.main_loss},
                      {"mtp_loss", rep.mtp_loss},
                      {"balance_loss", rep.balance_loss},
                      {"lr", learning_rate(o_.adam, step)},
                      {"grad_norm", grad_norm},
                      {"tokens_per_s", tok_s},
                      {"elapsed_s", elapsed},
                      {"precision", precision_name(o_.precision)}};
  if (!device_.empty()) line["device"] = device_;
  for (const auto& [key, value] : extra) line[key] = value;
  *metrics_ << line.dump() << "\n";
  metrics_->flush();
  progress_->update(step + 1, rep.loss, tok_s, eta);
}

void RunLog::end_loop() {
  loop_seconds_ = std::chrono::duration<double>(Clock::now() - t_loop_).count();
  if (steady_tokens_ > 0)
    steady_seconds_ = std::chrono::duration<double>(Clock::now() - t_steady_).count();
}

void RunLog::eval(double valid_loss) {
  *metrics_ << OrderedJson{{"event", "eval"}, {"step", end_}, {"valid_loss", valid_loss}}.dump()
            << "\n";
}

void RunLog::finish(TrainResult& result, const std::string& series) const {
  result.steps_done = end_;
  result.final_loss = tail_mean(result.losses, end_);
  result.seconds = std::chrono::duration<double>(Clock::now() - t_start_).count();
  result.cpu_seconds = process_cpu_seconds() - cpu_start_;
  result.tokens_per_s = static_cast<double>(tokens_) / std::max(1e-9, loop_seconds_);
  result.steady_tokens_per_s =
      steady_tokens_ > 0 ? static_cast<double>(steady_tokens_) / std::max(1e-9, steady_seconds_)
                         : 0.0;
  write_file_atomic(o_.out_dir + "/loss.svg",
                    loss_plot_svg({series}, {result.losses}, "training loss (" + series + ")"));
}

}  // namespace fp8moe::train_detail
