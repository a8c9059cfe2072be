// The MoE forward up to the expert GEMM across EP ranks (one rank per GPU, one process), two ways
// in one run:
//   expanded (the anchor): FP8 dispatch that copies every received token into each of its rows
//     of the grouped-contiguous layout -> scales_to_mn_major -> fp8_gemm_nt_grouped_contiguous;
//   gathered: dispatch that stops at the layout (expand_payload off: each token stays once, in
//     its record) -> gather_scales_to_mn_major from the records -> the grouped GEMM reading its A
//     rows from the records through row_record (fp8_gemm_nt_grouped_contiguous_gathered).
// Shape (defaults): DeepSeek-V3, 4096 tokens per rank, hidden 7168, top-8 of 256 experts, FP8
// dispatch; the expert GEMM N = 4096, K = 7168 over the local experts (random FP8 weights, 128x128
// scales). Timing: every iteration times each path once, the order alternating from iteration
// to iteration, each on all ranks together (a gate kernel released from the host once everything
// is enqueued); time = the slowest rank's device-event interval; median of --iters per path, so
// the power-limited clock's drift (the GEMM runs at ~700 W) hits both paths alike. --rounds
// rounds; the table gives medians over the rounds and the ratio gathered / expanded.
// Ops: forward (dispatch + scales + GEMM), dispatch, gemm (scales + GEMM on the last dispatch's
// layout), scales. Checked: the two paths' layouts are equal and the gathered GEMM's output rows
// equal the expanded one's bit for bit (a mismatch makes the run exit 1 after printing).
// Every path runs DeviceEpOptions' defaults (since session 12 record_align_128: every record, so
// every A row, on a 128-byte line). --record-align-16 adds a third path, gathered_a16: the
// gathered path at the 16-byte record stride (the default until session 12). (Session 11's
// --record-align-128 added gathered_a128, the same option the other way round.)
// Run: moe_forward_bench --out f.jsonl [--iters 20] [--rounds 3] [--tokens 4096] [--n 4096]
//      [--record-align-16]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "fp8moe/comm/device_ep.h"
#include "fp8moe/comm/ep.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/fp8/quantize.h"
#include "fp8moe/kernels/fp8_gemm.h"
#include "fp8moe/kernels/scale_layout.h"
#include "gated_timing.cuh"

namespace {

using namespace fp8moe;
using namespace fp8moe::comm;

struct Options {
  int64_t tokens = 4096, hidden = 7168, n = 4096;
  int experts = 256, topk = 8, iters = 20, warmup = 3, rounds = 3;
  bool record_align_16 = false;
  std::string out, commit = "unknown", date = "unknown";
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      FM_CHECK_ARG(i + 1 < argc, a, " needs a value");
      return argv[++i];
    };
    if (a == "--out")
      o.out = next();
    else if (a == "--tokens")
      o.tokens = std::stoll(next());
    else if (a == "--hidden")
      o.hidden = std::stoll(next());
    else if (a == "--n")
      o.n = std::stoll(next());
    else if (a == "--experts")
      o.experts = std::stoi(next());
    else if (a == "--topk")
      o.topk = std::stoi(next());
    else if (a == "--iters")
      o.iters = std::stoi(next());
    else if (a == "--warmup")
      o.warmup = std::stoi(next());
    else if (a == "--rounds")
      o.rounds = std::stoi(next());
    else if (a == "--record-align-16")
      o.record_align_16 = true;
    else if (a == "--commit")
      o.commit = next();
    else if (a == "--date")
      o.date = next();
    else
      FM_THROW(ErrorKind::kInvalidArgument, "unknown flag ", a);
  }
  FM_CHECK_ARG(o.iters > 0 && o.rounds > 0 && o.warmup >= 0, "--iters and --rounds must be > 0");
  FM_CHECK_ARG(o.n % 128 == 0 && o.hidden % 128 == 0, "--n and --hidden must be multiples of 128");
  return o;
}

__global__ void k_fill_bf16(uint16_t* x, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] = static_cast<uint16_t>(0x3F00u | (philox_u32(seed, 7, i) & 0x80FFu));
}

// E4M3 codes with the exponent's top bit clear: |v| < 2, never NaN.
__global__ void k_fill_e4m3(uint8_t* b, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    b[i] = static_cast<uint8_t>(philox_u32(seed, 9, i) & 0xBFu);
}

struct Rank {
  int device = 0;
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, end = nullptr;
  uint16_t* x = nullptr;
  int32_t* idx = nullptr;
  float* w = nullptr;
  uint8_t* b = nullptr;   // [L][N][K] expert weights
  float* sb = nullptr;    // [L][N/128][K/128]
  float* sa = nullptr;    // [K/128][pad(bound)]
  uint16_t* y = nullptr;  // [bound][N]
};

