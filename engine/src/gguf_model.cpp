// gguf_model.cpp — a GGUF model file's tensors under Hugging Face names, for ModelWeights.
// Owner: loaders. Thread-safety: construction is single-threaded; the result is immutable.
//
// Names follow llama.cpp's (gguf-py tensor_mapping): token_embd, output_norm, output, and per
// layer blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, attn_q_norm, attn_k_norm,
// ffn_norm, ffn_gate, ffn_up, ffn_down, post_attention_norm, post_ffw_norm}. Gemma 3's
// sandwich norms map to HF's input_layernorm / post_attention_layernorm /
// pre_feedforward_layernorm / post_feedforward_layernorm; the others' ffn_norm is HF's
// post_attention_layernorm.
//
// Llama's Q/K permutation. llama.cpp's converter reorders the rows of each head of q_proj and
// k_proj so that its interleaved RoPE (pairs 2j, 2j+1) equals Hugging Face's rotate_half
// (pairs j, j + head_dim/2): GGUF row h*hd + 2j + k holds HF row h*hd + k*hd/2 + j. A row is
// whole blocks in any format, so the inverse is a copy of rows, done once at load into host
// memory; the engine then applies HF's RoPE as for a safetensors model.
//
// Llama 3 RoPE scaling. llama.cpp's converter does not write rope_scaling to the metadata for
// llama3; it stores a tensor rope_freqs.weight (f32 [head_dim / 2]) that divides each frequency.
// gguf_apply_rope_freqs folds it into the spec's inv_freq once, so no device sees a difference.
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "gguf.h"
#include "model.h"

