// fp8moe launch: one process per GPU on this host. `fp8moe launch -n R [--timeout S] -- cmd
// args...` starts R ranks of cmd (FP8MOE_RANK, FP8MOE_WORLD_SIZE, FP8MOE_LOCAL_RANK,
// FP8MOE_STORE, ... in their environment; fp8moe/comm/launcher.h), prefixes their output with
// "[rank r]" and ends the job when one fails. Exit code: 0 when every rank succeeds; the failing
// rank's exit status when it exited non-zero; 1 for a rank killed by a signal, a timeout or an
// interrupt; 2 for bad usage (R < 1, no command, an executable that does not exist).
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "command.h"
#include "fp8moe/comm/launcher.h"

namespace {

struct LaunchArgs {
  int ranks = 1;
  double timeout_s = 0;
  double grace_s = 3;
  std::string devices;
  bool no_prefix = false;
  std::vector<std::string> command;
};

void setup_launch(CLI::App& app) {
  auto args = std::make_shared<LaunchArgs>();
  app.add_option("-n,--ranks", args->ranks, "number of ranks (processes) to start")->required();
  app.add_option("--timeout", args->timeout_s,
                 "end the whole job after this many seconds (0 = no limit)");
  app.add_option("--grace", args->grace_s,
                 "seconds between SIGTERM and SIGKILL when the ranks are ended");
  app.add_option("--devices", args->devices,
                 "comma-separated device list: rank r gets entry r % size (FP8MOE_DEVICE); "
                 "default: local rank % device count");
  app.add_flag("--no-prefix", args->no_prefix,
               "leave the ranks' output as is (default: every line prefixed with [rank r])");
  app.add_option("command", args->command, "the program and its arguments, after --");
  app.footer("Example: fp8moe launch -n 2 -- ./build/tests/test_comm_gpu --gtest_filter=...");
  app.callback([args] {
    using namespace fp8moe;
    comm::LaunchOptions opt;
    opt.num_ranks = args->ranks;
    opt.timeout_s = args->timeout_s;
    opt.grace_s = args->grace_s;
    opt.output = args->no_prefix ? comm::RankOutput::kInherit : comm::RankOutput::kPrefix;
    opt.command = args->command;
    if (!args->devices.empty())
      for (long long d : cli::parse_int_list(args->devices, "--devices")) {
        FM_CHECK_ARG(d >= 0 && d < (1 << 20), "--devices: ", d, " is not a device index");
        opt.devices.push_back(static_cast<int>(d));
      }
    const comm::LaunchResult result = comm::launch(opt);
    if (result.ok()) return;
    std::fflush(stdout);
    std::fprintf(stderr, "fp8moe: launch failed: %s\n", result.error.c_str());
    std::fflush(stderr);
    // NOTE: the failing rank's own status is the job's exit code, which no exception can carry
    // through main.
    std::exit(result.exit_code());
  });
}

}  // namespace

FM_REGISTER_COMMAND("launch", "Start one process per GPU (ranks) of a command and supervise them",
                    setup_launch);