struct Row {
  std::string path, op;
  int round = 0;
  double us = 0, tflops = 0;
  int check = -1;  // -1 not checked, 0 mismatch, 1 bit-exact
};

struct World {
  Options opt;
  int R = 0;
  std::string gpu_name;
  std::vector<Rank> ranks;
  EpConfig cfg;
  int* gate_host = nullptr;
  int gate_value = 0;
  std::FILE* out = nullptr;
  std::vector<Row> rows;
  double gemm_flops = 0;  // 2 * (rows with a token) * N * K, summed over the ranks / R

  // One gated region per rank, all released together: the slowest rank's time.
  double time_once(const std::function<void()>& enqueue) {
    return bench::gated_slowest_us(ranks, gate_host, gate_value, true, enqueue);
  }
  // Each enqueue timed once per iteration, the order rotating; the median of each.
  std::vector<double> time_us(const std::vector<std::function<void()>>& enqueues) {
    const size_t n = enqueues.size();
    std::vector<std::vector<double>> samples(n);
    for (const auto& e : enqueues) e();  // ungated first: module loads must not wait on a gate
    sync();
    for (int it = 0; it < opt.warmup + opt.iters; ++it)
      for (size_t q = 0; q < n; ++q) {
        const size_t i = (it + q) % n;
        const double t = time_once(enqueues[i]);
        if (it >= opt.warmup) samples[i].push_back(t);
      }
    std::vector<double> med;
    for (auto& v : samples) {
      std::sort(v.begin(), v.end());
      med.push_back(v[v.size() / 2]);
    }
    return med;
  }
  void sync() {
    for (auto& r : ranks) {
      FM_CHECK_CUDA(cudaSetDevice(r.device));
      FM_CHECK_CUDA(cudaStreamSynchronize(r.stream));
    }
  }
};

void emit(World& w, const Row& r) {
  std::printf("round %d  %-9s %-9s %10.1f us %8.1f TFLOPS %s\n", r.round, r.path.c_str(),
              r.op.c_str(), r.us, r.tflops,
              r.check < 0 ? "" : (r.check ? "bit-exact" : "MISMATCH"));
  std::fflush(stdout);
  w.rows.push_back(r);
  if (!w.out) return;
  std::fprintf(w.out,
               "{\"bench\":\"moe_forward\",\"gpu\":\"%s\",\"gpus\":%d,\"ranks\":%d,\"date\":\"%s\","
               "\"commit\":\"%s\",\"impl\":\"fp8moe\",\"path\":\"%s\",\"anchor\":\"expanded\","
               "\"op\":\"%s\",\"round\":%d,\"dtype\":\"fp8\",\"tokens\":%lld,\"hidden\":%lld,"
               "\"topk\":%d,\"experts\":%d,\"m\":%lld,\"n\":%lld,\"k\":%lld,\"groups\":%d,"
               "\"us\":%.2f,\"tflops\":%.1f,\"checked\":%s}\n",
               w.gpu_name.c_str(), w.R, w.R, w.opt.date.c_str(), w.opt.commit.c_str(),
               r.path.c_str(), r.op.c_str(), r.round, static_cast<long long>(w.opt.tokens),
               static_cast<long long>(w.opt.hidden), w.opt.topk, w.opt.experts,
               static_cast<long long>(w.cfg.row_bound()), static_cast<long long>(w.opt.n),
               static_cast<long long>(w.opt.hidden), w.cfg.experts_per_rank(), r.us, r.tflops,
               r.check < 0 ? "null" : (r.check ? "true" : "false"));
  std::fflush(w.out);
}

