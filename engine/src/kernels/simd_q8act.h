// kernels/simd_q8act.h — MatmulPrecision::Fast for q8_0 / q4_0 weights: int8 activations, integer block dots.
// Owner: kernels (internal). Included only by the ISA files, each with its own dot traits D
// defined in an anonymous namespace (internal linkage, as for simd.h's S).
// Thread-safety: pure functions; the caller splits rows across threads.
//
// The math is ref::act_to_q8 / ref::matmul_rows_q8act (reference.cpp), reproduced bit for
// bit: per (row, token) one 8-lane f32 accumulator, lane j owning the int32 lane j of the
// block dot (elements 4j .. 4j+3 of the block), fma(float(isum), d_w * d_x, lane) per
// block in order, then hsum's tree. Integer sums are exact, so how an ISA forms them
// (vpdpbusd or vpmaddubsw + vpmaddwd) cannot change a bit. Written on 256-bit vectors:
// one block is one ymm, and Zen 4 runs a zmm op as two ymm halves anyway.
//
// What D must provide (static, inline): __m256i dot_acc(__m256i acc, __m256i u, __m256i s)
// = acc + (lane j: sum over k < 4 of u[4j+k] (unsigned) * s[4j+k] (signed)), exact for
// u * s up to 128 * 127 (and for u up to 255 when kWideU); constants kRows1 (rows per
// tile, one token), kRows x kToks (tile for several tokens).
//
// Both operands of the dot must be 8-bit with one of them unsigned:
//   q8_0, kWideU (vpdpbusd): u = x + 128, s = w, then minus 128 * sum(w) per lane,
//         folded into the accumulator's start value (per row and block, shared by the
//         tokens): one instruction per (row, token, block).
//   q8_0 otherwise (vpmaddubsw saturates s16 pairs past 32767, so u stays below 129):
//         u = |w|, s = x with w's sign (vpsignb), so u * s = w * x.
//   q4_0: u = nibble (0..15), s = x, then minus 8 * sum(x) per lane: the "- 8" of every
//         weight, folded into the start value (per token and block).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels_impl.h"
#include "simd_matmul.h"

namespace lmx {
namespace simd {

// The one block-dot layout for both weight formats (see the header comment).
template <class D, bool kQ4>
struct Q8ActTile {
    static constexpr int64_t kBlockBytes = kQ4 ? kQ4BlockBytes : kQ8BlockBytes;

    static __m256 dw_of(const uint8_t* blk) {
        uint16_t h;
        std::memcpy(&h, blk, 2);
        return _mm256_cvtph_ps(_mm_set1_epi16(static_cast<short>(h)));
    }
    // Nibbles of a q4_0 block as 32 bytes in element order: low nibbles are elements
    // 0..15, high nibbles 16..31.
    static __m256i unpack_q4(const uint8_t* qs16) {  // the 16 bytes in both halves, the high half >> 4
        const __m256i q = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs16)));
        return _mm256_and_si256(_mm256_srlv_epi64(q, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(15));
    }
    static float hsum8(__m256 a) {  // lanes j + j+4, j + j+2, j + j+1: the reference's tree
        const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
    }

