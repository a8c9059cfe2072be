// A persistent pool of worker threads for splitting CPU work into a few chunks (used by the
// reference GEMM and the model's parallel loops).
// NOTE: the CPU training step runs hundreds of small GEMMs and quantisations per step; starting
// and joining threads for each one cost several percent of the step. Callers keep their own
// split of the work, so results never depend on which thread runs a chunk.
#pragma once

#include <cstdint>
#include <functional>

namespace fp8moe {

// Runs task(i) for every i in [0, tasks) on the calling thread and up to tasks - 1 pooled
// workers (started on first use, sleeping when idle), and returns true once all have finished;
// the first exception a task threw is rethrown then. Runs nothing and returns false when the
// pool is already running a job (another thread's, or the caller is itself inside a task): the
// caller then splits the work its own way.
bool run_on_chunk_pool(int64_t tasks, const std::function<void(int64_t)>& task);

}  // namespace fp8moe
