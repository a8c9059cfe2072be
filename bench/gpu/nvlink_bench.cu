// The NVLink transport's ceiling: how fast each way of moving B contiguous bytes to a peer GPU
// runs (the movers of include/fp8moe/comm/peer_mover.h: SM stores, SM loads, TMA bulk push and
// pull, the staged TMA push), against the copy engine's peer copy (cudaMemcpyPeerAsync) of the
// same bytes in the same run. For every GPU pair it can open (or GPU 0 to itself with one GPU):
// one direction and both at once, each size of --bytes, a sweep of every mover's knobs; then the
// best of each kind again beside local HBM traffic (--hbm-blocks: a copy kernel on the same GPUs,
// as the dispatch's own row expansion makes). Timing: every timed stream waits behind a gate
// kernel released from the host once all is enqueued (launch overhead outside), CUDA events,
// the slower direction's interval, median of --iters; source and destination buffers rotate
// (--rotate) so that 32 MB transfers do not run from L2. Each mover's result is checked byte for
// byte once per size (destination poisoned first). Output: one JSON line per row (--out), the
// anchor's GB/s and the ratio on every row; stdout ends with the best of each kind and the best
// per grid size. Movers' correctness test: test_comm_gpu --gtest_filter='PeerMover*'.
// Run: nvlink_bench --out nvlink.jsonl [--bytes 32M,1M] [--movers st:b64:w8:u4,...]
//      [--hbm-blocks 0,16,66] [--iters 20] [--warmup 3] [--rotate 4] [--quick] [--one-way]
//      [--no-check] [--list (print the movers and exit)]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "fp8moe/comm/peer_mover.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/core/philox.h"
#include "gated_timing.cuh"

namespace {

using namespace fp8moe;
using namespace fp8moe::comm;

struct Options {
  std::vector<int64_t> bytes = {32ll << 20, 1ll << 20};
  std::vector<int> hbm_blocks = {0, 16, 66};
  std::vector<std::string> movers;  // empty: the built-in sweep
  int iters = 20, warmup = 3, rotate = 4;
  bool quick = false, check = true, bidirectional = true, list = false;
  std::string out, commit = "unknown", date = "unknown";
};

[[noreturn]] void usage(const std::string& msg) {
  std::fprintf(stderr, "nvlink_bench: %s\n", msg.c_str());
  std::exit(2);
}

int64_t parse_size(const std::string& s) {
  char* end = nullptr;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  int64_t mul = 1;
  if (*end == 'K' || *end == 'k')
    mul = 1024, ++end;
  else if (*end == 'M' || *end == 'm')
    mul = 1 << 20, ++end;
  if (s.empty() || *end != '\0' || v <= 0) usage("bad size '" + s + "' (e.g. 32M, 1M, 65536)");
  return v * mul;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  size_t at = 0;
  while (at <= s.size()) {
    const size_t next = s.find(',', at);
    out.push_back(s.substr(at, next == std::string::npos ? std::string::npos : next - at));
    if (next == std::string::npos) break;
    at = next + 1;
  }
  return out;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) usage(a + " needs a value");
      return argv[++i];
    };
    if (a == "--bytes") {
      o.bytes.clear();
      for (const auto& s : split(next())) o.bytes.push_back(parse_size(s));
    } else if (a == "--hbm-blocks") {
      o.hbm_blocks.clear();
      for (const auto& s : split(next())) o.hbm_blocks.push_back(std::atoi(s.c_str()));
    } else if (a == "--movers") {
      o.movers = split(next());
    } else if (a == "--iters") {
      o.iters = std::atoi(next().c_str());
    } else if (a == "--warmup") {
      o.warmup = std::atoi(next().c_str());
    } else if (a == "--rotate") {
      o.rotate = std::atoi(next().c_str());
    } else if (a == "--list") {
      o.list = true;
    } else if (a == "--quick") {
      o.quick = true;
    } else if (a == "--no-check") {
      o.check = false;
    } else if (a == "--one-way") {
      o.bidirectional = false;
    } else if (a == "--out") {
      o.out = next();
    } else if (a == "--commit") {
      o.commit = next();
    } else if (a == "--date") {
      o.date = next();
    } else {
      usage("unknown argument '" + a + "'");
    }
  }
  if (o.iters < 1 || o.warmup < 0 || o.rotate < 1)
    usage("--iters >= 1, --warmup >= 0, --rotate >= 1");
  for (const auto& m : o.movers) {
    try {
      for (int64_t b : o.bytes) validate_mover(parse_mover(m), b);
    } catch (const Error& e) {
      usage(e.what());
    }
  }
  return o;
}

