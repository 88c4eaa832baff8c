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

}  // namespace lmx
