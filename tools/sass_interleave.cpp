// Post-compile step for the sm_90a FP8 GEMMs: rewrites the scheduling hints of the promotion FFMAs
// in the compiled kernels, in place, by flipping bits of the SASS (no instruction moves, so the
// object keeps its size and the CUDA runtime loads it as before).
// Checked by `fp8moe_sass_interleave --self-test` (ctest tools.sass_interleave, a synthetic cubin)
// and on the device by diffing `cuobjdump -sass` before and after (dev/gemm/NOTES.md, session 3).
//
// Why: the promotion (64 FFMAs per thread per K block at 128x128) runs while the next block's
// wgmmas are in flight; ncu put 16% of the math warps' stall samples in dispatch stalls on those
// FFMAs. The yield hint lets the scheduler switch to the other math warpgroup between two FFMAs,
// so that its wgmma issue is not held behind a run of FFMAs. DeepGEMM (README, "FFMA SASS
// interleaving") reported 10%+ from setting the yield hint on part of these FFMAs; nvcc >= 12.9
// already alternates it (every other FFMA yields in the two-warpgroup kernels), so the modes below
// go further than the compiler or remove its pattern, for an A/B on the device. Measured on H200
// (dev/gemm/NOTES.md, session 3): all -3.3%, head -2.5%, none -6.8% against nvcc 13.0's own
// pattern, so the build step is off by default (FP8MOE_GEMM_SASS_INTERLEAVE).
//
// sm_90 encoding used here (128-bit instructions, two little-endian 64-bit words lo, hi):
//   lo[11:0] opcode (0x223: FFMA Rd, Ra, Rb, Rc), lo[15:12] guard predicate (7 = always);
//   hi[44:41] stall cycles, hi[45] yield (0 = may switch warps after this instruction),
//   hi[48:46] write barrier, hi[51:49] read barrier, hi[57:52] wait mask, hi[61:58] operand reuse.
// A register kept in the reuse cache across a warp switch is not valid, so an FFMA that gets the
// yield hint also loses its reuse bits (a later read then comes from the register file).
//
// Usage: fp8moe_sass_interleave [--mode all|head|none] [--kernel SUBSTR] [--min-run N]
//                               [--dry-run] FILE...
//   FILE: a host object, static library or executable with the fatbin embedded uncompressed
//   (nvcc --no-compress), or a bare cubin. Every embedded sm_90 cubin is scanned; kernels whose
//   (mangled) name contains SUBSTR (default fp8_gemm_kernel) are patched.
//   all:  every FFMA of a promotion run yields;  head: the first 9/16 of each run yields, the rest
//   keeps the compiler's pattern;  none: no FFMA of a run yields (the compiler's pattern removed).
//   Applying a mode twice changes nothing the second time.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr uint64_t kYieldBit = uint64_t{1} << 45;
constexpr uint64_t kReuseBits = uint64_t{0xf} << 58;
constexpr uint16_t kEmCuda = 190;

enum class Mode { kAll, kHead, kNone };

struct Options {
  Mode mode = Mode::kAll;
  std::string kernel = "fp8_gemm_kernel";
  int min_run = 16;  // a 64-wide tile's promotion is 32 FFMAs a thread, 128-wide 64
  int max_gap = 4;   // other instructions allowed between two FFMAs of one run
  bool dry_run = false;
};

struct Stats {
  int cubins = 0, kernels = 0, runs = 0, ffmas = 0, changed = 0;
};

uint64_t load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;  // the build and device machines are little-endian, as the encoding
}
void store64(uint8_t* p, uint64_t v) {
  std::memcpy(p, &v, 8);
}
template <typename T>
T load(const std::vector<uint8_t>& b, size_t off) {
  if (off + sizeof(T) > b.size()) throw std::runtime_error("truncated ELF");
  T v;
  std::memcpy(&v, b.data() + off, sizeof(T));
  return v;
}

bool is_ffma_rrr(uint64_t lo) {
  return (lo & 0xffff) == 0x7223;  // opcode 0x223, predicate PT (unguarded)
}

