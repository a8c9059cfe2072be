// The GPU trainer (train/trainer_gpu.h) end to end on a small GPU-legal V3-architecture model and
// a slice of the corpus:
//  - from the same initial weights and batches as the CPU trainer (train(), fp8), the per-step
//    losses track the CPU's (first step: the same weights, only the GPU's BF16 activations and
//    FP8 requantisation differ; later steps also carry AdamW's amplification of those);
//  - a run stopped and resumed equals an uninterrupted one bit for bit (losses and checkpoint);
//  - the GPU checkpoint is the CPU's format: the CPU trainer resumes from it and `generate`
//    samples from it;
//  - bad options are rejected with a message (bf16 on the GPU; a model the GPU path cannot take);
//  - several GPUs (TrainerGpuParallel, one process per GPU through the launcher): the job equals
//    the one-GPU run of the same global batch up to summation order (step 1 to 1e-4, every step
//    to 5e-3, step 1's grad norm to 2e-2), resumes bit for bit, averages its gradients beside
//    the backward as after it, runs its optimizer sharded (ZeRO-1, the default) or replicated to
//    the same losses (1e-4), assembles checkpoints whose tensors match the one-GPU run's, which
//    resume on one GPU; ranks sharing a GPU are refused with a message.
// Run (from the repository root: it reads data/ and configs/): test_train_gpu
// --gtest_filter='TrainerGpu*'
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "fp8moe/comm/launcher.h"
#include "fp8moe/core/error.h"
#include "fp8moe/core/json.h"
#include "fp8moe/train/safetensors.h"
#include "fp8moe/train/trainer.h"
#include "fp8moe/train/trainer_gpu.h"

