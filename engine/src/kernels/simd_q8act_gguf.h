// kernels/simd_q8act_gguf.h — MatmulPrecision::Fast for the GGUF block formats: int8 activations, integer dots.
// Owner: kernels (quant formats). Included only by the ISA files, with simd_q8act.h's dot traits D.
// Thread-safety: pure functions; the caller splits rows across threads.
//
// The activations are act_to_q8's (int8, one f32 scale per 32), shared with q8_0 / q4_0 and
// the x16 formats, so one call can mix every format of a GGUF Q4_K_M layer. Each weight
// block is used in its integer form (quants.h: value = a * (q - off) + b per 16 elements,
// q unsigned <= 6 bits): per 32-element chunk, the row's q unpacks to one ymm of bytes,
// and per token one D::dot_acc gives the eight 4-element integer dots; the offset enters
// as -off * (the token's 4-element sums), computed once per token and chunk for all rows.
// Then per lane fma(float(isum), a * d_x, acc), and for formats with a min
// fma(float(xsum) * d_x, b, acc), the even chunks of the row into one set of 8 lanes and the odd
// ones into another, added lane by lane at the end: ref::matmul_rows_q8act, bit for bit
// (reference.cpp). The two sets are the halves of one zmm on AVX-512 (tile_zmm: a pair of chunks
// per vector operation, 1.4-1.5x the 8-lane tile at 64 tokens: Q5_0 640x2048 1266 -> 868 us,
// Q4_K 1655 -> 1132, Q6_K 1470 -> 1074, one Zen 5 core) and two ymm accumulators on AVX2 (tile).
//
// Why per-32 activation scales rather than llama.cpp's one per 256 (q8_K), which lets the
// k-quants' integer sub-scales multiply in integers: the activations stay 8x more finely
// scaled (about the error of q8_0 activations), and one rounding of x serves every format
// of a layer (q, k, v of different formats in one matmul_many). The cost is one f32 FMA
// per 32 weights per token, which decode (memory-bound) does not notice.
//
// Batched calls (prefill, batched decode) unpack each row's chunk and its scales once per
// tile of T tokens: the tile's tokens share every weight decode. Tiles are D's (8 rows for one
// token; measured with 4x4, 2x4, 4x2, 3x4, 2x8 for several: all within 10 %, the f32 work per
// (row, token, chunk) — convert, scale, FMA — bounds them, not registers).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "simd_gguf.h"
#include "simd_q8act.h"

namespace lmx {
namespace simd {

template <class D, DType kT>
struct GgufQ8Act {
    using G = GgufFmt<kT>;
    static constexpr int kChunks = G::kChunks, kOff = G::kOff;
    static constexpr bool kMin = G::kMin;

