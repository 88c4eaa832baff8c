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

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "quants.h"
#include "simd.h"
#include "simd_gguf.h"

namespace lmx {
namespace simd {

constexpr int64_t kDeqMaxBlock = 256;  // values per block of the largest format (the K quants)

// The formats deq_chunk_zmm unpacks. Measured one Zen 5 core, weights from DRAM, one token
// (bench/kernels_bench.sh): Q5_0 60 vs 65 us (640x2048); the same scheme for Q4_K (57 vs 52 us)
// and Q6_K (89 vs 62 us) lost to the byte-vector path, so they keep it.
template <DType kT>
constexpr bool kZmmDeq = kT == DType::Q5_0;

// AVX-512 only (S::kZmm): one Q5_0 block as its two halves of 16 f32 weights, straight from the
// packed bytes (vpmovzxbd, the fifth bit through a mask register) instead of through a vector of
// 32 bytes widened twice, and d * (q - 16) as one fmsub. Bitwise deq_block's values: d * q and
// 16 * d are exact, so the one rounding of d * q - 16 * d is the rounding of d * (q - 16).
// Instantiated only for S::kZmm (the AVX2 build never compiles it).
template <class S, DType kT>
static inline void deq_chunk_zmm(const uint8_t* blk, const float* a, __m512& w0, __m512& w1) {
    static_assert(kZmmDeq<kT>, "deq_chunk_zmm: Q5_0 only");
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 6)));
    uint32_t qh;
    std::memcpy(&qh, blk + 2, 4);
    const __m512i sixteen = _mm512_set1_epi32(16);
    __m512i q0 = _mm512_and_si512(bytes, _mm512_set1_epi32(15)), q1 = _mm512_srli_epi32(bytes, 4);
    q0 = _mm512_mask_or_epi32(q0, static_cast<__mmask16>(qh & 0xffffu), q0, sixteen);
    q1 = _mm512_mask_or_epi32(q1, static_cast<__mmask16>(qh >> 16), q1, sixteen);
    const __m512 av = _mm512_set1_ps(a[0]), off = _mm512_set1_ps(16.0f * a[0]);
    w0 = _mm512_fmsub_ps(_mm512_cvtepi32_ps(q0), av, off);
    w1 = _mm512_fmsub_ps(_mm512_cvtepi32_ps(q1), av, off);
}

// One block of format kT into out[dtype_block_elems], bitwise dequantize_blocks: the integer form
// (simd_gguf.h) q - off as int8, then S::load_q8 (one rounding: a * (q - off)), then + b for the
// formats with a min (quants.h shows a * (q - off) + b is quants.cpp's value, bit for bit).
template <class S, DType kT>
static inline void deq_block(const uint8_t* blk, float* out) {
    using G = GgufFmt<kT>;
    float a[G::kSubs], b[G::kSubs];
    G::scales(blk, a, b);
    if constexpr (S::kZmm && kZmmDeq<kT>) {
        __m512 w0, w1;
        deq_chunk_zmm<S, kT>(blk, a, w0, w1);
        S::store(out, w0);
        S::store(out + 16, w1);
        return;
    }
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

// Q4_1 on vectors, bitwise the scalar dequantisation: (nib - 8) * d and 8 * d are exact (an 11-bit d
// times a 4-bit integer), so their sum is exactly nib * d; then + m rounds once, as d * q + m does in
// quants.cpp.
template <class S>
static inline void deq_q4_1(const uint8_t* blk, float* out) {
    const typename S::V d = S::bcast_f16(blk), m = S::bcast_f16(blk + 2), d8 = S::mul(d, S::set1(8.0f));
    for (int h = 0; h < 2; ++h) S::store(out + h * kLanes, S::add(S::add(S::load_q4(blk + 4, h, d), d8), m));
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
        case DType::Q4_1: deq_q4_1<S>(blk, out); return;
        default: dequantize_blocks(t, blk, 1, out); return;
    }
}

