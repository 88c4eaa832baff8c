// vulkan/vk_ops.cpp — push constants and grid sizes of each shader (engine/shaders/*.comp).
// Owner: the Vulkan device. Thread-safety: see vk_ops.h.
#include "vulkan/vk_ops.h"

#include <algorithm>
#include <cassert>

namespace lmx::vk {

namespace {

constexpr uint32_t kGroup = 64;        // local_size_x of every shader
constexpr uint32_t kMaxGroupsX = 65535; // maxComputeWorkGroupCount[0] guaranteed minimum

uint32_t fl(const Binding& b) {
    assert(b.skip_bytes % 4 == 0);
    return b.skip_bytes / 4;
}
// Where a KV binding's data starts, in elements (4 or 2 bytes).
uint32_t kv_el(const Binding& b, bool f16) {
    assert(b.skip_bytes % 4 == 0);
    return f16 ? b.skip_bytes / 2 : b.skip_bytes / 4;
}
uint32_t u32(int64_t v) {
    assert(v >= 0 && v <= static_cast<int64_t>(UINT32_MAX));
    return static_cast<uint32_t>(v);
}
// Workgroups for n items split over (x, y) so x stays under the guaranteed limit.
void grid(uint64_t n_groups, uint32_t* gx, uint32_t* gy) {
    *gx = static_cast<uint32_t>(std::min<uint64_t>(std::max<uint64_t>(n_groups, 1), kMaxGroupsX));
    *gy = static_cast<uint32_t>((std::max<uint64_t>(n_groups, 1) + *gx - 1) / *gx);
}
uint32_t dtype_code(DType t) {
    switch (t) {
        case DType::F32: return 0;
        case DType::F16: return 1;
        case DType::BF16: return 2;
        case DType::Q8_0: return 3;
        case DType::Q4_0: return 4;
        default:
            if (dtype_is_gguf_quant(t)) return static_cast<uint32_t>(t);  // matmul.comp reads the DType values
            break;
    }
    throw UnsupportedError(std::string("vulkan matmul: weight format ") + dtype_name(t) +
                           " is not supported (x16 layouts are a CPU fast-precision form; use matmul_precision = exact)");
}

}  // namespace

void op_matmul(CmdStream& s, const VulkanDevice& dev, const void* w, DType dt, int64_t n_out, int64_t n_in,
               const Binding& x, const Binding& y, const Binding* bias, int64_t n_tok) {
    if (n_out == 0 || n_tok == 0) return;
    const uint64_t rb = static_cast<uint64_t>(row_bytes(dt, n_in));
    const uint64_t max_bind = dev.ctx_ptr()->info().max_binding_bytes;
    const uint64_t align = std::max<uint64_t>(dev.ctx_ptr()->info().min_storage_offset_align, 4);
    // Rows per dispatch: their bytes plus the alignment skip must fit one binding.
    const uint64_t max_rows = (max_bind - align) / rb;
    if (max_rows == 0)
        throw UnsupportedError("vulkan matmul: one weight row of " + std::to_string(rb) +
                               " bytes exceeds the storage-binding limit of " + std::to_string(max_bind));
    const uint8_t* base = static_cast<const uint8_t*>(w);
    for (int64_t r0 = 0; r0 < n_out; r0 += static_cast<int64_t>(max_rows)) {
        const int64_t n_rows = std::min<int64_t>(static_cast<int64_t>(max_rows), n_out - r0);
        const Binding wb = dev.bind(base + static_cast<uint64_t>(r0) * rb, static_cast<uint64_t>(n_rows) * rb);
        const Binding binds[4] = {wb, x, y, bias != nullptr ? *bias : x};
        const uint32_t push[11] = {wb.skip_bytes, fl(x), fl(y), bias != nullptr ? fl(*bias) : 0u, u32(n_in), u32(n_rows),
                                   u32(n_tok), u32(n_out), u32(r0), bias != nullptr ? 1u : 0u, u32(static_cast<int64_t>(rb))};
        uint32_t gx, gy;
        grid(static_cast<uint64_t>(n_rows), &gx, &gy);
        s.dispatch("matmul", dtype_code(dt), binds, 4, push, sizeof(push), gx, gy);
    }
}

void op_rmsnorm(CmdStream& s, const Binding& x, const Binding& weight, const Binding& y, int64_t n_tok, int64_t dim,
                float eps) {
    if (n_tok == 0) return;
    struct {
        uint32_t x_skip, w_skip, y_skip, dim, n_tok;
        float eps;
    } push{fl(x), fl(weight), fl(y), u32(dim), u32(n_tok), eps};
    const Binding binds[3] = {x, weight, y};
    s.dispatch("rmsnorm", 0, binds, 3, &push, sizeof(push), u32(n_tok));
}

void op_rope(CmdStream& s, const Binding& x, const Binding& cs, int64_t n_tok, int n_heads, int head_dim, int64_t ld_x) {
    if (n_tok == 0) return;
    const uint32_t push[6] = {fl(x), fl(cs), u32(n_tok), u32(n_heads), u32(head_dim), u32(ld_x)};
    const Binding binds[2] = {x, cs};
    uint32_t gx, gy;
    grid((static_cast<uint64_t>(n_tok) * n_heads * (head_dim / 2) + kGroup - 1) / kGroup, &gx, &gy);
    s.dispatch("rope", 0, binds, 2, push, sizeof(push), gx, gy);
}

namespace {
void eltwise(CmdStream& s, uint32_t op, const Binding& x, const Binding& z, const Binding& y, int64_t n, float a = 0) {
    if (n == 0) return;
    struct {
        uint32_t x_skip, z_skip, y_skip, n;
        float a;
    } push{fl(x), fl(z), fl(y), u32(n), a};
    const Binding binds[3] = {x, z, y};
    uint32_t gx, gy;
    grid((static_cast<uint64_t>(n) + kGroup - 1) / kGroup, &gx, &gy);
    s.dispatch("eltwise", op, binds, 3, &push, sizeof(push), gx, gy);
}
}  // namespace

void op_add(CmdStream& s, const Binding& x, const Binding& y, int64_t n) { eltwise(s, 0, x, x, y, n); }
void op_silu_mul(CmdStream& s, const Binding& gate, const Binding& up, const Binding& out, int64_t n) {
    eltwise(s, 1, gate, up, out, n);
}
void op_gelu_tanh_mul(CmdStream& s, const Binding& gate, const Binding& up, const Binding& out, int64_t n) {
    eltwise(s, 2, gate, up, out, n);
}
void op_softcap(CmdStream& s, const Binding& x, int64_t n, float cap) { eltwise(s, 3, x, x, x, n, cap); }
void op_scale(CmdStream& s, const Binding& x, int64_t n, float a) { eltwise(s, 4, x, x, x, n, a); }

void op_kv_store(CmdStream& s, const Binding& k, const Binding& v, const KvBindings& cache, const Binding& dst,
                 int64_t n_tok, const KvGeom& g) {
    if (n_tok == 0) return;
    assert(cache.n >= 1 && cache.n <= KvBindings::kMax);
    const int64_t kv_dim = static_cast<int64_t>(g.n_kv_heads) * g.head_dim;
    assert(!g.f16 || (kv_dim % 2 == 0 && g.layer_off % 2 == 0 && g.v_off % 2 == 0));
    const Binding& c0 = cache.b[0];
    auto c = [&](int i) -> const Binding& { return cache.b[i < cache.n ? i : 0]; };  // unused: repeat the first
    const uint32_t push[11] = {fl(k),    fl(v),          kv_el(c0, g.f16),     fl(dst),
                               u32(n_tok), u32(kv_dim),   g.layer_off,          g.v_off,
                               kv_el(c(1), g.f16), kv_el(c(2), g.f16), kv_el(c(3), g.f16)};
    const Binding binds[7] = {k, v, c0, dst, c(1), c(2), c(3)};
    uint32_t gx, gy;
    const uint64_t n_items = static_cast<uint64_t>(n_tok * kv_dim) / (g.f16 ? 2 : 1);  // f16: a thread per word
    grid((n_items + kGroup - 1) / kGroup, &gx, &gy);
    s.dispatch("kv_store", g.f16 ? 1 : 0, binds, 7, push, sizeof(push), gx, gy);
}

void op_attention(CmdStream& s, const Binding& q, const KvBindings& cache, const Binding& tok, const Binding& tables,
                  const Binding& out, int64_t n_tok, const KvGeom& g, float scale) {
    if (n_tok == 0) return;
    assert(cache.n >= 1 && cache.n <= KvBindings::kMax);
    auto c = [&](int i) -> const Binding& { return cache.b[i < cache.n ? i : 0]; };
    if (g.head_dim > 256 || g.n_heads % g.n_kv_heads != 0 || (g.f16 && g.head_dim % 2 != 0))
        throw UnsupportedError("vulkan attention: expected head_dim <= 256 (even with f16 KV) and n_heads % n_kv_heads "
                               "== 0, found " +
                               std::to_string(g.head_dim) + ", " + std::to_string(g.n_heads) + "/" +
                               std::to_string(g.n_kv_heads));
    assert(tok.skip_bytes % 8 == 0);
    struct {
        uint32_t q_skip, cache_skip, tok_skip, tables_skip, o_skip;
        uint32_t n_tok, n_heads, n_kv_heads, head_dim, block_tokens, layer_off, v_off;
        float scale;
        uint32_t window;
        uint32_t cache_skip1, cache_skip2, cache_skip3;
    } push{fl(q), kv_el(c(0), g.f16), fl(tok), fl(tables), fl(out), u32(n_tok), u32(g.n_heads), u32(g.n_kv_heads),
           u32(g.head_dim), u32(g.block_tokens), g.layer_off, g.v_off, scale, g.window,
           kv_el(c(1), g.f16), kv_el(c(2), g.f16), kv_el(c(3), g.f16)};
    const Binding binds[8] = {q, c(0), tok, tables, out, c(1), c(2), c(3)};
    s.dispatch("attention", g.f16 ? 1 : 0, binds, 8, &push, sizeof(push), u32(n_tok), u32(g.n_heads));
}

}  // namespace lmx::vk