    // R weight rows x T tokens over all blocks; writes y[t * y_stride + r].
    template <int R, int T>
    static void tile(const uint8_t* w, int64_t w_stride, int64_t bb, const uint8_t* act, int64_t a_stride,
                     int64_t n_in, float* y, int64_t y_stride, const float* bias, const uint8_t* pf) {
        __m256 acc[R][T][2];  // [..][p]: the chunks of parity p (the reference's two lane sets)
        for (int r = 0; r < R; ++r)
            for (int t = 0; t < T; ++t) acc[r][t][0] = acc[r][t][1] = _mm256_setzero_ps();
        const int64_t n_blocks = n_in / (32 * kChunks);
        const __m256i zero = _mm256_setzero_si256();
        for (int64_t b = 0; b < n_blocks; ++b) {
            if (pf)  // weights of a tile further on (see simd::mm_rows)
                for (int r = 0; r < R; ++r)
                    for (int64_t off = 0; off < bb; off += 64) __builtin_prefetch(pf + r * w_stride + b * bb + off, 0, 2);
            float sa[R][G::kSubs], sb[R][G::kSubs];
            for (int r = 0; r < R; ++r) G::scales(w + r * w_stride + b * bb, sa[r], sb[r]);
            for (int c = 0; c < kChunks; ++c) {
                const int64_t k = b * kChunks + c;  // the activations' block of 32
                const int p = static_cast<int>(k & 1);
                __m256i xv[T], start[T];
                __m256 dx[T], xsd[T];
                for (int t = 0; t < T; ++t) {
                    const uint8_t* at = act + t * a_stride;
                    xv[t] = G::load32(at + 32 * k);
                    dx[t] = _mm256_broadcast_ss(reinterpret_cast<const float*>(at + n_in) + k);
                    start[t] = zero;
                    if constexpr (kOff != 0)  // -off * (sum of 4 x) per lane
                        start[t] = _mm256_sub_epi32(zero, D::dot_acc(zero, _mm256_set1_epi8(kOff), xv[t]));
                    if constexpr (kMin)
                        xsd[t] = _mm256_mul_ps(_mm256_cvtepi32_ps(D::dot_acc(zero, _mm256_set1_epi8(1), xv[t])), dx[t]);
                }
                for (int r = 0; r < R; ++r) {
                    const __m256i q = G::quants(w + r * w_stride + b * bb, c);
                    const __m256 a = G::lanes(sa[r], c);
                    for (int t = 0; t < T; ++t) {
                        const __m256i isum = D::dot_acc(start[t], q, xv[t]);
                        acc[r][t][p] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(a, dx[t]), acc[r][t][p]);
                    }
                    if constexpr (kMin) {
                        const __m256 m = G::lanes(sb[r], c);
                        for (int t = 0; t < T; ++t) acc[r][t][p] = _mm256_fmadd_ps(xsd[t], m, acc[r][t][p]);
                    }
                }
            }
        }
        for (int r = 0; r < R; ++r)
            for (int t = 0; t < T; ++t) {
                float v = Q8ActTile<D, true>::hsum8(_mm256_add_ps(acc[r][t][0], acc[r][t][1]));
                if (bias) v += bias[r];
                y[t * y_stride + r] = v;
            }
    }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
    // tile on zmm (D::kZmm, the AVX-512 builds): one vector holds a pair of chunks, k (lanes 0-7) and
    // k + 1 (lanes 8-15), so lanes 0-7 are the reference's even-chunk lanes and 8-15 its odd ones,
    // in the same order: bitwise tile's result with half the vector operations per weight. A last
    // unpaired chunk has zero quants, activations and scales in lanes 8-15: they add exact zeros.
    template <int R, int T>
    static void tile_zmm(const uint8_t* w, int64_t w_stride, int64_t bb, const uint8_t* act, int64_t a_stride,
                         int64_t n_in, float* y, int64_t y_stride, const float* bias, const uint8_t* pf) {
        __m512 acc[R][T];
        for (int r = 0; r < R; ++r)
            for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
        const int64_t n_chunks = n_in / 32;
        const __m512i zero = _mm512_setzero_si512();
        float sa[2][R][G::kSubs], sb[2][R][G::kSubs];  // the scales of the blocks of chunks k and k + 1
        for (int64_t k = 0; k < n_chunks; k += 2) {
            const bool two = k + 1 < n_chunks;
            const int64_t b0 = k / kChunks, b1 = (k + 1) / kChunks;
            const int c0 = static_cast<int>(k % kChunks), c1 = static_cast<int>((k + 1) % kChunks);
            const int s1 = kChunks == 1 ? 1 : 0;  // which scales chunk k + 1 reads
            if (c0 == 0) {  // a new block (two, for the formats of one chunk per block)
                for (int r = 0; r < R; ++r) G::scales(w + r * w_stride + b0 * bb, sa[0][r], sb[0][r]);
                if (kChunks == 1 && two)
                    for (int r = 0; r < R; ++r) G::scales(w + r * w_stride + b1 * bb, sa[1][r], sb[1][r]);
                if (pf)  // weights of a tile further on (see simd::mm_rows)
                    for (int r = 0; r < R; ++r)
                        for (int64_t off = 0; off < bb * (kChunks == 1 ? 2 : 1); off += 64)
                            __builtin_prefetch(pf + r * w_stride + b0 * bb + off, 0, 2);
            }
            __m512i xv[T], start[T];
            __m512 dx[T], xsd[T];
            for (int t = 0; t < T; ++t) {
                const uint8_t* at = act + t * a_stride;
                const float* ds = reinterpret_cast<const float*>(at + n_in);
                xv[t] = two ? _mm512_loadu_si512(at + 32 * k) : _mm512_zextsi256_si512(G::load32(at + 32 * k));
                dx[t] = _mm512_insertf32x8(_mm512_set1_ps(ds[k]), _mm256_set1_ps(two ? ds[k + 1] : 0.0f), 1);
                start[t] = zero;
                if constexpr (kOff != 0)
                    start[t] = _mm512_sub_epi32(zero, D::dot_acc512(zero, _mm512_set1_epi8(kOff), xv[t]));
                if constexpr (kMin)
                    xsd[t] = _mm512_mul_ps(_mm512_cvtepi32_ps(D::dot_acc512(zero, _mm512_set1_epi8(1), xv[t])), dx[t]);
            }
            for (int r = 0; r < R; ++r) {
                const uint8_t* wr = w + r * w_stride;
                const __m256i q1 = two ? G::quants(wr + b1 * bb, c1) : _mm256_setzero_si256();
                const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(G::quants(wr + b0 * bb, c0)), q1, 1);
                const __m512 a = _mm512_insertf32x8(_mm512_castps256_ps512(G::lanes(sa[0][r], c0)),
                                                    two ? G::lanes(sa[s1][r], c1) : _mm256_setzero_ps(), 1);
                for (int t = 0; t < T; ++t) {
                    const __m512i isum = D::dot_acc512(start[t], q, xv[t]);
                    acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(a, dx[t]), acc[r][t]);
                }
                if constexpr (kMin) {
                    const __m512 m = _mm512_insertf32x8(_mm512_castps256_ps512(G::lanes(sb[0][r], c0)),
                                                        two ? G::lanes(sb[s1][r], c1) : _mm256_setzero_ps(), 1);
                    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(xsd[t], m, acc[r][t]);
                }
            }
        }
        for (int r = 0; r < R; ++r)
            for (int t = 0; t < T; ++t) {
                const __m256 s = _mm256_add_ps(_mm512_castps512_ps256(acc[r][t]), _mm512_extractf32x8_ps(acc[r][t], 1));
                float v = Q8ActTile<D, true>::hsum8(s);
                if (bias) v += bias[r];
                y[t * y_stride + r] = v;
            }
    }
