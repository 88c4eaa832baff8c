// safetensors.h — memory-mapped safetensors files (single or sharded) and their tensor tables.
// Owner: loaders. Thread-safety: immutable after construction; any thread may read.
//
// Format: 8-byte little-endian header length N, N bytes of JSON
// {"name": {"dtype": "F32"|"F16"|"BF16"|..., "shape": [..], "data_offsets": [begin, end]},
//  "__metadata__": {...}}, then the data section; offsets are relative to it.
// Every offset and size is checked (with overflow checks) against the file
// before anything is read; errors are ModelFileError naming the file and tensor.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common.h"

namespace lmx {

class MappedFile {  // read-only mmap of a whole file; RAII
public:
    explicit MappedFile(const std::string& path);  // throws ModelFileError (names path, errno text)
    ~MappedFile();
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;
    const uint8_t* data() const { return data_; }
    uint64_t size() const { return size_; }
    const std::string& path() const { return path_; }

private:
    std::string path_;
    const uint8_t* data_ = nullptr;
    uint64_t size_ = 0;
};

struct TensorInfo {
    std::string name;
    std::string file;  // path of the file holding it
    DType dtype;       // only F32, F16, BF16 are accepted from safetensors; GGUF tables hold any file format
    std::vector<int64_t> shape;
    const uint8_t* data;  // inside the mapping; valid while the SafetensorsSet lives
    uint64_t n_bytes;
};

class SafetensorsSet {
public:
    // Opens and validates every file. A tensor name present in two files is an error.
    explicit SafetensorsSet(const std::vector<std::string>& paths);
    // A table another loader built (gguf.h's gguf_tensor_set: a GGUF file's tensors under
    // Hugging Face names): `keep` owns the memory the tensors point into; `description` names
    // the source in errors.
    SafetensorsSet(std::map<std::string, TensorInfo> tensors, std::string description, std::shared_ptr<const void> keep)
        : tensors_(std::move(tensors)), description_(std::move(description)), keep_(std::move(keep)) {}
    // nullptr when absent.
    const TensorInfo* find(const std::string& name) const;
    // Throws ModelFileError "missing tensor 'name' (looked in: files)" when absent,
    // and "tensor 'name' in FILE: expected shape [a, b], found [c, d]" when the
    // shape differs.
    const TensorInfo& require(const std::string& name, const std::vector<int64_t>& shape) const;
    const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
    std::string describe_files() const;  // "a.safetensors, b.safetensors"

private:
    std::vector<std::unique_ptr<MappedFile>> files_;
    std::map<std::string, TensorInfo> tensors_;
    std::string description_;          // set by the table constructor
    std::shared_ptr<const void> keep_;  // likewise
};


}  // namespace lmx