// The built-in sweep: every mover's knobs over grids of 8..132 SMs (movers that break a limit
// are left out). --quick keeps a few per kind.
std::vector<std::string> sweep(bool quick) {
  std::vector<std::string> v;
  auto add = [&](const std::string& s) { v.push_back(s); };
  const std::vector<int> grids =
      quick ? std::vector<int>{32, 132} : std::vector<int>{16, 32, 48, 64, 96, 132};
  const std::vector<int> unrolls = quick ? std::vector<int>{4} : std::vector<int>{1, 2, 4, 8};
  for (const char* kind : {"st", "ld"}) {
    const std::string k = kind;
    for (int b : grids)
      for (int w : quick ? std::vector<int>{8} : std::vector<int>{4, 8, 16})
        for (int u : unrolls)
          add(k + ":b" + std::to_string(b) + ":w" + std::to_string(w) + ":u" + std::to_string(u));
    for (int c : quick ? std::vector<int>{7168} : std::vector<int>{512, 2048, 7168, 8192})
      for (int b : quick ? std::vector<int>{64} : std::vector<int>{32, 64, 132})
        for (int u : unrolls)
          add(k + ":b" + std::to_string(b) + ":w8:u" + std::to_string(u) + ":c" +
              std::to_string(c));
    if (quick) continue;
    for (int b : {32, 64, 132})
      for (int w : {4, 16})
        for (int u : {2, 4})
          add(k + ":b" + std::to_string(b) + ":w" + std::to_string(w) + ":u" + std::to_string(u) +
              ":c7168");
    for (const char* base : {":b64:w8:u4", ":b132:w8:u4", ":b32:w8:u4", ":b64:w8:u2:c7168"}) {
      for (const char* h : {":scs", ":swt", ":sna", ":lcs", ":lna", ":lcg"}) add(k + base + h);
    }
  }
  for (const char* kind : {"bulkst", "bulkld"}) {
    const std::string k = kind;
    for (int b : quick ? std::vector<int>{16, 64} : std::vector<int>{8, 16, 32, 64, 132})
      for (int w : quick ? std::vector<int>{2} : std::vector<int>{1, 2, 4})
        for (int o : quick ? std::vector<int>{8192} : std::vector<int>{1024, 4096, 8192, 16384})
          for (int d : quick ? std::vector<int>{4} : std::vector<int>{2, 4, 8})
            add(k + ":b" + std::to_string(b) + ":w" + std::to_string(w) + ":o" + std::to_string(o) +
                ":d" + std::to_string(d));
    if (quick) continue;
    for (int b : {16, 32, 64, 132})
      for (int w : {1, 2, 4})
        for (const char* od : {":o7168:d2", ":o7168:d4", ":o1024:d8"})
          add(k + ":b" + std::to_string(b) + ":w" + std::to_string(w) + ":c7168" + od);
  }
  for (int b : quick ? std::vector<int>{32, 132} : std::vector<int>{16, 32, 64, 132})
    for (int w : quick ? std::vector<int>{4} : std::vector<int>{2, 4, 8})
      for (const char* od : {":o1024:d4", ":o4096:d2", ":o4096:d4", ":c7168:o7168:d2"})
        for (int u : quick ? std::vector<int>{4} : std::vector<int>{2, 4, 8})
          add("stage:b" + std::to_string(b) + ":w" + std::to_string(w) + ":u" + std::to_string(u) +
              od);
  std::vector<std::string> ok;
  for (const auto& s : v) {
    try {
      validate_mover(parse_mover(s), 1 << 20);
      ok.push_back(s);
    } catch (const Error&) {
      // NOTE: the grid crosses shared-memory limits for the largest slots; those are skipped.
    }
  }
  return ok;
}

