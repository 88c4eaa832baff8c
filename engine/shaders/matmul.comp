// matmul.comp — y[t, col0 + r] = sum_i x[t, i] * W[r, i] (+ bias[col0 + r]), W in any weight format.
// Owner: the Vulkan device. One workgroup per output row r; it walks the row once per tile
// of up to 8 tokens, so a batched decode reads each weight once for 8 sequences. Each
// thread sums its strided share of i in order, then a fixed tree over the 64 partial sums:
// one accumulation order per element, whatever n_tok is (batch invariance). No subgroup
// operations (any subgroup size), no 8/16-bit storage: weights are read as 32-bit words.
#version 450

layout(local_size_x = 64) in;
// common.h's DType values: 0 f32, 1 f16, 2 bf16, 3 q8_0, 4 q4_0, 7 q4_1, 8 q5_0, 9 q5_1,
// 10 q2_K, 11 q3_K, 12 q4_K, 13 q5_K, 14 q6_K (block layouts: kernels/quants.h).
layout(constant_id = 0) const uint WTYPE = 0;

layout(std430, binding = 0) readonly buffer Wt { uint w[]; };
layout(std430, binding = 1) readonly buffer Xs { float x[]; };
layout(std430, binding = 2) buffer Ys { float y[]; };
layout(std430, binding = 3) readonly buffer Bs { float bias[]; };

layout(push_constant) uniform Push {
    uint w_skip;     // bytes from binding 0's start to row 0
    uint x_skip;     // floats
    uint y_skip;     // floats
    uint b_skip;     // floats
    uint n_in;
    uint n_rows;     // rows of this dispatch
    uint n_tok;
    uint ld_y;       // floats per row of y (the matrix's full n_out)
    uint col0;       // y column (and bias index) of row 0
    uint has_bias;
    uint row_bytes;
} p;

const uint TILE = 8;
shared float red[TILE][64];

uint byte_at(uint a) { return (w[a >> 2] >> ((a & 3u) * 8u)) & 0xffu; }
uint half_at(uint a) { return (w[a >> 2] >> ((a & 2u) * 8u)) & 0xffffu; }  // a is even

float f16_at(uint a) { return unpackHalf2x16(half_at(a)).x; }
uint nibble32(uint qs, uint j) { return j < 16u ? (byte_at(qs + j) & 15u) : (byte_at(qs + j - 16u) >> 4); }
uint bit_at(uint a, uint bit) { return (byte_at(a + (bit >> 3)) >> (bit & 7u)) & 1u; }
// 2-bit quants of a 256-block, 4 per byte over 32-byte groups (q2_K, q3_K).
uint q2_at(uint qs, uint e) {
    const uint h = e / 128u, r = e % 128u;
    return (byte_at(qs + h * 32u + r % 32u) >> (2u * (r / 32u))) & 3u;
}
// The 6-bit scale (x) and min (y) of sub-block s of q4_K / q5_K's 12 packed bytes at p.
uvec2 k_scale_min(uint p, uint s) {
    if (s < 4u) return uvec2(byte_at(p + s) & 63u, byte_at(p + 4u + s) & 63u);
    return uvec2((byte_at(p + 4u + s) & 15u) | ((byte_at(p + s - 4u) >> 2) & 48u),
                 (byte_at(p + 4u + s) >> 4) | ((byte_at(p + s) >> 2) & 48u));
}

