// Tests of the training side: safetensors validation, checkpoints (bit-identical resume, bad
// files refused with a clear message), AdamW with BF16 moments, the schedule, clipping, the
// router bias update and the EMA thread.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "fp8moe/core/file_io.h"
#include "fp8moe/core/json.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/train/data.h"
#include "fp8moe/train/ema.h"
#include "fp8moe/train/optimizer.h"
#include "fp8moe/train/safetensors.h"
#include "fp8moe/train/trainer.h"

namespace fp8moe {
namespace {

const std::string kSource = FP8MOE_SOURCE_DIR;

void expect_format_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no error (expected one mentioning '" << needle << "')";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kFormat) << e.message();
    EXPECT_NE(e.message().find(needle), std::string::npos) << e.message();
  }
}

TEST(Safetensors, RoundTripsTensorsAndMetadata) {
  SafetensorsWriter w;
  const std::vector<float> a = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, 8.0f};
  const std::vector<uint16_t> b = {0x3f80, 0x4000};
  w.add_f32("a", {2, 3}, a.data());
  w.add_u16("b", "BF16", {2}, b.data());
  w.set_metadata("format", "test");
  const std::string bytes = w.serialize();
  EXPECT_EQ((bytes.size() - 6 * 4 - 2 * 2) % 8, 0u);  // data section 8-byte aligned
  const SafetensorsFile f = SafetensorsFile::parse(bytes, "mem");
  EXPECT_EQ(f.f32("a", 6), a);
  EXPECT_EQ(f.u16("b", "BF16", 2), b);
  EXPECT_EQ(f.metadata().at("format"), "test");
  EXPECT_EQ(f.entries().at("a").shape, (std::vector<int64_t>{2, 3}));
}

TEST(Safetensors, CorruptFilesAreRefusedWithTheProblemNamed) {
  SafetensorsWriter w;
  const std::vector<float> a(16, 1.0f);
  w.add_f32("a", {16}, a.data());
  const std::string good = w.serialize();
  expect_format_error([&] { SafetensorsFile::parse("abc", "'x'"); }, "shorter than the 8-byte");
  expect_format_error([&] { SafetensorsFile::parse("hello world, not a tensor file", "'x'"); },
                      "header length");
  expect_format_error([&] { SafetensorsFile::parse(good.substr(0, good.size() - 10), "'x'"); },
                      "truncated");
  std::string bad_json = good;
  bad_json[8] = '[';
  expect_format_error([&] { SafetensorsFile::parse(bad_json, "'x'"); }, "'x'");
  // Offsets that disagree with dtype x shape.
  std::string header = R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}})";
  std::string bytes(8, '\0');
  bytes[0] = static_cast<char>(header.size());
  bytes += header + std::string(16, '\0');
  expect_format_error([&] { SafetensorsFile::parse(bytes, "'x'"); }, "dtype and shape need");
  const SafetensorsFile f = SafetensorsFile::parse(good, "'x'");
  expect_format_error([&] { f.f32("missing", 1); }, "'missing' is missing");
  expect_format_error([&] { f.f32("a", 3); }, "expected 3");
}

TEST(Optimizer, ScheduleWarmsUpThenDecaysByCosine) {
  AdamWConfig c;
  c.lr = 1.0;
  c.warmup_steps = 10;
  c.total_steps = 110;
  c.min_lr_ratio = 0.1;
  EXPECT_DOUBLE_EQ(learning_rate(c, 0), 0.1);
  EXPECT_DOUBLE_EQ(learning_rate(c, 9), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(c, 10), 1.0);
  EXPECT_NEAR(learning_rate(c, 60), 0.55, 1e-12);
  EXPECT_NEAR(learning_rate(c, 110), 0.1, 1e-12);
}

