// kernels/activation.cpp — Gemma's element-wise ops: GeGLU with tanh GELU, logit soft-capping.
// Owner: kernels. Thread-safety: pure functions.
//
// gelu_tanh_mul runs over [n_tok, ffn_dim] on every layer, so the ISA tables carry a vector
// version (simd_elementwise.h: x * logistic(2y), one exp per element); a table without one
// (scalar) uses the float loop below, PyTorch's own order of operations. softcap touches one
// row of logits per sampled token and stays a float loop. The references compute in double:
// the fast versions are tested against them with a stated tolerance
// (engine/tests/test_kernels.cpp). Every element is its own computation, so both are batch
// invariant trivially.
#include <cassert>
#include <cmath>

#include "kernels_impl.h"

namespace lmx {

namespace {
// sqrt(2 / pi) and the cubic coefficient of PyTorch's gelu(approximate="tanh").
constexpr double kGeluBeta = 0.7978845608028654;
constexpr double kGeluKappa = 0.044715;
}  // namespace

namespace ref {

void gelu_tanh_mul(const float* gate, const float* up, float* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const double x = gate[i];
        const double g = 0.5 * x * (1.0 + std::tanh(kGeluBeta * (x + kGeluKappa * x * x * x)));
        out[i] = static_cast<float>(g * static_cast<double>(up[i]));
    }
}

void softcap(float* x, int64_t n, float cap) {
    assert(cap > 0.0f);
    for (int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(cap * std::tanh(static_cast<double>(x[i]) / cap));
}

}  // namespace ref

// PyTorch's own order of operations, in float: 0.5 x (1 + tanh(beta (x + kappa x^3))).
void gelu_tanh_mul(const float* gate, const float* up, float* out, int64_t n) {
    if (const auto vec = kernels_active().gelu_tanh_mul) {
        vec(gate, up, out, n);
        return;
    }
    const float beta = static_cast<float>(kGeluBeta), kappa = static_cast<float>(kGeluKappa);
    for (int64_t i = 0; i < n; ++i) {
        const float x = gate[i];
        const float inner = beta * (x + kappa * x * x * x);
        out[i] = 0.5f * x * (1.0f + std::tanh(inner)) * up[i];
    }
}

// HF: logits / cap, tanh, * cap, each in float.
void softcap(float* x, int64_t n, float cap) {
    assert(cap > 0.0f);
    for (int64_t i = 0; i < n; ++i) x[i] = std::tanh(x[i] / cap) * cap;
}

}  // namespace lmx