__global__ void k_fill(uint32_t* p, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    p[i] = philox_u32(seed, 11, static_cast<uint64_t>(i));
}

// Mismatching 16-byte vectors between a (local) and b (local or a peer's); the guard after a
// must still hold the poison.
__global__ void k_compare(const uint4* a, const uint4* b, int64_t n, int64_t guard,
                          unsigned long long* bad) {
  unsigned long long mine = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n + guard;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint4 x = a[i];
    if (i < n) {
      const uint4 y = b[i];
      mine += x.x != y.x || x.y != y.y || x.z != y.z || x.w != y.w;
    } else {
      mine += x.x != 0xA5A5A5A5u || x.y != 0xA5A5A5A5u || x.z != 0xA5A5A5A5u || x.w != 0xA5A5A5A5u;
    }
  }
  if (mine) atomicAdd(bad, mine);
}

__device__ __forceinline__ unsigned long long globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Local HBM traffic beside the mover: each block copies 256 KB slices of the first half of buf
// into the second half until *stop (device memory, raised by k_raise on the timed streams right
// after the timed work) is set, or 50 ms pass, so nothing can hang. NOTE: session 8's call 1
// polled a host-mapped flag over PCIe from every block instead, and the peer copy beside it fell
// to a fifth of its rate (cause not separated then; this form takes PCIe out).
// stats: [0] bytes read + written, [1] ~(earliest start), [2] latest end (globaltimer ns).
__global__ void __launch_bounds__(512)
    k_hbm_traffic(uint4* buf, int64_t half_vec, const volatile int* stop,
                  unsigned long long* stats) {
  const unsigned long long t0 = globaltimer();
  constexpr int64_t kSlice = 512 * 32;  // vectors per block pass (256 KB)
  unsigned long long moved = 0;
  __shared__ int quit;
  for (int64_t pass = 0;; ++pass) {
    if (threadIdx.x == 0) quit = *stop || globaltimer() - t0 > 50000000ull;
    __syncthreads();
    if (quit) break;
    const int64_t base = ((pass * gridDim.x + blockIdx.x) * kSlice) % (half_vec - kSlice + 1);
    uint4 v[8];
    for (int r = 0; r < 4; ++r) {
#pragma unroll
      for (int u = 0; u < 8; ++u) v[u] = buf[base + (r * 8 + u) * 512 + threadIdx.x];
#pragma unroll
      for (int u = 0; u < 8; ++u) buf[half_vec + base + (r * 8 + u) * 512 + threadIdx.x] = v[u];
    }
    moved += 2 * kSlice * 16;
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    atomicAdd(&stats[0], moved);
    atomicMax(&stats[1], ~t0);
    atomicMax(&stats[2], globaltimer());
  }
}

// Raises the stop flags of the background traffic (one per GPU, local or a peer's).
__global__ void k_raise(int* a, int* b) {
  if (threadIdx.x == 0) {
    *reinterpret_cast<volatile int*>(a) = 1;
    *reinterpret_cast<volatile int*>(b) = 1;
  }
}

struct Gpu {
  int dev = 0;
  cudaStream_t s = nullptr, bg = nullptr;
  cudaEvent_t start = nullptr, end = nullptr;
  std::vector<char*> src, dst;  // rotate x (bytes + guard)
  uint4* hbm = nullptr;
  int64_t hbm_half_vec = 0;
  unsigned long long* stats = nullptr;
  unsigned long long* bad = nullptr;
  int* stop = nullptr;  // device memory: the background traffic's stop flag
};

constexpr int64_t kGuard = 4096;

