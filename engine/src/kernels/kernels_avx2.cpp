// kernels/kernels_avx2.cpp — the kernel table for AVX2 + FMA + F16C.
// Owner: kernels. Thread-safety: pure functions. Built with -mavx2 -mfma -mf16c: call
// only through kernels_table_avx2(), which checks the CPU first.
//
// One 16-lane vector is a pair of ymm (lanes 0-7, 8-15), so the op sequence — and the
// result, bit for bit — is that of the AVX-512 build (see simd_*.h). With 16 ymm
// registers and two per accumulator, the matmul tile is 4 rows x 1 token (8 accumulator
// ymm; measured best of 4x1, 3x2, 2x3, 2x2). It is bounded by streaming activations from
// L2, so compute-bound calls (prefill, large batches) run at about 60% of the AVX-512
// rate; decode is memory-bound and unaffected. Blocking n_in so activations stay in L1
// would lift it, at the cost of spilling vector accumulators between blocks.
#include <immintrin.h>

#include "kernels_impl.h"
#include "simd_attention.h"
#include "simd_elementwise.h"
#include "simd_matmul.h"
#include "simd_q8act.h"
#include "simd_q8act_gguf.h"

namespace lmx {
namespace {

struct Avx2 {
    struct V {
        __m256 lo, hi;  // lanes 0-7, 8-15
    };
    static constexpr int kRows = 4, kToks = 1, kRows1 = 4;
    static constexpr bool kZmm = false;

    static V zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
    static V set1(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
    static V load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
    static void store(float* p, V v) {
        _mm256_storeu_ps(p, v.lo);
        _mm256_storeu_ps(p + 8, v.hi);
    }
    static V add(V a, V b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
    static V sub(V a, V b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
    static V mul(V a, V b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
    static V div(V a, V b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
    static V max(V a, V b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
    static V min(V a, V b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
    static V fmadd(V a, V b, V c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
    static V round(V a) {
        constexpr int kMode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        return {_mm256_round_ps(a.lo, kMode), _mm256_round_ps(a.hi, kMode)};
    }
    static __m256 pow2i8(__m256 n) {
        const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
        return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
    }
    static V pow2i(V n) { return {pow2i8(n.lo), pow2i8(n.hi)}; }
    static V select_lt(V a, V b, V t, V f) {
        return {_mm256_blendv_ps(f.lo, t.lo, _mm256_cmp_ps(a.lo, b.lo, _CMP_LT_OQ)),
                _mm256_blendv_ps(f.hi, t.hi, _mm256_cmp_ps(a.hi, b.hi, _CMP_LT_OQ))};
    }

    // Reduction tree shared with the AVX-512 build: 16 -> 8 -> 4 -> 2 -> 1.
    static float hsum(V a) {
        const __m256 s8 = _mm256_add_ps(a.lo, a.hi);
        const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
        const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
    }
    // hsum of 16 vectors at once, same pairs as hsum: lane j of the result is hsum(a[j]).
    static V hsum16(const V a[16]) {
        __m256 l1[16], l2[8], l3[4], l4[2];
        for (int k = 0; k < 16; ++k) l1[k] = _mm256_add_ps(a[k].lo, a[k].hi);  // j + j+8
        for (int m = 0; m < 8; ++m)  // [key 2m | key 2m+1]: j + j+4
            l2[m] = _mm256_add_ps(_mm256_permute2f128_ps(l1[2 * m], l1[2 * m + 1], 0x20),
                                  _mm256_permute2f128_ps(l1[2 * m], l1[2 * m + 1], 0x31));
        for (int n = 0; n < 4; ++n)  // [keys 4n, 4n+2 | 4n+1, 4n+3]: j + j+2
            l3[n] = _mm256_add_ps(_mm256_shuffle_ps(l2[2 * n], l2[2 * n + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm256_shuffle_ps(l2[2 * n], l2[2 * n + 1], _MM_SHUFFLE(3, 2, 3, 2)));
        for (int r = 0; r < 2; ++r)  // [keys 8r + 0,2,4,6 | 8r + 1,3,5,7]: j + j+1
            l4[r] = _mm256_add_ps(_mm256_shuffle_ps(l3[2 * r], l3[2 * r + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm256_shuffle_ps(l3[2 * r], l3[2 * r + 1], _MM_SHUFFLE(3, 1, 3, 1)));
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        return {_mm256_permutevar8x32_ps(l4[0], order), _mm256_permutevar8x32_ps(l4[1], order)};
    }
    static float hmax(V a) {
        const __m256 s8 = _mm256_max_ps(a.lo, a.hi);
        const __m128 s4 = _mm_max_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
        const __m128 s2 = _mm_max_ps(s4, _mm_movehl_ps(s4, s4));
        return _mm_cvtss_f32(_mm_max_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
    }

    static V load_f16(const uint8_t* p) {
        return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
                _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)))};
    }
    static __m256 bf16_8(const uint8_t* p) {
        const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
    }
    static V load_bf16(const uint8_t* p) { return {bf16_8(p), bf16_8(p + 16)}; }
    static V bcast_f16(const uint8_t* p) {
        uint16_t h;
        __builtin_memcpy(&h, p, 2);
        const __m256 d = _mm256_cvtph_ps(_mm_set1_epi16(static_cast<short>(h)));
        return {d, d};
    }
    static __m256 q8_8(const uint8_t* qs, __m256 d) {
        const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs)));
        return _mm256_mul_ps(_mm256_cvtepi32_ps(q), d);
    }
    static V load_q8(const uint8_t* qs, V d) { return {q8_8(qs, d.lo), q8_8(qs + 8, d.hi)}; }
    static V from_i8(__m128i q16, V d) {
        return {_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q16)), d.lo),
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(q16, q16))), d.hi)};
    }
    static __m256 q4_8(const uint8_t* qs, int h, __m256 d) {
        __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs)));
        q = h ? _mm256_srli_epi32(q, 4) : _mm256_and_si256(q, _mm256_set1_epi32(15));
        return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, _mm256_set1_epi32(8))), d);
    }
    static V load_q4(const uint8_t* qs, int h, V d) { return {q4_8(qs, h, d.lo), q4_8(qs + 8, h, d.hi)}; }
};

