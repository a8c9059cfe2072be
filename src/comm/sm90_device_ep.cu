// Expert-parallel dispatch/combine over peer-mapped NVLink buffers (fp8moe/comm/device_ep.h), host
// side: DeviceEpRank sizes and lays out the workspace, connects the peers and launches the normal
// kernels (sm90_device_ep_dispatch.cu, sm90_device_ep_combine.cu), the low-latency ones
// (sm90_device_ep_ll.cu) for masked configs, the combine backward (sm90_device_ep_backward.cu), or
// hands every call to the two-stage route (sm90_device_ep_forward.cu) over several nodes;
// DeviceEpGroup builds and connects the ranks of one process.
// Reference: dispatch_reference / combine_reference (src/comm/ep_reference.cpp), bit for bit.
// Test: build-comm-dev/test_comm_gpu or build-device/tests/test_comm_gpu
// (tests/comm/device_ep_gpu_test.cu).
#include <algorithm>
#include <cfloat>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "device_ep_forward.h"
#include "fp8moe/comm/device_ep.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "sm90_device_ep_backward.h"
#include "sm90_device_ep_kernels.cuh"
#include "sm90_device_ep_ll.h"

#if defined(FP8MOE_HAVE_NCCL)
#include <nccl.h>
#define FM_CHECK_NCCL(call)                                                                  \
  do {                                                                                       \
    const ncclResult_t fm_nccl_ = (call);                                                    \
    if (fm_nccl_ != ncclSuccess) [[unlikely]]                                                \
      FM_THROW(::fp8moe::ErrorKind::kNccl, #call " failed: ", ncclGetErrorString(fm_nccl_)); \
  } while (0)
#endif

namespace fp8moe::comm {

using namespace normal;

namespace {

const char* counter_name(int c) {
  switch (c) {
    case kDispatchNotify:
      return "dispatch.notify";
    case kDispatchAck:
      return "dispatch.ack";
    case kCombineAck:
      return "combine.ack";
    case kDispatchChunk:
      return "dispatch.chunk";
    case kCombineChunk:
      return "combine.chunk";
    case kLocalSent:
      return "send_blocks_done";
    case kPlanBlocks:
      return "dispatch.plan_blocks";
    case kDispatchPayload:
      return "dispatch.payload";
    default: {
      const char* ll_name = ll::counter_name(c);
      const char* bwd_name = bwd::counter_name(c);
      return ll_name ? ll_name : bwd_name ? bwd_name : "?";
    }
  }
}

size_t align_up(size_t v, size_t a) {
  return (v + a - 1) / a * a;
}

// The combine's chunk of received records (DeviceEpOptions::combine_chunk_tokens; 0 = for the
// normal shapes, max_tokens_per_rank > 512, 4 at two ranks and 8 beyond, else the dispatch's
// chunk). Session 15 (ep26, 2 x H200): 8 against 16 -5 to -6 %; sessions 18-19, 4 against 8: 2 x
// H100 -1.2 to -1.6 % (four calls), 2 x H200 -0.1 / +0.3 %, 4 x H200 +1.5 / +1.7 %. Needs g.R,
// g.Tmax and g.C.
int combine_chunk(const Geometry& g, const DeviceEpOptions& o) {
  if (o.combine_chunk_tokens > 0) return o.combine_chunk_tokens;
  if (g.Tmax <= 512) return g.C;
  return g.R <= 2 ? 4 : 8;
}

Geometry make_geometry(const EpConfig& c, const DeviceEpOptions& o) {
  Geometry g{};
  g.R = c.num_ranks;
  g.K = c.top_k;
  g.L = c.experts_per_rank();
  g.E = c.num_experts;
  g.H = c.hidden;
  g.SC = c.payload == Payload::kFP8 ? c.scale_cols() : 0;
  g.Tmax = c.max_tokens_per_rank;
  g.fp8 = c.payload == Payload::kFP8;
  // record_align_128: every record on a 128-byte line (the gathered GEMM's A rows).
  g.P = g.fp8 ? static_cast<int64_t>(align_up(g.H + g.SC * 4, o.record_align_128 ? 128 : 16))
              : g.H * 2;
  g.bound = c.row_bound();
  g.cap = c.masked_capacity;
  g.NT = static_cast<int>((g.Tmax + kTile - 1) / kTile);
  g.C = o.chunk_tokens > 0 ? o.chunk_tokens : (g.Tmax <= 512 ? 4 : 16);
  const int64_t chunks = std::max<int64_t>(
      (g.Tmax + g.C - 1) / g.C, (g.Tmax + combine_chunk(g, o) - 1) / combine_chunk(g, o));
  g.NC = static_cast<int>(std::max<int64_t>(1, chunks));
  g.NS = 1 + g.L + 2 * g.NC;
  g.W = g.E + g.R;
  return g;
}

// Three counter groups, the two chunk groups (a source's stride NC: make_geometry), then
// layout_payload_claims' payload counters.
size_t flag_count(const Geometry& g) {
  return 3 * static_cast<size_t>(g.R) + 2 * static_cast<size_t>(g.R) * g.NC + g.R;
}

// The geometry the combine kernels get (DeviceEpOptions::combine_chunk_tokens): C is the
// combine's chunk. NC, the flag stride of a source in both chunk blocks, is already the larger of
// the dispatch's and the combine's chunk counts (make_geometry), so that the combine's block
// (flag() puts it at 3R + R * NC) holds every combine chunk and the payload counters
// (payload_counter, at 3R + 2R * NC) lie past it in every kernel's view. Everything else is the
// dispatch's (NS, the notify block, is not the combine's).
Geometry combine_geometry(const Geometry& g, const DeviceEpOptions& o) {
  Geometry c = g;
  c.C = combine_chunk(g, o);
  return c;
}

WsLayout make_layout(const Geometry& g) {
  WsLayout l{};
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t o = at;
    at = align_up(at + bytes, 256);
    return o;
  };
  const size_t slots = static_cast<size_t>(g.R) * g.Tmax;
  l.stage = take(slots * g.P);
  l.src_token = take(slots * 4);
  l.topk_local = take(slots * g.K * 4);
  l.topk_pos = take(slots * g.K * 4);
  l.weight = take(slots * g.K * 4);
  l.recv_count = take(g.R * 4);
  l.notify = take(static_cast<size_t>(g.R) * g.NS * 4);
  l.all_counts = take(all_counts_bytes(g));
  l.flags = take(flag_count(g) * 8);
  l.comb_stage = take(slots * g.H * 2);
  l.bwd_gw = take(slots * g.K * 4);
  l.bwd_mask = take(slots * 4);
  l.bwd = take(bwd::region_bytes(g.R));
  l.peer_table = take(g.R * sizeof(void*));
  l.err = take(sizeof(DevErr));
  l.slot = take(slots * 4);
  l.status = take(kStatusSlots * 8);
  l.recv_offset = take((g.R + 1) * 4);
  l.expert_counts = take(g.L * 4);
  l.expert_offsets = take((g.L + 1) * 4);
  l.m_indices = take(g.bound * 4);
  l.row_src = take(g.bound * 4);
  l.row_weight = take(g.bound * 4);
  l.token_rows = take(slots * g.K * 4);
  l.gx = take(g.bound * g.H * (g.fp8 ? 1 : 2));
  l.gscales = take(g.bound * g.SC * 4);
  // Plan once (DeviceEpOptions::plan_once): [NT][W] u16 counts, then exclusive prefixes over the
  // tiles; [R][NT] destination ballots; [W] totals.
  l.plan_cnt = take(static_cast<size_t>(g.NT) * g.W * 2);
  l.plan_dball = take(static_cast<size_t>(g.R) * g.NT * 4);
  l.plan_tot = take(static_cast<size_t>(g.W) * 4);
  l.ll = take(ll::region_bytes(g.R, g.L, g.Tmax, g.K, g.H));
  l.total = at;
  return l;
}

// Send plan (PlanSmem, sm90_device_ep_kernels.cuh): the regions in order, 16-byte aligned.
PlanSmem plan_smem(const Geometry& g) {
  PlanSmem p{};
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t o = at;
    at = align_up(at + bytes, 16);
    return o;
  };
  p.ecnt = take(static_cast<size_t>(g.E) * g.NT * 2);
  p.dcnt = take(static_cast<size_t>(g.R) * g.NT * 2);
  p.dball = take(static_cast<size_t>(g.R) * g.NT * 4);
  p.emask = take(static_cast<size_t>(kWarps) * g.E * 4);
  p.etot = take(static_cast<size_t>(g.E) * 4);
  p.rowbase = take(static_cast<size_t>(g.E) * 4);  // dispatch_direct_rows (direct_layout)
  p.total = at;
  return p;
}
// Plan kernel: per-warp count rows while counting; the last block then holds the whole [NT][W]
// count table (rounded to 16 bytes for vector copies).
size_t plan_kernel_smem(const Geometry& g) {
  // (32-bit counters with plan_fast_count; 16-bit otherwise.)
  const size_t rows = static_cast<size_t>(kWarps) * align_up(g.W, 4) * 4;
  const size_t table = align_up(static_cast<size_t>(g.NT) * g.W * 2, 16);
  return std::max(rows, table);
}
// Receive kernels: per-(source, expert) row bases, expert offsets, region offsets, source T.
size_t recv_smem_bytes(const Geometry& g) {
  return (static_cast<size_t>(g.R) * g.L + (g.L + 1) + g.L + (g.R + 1) + g.R) * 4;
}

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    FM_CHECK_CUDA(cudaGetDevice(&prev_));
    FM_CHECK_CUDA(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(prev_); }

 private:
  int prev_ = 0;
};

