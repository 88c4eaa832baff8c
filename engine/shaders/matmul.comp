// matmul.comp — y[t, col0 + r] = sum_i x[t, i] * W[r, i] (+ bias[col0 + r]), W in any weight format.
// Owner: the Vulkan device. One workgroup per output row r; it walks the row once per tile
// of up to 8 tokens, so a batched decode reads each weight once for 8 sequences. Each
// thread sums its strided share of i in order, then a fixed tree over the 64 partial sums:
// one accumulation order per element, whatever n_tok is (batch invariance). No subgroup
// operations (any subgroup size), no 8/16-bit storage: weights are read as 32-bit words.
#version 450

layout(local_size_x = 64) in;
layout(constant_id = 0) const uint WTYPE = 0;  // 0 f32, 1 f16, 2 bf16, 3 q8_0, 4 q4_0 (common.h DType)

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

float weight(uint rb, uint i) {
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
