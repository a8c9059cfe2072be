// Pictures of a simulated schedule: Chrome trace-event JSON (opens in Perfetto and
// chrome://tracing; one row per rank, one event per step) and an SVG timeline in the style of
// the DualPipe documentation's figures.
#pragma once

#include <string>

#include "fp8moe/core/json.h"
#include "fp8moe/pipeline/schedule.h"
#include "fp8moe/pipeline/simulator.h"

namespace fp8moe::pipeline {

// One simulated time unit becomes `us_per_unit` microseconds on the trace's clock.
OrderedJson chrome_trace(const Schedule& schedule, const SimResult& sim, double us_per_unit = 1000);

// A standalone SVG document: a row per rank, a box per step placed at its simulated time,
// coloured by kind and chunk, labelled with the micro-batch; a pair is drawn as its two halves
// inside one black border.
std::string timeline_svg(const Schedule& schedule, const SimResult& sim);

}  // namespace fp8moe::pipeline
