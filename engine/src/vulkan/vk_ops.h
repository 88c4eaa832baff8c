// vulkan/vk_ops.h — the forward pass's ops as compute dispatches recorded on a CmdStream.
// Owner: the Vulkan device. Thread-safety: as the stream (one thread records at a time).
//
// Each op mirrors one scalar reference of kernels/reference.cpp (same layouts, same
// contracts); engine/tests/test_vulkan.cpp checks each against it with a stated tolerance.
// Activations are f32 bindings (Binding::skip_bytes says where the data starts); weights are
// device addresses, because a matrix may be longer than one binding: op_matmul splits its
// rows into dispatches of at most Info::max_binding_bytes each.
#pragma once

#include <cstdint>

#include "common.h"
#include "vulkan/vk_device.h"

namespace lmx::vk {

// y[t, o] = sum_i x[t, i] W[o, i] (+ bias[o]); W: [n_out, row_bytes(dt, n_in)] at device address w
// (dt: F32, F16, BF16, Q8_0, Q4_0 or a GGUF block format: Q4_1 .. Q6_K); x: [n_tok, n_in];
// y: [n_tok, n_out]; bias: [n_out] or nullptr.
void op_matmul(CmdStream& s, const VulkanDevice& dev, const void* w, DType dt, int64_t n_out, int64_t n_in,
               const Binding& x, const Binding& y, const Binding* bias, int64_t n_tok);
// y[t, :] = rmsnorm(x[t, :]) * weight   (y may be x)
void op_rmsnorm(CmdStream& s, const Binding& x, const Binding& weight, const Binding& y, int64_t n_tok, int64_t dim,
                float eps);
// Rotates n_heads heads of every token row (ld_x floats apart) in place; cs: [n_tok, hd/2] cos then sin.
void op_rope(CmdStream& s, const Binding& x, const Binding& cs, int64_t n_tok, int n_heads, int head_dim, int64_t ld_x);
void op_add(CmdStream& s, const Binding& x, const Binding& y, int64_t n);  // y += x
void op_silu_mul(CmdStream& s, const Binding& gate, const Binding& up, const Binding& out, int64_t n);
void op_gelu_tanh_mul(CmdStream& s, const Binding& gate, const Binding& up, const Binding& out, int64_t n);
void op_softcap(CmdStream& s, const Binding& x, int64_t n, float cap);  // x = tanh(x / cap) * cap
void op_scale(CmdStream& s, const Binding& x, int64_t n, float a);      // x *= a
// Paged KV of one layer. cache: the bindings holding every block the step touches (1 to 4: the
// blocks may lie in several device memory blocks); dst: [n_tok] uint32, each token's K row: its
// binding in the top 2 bits, its start in that binding in the low 30 (elements from the binding's
// data start, before layer_off); tok: [n_tok] {table start, n_keys}; tables: block starts
// (encoded as dst). An element is an
// f32, or with f16 an IEEE half packed two to a 32-bit word (no 16-bit storage feature needed);
// f16 needs even head_dim, layer_off, v_off and row starts (always so: head_dim is even for RoPE).
struct KvGeom {
    int n_heads, n_kv_heads, head_dim, block_tokens;
    uint32_t layer_off;  // elements from a block's start to this layer's K
    uint32_t v_off;      // elements from K to V
    uint32_t window = 0; // > 0: a query at position p sees keys p - window + 1 .. p only
    bool f16 = false;    // elements are f16 (EngineConfig.kv_dtype)
};
struct KvBindings {
    static constexpr int kMax = 4;
    Binding b[kMax];
    int n = 0;
    KvBindings() = default;
    KvBindings(const Binding& one) : n(1) { b[0] = one; }  // NOLINT: one binding is the common case
};
constexpr uint32_t kKvEntryOffsetBits = 30;  // entry = binding << 30 | element offset
void op_kv_store(CmdStream& s, const Binding& k, const Binding& v, const KvBindings& cache, const Binding& dst,
                 int64_t n_tok, const KvGeom& g);
void op_attention(CmdStream& s, const Binding& q, const KvBindings& cache, const Binding& tok, const Binding& tables,
                  const Binding& out, int64_t n_tok, const KvGeom& g, float scale);

}  // namespace lmx::vk
