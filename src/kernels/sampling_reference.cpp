// CPU reference of token sampling (kernels/sampling.h): the kernel's float operations in the
// kernel's order (threads, warps, butterflies emulated by loops), so its tokens equal the GPU's
// bit for bit. Compiled with -ffp-contract=off (src/CMakeLists.txt).
// Tested by tests/kernels/sampling_test.cpp (`test_kernels --gtest_filter='SamplingReference*'`);
// the GPU tests (sampling_gpu_test.cu) compare against it.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/kernels/sampling.h"
#include "sampling_math.h"

namespace fp8moe::kernels {
namespace {

using namespace sampling;

// The xor butterfly of 32 lanes; lane 0's value.
float butterfly(float (&a)[32]) {
  for (int off = 16; off >= 1; off /= 2) {
    float b[32];
    for (int l = 0; l < 32; ++l) b[l] = fl_add(a[l], a[l ^ off]);
    std::memcpy(a, b, sizeof(b));
  }
  return a[0];
}

// The block sum over kThreads values (kernels/sampling.h's tree).
float block_tree(const float* v) {
  float warp_sums[32] = {};
  for (int w = 0; w < kWarps; ++w) {
    // NOTE: a warp of +0 values sums to +0 whatever the tree (a shortcut for short rows).
    if (std::all_of(v + w * 32, v + w * 32 + 32, [](float x) { return float_to_bits(x) == 0; }))
      continue;
    float lanes[32];
    std::memcpy(lanes, v + w * 32, sizeof(lanes));
    warp_sums[w] = butterfly(lanes);
  }
  return butterfly(warp_sums);
}

struct Row {
  const uint16_t* bits;
  int64_t vocab;
  uint32_t at(int64_t id) const { return bits[id]; }
};

struct RowMax {
  bool bad = false;
  uint32_t key = 0;
  int64_t id = 0;
};
RowMax row_max(const Row& row) {
  RowMax r;
  for (int64_t v = 0; v < row.vocab; ++v) {
    const uint32_t b = row.at(v);
    r.bad = r.bad || bad_logit(b);
    const uint32_t k = logit_key(b);
    if (v == 0 || k > r.key) {
      r.key = k;
      r.id = v;
    }
  }
  r.bad = r.bad || r.key == kKeyMinusInf;
  return r;
}

Nucleus find_nucleus(const Row& row, const RowMax& mx, float temperature, float top_p) {
  Nucleus nu;
  nu.m = key_value(mx.key);
  nu.scale = weight_scale(temperature);
  if (top_p >= 1.0f) return nu;
  nu.all = false;
  // Radix search over the 16-bit keys, 4 bits a pass.
  uint32_t prefix = 0;
  float above = 0, target = 0;
  std::vector<float> suffix(static_cast<size_t>(kDigits * kThreads));
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 12 - 4 * pass;
    for (int t = 0; t < kThreads; ++t) {
      float acc[kDigits] = {};
      for (int64_t base = int64_t{kVec} * t; base < row.vocab; base += kTile)
        for (int j = 0; j < kVec && base + j < row.vocab; ++j) {
          const uint32_t b = row.at(base + j);
          const uint32_t k = logit_key(b);
          if ((k >> (shift + 4)) != prefix) continue;
          float& a = acc[(k >> shift) & 15];
          a = fl_add(a, weight(bf16_bits_value(b), nu.m, nu.scale));
        }
      float s = acc[kDigits - 1];
      suffix[(kDigits - 1) * kThreads + t] = s;
      for (int c = kDigits - 2; c >= 0; --c) {
        s = fl_add(s, acc[c]);
        suffix[c * kThreads + t] = s;
      }
    }
    float mass[kDigits];
    for (int c = 0; c < kDigits; ++c)
      mass[c] = fl_add(above, block_tree(suffix.data() + c * kThreads));
    if (pass == 0) target = fl_mul(top_p, mass[0]);
    int digit = 0;
    for (int c = kDigits - 1; c >= 0; --c)
      if (mass[c] >= target) {
        digit = c;
        break;
      }
    if (digit < kDigits - 1) above = mass[digit + 1];
    prefix = (prefix << 4) | static_cast<uint32_t>(digit);
  }
  nu.kstar = prefix;
  // The threshold key's tokens: the lowest ids first.
  const int32_t keep = tie_keep(target, above, weight(key_value(prefix), nu.m, nu.scale));
  nu.cut = row.vocab;
  int64_t seen = 0;
  for (int64_t v = 0; v < row.vocab; ++v)
    if (logit_key(row.at(v)) == prefix && ++seen == keep) {
      nu.cut = v;
      break;
    }
  return nu;
}

// The draw over per-token values val(id) (0 past the vocabulary): segment masses, tile masses,
// the total, then the pick from tile down to token. total_only: returns -1 after *total.
template <typename Val>
int64_t draw(int64_t vocab, const Val& val, float u, float* total, bool total_only) {
  const int tiles = static_cast<int>((vocab + kTile - 1) / kTile);
  auto chunks_of = [&](int seg, float(&chunks)[32], float(&vals)[32][kVec]) {
    const int64_t seg_base = int64_t{seg} * kSegment;
    for (int l = 0; l < 32; ++l) {
      float c = 0;
      for (int j = 0; j < kVec; ++j) {
        const int64_t id = seg_base + l * kVec + j;
        vals[l][j] = id < vocab ? val(id) : 0.0f;
        c = fl_add(c, vals[l][j]);
      }
      chunks[l] = c;
    }
  };
  std::vector<float> seg(static_cast<size_t>(tiles * kSegsPerTile)), tile(tiles);
  float vals[32][kVec];
  for (int s = 0; s < tiles * kSegsPerTile; ++s) {
    if (int64_t{s} * kSegment >= vocab) continue;  // all +0: the butterfly gives +0
    float chunks[32];
    chunks_of(s, chunks, vals);
    seg[s] = butterfly(chunks);
  }
  float c = 0;
  for (int i = 0; i < tiles; ++i) {
    float g = 0;
    for (int k = 0; k < kSegsPerTile; ++k) g = fl_add(g, seg[i * kSegsPerTile + k]);
    tile[i] = g;
  }
  for (int i = 0; i < tiles; ++i) c = fl_add(c, tile[i]);
  *total = c;
  if (total_only) return -1;
  float r = fl_mul(u, c);
  const int ti = pick(tile.data(), tiles, r);
  const int si = ti * kSegsPerTile + pick(seg.data() + ti * kSegsPerTile, kSegsPerTile, r);
  float chunks[32];
  chunks_of(si, chunks, vals);
  const int lane = pick(chunks, 32, r);
  const int j = pick(vals[lane], kVec, r);
  return int64_t{si} * kSegment + lane * kVec + j;
}

void check_params(const char* who, int64_t vocab, const SampleRow& p) {
  FM_CHECK_ARG(vocab > 0 && vocab <= kMaxVocab, who, ": vocab=", vocab, " must lie in [1, ",
               kMaxVocab, "]");
  FM_CHECK_ARG(p.temperature >= 0, who, ": temperature=", p.temperature,
               " must be >= 0 (0: greedy)");
  FM_CHECK_ARG(p.top_p > 0 && p.top_p <= 1, who, ": top_p=", p.top_p, " must lie in (0, 1]");
}

Row as_row(const bf16* logits, int64_t vocab) {
  return Row{reinterpret_cast<const uint16_t*>(logits), vocab};
}

// A row's token given its maximum (sampling: the draw with the uniform at `counter`).
int32_t sample_one(const Row& row, const RowMax& mx, const SampleRow& p, uint64_t counter) {
  if (mx.bad) return kSampleBadLogits;
  if (p.temperature == 0) return static_cast<int32_t>(mx.id);
  const Nucleus nu = find_nucleus(row, mx, p.temperature, p.top_p);
  float total = 0;
  const float u = philox_uniform(p.seed, p.stream, counter);
  return static_cast<int32_t>(draw(
      row.vocab, [&](int64_t id) { return nu.wk(row.at(id), id); }, u, &total, false));
}

}  // namespace

