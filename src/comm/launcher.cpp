// The one-process-per-GPU launcher and its rendezvous store (fp8moe/comm/launcher.h).
// Launch: resolve the executable and build every rank's argv/envp before fork (the child only
// calls async-signal-safe functions: the caller may have threads, e.g. CUDA's), start each rank in
// its own process group, then one loop polls the output pipes, reaps ranks and enforces the
// failure, timeout and interrupt rules. Store: a directory, one file per key, renamed into place.
// Test: build-launch/tests/test_comm --gtest_filter='Launcher*:Store*'
// (tests/comm/launcher_test.cpp).
#include "fp8moe/comm/launcher.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <sstream>
#include <thread>

#include "fp8moe/core/error.h"

extern char** environ;

namespace fp8moe::comm {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string format_seconds(double s) {
  std::ostringstream o;
  o << s;
  return o.str();
}

std::string errno_text(int err) {
  return std::strerror(err);
}

std::string signal_text(int sig) {
  const char* abbrev = sigabbrev_np(sig);
  return abbrev ? std::string("SIG") + abbrev : "unknown signal";
}

// ---- executable lookup (before fork: the child must not allocate) ----

bool is_executable_file(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(path.c_str(), X_OK) == 0;
}

std::string resolve_executable(const std::string& name) {
  FM_CHECK_ARG(!name.empty(), "launch: the command's executable is an empty string");
  if (name.find('/') != std::string::npos) {
    struct stat st;
    FM_CHECK_ARG(::stat(name.c_str(), &st) == 0, "launch: executable '", name, "' does not exist");
    FM_CHECK_ARG(S_ISREG(st.st_mode) && ::access(name.c_str(), X_OK) == 0, "launch: '", name,
                 "' is not an executable file");
    return name;
  }
  const char* path_env = std::getenv("PATH");
  const std::string path = path_env ? path_env : "/usr/local/bin:/usr/bin:/bin";
  size_t pos = 0;
  while (pos <= path.size()) {
    const size_t colon = path.find(':', pos);
    std::string dir =
        path.substr(pos, colon == std::string::npos ? std::string::npos : colon - pos);
    if (dir.empty()) dir = ".";
    const std::string candidate = dir + "/" + name;
    if (is_executable_file(candidate)) return candidate;
    if (colon == std::string::npos) break;
    pos = colon + 1;
  }
  FM_THROW(ErrorKind::kInvalidArgument, "launch: executable '", name, "' not found in PATH");
}

// ---- signals that end the launch (restored when launch() returns) ----

volatile std::sig_atomic_t g_interrupt = 0;
void on_interrupt(int sig) {
  g_interrupt = sig;
}

class InterruptGuard {
 public:
  InterruptGuard() {
    g_interrupt = 0;
    struct sigaction sa;
    std::memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_interrupt;
    sigemptyset(&sa.sa_mask);
    for (size_t i = 0; i < kSignals.size(); ++i) ::sigaction(kSignals[i], &sa, &old_[i]);
  }
  ~InterruptGuard() {
    for (size_t i = 0; i < kSignals.size(); ++i) ::sigaction(kSignals[i], &old_[i], nullptr);
  }
  InterruptGuard(const InterruptGuard&) = delete;
  InterruptGuard& operator=(const InterruptGuard&) = delete;

