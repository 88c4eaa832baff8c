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