TEST(Optimizer, AdamWKeepsBf16MomentsAndDecoupledDecay) {
  std::deque<Parameter> params(2);
  params[0].value = {1.0f, -2.0f};
  params[0].grad = {0.1f, 0.3f};
  params[1].value = {0.5f};
  params[1].grad = {-0.2f};
  params[1].weight_decay = false;
  AdamWConfig c;
  c.lr = 0.01;
  c.warmup_steps = 0;
  c.total_steps = 1000;
  c.weight_decay = 0.1;
  AdamW opt(c, params);
  opt.step(params, 0);
  // First step: m = (1-b1) g, v = (1-b2) g^2 rounded to BF16; update ~ lr * sign(g).
  EXPECT_EQ(opt.m()[0][0], float_to_bf16_bits(0.1f * 0.1f));
  const double lr = learning_rate(c, 0);
  const double mh = bf16_bits_to_float(opt.m()[0][0]) / (1 - 0.9);
  const double vh = bf16_bits_to_float(opt.v()[0][0]) / (1 - 0.95);
  EXPECT_FLOAT_EQ(params[0].value[0],
                  static_cast<float>(1.0 - lr * (mh / (std::sqrt(vh) + 1e-8) + 0.1)));
  EXPECT_NEAR(params[1].value[0], 0.5 + lr, 1e-4);  // no decay on this one
}

TEST(Optimizer, ClippingBoundsTheGlobalNorm) {
  std::deque<Parameter> params(2);
  params[0].grad = {3.0f};
  params[1].grad = {4.0f};
  EXPECT_DOUBLE_EQ(clip_gradients(params, 1.0), 5.0);
  EXPECT_FLOAT_EQ(params[0].grad[0], 0.6f);
  EXPECT_FLOAT_EQ(params[1].grad[0], 0.8f);
  EXPECT_NEAR(clip_gradients(params, 10.0), 1.0, 1e-6);
  EXPECT_FLOAT_EQ(params[1].grad[0], 0.8f);
}

TEST(Optimizer, RouterBiasMovesTowardUnderloadedExperts) {
  std::deque<Parameter> buffers(1);
  buffers[0].value = {0.0f, 0.0f, 0.0f, 0.0f};
  update_router_bias(buffers, {{10, 2, 4, 4}}, 0.001);
  EXPECT_EQ(buffers[0].value, (std::vector<float>{-0.001f, 0.001f, 0.001f, 0.001f}));
}

TEST(Ema, ThreadResultEqualsTheSerialAverage) {
  std::deque<Parameter> params(1);
  params[0].value = {1.0f, 2.0f};
  WeightEma ema(params, 0.9);
  std::vector<float> expect = params[0].value;
  for (int s = 0; s < 50; ++s) {
    params[0].value = {static_cast<float>(s), static_cast<float>(-s)};
    ema.submit(params);
    for (size_t j = 0; j < 2; ++j) expect[j] = 0.9f * expect[j] + 0.1f * params[0].value[j];
  }
  ema.flush();
  EXPECT_EQ(ema.updates(), 50);
  EXPECT_EQ(ema.values()[0], expect);
}

// A micro model on the first lines of the corpus: a few steps in a few seconds.
TrainOptions micro_options(const std::string& dir) {
  static const std::string corpus = [] {
    // NOTE: written atomically: ctest may run several of these tests at once.
    const std::string path = testing::TempDir() + "/fp8moe_micro_corpus.txt";
    std::ifstream in(kSource + "/data/kjv.txt");
    std::ostringstream out;
    std::string line;
    for (int i = 0; i < 1500 && std::getline(in, line); ++i) out << line << "\n";
    write_file_atomic(path, out.str());
    return path;
  }();
  TrainOptions o;
  Json j = {{"vocab_size", 2048},
            {"hidden_size", 32},
            {"intermediate_size", 64},
            {"moe_intermediate_size", 16},
            {"num_hidden_layers", 2},
            {"first_k_dense_replace", 1},
            {"n_routed_experts", 4},
            {"n_shared_experts", 1},
            {"num_experts_per_tok", 2},
            {"n_group", 2},
            {"topk_group", 1},
            {"num_attention_heads", 2},
            {"num_key_value_heads", 2},
            {"q_lora_rank", 16},
            {"kv_lora_rank", 16},
            {"qk_nope_head_dim", 8},
            {"qk_rope_head_dim", 8},
            {"v_head_dim", 8},
            {"num_nextn_predict_layers", 1},
            {"max_position_embeddings", 128},
            {"rope_scaling", nullptr}};
  o.model = parse_model_config(j, "micro");
  o.precision = Precision::kFp8;
  o.out_dir = dir;
  o.corpus = corpus;
  o.tokenizer = kSource + "/data/kjv_sp2048.model";
  o.steps = 6;
  o.batch = 2;
  o.seq = 32;
  o.adam.warmup_steps = 2;
  o.eval_batches = 1;
  o.progress = false;
  return o;
}

