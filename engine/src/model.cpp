// model.cpp — checks a model's tensors against its spec and lays them out as units.
// Owner: engine core (loaders). Thread-safety: construction is single-threaded;
// the result is immutable.
#include "model.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "device.h"
#include "gguf.h"

namespace lmx {

void ModelSpec::validate() const {
    auto positive = [&](int v, const char* field) {
        if (v <= 0) throw InvalidArgument(std::string("model spec ") + field + ": expected > 0, found " + std::to_string(v));
    };
    positive(n_layer, "n_layer");
    positive(dim, "dim");
    positive(n_heads, "n_heads");
    positive(n_kv_heads, "n_kv_heads");
    positive(head_dim, "head_dim");
    positive(ffn_dim, "ffn_dim");
    positive(n_vocab, "n_vocab");
    positive(n_ctx, "n_ctx");
    if (n_heads % n_kv_heads != 0)
        throw InvalidArgument("model spec: num_attention_heads (" + std::to_string(n_heads) +
                              ") must be a multiple of num_key_value_heads (" + std::to_string(n_kv_heads) + ")");
    if (head_dim % 2 != 0 || rope_inv_freq.size() != static_cast<size_t>(head_dim / 2))
        throw InvalidArgument("model spec rope_inv_freq: expected head_dim/2 = " + std::to_string(head_dim / 2) +
                              " values, found " + std::to_string(rope_inv_freq.size()));
    if (files.empty()) throw InvalidArgument("model spec files: expected at least one .safetensors file, found none");
    if (arch != "llama" && arch != "qwen2" && arch != "qwen3" && arch != "gemma3")
        throw UnsupportedError("model spec arch: expected 'llama', 'qwen2', 'qwen3' or 'gemma3', found '" + arch + "'");
    if (ffn_act != "silu" && ffn_act != "gelu_tanh")
        throw UnsupportedError("model spec ffn_act: expected 'silu' or 'gelu_tanh', found '" + ffn_act + "'");
    if (!layer_window.empty() && layer_window.size() != static_cast<size_t>(n_layer))
        throw InvalidArgument("model spec layer_window: expected n_layer = " + std::to_string(n_layer) +
                              " values (or none), found " + std::to_string(layer_window.size()));
    for (int32_t w : layer_window)
        if (w < 0) throw InvalidArgument("model spec layer_window: expected >= 0 (0 = full attention), found " + std::to_string(w));
    if (!rope_inv_freq_local.empty() && rope_inv_freq_local.size() != rope_inv_freq.size())
        throw InvalidArgument("model spec rope_inv_freq_local: expected head_dim/2 = " + std::to_string(head_dim / 2) +
                              " values (or none), found " + std::to_string(rope_inv_freq_local.size()));
    if (!(embed_scale > 0.0f) || !(attn_scale >= 0.0f) || !(final_logit_softcap >= 0.0f))
        throw InvalidArgument("model spec: expected embed_scale > 0, attn_scale >= 0 and final_logit_softcap >= 0, found " +
                              std::to_string(embed_scale) + ", " + std::to_string(attn_scale) + ", " +
                              std::to_string(final_logit_softcap));
}

namespace {
void free_aligned(void* p) { std::free(p); }

std::string layer_name(int l, const char* rest) { return "model.layers." + std::to_string(l) + "." + rest; }
}  // namespace

const uint8_t* ModelWeights::host_tensor(const TensorInfo& t, DType to, int64_t rows, int64_t cols) {
    if (dtype_is_blocked(to) && cols % kQ8BlockElems != 0)
        throw UnsupportedError("tensor '" + t.name + "' in " + t.file + ": " + dtype_name(to) +
                               " needs rows of a multiple of 32 values, found " + std::to_string(cols) +
                               "; choose --weights f16 or bf16 for this model");
    if (t.dtype == to) return t.data;
    // A tensor is converted once per format: a tied head finds the embedding's copy.
    if (auto it = converted_.find({t.name, to}); it != converted_.end()) return it->second;
    const uint64_t n = static_cast<uint64_t>(row_bytes(to, cols)) * static_cast<uint64_t>(rows);
    auto alloc = [&]() {
        void* p = std::aligned_alloc(kAlign, align_up(n == 0 ? 1 : n, kAlign));
        if (p == nullptr) throw Error("out of host memory converting tensor '" + t.name + "'");
        return std::unique_ptr<uint8_t, void (*)(void*)>(static_cast<uint8_t*>(p), free_aligned);
    };
    auto p = alloc();
    if (dtype_is_x16(to)) {  // quantise (into a scratch copy unless already done), then repack
        const DType plain = to == DType::Q8_0X16 ? DType::Q8_0 : DType::Q4_0;
        std::unique_ptr<uint8_t, void (*)(void*)> scratch(nullptr, free_aligned);
        const uint8_t* q;
        if (auto it = converted_.find({t.name, plain}); it != converted_.end()) {
            q = it->second;
        } else {
            scratch = alloc();
            convert_rows(t.data, t.dtype, scratch.get(), plain, rows, cols);
            q = scratch.get();
        }
        repack_x16(q, plain, p.get(), rows, cols);
    } else {
        convert_rows(t.data, t.dtype, p.get(), to, rows, cols);
    }
    host_bufs_.push_back(std::move(p));
    converted_[{t.name, to}] = host_bufs_.back().get();
    return host_bufs_.back().get();
}

// A norm vector as f32 with spec.norm_weight_offset added (Gemma's 1 + w, in f32 as HF
// computes it); a plain f32 tensor without an offset is used in place.
void ModelWeights::add_norm_piece(UnitSource& us, const TensorInfo& t, int64_t n, uint64_t& off) {
    if (spec_.norm_weight_offset == 0.0f) {
        add_piece(us, t, DType::F32, 1, n, off);
        return;
    }
    const uint64_t n_bytes = static_cast<uint64_t>(n) * 4;
    void* p = std::aligned_alloc(kAlign, align_up(n_bytes, kAlign));
    if (p == nullptr) throw Error("out of host memory converting tensor '" + t.name + "'");
    host_bufs_.emplace_back(static_cast<uint8_t*>(p), free_aligned);
    float* w = static_cast<float*>(p);
    convert_rows(t.data, t.dtype, w, DType::F32, 1, n);
    for (int64_t i = 0; i < n; i++) w[i] += spec_.norm_weight_offset;
    us.pieces.push_back({static_cast<const uint8_t*>(p), n_bytes, off});
    off = align_up(off + n_bytes, kAlign);
    us.n_bytes = off;
}

void ModelWeights::add_piece(UnitSource& us, const TensorInfo& t, DType to, int64_t rows, int64_t cols, uint64_t& off) {
    const uint8_t* src = host_tensor(t, to, rows, cols);
    const uint64_t n = static_cast<uint64_t>(row_bytes(to, cols)) * static_cast<uint64_t>(rows);
    us.pieces.push_back({src, n, off});
    off = align_up(off + n, kAlign);
    us.n_bytes = off;
}

ModelWeights::ModelWeights(const ModelSpec& spec, const LoadProgress& progress) : spec_(spec), dtype_(DType::F32), matrix_dtype_(DType::F32) {
    spec_.validate();
    st_ = is_gguf_model(spec_.files) ? gguf_tensor_set(spec_) : std::make_unique<SafetensorsSet>(spec_.files);
    if (is_gguf_model(spec_.files)) gguf_apply_rope_freqs(spec_, *st_);  // llama3 scaling as llama.cpp stores it
    const int64_t dim = spec_.dim, qd = spec_.q_dim(), kvd = spec_.kv_dim(), ffn = spec_.ffn_dim, nv = spec_.n_vocab;

    // Config-vs-files agreement: the layer count must match exactly.
    if (st_->find(layer_name(spec_.n_layer, "input_layernorm.weight")) != nullptr)
        throw ModelFileError("config.json num_hidden_layers: expected " + std::to_string(spec_.n_layer) +
                             " layers to match the files, found tensors for layer " + std::to_string(spec_.n_layer) +
                             " as well in " + st_->describe_files());

    const TensorInfo& probe = st_->require(layer_name(0, "self_attn.q_proj.weight"), {qd, dim});
    dtype_ = spec_.weights == "auto" ? probe.dtype : dtype_from_name(spec_.weights);
    matrix_dtype_ = dtype_;
    if (spec_.matmul_precision == MatmulPrecision::Fast && (dtype_ == DType::Q8_0 || dtype_ == DType::Q4_0)) {
        bool whole_groups = true;
        for (int64_t n : {static_cast<int64_t>(qd), static_cast<int64_t>(kvd), dim, ffn, nv})
            whole_groups = whole_groups && n % kX16Rows == 0;
        if (whole_groups) matrix_dtype_ = dtype_ == DType::Q8_0 ? DType::Q8_0X16 : DType::Q4_0X16;
    }

    const TensorInfo& emb = st_->require("model.embed_tokens.weight", {nv, dim});
    const DType emb_t = spec_.weights == "auto" ? emb.dtype : dtype_;  // host table: never x16
    embed_ = WeightView{host_tensor(emb, emb_t, nv, dim), emb_t, nv, dim};
    unit_dtypes_.resize(static_cast<size_t>(spec_.n_layer + 1));

    const int total = spec_.n_layer + 1;
    units_.resize(static_cast<size_t>(total));
    for (int l = 0; l < spec_.n_layer; l++) {
        UnitSource& us = units_[static_cast<size_t>(l)];
        uint64_t off = 0;
        LayerLayout lay{};
        auto mat = [&](const char* nm, int64_t rows, int64_t cols, uint64_t& slot) {
            slot = off;
            const TensorInfo& t = st_->require(layer_name(l, nm), {rows, cols});
            add_piece(us, t, matrix_format(t), rows, cols, off);
            off = std::max(off, align_up(slot + matrix_slot_bytes(nm, rows, cols), kAlign));  // same layout every layer
            us.n_bytes = off;
            unit_dtypes_[static_cast<size_t>(l)].push_back({slot, matrix_format(t)});
        };
        auto vec = [&](const char* nm, int64_t n, uint64_t& slot) {
            slot = off;
            add_piece(us, st_->require(layer_name(l, nm), {n}), DType::F32, 1, n, off);
        };
        auto norm = [&](const char* nm, int64_t n, uint64_t& slot) {
            slot = off;
            add_norm_piece(us, st_->require(layer_name(l, nm), {n}), n, off);
        };
        // With post norms (Gemma 3) HF's post_attention_layernorm is the attention output's
        // norm and pre_feedforward_layernorm the FFN input's; without, the former is the FFN input's.
        const bool sandwich = spec_.post_norms;
        norm("input_layernorm.weight", dim, lay.attn_norm);
        mat("self_attn.q_proj.weight", qd, dim, lay.wq);
        mat("self_attn.k_proj.weight", kvd, dim, lay.wk);
        mat("self_attn.v_proj.weight", kvd, dim, lay.wv);
        if (spec_.qkv_bias) {
            vec("self_attn.q_proj.bias", qd, lay.bq);
            vec("self_attn.k_proj.bias", kvd, lay.bk);
            vec("self_attn.v_proj.bias", kvd, lay.bv);
        }
        if (spec_.qk_norm) {
            norm("self_attn.q_norm.weight", spec_.head_dim, lay.q_norm);
            norm("self_attn.k_norm.weight", spec_.head_dim, lay.k_norm);
        }
        mat("self_attn.o_proj.weight", dim, qd, lay.wo);
        if (sandwich) norm("post_attention_layernorm.weight", dim, lay.post_attn_norm);
        norm(sandwich ? "pre_feedforward_layernorm.weight" : "post_attention_layernorm.weight", dim, lay.ffn_norm);
        mat("mlp.gate_proj.weight", ffn, dim, lay.w_gate);
        mat("mlp.up_proj.weight", ffn, dim, lay.w_up);
        mat("mlp.down_proj.weight", dim, ffn, lay.w_down);
        if (sandwich) norm("post_feedforward_layernorm.weight", dim, lay.post_ffn_norm);
        layer_ = lay;  // identical for every layer by construction
        if (progress) progress(l + 1, total);
    }
    {
        UnitSource& us = units_.back();
        uint64_t off = 0;
        head_.norm = off;
        add_norm_piece(us, st_->require("model.norm.weight", {dim}), dim, off);
        head_.lm_head = off;
        const TensorInfo* lm = spec_.tied ? nullptr : st_->find("lm_head.weight");
        if (!spec_.tied && lm == nullptr)
            throw ModelFileError("missing tensor 'lm_head.weight' (looked in: " + st_->describe_files() +
                                 "); config.json says tie_word_embeddings=false — set it to true if the head is tied");
        const TensorInfo& head = lm != nullptr ? st_->require("lm_head.weight", {nv, dim}) : emb;
        unit_dtypes_.back().push_back({off, matrix_format(head)});
        add_piece(us, head, matrix_format(head), nv, dim, off);
        if (progress) progress(total, total);
    }
    for (const UnitSource& us : units_) {
        max_unit_bytes_ = std::max(max_unit_bytes_, us.n_bytes);
        total_unit_bytes_ += us.n_bytes;
    }
}

DType ModelWeights::matrix_format(const TensorInfo& t) const {
    // "auto" keeps each matrix as stored, except that fast precision repacks q8_0 / q4_0
    // models (matrix_dtype_ x16) and GGUF formats never convert to another block format.
    if (spec_.weights == "auto" && !dtype_is_x16(matrix_dtype_)) return t.dtype;
    if (dtype_is_x16(matrix_dtype_) && dtype_is_gguf_quant(t.dtype)) return t.dtype;
    return matrix_dtype_;
}

uint64_t ModelWeights::matrix_slot_bytes(const char* nm, int64_t rows, int64_t cols) const {
    uint64_t most = 0;
    for (int l = 0; l < spec_.n_layer; l++)
        if (const TensorInfo* t = st_->find(layer_name(l, nm)))
            most = std::max(most, static_cast<uint64_t>(row_bytes(matrix_format(*t), cols)) * static_cast<uint64_t>(rows));
    return most;
}

DType ModelWeights::matrix_dtype(int u, uint64_t off) const {
    for (const auto& [o, t] : unit_dtypes_[static_cast<size_t>(u)])
        if (o == off) return t;
    return matrix_dtype_;
}

CopyFence ModelWeights::assemble_unit(int u, uint8_t* dst, Device& dev, ComputeFence after) const {
    std::vector<CopyRegion> regions;
    regions.reserve(unit(u).pieces.size());
    for (const UnitPiece& p : unit(u).pieces) regions.push_back(CopyRegion{dst + p.dst_off, p.src, p.n_bytes});
    return dev.copy_in(regions.data(), regions.size(), after);
}

}  // namespace lmx
