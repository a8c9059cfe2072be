// train_gpu (train/trainer_gpu.h): the CPU trainer's loop (trainer.cpp) with the model, the
// optimizer and the per-step state on one GPU, or on the GPUs of a job's ranks (expert-parallel
// MoE blocks, data-parallel everything else: TrainGroup below).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "fp8moe/comm/launcher.h"
#include "fp8moe/comm/nccl_bootstrap.h"
#include "fp8moe/comm/nccl_collectives.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/model/model_gpu.h"
#include "fp8moe/model/model_kernels_gpu.h"
#include "fp8moe/model/parameter_table.h"
#include "fp8moe/train/adamw_gpu.h"
#include "fp8moe/train/data.h"
#include "fp8moe/train/train_state_gpu.h"
#include "fp8moe/train/trainer_gpu.h"
#include "run_common.h"

namespace fp8moe {

namespace {

using namespace train_detail;

// Owns the run's stream, graph and device / pinned buffers.
struct GpuRun {
  cudaStream_t stream = nullptr;
  cudaGraph_t graph = nullptr;  // forward + backward
  cudaGraphExec_t graph_exec = nullptr;
  cudaGraph_t reduce_graph = nullptr;  // the ranks' reductions (several GPUs)
  cudaGraphExec_t reduce_exec = nullptr;
  cudaEvent_t phase[6] = {};  // GpuTrainOptions::phase_times
  void* moments = nullptr;    // BF16 m and v of every parameter
  int32_t* tokens = nullptr;  // device [batch, window]
  LossGpu* loss = nullptr;    // device
  int32_t* host_tokens = nullptr;
  LossGpu* host_loss = nullptr;
  AdamWGpuState* host_state = nullptr;
  uint32_t* host_status = nullptr;

  ~GpuRun() {
    if (graph_exec != nullptr) cudaGraphExecDestroy(graph_exec);
    if (graph != nullptr) cudaGraphDestroy(graph);
    if (reduce_exec != nullptr) cudaGraphExecDestroy(reduce_exec);
    if (reduce_graph != nullptr) cudaGraphDestroy(reduce_graph);
    for (cudaEvent_t e : phase)
      if (e != nullptr) cudaEventDestroy(e);
    for (void* p : {moments, static_cast<void*>(tokens), static_cast<void*>(loss)})
      if (p != nullptr) cudaFree(p);
    for (void* p : {static_cast<void*>(host_tokens), static_cast<void*>(host_loss),
                    static_cast<void*>(host_state), static_cast<void*>(host_status)})
      if (p != nullptr) cudaFreeHost(p);
    if (stream != nullptr) cudaStreamDestroy(stream);
  }
};


// The ranks of a `fp8moe launch` job (one process per GPU, one host), or this process alone.
// Rank r holds the routed experts [r E / R, (r + 1) E / R) of every MoE block and a copy of every
// other tensor; it runs forward and backward on its share of the global batch (rows [r B / R,
// (r + 1) B / R) of the batch the one-GPU run would take), the MoE blocks exchanging tokens over
// EP (DeviceEpRank, CUDA IPC); then the copies' gradients are averaged (NCCL), the experts'
// scaled by 1 / R (each rank's loss is a mean over its own tokens), the expert loads and the
// losses summed, and the grad norm reduced, so every rank takes the same optimizer step and the
// job computes what one GPU computes on the whole batch.
struct TrainGroup {
  int rank = 0, world = 1, device = 0;
  std::unique_ptr<comm::Store> store;
  void* nccl = nullptr;
  // Every store key and barrier of this run starts with it: "train<k>/" for the process's k-th
  // run, so that runs one after another in the same job never read each other's keys (the same
  // on every rank: each rank makes the same train_gpu calls in the same order).
  std::string prefix;