void launch(void (*kernel)(Args), int grid, size_t smem, cudaStream_t stream, bool dependent,
            const Args& a) {
  detail::launch_kernel(kernel, grid, kSendThreads, smem, stream, dependent, a);
}

}  // namespace

struct DeviceEpRank::Impl {
  EpConfig cfg;
  Geometry g;
  Geometry gc;  // the combine kernels' (combine_geometry)
  WsLayout lay;
  DeviceEpOptions opt;
  // recv_blocks: dispatch_recv and combine_recv; side_recv_blocks: the low-latency and combine
  // backward receive kernels (DeviceEpOptions::recv_blocks).
  int rank = 0, device = 0, sm_count = 0, recv_blocks = 1, side_recv_blocks = 1;
  PlanSmem ps;
  bool direct = false;  // DeviceEpOptions::dispatch_direct_rows where it applies
  // DeviceEpOptions::dispatch_plan_counts where it applies (direct, plan_fast_count,
  // prefetch_payload); plan_mode: the plan kernel's (dispatch_plan_kernel).
  bool plan_counts = false;
  int plan_mode = 0;
  // DeviceEpOptions::layout_token_slots where it applies (layout_token_slots(opt, direct)).
  bool token_slots = false;
  // DeviceEpOptions::layout_payload_claims where it applies (layout_payload_claims(opt, direct)).
  bool payload_claims = false;

  char* ws = nullptr;
  char* send_ws = nullptr;    // Wire::kNccl: records packed per destination
  DevErr* err_dev = nullptr;  // in the workspace
  std::vector<void*> opened;  // IPC mappings to close
  int64_t last_tokens = 0;
  const uint16_t* last_y = nullptr;      // combine input, also read by combine_recv (NVLink)
  const uint16_t* last_bwd_y = nullptr;  // combine backward: y of combine_backward_send
  bool last_weighted = true;
  // Masked configs over NVLink run the low-latency kernels (DeviceEpOptions::low_latency).
  bool ll = false;
  unsigned long long* ll_trace = nullptr;  // FP8MOE_EP_LL_TRACE=1: phase stamps (diagnostics)
  bool ll_fence = false;                   // FP8MOE_EP_LL_FENCE=1 (experiment)
  // DeviceEpOptions::ll_recv_plan where the receive's plan fits (the same on every rank).
  bool ll_recv_plan = false;
  // DeviceEpOptions::ll_recv_plan_ids_block where ll_recv_plan is on and experts_per_rank < 255.
  bool ll_recv_plan_ids_block = false;
  unsigned long long* trace = nullptr;  // FP8MOE_EP_TRACE=1: dispatch phase stamps

  ll::Params ll_params() const {
    ll::Params p;
    p.f = {lay.stage,
           lay.src_token,
           lay.topk_local,
           lay.topk_pos,
           lay.weight,
           lay.recv_count,
           lay.notify,
           lay.comb_stage,
           lay.peer_table,
           lay.slot,
           lay.status,
           lay.recv_offset,
           lay.expert_counts,
           lay.expert_offsets,
           lay.m_indices,
           lay.row_src,
           lay.row_weight,
           lay.token_rows,
           lay.gx,
           lay.gscales,
           lay.ll};
    p.my = ws;
    p.err = reinterpret_cast<ll::ErrRecord*>(err_dev);
    p.rank = rank;
    p.R = g.R;
    p.K = g.K;
    p.L = g.L;
    p.E = g.E;
    p.H = g.H;
    p.SC = g.SC;
    p.Tmax = g.Tmax;
    p.P = g.P;
    p.cap = g.cap;
    p.NS = g.NS;
    p.fp8 = g.fp8;
    p.expand = opt.expand_payload;
    p.send_blocks = opt.num_blocks;
    p.recv_blocks = side_recv_blocks;
    p.timeout_ns = static_cast<unsigned long long>(cfg.timeout_s * 1e9);
    p.st_rows_needed = kRowsNeeded;
    p.st_overflow = kOverflow;
    p.st_num_recv = kNumRecv;
    p.T = last_tokens;
    p.y = last_y;
    p.weighted = last_weighted;
    p.trace = ll_trace;
    p.fence = ll_fence;
    p.token_flags = opt.ll_token_flags;
    p.early_notify = opt.ll_early_notify || p.token_flags;
    p.spread = opt.ll_combine_spread;
    // ll_recv_plan: combine_tokens' own partials are the combine send's (own_partial would read
    // y at the token slot; the rows of y are the records' compact slots).
    p.own_recv = opt.ll_combine_own_recv && !(ll_recv_plan && !last_weighted);
    p.own_narrow = opt.ll_combine_own_narrow;
    p.dest_order = static_cast<uint8_t>(opt.ll_dispatch_rotate);
    // NOTE: with ranks sharing a GPU, a send waiting for a peer's next send to start could wait
    // for SMs its own spinning blocks hold, so the receive acknowledges there as before.
    p.defer_ack = opt.ll_defer_dispatch_ack && opt.ranks_per_device <= 1;
    // Session 16 (ll2): the same fallback (a send of one rank would wait for a kernel of another
    // that may need the SMs its spinning blocks hold). With ll_defer_dispatch_ack too, the
    // dispatch acknowledgement takes ll_defer_acks' path (its kernels give both).
    if (opt.ll_defer_acks != 0 && opt.ranks_per_device <= 1) {
      p.acks = static_cast<uint8_t>(opt.ll_defer_acks);
      if (p.defer_ack) p.acks |= ll::kAcksDispatch;
      if (opt.ll_deferred_ack_first_block) p.acks |= ll::kAcksFirstBlock;
    }
    p.recv_plan = static_cast<uint8_t>(
        ll_recv_plan ? ll::kRecvPlan | (ll_recv_plan_ids_block ? ll::kRecvPlanIdsBlock : 0) : 0);
    return p;
  }
  std::unique_ptr<detail::ForwardEpRank> fwd;  // more than one node: the two-stage route