#endif

    template <int R, int T>
    static void tile_any(int nr, int nt, const uint8_t* w, int64_t ws, int64_t bb, const uint8_t* act, int64_t as,
                         int64_t n_in, float* y, int64_t ys, const float* bias, const uint8_t* pf) {
        if constexpr (R > 0 && T > 0) {
            if (nr < R) return tile_any<R - 1, T>(nr, nt, w, ws, bb, act, as, n_in, y, ys, bias, pf);
            if (nt < T) return tile_any<R, T - 1>(nr, nt, w, ws, bb, act, as, n_in, y, ys, bias, pf);
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
            if constexpr (D::kZmm) return tile_zmm<R, T>(w, ws, bb, act, as, n_in, y, ys, bias, pf);
#endif
            tile<R, T>(w, ws, bb, act, as, n_in, y, ys, bias, pf);
        }
    }

    // Q8ActTile::rows' loop nest: token tiles kept in L2, R rows x T tokens per tile.
    static void rows(const WeightView& w, const uint8_t* act, int64_t n_tok, float* y, const float* bias,
                     int64_t row0, int64_t row1) {
        const int64_t n_in = w.n_in, a_stride = q8_act_row_bytes(n_in);
        const int64_t stride = row_bytes(w.dtype, n_in), bb = dtype_block_bytes(w.dtype);
        const uint8_t* base = static_cast<const uint8_t*>(w.data);
        auto prefetch_for = [&](int64_t r, int R) -> const uint8_t* {
            const int64_t ahead = r + kPrefetchTiles * R;
            return ahead + R <= row1 ? base + ahead * stride : nullptr;
        };
        if (n_tok == 1) {
            constexpr int R = D::kRows1;
            prefetch_task_head(base + row0 * stride, imin(row1 - row0, kPrefetchTiles * R) * stride);
            for (int64_t r = row0; r < row1; r += R)
                tile_any<R, 1>(static_cast<int>(imin(R, row1 - r)), 1, base + r * stride, stride, bb, act, a_stride,
                               n_in, y + r, w.n_out, bias ? bias + r : nullptr, prefetch_for(r, R));
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
                                   base + r * stride, stride, bb, act + t * a_stride, a_stride, n_in,
                                   y + t * w.n_out + r, w.n_out, bias ? bias + r : nullptr,
                                   t == t0 ? prefetch_for(r, R) : nullptr);
        }
    }
};

// The table's matmul_rows_q8act: q8_0 / q4_0 (simd_q8act.h) and every GGUF block format.
template <class D>
static void matmul_rows_q8act_any(const WeightView& w, const uint8_t* act, int64_t n_tok, float* y,
                                  const float* bias, int64_t row0, int64_t row1) {
    switch (w.dtype) {
        case DType::Q4_1: GgufQ8Act<D, DType::Q4_1>::rows(w, act, n_tok, y, bias, row0, row1); return;
        case DType::Q5_0: GgufQ8Act<D, DType::Q5_0>::rows(w, act, n_tok, y, bias, row0, row1); return;
        case DType::Q5_1: GgufQ8Act<D, DType::Q5_1>::rows(w, act, n_tok, y, bias, row0, row1); return;
        case DType::Q2_K: GgufQ8Act<D, DType::Q2_K>::rows(w, act, n_tok, y, bias, row0, row1); return;
        case DType::Q3_K: GgufQ8Act<D, DType::Q3_K>::rows(w, act, n_tok, y, bias, row0, row1); return;
        case DType::Q4_K: GgufQ8Act<D, DType::Q4_K>::rows(w, act, n_tok, y, bias, row0, row1); return;
        case DType::Q5_K: GgufQ8Act<D, DType::Q5_K>::rows(w, act, n_tok, y, bias, row0, row1); return;
        case DType::Q6_K: GgufQ8Act<D, DType::Q6_K>::rows(w, act, n_tok, y, bias, row0, row1); return;
        default: matmul_rows_q8act<D>(w, act, n_tok, y, bias, row0, row1); return;
    }
}

}  // namespace simd
}  // namespace lmx
