// Serving on the GPU (serve/generator_gpu.h, serve/paged_cache_gpu.h, ModelGpu::decode) against
// the CPU Model (Precision::kFp8, its expanded KV cache) on a small V3-shaped model (2 layers: one
// dense, one MoE with 8 experts; kv_lora_rank 256; 2 heads), weights random.
// - Decode logits: two sequences (20 and 70 prompt tokens: a page boundary) prefilled in one step
//   each, then decoded together for 6 steps; every row's logits no farther from the FP32 CPU
//   model's than the CPU's own FP8 recipe is (x1.5): the GPU differs from the CPU recipe by its
//   BF16 activations (docs/model/README.md) and its latent form (the latent stays BF16: it is not
//   FP8-quantised before kv_b as in training), differences that FP8 requantisation downstream
//   amplifies to the recipe's own noise level (~10 % on this random model).
// - Consistency: one prefill of 76 tokens = a prefill of 70 and 6 decoding steps.
// - Batch invariance: with split_tokens (the default), a prompt's text alone equals its text in
//   a batch of four (three at a time: the fourth waits, then joins), greedy and sampled.
// - Bad requests: an empty prompt, a token outside the vocabulary, a cache too small for a prompt.
// Run: test_serve_gpu
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/core/json.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/kernels/mla_decode.h"
#include "fp8moe/model/config.h"
#include "fp8moe/model/model.h"
#include "fp8moe/model/model_gpu.h"
#include "fp8moe/serve/generator_gpu.h"
#include "fp8moe/serve/paged_cache_gpu.h"
#include "serve_test_support.h"

namespace fp8moe::serve {
namespace {

using test_support::greedy_sampling;
using test_support::nucleus_sampling;
using test_support::random_tokens;

// The tests' model (serve_test_support.h), no MTP module unless asked.
ModelConfig serve_config(int64_t dense_layers = 1) {
  return test_support::serve_config(0, dense_layers);
}

// A generator's options for these tests: a context of 256 tokens, max_batch sequences at once.
GeneratorOptions options(int64_t max_batch, int64_t prefill_chunk = 256) {
  GeneratorOptions o;
  o.max_batch = max_batch;
  o.context = 256;
  o.prefill_chunk = prefill_chunk;
  return o;
}

// Request r's text generated with only prompts [0, r] (so it draws from the same Philox stream,
// seed and 7 + r) equals its text in `together` (all prompts at once).
void expect_batch_invariant(GeneratorGpu& gen, const std::vector<std::vector<int32_t>>& prompts,
                            const SamplingOptions& s,
                            const std::vector<std::vector<int32_t>>& together) {
  for (size_t r = 0; r < prompts.size(); ++r) {
    const std::vector<std::vector<int32_t>> upto(prompts.begin(), prompts.begin() + r + 1);
    EXPECT_EQ(gen.generate(upto, s)[r], together[r]) << "prompt " << r;
  }
}

double rel_error(const float* got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double d = got[i] - want[i];
    num += std::isfinite(d) ? d * d : 1e30;
    den += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(num / den);
}

// A ModelGpu for decoding (128 tokens a step, RoPE for 512 positions), a paged cache for two
// sequences, and one step at a time with the batch-invariant plan.
struct DecodeRig {
  ModelGpu gpu;
  PagedLatentCacheGpu cache;
  cudaStream_t stream = nullptr;
  int32_t *ids = nullptr, *pos = nullptr;
  bf16* logits = nullptr;
  void* ws = nullptr;
  int64_t V;