// Inputs: BF16 tokens on the device, top-k distinct experts per token and gate weights (host
// drawn, uploaded). Returns the most layout rows any rank needs (blocks rounded up to 128), and
// sets w.gemm_flops from the rows that hold a token.
int64_t make_inputs(World& w) {
  const int K = w.opt.topk, E = w.opt.experts, L = E / w.R;
  const int64_t T = w.opt.tokens, H = w.opt.hidden;
  std::vector<std::vector<int64_t>> per_expert(w.R, std::vector<int64_t>(L, 0));
  for (int r = 0; r < w.R; ++r) {
    Rank& k = w.ranks[r];
    std::vector<int32_t> idx(T * K);
    std::vector<float> wt(T * K);
    uint64_t n = 0;
    for (int64_t t = 0; t < T; ++t) {
      for (int j = 0; j < K;) {
        const int e = static_cast<int>(philox_u32(5, 200 + r, n++) % E);
        bool dup = false;
        for (int q = 0; q < j; ++q) dup = dup || idx[t * K + q] == e;
        if (!dup) idx[t * K + j++] = e;
      }
      for (int j = 0; j < K; ++j) {
        wt[t * K + j] = philox_uniform(5, 300 + r, t * K + j);
        ++per_expert[idx[t * K + j] / L][idx[t * K + j] % L];
      }
    }
    FM_CHECK_CUDA(cudaSetDevice(k.device));
    FM_CHECK_CUDA(cudaMalloc(&k.x, T * H * 2));
    FM_CHECK_CUDA(cudaMalloc(&k.idx, T * K * 4));
    FM_CHECK_CUDA(cudaMalloc(&k.w, T * K * 4));
    k_fill_bf16<<<1024, 256, 0, k.stream>>>(k.x, T * H, 100 + r);
    FM_CHECK_LAUNCH();
    FM_CHECK_CUDA(cudaMemcpy(k.idx, idx.data(), idx.size() * 4, cudaMemcpyHostToDevice));
    FM_CHECK_CUDA(cudaMemcpy(k.w, wt.data(), wt.size() * 4, cudaMemcpyHostToDevice));
  }
  int64_t most = 0, used = 0;
  for (int d = 0; d < w.R; ++d) {
    int64_t rows = 0;
    for (int64_t c : per_expert[d]) {
      rows += (c + 127) / 128 * 128;
      used += c;
    }
    most = std::max(most, rows);
  }
  w.gemm_flops = 2.0 * static_cast<double>(used) / w.R * w.opt.n * H;
  return most;
}

struct Path {
  const char* name;
  bool gather;
  bool stride_16 = false;  // record_align_128 off (the rest: DeviceEpOptions' defaults)
  std::unique_ptr<DeviceEpGroup> group;
};

void enqueue_dispatch(World& w, Path& p) {
  for (int r = 0; r < w.R; ++r) {
    FM_CHECK_CUDA(cudaSetDevice(w.ranks[r].device));
    p.group->rank(r).dispatch_send({w.opt.tokens, w.ranks[r].x, w.ranks[r].idx, w.ranks[r].w},
                                   w.ranks[r].stream);
  }
  for (int r = 0; r < w.R; ++r) {
    FM_CHECK_CUDA(cudaSetDevice(w.ranks[r].device));
    p.group->rank(r).dispatch_recv(w.ranks[r].stream);
  }
}

void enqueue_scales(World& w, Path& p) {
  const int64_t H = w.opt.hidden, KB = H / 128, bound = w.cfg.row_bound();
  for (int r = 0; r < w.R; ++r) {
    Rank& k = w.ranks[r];
    FM_CHECK_CUDA(cudaSetDevice(k.device));
    const DeviceRecvView v = p.group->rank(r).view();
    if (p.gather)
      kernels::gather_scales_to_mn_major(reinterpret_cast<const float*>(v.records + H),
                                         v.record_stride / 4, v.row_record, bound, KB, k.sa,
                                         k.stream);
    else
      kernels::scales_to_mn_major(v.x_scales, 1, bound, KB, k.sa, k.stream);
  }
}

void enqueue_gemm(World& w, Path& p) {
  const int64_t H = w.opt.hidden, N = w.opt.n, bound = w.cfg.row_bound();
  const int L = w.cfg.experts_per_rank();
  for (int r = 0; r < w.R; ++r) {
    Rank& k = w.ranks[r];
    FM_CHECK_CUDA(cudaSetDevice(k.device));
    const DeviceRecvView v = p.group->rank(r).view();
    bf16* y = reinterpret_cast<bf16*>(k.y);
    if (p.gather)
      kernels::fp8_gemm_nt_grouped_contiguous_gathered(
          {v.records, v.record_rows, v.record_stride, v.row_record}, k.sa, k.b, k.sb, y,
          v.m_indices, bound, N, H, L, k.stream);
    else
      kernels::fp8_gemm_nt_grouped_contiguous(static_cast<const uint8_t*>(v.x), k.sa, k.b, k.sb, y,
                                              v.m_indices, bound, N, H, L, k.stream);
  }
}