struct Row {
  std::string impl, mover, kind, direction;
  int src = 0, dst = 0, hbm_blocks = 0;
  int64_t bytes = 0;
  double us = 0, gbps = 0, anchor = 0, hbm_gbps = 0;
  int checked = -1;
};

Row row_of(const char* impl, const std::string& mover, const std::string& kind, const Gpu& a,
           const Gpu& b, int64_t bytes, bool both, int hbm, double us, double hbm_gbps) {
  Row r;
  r.impl = impl;
  r.mover = mover;
  r.kind = kind;
  r.direction = both ? "bidirectional" : "one_way";
  r.src = a.dev;
  r.dst = b.dev;
  r.bytes = bytes;
  r.hbm_blocks = hbm;
  r.us = us;
  r.hbm_gbps = hbm_gbps;
  return r;
}

struct Bench {
  Options opt;
  std::string gpu_name;
  int gpus = 0;
  int* gate = nullptr;  // host-mapped
  int gate_value = 0;
  std::FILE* out = nullptr;
  std::vector<Row> rows;
  int failures = 0;

  // One timed region on each runner, all released together; hbm > 0 adds the background
  // traffic on every GPU in `traffic`. Returns the median of the slower runner's interval and
  // the median background rate (GB/s read + written, summed over the traffic GPUs).
  std::pair<double, double> time(const std::vector<Gpu*>& runners, std::vector<Gpu*> traffic,
                                 int hbm, const std::function<void(int)>& enqueue) {
    std::vector<double> us, bg;
    traffic.erase(std::unique(traffic.begin(), traffic.end()), traffic.end());
    enqueue(0);  // modules load on first use, outside the gate
    for (Gpu* g : runners) {
      FM_CHECK_CUDA(cudaSetDevice(g->dev));
      FM_CHECK_CUDA(cudaStreamSynchronize(g->s));
    }
    for (int it = 0; it < opt.warmup + opt.iters; ++it) {
      ++gate_value;
      if (hbm > 0) {
        for (Gpu* g : traffic) {
          FM_CHECK_CUDA(cudaSetDevice(g->dev));
          FM_CHECK_CUDA(cudaMemsetAsync(g->stats, 0, 3 * sizeof(unsigned long long), g->bg));
          FM_CHECK_CUDA(cudaMemsetAsync(g->stop, 0, sizeof(int), g->bg));
          bench::k_gate<<<1, 1, 0, g->bg>>>(gate, gate_value);
          FM_CHECK_LAUNCH();
          k_hbm_traffic<<<hbm, 512, 0, g->bg>>>(g->hbm, g->hbm_half_vec, g->stop, g->stats);
          FM_CHECK_LAUNCH();
        }
      }
      for (Gpu* g : runners) {
        FM_CHECK_CUDA(cudaSetDevice(g->dev));
        bench::k_gate<<<1, 1, 0, g->s>>>(gate, gate_value);
        FM_CHECK_LAUNCH();
        FM_CHECK_CUDA(cudaEventRecord(g->start, g->s));
      }
      enqueue(it);
      for (Gpu* g : runners) {
        FM_CHECK_CUDA(cudaSetDevice(g->dev));
        FM_CHECK_CUDA(cudaEventRecord(g->end, g->s));
        if (hbm > 0) {
          k_raise<<<1, 32, 0, g->s>>>(traffic.front()->stop, traffic.back()->stop);
          FM_CHECK_LAUNCH();
        }
      }
      __atomic_store_n(gate, gate_value, __ATOMIC_RELEASE);
      double worst = 0;
      for (Gpu* g : runners) {
        FM_CHECK_CUDA(cudaSetDevice(g->dev));
        FM_CHECK_CUDA(cudaEventSynchronize(g->end));
        float ms = 0;
        FM_CHECK_CUDA(cudaEventElapsedTime(&ms, g->start, g->end));
        worst = std::max(worst, 1000.0 * ms);
      }
      double rate = 0;
      if (hbm > 0) {
        for (Gpu* g : runners) {
          FM_CHECK_CUDA(cudaSetDevice(g->dev));
          FM_CHECK_CUDA(cudaStreamSynchronize(g->s));
        }
        for (Gpu* g : traffic) {
          FM_CHECK_CUDA(cudaSetDevice(g->dev));
          FM_CHECK_CUDA(cudaStreamSynchronize(g->bg));
          unsigned long long st[3];
          FM_CHECK_CUDA(cudaMemcpy(st, g->stats, sizeof st, cudaMemcpyDeviceToHost));
          const double ns = static_cast<double>(st[2] - ~st[1]);
          if (ns > 0) rate += static_cast<double>(st[0]) / ns;
        }
      }
      if (it >= opt.warmup) {
        us.push_back(worst);
        bg.push_back(rate);
      }
    }
    std::sort(us.begin(), us.end());
    std::sort(bg.begin(), bg.end());
    return {us[us.size() / 2], bg[bg.size() / 2]};
  }

