// kernels/kernels_avx512.cpp — the kernel table for AVX-512 (F/BW/VL/DQ) + FMA + F16C, bf16 and int8 dots.
// Owner: kernels. Thread-safety: pure functions. Built with -mavx512*: call only through
// kernels_table_avx512(), which checks the CPU first (and AVX512_BF16 for the fast bf16
// matmul, AVX512_VNNI for vpdpbusd in the fast q8_0 / q4_0 matmul).
//
// One 16-lane vector is one zmm. Register tile for matmul: 6 rows x 4 tokens = 24
// accumulators + 4 activations + 1 weight vector of the 32 zmm (measured on Zen 4: 6x4
// >= 4x4 > 4x6, 8x2, 8x3); decode (one token) uses 8 rows, so 8 independent FMA chains
// cover the FMA latency. The op sequence is the shared one of simd_*.h, so exact
// results are bitwise those of the AVX2 build.
//
// GCC 12.2's AVX-512 intrinsics self-initialise their undefined operands (`__Y = __Y`),
// which -Wuninitialized reports once inlined (GCC bug 105593, fixed in 12.3): silence
// exactly those two warnings for this file, or the -Werror build fails.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "kernels_impl.h"
#include "simd_attention.h"
#include "simd_elementwise.h"
#include "simd_matmul.h"
#include "simd_q8act.h"
#include "simd_q8act_gguf.h"

namespace lmx {
namespace {

struct Avx512 {
    using V = __m512;
    static constexpr int kRows = 6, kToks = 4, kRows1 = 8;
    static constexpr bool kZmm = true;  // simd_quants.h unpacks Q5_0 on zmm (deq_chunk_zmm)

    static V zero() { return _mm512_setzero_ps(); }
    static V set1(float v) { return _mm512_set1_ps(v); }
    static V load(const float* p) { return _mm512_loadu_ps(p); }
    static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
    static V add(V a, V b) { return _mm512_add_ps(a, b); }
    static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
    static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
    static V div(V a, V b) { return _mm512_div_ps(a, b); }
    static V max(V a, V b) { return _mm512_max_ps(a, b); }
    static V min(V a, V b) { return _mm512_min_ps(a, b); }
    static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static V round(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
    static V pow2i(V n) {
        const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
        return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
    }
    static V select_lt(V a, V b, V t, V f) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), f, t); }

    // Reduction tree shared with the AVX2 build: 16 -> 8 -> 4 -> 2 -> 1.
    static float hsum(V a) {
        const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
        const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
        const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
    }
    // hsum of 16 vectors at once, same pairs as hsum: lane j of the result is hsum(a[j]).
    static V hsum16(const V a[16]) {
        V l1[8], l2[4], l3[2];
        for (int k = 0; k < 8; ++k)  // [a_2k | a_2k+1], each j + j+8
            l1[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x44),
                                  _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xee));
        for (int m = 0; m < 4; ++m)  // quarter k holds key 4m+k: j + j+4
            l2[m] = _mm512_add_ps(_mm512_shuffle_f32x4(l1[2 * m], l1[2 * m + 1], 0x88),
                                  _mm512_shuffle_f32x4(l1[2 * m], l1[2 * m + 1], 0xdd));
        for (int n = 0; n < 2; ++n)  // quarter k: keys 8n+k, 8n+4+k: j + j+2
            l3[n] = _mm512_add_ps(_mm512_shuffle_ps(l2[2 * n], l2[2 * n + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_ps(l2[2 * n], l2[2 * n + 1], _MM_SHUFFLE(3, 2, 3, 2)));
        // quarter k: keys k, k+4, k+8, k+12: j + j+1
        const V l4 = _mm512_add_ps(_mm512_shuffle_ps(l3[0], l3[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_ps(l3[0], l3[1], _MM_SHUFFLE(3, 1, 3, 1)));
        const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        return _mm512_permutexvar_ps(order, l4);
    }
    static float hmax(V a) {
        const __m256 s8 = _mm256_max_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
        const __m128 s4 = _mm_max_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
        const __m128 s2 = _mm_max_ps(s4, _mm_movehl_ps(s4, s4));
        return _mm_cvtss_f32(_mm_max_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
    }

    static V load_f16(const uint8_t* p) {
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
    static V load_bf16(const uint8_t* p) {
        const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
        return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
    }
    static V bcast_f16(const uint8_t* p) {
        uint16_t h;
        __builtin_memcpy(&h, p, 2);
        return _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(h)));
    }
    static V load_q8(const uint8_t* qs, V d) {
        const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
        return _mm512_mul_ps(_mm512_cvtepi32_ps(q), d);
    }
    static V from_i8(__m128i q16, V d) { return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q16)), d); }
    static V load_q4(const uint8_t* qs, int h, V d) {
        __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
        q = h ? _mm512_srli_epi32(q, 4) : _mm512_and_si512(q, _mm512_set1_epi32(15));
        return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q, _mm512_set1_epi32(8))), d);
    }
};

