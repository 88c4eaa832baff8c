// test_vulkan.cpp — the Vulkan device: memory, copies and every compute shader against the
// scalar references (kernels/reference.cpp), under the validation layer when LMX_VK_VALIDATION=1.
// Owner: the Vulkan device. Thread-safety: tests run one at a time; they share one context.
//
// Skips (one line, and passes) when the build has no Vulkan or the machine has no device.
// Every test also fails on any validation message (synchronization validation included).
//
// Tolerances. The shaders read exactly the weights the reference reads (f16, bf16, q8_0 and
// q4_0 widen to f32 without error), so matmul differs from the double-accumulating reference
// only by f32 accumulation: each of 64 threads sums n_in/64 products, then a 6-level tree:
// |gpu - ref| <= (n_in/64 + 8) * 2^-24 * sum_i |x_i w_i|, the same bound for every format
// (checked with a factor 2 of slack). RMSNorm: 1e-5 relative; RoPE: 2^-20 relative to the
// row's scale (cos/sin come from the host); SwiGLU: 1e-5 relative (the device's exp);
// attention (online softmax in f32): 2e-5 absolute on values of magnitude <= 1.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "check.h"
#include "kernels/kernels.h"
#include "vulkan/vk_probe.h"

#include "test_rand.h"

#if LMX_HAVE_VULKAN
#include "backend.h"
#include "backend_checks.h"
#include "ledger.h"
#include "vulkan/vk_context.h"
#include "vulkan/vk_device.h"
#include "vulkan/vk_ops.h"
#endif

using namespace lmx;
using lmx_test::Rng;
using lmx_test::random_vec;

#if !LMX_HAVE_VULKAN

TEST(vulkan_suite_skipped_when_not_built) {
    std::string why;
    lmx::vulkan_devices(&why);
    std::fprintf(stderr, "  skipped: %s\n", why.c_str());
}

#else

using namespace lmx::vk;

namespace {

// One context and device for the suite (instance creation under validation is slow).
struct Gpu {
    std::shared_ptr<Context> ctx;
    std::unique_ptr<VulkanDevice> dev;
    CmdStream* comp = nullptr;
};
std::string g_skip;
Gpu* gpu() {
    static bool tried = false;
    static Gpu& g = *new Gpu;  // never destroyed: the driver's own statics may be gone at exit
    if (!tried) {
        tried = true;
        // The context first, no throwaway listing instance: an instance's destruction unloads the
        // ICDs the loader probed, and LeakSanitizer cannot attribute their leaks once unloaded.
        try {
            g.ctx = std::make_shared<Context>(Options::from_env(0));
        } catch (const Error& e) {
            g_skip = e.what();
        }
        if (g.ctx) {
            g.dev = std::make_unique<VulkanDevice>(g.ctx, 64ull << 20, 0, 1ull << 20);
            g.comp = &g.dev->compute();
            std::fprintf(stderr, "  vulkan: %s; validation %s\n", g.ctx->info().name.c_str(),
                         Options::from_env(0).validation ? "on" : "off (set LMX_VK_VALIDATION=1)");
        }
    }
    if (!g.ctx) {
        std::fprintf(stderr, "  skipped: %s\n", g_skip.c_str());
        return nullptr;
    }
    return &g;
}

// A device buffer holding host floats (or bytes), freed at scope end.
struct DevBuf {
    VulkanDevice* dev;
    void* p;
    uint64_t n;
    CopyFence ready{};
    DevBuf(VulkanDevice& d, const void* src, uint64_t n_bytes) : dev(&d), p(d.alloc(n_bytes)), n(n_bytes) {
        CHECK(p != nullptr);
        const CopyRegion r{p, src, n_bytes};
        if (src != nullptr) ready = d.copy_in(&r, 1, ComputeFence{});
    }
    DevBuf(VulkanDevice& d, const std::vector<float>& v) : DevBuf(d, v.data(), v.size() * 4) {}
    ~DevBuf() { dev->free(p); }
    Binding b() const { return dev->bind(p, n); }
    std::vector<float> read() const {
        std::vector<float> out(n / 4);
        dev->copy_out(out.data(), p, n);
        return out;
    }
};

// Records with fn, submits waiting on the copies of `srcs` (a device buffer's upload), waits.
template <class F>
void run_after(Gpu& g, const std::vector<const DevBuf*>& srcs, F fn) {
    g.comp->begin();
    fn(*g.comp);
    std::vector<std::pair<VkSemaphore, uint64_t>> waits;
    for (const DevBuf* b : srcs) waits.push_back({g.dev->xfer_timeline(), b->ready.value});
    const uint64_t v = g.comp->submit(waits);
    g.comp->wait(v);
}

void check_no_validation_messages(uint64_t before) {
    const uint64_t n = validation_message_count() - before;
    if (n != 0) std::fprintf(stderr, "  %llu validation message(s); last: %s\n", static_cast<unsigned long long>(n),
                             last_validation_message().c_str());
    CHECK(n == 0);
}

const DType kDTypes[] = {DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0};

std::vector<uint8_t> random_weights(Rng& rng, DType dt, int64_t n_out, int64_t n_in) {
    const std::vector<float> f = random_vec(rng, n_out * n_in);
    std::vector<uint8_t> w(static_cast<size_t>(row_bytes(dt, n_in) * n_out));
    convert_rows(f.data(), DType::F32, w.data(), dt, n_out, n_in);
    return w;
}

// |gpu - ref| bound of the header for one output element.
double matmul_tol(const WeightView& wv, const float* x, int64_t o) {
    std::vector<float> row(static_cast<size_t>(wv.n_in));
    dequantize_row(wv, o, row.data());
    double s = 0;
    for (int64_t i = 0; i < wv.n_in; i++) s += std::fabs(static_cast<double>(x[i]) * row[static_cast<size_t>(i)]);
    return 2.0 * (static_cast<double>(wv.n_in) / 64.0 + 8.0) * 0x1p-24 * s + 1e-30;
}

}  // namespace