 private:
  static constexpr std::array<int, 3> kSignals = {SIGINT, SIGTERM, SIGHUP};
  std::array<struct sigaction, 3> old_{};
};

// ---- one rank's process and output ----

struct OutputPipe {
  int fd = -1;
  int stream = 1;
  std::string partial;
};

struct RankProc {
  RankExit exit;
  bool running = false;
  std::vector<std::string> argv_store, env_store;
  std::vector<char*> argv, envp;
  OutputPipe out[2];
};

void close_fd(int& fd) {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

std::vector<std::string> rank_environment(const LaunchOptions& opt, int rank,
                                          const std::string& store_dir) {
  std::vector<std::pair<std::string, std::string>> set = {
      {"FP8MOE_RANK", std::to_string(rank)},
      {"FP8MOE_WORLD_SIZE", std::to_string(opt.num_ranks)},
      {"FP8MOE_LOCAL_RANK", std::to_string(rank)},
      {"FP8MOE_LOCAL_WORLD_SIZE", std::to_string(opt.num_ranks)},
      {"FP8MOE_STORE", store_dir},
  };
  if (!opt.devices.empty())
    set.emplace_back("FP8MOE_DEVICE", std::to_string(opt.devices[rank % opt.devices.size()]));
  for (const auto& kv : opt.env) set.push_back(kv);
  // NOTE: NVLink multicast can take the host's GPUs out of service; a rank keeps it off unless
  // the user said otherwise.
  const std::pair<const char*, const char*> multicast_off[] = {
      {"NCCL_NVLS_ENABLE", "0"},
      {"TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"},
      {"NVSHMEM_DISABLE_NVLS", "1"}};
  for (const auto& [name, value] : multicast_off) {
    const bool given = std::getenv(name) != nullptr ||
                       std::any_of(opt.env.begin(), opt.env.end(),
                                   [&](const auto& kv) { return kv.first == name; });
    if (!given) set.emplace_back(name, value);
  }
  std::vector<std::string> env;
  for (char** e = environ; e && *e; ++e) {
    const std::string entry = *e;
    const std::string name = entry.substr(0, entry.find('='));
    const bool replaced =
        std::any_of(set.begin(), set.end(), [&](const auto& kv) { return kv.first == name; });
    if (!replaced) env.push_back(entry);
  }
  for (const auto& [name, value] : set) {
    // A later entry of `set` replaces an earlier one of the same name (opt.env over ours).
    env.erase(std::remove_if(env.begin(), env.end(),
                             [&](const std::string& e) { return e.rfind(name + "=", 0) == 0; }),
              env.end());
    env.push_back(name + "=" + value);
  }
  return env;
}

void make_pointer_array(std::vector<std::string>& strings, std::vector<char*>& ptrs) {
  ptrs.clear();
  for (auto& s : strings) ptrs.push_back(s.data());
  ptrs.push_back(nullptr);
}

// Between fork and exec: async-signal-safe calls only.
[[noreturn]] void exec_child(RankProc& p, const std::string& exe, int in_fd, int out_fd, int err_fd,
                             int status_fd, pid_t parent) {
  ::setpgid(0, 0);
  // The rank dies with the launcher, even a launcher killed by SIGKILL.
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) ::_exit(127);
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  if (in_fd >= 0 && ::dup2(in_fd, STDIN_FILENO) < 0) ::_exit(127);
  if (out_fd >= 0 && ::dup2(out_fd, STDOUT_FILENO) < 0) ::_exit(127);
  if (err_fd >= 0 && ::dup2(err_fd, STDERR_FILENO) < 0) ::_exit(127);
  ::execve(exe.c_str(), p.argv.data(), p.envp.data());
  const int err = errno;
  [[maybe_unused]] ssize_t n = ::write(status_fd, &err, sizeof(err));
  ::_exit(127);
}

void emit_line(const LaunchOptions& opt, int rank, int stream, std::string_view line) {
  if (opt.on_line) {
    opt.on_line(rank, stream, line);
    return;
  }
  std::string text = "[rank " + std::to_string(rank) + "] ";
  text.append(line);
  text.push_back('\n');
  const int fd = stream == 2 ? STDERR_FILENO : STDOUT_FILENO;
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
}

// Reads what is there; returns false at end of file (the pipe is then closed).
bool pump(const LaunchOptions& opt, int rank, OutputPipe& pipe) {
  char buf[65536];
  const ssize_t n = ::read(pipe.fd, buf, sizeof(buf));
  if (n < 0 && (errno == EINTR || errno == EAGAIN)) return true;
  if (n <= 0) {
    if (!pipe.partial.empty()) emit_line(opt, rank, pipe.stream, pipe.partial);
    pipe.partial.clear();
    close_fd(pipe.fd);
    return false;
  }
  pipe.partial.append(buf, static_cast<size_t>(n));
  size_t start = 0;
  for (size_t nl; (nl = pipe.partial.find('\n', start)) != std::string::npos; start = nl + 1)
    emit_line(opt, rank, pipe.stream, std::string_view(pipe.partial).substr(start, nl - start));
  pipe.partial.erase(0, start);
  return true;
}

// Removes a store directory the launcher made (flat: files only).
void remove_store(const std::string& dir) {
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

std::string make_store_dir() {
  const char* tmp = std::getenv("TMPDIR");
  std::string templ = std::string(tmp && *tmp ? tmp : "/tmp") + "/fp8moe-store-XXXXXX";
  if (!::mkdtemp(templ.data()))
    FM_THROW(ErrorKind::kIo, "launch: cannot create the store directory ", templ, ": ",
             errno_text(errno));
  return templ;
}

}  // namespace

int LaunchResult::exit_code() const {
  if (ok()) return 0;
  if (failed_rank >= 0 && failed_rank < static_cast<int>(ranks.size())) {
    const RankExit& e = ranks[failed_rank];
    if (e.exited && e.code != 0) return e.code;
  }
  return 1;
}

std::string describe(const RankExit& e) {
  std::string s = "rank " + std::to_string(e.rank);
  if (e.exited) return s + " exited with status " + std::to_string(e.code);
  return s + " was killed by signal " + std::to_string(e.signal) + " (" + signal_text(e.signal) +
         ")";
}

LaunchResult launch(const LaunchOptions& opt) {
  FM_CHECK_ARG(opt.num_ranks >= 1, "launch: the number of ranks must be at least 1, got ",
               opt.num_ranks);
  FM_CHECK_ARG(!opt.command.empty(), "launch: no command to run");
  FM_CHECK_ARG(opt.timeout_s >= 0, "launch: timeout ", opt.timeout_s, " s is negative");
  FM_CHECK_ARG(opt.grace_s >= 0, "launch: grace period ", opt.grace_s, " s is negative");
  for (int d : opt.devices) FM_CHECK_ARG(d >= 0, "launch: device ", d, " is negative");
  const std::string exe = resolve_executable(opt.command[0]);

  const bool own_store = opt.store_dir.empty();
  std::string store_dir = opt.store_dir;
  if (own_store) {
    store_dir = make_store_dir();
  } else {
    std::error_code ec;
    std::filesystem::create_directories(store_dir, ec);
    FM_CHECK_ARG(std::filesystem::is_directory(store_dir), "launch: store directory '", store_dir,
                 "' cannot be created");
  }
  store_dir = std::filesystem::absolute(store_dir).string();

  const int R = opt.num_ranks;
  std::vector<RankProc> procs(R);
  for (int r = 0; r < R; ++r) {
    RankProc& p = procs[r];
    p.exit.rank = r;
    p.argv_store = opt.command;
    p.env_store = rank_environment(opt, r, store_dir);
    make_pointer_array(p.argv_store, p.argv);
    make_pointer_array(p.env_store, p.envp);
  }

  InterruptGuard interrupt_guard;
  LaunchResult result;
  const Clock::time_point t0 = Clock::now();
  bool terminating = false;
  Clock::time_point kill_at{};
  auto terminate_all = [&] {
    if (terminating) return;
    terminating = true;
    kill_at = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                 std::chrono::duration<double>(opt.grace_s));
    for (RankProc& p : procs)
      if (p.running) {
        p.exit.terminated = true;
        ::kill(-p.exit.pid, SIGTERM);
      }
  };
  auto reap = [&](RankProc& p, int status) {
    p.running = false;
    p.exit.seconds = seconds_since(t0);
    p.exit.exited = WIFEXITED(status);
    p.exit.code = p.exit.exited ? WEXITSTATUS(status) : 0;
    p.exit.signal = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
    const bool failed = !p.exit.exited || p.exit.code != 0;
    if (failed && !p.exit.terminated && result.error.empty()) {
      result.failed_rank = p.exit.rank;
      result.error = describe(p.exit);
    }
    if (failed) terminate_all();
  };

