// fp8moe serve --checkpoint DIR [--max-batch N] [--context N] [--max-new-tokens N]
// [--temperature T] [--top-p P] [--seed S] [--mtp-draft] [--stream] [--ema]: a serving loop on
// one GPU (serve/generator_gpu.h GeneratorGpu::serve) for requests that arrive while others run.
// Input: one JSON request a line on stdin (serve/request_json.h: {"id", "prompt",
// "max_new_tokens", "temperature", "top_p", "seed", "ignore_eos"}; absent fields take the flags'
// values). Output: one JSON line a finished request on stdout, in finishing order ({"id",
// "completion", "new_tokens", "ttft_ms", "latency_ms"}), with --stream also a {"id", "delta"} line
// a token; a bad line or request gets {"id", "error"} and the loop goes on. End of input: the
// running requests finish, then it exits.
#include <algorithm>
#include <condition_variable>
#include <deque>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "command.h"
#include "fp8moe/comm/launcher.h"
#include "fp8moe/core/error.h"
#include "fp8moe/serve/request_json.h"
#include "fp8moe/train/data.h"
#include "fp8moe/train/trainer.h"
#ifdef FP8MOE_HAVE_CUDA
#include "fp8moe/serve/generator_gpu.h"
#endif

namespace {

struct ServeArgs {
  std::string checkpoint;
  int64_t max_batch = 8, context = 1024;
  bool mtp_draft = false, stream = false, ema = false;
  fp8moe::serve::SamplingOptions defaults;
};

#ifdef FP8MOE_HAVE_CUDA
void serve_gpu(const ServeArgs& a) {
  using namespace fp8moe;
  using namespace fp8moe::serve;
  const std::unique_ptr<Model> model = load_checkpoint_model(a.checkpoint, a.ema);
  Tokenizer tok(a.checkpoint + "/tokenizer.model");
  GeneratorOptions o;
  o.max_batch = a.max_batch;
  o.context = std::min(a.context, model->config().max_position_embeddings);
  o.mtp_draft = a.mtp_draft;
  GeneratorGpu gen(*model, o);
  SamplingOptions defaults = a.defaults;
  defaults.eos = tok.eos_id();

  // Requests read by a thread of their own, so that they arrive while the GPU runs.
  struct Pending {
    ServeRequest request;
    Json id;
  };
  struct Live {
    Json id;
    std::vector<int32_t> prompt, out;
    std::string prompt_text, sent;
    double arrival = 0, first = 0;
  };
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Pending> queue;
  std::map<int64_t, Live> live;
  bool closed = false;
  std::mutex out_mu;
  const auto say = [&](const std::string& line) {
    std::lock_guard<std::mutex> lock(out_mu);
    std::cout << line << std::endl;
  };
  std::thread reader([&] {
    int64_t n = 0;
    for (std::string line; std::getline(std::cin, line);) {
      ++n;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      try {
        RequestLine r = parse_request_line(line, n, defaults);
        Pending p;
        p.id = r.id;
        p.request.id = n;
        p.request.prompt = tok.encode(r.prompt);
        if (p.request.prompt.empty())
          p.request.prompt.push_back(tok.eos_id() >= 0 ? tok.eos_id() : 0);
        p.request.sampling = r.sampling;
        p.request.arrival = steady_seconds();
        {
          std::lock_guard<std::mutex> lock(mu);
          queue.push_back(std::move(p));
        }
        cv.notify_all();
      } catch (const std::exception& e) {
        say(error_line(Json(n), e.what()));
      }
    }
    {
      std::lock_guard<std::mutex> lock(mu);
      closed = true;
    }
    cv.notify_all();
  });
  const auto next = [&](ServeRequest* r, bool wait) {
    std::unique_lock<std::mutex> lock(mu);
    if (wait) cv.wait(lock, [&] { return !queue.empty() || closed; });
    if (queue.empty()) return closed ? Arrival::kClosed : Arrival::kNone;
    Pending p = std::move(queue.front());
    queue.pop_front();
    Live l;
    l.id = p.id;
    l.prompt = p.request.prompt;
    l.prompt_text = tok.decode(l.prompt);
    l.arrival = p.request.arrival;
    live[p.request.id] = std::move(l);
    *r = std::move(p.request);
    return Arrival::kRequest;
  };
  const auto emit = [&](const TokenEvent& e) {
    std::unique_lock<std::mutex> lock(mu);
    Live& l = live.at(e.id);
    if (!e.error.empty()) {
      say(error_line(l.id, e.error));
      live.erase(e.id);
      return;
    }
    const double now = steady_seconds();
    if (l.out.empty()) l.first = now;
    l.out.push_back(e.token);
    if (a.stream || e.done) {
      std::vector<int32_t> all = l.prompt;
      all.insert(all.end(), l.out.begin(), l.out.end());
      const std::string text = tok.decode(all);
      // The completion: the text past the prompt's own decoding (a piece may join the two).
      const size_t cut =
          text.compare(0, l.prompt_text.size(), l.prompt_text) == 0 ? l.prompt_text.size() : 0;
      const std::string completion = text.substr(cut);
      if (a.stream && completion.size() > l.sent.size() &&
          completion.compare(0, l.sent.size(), l.sent) == 0) {
        say(delta_line(l.id, completion.substr(l.sent.size())));
        l.sent = completion;
      }
      if (e.done) {
        say(result_line(l.id, completion, static_cast<int64_t>(l.out.size()),
                        1e3 * (l.first - l.arrival), 1e3 * (now - l.arrival)));
        live.erase(e.id);
      }
    }
  };
  try {
    gen.serve(next, emit);
  } catch (...) {
    // The reader may be blocked in getline: it ends with the process.
    reader.detach();
    throw;
  }
  reader.join();
}
#endif

void setup(CLI::App& app) {
  auto a = std::make_shared<ServeArgs>();
  app.add_option("--checkpoint", a->checkpoint, "Folder written by fp8moe train")->required();
  app.add_option("--max-batch", a->max_batch, "Sequences decoded together")->capture_default_str();
  app.add_option("--context", a->context, "Tokens a sequence holds at most")->capture_default_str();
  app.add_option("--max-new-tokens", a->defaults.max_new_tokens,
                 "A request's new tokens unless it says")
      ->capture_default_str();
  app.add_option("--temperature", a->defaults.temperature, "Unless a request says (0 = greedy)")
      ->capture_default_str();
  app.add_option("--top-p", a->defaults.top_p, "Unless a request says")->capture_default_str();
  app.add_option("--seed", a->defaults.seed, "Unless a request says")->capture_default_str();
  app.add_flag("--mtp-draft", a->mtp_draft,
               "Speculative decoding with the checkpoint's MTP module as the draft");
  app.add_flag("--stream", a->stream, "Also a {\"id\", \"delta\"} line a token");
  app.add_flag("--ema", a->ema, "Use the EMA weights");
  app.footer(
      "Input: one JSON request a line on stdin, e.g. {\"id\": 1, \"prompt\": \"In the "
      "beginning\", \"max_new_tokens\": 32, \"temperature\": 0.8}. Output: one JSON line a "
      "finished request (completion, new_tokens, ttft_ms, latency_ms) or error.");
  app.callback([a] {
    FM_CHECK_ARG(a->max_batch > 0, "--max-batch must be positive");
    FM_CHECK_ARG(a->defaults.max_new_tokens >= 1, "--max-new-tokens must be >= 1");
    FM_CHECK_ARG(a->defaults.temperature >= 0 && a->defaults.top_p > 0 && a->defaults.top_p <= 1,
                 "--temperature must be >= 0 and --top-p in (0, 1]");
    FM_CHECK_ARG(!fp8moe::comm::launched_as_rank() || fp8moe::comm::rank_env().world_size == 1,
                 "fp8moe serve runs on one GPU (several ranks: `fp8moe generate` under launch)");
#ifdef FP8MOE_HAVE_CUDA
    serve_gpu(*a);
#else
    FM_CHECK_ARG(false, "fp8moe serve: this fp8moe was built without CUDA");
#endif
  });
}

}  // namespace

FM_REGISTER_COMMAND("serve", "Serve requests arriving on stdin (JSON lines) on one GPU", setup);
