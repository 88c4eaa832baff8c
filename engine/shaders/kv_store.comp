// kv_store.comp — appends a step's K and V rows to the paged cache of one layer.
// Owner: the Vulkan device. dst[t] is token t's K row: its KV binding (top 2 bits, one of up to
// four, chosen by branch) and its start there (low 30 bits, elements; its V row is block_tokens *
// kv_dim further, kv_cache.h's block layout), before the layer offset.
//
// KV elements (spec constant KV_F16): f32 (one thread per element), or f16 packed two to a
// 32-bit word (one thread per word, so no two threads write the same word): rounded to nearest
// even after saturating at +-65504, bit for bit the CPU's f32_to_f16(clamp(x)) (common.cpp), in
// integer arithmetic so every GPU rounds alike whatever its packHalf2x16 does.
#version 450

layout(local_size_x = 64) in;
layout(constant_id = 0) const uint KV_F16 = 0;
layout(std430, binding = 0) readonly buffer Ks { float k[]; };
layout(std430, binding = 1) readonly buffer Vs { float v[]; };
layout(std430, binding = 2) buffer Cache0 { uint cache0[]; };  // f32 bits, or two f16 per word
layout(std430, binding = 3) readonly buffer Dst { uint dst[]; };
layout(std430, binding = 4) buffer Cache1 { uint cache1[]; };
layout(std430, binding = 5) buffer Cache2 { uint cache2[]; };
layout(std430, binding = 6) buffer Cache3 { uint cache3[]; };

layout(push_constant) uniform Push {
    uint k_skip, v_skip, cache_skip, dst_skip;  // floats / elements (binding 2) / uints
    uint n_tok, kv_dim;
    uint layer_off;   // elements from a block's start to this layer's K
    uint v_off;       // elements from K to V (block_tokens * kv_dim)
    uint cache_skip1, cache_skip2, cache_skip3;  // elements, bindings 4..6
} p;

void put(uint b, uint i, uint w) {
    if (b == 0u) cache0[i] = w;
    else if (b == 1u) cache1[i] = w;
    else if (b == 2u) cache2[i] = w;
    else cache3[i] = w;
}

uint f16_bits(float f) {
    const uint x = floatBitsToUint(f);
    const uint sign = (x >> 16) & 0x8000u;
    const uint ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00u;  // NaN
    if (ax >= 0x477fe000u) return sign | 0x7bffu;  // |f| >= 65504: saturate
    const int e = int(ax >> 23) - 112;             // f16 exponent (bias 15)
    uint mant = ax & 0x7fffffu;
    if (e <= 0) {                                  // subnormal f16 (or zero)
        if (e < -10) return sign;
        mant |= 0x800000u;
        const uint shift = uint(14 - e);
        uint h = mant >> shift;
        const uint rem = mant & ((1u << shift) - 1u);
        const uint halfway = 1u << (shift - 1u);
        if (rem > halfway || (rem == halfway && (h & 1u) != 0u)) h++;
        return sign | h;
    }
    uint h = (uint(e) << 10) | (mant >> 13);
    const uint rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u) != 0u)) h++;  // may carry into the exponent: correct
    return sign | h;
}

void main() {
    const uint id = gl_GlobalInvocationID.x + gl_GlobalInvocationID.y * gl_NumWorkGroups.x * 64u;
    const uint per_tok = KV_F16 == 0u ? p.kv_dim : p.kv_dim / 2u;  // f16: kv_dim is even, rows start even
    if (id >= p.n_tok * per_tok) return;
    const uint t = id / per_tok;
    const uint entry = dst[p.dst_skip + t];
    const uint b = entry >> 30;
    const uint skip = b == 0u ? p.cache_skip : b == 1u ? p.cache_skip1 : b == 2u ? p.cache_skip2 : p.cache_skip3;
    if (KV_F16 == 0u) {
        const uint o = skip + (entry & 0x3fffffffu) + p.layer_off + id % per_tok;
        put(b, o, floatBitsToUint(k[p.k_skip + id]));
        put(b, o + p.v_off, floatBitsToUint(v[p.v_skip + id]));
    } else {
        const uint e = 2u * (id % per_tok);
        const uint o = skip + (entry & 0x3fffffffu) + p.layer_off + e;
        const uint i = p.k_skip + t * p.kv_dim + e, j = p.v_skip + t * p.kv_dim + e;
        put(b, o >> 1, f16_bits(k[i]) | (f16_bits(k[i + 1u]) << 16));
        put(b, (o + p.v_off) >> 1, f16_bits(v[j]) | (f16_bits(v[j + 1u]) << 16));
    }
}
