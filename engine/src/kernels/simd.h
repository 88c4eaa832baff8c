// kernels/simd.h — the 16-lane vector contract the fast kernels are written against, and shared helpers.
// Owner: kernels (internal). Included ONLY by the ISA files (kernels_avx2.cpp,
// kernels_avx512.cpp) through simd_*.h, each with its own traits S. Thread-safety: pure functions.
//
// Why one body for two ISAs. Every kernel in simd_*.h is a template on S, a traits struct
// that defines V (16 f32 lanes: one zmm on AVX-512, two ymm on AVX2) and its ops with
// identical rounding (explicit FMA, the same reduction tree). So the AVX2 and AVX-512
// builds compute the same operations in the same order and give bitwise-identical
// results (MatmulPrecision::Exact): a request regenerated on another machine of the fleet reproduces its tokens.
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
//   V hsum16(const V a[16]) — lane j = hsum(a[j]), bit for bit (same pairs, transposed)
//   V load_f16(const uint8_t*), load_bf16(const uint8_t*)  (16 elements each)
//   V bcast_f16(const uint8_t* p)  (the f16 at p, widened, in every lane)
//   V load_q8(const uint8_t* qs16, V d)  (16 int8 times d; exact)
//   V from_i8(__m128i q16, V d)  (the 16 int8 of q16 times d; exact; load_q8 from a register)
//   V load_q4(const uint8_t* qs16, int h, V d)  (the 16 low (h=0) or high (h=1) nibbles
//             of qs16[0..15], minus 8, times d; exact)
//   constants kRows, kToks: matmul register tile (rows x tokens) for n_tok > 1,
//             kRows1: rows per tile when n_tok == 1.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace lmx {
namespace simd {

constexpr int kLanes = 16;

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// How many row tiles ahead the matmuls prefetch weights (simd_matmul.h mm_rows explains why).
constexpr int64_t kPrefetchTiles = 2;

// The weights the first kPrefetchTiles row tiles of a task read, which no earlier tile
// prefetched: asked for all at once, so they arrive in parallel rather than one tile's
// worth of demand misses at a time.
static inline void prefetch_task_head(const uint8_t* p, int64_t n_bytes) {
    for (int64_t off = 0; off < n_bytes; off += 64) __builtin_prefetch(p + off, 0, 2);
}

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

}  // namespace simd
}  // namespace lmx
