// CPU emulation of quantize_transpose_bf16_kernel (src/kernels/sm90_fp8_quantize.cu), thread by
// thread: the same index arithmetic, the swizzled shared tile, 8-lane shuffles as group maxima,
// cvt e4m3x2 as float_to_e4m3_bits (equal for every finite float:
// SwigluGpu.HardwareE4m3MatchesCodec),
// __fdiv_rn as IEEE '/', __fmul_rn(x, __frcp_rn(s)) as x * (1.0f / s). Checks against the CPU
// fp8moe::quantize (both copies, both layouts, pow2 on/off) bit for bit, that every shared word
// and output byte is written exactly once, and that the shared accesses are bank-conflict-free.
// Build (s19-qt): g++ -std=c++20 -O2 -Iinclude dev/quantize/s19_qt_emulate.cpp
//   build-bundle/src/libfp8moe_fp8.a build-bundle/src/libfp8moe_core.a -o /tmp/qt_emu &&
//   /tmp/qt_emu
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <set>
#include <vector>

#include "fp8moe/fp8/codec.h"
#include "fp8moe/fp8/quantize.h"

using namespace fp8moe;

namespace {
constexpr float kMax = 448.0f;
int failures = 0;
#define CHECK(c, ...)                                \
  do {                                               \
    if (!(c)) {                                      \
      if (++failures < 20) std::printf(__VA_ARGS__); \
    }                                                \
  } while (0)

float scale_for_amax(float amax, bool pow2) {
  float s = amax > 0.0f ? std::fmax(amax / kMax, FLT_MIN) : 1.0f;
  if (pow2) s = round_up_pow2(s);
  return s;
}
uint8_t enc(float v, float scale, float inv, bool pow2) {
  return float_to_e4m3_bits(pow2 ? v * inv : v / scale);
}
int64_t pad4(int64_t x) {
  return (x + 3) / 4 * 4;
}
int64_t sidx(bool mn, int64_t row, int64_t tile, int64_t rows, int64_t tiles) {
  return mn ? tile * pad4(rows) + row : row * tiles + tile;
}
int swz(int rr, int w) {
  return rr * 64 + (w ^ (((rr >> 4) & 7) << 2));
}

void run(int64_t rows, int64_t cols, bool pow2, bool mn, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_real_distribution<float> lm(-20.0f, 20.0f);
  std::vector<uint16_t> xb(rows * cols);
  for (int64_t r = 0; r < rows; ++r) {
    const float mag = r % 11 == 3 ? 0.0f : std::exp2(lm(rng));
    for (int64_t c = 0; c < cols; ++c)
      xb[r * cols + c] = float_to_bf16_bits(nd(rng) * mag * (c % 37 == 1 ? 300.0f : 1.0f));
  }
  std::vector<float> xf(xb.size()), xt(xb.size());
  for (size_t i = 0; i < xb.size(); ++i) xf[i] = bf16_bits_to_float(xb[i]);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) xt[c * rows + r] = xf[r * cols + c];
  const QuantizedMatrix want =
      quantize(xf.data(), rows, cols, cols, ScaleGranularity::k1x128, {pow2});
  const QuantizedMatrix want_t =
      quantize(xt.data(), cols, rows, rows, ScaleGranularity::k1x128, {pow2});
  const std::vector<float> ws = mn ? scales_mn_major(want) : want.scales;
  const std::vector<float> wst = mn ? scales_mn_major(want_t) : want_t.scales;