TEST(vulkan_matmul_matches_reference_for_every_dtype_and_ragged_shape) {
    Gpu* g = gpu();
    if (!g) return;
    const uint64_t before = validation_message_count();
    Rng rng(7);
    struct Shape {
        int64_t n_out, n_in, n_tok;
    };
    const Shape shapes[] = {{1, 32, 1}, {37, 64, 1}, {5, 96, 9}, {130, 160, 17}, {67, 33, 3}, {64, 200, 8}};
    for (DType dt : kDTypes) {
        for (const Shape& sh : shapes) {
            if (dtype_is_blocked(dt) && sh.n_in % 32 != 0) continue;
            for (int with_bias = 0; with_bias < 2; with_bias++) {
                const auto w = random_weights(rng, dt, sh.n_out, sh.n_in);
                const auto x = random_vec(rng, sh.n_tok * sh.n_in);
                const auto bias = random_vec(rng, sh.n_out);
                const WeightView wv{w.data(), dt, sh.n_out, sh.n_in};
                std::vector<float> want(static_cast<size_t>(sh.n_tok * sh.n_out));
                ref::matmul(wv, x.data(), sh.n_tok, want.data(), with_bias ? bias.data() : nullptr);
                DevBuf dw(*g->dev, w.data(), w.size()), dx(*g->dev, x), db(*g->dev, bias);
                DevBuf dy(*g->dev, nullptr, want.size() * 4);
                const Binding bb = db.b();
                run_after(*g, {&dw, &dx, &db}, [&](CmdStream& s) {
                    op_matmul(s, *g->dev, dw.p, dt, sh.n_out, sh.n_in, dx.b(), dy.b(), with_bias ? &bb : nullptr, sh.n_tok);
                });
                const auto got = dy.read();
                int bad = 0;
                for (int64_t t = 0; t < sh.n_tok; t++)
                    for (int64_t o = 0; o < sh.n_out; o++) {
                        const size_t k = static_cast<size_t>(t * sh.n_out + o);
                        const double tol = matmul_tol(wv, x.data() + t * sh.n_in, o) + (with_bias ? 1e-7 : 0.0);
                        if (!(std::fabs(got[k] - want[k]) <= tol) && bad++ < 3)
                            std::fprintf(stderr, "  %s [%lld x %lld] t=%lld o=%lld: %g vs %g (tol %g)\n", dtype_name(dt),
                                         static_cast<long long>(sh.n_out), static_cast<long long>(sh.n_in),
                                         static_cast<long long>(t), static_cast<long long>(o), got[k], want[k], tol);
                    }
                CHECK(bad == 0);
            }
        }
    }
    check_no_validation_messages(before);
}

// The GGUF block formats (kernels/quants.h): random blocks with finite f16 scales, against the
// reference (which dequantises with the scalar code); the same accumulation bound as above.
TEST(vulkan_matmul_matches_reference_for_every_gguf_block_format) {
    Gpu* g = gpu();
    if (!g) return;
    const uint64_t before = validation_message_count();
    Rng rng(23);
    struct Fmt {
        DType t;
        std::vector<int> f16_offsets;  // the block's f16 fields
    };
    const Fmt fmts[] = {{DType::Q4_1, {0, 2}}, {DType::Q5_0, {0}},  {DType::Q5_1, {0, 2}},   {DType::Q2_K, {80, 82}},
                        {DType::Q3_K, {108}},  {DType::Q4_K, {0, 2}}, {DType::Q5_K, {0, 2}}, {DType::Q6_K, {208}}};
    for (const Fmt& f : fmts) {
        const int64_t elems = dtype_block_elems(f.t), bytes = dtype_block_bytes(f.t);
        const int64_t n_in = elems * 2, n_out = 37, n_tok = 3;
        std::vector<uint8_t> w(static_cast<size_t>(n_out * (n_in / elems) * bytes));
        for (auto& b : w) b = static_cast<uint8_t>(rng.next());
        for (size_t blk = 0; blk < w.size() / static_cast<size_t>(bytes); blk++)
            for (int off : f.f16_offsets) {
                const uint16_t h = f32_to_f16(rng.uniform(-0.05f, 0.05f));
                std::memcpy(w.data() + blk * static_cast<size_t>(bytes) + off, &h, 2);
            }
        const auto x = random_vec(rng, n_tok * n_in);
        const WeightView wv{w.data(), f.t, n_out, n_in};
        std::vector<float> want(static_cast<size_t>(n_tok * n_out));
        ref::matmul(wv, x.data(), n_tok, want.data(), nullptr);
        DevBuf dw(*g->dev, w.data(), w.size()), dx(*g->dev, x), dy(*g->dev, nullptr, want.size() * 4);
        run_after(*g, {&dw, &dx}, [&](CmdStream& s) {
            op_matmul(s, *g->dev, dw.p, f.t, n_out, n_in, dx.b(), dy.b(), nullptr, n_tok);
        });
        const auto got = dy.read();
        int bad = 0;
        for (int64_t t = 0; t < n_tok; t++)
            for (int64_t o = 0; o < n_out; o++) {
                const size_t k = static_cast<size_t>(t * n_out + o);
                const double tol = matmul_tol(wv, x.data() + t * n_in, o);
                if (!(std::fabs(got[k] - want[k]) <= tol) && bad++ < 3)
                    std::fprintf(stderr, "  %s t=%lld o=%lld: %g vs %g (tol %g)\n", dtype_name(f.t),
                                 static_cast<long long>(t), static_cast<long long>(o), got[k], want[k], tol);
            }
        CHECK(bad == 0);
    }
    check_no_validation_messages(before);
}