namespace fp8moe {
namespace {

namespace fs = std::filesystem;

std::string repo_file(const std::string& rel) {
  return fs::exists(rel) ? rel : std::string(FP8MOE_SOURCE_DIR) + "/" + rel;
}

// The smallest shape the GPU path takes: head dims 128 / 64 / 128, multiples of 128 elsewhere.
ModelConfig gpu_tiny_config() {
  ModelConfig c;
  c.vocab_size = 2048;  // data/kjv_sp2048.model
  c.hidden_size = 256;
  c.intermediate_size = 384;
  c.moe_intermediate_size = 128;
  c.num_hidden_layers = 2;
  c.first_k_dense_replace = 1;
  c.n_routed_experts = 8;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 2;
  c.n_group = 4;
  c.topk_group = 2;
  c.routed_scaling_factor = 1.0;
  c.aux_loss_alpha = 1e-3;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 2;
  c.q_lora_rank = 128;
  c.kv_lora_rank = 128;
  c.qk_nope_head_dim = 128;
  c.qk_rope_head_dim = 64;
  c.v_head_dim = 128;
  c.num_nextn_predict_layers = 1;
  c.max_position_embeddings = 256;
  c.rope_scaling = RopeScaling{};
  c.bos_token_id = 1;
  c.eos_token_id = 2;
  c.validate();
  return c;
}

// The first 1500 lines of the corpus (a few seconds to tokenise; ~1 % held out).
std::string small_corpus(const fs::path& dir) {
  fs::create_directories(dir);
  const fs::path out = dir / "corpus.txt";
  std::ifstream in(repo_file("data/kjv.txt"));
  std::ofstream o(out);
  std::string line;
  for (int i = 0; i < 1500 && std::getline(in, line); ++i) o << line << "\n";
  return out.string();
}

TrainOptions options(const fs::path& dir, const std::string& name, int64_t steps) {
  TrainOptions o;
  o.model = gpu_tiny_config();
  o.precision = Precision::kFp8;
  o.out_dir = (dir / name).string();
  o.corpus = small_corpus(dir);
  o.tokenizer = repo_file("data/kjv_sp2048.model");
  o.steps = steps;
  o.batch = 2;
  o.seq = 64;
  o.adam.warmup_steps = 2;
  o.eval_batches = 2;
  o.progress = false;
  return o;
}

fs::path fresh_dir(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / ("fp8moe_trainer_gpu_" + name);
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

TEST(TrainerGpu, TracksTheCpuTrainer) {
  const fs::path dir = fresh_dir("track");
  const int64_t steps = 8;
  const TrainResult cpu = train(options(dir, "cpu", steps));
  const TrainResult gpu = train_gpu(options(dir, "gpu", steps));
  ASSERT_EQ(cpu.losses.size(), static_cast<size_t>(steps));
  ASSERT_EQ(gpu.losses.size(), static_cast<size_t>(steps));
  double worst = 0;
  for (int64_t s = 0; s < steps; ++s) {
    const double rel = std::fabs(gpu.losses[s] - cpu.losses[s]) / std::fabs(cpu.losses[s]);
    std::printf("step %lld: cpu %.6f gpu %.6f rel %.2e\n", static_cast<long long>(s + 1),
                cpu.losses[s], gpu.losses[s], rel);
    if (s == 0) EXPECT_LT(rel, 2e-3) << "the first step: same weights, same batch";
    worst = std::max(worst, rel);
  }
  std::printf("worst rel %.2e; valid cpu %.4f gpu %.4f; %.0f vs %.0f tokens/s\n", worst,
              cpu.valid_loss, gpu.valid_loss, cpu.tokens_per_s, gpu.tokens_per_s);
  EXPECT_LT(worst, 2e-2);
  EXPECT_LT(std::fabs(gpu.valid_loss - cpu.valid_loss) / cpu.valid_loss, 2e-2);
  EXPECT_LT(gpu.losses.back(), gpu.losses.front()) << "the GPU run does not learn";
}

TEST(TrainerGpu, ResumeEqualsUninterrupted) {
  const fs::path dir = fresh_dir("resume");
  const int64_t steps = 6;
  const TrainResult whole = train_gpu(options(dir, "whole", steps));
  TrainOptions part = options(dir, "parts", steps);
  part.stop_after = 3;
  train_gpu(part);
  part.stop_after = 0;
  part.resume = true;
  const TrainResult resumed = train_gpu(part);
  ASSERT_EQ(resumed.losses.size(), whole.losses.size());
  for (size_t s = 0; s < whole.losses.size(); ++s)
    EXPECT_EQ(resumed.losses[s], whole.losses[s]) << "step " << s + 1;
  const SafetensorsFile a = SafetensorsFile::read((dir / "whole/checkpoint.safetensors").string());
  const SafetensorsFile b = SafetensorsFile::read((dir / "parts/checkpoint.safetensors").string());
  int64_t tensors = 0, differ = 0;
  for (const auto& [name, e] : a.entries()) {
    if (name.rfind("param/", 0) != 0 && name.rfind("buffer/", 0) != 0) continue;
    const int64_t n = static_cast<int64_t>((e.end - e.begin) / 4);
    ++tensors;
    differ += a.f32(name, n) != b.f32(name, n);
  }
  std::printf("%lld of %lld parameter / buffer tensors differ\n", static_cast<long long>(differ),
              static_cast<long long>(tensors));
  EXPECT_EQ(differ, 0);
}

TEST(TrainerGpu, CheckpointIsTheCpuFormat) {
  const fs::path dir = fresh_dir("format");
  TrainOptions o = options(dir, "run", 6);
  o.stop_after = 3;
  train_gpu(o);
  // The CPU trainer goes on from the GPU's checkpoint.
  o.stop_after = 0;
  o.resume = true;
  const TrainResult cpu = train(o);
  EXPECT_EQ(cpu.steps_done, 6);
  EXPECT_TRUE(std::isfinite(cpu.losses.back()));
  GenerateOptions g;
  g.checkpoint_dir = o.out_dir;
  g.prompt = "In the beginning";
  g.max_new_tokens = 8;
  g.ignore_eos = true;
  const std::string text = generate_text(g);
  std::printf("generated: %s\n", text.c_str());
  EXPECT_GT(text.size(), std::string("In the beginning").size());
}

TEST(TrainerGpu, RejectsWhatTheGpuPathCannotTake) {
  const fs::path dir = fresh_dir("reject");
  TrainOptions o = options(dir, "bf16", 2);
  o.precision = Precision::kBf16;
  EXPECT_THROW(train_gpu(o), Error);
  TrainOptions t = options(dir, "tiny", 2);
  t.model = load_model_config(repo_file("configs/tiny.json"));  // head dims 32: not the kernels'
  EXPECT_THROW(train_gpu(t), Error);
}

// ---- several GPUs: one process per GPU, started by the launcher from this binary ----

constexpr const char* kRankMode = "FP8MOE_TRAINER_TEST_RANK";  // "job" or "shared"
constexpr const char* kRankDir = "FP8MOE_TRAINER_TEST_DIR";

int visible_gpus() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

TrainOptions parallel_options(const fs::path& dir, const std::string& name, int64_t steps) {
  TrainOptions o = options(dir, name, steps);
  o.batch = 4;  // the job's: 2 rows a rank at 2 ranks, 1 at 4
  return o;
}

// Per step (from metrics.jsonl): the loss and the grad norm.
struct Metrics {
  std::vector<double> loss, grad_norm;
};
Metrics read_metrics(const fs::path& run) {
  std::ifstream in(run / "metrics.jsonl");
  Metrics m;
  std::string line;
  while (std::getline(in, line)) {
    const Json j = parse_json(line, (run / "metrics.jsonl").string());
    if (!j.contains("loss")) continue;
    m.loss.push_back(j["loss"].get<double>());
    m.grad_norm.push_back(j["grad_norm"].get<double>());
  }
  return m;
}

// One rank of the jobs below. "job" trains, 6 steps each: `whole` (the defaults: the optimizer
// sharded over the ranks), `parts` (3 steps, then resumed), `replicated` (every rank the whole
// optimizer state, the gradient averages beside the backward) and `serial` (the same, averaged
// after the backward). "shared" starts a run that must be refused (two ranks on one GPU).
TEST(TrainerGpuParallelChild, Rank) {
  const char* mode = std::getenv(kRankMode);
  if (mode == nullptr) GTEST_SKIP() << "runs as a rank of TrainerGpuParallel.* only";
  const fs::path dir = std::getenv(kRankDir);
  try {
    if (std::string(mode) == "job") {
      train_gpu(parallel_options(dir, "whole", 6));
      TrainOptions part = parallel_options(dir, "parts", 6);
      part.stop_after = 3;
      train_gpu(part);
      part.stop_after = 0;
      part.resume = true;
      train_gpu(part);
      GpuTrainOptions replicated;
      replicated.shard_optimizer = false;
      train_gpu(parallel_options(dir, "replicated", 6), replicated);
      GpuTrainOptions serial = replicated;
      serial.overlap_reduce = false;
      serial.phase_times = true;
      train_gpu(parallel_options(dir, "serial", 6), serial);
    } else {
      train_gpu(parallel_options(dir, "shared", 2));
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    std::fflush(stderr);
    std::_Exit(3);
  }
  std::fflush(stdout);
}

comm::LaunchResult launch_ranks(int ranks, const std::string& mode, const fs::path& dir,
                                std::vector<int> devices, std::string* output) {
  comm::LaunchOptions opt;
  opt.num_ranks = ranks;
  opt.command = {fs::read_symlink("/proc/self/exe").string(),
                 "--gtest_filter=TrainerGpuParallelChild.Rank"};
  opt.env = {{kRankMode, mode}, {kRankDir, dir.string()}};
  opt.devices = std::move(devices);
  opt.timeout_s = 600;
  opt.on_line = [output](int rank, int, std::string_view line) {
    std::ostringstream l;
    l << "[rank " << rank << "] " << line << "\n";
    std::fputs(l.str().c_str(), stdout);
    *output += l.str();
  };
  return comm::launch(opt);
}

// Tensors of a checkpoint as floats (BF16 moments widened), by name; buffers left out.
std::map<std::string, std::vector<float>> checkpoint_tensors(const fs::path& file) {
  const SafetensorsFile f = SafetensorsFile::read(file.string());
  std::map<std::string, std::vector<float>> out;
  for (const auto& [name, e] : f.entries()) {
    if (name.rfind("buffer/", 0) == 0) continue;
    const bool bf16 = e.dtype == "BF16";
    const int64_t n = static_cast<int64_t>((e.end - e.begin) / (bf16 ? 2 : 4));
    if (!bf16) {
      out[name] = f.f32(name, n);
      continue;
    }
    std::vector<float>& x = out[name];
    for (uint16_t b : f.u16(name, "BF16", n)) {
      const uint32_t u = static_cast<uint32_t>(b) << 16;
      float v;
      std::memcpy(&v, &u, 4);
      x.push_back(v);
    }
  }
  return out;
}

// The largest relative L2 difference over the tensors whose name starts with one of `kinds`.
double worst_difference(const std::map<std::string, std::vector<float>>& a,
                        const std::map<std::string, std::vector<float>>& b,
                        std::initializer_list<const char*> kinds, std::string* where) {
  double worst = 0;
  *where = "all equal";
  for (const auto& [name, x] : a) {
    if (std::none_of(kinds.begin(), kinds.end(),
                     [&](const char* k) { return name.rfind(k, 0) == 0; }))
      continue;
    auto it = b.find(name);
    if (it == b.end() || it->second.size() != x.size()) {
      *where = name + " (missing or another size)";
      return INFINITY;
    }
    double num = 0, den = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      num += (double(x[i]) - it->second[i]) * (double(x[i]) - it->second[i]);
      den += double(x[i]) * x[i];
    }
    const double rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
    if (rel > worst) worst = rel, *where = name;
  }
  return worst;
}

TEST(TrainerGpuParallel, RanksEqualOneGpu) {
  if (std::getenv(kRankMode)) GTEST_SKIP() << "inside a rank";
  const int gpus = visible_gpus();
  if (gpus < 2) GTEST_SKIP() << "needs 2 or more GPUs, found " << gpus;
  const int ranks = gpus >= 4 ? 4 : 2;  // the test model's 8 experts and batch of 4 split evenly
  const fs::path dir = fresh_dir("parallel");
  std::string output;
  const comm::LaunchResult res = launch_ranks(ranks, "job", dir, {}, &output);
  ASSERT_TRUE(res.ok()) << res.error;

  const TrainResult one = train_gpu(parallel_options(dir, "one", 6));
  const Metrics whole = read_metrics(dir / "whole"), parts = read_metrics(dir / "parts");
  const Metrics replicated = read_metrics(dir / "replicated"),
                serial = read_metrics(dir / "serial");
  const Metrics one_m = read_metrics(dir / "one");
  for (const Metrics* m : {&whole, &parts, &replicated, &serial}) ASSERT_EQ(m->loss.size(), 6u);
  double worst = 0;
  for (size_t s = 0; s < 6; ++s) {
    const double rel = std::fabs(whole.loss[s] - one.losses[s]) / std::fabs(one.losses[s]);
    std::printf("step %zu: one GPU %.7f, %d ranks %.7f (rel %.2e), grad norm %.5f / %.5f\n", s + 1,
                one.losses[s], ranks, whole.loss[s], rel, one_m.grad_norm[s], whole.grad_norm[s]);
    if (s == 0) EXPECT_LT(rel, 1e-4) << "step 1: the same weights and rows";
    worst = std::max(worst, rel);
    EXPECT_EQ(parts.loss[s], whole.loss[s]) << "resumed at step 3, step " << s + 1;
    // Every rank the whole optimizer state: the same update of each element; at two ranks only
    // the grad norm's partial sums are grouped otherwise (its last bits, and through the clip
    // factor the weights'); at more, the all-reduce and the reduce-scatter also sum each
    // gradient in another order, and the runs part as the job and one GPU do.
    EXPECT_NEAR(replicated.loss[s], whole.loss[s], (ranks == 2 ? 1e-4 : 5e-3) * whole.loss[s])
        << "step " << s + 1;
    // Two ranks: each average is a + b, whichever stream runs it; more ranks may sum in another
    // order per chunk.
    if (ranks == 2)
      EXPECT_EQ(serial.loss[s], replicated.loss[s])
          << "averaged after the backward, step " << s + 1;
    else
      EXPECT_NEAR(serial.loss[s], replicated.loss[s], 5e-3 * whole.loss[s]) << "step " << s + 1;
  }
  EXPECT_LT(worst, 5e-3);
  // The backward's BF16 sums run in another order across ranks (the combine's partials per
  // rank), and a one-ulp difference flips FP8 codes downstream (the recipe's own gradient noise:
  // 0.09-0.15 per tensor between two roundings, session 21). A wrong expert scale (1 instead of
  // 1 / R) would move the norm by far more (the experts hold ~40 % of this model's parameters).
  const double g1 = one_m.grad_norm[0];
  EXPECT_LT(std::fabs(whole.grad_norm[0] - g1) / g1, 2e-2) << "step 1's grad norm";

  // The jobs' checkpoints, assembled from the ranks' parts (slots of the sharded optimizer, the
  // experts of every rank). The resumed run above equal to the uninterrupted one says the round
  // trip is exact. Against the one-GPU run's, tensor by tensor: values and EMA differ by the
  // runs' FP8 noise, which AdamW's normalised steps (lr 3e-3 against weights of std 0.02) carry
  // into the weights (0.15-0.18 at worst in session 22), while a tensor filed under another's
  // name or a slot at a wrong offset differs like unrelated weights (~1.4). The moments of a
  // noise-dominated gradient differ across runs by more than that (up to 4.6), so they are
  // compared between the two jobs where their steps agree bit for bit (two ranks).
  const auto t_one = checkpoint_tensors(dir / "one/checkpoint.safetensors");
  const auto t_whole = checkpoint_tensors(dir / "whole/checkpoint.safetensors");
  const auto t_replicated = checkpoint_tensors(dir / "replicated/checkpoint.safetensors");
  ASSERT_EQ(t_whole.size(), t_one.size());
  ASSERT_EQ(t_replicated.size(), t_one.size());
  std::string where;
  for (const auto* t : {&t_whole, &t_replicated}) {
    const double w = worst_difference(*t, t_one, {"param/", "ema/"}, &where);
    std::printf("values / EMA against one GPU: worst %.2e (%s)\n", w, where.c_str());
    EXPECT_LT(w, 0.3) << where;
  }
  if (ranks == 2) {
    const double w = worst_difference(t_whole, t_replicated, {"adam_m/", "adam_v/"}, &where);
    std::printf("moments, sharded against replicated optimizer: worst %.2e (%s)\n", w,
                where.c_str());
    EXPECT_LT(w, 1e-2) << where;
  }
  for (const char* run : {"whole", "replicated"}) {
    SCOPED_TRACE(run);
    TrainOptions more = parallel_options(dir, run, 8);
    more.resume = true;
    const TrainResult resumed = train_gpu(more);  // one GPU
    EXPECT_EQ(resumed.steps_done, 8);
    EXPECT_TRUE(std::isfinite(resumed.losses.back()));
  }
}

TEST(TrainerGpuParallel, RanksSharingAGpuAreRefused) {
  if (std::getenv(kRankMode)) GTEST_SKIP() << "inside a rank";
  if (visible_gpus() < 1) GTEST_SKIP() << "needs a GPU";
  const fs::path dir = fresh_dir("shared");
  std::string output;
  const comm::LaunchResult res = launch_ranks(2, "shared", dir, {0, 0}, &output);
  EXPECT_FALSE(res.ok());
  EXPECT_NE(output.find("one GPU per rank"), std::string::npos) << output;
}

}  // namespace
}  // namespace fp8moe
