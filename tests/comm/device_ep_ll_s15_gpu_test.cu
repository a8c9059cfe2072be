// The low-latency dispatch with its acknowledgement deferred to the next dispatch send
// (DeviceEpOptions::ll_defer_dispatch_ack, session 15 late, ll1): the receive ends without adding
// to its sources' acknowledgement counters, and the rank's next dispatch send adds one round per
// receive not yet acknowledged. Checked bit for bit against dispatch_reference / combine_reference
// / combine_tokens_reference over the masked cases (random, skewed, all on one rank, nobody to a
// rank, T = 0, k = 1, k = 8, overflow of the masked capacity), FP8 and BF16, on all GPUs and with
// all ranks on one GPU (where the option falls back to the receive's acknowledgement), rows that
// change between rounds, CUDA graph replays, rounds back to back without a host synchronisation
// (dispatches in a row: the deferred acknowledgement is what orders them), a silent peer and a
// peer whose next send never comes (named: ll_dispatch.ack), a bad expert id.
// Test: test_comm_gpu --gtest_filter='LowLatencyDeferAck*'
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "ll_ack_test_util.h"

namespace fp8moe::comm::testing::ll_ack {
namespace {

class LowLatencyDeferAck : public NeedsGpu {};

// A round's combines: combine, then combine_tokens.
const std::vector<Combine> kCombines = {{true, "combine"}, {false, "combine_tokens"}};

// Every case with D on the defaults, on the session-4 kernels (0D: the per-block arrival) and
// with the ascending order (AD: k_dispatch_send<false, true>) in turn, send grids of 5, 1 and 64
// blocks, receive grids of 3 or automatic, receive beside or after the send; 3 rounds each.
void run_cases(Payload p, int gpus) {
  constexpr const char* kLetters[] = {"D", "0D", "AD", "DH"};
  constexpr int kBlocks[] = {5, 1, 64};
  int ran = 0;
  for (const Case& c : cases()) {
    ++ran;
    check_case(c, p, gpus, kLetters[ran % 4], kBlocks[ran % 3], ran, 3, kCombines);
  }
  EXPECT_GT(ran, 0);
}

TEST_F(LowLatencyDeferAck, MatchesReferenceFp8AllGpus) {
  run_cases(Payload::kFP8, gpu_count());
}
TEST_F(LowLatencyDeferAck, MatchesReferenceBf16AllGpus) {
  run_cases(Payload::kBF16, gpu_count());
}
TEST_F(LowLatencyDeferAck, MatchesReferenceFp8OneGpuManyRanks) {
  run_cases(Payload::kFP8, 1);
}

// Rounds whose row counts grow, overflow (capacity 64) and shrink through the same buffers.
TEST_F(LowLatencyDeferAck, RowsChangeBetweenRounds) {
  rows_change_between_rounds({"D", "0D"}, kCombines);
}

// Each rank's whole round (dispatch and combine) in one CUDA graph, replayed: the send of each
// replay acknowledges the receive of the replay before (counted on the device, not captured).
// `dispatches` dispatches per graph (a second one in a row acknowledges the first).
TEST_F(LowLatencyDeferAck, GraphCapturedRoundReplays) {
  graph_replays(2, gpu_count(), "D", 1, 1);
  graph_replays(2, gpu_count(), "D", 2, 1);
  graph_replays(2, gpu_count(), "0D", 1, 1);
  graph_replays(4, gpu_count(), "D", 1, 1);
  graph_replays(4, 1, "D", 2, 1);
}

// Two or three dispatches in a row with no host synchronisation: D's deferred acknowledgement
// is what orders them.
TEST_F(LowLatencyDeferAck, RoundsBackToBackWithoutHostSync) {
  back_to_back(2, gpu_count(), Payload::kFP8, "D", 5);
  back_to_back(2, gpu_count(), Payload::kFP8, "D", 1);
  back_to_back(2, gpu_count(), Payload::kBF16, "D", 64);
  back_to_back(2, gpu_count(), Payload::kFP8, "0D", 64);
  back_to_back(4, gpu_count(), Payload::kFP8, "D", 64);
  back_to_back(2, 1, Payload::kFP8, "D", 5);
}

// Rank 1 never sends: rank 0's receive ends with an error naming the counts it waited for.
TEST_F(LowLatencyDeferAck, SilentPeerEndsWithErrorNamingRankPeerCounter) {
  for (const char* letters : {"D", "0D"}) {
    SCOPED_TRACE(std::string("options ") + letters);
    silent_dispatch_peer(letters);
  }
}

// Both ranks dispatch once; then only rank 0 sends again. With D rank 1's receive has not
// acknowledged (its next send would), so rank 0's send times out naming ll_dispatch.ack; where
// the option falls back (ranks sharing a GPU) or is off, the receive acknowledged and the send
// completes.
TEST_F(LowLatencyDeferAck, PeerWithoutNextSendIsNamedOnTheAcknowledgement) {
  for (int gpus : {gpu_count(), 1}) {
    for (const char* letters : {"D", ""}) {
      const bool deferred = letters[0] == 'D' && gpus > 1;
      SCOPED_TRACE(std::string("options '") + letters + "' on " + std::to_string(gpus) + " GPU(s)");
      next_kernel_never_comes(options(letters), gpus, "d", 'd',
                              deferred ? "ll_dispatch.ack" : nullptr);
    }
  }
}

// An expert id out of range is reported with the rank and the token.
TEST_F(LowLatencyDeferAck, BadExpertIdIsReported) {
  bad_expert_id_is_reported({"D", "0D", "AD"});
}

}  // namespace
}  // namespace fp8moe::comm::testing::ll_ack