TEST(vulkan_matmul_is_batch_invariant_bitwise) {
    Gpu* g = gpu();
    if (!g) return;
    const uint64_t before = validation_message_count();
    Rng rng(11);
    for (DType dt : {DType::F32, DType::Q8_0, DType::Q4_0}) {
        const int64_t n_out = 45, n_in = 128, n_tok = 11;
        const auto w = random_weights(rng, dt, n_out, n_in);
        const auto x = random_vec(rng, n_tok * n_in);
        DevBuf dw(*g->dev, w.data(), w.size()), dx(*g->dev, x);
        DevBuf all(*g->dev, nullptr, static_cast<uint64_t>(n_tok * n_out) * 4);
        DevBuf one(*g->dev, nullptr, static_cast<uint64_t>(n_tok * n_out) * 4);
        run_after(*g, {&dw, &dx}, [&](CmdStream& s) {
            op_matmul(s, *g->dev, dw.p, dt, n_out, n_in, dx.b(), all.b(), nullptr, n_tok);
            for (int64_t t = 0; t < n_tok; t++)
                op_matmul(s, *g->dev, dw.p, dt, n_out, n_in,
                          g->dev->bind(static_cast<uint8_t*>(dx.p) + t * n_in * 4, static_cast<uint64_t>(n_in) * 4),
                          g->dev->bind(static_cast<uint8_t*>(one.p) + t * n_out * 4, static_cast<uint64_t>(n_out) * 4),
                          nullptr, 1);
        });
        const auto a = all.read(), b = one.read();
        CHECK(std::memcmp(a.data(), b.data(), a.size() * 4) == 0);
    }
    check_no_validation_messages(before);
}

// A weight arena larger than one storage binding: a context whose bindings are capped at
// 4 KiB and a device of 64 KiB blocks; a 60 KiB matrix in the second block is split into
// dispatches of <= 4 KiB each, and gives bitwise what one unsplit dispatch gives.
TEST(vulkan_matmul_splits_a_matrix_longer_than_one_binding) {
    Gpu* g = gpu();
    if (!g) return;
    const uint64_t before = validation_message_count();
    Options o = Options::from_env(0);
    o.max_binding_bytes = 4096;
    auto ctx = std::make_shared<Context>(o);
    CHECK(ctx->info().max_binding_bytes == 4096);
    VulkanDevice small(ctx, 256 << 10, 64 << 10, 64 << 10);
    CHECK(small.n_blocks() == 4);
    CmdStream& comp = small.compute();
    void* filler = small.alloc(60 << 10);  // pushes the matrix into block 1
    Rng rng(3);
    for (DType dt : {DType::F32, DType::Q4_0}) {
        const int64_t n_in = 64, n_out = dt == DType::F32 ? 200 : 900, n_tok = dt == DType::F32 ? 3 : 1;
        const auto w = random_weights(rng, dt, n_out, n_in);
        CHECK(w.size() > 4096 * 4);
        const auto x = random_vec(rng, n_tok * n_in);
        void* dw = small.alloc(w.size());
        CHECK(dw != nullptr && small.locate(dw).buf != small.locate(filler).buf);
        void* dx = small.alloc(x.size() * 4);
        void* dy = small.alloc(static_cast<uint64_t>(n_tok * n_out) * 4);
        const CopyRegion regions[2] = {{dw, w.data(), w.size()}, {dx, x.data(), x.size() * 4}};
        const CopyFence f = small.copy_in(regions, 2, ComputeFence{});
        comp.begin();
        op_matmul(comp, small, dw, dt, n_out, n_in, small.bind(dx, x.size() * 4),
                  small.bind(dy, static_cast<uint64_t>(n_tok * n_out) * 4), nullptr, n_tok);
        comp.wait(comp.submit({{small.xfer_timeline(), f.value}}));
        std::vector<float> got(static_cast<size_t>(n_tok * n_out)), want(got.size());
        small.copy_out(got.data(), dy, got.size() * 4);
        // Unsplit, on the suite's device (bindings at the device's own limit).
        DevBuf gw(*g->dev, w.data(), w.size()), gx(*g->dev, x), gy(*g->dev, nullptr, want.size() * 4);
        run_after(*g, {&gw, &gx}, [&](CmdStream& s) {
            op_matmul(s, *g->dev, gw.p, dt, n_out, n_in, gx.b(), gy.b(), nullptr, n_tok);
        });
        want = gy.read();
        CHECK(std::memcmp(got.data(), want.data(), got.size() * 4) == 0);
        small.free(dw);
        small.free(dx);
        small.free(dy);
    }
    small.free(filler);
    check_no_validation_messages(before);
}

