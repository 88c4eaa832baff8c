// kernels/simd_quants.h — the exact matmul over GGUF block formats (Q4_1, Q5_0, Q5_1, Q2_K .. Q6_K).
// Owner: kernels (quant formats). Included only by the ISA files, after simd.h.
// Thread-safety: pure functions; the caller splits rows across threads.
//
// A register tile of R rows x T tokens walks the reduction one block at a time: the R rows'
// block is dequantised on vectors (Q4_1 in mm_tile_deq, the others by deq_block; both are
// bitwise dequantize_blocks, the scalar definition) into an f32 buffer, then the tile's FMA
// steps of 16 run over it. The accumulation order is
// simd_matmul.h's (lane j sums elements j, j+16, ... in order; hsum's tree; + bias), and the
// dequantised values are exactly the reference's, so the result is bitwise simd_matmul.h's
// f32 matmul of the dequantised matrix — batch- and thread-invariant, the same on every ISA.
// Dequantisation costs once per (row, token tile); the FMA work is that of f32.
#pragma once

#include <cstdint>

#include "quants.h"
#include "simd.h"
#include "simd_gguf.h"

namespace lmx {
namespace simd {

constexpr int64_t kDeqMaxBlock = 256;  // values per block of the largest format (the K quants)

// One block of format kT into out[dtype_block_elems], bitwise dequantize_blocks: the integer form
// (simd_gguf.h) q - off as int8, then S::load_q8 (one rounding: a * (q - off)), then + b for the
// formats with a min (quants.h shows a * (q - off) + b is quants.cpp's value, bit for bit).
template <class S, DType kT>
static inline void deq_block(const uint8_t* blk, float* out) {
    using G = GgufFmt<kT>;
    float a[G::kSubs], b[G::kSubs];
    G::scales(blk, a, b);
    alignas(32) int8_t q[32];
    for (int c = 0; c < G::kChunks; ++c) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(q), _mm256_sub_epi8(G::quants(blk, c), _mm256_set1_epi8(G::kOff)));
        for (int h = 0; h < 2; ++h) {
            typename S::V v = S::load_q8(reinterpret_cast<const uint8_t*>(q) + 16 * h, S::set1(G::sub(a, c, h)));
            if constexpr (G::kMin) v = S::add(v, S::set1(G::sub(b, c, h)));
            S::store(out + 32 * c + 16 * h, v);
        }
    }
}

template <class S>
static inline void deq_any(DType t, const uint8_t* blk, float* out) {
    switch (t) {
        case DType::Q5_0: deq_block<S, DType::Q5_0>(blk, out); return;
        case DType::Q5_1: deq_block<S, DType::Q5_1>(blk, out); return;
        case DType::Q2_K: deq_block<S, DType::Q2_K>(blk, out); return;
        case DType::Q3_K: deq_block<S, DType::Q3_K>(blk, out); return;
        case DType::Q4_K: deq_block<S, DType::Q4_K>(blk, out); return;
        case DType::Q5_K: deq_block<S, DType::Q5_K>(blk, out); return;
        case DType::Q6_K: deq_block<S, DType::Q6_K>(blk, out); return;
        case DType::Q4_1: {  // (nib - 8) * d + 8 * d is exactly nib * d (see mm_tile_deq); then + m rounds once
            const typename S::V d = S::bcast_f16(blk), m = S::bcast_f16(blk + 2), d8 = S::mul(d, S::set1(8.0f));
            for (int h = 0; h < 2; ++h) S::store(out + h * kLanes, S::add(S::add(S::load_q4(blk + 4, h, d), d8), m));
            return;
        }
        default: dequantize_blocks(t, blk, 1, out); return;
    }
}

