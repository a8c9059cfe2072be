// Prefill/decode disaggregation (serve/disaggregated_gpu.h; GeneratorGpu::prefill_only /
// decode_only, PagedLatentCacheGpu::copy_rows) on the small V3-shaped model of
// generator_gpu_test.cu (one dense and one MoE layer; random weights):
// - The handoff on one GPU: one generator prefills every prompt and writes each request's cache
//   rows (and draft row) into its own staging buffer, then a second generator decodes them all
//   (taken in turn as the batch has room): the texts equal one generator's own, bit for bit —
//   greedy, sampled, and with the MTP draft.
// - Two GPUs (skipped where one is visible): DisaggregatedGeneratorGpu, the prefilling and the
//   decoding GPU concurrently through a staging ring of 2 slots (the prefilling GPU waits for
//   free slots): the same texts.
// Run: test_serve_gpu --gtest_filter='Disaggregat*'
#include <gtest/gtest.h>

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/model/config.h"
#include "fp8moe/model/model.h"
#include "fp8moe/serve/disaggregated_gpu.h"
#include "fp8moe/serve/generator_gpu.h"
#include "serve_test_support.h"

namespace fp8moe::serve {
namespace {

using test_support::greedy_sampling;
using test_support::nucleus_sampling;
using test_support::random_tokens;

ModelConfig config_with_mtp() {
  return test_support::serve_config(1, 1, "disaggregation test config");
}

GeneratorOptions options() {
  return test_support::three_at_once();
}

std::vector<std::vector<int32_t>> five_prompts() {
  return {random_tokens(5, 512, 61), random_tokens(100, 512, 62), random_tokens(33, 512, 63),
          random_tokens(130, 512, 64), random_tokens(9, 512, 65)};
}

std::vector<SamplingOptions> samplings() {
  return {greedy_sampling(12), nucleus_sampling(12, 9)};
}

TEST(DisaggregatedGpu, HandoffOnOneGpuKeepsTheText) {
  const ModelConfig cfg = config_with_mtp();
  Model cpu(cfg, 21);
  GeneratorGpu prefiller(cpu, options()), decoder(cpu, options());
  const auto prompts = five_prompts();
  const int64_t row = prefiller.handoff_row_elems(), V = cfg.vocab_size;
  // One staging buffer a request (rows for the whole context, then its draft row).
  const int64_t slot = row * 256 + V;
  bf16* staging = nullptr;
  FM_CHECK_CUDA(cudaMalloc(&staging, static_cast<size_t>(slot * prompts.size()) * 2));
  FM_CHECK_CUDA(cudaMemset(staging, 0xFF, static_cast<size_t>(slot * prompts.size()) * 2));
  for (const bool draft : {false, true}) {
    for (GeneratorGpu* g : {&prefiller, &decoder}) g->set_mtp_draft(draft);
    for (const SamplingOptions& s : samplings()) {
      const auto want = decoder.generate(prompts, s);
      std::vector<Handoff> handed;
      std::vector<int64_t> ids = {0, 1, 2, 3, 4};
      GenerationStats pst;
      prefiller.prefill_only(
          prompts, s, ids,
          [&](const Handoff& h, const GeneratorGpu::HandoffWriter& write) {
            write(staging + h.id * slot, staging + h.id * slot + row * 256);
            handed.push_back(h);
          },
          &pst);
      ASSERT_EQ(handed.size(), prompts.size());
      size_t next = 0, released = 0;
      GenerationStats dst;
      const auto got = decoder.decode_only(
          s,
          [&](Handoff* h, const bf16** rows, const bf16** q, bool) {
            if (next == handed.size()) return false;
            *h = handed[next++];
            *rows = staging + h->id * slot;
            *q = staging + h->id * slot + row * 256;
            return true;
          },
          [&](const Handoff&) { ++released; }, &dst);
      EXPECT_EQ(released, prompts.size());
      ASSERT_EQ(got.size(), prompts.size());
      for (const auto& [id, tokens] : got)
        EXPECT_EQ(tokens, want[static_cast<size_t>(id)])
            << "request " << id << (draft ? ", MTP draft" : "")
            << (s.temperature > 0 ? ", sampled" : ", greedy");
      std::printf(
          "[ disagg ] one GPU%s%s: %zu requests handed over; %lld decoding steps, %zu "
          "token gaps\n",
          draft ? ", MTP draft" : "", s.temperature > 0 ? ", sampled" : ", greedy", handed.size(),
          static_cast<long long>(dst.decode_steps), dst.token_gap_ms.size());
      EXPECT_EQ(pst.first_token_ms.size(), prompts.size());
      EXPECT_EQ(dst.first_token_ms.size(), prompts.size());
    }
  }
  cudaFree(staging);
}

TEST(DisaggregatedGpu, TwoGpusKeepTheText) {
  int count = 0;
  FM_CHECK_CUDA(cudaGetDeviceCount(&count));
  if (count < 2) GTEST_SKIP() << "one GPU visible";
  const ModelConfig cfg = config_with_mtp();
  Model cpu(cfg, 22);
  const auto prompts = five_prompts();
  FM_CHECK_CUDA(cudaSetDevice(0));
  GeneratorGpu one(cpu, options());
  DisaggregatedGeneratorGpu dis(cpu, options(), 0, 1, 2);
  for (const bool draft : {false, true}) {
    one.set_mtp_draft(draft);
    dis.prefill().set_mtp_draft(draft);
    dis.decode().set_mtp_draft(draft);
    for (const SamplingOptions& s : samplings()) {
      FM_CHECK_CUDA(cudaSetDevice(0));
      const auto want = one.generate(prompts, s);
      GenerationStats pst, dst;
      EXPECT_EQ(dis.generate(prompts, s, &pst, &dst), want)
          << (draft ? "MTP draft, " : "") << (s.temperature > 0 ? "sampled" : "greedy");
      std::printf("[ disagg ] two GPUs%s%s: prefill %.1f ms, %lld decoding steps\n",
                  draft ? ", MTP draft" : "", s.temperature > 0 ? ", sampled" : ", greedy",
                  pst.prefill_s * 1e3, static_cast<long long>(dst.decode_steps));
    }
  }
}

TEST(DisaggregatedGpu, RejectsBadSetups) {
  const ModelConfig cfg = config_with_mtp();
  Model cpu(cfg, 23);
  EXPECT_THROW(DisaggregatedGeneratorGpu(cpu, options(), 0, 0), Error);
  EXPECT_THROW(DisaggregatedGeneratorGpu(cpu, options(), 0, 1000), Error);
  GeneratorOptions host = options();
  host.device_sampling = false;
  GeneratorGpu g(cpu, host);
  SamplingOptions s;
  EXPECT_THROW(g.prefill_only({random_tokens(5, 512, 1)}, s, {0},
                              [](const Handoff&, const GeneratorGpu::HandoffWriter&) {}),
               Error);
}

}  // namespace
}  // namespace fp8moe::serve
