// The GPU trainer's state kernels (train/train_state_gpu.h) against the CPU trainer's own code:
// the initial weights against Model(config, seed)'s parameters, the EMA against WeightEma's
// formula, the router-bias update against update_bias — each compared bit for bit (the init's
// count of differing elements is printed: the device's double log / cos may in principle differ
// from glibc's in the last bit).
// Run: test_train_gpu --gtest_filter='TrainStateGpu*'
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <random>
#include <vector>

#include "../kernels/gpu_test_util.cuh"
#include "fp8moe/model/model.h"
#include "fp8moe/moe/balance.h"
#include "fp8moe/train/train_state_gpu.h"

namespace fp8moe {
namespace {

using test::DeviceBuffer;

// The device runs the tests from the repository root of a copy of the tree, not from the build
// machine's FP8MOE_SOURCE_DIR.
std::string repo_file(const std::string& rel) {
  return std::filesystem::exists(rel) ? rel : std::string(FP8MOE_SOURCE_DIR) + "/" + rel;
}

int64_t bit_diffs(const std::vector<float>& a, const std::vector<float>& b) {
  int64_t bad = 0;
  for (size_t i = 0; i < a.size(); ++i) bad += std::memcmp(&a[i], &b[i], sizeof(float)) != 0;
  return bad;
}

std::vector<ParameterGpu> device_table(const std::deque<Parameter>& params,
                                       std::vector<DeviceBuffer<float>>& storage) {
  std::vector<ParameterGpu> table;
  for (const Parameter& p : params) {
    storage.emplace_back(p.value.size());
    table.push_back({p.name, p.shape, p.numel(), p.weight_decay, storage.back().get(), nullptr,
                     static_cast<int64_t>(table.size()), false});
  }
  return table;
}

TEST(TrainStateGpu, InitialWeightsAreTheCpuModels) {
  ModelConfig c = load_model_config(repo_file("configs/tiny.json"));
  for (uint64_t seed : {1u, 77u}) {
    Model cpu(c, seed);
    std::vector<DeviceBuffer<float>> storage;
    storage.reserve(cpu.parameters().size() + cpu.buffers().size());
    std::vector<ParameterGpu> params = device_table(cpu.parameters(), storage);
    std::vector<ParameterGpu> buffers = device_table(cpu.buffers(), storage);
    for (size_t i = 0; i < storage.size(); ++i)  // poison
      FM_CHECK_CUDA(cudaMemset(storage[i].get(), 0x7f, storage[i].size() * sizeof(float)));
    init_parameters_gpu(params, buffers, seed, c.initializer_range, nullptr);
    int64_t bad = 0, total = 0;
    for (size_t i = 0; i < params.size(); ++i) {
      bad += bit_diffs(storage[i].download(), cpu.parameters()[i].value);
      total += params[i].numel;
    }
    for (size_t i = 0; i < buffers.size(); ++i)
      bad += bit_diffs(storage[params.size() + i].download(), cpu.buffers()[i].value);
    std::printf("init seed %llu: %lld of %lld elements differ from Model(config, seed)\n",
                static_cast<unsigned long long>(seed), static_cast<long long>(bad),
                static_cast<long long>(total));
    EXPECT_EQ(bad, 0);
  }
}

TEST(TrainStateGpu, EmaIsWeightEmasFormula) {
  std::mt19937_64 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const std::vector<int64_t> sizes = {1, 7, 4096, 4097, 10000, 3};
  std::deque<Parameter> params;
  for (int64_t n : sizes) {
    Parameter p;
    p.name = "w" + std::to_string(n);
    p.shape = {n};
    p.value.resize(static_cast<size_t>(n));
    for (float& v : p.value) v = normal(rng);
    params.push_back(std::move(p));
  }
  std::vector<DeviceBuffer<float>> storage;
  storage.reserve(params.size());
  std::vector<ParameterGpu> table = device_table(params, storage);
  for (size_t i = 0; i < params.size(); ++i) storage[i].upload(params[i].value);
  const double decay = 0.99;
  WeightEmaGpu ema(table, decay, nullptr);
  std::vector<std::vector<float>> ref;
  for (const auto& p : params) ref.push_back(p.value);
  const float d = static_cast<float>(decay), om = static_cast<float>(1.0 - decay);
  for (int step = 0; step < 3; ++step) {
    for (size_t i = 0; i < params.size(); ++i) {
      for (float& v : params[i].value) v += 0.1f * normal(rng);
      storage[i].upload(params[i].value);
      for (size_t j = 0; j < ref[i].size(); ++j)
        ref[i][j] = d * ref[i][j] + om * params[i].value[j];
    }
    ema.update(nullptr);
  }
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  for (size_t i = 0; i < params.size(); ++i) {
    std::vector<float> got(ref[i].size());
    FM_CHECK_CUDA(cudaMemcpy(got.data(), ema.values(i), got.size() * 4, cudaMemcpyDeviceToHost));
    EXPECT_EQ(bit_diffs(got, ref[i]), 0) << params[i].name;
  }
}

TEST(TrainStateGpu, RouterBiasUpdateIsUpdateBias) {
  std::mt19937_64 rng(9);
  const std::vector<int> experts = {8, 256, 300};
  std::deque<Parameter> biases;
  std::vector<std::vector<int32_t>> loads;
  for (int e : experts) {
    Parameter b;
    b.name = "bias" + std::to_string(e);
    b.shape = {e};
    std::uniform_real_distribution<float> u(-0.01f, 0.01f);
    for (int i = 0; i < e; ++i) b.value.push_back(u(rng));
    biases.push_back(std::move(b));
    std::vector<int32_t> load(static_cast<size_t>(e));
    // Every expert at the mean except a few (the "equal" branch must be exact).
    for (int i = 0; i < e; ++i) load[i] = 40;
    for (int k = 0; k < e / 4; ++k) {
      const int i = static_cast<int>(rng() % e), j = static_cast<int>(rng() % e);
      const int32_t move = static_cast<int32_t>(rng() % 30);
      load[i] += move;
      load[j] -= move;
    }
    loads.push_back(std::move(load));
  }
  std::vector<DeviceBuffer<float>> storage;
  storage.reserve(biases.size());
  std::vector<ParameterGpu> table = device_table(biases, storage);
  std::vector<DeviceBuffer<int32_t>> dloads;
  std::vector<const int32_t*> load_ptrs;
  for (size_t b = 0; b < biases.size(); ++b) {
    storage[b].upload(biases[b].value);
    dloads.emplace_back(loads[b]);
    load_ptrs.push_back(dloads.back().get());
  }
  RouterBiasUpdateGpu update(table, load_ptrs);
  const double speed = 0.001;
  for (int round = 0; round < 2; ++round) {
    update.update(speed, nullptr);
    for (size_t b = 0; b < biases.size(); ++b) {
      std::vector<int64_t> l(loads[b].begin(), loads[b].end());
      update_bias(biases[b].value, l, static_cast<float>(speed));
    }
  }
  for (size_t b = 0; b < biases.size(); ++b)
    EXPECT_EQ(bit_diffs(storage[b].download(), biases[b].value), 0) << biases[b].name;
  EXPECT_THROW(RouterBiasUpdateGpu(table, {}), Error);
}

}  // namespace
}  // namespace fp8moe