namespace lmx {

namespace {

constexpr const char* kRopeFreqs = "rope_freqs.weight";

struct GgufKeep {  // what the returned table's tensors point into
    std::unique_ptr<GgufFile> file;
    std::vector<std::unique_ptr<uint8_t, void (*)(void*)>> bufs;
};

void free_aligned(void* p) { std::free(p); }

// Rows of `t` (a [n_head * hd, n_in] matrix) in Hugging Face order, into a new buffer of keep.
const uint8_t* unpermute_rows(const GgufTensor& t, int n_head, GgufKeep& keep, const std::string& file) {
    const int64_t rows = t.shape[0];
    if (t.shape.size() != 2 || n_head <= 0 || rows % n_head != 0 || (rows / n_head) % 2 != 0)
        throw ModelFileError("error loading GGUF: " + file + ": tensor '" + t.name + "': expected [n_head * head_dim, n_in] "
                             "rows with an even head_dim for " + std::to_string(n_head) + " heads, found " +
                             std::to_string(rows) + " rows");
    const uint64_t row_b = t.n_bytes / static_cast<uint64_t>(rows);
    void* p = std::aligned_alloc(kAlign, align_up(t.n_bytes, kAlign));
    if (p == nullptr) throw Error("out of host memory un-permuting tensor '" + t.name + "'");
    keep.bufs.emplace_back(static_cast<uint8_t*>(p), free_aligned);
    uint8_t* dst = keep.bufs.back().get();
    const int64_t hd = rows / n_head, half = hd / 2;
    for (int64_t h = 0; h < n_head; ++h)
        for (int64_t j = 0; j < half; ++j)
            for (int64_t k = 0; k < 2; ++k)
                std::memcpy(dst + static_cast<uint64_t>(h * hd + k * half + j) * row_b,
                            t.data + static_cast<uint64_t>(h * hd + 2 * j + k) * row_b, row_b);
    return dst;
}

// GGUF name -> HF name, or "" for a tensor the engine does not read. rope_freqs keeps its name
// (HF has no such tensor; gguf_apply_rope_freqs reads it).
std::string hf_name(const std::string& g, bool gemma) {
    static const std::pair<const char*, const char*> kTop[] = {
        {"token_embd.weight", "model.embed_tokens.weight"},
        {"output_norm.weight", "model.norm.weight"},
        {"output.weight", "lm_head.weight"},
        {kRopeFreqs, kRopeFreqs},
    };
    for (const auto& [from, to] : kTop)
        if (g == from) return to;
    if (g.rfind("blk.", 0) != 0) return "";
    const size_t dot = g.find('.', 4);
    if (dot == std::string::npos) return "";
    const std::string layer = g.substr(4, dot - 4), rest = g.substr(dot + 1);
    static const std::pair<const char*, const char*> kLayer[] = {
        {"attn_norm.weight", "input_layernorm.weight"},
        {"attn_q.weight", "self_attn.q_proj.weight"},
        {"attn_k.weight", "self_attn.k_proj.weight"},
        {"attn_v.weight", "self_attn.v_proj.weight"},
        {"attn_q.bias", "self_attn.q_proj.bias"},
        {"attn_k.bias", "self_attn.k_proj.bias"},
        {"attn_v.bias", "self_attn.v_proj.bias"},
        {"attn_output.weight", "self_attn.o_proj.weight"},
        {"attn_q_norm.weight", "self_attn.q_norm.weight"},
        {"attn_k_norm.weight", "self_attn.k_norm.weight"},
        {"ffn_gate.weight", "mlp.gate_proj.weight"},
        {"ffn_up.weight", "mlp.up_proj.weight"},
        {"ffn_down.weight", "mlp.down_proj.weight"},
        {"post_attention_norm.weight", "post_attention_layernorm.weight"},
        {"post_ffw_norm.weight", "post_feedforward_layernorm.weight"},
    };
    std::string to;
    if (rest == "ffn_norm.weight")
        to = gemma ? "pre_feedforward_layernorm.weight" : "post_attention_layernorm.weight";
    for (const auto& [from, name] : kLayer)
        if (rest == from) to = name;
    return to.empty() ? "" : "model.layers." + layer + "." + to;
}

}  // namespace

bool is_gguf_model(const std::vector<std::string>& files) {
    if (files.size() != 1) return false;
    const std::string& f = files[0];
    return f.size() > 5 && (f.compare(f.size() - 5, 5, ".gguf") == 0 || f.compare(f.size() - 5, 5, ".GGUF") == 0);
}

std::unique_ptr<SafetensorsSet> gguf_tensor_set(const ModelSpec& spec) {
    auto keep = std::make_shared<GgufKeep>();
    keep->file = std::make_unique<GgufFile>(spec.files.at(0));
    const GgufFile& g = *keep->file;
    const bool gemma = spec.arch == "gemma3";
    const bool permuted = spec.arch == "llama";
    std::map<std::string, TensorInfo> out;
    for (const auto& [gname, t] : g.tensors()) {
        const std::string name = hf_name(gname, gemma);
        if (name.empty()) continue;
        TensorInfo ti{name, g.path() + " (tensor '" + gname + "')", t.dtype, t.shape, t.data, t.n_bytes};
        if (permuted && (gname.size() > 14 && (gname.compare(gname.size() - 14, 14, ".attn_q.weight") == 0)))
            ti.data = unpermute_rows(t, spec.n_heads, *keep, g.path());
        else if (permuted && (gname.size() > 14 && gname.compare(gname.size() - 14, 14, ".attn_k.weight") == 0))
            ti.data = unpermute_rows(t, spec.n_kv_heads, *keep, g.path());
        out.emplace(name, std::move(ti));
    }
    return std::make_unique<SafetensorsSet>(std::move(out), g.path(), std::move(keep));
}

void gguf_apply_rope_freqs(ModelSpec& spec, const SafetensorsSet& st) {
    const TensorInfo* t = st.find(kRopeFreqs);
    if (t == nullptr) return;
    const int64_t half = spec.head_dim / 2;
    if (t->dtype != DType::F32 || t->shape != std::vector<int64_t>{half}) {
        std::string shape;
        for (int64_t d : t->shape) shape += (shape.empty() ? "" : ", ") + std::to_string(d);
        throw ModelFileError("error loading GGUF: " + t->file + ": expected f32 [" + std::to_string(half) +
                             "] (head_dim / 2 RoPE factors), found " + dtype_name(t->dtype) + " [" + shape + "]");
    }
    if (spec.rope_inv_freq.size() != static_cast<size_t>(half))
        throw InvalidArgument("model spec rope_inv_freq: expected head_dim/2 = " + std::to_string(half) + " values, found " +
                              std::to_string(spec.rope_inv_freq.size()));
    for (int64_t i = 0; i < half; ++i) {
        float f;
        std::memcpy(&f, t->data + 4 * i, 4);  // the mapping guarantees no alignment
        if (!(f > 0.0f) || !std::isfinite(f))
            throw ModelFileError("error loading GGUF: " + t->file + ": factor " + std::to_string(i) +
                                 ": expected a finite positive number, found " + std::to_string(f));
        spec.rope_inv_freq[static_cast<size_t>(i)] /= f;
    }
}

}  // namespace lmx
