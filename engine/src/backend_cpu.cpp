// backend_cpu.cpp — the CPU backend: each op calls the dispatched kernel on the pool, now.
// Owner: engine core. Thread-safety: see backend_cpu.h.
#include "backend_cpu.h"

#include <algorithm>
#include <cassert>
#include <cstring>

namespace lmx {

namespace {
constexpr int kAttnChunk = 16;  // queries per attention task
// Row-wise and element-wise ops smaller than this run on the calling thread: waking the
// workers costs more than they save (a decode step's norms and adds are a few thousand floats).
constexpr int64_t kMinSplitElems = 16 * 1024;
constexpr int64_t kSplitTasksPerThread = 4;
constexpr int64_t kElemQuantum = 256;  // split_elems' chunks: a multiple of every kernel's 16 lanes
}

CpuBackend::CpuBackend(int n_threads) : pool_(n_threads) {}

void CpuBackend::begin_step(const StepDesc& step) {
    step_ = step;
    seqs_.assign(step.seqs, step.seqs + step.n_seqs);
    step_.seqs = seqs_.data();
    pos_.resize(static_cast<size_t>(step.n_tokens));
    tok_seq_.resize(static_cast<size_t>(step.n_tokens));
    int64_t t = 0;
    for (size_t i = 0; i < seqs_.size(); i++)
        for (int32_t j = 0; j < seqs_[i].n_tokens; j++, t++) {
            pos_[static_cast<size_t>(t)] = seqs_[i].pos0 + j;
            tok_seq_[static_cast<size_t>(t)] = static_cast<int32_t>(i);
        }
    assert(t == step.n_tokens);
    tasks_.clear();
    tasks_kv_heads_ = -1;
    kptr_.resize(seqs_.size());
    vptr_.resize(seqs_.size());
    kptr16_.resize(seqs_.size());
    vptr16_.resize(seqs_.size());
}

void CpuBackend::end_step() { seqs_.clear(); }

void CpuBackend::abort_step() noexcept { seqs_.clear(); }

void CpuBackend::split_rows(int64_t n_rows, int64_t row_elems, const std::function<void(int64_t, int64_t)>& fn) {
    const int64_t n_threads = pool_.n_threads();
    if (n_threads <= 1 || n_rows < 2 || n_rows * row_elems < kMinSplitElems) {
        fn(0, n_rows);
        return;
    }
    const int64_t per = (n_rows + n_threads * kSplitTasksPerThread - 1) / (n_threads * kSplitTasksPerThread);
    pool_.parallel_for((n_rows + per - 1) / per,
                       [&](int64_t i, int) { fn(i * per, std::min(n_rows, (i + 1) * per)); });
}

void CpuBackend::split_elems(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    split_rows((n + kElemQuantum - 1) / kElemQuantum, kElemQuantum,
               [&](int64_t c0, int64_t c1) { fn(c0 * kElemQuantum, std::min(n, c1 * kElemQuantum)); });
}

void CpuBackend::embed(const WeightView& table, const int32_t* tokens, float* x) {
    split_rows(step_.n_tokens, table.n_in, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; t++) dequantize_row(table, tokens[t], x + t * table.n_in);
    });
}

void CpuBackend::rmsnorm(const float* x, const float* weight, float eps, int64_t n_rows, int64_t dim, float* y) {
    split_rows(n_rows, dim, [&](int64_t r0, int64_t r1) {
        lmx::rmsnorm(x + r0 * dim, weight, eps, r1 - r0, dim, y + r0 * dim);
    });
}

void CpuBackend::matmul_many(const MatmulOut* outs, int n_outs, const float* x, int64_t n_rows) {
    lmx::matmul_many(outs, n_outs, x, n_rows, pool_);
}

void CpuBackend::rope(float* x, int n_heads, int head_dim, const float* inv_freq) {
    const int64_t row = static_cast<int64_t>(n_heads) * head_dim;
    split_rows(step_.n_tokens, row, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; t++)
            lmx::rope(x + t * row, n_heads, head_dim, pos_[static_cast<size_t>(t)], inv_freq);
    });
}

uint8_t* CpuBackend::kv_row(int seq, int64_t pos, int layer) {
    const KvGeometry& g = step_.kv;
    const StepSeq& s = seqs_[static_cast<size_t>(seq)];
    assert(pos / g.block_tokens < s.n_blocks);
    // a device address: a host pointer here
    uint8_t* block = reinterpret_cast<uint8_t*>(s.kv_blocks[pos / g.block_tokens]);
    return block + (layer * g.layer_stride + (pos % g.block_tokens) * g.kv_dim) * (g.f16 ? 2 : 4);
}

void CpuBackend::kv_append(int layer, const float* k, const float* v) {
    const int64_t kvd = step_.kv.kv_dim;
    const bool f16 = step_.kv.f16;
    split_rows(step_.n_tokens, 2 * kvd, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; t++) {
            uint8_t* kr = kv_row(tok_seq_[static_cast<size_t>(t)], pos_[static_cast<size_t>(t)], layer);
            if (f16) {  // rounded to nearest even, saturated at the f16 range; attention widens them exactly
                uint16_t* kh = reinterpret_cast<uint16_t*>(kr);
                uint16_t* vh = kh + step_.kv.v_offset;
                constexpr float kF16Max = 65504.0f;
                for (int64_t d = 0; d < kvd; d++) {
                    kh[d] = f32_to_f16(std::clamp(k[t * kvd + d], -kF16Max, kF16Max));
                    vh[d] = f32_to_f16(std::clamp(v[t * kvd + d], -kF16Max, kF16Max));
                }
            } else {
                std::memcpy(kr, k + t * kvd, static_cast<size_t>(kvd) * 4);
                std::memcpy(reinterpret_cast<float*>(kr) + step_.kv.v_offset, v + t * kvd,
                            static_cast<size_t>(kvd) * 4);
            }
        }
    });
}

