// test_kernels.cpp — every fast kernel against its scalar reference, plus the invariance contracts.
// Owner: kernels. Thread-safety: tests run one at a time; they create their own pools.
//
// Tolerances. The fast matmul reads exactly the weights the reference reads (f16, bf16
// and q8_0 widen to f32 without error), so the only difference is f32 accumulation
// against the reference's double: each lane sums n_in/16 products, then a 4-level tree,
// so |fast - ref| <= (n_in/16 + 5) * 2^-24 * sum_i |x_i w_i| (a rigorous bound, used
// with a factor 2 of slack) — the same bound for every weight format. The format's own
// precision is tested on convert_rows: f16 2^-11 relative, bf16 2^-8 relative, q8_0
// 0.563 * d absolute per element (d/2 rounding plus f16 rounding of d), q4_0 |d|/2
// (|d| at the clamped top nibble) plus f16 rounding of d. The fast q8_0 / q4_0 path
// (int8 activations) is bitwise its reference; its tolerance is stated above its tests.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "kernels/kernels.h"
#include "kernels/kernels_impl.h"
#include "membw.h"
#include "threadpool.h"
#include "test_rand.h"

using namespace lmx;
using lmx_test::Rng;
using lmx_test::random_vec;
using lmx_test::tables;
using lmx_test::same_bits;

