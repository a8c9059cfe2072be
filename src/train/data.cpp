#include "fp8moe/train/data.h"

#include <algorithm>
#include <sstream>

#include "fp8moe/core/error.h"
#include "fp8moe/core/file_io.h"
#include "fp8moe/core/philox.h"

#if defined(FP8MOE_HAVE_SENTENCEPIECE)
#include <sentencepiece_processor.h>
#endif

namespace fp8moe {

bool have_sentencepiece() {
#if defined(FP8MOE_HAVE_SENTENCEPIECE)
  return true;
#else
  return false;
#endif
}

#if defined(FP8MOE_HAVE_SENTENCEPIECE)
struct Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
};

Tokenizer::Tokenizer(const std::string& model_path)
    : impl_(std::make_unique<Impl>()), path_(model_path) {
  const auto status = impl_->sp.Load(model_path);
  if (!status.ok())
    FM_THROW(ErrorKind::kInvalidArgument, "cannot load the SentencePiece model '", model_path,
             "': ", status.ToString());
}
Tokenizer::~Tokenizer() = default;
int64_t Tokenizer::vocab_size() const {
  return impl_->sp.GetPieceSize();
}
int32_t Tokenizer::eos_id() const {
  return impl_->sp.eos_id();
}
std::vector<int32_t> Tokenizer::encode(const std::string& text) const {
  std::vector<int> ids;
  const auto status = impl_->sp.Encode(text, &ids);
  if (!status.ok())
    FM_THROW(ErrorKind::kRuntime, "SentencePiece encode failed: ", status.ToString());
  return std::vector<int32_t>(ids.begin(), ids.end());
}
std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string text;
  const auto status = impl_->sp.Decode(std::vector<int>(ids.begin(), ids.end()), &text);
  if (!status.ok())
    FM_THROW(ErrorKind::kRuntime, "SentencePiece decode failed: ", status.ToString());
  return text;
}
#else
struct Tokenizer::Impl {};
Tokenizer::Tokenizer(const std::string& model_path) : path_(model_path) {
  FM_THROW(ErrorKind::kRuntime, "cannot load '", model_path,
           "': fp8moe was built without SentencePiece (install libsentencepiece-dev and rebuild)");
}
Tokenizer::~Tokenizer() = default;
int64_t Tokenizer::vocab_size() const {
  return 0;
}
int32_t Tokenizer::eos_id() const {
  return -1;
}
std::vector<int32_t> Tokenizer::encode(const std::string&) const {
  return {};
}
std::string Tokenizer::decode(const std::vector<int32_t>&) const {
  return {};
}
#endif

TokenData tokenize_corpus(const Tokenizer& tok, const std::string& corpus_path,
                          double valid_fraction) {
  const std::string text = read_file(corpus_path);
  std::vector<int32_t> all;
  all.reserve(text.size() / 3);
  std::istringstream in(text);
  std::string line;
  const int32_t eos = tok.eos_id();
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    const auto ids = tok.encode(line);
    all.insert(all.end(), ids.begin(), ids.end());
    if (eos >= 0) all.push_back(eos);
  }
  FM_CHECK_ARG(all.size() >= 1024, "corpus '", corpus_path, "' is too small (", all.size(),
               " tokens)");
  TokenData d;
  const size_t n_valid = static_cast<size_t>(static_cast<double>(all.size()) * valid_fraction);
  d.train.assign(all.begin(), all.end() - static_cast<int64_t>(n_valid));
  d.valid.assign(all.end() - static_cast<int64_t>(n_valid), all.end());
  return d;
}

std::vector<int32_t> sample_batch(const std::vector<int32_t>& stream, int64_t batch, int64_t window,
                                  uint64_t seed, int64_t step) {
  const int64_t n = static_cast<int64_t>(stream.size());
  FM_CHECK_ARG(n > window, "token stream of ", n, " tokens is shorter than a window of ", window);
  std::vector<int32_t> out(static_cast<size_t>(batch * window));
  for (int64_t b = 0; b < batch; ++b) {
    const uint64_t r =
        (static_cast<uint64_t>(philox_u32(seed, 1, static_cast<uint64_t>(step * batch + b)))
         << 32) |
        philox_u32(seed, 2, static_cast<uint64_t>(step * batch + b));
    const int64_t start = static_cast<int64_t>(r % static_cast<uint64_t>(n - window));
    std::copy_n(stream.begin() + start, window, out.begin() + b * window);
  }
  return out;
}

}  // namespace fp8moe
