// The movers' names and limits (src/comm/peer_mover.cpp): parse_mover / mover_name round trips,
// defaults, shared-memory sizes, and the rejections validate_mover must make before a launch.
#include "fp8moe/comm/peer_mover.h"

#include <gtest/gtest.h>

#include <string>

#include "fp8moe/core/error.h"

namespace fp8moe::comm {
namespace {

void expect_invalid(const std::string& name, const std::string& needle) {
  try {
    parse_mover(name);
    FAIL() << name << " was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument) << name;
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

void expect_rejected(const std::string& name, int64_t bytes, const std::string& needle) {
  try {
    validate_mover(parse_mover(name), bytes);
    FAIL() << name << " with " << bytes << " bytes was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument) << name;
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(PeerMover, ParsesEveryField) {
  const MoverConfig c = parse_mover("st:b96:w16:u8:c7168:lcs:swt");
  EXPECT_EQ(c.kind, MoverKind::kSmPush);
  EXPECT_EQ(c.blocks, 96);
  EXPECT_EQ(c.warps, 16);
  EXPECT_EQ(c.unroll, 8);
  EXPECT_EQ(c.chunk, 7168);
  EXPECT_EQ(c.load, LoadHint::kCs);
  EXPECT_EQ(c.store, StoreHint::kWt);
  const MoverConfig b = parse_mover("bulkld:b32:w2:o16384:d3:c65536");
  EXPECT_EQ(b.kind, MoverKind::kBulkPull);
  EXPECT_EQ(b.op_bytes, 16384);
  EXPECT_EQ(b.stages, 3);
  EXPECT_EQ(b.chunk, 65536);
  EXPECT_TRUE(mover_runs_on_destination(b));
  EXPECT_TRUE(mover_runs_on_destination(parse_mover("ld")));
  EXPECT_FALSE(mover_runs_on_destination(parse_mover("st")));
  EXPECT_FALSE(mover_runs_on_destination(parse_mover("stage")));
  EXPECT_FALSE(mover_runs_on_destination(parse_mover("bulkst")));
  EXPECT_FALSE(mover_runs_on_destination(parse_mover("ce")));
}

TEST(PeerMover, NamesRoundTripAndShowOnlyTheFieldsThatMatter) {
  EXPECT_EQ(mover_name(parse_mover("ce:b12")), "ce");
  EXPECT_EQ(mover_name(parse_mover("st")), "st:b64:w8:u4:c0:lnc:swb");
  EXPECT_EQ(mover_name(parse_mover("ld:sna:lna")), "ld:b64:w8:u4:c0:lna:sna");
  EXPECT_EQ(mover_name(parse_mover("bulkst:u8:lcs")), "bulkst:b64:w8:c0:o4096:d4");
  EXPECT_EQ(mover_name(parse_mover("stage:b16:w4:u2:o8192:d2")), "stage:b16:w4:u2:c0:o8192:d2:lnc");
  for (const char* n : {"st:b16:w4:u1:c512:lcg:scs", "ld:b132:w32:u8:c8192:lnc:swt",
                        "bulkld:b8:w1:c7168:o1024:d8", "stage:b64:w8:u4:c7168:o7168:d2:lna"}) {
    EXPECT_EQ(mover_name(parse_mover(n)), n);
    EXPECT_EQ(mover_name(parse_mover(mover_name(parse_mover(n)))), n);
  }
}

TEST(PeerMover, SharedMemoryOfTheTmaMovers) {
  EXPECT_EQ(mover_smem_bytes(parse_mover("st:w32")), 0);
  // 4 warps x 4 slots: 16 mbarriers (128 bytes) then 16 slots of 8 KB.
  EXPECT_EQ(mover_smem_bytes(parse_mover("bulkst:w4:d4:o8192")), 128 + 16 * 8192);
  // 17 warps x 2 slots: 34 barriers (272 bytes) round up to 384.
  EXPECT_EQ(mover_smem_bytes(parse_mover("bulkld:w17:d2:o16")), 384 + 34 * 16);
  EXPECT_NO_THROW(validate_mover(parse_mover("bulkst:w4:d4:o8192"), 1 << 20));
  expect_rejected("bulkst:w8:d4:o8192", 1 << 20, "exceed");
}

TEST(PeerMover, RejectsBadNamesWithTheField) {
  expect_invalid("copy", "unknown kind 'copy'");
  expect_invalid("st:x4", "unknown field 'x4'");
  expect_invalid("st:b", "'b' needs a non-negative number");
  expect_invalid("st:b6x", "'b6x'");
  expect_invalid("st:w-1", "'w-1'");
  expect_invalid("st:lzz", "unknown load hint 'zz'");
  expect_invalid("st:szz", "unknown store hint 'zz'");
  expect_invalid("st::b4", "empty field");
}

TEST(PeerMover, RejectsWhatTheKernelsCannotMove) {
  expect_rejected("st", 1000, "not a multiple of 16");
  expect_rejected("ce", 17, "not a multiple of 16");
  expect_rejected("st:u3", 4096, "unroll=3");
  expect_rejected("stage:u16", 4096, "unroll=16");
  expect_rejected("st:c100", 4096, "chunk=100");
  expect_rejected("st:b0", 4096, "blocks=0");
  expect_rejected("ld:w33", 4096, "warps=33");
  expect_rejected("bulkst:o1000", 4096, "op_bytes=1000");
  expect_rejected("bulkst:o0", 4096, "op_bytes=0");
  expect_rejected("bulkld:d1", 4096, "stages=1");
  expect_rejected("bulkld:d9", 4096, "stages=9");
}

}  // namespace
}  // namespace fp8moe::comm
