// kernels/dispatch.cpp — picks the kernel table for this CPU and splits matmul over the pool.
// Owner: kernels. Thread-safety: the choice is made once (thread-safe static); every
// op is a pure function; matmul must be called from the pool's one calling thread.
//
// Built for baseline x86-64: it only calls into an ISA file after
// __builtin_cpu_supports said yes (libgcc also checks that the OS saves the registers).
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../threadpool.h"
#include "kernels_impl.h"

namespace lmx {

namespace {

bool cpu_has_avx2() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

bool cpu_has_avx512() {
    __builtin_cpu_init();
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

// The scalar table runs the fast q8_0 / q4_0 path too: its reference is the definition
// the SIMD builds reproduce bit for bit, so results do not depend on the ISA.
const KernelTable kScalar = {
    "scalar",      &ref::matmul_rows, &ref::rmsnorm, &ref::silu_mul, &ref::softmax, &ref::attention_kv_heads, nullptr, nullptr,
    &ref::act_to_q8, &ref::matmul_rows_q8act, &ref::matmul_rows_x16, &ref::attention_kv_heads_f16,
    nullptr,  // gelu_tanh_mul: the baseline float loop
};


const KernelTable& choose_table() {
    // LMX_KERNELS forces a lower ISA (benchmarks, tests, debugging); an unsupported or
    // unknown name falls back to the automatic choice.
    if (const char* want = std::getenv("LMX_KERNELS")) {
        if (std::strcmp(want, "scalar") == 0) return *kernels_table_scalar();
        if (std::strcmp(want, "avx2") == 0 && kernels_table_avx2()) return *kernels_table_avx2();
        if (std::strcmp(want, "avx512") == 0 && kernels_table_avx512()) return *kernels_table_avx512();
    }
    if (const KernelTable* t = kernels_table_avx512()) return *t;
    if (const KernelTable* t = kernels_table_avx2()) return *t;
    return *kernels_table_scalar();
}

// Output rows per matmul task. A task's weights (<= kTaskBytes) stay in L2 while it
// walks its token tiles; rows come in multiples of 16 so that, for aligned y and
// n_out % 16 == 0, no two tasks write the same cache line of y. At least
// kTasksPerThread tasks per thread when the matrix allows, so the dynamic hand-out can
// even out a thread that started late. The row split never changes a result.
constexpr int64_t kTaskBytes = 128 * 1024;
constexpr int64_t kTasksPerThread = 4;
constexpr int64_t kRowQuantum = 16;
// Below this many multiply-adds a call runs on the calling thread: waking workers costs more.
constexpr int64_t kMinParallelMacs = 64 * 1024;

int64_t rows_per_task(int64_t n_out, int64_t row_b, int n_threads) {
    auto round_up = [](int64_t v) { return (v + kRowQuantum - 1) / kRowQuantum * kRowQuantum; };
    int64_t rows = kTaskBytes / (row_b > 0 ? row_b : 1) / kRowQuantum * kRowQuantum;
    const int64_t balanced = round_up((n_out + kTasksPerThread * n_threads - 1) / (kTasksPerThread * n_threads));
    if (rows > balanced) rows = balanced;
    if (rows < kRowQuantum) rows = kRowQuantum;
    return rows;
}

}  // namespace

const KernelTable* kernels_table_scalar() { return &kScalar; }
const KernelTable* kernels_table_avx2() { return cpu_has_avx2() ? kernels_avx2_table_unchecked() : nullptr; }
const KernelTable* kernels_table_avx512() {
    if (!cpu_has_avx512()) return nullptr;
    return kernels_avx512_table_unchecked(__builtin_cpu_supports("avx512bf16") != 0,
                                          __builtin_cpu_supports("avx512vnni") != 0);
}


const KernelTable& kernels_active() {
    static const KernelTable& table = choose_table();
    return table;
}

const char* kernels_isa() { return kernels_active().name; }

void matmul(const WeightView& w, const float* x, int64_t n_tok, float* y, const float* bias, ThreadPool& pool) {
    const MatmulOut out{w, y, bias};
    matmul_many(&out, 1, x, n_tok, pool);
}

// All outputs' row ranges form one task list, handed to the pool at once: one barrier
// for q, k and v (or gate and up) instead of one each, and the small matrices' tasks
// fill the gaps the large one leaves at its end. A task's rows are computed exactly
// as matmul() would, so the result is bitwise that of separate calls.
void matmul_many(const MatmulOut* outs, int n_outs, const float* x, int64_t n_tok, ThreadPool& pool) {
    constexpr int kMaxOuts = 4;
    if (n_outs < 1 || n_outs > kMaxOuts)
        throw InvalidArgument("matmul_many: expected 1.." + std::to_string(kMaxOuts) + " outputs, found " +
                              std::to_string(n_outs));
    const WeightView& w0 = outs[0].w;
    // The int8-activation formats (q8_0, q4_0, the GGUF block formats, the x16 forms) share one
    // rounding of the activations (act_to_q8), so outputs of different such formats (a GGUF
    // Q4_K_M layer's q5_0 q / k and q8_0 v) take the fast path together. Any other mix of
    // formats takes the exact path together; an x16 format (int8 only) mixes only with int8 ones.
    bool mixed = false, any_x16 = false, all_int8 = true;
    for (int j = 0; j < n_outs; ++j) {
        const DType t = outs[j].w.dtype;
        mixed = mixed || t != w0.dtype;
        any_x16 = any_x16 || dtype_is_x16(t);
        all_int8 = all_int8 && (dtype_is_blocked(t) || dtype_is_gguf_quant(t));
    }
    for (int j = 1; j < n_outs; ++j)
        if (outs[j].w.n_in != w0.n_in || outs[j].w.precision != w0.precision)
            throw InvalidArgument("matmul_many: every output needs the same n_in and precision");
    if (any_x16 && !all_int8)
        throw InvalidArgument("matmul_many: an x16 format mixes only with int8-activation formats (q8_0, q4_0, GGUF "
                              "block formats)");
    for (int j = 0; j < n_outs; ++j)
        if (outs[j].w.n_in % dtype_block_elems(outs[j].w.dtype) != 0)
            throw InvalidArgument(std::string("matmul: ") + dtype_name(outs[j].w.dtype) + " weights need n_in % " +
                                  std::to_string(dtype_block_elems(outs[j].w.dtype)) +
                                  " == 0, found n_in=" + std::to_string(outs[j].w.n_in));
    for (int j = 0; j < n_outs; ++j)
        if (dtype_is_x16(outs[j].w.dtype) && outs[j].w.n_out % kX16Rows != 0)
            throw InvalidArgument(std::string("matmul: ") + dtype_name(outs[j].w.dtype) +
                                  " weights come in groups of 16 rows, found n_out=" + std::to_string(outs[j].w.n_out));
    int64_t n_out_all = 0;
    for (int j = 0; j < n_outs; ++j) n_out_all += outs[j].w.n_out;
    if (n_tok <= 0 || n_out_all <= 0) return;
    const KernelTable& k = kernels_active();
    const bool inline_call = n_out_all * w0.n_in * n_tok < kMinParallelMacs || pool.n_threads() == 1;
    // Per output: rows per task (one task covering every row when the call is too small
    // to share; the split never changes a result, so this is purely a latency choice),
    // and the index of its first task.
    int64_t rows[kMaxOuts], first[kMaxOuts + 1];
    first[0] = 0;
    for (int j = 0; j < n_outs; ++j) {
        const WeightView& w = outs[j].w;
        rows[j] = inline_call || w.n_out == 0 ? (w.n_out > 0 ? w.n_out : 1)
                                              : rows_per_task(w.n_out, row_bytes(w.dtype, w.n_in), pool.n_threads());
        first[j + 1] = first[j] + (w.n_out + rows[j] - 1) / rows[j];
    }
    // Runs rows_fn(out, row0, row1) for every task over the pool.
    auto run_tasks = [&](auto&& rows_fn) {
        pool.parallel_for(first[n_outs], [&](int64_t task, int) {
            int j = 0;
            while (task >= first[j + 1]) ++j;
            const int64_t r0 = (task - first[j]) * rows[j];
            rows_fn(outs[j], r0, r0 + rows[j] < outs[j].w.n_out ? r0 + rows[j] : outs[j].w.n_out);
        });
    };
    const bool fast = w0.precision == MatmulPrecision::Fast;
    // The x16 formats (repacked at load for fast precision) always take int8 activations;
    // tasks are whole 16-row groups (rows_per_task gives multiples of kRowQuantum = 16).
    if (any_x16 || (all_int8 && fast && k.matmul_rows_q8act)) {
        // Quantise the activations to int8 blocks once per call, on the calling thread,
        // into a per-thread buffer that only grows (no allocation in the steady state).
        thread_local std::vector<uint8_t> act;
        act.resize(static_cast<size_t>(n_tok * q8_act_row_bytes(w0.n_in)));
        k.act_to_q8(x, n_tok, w0.n_in, act.data());
        // By pointer: inside the lambda, `act` would name the worker's own thread_local.
        const uint8_t* act_data = act.data();
        run_tasks([&](const MatmulOut& o, int64_t r0, int64_t r1) {
            (dtype_is_x16(o.w.dtype) ? k.matmul_rows_x16 : k.matmul_rows_q8act)(o.w, act_data, n_tok, o.y, o.bias, r0, r1);
        });
        return;
    }
    if (w0.dtype == DType::BF16 && k.matmul_rows_bf16act && fast && !mixed) {
        // Round the activations once per call, as above.
        thread_local std::vector<uint16_t> act;
        act.resize(static_cast<size_t>(n_tok * bf16_act_stride(w0.n_in)));
        k.act_to_bf16(x, n_tok, w0.n_in, act.data());
        const uint16_t* act_data = act.data();
        run_tasks([&](const MatmulOut& o, int64_t r0, int64_t r1) {
            k.matmul_rows_bf16act(o.w, act_data, n_tok, o.y, o.bias, r0, r1);
        });
        return;
    }
    run_tasks([&](const MatmulOut& o, int64_t r0, int64_t r1) { k.matmul_rows(o.w, x, n_tok, o.y, o.bias, r0, r1); });
}

void rmsnorm(const float* x, const float* weight, float eps, int64_t n_tok, int64_t dim, float* y) {
    kernels_active().rmsnorm(x, weight, eps, n_tok, dim, y);
}

void silu_mul(const float* gate, const float* up, float* out, int64_t n) { kernels_active().silu_mul(gate, up, out, n); }

void softmax(float* x, int64_t n) { kernels_active().softmax(x, n); }

void attention(const float* q, int64_t n_q, int64_t pos0, const float* const* k_blocks, const float* const* v_blocks,
               int block_tokens, int n_heads, int n_kv_heads, int head_dim, float scale, float* out, float* scratch,
               int64_t window) {
    kernels_active().attention(q, n_q, pos0, k_blocks, v_blocks, block_tokens, n_heads, n_kv_heads, head_dim, scale,
                               out, scratch, 0, n_kv_heads, window);
}

void attention_kv_heads(const float* q, int64_t n_q, int64_t pos0, const float* const* k_blocks,
                        const float* const* v_blocks, int block_tokens, int n_heads, int n_kv_heads, int head_dim,
                        float scale, float* out, float* scratch, int kv0, int kv1, int64_t window) {
    kernels_active().attention(q, n_q, pos0, k_blocks, v_blocks, block_tokens, n_heads, n_kv_heads, head_dim, scale,
                               out, scratch, kv0, kv1, window);
}

void attention_kv_heads_f16(const float* q, int64_t n_q, int64_t pos0, const uint16_t* const* k_blocks,
                            const uint16_t* const* v_blocks, int block_tokens, int n_heads, int n_kv_heads,
                            int head_dim, float scale, float* out, float* scratch, int kv0, int kv1, int64_t window) {
    kernels_active().attention_f16(q, n_q, pos0, k_blocks, v_blocks, block_tokens, n_heads, n_kv_heads, head_dim,
                                   scale, out, scratch, kv0, kv1, window);
}

// rope is cheap next to the matmuls around it and its precision is visible in every
// logit, so the fast version computes exactly the reference formula (float angle,
// cosf/sinf, no FMA contraction — this file is built without -mfma) and only hoists
// cos/sin out of the head loop; the rotation loop is left to the auto-vectoriser.
// Result: bitwise equal to ref::rope.
void rope(float* x, int n_heads, int head_dim, int64_t pos, const float* inv_freq) {
    constexpr int kChunk = 128;
    const int half = head_dim / 2;
    float c[kChunk], s[kChunk];  // cos/sin of angles i0 .. i0+n-1
    for (int i0 = 0; i0 < half; i0 += kChunk) {
        const int n = half - i0 < kChunk ? half - i0 : kChunk;
        for (int i = 0; i < n; ++i) {
            const float angle = static_cast<float>(pos) * inv_freq[i0 + i];
            c[i] = std::cos(angle);
            s[i] = std::sin(angle);
        }
        for (int h = 0; h < n_heads; ++h) {
            float* x0 = x + static_cast<int64_t>(h) * head_dim + i0;
            float* x1 = x0 + half;
            for (int i = 0; i < n; ++i) {
                const float a = x0[i], b = x1[i];
                x0[i] = a * c[i] - b * s[i];
                x1[i] = b * c[i] + a * s[i];
            }
        }
    }
}

}  // namespace lmx
