// `fp8moe serve`'s request and result lines (serve/request_json.h).
#include "fp8moe/serve/request_json.h"

#include <gtest/gtest.h>

#include <string>

#include "fp8moe/core/error.h"

namespace fp8moe::serve {
namespace {

SamplingOptions defaults() {
  SamplingOptions s;
  s.max_new_tokens = 32;
  s.temperature = 0.5;
  s.eos = 2;
  return s;
}

TEST(RequestJson, FieldsAndDefaults) {
  const RequestLine r = parse_request_line(
      R"({"id": "a-1", "prompt": "In the beginning", "max_new_tokens": 8, "top_p": 0.9,
          "seed": 7, "ignore_eos": true})",
      1, defaults());
  EXPECT_EQ(r.id, Json("a-1"));
  EXPECT_EQ(r.prompt, "In the beginning");
  EXPECT_EQ(r.sampling.max_new_tokens, 8);
  EXPECT_DOUBLE_EQ(r.sampling.temperature, 0.5);  // the default
  EXPECT_DOUBLE_EQ(r.sampling.top_p, 0.9);
  EXPECT_EQ(r.sampling.seed, 7u);
  EXPECT_TRUE(r.sampling.ignore_eos);
  EXPECT_EQ(r.sampling.eos, 2);  // the server's (the tokenizer's), never the client's
  // Without an id: the line number.
  EXPECT_EQ(parse_request_line(R"({"prompt": "x"})", 12, defaults()).id, Json(12));
}

void expect_error(const std::string& line, const std::string& part) {
  try {
    parse_request_line(line, 4, defaults());
    ADD_FAILURE() << "accepted: " << line;
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(part), std::string::npos) << what;
    EXPECT_NE(what.find("line 4"), std::string::npos) << what;
  }
}

TEST(RequestJson, BadLinesNameTheProblem) {
  expect_error(R"({"prompt": "x", "temprature": 1})", "temprature");
  expect_error(R"({"max_new_tokens": 3})", "prompt");
  expect_error(R"({"prompt": 5})", "prompt");
  expect_error(R"({"prompt": "x", "max_new_tokens": 0})", "max_new_tokens");
  expect_error(R"({"prompt": "x", "max_new_tokens": 2.5})", "max_new_tokens");
  expect_error(R"({"prompt": "x", "top_p": 0})", "top_p");
  expect_error(R"({"prompt": "x", "temperature": -1})", "temperature");
  expect_error(R"({"prompt": "x", "seed": -3})", "seed");
  expect_error(R"(["prompt"])", "object");
  expect_error(R"({"prompt": "x")", "line 4");
}

TEST(RequestJson, AnswersCarryTheRequestsId) {
  EXPECT_EQ(request_id(R"({"id": "x", "prompt": "p", "temprature": 1})", 3), Json("x"));
  EXPECT_EQ(request_id(R"({"prompt": "p"})", 3), Json(3));
  EXPECT_EQ(request_id("not json", 4), Json(4));
  EXPECT_EQ(request_id(R"([1, 2])", 5), Json(5));
}

TEST(RequestJson, OutputLines) {
  EXPECT_EQ(
      result_line(Json("a"), "hi \"there\"", 3, 1.23456, 9.87654),
      R"({"id":"a","completion":"hi \"there\"","new_tokens":3,"ttft_ms":1.235,"latency_ms":9.877})");
  EXPECT_EQ(error_line(Json(7), "empty prompt"), R"({"id":7,"error":"empty prompt"})");
  EXPECT_EQ(delta_line(Json(7), " the"), R"({"id":7,"delta":" the"})");
  // Invalid UTF-8 from a partial token is replaced, never a throw.
  EXPECT_NO_THROW(delta_line(Json(7), std::string("\xe2\x82", 2)));
}

}  // namespace
}  // namespace fp8moe::serve