TEST(vulkan_rmsnorm_rope_swiglu_add_match_reference) {
    Gpu* g = gpu();
    if (!g) return;
    const uint64_t before = validation_message_count();
    Rng rng(5);
    const int64_t n_tok = 7, dim = 72;
    const int n_heads = 3, head_dim = 24;
    const auto x = random_vec(rng, n_tok * dim), wt = random_vec(rng, dim, 0.5f, 1.5f);
    const auto gate = random_vec(rng, n_tok * dim, -6.0f, 6.0f), up = random_vec(rng, n_tok * dim);
    // RoPE angles as the engine computes them: pos * inv_freq in f32, then cos / sin.
    std::vector<float> inv(static_cast<size_t>(head_dim / 2)), cs(static_cast<size_t>(n_tok * head_dim));
    for (int i = 0; i < head_dim / 2; i++) inv[static_cast<size_t>(i)] = std::pow(10000.0f, -2.0f * i / head_dim);
    const int64_t pos0 = 1000;
    for (int64_t t = 0; t < n_tok; t++)
        for (int i = 0; i < head_dim / 2; i++) {
            const float a = static_cast<float>(pos0 + t) * inv[static_cast<size_t>(i)];
            cs[static_cast<size_t>(t * (head_dim / 2) + i)] = std::cos(a);
            cs[static_cast<size_t>(n_tok * (head_dim / 2) + t * (head_dim / 2) + i)] = std::sin(a);
        }
    DevBuf dx(*g->dev, x), dw(*g->dev, wt), dy(*g->dev, nullptr, x.size() * 4), dr(*g->dev, x), dcs(*g->dev, cs);
    DevBuf dg(*g->dev, gate), du(*g->dev, up), dsum(*g->dev, x);
    run_after(*g, {&dx, &dw, &dr, &dcs, &dg, &du, &dsum}, [&](CmdStream& s) {
        op_rmsnorm(s, dx.b(), dw.b(), dy.b(), n_tok, dim, 1e-5f);
        op_rope(s, dr.b(), dcs.b(), n_tok, n_heads, head_dim, dim);
        op_silu_mul(s, dg.b(), du.b(), dg.b(), n_tok * dim);
        op_add(s, du.b(), dsum.b(), n_tok * dim);
    });
    std::vector<float> want(x.size());
    ref::rmsnorm(x.data(), wt.data(), 1e-5f, n_tok, dim, want.data());
    auto got = dy.read();
    for (size_t i = 0; i < want.size(); i++) CHECK_NEAR(got[i], want[i], 1e-5 * (std::fabs(want[i]) + 1e-3));
    want = x;
    for (int64_t t = 0; t < n_tok; t++) ref::rope(want.data() + t * dim, n_heads, head_dim, pos0 + t, inv.data());
    got = dr.read();
    for (size_t i = 0; i < want.size(); i++) CHECK_NEAR(got[i], want[i], 0x1p-20 * 2);
    ref::silu_mul(gate.data(), up.data(), want.data(), n_tok * dim);
    got = dg.read();
    for (size_t i = 0; i < want.size(); i++) CHECK_NEAR(got[i], want[i], 1e-5 * (std::fabs(want[i]) + 1e-6));
    got = dsum.read();
    for (size_t i = 0; i < x.size(); i++) CHECK(got[i] == x[i] + up[i]);
    // A dependent chain in one command buffer (read after write, write after read): its
    // barriers are what synchronization validation checks here.
    DevBuf c(*g->dev, x);
    run_after(*g, {&c}, [&](CmdStream& s) {
        op_add(s, dw.b(), g->dev->bind(c.p, static_cast<uint64_t>(dim) * 4), dim);  // c[0:dim] += wt
        op_rmsnorm(s, c.b(), dw.b(), c.b(), n_tok, dim, 1e-5f);
        op_add(s, c.b(), dy.b(), n_tok * dim);
    });
    got = c.read();
    std::vector<float> chain = x;
    for (int64_t i = 0; i < dim; i++) chain[static_cast<size_t>(i)] += wt[static_cast<size_t>(i)];
    ref::rmsnorm(chain.data(), wt.data(), 1e-5f, n_tok, dim, chain.data());
    for (size_t i = 0; i < chain.size(); i++) CHECK_NEAR(got[i], chain[i], 1e-5 * (std::fabs(chain[i]) + 1e-3));
    check_no_validation_messages(before);
}

// Gemma 3's element-wise ops against the double-precision references: GeGLU within 1e-6 of
// |gate * up| (1 + tanh cancels for negative gates, in f32 as on the CPU) + 2e-6 relative;
// soft-capping within 2e-6 of the cap; the scale exactly.
TEST(vulkan_gelu_tanh_mul_softcap_and_scale_match_reference) {
    Gpu* g = gpu();
    if (!g) return;
    const uint64_t before = validation_message_count();
    Rng rng(17);
    const int64_t n = 1000;
    const auto gate = random_vec(rng, n, -8.0f, 8.0f), up = random_vec(rng, n);
    const auto logits = random_vec(rng, n, -80.0f, 80.0f);
    DevBuf dg(*g->dev, gate), du(*g->dev, up), dl(*g->dev, logits), ds(*g->dev, up);
    run_after(*g, {&dg, &du, &dl, &ds}, [&](CmdStream& s) {
        op_gelu_tanh_mul(s, dg.b(), du.b(), dg.b(), n);
        op_softcap(s, dl.b(), n, 30.0f);
        op_scale(s, ds.b(), n, 8.0f);
    });
    std::vector<float> want(static_cast<size_t>(n));
    ref::gelu_tanh_mul(gate.data(), up.data(), want.data(), n);
    auto got = dg.read();
    for (size_t i = 0; i < want.size(); i++)
        CHECK_NEAR(got[i], want[i], 1e-6 * std::fabs(gate[i] * up[i]) + 2e-6 * std::fabs(want[i]));
    want = logits;
    ref::softcap(want.data(), n, 30.0f);
    got = dl.read();
    for (size_t i = 0; i < want.size(); i++) CHECK_NEAR(got[i], want[i], 2e-6 * 30.0);
    got = ds.read();
    for (size_t i = 0; i < up.size(); i++) CHECK(got[i] == up[i] * 8.0f);
    check_no_validation_messages(before);
}

