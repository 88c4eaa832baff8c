// test_quants.cpp — GGUF block formats: known block values, and the exact matmul on every ISA
// against the reference and against the f32 matmul of the dequantised matrix (bitwise).
// Owner: kernels (quant formats). Thread-safety: tests run one at a time.
// Bit-for-bit agreement with the gguf Python package's dequantisation: tests/test_gguf_quants.py.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "check.h"
#include "kernels/kernels.h"
#include "kernels/kernels_impl.h"
#include "kernels/quants.h"
#include "threadpool.h"
#include "test_rand.h"

using namespace lmx;
using lmx_test::Rng;
using lmx_test::random_vec;
using lmx_test::tables;
using lmx_test::same_bits;

namespace {

const DType kQuants[] = {DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q2_K,
                         DType::Q3_K, DType::Q4_K, DType::Q5_K, DType::Q6_K};

// Byte offsets of the f16 fields (d, m / dmin) of one block, which must be finite.
std::vector<int> f16_fields(DType t) {
    switch (t) {
        case DType::Q4_1:
        case DType::Q5_1:
        case DType::Q4_K:
        case DType::Q5_K: return {0, 2};
        case DType::Q5_0: return {0};
        case DType::Q2_K: return {80, 82};
        case DType::Q3_K: return {108};
        case DType::Q6_K: return {208};
        default: return {};
    }
}

// n_rows x n_cols of format t: random quants and scale bytes, finite f16 scales of either sign.
std::vector<uint8_t> random_blocks(Rng& rng, DType t, int64_t n_rows, int64_t n_cols) {
    std::vector<uint8_t> w(static_cast<size_t>(row_bytes(t, n_cols) * n_rows));
    for (auto& b : w) b = static_cast<uint8_t>(rng.next());
    const int64_t bb = dtype_block_bytes(t), n_blocks = static_cast<int64_t>(w.size()) / bb;
    for (int64_t i = 0; i < n_blocks; ++i)
        for (int off : f16_fields(t)) {
            const uint16_t h = f32_to_f16(rng.uniform(-0.02f, 0.02f));
            std::memcpy(w.data() + i * bb + off, &h, 2);
        }
    return w;
}

}  // namespace

TEST(quants_block_sizes_are_ggmls) {
    const int64_t elems[] = {32, 32, 32, 256, 256, 256, 256, 256};
    const int64_t bytes[] = {20, 22, 24, 84, 110, 144, 176, 210};
    for (int i = 0; i < 8; ++i) {
        CHECK(dtype_block_elems(kQuants[i]) == elems[i]);
        CHECK(dtype_block_bytes(kQuants[i]) == bytes[i]);
        CHECK(row_bytes(kQuants[i], 512) == 512 / elems[i] * bytes[i]);
        CHECK(dtype_is_gguf_quant(kQuants[i]) && !dtype_is_blocked(kQuants[i]));
    }
}

