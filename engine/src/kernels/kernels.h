// kernels/kernels.h — the numeric ops of the forward pass and the weight converters.
// Owner: kernels. Each op has a scalar reference (namespace lmx::ref, in
// kernels/reference.cpp) and a dispatched fast version (namespace lmx); tests
// compare the two. Thread-safety: pure functions; matmul uses the given pool.
//
// Contracts every implementation keeps:
//  * Batch invariance: the value computed for one token (one row of x) does not
//    depend on how many other tokens are in the call, nor on the thread count.
//    Fixed accumulation order per output element; work is split over output
//    rows, never over the reduction dimension.
//  * Layouts are row-major. A weight matrix W is [n_out, n_in]; its rows are
//    contiguous, each row_bytes(dtype, n_in) long. Q8_0 rows are n_in/32 blocks
//    of {uint16 f16 scale d; int8 qs[32]}, value = d * qs[i] (llama.cpp's block_q8_0);
//    Q4_0 rows n_in/32 blocks of {f16 d; uint8 qs[16]}, value = d * (nibble - 8), low
//    nibbles elements 0..15, high nibbles 16..31 (llama.cpp's block_q4_0).
//  * x16 formats (Q8_0X16, Q4_0X16: Q8_0 / Q4_0 repacked by repack_x16 for integer
//    dots, so that one 64-byte vector holds 4 elements of 16 rows): rows come in groups
//    of 16 (n_out % 16 == 0), group G (rows 16G .. 16G+15) at byte G * 16 * row_bytes.
//    With n_b = n_in / 32, a group is n_b blocks of quants, then n_b x 16 f16 scales
//    (block b's 32 bytes: d of rows 16G .. 16G+15). Block b's quants:
//      Q8_0X16, 512 bytes: for k = 0..7, for r = 0..15, four bytes q + 128 (so unsigned)
//               of elements 32b + 4k .. 32b + 4k + 3 of row r;
//      Q4_0X16, 256 bytes: for k = 0..3, for r = 0..15, four bytes whose low nibbles are
//               elements 32b + 4k .. +3 and high nibbles 32b + 16 + 4k .. +3 of row r,
//               as stored (nibble = q + 8).
//    Same bytes per matrix as Q8_0 / Q4_0; values exactly theirs.
#pragma once

#include <cstdint>

#include "../common.h"

