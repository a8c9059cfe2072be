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

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/model/model_gpu.h"
#include "fp8moe/model/model_kernels_gpu.h"
#include "fp8moe/train/adamw_gpu.h"
#include "fp8moe/train/data.h"
#include "fp8moe/train/train_state_gpu.h"
#include "fp8moe/train/trainer_gpu.h"
#include "optimizer_state_gpu.h"
#include "run_common.h"
#include "train_group_gpu.h"

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
    for (void* p : {static_cast<void*>(tokens), static_cast<void*>(loss)})
      if (p != nullptr) cudaFree(p);
    for (void* p : {static_cast<void*>(host_tokens), static_cast<void*>(host_loss),
                    static_cast<void*>(host_state), static_cast<void*>(host_status)})
      if (p != nullptr) cudaFreeHost(p);
    if (stream != nullptr) cudaStreamDestroy(stream);
  }
};

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
  FM_CHECK_ARG(o.batch % R == 0, "--batch ", o.batch, " (the whole job's) does not split over ", R,
               " ranks");
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
      return comm::make_job_ep_rank(group, block, cfg);
    };
  ModelGpu model(o.model, local_batch, o.seq, par);
  FM_CHECK(model.window() == window, "ModelGpu's window ", model.window(), " != ", window);
  init_parameters_gpu(model.parameters(), model.buffers(), o.seed, o.model.initializer_range, s);
  OptimizerStateGpu state(model, group, g.shard_optimizer && R > 1, o, s);
  AdamWGpu& adam = state.adam();
  int64_t start = 0;
  if (o.resume) {
    FM_CHECK_CUDA(cudaStreamSynchronize(s));
    start = state.load(ckpt_path, o);
  }
  model.refresh(s);

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
  const GradAverage average = state.sharded()    ? GradAverage::kReduceScatter
                              : g.overlap_reduce ? GradAverage::kBesideBlocks
                                                 : GradAverage::kAllReduce;
  std::unique_ptr<OverlappedReduce> overlap;
  if (R > 1 && average == GradAverage::kBesideBlocks)
    overlap = std::make_unique<OverlappedReduce>(group, model);
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
             [&] { reduce_step(group, model, run.loss, average, s); });
    mark(2);
    adam.step(step, s);
    state.gather_values(s);
    mark(3);
    bias_update.update(o.bias_update_speed, s);
    state.ema().update(s);
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
    if (checkpoint_due(o, step, end)) state.save(ckpt_path, o, step + 1);
  }
  if (group.lead()) log.end_loop();
  {
    size_t free_bytes = 0, total_bytes = 0;
    FM_CHECK_CUDA(cudaMemGetInfo(&free_bytes, &total_bytes));
    result.device_memory_gb = static_cast<double>(total_bytes - free_bytes) / 1e9;
  }
  if (o.checkpoint) state.save(ckpt_path, o, end);

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
