// The low-latency acknowledgements given by the rank's next low-latency send kernel
// (DeviceEpOptions::ll_defer_acks, session 16, ll2): the dispatch receive (F, bit 1) and / or the
// combine receive (G, bit 2) end without adding to their sources' acknowledgement counters, and
// the rank's next dispatch or combine send adds one round per receive not yet acknowledged (Z:
// from warp 0 of block 0 instead of the last warp of the last block). Checked bit for bit against
// dispatch_reference / combine_reference / combine_tokens_reference over the masked cases, FP8 and
// BF16, on all GPUs and with all ranks on one GPU (where the option falls back to the receives'
// acknowledgements); sequences dispatch, combine; dispatch, dispatch, combine; combines repeated;
// rows that change between rounds; CUDA graph replays (one or two dispatches, one or two
// combines a graph); rounds back to back without a host synchronisation; silent peers; a peer
// whose next kernel never comes (named: ll_dispatch.ack / ll_combine.ack where the deferral is
// in effect, completing where it falls back or where another kernel gave the acknowledgement).
// Test: test_comm_gpu --gtest_filter='LowLatencyNextKernelAck*'
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "ll_ack_test_util.h"

namespace fp8moe::comm::testing::ll_ack {
namespace {

class LowLatencyNextKernelAck : public NeedsGpu {};

// A round's combines: combine, combine_tokens, combine. The combines in a row make a combine
// send follow a combine receive (G: that send gives its acknowledgement); the two dispatches in a
// row of rounds 1 and on, a dispatch send follow a dispatch receive (F: that send gives it).
const std::vector<Combine> kCombines = {
    {true, "combine"}, {false, "combine_tokens"}, {true, "combine again"}};

// Every case with FG (3 rounds), then with one of the other sets in turn (2 rounds): F and G
// alone (the other receive acknowledging as before), Z (block 0's warp 0), the session-4 kernels
// (0: the per-block arrival), the ascending order (A: k_dispatch_send<false, false, *>), DG
// (ll_defer_dispatch_ack with G: F's path), FGH; send grids of 5, 1 and 64 blocks (1: the acking
// warp is block 0's last warp; 64: at the V3 shape the last block has no item), receive grids of
// 3 or automatic, receive beside or after the send. `others` false: FG only, 2 rounds (all ranks
// on one GPU, where every set falls back to the receives' acknowledgements).
void run_cases(Payload p, int gpus, bool others) {
  constexpr const char* kLetters[] = {"F", "G", "FGZ", "0FG", "AFG", "DG", "FGH", "0FZ"};
  constexpr int kBlocks[] = {5, 1, 64};
  int ran = 0;
  for (const Case& c : cases()) {
    ++ran;
    for (const std::string& letters : {std::string("FG"), std::string(kLetters[ran % 8])}) {
      if (!others && letters != "FG") continue;
      check_case(c, p, gpus, letters, kBlocks[(ran + letters.size()) % 3], ran,
                 letters == "FG" && others ? 3 : 2, kCombines);
    }
  }
  EXPECT_GT(ran, 0);
}

TEST_F(LowLatencyNextKernelAck, MatchesReferenceFp8AllGpus) {
  run_cases(Payload::kFP8, gpu_count(), true);
}
TEST_F(LowLatencyNextKernelAck, MatchesReferenceBf16AllGpus) {
  run_cases(Payload::kBF16, gpu_count(), true);
}
TEST_F(LowLatencyNextKernelAck, MatchesReferenceFp8OneGpuManyRanks) {
  run_cases(Payload::kFP8, 1, false);
}

// Rounds whose row counts grow, overflow (capacity 64) and shrink through the same buffers.
TEST_F(LowLatencyNextKernelAck, RowsChangeBetweenRounds) {
  rows_change_between_rounds({"FG", "0FG"}, kCombines);
}

// Each rank's whole round in one CUDA graph, replayed 4 times: `dispatches` dispatches, then
// `combines` combines. The sends of each replay acknowledge the receives before them (counted on
// the device, not captured): F the combine send gives the dispatch receive's, G the dispatch send
// the combine receive's (the next combine send where two combines follow each other).
TEST_F(LowLatencyNextKernelAck, GraphCapturedRoundReplays) {
  graph_replays(2, gpu_count(), "FG", 1, 1);
  graph_replays(2, gpu_count(), "FG", 2, 1);
  graph_replays(2, gpu_count(), "FG", 1, 2);
  graph_replays(2, gpu_count(), "F", 1, 1);
  graph_replays(2, gpu_count(), "G", 1, 1);
  graph_replays(2, gpu_count(), "0FGZ", 1, 1);
  graph_replays(4, gpu_count(), "FG", 1, 1);
  graph_replays(4, 1, "FG", 2, 1);
}

// Rounds back to back with no host synchronisation under each deferral (F, G, both, Z, D with G).
TEST_F(LowLatencyNextKernelAck, RoundsBackToBackWithoutHostSync) {
  back_to_back(2, gpu_count(), Payload::kFP8, "FG", 5);
  back_to_back(2, gpu_count(), Payload::kFP8, "F", 1);
  back_to_back(2, gpu_count(), Payload::kBF16, "G", 64);
  back_to_back(2, gpu_count(), Payload::kFP8, "0FG", 64);
  back_to_back(2, gpu_count(), Payload::kFP8, "FGZ", 64);
  back_to_back(2, gpu_count(), Payload::kFP8, "DG", 64);
  back_to_back(4, gpu_count(), Payload::kFP8, "FG", 64);
  back_to_back(2, 1, Payload::kFP8, "FG", 5);
}

// Rank 1 never sends: rank 0's dispatch receive ends with an error naming the counts it waited
// for; rank 1 never combines: rank 0's combine receive names ll_combine.data.
TEST_F(LowLatencyNextKernelAck, SilentPeerEndsWithErrorNamingRankPeerCounter) {
  for (const char* letters : {"FG", "0FG", "FGZ"}) {
    SCOPED_TRACE(std::string("options ") + letters);
    silent_dispatch_peer(letters);
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

// A peer whose next kernel never comes. After `before` (both ranks: "d" a dispatch, "c" a
// combine), only rank 0 runs `then` ("d": a dispatch send, "c": a combine send). Rank 0's send
// waits for rank 1's acknowledgement of the last receive of that kind: it times out naming
// `named` where rank 1 deferred it to a kernel that never came, and completes where rank 1's
// receive acknowledged (option off, or ranks on one GPU: the fallback) or where a later kernel of
// rank 1 gave it (F: its combine send gives the dispatch receive's; G: its dispatch send gives
// the combine receive's).
struct Lonely {
  const char* letters;
  const char* before;
  char then;
  const char* named;   // on 2 GPUs; nullptr: completes
  const char* rounds;  // the wait's rounds in the message
};
TEST_F(LowLatencyNextKernelAck, PeerWithoutNextKernelIsNamedOnTheAcknowledgement) {
  constexpr const char* k1 = "expected >= 1, seen 0";
  const Lonely kCases[] = {
      {"F", "d", 'd', "ll_dispatch.ack", k1},   // the dispatch receive's: no kernel after it
      {"FG", "d", 'd', "ll_dispatch.ack", k1},  //
      {"G", "d", 'd', nullptr, k1},             // the receive acknowledged
      {"F", "dc", 'd', nullptr, k1},            // rank 1's combine send gave it
      {"D", "dc", 'd', "ll_dispatch.ack", k1},  // ll1's: only a dispatch send gives it
      {"FG", "dc", 'c', "ll_combine.ack", k1},  // the combine receive's: no kernel after it
      {"G", "dc", 'c', "ll_combine.ack", k1},   //
      {"F", "dc", 'c', nullptr, k1},            // the receive acknowledged
      {"FG", "dcd", 'c', nullptr, k1},          // rank 1's dispatch send gave it
      {"GZ", "dcc", 'c', "ll_combine.ack", "expected >= 2, seen 1"},  // the second receive's
      {"FGZ", "dcc", 'd', nullptr, k1},  // F: rank 1's combine sends gave it
      {"", "dc", 'c', nullptr, k1},      // off
  };

  for (int gpus : {gpu_count(), 1}) {
    for (const Lonely& c : kCases) {
      const bool named = c.named != nullptr && gpus > 1;
      SCOPED_TRACE(std::string("options '") + c.letters + "', both " + c.before + ", then rank 0 " +
                   c.then + " on " + std::to_string(gpus) + " GPU(s)");
      next_kernel_never_comes(options(c.letters), gpus, c.before, c.then, named ? c.named : nullptr,
                              c.rounds);
    }
  }
}

// The defaults defer both acknowledgements (session 16's final): a default group behaves as FG
// above, and a rank's sends in the decoding flow (dispatch, combine, dispatch) never wait for a
// kernel its peer has not run.
TEST_F(LowLatencyNextKernelAck, DefaultsDeferBothAcknowledgements) {
  EXPECT_EQ(DeviceEpOptions{}.ll_defer_acks, 3);
  struct Step {
    const char* before;
    char then;
    const char* named;  // on 2 GPUs; nullptr: completes
  };
  const Step kSteps[] = {
      {"d", 'd', "ll_dispatch.ack"},
      {"dc", 'c', "ll_combine.ack"},
      {"dc", 'd', nullptr},
      {"dcd", 'c', nullptr},
  };
  for (int gpus : {gpu_count(), 1}) {
    for (const Step& st : kSteps) {
      SCOPED_TRACE(std::string("defaults, both ") + st.before + ", then rank 0 " + st.then +
                   " on " + std::to_string(gpus) + " GPU(s)");
      next_kernel_never_comes(DeviceEpOptions{}, gpus, st.before, st.then,
                              gpus > 1 ? st.named : nullptr);
    }
  }
}

// An expert id out of range is reported with the rank and the token.
TEST_F(LowLatencyNextKernelAck, BadExpertIdIsReported) {
  bad_expert_id_is_reported({"FG", "0FG", "AFG"});
}

// ll_defer_acks outside 0..3 is rejected.
TEST_F(LowLatencyNextKernelAck, BadOptionIsRejected) {
  DeviceEpOptions opt;
  opt.ll_defer_acks = 4;
  try {
    DeviceEpGroup group(short_config(), devices_for(2, gpu_count()), opt);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("ll_defer_acks=4"), std::string::npos) << e.message();
  }
}

}  // namespace
}  // namespace fp8moe::comm::testing::ll_ack
