// gguf.h — memory-mapped GGUF files (llama.cpp's format, versions 2 and 3): metadata and tensor table.
// Owner: loaders. Thread-safety: immutable after construction; any thread may read.
//
// Layout (all little-endian):
//   "GGUF" | u32 version | u64 n_tensors | u64 n_kv
//   n_kv x { string key | u32 type | value }         string = u64 length + bytes (no NUL)
//        value types: u8 i8 u16 i16 u32 i32 f32 bool string array u64 i64 f64 (codes 0..12);
//        array = u32 element type | u64 count | count values (arrays of arrays allowed)
//   n_tensors x { string name | u32 n_dims (<= 4) | u64 ne[n_dims] | u32 ggml type | u64 offset }
//   padding to general.alignment (u32, default 32), then the data section; a tensor's
//   offset is relative to it and a multiple of the alignment.
// ne[0] is the innermost (contiguous) dimension: a matrix of ne = {n_in, n_out} is row-major
// [n_out, n_in], which is how GgufTensor::shape reports it (ne reversed).
//
// Every count, length, size and offset is checked for overflow and against the file size
// before it is used; errors are ModelFileError (corrupt) or UnsupportedError (a valid type
// we do not implement), each naming the file, the key or tensor, and what was expected.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common.h"
#include "safetensors.h"  // MappedFile

namespace lmx {

enum class GgufType : uint32_t {
    U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7, STRING = 8, ARRAY = 9,
    U64 = 10, I64 = 11, F64 = 12,
};
const char* gguf_type_name(GgufType t);

// One metadata value. Scalars are widened into u64 / i64 / f64 (whichever fits the type);
// arrays keep their element type and count and point into the mapping (arr_data, arr_bytes),
// strings inside arrays are read on demand with GgufFile::array_strings.
struct GgufValue {
    GgufType type = GgufType::U8;
    uint64_t u64 = 0;       // U8 U16 U32 U64 BOOL
    int64_t i64 = 0;        // I8 I16 I32 I64 (and the unsigned ones when they fit)
    double f64 = 0.0;       // F32 F64
    std::string str;        // STRING
    GgufType arr_type = GgufType::U8;  // ARRAY
    uint64_t arr_count = 0;
    const uint8_t* arr_data = nullptr;
    uint64_t arr_bytes = 0;
};

struct GgufTensor {
    std::string name;
    uint32_t ggml_type;            // as stored
    DType dtype;                   // the engine's name for it
    std::vector<int64_t> shape;    // row-major (ne reversed): [n_out, n_in] for a matrix
    const uint8_t* data;           // inside the mapping
    uint64_t n_bytes;
};

// The ggml type code of each DType a GGUF file may hold; UnsupportedError for the others.
// ggml_type_name gives "q4_K" etc. for any known code (error messages), "type N" otherwise.
const char* ggml_type_name(uint32_t ggml_type);

class GgufFile {
public:
    explicit GgufFile(const std::string& path);  // maps and validates; throws ModelFileError / UnsupportedError
    // Parses a GGUF image already in memory (the fuzz test); `name` stands for the path in errors.
    // The bytes must outlive the object.
    GgufFile(const uint8_t* data, uint64_t size, const std::string& name);

    uint32_t version() const { return version_; }
    uint64_t alignment() const { return alignment_; }
    const std::string& path() const { return name_; }
    const std::map<std::string, GgufValue>& metadata() const { return kv_; }
    const std::map<std::string, GgufTensor>& tensors() const { return tensors_; }

    const GgufValue* find_kv(const std::string& key) const;
    const GgufTensor* find(const std::string& name) const;
    // Throws ModelFileError "FILE: missing tensor 'name'" or "...: tensor 'name': expected shape
    // [a, b], found [c, d]".
    const GgufTensor& require(const std::string& name, const std::vector<int64_t>& shape) const;
    // The strings of an array-of-strings value (checked at parse time).
    std::vector<std::string> array_strings(const GgufValue& v) const;

private:
    void parse(const uint8_t* data, uint64_t size);

    std::unique_ptr<MappedFile> file_;
    std::string name_;
    uint32_t version_ = 0;
    uint64_t alignment_ = 32;
    std::map<std::string, GgufValue> kv_;
    std::map<std::string, GgufTensor> tensors_;
};

struct ModelSpec;

// True when a model's files are one GGUF file (spec.files = {"....gguf"}).
bool is_gguf_model(const std::vector<std::string>& files);

// The tensors of a GGUF model file under the Hugging Face names ModelWeights asks for
// (gguf_model.cpp: token_embd -> model.embed_tokens, blk.N.attn_q -> model.layers.N.self_attn.q_proj,
// ...), each in its own stored format. For arch "llama", attn_q / attn_k rows are put back in
// Hugging Face order (llama.cpp's converter interleaves the two RoPE halves of each head).
// The set keeps 'rope_freqs.weight' under its own name.
std::unique_ptr<SafetensorsSet> gguf_tensor_set(const ModelSpec& spec);

// Llama 3 RoPE scaling as llama.cpp stores it: 'rope_freqs.weight', f32 [head_dim / 2], factors
// that divide the inverse frequencies (theta_i = pos * inv_freq_i / factor_i). Folds them into
// spec.rope_inv_freq once at load, so every device builds its RoPE tables from the scaled
// frequencies (the CPU kernels and the Vulkan device's host-computed cos/sin alike). No-op when
// the set has no such tensor; ModelFileError for a wrong type or shape or a factor that is not a
// finite positive number.
void gguf_apply_rope_freqs(ModelSpec& spec, const SafetensorsSet& st);

}  // namespace lmx
