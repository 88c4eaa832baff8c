// tiny_model.h — writes a small random Llama-shaped safetensors file for engine tests.
// Owner: engine tests. Thread-safety: none needed (tests run serially).
#pragma once

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "model.h"

namespace lmx_test {

// A spec for a tiny f32 Llama (dim 32, 4 heads, 2 KV heads, ffn 64, vocab 64)
// with n_layer layers; writes its weights to dir/model.safetensors.
inline lmx::ModelSpec write_tiny_model(const std::string& dir, int n_layer, unsigned seed = 1) {
    lmx::ModelSpec s;
    s.name = "tiny";
    s.arch = "llama";
    s.n_layer = n_layer;
    s.dim = 32;
    s.n_heads = 4;
    s.n_kv_heads = 2;
    s.head_dim = 8;
    s.ffn_dim = 64;
    s.n_vocab = 64;
    s.n_ctx = 256;
    s.tied = true;
    for (int i = 0; i < s.head_dim / 2; i++) s.rope_inv_freq.push_back(1.0f / std::pow(10000.0f, 2.0f * i / s.head_dim));
    s.eos_ids = {};
    struct T {
        std::string name;
        std::vector<int64_t> shape;
    };
    std::vector<T> ts = {{"model.embed_tokens.weight", {64, 32}}, {"model.norm.weight", {32}}};
    for (int l = 0; l < n_layer; l++) {
        const std::string p = "model.layers." + std::to_string(l) + ".";
        ts.push_back({p + "input_layernorm.weight", {32}});
        ts.push_back({p + "post_attention_layernorm.weight", {32}});
        ts.push_back({p + "self_attn.q_proj.weight", {32, 32}});
        ts.push_back({p + "self_attn.k_proj.weight", {16, 32}});
        ts.push_back({p + "self_attn.v_proj.weight", {16, 32}});
        ts.push_back({p + "self_attn.o_proj.weight", {32, 32}});
        ts.push_back({p + "mlp.gate_proj.weight", {64, 32}});
        ts.push_back({p + "mlp.up_proj.weight", {64, 32}});
        ts.push_back({p + "mlp.down_proj.weight", {32, 64}});
    }
    std::string header = "{";
    uint64_t off = 0;
    std::vector<float> data;
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, 0.2f);
    for (size_t i = 0; i < ts.size(); i++) {
        uint64_t n = 1;
        std::string shape;
        for (size_t j = 0; j < ts[i].shape.size(); j++) {
            n *= static_cast<uint64_t>(ts[i].shape[j]);
            shape += (j ? "," : "") + std::to_string(ts[i].shape[j]);
        }
        const bool norm = ts[i].shape.size() == 1;
        for (uint64_t k = 0; k < n; k++) data.push_back(norm ? 1.0f + nd(rng) * 0.5f : nd(rng));
        header += (i ? "," : "") + std::string("\"") + ts[i].name + "\":{\"dtype\":\"F32\",\"shape\":[" + shape +
                  "],\"data_offsets\":[" + std::to_string(off) + "," + std::to_string(off + n * 4) + "]}";
        off += n * 4;
    }
    header += "}";
    while (header.size() % 8 != 0) header += " ";
    const std::string path = dir + "/model.safetensors";
    FILE* f = std::fopen(path.c_str(), "wb");
    const uint64_t hl = header.size();
    std::fwrite(&hl, 8, 1, f);
    std::fwrite(header.data(), 1, header.size(), f);
    std::fwrite(data.data(), 4, data.size(), f);
    std::fclose(f);
    s.files = {path};
    return s;
}

}  // namespace lmx_test