// Paged attention: scattered blocks, GQA, a decode token and a prefill chunk in one call; full
// and sliding windows (1 key; 40 keys, which starts inside a block); f32 pages and f16 pages
// (two halves a word), the latter against the reference over the pages' widened values.
TEST(vulkan_paged_attention_matches_reference_for_decode_prefill_and_sliding_windows) {
    Gpu* g = gpu();
    if (!g) return;
    const uint64_t before = validation_message_count();
    Rng rng(9);
    for (const int n_win : {1, 3})  // the blocks in 1 or 3 KV bindings (block b in binding b % n_win)
    for (const bool f16 : {false, true}) for (const int window : {0, 1, 40}) for (const int n_kv_heads : {1, 2}) {
        const int n_heads = 4, head_dim = 40, bt = 16, n_layer = 2, layer = 1;
        const int kv_dim = n_kv_heads * head_dim;
        const int64_t block_floats = static_cast<int64_t>(n_layer) * 2 * bt * kv_dim;  // elements
        const int n_blocks = 24;
        auto pool = random_vec(rng, block_floats * n_blocks);  // every block of every layer
        std::vector<uint16_t> pool16;
        if (f16) {  // the device holds halves; the reference reads their exact widening
            for (float& x : pool) {
                pool16.push_back(f32_to_f16(x));
                x = f16_to_f32(pool16.back());
            }
        }
        // Item A: decode at position 150 (10 blocks); item B: prefill chunk positions 70..99 (7 blocks).
        struct Item {
            int64_t pos0, n_q;
            std::vector<int32_t> table;
        };
        std::vector<Item> items = {{150, 1, {}}, {70, 30, {}}};
        std::vector<int32_t> ids(n_blocks);
        for (int i = 0; i < n_blocks; i++) ids[static_cast<size_t>(i)] = (i * 7) % n_blocks;  // scattered
        items[0].table.assign(ids.begin(), ids.begin() + 10);
        items[1].table.assign(ids.begin() + 10, ids.begin() + 17);
        int64_t n_tok = 0;
        for (auto& it : items) n_tok += it.n_q;
        const auto q = random_vec(rng, n_tok * n_heads * head_dim);
        std::vector<uint32_t> tok, tables;
        for (auto& it : items) {
            const uint32_t start = static_cast<uint32_t>(tables.size());
            for (int32_t b : it.table)
                tables.push_back(static_cast<uint32_t>(b % n_win) << kKvEntryOffsetBits |
                                 static_cast<uint32_t>(b / n_win * block_floats));
            for (int64_t i = 0; i < it.n_q; i++) {
                tok.push_back(start);
                tok.push_back(static_cast<uint32_t>(it.pos0 + i + 1));
            }
        }
        DevBuf dq(*g->dev, q), dtok(*g->dev, tok.data(), tok.size() * 4),
            dtab(*g->dev, tables.data(), tables.size() * 4), dout(*g->dev, nullptr, q.size() * 4);
        const size_t el = f16 ? 2 : 4;
        std::vector<std::vector<uint8_t>> win(static_cast<size_t>(n_win));
        for (int b = 0; b < n_blocks; b++) {
            auto& w = win[static_cast<size_t>(b % n_win)];
            const uint8_t* src = f16 ? reinterpret_cast<const uint8_t*>(pool16.data()) + b * block_floats * 2
                                     : reinterpret_cast<const uint8_t*>(pool.data()) + b * block_floats * 4;
            w.insert(w.end(), src, src + block_floats * static_cast<int64_t>(el));
        }
        std::vector<std::unique_ptr<DevBuf>> dwin;
        KvBindings kvb;
        std::vector<const DevBuf*> srcs = {&dq, &dtok, &dtab};
        for (auto& w : win) {
            dwin.push_back(std::make_unique<DevBuf>(*g->dev, w.data(), w.size()));
            kvb.b[kvb.n++] = dwin.back()->b();
            srcs.push_back(dwin.back().get());
        }
        const KvGeom geom{n_heads, n_kv_heads, head_dim, bt, static_cast<uint32_t>(layer * 2 * bt * kv_dim),
                          static_cast<uint32_t>(bt * kv_dim), static_cast<uint32_t>(window), f16};
        const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
        run_after(*g, srcs, [&](CmdStream& s) {
            op_attention(s, dq.b(), kvb, dtok.b(), dtab.b(), dout.b(), n_tok, geom, scale);
        });
        const auto got = dout.read();
        std::vector<float> want(q.size()), scratch(200);
        int64_t t = 0;
        for (auto& it : items) {
            std::vector<const float*> kb, vb;
            for (int32_t b : it.table) {
                kb.push_back(pool.data() + b * block_floats + layer * 2 * bt * kv_dim);
                vb.push_back(kb.back() + bt * kv_dim);
            }
            ref::attention(q.data() + t * n_heads * head_dim, it.n_q, it.pos0, kb.data(), vb.data(), bt, n_heads,
                           n_kv_heads, head_dim, scale, want.data() + t * n_heads * head_dim, scratch.data(), window);
            t += it.n_q;
        }
        double worst = 0;
        for (size_t i = 0; i < want.size(); i++) worst = std::max(worst, static_cast<double>(std::fabs(got[i] - want[i])));
        CHECK(worst <= 2e-5);
    }
    check_no_validation_messages(before);
}