  // Combine backward runs on the normal NVLink kernels of one node; the other configurations
  // have none yet and say so.
  void check_backward_supported() const {
    FM_CHECK_ARG(!fwd, "rank ", rank, ": combine backward on the GPU is not supported on the ",
                 "two-stage route (gpus_per_node=", cfg.gpus_per_node,
                 " < num_ranks=", cfg.num_ranks, "); one node only");
    FM_CHECK_ARG(opt.wire == Wire::kNvlink, "rank ", rank,
                 ": combine backward on the GPU is not supported over Wire::kNccl (NVLink only)");
    FM_CHECK_ARG(!ll, "rank ", rank,
                 ": combine backward is not supported by the low-latency kernels (masked_capacity=",
                 cfg.masked_capacity, "); DeviceEpOptions::low_latency = false runs the ",
                 "masked layout on the normal kernels, which have it");
  }
  bwd::Params bwd_params() const {
    bwd::Params p;
    p.f.comb_stage = lay.comb_stage;
    p.f.ack = lay.flags + static_cast<size_t>(kCombineAck) * g.R * 8;
    p.f.gw = lay.bwd_gw;
    p.f.gw_mask = lay.bwd_mask;
    p.f.bwd = lay.bwd;
    p.f.peer_table = lay.peer_table;
    p.f.slot = lay.slot;
    p.f.status = lay.status;
    p.f.recv_count = lay.recv_count;
    p.f.row_weight = lay.row_weight;
    p.f.token_rows = lay.token_rows;
    p.my = ws;
    p.err = reinterpret_cast<ll::ErrRecord*>(err_dev);
    p.rank = rank;
    p.R = g.R;
    p.K = g.K;
    p.H = g.H;
    p.Tmax = g.Tmax;
    p.bound = g.bound;
    p.send_blocks = combine_grid();
    p.recv_blocks = side_recv_blocks;
    p.timeout_ns = static_cast<unsigned long long>(cfg.timeout_s * 1e9);
    p.st_seq = kSeqCombine;
    p.st_overflow = kOverflow;
    p.st_sent = kCombineSent;
    p.ctr_ack = kCombineAck;
    p.T = last_tokens;
    return p;
  }

  // FP8MOE_EP_TRACE=1: the combine stamps (minima, then maxima) start afresh with each combine.
  void reset_combine_trace(cudaStream_t stream) const {
    if (!trace) return;
    FM_CHECK_CUDA(
        cudaMemsetAsync(trace + kTrCombMins, 0xFF, (kTrCombMaxes - kTrCombMins) * 8, stream));
    FM_CHECK_CUDA(
        cudaMemsetAsync(trace + kTrCombMaxes, 0, (kTrCombRecvEnd + 1 - kTrCombMaxes) * 8, stream));
  }
  // Grid of combine_send and combine_backward_send (both count into kCombineSent).
  int combine_grid() const { return opt.combine_blocks > 0 ? opt.combine_blocks : opt.num_blocks; }
  Args args() const {
    Args a{};
    a.g = g;
    a.lay = lay;
    a.ps = ps;
    a.my = ws;
    a.err = err_dev;
    a.rank = rank;
    a.send_blocks = dispatch_send_grid(opt);
    a.timeout_ns = static_cast<unsigned long long>(cfg.timeout_s * 1e9);
    a.nccl = opt.wire == Wire::kNccl;
    a.direct = direct;
    a.self_rows = direct && opt.dispatch_self_rows;
    a.fast_plan = opt.plan_once && opt.plan_fast_count;
    a.trace = trace;
    return a;
  }
  // The combine kernels' arguments: args() over the combine's chunks (combine_geometry).
  Args combine_args() const {
    Args a = args();
    a.g = gc;
    return a;
  }
  // Wire::kNccl: every peer's region of the send buffer goes to it, its region of ours comes
  // back (fields of the given offsets, `bytes` per region each).
  void exchange(const std::vector<std::pair<size_t, size_t>>& fields, cudaStream_t stream) {
#if defined(FP8MOE_HAVE_NCCL)
    auto comm = static_cast<ncclComm_t>(opt.nccl_comm);
    FM_CHECK_NCCL(ncclGroupStart());
    for (int p = 0; p < g.R; ++p)
      for (const auto& [off, bytes] : fields) {
        FM_CHECK_NCCL(ncclSend(send_ws + off + p * bytes, bytes, ncclUint8, p, comm, stream));
        FM_CHECK_NCCL(ncclRecv(ws + off + p * bytes, bytes, ncclUint8, p, comm, stream));
      }
    FM_CHECK_NCCL(ncclGroupEnd());
#else
    (void)fields;
    (void)stream;
    FM_THROW(ErrorKind::kInvalidArgument, "this build has no NCCL back end");
#endif
  }
};

