// Discrete-event simulation of a pipeline schedule: each rank runs its steps in order, a step
// starts when the rank is free and every operation it depends on has finished (plus the
// point-to-point time when that operation ran on another rank). Reports the makespan, per-rank
// bubble, peak activation memory and parameter memory; closed-form bubbles for comparison.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "fp8moe/pipeline/schedule.h"

namespace fp8moe::pipeline {

// Time of one operation on one stage of the model split into P stages (see chunk_scale).
struct Costs {
  double f = 1.0;   // forward
  double b = 2.0;   // full backward (input and weight gradients)
  double i = 1.0;   // input-gradient backward
  double w = 1.0;   // weight-gradient backward
  double fb = 3.0;  // a forward and a full backward of different micro-batches run together
};

// "F=1,B=2,I=1,W=1,FB=2.6" (any subset, any order; keys case-insensitive). Keys left out take
// these defaults: F=1, B=2, W=B/2, I=B-W, FB=F+B (a pair saves nothing unless told).
// Bad keys or values (negative, not a number) are kInvalidArgument naming them.
Costs parse_costs(const std::string& text);
std::string to_string(const Costs& costs);  // "F=1,B=2,I=1,W=1,FB=3"

// Transfer time of one activation or gradient between two ranks: latency + bytes / bandwidth
// (bandwidth 0 = unlimited). Transfers between the two chunks of one rank are free.
struct P2P {
  double latency = 0.0;
  double bandwidth = 0.0;
  double bytes = 0.0;
  double time() const { return latency + (bandwidth > 0 ? bytes / bandwidth : 0.0); }
};

struct SimOptions {
  Costs costs;
  P2P p2p;
  // Multiplies every operation's cost and each chunk's activation and parameter size. Unset:
  // the topology's chunk_size() (0.5 for DualPipeV, whose chunks are half a stage; 1 else).
  std::optional<double> chunk_scale;
};

struct StepTime {
  double start = 0.0;
  double end = 0.0;
};

struct SimResult {
  double chunk_scale = 1.0;
  double makespan = 0.0;
  std::vector<std::vector<StepTime>> times;  // [rank][step], parallel to ranks_ops
  std::vector<double> busy;                  // per rank, sum of its steps' durations
  std::vector<double> bubble;                // per rank, makespan - busy
  // Per rank, the most micro-batch activations held at once, in chunks (an activation is taken
  // when F starts and released when B or I ends) and in stages (times chunk_scale).
  std::vector<int> peak_activation_chunks;
  std::vector<double> peak_activation_stages;
  // Per rank, parameters held, in stages of the model split into P stages (1 = 1F1B's share).
  std::vector<double> parameters;
  double max_bubble() const;
};

// Throws kInvalidArgument (with the checker's summary) when the schedule does not check.
SimResult simulate(const Schedule& schedule, const SimOptions& options);

// The published closed forms (DualPipe README, "Pipeline Bubbles and Memory Usage"), in the
// costs' units (stage costs; DualPipeV's chunk costs are chunk_scale times these).
struct ClosedForm {
  std::string bubble_formula;      // e.g. "(P-1)(F+B)"
  double bubble = 0.0;             // evaluated
  std::string activation_formula;  // per rank, in chunk activations
  double activation_chunks = 0.0;  // evaluated
  double parameter_copies = 1.0;   // parameters per rank, in stages of a P-stage model
  // When the simulated bubble equals the formula exactly (the regime the formula assumes),
  // and a one-line reason otherwise; see docs/pipeline/README.md.
  bool applies = true;
  std::string note;
};
ClosedForm closed_form(Method method, int ranks, const Costs& costs, const P2P& p2p);

}  // namespace fp8moe::pipeline
