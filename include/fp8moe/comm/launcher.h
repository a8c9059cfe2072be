// One process per GPU on one host: a launcher that starts R ranks of a command, supervises them
// and ends the whole job when one fails, and a rendezvous store through which the ranks exchange
// bytes (CUDA IPC handles, the NCCL unique id) and meet at barriers.
//
// Environment of rank r (set by launch(); read by rank_env()):
//   FP8MOE_RANK=r  FP8MOE_WORLD_SIZE=R  FP8MOE_LOCAL_RANK=r  FP8MOE_LOCAL_WORLD_SIZE=R
//   FP8MOE_STORE=<directory of the store>  FP8MOE_DEVICE=<device> (only with a devices list;
//   otherwise the rank uses local_rank % device count, see rank_device())
//   NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 unless already
//   set (NVLink multicast stays off). CUDA_VISIBLE_DEVICES is passed on untouched.
// Each rank runs in its own process group with stdin on /dev/null and dies with the launcher.
//
// The store is a directory of files, one per key, each written to a temporary name and renamed
// into place, so a reader sees a whole value or none. It needs no server and outlives any rank,
// so a rank that dies cannot take the rendezvous down with it; the launcher makes a fresh one per
// launch and removes it at the end. Ranks started by another launcher (mpirun) can use it too:
// point FP8MOE_STORE at an empty directory of the host and set the FP8MOE_* variables.
//
// Tested in tests/comm/launcher_test.cpp (CPU) and tests/comm/device_ep_multiprocess_gpu_test.cu.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace fp8moe::comm {

// ---- launching ----

enum class RankOutput {
  kPrefix,   // every line of a rank's stdout/stderr goes out as "[rank r] line"
  kInherit,  // ranks write straight to the launcher's stdout/stderr
};

struct LaunchOptions {
  int num_ranks = 1;
  std::vector<std::string> command;  // executable (a path, or a name looked up in PATH) and args
  std::vector<int> devices;          // rank r gets devices[r % size]; empty: rank_device() picks
  double timeout_s = 0;              // whole job; 0 = none
  double grace_s = 3;                // after SIGTERM, ranks still alive get SIGKILL
  RankOutput output = RankOutput::kPrefix;
  // kPrefix: where each complete line goes (stream 1 = stdout, 2 = stderr; line without '\n').
  // Unset: "[rank r] line\n" is written to the launcher's stdout/stderr.
  std::function<void(int rank, int stream, std::string_view line)> on_line;
  std::vector<std::pair<std::string, std::string>> env;  // added to (or replacing in) every rank's
  std::string store_dir;  // empty: a fresh temporary directory, removed at the end
};

struct RankExit {
  int rank = 0;
  pid_t pid = 0;
  bool exited = false;      // exited normally with `code`
  int code = 0;             // exit status (exited)
  int signal = 0;           // terminating signal (!exited)
  bool terminated = false;  // ended by the launcher (another rank failed, timeout, interrupt)
  double seconds = 0;       // from start to exit
};

struct LaunchResult {
  std::vector<RankExit> ranks;
  int failed_rank = -1;  // the first rank that failed on its own; -1 if none (or a timeout)
  bool timed_out = false;
  std::string error;  // one line, empty on success
  bool ok() const { return error.empty(); }
  // 0 on success, the failing rank's exit status if it exited non-zero, 1 otherwise.
  int exit_code() const;
};

// "rank 1 exited with status 3" / "rank 1 was killed by signal 9 (SIGKILL)".
std::string describe(const RankExit& e);

// Starts options.num_ranks processes of options.command and waits for all of them. When a rank
// exits non-zero or is killed by a signal, the others are sent SIGTERM (their process groups),
// then SIGKILL after grace_s; the result names the rank and its status. Never throws for a
// failing rank; throws fp8moe::Error (kInvalidArgument) on bad options: num_ranks < 1, an empty
// command, an executable that does not exist or cannot be executed, a device < 0.
LaunchResult launch(const LaunchOptions& options);

// ---- inside a rank ----

struct RankEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;
  int device = -1;  // FP8MOE_DEVICE, -1 when not given
  std::string store_dir;
};
// True when FP8MOE_RANK is set (this process was started as a rank).
bool launched_as_rank();
// The FP8MOE_* variables; kInvalidArgument naming the variable if missing or malformed.
RankEnv rank_env();
// The device this rank drives: FP8MOE_DEVICE when given, else local_rank % device_count.
int rank_device(const RankEnv& env, int device_count);

// A rendezvous store shared by the ranks of one job. Values are arbitrary bytes; keys are any
// string. Every wait is bounded, and its error names the rank, the key or barrier and what it
// waited for.
class Store {
 public:
  Store(std::string dir, int rank, int world_size);
  // The store of this rank's job (rank_env()).
  static Store from_env();

  int rank() const { return rank_; }
  int world_size() const { return world_; }
  const std::string& dir() const { return dir_; }

  // Sets (or replaces) a key; readers see the old value or the new one, never a part.
  void set(std::string_view key, std::string_view value);
  // Waits until the key exists; kRuntime after timeout_s: "rank R: store key 'K' not set within
  // S s (store DIR)".
  std::string get(std::string_view key, double timeout_s = 60) const;
  // Without waiting: false if the key is not set.
  bool try_get(std::string_view key, std::string* value) const;
  // Every rank calls with its own value; returns all ranks' values, index = rank.
  std::vector<std::string> all_gather(std::string_view key, std::string_view value,
                                      double timeout_s = 60);
  // Returns once every rank has called barrier(name) as often as this one. kRuntime after
  // timeout_s naming the barrier and the ranks that did not arrive.
  void barrier(std::string_view name = "barrier", double timeout_s = 60);

 private:
  std::string path_of(std::string_view key) const;
  std::string dir_;
  int rank_ = 0;
  int world_ = 1;
  uint64_t writes_ = 0;
  std::vector<std::pair<std::string, uint64_t>> barrier_rounds_;
};

}  // namespace fp8moe::comm