TEST(quants_dequantize_hand_built_q4_1_q5_0_q4_k_and_q6_k_blocks) {
    float out[256];
    {  // q4_1: d = 0.5, m = -1; byte j = (j & 15) | (15 - j) << 4
        uint8_t b[20];
        const uint16_t d = f32_to_f16(0.5f), m = f32_to_f16(-1.0f);
        std::memcpy(b, &d, 2), std::memcpy(b + 2, &m, 2);
        for (int j = 0; j < 16; ++j) b[4 + j] = static_cast<uint8_t>(j | (15 - j) << 4);
        dequantize_blocks(DType::Q4_1, b, 1, out);
        CHECK(out[0] == -1.0f && out[3] == 0.5f && out[15] == 6.5f && out[16] == 6.5f && out[31] == -1.0f);
    }
    {  // q5_0: d = 2; every nibble 1, qh bit i set for odd i -> q = 1 or 17, value 2 (q - 16)
        uint8_t b[22];
        const uint16_t d = f32_to_f16(2.0f);
        std::memcpy(b, &d, 2);
        const uint32_t qh = 0xAAAAAAAAu;
        std::memcpy(b + 2, &qh, 4);
        std::memset(b + 6, 0x11, 16);
        dequantize_blocks(DType::Q5_0, b, 1, out);
        CHECK(out[0] == -30.0f && out[1] == 2.0f && out[30] == -30.0f && out[31] == 2.0f);
    }
    {  // q4_k: d = 1, dmin = 0.5; sub-block s has scale s + 1 and min s (6 bits, packed), quants 3
        uint8_t b[144] = {};
        const uint16_t d = f32_to_f16(1.0f), dmin = f32_to_f16(0.5f);
        std::memcpy(b, &d, 2), std::memcpy(b + 2, &dmin, 2);
        uint8_t* p = b + 4;
        for (int s = 0; s < 4; ++s) p[s] = static_cast<uint8_t>(s + 1), p[4 + s] = static_cast<uint8_t>(s);
        for (int s = 4; s < 8; ++s) p[8 + s - 4] = static_cast<uint8_t>((s + 1) | (s << 4));
        std::memset(b + 16, 0x33, 128);
        dequantize_blocks(DType::Q4_K, b, 1, out);
        for (int s = 0; s < 8; ++s) CHECK(out[32 * s + 5] == static_cast<float>(s + 1) * 3.0f - 0.5f * s);
    }
    {  // q6_k: d = 0.25, scale of sub-block s = s - 8; quants 6-bit value 40 everywhere (40 - 32 = 8)
        uint8_t b[210];
        std::memset(b, 0x88, 128);     // low nibbles 8
        std::memset(b + 128, 0xAA, 64);  // high 2 bits 2 -> 8 | 32 = 40
        for (int s = 0; s < 16; ++s) b[192 + s] = static_cast<uint8_t>(static_cast<int8_t>(s - 8));
        const uint16_t d = f32_to_f16(0.25f);
        std::memcpy(b + 208, &d, 2);
        dequantize_blocks(DType::Q6_K, b, 1, out);
        for (int e = 0; e < 256; e += 7) CHECK(out[e] == 0.25f * static_cast<float>(e / 16 - 8) * 8.0f);
    }
    CHECK_THROWS(dequantize_blocks(DType::Q8_0, nullptr, 1, out), InvalidArgument, "not a GGUF block format");
}

TEST(quants_matmul_every_isa_equals_f32_matmul_of_the_dequantised_matrix_bitwise) {
    // For each format, ragged rows and tokens: the exact matmul reads the block format in
    // place, and its result is bitwise that of the same ISA's f32 matmul on the dequantised
    // weights (the scalar table: the double-accumulating reference on both sides).
    Rng rng{14};
    for (DType t : kQuants) {
        const int64_t n_in = 2 * dtype_block_elems(t) + (dtype_block_elems(t) == 32 ? 64 : 256);
        const int64_t n_out = 21;
        const std::vector<uint8_t> wq = random_blocks(rng, t, n_out, n_in);
        std::vector<float> wf(static_cast<size_t>(n_out * n_in));
        convert_rows(wq.data(), t, wf.data(), DType::F32, n_out, n_in);
        const WeightView vq{wq.data(), t, n_out, n_in};
        const WeightView vf{wf.data(), DType::F32, n_out, n_in};
        for (int64_t n_tok : {1, 3, 6}) {
            const std::vector<float> x = random_vec(rng, n_tok * n_in);
            const std::vector<float> bias = random_vec(rng, n_out);
            for (const KernelTable* k : tables()) {
                std::vector<float> yq(static_cast<size_t>(n_tok * n_out), NAN), yf(yq.size(), NAN);
                k->matmul_rows(vq, x.data(), n_tok, yq.data(), bias.data(), 0, n_out);
                k->matmul_rows(vf, x.data(), n_tok, yf.data(), bias.data(), 0, n_out);
                if (!same_bits(yq, yf))
                    std::fprintf(stderr, "  %s on %s, n_tok=%lld differs\n", dtype_name(t), k->name,
                                 static_cast<long long>(n_tok));
                CHECK(same_bits(yq, yf));
                // and within f32 accumulation of the reference (double) on the same values
                std::vector<float> want(yq.size());
                ref::matmul(vq, x.data(), n_tok, want.data(), bias.data());
                for (size_t i = 0; i < want.size(); ++i) {
                    double mag = 0;
                    const int64_t tok = static_cast<int64_t>(i) / n_out, o = static_cast<int64_t>(i) % n_out;
                    for (int64_t j = 0; j < n_in; ++j) mag += std::fabs(x[tok * n_in + j] * wf[o * n_in + j]);
                    CHECK_NEAR(yq[i], want[i], 2.0 * (n_in / 16 + 5) * 0x1p-24 * mag + 1e-30);
                }
            }
        }
    }
}

