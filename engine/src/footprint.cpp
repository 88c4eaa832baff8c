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
std::string layer_name(int l, const char* rest) { return "model.layers." + std::to_string(l) + "." + rest; }
}  // namespace

// Mirrors ModelWeights' unit layout (model.cpp): keep the two in step. Sizes do not depend
// on the order of pieces (each is padded alone), so only the set of tensors matters. A matrix
// keeps its own format where the loader does (auto weights; GGUF block formats), and its slot
// in a layer unit is the largest that matrix is in any layer (every layer has one layout).
int kv_elem_bytes(const EngineConfig& cfg) { return cfg.kv_dtype == "f16" ? 2 : 4; }

ModelFootprint model_footprint(const ModelSpec& spec, const EngineConfig& cfg, int n_lanes) {
    spec.validate();
    // Headers only: the mapping is read lazily (a GGUF file's table is mapped to HF names).
    const std::unique_ptr<SafetensorsSet> st =
        is_gguf_model(spec.files) ? gguf_tensor_set(spec) : std::make_unique<SafetensorsSet>(spec.files);
    const int64_t dim = spec.dim, qd = spec.q_dim(), kvd = spec.kv_dim(), ffn = spec.ffn_dim, nv = spec.n_vocab;
    ModelFootprint f;
    f.n_layer = spec.n_layer;
    const TensorInfo& probe = st->require(layer_name(0, "self_attn.q_proj.weight"), {qd, dim});
    f.weights = spec.weights == "auto" ? probe.dtype : dtype_from_name(spec.weights);
    f.matrix_format = f.weights;
    if (cfg.matmul_precision == MatmulPrecision::Fast && (f.weights == DType::Q8_0 || f.weights == DType::Q4_0)) {
        bool whole_groups = true;
        for (int64_t n : {qd, kvd, dim, ffn, nv}) whole_groups = whole_groups && n % kX16Rows == 0;
        if (whole_groups) f.matrix_format = f.weights == DType::Q8_0 ? DType::Q8_0X16 : DType::Q4_0X16;
    }
    const auto format = [&](const TensorInfo& t) {  // ModelWeights::matrix_format
        if (spec.weights == "auto" && !dtype_is_x16(f.matrix_format)) return t.dtype;
        if (dtype_is_x16(f.matrix_format) && dtype_is_gguf_quant(t.dtype)) return t.dtype;
        return f.matrix_format;
    };
    const auto check_cols = [&](DType t, int64_t cols, const std::string& name) {
        if (cols % dtype_block_elems(t) != 0)
            throw UnsupportedError("tensor '" + name + "' of model '" + spec.name + "': " + dtype_name(t) +
                                   " needs rows of a multiple of " + std::to_string(dtype_block_elems(t)) +
                                   " values, found " + std::to_string(cols) + "; choose --weights f16 or bf16");
    };
    const auto mat = [&](const char* nm, int64_t rows, int64_t cols) {  // the largest in any layer
        uint64_t most = 0;
        for (int l = 0; l < spec.n_layer; l++) {
            const TensorInfo& t = st->require(layer_name(l, nm), {rows, cols});
            check_cols(format(t), cols, t.name);
            most = std::max(most, piece_bytes(format(t), rows, cols));
        }
        return most;
    };
    const auto vec = [](int64_t n) { return piece_bytes(DType::F32, 1, n); };
    uint64_t layer = vec(dim)                                                                    // attn norm
                     + mat("self_attn.q_proj.weight", qd, dim) + mat("self_attn.k_proj.weight", kvd, dim)
                     + mat("self_attn.v_proj.weight", kvd, dim) + mat("self_attn.o_proj.weight", dim, qd)
                     + vec(dim)                                                                  // ffn norm
                     + mat("mlp.gate_proj.weight", ffn, dim) + mat("mlp.up_proj.weight", ffn, dim)
                     + mat("mlp.down_proj.weight", dim, ffn);
    if (spec.qkv_bias) layer += vec(qd) + 2 * vec(kvd);
    if (spec.qk_norm) layer += 2 * vec(spec.head_dim);
    if (spec.post_norms) layer += 2 * vec(dim);
    f.layer_bytes = layer;
    const TensorInfo* lm = spec.tied ? nullptr : st->find("lm_head.weight");
    const TensorInfo& head = lm != nullptr ? *lm : st->require("model.embed_tokens.weight", {nv, dim});
    check_cols(format(head), dim, head.name);
    f.head_bytes = vec(dim) + piece_bytes(format(head), nv, dim);  // norm + lm_head (tied: the embedding's rows)

    const int max_rows = std::min(cfg.max_seqs_per_step, cfg.max_batch_tokens);
    f.workspace_bytes = align_up(workspace_bytes(spec, cfg.max_batch_tokens, max_rows, n_lanes), kAlign);
    f.kv_bytes_per_token =
        static_cast<uint64_t>(spec.n_layer) * 2 * static_cast<uint64_t>(kvd) * static_cast<uint64_t>(kv_elem_bytes(cfg));
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
