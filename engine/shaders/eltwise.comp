// eltwise.comp — element-wise ops over n floats: OP 0 y[i] += x[i] (residual add);
// OP 1 y[i] = silu(x[i]) * z[i] (SwiGLU; y may alias x).
// Owner: the Vulkan device.
#version 450

layout(local_size_x = 64) in;
layout(constant_id = 0) const uint OP = 0;
layout(std430, binding = 0) readonly buffer Xs { float x[]; };
layout(std430, binding = 1) readonly buffer Zs { float z[]; };
layout(std430, binding = 2) buffer Ys { float y[]; };

layout(push_constant) uniform Push {
    uint x_skip, z_skip, y_skip;  // floats
    uint n;
} p;

void main() {
    const uint i = gl_GlobalInvocationID.x + gl_GlobalInvocationID.y * gl_NumWorkGroups.x * 64u;
    if (i >= p.n) return;
    if (OP == 0u) {
        y[p.y_skip + i] += x[p.x_skip + i];
    } else {
        const float g = x[p.x_skip + i];
        y[p.y_skip + i] = g / (1.0 + exp(-g)) * z[p.z_skip + i];
    }
}
