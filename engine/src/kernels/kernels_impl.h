// kernels/kernels_impl.h — the per-ISA kernel tables the dispatcher chooses from.
// Owner: kernels (internal; the engine includes kernels.h, tests may include this).
// Thread-safety: tables are immutable; every entry is a pure function.
//
// Each ISA file (kernels_avx2.cpp, kernels_avx512.cpp) exports one table of plain
// function pointers and nothing else: std:: templates and the thread pool are used
// only from baseline-compiled files (dispatch.cpp), so no inline function compiled
// with AVX flags can be picked by the linker for code that runs on an older CPU.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace lmx {

struct KernelTable {
    const char* name;  // "avx512" | "avx2" | "scalar"
    // matmul restricted to output rows [row0, row1): writes y[t, row0:row1] for all t.
    // Results do not depend on row0/row1 (a row's value is the same in any range).
    void (*matmul_rows)(const WeightView& w, const float* x, int64_t n_tok, float* y, const float* bias,
                        int64_t row0, int64_t row1);
    void (*rmsnorm)(const float* x, const float* weight, float eps, int64_t n_tok, int64_t dim, float* y);
    void (*silu_mul)(const float* gate, const float* up, float* out, int64_t n);
    void (*softmax)(float* x, int64_t n);
    // attention_kv_heads (kernels.h): only the query heads of KV heads [kv0, kv1); window 0 = all keys.
    void (*attention)(const float* q, int64_t n_q, int64_t pos0, const float* const* k_blocks,
                      const float* const* v_blocks, int block_tokens, int n_heads, int n_kv_heads, int head_dim,
                      float scale, float* out, float* scratch, int kv0, int kv1, int64_t window);
    // MatmulPrecision::Fast for bf16 weights; nullptr when the ISA has no bf16 dot product.
    // act_to_bf16 rounds x [n_tok, n_in] to act [n_tok, bf16_act_stride(n_in)] (zero-padded);
    // matmul_rows_bf16act is matmul_rows on those activations.
    void (*act_to_bf16)(const float* x, int64_t n_tok, int64_t n_in, uint16_t* act);
    void (*matmul_rows_bf16act)(const WeightView& w, const uint16_t* act, int64_t n_tok, float* y,
                                const float* bias, int64_t row0, int64_t row1);
    // MatmulPrecision::Fast for q8_0, q4_0 and the GGUF block formats (integer block dot products).
    // act_to_q8 quantises x [n_tok, n_in] (n_in % 32 == 0) to act [n_tok, q8_act_row_bytes(n_in)];
    // matmul_rows_q8act is matmul_rows on those activations. The math, bit for bit, is
    // ref::act_to_q8 / ref::matmul_rows_q8act (reference.cpp), on every ISA.
    void (*act_to_q8)(const float* x, int64_t n_tok, int64_t n_in, uint8_t* act);
    void (*matmul_rows_q8act)(const WeightView& w, const uint8_t* act, int64_t n_tok, float* y, const float* bias,
                              int64_t row0, int64_t row1);
    // The x16 formats on act_to_q8's activations; row0 and row1 are multiples of 16.
    // Bit for bit ref::matmul_rows_x16 on every ISA.
    void (*matmul_rows_x16)(const WeightView& w, const uint8_t* act, int64_t n_tok, float* y, const float* bias,
                            int64_t row0, int64_t row1);
    // attention over f16 KV pages (kernels.h attention_kv_heads_f16): bitwise `attention` over
    // f32 pages holding the widened values, on every ISA.
    void (*attention_f16)(const float* q, int64_t n_q, int64_t pos0, const uint16_t* const* k_blocks,
                          const uint16_t* const* v_blocks, int block_tokens, int n_heads, int n_kv_heads, int head_dim,
                          float scale, float* out, float* scratch, int kv0, int kv1, int64_t window);
    // kernels.h gelu_tanh_mul; nullptr: the baseline float loop (activation.cpp).
    void (*gelu_tanh_mul)(const float* gate, const float* up, float* out, int64_t n);
};

// Row stride, in elements, of bf16 activations: n_in rounded up to a whole 32-element step.
static inline int64_t bf16_act_stride(int64_t n_in) { return (n_in + 31) / 32 * 32; }

// One token's quantised activations: int8 qs[n_in], then f32 d[n_in / 32] (block b's
// value i is d[b] * qs[32b + i]), then int32 sum[n_in / 32] (block b's sum of qs, for
// the x16 kernels' unsigned-weight correction). Precondition: n_in % 32 == 0.
static inline int64_t q8_act_row_bytes(int64_t n_in) { return n_in + n_in / kQ8BlockElems * 8; }

// Tables by ISA. The SIMD ones return nullptr when the CPU (or OS) lacks the ISA,
// so a caller can never run them where they would fault.
const KernelTable* kernels_table_scalar();
const KernelTable* kernels_table_avx2();    // AVX2 + FMA + F16C
const KernelTable* kernels_table_avx512();  // AVX-512 F/BW/VL/DQ + FMA + F16C (+ BF16 if present)
// The table matmul & co. use: the best supported one, or the one named by the
// environment variable LMX_KERNELS ("scalar" | "avx2" | "avx512") if supported.
const KernelTable& kernels_active();

// Raw table getters of the ISA files; call only after checking CPU support.
const KernelTable* kernels_avx2_table_unchecked();
const KernelTable* kernels_avx512_table_unchecked(bool with_bf16, bool with_vnni);

namespace ref {
// Scalar matmul on output rows [row0, row1) (double accumulation), the scalar table's kernel.
void matmul_rows(const WeightView& w, const float* x, int64_t n_tok, float* y, const float* bias, int64_t row0,
                 int64_t row1);
// The fast (quantised-activation) matmul of q8_0, q4_0 and the GGUF block formats: the definition
// every ISA reproduces.
void act_to_q8(const float* x, int64_t n_tok, int64_t n_in, uint8_t* act);
void matmul_rows_q8act(const WeightView& w, const uint8_t* act, int64_t n_tok, float* y, const float* bias,
                       int64_t row0, int64_t row1);
// The x16 formats' matmul (int8 activations): the definition every ISA reproduces.
void matmul_rows_x16(const WeightView& w, const uint8_t* act, int64_t n_tok, float* y, const float* bias,
                     int64_t row0, int64_t row1);
}  // namespace ref

}  // namespace lmx
