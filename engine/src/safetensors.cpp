// safetensors.cpp — maps safetensors files and validates their headers into TensorInfo tables.
// Owner: loaders. Thread-safety: each constructor works on its own state; results are immutable.
// Every check runs before any tensor byte is handed out; messages follow safetensors.h.
#include "safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <string_view>
#include <system_error>

#include "json.h"

namespace lmx {

namespace {

constexpr const char* kStage = "error loading safetensors header: ";
// Far above any real header (a 70B model's shard lists ~1 MB of JSON) and close to
// the reference implementation's 100 MB limit; parsing costs ~10x this in memory.
constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;

std::string errno_text(int e) { return std::generic_category().message(e); }  // thread-safe strerror

std::string shape_str(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) {
        if (i) s += ", ";
        s += std::to_string(shape[i]);
    }
    return s + "]";
}

struct StoredDType {
    const char* name;  // as spelled in the header
    DType dtype;
    uint64_t elem_bytes;
};
constexpr StoredDType kStoredDTypes[] = {{"F32", DType::F32, 4}, {"F16", DType::F16, 2}, {"BF16", DType::BF16, 2}};

// The value of an integer field that must be >= 0, or throws naming the field.
uint64_t non_negative(const JsonValue& v, const std::string& where, const std::string& field) {
    if (!v.is_int() || v.integer < 0) {
        const std::string found = v.is_int() ? std::to_string(v.integer) : v.kind_name();
        throw ModelFileError(where + field + ": expected a non-negative integer, found " + found);
    }
    return static_cast<uint64_t>(v.integer);
}

const JsonValue& field(const JsonValue& entry, const char* name, JsonValue::Kind kind, const char* kind_text,
                       const std::string& where) {
    const JsonValue* v = entry.find(name);
    if (v == nullptr) throw ModelFileError(where + "missing field '" + name + "'");
    if (v->kind != kind)
        throw ModelFileError(where + "field '" + name + "': expected " + kind_text + ", found " + v->kind_name());
    return *v;
}

void check_metadata(const JsonValue& meta, const std::string& path) {
    const std::string where = std::string(kStage) + path + ": __metadata__";
    if (!meta.is_object())
        throw ModelFileError(where + ": expected an object of strings, found " + meta.kind_name());
    for (const JsonMember& m : meta.members)
        if (!m.value.is_string())
            throw ModelFileError(where + " key '" + json_printable(m.key) + "': expected a string, found " +
                                 m.value.kind_name());
}

// One header entry -> TensorInfo. data_section/n_data_bytes bound the file's data section.
TensorInfo parse_tensor(const std::string& name, const JsonValue& entry, const std::string& path,
                        const uint8_t* data_section, uint64_t n_data_bytes) {
    const std::string shown = "tensor '" + json_printable(name) + "' in " + path;
    const std::string where = kStage + shown + ": ";
    if (!entry.is_object())
        throw ModelFileError(where + "expected an object with dtype, shape and data_offsets, found " +
                             entry.kind_name());

    const JsonValue& dtype = field(entry, "dtype", JsonValue::Kind::String, "a string", where);
    const StoredDType* stored = nullptr;
    for (const StoredDType& d : kStoredDTypes)
        if (dtype.string == d.name) stored = &d;
    if (stored == nullptr)
        throw UnsupportedError(where + "dtype " + json_printable(dtype.string) +
                               " is not supported (expected F32, F16 or BF16)");

    const JsonValue& shape_v = field(entry, "shape", JsonValue::Kind::Array, "an array", where);
    std::vector<int64_t> shape;
    shape.reserve(shape_v.array.size());
    bool has_zero = false;
    for (size_t i = 0; i < shape_v.array.size(); ++i) {
        const uint64_t dim = non_negative(shape_v.array[i], where, "shape[" + std::to_string(i) + "]");
        shape.push_back(static_cast<int64_t>(dim));
        has_zero = has_zero || dim == 0;
    }
    // A zero dimension makes the product 0 whatever the others are; otherwise every
    // partial product is checked, so a hostile shape cannot wrap to a small size.
    uint64_t n_bytes_expected = 0;
    if (!has_zero) {
        const std::string what = where + "byte size of shape " + shape_str(shape) + " x " + stored->name;
        n_bytes_expected = stored->elem_bytes;
        for (int64_t d : shape) n_bytes_expected = checked_mul(n_bytes_expected, static_cast<uint64_t>(d), what.c_str());
    }

    const JsonValue& offs = field(entry, "data_offsets", JsonValue::Kind::Array, "an array", where);
    if (offs.array.size() != 2)
        throw ModelFileError(where + "data_offsets: expected [begin, end], found an array of " +
                             std::to_string(offs.array.size()) + " elements");
    const uint64_t begin = non_negative(offs.array[0], where, "data_offsets[0]");
    const uint64_t end = non_negative(offs.array[1], where, "data_offsets[1]");
    if (begin > end)
        throw ModelFileError(where + "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                             "]: expected begin <= end");
    if (end > n_data_bytes)
        throw ModelFileError(kStage + shown + " ends at byte " + std::to_string(end) +
                             ", past the end of the data section (" + std::to_string(n_data_bytes) +
                             " bytes): the file is truncated or its header is corrupt");
    if (end - begin != n_bytes_expected)
        throw ModelFileError(where + "shape " + shape_str(shape) + " of " + stored->name + " needs " +
                             std::to_string(n_bytes_expected) + " bytes, but data_offsets [" + std::to_string(begin) +
                             ", " + std::to_string(end) + "] hold " + std::to_string(end - begin));

    TensorInfo t;
    t.name = name;
    t.file = path;
    t.dtype = stored->dtype;
    t.shape = std::move(shape);
    t.data = data_section + begin;  // in bounds: begin <= end <= n_data_bytes
    t.n_bytes = end - begin;
    return t;
}

// Validates one mapped file and adds its tensors to out. A name already in out
// (from an earlier file) is an error naming both files.
void load_file(const MappedFile& f, std::map<std::string, TensorInfo>& out) {
    const std::string& path = f.path();
    const std::string where = kStage + path + ": ";
    const uint64_t size = f.size();
    if (size < 8)
        throw ModelFileError(where + "file is " + std::to_string(size) +
                             " bytes, too short for the 8-byte header length");
    uint64_t n_header = 0;  // little-endian on disk, whatever the host order
    for (int i = 0; i < 8; ++i) n_header |= static_cast<uint64_t>(f.data()[i]) << (8 * i);
    if (n_header > size - 8)  // 8 + n_header could wrap; size - 8 cannot
        throw ModelFileError(where + "header length " + std::to_string(n_header) +
                             " runs past the end of the file (size " + std::to_string(size) + ")");
    if (n_header > kMaxHeaderBytes)
        throw ModelFileError(where + "header length " + std::to_string(n_header) + " exceeds the limit of " +
                             std::to_string(kMaxHeaderBytes) + " bytes");

    JsonValue root;
    try {
        root = json_parse(std::string_view(reinterpret_cast<const char*>(f.data()) + 8, n_header), 8);
    } catch (const ModelFileError& e) {
        throw ModelFileError(where + "header is not valid JSON: " + e.what());
    }
    if (!root.is_object()) throw ModelFileError(where + "header: expected a JSON object, found " + root.kind_name());

    const uint8_t* data_section = f.data() + 8 + n_header;
    const uint64_t n_data_bytes = size - 8 - n_header;
    for (const JsonMember& m : root.members) {
        if (m.key == "__metadata__") {
            check_metadata(m.value, path);
            continue;
        }
        // Keys are unique within one header (the JSON parser rejects duplicates),
        // so a clash here is always with an earlier file.
        auto it = out.find(m.key);
        if (it != out.end())
            throw ModelFileError(std::string(kStage) + "tensor '" + json_printable(m.key) + "' appears in both " +
                                 it->second.file + " and " + path);
        out.emplace(m.key, parse_tensor(m.key, m.value, path, data_section, n_data_bytes));
    }
}

}  // namespace