// f16 pages: each element is the CPU's f32_to_f16(clamp(x, +-65504)) bit for bit — ties to even,
// f16 subnormals, saturation, signed zero — two to a word, and nothing else written.
TEST(vulkan_kv_store_writes_f16_rows_rounded_as_the_cpu_does) {
    Gpu* g = gpu();
    if (!g) return;
    const uint64_t before = validation_message_count();
    Rng rng(14);
    const int bt = 4, kv_dim = 16, n_layer = 2, layer = 1, n_tok = 3;
    const int64_t block_elems = static_cast<int64_t>(n_layer) * 2 * bt * kv_dim;
    std::vector<uint16_t> pool(static_cast<size_t>(block_elems * 2), 0);
    auto k = random_vec(rng, n_tok * kv_dim), v = random_vec(rng, n_tok * kv_dim, -70000.0f, 70000.0f);
    const float special[] = {0.0f,     -0.0f,   1.0f + 0x1p-11f, 1.0f + 3 * 0x1p-11f, 65504.0f, 65519.0f, 65520.0f,
                             -1e9f,    1e-6f,   -3e-5f,          0x1p-25f,            0x1p-24f, 1.5f * 0x1p-24f,
                             0x1p-14f, 5.96e-8f, 1e-30f};
    for (size_t i = 0; i < std::size(special); i++) k[i] = special[i];
    // Tokens at positions 1..3 of a sequence whose table is {1, 0}: position 5 is in block 0. Block 0
    // lies in a second KV binding (the first block of its own buffer), block 1 in the first.
    std::vector<uint32_t> dst;
    std::vector<int64_t> flat;  // where each row lands in `pool` order (block 0, then block 1)
    for (int i = 0; i < n_tok; i++) {
        const int pos = 1 + i + (i == 2 ? 2 : 0);  // 1, 2, 5
        dst.push_back(static_cast<uint32_t>(pos / bt == 0 ? block_elems : 1u << kKvEntryOffsetBits) +
                      static_cast<uint32_t>((pos % bt) * kv_dim));
        flat.push_back((pos / bt == 0 ? block_elems : 0) + (pos % bt) * kv_dim);
    }
    DevBuf dk(*g->dev, k), dv(*g->dev, v), dp(*g->dev, pool.data(), pool.size() * 2),
        dp1(*g->dev, pool.data(), pool.size() * 2), dd(*g->dev, dst.data(), dst.size() * 4);
    KvGeom geom{2, 1, kv_dim, bt, static_cast<uint32_t>(layer * 2 * bt * kv_dim), static_cast<uint32_t>(bt * kv_dim)};
    geom.f16 = true;
    KvBindings kvb(dp.b());
    kvb.b[kvb.n++] = dp1.b();
    run_after(*g, {&dk, &dv, &dp, &dp1, &dd}, [&](CmdStream& s) { op_kv_store(s, dk.b(), dv.b(), kvb, dd.b(), n_tok, geom); });
    std::vector<uint16_t> got(pool.size()), got1(pool.size());
    g->dev->copy_out(got.data(), dp.p, got.size() * 2);
    g->dev->copy_out(got1.data(), dp1.p, got1.size() * 2);
    for (size_t i = 0; i < static_cast<size_t>(block_elems); i++) got[i] = got1[i];  // block 0 of binding 1
    std::vector<uint16_t> want = pool;
    for (int i = 0; i < n_tok; i++) {
        const int64_t o = flat[static_cast<size_t>(i)] + geom.layer_off;
        for (int e = 0; e < kv_dim; e++) {
            const size_t x = static_cast<size_t>(i * kv_dim + e);
            want[static_cast<size_t>(o + e)] = f32_to_f16(std::clamp(k[x], -65504.0f, 65504.0f));
            want[static_cast<size_t>(o + geom.v_off + e)] = f32_to_f16(std::clamp(v[x], -65504.0f, 65504.0f));
        }
    }
    CHECK(got == want);
    check_no_validation_messages(before);
}

TEST(vulkan_kv_store_writes_rows_into_their_blocks) {
    Gpu* g = gpu();
    if (!g) return;
    const uint64_t before = validation_message_count();
    Rng rng(13);
    const int bt = 4, kv_dim = 8, n_layer = 3, layer = 2, n_tok = 5;
    const int64_t block_floats = static_cast<int64_t>(n_layer) * 2 * bt * kv_dim;
    std::vector<float> pool(static_cast<size_t>(block_floats * 3), 0.0f);
    const auto k = random_vec(rng, n_tok * kv_dim), v = random_vec(rng, n_tok * kv_dim);
    // Tokens at positions 2..6 of a sequence whose table is {2, 0}.
    std::vector<uint32_t> dst;
    const int32_t table[2] = {2, 0};
    for (int i = 0; i < n_tok; i++) {
        const int pos = 2 + i;
        dst.push_back(static_cast<uint32_t>(table[pos / bt] * block_floats + (pos % bt) * kv_dim));
    }
    DevBuf dk(*g->dev, k), dv(*g->dev, v), dp(*g->dev, pool), dd(*g->dev, dst.data(), dst.size() * 4);
    const KvGeom geom{2, 1, kv_dim, bt, static_cast<uint32_t>(layer * 2 * bt * kv_dim), static_cast<uint32_t>(bt * kv_dim)};
    run_after(*g, {&dk, &dv, &dp, &dd}, [&](CmdStream& s) { op_kv_store(s, dk.b(), dv.b(), dp.b(), dd.b(), n_tok, geom); });
    const auto got = dp.read();
    for (int i = 0; i < n_tok; i++) {
        const int64_t o = dst[static_cast<size_t>(i)] + geom.layer_off;
        for (int e = 0; e < kv_dim; e++) {
            CHECK(got[static_cast<size_t>(o + e)] == k[static_cast<size_t>(i * kv_dim + e)]);
            CHECK(got[static_cast<size_t>(o + geom.v_off + e)] == v[static_cast<size_t>(i * kv_dim + e)]);
        }
    }
    double total = 0;
    for (float f : got) total += std::fabs(f);
    double expect = 0;
    for (float f : k) expect += std::fabs(f);
    for (float f : v) expect += std::fabs(f);
    CHECK_NEAR(total, expect, 1e-3);  // nothing else written
    check_no_validation_messages(before);
}

