// common.h — shared vocabulary of the engine: dtypes, errors, checked arithmetic.
// Owner: everyone reads it; change only with the whole engine in mind.
// Thread-safety: only constants and pure functions live here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace lmx {

// Element formats of stored and computed weights. Q8_0 and Q4_0 are llama.cpp's
// block formats, 32 values sharing one f16 scale d:
//   Q8_0 {f16 d; int8 qs[32]}   (34 bytes), value i = d * qs[i]
//   Q4_0 {f16 d; uint8 qs[16]}  (18 bytes), value i = d * (nibble_i - 8), where
//        nibble_i = qs[i] & 15 for i < 16 and qs[i - 16] >> 4 for i >= 16.
// Q8_0X16 and Q4_0X16 hold the same values as Q8_0 / Q4_0, repacked at load for the
// integer dot products of MatmulPrecision::Fast (layout: kernels/kernels.h, "x16"):
// device-only, never a file's or a user's format.
// GGUF's other block formats (ggml-common.h's block_*; dequantisation in kernels/quants.h),
// kept in their file layout on the device and dequantised to f32 inside the matmul:
//   32 values per block:  Q4_1 (20 bytes), Q5_0 (22), Q5_1 (24)
//   256 values per block: Q2_K (84), Q3_K (110), Q4_K (144), Q5_K (176), Q6_K (210)
enum class DType : uint8_t {
    F32 = 0, F16 = 1, BF16 = 2, Q8_0 = 3, Q4_0 = 4, Q8_0X16 = 5, Q4_0X16 = 6,
    Q4_1 = 7, Q5_0 = 8, Q5_1 = 9, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14,
};

constexpr int64_t kQ8BlockElems = 32;  // values per block, Q8_0 and Q4_0 alike
constexpr int64_t kQ8BlockBytes = 34;  // f16 scale + 32 x int8
constexpr int64_t kQ4BlockBytes = 18;  // f16 scale + 16 bytes of two nibbles each

constexpr int64_t kX16Rows = 16;       // rows per group of the x16 formats

// Q8_0, Q4_0 and their x16 forms: the formats of the int8-activation (fast) path.
// Every block format needs rows of whole blocks: n_cols % dtype_block_elems(t) == 0.
inline bool dtype_is_x16(DType t) { return t == DType::Q8_0X16 || t == DType::Q4_0X16; }
inline bool dtype_is_blocked(DType t) { return t == DType::Q8_0 || t == DType::Q4_0 || dtype_is_x16(t); }
// The GGUF block formats dequantised by kernels/quants.h (Q4_1 .. Q6_K above).
inline bool dtype_is_gguf_quant(DType t) { return t >= DType::Q4_1 && t <= DType::Q6_K; }
// Values per block (1 for f32 / f16 / bf16) and bytes per block: a row of n_cols values
// holds n_cols / dtype_block_elems whole blocks.
int64_t dtype_block_elems(DType t);
int64_t dtype_block_bytes(DType t);
constexpr size_t kAlign = 64;          // every buffer the kernels touch

const char* dtype_name(DType t);
// Parses "f32" | "f16" | "bf16" | "q8_0" | "q4_0" (the formats the loader converts to); throws InvalidArgument otherwise.
DType dtype_from_name(const std::string& s);

// Bytes of one row of n_cols elements (for the x16 formats, a sixteenth of a group: a
// matrix of n_rows % 16 == 0 rows still takes n_rows * row_bytes).
// Precondition for the block formats: n_cols % dtype_block_elems(t) == 0.
int64_t row_bytes(DType t, int64_t n_cols);

// The exception tree (mirrored in Python by engine/errors.py):
//   Error
//   ├── ModelFileError    a model file is corrupt, truncated or inconsistent
//   ├── UnsupportedError  a valid file asks for something we do not implement
//   └── InvalidArgument   the caller passed a value out of range (misuse)
// Running out of capacity is never an exception: see ledger.h (BookResult).
struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};
struct ModelFileError : Error {
    using Error::Error;
};
struct UnsupportedError : Error {
    using Error::Error;
};
struct InvalidArgument : Error {
    using Error::Error;
};

// a*b and a+b that throw ModelFileError(what) instead of wrapping around.
uint64_t checked_mul(uint64_t a, uint64_t b, const char* what);
uint64_t checked_add(uint64_t a, uint64_t b, const char* what);

inline size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

// f16 / bf16 <-> f32 scalar conversions (portable; kernels may use F16C).
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);
inline float bf16_to_f32(uint16_t h) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}
uint16_t f32_to_bf16(float f);  // round to nearest even, NaN kept NaN

}  // namespace lmx
