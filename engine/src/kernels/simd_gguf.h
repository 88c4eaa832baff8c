// kernels/simd_gguf.h — the GGUF block formats unpacked on 256-bit vectors: quants as bytes, scales as f32.
// Owner: kernels (quant formats). Included only by the ISA files (through simd_quants.h),
// so every function has internal linkage per ISA. Thread-safety: pure functions.
//
// Both matmuls over these formats read the blocks through GgufFmt: the exact one
// (simd_quants.h: a * (q - off) + b in f32, bitwise dequantize_blocks) and the fast one
// (simd_q8act_gguf.h: integer dots of q with int8 activations). The values are those of
// quants.h's integer form, bit for bit: q as quant_block_uint, a and b as quant_sub_scales
// (the same single f32 products and negations, on vectors), checked by test_quants.cpp.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "quants.h"

namespace lmx {
namespace simd {

template <DType kT>
struct GgufFmt {
    static constexpr bool kSmall = kT == DType::Q4_1 || kT == DType::Q5_0 || kT == DType::Q5_1;  // 32 per block
    static constexpr int kChunks = kSmall ? 1 : 8;                                              // of 32 per block
    static constexpr int kOff = quant_offset(kT);
    static constexpr bool kMin = quant_has_min(kT);
    static constexpr bool kSub16 = kT == DType::Q6_K || kT == DType::Q3_K || kT == DType::Q2_K;  // a, b per 16
    static constexpr int kSubs = kSub16 ? 16 : kChunks;  // a[], b[] per block: one per 16 or per 32 elements

    static __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
    static __m256i srl16(__m256i v, int n) { return _mm256_srl_epi16(v, _mm_cvtsi32_si128(n)); }
    static float f16_at(const uint8_t* p) {
        uint16_t h;
        std::memcpy(&h, p, 2);
        return _cvtsh_ss(h);  // exact, as f16_to_f32
    }
    // 16 bytes of nibbles as 32 in element order: low nibbles 0..15, high 16..31.
    static __m256i nibbles32(const uint8_t* qs16) {
        const __m256i q = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs16)));
        return _mm256_and_si256(_mm256_srlv_epi64(q, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(15));
    }
    // Byte i = (bit i of the u32 at p) << 4: the fifth bit of Q5_0 / Q5_1.
    static __m256i bits32(const uint8_t* p) {
        uint32_t qh;
        std::memcpy(&qh, p, 4);
        const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                              2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
        const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));
        const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(qh)), shuf);
        return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit), _mm256_set1_epi8(16));
    }

    // nib32 with the fifth bit of Q5_0 / Q5_1 (bit i of the u32 at p) added to byte i: with AVX-512 BW
    // the u32 is the byte mask of one masked add; without, bits32's shuffle and compare.
    static __m256i with_bit5(__m256i nib32, const uint8_t* p) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
        uint32_t qh;
        std::memcpy(&qh, p, 4);
        return _mm256_mask_add_epi8(nib32, static_cast<__mmask32>(qh), nib32, _mm256_set1_epi8(16));
#else
        return _mm256_or_si256(nib32, bits32(p));
