// attention.comp — causal attention over the paged KV cache (GQA), decode and prefill alike.
// Owner: the Vulkan device. One workgroup per (token, query head). Keys are taken 64 at a
// time (one per thread): scores into shared memory, then an online softmax (running max m,
// running sum l, the output rescaled by exp(m_old - m_new)); every thread reads the chunk
// in the same order, so the result of one (token, head) never depends on the batch. A
// sliding-window layer (window > 0) starts at key max(0, n_keys - window).
// tok[t] = {first entry of its block table in `tables`, number of keys (pos + 1)};
// tables hold each block's KV binding (top 2 bits: one of up to four, so a step's blocks may lie
// in several device memory blocks) and its start in that binding (low 30 bits, elements), before
// the layer offset. The binding is chosen by branch, not by indexing an array of descriptors (no
// descriptor-indexing feature needed for the per-key, non-uniform choice).
//
// KV elements (spec constant KV_F16): f32, or f16 packed two to a 32-bit word (element 2i in
// the low half, as the CPU lays them out in little-endian memory) and widened exactly by
// unpackHalf2x16 — no 16-bit storage feature needed. Rows start at even elements (kv_dim and
// head_dim are even), so a head's elements pair up within words.
#version 450

layout(local_size_x = 64) in;
layout(constant_id = 0) const uint KV_F16 = 0;
layout(std430, binding = 0) readonly buffer Qs { float q[]; };
layout(std430, binding = 1) readonly buffer Cache0 { uint cache0[]; };  // f32 bits, or two f16 per word
layout(std430, binding = 2) readonly buffer Toks { uvec2 tok[]; };
layout(std430, binding = 3) readonly buffer Tables { uint tables[]; };
layout(std430, binding = 4) writeonly buffer Os { float o[]; };
layout(std430, binding = 5) readonly buffer Cache1 { uint cache1[]; };
layout(std430, binding = 6) readonly buffer Cache2 { uint cache2[]; };
layout(std430, binding = 7) readonly buffer Cache3 { uint cache3[]; };

layout(push_constant) uniform Push {
    uint q_skip, cache_skip, tok_skip, tables_skip, o_skip;  // floats / KV elements (binding 0) / entries
    uint n_tok, n_heads, n_kv_heads, head_dim;
    uint block_tokens;
    uint layer_off;  // elements from a block's start to this layer's K
    uint v_off;      // elements from K to V
    float scale;
    uint window;     // > 0: only the last `window` keys (sliding-window layer)
    uint cache_skip1, cache_skip2, cache_skip3;  // KV elements, bindings 5..7
} p;

const uint MAX_DIMS = 4;  // head_dim <= 256
shared float sc[64];

// Word i of KV binding b.
uint word(uint b, uint i) {
    if (b == 0u) return cache0[i];
    if (b == 1u) return cache1[i];
    if (b == 2u) return cache2[i];
    return cache3[i];
}
uint skip(uint b) { return b == 0u ? p.cache_skip : b == 1u ? p.cache_skip1 : b == 2u ? p.cache_skip2 : p.cache_skip3; }

float kv_at(uint b, uint e) {
    if (KV_F16 == 0u) return uintBitsToFloat(word(b, e));
    const vec2 w = unpackHalf2x16(word(b, e >> 1));
    return (e & 1u) == 0u ? w.x : w.y;
}

void main() {
    const uint t = gl_WorkGroupID.x;
    const uint h = gl_WorkGroupID.y;
    const uint tid = gl_LocalInvocationID.x;
    const uvec2 info = tok[p.tok_skip / 2u + t];
    const uint n_keys = info.y;
    const uint kv_dim = p.n_kv_heads * p.head_dim;
    const uint kvh = h / (p.n_heads / p.n_kv_heads);
    const uint qo = p.q_skip + (t * p.n_heads + h) * p.head_dim;
    float acc[MAX_DIMS];
    for (uint j = 0; j < MAX_DIMS; j++) acc[j] = 0.0;
    float m = -1.0 / 0.0;  // -inf
    float l = 0.0;
    const uint first = (p.window > 0u && n_keys > p.window) ? n_keys - p.window : 0u;
    for (uint c0 = first; c0 < n_keys; c0 += 64u) {
        const uint key = c0 + tid;
        float s = -1.0 / 0.0;
        if (key < n_keys) {
            const uint entry = tables[p.tables_skip + info.x + key / p.block_tokens];
            const uint b = entry >> 30;
            const uint base = skip(b) + (entry & 0x3fffffffu) + p.layer_off + (key % p.block_tokens) * kv_dim +
                              kvh * p.head_dim;
            float dot = 0.0;
            if (KV_F16 == 0u) {
                for (uint d = 0; d < p.head_dim; d++) dot += q[qo + d] * uintBitsToFloat(word(b, base + d));
            } else {  // base is even: the head's elements are head_dim / 2 whole words, summed in order
                for (uint d = 0; d < p.head_dim; d += 2u) {
                    const vec2 kk = unpackHalf2x16(word(b, (base + d) >> 1));
                    dot += q[qo + d] * kk.x;
                    dot += q[qo + d + 1u] * kk.y;
                }
            }
            s = dot * p.scale;
        }
        sc[tid] = s;
        barrier();
        const uint n_here = min(64u, n_keys - c0);
        float cm = m;
        for (uint k = 0; k < n_here; k++) cm = max(cm, sc[k]);
        const float alpha = exp(m - cm);  // m = -inf on the first chunk: 0
        float sum = 0.0;
        for (uint k = 0; k < n_here; k++) sum += exp(sc[k] - cm);
        l = l * alpha + sum;
        for (uint j = 0; j < MAX_DIMS; j++) {
            const uint d = tid + 64u * j;
            if (d >= p.head_dim) break;
            float a = acc[j] * alpha;
            for (uint k = 0; k < n_here; k++) {
                const uint kk = c0 + k;
                const uint entry = tables[p.tables_skip + info.x + kk / p.block_tokens];
                const uint b = entry >> 30;
                const uint vb = skip(b) + (entry & 0x3fffffffu) + p.layer_off + p.v_off +
                                (kk % p.block_tokens) * kv_dim + kvh * p.head_dim;
                a += exp(sc[k] - cm) * kv_at(b, vb + d);
            }
            acc[j] = a;
        }
        m = cm;
        barrier();
    }
    for (uint j = 0; j < MAX_DIMS; j++) {
        const uint d = tid + 64u * j;
        if (d < p.head_dim) o[p.o_skip + (t * p.n_heads + h) * p.head_dim + d] = acc[j] / l;
    }
}