MappedFile::MappedFile(const std::string& path) : path_(path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw ModelFileError("cannot open " + path + ": " + errno_text(errno));
    struct stat st;
    if (::fstat(fd, &st) != 0) {
        const int e = errno;
        ::close(fd);
        throw ModelFileError("cannot stat " + path + ": " + errno_text(e));
    }
    if (!S_ISREG(st.st_mode)) {
        ::close(fd);
        throw ModelFileError("cannot map " + path + ": not a regular file");
    }
    if (st.st_size == 0) {
        ::close(fd);
        throw ModelFileError("cannot map " + path + ": empty file");
    }
    // A file shrunk by someone else after this point makes reads fault (SIGBUS);
    // model files are expected to be immutable while loaded.
    void* p = ::mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
    const int e = errno;
    ::close(fd);  // the mapping keeps its own reference to the file
    if (p == MAP_FAILED) throw ModelFileError("cannot mmap " + path + ": " + errno_text(e));
    data_ = static_cast<const uint8_t*>(p);
    size_ = static_cast<uint64_t>(st.st_size);
}

MappedFile::~MappedFile() {
    if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), static_cast<size_t>(size_));
}

SafetensorsSet::SafetensorsSet(const std::vector<std::string>& paths) {
    if (paths.empty()) throw InvalidArgument("SafetensorsSet: no files given");
    for (const std::string& path : paths) {
        files_.push_back(std::make_unique<MappedFile>(path));
        load_file(*files_.back(), tensors_);
    }
}

const TensorInfo* SafetensorsSet::find(const std::string& name) const {
    auto it = tensors_.find(name);
    return it == tensors_.end() ? nullptr : &it->second;
}

const TensorInfo& SafetensorsSet::require(const std::string& name, const std::vector<int64_t>& shape) const {
    const TensorInfo* t = find(name);
    if (t == nullptr) throw ModelFileError("missing tensor '" + name + "' (looked in: " + describe_files() + ")");
    if (t->shape != shape)
        throw ModelFileError("tensor '" + name + "' in " + t->file + ": expected shape " + shape_str(shape) +
                             ", found " + shape_str(t->shape));
    return *t;
}

std::string SafetensorsSet::describe_files() const {
    if (!description_.empty()) return description_;
    std::string s;
    for (const auto& f : files_) {
        if (!s.empty()) s += ", ";
        s += f->path();
    }
    return s;
}

}  // namespace lmx
