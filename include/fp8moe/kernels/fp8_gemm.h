// Hopper (sm_90a) FP8 GEMMs with fine-grained scaling, DeepGEMM's contract:
//   D[M,N] = A[M,K] * B[N,K]^T, A and B E4M3 with K contiguous ("NT"). The tensor cores sum one
//   128-wide K block; the partial sum is then multiplied by both scales and added into FP32
//   registers (promotion, fmaf(partial, sa*sb, acc)), exactly as gemm_fp8_reference's default
//   AccumulatorModel does.
//
// Scale layouts (all FP32; KB = K / 128; pad(x) = padded_rows(x) = x rounded up to 4, so that each
// scale row is 16-byte aligned as TMA needs; padding entries are never read into the result):
//   A, 1x128 (activations):  M-major  sa[KB][pad(M)]          (fp8moe::scales_mn_major gives it)
//   B, 128x128 (weights):    row-major sb[ceil(N/128)][KB]   (QuantizedMatrix::scales as is)
//   B, 1x128 (wgrad):        N-major  sb[KB][pad(N)]
// Grouped forms add a leading group dimension to B / sb (and to A / sa for the masked form), see
// each function. Pointers are device pointers; A, B need 16-byte alignment, D 16-byte alignment.
// Shapes the kernels cannot take (K % 128 != 0, N % 8 != 0, misaligned pointers, too many groups)
// throw fp8moe::Error (kInvalidArgument) naming the shape before anything is launched.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <span>
#include <string>

#include "fp8moe/core/dtypes.h"
#include "fp8moe/kernels/gemm_config.h"

