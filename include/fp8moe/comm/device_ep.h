// The device back ends. NVLink: our own CUDA kernels over peer-mapped buffers (no NVSHMEM). Each
// rank has one device workspace laid out identically on every rank; a rank reaches its peers'
// workspaces through pointers that are either peer-mapped allocations of the same process (one
// process driving several GPUs, or several ranks sharing one GPU) or CUDA IPC handles opened from
// other processes (one process per GPU). Senders push token records straight into the receiver's
// source region in chunks, each published with a release store of a per-(source, chunk) flag,
// after a small notify (per-expert counts, release flag) that lets the receiver lay out its rows
// before the payload lands; receivers poll with acquire loads, so nothing waits on the host: counts
// stay on the device, buffers are sized by EpConfig's bounds, overflow and timeouts land in an
// error record that check() turns into an fp8moe::Error naming rank, peer and counter. Every call
// only enqueues work on the given stream (capturable in a CUDA graph); send and receive are
// separate so the caller can overlap the wait.
//
// Semantics and bit-exact results: those of fp8moe/comm/ep.h. More than one node (gpus_per_node <
// num_ranks): the two-stage route (src/comm/sm90_device_ep_forward.cu): a token crosses to each
// remote node once, to the rank there with the sender's local index, which forwards it over NVLink
// to the ranks of its node; combine sums per node at that forwarder. The wire then names the
// network hop only (kNvlink: our stores standing in for it on one host; kNccl: grouped send/recv
// among the ranks of one local index); inside a node it is always the NVLink kernels, so the ranks
// of a node need peer-mapped workspaces (connect / connect_ipc) with either wire. Tested in
// tests/comm/device_ep_gpu_test.cu, device_ep_forward_gpu_test.cu and (one process per GPU,
// both routes and wires) device_ep_multiprocess_gpu_test.cu against dispatch_reference.
// Combine backward (combine_backward_send / _recv, src/comm/sm90_device_ep_backward.cu): one node,
// NVLink, normal kernels; tests/comm/device_ep_backward_gpu_test.cu against
// combine_backward_reference.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "fp8moe/comm/ep.h"

