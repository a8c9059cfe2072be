// Every mover of peer_mover.h delivers every byte and nothing more: random source bytes, the
// destination and a 4 KB guard after it poisoned first, then compared byte for byte. Runs GPU 0 ->
// GPU 1 and GPU 1 -> GPU 0 over NVLink when two GPUs can reach each other, and GPU 0 -> GPU 0
// always; sizes that leave partial items, ops and unrolled groups.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <cstring>
#include <string>
#include <vector>

#include "fp8moe/comm/peer_mover.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/philox.h"

namespace fp8moe::comm {
namespace {

constexpr int64_t kGuard = 4096;
constexpr unsigned char kPoison = 0xA5;

int gpus() {
  int n = 0;
  FM_CHECK_CUDA(cudaGetDeviceCount(&n));
  return n;
}

// (source GPU, destination GPU) pairs to test: local always, both directions of 0 <-> 1 when
// peer access works.
std::vector<std::pair<int, int>> pairs() {
  std::vector<std::pair<int, int>> p = {{0, 0}};
  if (gpus() >= 2) {
    int a = 0, b = 0;
    FM_CHECK_CUDA(cudaDeviceCanAccessPeer(&a, 0, 1));
    FM_CHECK_CUDA(cudaDeviceCanAccessPeer(&b, 1, 0));
    if (a && b) {
      for (int d : {0, 1}) {
        FM_CHECK_CUDA(cudaSetDevice(d));
        const cudaError_t st = cudaDeviceEnablePeerAccess(1 - d, 0);
        if (st == cudaErrorPeerAccessAlreadyEnabled)
          cudaGetLastError();
        else
          FM_CHECK_CUDA(st);
      }
      p.push_back({0, 1});
      p.push_back({1, 0});
    }
  }
  return p;
}

// Moves `bytes` from a buffer on `from` to one on `to` with mover c; returns the first wrong
// byte's offset (-1: all right), the guard included.
int64_t move_and_check(const MoverConfig& c, int from, int to, int64_t bytes, uint64_t seed) {
  std::vector<unsigned char> host(static_cast<size_t>(bytes));
  for (int64_t i = 0; i < bytes; i += 4) {
    const uint32_t word = philox_u32(seed, 7, static_cast<uint64_t>(i / 4));
    std::memcpy(&host[i], &word, 4);
  }
  void *src = nullptr, *dst = nullptr;
  FM_CHECK_CUDA(cudaSetDevice(from));
  FM_CHECK_CUDA(cudaMalloc(&src, bytes + kGuard));
  FM_CHECK_CUDA(cudaMemcpy(src, host.data(), bytes, cudaMemcpyHostToDevice));
  FM_CHECK_CUDA(cudaSetDevice(to));
  FM_CHECK_CUDA(cudaMalloc(&dst, bytes + kGuard));
  FM_CHECK_CUDA(cudaMemset(dst, kPoison, bytes + kGuard));
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  const int runner = mover_runs_on_destination(c) ? to : from;
  FM_CHECK_CUDA(cudaSetDevice(runner));
  cudaStream_t stream;
  FM_CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  launch_mover(c, dst, src, bytes, stream);
  FM_CHECK_CUDA(cudaStreamSynchronize(stream));
  FM_CHECK_CUDA(cudaStreamDestroy(stream));
  std::vector<unsigned char> got(static_cast<size_t>(bytes + kGuard));
  FM_CHECK_CUDA(cudaSetDevice(to));
  FM_CHECK_CUDA(cudaMemcpy(got.data(), dst, bytes + kGuard, cudaMemcpyDeviceToHost));
  FM_CHECK_CUDA(cudaFree(dst));
  FM_CHECK_CUDA(cudaSetDevice(from));
  FM_CHECK_CUDA(cudaFree(src));
  for (int64_t i = 0; i < bytes + kGuard; ++i)
    if (got[i] != (i < bytes ? host[i] : kPoison)) return i;
  return -1;
}

TEST(PeerMoverGpu, EveryMoverDeliversEveryByteAndNothingMore) {
  // Grid-strided and contiguous items, every unroll, every hint, TMA ops shorter and longer than
  // an item, grids with more warps than items.
  const char* movers[] = {"ce",
                          "st:b16:w4:u1:c0",
                          "st:b64:w8:u8:c0:lcs:scs",
                          "st:b132:w16:u2:c512:lcg:swt",
                          "st:b40:w8:u4:c7168:lna:sna",
                          "ld:b64:w8:u4:c0",
                          "ld:b24:w4:u8:c8192:lcg:scs",
                          "ld:b132:w32:u1:c2048:lna:swt",
                          "bulkst:b16:w4:c0:o4096:d4",
                          "bulkst:b64:w2:c7168:o1024:d3",
                          "bulkst:b8:w1:c0:o65536:d2",
                          "bulkld:b32:w2:c0:o16384:d2",
                          "bulkld:b132:w1:c7168:o4096:d8",
                          "stage:b32:w4:u4:c7168:o7168:d2",
                          "stage:b16:w8:u1:c0:o512:d4:lcs",
                          "stage:b64:w2:u8:c65536:o16384:d3:lna"};
  // 16 bytes, a page and 3 vectors, 37 token rows and 3 vectors, 2 MB and 1234 vectors.
  const int64_t sizes[] = {0, 16, 4096 + 48, 7168 * 37 + 48, (2 << 20) + 1234 * 16};
  uint64_t seed = 1;
  for (const auto& [from, to] : pairs()) {
    for (const char* name : movers) {
      const MoverConfig c = parse_mover(name);
      for (int64_t bytes : sizes) {
        const int64_t bad = move_and_check(c, from, to, bytes, seed++);
        EXPECT_EQ(bad, -1) << mover_name(c) << " GPU " << from << " -> GPU " << to << ", " << bytes
                           << " bytes: first wrong byte at " << bad
                           << (bad >= bytes ? " (guard written)" : "");
      }
    }
  }
}

TEST(PeerMoverGpu, LaunchRejectsMisalignedPointers) {
  void* buf = nullptr;
  FM_CHECK_CUDA(cudaSetDevice(0));
  FM_CHECK_CUDA(cudaMalloc(&buf, 8192));
  char* p = static_cast<char*>(buf);
  EXPECT_THROW(launch_mover(parse_mover("st"), p + 8, p + 4096, 1024, nullptr), Error);
  EXPECT_THROW(launch_mover(parse_mover("bulkst:w1:o1024"), p, p + 4096, 1000, nullptr), Error);
  FM_CHECK_CUDA(cudaFree(buf));
}

}  // namespace
}  // namespace fp8moe::comm
