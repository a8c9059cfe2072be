#include "fp8moe/train/trainer.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>

#include "fp8moe/core/error.h"
#include "fp8moe/core/file_io.h"
#include "fp8moe/core/json.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/model/model.h"
#include "fp8moe/model/ops.h"
#include "fp8moe/model/sampling.h"
#include "fp8moe/train/data.h"
#include "fp8moe/train/ema.h"
#include "fp8moe/train/safetensors.h"
#include "run_common.h"

namespace fp8moe {

namespace {

using namespace train_detail;

void save_model_checkpoint(const std::string& path, Model& model, AdamW& adam, WeightEma& ema,
                           const TrainOptions& o, int64_t step) {
  ema.flush();
  auto& params = model.parameters();
  std::vector<CheckpointSlot> slots, buffers;
  for (size_t i = 0; i < params.size(); ++i)
    slots.push_back({&params[i].name, &params[i].shape, params[i].value.data(), adam.m()[i].data(),
                     adam.v()[i].data(), ema.values()[i].data()});
  for (const auto& b : model.buffers()) buffers.push_back({&b.name, &b.shape, b.value.data()});
  save_checkpoint(path, slots, buffers, o, step);
}

void load_weights(const SafetensorsFile& f, Model& model, const std::string& prefix) {
  for (auto& p : model.parameters()) p.value = f.f32(prefix + p.name, p.numel());
  for (auto& b : model.buffers()) b.value = f.f32("buffer/" + b.name, b.numel());
}

int64_t load_model_checkpoint(const std::string& path, Model& model, AdamW& adam, WeightEma& ema,
                              const TrainOptions& o) {
  int64_t step = 0;
  const SafetensorsFile f = open_checkpoint_for(path, o, &step);
  load_weights(f, model, "param/");
  auto& params = model.parameters();
  std::vector<std::vector<float>> ema_values;
  for (size_t i = 0; i < params.size(); ++i) {
    const Parameter& p = params[i];
    adam.m()[i] = f.u16("adam_m/" + p.name, "BF16", p.numel());
    adam.v()[i] = f.u16("adam_v/" + p.name, "BF16", p.numel());
    ema_values.push_back(f.f32("ema/" + p.name, p.numel()));
  }
  ema.set_values(std::move(ema_values));
  return step;
}

}  // namespace

std::string loss_plot_svg(const std::vector<std::string>& names,
                          const std::vector<std::vector<double>>& series,
                          const std::string& title) {
  constexpr double kW = 720, kH = 420, kL = 70, kR = 20, kT = 40, kB = 50;
  double lo = INFINITY, hi = -INFINITY;
  size_t n = 1;
  for (const auto& s : series) {
    n = std::max(n, s.size());
    for (double v : s)
      if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
  }
  if (!std::isfinite(lo)) lo = 0, hi = 1;
  if (hi - lo < 1e-9) hi = lo + 1;
  auto px = [&](double i) { return kL + (kW - kL - kR) * i / std::max<double>(1, n - 1); };
  auto py = [&](double v) { return kT + (kH - kT - kB) * (hi - v) / (hi - lo); };
  static const char* colors[] = {"#d62728", "#1f77b4", "#2ca02c", "#9467bd"};
  std::ostringstream o;
  o.precision(6);
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << kW << "\" height=\"" << kH
    << "\" font-family=\"sans-serif\" font-size=\"12\">\n"
    << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    << "<text x=\"" << kW / 2 << "\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">" << title
    << "</text>\n";
  o << "<line x1=\"" << kL << "\" y1=\"" << kH - kB << "\" x2=\"" << kW - kR << "\" y2=\""
    << kH - kB << "\" stroke=\"black\"/>\n<line x1=\"" << kL << "\" y1=\"" << kT << "\" x2=\"" << kL
    << "\" y2=\"" << kH - kB << "\" stroke=\"black\"/>\n";
  for (int i = 0; i <= 4; ++i) {
    const double v = lo + (hi - lo) * i / 4;
    o << "<text x=\"" << kL - 6 << "\" y=\"" << py(v) + 4 << "\" text-anchor=\"end\">"
      << std::round(v * 1000) / 1000 << "</text>\n";
    const double s = (n - 1) * i / 4.0;
    o << "<text x=\"" << px(s) << "\" y=\"" << kH - kB + 18 << "\" text-anchor=\"middle\">"
      << static_cast<int64_t>(s + 1) << "</text>\n";
  }
  o << "<text x=\"" << (kW + kL) / 2 << "\" y=\"" << kH - 10
    << "\" text-anchor=\"middle\">step</text>\n<text x=\"16\" y=\"" << kH / 2
    << "\" transform=\"rotate(-90 16," << kH / 2 << ")\" text-anchor=\"middle\">loss</text>\n";
  for (size_t k = 0; k < series.size(); ++k) {
    o << "<polyline fill=\"none\" stroke-width=\"1.2\" stroke=\"" << colors[k % 4]
      << "\" points=\"";
    for (size_t i = 0; i < series[k].size(); ++i)
      if (std::isfinite(series[k][i])) o << px(i) << "," << py(series[k][i]) << " ";
    o << "\"/>\n<text x=\"" << kW - kR - 120 << "\" y=\"" << kT + 16 * (k + 1) << "\" fill=\""
      << colors[k % 4] << "\">" << names[k] << "</text>\n";
  }
  o << "</svg>\n";
  return o.str();
}

TrainResult train(const TrainOptions& opts) {
  TrainOptions o = opts;
  FM_CHECK_ARG(o.steps > 0, "--steps must be positive");
  FM_CHECK_ARG(o.batch > 0 && o.seq > 0, "--batch and --seq must be positive");
  FM_CHECK_ARG(!o.out_dir.empty(), "an output folder (--out) is needed");
  FM_CHECK_ARG(o.checkpoint || o.stop_after == 0,
               "--stop-after without a checkpoint could not be resumed (drop --no-checkpoint)");
  o.adam.total_steps = o.steps;
  if (o.threads > 0) set_model_threads(o.threads);
  RunLog log(o, "");

  const TokenData data = load_run_data(o);
  const int64_t window = o.seq + o.model.num_nextn_predict_layers + 1;

  std::filesystem::create_directories(o.out_dir);
  const std::string ckpt_path = o.out_dir + "/" + kCheckpointFile;
  Model model(o.model, o.seed);
  AdamW adam(o.adam, model.parameters());
  WeightEma ema(model.parameters(), o.ema_decay);

  TrainResult result;
  int64_t start = 0;
  if (o.resume) start = load_model_checkpoint(ckpt_path, model, adam, ema, o);
  std::ofstream metrics;
  result.losses = restart_metrics(o.out_dir, start, metrics);
  std::filesystem::copy_file(o.tokenizer, o.out_dir + "/tokenizer.model",
                             std::filesystem::copy_options::overwrite_existing);

  const int64_t end = o.stop_after > 0 ? std::min(o.steps, start + o.stop_after) : o.steps;
  log.begin_loop(start, end, &metrics);
  for (int64_t step = start; step < end; ++step) {
    model.zero_grad();
    const std::vector<int32_t> batch = sample_batch(data.train, o.batch, window, o.seed, step);
    const LossReport rep =
        model.forward_backward(batch.data(), o.batch, window, o.precision, o.mtp_weight, true);
    FM_CHECK(std::isfinite(rep.loss), "the loss is not finite at step ", step + 1);
    const double grad_norm = clip_gradients(model.parameters(), o.adam.clip_norm);
    adam.step(model.parameters(), step);
    update_router_bias(model.buffers(), model.expert_load(), o.bias_update_speed);
    ema.submit(model.parameters());
    result.losses.push_back(rep.loss);

    log.step(step, rep, grad_norm);
    if (checkpoint_due(o, step, end))
      save_model_checkpoint(ckpt_path, model, adam, ema, o, step + 1);
  }
  log.end_loop();
  if (o.checkpoint) save_model_checkpoint(ckpt_path, model, adam, ema, o, end);

  // Held-out loss on fixed windows of the validation stream.
  if (o.eval_batches > 0 && static_cast<int64_t>(data.valid.size()) > window) {
    double sum = 0;
    for (int64_t i = 0; i < o.eval_batches; ++i) {
      const auto vb = eval_batch(data, o, window, i);
      sum += model.forward_backward(vb.data(), o.batch, window, o.precision, o.mtp_weight, false)
                 .main_loss;
    }
    result.valid_loss = sum / static_cast<double>(o.eval_batches);
    log.eval(result.valid_loss);
  }
  log.finish(result, precision_name(o.precision));
  return result;
}

std::unique_ptr<Model> load_checkpoint_model(const std::string& checkpoint_dir, bool use_ema,
                                             Precision* precision) {
  const std::string path = checkpoint_dir + "/" + train_detail::kCheckpointFile;
  const SafetensorsFile f = train_detail::open_checkpoint(path);
  const ModelConfig config =
      parse_model_config(parse_json(f.metadata().at("config"), path + " config"), path + " config");
  if (precision != nullptr) *precision = parse_precision(f.metadata().at("precision"));
  auto model = std::make_unique<Model>(config, 0);
  load_weights(f, *model, use_ema ? "ema/" : "param/");
  return model;
}

struct CheckpointGenerator::Impl {
  Precision precision = Precision::kFp32;
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tok;
};

CheckpointGenerator::CheckpointGenerator(const GenerateOptions& g)
    : impl_(std::make_unique<Impl>()) {
  if (g.threads > 0) set_model_threads(g.threads);
  impl_->model = load_checkpoint_model(g.checkpoint_dir, g.use_ema, &impl_->precision);
  impl_->tok = std::make_unique<Tokenizer>(g.checkpoint_dir + "/tokenizer.model");
}

CheckpointGenerator::~CheckpointGenerator() = default;

const Tokenizer& CheckpointGenerator::tokenizer() const {
  return *impl_->tok;
}

std::vector<int32_t> CheckpointGenerator::generate(std::vector<int32_t> ids,
                                                   const GenerateOptions& g, uint64_t stream,
                                                   const std::function<void(int32_t)>& on_token) {
  Model& model = *impl_->model;
  const Tokenizer& tok = *impl_->tok;
  FM_CHECK_ARG(g.temperature >= 0, "--temperature must be >= 0");
  FM_CHECK_ARG(g.top_p > 0 && g.top_p <= 1, "--top-p must lie in (0, 1]");
  FM_CHECK_ARG(g.context >= 2, "--context must be >= 2 (got ", g.context, ")");
  if (ids.empty()) ids.push_back(tok.eos_id() >= 0 ? tok.eos_id() : 0);
  const size_t prompt_len = ids.size();
  const int64_t context = std::min(g.context, model.config().max_position_embeddings);
  PhiloxStream rng(g.seed, 7 + stream);
  KvCache cache;
  cache.form = g.cache_form;
  int64_t start = 0;  // the model reads ids[start, end)
  for (int64_t i = 0; i < g.max_new_tokens; ++i) {
    const int64_t end = static_cast<int64_t>(ids.size());
    if (end - start > context) {
      // NOTE: positions restart at 0 for the new window, so the cache must be rebuilt; halving
      // the window makes that happen once every context/2 tokens rather than every token.
      start = end - context / 2;
      cache.clear();
    }
    std::vector<float> logits =
        g.use_cache ? model.next_token_logits(ids.data() + start + cache.length,
                                              end - start - cache.length, impl_->precision, cache)
                    : model.next_token_logits(ids.data() + start, end - start, impl_->precision);
    const int32_t next = sample_token(logits.data(), static_cast<int64_t>(logits.size()),
                                      g.temperature, g.top_p, rng);
    if (next == tok.eos_id() && !g.ignore_eos) break;
    ids.push_back(next);
    if (on_token) on_token(next);
  }
  return std::vector<int32_t>(ids.begin() + static_cast<std::ptrdiff_t>(prompt_len), ids.end());
}

std::string generate_text(const GenerateOptions& g) {
  CheckpointGenerator gen(g);
  std::vector<int32_t> ids = gen.tokenizer().encode(g.prompt);
  if (ids.empty()) ids.push_back(gen.tokenizer().eos_id() >= 0 ? gen.tokenizer().eos_id() : 0);
  const std::vector<int32_t> out = gen.generate(ids, g);
  ids.insert(ids.end(), out.begin(), out.end());
  return gen.tokenizer().decode(ids);
}

}  // namespace fp8moe