  void emit(Row r) {
    r.gbps = static_cast<double>(r.bytes) / (r.us * 1e3);
    rows.push_back(r);
    if (r.checked == 0) ++failures;
    if (!out) return;
    std::fprintf(
        out,
        "{\"bench\":\"nvlink\",\"gpu\":\"%s\",\"gpus\":%d,\"date\":\"%s\",\"commit\":\"%s\","
        "\"impl\":\"%s\",\"mover\":\"%s\",\"kind\":\"%s\",\"src_gpu\":%d,\"dst_gpu\":%d,"
        "\"direction\":\"%s\",\"bytes\":%lld,\"hbm_blocks\":%d,\"us\":%.3f,\"gbps\":%.2f,"
        "\"anchor_gbps\":%.2f,\"ratio\":%.4f,\"hbm_gbps\":%.1f,\"checked\":%s}\n",
        gpu_name.c_str(), gpus, opt.date.c_str(), opt.commit.c_str(), r.impl.c_str(),
        r.mover.c_str(), r.kind.c_str(), r.src, r.dst, r.direction.c_str(),
        static_cast<long long>(r.bytes), r.hbm_blocks, r.us, r.gbps, r.anchor,
        r.anchor > 0 ? r.gbps / r.anchor : 0.0, r.hbm_gbps,
        r.checked < 0 ? "null" : (r.checked ? "true" : "false"));
    std::fflush(out);
  }

  // Moves bytes from a to b once (runner as the mover says), destination poisoned first, and
  // compares on b's GPU.
  bool check(const MoverConfig& c, Gpu& a, Gpu& b, int64_t bytes) {
    FM_CHECK_CUDA(cudaSetDevice(b.dev));
    FM_CHECK_CUDA(cudaMemset(b.dst[0], 0xA5, bytes + kGuard));
    FM_CHECK_CUDA(cudaMemset(b.bad, 0, sizeof(unsigned long long)));
    FM_CHECK_CUDA(cudaDeviceSynchronize());
    Gpu& run = mover_runs_on_destination(c) ? b : a;
    FM_CHECK_CUDA(cudaSetDevice(run.dev));
    launch_mover(c, b.dst[0], a.src[0], bytes, run.s);
    FM_CHECK_CUDA(cudaStreamSynchronize(run.s));
    FM_CHECK_CUDA(cudaSetDevice(b.dev));
    k_compare<<<264, 512, 0, b.s>>>(reinterpret_cast<const uint4*>(b.dst[0]),
                                    reinterpret_cast<const uint4*>(a.src[0]), bytes / 16,
                                    kGuard / 16, b.bad);
    FM_CHECK_LAUNCH();
    unsigned long long bad = 0;
    FM_CHECK_CUDA(cudaMemcpyAsync(&bad, b.bad, sizeof bad, cudaMemcpyDeviceToHost, b.s));
    FM_CHECK_CUDA(cudaStreamSynchronize(b.s));
    if (bad)
      std::printf("MISMATCH %s GPU %d -> %d, %lld bytes: %llu bad vectors\n", mover_name(c).c_str(),
                  a.dev, b.dev, static_cast<long long>(bytes), bad);
    return bad == 0;
  }

