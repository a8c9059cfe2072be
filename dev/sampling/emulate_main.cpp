// dev/sampling/emulate.sh's driver: the sampling kernels (src/kernels/sampling.cu, sliced into
// emulated_kernels.inc) run on host threads (emulate_shim.h) against the CPU reference: tokens,
// speculative token / kept / bonus must be equal. Random rows as the GPU test makes them.
#include <cmath>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "emulate_shim.h"
#include "emulated_kernels.inc"
#include "fp8moe/fp8/codec.h"

using namespace fp8moe;
using namespace fp8moe::kernels;

template <typename F>
void launch(int blocks, F f) {
  for (int b = 0; b < blocks; ++b) {
    emu::reset(kSampleThreads);
    std::vector<std::thread> th;
    for (int t = 0; t < kSampleThreads; ++t)
      th.emplace_back([&, t, b] {
        threadIdx.x = static_cast<unsigned>(t);
        blockIdx.x = static_cast<unsigned>(b);
        f();
      });
    for (auto& x : th) x.join();
  }
}

std::vector<bf16> rows_of(int64_t rows, int64_t vocab, int64_t ld, std::mt19937_64& rng,
                          bool special) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uni(0.0f, 1.0f);
  std::vector<bf16> x(static_cast<size_t>(rows * ld), to_bf16(std::nanf("")));
  for (int64_t r = 0; r < rows; ++r) {
    const float scale = 0.5f + 5.5f * uni(rng);
    // 1 peaked, 2 all equal, 3 one huge logit, 4 integer logits (many ties at the threshold).
    const int kind =
        special && r < 2 ? static_cast<int>(r + 2) : (r % 3 == 1 ? 1 : (r % 3 == 2 ? 4 : 0));
    for (int64_t v = 0; v < vocab; ++v) {
      float f = scale * normal(rng);
      if (kind == 1 && uni(rng) < 0.01f) f += 15.0f;
      if (kind == 2) f = 1.5f;
      if (kind == 4) f = std::round(f);
      x[r * ld + v] = to_bf16(f);
    }
    if (kind == 3) x[r * ld + rng() % vocab] = to_bf16(3.0e4f);
  }
  return x;
}
std::vector<SampleRow> params_of(int64_t rows, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> uni(0.0f, 1.0f);
  std::vector<SampleRow> p(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    p[r].seed = rng();
    p[r].stream = static_cast<uint64_t>(r);
    p[r].counter = rng() % 1000;
    if (r % 4 == 3) {
      p[r].temperature = 0;
    } else {
      p[r].temperature = 0.7f + 0.6f * uni(rng);
      p[r].top_p = r % 5 == 0 ? 1.0f : 0.3f + 0.7f * uni(rng);
    }
  }
  return p;
}

int main() {
  std::mt19937_64 rng(2024);
  long long bad = 0;
  struct Case {
    int64_t rows, vocab, ld;
  };
  for (const Case c : {Case{12, 1000, 1000}, Case{9, 1000, 1003}, Case{6, 5000, 5000},
                       Case{4, 4097, 4104}, Case{2, 129280, 129280}}) {
    const auto x = rows_of(c.rows, c.vocab, c.ld, rng, true);
    auto p = params_of(c.rows, rng);
    p[0].top_p = 0.37f;  // the all-equal row: a partial tie group
    std::vector<int32_t> got(static_cast<size_t>(c.rows), 12345), want(got.size());
    sample_rows_reference(x.data(), c.ld, c.rows, c.vocab, p.data(), want.data());
    const bool vec = c.ld % 8 == 0;
    launch(static_cast<int>(c.rows), [&] {
      sample_rows_kernel(reinterpret_cast<const uint16_t*>(x.data()), c.ld, c.vocab, vec, p.data(),
                         got.data(), nullptr);
    });
    long long mism = 0;
    for (int64_t r = 0; r < c.rows; ++r) {
      if (got[r] != want[r])
        std::printf("  row %lld: emulated %d reference %d (T %.3f top_p %.3f)\n",
                    static_cast<long long>(r), got[r], want[r], p[r].temperature, p[r].top_p);
      mism += got[r] != want[r];
    }
    std::printf("sample rows %lld vocab %lld ld %lld: mismatches %lld\n",
                static_cast<long long>(c.rows), static_cast<long long>(c.vocab),
                static_cast<long long>(c.ld), mism);
    bad += mism;
  }
  {  // row_index: 6 rows of a buffer of 12, reversed and one twice
    const auto x = rows_of(12, 1000, 1000, rng, false);
    const auto p = params_of(6, rng);
    const std::vector<int32_t> index = {11, 8, 8, 5, 2, 0};
    std::vector<int32_t> got(6, 12345), want(6);
    sample_rows_reference(x.data(), 1000, 6, 1000, p.data(), want.data(), index.data());
    launch(6, [&] {
      sample_rows_kernel(reinterpret_cast<const uint16_t*>(x.data()), 1000, 1000, true, p.data(),
                         got.data(), index.data());
    });
    long long mism = 0;
    for (int r = 0; r < 6; ++r) mism += got[r] != want[r];
    std::printf("sample rows by row_index: mismatches %lld\n", mism);
    bad += mism;
  }
  for (const Case c : {Case{12, 1000, 1000}, Case{5, 5000, 5000}, Case{1, 129280, 129280}}) {
    const int64_t n = c.rows, v = c.vocab;
    const auto t = rows_of(2 * n, v, v, rng, false);
    auto d = rows_of(n, v, v, rng, false);
    const auto p = params_of(n, rng);
    std::vector<int32_t> draft(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      if (i % 2 == 0)
        for (int64_t k = 0; k < v; ++k)
          d[i * v + k] = to_bf16(to_float(t[2 * i * v + k]) + (k % 7 == 0 ? 0.5f : 0.0f));
      SampleRow dp = p[i];
      dp.counter += 1000;
      draft[i] = sample_row_reference(d.data() + i * v, v, dp);
      if (i % 5 == 4) draft[i] = static_cast<int32_t>((i * 7919) % v);
    }
    std::vector<int32_t> tok(n, 777), kept(n, 777), bonus(n, 777);
    launch(static_cast<int>(n), [&] {
      speculative_check_kernel(reinterpret_cast<const uint16_t*>(t.data()), v, true,
                               reinterpret_cast<const uint16_t*>(d.data()), v, true, draft.data(),
                               v, p.data(), tok.data(), kept.data(), bonus.data(), nullptr);
    });
    long long mism = 0, kc = 0;
    for (int64_t i = 0; i < n; ++i) {
      const auto w = speculative_check_row_reference(t.data() + 2 * i * v, d.data() + i * v,
                                                     t.data() + (2 * i + 1) * v, v, draft[i], p[i]);
      const bool ok = tok[i] == w.token && kept[i] == w.kept && bonus[i] == w.bonus;
      if (!ok)
        std::printf("  request %lld: emulated (%d %d %d) reference (%d %d %d)\n",
                    static_cast<long long>(i), tok[i], kept[i], bonus[i], w.token, w.kept, w.bonus);
      mism += !ok;
      kc += w.kept;
    }
    std::printf("speculative requests %lld vocab %lld: kept %lld, mismatches %lld\n",
                static_cast<long long>(n), static_cast<long long>(v), kc, mism);
    bad += mism;
  }
  std::printf("%s\n", bad == 0 ? "EMULATION OK" : "EMULATION MISMATCHES");
  return bad == 0 ? 0 : 1;
}
