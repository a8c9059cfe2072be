// The launcher and its store with real processes: the ranks are this test executable started
// again (/proc/self/exe) with FP8MOE_LAUNCHER_TEST_ROLE naming what the rank does (the test
// LauncherChild.Rank runs the role and exits with its status; without the variable it skips).
// Covered: every rank sees every rank's value; barriers hold back the early ranks; a rank that
// exits 3 or dies of a signal fails the launch, named, and the others are ended promptly (SIGTERM,
// SIGKILL after the grace period); the overall timeout; output prefixes; bad input; the CLI's
// exit codes.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../support/run_cli.h"
#include "fp8moe/comm/launcher.h"
#include "fp8moe/core/error.h"

namespace fp8moe::comm {
namespace {

constexpr const char* kRoleVar = "FP8MOE_LAUNCHER_TEST_ROLE";

// ---- what a rank does (runs in the child process) ----

std::string value_of(int rank) {
  // Binary on purpose: NUL bytes and every byte value must travel unchanged.
  std::string v = "rank " + std::to_string(rank);
  v.push_back('\0');
  for (int i = 0; i < 256; ++i) v.push_back(static_cast<char>((i * 7 + rank) & 255));
  return v;
}

void sleep_ms(int ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
}

int run_role(const std::string& role) {
  const RankEnv env = rank_env();
  const int r = env.rank;
  if (role == "exchange") {
    Store store = Store::from_env();
    const auto all = store.all_gather("value", value_of(r), 10);
    for (int s = 0; s < env.world_size; ++s)
      if (all[s] != value_of(s)) {
        std::fprintf(stderr, "rank %d: value of rank %d differs\n", r, s);
        return 1;
      }
    return 0;
  }
  if (role == "barrier") {
    Store store = Store::from_env();
    for (int round = 0; round < 3; ++round) {
      sleep_ms(((r + round) % env.world_size) * 15);  // a different rank comes last each round
      store.set("before/" + std::to_string(round) + "/" + std::to_string(r), "x");
      store.barrier("b", 10);
      for (int s = 0; s < env.world_size; ++s)
        if (!store.try_get("before/" + std::to_string(round) + "/" + std::to_string(s), nullptr)) {
          std::fprintf(stderr, "rank %d left barrier round %d before rank %d arrived\n", r, round,
                       s);
          return 1;
        }
    }
    return 0;
  }
  if (role == "env") {
    const char* nvls = std::getenv("NCCL_NVLS_ENABLE");
    std::printf("rank=%d world=%d local=%d local_world=%d device=%d nvls=%s store=%s\n", r,
                env.world_size, env.local_rank, env.local_world_size, env.device,
                nvls ? nvls : "(unset)", env.store_dir.empty() ? "(unset)" : "set");
    std::fprintf(stderr, "to stderr %d\n", r);
    std::printf("stdin %s\n", std::getchar() == EOF ? "at end" : "has data");
    std::printf("no newline at the end %d", r);
    return 0;
  }
  if (role == "fail3") {
    if (r == 1) {
      sleep_ms(50);
      return 3;
    }
    sleep_ms(30000);
    return 0;
  }
  if (role == "signal") {
    if (r == 0) {
      sleep_ms(50);
      ::kill(::getpid(), SIGKILL);
    }
    sleep_ms(30000);
    return 0;
  }
  if (role == "ignore_term") {
    if (r == 1) {
      sleep_ms(50);
      return 4;
    }
    ::signal(SIGTERM, SIG_IGN);
    sleep_ms(30000);
    return 0;
  }
  if (role == "sleep") {
    sleep_ms(30000);
    return 0;
  }
  std::fprintf(stderr, "unknown role '%s'\n", role.c_str());
  return 99;
}

TEST(LauncherChild, Rank) {
  const char* role = std::getenv(kRoleVar);
  if (!role) GTEST_SKIP() << "runs only as a rank started by the launcher tests";
  int code = 1;
  try {
    code = run_role(role);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
  }
  std::fflush(stdout);
  std::fflush(stderr);
  std::_Exit(code);
}

// ---- the launching side ----

std::string self_exe() {
  return std::filesystem::read_symlink("/proc/self/exe").string();
}

struct Lines {
  std::mutex mu;
  std::vector<std::string> out, err;
};

LaunchOptions options(int ranks, const std::string& role, Lines* lines = nullptr) {
  LaunchOptions opt;
  opt.num_ranks = ranks;
  opt.command = {self_exe(), "--gtest_filter=LauncherChild.Rank"};
  opt.env = {{kRoleVar, role}};
  opt.timeout_s = 20;
  opt.on_line = [lines](int rank, int stream, std::string_view line) {
    if (!lines) return;
    std::lock_guard<std::mutex> lock(lines->mu);
    (stream == 1 ? lines->out : lines->err)
        .push_back("[rank " + std::to_string(rank) + "] " + std::string(line));
  };
  return opt;
}

double timed_launch(const LaunchOptions& opt, LaunchResult* result) {
  const auto t0 = std::chrono::steady_clock::now();
  *result = launch(opt);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

bool contains(const std::vector<std::string>& lines, const std::string& text) {
  for (const auto& l : lines)
    if (l == text) return true;
  return false;
}

TEST(Launcher, RanksSeeEveryRanksValueThroughTheStore) {
  for (int R : {1, 4}) {
    LaunchResult res;
    timed_launch(options(R, "exchange"), &res);
    EXPECT_TRUE(res.ok()) << "R=" << R << ": " << res.error;
    ASSERT_EQ(res.ranks.size(), static_cast<size_t>(R));
    for (const auto& e : res.ranks) EXPECT_TRUE(e.exited && e.code == 0) << describe(e);
  }
}

TEST(Launcher, BarrierHoldsEveryRankUntilAllArrive) {
  LaunchResult res;
  timed_launch(options(3, "barrier"), &res);
  EXPECT_TRUE(res.ok()) << res.error;
}

TEST(Launcher, EnvironmentAndPrefixedOutput) {
  Lines lines;
  LaunchOptions opt = options(2, "env", &lines);
  opt.devices = {5, 7, 9};
  LaunchResult res;
  timed_launch(opt, &res);
  ASSERT_TRUE(res.ok()) << res.error;
  const char* nvls = std::getenv("NCCL_NVLS_ENABLE");
  const std::string want_nvls = nvls ? nvls : "0";
  for (int r = 0; r < 2; ++r) {
    const std::string p = "[rank " + std::to_string(r) + "] ";
    EXPECT_TRUE(contains(lines.out, p + "rank=" + std::to_string(r) +
                                        " world=2 local=" + std::to_string(r) +
                                        " local_world=2 device=" + std::to_string(5 + 2 * r) +
                                        " nvls=" + want_nvls + " store=set"))
        << ::testing::PrintToString(lines.out);
    EXPECT_TRUE(contains(lines.out, p + "stdin at end")) << ::testing::PrintToString(lines.out);
    EXPECT_TRUE(contains(lines.err, p + "to stderr " + std::to_string(r)))
        << ::testing::PrintToString(lines.err);
    // A last line without '\n' still comes out whole.
    EXPECT_TRUE(contains(lines.out, p + "no newline at the end " + std::to_string(r)))
        << ::testing::PrintToString(lines.out);
  }
}

TEST(Launcher, RankExitingThreeFailsTheLaunchAndEndsTheOthers) {
  LaunchResult res;
  const double s = timed_launch(options(3, "fail3"), &res);
  EXPECT_FALSE(res.ok());
  EXPECT_EQ(res.failed_rank, 1);
  EXPECT_EQ(res.error, "rank 1 exited with status 3");
  EXPECT_EQ(res.exit_code(), 3);
  EXPECT_LT(s, 5.0) << "the sleeping ranks were not ended promptly";
  ASSERT_EQ(res.ranks.size(), 3u);
  for (int r : {0, 2}) {
    EXPECT_TRUE(res.ranks[r].terminated) << r;
    EXPECT_FALSE(res.ranks[r].exited) << r;
    EXPECT_EQ(res.ranks[r].signal, SIGTERM) << describe(res.ranks[r]);
  }
}

TEST(Launcher, RankKilledBySignalIsNamedWithTheSignal) {
  LaunchResult res;
  const double s = timed_launch(options(2, "signal"), &res);
  EXPECT_EQ(res.failed_rank, 0);
  EXPECT_EQ(res.error, "rank 0 was killed by signal 9 (SIGKILL)");
  EXPECT_EQ(res.exit_code(), 1);
  EXPECT_LT(s, 5.0);
  EXPECT_TRUE(res.ranks[1].terminated);
}

TEST(Launcher, RankIgnoringSigtermIsKilledAfterTheGracePeriod) {
  LaunchOptions opt = options(2, "ignore_term");
  opt.grace_s = 0.3;
  LaunchResult res;
  const double s = timed_launch(opt, &res);
  EXPECT_EQ(res.error, "rank 1 exited with status 4");
  EXPECT_EQ(res.ranks[0].signal, SIGKILL) << describe(res.ranks[0]);
  EXPECT_GE(res.ranks[0].seconds, 0.3);
  EXPECT_LT(s, 5.0);
}

TEST(Launcher, OverallTimeoutEndsTheJob) {
  LaunchOptions opt = options(2, "sleep");
  opt.timeout_s = 0.4;
  LaunchResult res;
  const double s = timed_launch(opt, &res);
  EXPECT_TRUE(res.timed_out);
  EXPECT_EQ(res.failed_rank, -1);
  EXPECT_EQ(res.error, "timed out after 0.4 s with rank(s) 0, 1 still running");
  EXPECT_EQ(res.exit_code(), 1);
  EXPECT_LT(s, 5.0);
  for (const auto& e : res.ranks) EXPECT_TRUE(e.terminated);
}

void expect_bad_input(const LaunchOptions& opt, const std::string& part) {
  try {
    launch(opt);
    ADD_FAILURE() << "expected an error containing: " << part;
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
    EXPECT_NE(e.message().find(part), std::string::npos) << e.message();
  }
}

TEST(Launcher, BadInputIsRejectedClearly) {
  LaunchOptions opt;
  opt.command = {"/bin/true"};
  opt.num_ranks = 0;
  expect_bad_input(opt, "number of ranks must be at least 1, got 0");
  opt.num_ranks = 2;
  opt.command = {};
  expect_bad_input(opt, "no command to run");
  opt.command = {"/no/such/program"};
  expect_bad_input(opt, "executable '/no/such/program' does not exist");
  opt.command = {"fp8moe-no-such-program"};
  expect_bad_input(opt, "executable 'fp8moe-no-such-program' not found in PATH");
  opt.command = {"/tmp"};
  expect_bad_input(opt, "'/tmp' is not an executable file");
  opt.command = {"/bin/true"};
  opt.devices = {0, -1};
  expect_bad_input(opt, "device -1 is negative");
  // Executable bits on a file the kernel cannot run: found only by execve, in the child.
  opt.devices = {};
  const std::string junk = ::testing::TempDir() + "fp8moe_launcher_not_a_program";
  std::FILE* f = std::fopen(junk.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  const unsigned char bytes[] = {0x7f, 'E', 'L', 'F', 0, 0, 0, 0};
  std::fwrite(bytes, 1, sizeof(bytes), f);
  std::fclose(f);
  std::filesystem::permissions(junk, std::filesystem::perms::owner_all);
  opt.command = {junk};
  expect_bad_input(opt, "launch: rank 0: cannot execute '" + junk + "': Exec format error");
  std::filesystem::remove(junk);
}

// ---- the store inside one process ----

class StoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char templ[] = "/tmp/fp8moe-store-test-XXXXXX";
    ASSERT_NE(::mkdtemp(templ), nullptr);
    dir_ = templ;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string dir_;
};

TEST_F(StoreTest, SetGetRoundTripsBytesAndKeysStayDistinct) {
  Store a(dir_, 0, 2), b(dir_, 1, 2);
  a.set("a/b", value_of(3));
  a.set("a%2Fb", "other");
  EXPECT_EQ(b.get("a/b", 1), value_of(3));
  EXPECT_EQ(b.get("a%2Fb", 1), "other");
  a.set("a/b", "");
  EXPECT_EQ(b.get("a/b", 1), "");
  std::string v;
  EXPECT_FALSE(b.try_get("never", &v));
}

TEST_F(StoreTest, MissingKeyTimesOutNamingTheKey) {
  Store s(dir_, 1, 2);
  try {
    s.get("ipc/handle/7", 0.2);
    FAIL() << "expected a timeout";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kRuntime);
    EXPECT_NE(e.message().find("rank 1: store key 'ipc/handle/7' not set within 0.2 s"),
              std::string::npos)
        << e.message();
  }
}

TEST_F(StoreTest, BarrierTimeoutNamesTheMissingRanks) {
  Store s(dir_, 0, 3);
  try {
    s.barrier("start", 0.2);
    FAIL() << "expected a timeout";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("rank 0: barrier 'start' (round 1) timed out after 0.2 s waiting "
                               "for rank(s) 1, 2"),
              std::string::npos)
        << e.message();
  }
}

TEST(RankEnv, DeviceChoiceAndMissingVariables) {
  RankEnv e;
  e.rank = e.local_rank = 5;
  EXPECT_EQ(rank_device(e, 2), 1);
  e.device = 3;
  EXPECT_EQ(rank_device(e, 4), 3);
  EXPECT_THROW(rank_device(e, 2), Error);
  if (!launched_as_rank()) {
    try {
      rank_env();
      FAIL() << "expected an error";
    } catch (const Error& err) {
      EXPECT_NE(err.message().find("FP8MOE_RANK is not set"), std::string::npos) << err.message();
    }
  }
}

// ---- the command line ----

TEST(LaunchCli, ExitCodes) {
  using test::run_cli;
  auto ok = run_cli("launch -n 2 -- /bin/sh -c 'echo hi $FP8MOE_RANK'");
  EXPECT_EQ(ok.exit_code, 0) << ok.output;
  EXPECT_NE(ok.output.find("[rank 0] hi 0\n"), std::string::npos) << ok.output;
  EXPECT_NE(ok.output.find("[rank 1] hi 1\n"), std::string::npos) << ok.output;

  const auto t0 = std::chrono::steady_clock::now();
  auto five = run_cli(
      "launch -n 3 -- /bin/sh -c 'if [ \"$FP8MOE_RANK\" = 2 ]; then exit 5; fi; exec sleep 30'");
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 5.0);
  EXPECT_EQ(five.exit_code, 5) << five.output;
  EXPECT_NE(five.output.find("fp8moe: launch failed: rank 2 exited with status 5\n"),
            std::string::npos)
      << five.output;

  auto sig = run_cli("launch -n 2 -- /bin/sh -c 'kill -9 $$'");
  EXPECT_EQ(sig.exit_code, 1) << sig.output;
  EXPECT_NE(sig.output.find("was killed by signal 9 (SIGKILL)"), std::string::npos) << sig.output;

  auto slow = run_cli("launch -n 1 --timeout 0.3 -- sleep 30");
  EXPECT_EQ(slow.exit_code, 1) << slow.output;
  EXPECT_NE(slow.output.find("timed out after 0.3 s"), std::string::npos) << slow.output;

  auto plain = run_cli("launch -n 1 --no-prefix -- /bin/echo as is");
  EXPECT_EQ(plain.exit_code, 0);
  EXPECT_EQ(plain.output, "as is\n");

  for (const char* bad : {"launch -n 0 -- /bin/true", "launch -n 2", "launch -n 2 -- /no/such/exe",
                          "launch -n 2 --devices 0,x -- /bin/true", "launch -- /bin/true"}) {
    auto r = run_cli(bad);
    EXPECT_EQ(r.exit_code, 2) << bad << ": " << r.output;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << bad << ": " << r.output;
  }
}

}  // namespace
}  // namespace fp8moe::comm