namespace fp8moe::comm {

// How records travel between ranks: pushed through peer-mapped pointers (NVLink, our kernels),
// or packed locally and exchanged with NCCL grouped send/recv of bound-sized regions (the counts
// stay on the device, so every region is sent at its bound).
enum class Wire { kNvlink, kNccl };
const char* wire_name(Wire w);

struct DeviceEpOptions {
  Wire wire = Wire::kNvlink;
  // ncclComm_t of this rank (Wire::kNccl): over all ranks with one node; with several nodes, over
  // the ranks of this rank's local index (comm rank = node), as DeviceEpGroup makes them. One
  // process per GPU: ep_nccl_comm_init (fp8moe/comm/nccl_bootstrap.h) makes the right one for a
  // config through the launcher's store.
  void* nccl_comm = nullptr;
  // Blocks (SMs) of the send kernels (dispatch_send; combine_send and combine_backward_send unless
  // combine_blocks is set); the receive kernels get the rest. 64 measured best on 2 x H200
  // (docs/comm/README.md, v5).
  int num_blocks = 64;
  // Blocks of combine_send and combine_backward_send (one grid for both: they count their blocks
  // in one counter); 0 = num_blocks. Session 4 (4 x H100) suggested fewer combine send blocks at 4
  // ranks, where SM stores over NVLink bound the combine (docs/comm/README.md, "Session 4").
  // Measured in session 5 (4 x H200, 4 ranks, same call): 40 blocks 603.7 us, 48 635.1, 56 668.7,
  // 64 (num_blocks) 619.4: not monotonic, so no rule from it yet; 0 stays the default.
  int combine_blocks = 0;
  // Copy payload rows into the grouped layout. Off, dispatch leaves the payload in the source
  // regions (row_src says where each row's token is) and only builds the layout; a grouped GEMM
  // then reads its rows from the records (DeviceRecvView::records, row_record).
  bool expand_payload = true;
  // Transport granularity: a sender publishes its records in chunks of this many tokens, each with
  // its own release flag, and the receiver expands every chunk as soon as it lands (the combine's
  // chunks: combine_chunk_tokens). Must be the same on every rank (it shapes the workspace).
  // 0 = the measured best: 4 when max_tokens_per_rank <= 512 (decoding), else 16.
  int chunk_tokens = 0;
  // Session 15 (ep26; docs/comm/README.md, "Session 15: the combine's own chunk size (ep26)"): the
  // combine's chunk, in received records per source, apart from the dispatch's. Every combine
  // kernel of the normal path takes it (combine_send and combine_tokens_send, the register and the
  // bulk send, combine_recv); the dispatch keeps chunk_tokens. Not used by the low-latency kernels,
  // the combine backward (its partials are not chunked) or the two-stage route (several nodes: no
  // chunks). Must be the same on every rank, as chunk_tokens: the combine's chunk flags are sized
  // by it (a block of R * max(dispatch chunks, combine chunks) flags), so it shapes the workspace.
  // 0 = when max_tokens_per_rank > 512 (whatever chunk_tokens is) 4 at two ranks and 8 beyond,
  // else the dispatch's chunk (8 since session 15; 4 at two ranks since session 19: 4 against 8
  // on 2 x H100 -1.2 to -1.6 % in four calls, on 2 x H200 -0.1 / +0.3 %, on 4 x H200 +1.5 / +1.7 %,
  // so 8 stays beyond two ranks; ep_bench ":m8" / ":m4" force either). 2 x H200,
  // V3 shape, 64 blocks, same call, two processes x 3 rounds (ep_bench :mN): combine 226.5 / 228.1
  // us at 16 -> 214.8 / 214.9 with 8 (-5.2 / -5.8 %; the dispatch unchanged, where chunk_tokens 8
  // costs it +4 % and the layout-only dispatch +13 %), 215.2 / 215.5 with 4, 222.5 / 222.7 with 6,
  // 227.9 / 233.0 with 12 (chunk counts that leave the send grid's last wave part-empty).
  int combine_chunk_tokens = 0;
  // Blocks of the receive kernels (dispatch_recv, combine_recv, combine_backward_recv). 0 = for
  // dispatch_recv and combine_recv the device's SM count (the blocks past the SMs the send leaves
  // free become resident as send blocks retire and take the remaining items in order: 4 x H100,
  // session 4, combine -10 % at 2 ranks and -7 % at 4, dispatch -3 % / -4 %); for the
  // low-latency kernels and combine_backward_recv the SMs the send leaves free (not measured
  // wider; the low-latency receive was 1-2 % slower over every SM). With several ranks on one GPU
  // (ranks_per_device) every receive grid is capped so that each rank's send stays resident.
  // NOTE: at most one group's normal kernels in flight per GPU. With receive grids over every SM
  // (and dispatch_direct_rows, whose sends wait for every rank's), two groups started in different
  // orders on two GPUs can each hold the SMs the other needs, until timeout_s. To overlap two
  // groups: dispatch_direct_rows = false and recv_blocks <= SMs - num_blocks.
  int recv_blocks = 0;
  // Launch each receive kernel as a programmatic dependent of its send kernel, so that receiving
  // overlaps sending when dispatch_recv / combine_recv directly follow their send on the stream.
  bool overlap_recv = true;
  // Plan the batch once per dispatch (a small kernel before the send: per-tile destination
  // ballots, and per-tile prefixes of the expert and destination counts, in the workspace) instead
  // of in every send block's shared memory. Same results bit for bit; off = the v5 path (2xH200,
  // V3 shape, same call: FP8 dispatch 182.0 vs 229.6 us, docs/comm/runs/ep-plan-once-*.md).
  bool plan_once = true;
  // Kernel variants of session 3 (docs/comm/README.md, "Session 3"); same results bit for bit,
  // both off = the v5 + plan-once kernels. 2 x H200, V3 shape, same call (3 rounds):
  // The FP8 dispatch send loads a token's next 1024-column step before quantising this one:
  // layout-only dispatch 142.5 -> 138.3 us, full dispatch 181.8 -> 181.4.
  bool prefetch_payload = true;
  // Both combine kernels sum two 256-column steps per pass over the compacted expert rows
  // (twice the loads in flight per lane): combine 463.9 -> 389.9 us.
  bool combine_two_steps = true;
  // The combine send's blocks are dealt to the sources: with G blocks and N sources (the peers
  // over NVLink, every rank over NCCL) block b serves source b % N only, taking its chunks b / N,
  // b / N + G_s, ... (G_s: the blocks of that source), so no block idles and each keeps one
  // source's rows and one destination (docs/comm/README.md, "Session 4"). With G < N, block b
  // serves sources b, b + G, ... whole. Off: (chunk, source) items, chunk-major, the rank's own
  // source skipped (the v5 enumeration; it idles every block b with b % num_ranks == rank when
  // num_blocks % num_ranks == 0). 4 x H100, same call, 3 rounds: combine 296.7 us at 2 ranks
  // (chunk-major 378.8), 628.2 us at 4 (chunk-major 597.6: its 16 idle send blocks leave their
  // SMs to the receive from the start).
  bool combine_peer_blocks = true;
  // Y (session 5, with combine_two_steps): both combine kernels load the expert rows with an L2
  // evict-first policy (each row is read once) and the receive reads the staged partials as
  // streaming loads, so that the partials landing from the peers stay in L2 until they are read.
  // Same results bit for bit. Combine, same calls, 3 rounds: 2 x H100 296.7 -> 291.6 us, 2 x H200
  // 264.2 -> 259.8 and 264.7 -> 259.5 (-1.7 %), 4 x H200 619.4 -> 615.5 (beside an option since
  // removed); on by default.
  bool combine_stream_rows = true;
  // Session 4, dispatch (docs/comm/README.md, "Session 4: dispatch"); same results bit for bit.
  // 2 x H100, V3 shape, same call: FP8 dispatch 204.4 us (both off) -> 193.5 (D) -> 188.0 (D+L).
  // D: the dispatch send writes each token's payload straight into its first grouped row at
  // every destination (the row of its lowest k with an expert there) instead of the source
  // region, so the receive copies only the other rows (one row write fewer per received token).
  // Every rank broadcasts its per-expert counts with its notify and each send block waits for
  // all of them before the payload, so it applies to the grouped layout with expand_payload,
  // plan_once, Wire::kNvlink and one rank per GPU (ranks_per_device <= 1: the send blocks of all
  // ranks must be resident); else the source-region path runs. A destination that overflows gets
  // the source region as before. NOTE: the payload rows (view().x, x_scales) are then written by
  // the sources; a source writes the rows of its next round only after every rank's notify of
  // that round, i.e. after this rank has itself entered its next dispatch_send (so everything
  // before it on this rank's stream, its GEMM and combine, has finished): the rows stay valid
  // until this rank's own next dispatch_send. NOTE: every rank must resolve D alike: the
  // same expand_payload, plan_once, wire, masked_capacity and ranks_per_device (<= 1 or not), as
  // for chunk_tokens; a rank that sends directly to a rank that expects source regions writes
  // rows the other does not read (not detected).
  bool dispatch_direct_rows = true;
  // L (with D): the rank's own tokens are written by its send into all their local rows, so
  // the receive copies only peer tokens.
  bool dispatch_self_rows = true;
  // Session 5 (docs/comm/README.md, "Session 5: the dispatch prologue, ..."); same results bit
  // for bit; Q (and Y above) measured faster, so they are on. The options of sessions 3 to 5 that
  // measured slower or no faster (combine_async_rows, combine_peer_items, combine_even_steps,
  // dispatch_pull, plan_notify, plan_flag_release, dispatch_stream_rows, dispatch_bulk_rows) were
  // removed: their measurements stay in that README, their code at commit 0d66fed.
  // Q (with plan_once): the plan kernel counts each tile with shared-memory atomics instead of
  // one match.any per k (phase stamps, 2 x H200: 5.7 of the plan's 9 µs of counting were that
  // loop), its ids loaded together, its last block reading the count table in one round trip
  // (V3 shape); and with D each send block lays out the destinations from
  // the broadcast counts with all its loads issued at once (one thread per (destination,
  // expert)) instead of one dependent round trip per 32 experts and source in each warp.
  // 2 x H200, same call, 3 rounds: dispatch 166.1 -> 161.5 us, layout only 138.5 -> 134.4; with Y
  // (the session-5 defaults) 160.7 / 134.3; on by default.
  bool plan_fast_count = true;
  // Session 8, the dispatch prologue (docs/comm/README.md, "Session 8: the dispatch prologue
  // (ep9)"); same results bit for bit. X is on by default since the end of session 8 (every test
  // with X on, 2 x H100; the final validation's A/B: dispatch 182.4 -> 181.3 us, with X + O
  // 173.2, G + X + O 179.7; docs/results/ep-2026-11-26-2xh100-s8-final.md); G and O are off (O: its
  // default-path suite has not run yet). G and X need plan_once and
  // plan_fast_count (else ignored); the plan kernel then runs a fixed grid of
  // ceil(tiles of max_tokens_per_rank / 16) blocks. 2 x H100, V3 shape, same call, 3 rounds (FP8
  // dispatch / layout only, us): defaults 181.8 / 136.8, G 187.8 / 135.9, X 179.4 / 134.8, G+X
  // 185.3 / 134.7, G+X+O 176.7 / 134.5; plain sweep defaults 181.8, G+X+O 177.6. O alone was not
  // measured. NOTE: G's block 0 notifies before its layout since that call (a silent peer was
  // reported as the rank's own notify); that order is not yet run on a device.
  // G (with D): each plan kernel block publishes its per-expert token counts to every rank as soon
  // as its tiles are counted, as (round, count) 64-bit words (a word is valid when its round
  // matches: no fence, no flag), into a per-round-parity buffer; each send block sums the blocks'
  // words of every source instead of waiting for the sources' notify flags (the notify then no
  // longer carries every expert's count). The previous round's acknowledgement is waited for
  // beside that sum. The words of a source's round n also stand for the notify's guarantee: that
  // rank has entered its dispatch of round n, so the rows of round n - 1 are consumed.
  bool dispatch_plan_counts = false;
  // X: the plan's per-tile prefixes by a scan inside each plan block and a look-back over the
  // earlier blocks' published totals (blocks in the order they started), instead of the last
  // block reloading and scanning the whole count table.
  bool plan_block_scan = true;
  // O (with D): the send's notify and chunk flags are raised by a release store alone, without
  // the full system fence (__threadfence_system) before it (the memory-model argument: the
  // comment at publish() in sm90_device_ep_kernels.cuh). Session 9, 2 x H100, V3 shape, same
  // call, 3 rounds: FP8 dispatch 181.4 -> 171.6 us (-5.4 %), plain sweep 181.6 -> 170.8 (with K).
  bool dispatch_release_only = true;
  // Tokens per combine_recv work item (1..32); 0 = about T / (4 x receive blocks), at most 32:
  // four waves of tiles (8 tokens at the V3 shape on 132 SMs, each token's columns split over two
  // of the block's 16 warps). Session 6 (docs/comm/README.md), 2 x H100, V3 shape, same calls:
  // 8 tokens 283.3 us, 16 (the session-5 rule, T / (2 x blocks)) 292.7, 4 tokens 294.2; the
  // plain sweep 283.2 / 283.3 against 291.4 / 292.9. With combine_recv_warp_items (session 7)
  // the automatic tile is T / (8 x receive blocks) and only sets the parts per token (16 / tile).
  int combine_recv_tile = 0;
  // Session 7 (docs/comm/README.md, "Session 7"), with combine_two_steps and combine_stream_rows
  // (else ignored); same results bit for bit. Z combine_recv_early_stage: combine_recv loads the
  // staged partial of the first other rank at the start of each column pass, beside the own expert
  // rows, instead of after the own partial is summed. U combine_recv_warp_wait: each receive warp
  // waits for the chunks holding its own token's partials (overlapping the token's index loads)
  // instead of the block waiting for the whole tile's chunks before any warp starts.
  // I combine_recv_warp_items (implies U): each receive warp claims its own (token, column part)
  // items, one claim ahead, with no block barrier between items; the parts per token are the
  // block warps / combine_recv_tile, and the automatic tile is then T / (8 x receive blocks) (4
  // tokens, so 4 parts per token, at the V3 shape on 132 SMs).
  // combine_send_parts: each combine send record's columns split over at least this many warps
  // (0 or 1: one warp per record while a chunk has as many records as the block has warps; 2 or
  // 4), so that fewer distinct expert rows are read at once.
  // 2 x H100, V3 shape, same calls, 3 rounds (combine, us): defaults before 283.4, Z 278.2, U
  // 280.5, Z+U 275.4 / 275.7 / 276.1, Z+U+I (2 parts) 280.6, Z+U+I 4 parts 268.7 / 270.1, 1 part
  // 309.2, Z+U+I 4 parts + 2 send parts 264.9 (4 send parts 269.7); the plain sweep 265.3-266.5
  // against 282.9-283.7 (-6.3 %); dispatch unchanged. Not measured on H200 nor at 4 ranks. On by
  // default.
  bool combine_recv_early_stage = true;
  bool combine_recv_warp_wait = true;
  bool combine_recv_warp_items = true;
  int combine_send_parts = 2;
  // K: O's twin for the rest of the normal path. The acknowledgements of both receive kernels
  // (dispatch_recv always; combine_recv with combine_two_steps, combine_stream_rows and
  // combine_recv_warp_items) and the combine send's chunk flags (with combine_two_steps and
  // combine_stream_rows) are raised by a release store alone, without __threadfence_system before
  // it; the receive's last block takes an acquire fence at GPU scope after its count instead (the
  // argument: publish() and last_block_acquire() in src/comm/sm90_device_ep_kernels.cuh).
  // Session 9, 2 x H100, V3 shape, same call, 3 rounds: combine 264.3 -> 260.8 us (-1.3 %), the
  // dispatch unchanged (180.3); with O: dispatch 171.5, combine 261.2.
  bool combine_release_only = true;
  // Session 13 (ep19; docs/comm/README.md, "Session 13: the combine fed by bulk copies (ep19)"),
  // with combine_two_steps and combine_stream_rows (else ignored); same results bit for bit.
  // ep_bench letter k (r takes it back). The combine send's record sums read the expert rows
  // through shared memory: per block one producer warp issues each row's 7168-column piece by
  // cp.async.bulk into a ring of two stages (224 KB of shared memory at hidden 7168), two teams of
  // 7 warps sum a stage's rows from shared memory and store the row to the peer (ep17's
  // combine_rows_bench: 1.17x the register path at 64 blocks on one H200). 2 x H200, V3 shape, same
  // call, two processes x 3 rounds: combine 235.7 / 235.7 -> 228.5 / 228.1 us (-3.0 / -3.2 %, every
  // round of k below every round of default; NCCL 224.1 / 224.4), dispatch, layout only and low
  // latency within +-0.8 %. Default since (the lead decides; H100 not measured).
  bool combine_bulk_rows = true;
  // Session 13 late (ep21; docs/comm/README.md, "Session 13 late: the dispatch's row copies by
  // bulk copies, prepared (ep21)"), with expand_payload (else ignored); same results bit for bit.
  // ep_bench letter j. The dispatch receive's row copies (with dispatch_direct_rows: the other rows
  // of each peer token from its lowest-k row; without: every row from the record) go through
  // shared memory: per warp one lane loads a record's payload (pieces of at most 8 KB) by
  // cp.async.bulk into the warp's slot on an mbarrier, and each lane whose row takes a copy writes
  // it with one cp.async.bulk shared -> global (128 KB of shared memory per receive block).
  // Session 14, 2 x H100, V3 shape, same call, two processes x 3 rounds: FP8 dispatch 170.5 / 170.6
  // -> 167.8 / 167.7 us (-1.6 / -1.7 %); layout only, combine and low latency within +-0.8 %
  // (docs/comm/README.md, "Session 14: ep20 and ep21 measured"). Default since that call.
  bool dispatch_recv_bulk_rows = true;
  // Session 11 (docs/comm/README.md, "Session 11: the layout-only send (ep14)"): the send of the
  // source regions, i.e. the layout-only dispatch's (expand_payload off) and wherever direct rows
  // do not apply, with plan_once and prefetch_payload (else ignored); same results bit for bit.
  // o layout_release_only: O's twin there (the notify and chunk flags by a release store alone).
  // d layout_claim_chunks: each send block claims its next chunk in order across the grid instead
  // of taking chunks b, b + num_blocks, ... (so a grid that does not divide the chunks evenly
  // keeps every block busy).
  // layout_send_blocks: the blocks of the layout-only dispatch's send (expand_payload off, one rank
  // per GPU); 0 = num_blocks. That send leaves the receive only the layout rows to write, and the
  // combine keeps num_blocks (ep_bench suffix ":l96").
  // 2 x H200, V3 shape, same calls, two processes x 3 rounds (layout only, us): defaults 129.8 /
  // 129.7, o 124.6 / 124.5, o + d 128.3 / 128.7, o + 96 blocks 123.2 / 123.4, o + d + 96 blocks
  // 118.0 / 117.8 and (call 3) 117.2 / 116.8 against 129.8 / 129.8 (-9.7 %); the expanded dispatch
  // and the combine unchanged. Defaults since the end of session 11; its final validation (came as
  // 2 x H200, docs/results/ep-2026-11-26-2xh200-s11-final.md): 116.8 us against 131.1 without
  // them (ep_bench letter x takes all three back). Not yet measured on H100.
  int layout_send_blocks = 96;
  bool layout_release_only = true;
  bool layout_claim_chunks = true;
  // Session 11 (ep15): the FP8 record stride P rounded up to 128 bytes instead of 16 (7424 bytes
  // instead of 7392 at hidden 7168: +0.4 % NVLink bytes), so that every record, the A rows of the
  // gathered grouped GEMM (DeviceRecvView::records), starts on a 128-byte line; the single-node
  // kernels only (the two-stage route keeps 16). ep_bench letter a. 2 x H200, two calls, two
  // processes x 3 rounds each (docs/comm/README.md, "Session 11: ... (ep15)"): the layout-only
  // dispatch 117.4 / 117.8 / 117.6 / 116.9 -> 116.3 / 117.0 / 116.5 / 116.2 us (every round
  // below the defaults' in all four processes); the expanded dispatch, the combine and low latency
  // within +-0.7 %; moe_forward_bench at 64 experts the gathered GEMM 0.993x (two runs) and at the
  // V3 shape 0.997x, the gathered forward 0.993 / 0.993 / 0.995x; the final validation (2 x H200)
  // -1.2 % layout only, -0.9 % dispatch. Session 12's first call (2 x H200 again: the x2 kind has
  // not come as H100 since): layout only 0.989 / 0.988x in two processes, the rest within +-0.3 %;
  // the default since (ep_bench letter u takes it back). H100: not measured on the EP; gemm_bench
  // on H100 (session 11, gemm19) read the gathered GEMM on 128-byte-aligned and on 16-byte records
  // alike (1.07-1.11x / 1.07-1.12x the contiguous GEMM).
  bool record_align_128 = true;
  // Session 14 (ep22; docs/comm/README.md, "Session 14: the layout-only send without the plan's
  // slots (ep22)"): the source-region send (the layout-only dispatch's, and wherever direct rows do
  // not apply) with plan_once and prefetch_payload over Wire::kNvlink (else ignored) stores token
  // t's record at slot s * Tmax + t of its source region at every destination it goes to, instead
  // of at its rank among the source's tokens going there (which only the plan knows), so that the
  // payload leaves from the send's first microsecond while the plan kernel runs beside it; the
  // metadata, the chunk counts and the notify still wait for the plan. The records of tokens that
  // skip a destination leave holes there. row_record (DeviceRecvView) names the record's slot,
  // so the gathered GEMM reads the same rows; the layout, row_src, token_rows, the handle and the
  // combine are unchanged; download() reports the received records in their usual order. Same
  // results bit for bit. ep_bench letter f. 2 x H100, V3 shape, same call, two processes x 3
  // rounds: layout only 118.4 / 118.9 -> 114.1 / 113.8 us (-3.6 / -4.3 %, every round below the
  // defaults'); the expanded dispatch, the combine and low latency within +-0.7 % (other kernels).
  // A default since that call (ep_bench letter n takes it back; H200 and more ranks are measured
  // by the session-14 final validation and ep24's 4-rank call).
  bool layout_token_slots = true;
  // Session 15 (ep25; docs/comm/README.md, "Session 15: the layout-only send's payload claimed per
  // token (ep25)"): with layout_token_slots, for the layout-only dispatch (expand_payload off;
  // else ignored) the send's warps claim the payload from a grid-wide counter in units of this
  // many 1024-column steps of one token (a value >= hidden / 1024 rounded up: whole tokens), each
  // warp on its own, with no block barrier between units, so that the send blocks end within about
  // a unit's time of each other; the chunks keep only their counts and metadata, which each send
  // block's last warp claims and publishes (chunk flag) as soon as the plan is complete. Each send
  // block ends with one release add to a per-source payload counter of every destination, and the
  // receive's last block waits for every source's count before it acknowledges (an error names
  // dispatch.payload[rank][src]). Every rank of a group must take the same value. Same results bit
  // for bit. 0 = off. ep_bench letter w (1 step), suffix ":wN". 2 x H200, V3 shape, same call, two
  // processes x 3 rounds: layout only 111.3 / 111.1 -> 103.7 / 103.7 us with 1 (-6.8 %, every
  // round below the defaults'; the blocks' ends spread 4-5 us instead of 20); whole tokens (7) as
  // the defaults, 2 steps -4.3 %; with 64 send blocks 103.2, 112 and 128 slower; the expanded
  // dispatch, the combine and low latency unchanged (other kernels). A default (1) since session
  // 15 (its final validation on 2 x H200: letter p, which takes it back, +8.1 %; not yet timed
  // on H100).
  int layout_payload_claims = 1;
  // Ranks of this group that run on the same GPU (DeviceEpGroup sets it; 0 = 1). Receive kernels
  // wait on peers, so their grids are kept small enough for every rank's kernels to be resident.
  int ranks_per_device = 0;
  // Low-latency kernels for masked configs (EpConfig::masked_capacity > 0) over NVLink with
  // max_tokens_per_rank <= 1024 and hidden % 128 == 0: one pass per direction and side (each
  // warp quantises a token and writes its record straight into the destination's source region;
  // one arrival counter per source, since session 5 a flag per record step, see ll_token_flags;
  // then the receiver places every row in its masked slot), no notify/chunk/layout chain
  // (sm90_device_ep_ll.cu). Same results bit for bit; num_blocks and
  // recv_blocks size its grids, chunk_tokens and plan_once do not apply. Off: the normal kernels
  // with the masked layout.
  bool low_latency = true;
  // Low-latency options of session 5 (docs/comm/README.md, "Session 5: low latency"); same
  // results bit for bit. ep_bench --ll-variants names them by letter (N, X, O, T; "0" turns all
  // four off: the session-4 kernels). All on: each measured faster on 2 x H100 (call 2: dispatch
  // 26.5 -> 24.6 us, combine 22.9 -> 21.6). Eight other low-latency options (sessions 3 to 5)
  // measured no faster and were removed (the README's "Session 5: low latency"; commit da8048a).
  // N: block 0 of the dispatch send releases the per-expert counts on a counter of their own,
  // and the dispatch receive derives the masked layout from them while the payload is in flight.
  bool ll_early_notify = true;
  // X: the combine send deals its items to warps across blocks, so every block holds records of
  // every source (remote and local partial stores spread over all send SMs).
  bool ll_combine_spread = true;
  // O: the combine receive computes the rank's own partials from its expert rows (y must stay
  // unchanged until combine_recv, as for the normal kernels) and the combine send skips them.
  bool ll_combine_own_recv = true;
  // T (implies N): the dispatch send releases a flag per record and 1024-column step right after
  // that step's stores (instead of one arrival per send block at its end), and the receive
  // copies each step as soon as its flag is in, overlapping the transfer.
  bool ll_token_flags = true;
  // Session 9 (docs/comm/README.md, "Session 9: low latency (ep11)"; same results bit for bit).
  // H (ep_bench letter, after "default+" and in --ll-variants), with ll_combine_own_recv: the
  // combine receive computes its own partials with one 256-column piece of the token's rows in
  // flight at a time instead of two, which removes that kernel's register spill (80 bytes of
  // stores, 264 of loads; ptxas, CUDA 13.0). 2 x H100, same calls, 3 rounds: combine 21.7 -> 21.6
  // and 21.5 -> 21.3 us, plain sweep 21.4 -> 21.1; dispatch unchanged. Off until made a default.
  // Session 9's J, M and E measured no faster and are not kept (the README; their code:
  // docs/comm/runs/ep-s9-ll-JMEH.patch).
  bool ll_combine_own_narrow = false;
  // Session 14 (docs/comm/README.md, "Session 14: the low-latency payload at 4 ranks (ep23)";
  // same results bit for bit): the order in which the low-latency dispatch send's warps store a
  // token's steps (and metadata) to its destinations. 0: ascending ranks (so at 4 ranks every
  // sender's first stores go to the same rank); 1 (ep_bench letter R): the peers from rank + 1 on,
  // cyclically, the rank itself last, so each position of the order is a permutation of the
  // ranks; 2 (letter W): as 1 with each work item's first peer moved by its index. 4 x H200, one
  // call, 6 rounds: LL dispatch at 4 ranks 32.0 -> 29.5 us with R and with W, at 2 ranks 23.1 /
  // 23.1 / 23.3 (unchanged). Second call (ep24, 4 x H100, 6 rounds): 32.9 -> 30.3 us at 4 ranks
  // (-8.0 %), 24.4 -> 24.4 at 2. R (1) is the default since; ep_bench's LL letter A sets 0.
  int ll_dispatch_rotate = 1;
  // Session 15 late (docs/comm/README.md, "Session 15 late: the low-latency dispatch at 2 ranks,
  // prepared (ll1)"; same results bit for bit; ep_bench --ll-variants letter D): the low-latency
  // dispatch receive ends without its relaxed add to every source's acknowledgement counter; the
  // rank's next low-latency dispatch send adds, at its start, one round for every receive of the
  // rank not yet acknowledged (counted on the device, so CUDA graphs and rounds without combine
  // stay exact). The receive is the kernel whose end the dispatch waits for, and its last store
  // went to a peer. A source's next dispatch send then waits (as before, after its plan) for this
  // rank's next dispatch send to have started, not for its receive to have ended; the source
  // regions of this rank stay unwritten that much longer. Ignored (the receive acknowledges) when
  // ranks share a GPU (ranks_per_device > 1): a send would then wait for a send of another rank
  // that may need the SMs its own blocks hold. Session 16 (2 x H200, 2 ranks, V3 decoding shape,
  // two processes x 6 rounds): LL dispatch 23.2 -> 22.6 us (-2.4 %), combine unchanged, 8 graph
  // rounds 35.4 -> 35.1 us a round. Off by default: it couples a rank's next send to its peer's
  // next send, which costs a rank that runs ahead (the send/receive split's point) more than the
  // 0.6 us the bench gains with ranks that start together.
  bool ll_defer_dispatch_ack = false;
  // Session 16 (docs/comm/README.md, "Session 16: LL acknowledgements on the next kernel (ll2)";
  // same results bit for bit; ep_bench --ll-variants letters F = 1, G = 2, U = 0, Z): the
  // low-latency receives end without their remote acknowledgement and the rank's next
  // low-latency send kernel, dispatch or combine, gives every one not yet given (counted on the
  // device, as ll_defer_dispatch_ack). Bit 1: the dispatch receive's (in the decoding flow the
  // combine send gives it; the source's next dispatch send, which waits for it, comes after the
  // source's combine receive, which needs that combine send's data anyway). Bit 2: the combine
  // receive's (the next dispatch send gives it; the source's next combine send, which waits for
  // it at its start, comes after the source's dispatch receive, which needs that send's data).
  // So in the decoding flow (dispatch, expert GEMM, combine on every rank) no rank waits for
  // anything it did not wait for before; two combines in a row (or two dispatches) couple the
  // second send to the peer's next send of either kind. With ll_defer_dispatch_ack too, bit 1 is
  // implied. Ignored when ranks share a GPU (ranks_per_device > 1), as ll_defer_dispatch_ack.
  // Measured on 2 x H200 (session 16, 2 ranks, V3 decoding shape): dispatch 23.1 -> 22.5-22.8 us,
  // combine 20.4-20.7 -> 20.0-20.3 event-timed, every round below every old-path round; 8
  // graph-replayed rounds equal (35.2-35.3 us a round both; an earlier 34.9-35.1 was the
  // variants' order in the rotation). 4 x H200: dispatch -1.8 %. 3 (both) is the default since;
  // 0 = each receive acknowledges at its end (before session 16).
  int ll_defer_acks = 3;
  // With ll_defer_acks: warp 0 of block 0 gives the acknowledgements (ll1's place, on block 0's
  // path) instead of the last warp of the last block (no work item at the decoding shape).
  bool ll_deferred_ack_first_block = false;
  // Session 17 (ll3; docs/comm/README.md "Session 17: the low-latency dispatch planned by the
  // receiver, prepared (ll3)"): the low-latency dispatch send plans nothing; it stores the rank's
  // expert ids and weights at every destination behind one counter per source, then each token's
  // payload at the slot of its token index with a flag per 1024-column step; each receive plans
  // its local experts from the sources' ids (the same layout, records and handle as the default,
  // bit for bit) and the combine send finds each record's token slot. Falls back to the default
  // where the receive's plan does not fit a block's shared memory (ranks x max_tokens_per_rank x
  // top_k x 2 bytes and more; 200 KB). Measured on 2 x H200 in two calls (session 17, "ll3
  // measured", "ll4 measured"): the LL dispatch 22.6 -> 21.5 and 22.7 -> 22.0 / 22.3 us, every
  // round below every old-path round, the combine +0.1..+0.2, 8 graph-replayed rounds 35.2 ->
  // 33.8 and 35.0 -> 33.2 us a round. The default since; false = the send plans (before session
  // 17; ep_bench LL letter S).
  bool ll_recv_plan = true;
  // Session 17 late (ll5; docs/comm/README.md "Session 17 late: V's ids from a block of their own,
  // prepared (ll5)"): with ll_recv_plan, the dispatch send runs one block more, whose only job is
  // to store every token's local expert indices (one byte each) at each destination as 8-byte
  // words tagged with the round (no release, no gate; double-buffered by round parity), first
  // thing; the other blocks' payload starts as before, the gate weights travel with each
  // record's first step, and the receive polls the words (ll4's plan). Needs experts_per_rank <
  // 255 (else ll_recv_plan alone). Session 18, 2 x H200: LL dispatch 21.4 / 21.1 -> 19.8 / 19.7
  // us, graph-replayed round 33.2 -> 32.5 (docs/comm/README.md "Session 18"). The default since
  // session 18; false = V's ids from send block 0 (ep_bench LL letter B).
  bool ll_recv_plan_ids_block = true;
};

// Inputs of one rank, device pointers on that rank's device.
struct DeviceBatch {
  int64_t tokens = 0;
  const uint16_t* x = nullptr;         // [T, H] BF16
  const int32_t* topk_idx = nullptr;   // [T, K]
  const float* topk_weight = nullptr;  // [T, K]
};

// Device views of a rank's dispatch outputs. Written by the rank's own kernels, so valid until
// its next dispatch, except what the sources write into its workspace: recv_count (and, with
// expand_payload off, the payload rows row_src points at; with dispatch_direct_rows, the rows of
// x and x_scales) are valid only until the sources' next dispatch_send, which may start once
// this rank's combine_recv of the round has released them (or, in rounds without combine, once
// its dispatch_recv has acknowledged). Copy them on the stream before combine_send if they must
// outlive the round.
struct DeviceRecvView {
  const int32_t* recv_count = nullptr;      // [R] (written by the sources: see above)
  const int32_t* expert_counts = nullptr;   // [L] (masked_m in masked mode)
  const int32_t* expert_offsets = nullptr;  // [L + 1]
  const int32_t* m_indices = nullptr;       // [row bound]
  const int32_t* row_src = nullptr;         // [row bound]
  const float* row_weight = nullptr;        // [row bound] gate weight of each row
  const void* x = nullptr;                  // [row bound, H] BF16 or E4M3 codes
  const float* x_scales = nullptr;          // [row bound, H/128] (FP8)
  const int64_t* status = nullptr;          // [0] rows_needed, [1] overflow, [2] tokens received
  // The received records as a row array a grouped GEMM can gather its A rows from
  // (kernels::GatheredRows: base records, rows record_rows, stride record_stride, index
  // row_record), so that dispatch can stop at the layout. Record slot q = s * Tmax + j holds the
  // j-th token that source s sent here (with layout_token_slots: q = s * Tmax + t holds source
  // s's token t, and the slots of tokens not sent here are holes): H payload bytes (E4M3 codes,
  // or BF16 as 2H bytes), then with FP8 its H/128 float scales at byte H
  // (kernels::gather_scales_to_mn_major reads them from records + H with in_stride record_stride /
  // 4 floats). record_stride (P) is a multiple of 16
  // and records is 256-byte aligned. row_record[row]: the slot of the row's token, -1 on padding
  // rows and rows past the layout (as row_src). Valid as row_src's rows are (above: until the
  // sources' next dispatch_send).
  // Provided with expand_payload off by the normal kernels, grouped or masked layout: one node,
  // both wires (NVLink: the sources store their records into this rank's source regions; NCCL:
  // the exchange receives source s's region into the same slots), and the two-stage route
  // (several nodes: the records reach this rank's receive regions in the same slot order; its
  // gathered-path test runs the NVLink wire). Null (0) elsewhere: with expand_payload on
  // (dispatch_direct_rows writes the payload straight into x, so the source regions do not hold
  // every record) and on the low-latency kernels (masked layout; they place rows in
  // place_record, not scatter_record).
  const uint8_t* records = nullptr;     // record slot 0
  int64_t record_stride = 0;            // bytes between slots (P)
  int64_t record_rows = 0;              // slots: R * Tmax
  const int32_t* row_record = nullptr;  // [row bound]
};

// One rank: its workspace on `device`, its stream-ordered operations.
class DeviceEpRank {
 public:
  DeviceEpRank(const EpConfig& cfg, int rank, int device, DeviceEpOptions opt = {});
  ~DeviceEpRank();
  DeviceEpRank(const DeviceEpRank&) = delete;
  DeviceEpRank& operator=(const DeviceEpRank&) = delete;

