// rope.comp — rotary embedding (Hugging Face rotate_half) of q or k rows in place.
// Owner: the Vulkan device. cos/sin come from the host ([n_tok, half] each, f32 as Hugging
// Face computes them, Llama 3 scaling already in inv_freq), so the GPU's sin/cos precision
// at large angles never matters. One invocation per (token, head, i < half).
#version 450

layout(local_size_x = 64) in;
layout(std430, binding = 0) buffer Xs { float x[]; };
layout(std430, binding = 1) readonly buffer Cs { float cs[]; };  // [n_tok, half] cos, then [n_tok, half] sin

layout(push_constant) uniform Push {
    uint x_skip, cs_skip;  // floats
    uint n_tok, n_heads, head_dim;
    uint ld_x;             // floats per token row of x
} p;

void main() {
    const uint half_dim = p.head_dim / 2u;
    const uint id = gl_GlobalInvocationID.x + gl_GlobalInvocationID.y * gl_NumWorkGroups.x * 64u;
    if (id >= p.n_tok * p.n_heads * half_dim) return;
    const uint i = id % half_dim;
    const uint h = (id / half_dim) % p.n_heads;
    const uint t = id / (half_dim * p.n_heads);
    const float c = cs[p.cs_skip + t * half_dim + i];
    const float s = cs[p.cs_skip + p.n_tok * half_dim + t * half_dim + i];
    const uint o = p.x_skip + t * p.ld_x + h * p.head_dim + i;
    const float x0 = x[o], x1 = x[o + half_dim];
    x[o] = x0 * c - x1 * s;
    x[o + half_dim] = x1 * c + x0 * s;
}
