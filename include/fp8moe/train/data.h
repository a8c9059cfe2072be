// The text side of training: a SentencePiece tokenizer (Debian libsentencepiece) and the token
// stream of a corpus, sampled into windows deterministically from (seed, step) so that a
// resumed run reads exactly the batches an uninterrupted one would.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace fp8moe {

// True when fp8moe was built with SentencePiece (FP8MOE_HAVE_SENTENCEPIECE).
bool have_sentencepiece();

class Tokenizer {
 public:
  // Loads a SentencePiece .model; errors name the path (kRuntime when built without it).
  explicit Tokenizer(const std::string& model_path);
  ~Tokenizer();
  int64_t vocab_size() const;
  int32_t eos_id() const;
  std::vector<int32_t> encode(const std::string& text) const;
  std::string decode(const std::vector<int32_t>& ids) const;
  const std::string& path() const { return path_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string path_;
};

struct TokenData {
  std::vector<int32_t> train, valid;  // the last `valid_fraction` of the stream is held out
};
// One line of the corpus per document, each followed by the tokenizer's end-of-sequence id.
TokenData tokenize_corpus(const Tokenizer& tok, const std::string& corpus_path,
                          double valid_fraction = 0.01);

// Windows [batch, window] for `step`: window b starts at a position drawn from
// philox(seed, stream 1, step * batch + b).
std::vector<int32_t> sample_batch(const std::vector<int32_t>& stream, int64_t batch, int64_t window,
                                  uint64_t seed, int64_t step);

}  // namespace fp8moe