// ---- MatmulPrecision::Fast for bf16 weights (AVX512_BF16) ----
//
// vdpbf16ps multiplies 32 bf16 pairs per instruction (twice an f32 FMA) with exact
// products; lane j of an accumulator takes elements 32s+2j+1 then 32s+2j of each step
// s, in order, then hsum's tree: fixed per element, independent of the tiling, as in
// the exact path. Activations are rounded to bf16 (nearest-even) once per call. The
// instruction flushes denormal inputs and results to zero (by definition, whatever
// MXCSR says) — far below the bf16 rounding error of any real activation.

void act_to_bf16(const float* x, int64_t n_tok, int64_t n_in, uint16_t* act) {
    const int64_t stride = bf16_act_stride(n_in);
    for (int64_t t = 0; t < n_tok; ++t) {
        const float* xt = x + t * n_in;
        uint16_t* at = act + t * stride;
        for (int64_t i = 0; i < stride; i += 32) {
            auto mask_for = [&](int64_t from) -> __mmask16 {
                const int64_t n = n_in - from;
                return n >= 16 ? static_cast<__mmask16>(0xffff) : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
            };
            const __m512 lo = _mm512_maskz_loadu_ps(mask_for(i), xt + i);
            const __m512 hi = _mm512_maskz_loadu_ps(mask_for(i + 16), xt + i + 16);
            _mm512_storeu_si512(at + i, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
        }
    }
}

template <int R, int T>
inline void bf16_tile(const uint8_t* w, int64_t w_stride, const uint16_t* act, int64_t a_stride, int64_t n_in,
                      float* y, int64_t y_stride, const float* bias, const uint8_t* pf) {
    __m512 acc[R][T];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    const int64_t n_full = n_in / 32, n_tail = n_in % 32;
    for (int64_t s = 0; s < n_full; ++s) {
        if (pf)  // weights of a tile further on (see simd::mm_rows)
            for (int r = 0; r < R; ++r) __builtin_prefetch(pf + r * w_stride + s * 64, 0, 2);
        __m512bh xv[T];
        for (int t = 0; t < T; ++t)
            xv[t] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(act + t * a_stride + s * 32));
        for (int r = 0; r < R; ++r) {
            const __m512bh wv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + r * w_stride + s * 64));
            for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], xv[t], wv);
        }
    }
    if (n_tail) {  // weights past n_in masked to zero; the activations there are zero already
        const __mmask32 m = static_cast<__mmask32>((1ull << n_tail) - 1);
        __m512bh xv[T];
        for (int t = 0; t < T; ++t)
            xv[t] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(act + t * a_stride + n_full * 32));
        for (int r = 0; r < R; ++r) {
            const __m512bh wv =
                reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(m, w + r * w_stride + n_full * 64));
            for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], xv[t], wv);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) {
            float v = Avx512::hsum(acc[r][t]);
            if (bias) v += bias[r];
            y[t * y_stride + r] = v;
        }
}

template <int R, int T>
void bf16_tile_any(int nr, int nt, const uint8_t* w, int64_t ws, const uint16_t* act, int64_t as, int64_t n_in,
                   float* y, int64_t ys, const float* b, const uint8_t* pf) {
    if constexpr (R > 0 && T > 0) {
        if (nr < R) return bf16_tile_any<R - 1, T>(nr, nt, w, ws, act, as, n_in, y, ys, b, pf);
        if (nt < T) return bf16_tile_any<R, T - 1>(nr, nt, w, ws, act, as, n_in, y, ys, b, pf);
        bf16_tile<R, T>(w, ws, act, as, n_in, y, ys, b, pf);
    }
}