DeviceEpRank::DeviceEpRank(const EpConfig& cfg, int rank, int device, DeviceEpOptions opt)
    : impl_(std::make_unique<Impl>()) {
  validate(cfg);
  FM_CHECK_ARG(cfg.num_ranks <= kMaxRanks, "num_ranks=", cfg.num_ranks, " exceeds ", kMaxRanks);
  FM_CHECK_ARG(cfg.top_k <= kMaxTopK, "top_k=", cfg.top_k, " exceeds ", kMaxTopK);
  FM_CHECK_ARG(rank >= 0 && rank < cfg.num_ranks, "rank ", rank, " out of range");
  FM_CHECK_ARG(opt.wire == Wire::kNvlink || (nccl_available() && opt.nccl_comm),
               "Wire::kNccl needs a build with NCCL and a communicator");
  FM_CHECK_ARG(opt.num_blocks >= 1, "num_blocks=", opt.num_blocks, " must be positive");
  FM_CHECK_ARG(opt.layout_send_blocks >= 0, "layout_send_blocks=", opt.layout_send_blocks,
               " must not be negative");
  FM_CHECK_ARG(opt.combine_blocks >= 0, "combine_blocks=", opt.combine_blocks,
               " must not be negative");
  FM_CHECK_ARG(opt.chunk_tokens >= 0, "chunk_tokens=", opt.chunk_tokens, " must not be negative");
  FM_CHECK_ARG(opt.combine_chunk_tokens >= 0, "combine_chunk_tokens=", opt.combine_chunk_tokens,
               " must not be negative");
  FM_CHECK_ARG(opt.recv_blocks >= 0, "recv_blocks=", opt.recv_blocks, " must not be negative");
  FM_CHECK_ARG(opt.layout_payload_claims >= 0, "layout_payload_claims=", opt.layout_payload_claims,
               " must not be negative");
  FM_CHECK_ARG(opt.ll_defer_acks >= 0 && opt.ll_defer_acks <= 3,
               "ll_defer_acks=", opt.ll_defer_acks,
               " must be 0..3 (1 dispatch, 2 combine, 3 both)");
  FM_CHECK_ARG(opt.ll_dispatch_rotate >= 0 && opt.ll_dispatch_rotate <= 2,
               "ll_dispatch_rotate=", opt.ll_dispatch_rotate, " must be 0, 1 or 2");
  FM_CHECK_ARG(opt.combine_recv_tile >= 0 && opt.combine_recv_tile <= 32,
               "combine_recv_tile=", opt.combine_recv_tile, " must be 0 (automatic) or 1..32");
  FM_CHECK_ARG(opt.combine_send_parts == 0 || opt.combine_send_parts == 1 ||
                   opt.combine_send_parts == 2 || opt.combine_send_parts == 4,
               "combine_send_parts=", opt.combine_send_parts, " must be 0, 1, 2 or 4");
  FM_CHECK_ARG(cfg.max_tokens_per_rank <= 65535, "max_tokens_per_rank=", cfg.max_tokens_per_rank,
               " exceeds 65535 (the send plan counts tokens in 16 bits)");
  Impl& m = *impl_;
  if (cfg.nodes() > 1) {  // the two-stage route (sm90_device_ep_forward.cu) takes every call
    m.cfg = cfg;
    m.rank = rank;
    m.device = device;
    m.fwd = std::make_unique<detail::ForwardEpRank>(cfg, rank, device, opt);
    return;
  }
  m.cfg = cfg;
  m.g = make_geometry(cfg, opt);
  m.ps = plan_smem(m.g);
  FM_CHECK_ARG(m.ps.total <= 200 * 1024, "max_tokens_per_rank=", cfg.max_tokens_per_rank, " with ",
               cfg.num_experts, " experts and ", cfg.num_ranks,
               " ranks needs more shared memory for the send plan (", m.ps.total,
               " bytes) than a block has");
  FM_CHECK_ARG(plan_kernel_smem(m.g) <= 200 * 1024, "max_tokens_per_rank=", cfg.max_tokens_per_rank,
               " with ", cfg.num_experts, " experts and ", cfg.num_ranks,
               " ranks needs more shared memory for the plan kernel (", plan_kernel_smem(m.g),
               " bytes) than a block has");
  FM_CHECK_ARG(recv_smem_bytes(m.g) <= 200 * 1024, cfg.num_experts, " experts over ", cfg.num_ranks,
               " ranks need more shared memory for the receive layout than a block has");
  m.gc = combine_geometry(m.g, opt);
  m.lay = make_layout(m.g);
  m.opt = opt;
  // The direct rows need every rank's send blocks resident at once (each waits for all
  // notifies) and a peer-mapped destination layout; elsewhere the source-region path runs.
  // With the plan kernel and the grouped layout only (what was tested and measured; the masked
  // layout of the normal kernels keeps the source regions).
  m.direct = opt.dispatch_direct_rows && opt.expand_payload && opt.wire == Wire::kNvlink &&
             opt.ranks_per_device <= 1 && opt.plan_once && cfg.masked_capacity == 0;
  m.rank = rank;
  m.device = device;
  DeviceGuard guard(device);
  FM_CHECK_CUDA(cudaDeviceGetAttribute(&m.sm_count, cudaDevAttrMultiProcessorCount, device));
  // NOTE: block 0 of every rank's send notifies; with more send blocks than SMs the resident
  // blocks could all be waiting for a block 0 that never gets an SM (CUDA does not promise the
  // order in which blocks start), so the direct rows need every send block resident at once.
  if (opt.num_blocks > m.sm_count) m.direct = false;
  // NOTE: like direct, every rank must resolve plan_counts alike (same options): a source that
  // publishes only plan words to a rank that waits for its all_counts, or the other way round,
  // would wait until timeout_s.
  m.plan_counts =
      m.direct && opt.plan_fast_count && opt.dispatch_plan_counts && opt.prefetch_payload;
  m.token_slots = layout_token_slots(opt, m.direct);
  m.payload_claims = layout_payload_claims(opt, m.direct);
  const bool block_scan = opt.plan_once && opt.plan_fast_count && opt.plan_block_scan;
  m.plan_mode = (m.plan_counts ? 1 : 0) | (block_scan ? 2 : 0);
  {
    // Receive kernels spin on peers: with several ranks on one GPU their grids must leave room
    // for every rank's send kernel (at most half the SMs for all receivers together).
    const int sharing = std::max(1, opt.ranks_per_device);
    int rb = std::max(1, (m.sm_count - opt.num_blocks) / sharing);
    if (sharing > 1) rb = std::min(rb, std::max(1, m.sm_count / (2 * sharing)));
    m.side_recv_blocks = opt.recv_blocks > 0 ? opt.recv_blocks : rb;
    // NOTE: dispatch_recv and combine_recv over every SM when the GPU is this rank's alone: the
    // send kernel is resident before its dependent receive launches, so the receive blocks that
    // find no free SM wait for retiring send blocks instead of holding up the send.
    m.recv_blocks = opt.recv_blocks > 0 ? opt.recv_blocks : sharing > 1 ? rb : m.sm_count;
  }
  FM_CHECK_CUDA(cudaMalloc(&m.ws, workspace_bytes(m.g, m.lay)));
  FM_CHECK_CUDA(cudaMemset(m.ws, 0, workspace_bytes(m.g, m.lay)));
  FM_CHECK_CUDA(cudaMemset(m.ws + m.lay.m_indices, 0xFF, m.g.bound * 4));
  FM_CHECK_CUDA(cudaMemset(m.ws + m.lay.row_src, 0xFF, m.g.bound * 4));
  FM_CHECK_CUDA(cudaMemset(m.ws + row_record_offset(m.lay), 0xFF, m.g.bound * 4));
  FM_CHECK_CUDA(cudaMemset(m.ws + m.lay.token_rows, 0xFF, m.g.R * m.g.Tmax * m.g.K * 4));
  // NOTE: the error record is device memory: every waiting thread polls it, and polling
  // host-mapped memory over PCIe from many SMs made system-scope fences crawl (v5, first run).
  m.err_dev = reinterpret_cast<DevErr*>(m.ws + m.lay.err);
  {
    // dispatch_recv_bulk_rows is a default, and its slots come on top of the receive layout's
    // shared memory: where both do not fit (tens of thousands of experts), the lanes copy the
    // rows instead (the same results bit for bit; the receive's copies touch no other rank).
    int max_smem = 0;
    FM_CHECK_CUDA(
        cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, m.device));
    if (dispatch_recv_smem(m.opt, recv_smem_bytes(m.g)) + 1024 > static_cast<size_t>(max_smem))
      m.opt.dispatch_recv_bulk_rows = false;
  }
  // NOTE: load every kernel now: with lazy module loading a first launch can wait for the device,
  // which never drains while a peer's kernel spins on a flag.
  for (const void* k :
       {reinterpret_cast<const void*>(dispatch_plan_kernel(m.opt.plan_fast_count, m.plan_mode)),
        reinterpret_cast<const void*>(dispatch_send_kernel(m.opt, m.direct, m.plan_counts)),
        reinterpret_cast<const void*>(dispatch_recv_kernel(m.opt, m.token_slots, m.payload_claims)),
        reinterpret_cast<const void*>(combine_send_kernel(m.opt)),
        reinterpret_cast<const void*>(combine_recv_kernel(m.opt))}) {
    cudaFuncAttributes attr;
    FM_CHECK_CUDA(cudaFuncGetAttributes(&attr, k));
  }
  FM_CHECK_CUDA(cudaFuncSetAttribute(dispatch_send_kernel(m.opt, m.direct, m.plan_counts),
                                     cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(m.ps.total)));
  FM_CHECK_CUDA(cudaFuncSetAttribute(dispatch_plan_kernel(m.opt.plan_fast_count, m.plan_mode),
                                     cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(plan_kernel_smem(m.g))));
  if (const size_t smem = combine_send_smem(m.opt, m.g); smem > 0) {
    int max_smem = 0;
    FM_CHECK_CUDA(
        cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, m.device));
    FM_CHECK_ARG(smem + 1024 <= static_cast<size_t>(max_smem), "rank ", m.rank,
                 ": combine_bulk_rows needs ", smem, " bytes of shared memory per block at hidden ",
                 m.g.H, ", the device allows ", max_smem);
    FM_CHECK_CUDA(cudaFuncSetAttribute(combine_send_kernel(m.opt),
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem)));
  }
  FM_CHECK_CUDA(
      cudaFuncSetAttribute(dispatch_recv_kernel(m.opt, m.token_slots, m.payload_claims),
                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(dispatch_recv_smem(m.opt, recv_smem_bytes(m.g)))));
  m.ll = opt.low_latency && opt.wire == Wire::kNvlink && cfg.masked_capacity > 0 &&
         cfg.max_tokens_per_rank <= ll::kMaxTokens && cfg.hidden % 128 == 0;
  m.ll_recv_plan = m.ll && opt.ll_recv_plan && ll::recv_plan_fits(m.g.R, m.g.L, m.g.Tmax, m.g.K);
  m.ll_recv_plan_ids_block = m.ll_recv_plan && opt.ll_recv_plan_ids_block && m.g.L < 255;
  if (m.ll && std::getenv("FP8MOE_EP_LL_TRACE")) {
    FM_CHECK_CUDA(cudaMalloc(&m.ll_trace, ll::kTraceSlots * 8));
    FM_CHECK_CUDA(cudaMemset(m.ll_trace, 0, ll::kTraceSlots * 8));
  }
  m.ll_fence = std::getenv("FP8MOE_EP_LL_FENCE") != nullptr;
  if (std::getenv("FP8MOE_EP_TRACE")) {
    FM_CHECK_CUDA(cudaMalloc(&m.trace, kTrSlots * 8));
    FM_CHECK_CUDA(cudaMemset(m.trace, 0, kTrSlots * 8));
  }
  if (m.ll) ll::prepare(m.ll_params());
  bwd::prepare();
  if (opt.wire == Wire::kNccl) {
    // The peer-written fields lead the layout, so the send buffer is that prefix.
    FM_CHECK_CUDA(cudaMalloc(&m.send_ws, m.lay.peer_table));
    FM_CHECK_CUDA(cudaMemset(m.send_ws, 0, m.lay.peer_table));
    // Every "peer" of the kernels is the send buffer; connect leaves this table alone.
    const std::vector<void*> bases(m.g.R, m.send_ws);
    FM_CHECK_CUDA(cudaMemcpy(m.ws + m.lay.peer_table, bases.data(), m.g.R * sizeof(void*),
                             cudaMemcpyHostToDevice));
  }
  FM_CHECK_CUDA(cudaDeviceSynchronize());
}

