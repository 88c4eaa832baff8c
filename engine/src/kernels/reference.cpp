// kernels/reference.cpp — scalar reference ops (lmx::ref), weight conversion, row dequantisation.
// Owner: kernels. Thread-safety: pure functions.
//
// The references are the oracle of the kernel tests and the fallback on CPUs without
// AVX2: written for obviousness, they accumulate dot products and sums in double so
// that their own rounding error is far below the tolerance granted to the fast code.
// They are batch invariant trivially: every output element is its own loop.
// This file is built for baseline x86-64 (no FMA), so a*b+c is never contracted.
#include <cassert>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels_impl.h"
#include "quants.h"

namespace lmx {

namespace {

// Element i of one row of a weight matrix as f32 (exact for every format).
inline float weight_at(const uint8_t* row, DType t, int64_t i) {
    switch (t) {
        case DType::F32: {
            float v;
            std::memcpy(&v, row + 4 * i, 4);
            return v;
        }
        case DType::F16: {
            uint16_t h;
            std::memcpy(&h, row + 2 * i, 2);
            return f16_to_f32(h);
        }
        case DType::BF16: {
            uint16_t h;
            std::memcpy(&h, row + 2 * i, 2);
            return bf16_to_f32(h);
        }
        case DType::Q8_0: {
            const uint8_t* blk = row + (i / kQ8BlockElems) * kQ8BlockBytes;
            uint16_t d;
            std::memcpy(&d, blk, 2);
            const int8_t q = static_cast<int8_t>(blk[2 + i % kQ8BlockElems]);
            return f16_to_f32(d) * static_cast<float>(q);  // exact: 11-bit d times 8-bit q
        }
        case DType::Q4_0: {
            const uint8_t* blk = row + (i / kQ8BlockElems) * kQ4BlockBytes;
            uint16_t d;
            std::memcpy(&d, blk, 2);
            const int64_t j = i % kQ8BlockElems;
            const int nib = j < 16 ? (blk[2 + j] & 15) : (blk[2 + j - 16] >> 4);
            return f16_to_f32(d) * static_cast<float>(nib - 8);  // exact: 11-bit d times 4-bit q
        }
        case DType::Q8_0X16:
        case DType::Q4_0X16: break;  // not row-contiguous: see dequantize_row
        default: break;              // the GGUF block formats: row_to_f32 dequantises whole blocks
    }
    return 0.0f;
}

inline const uint8_t* weight_row(const WeightView& w, int64_t row) {
    return static_cast<const uint8_t*>(w.data) + row * row_bytes(w.dtype, w.n_in);
}

// llama.cpp's quantize_row_q8_0_ref for one block of 32: d = amax/127, id = 1/d,
// q = roundf(x * id) (half away from zero), d stored as f16.
void quantize_block_q8_0(const float* x, uint8_t* out) {
    float amax = 0.0f;
    for (int j = 0; j < kQ8BlockElems; ++j) amax = std::fmax(amax, std::fabs(x[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const uint16_t dh = f32_to_f16(d);
    std::memcpy(out, &dh, 2);
    for (int j = 0; j < kQ8BlockElems; ++j) {
        const float v = x[j] * id;
        int q;
        if (std::fabs(v) <= 127.5f) {
            // roundf without the libm call: truncate, then step away from zero on a
            // fraction of at least one half (v - trunc(v) is exact here).
            q = static_cast<int>(v);
            const float frac = v - static_cast<float>(q);
            q += (frac >= 0.5f) - (frac <= -0.5f);
            q = q > 127 ? 127 : (q < -127 ? -127 : q);  // |x * id| can exceed 127 by an ulp, never by 1/2
        } else {
            q = v != v ? 0 : (v > 0.0f ? 127 : -127);  // only non-finite input gets here
        }
        out[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(q));
    }
}

// llama.cpp's quantize_row_q4_0_ref for one block of 32: the value of largest
// magnitude, max (its sign kept), maps to -8: d = max / -8, id = 1/d; the nibble is
// min(15, (int8_t)(x * id + 8.5f)) (truncation), d stored as f16.
void quantize_block_q4_0(const float* x, uint8_t* out) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < kQ8BlockElems; ++j) {
        if (amax < std::fabs(x[j])) {
            amax = std::fabs(x[j]);
            max = x[j];
        }
    }
    const float d = max / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const uint16_t dh = f32_to_f16(d);
    std::memcpy(out, &dh, 2);
    auto nibble = [&](float v) {
        const float s = v * id;     // in [-8, 8] for finite x
        const float t = s + 8.5f;   // two roundings, as llama.cpp (this file is never FMA-contracted)
        return static_cast<uint8_t>(t >= 15.0f ? 15 : (t > 0.0f ? static_cast<int>(t) : 0));  // NaN -> 0
    };
    for (int j = 0; j < 16; ++j) out[2 + j] = static_cast<uint8_t>(nibble(x[j]) | (nibble(x[16 + j]) << 4));
}

// One row of src_t (F32, F16 or BF16) to f32.
void row_to_f32(const uint8_t* src, DType src_t, int64_t n, float* out) {
    switch (src_t) {
        case DType::F32: std::memcpy(out, src, static_cast<size_t>(n) * 4); return;
        case DType::F16:
            for (int64_t i = 0; i < n; ++i) {
                uint16_t h;
                std::memcpy(&h, src + 2 * i, 2);
                out[i] = f16_to_f32(h);
            }
            return;
        case DType::BF16:
            for (int64_t i = 0; i < n; ++i) {
                uint16_t h;
                std::memcpy(&h, src + 2 * i, 2);
                out[i] = bf16_to_f32(h);
            }
            return;
        case DType::Q8_0:
        case DType::Q4_0:
            for (int64_t i = 0; i < n; ++i) out[i] = weight_at(src, src_t, i);
            return;
        case DType::Q8_0X16:
        case DType::Q4_0X16: assert(false && "x16 rows are not contiguous: dequantize_row reads them"); return;
        case DType::Q4_1:
        case DType::Q5_0:
        case DType::Q5_1:
        case DType::Q2_K:
        case DType::Q3_K:
        case DType::Q4_K:
        case DType::Q5_K:
        case DType::Q6_K: dequantize_blocks(src_t, src, n / dtype_block_elems(src_t), out); return;
    }
}

}  // namespace

// ---- conversion ----

void convert_rows(const void* src, DType src_t, void* dst, DType dst_t, int64_t n_rows, int64_t n_cols) {
    if (dtype_is_x16(src_t))
        throw InvalidArgument(std::string("convert_rows: source format ") + dtype_name(src_t) + " is not supported");
    if (src_t != dst_t && dtype_is_gguf_quant(dst_t))
        throw InvalidArgument(std::string("convert_rows: cannot quantise to ") + dtype_name(dst_t) +
                              " (a GGUF file's format, loaded as stored)");
    if (n_cols % dtype_block_elems(src_t) != 0)
        throw InvalidArgument(std::string("convert_rows: ") + dtype_name(src_t) + " needs a row length divisible by " +
                              std::to_string(dtype_block_elems(src_t)) + ", found " + std::to_string(n_cols));
    if (dtype_is_blocked(dst_t) && n_cols % kQ8BlockElems != 0)
        throw InvalidArgument(std::string("convert_rows: ") + dtype_name(dst_t) +
                              " needs a row length divisible by 32, found " + std::to_string(n_cols));
    const int64_t src_row = row_bytes(src_t, n_cols);
    const int64_t dst_row = row_bytes(dst_t, n_cols);
    if (src_t == dst_t) {
        std::memcpy(dst, src, static_cast<size_t>(src_row * n_rows));
        return;
    }
    std::vector<float> tmp(static_cast<size_t>(n_cols));  // [n_cols] one row in f32
    for (int64_t r = 0; r < n_rows; ++r) {
        const uint8_t* s = static_cast<const uint8_t*>(src) + r * src_row;
        uint8_t* d = static_cast<uint8_t*>(dst) + r * dst_row;
        row_to_f32(s, src_t, n_cols, tmp.data());
        switch (dst_t) {
            case DType::F32: std::memcpy(d, tmp.data(), static_cast<size_t>(n_cols) * 4); break;
            case DType::F16:
                for (int64_t i = 0; i < n_cols; ++i) {
                    const uint16_t h = f32_to_f16(tmp[i]);
                    std::memcpy(d + 2 * i, &h, 2);
                }
                break;
            case DType::BF16:
                for (int64_t i = 0; i < n_cols; ++i) {
                    const uint16_t h = f32_to_bf16(tmp[i]);
                    std::memcpy(d + 2 * i, &h, 2);
                }
                break;
            case DType::Q8_0:
                for (int64_t b = 0; b < n_cols / kQ8BlockElems; ++b)
                    quantize_block_q8_0(tmp.data() + b * kQ8BlockElems, d + b * kQ8BlockBytes);
                break;
            case DType::Q4_0:
                for (int64_t b = 0; b < n_cols / kQ8BlockElems; ++b)
                    quantize_block_q4_0(tmp.data() + b * kQ8BlockElems, d + b * kQ4BlockBytes);
                break;
            case DType::Q8_0X16:
            case DType::Q4_0X16:
                throw InvalidArgument(std::string("convert_rows: convert to q8_0 / q4_0, then repack_x16 to ") +
                                      dtype_name(dst_t));
            default: break;  // GGUF block formats: refused above
        }
    }
}

namespace {
// Byte offsets inside one 16-row group of an x16 matrix (layout: kernels.h).
struct X16Geom {
    int64_t n_b, quant_bytes, group_bytes;  // blocks per row, quant bytes per block, bytes per group
    X16Geom(DType t, int64_t n_in)
        : n_b(n_in / kQ8BlockElems),
          quant_bytes(t == DType::Q8_0X16 ? 512 : 256),
          group_bytes(kX16Rows * row_bytes(t, n_in)) {}
    int64_t scale(int64_t b, int64_t r) const { return n_b * quant_bytes + b * 32 + r * 2; }
};

// Element i of row r (0..15) of one x16 group as its integer q and f16 scale.
inline int x16_q(const uint8_t* group, DType t, const X16Geom& g, int64_t r, int64_t i) {
    const int64_t b = i / kQ8BlockElems, e = i % kQ8BlockElems;
    const uint8_t* blk = group + b * g.quant_bytes;
    if (t == DType::Q8_0X16) return static_cast<int>(blk[(e / 4) * 64 + r * 4 + e % 4]) - 128;
    const int64_t k = (e % 16) / 4;  // which 64-byte chunk; e < 16: low nibble, else high
    const uint8_t byte = blk[k * 64 + r * 4 + e % 4];
    return (e < 16 ? (byte & 15) : (byte >> 4)) - 8;
}
inline uint16_t x16_d(const uint8_t* group, const X16Geom& g, int64_t b, int64_t r) {
    uint16_t d;
    std::memcpy(&d, group + g.scale(b, r), 2);
    return d;
}
}  // namespace

void dequantize_row(const WeightView& w, int64_t row, float* out) {
    assert(row >= 0 && row < w.n_out);
    if (dtype_is_x16(w.dtype)) {
        const X16Geom g(w.dtype, w.n_in);
        const uint8_t* group = static_cast<const uint8_t*>(w.data) + (row / kX16Rows) * g.group_bytes;
        const int64_t r = row % kX16Rows;
        for (int64_t i = 0; i < w.n_in; ++i)  // exact: 11-bit d times an 8-bit q
            out[i] = f16_to_f32(x16_d(group, g, i / kQ8BlockElems, r)) * static_cast<float>(x16_q(group, w.dtype, g, r, i));
        return;
    }
    row_to_f32(weight_row(w, row), w.dtype, w.n_in, out);
}

void repack_x16(const void* src, DType src_t, void* dst, int64_t n_rows, int64_t n_cols) {
    if ((src_t != DType::Q8_0 && src_t != DType::Q4_0) || n_rows % kX16Rows != 0 || n_cols % kQ8BlockElems != 0)
        throw InvalidArgument(std::string("repack_x16: expected a q8_0 or q4_0 matrix of rows % 16 == 0 and columns % 32 "
                                          "== 0, found ") + dtype_name(src_t) + " [" + std::to_string(n_rows) + " x " +
                              std::to_string(n_cols) + "]");
    const bool q8 = src_t == DType::Q8_0;
    const DType dst_t = q8 ? DType::Q8_0X16 : DType::Q4_0X16;
    const X16Geom g(dst_t, n_cols);
    const int64_t src_row = row_bytes(src_t, n_cols), blk_bytes = q8 ? kQ8BlockBytes : kQ4BlockBytes;
    for (int64_t G = 0; G < n_rows / kX16Rows; ++G) {
        uint8_t* group = static_cast<uint8_t*>(dst) + G * g.group_bytes;
        for (int64_t r = 0; r < kX16Rows; ++r) {
            const uint8_t* row = static_cast<const uint8_t*>(src) + (G * kX16Rows + r) * src_row;
            for (int64_t b = 0; b < g.n_b; ++b) {
                const uint8_t* blk = row + b * blk_bytes;
                std::memcpy(group + g.scale(b, r), blk, 2);
                uint8_t* qd = group + b * g.quant_bytes + r * 4;
                if (q8) {
                    for (int64_t e = 0; e < kQ8BlockElems; ++e) qd[(e / 4) * 64 + e % 4] = blk[2 + e] ^ 0x80;
                } else {  // q4_0 byte j holds elements j (low) and j + 16 (high): keep the pairs
                    for (int64_t e = 0; e < 16; ++e) qd[(e / 4) * 64 + e % 4] = blk[2 + e];
                }
            }
        }
    }
}

namespace ref {

void matmul_rows(const WeightView& w, const float* x, int64_t n_tok, float* y, const float* bias, int64_t row0,
                 int64_t row1) {
    assert(!dtype_is_blocked(w.dtype) || w.n_in % kQ8BlockElems == 0);
    std::vector<float> wrow(static_cast<size_t>(w.n_in));  // [n_in] one weight row in f32
    for (int64_t o = row0; o < row1; ++o) {
        dequantize_row(w, o, wrow.data());
        for (int64_t t = 0; t < n_tok; ++t) {
            const float* xt = x + t * w.n_in;
            double acc = bias ? static_cast<double>(bias[o]) : 0.0;
            for (int64_t i = 0; i < w.n_in; ++i) acc += static_cast<double>(xt[i]) * static_cast<double>(wrow[i]);
            y[t * w.n_out + o] = static_cast<float>(acc);
        }
    }
}

void matmul(const WeightView& w, const float* x, int64_t n_tok, float* y, const float* bias) {
    matmul_rows(w, x, n_tok, y, bias, 0, w.n_out);
}

// ---- MatmulPrecision::Fast for q8_0 / q4_0 weights ----
//
// Unlike the references above, these two are not an oracle with a looser tolerance:
// they *define* the fast path's result, and every SIMD build reproduces it bit for bit.
//
// Activations: per block of 32, d = amax / 127 (f32, not rounded to f16), id = 1/d,
// q = x * id rounded to nearest even (the SIMD convert), clamped to [-127, 127].
// Finite activations only (a NaN or inf gives an unspecified q).
//
// Dot product of weight row o and token t: 8 f32 lanes, lane j owning elements
// 32b + 4j .. 32b + 4j + 3 of every block b (the int32 lanes of vpdpbusd / vpmaddwd):
//   for b in order:  s = d_w[b] * d_x[b] (f32);  lane[j] = fma(float(isum_j), s, lane[j])
// where isum_j = sum of the four products w_q * x_q (exact int32; w_q = qs for q8_0,
// nibble - 8 for q4_0). Then lanes j + j+4, j + j+2, j + j+1 (hsum's tree), + bias[o].
// Against the exact f32 matmul the error is that of rounding x to 8 bits per block:
// |x - d q| <= d/2, so |y_fast - y| <= sum_b (d_x[b]/2) sum_i |w_i| + f32 accumulation.

void act_to_q8(const float* x, int64_t n_tok, int64_t n_in, uint8_t* act) {
    assert(n_in % kQ8BlockElems == 0);
    const int64_t n_blocks = n_in / kQ8BlockElems;
    for (int64_t t = 0; t < n_tok; ++t) {
        const float* xt = x + t * n_in;
        uint8_t* qs = act + t * q8_act_row_bytes(n_in);
        uint8_t* ds = qs + n_in;  // f32 scales, 4-byte aligned because n_in % 32 == 0
        for (int64_t b = 0; b < n_blocks; ++b) {
            float amax = 0.0f;
            for (int64_t j = 0; j < kQ8BlockElems; ++j) amax = std::fmax(amax, std::fabs(xt[b * kQ8BlockElems + j]));
            const float d = amax / 127.0f;
            const float id = d != 0.0f ? 1.0f / d : 0.0f;
            std::memcpy(ds + 4 * b, &d, 4);
            int32_t sum = 0;
            for (int64_t j = 0; j < kQ8BlockElems; ++j) {
                const float v = std::nearbyint(xt[b * kQ8BlockElems + j] * id);  // ties to even
                const int q = v >= 127.0f ? 127 : (v <= -127.0f ? -127 : static_cast<int>(v));
                qs[b * kQ8BlockElems + j] = static_cast<uint8_t>(static_cast<int8_t>(q));
                sum += q;
            }
            std::memcpy(ds + 4 * (n_blocks + b), &sum, 4);
        }
    }
}

// The GGUF block formats, in their integer form (quants.h: value = a * (q - off) + b per 16
// elements): two sets of eight lanes, one for the even chunks of 32 of the row and one for the
// odd ones (a 16-lane vector holds a pair of chunks), lane j of chunk c (elements 32c + 4j .. +3,
// sub-block s = 2c + j / 4) taking, in set p = c % 2 (c counted along the row),
//   lane[p][j] = fma(float(sum of (q - off) * x_q), a[s] * d_x[c], lane[p][j])
//   lane[p][j] = fma(float(sum of x_q) * d_x[c], b[s], lane[p][j])      (formats with a min only)
// then lane[0][j] + lane[1][j], the same tree and bias.
static void matmul_rows_q8act_gguf(const WeightView& w, const uint8_t* act, int64_t n_tok, float* y,
                                   const float* bias, int64_t row0, int64_t row1) {
    const DType t = w.dtype;
    const int64_t be = dtype_block_elems(t), n_blocks = w.n_in / be;
    const int off = quant_offset(t);
    const bool has_min = quant_has_min(t);
    uint8_t q[256];
    float a[16], b[16];
    for (int64_t o = row0; o < row1; ++o) {
        const uint8_t* row = weight_row(w, o);
        for (int64_t tok = 0; tok < n_tok; ++tok) {
            const uint8_t* at = act + tok * q8_act_row_bytes(w.n_in);
            float lanes[2][8] = {{0, 0, 0, 0, 0, 0, 0, 0}, {0, 0, 0, 0, 0, 0, 0, 0}};
            for (int64_t blk = 0; blk < n_blocks; ++blk) {
                quant_block_uint(t, row + blk * dtype_block_bytes(t), q);
                quant_sub_scales(t, row + blk * dtype_block_bytes(t), a, b);
                for (int64_t c = 0; c < be / kQ8BlockElems; ++c) {
                    const int64_t chunk = (blk * be) / kQ8BlockElems + c;  // the activations' block
                    float dx;
                    std::memcpy(&dx, at + w.n_in + 4 * chunk, 4);
                    const int8_t* xq = reinterpret_cast<const int8_t*>(at + chunk * kQ8BlockElems);
                    float* lane = lanes[chunk % 2];
                    for (int j = 0; j < 8; ++j) {
                        int32_t isum = 0, xsum = 0;
                        for (int k = 0; k < 4; ++k) {
                            isum += (static_cast<int32_t>(q[32 * c + 4 * j + k]) - off) * xq[4 * j + k];
                            xsum += xq[4 * j + k];
                        }
                        const int64_t s = 2 * c + j / 4;
                        lane[j] = std::fma(static_cast<float>(isum), a[s] * dx, lane[j]);
                        if (has_min) lane[j] = std::fma(static_cast<float>(xsum) * dx, b[s], lane[j]);
                    }
                }
            }
            float lane[8];
            for (int j = 0; j < 8; ++j) lane[j] = lanes[0][j] + lanes[1][j];
            const float l4[4] = {lane[0] + lane[4], lane[1] + lane[5], lane[2] + lane[6], lane[3] + lane[7]};
            const float l2[2] = {l4[0] + l4[2], l4[1] + l4[3]};
            float v = l2[0] + l2[1];
            if (bias) v += bias[o];
            y[tok * w.n_out + o] = v;
        }
    }
}

void matmul_rows_q8act(const WeightView& w, const uint8_t* act, int64_t n_tok, float* y, const float* bias,
                       int64_t row0, int64_t row1) {
    if (dtype_is_gguf_quant(w.dtype)) return matmul_rows_q8act_gguf(w, act, n_tok, y, bias, row0, row1);
    assert(dtype_is_blocked(w.dtype) && w.n_in % kQ8BlockElems == 0);
    const int64_t n_blocks = w.n_in / kQ8BlockElems;
    const int64_t blk_bytes = w.dtype == DType::Q8_0 ? kQ8BlockBytes : kQ4BlockBytes;
    int8_t wq[kQ8BlockElems];
    for (int64_t o = row0; o < row1; ++o) {
        const uint8_t* row = weight_row(w, o);
        for (int64_t t = 0; t < n_tok; ++t) {
            const uint8_t* at = act + t * q8_act_row_bytes(w.n_in);
            float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int64_t b = 0; b < n_blocks; ++b) {
                const uint8_t* blk = row + b * blk_bytes;
                for (int i = 0; i < kQ8BlockElems; ++i) {
                    if (w.dtype == DType::Q8_0)
                        wq[i] = static_cast<int8_t>(blk[2 + i]);
                    else
                        wq[i] = static_cast<int8_t>((i < 16 ? (blk[2 + i] & 15) : (blk[2 + i - 16] >> 4)) - 8);
                }
                uint16_t dwh;
                float dx;
                std::memcpy(&dwh, blk, 2);
                std::memcpy(&dx, at + w.n_in + 4 * b, 4);
                const float s = f16_to_f32(dwh) * dx;
                const int8_t* xq = reinterpret_cast<const int8_t*>(at + b * kQ8BlockElems);
                for (int j = 0; j < 8; ++j) {
                    int32_t isum = 0;
                    for (int k = 0; k < 4; ++k) isum += static_cast<int32_t>(wq[4 * j + k]) * xq[4 * j + k];
                    lane[j] = std::fma(static_cast<float>(isum), s, lane[j]);
                }
            }
            const float l4[4] = {lane[0] + lane[4], lane[1] + lane[5], lane[2] + lane[6], lane[3] + lane[7]};
            const float l2[2] = {l4[0] + l4[2], l4[1] + l4[3]};
            float v = l2[0] + l2[1];
            if (bias) v += bias[o];
            y[t * w.n_out + o] = v;
        }
    }
}

void rmsnorm(const float* x, const float* weight, float eps, int64_t n_tok, int64_t dim, float* y) {
    for (int64_t t = 0; t < n_tok; ++t) {
        const float* xt = x + t * dim;
        float* yt = y + t * dim;
        double ss = 0.0;
        for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(xt[i]) * xt[i];
        const float inv = 1.0f / std::sqrt(static_cast<float>(ss / static_cast<double>(dim)) + eps);
        for (int64_t i = 0; i < dim; ++i) yt[i] = weight[i] * (xt[i] * inv);
    }
}

void rope(float* x, int n_heads, int head_dim, int64_t pos, const float* inv_freq) {
    const int half = head_dim / 2;
    for (int h = 0; h < n_heads; ++h) {
        float* xh = x + static_cast<int64_t>(h) * head_dim;
        for (int i = 0; i < half; ++i) {
            // Hugging Face computes the angle and its cos/sin in float32.
            const float angle = static_cast<float>(pos) * inv_freq[i];
            const float c = std::cos(angle), s = std::sin(angle);
            const float x0 = xh[i], x1 = xh[i + half];
            xh[i] = x0 * c - x1 * s;
            xh[i + half] = x1 * c + x0 * s;
        }
    }
}

void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const float g = gate[i];
        out[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
}

void softmax(float* x, int64_t n) {
    if (n <= 0) return;
    float mx = x[0];
    for (int64_t i = 1; i < n; ++i) mx = std::fmax(mx, x[i]);
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        x[i] = std::exp(x[i] - mx);
        sum += x[i];
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

void attention(const float* q, int64_t n_q, int64_t pos0, const float* const* k_blocks, const float* const* v_blocks,
               int block_tokens, int n_heads, int n_kv_heads, int head_dim, float scale, float* out, float* scratch,
               int64_t window) {
    attention_kv_heads(q, n_q, pos0, k_blocks, v_blocks, block_tokens, n_heads, n_kv_heads, head_dim, scale, out,
                       scratch, 0, n_kv_heads, window);
}

// One definition for f32 and f16 pages: an element is widened to f32 (exactly) where it is read.
static inline float kv_elem(const float* p, int d) { return p[d]; }
static inline float kv_elem(const uint16_t* p, int d) { return f16_to_f32(p[d]); }

template <class E>
static void attention_paged(const float* q, int64_t n_q, int64_t pos0, const E* const* k_blocks,
                            const E* const* v_blocks, int block_tokens, int n_heads, int n_kv_heads, int head_dim,
                            float scale, float* out, float* scratch, int kv0, int kv1, int64_t window) {
    assert(n_heads % n_kv_heads == 0 && 0 <= kv0 && kv0 < kv1 && kv1 <= n_kv_heads && window >= 0);
    const int group = n_heads / n_kv_heads;
    const int64_t kv_row = static_cast<int64_t>(n_kv_heads) * head_dim;  // floats per cached token
    for (int64_t i = 0; i < n_q; ++i) {
        const int64_t n_keys = pos0 + i + 1;
        const int64_t k0 = window > 0 && n_keys > window ? n_keys - window : 0;  // first key in the window
        for (int h = kv0 * group; h < kv1 * group; ++h) {
            const float* qh = q + (i * n_heads + h) * head_dim;
            const int64_t kv_off = static_cast<int64_t>(h / group) * head_dim;
            for (int64_t p = k0; p < n_keys; ++p) {
                const E* k = k_blocks[p / block_tokens] + (p % block_tokens) * kv_row + kv_off;
                double dot = 0.0;
                for (int d = 0; d < head_dim; ++d) dot += static_cast<double>(qh[d]) * kv_elem(k, d);
                scratch[p - k0] = static_cast<float>(dot) * scale;
            }
            softmax(scratch, n_keys - k0);
            float* oh = out + (i * n_heads + h) * head_dim;
            for (int d = 0; d < head_dim; ++d) {
                double acc = 0.0;
                for (int64_t p = k0; p < n_keys; ++p) {
                    const E* v = v_blocks[p / block_tokens] + (p % block_tokens) * kv_row + kv_off;
                    acc += static_cast<double>(scratch[p - k0]) * kv_elem(v, d);
                }
                oh[d] = static_cast<float>(acc);
            }
        }
    }
}

void attention_kv_heads(const float* q, int64_t n_q, int64_t pos0, const float* const* k_blocks,
                        const float* const* v_blocks, int block_tokens, int n_heads, int n_kv_heads, int head_dim,
                        float scale, float* out, float* scratch, int kv0, int kv1, int64_t window) {
    attention_paged(q, n_q, pos0, k_blocks, v_blocks, block_tokens, n_heads, n_kv_heads, head_dim, scale, out, scratch,
                    kv0, kv1, window);
}

void attention_kv_heads_f16(const float* q, int64_t n_q, int64_t pos0, const uint16_t* const* k_blocks,
                            const uint16_t* const* v_blocks, int block_tokens, int n_heads, int n_kv_heads,
                            int head_dim, float scale, float* out, float* scratch, int kv0, int kv1, int64_t window) {
    attention_paged(q, n_q, pos0, k_blocks, v_blocks, block_tokens, n_heads, n_kv_heads, head_dim, scale, out, scratch,
                    kv0, kv1, window);
}

// The x16 formats: per (row, token) one f32 accumulator,
//   for b in order:  s = d_w[b] * d_x[b] (f32);  acc = fma(float(isum_b), s, acc)
// with isum_b the exact integer dot of block b (|isum_b| <= 32 * 127 * 128 < 2^24, so
// float(isum_b) is exact); then + bias[o]. A coarser order than matmul_rows_q8act's eight
// lanes (one rounding per block, not per four elements), the same error bound.
void matmul_rows_x16(const WeightView& w, const uint8_t* act, int64_t n_tok, float* y, const float* bias,
                     int64_t row0, int64_t row1) {
    assert(dtype_is_x16(w.dtype) && w.n_in % kQ8BlockElems == 0 && row0 % kX16Rows == 0);
    const X16Geom g(w.dtype, w.n_in);
    for (int64_t o = row0; o < row1; ++o) {
        const uint8_t* group = static_cast<const uint8_t*>(w.data) + (o / kX16Rows) * g.group_bytes;
        const int64_t r = o % kX16Rows;
        for (int64_t t = 0; t < n_tok; ++t) {
            const uint8_t* at = act + t * q8_act_row_bytes(w.n_in);
            const int8_t* xq = reinterpret_cast<const int8_t*>(at);
            float acc = 0.0f;
            for (int64_t b = 0; b < g.n_b; ++b) {
                int32_t isum = 0;
                for (int64_t e = 0; e < kQ8BlockElems; ++e)
                    isum += x16_q(group, w.dtype, g, r, b * kQ8BlockElems + e) * xq[b * kQ8BlockElems + e];
                float dx;
                std::memcpy(&dx, at + w.n_in + 4 * b, 4);
                const float s = f16_to_f32(x16_d(group, g, b, r)) * dx;
                acc = std::fma(static_cast<float>(isum), s, acc);
            }
            if (bias) acc += bias[o];
            y[t * w.n_out + o] = acc;
        }
    }
}

}  // namespace ref

}  // namespace lmx
