// kernels/quants.h — scalar dequantisation of GGUF's block formats (Q4_1, Q5_0, Q5_1, Q2_K .. Q6_K).
// Owner: kernels (quant formats). Thread-safety: pure functions.
//
// These define the values of each format, bit for bit those of the `gguf` Python package's
// dequantize (which transformers uses to load a GGUF file), so the engine and transformers
// multiply by the same f32 weights (tests/test_gguf_quants.py checks it with np.array_equal).
// Built for baseline x86-64 (quants.cpp): no FMA contraction changes a rounding. The SIMD
// matmul calls dequantize_blocks on its row tiles and then runs the f32 FMA loop, so its
// result is bitwise the f32 matmul of the dequantised matrix.
//
// Block layouts (little-endian; d, m, dmin are f16; "sub" = a scale's group of values):
//   Q4_1 {d; m; u8 qs[16]}           value i = d * q_i + m, q_i = 4-bit (low nibbles 0..15, high 16..31)
//   Q5_0 {d; u32 qh; u8 qs[16]}      value i = d * (q_i - 16), q_i = nibble | bit i of qh << 4
//   Q5_1 {d; m; u32 qh; u8 qs[16]}   value i = d * q_i + m
//   Q2_K {u8 scales[16]; u8 qs[64]; d; dmin}   16 subs of 16: d * (sc & 15) * q - dmin * (sc >> 4), q 2-bit
//   Q3_K {u8 hmask[32]; u8 qs[64]; u8 scales[12]; d}   16 subs of 16: d * (6-bit sc - 32) * (q2 - 4 * !hbit)
//   Q4_K {d; dmin; u8 scales[12]; u8 qs[128]}  8 subs of 32: d * sc * q - dmin * m (6-bit sc, m packed in 12 bytes)
//   Q5_K {d; dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}   as Q4_K with a fifth bit from qh
//   Q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; d}   16 subs of 16: d * sc * (6-bit q - 32)
#pragma once

#include <cstdint>

#include "../common.h"

namespace lmx {

// Dequantises n_blocks consecutive blocks of format t (dtype_is_gguf_quant(t)) into
// out[n_blocks * dtype_block_elems(t)].
void dequantize_blocks(DType t, const uint8_t* blocks, int64_t n_blocks, float* out);

// ---- the integer form of each block (MatmulPrecision::Fast: int8 activations, integer dots) ----
// Every format above is, element i of a block,
//     value_i = a[i / 16] * (q_i - quant_offset(t)) + b[i / 16]     (b = 0 when !quant_has_min(t))
// with q_i an unsigned integer of at most 6 bits and a, b f32 per 16 elements (per 32 for
// Q4_1, Q5_0, Q5_1, Q4_K, Q5_K: both halves carry the same value). Each a, b is one f32
// operation on the block's fields, the one quants.cpp rounds (d * sc; b = -(dmin * m) where
// quants.cpp subtracts dmin * m), so a * (q - off) + b is bitwise dequantize_blocks' value
// (test_quants.cpp checks it): the fast path multiplies the same weights as the exact one.
//   Q4_1, Q5_1: a = d, b = m          Q5_0: off 16, a = d      Q6_K: off 32, a = d * sc
//   Q4_K, Q5_K: a = d * sc, b = -(dmin * m)                    Q3_K: off 4, q = q2 | hbit << 2,
//   Q2_K: a = d * (sc & 15), b = -(dmin * (sc >> 4))                 a = d * (sc - 32)
constexpr int quant_offset(DType t) { return t == DType::Q5_0 ? 16 : t == DType::Q6_K ? 32 : t == DType::Q3_K ? 4 : 0; }
constexpr bool quant_has_min(DType t) {
    return t == DType::Q4_1 || t == DType::Q5_1 || t == DType::Q4_K || t == DType::Q5_K || t == DType::Q2_K;
}
// The unsigned quants q[dtype_block_elems(t)] of one block (scalar; the definition the SIMD unpacking reproduces).
void quant_block_uint(DType t, const uint8_t* blk, uint8_t* q);

// a[], b[] (dtype_block_elems(t) / 16 each) of one block. static inline: the reference
// (baseline x86-64) and each ISA file compile their own copy, whose every operation is a
// single f32 product or a negation, so no flag (FMA contraction included) can change a bit.
static inline void quant_sub_scales(DType t, const uint8_t* blk, float* a, float* b) {
    auto f16_at = [](const uint8_t* p) {
        uint16_t h;
        __builtin_memcpy(&h, p, 2);
        return f16_to_f32(h);
    };
    switch (t) {
        case DType::Q4_1:
        case DType::Q5_1: a[0] = a[1] = f16_at(blk), b[0] = b[1] = f16_at(blk + 2); return;
        case DType::Q5_0: a[0] = a[1] = f16_at(blk), b[0] = b[1] = 0.0f; return;
        case DType::Q4_K:
        case DType::Q5_K: {
            const float d = f16_at(blk), dmin = f16_at(blk + 2);
            const uint8_t* p = blk + 4;  // 6-bit scales and mins of the 8 sub-blocks of 32, packed in 12 bytes
            for (int s = 0; s < 8; ++s) {
                const int sc = s < 4 ? (p[s] & 63) : ((p[s + 4] & 15) | ((p[s - 4] >> 2) & 48));
                const int mn = s < 4 ? (p[s + 4] & 63) : ((p[s + 4] >> 4) | ((p[s] >> 2) & 48));
                a[2 * s] = a[2 * s + 1] = d * static_cast<float>(sc);
                b[2 * s] = b[2 * s + 1] = -(dmin * static_cast<float>(mn));
            }
            return;
        }
        case DType::Q6_K: {
            const float d = f16_at(blk + 208);
            for (int s = 0; s < 16; ++s) a[s] = d * static_cast<float>(static_cast<int8_t>(blk[192 + s])), b[s] = 0.0f;
            return;
        }
        case DType::Q3_K: {
            const uint8_t* sc = blk + 96;
            const float d = f16_at(blk + 108);
            for (int s = 0; s < 16; ++s) {
                const int lo = s < 8 ? (sc[s] & 15) : (sc[s - 8] >> 4);
                const int hi = (sc[8 + s % 4] >> (2 * (s / 4))) & 3;
                a[s] = d * static_cast<float>((lo | (hi << 4)) - 32), b[s] = 0.0f;
            }
            return;
        }
        case DType::Q2_K: {
            const float d = f16_at(blk + 80), dmin = f16_at(blk + 82);
            for (int s = 0; s < 16; ++s) {
                a[s] = d * static_cast<float>(blk[s] & 15);
                b[s] = -(dmin * static_cast<float>(blk[s] >> 4));
            }
            return;
        }
        default: return;
    }
}

}  // namespace lmx