// One untimed forward of the path; the rank's layout and output rows, on the host.
struct Result {
  std::vector<std::vector<int32_t>> m_indices;
  std::vector<std::vector<uint16_t>> y;
};
Result run_once(World& w, Path& p) {
  const int64_t bound = w.cfg.row_bound(), N = w.opt.n;
  for (auto& k : w.ranks) {
    FM_CHECK_CUDA(cudaSetDevice(k.device));
    FM_CHECK_CUDA(cudaMemsetAsync(k.y, 0xFF, bound * N * 2, k.stream));  // NaN poison
  }
  enqueue_dispatch(w, p);
  enqueue_scales(w, p);
  enqueue_gemm(w, p);
  w.sync();
  p.group->check();
  Result res;
  for (int r = 0; r < w.R; ++r) {
    Rank& k = w.ranks[r];
    FM_CHECK_CUDA(cudaSetDevice(k.device));
    std::vector<int32_t> m(bound);
    std::vector<uint16_t> y(bound * N);
    FM_CHECK_CUDA(
        cudaMemcpy(m.data(), p.group->rank(r).view().m_indices, bound * 4, cudaMemcpyDeviceToHost));
    FM_CHECK_CUDA(cudaMemcpy(y.data(), k.y, bound * N * 2, cudaMemcpyDeviceToHost));
    res.m_indices.push_back(std::move(m));
    res.y.push_back(std::move(y));
  }
  return res;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int run(World& w) {
  const int64_t H = w.opt.hidden, N = w.opt.n, KB = H / 128;
  const int64_t rows = make_inputs(w);
  EpConfig& cfg = w.cfg;
  cfg.num_ranks = w.R;
  cfg.num_experts = w.opt.experts;
  cfg.top_k = w.opt.topk;
  cfg.hidden = H;
  cfg.max_tokens_per_rank = w.opt.tokens;
  cfg.payload = Payload::kFP8;
  cfg.max_rows = rows;  // the layout's rows, as ep_bench sizes them
  cfg.timeout_s = 10.0;
  const int L = cfg.experts_per_rank();
  const int64_t bound = cfg.row_bound();
  std::vector<int> devices;
  for (const auto& k : w.ranks) devices.push_back(k.device);
  for (int r = 0; r < w.R; ++r) {
    Rank& k = w.ranks[r];
    FM_CHECK_CUDA(cudaSetDevice(k.device));
    FM_CHECK_CUDA(cudaMalloc(&k.b, static_cast<size_t>(L) * N * H));
    FM_CHECK_CUDA(cudaMalloc(&k.sb, static_cast<size_t>(L) * (N / 128) * KB * 4));
    FM_CHECK_CUDA(cudaMalloc(&k.sa, KB * padded_rows(bound) * 4));
    FM_CHECK_CUDA(cudaMalloc(&k.y, bound * N * 2));
    k_fill_e4m3<<<2048, 256, 0, k.stream>>>(k.b, static_cast<int64_t>(L) * N * H, 400 + r);
    FM_CHECK_LAUNCH();
    const std::vector<float> sb(static_cast<size_t>(L) * (N / 128) * KB, 1.0f / 64);
    FM_CHECK_CUDA(cudaMemcpy(k.sb, sb.data(), sb.size() * 4, cudaMemcpyHostToDevice));
  }
  w.sync();
  std::printf(
      "# moe_forward_bench on %d x %s: %lld tokens/rank, hidden %lld, top-%d of %d, FP8; "
      "expert GEMM N=%lld K=%lld over %d local experts, %lld layout rows (bound)\n",
      w.R, w.gpu_name.c_str(), static_cast<long long>(w.opt.tokens), static_cast<long long>(H),
      w.opt.topk, w.opt.experts, static_cast<long long>(N), static_cast<long long>(H), L,
      static_cast<long long>(bound));
  std::vector<Path> paths(w.opt.record_align_16 ? 3 : 2);
  paths[0].name = "expanded";
  paths[0].gather = false;
  paths[1].name = "gathered";
  paths[1].gather = true;
  if (paths.size() > 2) {
    paths[2].name = "gathered_a16";
    paths[2].gather = paths[2].stride_16 = true;
  }
  const int np = static_cast<int>(paths.size());
  for (Path& p : paths) {
    DeviceEpOptions o;  // the defaults; the gathered path only stops the dispatch at the layout
    o.expand_payload = !p.gather;
    if (p.stride_16) o.record_align_128 = false;
    p.group = std::make_unique<DeviceEpGroup>(cfg, devices, o);
  }
  // The check: same layout, the gathered GEMM's rows equal the expanded one's bit for bit.
  int check = 1;
  const Result e = run_once(w, paths[0]);
  for (int pi = 1; pi < np; ++pi) {
    const Result g = run_once(w, paths[pi]);
    for (int r = 0; r < w.R; ++r) {
      if (g.m_indices[r] != e.m_indices[r]) {
        std::printf("rank %d: the %s path's layout differs\n", r, paths[pi].name);
        check = 0;
        continue;
      }
      int64_t bad = 0, used = 0;
      for (int64_t row = 0; row < bound; ++row) {
        if (e.m_indices[r][row] < 0) continue;
        ++used;
        bad += std::memcmp(g.y[r].data() + row * N, e.y[r].data() + row * N, N * 2) != 0;
      }
      std::printf("rank %d: %lld expert rows, %lld differ between expanded and %s\n", r,
                  static_cast<long long>(used), static_cast<long long>(bad), paths[pi].name);
      if (bad > 0 || used == 0) check = 0;
    }
  }
  const char* ops[] = {"forward", "dispatch", "gemm", "scales"};
  // us[path][op] per round
  std::vector<std::vector<std::vector<double>>> us(np, std::vector<std::vector<double>>(4));
  auto op_of = [&](Path& p, int op) -> std::function<void()> {
    if (op == 0)
      return [&w, &p] {
        enqueue_dispatch(w, p);
        enqueue_scales(w, p);
        enqueue_gemm(w, p);
      };
    if (op == 1) return [&w, &p] { enqueue_dispatch(w, p); };
    if (op == 2)
      return [&w, &p] {
        enqueue_scales(w, p);
        enqueue_gemm(w, p);
      };
    return [&w, &p] { enqueue_scales(w, p); };
  };
  for (int round = 0; round < w.opt.rounds; ++round)
    for (int op = 0; op < 4; ++op) {
      // NOTE: the gemm and scales ops read each path's last layout (a group's own workspace).
      std::vector<std::function<void()>> enq;
      for (Path& p : paths) enq.push_back(op_of(p, op));
      const std::vector<double> t = w.time_us(enq);
      for (int pi = 0; pi < np; ++pi) {
        paths[pi].group->check();
        Row row;
        row.path = paths[pi].name;
        row.op = ops[op];
        row.round = round;
        row.us = t[pi];
        if (op == 0 || op == 2) row.tflops = w.gemm_flops / (row.us * 1e6);
        if (op == 0) row.check = check;
        us[pi][op].push_back(row.us);
        emit(w, row);
      }
    }
  std::printf("\n%-9s %12s %12s %9s", "op", "expanded", "gathered", "ratio");
  if (np > 2) std::printf(" %14s %9s", "gathered_a16", "ratio");
  std::printf("   (median over %d rounds, us; %s, %d GPUs)\n", w.opt.rounds, w.gpu_name.c_str(),
              w.R);
  for (int op = 0; op < 4; ++op) {
    const double e = median(us[0][op]);
    std::printf("%-9s %12.1f", ops[op], e);
    for (int pi = 1; pi < np; ++pi) {
      const double g = median(us[pi][op]);
      std::printf(pi == 1 ? " %12.1f %9.3f" : " %14.1f %9.3f", g, g / e);
    }
    std::printf("\n");
  }
  std::printf("gathered GEMM rows %s the expanded ones\n",
              check ? "equal bit for bit" : "DIFFER from");
  return check ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  World w;
  try {
    w.opt = parse(argc, argv);
    int gpus = 0;
    FM_CHECK_CUDA(cudaGetDeviceCount(&gpus));
    FM_CHECK_ARG(gpus >= 2, "moe_forward_bench needs 2 GPUs or more (one rank per GPU)");
    cudaDeviceProp prop;
    FM_CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
    w.gpu_name = prop.name;
    w.R = gpus;
    FM_CHECK_ARG(w.opt.experts % w.R == 0, "--experts must be a multiple of the ranks");
    for (int r = 0; r < w.R; ++r) {
      Rank k;
      k.device = r;
      FM_CHECK_CUDA(cudaSetDevice(r));
      bench::create_timed_stream(k);
      w.ranks.push_back(k);
    }
    w.gate_host = bench::alloc_gate_flag();
    if (!w.opt.out.empty()) {
      w.out = std::fopen(w.opt.out.c_str(), "a");
      FM_CHECK_ARG(w.out, "cannot open ", w.opt.out);
    }
    const int rc = run(w);
    if (w.out) std::fclose(w.out);
    if (rc != 0) std::fprintf(stderr, "moe_forward_bench: the paths' results differ (MISMATCH)\n");
    return rc;
  } catch (const Error& e) {
    std::fprintf(stderr, "moe_forward_bench: %s\n", e.what());
    return e.kind() == ErrorKind::kInvalidArgument ? 2 : 1;
  }
}
