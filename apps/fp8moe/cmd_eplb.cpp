// fp8moe eplb: expert placement (hierarchical or global policy, as the public EPLB chooses)
// from per-expert load statistics. JSON in and out, as DESIGN.md specifies; bad input exits 2
// and writes nothing (the output is written only once the plan exists).
#include <memory>
#include <string>

#include "command.h"
#include "fp8moe/core/file_io.h"
#include "fp8moe/core/json.h"
#include "fp8moe/eplb/eplb.h"

namespace {

void setup_eplb(CLI::App& app) {
  auto input = std::make_shared<std::string>();
  auto output = std::make_shared<std::string>();
  app.add_option("--input", *input, "load statistics JSON ('-' = stdin)")->required();
  app.add_option("--output", *output, "placement JSON ('-' = stdout)")->required();
  app.callback([input, output] {
    using namespace fp8moe;
    Json in;
    try {
      in = read_json_file(*input);
    } catch (const Error& e) {
      // An input file that cannot be read is bad input too: exit 2.
      if (e.kind() != ErrorKind::kIo) throw;
      FM_THROW(ErrorKind::kInvalidArgument, e.message());
    }
    const eplb::Problem problem = eplb::problem_from_json(in);
    const eplb::Plan plan = eplb::rebalance_experts(problem);
    write_file_atomic(*output, eplb::plan_to_json(plan).dump() + "\n");
  });
}

}  // namespace

FM_REGISTER_COMMAND("eplb", "Expert placement with redundant experts (DeepSeek EPLB policies)",
                    setup_eplb);