namespace lmx {

class ThreadPool;

enum class MatmulPrecision : uint8_t { Exact = 0, Fast = 1 };

struct WeightView {
    const void* data;  // [n_out, row_bytes(dtype, n_in)]; x16 formats: 16-row groups (above)
    DType dtype;
    int64_t n_out;
    int64_t n_in;
    MatmulPrecision precision = MatmulPrecision::Exact;  // see "Matmul precision" below
};

// ---- conversion (load time) ----
// Converts n_rows x n_cols elements from src (dtype src_t: F32, F16 or BF16) to
// dst (dtype dst_t: any). Q8_0 quantisation: d = max|x| / 127, q = round(x / d).
// Q4_0 quantisation (llama.cpp's quantize_row_q4_0_ref): the value of largest magnitude
// m (sign kept) gives d = m / -8, nibble = min(15, trunc(x / d + 8.5)).
// Precondition: dst_t is not a block format (Q8_0, Q4_0) or n_cols % 32 == 0.
void convert_rows(const void* src, DType src_t, void* dst, DType dst_t, int64_t n_rows, int64_t n_cols);
// Dequantises one row of a weight matrix into out[n_in] (embedding lookup).
void dequantize_row(const WeightView& w, int64_t row, float* out);
// Repacks a Q8_0 or Q4_0 matrix [n_rows, n_cols] (src_t) into its x16 form (dst, the same
// number of bytes). Precondition: n_rows % 16 == 0 and n_cols % 32 == 0.
void repack_x16(const void* src, DType src_t, void* dst, int64_t n_rows, int64_t n_cols);

// ---- forward ops; all activations f32 ----
// y[t, o] = sum_i x[t, i] * W[o, i]  (+ bias[o] when bias != nullptr)
// x: [n_tok, n_in], y: [n_tok, n_out]. Splits over output rows across the pool.
void matmul(const WeightView& w, const float* x, int64_t n_tok, float* y, const float* bias, ThreadPool& pool);

// Several matmuls of the same activations x [n_tok, n_in] (q, k and v; gate and up) in
// one hand-off to the pool: outs[j].y = x W_j^T (+ outs[j].bias), bitwise what matmul()
// gives for each. Every W_j has the same n_in and dtype; 1 <= n_outs <= 4.
struct MatmulOut {
    WeightView w;
    float* y;           // [n_tok, w.n_out]
    const float* bias;  // [w.n_out] or nullptr
};
void matmul_many(const MatmulOut* outs, int n_outs, const float* x, int64_t n_tok, ThreadPool& pool);

// Matmul precision belongs to each weight view (WeightView::precision: the engine sets it per
// model from EngineConfig.matmul_precision; tests and kernel benchmarks set it per view). There
// is no process-wide setting: two engines of different precision never affect each other.
//  exact (default): activations stay f32, weights are widened exactly, f32 FMA in a
//    fixed order: bitwise the same on AVX2 and AVX-512 machines.
//  fast: where the CPU has a denser dot product, activations are rounded to its format
//    once per call, as llama.cpp does. Today:
//    * bf16 weights on AVX512_BF16 CPUs take bf16 activations (vdpbf16ps: twice the
//      multiply-adds per instruction of f32 FMA; each product then carries a relative
//      error up to 2^-8);
//    * q8_0, q4_0 and the GGUF block formats (Q4_1 .. Q6_K, in the integer form of
//      kernels/quants.h) take int8 activations, one f32 scale per block of 32
//      (|error| <= d_x/2 per element), and integer block dots (vpdpbusd, or vpmaddubsw
//      on AVX2); defined bit for bit by ref::matmul_rows_q8act, the same on every ISA.
//    Every other case stays exact. Still batch- and thread-invariant. matmul_many needs
//    one precision for all its outputs; outputs of different int8 formats (a GGUF Q4_K_M
//    layer's q5_0 q / k and q8_0 v) share one rounding of x, any other mix runs exact.
//  The x16 formats always take the int8 path (defined by ref::matmul_rows_x16): a model
//  loaded under fast precision stores its q8_0 / q4_0 matrices that way (model.cpp).

// y[t, :] = x[t, :] / sqrt(mean(x[t, :]^2) + eps) * weight[:]   (x may alias y)
void rmsnorm(const float* x, const float* weight, float eps, int64_t n_tok, int64_t dim, float* y);

// Rotary embedding, Hugging Face "rotate_half" layout: for i < head_dim/2 the
// pair is (i, i + head_dim/2), angle = pos * inv_freq[i].
// x: [n_heads, head_dim] for ONE token at position pos, rotated in place.
void rope(float* x, int n_heads, int head_dim, int64_t pos, const float* inv_freq);

// out[i] = silu(gate[i]) * up[i]   (out may alias gate)
void silu_mul(const float* gate, const float* up, float* out, int64_t n);

// out[i] = gelu_tanh(gate[i]) * up[i]   (out may alias gate); Gemma's GeGLU, with
// gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (PyTorch's approximate="tanh").
// Defined in kernels/activation.cpp.
void gelu_tanh_mul(const float* gate, const float* up, float* out, int64_t n);

// x[i] = cap * tanh(x[i] / cap) over x[n] (Gemma's final logit soft-capping), cap > 0.
void softcap(float* x, int64_t n, float cap);

// In-place softmax over x[n].
void softmax(float* x, int64_t n);

// Causal attention of one sequence's n_q query tokens over its paged KV cache.
// q:   [n_q, n_heads, head_dim], query i sits at position pos0 + i and attends
//      to key positions 0 .. pos0 + i inclusive.
// k_blocks[b], v_blocks[b]: block b of this layer, each [block_tokens, n_kv_heads, head_dim];
//      key position p lives in block p / block_tokens, row p % block_tokens.
// out: [n_q, n_heads, head_dim]. Head h reads KV head h / (n_heads / n_kv_heads).
// scratch: at least (pos0 + n_q) floats, used for the scores of one (query, head).
// window > 0 (sliding-window layers): query i attends to key positions
//      max(0, pos0 + i + 1 - window) .. pos0 + i only; 0 = every key (the default).
//      The keys before the window are never read (they may be stale or unset).
void attention(const float* q, int64_t n_q, int64_t pos0, const float* const* k_blocks,
               const float* const* v_blocks, int block_tokens, int n_heads, int n_kv_heads, int head_dim,
               float scale, float* out, float* scratch, int64_t window = 0);
// attention() for the query heads of KV heads [kv0, kv1) only (0 <= kv0 < kv1 <= n_kv_heads):
// writes those heads of out, bitwise what attention() writes there. KV heads are
// independent, so one decode token's attention can be split over threads this way.
void attention_kv_heads(const float* q, int64_t n_q, int64_t pos0, const float* const* k_blocks,
                        const float* const* v_blocks, int block_tokens, int n_heads, int n_kv_heads, int head_dim,
                        float scale, float* out, float* scratch, int kv0, int kv1, int64_t window = 0);
// attention_kv_heads() over f16 KV pages (EngineConfig.kv_dtype "f16"): each element is widened
// to f32 exactly, so the result is bitwise attention_kv_heads() over f32 pages of the widened values.
void attention_kv_heads_f16(const float* q, int64_t n_q, int64_t pos0, const uint16_t* const* k_blocks,
                            const uint16_t* const* v_blocks, int block_tokens, int n_heads, int n_kv_heads,
                            int head_dim, float scale, float* out, float* scratch, int kv0, int kv1,
                            int64_t window = 0);

// Which SIMD path the dispatcher chose on this CPU ("avx512", "avx2", "scalar").
// The environment variable LMX_KERNELS=scalar|avx2 forces a lower one (read once).
const char* kernels_isa();

namespace ref {  // scalar references, same signatures and contracts
void matmul(const WeightView& w, const float* x, int64_t n_tok, float* y, const float* bias);
void rmsnorm(const float* x, const float* weight, float eps, int64_t n_tok, int64_t dim, float* y);
void rope(float* x, int n_heads, int head_dim, int64_t pos, const float* inv_freq);
void silu_mul(const float* gate, const float* up, float* out, int64_t n);
void gelu_tanh_mul(const float* gate, const float* up, float* out, int64_t n);
void softcap(float* x, int64_t n, float cap);
void softmax(float* x, int64_t n);
void attention(const float* q, int64_t n_q, int64_t pos0, const float* const* k_blocks,
               const float* const* v_blocks, int block_tokens, int n_heads, int n_kv_heads, int head_dim,
               float scale, float* out, float* scratch, int64_t window = 0);
void attention_kv_heads(const float* q, int64_t n_q, int64_t pos0, const float* const* k_blocks,
                        const float* const* v_blocks, int block_tokens, int n_heads, int n_kv_heads, int head_dim,
                        float scale, float* out, float* scratch, int kv0, int kv1, int64_t window = 0);
void attention_kv_heads_f16(const float* q, int64_t n_q, int64_t pos0, const uint16_t* const* k_blocks,
                            const uint16_t* const* v_blocks, int block_tokens, int n_heads, int n_kv_heads,
                            int head_dim, float scale, float* out, float* scratch, int kv0, int kv1,
                            int64_t window = 0);
}  // namespace ref

}  // namespace lmx