    // R weight rows x T tokens over all n_blocks; writes y[t * y_stride + r].
    template <int R, int T>
    static void tile(const uint8_t* w, int64_t w_stride, const uint8_t* act, int64_t a_stride, int64_t n_in,
                     float* y, int64_t y_stride, const float* bias, const uint8_t* pf) {
        __m256 acc[R][T];
        for (int r = 0; r < R; ++r)
            for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
        const int64_t n_blocks = n_in / kQ8BlockElems;
        for (int64_t b = 0; b < n_blocks; ++b) {
            if (pf)  // weights of a tile further on (see simd::mm_rows)
                for (int r = 0; r < R; ++r) __builtin_prefetch(pf + r * w_stride + b * kBlockBytes, 0, 2);
            const __m256i zero = _mm256_setzero_si256();
            __m256i xv[T], start[T];
            __m256 dx[T];
            for (int t = 0; t < T; ++t) {
                const uint8_t* at = act + t * a_stride;
                xv[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at + b * kQ8BlockElems));
                dx[t] = _mm256_broadcast_ss(reinterpret_cast<const float*>(at + n_in) + b);
                if constexpr (kQ4)  // -8 * sum(x) per lane
                    start[t] = _mm256_sub_epi32(zero, D::dot_acc(zero, _mm256_set1_epi8(8), xv[t]));
                else if constexpr (D::kWideU)  // x + 128, unsigned
                    xv[t] = _mm256_xor_si256(xv[t], _mm256_set1_epi8(static_cast<char>(0x80)));
            }
            for (int r = 0; r < R; ++r) {
                const uint8_t* blk = w + r * w_stride + b * kBlockBytes;
                const __m256 dw = dw_of(blk);
                if constexpr (kQ4) {
                    const __m256i u = unpack_q4(blk + 2);
                    for (int t = 0; t < T; ++t) {
                        const __m256i isum = D::dot_acc(start[t], u, xv[t]);
                        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, dx[t]), acc[r][t]);
                    }
                } else if constexpr (D::kWideU) {
                    const __m256i wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
                    // -128 * sum(w) per lane
                    const __m256i row_start =
                        _mm256_sub_epi32(zero, D::dot_acc(zero, _mm256_set1_epi8(static_cast<char>(0x80)), wq));
                    for (int t = 0; t < T; ++t) {
                        const __m256i isum = D::dot_acc(row_start, xv[t], wq);
                        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, dx[t]), acc[r][t]);
                    }
                } else {
                    const __m256i wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
                    const __m256i u = _mm256_abs_epi8(wq);
                    for (int t = 0; t < T; ++t) {
                        const __m256i isum = D::dot_acc(zero, u, _mm256_sign_epi8(xv[t], wq));
                        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, dx[t]), acc[r][t]);
                    }
                }
            }
        }
        for (int r = 0; r < R; ++r)
            for (int t = 0; t < T; ++t) {
                float v = hsum8(acc[r][t]);
                if (bias) v += bias[r];
                y[t * y_stride + r] = v;
            }
    }

    // tile<R, T> for a ragged edge: nr <= R rows, nt <= T tokens.
    template <int R, int T>
    static void tile_any(int nr, int nt, const uint8_t* w, int64_t ws, const uint8_t* act, int64_t as, int64_t n_in,
                         float* y, int64_t ys, const float* bias, const uint8_t* pf) {
        if constexpr (R > 0 && T > 0) {
            if (nr < R) return tile_any<R - 1, T>(nr, nt, w, ws, act, as, n_in, y, ys, bias, pf);
            if (nt < T) return tile_any<R, T - 1>(nr, nt, w, ws, act, as, n_in, y, ys, bias, pf);
            tile<R, T>(w, ws, act, as, n_in, y, ys, bias, pf);
        }
    }

    // Same loop nest as simd::mm_rows: token tiles kept in L2, R rows x T tokens per tile,
    // weights prefetched kPrefetchTiles row tiles ahead.
    static void rows(const WeightView& w, const uint8_t* act, int64_t n_tok, float* y, const float* bias,
                     int64_t row0, int64_t row1) {
        const int64_t n_in = w.n_in, a_stride = q8_act_row_bytes(n_in);
        const int64_t stride = row_bytes(w.dtype, n_in);
        const uint8_t* base = static_cast<const uint8_t*>(w.data);
        auto imin = [](int64_t a, int64_t b) { return a < b ? a : b; };
        auto prefetch_for = [&](int64_t r, int R) -> const uint8_t* {
            const int64_t ahead = r + kPrefetchTiles * R;
            return ahead + R <= row1 ? base + ahead * stride : nullptr;
        };
        if (n_tok == 1) {
            constexpr int R = D::kRows1;
            prefetch_task_head(base + row0 * stride, imin(row1 - row0, kPrefetchTiles * R) * stride);
            for (int64_t r = row0; r < row1; r += R)
                tile_any<R, 1>(static_cast<int>(imin(R, row1 - r)), 1, base + r * stride, stride, act, a_stride, n_in,
                               y + r, w.n_out, bias ? bias + r : nullptr, prefetch_for(r, R));
            return;
        }
        constexpr int R = D::kRows, T = D::kToks;
        int64_t tile = kTokenTileBytes / a_stride / T * T;
        if (tile < T) tile = T;
        for (int64_t t0 = 0; t0 < n_tok; t0 += tile) {
            const int64_t t1 = imin(n_tok, t0 + tile);
            for (int64_t r = row0; r < row1; r += R)
                for (int64_t t = t0; t < t1; t += T)
                    tile_any<R, T>(static_cast<int>(imin(R, row1 - r)), static_cast<int>(imin(T, t1 - t)),
                                   base + r * stride, stride, act + t * a_stride, a_stride, n_in, y + t * w.n_out + r,
                                   w.n_out, bias ? bias + r : nullptr, t == t0 ? prefetch_for(r, R) : nullptr);
        }
    }
};