// Integer block dot of simd_q8act.h: vpmaddubsw (u8 x s8 pairs to s16, no saturation
// for |u * s| <= 128 * 127) then vpmaddwd by ones (pairs of s16 to s32). Tiles: 4 rows
// for one token, 3 rows x 2 tokens otherwise (6 accumulators of the 16 ymm).
struct Avx2Dot {
    static constexpr bool kWideU = false;  // vpmaddubsw would saturate on x + 128
    static constexpr int kRows1 = 4, kRows = 3, kToks = 2;
    static constexpr bool kZmm = false;
    static __m256i dot_acc(__m256i acc, __m256i u, __m256i s) {
        return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
    }
};

const KernelTable kTable = {
    "avx2",
    &simd::matmul_rows<Avx2>,
    &simd::rmsnorm<Avx2>,
    &simd::silu_mul<Avx2>,
    &simd::softmax<Avx2>,
    &simd::attention<Avx2>,
    nullptr,  // no bf16 dot product on AVX2: MatmulPrecision::Fast keeps bf16 exact
    nullptr,
    &simd::act_to_q8<Avx2Dot>,
    &simd::matmul_rows_q8act_any<Avx2Dot>,
    &simd::matmul_rows_x16_ymm<Avx2Dot>,
    &simd::attention<Avx2, uint16_t>,
    &simd::gelu_tanh_mul<Avx2>,
};

}  // namespace

const KernelTable* kernels_avx2_table_unchecked() { return &kTable; }

}  // namespace lmx