int32_t sample_row_reference(const bf16* logits, int64_t vocab, const SampleRow& params) {
  check_params("sample_row_reference", vocab, params);
  const Row row = as_row(logits, vocab);
  return sample_one(row, row_max(row), params, params.counter);
}

void sample_rows_reference(const bf16* logits, int64_t ld, int64_t rows, int64_t vocab,
                           const SampleRow* params, int32_t* tokens, const int32_t* row_index) {
  FM_CHECK_ARG(rows >= 0, "sample_rows_reference: rows=", rows, " must not be negative");
  FM_CHECK_ARG(ld >= vocab, "sample_rows_reference: ld=", ld, " must be >= vocab=", vocab);
  for (int64_t r = 0; r < rows; ++r)
    tokens[r] =
        sample_row_reference(logits + (row_index ? row_index[r] : r) * ld, vocab, params[r]);
}

void sample_row_probs_reference(const bf16* logits, int64_t vocab, const SampleRow& params,
                                std::vector<double>& probs) {
  check_params("sample_row_probs_reference", vocab, params);
  probs.clear();
  const Row row = as_row(logits, vocab);
  const RowMax mx = row_max(row);
  if (mx.bad) return;
  probs.assign(static_cast<size_t>(vocab), 0.0);
  if (params.temperature == 0) {
    probs[mx.id] = 1;
    return;
  }
  const Nucleus nu = find_nucleus(row, mx, params.temperature, params.top_p);
  float total = 0;
  draw(
      vocab, [&](int64_t id) { return nu.wk(row.at(id), id); }, 0.0f, &total, true);
  for (int64_t v = 0; v < vocab; ++v) probs[v] = static_cast<double>(nu.wk(row.at(v), v)) / total;
}