TEST(quants_matmul_is_batch_and_thread_invariant_and_mixes_formats_in_matmul_many) {
    Rng rng{15};
    const int64_t n_in = 512, n_tok = 5;
    const std::vector<uint8_t> a = random_blocks(rng, DType::Q4_K, 48, n_in);
    const std::vector<uint8_t> b = random_blocks(rng, DType::Q6_K, 16, n_in);
    const std::vector<float> x = random_vec(rng, n_tok * n_in);
    const WeightView va{a.data(), DType::Q4_K, 48, n_in}, vb{b.data(), DType::Q6_K, 16, n_in};
    std::vector<float> ya(static_cast<size_t>(n_tok * 48)), yb(static_cast<size_t>(n_tok * 16));
    ThreadPool pool1(1);
    matmul(va, x.data(), n_tok, ya.data(), nullptr, pool1);
    matmul(vb, x.data(), n_tok, yb.data(), nullptr, pool1);
    for (int threads : {2, 3}) {
        ThreadPool pool(threads);
        std::vector<float> ya2(ya.size()), yb2(yb.size());
        const MatmulOut outs[2] = {{va, ya2.data(), nullptr}, {vb, yb2.data(), nullptr}};
        matmul_many(outs, 2, x.data(), n_tok, pool);  // q4_K and q6_K side by side (Q4_K_M's attn_q / attn_v)
        CHECK(same_bits(ya, ya2) && same_bits(yb, yb2));
    }
    for (int64_t t = 0; t < n_tok; ++t) {  // one token alone gives its row of the batch
        std::vector<float> one(48);
        matmul(va, x.data() + t * n_in, 1, one.data(), nullptr, pool1);
        CHECK(std::memcmp(one.data(), ya.data() + t * 48, 48 * sizeof(float)) == 0);
    }
    std::vector<float> y(16);
    const WeightView ragged{b.data(), DType::Q6_K, 16, 300};
    CHECK_THROWS(matmul(ragged, x.data(), 1, y.data(), nullptr, pool1), InvalidArgument, "n_in % 256 == 0");
}

// ---- MatmulPrecision::Fast: int8 activations on the GGUF block formats ----
//
// Each block's integer form (quants.h: a * (q - off) + b per 16 elements) is bitwise the
// dequantised value, so the fast path multiplies the exact path's weights. ref::act_to_q8 /
// ref::matmul_rows_q8act define the fast result; every ISA reproduces it bit for bit. Against
// the exact matmul the error is the activations' 8-bit rounding, |x - d q| <= d_x/2 per
// element, plus f32 rounding over the lane's 2 n_in/32 steps and the tree, on the terms'
// magnitudes |a (q - off)| + |b| (which may exceed |w|: k-quant mins cancel):
//   tol = sum_i |w_i| d_x(i)/2 + 2 (2 n_in/32 + 5) 2^-24 sum_i (|a (q_i - off)| + |b|) (|x_i| + d_x(i)).

