// The low-latency dispatch planned by the receiver (DeviceEpOptions::ll_recv_plan, session 17,
// ll3; ep_bench --ll-variants letter V): the send stores the rank's expert ids and weights at every
// destination behind one counter per source (ll_dispatch.ids) and each token's payload at the slot
// of its token index; each receive plans its local experts. Checked bit for bit against
// dispatch_reference / combine_reference / combine_tokens_reference (records, masked layout,
// payload and scales, token_rows, the handle, combine, combine_tokens; download() maps the token
// slots back to the compact ones) over the masked cases, FP8 and BF16, on all GPUs and with all
// ranks on one GPU; with the acknowledgements at the receives' ends (V: ll_defer_acks 0) and on
// the next send (FGV: 3, the default), with the session-4 combine (0: own records sent through the
// combine send), the ascending order (A), D, Z and H; send grids 1 / 5 / 64, receive grids 3 or
// automatic, beside or after the send; rows that change and overflow between rounds; CUDA graph
// replays; rounds back to back without a host synchronisation; a silent peer (ll_dispatch.ids);
// a peer whose next kernel never comes; a bad expert id.
// LowLatencyRecvPlanIdsBlock (session 17 late, ll5; letter I: ll_recv_plan and
// ll_recv_plan_ids_block, the ids as round-tagged words (ll4's) stored by one extra send block
// that stores no payload, polled by the receive): the same checks with I in place of V (the
// silent peer named on ll_dispatch.ids as well: the words' counter; the bad expert id reported by
// the ids block). I is the default since session 18 (the tests' letters set every option).
// Test: test_comm_gpu --gtest_filter='LowLatencyRecvPlan*'
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "ll_ack_test_util.h"