std::string run_cli(const std::string& args, int* status);

std::string fresh_dir(const std::string& name) {
  const std::string d = testing::TempDir() + "/fp8moe_train_test_" + name;
  std::filesystem::remove_all(d);
  return d;
}

TEST(Checkpoint, ResumingGivesBitIdenticalLosses) {
  if (!have_sentencepiece()) GTEST_SKIP() << "built without SentencePiece";
  const TrainOptions full = micro_options(fresh_dir("full"));
  const TrainResult a = train(full);
  ASSERT_EQ(a.losses.size(), 6u);
  EXPECT_LT(a.losses.back(), a.losses.front());

  TrainOptions part = micro_options(fresh_dir("part"));
  part.stop_after = 3;
  const TrainResult b1 = train(part);
  EXPECT_EQ(b1.steps_done, 3);
  part.stop_after = 0;
  part.resume = true;
  const TrainResult b2 = train(part);
  ASSERT_EQ(b2.losses.size(), 6u);
  for (size_t i = 0; i < 6; ++i) EXPECT_EQ(a.losses[i], b2.losses[i]) << "step " << i + 1;
  EXPECT_EQ(a.valid_loss, b2.valid_loss);
  // The final checkpoints agree tensor for tensor (weights, moments, router biases, EMA).
  const SafetensorsFile fa = SafetensorsFile::read(full.out_dir + "/checkpoint.safetensors");
  const SafetensorsFile fb = SafetensorsFile::read(part.out_dir + "/checkpoint.safetensors");
  EXPECT_EQ(fa.metadata().at("step"), "6");
  ASSERT_EQ(fa.entries().size(), fb.entries().size());
  for (const auto& [name, e] : fa.entries()) {
    if (e.dtype == "F32") {
      int64_t n = 1;
      for (auto d : e.shape) n *= d;
      EXPECT_EQ(fa.f32(name, n), fb.f32(name, n)) << name;
    }
  }
  // Sampling from the checkpoint continues the prompt.
  GenerateOptions g;
  g.checkpoint_dir = full.out_dir;
  g.prompt = "In the beginning";
  g.max_new_tokens = 8;
  const std::string greedy = generate_text(g);
  EXPECT_EQ(greedy.rfind("In the beginning", 0), 0u) << greedy;
  EXPECT_EQ(generate_text(g), greedy);
  g.temperature = 0.8;
  g.top_p = 0.9;
  EXPECT_EQ(generate_text(g).rfind("In the beginning", 0), 0u);
  // The KV cache in its expanded form changes nothing: greedy and sampled text equal the full
  // recomputation's, also when the text outgrows a small context window (dropped to half and
  // re-read from position 0). The latent form (the default) equals it up to rounding only
  // (tests/model/kv_cache_latent_test.cpp); here it just has to run, through the CLI as well.
  g.max_new_tokens = 40;
  g.cache_form = KvCacheForm::kExpanded;
  for (int64_t context : {int64_t{512}, int64_t{10}})
    for (double temperature : {0.0, 0.8}) {
      g.context = context;
      g.temperature = temperature;
      g.use_cache = true;
      const std::string cached = generate_text(g);
      g.use_cache = false;
      EXPECT_EQ(generate_text(g), cached) << "context " << context << " T " << temperature;
      g.use_cache = true;
      if (context == 512 && temperature == 0.0) {
        // and through the CLI's --no-cache switch
        int status = 0;
        const std::string out =
            run_cli("generate --checkpoint " + full.out_dir +
                        " --prompt 'In the beginning' --max-new-tokens 40 --no-cache",
                    &status);
        EXPECT_EQ(status, 0) << out;
        EXPECT_EQ(out, cached + "\n");
        const std::string cli = "generate --checkpoint " + full.out_dir +
                                " --prompt 'In the beginning' --max-new-tokens 40";
        const std::string latent = run_cli(cli, &status);
        EXPECT_EQ(status, 0) << latent;
        EXPECT_EQ(latent.rfind("In the beginning", 0), 0u) << latent;
        EXPECT_EQ(run_cli(cli + " --cache-form expanded", &status), cached + "\n");
        const std::string bad = run_cli(cli + " --cache-form compressed", &status);
        EXPECT_EQ(status, 2) << bad;
        EXPECT_NE(bad.find("--cache-form: 'compressed' is not a cache form"), std::string::npos)
            << bad;
      }
    }
  g.cache_form = KvCacheForm::kLatent;
  g.context = 10;
  g.temperature = 0;
  EXPECT_EQ(generate_text(g).rfind("In the beginning", 0), 0u);
  // metrics and plot were written
  EXPECT_TRUE(std::filesystem::exists(full.out_dir + "/loss.svg"));
  std::ifstream metrics(full.out_dir + "/metrics.jsonl");
  int lines = 0;
  for (std::string l; std::getline(metrics, l);) ++lines;
  EXPECT_EQ(lines, 7);  // 6 steps + the held-out evaluation
}

