// gguf.cpp — parses and validates a GGUF file's header, metadata and tensor table.
// Owner: loaders. Thread-safety: each constructor works on its own state; results are immutable.
// A Cursor reads the header front to back; every read checks what is left of the file first,
// so a truncated or lying header ends in a ModelFileError, never a read past the mapping.
#include "gguf.h"

#include <cstring>

namespace lmx {

namespace {

constexpr const char* kStage = "error loading GGUF: ";
constexpr uint32_t kMaxDims = 4;           // GGML_MAX_DIMS
constexpr uint64_t kMaxArrayDepth = 8;     // arrays of arrays: far above anything real
constexpr uint64_t kDefaultAlignment = 32;

struct GgmlTypeInfo {
    uint32_t code;
    const char* name;
    int64_t block_elems;  // 0: a known ggml type the engine does not implement
    int64_t block_bytes;
    DType dtype;
};
// ggml's type codes (ggml.h enum ggml_type). The gaps (4, 5) are retired formats.
constexpr GgmlTypeInfo kGgmlTypes[] = {
    {0, "f32", 1, 4, DType::F32},        {1, "f16", 1, 2, DType::F16},
    {2, "q4_0", 32, 18, DType::Q4_0},    {3, "q4_1", 32, 20, DType::Q4_1},
    {6, "q5_0", 32, 22, DType::Q5_0},    {7, "q5_1", 32, 24, DType::Q5_1},
    {8, "q8_0", 32, 34, DType::Q8_0},    {9, "q8_1", 0, 0, DType::F32},
    {10, "q2_K", 256, 84, DType::Q2_K},  {11, "q3_K", 256, 110, DType::Q3_K},
    {12, "q4_K", 256, 144, DType::Q4_K}, {13, "q5_K", 256, 176, DType::Q5_K},
    {14, "q6_K", 256, 210, DType::Q6_K}, {15, "q8_K", 0, 0, DType::F32},
    {16, "iq2_xxs", 0, 0, DType::F32},   {17, "iq2_xs", 0, 0, DType::F32},
    {18, "iq3_xxs", 0, 0, DType::F32},   {19, "iq1_s", 0, 0, DType::F32},
    {20, "iq4_nl", 0, 0, DType::F32},    {21, "iq3_s", 0, 0, DType::F32},
    {22, "iq2_s", 0, 0, DType::F32},     {23, "iq4_xs", 0, 0, DType::F32},
    {24, "i8", 0, 0, DType::F32},        {25, "i16", 0, 0, DType::F32},
    {26, "i32", 0, 0, DType::F32},       {27, "i64", 0, 0, DType::F32},
    {28, "f64", 0, 0, DType::F32},       {29, "iq1_m", 0, 0, DType::F32},
    {30, "bf16", 1, 2, DType::BF16},     {34, "tq1_0", 0, 0, DType::F32},
    {35, "tq2_0", 0, 0, DType::F32},     {39, "mxfp4", 0, 0, DType::F32},
};

const GgmlTypeInfo* ggml_type_info(uint32_t code) {
    for (const GgmlTypeInfo& t : kGgmlTypes)
        if (t.code == code) return &t;
    return nullptr;
}

// Bytes of one value of a fixed-size metadata type; 0 for STRING and ARRAY.
uint64_t scalar_bytes(GgufType t) {
    switch (t) {
        case GgufType::U8:
        case GgufType::I8:
        case GgufType::BOOL: return 1;
        case GgufType::U16:
        case GgufType::I16: return 2;
        case GgufType::U32:
        case GgufType::I32:
        case GgufType::F32: return 4;
        case GgufType::U64:
        case GgufType::I64:
        case GgufType::F64: return 8;
        case GgufType::STRING:
        case GgufType::ARRAY: return 0;
    }
    return 0;
}

// Printable form of a key or name taken from the file (control bytes escaped, length capped).
std::string printable(const std::string& s) {
    std::string out;
    for (size_t i = 0; i < s.size() && i < 200; ++i) {
        const unsigned char c = static_cast<unsigned char>(s[i]);
        if (c < 0x20 || c == 0x7f) {
            static const char* kHex = "0123456789abcdef";
            out += "\\x";
            out += kHex[c >> 4];
            out += kHex[c & 15];
        } else {
            out += static_cast<char>(c);
        }
    }
    if (s.size() > 200) out += "...";
    return out;
}

std::string shape_str(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) {
        if (i) s += ", ";
        s += std::to_string(shape[i]);
    }
    return s + "]";
}

class Cursor {
public:
    Cursor(const uint8_t* data, uint64_t size, const std::string& file) : p_(data), size_(size), file_(file) {}
    uint64_t pos() const { return pos_; }
    uint64_t left() const { return size_ - pos_; }
    const uint8_t* here() const { return p_ + pos_; }