// The GGUF block formats, element e of the block at byte b (kernels/quants.cpp's scalar code).
float gguf_weight(uint b, uint e) {
    if (WTYPE == 7u) return f16_at(b) * float(nibble32(b + 4u, e)) + f16_at(b + 2u);
    if (WTYPE == 8u) return f16_at(b) * float(int(nibble32(b + 6u, e) | (bit_at(b + 2u, e) << 4)) - 16);
    if (WTYPE == 9u) return f16_at(b) * float(nibble32(b + 8u, e) | (bit_at(b + 4u, e) << 4)) + f16_at(b + 2u);
    if (WTYPE == 10u) {
        const uint sc = byte_at(b + e / 16u);
        return f16_at(b + 80u) * float(sc & 15u) * float(q2_at(b + 16u, e)) - f16_at(b + 82u) * float(sc >> 4);
    }
    if (WTYPE == 11u) {
        const uint s = e / 16u;
        const uint lo = s < 8u ? (byte_at(b + 96u + s) & 15u) : (byte_at(b + 96u + s - 8u) >> 4);
        const uint hi = (byte_at(b + 104u + s % 4u) >> (2u * (s / 4u))) & 3u;
        const int scale = int(lo | (hi << 4)) - 32;
        const uint hbit = (byte_at(b + e % 32u) >> (e / 32u)) & 1u;
        const int q = int(q2_at(b + 32u, e)) - int((hbit ^ 1u) << 2);
        return f16_at(b + 108u) * float(scale) * float(q);
    }
    if (WTYPE == 12u || WTYPE == 13u) {
        const uint s = e / 32u, l = e % 32u;
        const uvec2 sm = k_scale_min(b + 4u, s);
        const uint qs = WTYPE == 12u ? b + 16u : b + 48u;
        uint v = (byte_at(qs + (s / 2u) * 32u + l) >> (4u * (s % 2u))) & 15u;
        if (WTYPE == 13u) v |= ((byte_at(b + 16u + l) >> s) & 1u) << 4;
        return f16_at(b) * float(sm.x) * float(v) - f16_at(b + 2u) * float(sm.y);
    }
    // q6_K
    const uint s = e / 16u, h = e / 128u, r = e % 128u;
    const int sc = int(byte_at(b + 192u + s) << 24) >> 24;
    const uint lo = (byte_at(b + h * 64u + r % 64u) >> (4u * (r / 64u))) & 15u;
    const uint hi = (byte_at(b + 128u + h * 32u + r % 32u) >> (2u * (r / 32u))) & 3u;
    return f16_at(b + 208u) * float(sc) * float(int(lo | (hi << 4)) - 32);
}

const uint GGUF_ELEMS = WTYPE >= 10u ? 256u : 32u;
const uint GGUF_BYTES = WTYPE == 7u ? 20u : WTYPE == 8u ? 22u : WTYPE == 9u ? 24u : WTYPE == 10u ? 84u :
                        WTYPE == 11u ? 110u : WTYPE == 12u ? 144u : WTYPE == 13u ? 176u : 210u;

float weight(uint rb, uint i) {
    if (WTYPE >= 7u) return gguf_weight(rb + (i / GGUF_ELEMS) * GGUF_BYTES, i % GGUF_ELEMS);
    if (WTYPE == 0) return uintBitsToFloat(w[(rb >> 2) + i]);
    if (WTYPE == 1) return unpackHalf2x16(half_at(rb + 2u * i)).x;
    if (WTYPE == 2) return uintBitsToFloat(half_at(rb + 2u * i) << 16);
    if (WTYPE == 3) {
        const uint blk = rb + (i >> 5) * 34u;
        const float d = unpackHalf2x16(half_at(blk)).x;
        const int q = int(byte_at(blk + 2u + (i & 31u)) << 24) >> 24;  // sign-extend int8
        return d * float(q);
    }
    const uint blk = rb + (i >> 5) * 18u;
    const float d = unpackHalf2x16(half_at(blk)).x;
    const uint j = i & 31u;
    const uint b = byte_at(blk + 2u + (j & 15u));
    const uint nib = j < 16u ? (b & 15u) : (b >> 4);
    return d * float(int(nib) - 8);
}

void main() {
    const uint r = gl_WorkGroupID.x + gl_WorkGroupID.y * gl_NumWorkGroups.x;
    if (r >= p.n_rows) return;  // whole workgroup leaves together
    const uint tid = gl_LocalInvocationID.x;
    const uint rb = p.w_skip + r * p.row_bytes;
    for (uint t0 = 0; t0 < p.n_tok; t0 += TILE) {
        const uint nt = min(TILE, p.n_tok - t0);
        float acc[TILE];
        for (uint k = 0; k < TILE; k++) acc[k] = 0.0;
        for (uint i = tid; i < p.n_in; i += 64u) {
            const float wv = weight(rb, i);
            for (uint k = 0; k < TILE; k++)
                if (k < nt) acc[k] += wv * x[p.x_skip + (t0 + k) * p.n_in + i];
        }
        for (uint k = 0; k < TILE; k++) red[k][tid] = acc[k];
        barrier();
        for (uint s = 32u; s > 0u; s >>= 1) {
            if (tid < s)
                for (uint k = 0; k < TILE; k++) red[k][tid] += red[k][tid + s];
            barrier();
        }
        if (tid < nt) {
            float v = red[tid][0];
            if (p.has_bias != 0u) v += bias[p.b_skip + p.col0 + r];
            y[p.y_skip + (t0 + tid) * p.ld_y + p.col0 + r] = v;
        }
        barrier();
    }
}