  // ---- start every rank ----
  const pid_t self = ::getpid();
  // NOTE: a rank has its own process group, so a rank reading the terminal would be stopped
  // (SIGTTIN) and hang the job: ranks read /dev/null.
  int null_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  for (int r = 0; r < R; ++r) {
    RankProc& p = procs[r];
    int out_pipe[2] = {-1, -1}, err_pipe[2] = {-1, -1}, status_pipe[2] = {-1, -1};
    // An executable the kernel refuses is bad input (kInvalidArgument); a pipe or fork the system
    // refuses is not (kRuntime).
    auto fail_start = [&](ErrorKind kind, const std::string& what) {
      for (int* fds : {out_pipe, err_pipe, status_pipe}) {
        close_fd(fds[0]);
        close_fd(fds[1]);
      }
      terminate_all();
      for (RankProc& q : procs) {
        if (!q.running) continue;
        int st = 0;
        ::kill(-q.exit.pid, SIGKILL);
        ::waitpid(q.exit.pid, &st, 0);
        q.running = false;
        for (auto& o : q.out) close_fd(o.fd);
      }
      close_fd(null_fd);
      if (own_store) remove_store(store_dir);
      FM_THROW(kind, "launch: rank ", r, ": ", what);
    };
    const bool prefix = opt.output == RankOutput::kPrefix;
    if (prefix && (::pipe2(out_pipe, O_CLOEXEC) != 0 || ::pipe2(err_pipe, O_CLOEXEC) != 0))
      fail_start(ErrorKind::kRuntime, "cannot create output pipes: " + errno_text(errno));
    if (::pipe2(status_pipe, O_CLOEXEC) != 0)
      fail_start(ErrorKind::kRuntime, "cannot create a pipe: " + errno_text(errno));
    const pid_t pid = ::fork();
    if (pid < 0) fail_start(ErrorKind::kRuntime, "fork failed: " + errno_text(errno));
    if (pid == 0) exec_child(p, exe, null_fd, out_pipe[1], err_pipe[1], status_pipe[1], self);
    ::setpgid(pid, pid);  // also here: no window in which a kill of the group misses it
    p.exit.pid = pid;
    p.running = true;
    close_fd(out_pipe[1]);
    close_fd(err_pipe[1]);
    close_fd(status_pipe[1]);
    int child_errno = 0;
    ssize_t n;
    do {
      n = ::read(status_pipe[0], &child_errno, sizeof(child_errno));
    } while (n < 0 && errno == EINTR);
    close_fd(status_pipe[0]);
    if (n == static_cast<ssize_t>(sizeof(child_errno))) {
      int st = 0;
      ::waitpid(pid, &st, 0);
      p.running = false;
      close_fd(out_pipe[0]);
      close_fd(err_pipe[0]);
      fail_start(ErrorKind::kInvalidArgument,
                 "cannot execute '" + exe + "': " + errno_text(child_errno));
    }
    p.out[0] = {out_pipe[0], 1, {}};
    p.out[1] = {err_pipe[0], 2, {}};
    for (auto& o : p.out)
      if (o.fd >= 0) ::fcntl(o.fd, F_SETFL, ::fcntl(o.fd, F_GETFL) | O_NONBLOCK);
  }