    // Throws unless n more bytes exist; `what` says what was being read.
    void need(uint64_t n, const std::string& what) const {
        if (n > left())
            throw ModelFileError(std::string(kStage) + file_ + ": truncated reading " + what + " at byte " +
                                 std::to_string(pos_) + ": expected " + std::to_string(n) + " more bytes, found " +
                                 std::to_string(left()));
    }
    void skip(uint64_t n, const std::string& what) {
        need(n, what);
        pos_ += n;
    }
    template <class T>
    T read(const std::string& what) {
        need(sizeof(T), what);
        T v;
        std::memcpy(&v, p_ + pos_, sizeof(T));
        pos_ += sizeof(T);
        return v;
    }
    std::string read_string(const std::string& what) {
        const uint64_t n = read<uint64_t>(what + " (length)");
        need(n, what);
        std::string s(reinterpret_cast<const char*>(p_ + pos_), static_cast<size_t>(n));
        pos_ += n;
        return s;
    }

private:
    const uint8_t* p_;
    uint64_t size_;
    uint64_t pos_ = 0;
    const std::string& file_;
};

GgufType read_type(Cursor& c, const std::string& file, const std::string& what) {
    const uint32_t t = c.read<uint32_t>(what);
    if (t > static_cast<uint32_t>(GgufType::F64))
        throw ModelFileError(std::string(kStage) + file + ": " + what + ": expected a value type 0..12, found " +
                             std::to_string(t));
    return static_cast<GgufType>(t);
}

// Skips (and so validates) the elements of an array; `depth` bounds nesting.
void skip_array(Cursor& c, GgufType elem, uint64_t count, const std::string& file, const std::string& what,
                uint64_t depth) {
    if (depth > kMaxArrayDepth)
        throw ModelFileError(std::string(kStage) + file + ": " + what + ": arrays nested deeper than " +
                             std::to_string(kMaxArrayDepth));
    if (const uint64_t b = scalar_bytes(elem)) {
        c.skip(checked_mul(count, b, (std::string(kStage) + file + ": " + what).c_str()), what);
        return;
    }
    for (uint64_t i = 0; i < count; ++i) {
        if (elem == GgufType::STRING) {
            const uint64_t n = c.read<uint64_t>(what + " element " + std::to_string(i));
            c.skip(n, what + " element " + std::to_string(i));
        } else {  // ARRAY
            const std::string w = what + " element " + std::to_string(i);
            const GgufType inner = read_type(c, file, w + " (element type)");
            const uint64_t n = c.read<uint64_t>(w + " (count)");
            skip_array(c, inner, n, file, w, depth + 1);
        }
    }
}

GgufValue read_value(Cursor& c, GgufType t, const std::string& file, const std::string& what) {
    GgufValue v;
    v.type = t;
    switch (t) {
        case GgufType::U8: v.u64 = c.read<uint8_t>(what); v.i64 = static_cast<int64_t>(v.u64); break;
        case GgufType::I8: v.i64 = c.read<int8_t>(what); break;
        case GgufType::U16: v.u64 = c.read<uint16_t>(what); v.i64 = static_cast<int64_t>(v.u64); break;
        case GgufType::I16: v.i64 = c.read<int16_t>(what); break;
        case GgufType::U32: v.u64 = c.read<uint32_t>(what); v.i64 = static_cast<int64_t>(v.u64); break;
        case GgufType::I32: v.i64 = c.read<int32_t>(what); break;
        case GgufType::F32: v.f64 = c.read<float>(what); break;
        case GgufType::BOOL: {
            const uint8_t b = c.read<uint8_t>(what);
            if (b > 1)
                throw ModelFileError(std::string(kStage) + file + ": " + what + ": expected a bool (0 or 1), found " +
                                     std::to_string(b));
            v.u64 = b;
            break;
        }
        case GgufType::STRING: v.str = c.read_string(what); break;
        case GgufType::U64:
            v.u64 = c.read<uint64_t>(what);
            v.i64 = v.u64 <= static_cast<uint64_t>(INT64_MAX) ? static_cast<int64_t>(v.u64) : 0;
            break;
        case GgufType::I64: v.i64 = c.read<int64_t>(what); break;
        case GgufType::F64: v.f64 = c.read<double>(what); break;
        case GgufType::ARRAY: {
            v.arr_type = read_type(c, file, what + " (element type)");
            v.arr_count = c.read<uint64_t>(what + " (count)");
            const uint64_t start = c.pos();
            v.arr_data = c.here();
            skip_array(c, v.arr_type, v.arr_count, file, what, 1);
            v.arr_bytes = c.pos() - start;
            break;
        }
    }
    return v;
}

}  // namespace

