// model.h — a model's architecture (ModelSpec) and its weights cut into streamable units.
// Owner: engine core (loaders). Thread-safety: a ModelWeights is immutable once
// constructed; any thread may read it (the copy thread reads unit sources).
//
// Units are what residency moves: unit l < n_layer is transformer layer l; unit
// n_layer is the head (final norm + lm_head). Every layer unit has the same
// layout, so one LayerLayout of byte offsets serves them all. The token
// embedding table stays in host memory: a step reads only the rows of its tokens.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common.h"
#include "device.h"
#include "kernels/kernels.h"
#include "safetensors.h"

namespace lmx {

struct ModelSpec {
    std::string name;
    std::string arch;  // "llama" | "qwen2" | "qwen3" | "gemma3"
    int n_layer = 0, dim = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, ffn_dim = 0, n_vocab = 0, n_ctx = 0;
    float rms_eps = 1e-5f;
    bool tied = false;     // lm_head shares model.embed_tokens.weight
    bool qkv_bias = false; // Qwen2
    std::vector<float> rope_inv_freq;  // [head_dim / 2], scaling already applied (llama3, linear; a GGUF
                                       // file's rope_freqs factors are folded in by ModelWeights at load)

    // ---- Gemma 3 / Qwen 3 (defaults = Llama behaviour; every loader, HF or GGUF, fills them) ----
    bool qk_norm = false;     // Qwen3, Gemma3: RMSNorm over each head of q and k (weights [head_dim]), before RoPE
    bool post_norms = false;  // Gemma3: RMSNorm on the attention output and on the FFN output before each residual add
    std::string ffn_act = "silu";  // "silu" (SwiGLU) | "gelu_tanh" (Gemma's GeGLU, tanh-approximated GELU)
    // Added to every RMSNorm weight at load: 1 for Gemma HF files (the norm is x * (1 + w));
    // 0 for Gemma GGUF files, which store 1 + w already (llama.cpp's converter adds it).
    float norm_weight_offset = 0.0f;
    float embed_scale = 1.0f;  // the embedding row is multiplied by this (Gemma: sqrt(dim) rounded to f32)
    float attn_scale = 0.0f;   // scale of q.k; 0 = 1/sqrt(head_dim). Gemma3: query_pre_attn_scalar^-0.5
    float final_logit_softcap = 0.0f;  // 0 = off; else logits = cap * tanh(logits / cap)
    // Sliding-window attention, per layer: [n_layer] or empty (every layer sees all keys).
    // layer_window[l] = w > 0: a query at position p attends to keys (p - w, p] only (HF's
    // sliding_window, a query counted in its own window); 0: all keys 0 .. p.
    std::vector<int32_t> layer_window;
    // RoPE of the sliding-window layers when they have their own base (Gemma3's
    // rope_local_base_freq): [head_dim / 2], or empty = rope_inv_freq for every layer.
    std::vector<float> rope_inv_freq_local;
    std::vector<int32_t> eos_ids;
    std::vector<std::string> files;    // safetensors shards
    std::string weights = "auto";      // "auto" (as stored) | f32 | f16 | bf16 | q8_0 | q4_0
    // Set by the engine from its config. Under fast, q8_0 / q4_0 matrices are stored as
    // q8_0x16 / q4_0x16 (int8 dots, kernels.h) when every matrix has a multiple of 16 rows.
    MatmulPrecision matmul_precision = MatmulPrecision::Exact;

