// rmsnorm.comp — y[t, :] = x[t, :] / sqrt(mean(x[t, :]^2) + eps) * weight[:]  (y may alias x).
// Owner: the Vulkan device. One workgroup per token; fixed-order strided sums and a tree.
#version 450

layout(local_size_x = 64) in;
layout(std430, binding = 0) readonly buffer Xs { float x[]; };
layout(std430, binding = 1) readonly buffer Ws { float wt[]; };
layout(std430, binding = 2) buffer Ys { float y[]; };

layout(push_constant) uniform Push {
    uint x_skip, w_skip, y_skip;  // floats
    uint dim;
    uint n_tok;
    float eps;
} p;

shared float red[64];

void main() {
    const uint t = gl_WorkGroupID.x;
    if (t >= p.n_tok) return;
    const uint tid = gl_LocalInvocationID.x;
    const uint xo = p.x_skip + t * p.dim, yo = p.y_skip + t * p.dim;
    float ss = 0.0;
    for (uint i = tid; i < p.dim; i += 64u) ss += x[xo + i] * x[xo + i];
    red[tid] = ss;
    barrier();
    for (uint s = 32u; s > 0u; s >>= 1) {
        if (tid < s) red[tid] += red[tid + s];
        barrier();
    }
    const float inv = 1.0 / sqrt(red[0] / float(p.dim) + p.eps);
    for (uint i = tid; i < p.dim; i += 64u) {
        const float v = x[xo + i];
        y[yo + i] = wt[p.w_skip + i] * (v * inv);
    }
}