  bool lead() const { return rank == 0; }
  TrainGroup() = default;
  TrainGroup(const TrainGroup&) = delete;
  TrainGroup& operator=(const TrainGroup&) = delete;
  ~TrainGroup() {
#if defined(FP8MOE_HAVE_NCCL)
    if (nccl != nullptr) comm::nccl_comm_destroy(nccl);
#endif
  }
  void barrier(const std::string& name) const {
    if (world > 1) store->barrier(prefix + name, kStoreWaitS);
  }
  static constexpr double kStoreWaitS = 600;  // a checkpoint of a large model may take minutes
};

void join_group(const GpuTrainOptions& g, TrainGroup& group) {
  static int runs = 0;
  group.device = g.device;
  group.prefix = "train" + std::to_string(runs++) + "/";
  if (!comm::launched_as_rank()) return;
  const comm::RankEnv env = comm::rank_env();
  if (env.world_size == 1) return;
#if defined(FP8MOE_HAVE_NCCL)
  FM_CHECK_ARG(env.local_world_size == env.world_size, "the GPU trainer runs on one host: ",
               env.world_size, " ranks, ", env.local_world_size, " on this host");
  int count = 0;
  FM_CHECK_CUDA(cudaGetDeviceCount(&count));
  group.rank = env.rank;
  group.world = env.world_size;
  group.device = comm::rank_device(env, count);
  group.store = std::make_unique<comm::Store>(comm::Store::from_env());
  const std::vector<std::string> devices =
      group.store->all_gather(group.prefix + "device", std::to_string(group.device),
                              TrainGroup::kStoreWaitS);
  for (int r = 0; r < group.world; ++r)
    for (int q = 0; q < r; ++q)
      FM_CHECK_ARG(devices[q] != devices[r], "the GPU trainer takes one GPU per rank (NCCL): ",
                   "ranks ", q, " and ", r, " both drive device ", devices[r], " (", count,
                   " visible)");
  group.nccl = comm::nccl_comm_init_rank(*group.store, group.device, group.prefix + "nccl",
                                         TrainGroup::kStoreWaitS);
#else
  FM_THROW(ErrorKind::kInvalidArgument, "the GPU trainer over ", env.world_size,
           " ranks needs NCCL: this build has none (cmake/Fp8moeNccl.cmake)");
#endif
}

// The EP endpoint of MoE block `block`, connected to the other ranks' over CUDA IPC.
std::unique_ptr<comm::DeviceEpRank> make_ep_rank(TrainGroup& group, int block,
                                                 const comm::EpConfig& cfg) {
  auto ep = std::make_unique<comm::DeviceEpRank>(cfg, group.rank, group.device);
  const cudaIpcMemHandle_t mine = ep->ipc_handle();
  const std::string key = group.prefix + "ep/" + std::to_string(block);
  const std::vector<std::string> all = group.store->all_gather(
      key, std::string_view(reinterpret_cast<const char*>(&mine), sizeof mine),
      TrainGroup::kStoreWaitS);
  std::vector<cudaIpcMemHandle_t> handles(all.size());
  for (size_t r = 0; r < all.size(); ++r) {
    FM_CHECK(all[r].size() == sizeof(cudaIpcMemHandle_t), "store key ", key, " of rank ", r,
             " holds ", all[r].size(), " bytes");
    std::memcpy(&handles[r], all[r].data(), sizeof(cudaIpcMemHandle_t));
  }
  ep->connect_ipc(handles);
  group.barrier("ep/" + std::to_string(block) + "/connected");
  return ep;
}

// This rank's rows of a global batch of o.batch windows.
std::vector<int32_t> rank_rows(const std::vector<int32_t>& batch, const TrainGroup& group,
                               int64_t window) {
  const size_t per = batch.size() / static_cast<size_t>(group.world);
  FM_CHECK(per * static_cast<size_t>(group.world) == batch.size() &&
               per % static_cast<size_t>(window) == 0,
           "a batch of ", batch.size(), " tokens does not split into ", group.world, " ranks");
  const auto first = batch.begin() + static_cast<std::ptrdiff_t>(per * group.rank);
  return std::vector<int32_t>(first, first + static_cast<std::ptrdiff_t>(per));
}

// The job's mean of each rank's losses (equal token counts, so the mean over all tokens).
void reduce_loss(TrainGroup& group, LossGpu* loss, cudaStream_t s) {
  if (group.world == 1) return;
#if defined(FP8MOE_HAVE_NCCL)
  static_assert(sizeof(LossGpu) % sizeof(double) == 0, "LossGpu is doubles only");
  comm::nccl_all_reduce(group.nccl, reinterpret_cast<double*>(loss),
                        static_cast<int64_t>(sizeof(LossGpu) / sizeof(double)), comm::ReduceOp::kAvg,
                        s);
#endif
}

// The decoder blocks' gradient averages on a second stream while the backward goes on
// (GpuTrainOptions::overlap_reduce): ModelGpu::set_grad_ready enqueues each block's all-reduce
// behind an event of the main stream; join() makes the main stream wait for all of them.
class OverlappedReduce {
 public:
  OverlappedReduce(TrainGroup& group, ModelGpu& model) : group_(group) {
    FM_CHECK_CUDA(cudaStreamCreateWithFlags(&side_, cudaStreamNonBlocking));
    FM_CHECK_CUDA(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
    FM_CHECK_CUDA(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
    model.set_grad_ready([this](GradSpan grads, cudaStream_t s) { reduce(grads, s); });
  }
  ~OverlappedReduce() {
    cudaEventDestroy(ready_);
    cudaEventDestroy(done_);
    cudaStreamDestroy(side_);
  }
  OverlappedReduce(const OverlappedReduce&) = delete;
  OverlappedReduce& operator=(const OverlappedReduce&) = delete;

  void join(cudaStream_t s) {
    FM_CHECK_CUDA(cudaEventRecord(done_, side_));
    FM_CHECK_CUDA(cudaStreamWaitEvent(s, done_, 0));
  }

 private:
  void reduce(GradSpan grads, cudaStream_t s) {
    FM_CHECK_CUDA(cudaEventRecord(ready_, s));
    FM_CHECK_CUDA(cudaStreamWaitEvent(side_, ready_, 0));
#if defined(FP8MOE_HAVE_NCCL)
    comm::nccl_all_reduce(group_.nccl, grads.data, grads.count, comm::ReduceOp::kAvg, side_);
#endif
  }
  TrainGroup& group_;
  cudaStream_t side_ = nullptr;
  cudaEvent_t ready_ = nullptr, done_ = nullptr;
};

// After forward_backward, on every rank in the same order (capturable): the job's gradients
// (only those outside the decoder blocks when `overlapped` reduced the blocks' already), expert
// loads and losses.
void reduce_step(TrainGroup& group, ModelGpu& model, LossGpu* loss, bool overlapped,
                 cudaStream_t s) {
  if (group.world == 1) return;
#if defined(FP8MOE_HAVE_NCCL)
  const GradSpan own = model.sharded_grads();
  const std::vector<GradSpan> rep =
      overlapped ? model.replicated_rest() : std::vector<GradSpan>{model.replicated_grads()};
  for (const GradSpan& span : rep)
    comm::nccl_all_reduce(group.nccl, span.data, span.count, comm::ReduceOp::kAvg, s);
  scale_f32_gpu(own.data, own.count, 1.0f / static_cast<float>(group.world), s);
  const int64_t E = model.config().n_routed_experts;
  for (int b = 0; b < model.moe_blocks(); ++b)
    comm::nccl_all_reduce(group.nccl, model.expert_load(b), E, comm::ReduceOp::kSum, s);
  reduce_loss(group, loss, s);
#endif
}
std::vector<float> download_f32(const float* src, int64_t n) {
  std::vector<float> out(static_cast<size_t>(n));
  FM_CHECK_CUDA(cudaMemcpy(out.data(), src, n * sizeof(float), cudaMemcpyDeviceToHost));
  return out;
}
std::vector<uint16_t> download_u16(const uint16_t* src, int64_t n) {
  std::vector<uint16_t> out(static_cast<size_t>(n));
  FM_CHECK_CUDA(cudaMemcpy(out.data(), src, n * sizeof(uint16_t), cudaMemcpyDeviceToHost));
  return out;
}
template <class T>
void upload(T* dst, const std::vector<T>& src) {
  FM_CHECK_CUDA(cudaMemcpy(dst, src.data(), src.size() * sizeof(T), cudaMemcpyHostToDevice));
}

struct Moments {
  std::vector<uint16_t*> m, v;
};

Moments allocate_moments(const std::vector<ParameterGpu>& params, GpuRun& run) {
  std::vector<size_t> offsets;
  size_t bytes = 0;
  for (const ParameterGpu& p : params) {
    offsets.push_back(bytes);
    bytes += 2 * ((static_cast<size_t>(p.numel) * sizeof(uint16_t) + 255) / 256 * 256);
  }
  FM_CHECK_CUDA(cudaMalloc(&run.moments, bytes == 0 ? 1 : bytes));
  FM_CHECK_CUDA(cudaMemset(run.moments, 0, bytes == 0 ? 1 : bytes));
  Moments mo;
  for (size_t i = 0; i < params.size(); ++i) {
    char* base = static_cast<char*>(run.moments) + offsets[i];
    mo.m.push_back(reinterpret_cast<uint16_t*>(base));
    mo.v.push_back(reinterpret_cast<uint16_t*>(
        base + (static_cast<size_t>(params[i].numel) * sizeof(uint16_t) + 255) / 256 * 256));
  }
  return mo;
}

// Host copies of parameter i's value, EMA and moments.
struct HostState {
  std::vector<float> value, ema;
  std::vector<uint16_t> m, v;
};
HostState download_state(const ParameterGpu& p, size_t i, const Moments& mo,
                         const WeightEmaGpu& ema) {
  return {download_f32(p.value, p.numel), download_f32(ema.values(i), p.numel),
          download_u16(mo.m[i], p.numel), download_u16(mo.v[i], p.numel)};
}

// One checkpoint file in the one-GPU format, written by rank 0: the other ranks first write
// their routed experts to part files beside it (same format), which rank 0 reads back in the
// CPU table's order and removes after the checkpoint is in place.
void save_gpu_checkpoint(const std::string& path, ModelGpu& model, const Moments& mo,
                         const WeightEmaGpu& ema, const TrainOptions& o, int64_t step,
                         const TrainGroup& group) {
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  const auto& params = model.parameters();
  auto part_path = [&](int r) { return path + ".part" + std::to_string(r); };
  if (!group.lead()) {
    std::vector<HostState> host;
    host.reserve(params.size());
    std::vector<CheckpointSlot> slots;
    for (size_t i = 0; i < params.size(); ++i) {
      if (!params[i].sharded) continue;
      host.push_back(download_state(params[i], i, mo, ema));
      const HostState& h = host.back();
      slots.push_back({&params[i].name, &params[i].shape, h.value.data(), h.m.data(), h.v.data(),
                       h.ema.data()});
    }
    save_checkpoint(part_path(group.rank), slots, {}, o, step);
    group.barrier("checkpoint parts " + std::to_string(step));
    group.barrier("checkpoint written " + std::to_string(step));
    return;
  }
  group.barrier("checkpoint parts " + std::to_string(step));
  std::map<std::string, HostState> host;
  for (size_t i = 0; i < params.size(); ++i)
    host[params[i].name] = download_state(params[i], i, mo, ema);
  std::vector<std::string> parts;
  for (int r = 1; r < group.world; ++r) {
    parts.push_back(part_path(r));
    const SafetensorsFile f = open_checkpoint(parts.back());
    for (const auto& [key, entry] : f.entries()) {
      if (key.rfind("param/", 0) != 0) continue;
      const std::string name = key.substr(6);
      int64_t n = 1;
      for (int64_t d : entry.shape) n *= d;
      host[name] = {f.f32("param/" + name, n), f.f32("ema/" + name, n),
                    f.u16("adam_m/" + name, "BF16", n), f.u16("adam_v/" + name, "BF16", n)};
    }
  }
  const ParameterTable table = model_parameter_table(o.model);
  std::vector<CheckpointSlot> slots, buffers;
  for (const ParameterSpec& spec : table.parameters) {
    auto it = host.find(spec.name);
    FM_CHECK(it != host.end(), "checkpoint: no rank holds '", spec.name, "'");
    FM_CHECK(static_cast<int64_t>(it->second.value.size()) == spec.numel(), "checkpoint: '",
             spec.name, "' has ", it->second.value.size(), " elements, the table ", spec.numel());
    slots.push_back({&spec.name, &spec.shape, it->second.value.data(), it->second.m.data(),
                     it->second.v.data(), it->second.ema.data()});
  }
  std::vector<std::vector<float>> buffer_values;
  for (const ParameterGpu& b : model.buffers())
    buffer_values.push_back(download_f32(b.value, b.numel));
  for (size_t i = 0; i < model.buffers().size(); ++i)
    buffers.push_back(
        {&model.buffers()[i].name, &model.buffers()[i].shape, buffer_values[i].data()});
  save_checkpoint(path, slots, buffers, o, step);
  for (const std::string& part : parts) std::filesystem::remove(part);
  group.barrier("checkpoint written " + std::to_string(step));
}

int64_t load_gpu_checkpoint(const std::string& path, ModelGpu& model, const Moments& mo,
                            WeightEmaGpu& ema, const TrainOptions& o) {
  int64_t step = 0;
  const SafetensorsFile f = open_checkpoint_for(path, o, &step);
  const auto& params = model.parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    const ParameterGpu& p = params[i];
    upload(p.value, f.f32("param/" + p.name, p.numel));
    upload(mo.m[i], f.u16("adam_m/" + p.name, "BF16", p.numel));
    upload(mo.v[i], f.u16("adam_v/" + p.name, "BF16", p.numel));
    upload(ema.values(i), f.f32("ema/" + p.name, p.numel));
  }
  for (const ParameterGpu& b : model.buffers()) upload(b.value, f.f32("buffer/" + b.name, b.numel));
  return step;
}

}  // namespace

TrainResult train_gpu(const TrainOptions& opts, const GpuTrainOptions& g) {
  TrainOptions o = opts;
  FM_CHECK_ARG(o.steps > 0, "--steps must be positive");
  FM_CHECK_ARG(o.batch > 0 && o.seq > 0, "--batch and --seq must be positive");
  FM_CHECK_ARG(!o.out_dir.empty(), "an output folder (--out) is needed");
  FM_CHECK_ARG(o.checkpoint || o.stop_after == 0,
               "--stop-after without a checkpoint could not be resumed (drop --no-checkpoint)");
  FM_CHECK_ARG(o.precision == Precision::kFp8, "the GPU trainer runs the FP8 recipe only (",
               "--precision fp8), not ", precision_name(o.precision));
  o.adam.total_steps = o.steps;
  TrainGroup group;
  join_group(g, group);
  const int64_t R = group.world;
  FM_CHECK_ARG(o.batch % R == 0, "--batch ", o.batch, " (the whole job's) does not split over ",
               R, " ranks");
  FM_CHECK_ARG(o.model.n_routed_experts % R == 0, "the model's ", o.model.n_routed_experts,
               " routed experts do not split over ", R, " ranks");
  const int64_t local_batch = o.batch / R;
  RunLog log(o, R == 1 ? "gpu" : "gpu x" + std::to_string(R));
  FM_CHECK_CUDA(cudaSetDevice(group.device));

  const TokenData data = load_run_data(o);
  const int64_t window = o.seq + o.model.num_nextn_predict_layers + 1;
  if (group.lead()) std::filesystem::create_directories(o.out_dir);
  group.barrier("out dir");
  const std::string ckpt_path = o.out_dir + "/" + kCheckpointFile;

  GpuRun run;
  FM_CHECK_CUDA(cudaStreamCreateWithFlags(&run.stream, cudaStreamNonBlocking));
  cudaStream_t s = run.stream;
  ModelGpuParallel par;
  par.rank = group.rank;
  par.world = group.world;
  if (R > 1)
    par.make_ep_rank = [&group](int block, const comm::EpConfig& cfg) {
      return make_ep_rank(group, block, cfg);
    };
  ModelGpu model(o.model, local_batch, o.seq, par);
  FM_CHECK(model.window() == window, "ModelGpu's window ", model.window(), " != ", window);
  std::vector<ParameterGpu>& params = model.parameters();
  const Moments mo = allocate_moments(params, run);
  init_parameters_gpu(params, model.buffers(), o.seed, o.model.initializer_range, s);
  WeightEmaGpu ema(params, o.ema_decay, s);
  int64_t start = 0;
  if (o.resume) {
    FM_CHECK_CUDA(cudaStreamSynchronize(s));
    start = load_gpu_checkpoint(ckpt_path, model, mo, ema, o);
  }
  model.refresh(s);

  std::vector<AdamWGpuTensor> tensors;
  for (size_t i = 0; i < params.size(); ++i) {
    AdamWGpuTensor t{params[i].value, params[i].grad, mo.m[i], mo.v[i], params[i].numel,
                     params[i].weight_decay, nullptr};
    t.in_norm = params[i].sharded || group.lead();  // every copy's gradient is the same
    tensors.push_back(t);
  }
  AdamWGpu adam(o.adam, tensors);
#if defined(FP8MOE_HAVE_NCCL)
  if (R > 1)
    adam.set_norm_reduction([&group](double* sum, cudaStream_t st) {
      comm::nccl_all_reduce(group.nccl, sum, 1, comm::ReduceOp::kSum, st);
    });
#endif
  FM_CHECK(static_cast<size_t>(model.moe_blocks()) == model.buffers().size(), "ModelGpu has ",
           model.moe_blocks(), " MoE blocks but ", model.buffers().size(), " router biases");
  std::vector<const int32_t*> loads;
  for (int b = 0; b < model.moe_blocks(); ++b) loads.push_back(model.expert_load(b));
  RouterBiasUpdateGpu bias_update(model.buffers(), loads);

  TrainResult result;
  std::ofstream metrics;
  if (group.lead()) {
    result.losses = restart_metrics(o.out_dir, start, metrics);
    std::filesystem::copy_file(o.tokenizer, o.out_dir + "/tokenizer.model",
                               std::filesystem::copy_options::overwrite_existing);
  }

  const size_t token_bytes = static_cast<size_t>(local_batch * window) * sizeof(int32_t);
  FM_CHECK_CUDA(cudaMalloc(&run.tokens, token_bytes));
  FM_CHECK_CUDA(cudaMalloc(&run.loss, sizeof(LossGpu)));
  FM_CHECK_CUDA(cudaMallocHost(&run.host_tokens, token_bytes));
  FM_CHECK_CUDA(cudaMallocHost(&run.host_loss, sizeof(LossGpu)));
  FM_CHECK_CUDA(cudaMallocHost(&run.host_state, sizeof(AdamWGpuState)));
  FM_CHECK_CUDA(cudaMallocHost(&run.host_status, sizeof(uint32_t)));
  const int64_t depth = o.model.num_nextn_predict_layers;

  // The rank's rows of the global batch (the one-GPU run's batch, whatever the rank count).
  auto load_batch = [&](const std::vector<int32_t>& batch) {
    const std::vector<int32_t> mine = R == 1 ? batch : rank_rows(batch, group, window);
    std::memcpy(run.host_tokens, mine.data(), token_bytes);
    FM_CHECK_CUDA(
        cudaMemcpyAsync(run.tokens, run.host_tokens, token_bytes, cudaMemcpyHostToDevice, s));
  };
  // Reads the step's results; the status bits name a bad token id or position, as the CPU would.
  auto finish_step = [&](const char* what) {
    FM_CHECK_CUDA(
        cudaMemcpyAsync(run.host_loss, run.loss, sizeof(LossGpu), cudaMemcpyDeviceToHost, s));
    FM_CHECK_CUDA(cudaMemcpyAsync(run.host_state, adam.device_state(), sizeof(AdamWGpuState),
                                  cudaMemcpyDeviceToHost, s));
    check_model_kernels_status(model.status(), what, s);
  };
  if (g.phase_times)
    for (cudaEvent_t& e : run.phase) FM_CHECK_CUDA(cudaEventCreate(&e));
  std::unique_ptr<OverlappedReduce> overlap;
  if (R > 1 && g.overlap_reduce) overlap = std::make_unique<OverlappedReduce>(group, model);
  auto mark = [&](int i) {
    if (g.phase_times) FM_CHECK_CUDA(cudaEventRecord(run.phase[i], s));
  };
  // Captured on the second step (the first ran eagerly, so every lazy setup is done), then
  // replayed; `body` enqueues the work.
  auto replay = [&](bool capture, cudaGraph_t& graph, cudaGraphExec_t& exec, auto&& body) {
    if (exec != nullptr) {
      FM_CHECK_CUDA(cudaGraphLaunch(exec, s));
    } else if (capture) {
      FM_CHECK_CUDA(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
      body();
      FM_CHECK_CUDA(cudaStreamEndCapture(s, &graph));
      FM_CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
      FM_CHECK_CUDA(cudaGraphLaunch(exec, s));
    } else {
      body();
    }
  };

  const int64_t end = o.stop_after > 0 ? std::min(o.steps, start + o.stop_after) : o.steps;
  if (group.lead()) log.begin_loop(start, end, &metrics);
  for (int64_t step = start; step < end; ++step) {
    load_batch(sample_batch(data.train, o.batch, window, o.seed, step));
    const bool capture = g.cuda_graph && step > start;
    mark(0);
    replay(capture, run.graph, run.graph_exec, [&] {
      model.forward_backward(run.tokens, o.mtp_weight, true, run.loss, s);
      if (overlap) overlap->join(s);
    });
    mark(1);
    if (R > 1)
      replay(capture, run.reduce_graph, run.reduce_exec,
             [&] { reduce_step(group, model, run.loss, overlap != nullptr, s); });
    mark(2);
    adam.step(step, s);
    mark(3);
    bias_update.update(o.bias_update_speed, s);
    ema.update(s);
    mark(4);
    model.refresh(s);
    mark(5);
    finish_step("the GPU training step");
    const LossGpu& got = *run.host_loss;
    FM_CHECK(std::isfinite(got.loss), "the loss is not finite at step ", step + 1);
    if (group.lead()) {
      result.losses.push_back(got.loss);
      LossReport rep;
      rep.loss = got.loss;
      rep.main_loss = got.main_loss;
      rep.mtp_loss.assign(got.mtp_loss, got.mtp_loss + depth);
      rep.balance_loss = got.balance_loss;
      std::vector<std::pair<std::string, double>> phases;
      if (g.phase_times) {
        FM_CHECK_CUDA(cudaEventSynchronize(run.phase[5]));
        const char* names[5] = {"fb_ms", "reduce_ms", "adam_ms", "state_ms", "refresh_ms"};
        for (int i = 0; i < 5; ++i) {
          float ms = 0;
          FM_CHECK_CUDA(cudaEventElapsedTime(&ms, run.phase[i], run.phase[i + 1]));
          phases.emplace_back(names[i], static_cast<double>(ms));
        }
      }
      log.step(step, rep, run.host_state->grad_norm, phases);
    }
    if (checkpoint_due(o, step, end))
      save_gpu_checkpoint(ckpt_path, model, mo, ema, o, step + 1, group);
  }
  if (group.lead()) log.end_loop();
  if (o.checkpoint) save_gpu_checkpoint(ckpt_path, model, mo, ema, o, end, group);

  // Held-out loss on the CPU trainer's fixed windows of the validation stream.
  if (o.eval_batches > 0 && static_cast<int64_t>(data.valid.size()) > window) {
    double sum = 0;
    for (int64_t i = 0; i < o.eval_batches; ++i) {
      load_batch(eval_batch(data, o, window, i));
      model.forward_backward(run.tokens, o.mtp_weight, false, run.loss, s);
      reduce_loss(group, run.loss, s);
      finish_step("the GPU evaluation");
      sum += run.host_loss->main_loss;
    }
    result.valid_loss = sum / static_cast<double>(o.eval_batches);
    if (group.lead()) log.eval(result.valid_loss);
  }
  if (group.lead()) log.finish(result, R == 1 ? "fp8, gpu" : "fp8, " + std::to_string(R) + " gpus");
  group.barrier("done");
  return result;
}

}  // namespace fp8moe
