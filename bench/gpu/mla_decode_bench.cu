// MLA's decoding attention in latent form (kernels::mla_decode: wgmma FlashDecoding over a paged
// BF16 cache) against the naive anchor (kernels::mla_decode_naive: one CTA a query row, FP32 CUDA
// cores), same run, same inputs. Shapes: V3's attention (128 heads, latent 512 + rope 64) at
// batch x context from one long sequence to 128 sequences, one query a sequence and two (MTP /
// speculative decoding); small-gpu's (8 heads, latent 256).
// Timing: CUDA events around `iters` launches rotating over enough input sets that L2 (50 MB)
// does not hold the cache between launches (a decode step meets each layer's cache cold), median
// of `rounds`. TFLOPS = 2 x rows x keys x (latent + rope + latent) / time; GB/s = the cache rows
// read (each sequence's keys once) + queries + outputs over time. rel_err: sequence 0's output
// against the CPU reference (kernels::mla_decode_reference).
// Prints a table; --out appends the rows as JSON lines.
// Run: mla_decode_bench [--out rows.jsonl] [--iters 20] [--rounds 5] [--date D] [--commit C]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "bench_common.cuh"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/kernels/mla_decode.h"

namespace {

using namespace fp8moe;

__global__ void fill_bf16(__nv_bfloat16* x, int64_t n, uint64_t seed, float amplitude) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint32_t bits = philox_u32(seed, 3, static_cast<uint64_t>(i));
  x[i] =
      __float2bfloat16((static_cast<float>(bits >> 8) * (1.0f / 16777216.0f) - 0.5f) * amplitude);
}

struct Case {
  const char* name;
  int64_t batch, seq_len, queries, heads, latent;
};

// One input set: queries, a paged cache of `batch` sequences of seq_len keys (pages in order).
struct InputSet {
  bf16 *q = nullptr, *cache = nullptr;
  int32_t *table = nullptr, *lens = nullptr;
};

InputSet make_set(const kernels::MlaDecodeShape& s, int64_t seq_len, uint64_t seed) {
  InputSet x;
  const int64_t pages = s.batch * s.max_pages, D = s.key_dim();
  const int64_t nq = s.batch * s.rows() * D, nc = pages * s.page_tokens * D;
  FM_CHECK_CUDA(cudaMalloc(&x.q, static_cast<size_t>(nq) * 2));
  FM_CHECK_CUDA(cudaMalloc(&x.cache, static_cast<size_t>(nc) * 2));
  fill_bf16<<<static_cast<unsigned>((nq + 255) / 256), 256>>>(reinterpret_cast<__nv_bfloat16*>(x.q),
                                                              nq, seed, 1.0f);
  fill_bf16<<<static_cast<unsigned>((nc + 255) / 256), 256>>>(
      reinterpret_cast<__nv_bfloat16*>(x.cache), nc, seed + 1, 3.4f);
  FM_CHECK_CUDA(cudaGetLastError());
  std::vector<int32_t> table(static_cast<size_t>(pages)),
      lens(static_cast<size_t>(s.batch), static_cast<int32_t>(seq_len));
  for (int64_t i = 0; i < pages; ++i) table[i] = static_cast<int32_t>(i);
  FM_CHECK_CUDA(cudaMalloc(&x.table, table.size() * 4));
  FM_CHECK_CUDA(cudaMalloc(&x.lens, lens.size() * 4));
  FM_CHECK_CUDA(cudaMemcpy(x.table, table.data(), table.size() * 4, cudaMemcpyHostToDevice));
  FM_CHECK_CUDA(cudaMemcpy(x.lens, lens.data(), lens.size() * 4, cudaMemcpyHostToDevice));
  return x;
}

void free_set(InputSet& x) {
  cudaFree(x.q);
  cudaFree(x.cache);
  cudaFree(x.table);
  cudaFree(x.lens);
}