// Device memory: bookings through the ledger, budget capped by the heap, addresses that are
// not host memory, allocations that never straddle a block, copies larger than the ring.
TEST(vulkan_device_memory_is_booked_in_blocks_and_copies_round_trip) {
    Gpu* g = gpu();
    if (!g) return;
    const uint64_t before = validation_message_count();
    auto dev = std::make_unique<VulkanDevice>(g->ctx, 3ull << 20, 1ull << 20, 256 << 10);
    VulkanDevice& d = *dev;
    CHECK(d.n_blocks() == 3);
    CHECK(d.capacity_bytes() == std::min<uint64_t>(3ull << 20, g->ctx->info().device_local_heap_bytes));
    Ledger ledger(std::move(dev), 1.0);
    DeviceBuffer a = ledger.alloc("m", BookKind::Weights, 700 << 10);
    DeviceBuffer b = ledger.alloc("m", BookKind::Weights, 700 << 10);  // does not fit after a in block 0
    CHECK(a && b);
    CHECK(d.locate(a.ptr).buf != d.locate(b.ptr).buf);
    CHECK(d.locate(a.ptr).block_left >= a.n_bytes && d.locate(b.ptr).block_left >= b.n_bytes);
    DeviceBuffer too_big = ledger.alloc("m", BookKind::Weights, (1 << 20) + 1);  // larger than any block
    CHECK(!too_big);
    CHECK(ledger.snapshot().used_bytes == 1400u << 10);
    Rng rng(1);
    std::vector<uint8_t> host(700 << 10);
    for (auto& c : host) c = static_cast<uint8_t>(rng.next());
    const CopyRegion r{b.ptr, host.data(), host.size()};
    d.copy_wait(d.copy_in(&r, 1, ComputeFence{}));  // 700 KiB through a 256 KiB ring
    std::vector<uint8_t> back(host.size());
    d.copy_out(back.data(), b.ptr, back.size());
    CHECK(back == host);
    CHECK(d.bytes_copied() == host.size());
    ledger.free(a);
    ledger.free(b);
    CHECK(ledger.snapshot().used_bytes == 0);
    check_no_validation_messages(before);
}

// Streaming through two slots: copy layer i into slot i % 2 while the compute of layer i - 1
// reads the other; each compute waits for its own copy, each copy for the compute that last
// read its slot. Results equal computing every layer from resident weights.
TEST(vulkan_streamed_slots_wait_only_for_their_own_copy_and_reader) {
    Gpu* g = gpu();
    if (!g) return;
    const uint64_t before = validation_message_count();
    Rng rng(21);
    const int n_layers = 6;
    const int64_t n = 48;
    std::vector<std::vector<uint8_t>> ws;
    for (int l = 0; l < n_layers; l++) ws.push_back(random_weights(rng, DType::Q8_0, n, n + 16));
    const auto x = random_vec(rng, n + 16);
    DevBuf dx(*g->dev, x);
    DevBuf slot0(*g->dev, nullptr, ws[0].size()), slot1(*g->dev, nullptr, ws[0].size());
    DevBuf out(*g->dev, nullptr, static_cast<uint64_t>(n * n_layers) * 4);
    void* slots[2] = {slot0.p, slot1.p};
    ComputeFence last_read[2] = {};
    uint64_t last = 0;
    for (int l = 0; l < n_layers; l++) {
        void* s = slots[l % 2];
        const CopyRegion r{s, ws[static_cast<size_t>(l)].data(), ws[0].size()};
        const CopyFence ready = g->dev->copy_in(&r, 1, last_read[l % 2]);  // after the slot's last reader
        g->comp->begin();
        op_matmul(*g->comp, *g->dev, s, DType::Q8_0, n, n + 16, dx.b(),
                  g->dev->bind(static_cast<uint8_t*>(out.p) + l * n * 4, static_cast<uint64_t>(n) * 4), nullptr, 1);
        last = g->comp->submit({{g->dev->xfer_timeline(), ready.value}, {g->dev->xfer_timeline(), dx.ready.value}});
        last_read[l % 2] = ComputeFence{last};
    }
    g->comp->wait(last);
    const auto got = out.read();
    for (int l = 0; l < n_layers; l++) {
        std::vector<float> want(static_cast<size_t>(n));
        ref::matmul(WeightView{ws[static_cast<size_t>(l)].data(), DType::Q8_0, n, n + 16}, x.data(), 1, want.data(), nullptr);
        for (int64_t o = 0; o < n; o++) CHECK_NEAR(got[static_cast<size_t>(l * n + o)], want[static_cast<size_t>(o)], 1e-4);
    }
    check_no_validation_messages(before);
}