// New hi word of an FFMA that should (or should not) yield; other bits untouched.
uint64_t with_yield(uint64_t hi, bool yield) {
  if (yield) return (hi & ~kYieldBit) & ~kReuseBits;
  return hi | kYieldBit;
}

// Patches one kernel's instructions [text, text + size).
void patch_text(uint8_t* text, size_t size, const Options& opt, Stats& st) {
  const size_t n = size / 16;
  std::vector<size_t> ffma;
  for (size_t i = 0; i < n; ++i)
    if (is_ffma_rrr(load64(text + 16 * i))) ffma.push_back(i);
  // Runs: FFMAs at most max_gap other instructions apart.
  size_t a = 0;
  while (a < ffma.size()) {
    size_t b = a + 1;
    while (b < ffma.size() && ffma[b] - ffma[b - 1] <= size_t(opt.max_gap) + 1) ++b;
    const size_t len = b - a;
    if (len >= size_t(opt.min_run)) {
      ++st.runs;
      st.ffmas += int(len);
      const size_t head = len * 9 / 16;
      for (size_t j = 0; j < len; ++j) {
        uint8_t* ins = text + 16 * ffma[a + j];
        const uint64_t hi = load64(ins + 8);
        uint64_t nh = hi;
        if (opt.mode == Mode::kAll || (opt.mode == Mode::kHead && j < head))
          nh = with_yield(hi, true);
        else if (opt.mode == Mode::kNone)
          nh = with_yield(hi, false);
        if (nh != hi) {
          ++st.changed;
          if (!opt.dry_run) store64(ins + 8, nh);
        }
      }
    }
    a = b;
  }
}

// One cubin (ELF64, EM_CUDA) at offset `base` of `buf`. False when the bytes there only look
// like an ELF header (the scan below tries every offset).
bool patch_cubin(std::vector<uint8_t>& buf, size_t base, const Options& opt, Stats& st) {
  const uint64_t shoff = load<uint64_t>(buf, base + 0x28);
  const uint16_t shentsize = load<uint16_t>(buf, base + 0x3a);
  const uint16_t shnum = load<uint16_t>(buf, base + 0x3c);
  const uint16_t shstrndx = load<uint16_t>(buf, base + 0x3e);
  if (shentsize != 64 || shnum == 0 || shstrndx >= shnum || shoff > buf.size() - base ||
      uint64_t{shnum} * 64 > buf.size() - base - shoff)
    return false;
  const auto sh = [&](int i) { return base + shoff + size_t(i) * 64; };
  const uint64_t strtab = base + load<uint64_t>(buf, sh(shstrndx) + 0x18);
  if (strtab >= buf.size()) return false;
  ++st.cubins;
  for (int i = 0; i < shnum; ++i) {
    const uint32_t name_off = load<uint32_t>(buf, sh(i));
    const uint64_t off = load<uint64_t>(buf, sh(i) + 0x18);
    const uint64_t size = load<uint64_t>(buf, sh(i) + 0x20);
    if (strtab + name_off >= buf.size()) throw std::runtime_error("cubin: bad section name");
    const char* name = reinterpret_cast<const char*>(buf.data() + strtab + name_off);
    const size_t name_len = strnlen(name, buf.size() - (strtab + name_off));
    const std::string sec(name, name_len);
    if (sec.rfind(".text.", 0) != 0 || sec.find(opt.kernel) == std::string::npos) continue;
    if (off > buf.size() - base || size > buf.size() - base - off || size % 16 != 0)
      throw std::runtime_error("cubin: section " + sec + " out of range");
    ++st.kernels;
    patch_text(buf.data() + base + off, size, opt, st);
  }
  return true;
}