namespace {

std::vector<const KernelTable*> int8_tables() {
    std::vector<const KernelTable*> out;
    for (const KernelTable* k : tables())
        if (k->matmul_rows_q8act) out.push_back(k);
    // AVX-512 without VNNI (vpmaddubsw instead of vpdpbusd), which the CPU check would not pick here.
    if (kernels_table_avx512()) out.push_back(kernels_avx512_table_unchecked(false, false));
    return out;
}

// The integer form of row o: |w_i| and |a (q_i - off)| + |b| per element.
void row_magnitudes(const WeightView& w, int64_t o, std::vector<double>& absw, std::vector<double>& terms) {
    const int64_t be = dtype_block_elems(w.dtype), bb = dtype_block_bytes(w.dtype);
    const uint8_t* row = static_cast<const uint8_t*>(w.data) + o * row_bytes(w.dtype, w.n_in);
    uint8_t q[256];
    float a[16], b[16];
    absw.assign(static_cast<size_t>(w.n_in), 0.0);
    terms.assign(static_cast<size_t>(w.n_in), 0.0);
    for (int64_t blk = 0; blk < w.n_in / be; ++blk) {
        quant_block_uint(w.dtype, row + blk * bb, q);
        quant_sub_scales(w.dtype, row + blk * bb, a, b);
        for (int64_t e = 0; e < be; ++e) {
            const double qa = static_cast<double>(a[e / 16]) * (q[e] - quant_offset(w.dtype));
            const double bm = quant_has_min(w.dtype) ? static_cast<double>(b[e / 16]) : 0.0;
            absw[static_cast<size_t>(blk * be + e)] = std::fabs(qa + bm);
            terms[static_cast<size_t>(blk * be + e)] = std::fabs(qa) + std::fabs(bm);
        }
    }
}

// How many outputs of y (fast) lie outside the bound above against exact; the first few printed.
int outside_fast_bound(const WeightView& w, const std::vector<float>& x, int64_t n_tok, const std::vector<float>& y,
                       const std::vector<float>& exact) {
    std::vector<uint8_t> act(static_cast<size_t>(n_tok * q8_act_row_bytes(w.n_in)));
    ref::act_to_q8(x.data(), n_tok, w.n_in, act.data());
    std::vector<double> absw, terms;
    int bad = 0;
    for (int64_t o = 0; o < w.n_out; ++o) {
        row_magnitudes(w, o, absw, terms);
        for (int64_t t = 0; t < n_tok; ++t) {
            double quant = 0.0, mag = 0.0;
            for (int64_t i = 0; i < w.n_in; ++i) {
                float d;
                std::memcpy(&d, act.data() + t * q8_act_row_bytes(w.n_in) + w.n_in + 4 * (i / 32), 4);
                quant += absw[static_cast<size_t>(i)] * d / 2;
                mag += terms[static_cast<size_t>(i)] * (std::fabs(x[static_cast<size_t>(t * w.n_in + i)]) + d);
            }
            const double tol = quant + 2.0 * (2.0 * static_cast<double>(w.n_in) / 32 + 5) * 0x1p-24 * mag;
            const double err = std::fabs(y[static_cast<size_t>(t * w.n_out + o)] - exact[static_cast<size_t>(t * w.n_out + o)]);
            if (!(err <= tol) && bad++ < 3)
                std::fprintf(stderr, "  %s o=%lld t=%lld: |%.9g - %.9g| > %.3g\n", dtype_name(w.dtype),
                             static_cast<long long>(o), static_cast<long long>(t), y[static_cast<size_t>(t * w.n_out + o)],
                             exact[static_cast<size_t>(t * w.n_out + o)], tol);
        }
    }
    return bad;
}

}  // namespace

TEST(quants_integer_form_is_bitwise_the_dequantised_value) {
    Rng rng{16};
    for (DType t : kQuants) {
        const int64_t be = dtype_block_elems(t), n_blocks = 40;
        const std::vector<uint8_t> w = random_blocks(rng, t, 1, be * n_blocks);
        std::vector<float> want(static_cast<size_t>(be * n_blocks));
        dequantize_blocks(t, w.data(), n_blocks, want.data());
        int bad = 0;
        for (int64_t blk = 0; blk < n_blocks; ++blk) {
            uint8_t q[256];
            float a[16], b[16];
            quant_block_uint(t, w.data() + blk * dtype_block_bytes(t), q);
            quant_sub_scales(t, w.data() + blk * dtype_block_bytes(t), a, b);
            for (int64_t e = 0; e < be; ++e) {
                CHECK(q[e] < 64);
                float v = a[e / 16] * static_cast<float>(q[e] - quant_offset(t));
                if (quant_has_min(t)) v = v + b[e / 16];
                const float ref_v = want[static_cast<size_t>(blk * be + e)];
                if (std::memcmp(&v, &ref_v, 4) != 0 && bad++ < 3)
                    std::fprintf(stderr, "  %s block %lld elem %lld: %.9g != %.9g\n", dtype_name(t),
                                 static_cast<long long>(blk), static_cast<long long>(e), v, ref_v);
            }
        }
        CHECK(bad == 0);
    }
}