// The whole forward pass (test_backend.cpp's tiny model, resident and streamed through 2 slots
// with the copy thread) on the Vulkan backend, against the naive scalar model: f32 throughout,
// so only accumulation order differs (the shaders' fixed trees vs double): 1e-5 relative.
TEST(vulkan_forward_matches_the_naive_model_resident_and_streamed) {
    Gpu* g = gpu();
    if (!g) return;
    const uint64_t before = validation_message_count();
    lmx_test::check_forward_against_naive([&] { return std::make_unique<VulkanDevice>(g->ctx, 16 << 20, 0, 1 << 20); },
                                          1e-5);
    check_no_validation_messages(before);
}

// A failed copy runs on the copy thread and cannot throw: it faults the device, later copies
// are no-ops, and every step from then on throws DeviceLostError naming the first failure.
TEST(vulkan_a_failed_copy_faults_the_device_and_every_later_step_throws) {
    Gpu* g = gpu();
    if (!g) return;
    const uint64_t before = validation_message_count();
    VulkanDevice d(g->ctx, 1 << 20, 0, 64 << 10);
    CHECK(d.fault().empty());
    d.inject_fault("VK_ERROR_DEVICE_LOST (injected)");
    void* p = d.alloc(4096);
    std::vector<uint8_t> host(4096, 7);
    const CopyRegion r{p, host.data(), host.size()};
    CHECK(d.copy_in(&r, 1, ComputeFence{}).value == 0);  // no throw on the copy thread
    StepDesc step;
    CHECK_THROWS(d.backend().begin_step(step), DeviceLostError, "VK_ERROR_DEVICE_LOST (injected)");
    d.free(p);
    check_no_validation_messages(before);
}

// Blocks are allocated when first used; one the driver refuses (injected: LMX_VK_FAIL_ALLOC_AFTER)
// is "no space" with a note naming the bytes, and the device goes on: the held blocks serve, and
// the same allocation succeeds once memory is there again.
TEST(vulkan_a_refused_block_is_no_space_with_a_note_and_the_device_goes_on) {
    Gpu* g = gpu();
    if (!g) return;
    const uint64_t before = validation_message_count();
    VulkanDevice d(g->ctx, 4 << 20, 1 << 20, 64 << 10);
    CHECK(d.n_blocks() == 4 && d.n_blocks_allocated() == 1);  // block 0 (where KV starts) at once
    setenv("LMX_VK_FAIL_ALLOC_AFTER", "1", 1);
    CHECK(d.alloc(512 << 10, Placement::High) == nullptr);  // the top block: refused
    const std::string note = d.take_alloc_failure();
    CHECK(note.find("VK_ERROR_OUT_OF_DEVICE_MEMORY") != std::string::npos);
    CHECK(note.find("1 MiB block (1048576 bytes)") != std::string::npos && note.find("holds 1 MiB in 1 blocks") != std::string::npos);
    CHECK(d.take_alloc_failure().empty());  // once
    void* low = d.alloc(512 << 10, Placement::Low);  // block 0 is held: still fine
    CHECK(low != nullptr);
    unsetenv("LMX_VK_FAIL_ALLOC_AFTER");
    void* high = d.alloc(512 << 10, Placement::High);
    CHECK(high != nullptr && d.n_blocks_allocated() == 2);
    std::vector<uint8_t> host(512 << 10, 3), back(host.size());
    const CopyRegion r{high, host.data(), host.size()};
    d.copy_wait(d.copy_in(&r, 1, ComputeFence{}));
    d.copy_out(back.data(), high, back.size());
    CHECK(back == host);
    d.free(low);
    d.free(high);
    check_no_validation_messages(before);
}

// A lost device (injected: the first queue submission fails with VK_ERROR_DEVICE_LOST, and every
// one after it): a copy faults the device without throwing, and every step throws a DeviceFaultError.
TEST(vulkan_a_lost_device_fails_every_submission_and_step) {
    Gpu* g = gpu();
    if (!g) return;
    const uint64_t before = validation_message_count();
    Options o = Options::from_env(0);
    o.lose_device_after = 0;
    auto ctx = std::make_shared<Context>(o);
    {
        VulkanDevice d(ctx, 1 << 20, 0, 64 << 10);
        void* p = d.alloc(4096);
        std::vector<uint8_t> host(4096, 7);
        const CopyRegion r{p, host.data(), host.size()};
        CHECK(d.copy_in(&r, 1, ComputeFence{}).value == 0);  // no throw on the copy thread
        CHECK(ctx->lost() && d.fault().find("VK_ERROR_DEVICE_LOST") != std::string::npos);
        StepDesc step;
        CHECK_THROWS(d.backend().begin_step(step), DeviceFaultError, "VK_ERROR_DEVICE_LOST");
        CmdStream& s = d.compute();
        s.begin();
        CHECK_THROWS(s.submit({}), DeviceLostError, "vkQueueSubmit");
        d.free(p);
    }
    check_no_validation_messages(before);
}

TEST(vulkan_asking_for_a_missing_device_index_names_what_was_found) {
    Gpu* g = gpu();
    if (!g) return;
    Options o = Options::from_env(7);
    CHECK_THROWS(Context{o}, Error, "found 0: ");
}

#endif