// Sequence 0's output against the CPU reference.
double rel_err_seq0(const kernels::MlaDecodeShape& s, const InputSet& x, const bf16* out) {
  kernels::MlaDecodeShape one = s;
  one.batch = 1;
  const int64_t D = s.key_dim(), rows = s.rows();
  int32_t len = 0;
  FM_CHECK_CUDA(cudaMemcpy(&len, x.lens, 4, cudaMemcpyDeviceToHost));
  std::vector<bf16> q16(static_cast<size_t>(rows * D)),
      c16(static_cast<size_t>(s.max_pages * s.page_tokens * D)),
      o16(static_cast<size_t>(rows * s.latent_dim));
  FM_CHECK_CUDA(cudaMemcpy(q16.data(), x.q, q16.size() * 2, cudaMemcpyDeviceToHost));
  FM_CHECK_CUDA(cudaMemcpy(c16.data(), x.cache, c16.size() * 2, cudaMemcpyDeviceToHost));
  FM_CHECK_CUDA(cudaMemcpy(o16.data(), out, o16.size() * 2, cudaMemcpyDeviceToHost));
  std::vector<float> q(q16.size()), c(c16.size()), ref(o16.size()), lse(static_cast<size_t>(rows));
  for (size_t i = 0; i < q.size(); ++i) q[i] = to_float(q16[i]);
  for (size_t i = 0; i < c.size(); ++i) c[i] = to_float(c16[i]);
  std::vector<int32_t> table(static_cast<size_t>(s.max_pages));
  for (size_t i = 0; i < table.size(); ++i) table[i] = static_cast<int32_t>(i);
  kernels::mla_decode_reference(one, q.data(), c.data(), table.data(), &len, ref.data(),
                                lse.data());
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double d = to_float(o16[i]) - ref[i];
    num += std::isfinite(d) ? d * d : 1e30;
    den += static_cast<double>(ref[i]) * ref[i];
  }
  return std::sqrt(num / den);
}