DeviceEpRank::~DeviceEpRank() {
  if (!impl_) return;
  cudaSetDevice(impl_->device);
  for (void* p : impl_->opened) cudaIpcCloseMemHandle(p);
  cudaFree(impl_->ws);
  cudaFree(impl_->send_ws);
  cudaFree(impl_->ll_trace);
  cudaFree(impl_->trace);
}

int DeviceEpRank::rank() const {
  return impl_->rank;
}
int DeviceEpRank::device() const {
  return impl_->device;
}
const EpConfig& DeviceEpRank::config() const {
  return impl_->cfg;
}
void* DeviceEpRank::workspace() const {
  if (impl_->fwd) return impl_->fwd->workspace();
  return impl_->ws;
}

cudaIpcMemHandle_t DeviceEpRank::ipc_handle() const {
  if (impl_->fwd) return impl_->fwd->ipc_handle();
  DeviceGuard guard(impl_->device);
  cudaIpcMemHandle_t h;
  FM_CHECK_CUDA(cudaIpcGetMemHandle(&h, impl_->ws));
  return h;
}

void DeviceEpRank::connect(const std::vector<void*>& bases) {
  if (impl_->fwd) return impl_->fwd->connect(bases);
  Impl& m = *impl_;
  FM_CHECK_ARG(static_cast<int>(bases.size()) == m.g.R, bases.size(), " bases for ", m.g.R,
               " ranks");
  // NOTE: one node over NCCL writes no peer; its table points at the send buffer (constructor),
  // so that a process-per-GPU caller may connect every wire alike.
  if (m.opt.wire == Wire::kNccl) return;
  DeviceGuard guard(m.device);
  FM_CHECK_CUDA(cudaMemcpy(m.ws + m.lay.peer_table, bases.data(), m.g.R * sizeof(void*),
                           cudaMemcpyHostToDevice));
}

void DeviceEpRank::connect_ipc(const std::vector<cudaIpcMemHandle_t>& handles) {
  if (impl_->fwd) return impl_->fwd->connect_ipc(handles);
  Impl& m = *impl_;
  FM_CHECK_ARG(static_cast<int>(handles.size()) == m.g.R, handles.size(), " handles for ", m.g.R,
               " ranks");
  if (m.opt.wire == Wire::kNccl) return;  // no peer is written (see connect)
  DeviceGuard guard(m.device);
  std::vector<void*> bases(m.g.R);
  for (int r = 0; r < m.g.R; ++r) {
    if (r == m.rank) {
      bases[r] = m.ws;
      continue;
    }
    FM_CHECK_CUDA(cudaIpcOpenMemHandle(&bases[r], handles[r], cudaIpcMemLazyEnablePeerAccess));
    m.opened.push_back(bases[r]);
  }
  connect(bases);
}

void DeviceEpRank::dispatch_send(const DeviceBatch& b, cudaStream_t stream) {
  if (impl_->fwd) return impl_->fwd->dispatch_send(b, stream);
  Impl& m = *impl_;
  FM_CHECK_ARG(b.tokens >= 0 && b.tokens <= m.g.Tmax, "rank ", m.rank, ": ", b.tokens,
               " tokens exceed max_tokens_per_rank=", m.g.Tmax);
  DeviceGuard guard(m.device);
  if (m.ll) {
    m.last_tokens = b.tokens;
    ll::Params p = m.ll_params();
    p.x = b.x;
    p.idx = b.topk_idx;
    p.w = b.topk_weight;
    ll::dispatch_send(p, stream);
    return;
  }
  Args a = m.args();
  a.T = b.tokens;
  a.x = b.x;
  a.idx = b.topk_idx;
  a.w = b.topk_weight;
  m.last_tokens = b.tokens;
  // layout_payload_claims: the send's claim unit in steps (Args::tile is the combine receive's
  // otherwise, so no field is added and the other kernels keep their parameter layout).
  if (m.payload_claims) a.tile = m.opt.layout_payload_claims;
  // The session-11 stamps' minimum (the plan kernel resets the older ones), before the plan
  // kernel: the send is its programmatic dependent.
  if (m.trace) FM_CHECK_CUDA(cudaMemsetAsync(m.trace + kTrSendFirstEnd, 0xFF, 8, stream));
  if (m.opt.plan_once) {
    const int64_t tiles = (b.tokens + kTile - 1) / kTile;
    // Session 8's plan kernel publishes sums per block: a fixed grid (plan_blocks).
    const int grid = m.plan_mode != 0
                         ? plan_blocks(m.g)
                         : static_cast<int>(std::max<int64_t>(1, (tiles + kWarps - 1) / kWarps));
    launch(dispatch_plan_kernel(m.opt.plan_fast_count, m.plan_mode), grid, plan_kernel_smem(m.g),
           stream, false, a);
  }
  // plan_once: a programmatic dependent of the plan kernel (it waits for the plan in-kernel).
  launch(dispatch_send_kernel(m.opt, m.direct, m.plan_counts), dispatch_send_grid(m.opt),
         m.ps.total, stream, m.opt.plan_once, a);
  if (a.nccl) {
    const size_t T = m.g.Tmax, K = m.g.K;
    m.exchange({{m.lay.stage, T * m.g.P},
                {m.lay.src_token, T * 4},
                {m.lay.topk_local, T * K * 4},
                {m.lay.topk_pos, T * K * 4},
                {m.lay.weight, T * K * 4},
                {m.lay.recv_count, 4},
                {m.lay.notify, static_cast<size_t>(m.g.NS) * 4}},
               stream);
  }
}