// Tasks: (sequence, chunk of queries, KV heads); each runs the kernel on its own thread's
// scratch lane. A step with fewer chunks than threads (one decoding sequence) splits them
// by KV head, so no thread idles through it; KV heads are independent, so no bit changes.
void CpuBackend::plan_attention(int n_kv_heads) {
    tasks_.clear();
    int64_t t = 0;
    for (int i = 0; i < step_.n_seqs; i++) {
        const StepSeq& s = seqs_[static_cast<size_t>(i)];
        for (int32_t q0 = 0; q0 < s.n_tokens; q0 += kAttnChunk)
            tasks_.push_back({i, t + q0, q0, std::min<int32_t>(kAttnChunk, s.n_tokens - q0), 0, n_kv_heads});
        t += s.n_tokens;
    }
    if (tasks_.size() < static_cast<size_t>(pool_.n_threads()) && n_kv_heads > 1) {
        std::vector<AttnTask> split;
        for (const AttnTask& a : tasks_)
            for (int kv = 0; kv < n_kv_heads; kv++) split.push_back({a.seq, a.t0, a.q0, a.n_q, kv, kv + 1});
        tasks_.swap(split);
    }
    tasks_kv_heads_ = n_kv_heads;
}

void CpuBackend::attention(int layer, const float* q, const AttnParams& p, float* out) {
    if (tasks_kv_heads_ != p.n_kv_heads) plan_attention(p.n_kv_heads);
    const KvGeometry& g = step_.kv;
    for (int i = 0; i < step_.n_seqs; i++) {
        const StepSeq& s = seqs_[static_cast<size_t>(i)];
        const size_t n_blocks = static_cast<size_t>((s.pos0 + s.n_tokens + g.block_tokens - 1) / g.block_tokens);
        assert(n_blocks <= static_cast<size_t>(s.n_blocks));
        if (g.f16) {
            std::vector<const uint16_t*>& kp = kptr16_[static_cast<size_t>(i)];
            std::vector<const uint16_t*>& vp = vptr16_[static_cast<size_t>(i)];
            kp.resize(n_blocks);
            vp.resize(n_blocks);
            for (size_t b = 0; b < n_blocks; b++) {
                kp[b] = reinterpret_cast<const uint16_t*>(s.kv_blocks[b]) + layer * g.layer_stride;
                vp[b] = kp[b] + g.v_offset;
            }
            continue;
        }
        std::vector<const float*>& kp = kptr_[static_cast<size_t>(i)];
        std::vector<const float*>& vp = vptr_[static_cast<size_t>(i)];
        kp.resize(n_blocks);
        vp.resize(n_blocks);
        for (size_t b = 0; b < n_blocks; b++) {
            kp[b] = s.kv_blocks[b] + layer * g.layer_stride;
            vp[b] = kp[b] + g.v_offset;
        }
    }
    const int64_t qd = static_cast<int64_t>(p.n_heads) * p.head_dim;
    assert(step_.scratch != nullptr && step_.scratch_lane_floats > 0);
    pool_.parallel_for(static_cast<int64_t>(tasks_.size()), [&](int64_t ti, int thread) {
        const AttnTask& a = tasks_[static_cast<size_t>(ti)];
        const StepSeq& s = seqs_[static_cast<size_t>(a.seq)];
        if (g.f16) {
            attention_kv_heads_f16(q + a.t0 * qd, a.n_q, s.pos0 + a.q0, kptr16_[static_cast<size_t>(a.seq)].data(),
                                   vptr16_[static_cast<size_t>(a.seq)].data(), g.block_tokens, p.n_heads,
                                   p.n_kv_heads, p.head_dim, p.scale, out + a.t0 * qd,
                                   step_.scratch + thread * step_.scratch_lane_floats, a.kv0, a.kv1, p.window);
            return;
        }
        attention_kv_heads(q + a.t0 * qd, a.n_q, s.pos0 + a.q0, kptr_[static_cast<size_t>(a.seq)].data(),
                           vptr_[static_cast<size_t>(a.seq)].data(), g.block_tokens, p.n_heads, p.n_kv_heads,
                           p.head_dim, p.scale, out + a.t0 * qd, step_.scratch + thread * step_.scratch_lane_floats,
                           a.kv0, a.kv1, p.window);
    });
}

void CpuBackend::silu_mul(const float* gate, const float* up, float* out, int64_t n) {
    split_elems(n, [&](int64_t i0, int64_t i1) { lmx::silu_mul(gate + i0, up + i0, out + i0, i1 - i0); });
}

void CpuBackend::gelu_tanh_mul(const float* gate, const float* up, float* out, int64_t n) {
    split_elems(n, [&](int64_t i0, int64_t i1) { lmx::gelu_tanh_mul(gate + i0, up + i0, out + i0, i1 - i0); });
}

void CpuBackend::softcap(float* x, int64_t n, float cap) { lmx::softcap(x, n, cap); }

void CpuBackend::scale(float* x, float s, int64_t n) {
    split_elems(n, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) x[i] *= s;
    });
}

void CpuBackend::add(float* x, const float* y, int64_t n) {
    split_elems(n, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; i++) x[i] += y[i];
    });
}

void CpuBackend::gather_rows(const float* x, int64_t dim, float* rows) {
    int64_t n_rows = 0, t_end = 0;
    for (const StepSeq& s : seqs_) {
        t_end += s.n_tokens;
        if (s.want_logits) std::memcpy(rows + (n_rows++) * dim, x + (t_end - 1) * dim, static_cast<size_t>(dim) * 4);
    }
}

}  // namespace lmx