  // The copy engine's peer copy of the same bytes: one direction a -> b, or both at once.
  double anchor(Gpu& a, Gpu& b, int64_t bytes, bool both, int hbm, double* hbm_gbps) {
    std::vector<Gpu*> runners = {&a};
    if (both) runners.push_back(&b);
    auto [us, bg] = time(runners, {&a, &b}, hbm, [&](int it) {
      const int k = it % opt.rotate;
      FM_CHECK_CUDA(cudaSetDevice(a.dev));
      FM_CHECK_CUDA(cudaMemcpyPeerAsync(b.dst[k], b.dev, a.src[k], a.dev, bytes, a.s));
      if (both) {
        FM_CHECK_CUDA(cudaSetDevice(b.dev));
        FM_CHECK_CUDA(cudaMemcpyPeerAsync(a.dst[k], a.dev, b.src[k], b.dev, bytes, b.s));
      }
    });
    Row r = row_of("peer_copy", "cudaMemcpyPeerAsync", "ce", a, b, bytes, both, hbm, us, bg);
    r.anchor = static_cast<double>(bytes) / (us * 1e3);
    if (hbm_gbps) *hbm_gbps = bg;
    emit(r);
    return r.anchor;
  }

  Row measure(const MoverConfig& c, Gpu& a, Gpu& b, int64_t bytes, bool both, int hbm) {
    Gpu& run_ab = mover_runs_on_destination(c) ? b : a;
    Gpu& run_ba = mover_runs_on_destination(c) ? a : b;
    std::vector<Gpu*> runners = {&run_ab};
    if (both) runners.push_back(&run_ba);
    auto [us, bg] = time(runners, {&a, &b}, hbm, [&](int it) {
      const int k = it % opt.rotate;
      FM_CHECK_CUDA(cudaSetDevice(run_ab.dev));
      launch_mover(c, b.dst[k], a.src[k], bytes, run_ab.s);
      if (both) {
        FM_CHECK_CUDA(cudaSetDevice(run_ba.dev));
        launch_mover(c, a.dst[k], b.src[k], bytes, run_ba.s);
      }
    });
    const std::string name = mover_name(c);
    return row_of("fp8moe", name, name.substr(0, name.find(':')), a, b, bytes, both, hbm, us, bg);
  }

  void run_pair(Gpu& a, Gpu& b) {
    const std::vector<std::string> movers = opt.movers.empty() ? sweep(opt.quick) : opt.movers;
    std::printf("# pair GPU %d -> GPU %d: %zu movers\n", a.dev, b.dev, movers.size());
    for (int64_t bytes : opt.bytes) {
      for (bool both : {false, true}) {
        if (both && (!opt.bidirectional || a.dev == b.dev)) continue;
        const char* dir = both ? "bidirectional" : "one_way";
        // The sweep without background traffic, the anchor before and after it.
        const double ce0 = anchor(a, b, bytes, both, 0, nullptr);
        std::vector<Row> mine;
        for (const auto& name : movers) {
          const MoverConfig c = parse_mover(name);
          Row r = measure(c, a, b, bytes, both, 0);
          if (opt.check && !both) r.checked = check(c, a, b, bytes) ? 1 : 0;
          mine.push_back(r);
        }
        const double ce1 = anchor(a, b, bytes, both, 0, nullptr);
        const double ce = std::max(ce0, ce1);
        for (auto& r : mine) {
          r.anchor = ce;
          emit(r);
        }
        // The best of each kind, beside local HBM traffic on both GPUs.
        std::map<std::string, Row> best;
        for (const auto& r : rows)
          if (r.impl == "fp8moe" && r.bytes == bytes && r.direction == dir && r.hbm_blocks == 0 &&
              r.src == a.dev && r.dst == b.dev && (!best.count(r.kind) || r.us < best[r.kind].us))
            best[r.kind] = r;
        for (int hbm : opt.hbm_blocks) {
          if (hbm <= 0) continue;
          double bg = 0;
          const double ceh = anchor(a, b, bytes, both, hbm, &bg);
          std::printf(
              "# %s %lld B, HBM traffic %d blocks: copy engine %.1f GB/s (%.0f GB/s "
              "local traffic)\n",
              dir, static_cast<long long>(bytes), hbm, ceh, bg);
          for (const auto& [kind, r0] : best) {
            Row r = measure(parse_mover(r0.mover), a, b, bytes, both, hbm);
            r.anchor = ceh;
            emit(r);
          }
        }
      }
    }
  }