  close_fd(null_fd);

  // ---- supervise ----
  std::optional<Clock::time_point> all_exited_at;
  while (true) {
    std::vector<pollfd> fds;
    std::vector<std::pair<int, int>> who;  // (rank, pipe)
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 2; ++i)
        if (procs[r].out[i].fd >= 0) {
          fds.push_back({procs[r].out[i].fd, POLLIN, 0});
          who.emplace_back(r, i);
        }
    const bool any_running =
        std::any_of(procs.begin(), procs.end(), [](const RankProc& p) { return p.running; });
    if (!any_running) {
      // NOTE: a rank's own children may hold its pipes open; give them a moment, not forever.
      if (!all_exited_at) all_exited_at = Clock::now();
      if (fds.empty() || Clock::now() - *all_exited_at > std::chrono::milliseconds(500)) break;
    }
    if (!fds.empty()) {
      const int ready = ::poll(fds.data(), fds.size(), 10);
      if (ready > 0)
        for (size_t i = 0; i < fds.size(); ++i)
          if (fds[i].revents & (POLLIN | POLLHUP | POLLERR))
            pump(opt, who[i].first, procs[who[i].first].out[who[i].second]);
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    for (RankProc& p : procs) {
      if (!p.running) continue;
      int status = 0;
      const pid_t got = ::waitpid(p.exit.pid, &status, WNOHANG);
      if (got == p.exit.pid) reap(p, status);
    }
    if (g_interrupt && !terminating) {
      result.error = "interrupted by " + signal_text(g_interrupt) + "; ranks terminated";
      terminate_all();
    }
    if (opt.timeout_s > 0 && !terminating && seconds_since(t0) > opt.timeout_s) {
      std::string running;
      for (const RankProc& p : procs)
        if (p.running) running += (running.empty() ? "" : ", ") + std::to_string(p.exit.rank);
      result.timed_out = true;
      result.error = "timed out after " + format_seconds(opt.timeout_s) + " s with rank(s) " +
                     running + " still running";
      terminate_all();
    }
    if (terminating && Clock::now() >= kill_at)
      for (RankProc& p : procs)
        if (p.running) ::kill(-p.exit.pid, SIGKILL);
  }
  for (RankProc& p : procs)
    for (auto& o : p.out) close_fd(o.fd);
  for (RankProc& p : procs) result.ranks.push_back(p.exit);
  if (own_store) remove_store(store_dir);
  return result;
}