  std::vector<uint8_t> codes(rows * cols, 0xAB), codes_t(rows * cols, 0xAB);
  std::vector<int> wc(rows * cols, 0), wct(rows * cols, 0);
  std::vector<float> scales(ws.size(), -7.0f), scales_t(wst.size(), -7.0f);
  const int64_t tiles_c = (cols + 127) / 128, tiles_r = (rows + 127) / 128;
  for (int64_t by = 0; by < tiles_r; ++by)
    for (int64_t bx = 0; bx < tiles_c; ++bx) {
      const int64_t r0 = by * 128, c0 = bx * 128;
      std::vector<uint32_t> tile(128 * 64, 0xDEADBEEF);
      std::vector<int> tw(128 * 64, 0);
      // phase 1
      for (int p = 0; p < 4; ++p) {
        float v[256][16];
        float amax[256];
        for (int t = 0; t < 256; ++t) {
          const int l = t % 8, rr = 32 * p + t / 8;
          const int64_t r = r0 + rr;
          amax[t] = 0.0f;
          for (int h = 0; h < 2; ++h) {
            const int64_t c = c0 + 64 * h + 8 * l;
            uint32_t w[4] = {0, 0, 0, 0};
            if (r < rows && c < cols)
              for (int i = 0; i < 4; ++i)
                w[i] = xb[r * cols + c + 2 * i] | (uint32_t{xb[r * cols + c + 2 * i + 1]} << 16);
            for (int i = 0; i < 4; ++i) {
              v[t][8 * h + 2 * i] = bits_to_float(w[i] << 16);
              v[t][8 * h + 2 * i + 1] = bits_to_float(w[i] & 0xFFFF0000u);
              tile[swz(rr, 32 * h + 4 * l) + i] = w[i];
              tw[swz(rr, 32 * h + 4 * l) + i]++;
            }
          }
          for (int i = 0; i < 16; ++i) amax[t] = std::fmax(amax[t], std::fabs(v[t][i]));
        }
        // quarter-warp store banks (uint4 store: 8 lanes a phase)
        for (int q = 0; q < 32; ++q)
          for (int h = 0; h < 2; ++h) {
            std::set<int> banks;
            for (int k = 0; k < 8; ++k) {
              const int t = 8 * q + k, rr = 32 * p + t / 8;
              for (int i = 0; i < 4; ++i) banks.insert((swz(rr, 32 * h + 4 * (t % 8)) + i) % 32);
            }
            CHECK(banks.size() == 32, "store bank conflict\n");
          }
        for (int t = 0; t < 256; ++t) {
          float m = 0.0f;
          for (int k = 0; k < 8; ++k) m = std::fmax(m, amax[(t & ~7) + k]);
          const int l = t % 8;
          const int64_t r = r0 + 32 * p + t / 8;
          if (r >= rows) continue;
          const float s = scale_for_amax(m, pow2), inv = 1.0f / s;
          for (int h = 0; h < 2; ++h) {
            const int64_t c = c0 + 64 * h + 8 * l;
            if (c < cols)
              for (int i = 0; i < 8; ++i) {
                codes[r * cols + c + i] = enc(v[t][8 * h + i], s, inv, pow2);
                wc[r * cols + c + i]++;
              }
          }
          if (l == 0) scales[sidx(mn, r, bx, rows, tiles_c)] = s;
        }
      }
      for (int i = 0; i < 128 * 64; ++i)
        CHECK(tw[i] == 1, "smem word %d written %d times\n", i, tw[i]);
      // phase 2
      for (int p = 0; p < 2; ++p) {
        float a[256][16], b[256][16], ma[256], mb[256];
        for (int warp = 0; warp < 8; ++warp)
          for (int i = 0; i < 16; ++i) {
            std::set<int> banks;
            for (int lane = 0; lane < 32; ++lane) {
              const int t = 32 * warp + lane;
              banks.insert(swz(16 * (t % 8) + i, 32 * p + t / 8) % 32);
            }
            CHECK(banks.size() == 32, "read bank conflict\n");
          }
        for (int t = 0; t < 256; ++t) {
          const int g = t % 8, wp = 32 * p + t / 8;
          ma[t] = mb[t] = 0.0f;
          for (int i = 0; i < 16; ++i) {
            const uint32_t w = tile[swz(16 * g + i, wp)];
            a[t][i] = bits_to_float(w << 16);
            b[t][i] = bits_to_float(w & 0xFFFF0000u);
            ma[t] = std::fmax(ma[t], std::fabs(a[t][i]));
            mb[t] = std::fmax(mb[t], std::fabs(b[t][i]));
          }
        }
        for (int t = 0; t < 256; ++t) {
          float xa = 0.0f, xb2 = 0.0f;
          for (int k = 0; k < 8; ++k) {
            xa = std::fmax(xa, ma[(t & ~7) + k]);
            xb2 = std::fmax(xb2, mb[(t & ~7) + k]);
          }
          const int g = t % 8, wp = 32 * p + t / 8;
          const int64_t c = c0 + 2 * wp, r = r0 + 16 * g;
          if (c >= cols) continue;
          const float sa = scale_for_amax(xa, pow2), sb = scale_for_amax(xb2, pow2);
          if (r < rows)
            for (int i = 0; i < 16; ++i) {
              codes_t[c * rows + r + i] = enc(a[t][i], sa, 1.0f / sa, pow2);
              codes_t[(c + 1) * rows + r + i] = enc(b[t][i], sb, 1.0f / sb, pow2);
              wct[c * rows + r + i]++;
              wct[(c + 1) * rows + r + i]++;
            }
          if (g == 0) {
            scales_t[sidx(mn, c, by, cols, tiles_r)] = sa;
            scales_t[sidx(mn, c + 1, by, cols, tiles_r)] = sb;
          }
        }
      }
      if (mn)
        for (int t = 0; t < 4; ++t) {
          const int64_t pr = rows + t;
          if (by == tiles_r - 1 && pr < pad4(rows)) scales[sidx(mn, pr, bx, rows, tiles_c)] = 0.0f;
          const int64_t pc = cols + t;
          if (bx == tiles_c - 1 && pc < pad4(cols))
            scales_t[sidx(mn, pc, by, cols, tiles_r)] = 0.0f;
        }
    }
  for (size_t i = 0; i < codes.size(); ++i) {
    CHECK(wc[i] == 1 && wct[i] == 1, "byte %zu written %d / %d times\n", i, wc[i], wct[i]);
    CHECK(codes[i] == want.codes[i], "%lldx%lld codes[%zu] %02x want %02x\n", (long long)rows,
          (long long)cols, i, codes[i], want.codes[i]);
    CHECK(codes_t[i] == want_t.codes[i], "%lldx%lld codes_t[%zu] %02x want %02x\n", (long long)rows,
          (long long)cols, i, codes_t[i], want_t.codes[i]);
  }
  CHECK(std::memcmp(scales.data(), ws.data(), 4 * ws.size()) == 0, "scales differ\n");
  CHECK(std::memcmp(scales_t.data(), wst.data(), 4 * wst.size()) == 0, "scales_t differ\n");
}
}  // namespace

int main() {
  const int64_t shapes[][2] = {{64, 7168}, {128, 2112}, {96, 264},  {256, 1024},
                               {272, 304}, {16, 8},     {384, 640}, {1024, 1536}};
  uint64_t seed = 1;
  for (auto& s : shapes)
    for (bool pow2 : {false, true})
      for (bool mn : {false, true}) run(s[0], s[1], pow2, mn, seed++);
  std::printf("%s (%d failures)\n", failures == 0 ? "PASS" : "FAIL", failures);
  return failures == 0 ? 0 : 1;
}
