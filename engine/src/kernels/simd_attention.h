// kernels/simd_attention.h — causal attention over a paged KV cache, online softmax per GQA group.
// Owner: kernels (internal). Included only by the ISA files (see simd.h).
// Thread-safety: pure functions.
#pragma once

#include <cstdint>

#include "simd.h"

namespace lmx {
namespace simd {

// One pass over the keys with an online softmax (running max and sum, the output
// rescaled when the max grows), for all the query heads that share a KV head at once:
// each K and V row is read once per group instead of once per head. Keys go in blocks of 16 aligned at position 0, so a query's
// result depends only on its absolute position (n_keys), never on n_q or on the other
// queries: prefill and decode give the same bits. The scratch of the contract is not
// needed here.
//
// KV elements are f32 (E = float) or f16 (E = uint16_t, EngineConfig.kv_dtype "f16"): an f16
// element is widened to f32 exactly as it is loaded, so attention over f16 pages gives the bits
// attention over f32 pages holding the same (f16-rounded) values gives.

// Loads 16 KV elements as f32, and one element (the ragged head_dim tail).
template <class S>
static inline typename S::V kv_load(const float* p) {
    return S::load(p);
}
template <class S>
static inline typename S::V kv_load(const uint16_t* p) {
    return S::load_f16(reinterpret_cast<const uint8_t*>(p));
}
static inline float kv_elem(const float* p, int d) { return p[d]; }
static inline float kv_elem(const uint16_t* p, int d) { return f16_to_f32(p[d]); }

// The rows of one KV head in position order, across the pages: next() returns row p
// for p = 0, 1, 2, ... without a division per key.
template <class S, class E>
struct RowCursor {
    const E* const* blocks;
    int64_t block_tokens, row_floats, offset;  // row_floats: elements per row
    int64_t b = 0, r = 0;
    const E* next() {
        const E* p = blocks[b] + r * row_floats + offset;
        if (++r == block_tokens) {
            r = 0;
            ++b;
        }
        return p;
    }
    // The next n rows into rows[0 .. n); rows[n .. 16) repeat rows[0] (valid padding).
    void next16(const E* rows[kLanes], int n) {
        if (r + n <= block_tokens) {  // the usual case: one page holds them all
            const E* p = blocks[b] + r * row_floats + offset;
            for (int j = 0; j < n; ++j) rows[j] = p + j * row_floats;
            r += n;
            if (r == block_tokens) {
                r = 0;
                ++b;
            }
        } else {
            for (int j = 0; j < n; ++j) rows[j] = next();
        }
        for (int j = n; j < kLanes; ++j) rows[j] = rows[0];
    }
};

// Query heads handled together per pass over a KV head's rows: at most kAttnMaxGroup,
// and at most kAttnStateVecs output vectors (16 floats) in all, which bounds the state
// on the stack; larger groups take several passes.
constexpr int kAttnMaxGroup = 8;
constexpr int kAttnStateVecs = 128;

// scale * q.k for 16 keys: one accumulator per key over head_dim (16-lane FMA steps,
// NS steps when known at compile time), S::hsum16 (hsum's own tree, so a key's score
// has the same bits in any lane), the ragged head_dim tail in order, then the scale.
template <class S, int NS, class E>
static inline typename S::V attention_scores16(const float* qh, const E* const* k, int head_dim, float scale) {
    using V = typename S::V;
    const int n_steps = NS > 0 ? NS : head_dim / kLanes;
    V acc[kLanes];
    for (int j = 0; j < kLanes; ++j) {
        V a = S::zero();
        for (int s = 0; s < n_steps; ++s) a = S::fmadd(S::load(qh + s * kLanes), kv_load<S>(k[j] + s * kLanes), a);
        acc[j] = a;
    }
    V sc = S::hsum16(acc);
    if (head_dim % kLanes) {
        float tmp[kLanes];
        S::store(tmp, sc);
        for (int j = 0; j < kLanes; ++j)
            for (int d = n_steps * kLanes; d < head_dim; ++d) tmp[j] = __builtin_fmaf(qh[d], kv_elem(k[j], d), tmp[j]);
        sc = S::load(tmp);
    }
    return S::mul(sc, S::set1(scale));
}

// One query, the n_group heads q[g] that read the KV head under `keys` / `values`;
// writes out[g] for each. q and out: [n_group, head_dim].
// Precondition: n_group <= kAttnMaxGroup, n_group * (head_dim / 16) <= kAttnStateVecs.
// acc = acc * rescale + sum_j w[j] v[j] over the n_vecs output vectors; even and odd
// keys into `even` / `odd`. With NS (= n_vecs) known at compile time the accumulators
// live in registers for the whole block.
template <class S, int NS, class E>
static inline void attention_accumulate(const float* w, const E* const* v, int n, float rescale, int n_vecs,
                                        typename S::V* even, typename S::V* odd) {
    using V = typename S::V;
    constexpr int kN = NS > 0 ? NS : 1;
    if constexpr (NS > 0) n_vecs = NS;
    for (int c0 = 0; c0 < n_vecs; c0 += kN) {
        const int nc = static_cast<int>(imin(kN, n_vecs - c0));
        V ea[kN], oa[kN];
        for (int c = 0; c < nc; ++c) {
            ea[c] = even[c0 + c];
            oa[c] = odd[c0 + c];
        }
        if (rescale != 1.0f) {  // x * 1 == x: skipping keeps the bits
            const V rs = S::set1(rescale);
            for (int c = 0; c < nc; ++c) {
                ea[c] = S::mul(ea[c], rs);
                oa[c] = S::mul(oa[c], rs);
            }
        }
        int j = 0;
        for (; j + 2 <= n; j += 2) {
            const V w0 = S::set1(w[j]), w1 = S::set1(w[j + 1]);
            for (int c = 0; c < nc; ++c) {
                ea[c] = S::fmadd(w0, kv_load<S>(v[j] + (c0 + c) * kLanes), ea[c]);
                oa[c] = S::fmadd(w1, kv_load<S>(v[j + 1] + (c0 + c) * kLanes), oa[c]);
            }
        }
        if (j < n) {
            const V w0 = S::set1(w[j]);
            for (int c = 0; c < nc; ++c) ea[c] = S::fmadd(w0, kv_load<S>(v[j] + (c0 + c) * kLanes), ea[c]);
        }
        for (int c = 0; c < nc; ++c) {
            even[c0 + c] = ea[c];
            odd[c0 + c] = oa[c];
        }
    }
}

template <class S, int NS, class E>
static void attention_group(const float* q, float* out, int n_group, RowCursor<S, E> keys, RowCursor<S, E> values,
                            int64_t n_keys, int head_dim, float scale) {
    using V = typename S::V;
    const int n_vecs = NS > 0 ? NS : head_dim / kLanes;
    const float neg_inf = -__builtin_inff();
    float m[kAttnMaxGroup], l[kAttnMaxGroup];  // running max and sum of exp per head
    // Output accumulators [n_group, n_vecs]; even and odd keys feed separate sets (two
    // FMA chains), added at the end.
    V even[kAttnStateVecs], odd[kAttnStateVecs];
    float tail[kAttnMaxGroup][kLanes];  // ragged head_dim tail, in key order
    for (int g = 0; g < n_group; ++g) {
        m[g] = neg_inf;
        l[g] = 0.0f;
        for (int c = 0; c < n_vecs; ++c) even[g * n_vecs + c] = odd[g * n_vecs + c] = S::zero();
        for (int d = 0; d < kLanes; ++d) tail[g][d] = 0.0f;
    }
    for (int64_t p0 = 0; p0 < n_keys; p0 += kLanes) {
        const int n = static_cast<int>(imin(kLanes, n_keys - p0));
        const E* k[kLanes];
        const E* v[kLanes];
        keys.next16(k, n);  // padding rows are scored, then masked to -inf
        values.next16(v, n);
        for (int g = 0; g < n_group; ++g) {
            V sc = attention_scores16<S, NS>(q + g * head_dim, k, head_dim, scale);
            alignas(64) float w[kLanes];  // exp(score - new max) of this block, 0 past n
            if (n < kLanes) {
                S::store(w, sc);
                for (int j = n; j < kLanes; ++j) w[j] = neg_inf;
                sc = S::load(w);
            }
            const float bm = S::hmax(sc);
            const float m_new = bm > m[g] ? bm : m[g];
            // Both exps through the vector routine: one function for every element.
            S::store(w, exp_v<S>(S::set1(m[g] - m_new)));  // 0 on the first block (m = -inf)
            const float rescale = w[0];
            const V e = exp_v<S>(S::sub(sc, S::set1(m_new)));
            S::store(w, e);
            l[g] = l[g] * rescale + S::hsum(e);
            m[g] = m_new;
            // out += w . V, each weight broadcast once and applied to the whole row.
            attention_accumulate<S, NS>(w, v, n, rescale, n_vecs, even + g * n_vecs, odd + g * n_vecs);
            for (int d = n_vecs * kLanes; d < head_dim; ++d) {
                float acc = tail[g][d - n_vecs * kLanes] * rescale;
                for (int jj = 0; jj < n; ++jj) acc = __builtin_fmaf(w[jj], kv_elem(v[jj], d), acc);
                tail[g][d - n_vecs * kLanes] = acc;
            }
        }
    }
    for (int g = 0; g < n_group; ++g) {
        const V inv = S::set1(l[g]);
        for (int c = 0; c < n_vecs; ++c)
            S::store(out + g * head_dim + c * kLanes, S::div(S::add(even[g * n_vecs + c], odd[g * n_vecs + c]), inv));
        for (int d = n_vecs * kLanes; d < head_dim; ++d) out[g * head_dim + d] = tail[g][d - n_vecs * kLanes] / l[g];
    }
}

template <class S, class E = float>
static void attention(const float* q, int64_t n_q, int64_t pos0, const E* const* k_blocks,
                      const E* const* v_blocks, int block_tokens, int n_heads, int n_kv_heads, int head_dim,
                      float scale, float* out, float* scratch, int kv0, int kv1, int64_t window) {
    (void)scratch;
    const int group = n_heads / n_kv_heads;
    const int64_t kv_row = static_cast<int64_t>(n_kv_heads) * head_dim;  // floats per cached token
    const int n_vecs = head_dim / kLanes > 0 ? head_dim / kLanes : 1;
    const int per_pass = static_cast<int>(imin(kAttnMaxGroup, imin(kAttnStateVecs / n_vecs, group)));
    for (int64_t i = 0; i < n_q; ++i) {
        // A sliding window starts the cursors at its first key; blocks of 16 keys are then
        // aligned at that key, which depends only on the query's position: still the same
        // bits in prefill and decode.
        const int64_t n_all = pos0 + i + 1;
        const int64_t k0 = window > 0 && n_all > window ? n_all - window : 0;
        const int64_t n_keys = n_all - k0;
        for (int kv = kv0; kv < kv1; ++kv) {
            const RowCursor<S, E> keys{k_blocks, block_tokens, kv_row, static_cast<int64_t>(kv) * head_dim,
                                    k0 / block_tokens, k0 % block_tokens};
            const RowCursor<S, E> values{v_blocks, block_tokens, kv_row, static_cast<int64_t>(kv) * head_dim,
                                      k0 / block_tokens, k0 % block_tokens};
            for (int g0 = 0; g0 < group; g0 += per_pass) {
                const int n_group = static_cast<int>(imin(per_pass, group - g0));
                const int64_t off = (i * n_heads + static_cast<int64_t>(kv) * group + g0) * head_dim;
                switch (head_dim) {  // unrolled q.k for the usual head sizes
                    case 64:
                        attention_group<S, 4, E>(q + off, out + off, n_group, keys, values, n_keys, head_dim, scale);
                        break;
                    case 128:
                        attention_group<S, 8, E>(q + off, out + off, n_group, keys, values, n_keys, head_dim, scale);
                        break;
                    default:
                        attention_group<S, 0, E>(q + off, out + off, n_group, keys, values, n_keys, head_dim, scale);
                        break;
                }
            }
        }
    }
}


}  // namespace simd
}  // namespace lmx