// ---- inside a rank ----

namespace {

int env_int(const char* name, bool required, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) {
    FM_CHECK_ARG(!required, name,
                 " is not set: start this program with `fp8moe launch -n R -- ...`");
    return fallback;
  }
  char* end = nullptr;
  errno = 0;
  const long x = std::strtol(v, &end, 10);
  FM_CHECK_ARG(errno == 0 && end && *end == '\0' && x >= 0 && x < (1L << 30), name, "='", v,
               "' is not a non-negative integer");
  return static_cast<int>(x);
}

}  // namespace

bool launched_as_rank() {
  const char* v = std::getenv("FP8MOE_RANK");
  return v && *v;
}

RankEnv rank_env() {
  RankEnv e;
  e.rank = env_int("FP8MOE_RANK", true, 0);
  e.world_size = env_int("FP8MOE_WORLD_SIZE", true, 1);
  FM_CHECK_ARG(e.world_size >= 1 && e.rank < e.world_size, "FP8MOE_RANK=", e.rank,
               " is not below FP8MOE_WORLD_SIZE=", e.world_size);
  e.local_rank = env_int("FP8MOE_LOCAL_RANK", false, e.rank);
  e.local_world_size = env_int("FP8MOE_LOCAL_WORLD_SIZE", false, e.world_size);
  e.device = env_int("FP8MOE_DEVICE", false, -1);
  const char* store = std::getenv("FP8MOE_STORE");
  e.store_dir = store ? store : "";
  return e;
}

int rank_device(const RankEnv& env, int device_count) {
  if (env.device >= 0) {
    FM_CHECK_ARG(env.device < device_count, "rank ", env.rank, ": FP8MOE_DEVICE=", env.device,
                 " but only ", device_count, " device(s) are visible");
    return env.device;
  }
  FM_CHECK_ARG(device_count >= 1, "rank ", env.rank, ": no device visible");
  return env.local_rank % device_count;
}

// ---- store ----

namespace {

// Keys become file names: letters, digits, '.', '_' and '-' stay, every other byte is %XX.
std::string escape_key(std::string_view key) {
  static const char* hex = "0123456789ABCDEF";
  std::string out;
  for (const unsigned char c : key) {
    if (std::isalnum(c) || c == '.' || c == '_' || c == '-') {
      out.push_back(static_cast<char>(c));
    } else {
      out.push_back('%');
      out.push_back(hex[c >> 4]);
      out.push_back(hex[c & 15]);
    }
  }
  return out;
}

// Polls with a growing pause: a rendezvous is rare, but its waits should end within a ms or two.
class Backoff {
 public:
  void wait() {
    std::this_thread::sleep_for(std::chrono::microseconds(us_));
    us_ = std::min(us_ * 2, 2000);
  }

 private:
  int us_ = 50;
};

}  // namespace

Store::Store(std::string dir, int rank, int world_size)
    : dir_(std::move(dir)), rank_(rank), world_(world_size) {
  FM_CHECK_ARG(!dir_.empty(), "store: empty directory name");
  FM_CHECK_ARG(world_size >= 1 && rank >= 0 && rank < world_size, "store: rank ", rank,
               " of world size ", world_size);
  FM_CHECK_ARG(std::filesystem::is_directory(dir_), "store: '", dir_, "' is not a directory");
}

Store Store::from_env() {
  const RankEnv e = rank_env();
  FM_CHECK_ARG(!e.store_dir.empty(),
               "FP8MOE_STORE is not set: start this program with `fp8moe launch -n R -- ...`");
  return Store(e.store_dir, e.rank, e.world_size);
}