// ref::act_to_q8 on ymm: amax by a max tree (exact in any order), x * id rounded by
// vcvtps2dq (nearest even, the default MXCSR mode), packed with saturation; the max
// with -127 only matters for non-finite input.
template <class D>
static void act_to_q8(const float* x, int64_t n_tok, int64_t n_in, uint8_t* act) {
    const int64_t n_blocks = n_in / kQ8BlockElems;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t t = 0; t < n_tok; ++t) {
        const float* xt = x + t * n_in;
        uint8_t* qs = act + t * q8_act_row_bytes(n_in);
        for (int64_t b = 0; b < n_blocks; ++b) {
            const float* xb = xt + b * kQ8BlockElems;
            __m256 v[4];
            for (int k = 0; k < 4; ++k) v[k] = _mm256_loadu_ps(xb + 8 * k);
            const __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                           _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
            const float d = _mm_cvtss_f32(m4) / 127.0f;
            const float id = d != 0.0f ? 1.0f / d : 0.0f;
            std::memcpy(qs + n_in + 4 * b, &d, 4);
            const __m256 idv = _mm256_set1_ps(id);
            __m256i i[4];
            for (int k = 0; k < 4; ++k) i[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], idv));
            // packs interleave 128-bit halves; the permute restores element order.
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
            p = _mm256_max_epi8(_mm256_permutevar8x32_epi32(p, order), _mm256_set1_epi8(-127));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(qs + b * kQ8BlockElems), p);
            // sum of the 32 q: byte sums of q + 128 in four 64-bit lanes, less 32 * 128
            const __m256i s4 = _mm256_sad_epu8(_mm256_xor_si256(p, _mm256_set1_epi8(static_cast<char>(0x80))),
                                               _mm256_setzero_si256());
            const __m128i s2 = _mm_add_epi64(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
            const int32_t sum = static_cast<int32_t>(_mm_cvtsi128_si64(_mm_add_epi64(s2, _mm_unpackhi_epi64(s2, s2)))) -
                                static_cast<int32_t>(kQ8BlockElems * 128);
            std::memcpy(qs + n_in + 4 * (n_blocks + b), &sum, 4);
        }
    }
}

// ---- the x16 formats (kernels.h) on 256-bit vectors ----
//
// A 16-row group as two halves of 8 rows: per block, per 4-element step k, one ymm of
// weights (8 rows x 4 bytes) meets the token's 4 activation bytes broadcast, and
// D::dot_acc leaves row r's block dot in int32 lane r: no horizontal sums. q8_0x16
// stores q + 128, which vpmaddubsw cannot take (it saturates), so q is restored and
// |q| x (x with q's sign) dotted; q4_0x16 dots the nibble (q + 8) and starts each block
// at -8 * sum(x). Then per block fma(float(isum), d_w * d_x, acc): ref::matmul_rows_x16.
// Used by the AVX2 table and AVX-512 without VNNI (kernels_avx512.cpp has the zmm one).
template <class D, bool kQ4>
struct X16Ymm {
    static constexpr int T = 2;  // tokens per tile: 2 x 2 halves x (int + float) = 8 ymm

