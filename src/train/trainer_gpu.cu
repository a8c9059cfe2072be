// train_gpu (train/trainer_gpu.h): the CPU trainer's loop (trainer.cpp) with the model, the
// optimizer and the per-step state on one GPU.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
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
#include "run_common.h"

namespace fp8moe {

namespace {

using namespace train_detail;

// Owns the run's stream, graph and device / pinned buffers.
struct GpuRun {
  cudaStream_t stream = nullptr;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t graph_exec = nullptr;
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
    for (void* p : {moments, static_cast<void*>(tokens), static_cast<void*>(loss)})
      if (p != nullptr) cudaFree(p);
    for (void* p : {static_cast<void*>(host_tokens), static_cast<void*>(host_loss),
                    static_cast<void*>(host_state), static_cast<void*>(host_status)})
      if (p != nullptr) cudaFreeHost(p);
    if (stream != nullptr) cudaStreamDestroy(stream);
  }
};

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

void save_gpu_checkpoint(const std::string& path, ModelGpu& model, const Moments& mo,
                         const WeightEmaGpu& ema, const TrainOptions& o, int64_t step) {
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  const auto& params = model.parameters();
  struct Host {
    std::vector<float> value, ema;
    std::vector<uint16_t> m, v;
  };
  std::vector<Host> host(params.size());
  std::vector<CheckpointSlot> slots, buffers;
  for (size_t i = 0; i < params.size(); ++i) {
    const ParameterGpu& p = params[i];
    host[i] = {download_f32(p.value, p.numel), download_f32(ema.values(i), p.numel),
               download_u16(mo.m[i], p.numel), download_u16(mo.v[i], p.numel)};
    slots.push_back({&p.name, &p.shape, host[i].value.data(), host[i].m.data(), host[i].v.data(),
                     host[i].ema.data()});
  }
  std::vector<std::vector<float>> buffer_values;
  for (const ParameterGpu& b : model.buffers())
    buffer_values.push_back(download_f32(b.value, b.numel));
  for (size_t i = 0; i < model.buffers().size(); ++i)
    buffers.push_back(
        {&model.buffers()[i].name, &model.buffers()[i].shape, buffer_values[i].data()});
  save_checkpoint(path, slots, buffers, o, step);
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
  RunLog log(o, "gpu");
  FM_CHECK_CUDA(cudaSetDevice(g.device));

  const TokenData data = load_run_data(o);
  const int64_t window = o.seq + o.model.num_nextn_predict_layers + 1;
  std::filesystem::create_directories(o.out_dir);
  const std::string ckpt_path = o.out_dir + "/" + kCheckpointFile;

  GpuRun run;
  FM_CHECK_CUDA(cudaStreamCreateWithFlags(&run.stream, cudaStreamNonBlocking));
  cudaStream_t s = run.stream;
  ModelGpu model(o.model, o.batch, o.seq);
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
  for (size_t i = 0; i < params.size(); ++i)
    tensors.push_back({params[i].value, params[i].grad, mo.m[i], mo.v[i], params[i].numel,
                       params[i].weight_decay, nullptr});
  AdamWGpu adam(o.adam, tensors);
  FM_CHECK(static_cast<size_t>(model.moe_blocks()) == model.buffers().size(), "ModelGpu has ",
           model.moe_blocks(), " MoE blocks but ", model.buffers().size(), " router biases");
  std::vector<const int32_t*> loads;
  for (int b = 0; b < model.moe_blocks(); ++b) loads.push_back(model.expert_load(b));
  RouterBiasUpdateGpu bias_update(model.buffers(), loads);

  TrainResult result;
  std::ofstream metrics;
  result.losses = restart_metrics(o.out_dir, start, metrics);
  std::filesystem::copy_file(o.tokenizer, o.out_dir + "/tokenizer.model",
                             std::filesystem::copy_options::overwrite_existing);

  const size_t token_bytes = static_cast<size_t>(o.batch * window) * sizeof(int32_t);
  FM_CHECK_CUDA(cudaMalloc(&run.tokens, token_bytes));
  FM_CHECK_CUDA(cudaMalloc(&run.loss, sizeof(LossGpu)));
  FM_CHECK_CUDA(cudaMallocHost(&run.host_tokens, token_bytes));
  FM_CHECK_CUDA(cudaMallocHost(&run.host_loss, sizeof(LossGpu)));
  FM_CHECK_CUDA(cudaMallocHost(&run.host_state, sizeof(AdamWGpuState)));
  FM_CHECK_CUDA(cudaMallocHost(&run.host_status, sizeof(uint32_t)));
  const int64_t depth = o.model.num_nextn_predict_layers;

  auto load_batch = [&](const std::vector<int32_t>& batch) {
    std::memcpy(run.host_tokens, batch.data(), token_bytes);
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

  const int64_t end = o.stop_after > 0 ? std::min(o.steps, start + o.stop_after) : o.steps;
  log.begin_loop(start, end, &metrics);
  for (int64_t step = start; step < end; ++step) {
    load_batch(sample_batch(data.train, o.batch, window, o.seed, step));
    if (run.graph_exec != nullptr) {
      FM_CHECK_CUDA(cudaGraphLaunch(run.graph_exec, s));
    } else if (g.cuda_graph && step > start) {
      // Captured on the second step: the first ran eagerly, so every lazy setup is done.
      FM_CHECK_CUDA(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
      model.forward_backward(run.tokens, o.mtp_weight, true, run.loss, s);
      FM_CHECK_CUDA(cudaStreamEndCapture(s, &run.graph));
      FM_CHECK_CUDA(cudaGraphInstantiate(&run.graph_exec, run.graph, 0));
      FM_CHECK_CUDA(cudaGraphLaunch(run.graph_exec, s));
    } else {
      model.forward_backward(run.tokens, o.mtp_weight, true, run.loss, s);
    }
    adam.step(step, s);
    bias_update.update(o.bias_update_speed, s);
    ema.update(s);
    model.refresh(s);
    finish_step("the GPU training step");
    const LossGpu& got = *run.host_loss;
    FM_CHECK(std::isfinite(got.loss), "the loss is not finite at step ", step + 1);
    result.losses.push_back(got.loss);
    LossReport rep;
    rep.loss = got.loss;
    rep.main_loss = got.main_loss;
    rep.mtp_loss.assign(got.mtp_loss, got.mtp_loss + depth);
    rep.balance_loss = got.balance_loss;
    log.step(step, rep, run.host_state->grad_norm);

    if (checkpoint_due(o, step, end)) save_gpu_checkpoint(ckpt_path, model, mo, ema, o, step + 1);
  }
  log.end_loop();
  if (o.checkpoint) save_gpu_checkpoint(ckpt_path, model, mo, ema, o, end);

  // Held-out loss on the CPU trainer's fixed windows of the validation stream.
  if (o.eval_batches > 0 && static_cast<int64_t>(data.valid.size()) > window) {
    double sum = 0;
    for (int64_t i = 0; i < o.eval_batches; ++i) {
      load_batch(eval_batch(data, o, window, i));
      model.forward_backward(run.tokens, o.mtp_weight, false, run.loss, s);
      finish_step("the GPU evaluation");
      sum += run.host_loss->main_loss;
    }
    result.valid_loss = sum / static_cast<double>(o.eval_batches);
    log.eval(result.valid_loss);
  }
  log.finish(result, "fp8, gpu");
  return result;
}

}  // namespace fp8moe
