// kv_store.comp — appends a step's K and V rows to the paged cache of one layer.
// Owner: the Vulkan device. dst[t] is token t's K row in the KV binding (floats; its V row
// is block_tokens * kv_dim further, kv_cache.h's block layout), before the layer offset.
#version 450

layout(local_size_x = 64) in;
layout(std430, binding = 0) readonly buffer Ks { float k[]; };
layout(std430, binding = 1) readonly buffer Vs { float v[]; };
layout(std430, binding = 2) buffer Cache { float cache[]; };
layout(std430, binding = 3) readonly buffer Dst { uint dst[]; };

layout(push_constant) uniform Push {
    uint k_skip, v_skip, cache_skip, dst_skip;  // floats / uints
    uint n_tok, kv_dim;
    uint layer_off;   // floats from a block's start to this layer's K
    uint v_off;       // floats from K to V (block_tokens * kv_dim)
} p;

void main() {
    const uint id = gl_GlobalInvocationID.x + gl_GlobalInvocationID.y * gl_NumWorkGroups.x * 64u;
    if (id >= p.n_tok * p.kv_dim) return;
    const uint t = id / p.kv_dim, e = id % p.kv_dim;
    const uint o = p.cache_skip + dst[p.dst_skip + t] + p.layer_off + e;
    cache[o] = k[p.k_skip + id];
    cache[o + p.v_off] = v[p.v_skip + id];
}
