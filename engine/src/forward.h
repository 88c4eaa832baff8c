// forward.h — one batched forward pass of one model over a step's tokens.
// Owner: engine core; called by the step thread only.
// Thread-safety: uses the workspace exclusively; the ops run on the device's Backend.
//
// Batch-first: every item (a sequence's prompt chunk or its one decode token)
// goes through each layer together, so a streamed layer is fetched once per step
// for the whole batch. Each layer unit is acquired from Residency right before
// use and released right after, which is what lets the copy thread stream the
// next units while this one computes. forward.cpp says WHAT the model computes;
// the Backend (backend.h) says how and where; forward.cpp never calls a kernel itself.
#pragma once

#include <cstdint>
#include <vector>

#include "backend.h"
#include "kv_cache.h"
#include "model.h"
#include "residency.h"

namespace lmx {

struct ForwardItem {
    const int32_t* tokens;              // [n_tokens] token ids to run
    int32_t n_tokens;
    int64_t pos0;                       // position of tokens[0]
    const std::vector<int32_t>* blocks; // block table, covering pos0 + n_tokens positions
    bool want_logits;                   // logits for the last token of this item
};

// Activation buffers of one model, carved out of one booked device buffer.
struct Workspace {
    int max_tokens = 0;      // tokens per step
    int max_logit_rows = 0;  // items per step
    int n_lanes = 0;                   // backend scratch lanes (Backend::scratch_lanes)
    int64_t scratch_floats = 0;        // per lane
    float* x = nullptr;       // [max_tokens, dim]   residual stream
    float* xb = nullptr;      // [max_tokens, dim]
    float* q = nullptr;       // [max_tokens, q_dim]
    float* k = nullptr;       // [max_tokens, kv_dim]
    float* v = nullptr;       // [max_tokens, kv_dim]
    float* att = nullptr;     // [max_tokens, q_dim]
    float* gate = nullptr;    // [max_tokens, ffn_dim]
    float* up = nullptr;      // [max_tokens, ffn_dim]
    float* rows = nullptr;    // [max_logit_rows, dim]  hidden states that get logits
    float* logits = nullptr;  // [max_logit_rows, n_vocab]
    float* scratch = nullptr; // [n_lanes, scratch_floats]
};

// n_lanes: the backend's scratch lanes (Backend::scratch_lanes(): the CPU's thread count,
// 0 for a GPU), each n_ctx + 16 floats.
uint64_t workspace_bytes(const ModelSpec& s, int max_tokens, int max_logit_rows, int n_lanes);
// Lays out ws over mem (at least workspace_bytes(...) long).
void workspace_init(Workspace& ws, uint8_t* mem, const ModelSpec& s, int max_tokens, int max_logit_rows, int n_lanes);

// Runs items through the model on backend be (the ledger's device's). Preconditions:
// sum(n_tokens) <= ws.max_tokens, count(want_logits) <= ws.max_logit_rows, block tables
// cover every position, ws.n_lanes >= be.scratch_lanes(). Returns the logits of the items
// with want_logits, in item order: host memory [rows, n_vocab] (nullptr when none), valid
// until the next step; sampling may modify it in place.
// On an exception no unit stays pinned and the backend's step is aborted.
float* forward_step(const ModelWeights& w, int model_id, Residency& res, KvCache& kv, Workspace& ws,
                    const std::vector<ForwardItem>& items, Backend& be);

}  // namespace lmx
