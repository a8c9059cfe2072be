// GeneratorGroup (serve/generator_group.h).
#include "fp8moe/serve/generator_group.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <exception>
#include <mutex>
#include <thread>

#include "fp8moe/comm/device_ep.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "peer_access.h"

namespace fp8moe::serve {

struct GeneratorGroup::Impl {
  std::vector<int> devices;
  std::vector<std::unique_ptr<GeneratorGpu>> ranks;
  // The ranks' meeting point: EP workspaces of the block being connected, iteration values.
  std::unique_ptr<std::barrier<>> meet;
  std::vector<void*> bases;
  std::vector<int64_t> values;
  std::atomic<int> failed{-1};  // the first rank that threw in the current on_every_rank

  // After a meeting: a rank that failed has left, so the others stop too (rather than wait for
  // it in the EP exchanges until their timeout).
  void check_peers(int r) const {
    const int f = failed.load();
    FM_CHECK(f < 0, "GeneratorGroup: rank ", r, " stops: rank ", f, " failed");
  }

  // fn(r) on one thread a rank, each on its device. A rank that throws leaves the barrier (so the
  // others are not held at it; their EP waits then end in the EP timeout naming the rank), and
  // the first error is rethrown here.
  void on_every_rank(const std::function<void(int)>& fn) {
    const int R = static_cast<int>(devices.size());
    meet = std::make_unique<std::barrier<>>(R);
    failed = -1;
    std::mutex mu;
    std::exception_ptr first;
    std::vector<std::thread> threads;
    for (int r = 0; r < R; ++r)
      threads.emplace_back([&, r] {
        try {
          FM_CHECK_CUDA(cudaSetDevice(devices[r]));
          fn(r);
        } catch (...) {
          {
            std::lock_guard<std::mutex> lock(mu);
            if (!first) {
              first = std::current_exception();
              failed = r;
            }
          }
          meet->arrive_and_drop();
        }
      });
    for (std::thread& t : threads) t.join();
    if (first) std::rethrow_exception(first);
  }

  GeneratorParallel parallel(int r, const std::vector<ExpertPlacement>& placements) {
    GeneratorParallel par;
    par.model.rank = r;
    par.model.world = static_cast<int>(devices.size());
    par.model.placements = placements;
    par.model.make_ep_rank = [this, r](int, const comm::EpConfig& cfg) {
      auto ep = std::make_unique<comm::DeviceEpRank>(cfg, r, devices[r]);
      bases[r] = ep->workspace();
      meet->arrive_and_wait();  // every rank's workspace of this block is in `bases`
      check_peers(r);
      ep->connect(bases);
      meet->arrive_and_wait();  // read before the next block overwrites them
      return ep;
    };
    par.all_sum = [this, r](int64_t value) {
      values[r] = value;
      meet->arrive_and_wait();
      check_peers(r);
      int64_t sum = 0;
      for (int64_t v : values) sum += v;
      meet->arrive_and_wait();
      return sum;
    };
    return par;
  }
};

GeneratorGroup::GeneratorGroup(Model& cpu, const GeneratorOptions& o,
                               const std::vector<int>& devices,
                               const std::vector<ExpertPlacement>& placements)
    : GeneratorGroup(
          cpu.config(), o, devices, [&cpu](ModelGpu& gpu) { gpu.upload(cpu); }, placements) {}

GeneratorGroup::GeneratorGroup(const ModelConfig& config, const GeneratorOptions& o,
                               const std::vector<int>& devices,
                               const std::function<void(ModelGpu&)>& load,
                               const std::vector<ExpertPlacement>& placements)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  FM_CHECK_ARG(!devices.empty(), "GeneratorGroup: no devices");
  int count = 0;
  FM_CHECK_CUDA(cudaGetDeviceCount(&count));
  for (int d : devices) {
    FM_CHECK_ARG(d >= 0 && d < count, "GeneratorGroup: device ", d, " is not one of the ", count,
                 " visible");
    FM_CHECK_ARG(std::count(devices.begin(), devices.end(), d) == 1, "GeneratorGroup: device ", d,
                 " is given to several ranks: one rank a GPU (a rank spinning in an EP receive ",
                 "would hold SMs that a GEMM of another rank on the same GPU waits for)");
  }
  detail::enable_peer_access(devices, "GeneratorGroup");  // the EP kernels write peers' memory
  m.devices = devices;
  const size_t R = devices.size();
  m.bases.assign(R, nullptr);
  m.values.assign(R, 0);
  m.ranks.resize(R);
  m.on_every_rank([&](int r) {
    m.ranks[r] = std::make_unique<GeneratorGpu>(config, o, load, m.parallel(r, placements));
  });
}

GeneratorGroup::~GeneratorGroup() {
  Impl& m = *impl_;
  // Each rank's memory freed on its own device.
  try {
    m.on_every_rank([&](int r) { m.ranks[r].reset(); });
  } catch (...) {  // NOTE: a destructor must not throw; the CUDA error stays for the next call
  }
}

int GeneratorGroup::ranks() const {
  return static_cast<int>(impl_->devices.size());
}

GeneratorGpu& GeneratorGroup::rank(int r) {
  FM_CHECK_ARG(r >= 0 && r < ranks(), "GeneratorGroup::rank: ", r, " of ", ranks());
  return *impl_->ranks[r];
}

std::vector<std::vector<int32_t>> GeneratorGroup::generate(
    const std::vector<std::vector<int32_t>>& prompts, const SamplingOptions& s,
    std::vector<GenerationStats>* stats, const std::vector<int>& assign) {
  Impl& m = *impl_;
  const int R = ranks();
  FM_CHECK_ARG(assign.empty() || assign.size() == prompts.size(),
               "GeneratorGroup::generate: ", assign.size(), " ranks assigned to ", prompts.size(),
               " prompts");
  std::vector<std::vector<size_t>> mine(static_cast<size_t>(R));
  for (size_t i = 0; i < prompts.size(); ++i) {
    const int r = assign.empty() ? static_cast<int>(i % static_cast<size_t>(R)) : assign[i];
    FM_CHECK_ARG(r >= 0 && r < R, "GeneratorGroup::generate: prompt ", i, " assigned to rank ", r,
                 " of ", R);
    mine[r].push_back(i);
  }
  std::vector<std::vector<int32_t>> out(prompts.size());
  std::vector<GenerationStats> st(static_cast<size_t>(R));
  m.values.assign(static_cast<size_t>(R), 0);
  m.on_every_rank([&](int r) {
    std::vector<std::vector<int32_t>> p;
    std::vector<int64_t> ids;
    for (size_t i : mine[r]) {
      p.push_back(prompts[i]);
      ids.push_back(static_cast<int64_t>(i));
    }
    auto got = m.ranks[r]->generate(p, s, &st[r], ids);
    for (size_t k = 0; k < got.size(); ++k) out[mine[r][k]] = std::move(got[k]);
  });
  if (stats != nullptr) *stats = st;
  return out;
}

}  // namespace fp8moe::serve
