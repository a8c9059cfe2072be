// Checks that a call is refused as the library promises for bad input: fp8moe::Error of kind
// kInvalidArgument whose message names the problem (`needle`).
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "fp8moe/core/error.h"

namespace fp8moe::test {

template <typename F>
void expect_invalid(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one naming '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument) << e.what();
    EXPECT_NE(e.message().find(needle), std::string::npos)
        << "'" << e.message() << "' does not name '" << needle << "'";
  }
}

}  // namespace fp8moe::test
