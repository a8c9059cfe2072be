// One query row of the model's causal attention (src/model/model.cpp, struct Mla): scores q.k
// (nope and rope parts) times scale over keys [0, n), softmax, and the probability-weighted sum
// of the values added into out (zero on entry). kv points at key 0's row for this head (nope key,
// then value; rows kv_stride apart), kpe at key 0's rotated k_pe (rows dr apart); scratch and
// probs hold n floats. Declared for tests: kernels' MLA attention reference is checked against it.
#pragma once

#include <cstdint>

namespace fp8moe {

void attend_row(const float* qv, const float* kv, int64_t kv_stride, const float* kpe, int64_t n,
                int64_t dn, int64_t dr, int64_t dv, float scale, float* scratch, float* probs,
                float* out);

}  // namespace fp8moe