  void summary() {
    std::printf("\n# summary: GB/s per direction, share of the copy engine's rate (same run)\n");
    std::map<std::string, int> seen;
    for (const auto& a : rows) {
      if (a.impl != "peer_copy") continue;
      char key[160];
      std::snprintf(key, sizeof key, "%d>%d %s %lld hbm%d", a.src, a.dst, a.direction.c_str(),
                    static_cast<long long>(a.bytes), a.hbm_blocks);
      if (seen[key]++) continue;
      std::printf("## GPU %d -> %d, %s, %lld bytes, HBM traffic blocks %d\n", a.src, a.dst,
                  a.direction.c_str(), static_cast<long long>(a.bytes), a.hbm_blocks);
      double ce = 0;
      for (const auto& r : rows)
        if (r.impl == "peer_copy" && r.src == a.src && r.dst == a.dst && r.bytes == a.bytes &&
            r.direction == a.direction && r.hbm_blocks == a.hbm_blocks)
          ce = std::max(ce, r.gbps);
      std::printf("   %-44s %9s %8s %6s\n", "mover", "us", "GB/s", "share");
      std::printf("   %-44s %9s %8.1f %5.1f%%\n", "copy engine (best of the anchors)", "", ce,
                  100.0);
      std::map<std::string, const Row*> best;  // per kind, and per (kind, grid)
      for (const auto& r : rows) {
        if (r.impl != "fp8moe" || r.src != a.src || r.dst != a.dst || r.bytes != a.bytes ||
            r.direction != a.direction || r.hbm_blocks != a.hbm_blocks)
          continue;
        const std::string grid = r.mover.substr(0, r.mover.find(":w"));
        for (const std::string& k : {r.kind, "~" + grid})
          if (!best.count(k) || r.us < best[k]->us) best[k] = &r;
      }
      for (const auto& [k, r] : best)
        std::printf("   %-44s %9.2f %8.1f %5.1f%%%s\n", r->mover.c_str(), r->us, r->gbps,
                    100.0 * r->gbps / ce, k[0] == '~' ? "" : "   <- best of its kind");
    }
  }
};

void enable_peers(int n) {
  for (int i = 0; i < n; ++i) {
    FM_CHECK_CUDA(cudaSetDevice(i));
    for (int j = 0; j < n; ++j) {
      int ok = 0;
      if (i == j) continue;
      FM_CHECK_CUDA(cudaDeviceCanAccessPeer(&ok, i, j));
      if (!ok) continue;
      const cudaError_t st = cudaDeviceEnablePeerAccess(j, 0);
      if (st == cudaErrorPeerAccessAlreadyEnabled)
        cudaGetLastError();
      else
        FM_CHECK_CUDA(st);
    }
  }
}