  int rank() const;
  int device() const;
  const EpConfig& config() const;
  void* workspace() const;  // base of this rank's workspace (device pointer)
  // The workspace is one allocation, so one handle per rank is all that peers need (the NCCL
  // wire's send buffer is never written by a peer).
  cudaIpcMemHandle_t ipc_handle() const;
  // Peer workspaces as this rank's device sees them: bases[r] for every rank (its own included).
  // Which ranks are written through them: one node, kNvlink: all; one node, kNccl: none (connect
  // is then a no-op). Several nodes (the two-stage route, either wire): the ranks of this rank's
  // node, plus with kNvlink the rank of its local index in every other node (the network hop's
  // forwarders); the other entries may be nullptr. The two-stage route throws kInvalidArgument
  // on a call before connect, and connect names a missing entry it needs.
  void connect(const std::vector<void*>& bases);
  // The same from every rank's ipc_handle() (one process per GPU; own entry ignored). It opens
  // only the handles the route writes through (above). So every process can do the same whatever
  // the wire and topology: all-gather ipc_handle(), connect_ipc, meet at a barrier.
  void connect_ipc(const std::vector<cudaIpcMemHandle_t>& handles);

  void dispatch_send(const DeviceBatch& batch, cudaStream_t stream);
  void dispatch_recv(cudaStream_t stream);
  // y: expert outputs [row bound, H] BF16 in the layout of the last dispatch. NVLink: the rows of
  // tokens this rank sent to itself are summed by combine_recv, so y (and `rows` below) must stay
  // unchanged until combine_recv has run.
  void combine_send(const uint16_t* y, cudaStream_t stream);
  // rows: one BF16 row per received slot [R * Tmax, H] (dispatch's backward).
  void combine_tokens_send(const uint16_t* rows, cudaStream_t stream);
  // out: [T, H] BF16 for the T of the last dispatch_send.
  void combine_recv(uint16_t* out, cudaStream_t stream);