    void validate() const;  // throws InvalidArgument naming the field
    int q_dim() const { return n_heads * head_dim; }
    int kv_dim() const { return n_kv_heads * head_dim; }
    int window(int layer) const { return layer_window.empty() ? 0 : layer_window[static_cast<size_t>(layer)]; }
    const std::vector<float>& rope_for(int layer) const {
        return window(layer) > 0 && !rope_inv_freq_local.empty() ? rope_inv_freq_local : rope_inv_freq;
    }
};

// Byte offsets of one layer's tensors inside its unit; matrices are [n_out, n_in] in
// the model's matrix dtype (row-major, or 16-row groups for x16), vectors are f32.
// Norms by role, not by HF name: attn_norm is before attention, ffn_norm before the FFN
// (Llama's post_attention_layernorm, Gemma3's pre_feedforward_layernorm); Gemma3's
// post_attention_layernorm is post_attn_norm here. Norm vectors hold w + norm_weight_offset.
struct LayerLayout {
    uint64_t attn_norm;       // f32 [dim]
    uint64_t wq, wk, wv;      // [q_dim, dim], [kv_dim, dim], [kv_dim, dim]
    uint64_t bq, bk, bv;      // f32 [q_dim], [kv_dim], [kv_dim]; only when qkv_bias
    uint64_t wo;              // [dim, q_dim]
    uint64_t ffn_norm;        // f32 [dim]
    uint64_t w_gate, w_up;    // [ffn_dim, dim]
    uint64_t w_down;          // [dim, ffn_dim]
    uint64_t q_norm, k_norm;  // f32 [head_dim] each; only when qk_norm
    uint64_t post_attn_norm, post_ffn_norm;  // f32 [dim] each; only when post_norms
};
struct HeadLayout {
    uint64_t norm;     // f32 [dim]
    uint64_t lm_head;  // [n_vocab, dim]
};

// One contiguous range a unit is assembled from (a tensor, mapped or converted).
struct UnitPiece {
    const uint8_t* src;
    uint64_t n_bytes;
    uint64_t dst_off;
};
struct UnitSource {
    uint64_t n_bytes = 0;
    std::vector<UnitPiece> pieces;
};

using LoadProgress = std::function<void(int done, int total)>;

class ModelWeights {
public:
    // Opens the files, checks every tensor's presence and shape against spec,
    // converts to the chosen format. Throws ModelFileError / UnsupportedError.
    ModelWeights(const ModelSpec& spec, const LoadProgress& progress);
    const ModelSpec& spec() const { return spec_; }
    DType dtype() const { return dtype_; }                 // the weight format ("q8_0", ...)
    DType matrix_dtype() const { return matrix_dtype_; }   // how the units hold matrices (may be x16)
    // The format of the matrix at byte offset `off` of unit u: with weights "auto" each matrix
    // keeps its stored format (a GGUF Q4_K_M file mixes q4_K, q6_K, q5_0 and q8_0, even
    // within one tensor kind across layers); a slot is sized for the largest of its layers.
    DType matrix_dtype(int u, uint64_t off) const;
    int n_units() const { return spec_.n_layer + 1; }
    const UnitSource& unit(int u) const { return units_[static_cast<size_t>(u)]; }
    const LayerLayout& layer_layout() const { return layer_; }
    const HeadLayout& head_layout() const { return head_; }
    const WeightView& embed() const { return embed_; }  // host memory, [n_vocab, dim]
    uint64_t max_unit_bytes() const { return max_unit_bytes_; }
    uint64_t layer_unit_bytes() const { return units_.front().n_bytes; }  // every layer unit is this size
    uint64_t total_unit_bytes() const { return total_unit_bytes_; }
    // Copies unit u into dst (device memory of at least unit(u).n_bytes) once compute up to
    // `after` finished (dst's previous reader); the fence completes when the copy has landed.
    CopyFence assemble_unit(int u, uint8_t* dst, Device& dev, ComputeFence after = {}) const;

private:
    const uint8_t* host_tensor(const TensorInfo& t, DType to, int64_t rows, int64_t cols);
    void add_piece(UnitSource& us, const TensorInfo& t, DType to, int64_t rows, int64_t cols, uint64_t& off);
    void add_norm_piece(UnitSource& us, const TensorInfo& t, int64_t n, uint64_t& off);
    DType matrix_format(const TensorInfo& t) const;  // the format a stored matrix is held in
    uint64_t matrix_slot_bytes(const char* nm, int64_t rows, int64_t cols) const;  // max over the layers

    ModelSpec spec_;
    DType dtype_;
    DType matrix_dtype_;
    std::unique_ptr<SafetensorsSet> st_;
    std::vector<std::unique_ptr<uint8_t, void (*)(void*)>> host_bufs_;  // converted tensors
    std::map<std::pair<std::string, DType>, const uint8_t*> converted_;  // (tensor, format) -> its copy in host_bufs_
    std::vector<UnitSource> units_;
    std::vector<std::vector<std::pair<uint64_t, DType>>> unit_dtypes_;  // [unit]: (offset, format) of each matrix
    LayerLayout layer_{};
    HeadLayout head_{};
    WeightView embed_{};
    uint64_t max_unit_bytes_ = 0;
    uint64_t total_unit_bytes_ = 0;
};

// The matrix formats of one unit, for building WeightViews (forward.cpp).
struct MatrixFormats {
    const ModelWeights& w;
    int unit;
    DType at(uint64_t off) const { return w.matrix_dtype(unit, off); }
};

}  // namespace lmx