void setup(Bench& bench, Gpu& g, int dev, int64_t max_bytes) {
  g.dev = dev;
  FM_CHECK_CUDA(cudaSetDevice(dev));
  FM_CHECK_CUDA(cudaStreamCreateWithFlags(&g.s, cudaStreamNonBlocking));
  FM_CHECK_CUDA(cudaStreamCreateWithFlags(&g.bg, cudaStreamNonBlocking));
  FM_CHECK_CUDA(cudaEventCreate(&g.start));
  FM_CHECK_CUDA(cudaEventCreate(&g.end));
  for (int k = 0; k < bench.opt.rotate; ++k) {
    char *s = nullptr, *d = nullptr;
    FM_CHECK_CUDA(cudaMalloc(&s, max_bytes + kGuard));
    FM_CHECK_CUDA(cudaMalloc(&d, max_bytes + kGuard));
    k_fill<<<264, 512>>>(reinterpret_cast<uint32_t*>(s), (max_bytes + kGuard) / 4, 1000u * dev + k);
    FM_CHECK_LAUNCH();
    FM_CHECK_CUDA(cudaMemset(d, 0, max_bytes + kGuard));
    g.src.push_back(s);
    g.dst.push_back(d);
  }
  const int64_t hbm_bytes = 1ll << 30;  // 512 MB read, 512 MB written: far past L2
  FM_CHECK_CUDA(cudaMalloc(&g.hbm, hbm_bytes));
  FM_CHECK_CUDA(cudaMemset(g.hbm, 1, hbm_bytes));
  g.hbm_half_vec = hbm_bytes / 32;
  FM_CHECK_CUDA(cudaMalloc(&g.stats, 3 * sizeof(unsigned long long)));
  FM_CHECK_CUDA(cudaMalloc(&g.bad, sizeof(unsigned long long)));
  FM_CHECK_CUDA(cudaMalloc(&g.stop, sizeof(int)));
  FM_CHECK_CUDA(cudaDeviceSynchronize());
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Bench bench;
    bench.opt = parse(argc, argv);
    if (bench.opt.list) {  // the movers a run would time, without a GPU
      for (const auto& m : bench.opt.movers.empty() ? sweep(bench.opt.quick) : bench.opt.movers)
        std::printf("%s\n", mover_name(parse_mover(m)).c_str());
      return 0;
    }
    FM_CHECK_CUDA(cudaGetDeviceCount(&bench.gpus));
    FM_CHECK_ARG(bench.gpus > 0, "nvlink_bench: no CUDA device");
    cudaDeviceProp prop{};
    FM_CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
    bench.gpu_name = prop.name;
    enable_peers(bench.gpus);
    bench.gate = fp8moe::bench::alloc_gate_flag();
    if (!bench.opt.out.empty()) {
      bench.out = std::fopen(bench.opt.out.c_str(), "w");
      FM_CHECK_ARG(bench.out != nullptr, "nvlink_bench: cannot write ", bench.opt.out);
    }
    const int64_t max_bytes = *std::max_element(bench.opt.bytes.begin(), bench.opt.bytes.end());
    std::vector<Gpu> g(static_cast<size_t>(bench.gpus));
    for (int d = 0; d < bench.gpus; ++d) setup(bench, g[d], d, max_bytes);
    std::printf("# %s x %d, sizes", bench.gpu_name.c_str(), bench.gpus);
    for (int64_t b : bench.opt.bytes) std::printf(" %lld", static_cast<long long>(b));
    std::printf(", %d iterations (median), %d buffers rotated\n", bench.opt.iters,
                bench.opt.rotate);
    // Every pair i < j whose GPUs reach each other (the reverse direction is timed in the
    // bidirectional rows); GPU 0 to itself when no pair opens.
    bool any = false;
    for (int i = 0; i < bench.gpus; ++i)
      for (int j = i + 1; j < bench.gpus; ++j) {
        int ok = 0;
        FM_CHECK_CUDA(cudaDeviceCanAccessPeer(&ok, i, j));
        if (!ok) continue;
        any = true;
        bench.run_pair(g[i], g[j]);
      }
    if (!any) bench.run_pair(g[0], g[0]);
    bench.summary();
    if (bench.out) std::fclose(bench.out);
    if (bench.failures) {
      std::printf("# %d movers delivered wrong bytes\n", bench.failures);
      return 1;
    }
    return 0;
  } catch (const fp8moe::Error& e) {
    std::fprintf(stderr, "nvlink_bench: %s\n", e.what());
    return e.kind() == fp8moe::ErrorKind::kInvalidArgument ? 2 : 1;
  }
}
