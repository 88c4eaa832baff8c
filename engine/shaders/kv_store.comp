// kv_store.comp — appends a step's K and V rows to the paged cache of one layer.
// Owner: the Vulkan device. dst[t] is token t's K row in the KV binding (elements; its V row
// is block_tokens * kv_dim further, kv_cache.h's block layout), before the layer offset.
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
layout(std430, binding = 2) buffer Cache { uint cache[]; };  // f32 bits, or two f16 per word
layout(std430, binding = 3) readonly buffer Dst { uint dst[]; };

layout(push_constant) uniform Push {
    uint k_skip, v_skip, cache_skip, dst_skip;  // floats / elements / uints
    uint n_tok, kv_dim;
    uint layer_off;   // elements from a block's start to this layer's K
    uint v_off;       // elements from K to V (block_tokens * kv_dim)
} p;

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
    if (KV_F16 == 0u) {
        if (id >= p.n_tok * p.kv_dim) return;
        const uint t = id / p.kv_dim, e = id % p.kv_dim;
        const uint o = p.cache_skip + dst[p.dst_skip + t] + p.layer_off + e;
        cache[o] = floatBitsToUint(k[p.k_skip + id]);
        cache[o + p.v_off] = floatBitsToUint(v[p.v_skip + id]);
    } else {
        const uint half_dim = p.kv_dim / 2u;  // kv_dim is even; rows start at even elements
        if (id >= p.n_tok * half_dim) return;
        const uint t = id / half_dim, e = 2u * (id % half_dim);
        const uint o = p.cache_skip + dst[p.dst_skip + t] + p.layer_off + e;
        const uint i = p.k_skip + t * p.kv_dim + e, j = p.v_skip + t * p.kv_dim + e;
        cache[o >> 1] = f16_bits(k[i]) | (f16_bits(k[i + 1u]) << 16);
        cache[(o + p.v_off) >> 1] = f16_bits(v[j]) | (f16_bits(v[j + 1u]) << 16);
    }
}
