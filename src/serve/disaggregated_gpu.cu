// DisaggregatedGeneratorGpu (serve/disaggregated_gpu.h).
#include "fp8moe/serve/disaggregated_gpu.h"

#include <cuda_runtime.h>

#include <condition_variable>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <thread>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "peer_access.h"

namespace fp8moe::serve {

struct DisaggregatedGeneratorGpu::Impl {
  int prefill_device = 0, decode_device = 0;
  std::unique_ptr<GeneratorGpu> prefill, decode;
  int64_t slot_rows = 0, vocab = 0;  // a staging slot: rows [row_elems x context], then q [vocab]
  std::vector<bf16*> rows, q_rows;   // on the decoding GPU
  bf16* staging = nullptr;

  ~Impl() {
    if (staging != nullptr) {
      cudaSetDevice(decode_device);
      cudaFree(staging);
    }
    for (auto* g : {&prefill, &decode}) {
      cudaSetDevice(g == &prefill ? prefill_device : decode_device);
      g->reset();
    }
  }
};

DisaggregatedGeneratorGpu::DisaggregatedGeneratorGpu(Model& cpu, const GeneratorOptions& o,
                                                     int prefill_device, int decode_device,
                                                     int staging)
    : DisaggregatedGeneratorGpu(
          cpu.config(), o, prefill_device, decode_device,
          [&cpu](ModelGpu& gpu) { gpu.upload(cpu); }, staging) {}

DisaggregatedGeneratorGpu::DisaggregatedGeneratorGpu(const ModelConfig& config,
                                                     const GeneratorOptions& o, int prefill_device,
                                                     int decode_device,
                                                     const std::function<void(ModelGpu&)>& load,
                                                     int staging)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  int count = 0;
  FM_CHECK_CUDA(cudaGetDeviceCount(&count));
  FM_CHECK_ARG(
      prefill_device >= 0 && prefill_device < count && decode_device >= 0 && decode_device < count,
      "DisaggregatedGeneratorGpu: devices ", prefill_device, " and ", decode_device, " (", count,
      " visible)");
  FM_CHECK_ARG(prefill_device != decode_device,
               "DisaggregatedGeneratorGpu: prefill and decoding need two GPUs (on one, each half's "
               "EP kernels could hold SMs the other's wait for)");
  FM_CHECK_ARG(staging >= 1, "DisaggregatedGeneratorGpu: staging=", staging, " must be >= 1");
  FM_CHECK_ARG(o.device_sampling, "DisaggregatedGeneratorGpu: needs device sampling");
  m.prefill_device = prefill_device;
  m.decode_device = decode_device;
  detail::enable_peer_access({prefill_device, decode_device}, "DisaggregatedGeneratorGpu");
  FM_CHECK_CUDA(cudaSetDevice(prefill_device));
  m.prefill = std::make_unique<GeneratorGpu>(config, o, load);
  FM_CHECK_CUDA(cudaSetDevice(decode_device));
  m.decode = std::make_unique<GeneratorGpu>(config, o, load);
  m.vocab = config.vocab_size;
  // 16-byte aligned parts: rows then q.
  const auto up16 = [](int64_t n) { return (n + 7) / 8 * 8; };
  m.slot_rows = up16(m.decode->handoff_row_elems() * o.context);
  const int64_t slot = m.slot_rows + up16(m.vocab);
  FM_CHECK_CUDA(cudaMalloc(&m.staging, static_cast<size_t>(slot * staging) * sizeof(bf16)));
  for (int k = 0; k < staging; ++k) {
    m.rows.push_back(m.staging + k * slot);
    m.q_rows.push_back(m.staging + k * slot + m.slot_rows);
  }
}

DisaggregatedGeneratorGpu::~DisaggregatedGeneratorGpu() = default;

GeneratorGpu& DisaggregatedGeneratorGpu::prefill() {
  return *impl_->prefill;
}

GeneratorGpu& DisaggregatedGeneratorGpu::decode() {
  return *impl_->decode;
}

std::vector<std::vector<int32_t>> DisaggregatedGeneratorGpu::generate(
    const std::vector<std::vector<int32_t>>& prompts, const SamplingOptions& s,
    GenerationStats* prefill_stats, GenerationStats* decode_stats) {
  Impl& m = *impl_;
  // The staging ring: free slots, prefilled requests waiting with their slot.
  std::mutex mu;
  std::condition_variable cv;
  std::deque<int> free_slots;
  for (int k = 0; k < static_cast<int>(m.rows.size()); ++k) free_slots.push_back(k);
  std::deque<std::pair<Handoff, int>> ready;
  std::map<int64_t, int> slot_of;
  bool closed = false, stop = false;  // stop: the decoding half failed
  std::exception_ptr prefill_error;
  std::vector<int64_t> ids(prompts.size());
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int64_t>(i);

  std::thread producer([&] {
    try {
      FM_CHECK_CUDA(cudaSetDevice(m.prefill_device));
      m.prefill->prefill_only(
          prompts, s, ids,
          [&](const Handoff& h, const GeneratorGpu::HandoffWriter& write) {
            int k = 0;
            {
              std::unique_lock<std::mutex> lock(mu);
              cv.wait(lock, [&] { return !free_slots.empty() || stop; });
              FM_CHECK(!stop, "DisaggregatedGeneratorGpu: the decoding half stopped");
              k = free_slots.front();
              free_slots.pop_front();
            }
            write(m.rows[k], m.q_rows[k]);
            {
              std::lock_guard<std::mutex> lock(mu);
              ready.emplace_back(h, k);
            }
            cv.notify_all();
          },
          prefill_stats);
    } catch (...) {
      prefill_error = std::current_exception();
    }
    {
      std::lock_guard<std::mutex> lock(mu);
      closed = true;
    }
    cv.notify_all();
  });

  std::vector<std::pair<int64_t, std::vector<int32_t>>> done;
  std::exception_ptr decode_error;
  try {
    FM_CHECK_CUDA(cudaSetDevice(m.decode_device));
    done = m.decode->decode_only(
        s,
        [&](Handoff* h, const bf16** rows, const bf16** q_row, bool wait) {
          std::unique_lock<std::mutex> lock(mu);
          if (wait) cv.wait(lock, [&] { return !ready.empty() || closed; });
          if (ready.empty()) return false;
          const auto [handoff, k] = ready.front();
          ready.pop_front();
          *h = handoff;
          *rows = m.rows[k];
          *q_row = m.q_rows[k];
          slot_of[handoff.id] = k;
          return true;
        },
        [&](const Handoff& h) {
          {
            std::lock_guard<std::mutex> lock(mu);
            free_slots.push_back(slot_of.at(h.id));
            slot_of.erase(h.id);
          }
          cv.notify_all();
        },
        decode_stats);
  } catch (...) {
    decode_error = std::current_exception();
    {
      std::lock_guard<std::mutex> lock(mu);
      stop = true;
    }
    cv.notify_all();
  }
  producer.join();
  if (prefill_error) std::rethrow_exception(prefill_error);
  if (decode_error) std::rethrow_exception(decode_error);
  std::vector<std::vector<int32_t>> out(prompts.size());
  for (auto& [id, tokens] : done) out[static_cast<size_t>(id)] = std::move(tokens);
  return out;
}

}  // namespace fp8moe::serve