const char* gguf_type_name(GgufType t) {
    static const char* kNames[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32",
                                   "bool", "string", "array", "u64", "i64", "f64"};
    const auto i = static_cast<uint32_t>(t);
    return i < sizeof kNames / sizeof kNames[0] ? kNames[i] : "?";
}

const char* ggml_type_name(uint32_t ggml_type) {
    const GgmlTypeInfo* t = ggml_type_info(ggml_type);
    return t ? t->name : "unknown";
}

GgufFile::GgufFile(const std::string& path) : file_(std::make_unique<MappedFile>(path)), name_(path) {
    parse(file_->data(), file_->size());
}

GgufFile::GgufFile(const uint8_t* data, uint64_t size, const std::string& name) : name_(name) { parse(data, size); }

void GgufFile::parse(const uint8_t* data, uint64_t size) {
    const std::string where = std::string(kStage) + name_ + ": ";
    Cursor c(data, size, name_);
    c.need(4, "the magic");
    if (std::memcmp(data, "GGUF", 4) != 0)
        throw ModelFileError(where + "bad magic: expected the bytes 'GGUF' at offset 0; not a GGUF file");
    c.skip(4, "the magic");
    version_ = c.read<uint32_t>("the version");
    if (version_ != 2 && version_ != 3)
        throw UnsupportedError(where + "version: expected 2 or 3, found " + std::to_string(version_) +
                               (version_ == 1 ? " (GGUF v1: re-convert with a current llama.cpp)" : ""));
    const uint64_t n_tensors = c.read<uint64_t>("the tensor count");
    const uint64_t n_kv = c.read<uint64_t>("the metadata count");
    // Each entry takes at least 12 (KV: empty key + type) / 24 bytes (tensor: name length,
    // n_dims, type, offset): a count the file cannot hold is corrupt, caught before any loop.
    if (n_kv > c.left() / 12)
        throw ModelFileError(where + "metadata count " + std::to_string(n_kv) + " cannot fit in the " +
                             std::to_string(size) + "-byte file");
    if (n_tensors > c.left() / 24)
        throw ModelFileError(where + "tensor count " + std::to_string(n_tensors) + " cannot fit in the " +
                             std::to_string(size) + "-byte file");

    for (uint64_t i = 0; i < n_kv; ++i) {
        const std::string key = c.read_string("metadata key " + std::to_string(i));
        const std::string what = "metadata '" + printable(key) + "'";
        const GgufType t = read_type(c, name_, what + " (type)");
        GgufValue v = read_value(c, t, name_, what);
        if (!kv_.emplace(key, std::move(v)).second) throw ModelFileError(where + what + ": key appears twice");
    }
    if (const GgufValue* a = find_kv("general.alignment")) {
        if (a->type != GgufType::U32 || a->u64 == 0 || (a->u64 & (a->u64 - 1)) != 0)
            throw ModelFileError(where + "metadata 'general.alignment': expected a power of two (u32), found " +
                                 (a->type == GgufType::U32 ? std::to_string(a->u64) : gguf_type_name(a->type)));
        alignment_ = a->u64;
    } else {
        alignment_ = kDefaultAlignment;
    }

    struct Pending {
        std::string name;
        uint32_t type;
        std::vector<int64_t> shape;
        uint64_t offset, n_bytes;
    };
    std::vector<Pending> pending;
    pending.reserve(static_cast<size_t>(n_tensors));
    for (uint64_t i = 0; i < n_tensors; ++i) {
        Pending p;
        p.name = c.read_string("tensor name " + std::to_string(i));
        const std::string what = "tensor '" + printable(p.name) + "'";
        const uint32_t n_dims = c.read<uint32_t>(what + " (n_dims)");
        if (n_dims == 0 || n_dims > kMaxDims)
            throw ModelFileError(where + what + ": expected 1.." + std::to_string(kMaxDims) + " dimensions, found " +
                                 std::to_string(n_dims));
        std::vector<uint64_t> ne(n_dims);
        uint64_t n_elems = 1;
        for (uint32_t d = 0; d < n_dims; ++d) {
            ne[d] = c.read<uint64_t>(what + " (ne)");
            if (ne[d] == 0 || ne[d] > (uint64_t{1} << 40))
                throw ModelFileError(where + what + ": dimension " + std::to_string(d) + " expected 1..2^40, found " +
                                     std::to_string(ne[d]));
            n_elems = checked_mul(n_elems, ne[d], (where + what + " element count").c_str());
        }
        p.type = c.read<uint32_t>(what + " (type)");
        p.offset = c.read<uint64_t>(what + " (offset)");
        const GgmlTypeInfo* ti = ggml_type_info(p.type);
        if (ti == nullptr)
            throw ModelFileError(where + what + ": unknown ggml type " + std::to_string(p.type) +
                                 "; expected one of f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q2_K..q6_K");
        if (ti->block_elems == 0)
            throw UnsupportedError(where + what + ": weight format " + ti->name +
                                   " is not supported; expected one of f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, "
                                   "q2_K, q3_K, q4_K, q5_K, q6_K (re-quantize the model to one of them)");
        if (ne[0] % static_cast<uint64_t>(ti->block_elems) != 0)
            throw ModelFileError(where + what + ": " + ti->name + " rows hold whole blocks of " +
                                 std::to_string(ti->block_elems) + " values, found a row of " + std::to_string(ne[0]));
        p.n_bytes = checked_mul(n_elems / static_cast<uint64_t>(ti->block_elems),
                                static_cast<uint64_t>(ti->block_bytes), (where + what + " size").c_str());
        if (p.offset % alignment_ != 0)
            throw ModelFileError(where + what + ": data offset " + std::to_string(p.offset) +
                                 " is not a multiple of the alignment " + std::to_string(alignment_));
        for (uint32_t d = n_dims; d-- > 0;) p.shape.push_back(static_cast<int64_t>(ne[d]));
        pending.push_back(std::move(p));
    }
    // The data section starts at the next multiple of the alignment.
    const uint64_t data_start = (c.pos() + alignment_ - 1) / alignment_ * alignment_;
    if (data_start > size)
        throw ModelFileError(where + "truncated: the data section would start at byte " + std::to_string(data_start) +
                             ", past the end of the " + std::to_string(size) + "-byte file");
    for (Pending& p : pending) {
        const std::string what = "tensor '" + printable(p.name) + "'";
        const uint64_t begin = checked_add(data_start, p.offset, (where + what + " offset").c_str());
        const uint64_t end = checked_add(begin, p.n_bytes, (where + what + " end").c_str());
        if (end > size)
            throw ModelFileError(where + what + ": data [" + std::to_string(begin) + ", " + std::to_string(end) +
                                 ") ends past the end of the file (" + std::to_string(size) +
                                 " bytes); the file is truncated or corrupt");
        const GgmlTypeInfo* ti = ggml_type_info(p.type);
        GgufTensor t{p.name, p.type, ti->dtype, std::move(p.shape), data + begin, p.n_bytes};
        if (!tensors_.emplace(p.name, std::move(t)).second)
            throw ModelFileError(where + what + ": name appears twice in the tensor table");
    }
}

