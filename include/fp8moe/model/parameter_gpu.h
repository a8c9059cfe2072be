// A parameter (or buffer) of the model on one GPU: the CPU Model's Parameter (model/model.h) of
// the same index — name, shape, weight decay — with its FP32 master value and FP32 gradient in
// device memory. The GPU model and its layers find their parameters by the CPU model's names
// (the Hugging Face checkpoint's), so checkpoints, the optimizer and the CPU reference all read
// one table in one order.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace fp8moe {

struct ParameterGpu {
  std::string name;
  std::vector<int64_t> shape;
  int64_t numel = 0;
  bool weight_decay = true;  // false for the norms only (the CPU model's flags)
  float* value = nullptr;    // device, FP32 [numel]
  float* grad = nullptr;     // device, FP32 [numel]; null for buffers
  // Its index in the CPU model's table (Model::parameters(); its Philox stream at init). Equal to
  // its position in ModelGpu::parameters() unless the experts are sharded over ranks.
  int64_t index = 0;
  // A routed expert's tensor held by this rank only (expert parallelism); false for the tensors
  // every rank holds a copy of (their gradients are averaged over the ranks).
  bool sharded = false;
};

// Finds a parameter or buffer by its full name; throws kInvalidArgument naming a missing one.
using ParameterLookup = std::function<ParameterGpu&(const std::string& name)>;

}  // namespace fp8moe
