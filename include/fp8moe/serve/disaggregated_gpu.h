// Prefill/decode disaggregation in one process (V3's serving deployment: prompts are prefilled on
// their own GPUs, decoding runs on others, so that a new prompt's prefill never stalls the
// running sequences' decoding steps): one GeneratorGpu prefills on prefill_device
// (GeneratorGpu::prefill_only), one decodes on decode_device (GeneratorGpu::decode_only), each on
// its own thread. A prefilled request's latent cache rows (every layer's, [layers, length, 576]
// BF16 at V3's shape) and, with the MTP draft, its draft row are written by the prefilling GPU
// straight into one of `staging` slots on the decoding GPU (peer access), then copied into the
// decoding GPU's pages when it joins the batch; a full staging ring holds the prefilling GPU back.
// The text is the same as one GeneratorGpu's (bit for bit on GPUs of one kind: the same kernels
// on the same inputs, the sampler's draws carried over), greedy and sampled, with or without the
// MTP draft. Two distinct GPUs (one GPU's two halves could each hold SMs the other's one-rank EP
// kernels wait for). Device sampling only.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "fp8moe/model/model.h"
#include "fp8moe/serve/generator_gpu.h"

namespace fp8moe::serve {

class DisaggregatedGeneratorGpu {
 public:
  DisaggregatedGeneratorGpu(Model& cpu, const GeneratorOptions& options, int prefill_device,
                            int decode_device, int staging = 4);
  // The same, each half's weights written by `load` (on its device).
  DisaggregatedGeneratorGpu(const ModelConfig& config, const GeneratorOptions& options,
                            int prefill_device, int decode_device,
                            const std::function<void(ModelGpu&)>& load, int staging = 4);
  ~DisaggregatedGeneratorGpu();
  DisaggregatedGeneratorGpu(const DisaggregatedGeneratorGpu&) = delete;
  DisaggregatedGeneratorGpu& operator=(const DisaggregatedGeneratorGpu&) = delete;

  // Each prompt's new tokens in the prompts' order (request ids 0, 1, ...: GeneratorGpu's
  // sampling streams). Stats of each half: the prefilling GPU's (prefill time, first-token
  // times) and the decoding GPU's (decoding steps, token gaps; first-token times as handed over).
  std::vector<std::vector<int32_t>> generate(const std::vector<std::vector<int32_t>>& prompts,
                                             const SamplingOptions& sampling,
                                             GenerationStats* prefill_stats = nullptr,
                                             GenerationStats* decode_stats = nullptr);
  GeneratorGpu& prefill();  // e.g. set_mtp_draft on both halves
  GeneratorGpu& decode();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace fp8moe::serve