SpecResult speculative_check_row_reference(const bf16* p_row, const bf16* q_row,
                                           const bf16* bonus_row, int64_t vocab, int32_t draft,
                                           const SampleRow& params) {
  check_params("speculative_check_row_reference", vocab, params);
  FM_CHECK_ARG(draft >= 0 && draft < vocab, "speculative_check_row_reference: draft=", draft,
               " outside [0, ", vocab, ")");
  SpecResult out;
  const Row p = as_row(p_row, vocab), q = as_row(q_row, vocab), b = as_row(bonus_row, vocab);
  const RowMax pm = row_max(p), qm = row_max(q);
  if (pm.bad || qm.bad) {
    out.token = kSampleBadLogits;
    return out;
  }
  const auto bonus = [&] { return sample_one(b, row_max(b), params, params.counter + 2); };
  if (params.temperature == 0) {
    out.kept = pm.id == draft;
    out.token = static_cast<int32_t>(pm.id);
    if (out.kept) out.bonus = bonus();
    return out;
  }
  const Nucleus pn = find_nucleus(p, pm, params.temperature, params.top_p);
  const Nucleus qn = find_nucleus(q, qm, params.temperature, params.top_p);
  auto pw = [&](int64_t id) { return pn.wk(p.at(id), id); };
  auto qw = [&](int64_t id) { return qn.wk(q.at(id), id); };
  float cp = 0, cq = 0;
  draw(vocab, pw, 0.0f, &cp, true);
  draw(vocab, qw, 0.0f, &cq, true);
  const float inv_p = fl_div(1.0f, cp), inv_q = fl_div(1.0f, cq);
  const float pd = fl_mul(pw(draft), inv_p), qd = fl_mul(qw(draft), inv_q);
  bool kept = false;
  if (qd > 0.0f) {
    const float ratio = fl_div(pd, qd);
    kept = ratio >= 1.0f || philox_uniform(params.seed, params.stream, params.counter) < ratio;
  }
  int64_t token = draft;
  if (!kept) {
    auto res = [&](int64_t id) {
      const float d = fl_sub(fl_mul(pw(id), inv_p), fl_mul(qw(id), inv_q));
      return d > 0.0f ? d : 0.0f;
    };
    float cr = 0;
    draw(vocab, res, 0.0f, &cr, true);
    if (cr > 0.0f)
      token = draw(vocab, res, philox_uniform(params.seed, params.stream, params.counter + 1), &cr,
                   false);
    else
      kept = true;
  }
  out.token = static_cast<int32_t>(token);
  out.kept = kept;
  if (kept) out.bonus = bonus();
  return out;
}

}  // namespace fp8moe::kernels