TEST(quants_fast_matmul_every_isa_equals_reference_bitwise) {
    Rng rng{17};
    const std::vector<const KernelTable*> ks = int8_tables();
    for (DType t : kQuants) {
        const int64_t be = dtype_block_elems(t);
        for (int64_t n_blocks : {1, 3}) {
            const int64_t n_in = n_blocks * be, n_out = 19;  // ragged against every row tile (8, 4, 3)
            const std::vector<uint8_t> wq = random_blocks(rng, t, n_out, n_in);
            const WeightView w{wq.data(), t, n_out, n_in, MatmulPrecision::Fast};
            const std::vector<float> bias = random_vec(rng, n_out);
            for (int64_t n_tok : {1, 2, 5, 9}) {
                const std::vector<float> x = random_vec(rng, n_tok * n_in, -2.0f, 2.0f);
                std::vector<uint8_t> act(static_cast<size_t>(n_tok * q8_act_row_bytes(n_in)));
                ref::act_to_q8(x.data(), n_tok, n_in, act.data());
                for (const float* b : {static_cast<const float*>(nullptr), bias.data()}) {
                    std::vector<float> want(static_cast<size_t>(n_tok * n_out), NAN);
                    ref::matmul_rows_q8act(w, act.data(), n_tok, want.data(), b, 0, n_out);
                    for (const KernelTable* k : ks) {
                        std::vector<float> got(want.size(), NAN);
                        k->matmul_rows_q8act(w, act.data(), n_tok, got.data(), b, 0, n_out);
                        if (!same_bits(got, want))
                            std::fprintf(stderr, "  %s %s [%lld x %lld] n_tok=%lld differs from the reference\n",
                                         k->name, dtype_name(t), static_cast<long long>(n_out),
                                         static_cast<long long>(n_in), static_cast<long long>(n_tok));
                        CHECK(same_bits(got, want));
                        std::vector<float> part(want.size(), NAN);  // a row range alone: the same rows
                        k->matmul_rows_q8act(w, act.data(), n_tok, part.data(), b, 5, n_out);
                        for (int64_t tok = 0; tok < n_tok; ++tok)
                            CHECK(std::memcmp(part.data() + tok * n_out + 5, want.data() + tok * n_out + 5,
                                              static_cast<size_t>(n_out - 5) * sizeof(float)) == 0);
                    }
                }
            }
        }
    }
}

