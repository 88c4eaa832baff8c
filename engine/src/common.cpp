// common.cpp — dtype names, checked arithmetic, scalar half-precision conversions.
// Owner: engine core. Thread-safety: pure functions only.
#include "common.h"

#include <cmath>
#include <cstring>

namespace lmx {

const char* dtype_name(DType t) {
    switch (t) {
        case DType::F32: return "f32";
        case DType::F16: return "f16";
        case DType::BF16: return "bf16";
        case DType::Q8_0: return "q8_0";
        case DType::Q4_0: return "q4_0";
        case DType::Q8_0X16: return "q8_0x16";
        case DType::Q4_0X16: return "q4_0x16";
        case DType::Q4_1: return "q4_1";
        case DType::Q5_0: return "q5_0";
        case DType::Q5_1: return "q5_1";
        case DType::Q2_K: return "q2_k";
        case DType::Q3_K: return "q3_k";
        case DType::Q4_K: return "q4_k";
        case DType::Q5_K: return "q5_k";
        case DType::Q6_K: return "q6_k";
    }
    return "?";
}

int64_t dtype_block_elems(DType t) {
    switch (t) {
        case DType::F32:
        case DType::F16:
        case DType::BF16: return 1;
        case DType::Q8_0:
        case DType::Q4_0:
        case DType::Q8_0X16:
        case DType::Q4_0X16:
        case DType::Q4_1:
        case DType::Q5_0:
        case DType::Q5_1: return 32;
        case DType::Q2_K:
        case DType::Q3_K:
        case DType::Q4_K:
        case DType::Q5_K:
        case DType::Q6_K: return 256;
    }
    return 1;
}

int64_t dtype_block_bytes(DType t) {
    switch (t) {
        case DType::F32: return 4;
        case DType::F16:
        case DType::BF16: return 2;
        case DType::Q8_0:
        case DType::Q8_0X16: return kQ8BlockBytes;
        case DType::Q4_0:
        case DType::Q4_0X16: return kQ4BlockBytes;
        case DType::Q4_1: return 20;
        case DType::Q5_0: return 22;
        case DType::Q5_1: return 24;
        case DType::Q2_K: return 84;
        case DType::Q3_K: return 110;
        case DType::Q4_K: return 144;
        case DType::Q5_K: return 176;
        case DType::Q6_K: return 210;
    }
    return 4;
}

DType dtype_from_name(const std::string& s) {
    if (s == "f32" || s == "float32") return DType::F32;
    if (s == "f16" || s == "float16") return DType::F16;
    if (s == "bf16" || s == "bfloat16") return DType::BF16;
    if (s == "q8_0") return DType::Q8_0;
    if (s == "q4_0") return DType::Q4_0;
    throw InvalidArgument("weight format: expected one of f32, f16, bf16, q8_0, q4_0; found '" + s + "'");
}

int64_t row_bytes(DType t, int64_t n_cols) { return n_cols / dtype_block_elems(t) * dtype_block_bytes(t); }

uint64_t checked_mul(uint64_t a, uint64_t b, const char* what) {
    uint64_t r;
    if (__builtin_mul_overflow(a, b, &r)) throw ModelFileError(std::string(what) + ": size overflows 64 bits");
    return r;
}

uint64_t checked_add(uint64_t a, uint64_t b, const char* what) {
    uint64_t r;
    if (__builtin_add_overflow(a, b, &r)) throw ModelFileError(std::string(what) + ": offset overflows 64 bits");
    return r;
}

float f16_to_f32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal: renormalise
            exp = 127 - 15 + 1;
            while ((mant & 0x400) == 0) {
                mant <<= 1;
                exp--;
            }
            mant &= 0x3ff;
            bits = sign | (exp << 23) | (mant << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

uint16_t f32_to_f16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000;
    const int32_t exp = static_cast<int32_t>((x >> 23) & 0xff) - 127 + 15;
    uint32_t mant = x & 0x7fffff;
    if (((x >> 23) & 0xff) == 0xff) return static_cast<uint16_t>(sign | 0x7c00 | (mant ? 0x200 : 0));
    if (exp >= 31) return static_cast<uint16_t>(sign | 0x7c00);
    if (exp <= 0) {
        if (exp < -10) return static_cast<uint16_t>(sign);
        mant |= 0x800000;
        const uint32_t shift = static_cast<uint32_t>(14 - exp);
        uint32_t h = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1);
        const uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1))) h++;
        return static_cast<uint16_t>(sign | h);
    }
    uint32_t h = (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
    const uint32_t rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;  // may carry into exponent: correct
    return static_cast<uint16_t>(sign | h);
}

uint16_t f32_to_bf16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffff) > 0x7f800000) return static_cast<uint16_t>((x >> 16) | 0x40);
    const uint32_t lsb = (x >> 16) & 1;
    x += 0x7fff + lsb;
    return static_cast<uint16_t>(x >> 16);
}

}  // namespace lmx