// Every embedded sm_90 cubin of a host object, static library or executable, or the file itself
// if it is one. Every byte offset is tried: inside an ar archive a member (and so its fatbin)
// starts at any even offset.
Stats patch_buffer(std::vector<uint8_t>& buf, const Options& opt) {
  Stats st;
  static const uint8_t kMagic[6] = {0x7f, 'E', 'L', 'F', 2, 1};  // ELF64, little-endian
  for (size_t off = 0; off + 64 <= buf.size(); ++off) {
    const uint8_t* hit =
        static_cast<const uint8_t*>(std::memchr(buf.data() + off, 0x7f, buf.size() - 64 - off + 1));
    if (hit == nullptr) break;
    off = size_t(hit - buf.data());
    if (std::memcmp(hit, kMagic, 6) != 0) continue;
    if (load<uint16_t>(buf, off + 0x12) != kEmCuda) continue;
    const uint32_t flags = load<uint32_t>(buf, off + 0x30);
    // NOTE: the SM version sits in bits 15:8 of e_flags in the cubins nvcc 13 writes
    // (0x0a005a04 for sm_90a), in bits 7:0 in older ones; other architectures' encodings
    // differ, so their cubins are left alone.
    if (((flags >> 8) & 0xff) != 90 && (flags & 0xff) != 90) continue;
    patch_cubin(buf, off, opt, st);
  }
  return st;
}

std::vector<uint8_t> read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw UsageError("cannot read " + path);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

void write_all(const std::string& path, const std::vector<uint8_t>& buf) {
  // NOTE: in place, same size: the file keeps its inode, permissions and every other byte.
  std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
  if (!f) throw std::runtime_error("cannot write " + path);
  f.write(reinterpret_cast<const char*>(buf.data()), std::streamsize(buf.size()));
  if (!f) throw std::runtime_error("short write to " + path);
}

// ---- self test: a synthetic cubin with a known instruction stream ----
struct Ins {
  uint64_t lo, hi;
};
Ins ffma(int dst, bool yield, bool reuse) {
  // FFMA Rdst, R(dst+64), R200, Rdst, stall 1: the compiler's two forms (0x000fc2.. / 0x080fe2..).
  const uint64_t lo = 0x7223 | uint64_t(dst) << 16 | uint64_t(dst + 64) << 24 | uint64_t{200} << 32;
  uint64_t hi = uint64_t(dst) | uint64_t{0xfc2} << 40;
  if (!yield) hi |= kYieldBit;
  if (reuse) hi |= uint64_t{2} << 58;
  return {lo, hi};
}
Ins other(uint64_t opcode) {
  return {0x7000 | opcode, kYieldBit | uint64_t{0xfc2} << 40};
}

std::vector<uint8_t> make_cubin(
    const std::vector<std::pair<std::string, std::vector<Ins>>>& texts) {
  std::vector<uint8_t> out(64, 0);
  std::string strtab(1, '\0');
  std::vector<std::pair<uint32_t, std::pair<uint64_t, uint64_t>>> secs;  // name, (off, size)
  for (const auto& [name, ins] : texts) {
    while (out.size() % 128) out.push_back(0);
    const uint64_t off = out.size();
    for (const Ins& i : ins) {
      uint8_t w[16];
      store64(w, i.lo);
      store64(w + 8, i.hi);
      out.insert(out.end(), w, w + 16);
    }
    secs.push_back({uint32_t(strtab.size()), {off, out.size() - off}});
    strtab += name + '\0';
  }
  const uint32_t shstr_name = uint32_t(strtab.size());
  strtab += std::string(".shstrtab") + '\0';
  const uint64_t str_off = out.size();
  out.insert(out.end(), strtab.begin(), strtab.end());
  while (out.size() % 8) out.push_back(0);
  const uint64_t shoff = out.size();
  const auto add_sh = [&](uint32_t name, uint64_t off, uint64_t size) {
    uint8_t s[64] = {};
    std::memcpy(s, &name, 4);
    std::memcpy(s + 0x18, &off, 8);
    std::memcpy(s + 0x20, &size, 8);
    out.insert(out.end(), s, s + 64);
  };
  add_sh(0, 0, 0);
  for (const auto& [name, r] : secs) add_sh(name, r.first, r.second);
  add_sh(shstr_name, str_off, strtab.size());
  const uint8_t ident[8] = {0x7f, 'E', 'L', 'F', 2, 1, 1, 0x33};
  std::memcpy(out.data(), ident, 8);
  const uint16_t machine = kEmCuda, shentsize = 64, shnum = uint16_t(secs.size() + 2),
                 shstrndx = uint16_t(secs.size() + 1);
  const uint32_t flags = 0x0a005a04;  // as nvcc 13 writes for sm_90a
  std::memcpy(out.data() + 0x12, &machine, 2);
  std::memcpy(out.data() + 0x28, &shoff, 8);
  std::memcpy(out.data() + 0x30, &flags, 4);
  std::memcpy(out.data() + 0x3a, &shentsize, 2);
  std::memcpy(out.data() + 0x3c, &shnum, 2);
  std::memcpy(out.data() + 0x3e, &shstrndx, 2);
  return out;
}

