// The GPU trainer's optimizer state over slots (optimizer_state_gpu.h).
#include "optimizer_state_gpu.h"

#include <algorithm>
#include <filesystem>
#include <map>

#include "fp8moe/comm/nccl_collectives.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/model/parameter_table.h"
#include "run_common.h"

namespace fp8moe::train_detail {
namespace {

size_t slot_bytes(int64_t count, size_t element) {
  return (static_cast<size_t>(count) * element + 255) / 256 * 256;
}

template <class T>
std::vector<T> download(const T* src, int64_t n) {
  std::vector<T> out(static_cast<size_t>(n));
  FM_CHECK_CUDA(cudaMemcpy(out.data(), src, n * sizeof(T), cudaMemcpyDeviceToHost));
  return out;
}
template <class T>
void upload(T* dst, const T* src, int64_t n) {
  FM_CHECK_CUDA(cudaMemcpy(dst, src, n * sizeof(T), cudaMemcpyHostToDevice));
}

// A tensor's whole state on rank 0 while a checkpoint is assembled.
struct FullState {
  std::vector<float> value, ema;
  std::vector<uint16_t> m, v;
  int64_t values_seen = 0, state_seen = 0;  // elements filled (each exactly once)
};

// "name@offset" names a slot in a part file.
std::string slot_name(const std::string& name, int64_t offset) {
  return name + "@" + std::to_string(offset);
}

}  // namespace

OptimizerStateGpu::OptimizerStateGpu(ModelGpu& model, TrainGroup& group, bool shard,
                                     const TrainOptions& o, cudaStream_t stream)
    : model_(model), group_(group), shard_(shard) {
  FM_CHECK_ARG(!shard || group.world > 1, "a sharded optimizer needs several ranks (", group.world,
               " here)");
  const std::vector<ParameterGpu>& params = model.parameters();
  const FloatSpan rep = model.replicated_grads();
  const int64_t share = rep.count / group.world;
  const int64_t own_begin = group.rank * share, own_end = own_begin + share;
  for (size_t i = 0; i < params.size(); ++i) {
    const ParameterGpu& p = params[i];
    if (!shard || p.sharded) {
      slots_.push_back({i, 0, p.numel});
      continue;
    }
    const int64_t at = p.grad - rep.data;  // the tensor's place in the replicated run
    const int64_t lo = std::max(at, own_begin), hi = std::min(at + p.numel, own_end);
    if (hi > lo) slots_.push_back({i, lo - at, hi - lo});
  }
  size_t bytes = 0;
  for (const StateSlot& s : slots_) bytes += 2 * slot_bytes(s.count, sizeof(uint16_t));
  FM_CHECK_CUDA(cudaMalloc(&moments_, std::max<size_t>(bytes, 1)));
  FM_CHECK_CUDA(cudaMemset(moments_, 0, std::max<size_t>(bytes, 1)));
  char* at = static_cast<char*>(moments_);
  std::vector<ParameterGpu> views;
  std::vector<AdamWGpuTensor> tensors;
  for (StateSlot& s : slots_) {
    s.m = reinterpret_cast<uint16_t*>(at);
    at += slot_bytes(s.count, sizeof(uint16_t));
    s.v = reinterpret_cast<uint16_t*>(at);
    at += slot_bytes(s.count, sizeof(uint16_t));
    const ParameterGpu& p = params[s.param];
    ParameterGpu view = p;
    view.numel = s.count;
    view.value = p.value + s.offset;
    view.grad = p.grad + s.offset;
    views.push_back(view);
    AdamWGpuTensor t{view.value, view.grad, s.m, s.v, s.count, p.weight_decay, nullptr};
    // Each element once in the job's norm: a copy every rank holds counts on rank 0 only.
    t.in_norm = shard || p.sharded || group.lead();
    tensors.push_back(t);
  }
  ema_ = std::make_unique<WeightEmaGpu>(views, o.ema_decay, stream);
  adam_ = std::make_unique<AdamWGpu>(o.adam, tensors);
#if defined(FP8MOE_HAVE_NCCL)
  if (group.world > 1)
    adam_->set_norm_reduction([&group](double* sum, cudaStream_t st) {
      comm::nccl_all_reduce(group.nccl, sum, 1, comm::ReduceOp::kSum, st);
    });
#endif
}

OptimizerStateGpu::~OptimizerStateGpu() {
  adam_.reset();
  ema_.reset();
  cudaFree(moments_);
}

void OptimizerStateGpu::gather_values(cudaStream_t stream) {
  if (!shard_) return;
#if defined(FP8MOE_HAVE_NCCL)
  const FloatSpan values = model_.replicated_values();
  comm::nccl_all_gather(group_.nccl, values.data, values.count / group_.world, group_.rank, stream);
#endif
}

void OptimizerStateGpu::save(const std::string& path, const TrainOptions& o, int64_t step) {
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<ParameterGpu>& params = model_.parameters();
  auto part_path = [&](int r) { return path + ".part" + std::to_string(r); };
  const std::string tag = std::to_string(step);
  if (!group_.lead()) {
    // What rank 0 lacks: the routed experts, and with a sharded optimizer every slot.
    struct Host {
      std::string name;
      std::vector<int64_t> shape;
      std::vector<float> value, ema;
      std::vector<uint16_t> m, v;
    };
    std::vector<Host> host;
    host.reserve(slots_.size());
    std::vector<CheckpointSlot> out;
    for (size_t i = 0; i < slots_.size(); ++i) {
      const StateSlot& s = slots_[i];
      const ParameterGpu& p = params[s.param];
      if (!shard_ && !p.sharded) continue;
      host.push_back({slot_name(p.name, s.offset),
                      {s.count},
                      download(p.value + s.offset, s.count),
                      download(ema_->values(i), s.count),
                      download(s.m, s.count),
                      download(s.v, s.count)});
    }
    for (const Host& h : host)
      out.push_back({&h.name, &h.shape, h.value.data(), h.m.data(), h.v.data(), h.ema.data()});
    save_checkpoint(part_path(group_.rank), out, {}, o, step);
    group_.barrier("checkpoint parts " + tag);
    group_.barrier("checkpoint written " + tag);
    return;
  }
  group_.barrier("checkpoint parts " + tag);
  const ParameterTable table = model_parameter_table(o.model);
  std::map<std::string, FullState> full;
  for (const ParameterSpec& spec : table.parameters) {
    FullState& f = full[spec.name];
    const size_t n = static_cast<size_t>(spec.numel());
    f.value.resize(n);
    f.ema.resize(n);
    f.m.resize(n);
    f.v.resize(n);
  }
  auto place = [&](const std::string& name, int64_t offset, int64_t count, const float* value,
                   const float* ema, const uint16_t* m, const uint16_t* v) {
    auto it = full.find(name);
    FM_CHECK(it != full.end(), "checkpoint: '", name, "' is not a parameter of the model");
    FullState& f = it->second;
    FM_CHECK(offset >= 0 && offset + count <= static_cast<int64_t>(f.value.size()),
             "checkpoint: a slot of '", name, "' at ", offset, " + ", count, " outside its ",
             f.value.size(), " elements");
    if (value != nullptr) {
      std::copy(value, value + count, f.value.begin() + offset);
      f.values_seen += count;
    }
    std::copy(ema, ema + count, f.ema.begin() + offset);
    std::copy(m, m + count, f.m.begin() + offset);
    std::copy(v, v + count, f.v.begin() + offset);
    f.state_seen += count;
  };
  for (const ParameterGpu& p : params) {  // every value this rank holds, whole
    const std::vector<float> value = download(p.value, p.numel);
    FullState& f = full.at(p.name);
    std::copy(value.begin(), value.end(), f.value.begin());
    f.values_seen += p.numel;
  }
  for (size_t i = 0; i < slots_.size(); ++i) {
    const StateSlot& s = slots_[i];
    const std::vector<float> ema = download(ema_->values(i), s.count);
    const std::vector<uint16_t> m = download(s.m, s.count), v = download(s.v, s.count);
    place(params[s.param].name, s.offset, s.count, nullptr, ema.data(), m.data(), v.data());
  }
  std::vector<std::string> parts;
  for (int r = 1; r < group_.world; ++r) {
    parts.push_back(part_path(r));
    const SafetensorsFile f = open_checkpoint(parts.back());
    for (const auto& [key, entry] : f.entries()) {
      if (key.rfind("param/", 0) != 0) continue;
      const std::string slot = key.substr(6);
      const size_t at = slot.rfind('@');
      FM_CHECK(at != std::string::npos, f.what(), ": tensor '", key, "' names no slot offset");
      const std::string name = slot.substr(0, at);
      const int64_t offset = std::stoll(slot.substr(at + 1));
      int64_t n = 1;
      for (int64_t d : entry.shape) n *= d;
      const bool expert = std::none_of(params.begin(), params.end(),
                                       [&](const ParameterGpu& p) { return p.name == name; });
      const std::vector<float> value = f.f32("param/" + slot, n), ema = f.f32("ema/" + slot, n);
      const std::vector<uint16_t> m = f.u16("adam_m/" + slot, "BF16", n),
                                  v = f.u16("adam_v/" + slot, "BF16", n);
      // Replicated values rank 0 holds already (the same after the all-gather); experts' are new.
      place(name, offset, n, expert ? value.data() : nullptr, ema.data(), m.data(), v.data());
    }
  }
  std::vector<CheckpointSlot> out, buffers;
  for (const ParameterSpec& spec : table.parameters) {
    const FullState& f = full.at(spec.name);
    FM_CHECK(f.values_seen == spec.numel() && f.state_seen == spec.numel(), "checkpoint: '",
             spec.name, "' has ", f.values_seen, " values and ", f.state_seen,
             " optimizer elements from the ranks, not ", spec.numel());
    out.push_back({&spec.name, &spec.shape, f.value.data(), f.m.data(), f.v.data(), f.ema.data()});
  }
  std::vector<std::vector<float>> buffer_values;
  for (const ParameterGpu& b : model_.buffers())
    buffer_values.push_back(download(b.value, b.numel));
  for (size_t i = 0; i < model_.buffers().size(); ++i)
    buffers.push_back(
        {&model_.buffers()[i].name, &model_.buffers()[i].shape, buffer_values[i].data()});
  save_checkpoint(path, out, buffers, o, step);
  for (const std::string& part : parts) std::filesystem::remove(part);
  group_.barrier("checkpoint written " + tag);
}

int64_t OptimizerStateGpu::load(const std::string& path, const TrainOptions& o) {
  int64_t step = 0;
  const SafetensorsFile f = open_checkpoint_for(path, o, &step);
  const std::vector<ParameterGpu>& params = model_.parameters();
  for (const ParameterGpu& p : params) {
    const std::vector<float> value = f.f32("param/" + p.name, p.numel);
    upload(p.value, value.data(), p.numel);
  }
  for (size_t i = 0; i < slots_.size(); ++i) {
    const StateSlot& s = slots_[i];
    const ParameterGpu& p = params[s.param];
    const std::vector<uint16_t> m = f.u16("adam_m/" + p.name, "BF16", p.numel),
                                v = f.u16("adam_v/" + p.name, "BF16", p.numel);
    const std::vector<float> ema = f.f32("ema/" + p.name, p.numel);
    upload(s.m, m.data() + s.offset, s.count);
    upload(s.v, v.data() + s.offset, s.count);
    upload(ema_->values(i), ema.data() + s.offset, s.count);
  }
  for (const ParameterGpu& b : model_.buffers()) {
    const std::vector<float> value = f.f32("buffer/" + b.name, b.numel);
    upload(b.value, value.data(), b.numel);
  }
  return step;
}

}  // namespace fp8moe::train_detail
