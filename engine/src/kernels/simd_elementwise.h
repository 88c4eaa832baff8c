// kernels/simd_elementwise.h — rmsnorm, silu_mul, gelu_tanh_mul, softmax on 16-lane vectors.
// Owner: kernels (internal). Included only by the ISA files (see simd.h).
// Thread-safety: pure functions.
#pragma once

#include <cstdint>

#include "simd.h"

namespace lmx {
namespace simd {

// element-wise ops. Ragged tails go through a padded 16-lane step, so every element is
// computed by the same vector code whatever its index: results do not depend on n.

template <class S>
static void rmsnorm(const float* x, const float* weight, float eps, int64_t n_tok, int64_t dim, float* y) {
    using V = typename S::V;
    const int64_t n_steps = dim / kLanes, n_tail = dim % kLanes;
    for (int64_t t = 0; t < n_tok; ++t) {
        const float* xt = x + t * dim;
        float* yt = y + t * dim;
        V ss = S::zero();
        for (int64_t s = 0; s < n_steps; ++s) {
            const V v = S::load(xt + s * kLanes);
            ss = S::fmadd(v, v, ss);
        }
        if (n_tail) {
            const V v = load_tail<S>(xt + n_steps * kLanes, n_tail, 0.0f);
            ss = S::fmadd(v, v, ss);
        }
        const float mean = S::hsum(ss) / static_cast<float>(dim);
        const float inv_s = 1.0f / __builtin_sqrtf(mean + eps);
        const V inv = S::set1(inv_s);
        // Same order as Hugging Face: weight * (x * rsqrt(var + eps)).
        for (int64_t s = 0; s < n_steps; ++s)
            S::store(yt + s * kLanes, S::mul(S::load(weight + s * kLanes), S::mul(S::load(xt + s * kLanes), inv)));
        if (n_tail) {
            const int64_t o = n_steps * kLanes;
            store_tail<S>(yt + o, n_tail,
                          S::mul(load_tail<S>(weight + o, n_tail, 0.0f),
                                 S::mul(load_tail<S>(xt + o, n_tail, 0.0f), inv)));
        }
    }
}

template <class S>
static inline typename S::V silu_mul_v(typename S::V g, typename S::V u) {
    const typename S::V e = exp_v<S>(S::sub(S::zero(), g));
    return S::mul(S::div(g, S::add(S::set1(1.0f), e)), u);
}

// out = act(gate) * up over n floats, whole vectors then a masked tail: the loop of every gated
// activation (Act: silu_mul_v, gelu_tanh_mul_v).
template <class S, typename S::V (*Act)(typename S::V, typename S::V)>
static void gated_mul(const float* gate, const float* up, float* out, int64_t n) {
    const int64_t n_steps = n / kLanes, n_tail = n % kLanes;
    for (int64_t s = 0; s < n_steps; ++s) {
        const int64_t o = s * kLanes;
        S::store(out + o, Act(S::load(gate + o), S::load(up + o)));
    }
    if (n_tail) {
        const int64_t o = n_steps * kLanes;
        store_tail<S>(out + o, n_tail, Act(load_tail<S>(gate + o, n_tail, 0.0f), load_tail<S>(up + o, n_tail, 0.0f)));
    }
}

template <class S>
static void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
    gated_mul<S, silu_mul_v<S>>(gate, up, out, n);
}

// Gemma's GeGLU. 0.5 x (1 + tanh(y)) = x / (1 + exp(-2y)) exactly, so the tanh-GELU is x times the
// logistic of 2y: one exp_v and one division, no cancellation near y = 0 (where 1 + tanh would be
// computed as a difference). y = beta (x + kappa x^3) as PyTorch forms it. For x < -9 the exp saturates
// and the product is 0 or a denormal, as the reference's tanh gives.
template <class S>
static inline typename S::V gelu_tanh_mul_v(typename S::V g, typename S::V u) {
    using V = typename S::V;
    const V x3 = S::mul(S::mul(g, g), g);
    const V y = S::mul(S::set1(0.7978845608028654f), S::fmadd(S::set1(0.044715f), x3, g));
    const V e = exp_v<S>(S::mul(S::set1(-2.0f), y));
    return S::mul(S::div(g, S::add(S::set1(1.0f), e)), u);
}

template <class S>
static void gelu_tanh_mul(const float* gate, const float* up, float* out, int64_t n) {
    gated_mul<S, gelu_tanh_mul_v<S>>(gate, up, out, n);
}

template <class S>
static void softmax(float* x, int64_t n) {
    using V = typename S::V;
    if (n <= 0) return;
    const int64_t n_steps = n / kLanes, n_tail = n % kLanes;
    const float neg_inf = -__builtin_inff();
    V m = S::set1(neg_inf);
    for (int64_t s = 0; s < n_steps; ++s) m = S::max(m, S::load(x + s * kLanes));
    if (n_tail) m = S::max(m, load_tail<S>(x + n_steps * kLanes, n_tail, neg_inf));
    const V mx = S::set1(S::hmax(m));
    V sum = S::zero();
    for (int64_t s = 0; s < n_steps; ++s) {
        const V e = exp_v<S>(S::sub(S::load(x + s * kLanes), mx));
        S::store(x + s * kLanes, e);
        sum = S::add(sum, e);
    }
    if (n_tail) {
        const V e = exp_v<S>(S::sub(load_tail<S>(x + n_steps * kLanes, n_tail, neg_inf), mx));
        store_tail<S>(x + n_steps * kLanes, n_tail, e);
        sum = S::add(sum, e);
    }
    const V inv = S::set1(1.0f / S::hsum(sum));
    for (int64_t s = 0; s < n_steps; ++s) S::store(x + s * kLanes, S::mul(S::load(x + s * kLanes), inv));
    if (n_tail)
        store_tail<S>(x + n_steps * kLanes, n_tail, S::mul(load_tail<S>(x + n_steps * kLanes, n_tail, 0.0f), inv));
}


}  // namespace simd
}  // namespace lmx