    template <int NT>
    static void tile(const uint8_t* group, const uint8_t* act, int64_t a_stride, int64_t n_in, float* y,
                     int64_t y_stride, const float* bias) {
        constexpr int64_t kQuant = kQ4 ? 256 : 512;
        const int64_t n_b = n_in / kQ8BlockElems;
        const uint8_t* scales = group + n_b * kQuant;
        auto bcast4 = [](const uint8_t* p) {
            int32_t v;
            std::memcpy(&v, p, 4);
            return _mm256_set1_epi32(v);
        };
        __m256 acc[2][NT];
        for (int h = 0; h < 2; ++h)
            for (int t = 0; t < NT; ++t) acc[h][t] = _mm256_setzero_ps();
        for (int64_t b = 0; b < n_b; ++b) {
            __m256i ia[2][NT];
            for (int t = 0; t < NT; ++t) {
                int32_t sum = 0;
                if constexpr (kQ4) std::memcpy(&sum, act + t * a_stride + n_in + 4 * (n_b + b), 4);
                ia[0][t] = ia[1][t] = _mm256_set1_epi32(-8 * sum);
            }
            const uint8_t* qb = group + b * kQuant;
            if constexpr (kQ4) {
                for (int k = 0; k < 4; ++k)
                    for (int h = 0; h < 2; ++h) {
                        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + k * 64 + 32 * h));
                        const __m256i lo = _mm256_and_si256(raw, _mm256_set1_epi8(15));
                        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), _mm256_set1_epi8(15));
                        for (int t = 0; t < NT; ++t) {
                            const uint8_t* xb = act + t * a_stride + b * kQ8BlockElems;
                            ia[h][t] = D::dot_acc(D::dot_acc(ia[h][t], lo, bcast4(xb + 4 * k)), hi, bcast4(xb + 16 + 4 * k));
                        }
                    }
            } else {
                for (int k = 0; k < 8; ++k)
                    for (int h = 0; h < 2; ++h) {
                        const __m256i wq = _mm256_xor_si256(
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + k * 64 + 32 * h)),
                            _mm256_set1_epi8(static_cast<char>(0x80)));
                        const __m256i u = _mm256_abs_epi8(wq);
                        for (int t = 0; t < NT; ++t)
                            ia[h][t] = D::dot_acc(ia[h][t], u,
                                                  _mm256_sign_epi8(bcast4(act + t * a_stride + b * kQ8BlockElems + 4 * k), wq));
                    }
            }
            for (int h = 0; h < 2; ++h) {
                const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + b * 32 + 16 * h)));
                for (int t = 0; t < NT; ++t) {
                    float dx;
                    std::memcpy(&dx, act + t * a_stride + n_in + 4 * b, 4);
                    acc[h][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[h][t]), _mm256_mul_ps(dw, _mm256_set1_ps(dx)), acc[h][t]);
                }
            }
        }
        for (int t = 0; t < NT; ++t)
            for (int h = 0; h < 2; ++h) {
                __m256 v = acc[h][t];
                if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + 8 * h));
                _mm256_storeu_ps(y + t * y_stride + 8 * h, v);
            }
    }

    static void rows(const WeightView& w, const uint8_t* act, int64_t n_tok, float* y, const float* bias,
                     int64_t row0, int64_t row1) {
        const int64_t a_stride = q8_act_row_bytes(w.n_in), group_bytes = kX16Rows * row_bytes(w.dtype, w.n_in);
        for (int64_t r = row0; r < row1; r += kX16Rows) {
            const uint8_t* group = static_cast<const uint8_t*>(w.data) + (r / kX16Rows) * group_bytes;
            const float* b = bias ? bias + r : nullptr;
            int64_t t = 0;
            for (; t + T <= n_tok; t += T)
                tile<T>(group, act + t * a_stride, a_stride, w.n_in, y + t * w.n_out + r, w.n_out, b);
            if (t < n_tok) tile<1>(group, act + t * a_stride, a_stride, w.n_in, y + t * w.n_out + r, w.n_out, b);
        }
    }
};

template <class D>
static void matmul_rows_x16_ymm(const WeightView& w, const uint8_t* act, int64_t n_tok, float* y, const float* bias,
                                int64_t row0, int64_t row1) {
    if (w.dtype == DType::Q4_0X16)
        X16Ymm<D, true>::rows(w, act, n_tok, y, bias, row0, row1);
    else
        X16Ymm<D, false>::rows(w, act, n_tok, y, bias, row0, row1);
}

template <class D>
static void matmul_rows_q8act(const WeightView& w, const uint8_t* act, int64_t n_tok, float* y, const float* bias,
                              int64_t row0, int64_t row1) {
    if (w.dtype == DType::Q4_0)
        Q8ActTile<D, true>::rows(w, act, n_tok, y, bias, row0, row1);
    else
        Q8ActTile<D, false>::rows(w, act, n_tok, y, bias, row0, row1);
}

}  // namespace simd
}  // namespace lmx
