// fp8moe serve --checkpoint DIR [--device gpu|cpu] [--max-batch N] [--context N]
// [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S] [--mtp-draft] [--stream] [--ema]:
// a serving loop on one GPU (serve/generator_gpu.h GeneratorGpu::serve) for requests that arrive
// while others run; --device cpu: the CPU model (train/trainer.h CheckpointGenerator), one
// request after another (the same lines; for machines without a GPU, and for CI).
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
#include "fp8moe/serve/clock.h"
#include "fp8moe/serve/request_json.h"
#include "fp8moe/train/data.h"
#include "fp8moe/train/trainer.h"
#ifdef FP8MOE_HAVE_CUDA
#include "fp8moe/serve/generator_gpu.h"
#endif

namespace {

struct ServeArgs {
  std::string checkpoint, device = "gpu";
  int64_t max_batch = 8, context = 1024, prefill_batch = 1, prefill_chunk = 256;
  bool mtp_draft = false, stream = false, ema = false;
  fp8moe::serve::SamplingOptions defaults;
};

// A request's completion text as its tokens come: the text past the prompt's own decoding (a
// piece may join the two), and the part not yet streamed.
class CompletionText {
 public:
  CompletionText(const fp8moe::Tokenizer& tok, std::vector<int32_t> prompt)
      : tok_(&tok), ids_(std::move(prompt)), prompt_text_(tok.decode(ids_)) {}
  void add(int32_t token) { ids_.push_back(token); }
  std::string completion() const {
    const std::string text = tok_->decode(ids_);
    const size_t cut =
        text.compare(0, prompt_text_.size(), prompt_text_) == 0 ? prompt_text_.size() : 0;
    return text.substr(cut);
  }
  // The completion's part past what was streamed before (empty while a piece is incomplete).
  std::string delta() {
    const std::string c = completion();
    if (c.size() <= sent_ || c.compare(0, sent_, c, 0, sent_) != 0) return {};
    std::string d = c.substr(sent_);
    sent_ = c.size();
    return d;
  }

 private:
  const fp8moe::Tokenizer* tok_;
  std::vector<int32_t> ids_;
  std::string prompt_text_;
  size_t sent_ = 0;
};

void say(const std::string& line) {
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  std::cout << line << std::endl;
}

// --device cpu: one request after another on the CPU model, the same lines.
void serve_cpu(const ServeArgs& a) {
  using namespace fp8moe;
  using namespace fp8moe::serve;
  GenerateOptions g;
  g.checkpoint_dir = a.checkpoint;
  g.use_ema = a.ema;
  g.context = a.context;
  CheckpointGenerator gen(g);
  const Tokenizer& tok = gen.tokenizer();
  SamplingOptions defaults = a.defaults;
  defaults.eos = tok.eos_id();
  int64_t n = 0;
  for (std::string line; std::getline(std::cin, line);) {
    ++n;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    Json id = request_id(line, n);
    try {
      const RequestLine r = parse_request_line(line, n, defaults);
      id = r.id;
      const double arrival = steady_seconds();
      std::vector<int32_t> prompt = tok.encode(r.prompt);
      if (prompt.empty()) prompt.push_back(tok.eos_id() >= 0 ? tok.eos_id() : 0);
      CompletionText text(tok, prompt);
      GenerateOptions q = g;
      q.max_new_tokens = r.sampling.max_new_tokens;
      q.temperature = r.sampling.temperature;
      q.top_p = r.sampling.top_p;
      q.seed = r.sampling.seed;
      q.ignore_eos = r.sampling.ignore_eos;
      double first = 0;
      const std::vector<int32_t> out =
          gen.generate(prompt, q, static_cast<uint64_t>(n), [&](int32_t t) {
            if (first == 0) first = steady_seconds();
            text.add(t);
            if (a.stream) {
              const std::string d = text.delta();
              if (!d.empty()) say(delta_line(id, d));
            }
          });
      const double end = steady_seconds();
      say(result_line(id, text.completion(), static_cast<int64_t>(out.size()),
                      1e3 * ((first > 0 ? first : end) - arrival), 1e3 * (end - arrival)));
    } catch (const std::exception& e) {
      say(error_line(id, e.what()));
    }
  }
}

#ifdef FP8MOE_HAVE_CUDA
void serve_gpu(const ServeArgs& a) {
  using namespace fp8moe;
  using namespace fp8moe::serve;
  const std::unique_ptr<Model> model = load_checkpoint_model(a.checkpoint, a.ema);
  Tokenizer tok(a.checkpoint + "/tokenizer.model");
  GeneratorOptions o;
  o.max_batch = a.max_batch;
  o.prefill_batch = a.prefill_batch;
  o.prefill_chunk = a.prefill_chunk;
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
    std::unique_ptr<CompletionText> text;
    int64_t tokens = 0;
    double arrival = 0, first = 0;
  };
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Pending> queue;
  std::map<int64_t, Live> live;
  bool closed = false;
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
        say(error_line(request_id(line, n), e.what()));
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
    l.text = std::make_unique<CompletionText>(tok, p.request.prompt);
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
    if (l.tokens++ == 0) l.first = now;
    l.text->add(e.token);
    if (a.stream) {
      const std::string d = l.text->delta();
      if (!d.empty()) say(delta_line(l.id, d));
    }
    if (e.done) {
      say(result_line(l.id, l.text->completion(), l.tokens, 1e3 * (l.first - l.arrival),
                      1e3 * (now - l.arrival)));
      live.erase(e.id);
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
  app.add_option("--device", a->device,
                 "gpu (requests batched as they arrive) or cpu (one after another)")
      ->capture_default_str();
  app.add_option("--max-batch", a->max_batch, "GPU: sequences decoded together")
      ->capture_default_str();
  app.add_option("--context", a->context, "Tokens a sequence holds at most")->capture_default_str();
  app.add_option("--prefill-batch", a->prefill_batch,
                 "GPU: arrived prompts prefilled together in one pass (1: one at a time)")
      ->capture_default_str();
  app.add_option("--prefill-chunk", a->prefill_chunk,
                 "GPU: prompt tokens a prefill pass, over the prompts it fills")
      ->capture_default_str();
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
    FM_CHECK_ARG(a->device == "gpu" || a->device == "cpu", "--device: '", a->device,
                 "' is not a device (expected gpu or cpu)");
    if (a->device == "cpu") {
      FM_CHECK_ARG(!a->mtp_draft, "--mtp-draft needs --device gpu");
      serve_cpu(*a);
      return;
    }
#ifdef FP8MOE_HAVE_CUDA
    serve_gpu(*a);
#else
    FM_CHECK_ARG(false,
                 "fp8moe serve: this fp8moe was built without CUDA (--device cpu serves on "
                 "the CPU)");
#endif
  });
}

}  // namespace

FM_REGISTER_COMMAND("serve", "Serve requests arriving on stdin (JSON lines) on one GPU or the CPU",
                    setup);