// Same loop nest as simd::mm_rows (token tiles kept in L2, R rows x T tokens per tile).
void matmul_rows_bf16act(const WeightView& w, const uint16_t* act, int64_t n_tok, float* y, const float* bias,
                         int64_t row0, int64_t row1) {
    const int64_t n_in = w.n_in, a_stride = bf16_act_stride(n_in);
    const int64_t stride = row_bytes(w.dtype, n_in);
    const uint8_t* base = static_cast<const uint8_t*>(w.data);
    auto imin = [](int64_t a, int64_t b) { return a < b ? a : b; };
    auto prefetch_for = [&](int64_t r, int R) -> const uint8_t* {
        const int64_t ahead = r + simd::kPrefetchTiles * R;
        return ahead + R <= row1 ? base + ahead * stride : nullptr;
    };
    if (n_tok == 1) {
        constexpr int R = Avx512::kRows1;
        for (int64_t r = row0; r < row1; r += R)
            bf16_tile_any<R, 1>(static_cast<int>(imin(R, row1 - r)), 1, base + r * stride, stride, act, a_stride, n_in,
                                y + r, w.n_out, bias ? bias + r : nullptr, prefetch_for(r, R));
        return;
    }
    constexpr int R = Avx512::kRows, T = Avx512::kToks;
    int64_t tile = simd::kTokenTileBytes / (a_stride * 2) / T * T;
    if (tile < T) tile = T;
    for (int64_t t0 = 0; t0 < n_tok; t0 += tile) {
        const int64_t t1 = imin(n_tok, t0 + tile);
        for (int64_t r = row0; r < row1; r += R)
            for (int64_t t = t0; t < t1; t += T)
                bf16_tile_any<R, T>(static_cast<int>(imin(R, row1 - r)), static_cast<int>(imin(T, t1 - t)),
                                    base + r * stride, stride, act + t * a_stride, a_stride, n_in,
                                    y + t * w.n_out + r, w.n_out, bias ? bias + r : nullptr,
                                    t == t0 ? prefetch_for(r, R) : nullptr);
    }
}