void DeviceEpRank::dispatch_recv(cudaStream_t stream) {
  if (impl_->fwd) return impl_->fwd->dispatch_recv(stream);
  Impl& m = *impl_;
  DeviceGuard guard(m.device);
  if (m.ll) return ll::dispatch_recv(m.ll_params(), stream, m.opt.overlap_recv);
  Args a = m.args();
  a.expand = m.opt.expand_payload;
  launch(dispatch_recv_kernel(m.opt, m.token_slots, m.payload_claims), m.recv_blocks,
         dispatch_recv_smem(m.opt, recv_smem_bytes(m.g)), stream, m.opt.overlap_recv && !a.nccl, a);
}

void DeviceEpRank::combine_send(const uint16_t* y, cudaStream_t stream) {
  if (impl_->fwd) return impl_->fwd->combine_send(y, true, stream);
  Impl& m = *impl_;
  DeviceGuard guard(m.device);
  m.last_y = y;
  m.last_weighted = true;
  if (m.ll) return ll::combine_send(m.ll_params(), stream);
  m.reset_combine_trace(stream);
  Args a = m.combine_args();
  a.y = y;
  a.weighted = true;
  a.peer_blocks = m.opt.combine_peer_blocks;
  a.send_blocks = m.combine_grid();
  launch(combine_send_kernel(m.opt), a.send_blocks, combine_send_smem(m.opt, m.g), stream, false,
         a);
  if (a.nccl) m.exchange({{m.lay.comb_stage, m.g.Tmax * m.g.H * 2}}, stream);
}

void DeviceEpRank::combine_tokens_send(const uint16_t* rows, cudaStream_t stream) {
  if (impl_->fwd) return impl_->fwd->combine_send(rows, false, stream);
  Impl& m = *impl_;
  DeviceGuard guard(m.device);
  m.last_y = rows;
  m.last_weighted = false;
  if (m.ll) return ll::combine_send(m.ll_params(), stream);
  m.reset_combine_trace(stream);
  Args a = m.combine_args();
  a.y = rows;
  a.weighted = false;
  a.peer_blocks = m.opt.combine_peer_blocks;
  a.send_blocks = m.combine_grid();
  launch(combine_send_kernel(m.opt), a.send_blocks, combine_send_smem(m.opt, m.g), stream, false,
         a);
  if (a.nccl) m.exchange({{m.lay.comb_stage, m.g.Tmax * m.g.H * 2}}, stream);
}

void DeviceEpRank::combine_recv(uint16_t* out, cudaStream_t stream) {
  if (impl_->fwd) return impl_->fwd->combine_recv(out, stream);
  Impl& m = *impl_;
  DeviceGuard guard(m.device);
  if (m.ll) {
    ll::Params p = m.ll_params();
    p.out = out;
    return ll::combine_recv(p, stream, m.opt.overlap_recv);
  }
  Args a = m.combine_args();
  a.out = out;
  a.T = m.last_tokens;
  a.y = m.last_y;
  a.weighted = m.last_weighted;
  a.send_blocks = m.combine_grid();  // the combine send blocks this receive waits for
  // Tiles of about T / (4 x blocks) tokens (at most 32): four waves (session 6, 2 x H100, V3
  // shape: 8 tokens, each split over two warps, combine 292.7 -> 283.3 us; two waves of 16 tokens
  // before, 4 tokens 294.2); for a short batch one token per block, its columns split over the
  // block's warps. With combine_recv_warp_items (and its kernels: two steps, stream rows) the tile
  // only sets the parts per token (warps / tile): T / (8 x blocks), 4 parts per token at the V3
  // shape (session 7, 2 x H100: 268.7 us against 280.6 with 2 parts and 309.2 with one).
  const bool warp_items =
      m.opt.combine_recv_warp_items && m.opt.combine_two_steps && m.opt.combine_stream_rows;
  const int64_t waves = warp_items ? 8 : 4;
  const int64_t per =
      (a.T + waves * m.recv_blocks - 1) / std::max<int64_t>(1, waves * m.recv_blocks);
  a.tile = static_cast<int>(
      std::clamp<int64_t>(m.opt.combine_recv_tile > 0 ? m.opt.combine_recv_tile : per, 1, 32));
  launch(combine_recv_kernel(m.opt), m.recv_blocks, 0, stream, m.opt.overlap_recv && !a.nccl, a);
}

void DeviceEpRank::combine_backward_send(const uint16_t* grad_out, const uint16_t* y,
                                         cudaStream_t stream) {
  Impl& m = *impl_;
  m.check_backward_supported();
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  FM_CHECK_ARG(aligned(grad_out) && aligned(y) && (grad_out || m.last_tokens == 0) && y, "rank ",
               m.rank, ": combine backward needs grad_out and y on 16-byte boundaries");
  DeviceGuard guard(m.device);
  m.last_bwd_y = y;
  bwd::Params p = m.bwd_params();
  p.grad_out = grad_out;
  bwd::send(p, stream);
}

void DeviceEpRank::combine_backward_recv(uint16_t* grad_y, float* grad_w, cudaStream_t stream) {
  Impl& m = *impl_;
  m.check_backward_supported();
  FM_CHECK_ARG(m.last_bwd_y, "rank ", m.rank,
               ": combine_backward_recv without a combine_backward_send before it");
  FM_CHECK_ARG(
      grad_y && reinterpret_cast<uintptr_t>(grad_y) % 16 == 0 && (grad_w || m.last_tokens == 0),
      "rank ", m.rank, ": combine backward needs grad_y on a 16-byte boundary and grad_w");
  DeviceGuard guard(m.device);
  bwd::Params p = m.bwd_params();
  p.y = m.last_bwd_y;
  p.grad_y = grad_y;
  p.grad_w = grad_w;
  bwd::recv(p, stream);
}