TEST(Checkpoint, NoCheckpointWritesNoneAndRefusesStopAfter) {
  TrainOptions o = micro_options(fresh_dir("nockpt"));
  o.steps = 2;
  o.checkpoint = false;
  const TrainResult r = train(o);
  EXPECT_EQ(r.steps_done, 2);
  EXPECT_FALSE(std::filesystem::exists(o.out_dir + "/checkpoint.safetensors"));
  EXPECT_TRUE(std::filesystem::exists(o.out_dir + "/metrics.jsonl"));
  o.stop_after = 1;
  EXPECT_THROW(train(o), Error);
}

TEST(Checkpoint, BadCheckpointsAreRefused) {
  if (!have_sentencepiece()) GTEST_SKIP() << "built without SentencePiece";
  TrainOptions o = micro_options(fresh_dir("bad"));
  o.steps = 1;
  o.eval_batches = 0;
  train(o);
  const std::string path = o.out_dir + "/checkpoint.safetensors";
  const std::string bytes = read_file(path);
  GenerateOptions g;
  g.checkpoint_dir = o.out_dir;
  g.prompt = "And";
  // Truncated
  write_file_atomic(path, bytes.substr(0, bytes.size() / 2));
  expect_format_error([&] { generate_text(g); }, "truncated");
  o.resume = true;
  o.steps = 2;
  expect_format_error([&] { train(o); }, "truncated");
  // Foreign: a valid safetensors file that is not ours
  SafetensorsWriter w;
  const std::vector<float> a(4, 0.0f);
  w.add_f32("model.embed_tokens.weight", {2, 2}, a.data());
  w.write(path);
  expect_format_error([&] { generate_text(g); }, "not an fp8moe checkpoint");
  // Not safetensors at all
  write_file_atomic(path, "this is a text file, not a checkpoint\n");
  expect_format_error([&] { generate_text(g); }, "header length");
  // Through the CLI: exit code 2 and one line naming the file
  const std::string cmd =
      std::string(FP8MOE_CLI) + " generate --checkpoint " + o.out_dir + " --prompt And 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[512];
  while (fgets(buf, sizeof buf, p)) out += buf;
  EXPECT_EQ(WEXITSTATUS(pclose(p)), 2) << out;
  EXPECT_NE(out.find("checkpoint.safetensors"), std::string::npos) << out;
}