void run_case(const bench::BenchOptions& o, FILE* f, const Case& c, const std::string& gpu,
              int sms) {
  kernels::MlaDecodeShape s;
  s.batch = c.batch;
  s.queries = c.queries;
  s.heads = c.heads;
  s.latent_dim = c.latent;
  s.rope_dim = 64;
  s.page_tokens = 64;
  s.max_pages = (c.seq_len + 63) / 64;
  s.softmax_scale = 0.1352f;
  const kernels::MlaDecodePlan plan = kernels::mla_decode_plan(s, sms);
  const double cache_bytes = 2.0 * c.batch * c.seq_len * s.key_dim();
  const int sets = static_cast<int>(std::clamp<double>(std::ceil(200e6 / cache_bytes), 1, 8));
  std::vector<InputSet> in;
  for (int i = 0; i < sets; ++i) in.push_back(make_set(s, c.seq_len, 1000 + 17 * i));
  bf16* out = nullptr;
  float* lse = nullptr;
  void* ws = nullptr;
  FM_CHECK_CUDA(cudaMalloc(&out, static_cast<size_t>(s.batch * s.rows() * s.latent_dim) * 2));
  FM_CHECK_CUDA(cudaMalloc(&lse, static_cast<size_t>(s.batch * s.rows()) * 4));
  FM_CHECK_CUDA(cudaMalloc(&ws, std::max<size_t>(plan.workspace_bytes, 16)));
  const double flops = 2.0 * c.batch * s.rows() * c.seq_len * (s.key_dim() + s.latent_dim);
  const double bytes = cache_bytes + 2.0 * c.batch * s.rows() * (s.key_dim() + s.latent_dim);
  double us[2], err[2];
  for (int impl = 0; impl < 2; ++impl) {
    const auto launch = [&](int i) {
      if (impl == 0)
        kernels::mla_decode(s, plan, in[i].q, in[i].cache, in[i].table, in[i].lens, out, lse, ws,
                            nullptr);
      else
        kernels::mla_decode_naive(s, in[i].q, in[i].cache, in[i].table, in[i].lens, out, lse,
                                  nullptr);
    };
    bench::BenchOptions oi = o;
    if (impl == 1) oi.iters = std::max(1, std::min(o.iters, 3));  // the anchor is slow
    us[impl] = bench::median_us(oi, sets, launch);
    launch(0);
    FM_CHECK_CUDA(cudaDeviceSynchronize());
    err[impl] = rel_err_seq0(s, in[0], out);
  }
  const char* impls[2] = {"fp8moe", "naive"};
  for (int i = 0; i < 2; ++i) {
    const double tflops = flops / us[i] * 1e-6, gbps = bytes / us[i] * 1e-3;
    std::printf("%-20s %5lld %6lld %2lld %4lld %4lld %-7s %3lld %10.1f %8.1f %8.1f %8.2fx %.2e\n",
                c.name, static_cast<long long>(c.batch), static_cast<long long>(c.seq_len),
                static_cast<long long>(c.queries), static_cast<long long>(c.heads),
                static_cast<long long>(c.latent), impls[i],
                static_cast<long long>(i == 0 ? plan.splits : 1), us[i], tflops, gbps,
                us[1] / us[i], err[i]);
    if (f != nullptr)
      std::fprintf(f,
                   "{\"bench\":\"mla_decode\",\"gpu\":\"%s\",\"gpus\":1,\"date\":\"%s\","
                   "\"commit\":\"%s\",\"impl\":\"%s\",\"case\":\"%s\",\"batch\":%lld,"
                   "\"seq_len\":%lld,\"queries\":%lld,\"heads\":%lld,\"latent\":%lld,"
                   "\"splits\":%lld,\"us\":%.2f,\"tflops\":%.2f,\"gbps\":%.1f,"
                   "\"speedup_vs_naive\":%.3f,\"rel_err\":%.3e}\n",
                   gpu.c_str(), o.date.c_str(), o.commit.c_str(), impls[i], c.name,
                   static_cast<long long>(c.batch), static_cast<long long>(c.seq_len),
                   static_cast<long long>(c.queries), static_cast<long long>(c.heads),
                   static_cast<long long>(c.latent),
                   static_cast<long long>(i == 0 ? plan.splits : 1), us[i], tflops, gbps,
                   us[1] / us[i], err[i]);
  }
  for (InputSet& x : in) free_set(x);
  cudaFree(out);
  cudaFree(lse);
  cudaFree(ws);
}

}  // namespace

int main(int argc, char** argv) {
  bench::BenchOptions o;
  bench::parse_bench_options(argc, argv, o);
  if (!bench::have_gpu("mla_decode_bench")) return 77;
  FILE* f = o.out.empty() ? nullptr : std::fopen(o.out.c_str(), "a");
  try {
    cudaDeviceProp prop{};
    FM_CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
    const std::vector<Case> cases = {
        {"v3 one long", 1, 32768, 1, 128, 512},    {"v3 b1 4k", 1, 4096, 1, 128, 512},
        {"v3 b16 4k", 16, 4096, 1, 128, 512},      {"v3 b64 4k", 64, 4096, 1, 128, 512},
        {"v3 b128 2k", 128, 2048, 1, 128, 512},    {"v3 b128 4k", 128, 4096, 1, 128, 512},
        {"v3 b64 8k", 64, 8192, 1, 128, 512},      {"v3 b64 4k q2", 64, 4096, 2, 128, 512},
        {"small-gpu b64 4k", 64, 4096, 1, 8, 256},
    };
    std::printf("%-20s %5s %6s %2s %4s %4s %-7s %3s %10s %8s %8s %9s %s\n", "case", "batch", "len",
                "q", "H", "L", "impl", "spl", "us", "TFLOPS", "GB/s", "vs naive", "rel_err");
    for (const Case& c : cases) run_case(o, f, c, prop.name, prop.multiProcessorCount);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mla_decode_bench: %s\n", e.what());
    return 1;
  }
  if (f != nullptr) std::fclose(f);
  return 0;
}