namespace fp8moe::kernels {

// Split-K workspace of the dense GEMM (device memory, 256-byte aligned). With one, fp8_gemm_nt may
// cut K into S slices per output tile (the heuristic does at M <= 128 where the tiles leave
// multiprocessors idle and tiles x S fit in one wave; GemmTileConfig::split_k forces S): each
// slice's CTA writes its FP32 partial sums, promoted per 128-K block exactly as without a split,
// into the workspace, and for each 16-row strip the slice that finishes last adds the S partials in
// slice order 0..S-1 and stores BF16. The result therefore differs from the unsplit one only by
// FP32 summation order (S partial fmaf chains added in a fixed order instead of one chain over all
// K) and is bit-reproducible run to run. Size it with fp8_gemm_workspace_bytes (0: no split for
// that shape); zero-fill it ONCE before the first use (cudaMemset): its arrival counters return to
// zero at the end of every call. Calls that may run at the same time need separate workspaces. The
// call allocates nothing (CUDA-graph capturable). Without a workspace (ptr null) K is never split;
// a workspace smaller than the launch needs is rejected (kInvalidArgument).
// The same workspace serves the tail split (GemmTileConfig::tail_split; the heuristic takes it at
// M > 128 where the last partial wave holds at most a quarter of the multiprocessors, e.g.
// 4096x2112x7168): the full waves' tiles run whole, the last wave's tiles are cut along K over the
// idle multiprocessors and their partials summed in slice order as above (bit-reproducible).
struct GemmWorkspace {
  void* ptr = nullptr;
  size_t bytes = 0;
};

// Bytes of workspace fp8_gemm_nt needs for this shape with a workspace given (and `force`, if set).
int64_t fp8_gemm_workspace_bytes(int64_t m, int64_t n, int64_t k,
                                 const GemmTileConfig* force = nullptr);

// Dense Fprop/Dgrad: D bf16 [M,N] = A [M,K] (1x128, sa M-major) * B [N,K]^T (128x128 sb).
void fp8_gemm_nt(const uint8_t* a, const float* sa, const uint8_t* b, const float* sb, bf16* d,
                 int64_t m, int64_t n, int64_t k, cudaStream_t stream,
                 const GemmTileConfig* force = nullptr, GemmWorkspace workspace = {});

// MoE grouped, contiguous: A [M,K] holds every routed token, each expert's rows start at a
// multiple of 128; grouped_layout [M] (int32, device) names each row's expert, -1 for padding
// rows (whole 128-row tiles of padding are skipped; D rows of padding are left untouched).
// B [G,N,K], sb [G][ceil(N/128)][KB]; sa [KB][pad(M)]; D [M,N].
void fp8_gemm_nt_grouped_contiguous(const uint8_t* a, const float* sa, const uint8_t* b,
                                    const float* sb, bf16* d, const int32_t* grouped_layout,
                                    int64_t m, int64_t n, int64_t k, int64_t num_groups,
                                    cudaStream_t stream, const GemmTileConfig* force = nullptr);

// A's rows gathered from a larger source: logical row r of A is source row index[r]
// (index[r] < 0: padding, never read into a written result).
struct GatheredRows {
  const uint8_t* base = nullptr;   // source row 0, 16-byte aligned (device)
  int64_t rows = 0;                // source rows; every index < rows
  int64_t stride = 0;              // bytes between source rows: multiple of 16, >= K
  const int32_t* index = nullptr;  // [M] (device, int32)
};

// MoE grouped, contiguous, with A gathered: as fp8_gemm_nt_grouped_contiguous on the M logical
// rows A[r] = source row a.index[r] (the EP dispatch's received records, each token once, read
// where they landed instead of copied into the expert-contiguous layout), bit-identical to it on
// the materialised rows. sa is the logical rows' [KB][pad(M)] (gather_scales_to_mn_major makes it
// from the records' row-major scales); B, sb, D, grouped_layout as in the contiguous form. The
// producer warpgroup loads A's rows with 16-byte cp.async (B and the scales by TMA as usual).
// NOTE: on H100 it took 1.15-1.20x the contiguous GEMM's time at 4 x 8192 / 8 x 4096 rows,
// N x K = 4096 x 7168 and 7168 x 2048 (dev/gemm/NOTES.md session 10): it pays only where the
// copies it saves cost more than that.
// Tiles: 128 rows, 256 or 128 wide only, at least 3 stages (the contiguous pick where it is one of
// them, else 128x128: gemm_gathered_tile; the 256-row grouped kernel has no gathered form);
// `force` must name one of them. Every index must be < a.rows (not checked on the device).
void fp8_gemm_nt_grouped_contiguous_gathered(GatheredRows a, const float* sa, const uint8_t* b,
                                             const float* sb, bf16* d,
                                             const int32_t* grouped_layout, int64_t m, int64_t n,
                                             int64_t k, int64_t num_groups, cudaStream_t stream,
                                             const GemmTileConfig* force = nullptr);

// MoE grouped, masked (decoding under CUDA graphs): A [G,max_m,K], sa [G][KB][pad(max_m)],
// masked_m [G] (int32, device: the valid rows of each group, read on the device only),
// B [G,N,K], sb [G][ceil(N/128)][KB]; D [G,max_m,N], rows >= masked_m[g] left untouched.
// expected_m (0: max_m): the mean rows a group is expected to hold; the tiles are chosen for
// that mean plus its spread (gemm_masked_plan_rows). The host never sees masked_m; a capacity
// sized for the worst case, e.g. every token of every rank on one expert, would pick 256-row
// tiles for groups of a few rows. Any masked_m up to max_m is still computed in full; only the
// speed depends on the hint.
void fp8_gemm_nt_grouped_masked(const uint8_t* a, const float* sa, const uint8_t* b,
                                const float* sb, bf16* d, const int32_t* masked_m,
                                int64_t num_groups, int64_t max_m, int64_t n, int64_t k,
                                cudaStream_t stream, const GemmTileConfig* force = nullptr,
                                int64_t expected_m = 0);

// How a weight gradient meets D: added to it (gradient accumulation over micro-batches), or
// written over it (the first micro-batch: D is never read, so it needs no zeroing and costs
// half the FP32 traffic; k-grouped groups with no K get zeros). Overwrite gives the bits that
// accumulating into zeros gives.
enum class WgradOutput { kAccumulate, kOverwrite };

// Weight gradient: D fp32 [M,N] += A [M,K] * B [N,K]^T, both 1x128-scaled (sa [KB][pad(M)],
// sb [KB][pad(N)]), accumulated into the existing D (or overwriting it: `output`).
void fp8_gemm_nt_wgrad(const uint8_t* a, const float* sa, const uint8_t* b, const float* sb,
                       float* d, int64_t m, int64_t n, int64_t k, cudaStream_t stream,
                       const GemmTileConfig* force = nullptr,
                       WgradOutput output = WgradOutput::kAccumulate);

// K-grouped weight gradient for the experts: the reduction axis (tokens) is cut into groups of
// ks[g] (host values, each a multiple of 128, zero allowed); A [M, sum(ks)] and B [N, sum(ks)]
// hold the groups side by side along K (what the fused cast+transpose of expert-contiguous
// activations gives), sa [sum(ks)/128][pad(M)], sb [sum(ks)/128][pad(N)];
// D fp32 [G,M,N], D[g] += A[:, group g] * B[:, group g]^T.
inline constexpr int kMaxKGroups = 256;
void fp8_gemm_nt_kgrouped_wgrad(const uint8_t* a, const float* sa, const uint8_t* b,
                                const float* sb, float* d, int64_t m, int64_t n,
                                std::span<const int64_t> ks, cudaStream_t stream,
                                const GemmTileConfig* force = nullptr,
                                WgradOutput output = WgradOutput::kAccumulate);
// The same with the groups read on the device (no host counts: capturable in a CUDA graph with
// counts that change between replays): k_layout [k_rows] int32 on the device, the group of each
// row of the K axis in the grouped-contiguous layout the dispatch gives (and the contiguous GEMM
// reads): 128-row blocks, block b belongs to group k_layout[128 b], groups in increasing order,
// blocks whose first entry is -1 only after the last group's (they are skipped; padding rows
// inside a group's blocks are summed like real ones: A and B should hold zeros there, as with
// ks). k_rows (host) is the bound: the K extent of A, B, sa and sb, a multiple of 128. Equals the
// ks form bit for bit when ks[g] = 128 x (group g's block count).
void fp8_gemm_nt_kgrouped_wgrad(const uint8_t* a, const float* sa, const uint8_t* b,
                                const float* sb, float* d, int64_t m, int64_t n, int64_t groups,
                                const int32_t* k_layout, int64_t k_rows, cudaStream_t stream,
                                const GemmTileConfig* force = nullptr,
                                WgradOutput output = WgradOutput::kAccumulate);

}  // namespace fp8moe::kernels