TEST(Checkpoint, ResumeWithAnotherConfigIsRefused) {
  if (!have_sentencepiece()) GTEST_SKIP() << "built without SentencePiece";
  TrainOptions o = micro_options(fresh_dir("cfg"));
  o.steps = 1;
  o.eval_batches = 0;
  train(o);
  o.resume = true;
  o.steps = 2;
  o.model.num_nextn_predict_layers = 0;
  try {
    train(o);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
    EXPECT_NE(e.message().find("different model config"), std::string::npos) << e.message();
  }
}

// q_lora_rank null (DeepSeek-V2-Lite's direct query projection): trains in fp8, the checkpoint
// holds HF's q_proj names, and generation reads them back, with and without the KV cache.
TEST(Checkpoint, DirectQueryProjectionTrainsSavesAndGenerates) {
  if (!have_sentencepiece()) GTEST_SKIP() << "built without SentencePiece";
  TrainOptions o = micro_options(fresh_dir("qproj"));
  Json j = o.model.to_json();
  j["q_lora_rank"] = nullptr;
  o.model = parse_model_config(j, "micro q_proj");
  o.steps = 2;
  o.eval_batches = 0;
  const TrainResult r = train(o);
  EXPECT_TRUE(std::isfinite(r.losses.back()));
  const SafetensorsFile f = SafetensorsFile::read(o.out_dir + "/checkpoint.safetensors");
  EXPECT_EQ(f.entries().count("param/model.layers.0.self_attn.q_proj.weight"), 1u);
  EXPECT_EQ(f.entries().count("param/model.layers.2.self_attn.q_proj.weight"), 1u);  // MTP
  EXPECT_EQ(f.entries().count("param/model.layers.0.self_attn.q_a_proj.weight"), 0u);
  GenerateOptions g;
  g.checkpoint_dir = o.out_dir;
  g.prompt = "And God said";
  g.max_new_tokens = 12;
  g.ignore_eos = true;
  g.cache_form = KvCacheForm::kExpanded;  // bit-identical to the recomputation
  const std::string cached = generate_text(g);
  g.use_cache = false;
  EXPECT_EQ(generate_text(g), cached);
  EXPECT_EQ(cached.rfind("And God said", 0), 0u) << cached;
}

TEST(Data, BatchesAreAPureFunctionOfSeedAndStep) {
  std::vector<int32_t> stream(1000);
  for (int i = 0; i < 1000; ++i) stream[i] = i;
  const auto a = sample_batch(stream, 3, 10, 5, 7);
  EXPECT_EQ(a, sample_batch(stream, 3, 10, 5, 7));
  EXPECT_NE(a, sample_batch(stream, 3, 10, 5, 8));
  for (int b = 0; b < 3; ++b)
    for (int i = 1; i < 10; ++i) EXPECT_EQ(a[b * 10 + i], a[b * 10] + i);
}

}  // namespace
}  // namespace fp8moe

