// kernels/simd_q8act.h — MatmulPrecision::fast for q8_0 / q4_0 weights: int8 activations, integer block dots.
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
        }
    }
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