// Integer block dots of simd_q8act.h (MatmulPrecision::Fast, q8_0 / q4_0): vpdpbusd on
// ymm with AVX512_VNNI (+VL), else vpmaddubsw + vpmaddwd; the int32 lanes, so the
// results, are the same. Tiles: 8 rows for one token, 4 rows x 4 tokens otherwise.
struct VnniDot {
    static constexpr bool kWideU = true;  // vpdpbusd takes u up to 255: x + 128 for q8_0
    static constexpr int kRows1 = 8, kRows = 4, kToks = 4;
    static constexpr bool kZmm = true;  // simd_q8act_gguf.h tile_zmm
    static __m256i dot_acc(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
    static __m512i dot_acc512(__m512i acc, __m512i u, __m512i s) { return _mm512_dpbusd_epi32(acc, u, s); }
};
struct BwDot {
    static constexpr bool kWideU = false;
    static constexpr int kRows1 = 8, kRows = 4, kToks = 4;
    static constexpr bool kZmm = true;  // simd_q8act_gguf.h tile_zmm
    static __m256i dot_acc(__m256i acc, __m256i u, __m256i s) {
        return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
    }
    static __m512i dot_acc512(__m512i acc, __m512i u, __m512i s) {
        return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
    }
};

// ---- the x16 formats (kernels.h) with AVX512_VNNI ----
//
// One zmm of weights is 4 elements of a whole 16-row group; vpdpbusd with the token's 4
// activation bytes broadcast adds each row's 4 products into its own int32 lane, so a
// block's dot for 16 rows takes 8 instructions (q4_0x16: 4 loads split into low and high
// nibbles) and no horizontal sum. The weights are unsigned (q + 128, or the nibble q + 8),
// so each block starts at -128 (-8) * sum(x): the activations' block sums of act_to_q8.
// Then fma(float(isum), d_w * d_x, acc) per block, as ref::matmul_rows_x16.
// Tiles: RG groups x T tokens; one token takes 4 groups (4 independent chains of
// vpdpbusd cover its latency), several take 3 x 4 (12 int + 12 float accumulators;
// measured on Zen 4 with weights in cache: 3x4 > 2x6 > 2x4 > 1x8).
template <bool kQ4, int RG, int T>
inline void x16_tile(const uint8_t* group, int64_t group_bytes, const uint8_t* act, int64_t a_stride, int64_t n_in,
                     float* y, int64_t y_stride, const float* bias, const uint8_t* pf) {
    constexpr int64_t kQuant = kQ4 ? 256 : 512;
    constexpr int32_t kBias = kQ4 ? 8 : 128;
    const int64_t n_b = n_in / kQ8BlockElems;
    const int64_t scales = n_b * kQuant;
    auto bcast4 = [](const uint8_t* p) {
        int32_t v;
        std::memcpy(&v, p, 4);
        return _mm512_set1_epi32(v);
    };
    __m512 acc[RG][T];
    for (int g = 0; g < RG; ++g)
        for (int t = 0; t < T; ++t) acc[g][t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < n_b; ++b) {
        __m512i ia[RG][T];
        for (int t = 0; t < T; ++t) {
            int32_t sum;
            std::memcpy(&sum, act + t * a_stride + n_in + 4 * (n_b + b), 4);
            const __m512i start = _mm512_set1_epi32(-kBias * sum);
            for (int g = 0; g < RG; ++g) ia[g][t] = start;
        }
        const uint8_t* qb = group + b * kQuant;
        if (pf)  // the same block of the groups a tile further on (see x16_rows)
            for (int g = 0; g < RG; ++g) {
                for (int64_t off = 0; off < kQuant; off += 64) __builtin_prefetch(pf + g * group_bytes + b * kQuant + off, 0, 2);
                if (b % 2 == 0) __builtin_prefetch(pf + g * group_bytes + scales + b * 32, 0, 2);
            }
        if constexpr (kQ4) {
            for (int k = 0; k < 4; ++k) {
                __m512i lo[RG], hi[RG];
                for (int g = 0; g < RG; ++g) {
                    const __m512i raw = _mm512_loadu_si512(qb + g * group_bytes + k * 64);
                    lo[g] = _mm512_and_si512(raw, _mm512_set1_epi8(15));
                    hi[g] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), _mm512_set1_epi8(15));
                }
                for (int t = 0; t < T; ++t) {
                    const uint8_t* xb = act + t * a_stride + b * kQ8BlockElems;
                    const __m512i xl = bcast4(xb + 4 * k), xh = bcast4(xb + 16 + 4 * k);
                    for (int g = 0; g < RG; ++g)
                        ia[g][t] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(ia[g][t], lo[g], xl), hi[g], xh);
                }
            }
        } else {
            for (int k = 0; k < 8; ++k) {
                __m512i u[RG];
                for (int g = 0; g < RG; ++g) u[g] = _mm512_loadu_si512(qb + g * group_bytes + k * 64);
                for (int t = 0; t < T; ++t) {
                    const __m512i xk = bcast4(act + t * a_stride + b * kQ8BlockElems + 4 * k);
                    for (int g = 0; g < RG; ++g) ia[g][t] = _mm512_dpbusd_epi32(ia[g][t], u[g], xk);
                }
            }
        }
        for (int g = 0; g < RG; ++g) {
            const __m512 dw = _mm512_cvtph_ps(
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group + g * group_bytes + scales + b * 32)));
            for (int t = 0; t < T; ++t) {
                float dx;
                std::memcpy(&dx, act + t * a_stride + n_in + 4 * b, 4);
                acc[g][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[g][t]), _mm512_mul_ps(dw, _mm512_set1_ps(dx)), acc[g][t]);
            }
        }
    }
    for (int t = 0; t < T; ++t)
        for (int g = 0; g < RG; ++g) {
            __m512 v = acc[g][t];
            if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + 16 * g));
            _mm512_storeu_ps(y + t * y_stride + 16 * g, v);
        }
}

template <bool kQ4, int RG, int T>
void x16_tile_any(int ng, int nt, const uint8_t* group, int64_t gb, const uint8_t* act, int64_t as, int64_t n_in,
                  float* y, int64_t ys, const float* bias, const uint8_t* pf) {
    if constexpr (RG > 0 && T > 0) {
        if (ng < RG) return x16_tile_any<kQ4, RG - 1, T>(ng, nt, group, gb, act, as, n_in, y, ys, bias, pf);
        if (nt < T) return x16_tile_any<kQ4, RG, T - 1>(ng, nt, group, gb, act, as, n_in, y, ys, bias, pf);
        x16_tile<kQ4, RG, T>(group, gb, act, as, n_in, y, ys, bias, pf);
    }
}