// One block of format kT, chosen at compile time; kT = F32 stands for "the runtime type t" (deq_any).
template <class S, DType kT>
static inline void deq_fmt(DType t, const uint8_t* blk, float* out) {
    if constexpr (kT == DType::Q4_1) {
        deq_q4_1<S>(blk, out);
    } else if constexpr (kT >= DType::Q5_0 && kT <= DType::Q6_K) {
        deq_block<S, kT>(blk, out);
    } else {
        deq_any<S>(t, blk, out);
    }
}

template <class S, DType kT, int R, int T>
static inline void mm_tile_deq(const WeightView& w, const uint8_t* wrow, int64_t w_stride, const float* x,
                               float* y, int64_t y_stride, const float* bias, const uint8_t* pf = nullptr) {
    using V = typename S::V;
    const int64_t n_in = w.n_in, be = dtype_block_elems(w.dtype), bb = dtype_block_bytes(w.dtype);
    alignas(64) float buf[R][kDeqMaxBlock];
    V acc[R][T];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = S::zero();
    for (int64_t b = 0; b < n_in / be; ++b) {
        if (pf)  // the rows of a tile further on (see mm_rows_deq_1)
            for (int r = 0; r < R; ++r)
                for (int64_t off = 0; off < bb; off += 64) __builtin_prefetch(pf + r * w_stride + b * bb + off, 0, 2);
        for (int r = 0; r < R; ++r) deq_fmt<S, kT>(w.dtype, wrow + r * w_stride + b * bb, buf[r]);
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
                                 const float* bias, const uint8_t* pf) {
    using V = typename S::V;
    using G = GgufFmt<kT>;
    constexpr int64_t be = 32 * G::kChunks;
    const int64_t bb = dtype_block_bytes(kT);
    V acc[R];
    for (int r = 0; r < R; ++r) acc[r] = S::zero();
    for (int64_t b = 0; b < n_in / be; ++b) {
        if (pf)  // the rows of a tile further on (see mm_rows_deq_1)
            for (int r = 0; r < R; ++r)
                for (int64_t off = 0; off < bb; off += 64) __builtin_prefetch(pf + r * w_stride + b * bb + off, 0, 2);
        float a[R][G::kSubs], m[R][G::kSubs];
        for (int r = 0; r < R; ++r) G::scales(wrow + r * w_stride + b * bb, a[r], m[r]);
        for (int c = 0; c < G::kChunks; ++c) {
            const V x0 = S::load(x + b * be + 32 * c), x1 = S::load(x + b * be + 32 * c + kLanes);
            if constexpr (S::kZmm && kZmmDeq<kT>) {
                for (int r = 0; r < R; ++r) {
                    __m512 w0, w1;
                    deq_chunk_zmm<S, kT>(wrow + r * w_stride + b * bb, a[r], w0, w1);
                    acc[r] = S::fmadd(x1, w1, S::fmadd(x0, w0, acc[r]));
                }
                continue;
            }
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

// Decode reads every weight from DRAM once: like simd_matmul.h's mm_rows, each tile prefetches
// the rows kPrefetchTiles tiles further on (inside the task) while it computes, or the unpacking
// waits on demand misses (Q5_0 640x2048 on one Zen 5 core: 132 us from DRAM vs 53 us from cache).
template <class S, DType kT>
static void mm_rows_deq_1(const WeightView& w, const float* x, float* y, const float* bias, int64_t row0, int64_t row1) {
    constexpr int kR = 4;
    const int64_t stride = row_bytes(w.dtype, w.n_in);
    const uint8_t* base = static_cast<const uint8_t*>(w.data);
    prefetch_task_head(base + row0 * stride, imin(row1 - row0, kPrefetchTiles * kR) * stride);
    int64_t r = row0;
    for (; r + kR <= row1; r += kR) {
        const int64_t ahead = r + kPrefetchTiles * kR;
        mm_tile_deq_1<S, kT, kR>(base + r * stride, stride, w.n_in, x, y + r, bias ? bias + r : nullptr,
                                 ahead + kR <= row1 ? base + ahead * stride : nullptr);
    }
    for (; r < row1; ++r)
        mm_tile_deq_1<S, kT, 1>(base + r * stride, stride, w.n_in, x, y + r, bias ? bias + r : nullptr, nullptr);
}

// y[:, row0:row1] for all tokens, tiles of up to kR rows x kT tokens (ragged edges one by one).
template <class S, DType kT>
static void mm_rows_deq_fmt(const WeightView& w, const float* x, int64_t n_tok, float* y, const float* bias,
                            int64_t row0, int64_t row1) {
    constexpr int kR = 4, kT4 = 4;
    const int64_t stride = row_bytes(w.dtype, w.n_in);
    const uint8_t* base = static_cast<const uint8_t*>(w.data);
    prefetch_task_head(base + row0 * stride, imin(row1 - row0, kPrefetchTiles * kR) * stride);
    for (int64_t r = row0; r < row1; r += kR) {
        const bool full_r = r + kR <= row1;
        const int64_t ahead = r + kPrefetchTiles * kR;  // the first token tile prefetches the rows ahead
        const uint8_t* pf = ahead + kR <= row1 ? base + ahead * stride : nullptr;
        for (int64_t t = 0; t < n_tok; t += kT4) {
            const bool full_t = t + kT4 <= n_tok;
            if (full_r && full_t) {
                mm_tile_deq<S, kT, kR, kT4>(w, base + r * stride, stride, x + t * w.n_in, y + t * w.n_out + r,
                                            w.n_out, bias ? bias + r : nullptr, t == 0 ? pf : nullptr);
            } else if (full_r && n_tok == 1) {
                mm_tile_deq<S, kT, kR, 1>(w, base + r * stride, stride, x, y + r, w.n_out, bias ? bias + r : nullptr);
            } else {
                for (int64_t rr = r; rr < imin(row1, r + kR); ++rr)
                    for (int64_t tt = t; tt < imin(n_tok, t + kT4); ++tt)
                        mm_tile_deq<S, kT, 1, 1>(w, base + rr * stride, stride, x + tt * w.n_in, y + tt * w.n_out + rr,
                                                 w.n_out, bias ? bias + rr : nullptr);
            }
        }
    }
}

// The exact matmul over GGUF block formats, compiled per format: one token fuses dequantisation into
// the FMAs (mm_rows_deq_1); more tokens dequantise each block of a 4-row tile once per 4-token tile.
template <class S, DType kT>
static void mm_rows_deq_n(const WeightView& w, const float* x, int64_t n_tok, float* y, const float* bias,
                          int64_t row0, int64_t row1) {
    if (n_tok == 1) return mm_rows_deq_1<S, kT>(w, x, y, bias, row0, row1);
    mm_rows_deq_fmt<S, kT>(w, x, n_tok, y, bias, row0, row1);
}

template <class S>
static void mm_rows_deq(const WeightView& w, const float* x, int64_t n_tok, float* y, const float* bias, int64_t row0,
                        int64_t row1) {
    switch (w.dtype) {
        case DType::Q4_1: return mm_rows_deq_n<S, DType::Q4_1>(w, x, n_tok, y, bias, row0, row1);
        case DType::Q5_0: return mm_rows_deq_n<S, DType::Q5_0>(w, x, n_tok, y, bias, row0, row1);
        case DType::Q5_1: return mm_rows_deq_n<S, DType::Q5_1>(w, x, n_tok, y, bias, row0, row1);
        case DType::Q2_K: return mm_rows_deq_n<S, DType::Q2_K>(w, x, n_tok, y, bias, row0, row1);
        case DType::Q3_K: return mm_rows_deq_n<S, DType::Q3_K>(w, x, n_tok, y, bias, row0, row1);
        case DType::Q4_K: return mm_rows_deq_n<S, DType::Q4_K>(w, x, n_tok, y, bias, row0, row1);
        case DType::Q5_K: return mm_rows_deq_n<S, DType::Q5_K>(w, x, n_tok, y, bias, row0, row1);
        case DType::Q6_K: return mm_rows_deq_n<S, DType::Q6_K>(w, x, n_tok, y, bias, row0, row1);
        default: return mm_rows_deq_fmt<S, DType::F32>(w, x, n_tok, y, bias, row0, row1);  // deq_any per block
    }
}

}  // namespace simd
}  // namespace lmx