const GgufValue* GgufFile::find_kv(const std::string& key) const {
    auto it = kv_.find(key);
    return it == kv_.end() ? nullptr : &it->second;
}

const GgufTensor* GgufFile::find(const std::string& name) const {
    auto it = tensors_.find(name);
    return it == tensors_.end() ? nullptr : &it->second;
}

const GgufTensor& GgufFile::require(const std::string& name, const std::vector<int64_t>& shape) const {
    const GgufTensor* t = find(name);
    if (t == nullptr) throw ModelFileError(std::string(kStage) + name_ + ": missing tensor '" + name + "'");
    if (t->shape != shape)
        throw ModelFileError(std::string(kStage) + name_ + ": tensor '" + name + "': expected shape " +
                             shape_str(shape) + ", found " + shape_str(t->shape));
    return *t;
}

std::vector<std::string> GgufFile::array_strings(const GgufValue& v) const {
    std::vector<std::string> out;
    if (v.type != GgufType::ARRAY || v.arr_type != GgufType::STRING) return out;
    out.reserve(static_cast<size_t>(v.arr_count));
    Cursor c(v.arr_data, v.arr_bytes, name_);  // bounds were checked at parse time
    for (uint64_t i = 0; i < v.arr_count; ++i) out.push_back(c.read_string("array element"));
    return out;
}

}  // namespace lmx
