// backend_cpu.h — the CPU backend: the SIMD kernels (kernels/) behind the Backend seam.
// Owner: engine core. Thread-safety: as Backend (one driving thread); the kernels split
// each op over the backend's own thread pool, which it lends as host_pool().
//
// Every op runs when it is called, so every fence is 0 (complete) and begin_unit /
// end_unit only mark the bracket. What this backend adds to the bare kernels is the
// step: token positions for rope, block addresses per layer for the KV ops, the split
// of attention into tasks (below), and the split of the row-wise and element-wise ops
// (norms, rope, KV stores, activations, adds) over the pool by whole rows, which never
// changes a bit (split_rows).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "backend.h"
#include "threadpool.h"

namespace lmx {

class CpuBackend final : public Backend {
public:
    explicit CpuBackend(int n_threads);

    const char* name() const override { return "cpu"; }
    ThreadPool& host_pool() override { return pool_; }
    int scratch_lanes() const override { return pool_.n_threads(); }

    void begin_step(const StepDesc& step) override;
    void begin_unit(CopyFence) override {}
    ComputeFence end_unit() override { return {}; }
    void end_step() override;
    void abort_step() noexcept override;

    void embed(const WeightView& table, const int32_t* tokens, float* x) override;
    void rmsnorm(const float* x, const float* weight, float eps, int64_t n_rows, int64_t dim, float* y) override;
    void matmul_many(const MatmulOut* outs, int n_outs, const float* x, int64_t n_rows) override;
    void rope(float* x, int n_heads, int head_dim, const float* inv_freq) override;
    void kv_append(int layer, const float* k, const float* v) override;
    void attention(int layer, const float* q, const AttnParams& p, float* out) override;
    void silu_mul(const float* gate, const float* up, float* out, int64_t n) override;
    void gelu_tanh_mul(const float* gate, const float* up, float* out, int64_t n) override;
    void softcap(float* x, int64_t n, float cap) override;
    void scale(float* x, float s, int64_t n) override;
    void add(float* x, const float* y, int64_t n) override;
    void gather_rows(const float* x, int64_t dim, float* rows) override;
    float* read_host(float* src, int64_t) override { return src; }

private:
    // One attention task: a chunk of one sequence's queries, for KV heads [kv0, kv1).
    struct AttnTask {
        int seq;
        int64_t t0;  // first token (row in the step)
        int32_t q0;  // first query within the sequence
        int32_t n_q;
        int kv0, kv1;
    };
    void plan_attention(int n_kv_heads);
    // K row of position pos (f32 or f16 elements, step_.kv.f16); V is kv.v_offset elements further.
    uint8_t* kv_row(int seq, int64_t pos, int layer);
    // fn(r0, r1) over rows [0, n_rows) in contiguous chunks on the pool; on the calling thread
    // alone when the op is small (n_rows * row_elems below a threshold: a decode step's).
    void split_rows(int64_t n_rows, int64_t row_elems, const std::function<void(int64_t, int64_t)>& fn);
    // The same over n elements of a flat array, in chunks of a multiple of 16 (the kernels' vector width).
    void split_elems(int64_t n, const std::function<void(int64_t, int64_t)>& fn);

    ThreadPool pool_;
    StepDesc step_;
    std::vector<StepSeq> seqs_;
    std::vector<int64_t> pos_;        // [n_tokens] position of each token of the step
    std::vector<int32_t> tok_seq_;    // [n_tokens] the sequence (index in seqs_) of each token
    std::vector<AttnTask> tasks_;     // planned at the step's first attention call
    int tasks_kv_heads_ = -1;         // the n_kv_heads tasks_ were planned for
    std::vector<std::vector<const float*>> kptr_, vptr_;  // per sequence: this layer's block rows
    std::vector<std::vector<const uint16_t*>> kptr16_, vptr16_;  // the same over f16 pages
};

}  // namespace lmx