DeviceRecvView DeviceEpRank::view() const {
  if (impl_->fwd) return impl_->fwd->view();
  const Impl& m = *impl_;
  DeviceRecvView v;
  v.recv_count = reinterpret_cast<const int32_t*>(m.ws + m.lay.recv_count);
  v.expert_counts = reinterpret_cast<const int32_t*>(m.ws + m.lay.expert_counts);
  v.expert_offsets = reinterpret_cast<const int32_t*>(m.ws + m.lay.expert_offsets);
  v.m_indices = reinterpret_cast<const int32_t*>(m.ws + m.lay.m_indices);
  v.row_src = reinterpret_cast<const int32_t*>(m.ws + m.lay.row_src);
  v.row_weight = reinterpret_cast<const float*>(m.ws + m.lay.row_weight);
  v.x = m.ws + m.lay.gx;
  v.x_scales = m.g.fp8 ? reinterpret_cast<const float*>(m.ws + m.lay.gscales) : nullptr;
  v.status = reinterpret_cast<const int64_t*>(m.ws + m.lay.status);
  // The records as a row array (DeviceRecvView: where each wire and route provides them).
  if (!m.ll && !m.opt.expand_payload) {
    v.records = reinterpret_cast<const uint8_t*>(m.ws + m.lay.stage);
    v.record_stride = m.g.P;
    v.record_rows = static_cast<int64_t>(m.g.R) * m.g.Tmax;
    v.row_record = reinterpret_cast<const int32_t*>(m.ws + row_record_offset(m.lay));
  }
  return v;
}

void DeviceEpRank::check() const {
  if (impl_->fwd) return impl_->fwd->check();
  const Impl& m = *impl_;
  DeviceGuard guard(m.device);
  DevErr e;
  FM_CHECK_CUDA(cudaMemcpy(&e, m.err_dev, sizeof(e), cudaMemcpyDeviceToHost));
  if (e.code == kErrTimeout) {
    const bool chunked = e.counter == kDispatchChunk || e.counter == kCombineChunk;
    FM_THROW(ErrorKind::kRuntime, "rank ", e.rank, ": peer ", e.peer, " did not answer within ",
             m.cfg.timeout_s, " s: waited on ", counter_name(e.counter), "[rank=", e.rank,
             "][src=", e.peer, "]",
             chunked ? "[chunk=" + std::to_string(e.detail) + "]" : std::string(),
             ", expected >= ", e.expected, ", seen ", e.seen);
  }
  if (e.code == kErrBadExpert)
    FM_THROW(ErrorKind::kInvalidArgument, "rank ", e.rank, " token ", e.detail, ": expert id ",
             static_cast<long long>(e.seen), " out of range [-1, ", m.cfg.num_experts, ")");

  if (m.ll_trace) ll::print_trace(m.ll_trace, m.rank);
  if (m.trace && !m.ll) {
    unsigned long long t[kTrSlots];
    FM_CHECK_CUDA(cudaMemcpy(t, m.trace, sizeof(t), cudaMemcpyDeviceToHost));
    auto us = [&](int slot) { return (static_cast<double>(t[slot]) - t[kTrPlanStart]) * 1e-3; };
    // Stamps set only by some paths (0: an earlier dispatch's or none).
    auto maybe = [&](int slot) { return t[slot] >= t[kTrPlanStart] ? us(slot) : 0.0; };
    std::fprintf(stderr,
                 "# ep_trace rank %d (us from plan start): plan_blocks_in %.1f plan_loaded %.1f "
                 "plan_matched %.1f plan_counted %.1f plan_published %.1f "
                 "plan_last %.1f plan_end %.1f send_start %.1f "
                 "send_planned %.1f send_acked %.1f send_notified %.1f send_flags %.1f "
                 "send_counts %.1f send_first_end %.1f send_end %.1f "
                 "recv_start %.1f recv_layout %.1f recv_last_flag %.1f recv_end %.1f\n",
                 m.rank, maybe(kTrPlanBlocksIn), maybe(kTrPlanLoaded), maybe(kTrPlanMatched),
                 maybe(kTrPlanCounted), maybe(kTrPlanPublished), maybe(kTrPlanLast), us(kTrPlanEnd),
                 us(kTrSendStart), us(kTrSendPlanned), maybe(kTrSendAcked), maybe(kTrSendNotified),
                 maybe(kTrSendFlags), maybe(kTrSendCounts),
                 t[kTrSendFirstEnd] != ~0ull ? maybe(kTrSendFirstEnd) : 0.0, us(kTrSendEnd),
                 us(kTrRecvStart), us(kTrRecvLayout), us(kTrRecvLastFlag), us(kTrRecvEnd));
    const unsigned long long c0 = t[kTrCombSendStart];
    if (c0 != ~0ull && c0 != 0 && t[kTrCombRecvEnd] >= c0) {
      auto cus = [&](int slot) { return (static_cast<double>(t[slot]) - c0) * 1e-3; };
      std::fprintf(stderr,
                   "# ep_trace_combine rank %d (us from the first send block): send_first_end "
                   "%.1f send_end %.1f recv_start %.1f recv_end %.1f\n",
                   m.rank, cus(kTrCombSendFirstEnd), cus(kTrCombSendEnd), cus(kTrCombRecvStart),
                   cus(kTrCombRecvEnd));
    }
  }
  int64_t status[kStatusSlots];
  FM_CHECK_CUDA(cudaMemcpy(status, m.ws + m.lay.status, sizeof(status), cudaMemcpyDeviceToHost));
  if (status[kOverflow])
    FM_THROW(ErrorKind::kRuntime, "rank ", m.rank, ": dispatch overflowed its row bound: ",
             m.cfg.masked_capacity > 0 ? "largest expert count " : "rows needed ",
             status[kRowsNeeded], ", bound ",
             m.cfg.masked_capacity > 0 ? m.cfg.masked_capacity : m.g.bound);
}