template <class S, int R, int T>
static inline void mm_tile_deq(const WeightView& w, const uint8_t* wrow, int64_t w_stride, const float* x,
                               float* y, int64_t y_stride, const float* bias) {
    using V = typename S::V;
    const int64_t n_in = w.n_in, be = dtype_block_elems(w.dtype), bb = dtype_block_bytes(w.dtype);
    alignas(64) float buf[R][kDeqMaxBlock];
    V acc[R][T];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = S::zero();
    for (int64_t b = 0; b < n_in / be; ++b) {
        if (w.dtype == DType::Q4_1) {
            // Vector dequantisation, bitwise the scalar one: (nib - 8) * d and 8 * d are exact
            // (an 11-bit d times a 4-bit integer), so their sum is exactly nib * d; then + m
            // rounds once, as d * q + m does in quants.cpp.
            for (int r = 0; r < R; ++r) {
                const uint8_t* blk = wrow + r * w_stride + b * bb;
                const V d = S::bcast_f16(blk), m = S::bcast_f16(blk + 2), d8 = S::mul(d, S::set1(8.0f));
                for (int h = 0; h < 2; ++h)
                    S::store(buf[r] + h * kLanes, S::add(S::add(S::load_q4(blk + 4, h, d), d8), m));
            }
        } else {
            for (int r = 0; r < R; ++r) deq_any<S>(w.dtype, wrow + r * w_stride + b * bb, buf[r]);
        }
        for (int64_t s = 0; s < be / kLanes; ++s) {
            V xv[T];
            for (int t = 0; t < T; ++t) xv[t] = S::load(x + t * n_in + b * be + s * kLanes);
            for (int r = 0; r < R; ++r) {
                const V wv = S::load(buf[r] + s * kLanes);
                for (int t = 0; t < T; ++t) acc[r][t] = S::fmadd(xv[t], wv, acc[r][t]);
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

// mm_tile_deq for one format kT without the buffer: each 16-value step of a row is
// dequantised in registers (deq_block's operations, so the same values) and goes straight into
// the FMA steps, in the same order. For one token, where nothing else reuses a decoded block.
template <class S, DType kT, int R>
static inline void mm_tile_deq_1(const uint8_t* wrow, int64_t w_stride, int64_t n_in, const float* x, float* y,
                                 const float* bias) {
    using V = typename S::V;
    using G = GgufFmt<kT>;
    constexpr int64_t be = 32 * G::kChunks;
    const int64_t bb = dtype_block_bytes(kT);
    V acc[R];
    for (int r = 0; r < R; ++r) acc[r] = S::zero();
    for (int64_t b = 0; b < n_in / be; ++b) {
        float a[R][G::kSubs], m[R][G::kSubs];
        for (int r = 0; r < R; ++r) G::scales(wrow + r * w_stride + b * bb, a[r], m[r]);
        for (int c = 0; c < G::kChunks; ++c) {
            const V x0 = S::load(x + b * be + 32 * c), x1 = S::load(x + b * be + 32 * c + kLanes);
            for (int r = 0; r < R; ++r) {
                const __m256i q = _mm256_sub_epi8(G::quants(wrow + r * w_stride + b * bb, c), _mm256_set1_epi8(G::kOff));
                V w0 = S::from_i8(_mm256_castsi256_si128(q), S::set1(G::sub(a[r], c, 0)));
                V w1 = S::from_i8(_mm256_extracti128_si256(q, 1), S::set1(G::sub(a[r], c, 1)));
                if constexpr (G::kMin) {
                    w0 = S::add(w0, S::set1(G::sub(m[r], c, 0)));
                    w1 = S::add(w1, S::set1(G::sub(m[r], c, 1)));
                }
                acc[r] = S::fmadd(x1, w1, S::fmadd(x0, w0, acc[r]));
            }
        }
    }
    for (int r = 0; r < R; ++r) {
        float v = S::hsum(acc[r]);
        if (bias) v += bias[r];
        y[r] = v;
    }
}

template <class S, DType kT>
static void mm_rows_deq_1(const WeightView& w, const float* x, float* y, const float* bias, int64_t row0, int64_t row1) {
    constexpr int kR = 4;
    const int64_t stride = row_bytes(w.dtype, w.n_in);
    const uint8_t* base = static_cast<const uint8_t*>(w.data);
    int64_t r = row0;
    for (; r + kR <= row1; r += kR)
        mm_tile_deq_1<S, kT, kR>(base + r * stride, stride, w.n_in, x, y + r, bias ? bias + r : nullptr);
    for (; r < row1; ++r) mm_tile_deq_1<S, kT, 1>(base + r * stride, stride, w.n_in, x, y + r, bias ? bias + r : nullptr);
}

// y[:, row0:row1] for all tokens, tiles of up to kR rows x kT tokens (ragged edges one by one).
template <class S>
static void mm_rows_deq(const WeightView& w, const float* x, int64_t n_tok, float* y, const float* bias, int64_t row0,
                        int64_t row1) {
    if (n_tok == 1) switch (w.dtype) {
            case DType::Q5_0: return mm_rows_deq_1<S, DType::Q5_0>(w, x, y, bias, row0, row1);
            case DType::Q5_1: return mm_rows_deq_1<S, DType::Q5_1>(w, x, y, bias, row0, row1);
            case DType::Q2_K: return mm_rows_deq_1<S, DType::Q2_K>(w, x, y, bias, row0, row1);
            case DType::Q3_K: return mm_rows_deq_1<S, DType::Q3_K>(w, x, y, bias, row0, row1);
            case DType::Q4_K: return mm_rows_deq_1<S, DType::Q4_K>(w, x, y, bias, row0, row1);
            case DType::Q5_K: return mm_rows_deq_1<S, DType::Q5_K>(w, x, y, bias, row0, row1);
            case DType::Q6_K: return mm_rows_deq_1<S, DType::Q6_K>(w, x, y, bias, row0, row1);
            case DType::Q4_1: return mm_rows_deq_1<S, DType::Q4_1>(w, x, y, bias, row0, row1);
            default: break;
        }
    constexpr int kR = 4, kT = 4;
    const int64_t stride = row_bytes(w.dtype, w.n_in);
    const uint8_t* base = static_cast<const uint8_t*>(w.data);
    for (int64_t r = row0; r < row1; r += kR) {
        const bool full_r = r + kR <= row1;
        for (int64_t t = 0; t < n_tok; t += kT) {
            const bool full_t = t + kT <= n_tok;
            if (full_r && full_t) {
                mm_tile_deq<S, kR, kT>(w, base + r * stride, stride, x + t * w.n_in, y + t * w.n_out + r, w.n_out,
                                       bias ? bias + r : nullptr);
            } else if (full_r && n_tok == 1) {
                mm_tile_deq<S, kR, 1>(w, base + r * stride, stride, x, y + r, w.n_out, bias ? bias + r : nullptr);
            } else {
                for (int64_t rr = r; rr < imin(row1, r + kR); ++rr)
                    for (int64_t tt = t; tt < imin(n_tok, t + kT); ++tt)
                        mm_tile_deq<S, 1, 1>(w, base + rr * stride, stride, x + tt * w.n_in, y + tt * w.n_out + rr,
                                             w.n_out, bias ? bias + rr : nullptr);
            }
        }
    }
}

}  // namespace simd
}  // namespace lmx
