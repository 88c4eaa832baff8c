// forward.cpp — the Llama / Qwen2 decoder stack, batch-first, over paged KV.
// Owner: engine core. Thread-safety: step thread only (see forward.h).
#include "forward.h"

#include <cassert>
#include <cmath>
#include <cstring>

namespace lmx {

namespace {
constexpr int kAttnChunk = 16;  // queries per attention task

uint64_t floats(int64_t n) { return align_up(static_cast<uint64_t>(n) * 4, kAlign); }

WeightView view(const uint8_t* unit, uint64_t off, DType t, int64_t n_out, int64_t n_in, MatmulPrecision p) {
    return WeightView{unit + off, t, n_out, n_in, p};
}
const float* fvec(const uint8_t* unit, uint64_t off) { return reinterpret_cast<const float*>(unit + off); }
}  // namespace

uint64_t workspace_bytes(const ModelSpec& s, int max_tokens, int max_logit_rows, int n_threads) {
    const int64_t T = max_tokens;
    return floats(T * s.dim) * 2 + floats(T * s.q_dim()) * 2 + floats(T * s.kv_dim()) * 2 + floats(T * s.ffn_dim) * 2 +
           floats(static_cast<int64_t>(max_logit_rows) * s.dim) +
           floats(static_cast<int64_t>(max_logit_rows) * s.n_vocab) +
           floats(static_cast<int64_t>(n_threads) * (s.n_ctx + kAttnChunk));
}

void workspace_init(Workspace& ws, uint8_t* mem, const ModelSpec& s, int max_tokens, int max_logit_rows, int n_threads) {
    const int64_t T = max_tokens;
    auto take = [&](int64_t n) {
        float* p = reinterpret_cast<float*>(mem);
        mem += floats(n);
        return p;
    };
    ws.max_tokens = max_tokens;
    ws.max_logit_rows = max_logit_rows;
    ws.n_threads = n_threads;
    ws.scratch_floats = static_cast<int64_t>(s.n_ctx) + kAttnChunk;
    ws.x = take(T * s.dim);
    ws.xb = take(T * s.dim);
    ws.q = take(T * s.q_dim());
    ws.att = take(T * s.q_dim());
    ws.k = take(T * s.kv_dim());
    ws.v = take(T * s.kv_dim());
    ws.gate = take(T * s.ffn_dim);
    ws.up = take(T * s.ffn_dim);
    ws.rows = take(static_cast<int64_t>(max_logit_rows) * s.dim);
    ws.logits = take(static_cast<int64_t>(max_logit_rows) * s.n_vocab);
    ws.scratch = take(static_cast<int64_t>(n_threads) * ws.scratch_floats);
}

void forward_step(const ModelWeights& w, int model_id, Residency& res, KvCache& kv, Workspace& ws,
                  const std::vector<ForwardItem>& items, ThreadPool& pool) {
    const ModelSpec& s = w.spec();
    const DType wt = w.matrix_dtype();
    const MatmulPrecision prec = s.matmul_precision;
    const int64_t dim = s.dim, qd = s.q_dim(), kvd = s.kv_dim(), ffn = s.ffn_dim;
    const int bt = kv.block_tokens();
    const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));

    // Token embedding (host table) into the residual stream.
    int64_t T = 0;
    for (const ForwardItem& it : items) {
        for (int32_t i = 0; i < it.n_tokens; i++) dequantize_row(w.embed(), it.tokens[i], ws.x + (T + i) * dim);
        T += it.n_tokens;
    }
    assert(T <= ws.max_tokens);

    // Attention tasks: (item, chunk of queries, KV heads); each runs the kernel on its own
    // scratch. A step with fewer chunks than threads (one decoding sequence) splits them by
    // KV head, so no thread idles through it; KV heads are independent, so no bit changes.
    struct AttnTask {
        size_t item;
        int64_t t0;  // first token (row in the step)
        int32_t q0;  // first query within the item
        int32_t n_q;
        int kv0, kv1;  // KV heads [kv0, kv1)
    };
    std::vector<AttnTask> tasks;
    {
        int64_t t = 0;
        for (size_t i = 0; i < items.size(); i++) {
            for (int32_t q0 = 0; q0 < items[i].n_tokens; q0 += kAttnChunk)
                tasks.push_back({i, t + q0, q0, std::min<int32_t>(kAttnChunk, items[i].n_tokens - q0), 0, s.n_kv_heads});
            t += items[i].n_tokens;
        }
        if (tasks.size() < static_cast<size_t>(pool.n_threads()) && s.n_kv_heads > 1) {
            std::vector<AttnTask> split;
            for (const AttnTask& a : tasks)
                for (int kv = 0; kv < s.n_kv_heads; kv++) split.push_back({a.item, a.t0, a.q0, a.n_q, kv, kv + 1});
            tasks.swap(split);
        }
    }
    std::vector<std::vector<const float*>> kptr(items.size()), vptr(items.size());

    const LayerLayout& L = w.layer_layout();
    for (int l = 0; l < s.n_layer; l++) {
        const UnitRef ref{model_id, l};
        const uint8_t* u = res.acquire(ref);

        rmsnorm(ws.x, fvec(u, L.attn_norm), s.rms_eps, T, dim, ws.xb);
        {  // q, k and v in one hand-off to the pool
            const MatmulOut qkv[3] = {{view(u, L.wq, wt, qd, dim, prec), ws.q, s.qkv_bias ? fvec(u, L.bq) : nullptr},
                                      {view(u, L.wk, wt, kvd, dim, prec), ws.k, s.qkv_bias ? fvec(u, L.bk) : nullptr},
                                      {view(u, L.wv, wt, kvd, dim, prec), ws.v, s.qkv_bias ? fvec(u, L.bv) : nullptr}};
            matmul_many(qkv, 3, ws.xb, T, pool);
        }

        // RoPE, then append this step's K/V to each sequence's pages.
        int64_t t = 0;
        for (size_t i = 0; i < items.size(); i++) {
            const ForwardItem& it = items[i];
            const std::vector<int32_t>& table = *it.blocks;
            for (int32_t j = 0; j < it.n_tokens; j++, t++) {
                const int64_t pos = it.pos0 + j;
                rope(ws.q + t * qd, s.n_heads, s.head_dim, pos, s.rope_inv_freq.data());
                rope(ws.k + t * kvd, s.n_kv_heads, s.head_dim, pos, s.rope_inv_freq.data());
                const int32_t blk = table[static_cast<size_t>(pos / bt)];
                const int64_t row = pos % bt;
                std::memcpy(kv.k(blk, l) + row * kvd, ws.k + t * kvd, static_cast<size_t>(kvd) * 4);
                std::memcpy(kv.v(blk, l) + row * kvd, ws.v + t * kvd, static_cast<size_t>(kvd) * 4);
            }
            const size_t n_blocks = static_cast<size_t>((it.pos0 + it.n_tokens + bt - 1) / bt);
            kptr[i].resize(n_blocks);
            vptr[i].resize(n_blocks);
            for (size_t b = 0; b < n_blocks; b++) {
                kptr[i][b] = kv.k(table[b], l);
                vptr[i][b] = kv.v(table[b], l);
            }
        }
        pool.parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t ti, int thread) {
            const AttnTask& a = tasks[static_cast<size_t>(ti)];
            const ForwardItem& it = items[a.item];
            attention_kv_heads(ws.q + a.t0 * qd, a.n_q, it.pos0 + a.q0, kptr[a.item].data(), vptr[a.item].data(), bt,
                               s.n_heads, s.n_kv_heads, s.head_dim, scale, ws.att + a.t0 * qd,
                               ws.scratch + thread * ws.scratch_floats, a.kv0, a.kv1);
        });

        matmul(view(u, L.wo, wt, dim, qd, prec), ws.att, T, ws.xb, nullptr, pool);
        for (int64_t i = 0; i < T * dim; i++) ws.x[i] += ws.xb[i];

        rmsnorm(ws.x, fvec(u, L.ffn_norm), s.rms_eps, T, dim, ws.xb);
        {
            const MatmulOut gate_up[2] = {{view(u, L.w_gate, wt, ffn, dim, prec), ws.gate, nullptr},
                                          {view(u, L.w_up, wt, ffn, dim, prec), ws.up, nullptr}};
            matmul_many(gate_up, 2, ws.xb, T, pool);
        }
        silu_mul(ws.gate, ws.up, ws.gate, T * ffn);
        matmul(view(u, L.w_down, wt, dim, ffn, prec), ws.gate, T, ws.xb, nullptr, pool);
        for (int64_t i = 0; i < T * dim; i++) ws.x[i] += ws.xb[i];

        res.release(ref);
    }

    // Head: only the rows that sample a token pay for the vocabulary projection.
    int64_t n_rows = 0, t_end = 0;
    for (const ForwardItem& it : items) {
        t_end += it.n_tokens;
        if (it.want_logits) std::memcpy(ws.rows + (n_rows++) * dim, ws.x + (t_end - 1) * dim, static_cast<size_t>(dim) * 4);
    }
    const UnitRef head{model_id, s.n_layer};
    const uint8_t* u = res.acquire(head);
    if (n_rows > 0) {
        const HeadLayout& H = w.head_layout();
        rmsnorm(ws.rows, fvec(u, H.norm), s.rms_eps, n_rows, dim, ws.rows);
        matmul(view(u, H.lm_head, wt, s.n_vocab, dim, prec), ws.rows, n_rows, ws.logits, nullptr, pool);
    }
    res.release(head);
}

}  // namespace lmx