template <bool kQ4>
void x16_rows(const WeightView& w, const uint8_t* act, int64_t n_tok, float* y, const float* bias, int64_t row0,
              int64_t row1) {
    const int64_t n_in = w.n_in, a_stride = q8_act_row_bytes(n_in), gb = kX16Rows * row_bytes(w.dtype, n_in);
    const uint8_t* base = static_cast<const uint8_t*>(w.data);
    auto imin = [](int64_t a, int64_t b) { return a < b ? a : b; };
    const int64_t g0 = row0 / kX16Rows, g1 = row1 / kX16Rows;
    // With several tokens, while a tile computes it prefetches the groups kPrefetchTiles
    // tiles further on when they lie in this task, or the first token tile of each row tile
    // would wait on DRAM. One token streams the groups in order: the hardware prefetcher
    // keeps up (measured: software prefetch there gains nothing).
    auto prefetch_for = [&](int64_t g, int RG) -> const uint8_t* {
        const int64_t ahead = g + simd::kPrefetchTiles * RG;
        return ahead + RG <= g1 ? base + ahead * gb : nullptr;
    };
    if (n_tok == 1) {
        constexpr int RG = 4;
        for (int64_t g = g0; g < g1; g += RG)
            x16_tile_any<kQ4, RG, 1>(static_cast<int>(imin(RG, g1 - g)), 1, base + g * gb, gb, act, a_stride, n_in,
                                     y + g * kX16Rows, w.n_out, bias ? bias + g * kX16Rows : nullptr, nullptr);
        return;
    }
    constexpr int RG = 3, T = 4;
    int64_t tile = simd::kTokenTileBytes / a_stride / T * T;
    if (tile < T) tile = T;
    for (int64_t t0 = 0; t0 < n_tok; t0 += tile) {
        const int64_t t1 = imin(n_tok, t0 + tile);
        for (int64_t g = g0; g < g1; g += RG)
            for (int64_t t = t0; t < t1; t += T)
                x16_tile_any<kQ4, RG, T>(static_cast<int>(imin(RG, g1 - g)), static_cast<int>(imin(T, t1 - t)),
                                         base + g * gb, gb, act + t * a_stride, a_stride, n_in,
                                         y + t * w.n_out + g * kX16Rows, w.n_out, bias ? bias + g * kX16Rows : nullptr,
                                         t == t0 ? prefetch_for(g, RG) : nullptr);
    }
}

void matmul_rows_x16_vnni(const WeightView& w, const uint8_t* act, int64_t n_tok, float* y, const float* bias,
                          int64_t row0, int64_t row1) {
    if (w.dtype == DType::Q4_0X16)
        x16_rows<true>(w, act, n_tok, y, bias, row0, row1);
    else
        x16_rows<false>(w, act, n_tok, y, bias, row0, row1);
}

constexpr KernelTable make_table(bool with_bf16, bool with_vnni) {
    return KernelTable{
        "avx512",
        &simd::matmul_rows<Avx512>,
        &simd::rmsnorm<Avx512>,
        &simd::silu_mul<Avx512>,
        &simd::softmax<Avx512>,
        &simd::attention<Avx512>,
        with_bf16 ? &act_to_bf16 : nullptr,
        with_bf16 ? &matmul_rows_bf16act : nullptr,
        with_vnni ? &simd::act_to_q8<VnniDot> : &simd::act_to_q8<BwDot>,
        with_vnni ? &simd::matmul_rows_q8act_any<VnniDot> : &simd::matmul_rows_q8act_any<BwDot>,
        with_vnni ? &matmul_rows_x16_vnni : &simd::matmul_rows_x16_ymm<BwDot>,
        &simd::attention<Avx512, uint16_t>,
        &simd::gelu_tanh_mul<Avx512>,
    };
}

const KernelTable kTables[2][2] = {{make_table(false, false), make_table(false, true)},
                                   {make_table(true, false), make_table(true, true)}};

}  // namespace

const KernelTable* kernels_avx512_table_unchecked(bool with_bf16, bool with_vnni) {
    return &kTables[with_bf16 ? 1 : 0][with_vnni ? 1 : 0];
}

}  // namespace lmx