  // Combine backward of the last dispatch (ep.h, "Combine backward"): grad_out [T, H] BF16 for the
  // T of the last dispatch_send; y: the forward's expert outputs [row bound, H] BF16 in its
  // layout, read by combine_backward_recv (so y stays unchanged until it has run). grad_out rows
  // travel like a dispatch (to the slots of the last dispatch's handle, staged in the combine
  // buffer: a combine backward counts as one combine in the combine sequence, so the two mix in
  // any order); the K gate-weight gradients come back like a combine.
  void combine_backward_send(const uint16_t* grad_out, const uint16_t* y, cudaStream_t stream);
  // grad_y: [row bound, H] BF16, this rank's expert rows (padding and unused rows +0); grad_w:
  // [T, K] float, this rank's tokens (a dropped slot +0). Bit for bit combine_backward_reference.
  // One node over NVLink with the normal kernels (grouped layout, or masked with
  // DeviceEpOptions::low_latency off); other configurations throw kInvalidArgument naming them.
  // Pointers on 16-byte boundaries.
  void combine_backward_recv(uint16_t* grad_y, float* grad_w, cudaStream_t stream);

  DeviceRecvView view() const;
  // Throws the recorded error, if any (call after synchronising the rank's stream).
  void check() const;
  // Host copy of the last dispatch in the reference's format (tests; synchronises).
  DispatchResult download() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// All ranks in this process: rank r on devices[r]. Wire::kNvlink: devices may repeat (several
// ranks on one GPU); peer access is enabled between distinct devices and every rank is connected
// to every other. Wire::kNccl, one node: one rank per device, communicators made here
// (ncclCommInitAll); several nodes: one communicator per local index, whose ranks must be on
// distinct devices, and the ranks are peer-connected as for kNvlink (devices may repeat);
// a thread that drives several NCCL ranks wraps each phase's calls for all ranks in
// nccl_group_start() / nccl_group_end(). CUDA graphs over Wire::kNccl: capture and launch each
// rank's graph from its own thread (or process), as NCCL asks; one thread capturing and launching
// the graphs of two NCCL ranks in turn hung (session 15, 4 x H200: stopped by the test's 60 s
// timeout; where it blocked was not measured, and NCCL's guide warns that one thread launching
// graphs with NCCL work for several GPUs may block). tests/comm/device_ep_gaps_gpu_test.cu shows
// the thread-per-rank way.
class DeviceEpGroup {
 public:
  DeviceEpGroup(const EpConfig& cfg, const std::vector<int>& devices, DeviceEpOptions opt = {});
  ~DeviceEpGroup();
  int size() const { return static_cast<int>(ranks_.size()); }
  DeviceEpRank& rank(int r) { return *ranks_[r]; }
  // check() of every rank.
  void check() const;

 private:
  std::vector<std::unique_ptr<DeviceEpRank>> ranks_;
  std::vector<void*> comms_;
};

// True when this build has the NCCL back end.
bool nccl_available();
void nccl_group_start();
void nccl_group_end();

}  // namespace fp8moe::comm
