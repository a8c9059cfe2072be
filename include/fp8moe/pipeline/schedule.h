// Pipeline-parallel schedules: the per-rank order of compute operations for 1F1B, ZB1P (the
// zero-bubble paper's ZB-H1), DualPipe and DualPipeV, their JSON form, and where each rank's
// chunks sit in the model. Contract: "fp8moe pipeline schedule" in shared/DESIGN.md.
#pragma once

#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "fp8moe/core/json.h"

namespace fp8moe::pipeline {

enum class Method { k1F1B, kZB1P, kDualPipe, kDualPipeV };
inline constexpr Method kAllMethods[] = {Method::k1F1B, Method::kZB1P, Method::kDualPipe,
                                         Method::kDualPipeV};

// "1f1b", "zb1p", "dualpipe", "dualpipev".
const char* method_name(Method method);
// Inverse of method_name; anything else is kInvalidArgument naming the value.
Method parse_method(std::string_view name);

// F forward; B full backward; I input-gradient backward; W its deferred weight gradient.
enum class OpKind { kF, kB, kI, kW };

struct Op {
  OpKind kind = OpKind::kF;
  int chunk = 0;
  int micro = 0;
  bool operator==(const Op&) const = default;
};

// One entry of a rank's list: an operation, or two run together ("X|Y"), one's computation
// overlapping the other's communication (DualPipe's forward-backward pairs).
struct Step {
  Op first;
  std::optional<Op> second;
  bool operator==(const Step&) const = default;
};

std::string to_string(const Op& op);      // "F0.5"
std::string to_string(const Step& step);  // "F0.5" or "F0.5|B1.2"
// Inverse of to_string(Step); malformed text is kFormat naming it.
Step parse_step(std::string_view text);

struct Schedule {
  Method method = Method::k1F1B;
  int ranks = 0;
  int micro_batches = 0;
  std::vector<std::vector<Step>> ranks_ops;  // one list per rank, in execution order
};

// Throws kInvalidArgument with one line when the method cannot take (ranks, micro_batches):
// DualPipe needs P and M even, M >= 2P; DualPipeV M >= 2P; 1F1B and ZB1P M >= P; all P >= 2.
void check_supported(Method method, int ranks, int micro_batches);

// The schedule of `method` (check_supported first). DualPipe and DualPipeV follow the per-rank
// order of the public reference (github.com/deepseek-ai/DualPipe) operation for operation.
Schedule make_schedule(Method method, int ranks, int micro_batches);

// {"method","ranks","micro_batches","ranks_ops":[[ops of rank 0], ...]}.
OrderedJson schedule_to_json(const Schedule& schedule);
// Inverse of schedule_to_json; unknown keys other than "reference" and bad values are errors
// (kInvalidArgument / kFormat) naming `context`. Does not check the schedule (see checker.h).
Schedule schedule_from_json(const Json& json, const std::string& context);

// Where a rank's chunk sits: model copy ("flow": the path micro-batches take) and stage on it.
struct Placement {
  int flow = 0;
  int stage = 0;
};

// The layout of stages over ranks for a method (DESIGN.md, "Stages and chunks"):
// 1F1B/ZB1P one flow of P stages, chunk 0 only; DualPipe two flows of P stages (flow = chunk,
// M/2 micro-batches each, flow 1 runs from rank P-1 to rank 0); DualPipeV one flow of 2P stages
// in a V (rank r: chunk 0 = stage r, chunk 1 = stage 2P-1-r).
class Topology {
 public:
  Topology(Method method, int ranks, int micro_batches);
  int ranks() const { return ranks_; }
  int num_flows() const { return method_ == Method::kDualPipe ? 2 : 1; }
  int stages_per_flow() const { return method_ == Method::kDualPipeV ? 2 * ranks_ : ranks_; }
  int micro_batches_per_flow() const {
    return method_ == Method::kDualPipe ? micro_batches_ / 2 : micro_batches_;
  }
  int chunks_per_rank() const { return is_dual() ? 2 : 1; }
  // A chunk's share of a stage of the same model split into P stages: DualPipeV cuts the model
  // into 2P stages, so its chunks are half as big (half the time, memory and parameters).
  double chunk_size() const { return method_ == Method::kDualPipeV ? 0.5 : 1.0; }
  Placement place(int rank, int chunk) const;
  int rank_of(int flow, int stage) const;
  int chunk_of(int flow, int stage) const;

 private:
  bool is_dual() const { return method_ == Method::kDualPipe || method_ == Method::kDualPipeV; }
  Method method_;
  int ranks_;
  int micro_batches_;
};

}  // namespace fp8moe::pipeline