namespace fp8moe::comm::testing::ll_ack {
namespace {

class LowLatencyRecvPlan : public NeedsGpu {};
class LowLatencyRecvPlanIdsBlock : public NeedsGpu {};

// `letters` with V replaced by v (I: the ids block).
std::string with(const std::string& letters, const std::string& v) {
  std::string out;
  for (char c : letters) out += c == 'V' ? v : std::string(1, c);
  return out;
}
std::string with(const std::string& letters, char v) {
  return with(letters, std::string(1, v));
}

// A round's combines: combine, combine_tokens, combine (a combine send after a combine receive).
const std::vector<Combine> kCombines = {
    {true, "combine"}, {false, "combine_tokens"}, {true, "combine again"}};

// Every case with FGV (3 rounds) and V (2 rounds), then with one other set in turn (2 rounds);
// send grids of 5, 1 and 64 blocks, receive grids of 3 or automatic, receive beside or after the
// send (check_case). `others` false: FGV and V only (all ranks on one GPU, where F and G fall
// back to the receives' acknowledgements).
void run_cases(Payload p, int gpus, bool others, const std::string& v = "V") {
  constexpr const char* kLetters[] = {"0FGV", "AFGV", "FGZV", "DGV", "FGHV", "0V", "AV", "FV"};
  constexpr int kBlocks[] = {5, 1, 64};
  int ran = 0;
  for (const Case& c : cases()) {
    ++ran;
    for (const std::string& letters :
         {std::string("FGV"), std::string("V"), std::string(kLetters[ran % 8])}) {
      if (!others && letters != "FGV" && letters != "V") continue;
      check_case(c, p, gpus, with(letters, v), kBlocks[(ran + letters.size()) % 3], ran,
                 letters == "FGV" && others ? 3 : 2, kCombines);
    }
  }
  EXPECT_GT(ran, 0);
}

TEST_F(LowLatencyRecvPlan, MatchesReferenceFp8AllGpus) {
  run_cases(Payload::kFP8, gpu_count(), true);
}
TEST_F(LowLatencyRecvPlan, MatchesReferenceBf16AllGpus) {
  run_cases(Payload::kBF16, gpu_count(), true);
}
TEST_F(LowLatencyRecvPlan, MatchesReferenceFp8OneGpuManyRanks) {
  run_cases(Payload::kFP8, 1, false);
}
TEST_F(LowLatencyRecvPlanIdsBlock, MatchesReferenceFp8AllGpus) {
  run_cases(Payload::kFP8, gpu_count(), true, "I");
}
TEST_F(LowLatencyRecvPlanIdsBlock, MatchesReferenceBf16AllGpus) {
  run_cases(Payload::kBF16, gpu_count(), false, "I");
}
TEST_F(LowLatencyRecvPlanIdsBlock, MatchesReferenceFp8OneGpuManyRanks) {
  run_cases(Payload::kFP8, 1, false, "I");
}
// Rounds whose row counts grow, overflow (capacity 64) and shrink through the same buffers.
TEST_F(LowLatencyRecvPlan, RowsChangeBetweenRounds) {
  rows_change_between_rounds({"FGV", "V", "0FGV"}, kCombines);
}
TEST_F(LowLatencyRecvPlanIdsBlock, RowsChangeBetweenRounds) {
  rows_change_between_rounds({"FGI", "I", "0FGI"}, kCombines);
}

// Each rank's whole round in one CUDA graph, replayed 4 times (the rounds of the ids counter and
// the step flags counted on the device, not captured). I: the ids' buffers alternate by round.
void graph_cases(char v) {
  graph_replays(2, gpu_count(), with("FGV", v), 1, 1);
  graph_replays(2, gpu_count(), with("FGV", v), 2, 1);
  graph_replays(2, gpu_count(), with("V", v), 1, 2);
  graph_replays(2, gpu_count(), with("0V", v), 1, 1);
  graph_replays(4, gpu_count(), with("FGV", v), 1, 1);
  graph_replays(4, 1, with("FGV", v), 2, 1);
}
TEST_F(LowLatencyRecvPlan, GraphCapturedRoundReplays) {
  graph_cases('V');
}
TEST_F(LowLatencyRecvPlanIdsBlock, GraphCapturedRoundReplays) {
  graph_cases('I');
}

// Ten rounds back to back with no host synchronisation (dispatch-only rounds in a row).
void back_to_back_cases(char v) {
  back_to_back(2, gpu_count(), Payload::kFP8, with("FGV", v), 5);
  back_to_back(2, gpu_count(), Payload::kFP8, with("V", v), 1);
  back_to_back(2, gpu_count(), Payload::kBF16, with("FGV", v), 64);
  back_to_back(2, gpu_count(), Payload::kFP8, with("0V", v), 64);
  back_to_back(4, gpu_count(), Payload::kFP8, with("FGV", v), 64);
  back_to_back(2, 1, Payload::kFP8, with("FGV", v), 5);
}
TEST_F(LowLatencyRecvPlan, RoundsBackToBackWithoutHostSync) {
  back_to_back_cases('V');
}
TEST_F(LowLatencyRecvPlanIdsBlock, RoundsBackToBackWithoutHostSync) {
  back_to_back_cases('I');
}

// Rank 1 never sends: rank 0's dispatch receive ends with an error naming the ids counter it
// waited for (I: the words of source 1, under the same name); rank 1 never combines: rank 0's
// combine receive names ll_combine.data.
void silent_peer_cases(char v) {
  for (const std::string& letters : {with("FGV", v), with("V", v)}) {
    SCOPED_TRACE("options " + letters);
    {
      Harness h(short_config(), devices_for(2, gpu_count()), {16, 16}, Routing::kRandom, 3,
                options(letters));
      h.group->rank(0).dispatch_send(h.batch(0), h.streams[0]);
      h.group->rank(0).dispatch_recv(h.streams[0]);
      h.sync();
      expect_timeout(h, 0, "ll_dispatch.ids");
    }
    {
      Harness h(short_config(), devices_for(2, gpu_count()), {16, 16}, Routing::kRandom, 3,
                options(letters));
      h.dispatch();
      h.sync();
      h.group->check();
      h.group->rank(0).combine_send(h.y[0], h.streams[0]);
      h.group->rank(0).combine_recv(h.out[0], h.streams[0]);
      h.sync();
      expect_timeout(h, 0, "ll_combine.data");
    }
  }
}
TEST_F(LowLatencyRecvPlan, SilentPeerEndsWithErrorNamingRankPeerCounter) {
  silent_peer_cases('V');
}
TEST_F(LowLatencyRecvPlanIdsBlock, SilentPeerEndsWithErrorNamingRankPeerCounter) {
  silent_peer_cases('I');
}

// The receiver plans by default since session 17's final: a default group's silent peer is named
// on its ids, and a default group runs the low-latency cases bit for bit (the FP8 ones on every
// GPU and with several ranks on one GPU).
TEST_F(LowLatencyRecvPlan, IsTheDefault) {
  EXPECT_TRUE(DeviceEpOptions{}.ll_recv_plan);
  Harness h(short_config(), devices_for(2, gpu_count()), {16, 16}, Routing::kRandom, 3,
            DeviceEpOptions{});
  h.group->rank(0).dispatch_send(h.batch(0), h.streams[0]);
  h.group->rank(0).dispatch_recv(h.streams[0]);
  h.sync();
  expect_timeout(h, 0, "ll_dispatch.ids");
}

// A peer whose next kernel never comes: rank 0's dispatch send waits for rank 1's dispatch
// acknowledgement (FGV: deferred to a kernel that never comes; V: given by the receive). I: the
// same (its ids block waits for nothing: its words go to the other buffer).
void next_kernel_cases(char v) {
  for (int gpus : {gpu_count(), 1}) {
    SCOPED_TRACE(std::to_string(gpus) + " GPU(s)");
    next_kernel_never_comes(options(with("FGV", v)), gpus, "d", 'd',
                            gpus > 1 ? "ll_dispatch.ack" : nullptr);
    next_kernel_never_comes(options(with("V", v)), gpus, "d", 'd', nullptr);
    next_kernel_never_comes(options(with("FGV", v)), gpus, "dc", 'd', nullptr);
  }
}
TEST_F(LowLatencyRecvPlan, PeerWithoutNextKernelIsNamedOnTheAcknowledgement) {
  next_kernel_cases('V');
}
TEST_F(LowLatencyRecvPlanIdsBlock, PeerWithoutNextKernelIsNamedOnTheAcknowledgement) {
  next_kernel_cases('I');
}

// An expert id out of range is reported with the rank and the token (by the send's block 0; I: by
// its ids block).
TEST_F(LowLatencyRecvPlan, BadExpertIdIsReported) {
  bad_expert_id_is_reported({"FGV", "V", "0V"});
}
TEST_F(LowLatencyRecvPlanIdsBlock, BadExpertIdIsReported) {
  bad_expert_id_is_reported({"FGI", "I", "0I"});
}

}  // namespace
}  // namespace fp8moe::comm::testing::ll_ack
