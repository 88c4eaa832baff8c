// footprint.cpp — a model's device bytes from its headers, and the equal-share plan.
// Owner: engine core. Thread-safety: pure (see footprint.h).
#include "footprint.h"

#include <algorithm>
#include <cassert>

#include "engine.h"
#include "forward.h"
#include "gguf.h"
#include "safetensors.h"

namespace lmx {

uint64_t ModelFootprint::device_bytes(int n_slots) const {
    const uint64_t n = static_cast<uint64_t>(std::max(0, std::min(n_slots, n_layer)));
    return head_bytes + n * layer_bytes + workspace_bytes;
}

namespace {
// One tensor's bytes inside a unit: its rows in format t, padded to the next tensor's alignment.
uint64_t piece_bytes(DType t, int64_t rows, int64_t cols) {
    return align_up(static_cast<uint64_t>(row_bytes(t, cols)) * static_cast<uint64_t>(rows), kAlign);
}
}  // namespace

// Mirrors ModelWeights' unit layout (model.cpp): keep the two in step. Sizes do not depend
// on the order of pieces (each is padded alone), so only the set of tensors matters.
ModelFootprint model_footprint(const ModelSpec& spec, const EngineConfig& cfg, int n_lanes) {
    spec.validate();
    // headers only: the mapping is read lazily (a GGUF llama file's q/k rows are un-permuted: small)
    const std::unique_ptr<SafetensorsSet> st_owned =
        is_gguf_model(spec.files) ? gguf_tensor_set(spec) : std::make_unique<SafetensorsSet>(spec.files);
    const SafetensorsSet& st = *st_owned;
    const int64_t dim = spec.dim, qd = spec.q_dim(), kvd = spec.kv_dim(), ffn = spec.ffn_dim, nv = spec.n_vocab;
    ModelFootprint f;
    f.n_layer = spec.n_layer;
    const TensorInfo& probe = st.require("model.layers.0.self_attn.q_proj.weight", {qd, dim});
    f.weights = spec.weights == "auto" ? probe.dtype : dtype_from_name(spec.weights);
    f.matrix_format = f.weights;
    if (cfg.matmul_precision == MatmulPrecision::fast && (f.weights == DType::Q8_0 || f.weights == DType::Q4_0)) {
        bool whole_groups = true;
        for (int64_t n : {qd, kvd, dim, ffn, nv}) whole_groups = whole_groups && n % kX16Rows == 0;
        if (whole_groups) f.matrix_format = f.weights == DType::Q8_0 ? DType::Q8_0X16 : DType::Q4_0X16;
    }
    const DType m = f.matrix_format;
    const int64_t block = dtype_block_elems(m);
    for (int64_t cols : {dim, qd, ffn})
        if (cols % block != 0)
            throw UnsupportedError("model '" + spec.name + "': " + dtype_name(m) + " needs rows of a multiple of " +
                                   std::to_string(block) + " values, found " + std::to_string(cols) +
                                   "; choose --weights f16 or bf16 for this model");
    const auto vec = [](int64_t n) { return piece_bytes(DType::F32, 1, n); };
    // ModelWeights::matrix_format: "auto" keeps each matrix's stored format (GGUF files mix
    // them per tensor), and a slot holds the largest of its layers.
    const auto fmt = [&](DType stored) {
        if (spec.weights == "auto" && !dtype_is_x16(m)) return stored;
        return dtype_is_x16(m) && dtype_is_gguf_quant(stored) ? stored : m;
    };
    const auto mat = [&](const char* nm, int64_t rows, int64_t cols) {
        uint64_t most = 0;
        for (int l = 0; l < spec.n_layer; l++)
            if (const TensorInfo* t = st.find("model.layers." + std::to_string(l) + "." + nm))
                most = std::max(most, piece_bytes(fmt(t->dtype), rows, cols));
        return most;
    };
    uint64_t layer = vec(dim)                                                          // attn norm
                     + mat("self_attn.q_proj.weight", qd, dim) + mat("self_attn.k_proj.weight", kvd, dim)
                     + mat("self_attn.v_proj.weight", kvd, dim)                        // wq, wk, wv
                     + mat("self_attn.o_proj.weight", dim, qd)                         // wo
                     + vec(dim)                                                        // ffn norm
                     + mat("mlp.gate_proj.weight", ffn, dim) + mat("mlp.up_proj.weight", ffn, dim)
                     + mat("mlp.down_proj.weight", dim, ffn);                          // gate, up, down
    if (spec.qkv_bias) layer += vec(qd) + 2 * vec(kvd);
    if (spec.qk_norm) layer += 2 * vec(spec.head_dim);
    if (spec.post_norms) layer += 2 * vec(dim);
    f.layer_bytes = layer;
    const TensorInfo* head = spec.tied ? nullptr : st.find("lm_head.weight");
    if (head == nullptr) head = st.find("model.embed_tokens.weight");
    // norm + lm_head (a tied head holds the embedding's rows)
    f.head_bytes = vec(dim) + piece_bytes(head != nullptr ? fmt(head->dtype) : m, nv, dim);

    const int max_rows = std::min(cfg.max_seqs_per_step, cfg.max_batch_tokens);
    f.workspace_bytes = align_up(workspace_bytes(spec, cfg.max_batch_tokens, max_rows, n_lanes), kAlign);
    f.kv_bytes_per_token = static_cast<uint64_t>(spec.n_layer) * 2 * static_cast<uint64_t>(kvd) * 4;
    f.kv_block_tokens = cfg.kv_block_tokens;
    f.kv_block_bytes = align_up(f.kv_bytes_per_token * static_cast<uint64_t>(cfg.kv_block_tokens), kAlign);
    return f;
}

std::optional<std::vector<int>> plan_slots(const std::vector<ModelFootprint>& models,
                                           const std::vector<std::string>& names, uint64_t cap_bytes,
                                           uint64_t kv_room_bytes, int min_slots) {
    assert(models.size() == names.size() && min_slots >= 1);
    std::vector<int> slots;
    uint64_t used = kv_room_bytes;
    for (const ModelFootprint& f : models) {
        slots.push_back(std::min(min_slots, f.n_layer));
        used += f.device_bytes(slots.back());
    }
    if (used > cap_bytes) return std::nullopt;
    for (;;) {
        int best = -1;
        for (size_t i = 0; i < models.size(); i++) {
            const ModelFootprint& f = models[i];
            if (slots[i] >= f.n_layer || used + f.layer_bytes > cap_bytes) continue;
            if (best < 0) {
                best = static_cast<int>(i);
                continue;
            }
            const ModelFootprint& b = models[static_cast<size_t>(best)];
            const int sb = slots[static_cast<size_t>(best)];
            // smaller share first (compared exactly: slots_i * n_b < slots_b * n_i), then smaller layer, then name
            const int64_t lhs = static_cast<int64_t>(slots[i]) * b.n_layer, rhs = static_cast<int64_t>(sb) * f.n_layer;
            if (lhs < rhs || (lhs == rhs && (f.layer_bytes < b.layer_bytes ||
                                             (f.layer_bytes == b.layer_bytes && names[i] < names[static_cast<size_t>(best)]))))
                best = static_cast<int>(i);
        }
        if (best < 0) return slots;
        slots[static_cast<size_t>(best)]++;
        used += models[static_cast<size_t>(best)].layer_bytes;
    }
}

}  // namespace lmx
