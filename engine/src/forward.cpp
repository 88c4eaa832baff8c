// forward.cpp — the Llama / Qwen2 / Qwen3 / Gemma3 decoder stack, batch-first, over paged KV, on a Backend.
// Owner: engine core. Thread-safety: step thread only (see forward.h).
#include "forward.h"

#include <cassert>
#include <cmath>

namespace lmx {

namespace {
constexpr int kScratchSlackFloats = 16;  // a lane holds n_ctx scores and this slack

uint64_t floats(int64_t n) { return align_up(static_cast<uint64_t>(n) * 4, kAlign); }

WeightView view(const uint8_t* unit, uint64_t off, const MatrixFormats& f, int64_t n_out, int64_t n_in,
                MatmulPrecision p) {
    return WeightView{unit + off, f.at(off), n_out, n_in, p};
}
const float* fvec(const uint8_t* unit, uint64_t off) { return reinterpret_cast<const float*>(unit + off); }

// Begins a step on the backend and aborts it unless end() ran: an exception in any op
// leaves the backend ready for the next step, with nothing in flight.
class StepScope {
public:
    StepScope(Backend& be, const StepDesc& d) : be_(be) { be_.begin_step(d); }
    ~StepScope() {
        if (!ended_) be_.abort_step();
    }
    StepScope(const StepScope&) = delete;
    StepScope& operator=(const StepScope&) = delete;
    void end() {
        be_.end_step();
        ended_ = true;
    }

private:
    Backend& be_;
    bool ended_ = false;
};
}  // namespace

uint64_t workspace_bytes(const ModelSpec& s, int max_tokens, int max_logit_rows, int n_lanes) {
    const int64_t T = max_tokens;
    return floats(T * s.dim) * 2 + floats(T * s.q_dim()) * 2 + floats(T * s.kv_dim()) * 2 + floats(T * s.ffn_dim) * 2 +
           floats(static_cast<int64_t>(max_logit_rows) * s.dim) +
           floats(static_cast<int64_t>(max_logit_rows) * s.n_vocab) +
           floats(static_cast<int64_t>(n_lanes) * (s.n_ctx + kScratchSlackFloats));
}

void workspace_init(Workspace& ws, uint8_t* mem, const ModelSpec& s, int max_tokens, int max_logit_rows, int n_lanes) {
    const int64_t T = max_tokens;
    auto take = [&](int64_t n) {
        float* p = reinterpret_cast<float*>(mem);
        mem += floats(n);
        return p;
    };
    ws.max_tokens = max_tokens;
    ws.max_logit_rows = max_logit_rows;
    ws.n_lanes = n_lanes;
    ws.scratch_floats = static_cast<int64_t>(s.n_ctx) + kScratchSlackFloats;
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
    ws.scratch = take(static_cast<int64_t>(n_lanes) * ws.scratch_floats);
}

float* forward_step(const ModelWeights& w, int model_id, Residency& res, KvCache& kv, Workspace& ws,
                    const std::vector<ForwardItem>& items, Backend& be) {
    const ModelSpec& s = w.spec();
    MatrixFormats wt{w, 0};  // each matrix's own format (unit set per layer below)
    const MatmulPrecision prec = s.matmul_precision;
    const int64_t dim = s.dim, qd = s.q_dim(), kvd = s.kv_dim(), ffn = s.ffn_dim;
    assert(ws.n_lanes >= be.scratch_lanes());

    // The step as the backend sees it: tokens, positions, and each sequence's KV block addresses.
    std::vector<int32_t> tokens;
    std::vector<StepSeq> seqs(items.size());
    std::vector<std::vector<float*>> blocks(items.size());
    int64_t n_rows = 0;
    for (size_t i = 0; i < items.size(); i++) {
        const ForwardItem& it = items[i];
        tokens.insert(tokens.end(), it.tokens, it.tokens + it.n_tokens);
        for (int32_t id : *it.blocks) blocks[i].push_back(kv.block_start(id));
        seqs[i] = StepSeq{it.n_tokens, it.pos0, blocks[i].data(), static_cast<int32_t>(blocks[i].size()), it.want_logits};
        n_rows += it.want_logits ? 1 : 0;
    }
    const int64_t T = static_cast<int64_t>(tokens.size());
    assert(T <= ws.max_tokens && n_rows <= ws.max_logit_rows);
    StepDesc desc;
    desc.seqs = seqs.data();
    desc.n_seqs = static_cast<int>(seqs.size());
    desc.n_tokens = T;
    desc.n_logit_rows = n_rows;
    desc.kv = kv.geometry();
    desc.scratch = ws.scratch;
    desc.scratch_lane_floats = ws.scratch_floats;
    AttnParams attn{s.n_heads, s.n_kv_heads, s.head_dim,
                    s.attn_scale > 0.0f ? s.attn_scale : 1.0f / std::sqrt(static_cast<float>(s.head_dim))};

    StepScope step(be, desc);
    be.embed(w.embed(), tokens.data(), ws.x);  // host table into the residual stream
    if (s.embed_scale != 1.0f) be.scale(ws.x, s.embed_scale, T * dim);  // Gemma: times sqrt(dim)

    const LayerLayout& L = w.layer_layout();
    for (int l = 0; l < s.n_layer; l++) {
        UnitPin pin(res, UnitRef{model_id, l});
        const uint8_t* u = pin.data();
        wt.unit = l;
        be.begin_unit(pin.ready());

        be.rmsnorm(ws.x, fvec(u, L.attn_norm), s.rms_eps, T, dim, ws.xb);
        {  // q, k and v in one hand-off
            const MatmulOut qkv[3] = {{view(u, L.wq, wt, qd, dim, prec), ws.q, s.qkv_bias ? fvec(u, L.bq) : nullptr},
                                      {view(u, L.wk, wt, kvd, dim, prec), ws.k, s.qkv_bias ? fvec(u, L.bk) : nullptr},
                                      {view(u, L.wv, wt, kvd, dim, prec), ws.v, s.qkv_bias ? fvec(u, L.bv) : nullptr}};
            be.matmul_many(qkv, 3, ws.xb, T);
        }
        if (s.qk_norm) {  // Qwen3 / Gemma3: each head of q and k normalised on its own, before RoPE
            be.rmsnorm(ws.q, fvec(u, L.q_norm), s.rms_eps, T * s.n_heads, s.head_dim, ws.q);
            be.rmsnorm(ws.k, fvec(u, L.k_norm), s.rms_eps, T * s.n_kv_heads, s.head_dim, ws.k);
        }
        const float* inv_freq = s.rope_for(l).data();  // Gemma3's sliding layers have their own base
        be.rope(ws.q, s.n_heads, s.head_dim, inv_freq);
        be.rope(ws.k, s.n_kv_heads, s.head_dim, inv_freq);
        be.kv_append(l, ws.k, ws.v);
        attn.window = s.window(l);
        be.attention(l, ws.q, attn, ws.att);

        const MatmulOut o{view(u, L.wo, wt, dim, qd, prec), ws.xb, nullptr};
        be.matmul_many(&o, 1, ws.att, T);
        if (s.post_norms) be.rmsnorm(ws.xb, fvec(u, L.post_attn_norm), s.rms_eps, T, dim, ws.xb);
        be.add(ws.x, ws.xb, T * dim);

        be.rmsnorm(ws.x, fvec(u, L.ffn_norm), s.rms_eps, T, dim, ws.xb);
        {
            const MatmulOut gate_up[2] = {{view(u, L.w_gate, wt, ffn, dim, prec), ws.gate, nullptr},
                                          {view(u, L.w_up, wt, ffn, dim, prec), ws.up, nullptr}};
            be.matmul_many(gate_up, 2, ws.xb, T);
        }
        if (s.ffn_act == "gelu_tanh")
            be.gelu_tanh_mul(ws.gate, ws.up, ws.gate, T * ffn);
        else
            be.silu_mul(ws.gate, ws.up, ws.gate, T * ffn);
        const MatmulOut down{view(u, L.w_down, wt, dim, ffn, prec), ws.xb, nullptr};
        be.matmul_many(&down, 1, ws.gate, T);
        if (s.post_norms) be.rmsnorm(ws.xb, fvec(u, L.post_ffn_norm), s.rms_eps, T, dim, ws.xb);
        be.add(ws.x, ws.xb, T * dim);

        pin.done(be.end_unit());
    }

    // Head: only the rows that sample a token pay for the vocabulary projection.
    be.gather_rows(ws.x, dim, ws.rows);
    {
        UnitPin pin(res, UnitRef{model_id, s.n_layer});
        const uint8_t* u = pin.data();
        wt.unit = s.n_layer;
        be.begin_unit(pin.ready());
        if (n_rows > 0) {
            const HeadLayout& H = w.head_layout();
            be.rmsnorm(ws.rows, fvec(u, H.norm), s.rms_eps, n_rows, dim, ws.rows);
            const MatmulOut head{view(u, H.lm_head, wt, s.n_vocab, dim, prec), ws.logits, nullptr};
            be.matmul_many(&head, 1, ws.rows, n_rows);
            if (s.final_logit_softcap > 0.0f) be.softcap(ws.logits, n_rows * s.n_vocab, s.final_logit_softcap);
        }
        pin.done(be.end_unit());
    }
    float* logits = n_rows > 0 ? be.read_host(ws.logits, n_rows * s.n_vocab) : nullptr;
    step.end();
    return logits;
}

}  // namespace lmx
