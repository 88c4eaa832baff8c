// eltwise.comp — element-wise ops over n floats:
//   OP 0 y[i] += x[i]                      (residual add)
//   OP 1 y[i] = silu(x[i]) * z[i]          (SwiGLU; y may alias x)
//   OP 2 y[i] = gelu_tanh(x[i]) * z[i]     (Gemma's GeGLU; y may alias x)
//   OP 3 y[i] = tanh(y[i] / a) * a         (final logit soft-capping, a = cap)
//   OP 4 y[i] *= a                          (scaled embedding)
// Owner: the Vulkan device. tanh's argument is clamped to +-15 (tanh = +-1 in f32 there), so
// no implementation's exp-based tanh overflows to NaN.
#version 450

layout(local_size_x = 64) in;
layout(constant_id = 0) const uint OP = 0;
layout(std430, binding = 0) readonly buffer Xs { float x[]; };
layout(std430, binding = 1) readonly buffer Zs { float z[]; };
layout(std430, binding = 2) buffer Ys { float y[]; };

layout(push_constant) uniform Push {
    uint x_skip, z_skip, y_skip;  // floats
    uint n;
    float a;
} p;

float tanh_safe(float v) { return tanh(clamp(v, -15.0, 15.0)); }

void main() {
    const uint i = gl_GlobalInvocationID.x + gl_GlobalInvocationID.y * gl_NumWorkGroups.x * 64u;
    if (i >= p.n) return;
    if (OP == 0u) {
        y[p.y_skip + i] += x[p.x_skip + i];
    } else if (OP == 1u) {
        const float g = x[p.x_skip + i];
        y[p.y_skip + i] = g / (1.0 + exp(-g)) * z[p.z_skip + i];
    } else if (OP == 2u) {
        const float g = x[p.x_skip + i];
        const float inner = 0.7978845608028654 * (g + 0.044715 * g * g * g);
        y[p.y_skip + i] = 0.5 * g * (1.0 + tanh_safe(inner)) * z[p.z_skip + i];
    } else if (OP == 3u) {
        y[p.y_skip + i] = tanh_safe(y[p.y_skip + i] / p.a) * p.a;
    } else {
        y[p.y_skip + i] *= p.a;
    }
}