std::string Store::path_of(std::string_view key) const {
  FM_CHECK_ARG(!key.empty(), "store: empty key");
  std::string name = escape_key(key);
  FM_CHECK_ARG(name.size() <= 200, "store: key '", key, "' is too long");
  return dir_ + "/k." + name;
}

void Store::set(std::string_view key, std::string_view value) {
  const std::string path = path_of(key);
  const std::string tmp = dir_ + "/.tmp." + std::to_string(rank_) + "." +
                          std::to_string(::getpid()) + "." + std::to_string(writes_++);
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0)
    FM_THROW(ErrorKind::kIo, "rank ", rank_, ": store: cannot create ", tmp, ": ",
             errno_text(errno));
  size_t done = 0;
  while (done < value.size()) {
    const ssize_t n = ::write(fd, value.data() + done, value.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      FM_THROW(ErrorKind::kIo, "rank ", rank_, ": store: writing key '", key,
               "' failed: ", errno_text(err));
    }
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    FM_THROW(ErrorKind::kIo, "rank ", rank_, ": store: publishing key '", key,
             "' failed: ", errno_text(err));
  }
}

bool Store::try_get(std::string_view key, std::string* value) const {
  const std::string path = path_of(key);
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return false;
    FM_THROW(ErrorKind::kIo, "rank ", rank_, ": store: cannot open key '", key,
             "': ", errno_text(errno));
  }
  std::string data;
  char buf[65536];
  while (true) {
    const ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      FM_THROW(ErrorKind::kIo, "rank ", rank_, ": store: reading key '", key,
               "' failed: ", errno_text(err));
    }
    if (n == 0) break;
    data.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  if (value) *value = std::move(data);
  return true;
}

std::string Store::get(std::string_view key, double timeout_s) const {
  const Clock::time_point t0 = Clock::now();
  std::string value;
  Backoff backoff;
  while (!try_get(key, &value)) {
    if (seconds_since(t0) > timeout_s)
      FM_THROW(ErrorKind::kRuntime, "rank ", rank_, ": store key '", key, "' not set within ",
               format_seconds(timeout_s), " s (store ", dir_, ")");
    backoff.wait();
  }
  return value;
}

std::vector<std::string> Store::all_gather(std::string_view key, std::string_view value,
                                           double timeout_s) {
  const Clock::time_point t0 = Clock::now();
  const std::string prefix = std::string(key) + "/";
  set(prefix + std::to_string(rank_), value);
  std::vector<std::string> out(world_);
  for (int r = 0; r < world_; ++r) {
    const double left = std::max(0.0, timeout_s - seconds_since(t0));
    out[r] = r == rank_ ? std::string(value) : get(prefix + std::to_string(r), left);
  }
  return out;
}

void Store::barrier(std::string_view name, double timeout_s) {
  const Clock::time_point t0 = Clock::now();
  auto it = std::find_if(barrier_rounds_.begin(), barrier_rounds_.end(),
                         [&](const auto& b) { return b.first == name; });
  if (it == barrier_rounds_.end()) {
    barrier_rounds_.emplace_back(std::string(name), 0);
    it = barrier_rounds_.end() - 1;
  }
  const uint64_t round = ++it->second;
  const std::string prefix = "barrier/" + std::string(name) + "/" + std::to_string(round) + "/";
  set(prefix + std::to_string(rank_), "");
  std::vector<bool> arrived(world_, false);
  arrived[rank_] = true;
  Backoff backoff;
  while (true) {
    bool all = true;
    for (int r = 0; r < world_; ++r) {
      if (!arrived[r]) arrived[r] = try_get(prefix + std::to_string(r), nullptr);
      all = all && arrived[r];
    }
    if (all) return;
    if (seconds_since(t0) > timeout_s) {
      std::string missing;
      for (int r = 0; r < world_; ++r)
        if (!arrived[r]) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
      FM_THROW(ErrorKind::kRuntime, "rank ", rank_, ": barrier '", name, "' (round ", round,
               ") timed out after ", format_seconds(timeout_s), " s waiting for rank(s) ", missing);
    }
    backoff.wait();
  }
}

}  // namespace fp8moe::comm
