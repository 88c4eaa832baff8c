// kernels/quants.cpp — scalar dequantisation of GGUF's block formats (see quants.h).
// Owner: kernels (quant formats). Thread-safety: pure functions.
// Each expression keeps the operation order of the gguf package's numpy code (one f32
// rounding per operation, products before sums), which is what makes the results bitwise
// equal to it. Built for baseline x86-64: never FMA-contracted.
#include "quants.h"

#include <cstring>

namespace lmx {

namespace {

inline float f16_at(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return f16_to_f32(h);
}

inline int nibble32(const uint8_t* qs, int i) { return i < 16 ? (qs[i] & 15) : (qs[i - 16] >> 4); }

void q4_1(const uint8_t* b, float* out) {
    const float d = f16_at(b), m = f16_at(b + 2);
    for (int i = 0; i < 32; ++i) out[i] = d * static_cast<float>(nibble32(b + 4, i)) + m;
}

void q5_0(const uint8_t* b, float* out) {
    const float d = f16_at(b);
    uint32_t qh;
    std::memcpy(&qh, b + 2, 4);
    for (int i = 0; i < 32; ++i) {
        const int q = nibble32(b + 6, i) | static_cast<int>(((qh >> i) & 1) << 4);
        out[i] = d * static_cast<float>(q - 16);
    }
}

void q5_1(const uint8_t* b, float* out) {
    const float d = f16_at(b), m = f16_at(b + 2);
    uint32_t qh;
    std::memcpy(&qh, b + 4, 4);
    for (int i = 0; i < 32; ++i) {
        const int q = nibble32(b + 8, i) | static_cast<int>(((qh >> i) & 1) << 4);
        out[i] = d * static_cast<float>(q) + m;
    }
}

// Element e of a 256-block whose 2-bit quants are packed 4 per byte over 32-byte groups:
// half h = e / 128 uses bytes 32h .. 32h + 31, shift 2 * ((e % 128) / 32).
inline int q2_at(const uint8_t* qs, int e) {
    const int h = e / 128, r = e % 128;
    return (qs[h * 32 + r % 32] >> (2 * (r / 32))) & 3;
}

void q2_k(const uint8_t* b, float* out) {
    const uint8_t* scales = b;
    const uint8_t* qs = b + 16;
    const float d = f16_at(b + 80), dmin = f16_at(b + 82);
    for (int s = 0; s < 16; ++s) {
        const float dl = d * static_cast<float>(scales[s] & 15);
        const float ml = dmin * static_cast<float>(scales[s] >> 4);
        for (int l = 0; l < 16; ++l) {
            const int e = s * 16 + l;
            out[e] = dl * static_cast<float>(q2_at(qs, e)) - ml;
        }
    }
}

void q3_k(const uint8_t* b, float* out) {
    const uint8_t* hmask = b;
    const uint8_t* qs = b + 32;
    const uint8_t* sc = b + 96;
    const float d = f16_at(b + 108);
    for (int s = 0; s < 16; ++s) {
        const int lo = s < 8 ? (sc[s] & 15) : (sc[s - 8] >> 4);
        const int hi = (sc[8 + s % 4] >> (2 * (s / 4))) & 3;
        const int scale = static_cast<int8_t>(static_cast<uint8_t>(lo | (hi << 4))) - 32;
        const float dl = d * static_cast<float>(scale);
        for (int l = 0; l < 16; ++l) {
            const int e = s * 16 + l;
            const int hbit = (hmask[e % 32] >> (e / 32)) & 1;
            const int q = q2_at(qs, e) - ((hbit ^ 1) << 2);
            out[e] = dl * static_cast<float>(q);
        }
    }
}

// The 6-bit scale and min of sub-block s (0..7) packed in Q4_K / Q5_K's 12 bytes.
inline void k_scale_min(const uint8_t* p, int s, int& sc, int& mn) {
    if (s < 4) {
        sc = p[s] & 63;
        mn = p[4 + s] & 63;
    } else {
        sc = (p[8 + s - 4] & 15) | ((p[s - 4] >> 2) & 48);
        mn = (p[8 + s - 4] >> 4) | ((p[4 + s - 4] >> 2) & 48);
    }
}

void q4_k(const uint8_t* b, float* out) {
    const float d = f16_at(b), dmin = f16_at(b + 2);
    const uint8_t* scales = b + 4;
    const uint8_t* qs = b + 16;
    for (int s = 0; s < 8; ++s) {
        int sc, mn;
        k_scale_min(scales, s, sc, mn);
        const float ds = d * static_cast<float>(sc), dm = dmin * static_cast<float>(mn);
        const uint8_t* q = qs + (s / 2) * 32;
        const int shift = 4 * (s % 2);
        for (int l = 0; l < 32; ++l) out[s * 32 + l] = ds * static_cast<float>((q[l] >> shift) & 15) - dm;
    }
}

void q5_k(const uint8_t* b, float* out) {
    const float d = f16_at(b), dmin = f16_at(b + 2);
    const uint8_t* scales = b + 4;
    const uint8_t* qh = b + 16;
    const uint8_t* qs = b + 48;
    for (int s = 0; s < 8; ++s) {
        int sc, mn;
        k_scale_min(scales, s, sc, mn);
        const float ds = d * static_cast<float>(sc), dm = dmin * static_cast<float>(mn);
        const uint8_t* q = qs + (s / 2) * 32;
        const int shift = 4 * (s % 2);
        for (int l = 0; l < 32; ++l) {
            const int v = ((q[l] >> shift) & 15) | (((qh[l] >> s) & 1) << 4);
            out[s * 32 + l] = ds * static_cast<float>(v) - dm;
        }
    }
}

void q6_k(const uint8_t* b, float* out) {
    const uint8_t* ql = b;
    const uint8_t* qh = b + 128;
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
    const float d = f16_at(b + 208);
    for (int s = 0; s < 16; ++s) {
        const float ds = d * static_cast<float>(scales[s]);
        for (int l = 0; l < 16; ++l) {
            const int e = s * 16 + l;
            const int h = e / 128, r = e % 128;
            const int lo = (ql[h * 64 + r % 64] >> (4 * (r / 64))) & 15;
            const int hi = (qh[h * 32 + r % 32] >> (2 * (r / 32))) & 3;
            out[e] = ds * static_cast<float>((lo | (hi << 4)) - 32);
        }
    }
}

}  // namespace

void dequantize_blocks(DType t, const uint8_t* blocks, int64_t n_blocks, float* out) {
    void (*fn)(const uint8_t*, float*) = nullptr;
    switch (t) {
        case DType::Q4_1: fn = q4_1; break;
        case DType::Q5_0: fn = q5_0; break;
        case DType::Q5_1: fn = q5_1; break;
        case DType::Q2_K: fn = q2_k; break;
        case DType::Q3_K: fn = q3_k; break;
        case DType::Q4_K: fn = q4_k; break;
        case DType::Q5_K: fn = q5_k; break;
        case DType::Q6_K: fn = q6_k; break;
        default: throw InvalidArgument(std::string("dequantize_blocks: ") + dtype_name(t) + " is not a GGUF block format");
    }
    const int64_t nb = dtype_block_bytes(t), ne = dtype_block_elems(t);
    for (int64_t i = 0; i < n_blocks; ++i) fn(blocks + i * nb, out + i * ne);
}

void quant_block_uint(DType t, const uint8_t* b, uint8_t* q) {
    auto set = [&](int i, int v) { q[i] = static_cast<uint8_t>(v); };
    switch (t) {
        case DType::Q4_1:
            for (int i = 0; i < 32; ++i) set(i, nibble32(b + 4, i));
            return;
        case DType::Q5_0:
        case DType::Q5_1: {
            const int o = t == DType::Q5_0 ? 2 : 4;  // qh, then the nibbles
            uint32_t qh;
            std::memcpy(&qh, b + o, 4);
            for (int i = 0; i < 32; ++i) set(i, nibble32(b + o + 4, i) | static_cast<int>(((qh >> i) & 1) << 4));
            return;
        }
        case DType::Q2_K:
            for (int e = 0; e < 256; ++e) set(e, q2_at(b + 16, e));
            return;
        case DType::Q3_K:
            for (int e = 0; e < 256; ++e) set(e, q2_at(b + 32, e) | (((b[e % 32] >> (e / 32)) & 1) << 2));
            return;
        case DType::Q4_K:
        case DType::Q5_K: {
            const uint8_t* qs = b + (t == DType::Q4_K ? 16 : 48);
            for (int e = 0; e < 256; ++e) {
                const int s = e / 32, l = e % 32;
                int v = (qs[(s / 2) * 32 + l] >> (4 * (s % 2))) & 15;
                if (t == DType::Q5_K) v |= ((b[16 + l] >> s) & 1) << 4;
                set(e, v);
            }
            return;
        }
        case DType::Q6_K:
            for (int e = 0; e < 256; ++e) {
                const int h = e / 128, r = e % 128;
                const int lo = (b[h * 64 + r % 64] >> (4 * (r / 64))) & 15;
                const int hi = (b[128 + h * 32 + r % 32] >> (2 * (r / 32))) & 3;
                set(e, lo | (hi << 4));
            }
            return;
        default: throw InvalidArgument(std::string("quant_block_uint: ") + dtype_name(t) + " is not a GGUF block format");
    }
}

}  // namespace lmx