namespace {

const DType kDTypes[] = {DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0};

// A random [n_out, n_in] weight matrix stored in `dtype`.
std::vector<uint8_t> random_weights(Rng& rng, DType dtype, int64_t n_out, int64_t n_in) {
    const std::vector<float> f = random_vec(rng, n_out * n_in);
    std::vector<uint8_t> w(static_cast<size_t>(row_bytes(dtype, n_in) * n_out));
    convert_rows(f.data(), DType::F32, w.data(), dtype, n_out, n_in);
    return w;
}

// Checks y (from any matmul) against ref::matmul with the accumulation bound above.
void check_matmul_close(const WeightView& w, const std::vector<float>& x, int64_t n_tok, const float* bias,
                        const std::vector<float>& y, const char* what) {
    std::vector<float> want(static_cast<size_t>(n_tok * w.n_out));
    ref::matmul(w, x.data(), n_tok, want.data(), bias);
    std::vector<float> row(static_cast<size_t>(w.n_in));
    int bad = 0;
    for (int64_t o = 0; o < w.n_out; ++o) {
        dequantize_row(w, o, row.data());
        for (int64_t t = 0; t < n_tok; ++t) {
            double abs_sum = bias ? std::fabs(bias[o]) : 0.0;
            for (int64_t i = 0; i < w.n_in; ++i) abs_sum += std::fabs(static_cast<double>(x[t * w.n_in + i]) * row[i]);
            const double tol = 2.0 * (static_cast<double>(w.n_in) / 16 + 5) * 0x1p-24 * abs_sum + 1e-30;
            const double got = y[t * w.n_out + o], exp = want[t * w.n_out + o];
            if (!(std::fabs(got - exp) <= tol) && bad++ < 3)
                std::fprintf(stderr, "  %s %s [%lld x %lld] n_tok=%lld (t=%lld, o=%lld): %.9g vs ref %.9g (tol %.3g)\n",
                             what, dtype_name(w.dtype), static_cast<long long>(w.n_out),
                             static_cast<long long>(w.n_in), static_cast<long long>(n_tok), static_cast<long long>(t),
                             static_cast<long long>(o), got, exp, tol);
        }
    }
    CHECK(bad == 0);
}

struct Shape {
    int64_t n_out, n_in;
};
// Ragged on purpose: n_in below, at and past multiples of 16 / 32 / 64, n_out odd.
const Shape kShapesAny[] = {{1, 5}, {7, 16}, {3, 17}, {17, 33}, {9, 100}, {33, 64}, {65, 250}, {40, 960}};
const Shape kShapesQ8[] = {{1, 32}, {7, 32}, {17, 96}, {33, 64}, {13, 288}, {40, 960}, {5, 1056}};
const int64_t kTokCounts[] = {1, 3, 4, 5, 17};

template <class Fn>
void for_each_case(Fn fn) {
    for (DType dt : kDTypes) {
        if (dtype_is_blocked(dt))
            for (const Shape& s : kShapesQ8) fn(dt, s);
        else
            for (const Shape& s : kShapesAny) fn(dt, s);
    }
}

// Attention fixture: a paged cache of n_blocks blocks with random K/V.
struct Cache {
    int block_tokens, n_kv_heads, head_dim;
    std::vector<std::vector<float>> k, v;  // [n_blocks][block_tokens, n_kv_heads, head_dim]
    std::vector<const float*> kp, vp;
    Cache(Rng& rng, int n_blocks, int block_tokens_, int n_kv_heads_, int head_dim_)
        : block_tokens(block_tokens_), n_kv_heads(n_kv_heads_), head_dim(head_dim_) {
        for (int b = 0; b < n_blocks; ++b) {
            k.push_back(random_vec(rng, static_cast<int64_t>(block_tokens) * n_kv_heads * head_dim));
            v.push_back(random_vec(rng, static_cast<int64_t>(block_tokens) * n_kv_heads * head_dim));
        }
        for (int b = 0; b < n_blocks; ++b) {  // separate allocations, as a paged pool hands them out
            kp.push_back(k[static_cast<size_t>(b)].data());
            vp.push_back(v[static_cast<size_t>(b)].data());
        }
    }
};

std::vector<float> rope_inv_freq(int head_dim, float theta) {
    std::vector<float> f(static_cast<size_t>(head_dim / 2));
    for (int i = 0; i < head_dim / 2; ++i)
        f[static_cast<size_t>(i)] = 1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(head_dim));
    return f;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// thread pool

TEST(kernel_threadpool_runs_every_task_exactly_once_for_any_thread_count) {
    for (int n_threads : {1, 2, 3, 5}) {
        ThreadPool pool(n_threads);
        CHECK(pool.n_threads() == n_threads);
        for (int64_t n_tasks : {0, 1, 2, 7, 100, 4096}) {
            std::vector<std::atomic<int>> runs(static_cast<size_t>(n_tasks));
            std::atomic<int> bad_thread{0};
            pool.parallel_for(n_tasks, [&](int64_t task, int thread) {
                runs[static_cast<size_t>(task)].fetch_add(1);
                if (thread < 0 || thread >= n_threads) bad_thread.fetch_add(1);
            });
            for (auto& r : runs) CHECK(r.load() == 1);
            CHECK(bad_thread.load() == 0);
        }
    }
}

TEST(kernel_threadpool_survives_many_back_to_back_jobs_and_idle_gaps) {
    ThreadPool pool(2);
    int64_t total = 0;
    std::atomic<int64_t> sum{0};
    for (int rep = 0; rep < 20000; ++rep) {
        pool.parallel_for(3, [&](int64_t task, int) { sum.fetch_add(task + 1); });
        total += 6;
    }
    CHECK(sum.load() == total);
    // After an idle gap longer than the spin window the workers sleep and must wake again.
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    pool.parallel_for(4, [&](int64_t task, int) { sum.fetch_add(task); });
    CHECK(sum.load() == total + 6);
}

TEST(kernel_threadpool_rethrows_a_callers_task_exception_after_the_workers_finish) {
    ThreadPool pool(2);
    std::atomic<int> ran{0};
    // Tasks take 200 us, so the caller certainly claims one of the 64 before the worker
    // could have run them all.
    CHECK_THROWS(pool.parallel_for(64,
                                   [&](int64_t, int thread) {
                                       ran.fetch_add(1);
                                       std::this_thread::sleep_for(std::chrono::microseconds(200));
                                       if (thread == 0) throw InvalidArgument("boom from the caller");
                                   }),
                 InvalidArgument, "boom");
    CHECK(ran.load() < 64);  // the throw stopped the hand-out
    // The pool is still usable.
    std::atomic<int> after{0};
    pool.parallel_for(10, [&](int64_t, int) { after.fetch_add(1); });
    CHECK(after.load() == 10);
}

// ---------------------------------------------------------------------------------------
// matmul

TEST(kernel_matmul_every_isa_matches_reference_for_every_dtype_and_ragged_shape) {
    Rng rng(1);
    for_each_case([&](DType dt, Shape s) {
        const std::vector<uint8_t> wb = random_weights(rng, dt, s.n_out, s.n_in);
        const WeightView w{wb.data(), dt, s.n_out, s.n_in};
        const std::vector<float> bias = random_vec(rng, s.n_out);
        for (int64_t n_tok : kTokCounts) {
            const std::vector<float> x = random_vec(rng, n_tok * s.n_in);
            for (const KernelTable* k : tables()) {
                for (const float* b : {static_cast<const float*>(nullptr), bias.data()}) {
                    std::vector<float> y(static_cast<size_t>(n_tok * s.n_out), NAN);
                    k->matmul_rows(w, x.data(), n_tok, y.data(), b, 0, s.n_out);
                    check_matmul_close(w, x, n_tok, b, y, k->name);
                }
            }
        }
    });
}

TEST(kernel_matmul_dispatched_over_pool_matches_reference_on_model_shapes) {
    Rng rng(2);
    ThreadPool pool(2);
    const Shape shapes[] = {{320, 960}, {960, 320}, {97, 2560}};
    for (DType dt : kDTypes)
        for (const Shape& s : shapes)
            for (int64_t n_tok : {1, 16, 70}) {
                const std::vector<uint8_t> wb = random_weights(rng, dt, s.n_out, s.n_in);
                const WeightView w{wb.data(), dt, s.n_out, s.n_in};
                const std::vector<float> x = random_vec(rng, n_tok * s.n_in);
                std::vector<float> y(static_cast<size_t>(n_tok * s.n_out));
                matmul(w, x.data(), n_tok, y.data(), nullptr, pool);
                check_matmul_close(w, x, n_tok, nullptr, y, kernels_isa());
            }
}

TEST(kernel_matmul_many_equals_one_matmul_per_output_bitwise) {
    // q, k, v in one hand-off: each output must be what matmul() alone gives, in either precision.
    Rng rng(22);
    ThreadPool pool(2);
    for (MatmulPrecision p : {MatmulPrecision::Exact, MatmulPrecision::Fast}) {
        for (DType dt : kDTypes)
            for (int64_t n_tok : {1, 3, 17}) {
                const int64_t n_in = 320, n_outs[3] = {320, 64, 97};
                std::vector<std::vector<uint8_t>> wb;
                std::vector<std::vector<float>> bias, y_many, y_one;
                std::vector<MatmulOut> outs;
                for (int64_t n_out : n_outs) {
                    wb.push_back(random_weights(rng, dt, n_out, n_in));
                    bias.push_back(random_vec(rng, n_out));
                    y_many.emplace_back(static_cast<size_t>(n_tok * n_out), NAN);
                    y_one.emplace_back(static_cast<size_t>(n_tok * n_out), NAN);
                }
                for (size_t j = 0; j < 3; ++j)
                    outs.push_back({WeightView{wb[j].data(), dt, n_outs[j], n_in, p}, y_many[j].data(),
                                    j == 1 ? nullptr : bias[j].data()});
                const std::vector<float> x = random_vec(rng, n_tok * n_in);
                matmul_many(outs.data(), 3, x.data(), n_tok, pool);
                for (size_t j = 0; j < 3; ++j) {
                    matmul(outs[j].w, x.data(), n_tok, y_one[j].data(), outs[j].bias, pool);
                    CHECK(same_bits(y_many[j], y_one[j]));
                }
            }
    }
    std::vector<uint8_t> a(64 * 4), b(64 * 4);
    std::vector<float> x(64), y(4);
    const MatmulOut mixed[2] = {{WeightView{a.data(), DType::F32, 1, 64}, y.data(), nullptr},
                                {WeightView{b.data(), DType::F32, 2, 32}, y.data(), nullptr}};
    CHECK_THROWS(matmul_many(mixed, 2, x.data(), 1, pool), InvalidArgument, "same n_in");
}

TEST(kernel_matmul_is_batch_invariant_bitwise_per_token) {
    // The value for token t must not depend on the other tokens of the call: n_tok=7
    // (register tiles of 4+3 tokens) and n_tok=100 over n_in=1000 (several token tiles)
    // equal, bit for bit, one call per token.
    Rng rng(3);
    ThreadPool pool(2);
    for (const KernelTable* k : tables()) {
        for_each_case([&](DType dt, Shape s) {
            const std::vector<uint8_t> wb = random_weights(rng, dt, s.n_out, s.n_in);
            const WeightView w{wb.data(), dt, s.n_out, s.n_in};
            const std::vector<float> bias = random_vec(rng, s.n_out);
            const int64_t n_tok = 7;
            const std::vector<float> x = random_vec(rng, n_tok * s.n_in);
            std::vector<float> batched(static_cast<size_t>(n_tok * s.n_out)), single(batched.size());
            k->matmul_rows(w, x.data(), n_tok, batched.data(), bias.data(), 0, s.n_out);
            for (int64_t t = 0; t < n_tok; ++t)
                k->matmul_rows(w, x.data() + t * s.n_in, 1, single.data() + t * s.n_out, bias.data(), 0, s.n_out);
            CHECK(same_bits(batched, single));
        });
    }
    for (DType dt : kDTypes) {  // the dispatched entry point, across token tiles
        const int64_t n_out = 37, n_in = dtype_is_blocked(dt) ? 1024 : 1000, n_tok = 100;
        const std::vector<uint8_t> wb = random_weights(rng, dt, n_out, n_in);
        const WeightView w{wb.data(), dt, n_out, n_in};
        const std::vector<float> x = random_vec(rng, n_tok * n_in);
        std::vector<float> batched(static_cast<size_t>(n_tok * n_out)), single(batched.size());
        matmul(w, x.data(), n_tok, batched.data(), nullptr, pool);
        for (int64_t t = 0; t < n_tok; ++t) matmul(w, x.data() + t * n_in, 1, single.data() + t * n_out, nullptr, pool);
        CHECK(same_bits(batched, single));
    }
}

TEST(kernel_matmul_is_thread_count_invariant_bitwise) {
    Rng rng(4);
    ThreadPool p1(1), p2(2), p3(3);
    for (DType dt : kDTypes) {
        const int64_t n_out = 301, n_in = 320;
        const std::vector<uint8_t> wb = random_weights(rng, dt, n_out, n_in);
        const WeightView w{wb.data(), dt, n_out, n_in};
        const std::vector<float> bias = random_vec(rng, n_out);
        for (int64_t n_tok : {1, 5, 17}) {
            const std::vector<float> x = random_vec(rng, n_tok * n_in);
            std::vector<float> y1(static_cast<size_t>(n_tok * n_out)), y2(y1.size()), y3(y1.size());
            matmul(w, x.data(), n_tok, y1.data(), bias.data(), p1);
            matmul(w, x.data(), n_tok, y2.data(), bias.data(), p2);
            matmul(w, x.data(), n_tok, y3.data(), bias.data(), p3);
            CHECK(same_bits(y1, y2));
            CHECK(same_bits(y1, y3));
        }
    }
}

TEST(kernel_matmul_row_range_does_not_change_a_rows_value) {
    // Tasks are row ranges of any size; a row's result must be the same in each.
    Rng rng(5);
    for (const KernelTable* k : tables()) {
        const int64_t n_out = 29, n_in = 96, n_tok = 6;
        const std::vector<uint8_t> wb = random_weights(rng, DType::F16, n_out, n_in);
        const WeightView w{wb.data(), DType::F16, n_out, n_in};
        const std::vector<float> x = random_vec(rng, n_tok * n_in);
        std::vector<float> whole(static_cast<size_t>(n_tok * n_out)), pieces(whole.size());
        k->matmul_rows(w, x.data(), n_tok, whole.data(), nullptr, 0, n_out);
        for (int64_t r0 = 0; r0 < n_out; r0 += 3)
            k->matmul_rows(w, x.data(), n_tok, pieces.data(), nullptr, r0, r0 + 3 < n_out ? r0 + 3 : n_out);
        CHECK(same_bits(whole, pieces));
    }
}

TEST(kernel_matmul_q8_0_and_q4_0_equal_f32_matmul_on_their_dequantised_weights) {
    // q8_0 and q4_0 widen d * q exactly, so they must give the bits of the f32 path on those values.
    Rng rng(6);
    for (const KernelTable* k : tables()) {
        if (std::strcmp(k->name, "scalar") == 0) continue;
        for (DType dt : {DType::Q8_0, DType::Q4_0}) {
            const int64_t n_out = 19, n_in = 320, n_tok = 5;
            const std::vector<uint8_t> wb = random_weights(rng, dt, n_out, n_in);
            const WeightView wq{wb.data(), dt, n_out, n_in};
            std::vector<float> f32(static_cast<size_t>(n_out * n_in));
            for (int64_t o = 0; o < n_out; ++o) dequantize_row(wq, o, f32.data() + o * n_in);
            const WeightView wf{f32.data(), DType::F32, n_out, n_in};
            const std::vector<float> x = random_vec(rng, n_tok * n_in);
            std::vector<float> yq(static_cast<size_t>(n_tok * n_out)), yf(yq.size());
            k->matmul_rows(wq, x.data(), n_tok, yq.data(), nullptr, 0, n_out);
            k->matmul_rows(wf, x.data(), n_tok, yf.data(), nullptr, 0, n_out);
            CHECK(same_bits(yq, yf));
        }
    }
}

TEST(kernel_avx2_and_avx512_give_bitwise_identical_results) {
    const KernelTable* a2 = kernels_table_avx2();
    const KernelTable* a5 = kernels_table_avx512();
    if (!a2 || !a5) {
        std::fprintf(stderr, "  skipped: this CPU lacks AVX2 or AVX-512\n");
        return;
    }
    Rng rng(7);
    for_each_case([&](DType dt, Shape s) {
        const std::vector<uint8_t> wb = random_weights(rng, dt, s.n_out, s.n_in);
        const WeightView w{wb.data(), dt, s.n_out, s.n_in};
        const std::vector<float> bias = random_vec(rng, s.n_out);
        for (int64_t n_tok : kTokCounts) {
            const std::vector<float> x = random_vec(rng, n_tok * s.n_in);
            std::vector<float> y2(static_cast<size_t>(n_tok * s.n_out)), y5(y2.size());
            a2->matmul_rows(w, x.data(), n_tok, y2.data(), bias.data(), 0, s.n_out);
            a5->matmul_rows(w, x.data(), n_tok, y5.data(), bias.data(), 0, s.n_out);
            CHECK(same_bits(y2, y5));
        }
    });
    for (int64_t n : {1, 15, 16, 17, 1000}) {
        const std::vector<float> g = random_vec(rng, n, -30.0f, 30.0f), u = random_vec(rng, n);
        const std::vector<float> nw = random_vec(rng, n);
        std::vector<float> o2(static_cast<size_t>(n)), o5(o2.size());
        a2->silu_mul(g.data(), u.data(), o2.data(), n);
        a5->silu_mul(g.data(), u.data(), o5.data(), n);
        CHECK(same_bits(o2, o5));
        a2->gelu_tanh_mul(g.data(), u.data(), o2.data(), n);
        a5->gelu_tanh_mul(g.data(), u.data(), o5.data(), n);
        CHECK(same_bits(o2, o5));
        std::vector<float> s2 = g, s5 = g;
        a2->softmax(s2.data(), n);
        a5->softmax(s5.data(), n);
        CHECK(same_bits(s2, s5));
        a2->rmsnorm(g.data(), nw.data(), 1e-6f, 1, n, o2.data());
        a5->rmsnorm(g.data(), nw.data(), 1e-6f, 1, n, o5.data());
        CHECK(same_bits(o2, o5));
    }
    Cache c(rng, 4, 16, 2, 64);
    const int64_t n_q = 3, pos0 = 40;
    const std::vector<float> q = random_vec(rng, n_q * 6 * 64);
    std::vector<float> o2(q.size()), o5(q.size()), scratch(static_cast<size_t>(pos0 + n_q));
    a2->attention(q.data(), n_q, pos0, c.kp.data(), c.vp.data(), 16, 6, 2, 64, 0.125f, o2.data(), scratch.data(), 0, 2, 0);
    a5->attention(q.data(), n_q, pos0, c.kp.data(), c.vp.data(), 16, 6, 2, 64, 0.125f, o5.data(), scratch.data(), 0, 2, 0);
    CHECK(same_bits(o2, o5));
}

TEST(kernel_matmul_fast_bf16_equals_reference_on_bf16_rounded_activations) {
    // MatmulPrecision::Fast rounds activations to bf16 (nearest-even) and multiplies
    // exactly: against the reference fed the rounded activations, only the f32
    // accumulation bound applies; against the f32 activations, add 2^-8 sum|x w|.
    std::vector<const KernelTable*> fast;
    for (const KernelTable* k : tables())
        if (k->matmul_rows_bf16act) fast.push_back(k);
    if (fast.empty()) {
        std::fprintf(stderr, "  skipped: this CPU has no bf16 dot product\n");
        return;
    }
    Rng rng(16);
    for (const KernelTable* k : fast)
        for (const Shape& s : kShapesAny) {
            const std::vector<uint8_t> wb = random_weights(rng, DType::BF16, s.n_out, s.n_in);
            const WeightView w{wb.data(), DType::BF16, s.n_out, s.n_in};
            const std::vector<float> bias = random_vec(rng, s.n_out);
            for (int64_t n_tok : kTokCounts) {
                const std::vector<float> x = random_vec(rng, n_tok * s.n_in);
                std::vector<float> xr(x.size());
                for (size_t i = 0; i < x.size(); ++i) xr[i] = bf16_to_f32(f32_to_bf16(x[i]));
                std::vector<uint16_t> act(static_cast<size_t>(n_tok * bf16_act_stride(s.n_in)), 0xffff);
                k->act_to_bf16(x.data(), n_tok, s.n_in, act.data());
                for (int64_t t = 0; t < n_tok; ++t)
                    for (int64_t i = 0; i < bf16_act_stride(s.n_in); ++i) {
                        const uint16_t a = act[static_cast<size_t>(t * bf16_act_stride(s.n_in) + i)];
                        CHECK(a == (i < s.n_in ? f32_to_bf16(x[static_cast<size_t>(t * s.n_in + i)]) : 0));
                    }
                std::vector<float> y(static_cast<size_t>(n_tok * s.n_out), NAN);
                k->matmul_rows_bf16act(w, act.data(), n_tok, y.data(), bias.data(), 0, s.n_out);
                check_matmul_close(w, xr, n_tok, bias.data(), y, "fast-bf16");
                std::vector<float> want(y.size());
                ref::matmul(w, x.data(), n_tok, want.data(), bias.data());
                std::vector<float> row(static_cast<size_t>(s.n_in));
                for (int64_t o = 0; o < s.n_out; ++o) {
                    dequantize_row(w, o, row.data());
                    for (int64_t t = 0; t < n_tok; ++t) {
                        double abs_sum = std::fabs(bias[static_cast<size_t>(o)]);
                        for (int64_t i = 0; i < s.n_in; ++i) abs_sum += std::fabs(x[t * s.n_in + i] * row[i]);
                        CHECK_NEAR(y[t * s.n_out + o], want[t * s.n_out + o], (0x1p-8 + 1e-5) * abs_sum);
                    }
                }
            }
        }
}

TEST(kernel_matmul_fast_precision_keeps_batch_and_thread_invariance) {
    Rng rng(17);
    ThreadPool p1(1), p2(2);
    for (DType dt : kDTypes) {
        const int64_t n_out = 133, n_in = dtype_is_blocked(dt) ? 320 : 300, n_tok = 9;
        const std::vector<uint8_t> wb = random_weights(rng, dt, n_out, n_in);
        const WeightView w{wb.data(), dt, n_out, n_in, MatmulPrecision::Fast};
        const std::vector<float> x = random_vec(rng, n_tok * n_in);
        std::vector<float> batched(static_cast<size_t>(n_tok * n_out)), single(batched.size()), one_thread(batched.size());
        matmul(w, x.data(), n_tok, batched.data(), nullptr, p2);
        matmul(w, x.data(), n_tok, one_thread.data(), nullptr, p1);
        for (int64_t t = 0; t < n_tok; ++t) matmul(w, x.data() + t * n_in, 1, single.data() + t * n_out, nullptr, p2);
        CHECK(same_bits(batched, single));
        CHECK(same_bits(batched, one_thread));
    }
}

// ---- MatmulPrecision::Fast for q8_0 / q4_0: int8 activations ----
//
// ref::act_to_q8 / ref::matmul_rows_q8act define the result (reference.cpp): every ISA
// must reproduce them bit for bit (integer block dots are exact, and the f32 steps are
// the same operations in the same order). Against the exact matmul on the same weights
// the error is the activations' 8-bit rounding, |x - d q| <= d_x/2 per element, plus f32
// rounding: tol = sum_i |w_i| d_x(i)/2 + 2 (n_in/32 + 5) 2^-24 sum_i |w_i| (|x_i| + d_x(i)).

std::vector<const KernelTable*> q8act_tables() {
    std::vector<const KernelTable*> out;
    for (const KernelTable* k : tables())
        if (k->matmul_rows_q8act) out.push_back(k);
    // AVX-512 without VNNI (vpmaddubsw instead of vpdpbusd), which the CPU check would not pick here.
    if (kernels_table_avx512()) out.push_back(kernels_avx512_table_unchecked(false, false));
    return out;
}

float act_scale(const std::vector<uint8_t>& act, int64_t n_in, int64_t t, int64_t b) {
    float d;
    std::memcpy(&d, act.data() + t * q8_act_row_bytes(n_in) + n_in + 4 * b, 4);
    return d;
}

// How many outputs of an int8-activation matmul y lie outside the bound above, against
// exact (the f32 matmul of weights w); the first few are printed with `what`.
static int outside_int8_bound(const WeightView& w, const std::vector<float>& x, const std::vector<uint8_t>& act,
                       const std::vector<float>& bias, int64_t n_tok, const std::vector<float>& y,
                       const std::vector<float>& exact, const char* what) {
    std::vector<float> row(static_cast<size_t>(w.n_in));
    int bad = 0;
    for (int64_t o = 0; o < w.n_out; ++o) {
        dequantize_row(w, o, row.data());
        for (int64_t t = 0; t < n_tok; ++t) {
            double quant = 0.0, mag = std::fabs(bias[static_cast<size_t>(o)]);
            for (int64_t i = 0; i < w.n_in; ++i) {
                const double d = act_scale(act, w.n_in, t, i / 32);
                quant += std::fabs(row[i]) * d / 2;
                mag += std::fabs(row[i]) * (std::fabs(x[t * w.n_in + i]) + d);
            }
            const double tol = quant + 2.0 * (static_cast<double>(w.n_in) / 32 + 5) * 0x1p-24 * mag;
            const double err = std::fabs(y[t * w.n_out + o] - exact[t * w.n_out + o]);
            if (!(err <= tol) && bad++ < 3)
                std::fprintf(stderr, "  %s %s o=%lld t=%lld: |%.9g - %.9g| > %.3g\n", what, dtype_name(w.dtype),
                             static_cast<long long>(o), static_cast<long long>(t), y[t * w.n_out + o],
                             exact[t * w.n_out + o], tol);
        }
    }
    return bad;
}

TEST(kernel_act_to_q8_every_isa_equals_reference_bitwise) {
    Rng rng(18);
    for (const KernelTable* k : q8act_tables())
        for (int64_t n_in : {32, 64, 96, 960})
            for (int64_t n_tok : {1, 3, 17}) {
                std::vector<float> x = random_vec(rng, n_tok * n_in, -3.0f, 3.0f);
                for (int64_t i = 0; i < 32; ++i) x[static_cast<size_t>(i)] = 0.0f;  // an all-zero block: d = 0
                if (n_in >= 64) {  // a block with d = 1 exactly: x * id on halves, ties to even
                    const float halves[] = {127.0f, 2.5f, -2.5f, 0.5f, -0.5f, 1.5f, -1.5f, 126.5f, -127.0f};
                    for (size_t i = 0; i < sizeof halves / sizeof halves[0]; ++i) x[32 + i] = halves[i];
                }
                const int64_t n_bytes = n_tok * q8_act_row_bytes(n_in);
                std::vector<uint8_t> want(static_cast<size_t>(n_bytes), 0xab), got(want.size(), 0xcd);
                ref::act_to_q8(x.data(), n_tok, n_in, want.data());
                k->act_to_q8(x.data(), n_tok, n_in, got.data());
                CHECK(got == want);
                if (n_in >= 64) {
                    const int8_t want_halves[] = {127, 2, -2, 0, 0, 2, -2, 126, -127};
                    for (size_t i = 0; i < sizeof want_halves; ++i)
                        CHECK(static_cast<int8_t>(want[32 + i]) == want_halves[i]);
                    CHECK(act_scale(want, n_in, 0, 1) == 1.0f);
                }
                CHECK(act_scale(want, n_in, 0, 0) == 0.0f);
                // Every value within d/2 of its x, plus the rounding of x * (1/d): its relative
                // error 2^-23 on |x * id| <= 127 moves the cut by <= 1.6e-5 d.
                for (int64_t t = 0; t < n_tok; ++t)
                    for (int64_t i = 0; i < n_in; ++i) {
                        const float d = act_scale(want, n_in, t, i / 32);
                        const int8_t q = static_cast<int8_t>(want[static_cast<size_t>(t * q8_act_row_bytes(n_in) + i)]);
                        CHECK(q >= -127);
                        CHECK_NEAR(d * q, x[static_cast<size_t>(t * n_in + i)], d * (0.5 + 2e-5));
                    }
            }
}

TEST(kernel_matmul_fast_q8_0_q4_0_every_isa_equals_reference_bitwise) {
    Rng rng(19);
    std::vector<const KernelTable*> ks = q8act_tables();
    CHECK(!ks.empty());  // the scalar table at least
    for (DType dt : {DType::Q8_0, DType::Q4_0})
        for (const Shape& s : kShapesQ8) {
            const std::vector<uint8_t> wb = random_weights(rng, dt, s.n_out, s.n_in);
            const WeightView w{wb.data(), dt, s.n_out, s.n_in};
            const std::vector<float> bias = random_vec(rng, s.n_out);
            for (int64_t n_tok = 1; n_tok <= 17; ++n_tok) {
                const std::vector<float> x = random_vec(rng, n_tok * s.n_in);
                std::vector<uint8_t> act(static_cast<size_t>(n_tok * q8_act_row_bytes(s.n_in)));
                ref::act_to_q8(x.data(), n_tok, s.n_in, act.data());
                for (const float* b : {static_cast<const float*>(nullptr), bias.data()}) {
                    std::vector<float> want(static_cast<size_t>(n_tok * s.n_out), NAN);
                    ref::matmul_rows_q8act(w, act.data(), n_tok, want.data(), b, 0, s.n_out);
                    for (const KernelTable* k : ks) {
                        std::vector<float> got(want.size(), NAN);
                        k->matmul_rows_q8act(w, act.data(), n_tok, got.data(), b, 0, s.n_out);
                        if (!same_bits(got, want))
                            std::fprintf(stderr, "  %s %s [%lld x %lld] n_tok=%lld differs from the reference\n",
                                         k->name, dtype_name(dt), static_cast<long long>(s.n_out),
                                         static_cast<long long>(s.n_in), static_cast<long long>(n_tok));
                        CHECK(same_bits(got, want));
                    }
                }
            }
        }
}

TEST(kernel_matmul_fast_q8_0_q4_0_is_within_activation_rounding_of_exact) {
    Rng rng(20);
    ThreadPool pool(2);
    const Shape shapes[] = {{7, 32}, {33, 96}, {320, 960}, {97, 2560}};
    for (DType dt : {DType::Q8_0, DType::Q4_0})
        for (const Shape& s : shapes)
            for (int64_t n_tok : {1, 5, 17}) {
                const std::vector<uint8_t> wb = random_weights(rng, dt, s.n_out, s.n_in);
                const WeightView w{wb.data(), dt, s.n_out, s.n_in, MatmulPrecision::Fast};
                const std::vector<float> bias = random_vec(rng, s.n_out);
                const std::vector<float> x = random_vec(rng, n_tok * s.n_in);
                std::vector<float> y(static_cast<size_t>(n_tok * s.n_out), NAN), exact(y.size());
                matmul(w, x.data(), n_tok, y.data(), bias.data(), pool);  // the dispatched fast path
                ref::matmul(w, x.data(), n_tok, exact.data(), bias.data());
                std::vector<uint8_t> act(static_cast<size_t>(n_tok * q8_act_row_bytes(s.n_in)));
                ref::act_to_q8(x.data(), n_tok, s.n_in, act.data());
                std::vector<float> defined(y.size());
                ref::matmul_rows_q8act(w, act.data(), n_tok, defined.data(), bias.data(), 0, s.n_out);
                CHECK(same_bits(y, defined));
                CHECK(outside_int8_bound(w, x, act, bias, n_tok, y, exact, "fast") == 0);
            }
}

// ---- the x16 formats: q8_0 / q4_0 repacked in 16-row groups for integer dots ----

// A random q8_0 / q4_0 matrix (src) and its x16 repacking.
struct X16Case {
    std::vector<uint8_t> src, packed;
    WeightView plain, x16;
    X16Case(Rng& rng, DType dt, int64_t n_out, int64_t n_in) {
        src = random_weights(rng, dt, n_out, n_in);
        packed.assign(src.size(), 0xee);
        repack_x16(src.data(), dt, packed.data(), n_out, n_in);
        plain = WeightView{src.data(), dt, n_out, n_in};
        x16 = WeightView{packed.data(), dt == DType::Q8_0 ? DType::Q8_0X16 : DType::Q4_0X16, n_out, n_in};
    }
};
const Shape kShapesX16[] = {{16, 32}, {32, 96}, {48, 64}, {16, 1056}, {80, 960}};

TEST(kernel_repack_x16_keeps_every_value_and_rejects_ragged_groups) {
    Rng rng(21);
    for (DType dt : {DType::Q8_0, DType::Q4_0})
        for (const Shape& s : kShapesX16) {
            const X16Case c(rng, dt, s.n_out, s.n_in);
            std::vector<float> a(static_cast<size_t>(s.n_in)), b(a.size());
            for (int64_t o = 0; o < s.n_out; ++o) {
                dequantize_row(c.plain, o, a.data());
                dequantize_row(c.x16, o, b.data());
                CHECK(same_bits(a, b));
            }
        }
    std::vector<uint8_t> w(static_cast<size_t>(row_bytes(DType::Q8_0, 64) * 24)), out(w.size());
    CHECK_THROWS(repack_x16(w.data(), DType::Q8_0, out.data(), 24, 64), InvalidArgument, "rows % 16 == 0");
    CHECK_THROWS(repack_x16(w.data(), DType::F16, out.data(), 16, 64), InvalidArgument, "q8_0 or q4_0");
}

TEST(kernel_act_to_q8_stores_each_blocks_sum_of_q) {
    Rng rng(22);
    const int64_t n_in = 96, n_tok = 3;
    const std::vector<float> x = random_vec(rng, n_tok * n_in, -2.0f, 2.0f);
    std::vector<uint8_t> act(static_cast<size_t>(n_tok * q8_act_row_bytes(n_in)));
    ref::act_to_q8(x.data(), n_tok, n_in, act.data());
    for (int64_t t = 0; t < n_tok; ++t)
        for (int64_t b = 0; b < n_in / 32; ++b) {
            const uint8_t* row = act.data() + t * q8_act_row_bytes(n_in);
            int32_t want = 0, got;
            for (int64_t i = 0; i < 32; ++i) want += static_cast<int8_t>(row[b * 32 + i]);
            std::memcpy(&got, row + n_in + 4 * (n_in / 32 + b), 4);
            CHECK(got == want);
        }
}

TEST(kernel_matmul_x16_every_isa_equals_reference_bitwise) {
    Rng rng(23);
    std::vector<const KernelTable*> ks = q8act_tables();
    for (DType dt : {DType::Q8_0, DType::Q4_0})
        for (const Shape& s : kShapesX16) {
            const X16Case c(rng, dt, s.n_out, s.n_in);
            const std::vector<float> bias = random_vec(rng, s.n_out);
            for (int64_t n_tok = 1; n_tok <= 17; ++n_tok) {
                std::vector<float> x = random_vec(rng, n_tok * s.n_in);
                for (int64_t i = 0; i < 32; ++i) x[static_cast<size_t>(i)] = 3.0f;  // a block of +127s: the widest sums
                std::vector<uint8_t> act(static_cast<size_t>(n_tok * q8_act_row_bytes(s.n_in)));
                ref::act_to_q8(x.data(), n_tok, s.n_in, act.data());
                for (const float* b : {static_cast<const float*>(nullptr), bias.data()}) {
                    std::vector<float> want(static_cast<size_t>(n_tok * s.n_out), NAN);
                    ref::matmul_rows_x16(c.x16, act.data(), n_tok, want.data(), b, 0, s.n_out);
                    for (const KernelTable* k : ks) {
                        std::vector<float> got(want.size(), NAN);
                        k->matmul_rows_x16(c.x16, act.data(), n_tok, got.data(), b, 0, s.n_out);
                        if (!same_bits(got, want))
                            std::fprintf(stderr, "  %s %s [%lld x %lld] n_tok=%lld differs from the reference\n",
                                         k->name, dtype_name(c.x16.dtype), static_cast<long long>(s.n_out),
                                         static_cast<long long>(s.n_in), static_cast<long long>(n_tok));
                        CHECK(same_bits(got, want));
                        if (s.n_out > 16) {  // a row range that starts past the first group
                            std::vector<float> part(want.size(), NAN);
                            k->matmul_rows_x16(c.x16, act.data(), n_tok, part.data(), b, 16, s.n_out);
                            for (int64_t t = 0; t < n_tok; ++t)
                                CHECK(std::memcmp(part.data() + t * s.n_out + 16, want.data() + t * s.n_out + 16,
                                                  static_cast<size_t>(s.n_out - 16) * 4) == 0);
                        }
                    }
                }
            }
        }
}

// Against the exact matmul of the same weights, the bound of the int8 path above.
TEST(kernel_matmul_x16_is_within_activation_rounding_of_exact_and_invariant) {
    Rng rng(24);
    ThreadPool p1(1), p2(2);
    const Shape shapes[] = {{16, 32}, {48, 96}, {320, 960}, {96, 2560}};
    for (DType dt : {DType::Q8_0, DType::Q4_0})
        for (const Shape& s : shapes)
            for (int64_t n_tok : {1, 5, 17}) {
                const X16Case c(rng, dt, s.n_out, s.n_in);
                const std::vector<float> bias = random_vec(rng, s.n_out);
                const std::vector<float> x = random_vec(rng, n_tok * s.n_in);
                std::vector<float> y(static_cast<size_t>(n_tok * s.n_out), NAN), exact(y.size()), one(y.size());
                matmul(c.x16, x.data(), n_tok, y.data(), bias.data(), p2);  // dispatched, whatever the precision
                matmul(c.x16, x.data(), n_tok, one.data(), bias.data(), p1);
                CHECK(same_bits(y, one));
                for (int64_t t = 0; t < n_tok; ++t) {  // batch invariance
                    std::vector<float> y1(static_cast<size_t>(s.n_out));
                    matmul(c.x16, x.data() + t * s.n_in, 1, y1.data(), bias.data(), p2);
                    CHECK(std::memcmp(y1.data(), y.data() + t * s.n_out, y1.size() * 4) == 0);
                }
                ref::matmul(c.plain, x.data(), n_tok, exact.data(), bias.data());
                std::vector<uint8_t> act(static_cast<size_t>(n_tok * q8_act_row_bytes(s.n_in)));
                ref::act_to_q8(x.data(), n_tok, s.n_in, act.data());
                CHECK(outside_int8_bound(c.plain, x, act, bias, n_tok, y, exact, "x16") == 0);
            }
    std::vector<uint8_t> wb(static_cast<size_t>(row_bytes(DType::Q8_0X16, 32) * 8));
    std::vector<float> x(32), y(8);
    CHECK_THROWS(matmul(WeightView{wb.data(), DType::Q8_0X16, 8, 32}, x.data(), 1, y.data(), nullptr, p1),
                 InvalidArgument, "groups of 16 rows");
}

TEST(kernel_matmul_rejects_q8_0_rows_that_are_not_whole_blocks) {
    ThreadPool pool(1);
    std::vector<uint8_t> wb(64);
    std::vector<float> x(40), y(1);
    const WeightView w{wb.data(), DType::Q8_0, 1, 40};
    CHECK_THROWS(matmul(w, x.data(), 1, y.data(), nullptr, pool), InvalidArgument, "n_in % 32");
}

// ---------------------------------------------------------------------------------------
// element-wise ops

TEST(kernel_rmsnorm_matches_reference_within_4e_6_relative) {
    // f32 sum of squares (~dim/16 + 4 roundings per lane) plus rsqrt: a few ulp.
    Rng rng(8);
    for (const KernelTable* k : tables())
        for (int64_t dim : {1, 15, 16, 17, 960, 1000})
            for (int64_t n_tok : {1, 3}) {
                const std::vector<float> x = random_vec(rng, n_tok * dim, -3.0f, 3.0f);
                const std::vector<float> w = random_vec(rng, dim, 0.5f, 1.5f);
                std::vector<float> want(x.size()), got(x.size());
                ref::rmsnorm(x.data(), w.data(), 1e-5f, n_tok, dim, want.data());
                k->rmsnorm(x.data(), w.data(), 1e-5f, n_tok, dim, got.data());
                for (size_t i = 0; i < x.size(); ++i) CHECK_NEAR(got[i], want[i], 4e-6 * std::fabs(want[i]) + 1e-30);
                std::vector<float> inplace = x;  // x may alias y
                k->rmsnorm(inplace.data(), w.data(), 1e-5f, n_tok, dim, inplace.data());
                CHECK(same_bits(inplace, got));
            }
}

TEST(kernel_silu_mul_matches_reference_within_2e_6_relative) {
    // exp is a polynomial (<= 2 ulp), then one add, one divide, one multiply.
    Rng rng(9);
    for (const KernelTable* k : tables())
        for (int64_t n : {1, 15, 16, 17, 1000}) {
            std::vector<float> g = random_vec(rng, n, -12.0f, 12.0f);
            if (n > 4) {
                g[0] = -100.0f;  // exp(100) saturates: silu ~ -0
                g[1] = 100.0f;
                g[2] = 0.0f;
                g[3] = -88.5f;
            }
            const std::vector<float> u = random_vec(rng, n);
            std::vector<float> want(static_cast<size_t>(n)), got(want.size());
            ref::silu_mul(g.data(), u.data(), want.data(), n);
            k->silu_mul(g.data(), u.data(), got.data(), n);
            for (size_t i = 0; i < want.size(); ++i)
                CHECK_NEAR(got[i], want[i], 2e-6 * std::fabs(want[i]) + 1e-35);
            std::vector<float> aliased = g;  // out may alias gate
            k->silu_mul(aliased.data(), u.data(), aliased.data(), n);
            CHECK(same_bits(aliased, got));
        }
}

TEST(kernel_softmax_matches_reference_within_4e_6_relative) {
    Rng rng(10);
    for (const KernelTable* k : tables())
        for (int64_t n : {1, 5, 16, 17, 50000}) {
            std::vector<float> x = random_vec(rng, n, -20.0f, 20.0f);
            if (n > 3) x[2] = -INFINITY;  // masked logit
            std::vector<float> want = x, got = x;
            ref::softmax(want.data(), n);
            k->softmax(got.data(), n);
            double total = 0.0;
            for (size_t i = 0; i < want.size(); ++i) {
                CHECK_NEAR(got[i], want[i], 4e-6 * want[i] + 1e-38);
                total += got[i];
            }
            CHECK_NEAR(total, 1.0, 1e-5);
            if (n > 3) CHECK(got[2] == 0.0f);
        }
}

TEST(kernel_rope_equals_reference_bitwise) {
    // Cheap op, visible precision: the fast rope computes the reference formula exactly.
    Rng rng(11);
    for (int head_dim : {6, 64, 80, 128, 512})
        for (int64_t pos : {0, 1, 17, 1000, 131071}) {
            const std::vector<float> inv = rope_inv_freq(head_dim, 10000.0f);
            const std::vector<float> x = random_vec(rng, 3 * head_dim);
            std::vector<float> want = x, got = x;
            ref::rope(want.data(), 3, head_dim, pos, inv.data());
            rope(got.data(), 3, head_dim, pos, inv.data());
            CHECK(same_bits(want, got));
        }
    // Position 0 is the identity.
    const std::vector<float> inv = rope_inv_freq(8, 10000.0f);
    std::vector<float> x = random_vec(rng, 8), y = x;
    rope(y.data(), 1, 8, 0, inv.data());
    CHECK(same_bits(x, y));
}

// ---------------------------------------------------------------------------------------
// attention

TEST(kernel_attention_matches_reference_across_blocks_with_gqa) {
    // Scores are q.k with f32 accumulation, softmax as above, then an f32 weighted sum
    // of unit-range V: absolute error well under 2e-5.
    Rng rng(12);
    struct Case {
        int block_tokens, n_heads, n_kv_heads, head_dim;
        int64_t pos0, n_q;
    };
    const Case cases[] = {
        {16, 6, 2, 64, 0, 1},    // first token
        {16, 6, 2, 64, 37, 3},   // prefill chunk spanning blocks 2..3
        {5, 4, 1, 40, 11, 9},    // MQA, ragged head_dim, small blocks
        {16, 8, 8, 128, 63, 2},  // MHA, crosses the block boundary at 64
        {7, 6, 3, 16, 0, 20},    // whole prompt at once
        {16, 2, 2, 256, 20, 1},  // head_dim 256
        {16, 16, 1, 64, 30, 2},  // MQA, 16 heads on one KV head: two passes of 8
        {8, 8, 1, 512, 5, 1},    // head_dim 512: state for 4 heads per pass
    };
    for (const Case& c : cases) {
        const int64_t n_keys = c.pos0 + c.n_q;
        const int n_blocks = static_cast<int>((n_keys + c.block_tokens - 1) / c.block_tokens);
        Cache cache(rng, n_blocks, c.block_tokens, c.n_kv_heads, c.head_dim);
        const std::vector<float> q = random_vec(rng, c.n_q * c.n_heads * c.head_dim);
        const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
        std::vector<float> want(q.size()), scratch(static_cast<size_t>(n_keys));
        ref::attention(q.data(), c.n_q, c.pos0, cache.kp.data(), cache.vp.data(), c.block_tokens, c.n_heads,
                       c.n_kv_heads, c.head_dim, scale, want.data(), scratch.data());
        for (const KernelTable* k : tables()) {
            std::vector<float> got(q.size(), NAN);
            k->attention(q.data(), c.n_q, c.pos0, cache.kp.data(), cache.vp.data(), c.block_tokens, c.n_heads,
                         c.n_kv_heads, c.head_dim, scale, got.data(), scratch.data(), 0, c.n_kv_heads, 0);
            for (size_t i = 0; i < got.size(); ++i) CHECK_NEAR(got[i], want[i], 2e-5);
            // One KV head at a time (how decode splits attention over threads): the same bits.
            std::vector<float> split(q.size(), NAN);
            for (int kv = 0; kv < c.n_kv_heads; ++kv)
                k->attention(q.data(), c.n_q, c.pos0, cache.kp.data(), cache.vp.data(), c.block_tokens, c.n_heads,
                             c.n_kv_heads, c.head_dim, scale, split.data(), scratch.data(), kv, kv + 1, 0);
            CHECK(same_bits(split, got));
        }
        // A single query at position 0 attends to one key: out is exactly that V row.
        if (c.pos0 == 0) {
            std::vector<float> got(static_cast<size_t>(c.n_heads * c.head_dim));
            attention(q.data(), 1, 0, cache.kp.data(), cache.vp.data(), c.block_tokens, c.n_heads, c.n_kv_heads,
                      c.head_dim, scale, got.data(), scratch.data());
            const int group = c.n_heads / c.n_kv_heads;
            for (int h = 0; h < c.n_heads; ++h)
                for (int d = 0; d < c.head_dim; ++d)
                    CHECK(got[static_cast<size_t>(h * c.head_dim + d)] ==
                          cache.v[0][static_cast<size_t>((h / group) * c.head_dim + d)]);
        }
    }
}

TEST(kernel_attention_of_a_query_does_not_depend_on_the_other_queries) {
    // Prefill (n_q queries at once) and decode (one at a time) give the same bits.
    Rng rng(13);
    const int bt = 16, nh = 6, nkv = 2, hd = 64;
    const int64_t pos0 = 21, n_q = 9;
    Cache cache(rng, 2, bt, nkv, hd);
    const std::vector<float> q = random_vec(rng, n_q * nh * hd);
    std::vector<float> all(q.size()), one(q.size()), scratch(static_cast<size_t>(pos0 + n_q));
    attention(q.data(), n_q, pos0, cache.kp.data(), cache.vp.data(), bt, nh, nkv, hd, 0.125f, all.data(),
              scratch.data());
    for (int64_t i = 0; i < n_q; ++i)
        attention(q.data() + i * nh * hd, 1, pos0 + i, cache.kp.data(), cache.vp.data(), bt, nh, nkv, hd, 0.125f,
                  one.data() + i * nh * hd, scratch.data());
    CHECK(same_bits(all, one));
}

TEST(kernel_sliding_window_attention_matches_reference_and_a_cache_of_the_window_alone) {
    // window w: query at position p sees keys p-w+1 .. p. Three checks: every table against
    // the reference; the result equals full attention over a cache that holds only the
    // window's keys (the definition, independent of the kernel's masking); keys before the
    // window are never read (NaN there changes nothing); prefill == decode bitwise.
    Rng rng(15);
    struct Case {
        int block_tokens, n_heads, n_kv_heads, head_dim;
        int64_t pos0, n_q, window;
    };
    const Case cases[] = {
        {16, 6, 2, 64, 0, 20, 8},     // prompt longer than the window, from position 0
        {16, 6, 2, 64, 37, 3, 8},     // window starts mid-block
        {5, 4, 1, 40, 11, 9, 7},      // MQA, ragged head_dim, small blocks
        {16, 8, 8, 128, 63, 2, 16},   // window of exactly one block
        {7, 6, 3, 16, 2, 3, 100},     // window longer than the sequence: full attention
        {16, 4, 2, 256, 40, 1, 1},    // window of one key: out is that query's own V row
    };
    for (const Case& c : cases) {
        const int64_t n_keys = c.pos0 + c.n_q;
        const int n_blocks = static_cast<int>((n_keys + c.block_tokens - 1) / c.block_tokens);
        Cache cache(rng, n_blocks, c.block_tokens, c.n_kv_heads, c.head_dim);
        const std::vector<float> q = random_vec(rng, c.n_q * c.n_heads * c.head_dim);
        const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
        const int64_t row = static_cast<int64_t>(c.n_kv_heads) * c.head_dim;
        std::vector<float> want(q.size()), scratch(static_cast<size_t>(n_keys));
        ref::attention(q.data(), c.n_q, c.pos0, cache.kp.data(), cache.vp.data(), c.block_tokens, c.n_heads,
                       c.n_kv_heads, c.head_dim, scale, want.data(), scratch.data(), c.window);
        // The definition: for each query, a fresh cache of its window's keys only.
        for (int64_t i = 0; i < c.n_q; ++i) {
            const int64_t p = c.pos0 + i, k0 = std::max<int64_t>(0, p + 1 - c.window), n = p + 1 - k0;
            std::vector<float> kw(static_cast<size_t>(n * row)), vw(kw.size());
            for (int64_t j = 0; j < n; ++j)
                for (int64_t e = 0; e < row; ++e) {
                    const int64_t src = k0 + j;
                    const size_t at = static_cast<size_t>((src % c.block_tokens) * row + e);
                    kw[static_cast<size_t>(j * row + e)] = cache.k[static_cast<size_t>(src / c.block_tokens)][at];
                    vw[static_cast<size_t>(j * row + e)] = cache.v[static_cast<size_t>(src / c.block_tokens)][at];
                }
            const float* kb[1] = {kw.data()};
            const float* vb[1] = {vw.data()};
            const int64_t stride = static_cast<int64_t>(c.n_heads) * c.head_dim;
            std::vector<float> def(static_cast<size_t>(stride));
            ref::attention(q.data() + i * stride, 1, n - 1, kb, vb, static_cast<int>(n), c.n_heads, c.n_kv_heads,
                           c.head_dim, scale, def.data(), scratch.data());
            for (int64_t e = 0; e < stride; ++e)
                CHECK_NEAR(want[static_cast<size_t>(i * stride + e)], def[static_cast<size_t>(e)], 1e-6);
        }
        // Keys before the earliest window are poisoned: nothing may read them.
        const int64_t first = std::max<int64_t>(0, c.pos0 + 1 - c.window);
        for (int64_t p = 0; p < first; ++p)
            for (int64_t e = 0; e < row; ++e) {
                const size_t at = static_cast<size_t>((p % c.block_tokens) * row + e);
                cache.k[static_cast<size_t>(p / c.block_tokens)][at] = NAN;
                cache.v[static_cast<size_t>(p / c.block_tokens)][at] = NAN;
            }
        for (const KernelTable* k : tables()) {
            std::vector<float> got(q.size(), NAN);
            k->attention(q.data(), c.n_q, c.pos0, cache.kp.data(), cache.vp.data(), c.block_tokens, c.n_heads,
                         c.n_kv_heads, c.head_dim, scale, got.data(), scratch.data(), 0, c.n_kv_heads, c.window);
            for (size_t i = 0; i < got.size(); ++i) CHECK_NEAR(got[i], want[i], 2e-5);
            // Decode, one query at a time, gives the prefill's bits.
            const int64_t stride = static_cast<int64_t>(c.n_heads) * c.head_dim;
            std::vector<float> one(q.size(), NAN);
            for (int64_t i = 0; i < c.n_q; ++i)
                k->attention(q.data() + i * stride, 1, c.pos0 + i, cache.kp.data(), cache.vp.data(), c.block_tokens,
                             c.n_heads, c.n_kv_heads, c.head_dim, scale, one.data() + i * stride, scratch.data(), 0,
                             c.n_kv_heads, c.window);
            CHECK(same_bits(one, got));
        }
    }
}

TEST(kernel_attention_over_f16_pages_is_attention_over_their_widened_values_bitwise) {
    // kv_dtype "f16": every element is widened to f32 exactly where it is read, so on every
    // ISA (and the reference) the result has the bits of attention over f32 pages holding the
    // widened values: prefill, decode, GQA, ragged head_dim, windows, one KV head at a time.
    Rng rng(21);
    struct Case {
        int block_tokens, n_heads, n_kv_heads, head_dim;
        int64_t pos0, n_q, window;
    };
    const Case cases[] = {
        {16, 6, 2, 64, 0, 1, 0}, {16, 6, 2, 64, 37, 3, 0}, {5, 4, 1, 40, 11, 9, 0},
        {16, 8, 8, 128, 63, 2, 0}, {7, 6, 3, 16, 0, 20, 8}, {16, 16, 1, 64, 30, 2, 0}, {16, 4, 2, 32, 40, 1, 8},
    };
    for (const Case& c : cases) {
        const int64_t n_keys = c.pos0 + c.n_q;
        const int n_blocks = static_cast<int>((n_keys + c.block_tokens - 1) / c.block_tokens);
        Cache cache(rng, n_blocks, c.block_tokens, c.n_kv_heads, c.head_dim);
        std::vector<std::vector<uint16_t>> kh, vh;
        for (int b = 0; b < n_blocks; ++b) {  // round the pages to f16, and the f32 pages to the same values
            std::vector<float>& kf = cache.k[static_cast<size_t>(b)];
            std::vector<float>& vf = cache.v[static_cast<size_t>(b)];
            kh.emplace_back(kf.size());
            vh.emplace_back(vf.size());
            for (size_t i = 0; i < kf.size(); ++i) {
                kh.back()[i] = f32_to_f16(kf[i]);
                vh.back()[i] = f32_to_f16(vf[i]);
                kf[i] = f16_to_f32(kh.back()[i]);
                vf[i] = f16_to_f32(vh.back()[i]);
            }
        }
        std::vector<const uint16_t*> kp, vp;
        for (int b = 0; b < n_blocks; ++b) {
            kp.push_back(kh[static_cast<size_t>(b)].data());
            vp.push_back(vh[static_cast<size_t>(b)].data());
        }
        const std::vector<float> q = random_vec(rng, c.n_q * c.n_heads * c.head_dim);
        const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
        std::vector<float> scratch(static_cast<size_t>(n_keys));
        std::vector<float> want(q.size(), NAN), got(q.size(), NAN);
        ref::attention_kv_heads(q.data(), c.n_q, c.pos0, cache.kp.data(), cache.vp.data(), c.block_tokens, c.n_heads,
                                c.n_kv_heads, c.head_dim, scale, want.data(), scratch.data(), 0, c.n_kv_heads, c.window);
        ref::attention_kv_heads_f16(q.data(), c.n_q, c.pos0, kp.data(), vp.data(), c.block_tokens, c.n_heads,
                                    c.n_kv_heads, c.head_dim, scale, got.data(), scratch.data(), 0, c.n_kv_heads,
                                    c.window);
        CHECK(same_bits(want, got));
        for (const KernelTable* k : tables()) {
            std::vector<float> w32(q.size(), NAN), w16(q.size(), NAN);
            k->attention(q.data(), c.n_q, c.pos0, cache.kp.data(), cache.vp.data(), c.block_tokens, c.n_heads,
                         c.n_kv_heads, c.head_dim, scale, w32.data(), scratch.data(), 0, c.n_kv_heads, c.window);
            for (int kv = 0; kv < c.n_kv_heads; ++kv)
                k->attention_f16(q.data(), c.n_q, c.pos0, kp.data(), vp.data(), c.block_tokens, c.n_heads,
                                 c.n_kv_heads, c.head_dim, scale, w16.data(), scratch.data(), kv, kv + 1, c.window);
            CHECK(same_bits(w32, w16));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Gemma's element-wise ops

TEST(kernel_gelu_tanh_mul_matches_reference_within_1e_6_relative) {
    // Values checked against PyTorch's gelu(approximate="tanh") at a few points too.
    Rng rng(16);
    for (int64_t n : {1, 15, 16, 17, 1000}) {
        const std::vector<float> g = random_vec(rng, n, -12.0f, 12.0f), u = random_vec(rng, n);
        std::vector<float> want(static_cast<size_t>(n)), got(want.size());
        ref::gelu_tanh_mul(g.data(), u.data(), want.data(), n);
        gelu_tanh_mul(g.data(), u.data(), got.data(), n);
        for (size_t i = 0; i < want.size(); ++i) CHECK_NEAR(got[i], want[i], 1e-6 * std::fabs(want[i]) + 1e-7);
        std::vector<float> aliased = g;  // out may alias gate
        gelu_tanh_mul(aliased.data(), u.data(), aliased.data(), n);
        CHECK(same_bits(aliased, got));
    }
    // Every ISA's vector version (x * logistic(2y)) against the reference, over the whole range:
    // saturation below -9, the cubic's growth above, and the lanes of a ragged tail.
    for (const KernelTable* k : {kernels_table_avx2(), kernels_table_avx512()}) {
        if (k == nullptr) continue;
        CHECK(k->gelu_tanh_mul != nullptr);
        for (int64_t n : {1, 17, 4096}) {
            const std::vector<float> g = random_vec(rng, n, -40.0f, 40.0f), u = random_vec(rng, n);
            std::vector<float> want(static_cast<size_t>(n)), got(want.size());
            ref::gelu_tanh_mul(g.data(), u.data(), want.data(), n);
            k->gelu_tanh_mul(g.data(), u.data(), got.data(), n);
            for (size_t i = 0; i < want.size(); ++i) CHECK_NEAR(got[i], want[i], 1e-6 * std::fabs(want[i]) + 1e-7);
        }
    }
    // torch.nn.functional.gelu(torch.tensor([-3., -1., 0., 0.5, 2.]), approximate="tanh")
    const float x[5] = {-3.0f, -1.0f, 0.0f, 0.5f, 2.0f};
    const float one[5] = {1.0f, 1.0f, 1.0f, 1.0f, 1.0f};
    const double torch_values[5] = {-0.00363743305, -0.158807993, 0.0, 0.345714003, 1.95459771};
    float y[5];
    gelu_tanh_mul(x, one, y, 5);
    for (int i = 0; i < 5; ++i) CHECK_NEAR(y[i], torch_values[i], 2e-6);
}

TEST(kernel_softcap_matches_reference_and_bounds_by_cap) {
    Rng rng(17);
    std::vector<float> x = random_vec(rng, 257, -200.0f, 200.0f);
    x[0] = 0.0f;
    std::vector<float> want = x, got = x;
    ref::softcap(want.data(), static_cast<int64_t>(want.size()), 30.0f);
    softcap(got.data(), static_cast<int64_t>(got.size()), 30.0f);
    for (size_t i = 0; i < x.size(); ++i) {
        CHECK_NEAR(got[i], want[i], 4e-6 * 30.0);
        CHECK(std::fabs(got[i]) <= 30.0f);
    }
    CHECK(got[0] == 0.0f);
}

// ---------------------------------------------------------------------------------------
// conversion

TEST(kernel_convert_rows_round_trips_within_each_formats_precision) {
    Rng rng(14);
    const int64_t n_rows = 3, n_cols = 96;
    const std::vector<float> x = random_vec(rng, n_rows * n_cols, -4.0f, 4.0f);
    struct Fmt {
        DType t;
        double rel;
    };
    for (Fmt f : {Fmt{DType::F32, 0.0}, Fmt{DType::F16, 0x1p-11}, Fmt{DType::BF16, 0x1p-8}}) {
        std::vector<uint8_t> packed(static_cast<size_t>(row_bytes(f.t, n_cols) * n_rows));
        convert_rows(x.data(), DType::F32, packed.data(), f.t, n_rows, n_cols);
        std::vector<float> back(x.size());
        convert_rows(packed.data(), f.t, back.data(), DType::F32, n_rows, n_cols);
        for (size_t i = 0; i < x.size(); ++i) CHECK_NEAR(back[i], x[i], f.rel * std::fabs(x[i]));
        // A value already in the format survives a round trip exactly.
        std::vector<uint8_t> again(packed.size());
        convert_rows(back.data(), DType::F32, again.data(), f.t, n_rows, n_cols);
        CHECK(again == packed);
        // dequantize_row agrees with convert_rows.
        const WeightView w{packed.data(), f.t, n_rows, n_cols};
        std::vector<float> row(static_cast<size_t>(n_cols));
        dequantize_row(w, 2, row.data());
        CHECK(std::memcmp(row.data(), back.data() + 2 * n_cols, static_cast<size_t>(n_cols) * 4) == 0);
    }
    // f16 -> bf16 directly equals f16 -> f32 -> bf16.
    std::vector<uint8_t> h(static_cast<size_t>(row_bytes(DType::F16, n_cols) * n_rows));
    convert_rows(x.data(), DType::F32, h.data(), DType::F16, n_rows, n_cols);
    std::vector<uint8_t> b1(h.size()), b2(h.size());
    std::vector<float> hf(x.size());
    convert_rows(h.data(), DType::F16, b1.data(), DType::BF16, n_rows, n_cols);
    convert_rows(h.data(), DType::F16, hf.data(), DType::F32, n_rows, n_cols);
    convert_rows(hf.data(), DType::F32, b2.data(), DType::BF16, n_rows, n_cols);
    CHECK(b1 == b2);
}

TEST(kernel_convert_rows_q8_0_follows_llama_cpp_and_bounds_the_error) {
    Rng rng(15);
    const int64_t n_rows = 4, n_cols = 128;
    std::vector<float> x = random_vec(rng, n_rows * n_cols, -2.0f, 2.0f);
    for (int64_t i = 0; i < 32; ++i) x[static_cast<size_t>(32 + i)] = 0.0f;  // an all-zero block: d = 0
    x[70] = 1e3f;                                                            // an outlier block
    // A block where d = 1 exactly, so x * id lands on halves: roundf rounds them away from zero.
    const float halves[] = {127.0f, 2.5f, -2.5f, 0.5f, -0.5f, 126.5f, -126.5f, 1.4999999f, -1.4999999f, 0.0f};
    for (size_t i = 0; i < sizeof halves / sizeof halves[0]; ++i) x[96 + i] = halves[i];
    std::vector<uint8_t> q(static_cast<size_t>(row_bytes(DType::Q8_0, n_cols) * n_rows));
    CHECK(q.size() == static_cast<size_t>(n_rows * 4 * 34));
    convert_rows(x.data(), DType::F32, q.data(), DType::Q8_0, n_rows, n_cols);
    std::vector<float> back(x.size());
    const WeightView w{q.data(), DType::Q8_0, n_rows, n_cols};
    for (int64_t r = 0; r < n_rows; ++r) dequantize_row(w, r, back.data() + r * n_cols);
    for (int64_t b = 0; b < n_rows * n_cols / 32; ++b) {
        const float* xb = x.data() + b * 32;
        const uint8_t* blk = q.data() + b * 34;
        // llama.cpp quantize_row_q8_0_ref, written out independently.
        float amax = 0.0f;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        uint16_t dh;
        std::memcpy(&dh, blk, 2);
        CHECK(dh == f32_to_f16(d));
        for (int j = 0; j < 32; ++j) {
            CHECK(static_cast<int8_t>(blk[2 + j]) == static_cast<int8_t>(std::round(xb[j] * id)));
            CHECK_NEAR(back[static_cast<size_t>(b * 32 + j)], xb[j], 0.563 * d);
        }
    }
    const int8_t want_halves[] = {127, 3, -3, 1, -1, 127, -127, 1, -1, 0};
    for (size_t i = 0; i < sizeof want_halves; ++i) CHECK(static_cast<int8_t>(q[3 * 34 + 2 + i]) == want_halves[i]);
    CHECK_THROWS(convert_rows(x.data(), DType::F32, q.data(), DType::Q8_0, 1, 40), InvalidArgument, "divisible by 32");
}

TEST(kernel_convert_rows_q4_0_follows_llama_cpp_and_bounds_the_error) {
    Rng rng(21);
    const int64_t n_rows = 3, n_cols = 128;
    std::vector<float> x = random_vec(rng, n_rows * n_cols, -2.0f, 2.0f);
    for (int64_t i = 0; i < 32; ++i) x[static_cast<size_t>(32 + i)] = 0.0f;  // an all-zero block: d = 0
    x[70] = -1e3f;                                                           // a negative outlier: d > 0
    x[100] = 5.0f;                                                           // a positive one: d < 0
    std::vector<uint8_t> q(static_cast<size_t>(row_bytes(DType::Q4_0, n_cols) * n_rows));
    CHECK(q.size() == static_cast<size_t>(n_rows * 4 * 18));
    convert_rows(x.data(), DType::F32, q.data(), DType::Q4_0, n_rows, n_cols);
    std::vector<float> back(x.size());
    const WeightView w{q.data(), DType::Q4_0, n_rows, n_cols};
    for (int64_t r = 0; r < n_rows; ++r) dequantize_row(w, r, back.data() + r * n_cols);
    for (int64_t b = 0; b < n_rows * n_cols / 32; ++b) {
        const float* xb = x.data() + b * 32;
        const uint8_t* blk = q.data() + b * 18;
        // llama.cpp quantize_row_q4_0_ref, written out independently.
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < 32; ++j)
            if (amax < std::fabs(xb[j])) {
                amax = std::fabs(xb[j]);
                max = xb[j];
            }
        const float d = max / -8;
        const float id = d ? 1.0f / d : 0.0f;
        uint16_t dh;
        std::memcpy(&dh, blk, 2);
        CHECK(dh == f32_to_f16(d));
        for (int j = 0; j < 16; ++j) {
            const float x0 = xb[j] * id, x1 = xb[16 + j] * id;
            const int q0 = std::min(15, static_cast<int>(static_cast<int8_t>(x0 + 8.5f)));
            const int q1 = std::min(15, static_cast<int>(static_cast<int8_t>(x1 + 8.5f)));
            CHECK(blk[2 + j] == static_cast<uint8_t>(q0 | (q1 << 4)));
        }
        // Rounding to the nearest of 16 levels: |error| <= |d|/2, except at nibble 15
        // (the clamp: +8|d| is not representable, 7|d| is used), <= |d|; plus f16's d.
        for (int j = 0; j < 32; ++j) {
            const int nib = j < 16 ? (blk[2 + j] & 15) : (blk[2 + j - 16] >> 4);
            const double bound = (nib == 15 ? 1.0 : 0.5) * std::fabs(d) + 8 * 0x1p-11 * std::fabs(d);
            CHECK_NEAR(back[static_cast<size_t>(b * 32 + j)], xb[j], bound);
        }
    }
    CHECK(back[70] == -1e3f || std::fabs(back[70] + 1e3f) <= 1e3f * 0x1p-11);  // the extreme maps to nibble 0 exactly
    CHECK_THROWS(convert_rows(x.data(), DType::F32, q.data(), DType::Q4_0, 1, 40), InvalidArgument, "divisible by 32");
    // q4_0 as a source dequantises (a GGUF file loaded with --weights f32): exactly dequantize_row's values
    std::vector<float> deq(32), row(32);
    convert_rows(q.data(), DType::Q4_0, deq.data(), DType::F32, 1, 32);
    dequantize_row(WeightView{q.data(), DType::Q4_0, 1, 32}, 0, row.data());
    CHECK(std::memcmp(deq.data(), row.data(), 32 * sizeof(float)) == 0);
    CHECK_THROWS(convert_rows(x.data(), DType::F32, q.data(), DType::Q4_1, 1, 32), InvalidArgument, "cannot quantise to q4_1");
}

TEST(kernel_isa_names_the_best_supported_table) {
    const std::string isa = kernels_isa();
    CHECK(isa == "avx512" || isa == "avx2" || isa == "scalar");
    if (std::getenv("LMX_KERNELS") == nullptr) {
        if (kernels_table_avx512()) CHECK(isa == "avx512");
        else if (kernels_table_avx2()) CHECK(isa == "avx2");
    }
    std::fprintf(stderr, "  kernels_isa() = %s\n", isa.c_str());
}

// ---------------------------------------------------------------------------------------
// memory bandwidth probe (membw.h): the floor the benchmarks hold decode to

TEST(membw_reports_a_finite_positive_rate_and_rejects_a_tiny_buffer) {
    ThreadPool pool(2);
    const double gbs = read_bandwidth_gbs(pool, size_t{64} << 20, 2);
    CHECK(gbs > 0.0 && std::isfinite(gbs));
    CHECK_THROWS(read_bandwidth_gbs(pool, 1024, 1), InvalidArgument, "n_bytes >=");
}