  static PagedCacheOptions cache_options() {
    PagedCacheOptions co;
    co.num_pages = 16;
    co.max_pages_per_seq = 8;
    co.max_batch = 2;
    return co;
  }
  DecodeRig(const ModelConfig& cfg, Model& cpu)
      : gpu(cfg, 128, 1, ModelGpuParallel{}, 512), cache(cfg, cache_options()), V(cfg.vocab_size) {
    gpu.upload(cpu);
    gpu.reserve_decode(128);
    FM_CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    FM_CHECK_CUDA(cudaMalloc(&ids, 128 * 4));
    FM_CHECK_CUDA(cudaMalloc(&pos, 128 * 4));
    FM_CHECK_CUDA(cudaMalloc(&logits, 2 * V * 2));
    FM_CHECK_CUDA(cudaMalloc(&ws, 1 << 20));
  }
  ~DecodeRig() {
    cudaFree(ids);
    cudaFree(pos);
    cudaFree(logits);
    cudaFree(ws);
    cudaStreamDestroy(stream);
  }
  // One step over `seqs` (grown already) with `queries` new tokens each: logits [seqs, V].
  std::vector<float> step(const std::vector<int>& seqs, const std::vector<int32_t>& t,
                          const std::vector<int32_t>& p, int64_t queries,
                          bool low_latency_ep = false) {
    const auto views = cache.prepare_step(seqs, stream);
    FM_CHECK_CUDA(cudaMemcpyAsync(ids, t.data(), t.size() * 4, cudaMemcpyHostToDevice, stream));
    FM_CHECK_CUDA(cudaMemcpyAsync(pos, p.data(), p.size() * 4, cudaMemcpyHostToDevice, stream));
    const int64_t batch = static_cast<int64_t>(seqs.size());
    const auto shape = gpu.attention(0).decode_shape(batch, queries, views[0]);
    const kernels::MlaDecodePlan plan = kernels::mla_decode_plan_fixed(shape, 256);
    FM_CHECK(plan.workspace_bytes <= size_t{1} << 20, "workspace");
    gpu.decode(ids, pos, batch, queries, views, plan, ws, logits, stream, 0, false, low_latency_ep);
    std::vector<bf16> h(seqs.size() * V);
    FM_CHECK_CUDA(cudaMemcpyAsync(h.data(), logits, h.size() * 2, cudaMemcpyDeviceToHost, stream));
    FM_CHECK_CUDA(cudaStreamSynchronize(stream));
    std::vector<float> f(h.size());
    for (size_t i = 0; i < h.size(); ++i) f[i] = to_float(h[i]);
    return f;
  }
  // A new sequence with `tokens` prefilled in one step: its logits.
  std::vector<float> prefill(int* seq, const std::vector<int32_t>& tokens) {
    *seq = cache.pages().add_sequence();
    const int64_t n = static_cast<int64_t>(tokens.size());
    FM_CHECK(cache.pages().grow(*seq, n), "cache full");
    std::vector<int32_t> p(tokens.size());
    for (size_t i = 0; i < p.size(); ++i) p[i] = static_cast<int32_t>(i);
    return step({*seq}, tokens, p, n);
  }
};

// Prefill two sequences, then decode them together for 6 steps on the FP32 CPU model's greedy
// tokens. Each row's logits: the GPU's distance from the FP32 CPU model's, and the CPU FP8
// recipe's own distance from it (the FP8 rounding noise of this model: ~10 % here). Returns the
// rows where the GPU is no farther than 1.5x the recipe's noise (+1e-3); *worst = its worst.
int rows_within_recipe_noise(const ModelConfig& cfg, const char* name, int* rows, double* worst) {
  Model cpu(cfg, 3);
  DecodeRig rig(cfg, cpu);
  const int64_t V = cfg.vocab_size;
  const std::vector<int64_t> prompt_len = {20, 70};
  std::vector<KvCache> exact(2), recipe(2);
  std::vector<int> seqs(2);
  std::vector<int32_t> next(2);
  int within = 0;
  *rows = 0;
  *worst = 0;
  const auto argmax = [](const std::vector<float>& x) {
    return static_cast<int32_t>(std::max_element(x.begin(), x.end()) - x.begin());
  };
  const auto check = [&](const float* got, const std::vector<float>& fp32,
                         const std::vector<float>& fp8, const char* what, int k, int s) {
    const double e_gpu = rel_error(got, fp32), e_fp8 = rel_error(fp8.data(), fp32);
    const bool ok = e_gpu <= 1.5 * e_fp8 + 1e-3;
    std::printf("[ serve ] %s: %s %d, sequence %d: GPU vs FP32 %.3e, CPU FP8 vs FP32 %.3e%s\n",
                name, what, k, s, e_gpu, e_fp8, ok ? "" : "  <- outside");
    within += ok;
    *rows += 1;
    *worst = std::max(*worst, e_gpu);
  };
  for (int s = 0; s < 2; ++s) {
    const auto prompt = random_tokens(prompt_len[s], V, 10 + s);
    const auto got = rig.prefill(&seqs[s], prompt);
    const auto fp32 =
        cpu.next_token_logits(prompt.data(), prompt_len[s], Precision::kFp32, exact[s]);
    const auto fp8 =
        cpu.next_token_logits(prompt.data(), prompt_len[s], Precision::kFp8, recipe[s]);
    check(got.data(), fp32, fp8, "prefill", 0, s);
    next[s] = argmax(fp32);
  }
  for (int k = 0; k < 6; ++k) {
    std::vector<int32_t> p(2);
    for (int s = 0; s < 2; ++s) {
      p[s] = static_cast<int32_t>(rig.cache.pages().length(seqs[s]));
      FM_CHECK(rig.cache.pages().grow(seqs[s], p[s] + 1), "cache full");
    }
    const auto got = rig.step(seqs, next, p, 1);
    for (int s = 0; s < 2; ++s) {
      const auto fp32 = cpu.next_token_logits(&next[s], 1, Precision::kFp32, exact[s]);
      const auto fp8 = cpu.next_token_logits(&next[s], 1, Precision::kFp8, recipe[s]);
      check(got.data() + s * V, fp32, fp8, "decode step", k, s);
      next[s] = argmax(fp32);
    }
  }
  return within;
}

// The MoE exchange of a decoding step over the low-latency endpoint (one rank: the masked layout
// and MoeLayerGpu's masked path; several ranks: GeneratorGroup's tests) gives the normal one's
// bits: each step runs both ways on the same cache rows (the second rewrites what the first
// wrote), logits compared bit for bit.
TEST(ServeGpu, LowLatencyExchangeEqualsTheNormalOne) {
  const ModelConfig cfg = serve_config(0);
  Model cpu(cfg, 6);
  DecodeRig rig(cfg, cpu);
  EXPECT_FALSE(rig.gpu.has_low_latency_ep());
  EXPECT_THROW(rig.gpu.reserve_low_latency_ep(1025), Error);  // the kernels' bound
  rig.gpu.reserve_low_latency_ep(4);
  EXPECT_TRUE(rig.gpu.has_low_latency_ep());
  std::vector<int> seqs(2);
  std::vector<int32_t> next(2);
  for (int s = 0; s < 2; ++s) {
    const auto prompt = random_tokens(30 + 40 * s, cfg.vocab_size, 60 + s);
    const auto logits = rig.prefill(&seqs[s], prompt);
    next[s] = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
  for (int k = 0; k < 4; ++k) {
    std::vector<int32_t> p(2);
    for (int s = 0; s < 2; ++s) {
      p[s] = static_cast<int32_t>(rig.cache.pages().length(seqs[s]));
      FM_CHECK(rig.cache.pages().grow(seqs[s], p[s] + 1), "cache full");
    }
    const auto normal = rig.step(seqs, next, p, 1, false);
    const auto ll = rig.step(seqs, next, p, 1, true);
    ASSERT_EQ(ll, normal) << "step " << k;
    for (int s = 0; s < 2; ++s)
      next[s] = static_cast<int32_t>(
          std::max_element(ll.begin() + s * cfg.vocab_size, ll.begin() + (s + 1) * cfg.vocab_size) -
          (ll.begin() + s * cfg.vocab_size));
  }
  std::printf("[ serve ] 4 decoding steps of 2 sequences: low-latency == normal EP, bit for bit\n");
}

// The generator on one GPU takes the low-latency form for its decoding passes too
// (GeneratorOptions::low_latency_ep, the default; a prefill pass stays on the normal kernels):
// the same texts as with the option off, greedy, sampled and with the MTP draft.
TEST(ServeGpu, OneGpuLowLatencyDecodingKeepsTheText) {
  ModelConfig cfg = serve_config(1);
  cfg.num_nextn_predict_layers = 1;
  cfg.validate();
  Model cpu(cfg, 9);
  GeneratorOptions normal = options(3, 48), ll = options(3, 48);
  normal.low_latency_ep = false;
  GeneratorGpu gen_normal(cpu, normal), gen_ll(cpu, ll);
  const std::vector<std::vector<int32_t>> prompts = {
      random_tokens(5, 512, 81), random_tokens(100, 512, 82), random_tokens(33, 512, 83)};
  for (const SamplingOptions& s : {greedy_sampling(12), nucleus_sampling(12, 4)}) {
    GenerationStats st_normal, st_ll;
    const auto want = gen_normal.generate(prompts, s, &st_normal);
    EXPECT_EQ(gen_ll.generate(prompts, s, &st_ll), want) << "temperature " << s.temperature;
    EXPECT_EQ(st_normal.low_latency_passes, 0);
    // Every decoding step (a pass without a prefill) over the low-latency kernels.
    EXPECT_GT(st_ll.decode_steps, 0);
    EXPECT_GE(st_ll.low_latency_passes, st_ll.decode_steps);
  }
  gen_normal.set_mtp_draft(true);
  gen_ll.set_mtp_draft(true);
  EXPECT_EQ(gen_ll.generate(prompts, greedy_sampling(12)),
            gen_normal.generate(prompts, greedy_sampling(12)))
      << "MTP draft";
  std::printf("[ serve ] one GPU: low-latency decoding passes keep the texts\n");
}

// The same tokens through the GPU two ways: one prefill of 76, or a prefill of 70 and six
// single-token steps; the last logits agree (same form: only the GEMMs' row counts differ).
TEST(ServeGpu, StepByStepEqualsOnePrefill) {
  const ModelConfig cfg = serve_config(1);
  Model cpu(cfg, 4);
  DecodeRig rig(cfg, cpu);
  const auto tokens = random_tokens(76, cfg.vocab_size, 31);
  int a = 0, b = 0;
  const auto whole = rig.prefill(&a, tokens);
  auto last = rig.prefill(&b, std::vector<int32_t>(tokens.begin(), tokens.begin() + 70));
  for (int32_t t = 70; t < 76; ++t) {
    FM_CHECK(rig.cache.pages().grow(b, t + 1), "cache full");
    last = rig.step({b}, {tokens[t]}, {t}, 1);
  }
  const double rel = rel_error(last.data(), whole);
  std::printf("[ serve ] one prefill of 76 vs 70 + 6 steps: logits rel %.3e\n", rel);
  EXPECT_LE(rel, 1e-2);
}

// Dense layers only: every row within the recipe's noise.
TEST(ServeGpu, DecodeIsAsCloseToFp32AsTheCpuRecipeDense) {
  int rows = 0;
  double worst = 0;
  EXPECT_EQ(rows_within_recipe_noise(serve_config(2), "dense", &rows, &worst), rows);
  EXPECT_EQ(rows, 14);
}

// With an MoE layer: the top-k selection is discontinuous, so a near-tie between two experts can
// go either way under different roundings (session 23's first run, GPU against the FP8 recipe:
// one row of 14 at 0.6); the rest within the recipe's noise, and no row beyond a flipped
// expert's reach.
TEST(ServeGpu, DecodeIsAsCloseToFp32AsTheCpuRecipeMoe) {
  int rows = 0;
  double worst = 0;
  EXPECT_GE(rows_within_recipe_noise(serve_config(1), "moe", &rows, &worst), rows - 2);
  EXPECT_LT(worst, 1.0);
}

TEST(ServeGpu, TextDoesNotDependOnTheBatch) {
  const ModelConfig cfg = serve_config();
  Model cpu(cfg, 5);
  GeneratorGpu gen(cpu, options(3, 64));
  const std::vector<std::vector<int32_t>> prompts = {
      random_tokens(5, 512, 1), random_tokens(70, 512, 2), random_tokens(130, 512, 3),
      random_tokens(9, 512, 4)};
  SamplingOptions s = greedy_sampling(12);
  GenerationStats st;
  const auto together = gen.generate(prompts, s, &st);
  EXPECT_EQ(st.max_running, 3);
  EXPECT_EQ(st.prefill_tokens, 5 + 70 + 130 + 9);
  EXPECT_EQ(st.decode_tokens, 4 * 11);  // each request's first token comes from its prefill
  std::printf("[ serve ] %lld decode steps, %.1f ms prefill, %.1f ms decode\n",
              static_cast<long long>(st.decode_steps), st.prefill_s * 1e3, st.decode_s * 1e3);
  for (size_t r = 0; r < prompts.size(); ++r) {
    ASSERT_EQ(together[r].size(), 12u);
    EXPECT_EQ(gen.generate({prompts[r]}, s)[0], together[r]) << "prompt " << r;
  }
  // The decoding steps above replayed CUDA graphs (from each batch size's second step); eagerly,
  // the same kernels give the same text.
  gen.set_cuda_graphs(false);
  EXPECT_EQ(gen.generate(prompts, s), together);
}

// Sampled on the device (the default) and on the host: each batch-invariant; greedy, the device
// sampler's text is the host's.
TEST(ServeGpu, SampledTextDoesNotDependOnTheBatch) {
  const ModelConfig cfg = serve_config();
  Model cpu(cfg, 6);
  GeneratorGpu gen(cpu, options(3));
  const std::vector<std::vector<int32_t>> prompts = {
      random_tokens(7, 512, 5), random_tokens(100, 512, 6), random_tokens(33, 512, 7)};
  SamplingOptions s = greedy_sampling(10);
  const auto greedy_device = gen.generate(prompts, s);
  gen.set_device_sampling(false);
  EXPECT_EQ(gen.generate(prompts, s), greedy_device);
  s.temperature = 0.8;
  s.top_p = 0.9;
  s.seed = 21;
  for (const bool on_device : {true, false}) {
    gen.set_device_sampling(on_device);
    const auto together = gen.generate(prompts, s);
    expect_batch_invariant(gen, prompts, s, together);
  }
}

// The MTP draft keeps the greedy text: every drafted token is checked by the main model in the
// same pass that computes the next one; sampled, a request's text does not depend on its batch.
// Random weights: the module's drafts are mostly wrong, so this exercises the rejections and their
// rollback (the 300-step checkpoint of docs/serve/runs/s23-call9.sh keeps drafts as well, end to
// end through the CLI).
TEST(ServeGpu, MtpDraftKeepsTheGreedyText) {
  ModelConfig cfg = serve_config(1);
  cfg.num_nextn_predict_layers = 1;
  cfg.validate();
  Model cpu(cfg, 8);
  // The 100-token prompt in three chunks of 48, the module's cache filled beside.
  GeneratorGpu gen(cpu, options(3, 48));
  const std::vector<std::vector<int32_t>> prompts = {
      random_tokens(5, 512, 41), random_tokens(100, 512, 42), random_tokens(33, 512, 43)};
  SamplingOptions s = greedy_sampling(16);
  const auto plain = gen.generate(prompts, s);
  gen.set_mtp_draft(true);
  GenerationStats st;
  const auto drafted = gen.generate(prompts, s, &st);
  std::printf("[ serve ] MTP draft: %lld drafts, %lld kept, %lld steps\n",
              static_cast<long long>(st.drafted), static_cast<long long>(st.accepted),
              static_cast<long long>(st.decode_steps));
  EXPECT_EQ(drafted, plain);
  EXPECT_GT(st.drafted, 0);
  // Sampled: speculative sampling keeps each request's text independent of its batch (its own
  // Philox stream, its own draws), as without the draft (model/sampling.h's and
  // kernels/sampling.h's tests check the distribution of the check itself); on the device and on
  // the host. Greedy, the device's check keeps the host's text.
  gen.set_device_sampling(false);
  EXPECT_EQ(gen.generate(prompts, s), plain);
  s.temperature = 0.8;
  s.top_p = 0.9;
  s.seed = 5;
  for (const bool on_device : {true, false}) {
    gen.set_device_sampling(on_device);
    GenerationStats sampled;
    const auto together = gen.generate(prompts, s, &sampled);
    std::printf("[ serve ] MTP draft, sampled on the %s: %lld drafts, %lld kept\n",
                on_device ? "device" : "host", static_cast<long long>(sampled.drafted),
                static_cast<long long>(sampled.accepted));
    EXPECT_GT(sampled.drafted, 0);
    expect_batch_invariant(gen, prompts, s, together);
  }
}

// Prompts prefilled together (GeneratorOptions::prefill_batch): one pass over several prompts, the
// same number of new tokens each, so a prompt's chunks now depend on its neighbours' lengths —
// and still every text is the same bits as prefilling one prompt at a time (each row's GEMM,
// attention over fixed key ranges and EP exchange do not depend on the other rows): greedy and
// sampled, on the device and on the host, with the MTP draft (its cache filled beside).
TEST(ServeGpu, BatchedPrefillKeepsTheText) {
  const ModelConfig cfg = test_support::serve_config(1);  // with an MTP module
  Model cpu(cfg, 9);
  const std::vector<std::vector<int32_t>> prompts = {
      random_tokens(5, 512, 71), random_tokens(70, 512, 72), random_tokens(130, 512, 73),
      random_tokens(9, 512, 74), random_tokens(64, 512, 75), random_tokens(33, 512, 76)};
  GeneratorOptions one = options(4, 64), batched = options(4, 64), wide = options(4, 512);
  batched.prefill_batch = 4;
  wide.prefill_batch = 4;
  GeneratorGpu g1(cpu, one), gb(cpu, batched), gw(cpu, wide);
  SamplingOptions s = greedy_sampling(10);
  GenerationStats s1, sb, sw;
  const auto want = g1.generate(prompts, s, &s1);
  EXPECT_EQ(gb.generate(prompts, s, &sb), want);
  EXPECT_EQ(gw.generate(prompts, s, &sw), want);
  std::printf(
      "[ serve ] prefill passes: %lld one at a time, %lld batched (64 a pass), %lld "
      "batched (512 a pass)\n",
      static_cast<long long>(s1.prefill_steps), static_cast<long long>(sb.prefill_steps),
      static_cast<long long>(sw.prefill_steps));
  EXPECT_EQ(sw.prefill_tokens, s1.prefill_tokens);
  EXPECT_LT(sw.prefill_steps, s1.prefill_steps);
  for (GeneratorGpu* g : {&g1, &gb, &gw}) g->set_mtp_draft(true);
  const auto drafted = g1.generate(prompts, s);
  EXPECT_EQ(drafted, want);
  EXPECT_EQ(gw.generate(prompts, s), drafted);
  s.temperature = 0.8;
  s.top_p = 0.9;
  s.seed = 9;
  for (const bool on_device : {true, false}) {
    for (GeneratorGpu* g : {&g1, &gb, &gw}) g->set_device_sampling(on_device);
    for (const bool mtp : {false, true}) {
      for (GeneratorGpu* g : {&g1, &gb, &gw}) g->set_mtp_draft(mtp);
      const auto sampled = g1.generate(prompts, s);
      EXPECT_EQ(gb.generate(prompts, s), sampled) << "on_device " << on_device << " mtp " << mtp;
      EXPECT_EQ(gw.generate(prompts, s), sampled) << "on_device " << on_device << " mtp " << mtp;
    }
  }
}

// Requests arriving while others run (GeneratorGpu::serve): each with its own sampling options,
// some arriving only after a few loop iterations, two refused (an empty prompt, a token outside
// the vocabulary) without stopping the others; every request's tokens equal generate's for it
// alone with the same id and options (batch invariance), streamed one event a token.
TEST(ServeGpu, ServeEqualsGenerate) {
  const ModelConfig cfg = serve_config();
  Model cpu(cfg, 9);
  GeneratorGpu gen(cpu, options(3, 64));
  std::vector<ServeRequest> reqs;
  for (int i = 0; i < 6; ++i) {
    ServeRequest r;
    r.id = 10 + i;
    r.prompt = random_tokens(5 + 23 * i, 512, 70 + i);
    r.sampling.max_new_tokens = 6 + i;
    r.sampling.ignore_eos = true;
    r.sampling.temperature = i % 2 == 0 ? 0.0 : 0.7 + 0.1 * i;
    r.sampling.top_p = i % 3 == 0 ? 1.0 : 0.9;
    r.sampling.seed = 100 + i;
    reqs.push_back(r);
  }
  ServeRequest empty, outside;
  empty.id = 90;
  outside.id = 91;
  outside.prompt = {1, 2, 512};
  // Arrivals: two at once, then one more every third call of the source.
  size_t given = 0;
  int calls = 0, refused = 0;
  std::map<int64_t, std::vector<int32_t>> got;
  std::map<int64_t, std::string> errors;
  GenerationStats st;
  gen.serve(
      [&](ServeRequest* r, bool wait) {
        ++calls;
        if (given == 2 && refused < 2) {  // the two bad ones, after the first two
          *r = refused++ == 0 ? empty : outside;
          return Arrival::kRequest;
        }
        if (given == reqs.size()) return Arrival::kClosed;
        if (given >= 2 && calls % 3 != 0 && !wait) return Arrival::kNone;
        *r = reqs[given++];
        return Arrival::kRequest;
      },
      [&](const TokenEvent& e) {
        if (!e.error.empty()) {
          errors[e.id] = e.error;
          return;
        }
        got[e.id].push_back(e.token);
      },
      &st);
  EXPECT_EQ(errors.size(), 2u);
  EXPECT_NE(errors[90].find("empty prompt"), std::string::npos) << errors[90];
  EXPECT_NE(errors[91].find("outside the vocabulary"), std::string::npos) << errors[91];
  ASSERT_EQ(got.size(), reqs.size());
  for (const ServeRequest& r : reqs)
    EXPECT_EQ(got[r.id], gen.generate({r.prompt}, r.sampling, nullptr, {r.id})[0])
        << "request " << r.id;
  EXPECT_EQ(st.first_token_ms.size(), reqs.size());
  std::printf("[ serve ] serve(): %d source calls, %lld decoding steps, max %lld running\n", calls,
              static_cast<long long>(st.decode_steps), static_cast<long long>(st.max_running));
}

TEST(ServeGpu, RejectsBadRequests) {
  const ModelConfig cfg = serve_config();
  Model cpu(cfg, 7);
  GeneratorOptions o = options(2);
  o.num_pages = 1;
  GeneratorGpu gen(cpu, o);
  SamplingOptions s;
  EXPECT_THROW(gen.set_mtp_draft(true), Error);  // the config has no MTP module
  EXPECT_THROW(gen.generate({{}}, s), Error);
  EXPECT_THROW(gen.generate({{1, 2, 512}}, s), Error);
  try {
    gen.generate({random_tokens(130, 512, 8)}, s);
    ADD_FAILURE() << "a 130-token prompt fit one 64-token page";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot hold one prompt"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace fp8moe::serve
