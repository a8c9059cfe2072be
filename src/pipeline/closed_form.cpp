// The closed-form bubbles and memory of the DualPipe README's comparison table, evaluated.
// Test: build-pipeline/tests/test_pipeline --gtest_filter='ClosedForm*'
#include "fp8moe/pipeline/simulator.h"

#include <algorithm>
#include <cmath>

namespace fp8moe::pipeline {
namespace {

bool same(double a, double b) {
  return std::abs(a - b) <= 1e-12 * std::max(1.0, std::abs(b));
}
bool at_most(double a, double b) {
  return a <= b + 1e-12 * std::max(1.0, std::abs(b));
}

}  // namespace

ClosedForm closed_form(Method method, int ranks, const Costs& c, const P2P& p2p) {
  ClosedForm cf;
  const double p = ranks;
  switch (method) {
    case Method::k1F1B:
      cf.bubble_formula = "(P-1)(F+B)";
      cf.bubble = (p - 1) * (c.f + c.b);
      cf.activation_formula = "P";
      cf.activation_chunks = p;
      cf.parameter_copies = 1;
      break;
    case Method::kZB1P:
      cf.bubble_formula = "(P-1)(F+B-2W)";
      cf.bubble = (p - 1) * (c.f + c.b - 2 * c.w);
      cf.activation_formula = "P";
      cf.activation_chunks = p;
      cf.parameter_copies = 1;
      break;
    case Method::kDualPipe:
      cf.bubble_formula = "(P/2-1)(F&B+B-3W)";
      cf.bubble = (p / 2 - 1) * (c.fb + c.b - 3 * c.w);
      cf.activation_formula = "P+1";
      cf.activation_chunks = p + 1;
      cf.parameter_copies = 2;
      break;
    case Method::kDualPipeV:
      // The README's (PP/2-1)(F&B+B-3W) over PP = 2P stages of half a P-stage stage each.
      cf.bubble_formula = "(P-1)(F&B+B-3W)/2";
      cf.bubble = (p - 1) * (c.fb + c.b - 3 * c.w) / 2;
      cf.activation_formula = "2P+1";
      cf.activation_chunks = 2 * p + 1;
      cf.parameter_copies = 1;
      break;
  }
  // The regimes where the simulated largest bubble equals the formula exactly, found by the
  // simulator and pinned by tests/pipeline/simulator_test.cpp (docs/pipeline/README.md says why).
  const bool split_consistent = same(c.b, c.i + c.w);
  if (p2p.time() > 0) {
    cf.applies = false;
    cf.note = "the formulas assume free point-to-point transfers";
  } else if (method == Method::kZB1P &&
             !(split_consistent && at_most(c.w, c.f) && at_most(c.w, c.i))) {
    cf.applies = false;
    cf.note = "the formula assumes B = I+W and W <= min(F, I) (deferred Ws fit the tail's gaps)";
  } else if ((method == Method::kDualPipe || method == Method::kDualPipeV) &&
             !(split_consistent && same(c.f, c.i) && same(c.w, c.i) && at_most(c.b, c.fb) &&
               at_most(c.fb, c.f + c.b))) {
    cf.applies = false;
    cf.note = "the formula assumes F = I = W (B = 2F) and B <= F&B <= F+B";
  }
  return cf;
}

}  // namespace fp8moe::pipeline
