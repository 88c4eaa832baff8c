// kernels/kernels_simd.h — the fast kernels, written once over a 16-lane vector type.
// Owner: kernels (internal). Included ONLY by the ISA files (kernels_avx2.cpp,
// kernels_avx512.cpp), each with its own vector traits S. Thread-safety: pure functions.
//
// Why one body for two ISAs. Every kernel here is a template on S, a traits struct
// that defines V (16 f32 lanes: one zmm on AVX-512, two ymm on AVX2) and its ops with
// identical rounding (explicit FMA, the same reduction tree). So the AVX2 and AVX-512
// builds compute the same operations in the same order and give bitwise-identical
// results: a request regenerated on another machine of the fleet reproduces its tokens.
// Each ISA file defines S in an anonymous namespace, which gives every instantiation
// internal linkage: no AVX-512 code can be shared with the AVX2 build by the linker.
//
// What S must provide (all static, inline):
//   V zero(), set1(float), load(const float*), store(float*, V)
//   V add(V,V), sub(V,V), mul(V,V), div(V,V), max(V,V), min(V,V)   (min/max: 2nd operand on NaN)
//   V fmadd(V a, V b, V c) = a*b+c with one rounding
//   V round(V) (to nearest even), V pow2i(V n) = 2^n for integral n in [-126, 127]
//   V select_lt(V a, V b, V t, V f) = a < b ? t : f (per lane, ordered compare)
//   float hsum(V), hmax(V) — tree: 16 -> 8 (j + j+8) -> 4 (j + j+4) -> 2 (j + j+2) -> 1
//   V load_f16(const uint8_t*), load_bf16(const uint8_t*)  (16 elements each)
//   V bcast_f16(const uint8_t* p)  (the f16 at p, widened, in every lane)
//   V load_q8(const uint8_t* qs16, V d)  (16 int8 times d; exact)
//   constants kRows, kToks: matmul register tile (rows x tokens) for n_tok > 1,
//             kRows1: rows per tile when n_tok == 1.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace lmx {
namespace simd {

constexpr int kLanes = 16;

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// ---------------------------------------------------------------------------------------
// exp: Cephes expf. x = n ln2 + r, |r| <= ln2/2, e^r by a degree-7 polynomial, times 2^n.
// Max error ~2 ulp over the range. Below ln(FLT_MIN) the result is 0 (so -inf -> 0);
// above 88.376 it saturates at ~2.4e38 instead of inf; NaN propagates.
template <class S>
static inline typename S::V exp_v(typename S::V x) {
    using V = typename S::V;
    const V x_c = S::min(S::set1(88.3762626647949f), x);
    const V n = S::round(S::mul(x_c, S::set1(1.44269504088896341f)));
    V r = S::fmadd(n, S::set1(-0.693359375f), x_c);
    r = S::fmadd(n, S::set1(2.12194440e-4f), r);
    V p = S::set1(1.9875691500e-4f);
    p = S::fmadd(p, r, S::set1(1.3981999507e-3f));
    p = S::fmadd(p, r, S::set1(8.3334519073e-3f));
    p = S::fmadd(p, r, S::set1(4.1665795894e-2f));
    p = S::fmadd(p, r, S::set1(1.6666665459e-1f));
    p = S::fmadd(p, r, S::set1(5.0000001201e-1f));
    const V r2 = S::mul(r, r);
    p = S::fmadd(p, r2, S::add(r, S::set1(1.0f)));
    // n >= -126 whenever x_c >= -87.34, the only case whose result is kept.
    const V n_c = S::max(S::set1(-126.0f), n);
    const V e = S::mul(p, S::pow2i(n_c));
    return S::select_lt(x_c, S::set1(-87.3365447505531f), S::zero(), e);
}

// Loads the last n_tail (< 16) floats of src into lanes 0..n_tail-1, `pad` elsewhere.
template <class S>
static inline typename S::V load_tail(const float* src, int64_t n_tail, float pad) {
    float buf[kLanes];
    for (int64_t i = 0; i < kLanes; ++i) buf[i] = i < n_tail ? src[i] : pad;
    return S::load(buf);
}

template <class S>
static inline void store_tail(float* dst, int64_t n_tail, typename S::V v) {
    float buf[kLanes];
    S::store(buf, v);
    for (int64_t i = 0; i < n_tail; ++i) dst[i] = buf[i];
}

// ---------------------------------------------------------------------------------------
// matmul
//
// Accumulation order (the batch- and thread-invariance contract): for output (t, o),
// lane j of one accumulator sums x[t, i] * W[o, i] for i = j, j+16, j+32, ... in that
// order with FMA, the zero-padded last partial step included; then hsum's fixed tree;
// then + bias[o]. Register tiling over rows and tokens only changes which (t, o) pairs
// are computed side by side, never this order, so every tile shape gives the same bits.
//
// Loaders turn step s (elements 16s .. 16s+15) of one weight row into 16 exact f32.

template <class S>
struct LoadF32 {
    static constexpr bool kBlocks = false;
    static constexpr int64_t kElemBytes = 4;
    static typename S::V load(const uint8_t* row, int64_t s) {
        return S::load(reinterpret_cast<const float*>(row) + s * kLanes);
    }
};
template <class S>
struct LoadF16 {
    static constexpr bool kBlocks = false;
    static constexpr int64_t kElemBytes = 2;
    static typename S::V load(const uint8_t* row, int64_t s) { return S::load_f16(row + s * 32); }
};
template <class S>
struct LoadBF16 {
    static constexpr bool kBlocks = false;
    static constexpr int64_t kElemBytes = 2;
    static typename S::V load(const uint8_t* row, int64_t s) { return S::load_bf16(row + s * 32); }
};
template <class S>
struct LoadQ8 {
    static constexpr int64_t kElemBytes = 0;  // blocks; n_in % 32 == 0 so no tail
    static constexpr bool kBlocks = true;     // mm_tile walks it block by block (see there)
};

// One register tile: R weight rows (w, stride w_stride bytes) times T tokens (x, stride
// n_in floats) over the whole reduction; writes y[t * y_stride + r].
template <class S, class L, int R, int T>
static inline void mm_tile(const uint8_t* w, int64_t w_stride, const float* x, int64_t n_in, float* y,
                           int64_t y_stride, const float* bias) {
    using V = typename S::V;
    V acc[R][T];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = S::zero();
    const int64_t n_steps = n_in / kLanes;
    if constexpr (L::kBlocks) {
        // q8_0: per block, broadcast each row's scale once, then two steps of 16 with
        // w = d * q (exact), in the same order as the other formats.
        for (int64_t b = 0; b < n_steps / 2; ++b) {
            V d[R];
            for (int r = 0; r < R; ++r) d[r] = S::bcast_f16(w + r * w_stride + b * kQ8BlockBytes);
            for (int64_t h = 0; h < 2; ++h) {
                const int64_t s = 2 * b + h;
                V xv[T];
                for (int t = 0; t < T; ++t) xv[t] = S::load(x + t * n_in + s * kLanes);
                for (int r = 0; r < R; ++r) {
                    const V wv = S::load_q8(w + r * w_stride + b * kQ8BlockBytes + 2 + h * kLanes, d[r]);
                    for (int t = 0; t < T; ++t) acc[r][t] = S::fmadd(xv[t], wv, acc[r][t]);
                }
            }
        }
    } else {
        for (int64_t s = 0; s < n_steps; ++s) {
            V xv[T];
            for (int t = 0; t < T; ++t) xv[t] = S::load(x + t * n_in + s * kLanes);
            for (int r = 0; r < R; ++r) {
                const V wv = L::load(w + r * w_stride, s);
                for (int t = 0; t < T; ++t) acc[r][t] = S::fmadd(xv[t], wv, acc[r][t]);
            }
        }
    }
    if constexpr (!L::kBlocks) {  // q8_0 rows are whole blocks; the others end with a zero-padded step
        const int64_t n_tail = n_in - n_steps * kLanes;
        if (n_tail > 0) {
            alignas(64) uint8_t wbuf[kLanes * 4];
            for (int r = 0; r < R; ++r) {
                std::memset(wbuf, 0, sizeof wbuf);
                std::memcpy(wbuf, w + r * w_stride + n_steps * kLanes * L::kElemBytes,
                            static_cast<size_t>(n_tail * L::kElemBytes));
                const V wv = L::load(wbuf, 0);
                for (int t = 0; t < T; ++t)
                    acc[r][t] = S::fmadd(load_tail<S>(x + t * n_in + n_steps * kLanes, n_tail, 0.0f), wv, acc[r][t]);
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) {
            float v = S::hsum(acc[r][t]);
            if (bias) v += bias[r];
            y[t * y_stride + r] = v;
        }
}

// Picks the tile for a ragged edge: nr <= R rows, nt <= T tokens.
template <class S, class L, int R, int T>
struct TileByToks {
    static void run(int nt, const uint8_t* w, int64_t ws, const float* x, int64_t n_in, float* y, int64_t ys,
                    const float* b) {
        if (nt == T)
            mm_tile<S, L, R, T>(w, ws, x, n_in, y, ys, b);
        else
            TileByToks<S, L, R, T - 1>::run(nt, w, ws, x, n_in, y, ys, b);
    }
};
template <class S, class L, int R>
struct TileByToks<S, L, R, 0> {
    static void run(int, const uint8_t*, int64_t, const float*, int64_t, float*, int64_t, const float*) {}
};
template <class S, class L, int R, int T>
struct TileByRows {
    static void run(int nr, int nt, const uint8_t* w, int64_t ws, const float* x, int64_t n_in, float* y,
                    int64_t ys, const float* b) {
        if (nr == R)
            TileByToks<S, L, R, T>::run(nt, w, ws, x, n_in, y, ys, b);
        else
            TileByRows<S, L, R - 1, T>::run(nr, nt, w, ws, x, n_in, y, ys, b);
    }
};
template <class S, class L, int T>
struct TileByRows<S, L, 0, T> {
    static void run(int, int, const uint8_t*, int64_t, const float*, int64_t, float*, int64_t, const float*) {}
};

// Bytes of activations kept hot in L2 while a task walks its rows (see mm_rows).
constexpr int64_t kTokenTileBytes = 192 * 1024;

// y[:, row0:row1] for all tokens. Loop nest, outer to inner:
//   token tile (<= kTokenTileBytes of x, stays in L2)
//     R rows (their weights stay in L1/L2 while the token blocks stream past)
//       T tokens: one register tile over the whole n_in.
// For decode (n_tok <= T) this streams every weight row exactly once per call and
// applies it to all tokens, which is what makes batched decode nearly free.
template <class S, class L>
static void mm_rows(const WeightView& w, const float* x, int64_t n_tok, float* y, const float* bias, int64_t row0,
                    int64_t row1) {
    const int64_t n_in = w.n_in;
    const int64_t stride = row_bytes(w.dtype, n_in);
    const uint8_t* base = static_cast<const uint8_t*>(w.data);
    if (n_tok == 1) {
        constexpr int R = S::kRows1;
        for (int64_t r = row0; r < row1; r += R) {
            const int nr = static_cast<int>(imin(R, row1 - r));
            TileByRows<S, L, R, 1>::run(nr, 1, base + r * stride, stride, x, n_in, y + r, w.n_out,
                                        bias ? bias + r : nullptr);
        }
        return;
    }
    constexpr int R = S::kRows, T = S::kToks;
    int64_t tile = kTokenTileBytes / (n_in * 4) / T * T;
    if (tile < T) tile = T;
    for (int64_t t0 = 0; t0 < n_tok; t0 += tile) {
        const int64_t t1 = imin(n_tok, t0 + tile);
        for (int64_t r = row0; r < row1; r += R) {
            const int nr = static_cast<int>(imin(R, row1 - r));
            for (int64_t t = t0; t < t1; t += T) {
                const int nt = static_cast<int>(imin(T, t1 - t));
                TileByRows<S, L, R, T>::run(nr, nt, base + r * stride, stride, x + t * n_in, n_in,
                                            y + t * w.n_out + r, w.n_out, bias ? bias + r : nullptr);
            }
        }
    }
}

template <class S>
static void matmul_rows(const WeightView& w, const float* x, int64_t n_tok, float* y, const float* bias,
                        int64_t row0, int64_t row1) {
    switch (w.dtype) {
        case DType::F32: mm_rows<S, LoadF32<S>>(w, x, n_tok, y, bias, row0, row1); break;
        case DType::F16: mm_rows<S, LoadF16<S>>(w, x, n_tok, y, bias, row0, row1); break;
        case DType::BF16: mm_rows<S, LoadBF16<S>>(w, x, n_tok, y, bias, row0, row1); break;
        case DType::Q8_0: mm_rows<S, LoadQ8<S>>(w, x, n_tok, y, bias, row0, row1); break;
    }
}

// ---------------------------------------------------------------------------------------
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

template <class S>
static void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
    const int64_t n_steps = n / kLanes, n_tail = n % kLanes;
    for (int64_t s = 0; s < n_steps; ++s) {
        const int64_t o = s * kLanes;
        S::store(out + o, silu_mul_v<S>(S::load(gate + o), S::load(up + o)));
    }
    if (n_tail) {
        const int64_t o = n_steps * kLanes;
        store_tail<S>(out + o, n_tail,
                      silu_mul_v<S>(load_tail<S>(gate + o, n_tail, 0.0f), load_tail<S>(up + o, n_tail, 0.0f)));
    }
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

// ---------------------------------------------------------------------------------------
// attention: per (query, head), scores = scale * q.k over the causal range, softmax,
// out = sum_p score_p * v_p. Each key's dot product and each output element follow a
// fixed order that depends only on the query's absolute position, never on n_q.

// q.k over head_dim: 16-lane FMA steps, hsum, then the ragged tail in order.
template <class S>
static inline float dot_head(const float* q, const float* k, int head_dim) {
    typename S::V acc = S::zero();
    const int n_steps = head_dim / kLanes;
    for (int s = 0; s < n_steps; ++s) acc = S::fmadd(S::load(q + s * kLanes), S::load(k + s * kLanes), acc);
    float r = S::hsum(acc);
    for (int d = n_steps * kLanes; d < head_dim; ++d) r = __builtin_fmaf(q[d], k[d], r);
    return r;
}

template <class S>
static void attention(const float* q, int64_t n_q, int64_t pos0, const float* const* k_blocks,
                      const float* const* v_blocks, int block_tokens, int n_heads, int n_kv_heads, int head_dim,
                      float scale, float* out, float* scratch) {
    using V = typename S::V;
    const int group = n_heads / n_kv_heads;
    const int64_t kv_row = static_cast<int64_t>(n_kv_heads) * head_dim;  // floats per cached token
    const int n_steps = head_dim / kLanes;
    constexpr int kChunk = 8;  // output vectors accumulated at once in the V sum (128 dims)
    for (int64_t i = 0; i < n_q; ++i) {
        const int64_t n_keys = pos0 + i + 1;
        for (int h = 0; h < n_heads; ++h) {
            const float* qh = q + (i * n_heads + h) * head_dim;
            const int64_t kv_off = static_cast<int64_t>(h / group) * head_dim;
            // scores, block by block so the block lookup is out of the inner loop
            for (int64_t p0 = 0; p0 < n_keys; p0 += block_tokens) {
                const float* kb = k_blocks[p0 / block_tokens] + kv_off;
                const int64_t n_in_block = imin(block_tokens, n_keys - p0);
                for (int64_t j = 0; j < n_in_block; ++j)
                    scratch[p0 + j] = dot_head<S>(qh, kb + j * kv_row, head_dim) * scale;
            }
            softmax<S>(scratch, n_keys);
            float* oh = out + (i * n_heads + h) * head_dim;
            for (int c0 = 0; c0 < n_steps; c0 += kChunk) {
                const int nc = static_cast<int>(imin(kChunk, n_steps - c0));
                V acc[kChunk];
                for (int c = 0; c < kChunk; ++c) acc[c] = S::zero();
                for (int64_t p0 = 0; p0 < n_keys; p0 += block_tokens) {
                    const float* vb = v_blocks[p0 / block_tokens] + kv_off + c0 * kLanes;
                    const int64_t n_in_block = imin(block_tokens, n_keys - p0);
                    for (int64_t j = 0; j < n_in_block; ++j) {
                        const V pv = S::set1(scratch[p0 + j]);
                        const float* v = vb + j * kv_row;
                        for (int c = 0; c < nc; ++c) acc[c] = S::fmadd(pv, S::load(v + c * kLanes), acc[c]);
                    }
                }
                for (int c = 0; c < nc; ++c) S::store(oh + (c0 + c) * kLanes, acc[c]);
            }
            for (int d = n_steps * kLanes; d < head_dim; ++d) {  // ragged head_dim tail
                float acc = 0.0f;
                for (int64_t p = 0; p < n_keys; ++p)
                    acc = __builtin_fmaf(scratch[p],
                                         v_blocks[p / block_tokens][(p % block_tokens) * kv_row + kv_off + d], acc);
                oh[d] = acc;
            }
        }
    }
}

}  // namespace simd
}  // namespace lmx