TEST(quants_fast_matmul_is_within_activation_rounding_of_exact_and_batch_invariant) {
    Rng rng{18};
    ThreadPool pool1(1), pool2(2);
    for (DType t : kQuants) {
        const int64_t n_in = dtype_block_elems(t) == 32 ? 640 : 768, n_out = 67;
        const std::vector<uint8_t> wq = random_blocks(rng, t, n_out, n_in);
        const WeightView w{wq.data(), t, n_out, n_in, MatmulPrecision::Fast};
        const int64_t n_tok = 7;
        const std::vector<float> x = random_vec(rng, n_tok * n_in, -2.0f, 2.0f);
        std::vector<float> y(static_cast<size_t>(n_tok * n_out), NAN), exact(y.size()), y1(y.size());
        matmul(w, x.data(), n_tok, y.data(), nullptr, pool2);  // dispatched: the fast path
        ref::matmul(w, x.data(), n_tok, exact.data(), nullptr);
        CHECK(outside_fast_bound(w, x, n_tok, y, exact) == 0);
        std::vector<uint8_t> act(static_cast<size_t>(n_tok * q8_act_row_bytes(n_in)));
        ref::act_to_q8(x.data(), n_tok, n_in, act.data());
        ref::matmul_rows_q8act(w, act.data(), n_tok, y1.data(), nullptr, 0, n_out);
        CHECK(same_bits(y, y1));  // the dispatched path is the defined one
        for (int64_t tok = 0; tok < n_tok; ++tok) {  // one token alone, one thread: its row of the batch
            std::vector<float> one(static_cast<size_t>(n_out));
            matmul(w, x.data() + tok * n_in, 1, one.data(), nullptr, pool1);
            CHECK(std::memcmp(one.data(), y.data() + tok * n_out, static_cast<size_t>(n_out) * sizeof(float)) == 0);
        }
        // and the exact path still is exact: Exact precision gives the f32 matmul of the dequantised matrix
        const WeightView we{wq.data(), t, n_out, n_in, MatmulPrecision::Exact};
        std::vector<float> ye(y.size());
        matmul(we, x.data(), n_tok, ye.data(), nullptr, pool2);
        CHECK(!same_bits(ye, y));
    }
}

TEST(quants_fast_matmul_many_mixes_q4_k_m_formats_on_one_rounding_of_x) {
    // A Q4_K_M layer's q / k / v: q5_0, q4_K and q8_0 under fast precision share one act_to_q8;
    // each output is bitwise its own fast matmul. f32 beside q8_0 falls back to exact for both.
    Rng rng{19};
    const int64_t n_in = 512, n_tok = 6;
    const std::vector<uint8_t> a = random_blocks(rng, DType::Q5_0, 40, n_in), b = random_blocks(rng, DType::Q4_K, 24, n_in);
    std::vector<uint8_t> c(static_cast<size_t>(row_bytes(DType::Q8_0, n_in) * 16));
    const std::vector<float> cf = random_vec(rng, 16 * n_in);
    convert_rows(cf.data(), DType::F32, c.data(), DType::Q8_0, 16, n_in);
    const std::vector<float> x = random_vec(rng, n_tok * n_in);
    const auto F = MatmulPrecision::Fast;
    const WeightView wa{a.data(), DType::Q5_0, 40, n_in, F}, wb{b.data(), DType::Q4_K, 24, n_in, F},
        wc{c.data(), DType::Q8_0, 16, n_in, F};
    ThreadPool pool(2);
    std::vector<float> ya(static_cast<size_t>(n_tok * 40)), yb(static_cast<size_t>(n_tok * 24)),
        yc(static_cast<size_t>(n_tok * 16));
    matmul(wa, x.data(), n_tok, ya.data(), nullptr, pool);
    matmul(wb, x.data(), n_tok, yb.data(), nullptr, pool);
    matmul(wc, x.data(), n_tok, yc.data(), nullptr, pool);
    std::vector<float> ya2(ya.size()), yb2(yb.size()), yc2(yc.size());
    const MatmulOut outs[3] = {{wa, ya2.data(), nullptr}, {wb, yb2.data(), nullptr}, {wc, yc2.data(), nullptr}};
    matmul_many(outs, 3, x.data(), n_tok, pool);
    CHECK(same_bits(ya, ya2) && same_bits(yb, yb2) && same_bits(yc, yc2));
    // with an f32 output beside them the call is exact for all
    const std::vector<float> f = random_vec(rng, 16 * n_in);
    const WeightView wf{f.data(), DType::F32, 16, n_in, F};
    std::vector<float> yf(static_cast<size_t>(n_tok * 16)), ye(yb.size());
    const MatmulOut mixed[2] = {{wb, yb2.data(), nullptr}, {wf, yf.data(), nullptr}};
    matmul_many(mixed, 2, x.data(), n_tok, pool);
    const WeightView wbe{b.data(), DType::Q4_K, 24, n_in, MatmulPrecision::Exact};
    matmul(wbe, x.data(), n_tok, ye.data(), nullptr, pool);
    CHECK(same_bits(ye, yb2));
}