void expect(bool ok, const std::string& what) {
  if (!ok) throw std::runtime_error("self-test failed: " + what);
}

int self_test() {
  constexpr size_t kAt = 202;
  // A kernel with one promotion run of 32 FFMAs (compiler pattern: yield, no-yield+reuse, ...,
  // with a MOV inside the run), a lone FFMA pair outside any run, and another kernel that must
  // not be touched.
  std::vector<Ins> k;
  k.push_back(other(0x202));  // MOV
  k.push_back(ffma(1, true, false));
  k.push_back(ffma(2, false, true));
  for (int i = 0; i < 6; ++i) k.push_back(other(0x824));  // IMADs: more than max_gap apart
  for (int i = 0; i < 32; ++i) {
    k.push_back(ffma(10 + i, i % 2 == 0, i % 2 == 1));
    if (i == 20) k.push_back(other(0x202));
  }
  for (int i = 0; i < 6; ++i) k.push_back(other(0x918));  // NOP: ends the run
  k.push_back(ffma(3, false, true));
  const std::vector<Ins> untouched(40, ffma(5, false, true));
  const auto cubin =
      make_cubin({{".text._Z15fp8_gemm_kernelILi128EEvv", k}, {".text._Z5otherv", untouched}});
  // Embedded in a host-like file at an offset that is not 8-aligned (an archive member's fatbin).
  std::vector<uint8_t> file(kAt + cubin.size() + 72, 0xab);
  std::memcpy(file.data() + kAt, cubin.data(), cubin.size());

  const auto ins_at = [&](const std::vector<uint8_t>& f, size_t sec_index, size_t i) {
    // Text of the first section starts at offset 128 of the cubin (make_cubin aligns to 128).
    (void)sec_index;
    const size_t off = kAt + 128 + 16 * i;
    return Ins{load64(f.data() + off), load64(f.data() + off + 8)};
  };
  const size_t run_first = 9, run_len = 33;  // 32 FFMAs + one MOV
  for (Mode mode : {Mode::kAll, Mode::kHead, Mode::kNone}) {
    Options opt;
    opt.mode = mode;
    std::vector<uint8_t> f = file;
    const Stats st = patch_buffer(f, opt);
    expect(st.cubins == 1 && st.kernels == 1 && st.runs == 1 && st.ffmas == 32,
           "one cubin, one kernel, one run of 32");
    expect(f.size() == file.size(), "same size");
    const size_t text_begin = kAt + 128, text_end = text_begin + 16 * k.size();
    for (size_t i = 0; i < f.size(); ++i)
      if (i < text_begin || i >= text_end)
        expect(f[i] == file[i], "bytes outside the patched kernel untouched");
    int changed = 0;
    for (size_t i = 0; i < k.size(); ++i) {
      const Ins now = ins_at(f, 0, i), was = ins_at(file, 0, i);
      expect(now.lo == was.lo, "low words untouched");
      expect(((now.hi ^ was.hi) & ~(kYieldBit | kReuseBits)) == 0,
             "only yield and reuse bits change");
      changed += now.hi != was.hi;
    }
    expect(changed == st.changed, "changed count matches the instructions that differ");
    int j = 0;
    for (size_t i = run_first; i < run_first + run_len; ++i) {
      const Ins now = ins_at(f, 0, i), was = ins_at(file, 0, i);
      if (!is_ffma_rrr(now.lo)) {
        expect(now.hi == was.hi, "non-FFMA in the run untouched");
        continue;
      }
      const bool yields = (now.hi & kYieldBit) == 0;
      const bool want = mode == Mode::kAll    ? true
                        : mode == Mode::kNone ? false
                        : j < 32 * 9 / 16     ? true
                                              : (was.hi & kYieldBit) == 0;
      expect(yields == want, "yield of FFMA " + std::to_string(j));
      if (yields) expect((now.hi & kReuseBits) == 0, "no reuse on a yielding FFMA");
      if (!yields) expect((now.hi & kReuseBits) == (was.hi & kReuseBits), "reuse kept");
      ++j;
    }
    expect(j == 32, "32 FFMAs walked");
    for (size_t i : {size_t{1}, size_t{2}, run_first + run_len + 6})
      expect(ins_at(f, 0, i).hi == ins_at(file, 0, i).hi, "FFMAs outside runs untouched");
    const int expected = mode == Mode::kAll ? 16 : mode == Mode::kNone ? 16 : 9;
    expect(st.changed == expected, "changed count " + std::to_string(st.changed));
    // Idempotent: a second pass changes nothing.
    std::vector<uint8_t> g = f;
    expect(patch_buffer(g, opt).changed == 0 && g == f, "second pass is a no-op");
  }
  // A non-matching kernel filter and a non-sm_90 cubin change nothing.
  {
    Options opt;
    opt.kernel = "no_such_kernel";
    std::vector<uint8_t> f = file;
    expect(patch_buffer(f, opt).kernels == 0 && f == file, "filter");
    f[kAt + 0x31] = 89;  // e_flags: sm_89
    opt.kernel = "fp8_gemm_kernel";
    expect(patch_buffer(f, opt).cubins == 0, "other architectures skipped");
  }
  std::printf("sass_interleave self-test: ok\n");
  return 0;
}