#endif
    }

    // The unsigned quants of chunk c (elements 32c .. 32c + 31) of one block: quant_block_uint's.
    static __m256i quants(const uint8_t* blk, int c) {
        const __m256i m3 = _mm256_set1_epi8(3), m15 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
        if constexpr (kT == DType::Q4_1) return nibbles32(blk + 4);
        if constexpr (kT == DType::Q5_0) return with_bit5(nibbles32(blk + 6), blk + 2);
        if constexpr (kT == DType::Q5_1) return with_bit5(nibbles32(blk + 8), blk + 4);
        if constexpr (kT == DType::Q4_K || kT == DType::Q5_K) {
            const uint8_t* qs = blk + (kT == DType::Q4_K ? 16 : 48);
            __m256i q = _mm256_and_si256(srl16(load32(qs + (c / 2) * 32), 4 * (c % 2)), m15);
            if constexpr (kT == DType::Q5_K)  // bit c of qh[l], as 16
                q = _mm256_or_si256(q, _mm256_slli_epi16(_mm256_and_si256(srl16(load32(blk + 16), c), one), 4));
            return q;
        }
        if constexpr (kT == DType::Q6_K) {
            const int h = c / 4, cc = c % 4;
            const __m256i lo = _mm256_and_si256(srl16(load32(blk + h * 64 + 32 * (cc % 2)), 4 * (cc / 2)), m15);
            const __m256i hi = _mm256_and_si256(srl16(load32(blk + 128 + h * 32), 2 * cc), m3);
            return _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
        }
        if constexpr (kT == DType::Q3_K || kT == DType::Q2_K) {
            const int h = c / 4, cc = c % 4;
            const __m256i q2 = _mm256_and_si256(srl16(load32(blk + (kT == DType::Q3_K ? 32 : 16) + h * 32), 2 * cc), m3);
            if constexpr (kT == DType::Q2_K) return q2;
            const __m256i hb = _mm256_and_si256(srl16(load32(blk), c), one);  // bit c of hmask[l]
            return _mm256_or_si256(q2, _mm256_slli_epi16(hb, 2));
        }
        return _mm256_setzero_si256();
    }

    // a[kSubs], b[kSubs] of one block (b untouched without a min): quant_sub_scales' values.
    static void scales(const uint8_t* blk, float* a, float* b) {
        const __m256 neg = _mm256_set1_ps(-0.0f);
        auto bytes8 = [](uint64_t v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(v)))); };
        if constexpr (kSmall) {
            a[0] = f16_at(blk);
            if constexpr (kMin) b[0] = f16_at(blk + 2);
        } else if constexpr (kT == DType::Q4_K || kT == DType::Q5_K) {
            // The 6-bit scales and mins of the 8 sub-blocks, packed in 12 bytes (words w0 w1 w2):
            // s < 4: sc = byte s of w0 & 63, m = byte s of w1 & 63; s >= 4: the low four bits from
            // byte s-4 of w2 (low / high nibble), the top two from the top of byte s-4 of w0 / w1.
            uint32_t w[3];
            std::memcpy(w, blk + 4, 12);
            const uint64_t sc = (w[0] & 0x3f3f3f3fu) |
                                static_cast<uint64_t>((w[2] & 0x0f0f0f0fu) | ((w[0] >> 2) & 0x30303030u)) << 32;
            const uint64_t mn = (w[1] & 0x3f3f3f3fu) |
                                static_cast<uint64_t>(((w[2] >> 4) & 0x0f0f0f0fu) | ((w[1] >> 2) & 0x30303030u)) << 32;
            _mm256_storeu_ps(a, _mm256_mul_ps(_mm256_set1_ps(f16_at(blk)), bytes8(sc)));
            _mm256_storeu_ps(b, _mm256_xor_ps(_mm256_mul_ps(_mm256_set1_ps(f16_at(blk + 2)), bytes8(mn)), neg));
        } else if constexpr (kT == DType::Q6_K) {
            const __m256 d = _mm256_set1_ps(f16_at(blk + 208));
            for (int h = 0; h < 2; ++h) {
                const __m128i s8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 192 + 8 * h));
                _mm256_storeu_ps(a + 8 * h, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s8))));
            }
        } else if constexpr (kT == DType::Q2_K) {
            const __m256 d = _mm256_set1_ps(f16_at(blk + 80)), dmin = _mm256_set1_ps(f16_at(blk + 82));
            for (int h = 0; h < 2; ++h) {
                uint64_t s;
                std::memcpy(&s, blk + 8 * h, 8);
                _mm256_storeu_ps(a + 8 * h, _mm256_mul_ps(d, bytes8(s & 0x0f0f0f0f0f0f0f0full)));
                _mm256_storeu_ps(b + 8 * h, _mm256_xor_ps(_mm256_mul_ps(dmin, bytes8((s >> 4) & 0x0f0f0f0f0f0f0f0full)), neg));
            }
        } else {  // Q3_K: the scalar decoding (a rarely used format)
            quant_sub_scales(kT, blk, a, b);
        }
    }
    // Lanes 0-3 take a chunk's first sub-block of 16, lanes 4-7 its second (the int32 lanes of a dot).
    static __m256 lanes(const float* s, int c) {
        if constexpr (kSub16)
            return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(s[2 * c])), _mm_set1_ps(s[2 * c + 1]), 1);
        else
            return _mm256_set1_ps(s[c]);
    }
    // The scale of elements 16h .. 16h + 15 of chunk c.
    static float sub(const float* s, int c, int h) { return kSub16 ? s[2 * c + h] : s[c]; }
};

}  // namespace simd
}  // namespace lmx
