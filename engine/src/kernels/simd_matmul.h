// kernels/simd_matmul.h — matmul over any weight format, register-tiled, batch-invariant.
// Owner: kernels (internal). Included only by the ISA files (see simd.h).
// Thread-safety: pure functions; the caller splits rows across threads.
#pragma once

#include <cstdint>
#include <cstring>

#include "simd.h"
#include "simd_quants.h"

namespace lmx {
namespace simd {

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
// Block formats: n_in % 32 == 0, so no tail; mm_tile walks them block by block (see
// there) and load_half(blk, h, d) widens elements 16h .. 16h+15 of a block, times d.
template <class S>
struct LoadQ8 {
    static constexpr int64_t kElemBytes = 0;
    static constexpr bool kBlocks = true;
    static constexpr int64_t kBlockBytes = kQ8BlockBytes;
    static typename S::V load_half(const uint8_t* blk, int64_t h, typename S::V d) {
        return S::load_q8(blk + 2 + h * kLanes, d);
    }
};
template <class S>
struct LoadQ4 {
    static constexpr int64_t kElemBytes = 0;
    static constexpr bool kBlocks = true;
    static constexpr int64_t kBlockBytes = kQ4BlockBytes;
    static typename S::V load_half(const uint8_t* blk, int64_t h, typename S::V d) {
        return S::load_q4(blk + 2, static_cast<int>(h), d);
    }
};

// One register tile: R weight rows (w, stride w_stride bytes) times T tokens (x, stride
// n_in floats) over the whole reduction; writes y[t * y_stride + r].
template <class S, class L, int R, int T>
static inline void mm_tile(const uint8_t* w, int64_t w_stride, const float* x, int64_t n_in, float* y,
                           int64_t y_stride, const float* bias, const uint8_t* pf) {
    using V = typename S::V;
    V acc[R][T];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = S::zero();
    const int64_t n_steps = n_in / kLanes;
    if constexpr (L::kBlocks) {
        // q8_0, q4_0: per block, broadcast each row's scale once, then two steps of 16
        // with w = d * q (exact), in the same order as the other formats.
        constexpr int64_t kBB = L::kBlockBytes;
        for (int64_t b = 0; b < n_steps / 2; ++b) {
            V d[R];
            for (int r = 0; r < R; ++r) d[r] = S::bcast_f16(w + r * w_stride + b * kBB);
            if (pf)
                for (int r = 0; r < R; ++r) __builtin_prefetch(pf + r * w_stride + b * kBB, 0, 2);
            for (int64_t h = 0; h < 2; ++h) {
                const int64_t s = 2 * b + h;
                V xv[T];
                for (int t = 0; t < T; ++t) xv[t] = S::load(x + t * n_in + s * kLanes);
                for (int r = 0; r < R; ++r) {
                    const V wv = L::load_half(w + r * w_stride + b * kBB, h, d[r]);
                    for (int t = 0; t < T; ++t) acc[r][t] = S::fmadd(xv[t], wv, acc[r][t]);
                }
            }
        }
    } else {
        constexpr int64_t kStepBytes = kLanes * L::kElemBytes;  // 64 (f32) or 32 (f16, bf16)
        for (int64_t s = 0; s < n_steps; ++s) {
            if (pf && (s * kStepBytes) % 64 == 0)  // one prefetch per cache line of each row
                for (int r = 0; r < R; ++r) __builtin_prefetch(pf + r * w_stride + s * kStepBytes, 0, 2);
            V xv[T];
            for (int t = 0; t < T; ++t) xv[t] = S::load(x + t * n_in + s * kLanes);
            for (int r = 0; r < R; ++r) {
                const V wv = L::load(w + r * w_stride, s);
                for (int t = 0; t < T; ++t) acc[r][t] = S::fmadd(xv[t], wv, acc[r][t]);
            }
        }
    }
    if constexpr (!L::kBlocks) {  // q8_0 / q4_0 rows are whole blocks; the others end with a zero-padded step
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
                    const float* b, const uint8_t* pf) {
        if (nt == T)
            mm_tile<S, L, R, T>(w, ws, x, n_in, y, ys, b, pf);
        else
            TileByToks<S, L, R, T - 1>::run(nt, w, ws, x, n_in, y, ys, b, pf);
    }
};
template <class S, class L, int R>
struct TileByToks<S, L, R, 0> {
    static void run(int, const uint8_t*, int64_t, const float*, int64_t, float*, int64_t, const float*,
                    const uint8_t*) {}
};
template <class S, class L, int R, int T>
struct TileByRows {
    static void run(int nr, int nt, const uint8_t* w, int64_t ws, const float* x, int64_t n_in, float* y,
                    int64_t ys, const float* b, const uint8_t* pf) {
        if (nr == R)
            TileByToks<S, L, R, T>::run(nt, w, ws, x, n_in, y, ys, b, pf);
        else
            TileByRows<S, L, R - 1, T>::run(nr, nt, w, ws, x, n_in, y, ys, b, pf);
    }
};
template <class S, class L, int T>
struct TileByRows<S, L, 0, T> {
    static void run(int, int, const uint8_t*, int64_t, const float*, int64_t, float*, int64_t, const float*,
                    const uint8_t*) {}
};

// Bytes of activations kept hot in L2 while a task walks its rows (see mm_rows).
constexpr int64_t kTokenTileBytes = 192 * 1024;
// y[:, row0:row1] for all tokens. Loop nest, outer to inner:
//   token tile (<= kTokenTileBytes of x, stays in L2)
//     R rows (their weights stay in L1/L2 while the token blocks stream past)
//       T tokens: one register tile over the whole n_in.
// Whatever n_tok, every weight row is read from memory once per call (the token
// blocks after the first find it in L1/L2): batched decode pays the weight traffic of
// one token, and stays memory-bound until the FMA work catches up (~8-16 tokens).
template <class S, class L>
static void mm_rows(const WeightView& w, const float* x, int64_t n_tok, float* y, const float* bias, int64_t row0,
                    int64_t row1) {
    const int64_t n_in = w.n_in;
    const int64_t stride = row_bytes(w.dtype, n_in);
    const uint8_t* base = static_cast<const uint8_t*>(w.data);
    // Weights come from DRAM in decode: while a tile computes, it prefetches the rows
    // kPrefetchTiles tiles further on, when that tile lies inside this task, into L2
    // (prefetcht1: into L1 the misses queue behind the demand loads). Without it f16/bf16
    // decode keeps too few misses in flight: on Zen 4, 2 threads, ~1.4x more GB/s with it.
    auto prefetch_for = [&](int64_t r, int R) -> const uint8_t* {
        const int64_t ahead = r + kPrefetchTiles * R;
        return ahead + R <= row1 ? base + ahead * stride : nullptr;
    };
    if (n_tok == 1) {
        constexpr int R = S::kRows1;
        prefetch_task_head(base + row0 * stride, imin(row1 - row0, kPrefetchTiles * R) * stride);
        for (int64_t r = row0; r < row1; r += R) {
            const int nr = static_cast<int>(imin(R, row1 - r));
            TileByRows<S, L, R, 1>::run(nr, 1, base + r * stride, stride, x, n_in, y + r, w.n_out,
                                        bias ? bias + r : nullptr, prefetch_for(r, R));
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
                // Only the first token block of a row tile prefetches; the others find
                // the rows in cache.
                TileByRows<S, L, R, T>::run(nr, nt, base + r * stride, stride, x + t * n_in, n_in,
                                            y + t * w.n_out + r, w.n_out, bias ? bias + r : nullptr,
                                            t == t0 ? prefetch_for(r, R) : nullptr);
            }
        }
    }
}

// The exact GGUF block formats with more than one token tile: each row tile is dequantised once
// per token tile into an f32 buffer (on the stack: kDeqShareFloats), which mm_tile then reads as
// f32 weights for every token of the tile — the batch shares each block's decode instead of
// redoing it per register tile of tokens. mm_tile over the buffer runs the same FMA steps in the
// same order as mm_tile_deq (block formats have no tail step), so the result is bitwise the same.
constexpr int64_t kDeqShareFloats = 16 * 1024;  // 64 KiB: up to S::kRows rows of n_in <= 2730 (fewer rows beyond)

template <class S>
static void mm_rows_deq_shared(const WeightView& w, const float* x, int64_t n_tok, float* y, const float* bias,
                               int64_t row0, int64_t row1) {
    constexpr int R = S::kRows, T = S::kToks;
    const int64_t n_in = w.n_in, stride = row_bytes(w.dtype, n_in), be = dtype_block_elems(w.dtype);
    const int64_t bb = dtype_block_bytes(w.dtype);
    const int nr_max = static_cast<int>(imin(R, kDeqShareFloats / n_in));
    alignas(64) float buf[kDeqShareFloats];  // [nr_max, n_in] dequantised rows
    const uint8_t* base = static_cast<const uint8_t*>(w.data);
    int64_t tile = kTokenTileBytes / (n_in * 4) / T * T;
    if (tile < T) tile = T;
    for (int64_t t0 = 0; t0 < n_tok; t0 += tile) {
        const int64_t t1 = imin(n_tok, t0 + tile);
        for (int64_t r = row0; r < row1; r += nr_max) {
            const int nr = static_cast<int>(imin(nr_max, row1 - r));
            for (int i = 0; i < nr; ++i)
                for (int64_t b = 0; b < n_in / be; ++b)
                    deq_any<S>(w.dtype, base + (r + i) * stride + b * bb, buf + i * n_in + b * be);
            for (int64_t t = t0; t < t1; t += T)
                TileByRows<S, LoadF32<S>, R, T>::run(nr, static_cast<int>(imin(T, t1 - t)),
                                                     reinterpret_cast<const uint8_t*>(buf), n_in * 4, x + t * n_in,
                                                     n_in, y + t * w.n_out + r, w.n_out, bias ? bias + r : nullptr,
                                                     nullptr);
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
        case DType::Q4_0: mm_rows<S, LoadQ4<S>>(w, x, n_tok, y, bias, row0, row1); break;
        case DType::Q8_0X16:
        case DType::Q4_0X16: break;  // never here: matmul_many sends them to matmul_rows_x16
        case DType::Q4_1:
        case DType::Q5_0:
        case DType::Q5_1:
        case DType::Q2_K:
        case DType::Q3_K:
        case DType::Q4_K:
        case DType::Q5_K:
        case DType::Q6_K:
            if (n_tok > S::kToks && w.n_in <= kDeqShareFloats)
                mm_rows_deq_shared<S>(w, x, n_tok, y, bias, row0, row1);
            else
                mm_rows_deq<S>(w, x, n_tok, y, bias, row0, row1);
            break;
    }
}


}  // namespace simd
}  // namespace lmx