DispatchResult DeviceEpRank::download() const {
  if (impl_->fwd) return impl_->fwd->download();
  const Impl& m = *impl_;
  const Geometry& g = m.g;
  DeviceGuard guard(m.device);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  auto get = [&](auto& vec, size_t off, size_t count) {
    vec.resize(count);
    FM_CHECK_CUDA(
        cudaMemcpy(vec.data(), m.ws + off, count * sizeof(vec[0]), cudaMemcpyDeviceToHost));
  };
  DispatchResult r;
  const size_t slots = static_cast<size_t>(g.R) * g.Tmax;
  std::vector<int64_t> status;
  get(status, m.lay.status, kStatusSlots);
  get(r.recv.count, m.lay.recv_count, g.R);
  get(r.recv.src_token, m.lay.src_token, slots);
  get(r.recv.topk_local, m.lay.topk_local, slots * g.K);
  get(r.recv.topk_weight, m.lay.weight, slots * g.K);
  std::vector<uint8_t> stage;
  get(stage, m.lay.stage, slots * g.P);
  if (g.fp8) {
    r.recv.x_fp8.resize(slots * g.H);
    r.recv.x_scales.resize(slots * g.SC);
    for (size_t s = 0; s < slots; ++s) {
      std::memcpy(&r.recv.x_fp8[s * g.H], &stage[s * g.P], g.H);
      std::memcpy(&r.recv.x_scales[s * g.SC], &stage[s * g.P + g.H], g.SC * 4);
    }
  } else {
    r.recv.x_bf16.resize(slots * g.H);
    std::memcpy(r.recv.x_bf16.data(), stage.data(), slots * g.H * 2);
  }
  if (m.ll_recv_plan || (m.token_slots && !m.ll)) {
    // The j-th record of source s sits at the slot of its token (src_token, the sender's token
    // index): with ll_recv_plan (low latency) and with layout_token_slots (the normal kernels only:
    // the low-latency ones place their records as without the option). Moved to slot j, as the
    // other paths leave it.
    for (int s = 0; s < g.R; ++s)
      for (int64_t j = 0; j < r.recv.count[s]; ++j) {
        const size_t slot = static_cast<size_t>(s) * g.Tmax + j;
        const int32_t t = r.recv.src_token[slot];
        if (t < 0 || t >= g.Tmax) continue;  // left as it was: the comparison names the slot
        const size_t from = static_cast<size_t>(s) * g.Tmax + t;
        if (g.fp8) {
          std::memcpy(&r.recv.x_fp8[slot * g.H], &stage[from * g.P], g.H);
          std::memcpy(&r.recv.x_scales[slot * g.SC], &stage[from * g.P + g.H], g.SC * 4);
        } else {
          std::memcpy(&r.recv.x_bf16[slot * g.H], &stage[from * g.P], g.H * 2);
        }
      }
  }
  GroupedRecv& gr = r.grouped;
  gr.overflow = status[kOverflow] != 0;
  gr.rows_needed = status[kRowsNeeded];
  gr.num_rows = gr.overflow ? 0 : gr.rows_needed;
  get(gr.expert_counts, m.lay.expert_counts, g.L);
  get(gr.expert_offsets, m.lay.expert_offsets, g.L + 1);
  get(gr.m_indices, m.lay.m_indices, g.bound);
  get(gr.row_src, m.lay.row_src, g.bound);
  get(gr.token_rows, m.lay.token_rows, slots * g.K);
  if (g.fp8) {
    get(gr.x_fp8, m.lay.gx, g.bound * g.H);
    get(gr.x_scales, m.lay.gscales, g.bound * g.SC);
  } else {
    get(gr.x_bf16, m.lay.gx, g.bound * g.H);
  }
  r.handle.tokens = m.last_tokens;
  get(r.handle.slot, m.lay.slot, m.last_tokens * g.R);
  if (m.ll_recv_plan) {
    // token_rows at the token slot (s, src_token) -> the compact slot (s, j); the handle's slot
    // of token t at d (t, or -1) -> t's index among the tokens that go to d.
    const std::vector<int32_t> at_token(gr.token_rows);
    for (int s = 0; s < g.R; ++s)
      for (int64_t j = 0; j < r.recv.count[s]; ++j) {
        const size_t slot = static_cast<size_t>(s) * g.Tmax + j;
        const int32_t t = r.recv.src_token[slot];
        if (t < 0 || t >= g.Tmax) continue;
        const size_t from = static_cast<size_t>(s) * g.Tmax + t;
        std::memcpy(&gr.token_rows[slot * g.K], &at_token[from * g.K], g.K * 4);
      }
    for (int d = 0; d < g.R; ++d) {
      int32_t q = 0;
      for (int64_t t = 0; t < m.last_tokens; ++t) {
        int32_t& v = r.handle.slot[t * g.R + d];
        if (v >= 0) v = q++;
      }
    }
  }
  if (m.direct && !gr.overflow) {
    // dispatch_direct_rows: the regions hold no payload; each record's is its lowest-k row.
    for (int s = 0; s < g.R; ++s)
      for (int64_t j = 0; j < r.recv.count[s]; ++j) {
        const size_t slot = static_cast<size_t>(s) * g.Tmax + j;
        int row = -1;
        for (int k = 0; k < g.K && row < 0; ++k) row = gr.token_rows[slot * g.K + k];
        if (row < 0) continue;
        if (g.fp8) {
          std::memcpy(&r.recv.x_fp8[slot * g.H], &gr.x_fp8[row * g.H], g.H);
          std::memcpy(&r.recv.x_scales[slot * g.SC], &gr.x_scales[row * g.SC], g.SC * 4);
        } else {
          std::memcpy(&r.recv.x_bf16[slot * g.H], &gr.x_bf16[row * g.H], g.H * 2);
        }
      }
  }
  return r;
}

DeviceEpGroup::DeviceEpGroup(const EpConfig& cfg, const std::vector<int>& devices,
                             DeviceEpOptions opt) {
  FM_CHECK_ARG(static_cast<int>(devices.size()) == cfg.num_ranks, devices.size(), " devices for ",
               cfg.num_ranks, " ranks");
  if (opt.wire == Wire::kNccl && cfg.nodes() == 1) {
#if defined(FP8MOE_HAVE_NCCL)
    std::vector<ncclComm_t> comms(cfg.num_ranks);
    FM_CHECK_NCCL(ncclCommInitAll(comms.data(), cfg.num_ranks, devices.data()));
    for (int r = 0; r < cfg.num_ranks; ++r) {
      comms_.push_back(comms[r]);
      DeviceEpOptions o = opt;
      o.nccl_comm = comms[r];
      ranks_.push_back(std::make_unique<DeviceEpRank>(cfg, r, devices[r], o));
    }
    return;
#else
    FM_THROW(ErrorKind::kInvalidArgument, "this build has no NCCL back end");
#endif
  }
  // Receive grids and the direct rows depend on it: an explicit value below the real sharing
  // would let one rank's receive take the SMs another rank's send needs (a hang until timeout).
  int sharing = 1;
  for (int d : devices)
    sharing = std::max(sharing, static_cast<int>(std::count(devices.begin(), devices.end(), d)));
  FM_CHECK_ARG(opt.ranks_per_device == 0 || opt.ranks_per_device >= sharing,
               "ranks_per_device=", opt.ranks_per_device, " but ", sharing,
               " ranks of this group share a device");
  opt.ranks_per_device = std::max(opt.ranks_per_device, sharing);
  for (size_t a = 0; a < devices.size(); ++a)
    for (size_t b = 0; b < devices.size(); ++b) {
      if (devices[a] == devices[b]) continue;
      int ok = 0;
      FM_CHECK_CUDA(cudaDeviceCanAccessPeer(&ok, devices[a], devices[b]));
      FM_CHECK_ARG(ok, "device ", devices[a], " cannot access device ", devices[b],
                   " (no peer path for the NVLink back end)");
      DeviceGuard guard(devices[a]);
      const cudaError_t st = cudaDeviceEnablePeerAccess(devices[b], 0);
      if (st == cudaErrorPeerAccessAlreadyEnabled)
        cudaGetLastError();
      else
        FM_CHECK_CUDA(st);
    }
  // Two-stage route over the NCCL wire: one communicator per local index for the network hop;
  // the hop inside a node is peer-mapped like the NVLink wire.
  if (opt.wire == Wire::kNccl) comms_ = detail::forward_network_comms(cfg, devices);
  std::vector<void*> bases;
  for (int r = 0; r < cfg.num_ranks; ++r) {
    DeviceEpOptions o = opt;
    if (!comms_.empty()) o.nccl_comm = comms_[r];
    ranks_.push_back(std::make_unique<DeviceEpRank>(cfg, r, devices[r], o));
    bases.push_back(ranks_.back()->workspace());
  }
  for (auto& r : ranks_) r->connect(bases);
}

DeviceEpGroup::~DeviceEpGroup() {
  ranks_.clear();
#if defined(FP8MOE_HAVE_NCCL)
  for (void* c : comms_) ncclCommDestroy(static_cast<ncclComm_t>(c));
#endif
}

const char* wire_name(Wire w) {
  return w == Wire::kNccl ? "nccl" : "nvlink";
}

#if defined(FP8MOE_HAVE_NCCL)
bool nccl_available() {
  return true;
}
void nccl_group_start() {
  FM_CHECK_NCCL(ncclGroupStart());
}
void nccl_group_end() {
  FM_CHECK_NCCL(ncclGroupEnd());
}
#else
bool nccl_available() {
  return false;
}
void nccl_group_start() {}
void nccl_group_end() {}
#endif

void DeviceEpGroup::check() const {
  for (const auto& r : ranks_) r->check();
}

}  // namespace fp8moe::comm
