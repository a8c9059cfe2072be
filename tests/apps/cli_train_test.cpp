// fp8moe train's command line where a mistake would cost a run: the CPU trainer started as ranks
// of `fp8moe launch` (each rank would train its own copy into the same folder) is refused with a
// message naming the rank, before any work.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "../support/run_cli.h"

namespace fp8moe {
namespace {

using test::run_cli;

// The environment `fp8moe launch` gives rank 1 of 2, for the test's lifetime.
class AsRankOneOfTwo {
 public:
  explicit AsRankOneOfTwo(const std::string& store) {
    setenv("FP8MOE_RANK", "1", 1);
    setenv("FP8MOE_WORLD_SIZE", "2", 1);
    setenv("FP8MOE_LOCAL_RANK", "1", 1);
    setenv("FP8MOE_LOCAL_WORLD_SIZE", "2", 1);
    setenv("FP8MOE_STORE", store.c_str(), 1);
  }
  ~AsRankOneOfTwo() {
    for (const char* v : {"FP8MOE_RANK", "FP8MOE_WORLD_SIZE", "FP8MOE_LOCAL_RANK",
                          "FP8MOE_LOCAL_WORLD_SIZE", "FP8MOE_STORE"})
      unsetenv(v);
  }
};

TEST(CliTrain, CpuTrainerRefusesToRunAsRanks) {
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / "fp8moe_cli_train_ranks";
  std::filesystem::remove_all(dir);
  const std::string config = std::string(FP8MOE_SOURCE_DIR) + "/configs/tiny.json";
  AsRankOneOfTwo rank(dir.string());
  for (const std::string sub : {"train", "train compare"}) {
    const auto r =
        run_cli(sub + " --config " + config + " --steps 1 --out " + (dir / "run").string());
    EXPECT_EQ(r.exit_code, 2) << sub << ": " << r.output;
    EXPECT_NE(r.output.find("not as rank 1 of 2 of `fp8moe launch`"), std::string::npos)
        << sub << ": " << r.output;
    EXPECT_FALSE(std::filesystem::exists(dir / "run" / "metrics.jsonl")) << sub;
  }
}

}  // namespace
}  // namespace fp8moe