namespace fp8moe {
namespace {

// fp8moe serve --device cpu: one JSON request a line on stdin, one line each in input order — the
// greedy completion is the generate command's text past the prompt, a sampled request runs, a bad
// key and a line that is not JSON are answered with errors naming them and the loop goes on;
// --stream's delta lines add up to the completion.
TEST(ServeCli, CpuServesJsonLines) {
  if (!have_sentencepiece()) GTEST_SKIP() << "built without SentencePiece";
  const TrainOptions o = micro_options(fresh_dir("serve"));
  train(o);
  const std::string requests = testing::TempDir() + "/fp8moe_serve_requests.jsonl";
  {
    std::ofstream f(requests);
    f << R"({"id": "g", "prompt": "In the beginning", "max_new_tokens": 12, "ignore_eos": true})"
      << "\n"
      << R"({"id": "bad", "prompt": "x", "temprature": 1})"
      << "\n"
      << R"({"id": "s", "prompt": "And God said", "max_new_tokens": 6, "temperature": 0.8, )"
      << R"("top_p": 0.9, "seed": 4, "ignore_eos": true})"
      << "\n"
      << "not json\n";
  }
  int status = 0;
  const std::string base = "serve --device cpu --checkpoint " + o.out_dir;
  const std::string out = run_cli(base + " < " + requests, &status);
  ASSERT_EQ(status, 0) << out;
  std::vector<Json> lines;
  std::istringstream in(out);
  for (std::string l; std::getline(in, l);) lines.push_back(parse_json(l, "serve output"));
  ASSERT_EQ(lines.size(), 4u) << out;
  EXPECT_EQ(lines[0]["id"], "g");
  EXPECT_EQ(lines[0]["new_tokens"], 12);
  EXPECT_EQ(lines[1]["id"], "bad");
  EXPECT_NE(lines[1]["error"].get<std::string>().find("temprature"), std::string::npos) << out;
  EXPECT_EQ(lines[2]["id"], "s");
  EXPECT_EQ(lines[2]["new_tokens"], 6);
  EXPECT_EQ(lines[3]["id"], 4);  // no id: the line number
  EXPECT_NE(lines[3]["error"].get<std::string>().find("not valid JSON"), std::string::npos) << out;
  const std::string completion = lines[0]["completion"].get<std::string>();
  const std::string text = run_cli("generate --checkpoint " + o.out_dir +
                                       " --prompt 'In the beginning' --max-new-tokens 12 "
                                       "--ignore-eos",
                                   &status);
  ASSERT_EQ(status, 0) << text;
  ASSERT_GE(text.size(), completion.size() + 1);
  EXPECT_EQ(text.substr(text.size() - 1 - completion.size(), completion.size()), completion)
      << text << " / " << completion;
  // Streamed: the deltas of "g" add up to its completion.
  const std::string streamed = run_cli(base + " --stream < " + requests, &status);
  ASSERT_EQ(status, 0) << streamed;
  std::string joined;
  std::istringstream sin(streamed);
  for (std::string l; std::getline(sin, l);) {
    const Json j = parse_json(l, "serve --stream output");
    if (j.contains("delta") && j["id"] == "g") joined += j["delta"].get<std::string>();
  }
  EXPECT_EQ(joined, completion);
}

std::string run_cli(const std::string& args, int* status) {
  const std::string cmd = "cd " + kSource + " && " + std::string(FP8MOE_CLI) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[512];
  while (fgets(buf, sizeof buf, p)) out += buf;
  *status = WEXITSTATUS(pclose(p));
  return out;
}

TEST(TrainCli, TrainsAndWritesMetricsPlotAndCheckpoint) {
  if (!have_sentencepiece()) GTEST_SKIP() << "built without SentencePiece";
  const std::string dir = fresh_dir("cli");
  int status = 0;
  const std::string out = run_cli(
      "train --config configs/tiny.json --precision bf16 --steps 2 "
      "--batch 1 --seq 16 --eval-batches 1 --out " +
          dir,
      &status);
  EXPECT_EQ(status, 0) << out;
  EXPECT_NE(out.find("step 2/2"), std::string::npos) << out;
  EXPECT_NE(out.find("bf16: final loss"), std::string::npos) << out;
  for (const char* f : {"checkpoint.safetensors", "metrics.jsonl", "loss.svg", "tokenizer.model"})
    EXPECT_TRUE(std::filesystem::exists(dir + "/" + f)) << f;
  // Bad values exit 2 with one line.
  std::string bad =
      run_cli("train --config configs/tiny.json --precision fp4 --steps 2 --out " + dir, &status);
  EXPECT_EQ(status, 2) << bad;
  EXPECT_NE(bad.find("unknown precision 'fp4'"), std::string::npos) << bad;
  bad = run_cli("train --config configs/deepseek-v3.json --steps 1 --out " + dir, &status);
  EXPECT_EQ(status, 2) << bad;
  bad = run_cli("train compare --config configs/tiny.json --steps 0 --out " + dir, &status);
  EXPECT_EQ(status, 2) << bad;
  bad = run_cli("train --config configs/tiny.json --device tpu --steps 1 --out " + dir, &status);
  EXPECT_EQ(status, 2) << bad;
  EXPECT_NE(bad.find("--device must be cpu or gpu"), std::string::npos) << bad;
}

}  // namespace
}  // namespace fp8moe
