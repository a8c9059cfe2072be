// Several GeneratorGpu ranks in one process (serve/generator_gpu.h, GeneratorParallel), one
// thread a rank: data-parallel attention, expert-parallel MoE, the ranks' EP endpoints connected
// directly (no IPC) and their iterations agreed at a barrier. Rank r runs on devices[r], one rank a
// GPU: each rank's passes run on their own (a whole decoding step, CUDA graph or not), and a rank
// spinning in an EP receive while a peer's GEMM on the same GPU needs its SMs would wait forever
// (comm/moe_layer_gpu.h; session 24's first run of two ranks on one GPU hung), so devices may not
// repeat. The one-process form of `fp8moe launch -n R -- fp8moe generate --device gpu` (one
// process a GPU, serve::job_parallel), for tests and benchmarks.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "fp8moe/model/model.h"
#include "fp8moe/serve/generator_gpu.h"

namespace fp8moe::serve {

class GeneratorGroup {
 public:
  // Each rank's GeneratorGpu with `cpu`'s weights (its share of the experts). kInvalidArgument
  // for no devices, a device that is not visible or repeats, or two without a peer path.
  // placements: redundant experts, one per MoE block (ModelGpuParallel::placements; empty: none).
  GeneratorGroup(Model& cpu, const GeneratorOptions& options, const std::vector<int>& devices,
                 const std::vector<ExpertPlacement>& placements = {});
  // The same, each rank's weights written by `load` on its own thread and device.
  GeneratorGroup(const ModelConfig& config, const GeneratorOptions& options,
                 const std::vector<int>& devices, const std::function<void(ModelGpu&)>& load,
                 const std::vector<ExpertPlacement>& placements = {});
  ~GeneratorGroup();
  GeneratorGroup(const GeneratorGroup&) = delete;
  GeneratorGroup& operator=(const GeneratorGroup&) = delete;

  int ranks() const;
  // Prompt i is served by rank assign[i] (empty: i % ranks) as request i (its sampling stream:
  // GeneratorGpu::generate's request_ids), so that its text does not depend on the assignment.
  // Returns every prompt's new tokens in order; stats (if given): each rank's.
  std::vector<std::vector<int32_t>> generate(const std::vector<std::vector<int32_t>>& prompts,
                                             const SamplingOptions& sampling,
                                             std::vector<GenerationStats>* stats = nullptr,
                                             const std::vector<int>& assign = {});
  GeneratorGpu& rank(int r);  // e.g. set_mtp_draft / set_cuda_graphs on each

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace fp8moe::serve