int run(int argc, char** argv) {
  Options opt;
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UsageError(a + " needs a value");
      return argv[++i];
    };
    if (a == "--self-test") return self_test();
    if (a == "--mode") {
      const std::string m = value();
      if (m == "all")
        opt.mode = Mode::kAll;
      else if (m == "head")
        opt.mode = Mode::kHead;
      else if (m == "none")
        opt.mode = Mode::kNone;
      else
        throw UsageError("--mode " + m + " (all, head or none)");
    } else if (a == "--kernel") {
      opt.kernel = value();
    } else if (a == "--min-run") {
      opt.min_run = std::stoi(value());
      if (opt.min_run < 2) throw UsageError("--min-run must be >= 2");
    } else if (a == "--dry-run") {
      opt.dry_run = true;
    } else if (!a.empty() && a[0] == '-') {
      throw UsageError("unknown option " + a);
    } else {
      files.push_back(a);
    }
  }
  if (files.empty())
    throw UsageError(
        "usage: fp8moe_sass_interleave [--mode all|head|none] [--kernel SUBSTR] [--min-run N] "
        "[--dry-run] FILE... | --self-test");
  for (const std::string& path : files) {
    std::vector<uint8_t> buf = read_all(path);
    const Stats st = patch_buffer(buf, opt);
    // NOTE: a fatbin compressed by nvcc holds no readable cubin: refuse rather than skip, so a
    // build that lost --no-compress does not silently run unpatched.
    if (st.kernels == 0)
      throw std::runtime_error(path + ": no sm_90 kernel matching '" + opt.kernel +
                               "' (fatbin compressed? compile with --no-compress)");
    if (st.changed > 0 && !opt.dry_run) write_all(path, buf);
    std::printf("sass_interleave: %s: %d cubin(s), %d kernel(s), %d run(s), %d FFMAs, %d %s\n",
                path.c_str(), st.cubins, st.kernels, st.runs, st.ffmas, st.changed,
                opt.dry_run ? "would change" : "changed");
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "fp8moe_sass_interleave: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fp8moe_sass_interleave: %s\n", e.what());
    return 1;
  }
}
