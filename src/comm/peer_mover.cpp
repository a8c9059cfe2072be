// The movers' names and limits (peer_mover.h): host code, tested on the CPU
// (tests/comm/peer_mover_test.cpp); the kernels are in sm90_peer_mover.cu.
#include "fp8moe/comm/peer_mover.h"

#include <cstdlib>
#include <string_view>
#include <vector>

#include "fp8moe/core/error.h"

namespace fp8moe::comm {
namespace {

struct KindName {
  MoverKind kind;
  const char* name;
};
constexpr KindName kKinds[] = {{MoverKind::kCopyEngine, "ce"},   {MoverKind::kSmPush, "st"},
                               {MoverKind::kSmPull, "ld"},       {MoverKind::kBulkPush, "bulkst"},
                               {MoverKind::kBulkPull, "bulkld"}, {MoverKind::kStagedPush, "stage"}};
constexpr const char* kLoadHints[] = {"nc", "cg", "cs", "na"};
constexpr const char* kStoreHints[] = {"wb", "cs", "wt", "na"};

bool is_sm(MoverKind k) {
  return k == MoverKind::kSmPush || k == MoverKind::kSmPull;
}
bool is_bulk(MoverKind k) {
  return k == MoverKind::kBulkPush || k == MoverKind::kBulkPull || k == MoverKind::kStagedPush;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  size_t at = 0;
  for (;;) {
    const size_t next = s.find(sep, at);
    parts.push_back(s.substr(at, next == std::string::npos ? std::string::npos : next - at));
    if (next == std::string::npos) return parts;
    at = next + 1;
  }
}

int64_t number(const std::string& name, const std::string& field) {
  const std::string digits = field.substr(1);
  char* end = nullptr;
  const long long v = digits.empty() ? -1 : std::strtoll(digits.c_str(), &end, 10);
  FM_CHECK_ARG(!digits.empty() && end && *end == '\0' && v >= 0, "mover '", name, "': field '",
               field, "' needs a non-negative number after '", field[0], "'");
  return v;
}

template <class Hint, size_t N>
Hint hint(const std::string& name, const std::string& field, const char* const (&names)[N]) {
  const std::string v = field.substr(1);
  for (size_t i = 0; i < N; ++i)
    if (v == names[i]) return static_cast<Hint>(i);
  FM_THROW(ErrorKind::kInvalidArgument, "mover '", name, "': unknown ",
           field[0] == 'l' ? "load" : "store", " hint '", v, "'");
}

}  // namespace

MoverConfig parse_mover(const std::string& name) {
  const std::vector<std::string> fields = split(name, ':');
  MoverConfig c;
  bool known = false;
  for (const auto& k : kKinds)
    if (fields[0] == k.name) c.kind = k.kind, known = true;
  FM_CHECK_ARG(known, "mover '", name, "': unknown kind '", fields[0],
               "' (ce, st, ld, bulkst, bulkld, stage)");
  for (size_t i = 1; i < fields.size(); ++i) {
    const std::string& f = fields[i];
    FM_CHECK_ARG(!f.empty(), "mover '", name, "': empty field");
    switch (f[0]) {
      case 'b':
        c.blocks = static_cast<int>(number(name, f));
        break;
      case 'w':
        c.warps = static_cast<int>(number(name, f));
        break;
      case 'u':
        c.unroll = static_cast<int>(number(name, f));
        break;
      case 'c':
        c.chunk = number(name, f);
        break;
      case 'o':
        c.op_bytes = number(name, f);
        break;
      case 'd':
        c.stages = static_cast<int>(number(name, f));
        break;
      case 'l':
        c.load = hint<LoadHint>(name, f, kLoadHints);
        break;
      case 's':
        c.store = hint<StoreHint>(name, f, kStoreHints);
        break;
      default:
        FM_THROW(ErrorKind::kInvalidArgument, "mover '", name, "': unknown field '", f,
                 "' (b, w, u, c, o, d, l, s)");
    }
  }
  return c;
}

std::string mover_name(const MoverConfig& c) {
  std::string s;
  for (const auto& k : kKinds)
    if (k.kind == c.kind) s = k.name;
  if (c.kind == MoverKind::kCopyEngine) return s;
  s += ":b" + std::to_string(c.blocks) + ":w" + std::to_string(c.warps);
  if (is_sm(c.kind) || c.kind == MoverKind::kStagedPush) s += ":u" + std::to_string(c.unroll);
  s += ":c" + std::to_string(c.chunk);
  if (is_bulk(c.kind)) s += ":o" + std::to_string(c.op_bytes) + ":d" + std::to_string(c.stages);
  if (is_sm(c.kind) || c.kind == MoverKind::kStagedPush)
    s += std::string(":l") + kLoadHints[static_cast<int>(c.load)];
  if (is_sm(c.kind)) s += std::string(":s") + kStoreHints[static_cast<int>(c.store)];
  return s;
}

bool mover_runs_on_destination(const MoverConfig& c) {
  return c.kind == MoverKind::kSmPull || c.kind == MoverKind::kBulkPull;
}

int64_t mover_smem_bytes(const MoverConfig& c) {
  if (!is_bulk(c.kind)) return 0;
  // NOTE: the mbarriers first (8 bytes per slot, 128-byte aligned block), then the slots.
  const int64_t bars = (static_cast<int64_t>(c.warps) * c.stages * 8 + 127) / 128 * 128;
  return bars + static_cast<int64_t>(c.warps) * c.stages * c.op_bytes;
}

void validate_mover(const MoverConfig& c, int64_t bytes) {
  const std::string n = mover_name(c);
  FM_CHECK_ARG(bytes >= 0 && bytes % 16 == 0, "mover ", n, ": ", bytes,
               " bytes is not a multiple of 16");
  if (c.kind == MoverKind::kCopyEngine) return;
  FM_CHECK_ARG(c.blocks >= 1 && c.blocks <= 4096, "mover ", n, ": blocks=", c.blocks,
               " outside 1..4096");
  FM_CHECK_ARG(c.warps >= 1 && c.warps <= 32, "mover ", n, ": warps=", c.warps, " outside 1..32");
  FM_CHECK_ARG(c.chunk % 16 == 0, "mover ", n, ": chunk=", c.chunk, " is not a multiple of 16");
  if (is_sm(c.kind) || c.kind == MoverKind::kStagedPush)
    FM_CHECK_ARG(c.unroll == 1 || c.unroll == 2 || c.unroll == 4 || c.unroll == 8, "mover ", n,
                 ": unroll=", c.unroll, " is not 1, 2, 4 or 8");
  if (!is_bulk(c.kind)) return;
  FM_CHECK_ARG(c.op_bytes >= 16 && c.op_bytes % 16 == 0 && c.op_bytes <= (1 << 20), "mover ", n,
               ": op_bytes=", c.op_bytes, " is not a multiple of 16 in 16..1048576");
  FM_CHECK_ARG(c.stages >= 2 && c.stages <= 8, "mover ", n, ": stages=", c.stages, " outside 2..8");
  FM_CHECK_ARG(mover_smem_bytes(c) <= kMaxMoverSmem, "mover ", n, ": ", mover_smem_bytes(c),
               " bytes of shared memory (warps x stages x op_bytes) exceed ", kMaxMoverSmem);
}

}  // namespace fp8moe::comm
