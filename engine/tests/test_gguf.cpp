// test_gguf.cpp — the GGUF reader: every metadata type, the tensor table, each corruption as a
// named error, and a fixed-seed fuzz of the header parser (run under ASan + UBSan by make test-cpp).
// Owner: loaders. Thread-safety: tests run one at a time.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "check.h"
#include "gguf.h"
#include "test_rand.h"

using namespace lmx;
using lmx_test::Rng;

namespace {

// Builds GGUF images byte by byte (little-endian, as x86 stores them).
struct Writer {
    std::vector<uint8_t> b;
    template <class T>
    void put(T v) {
        const size_t n = b.size();
        b.resize(n + sizeof(T));
        std::memcpy(b.data() + n, &v, sizeof(T));
    }
    void str(const std::string& s) {
        put<uint64_t>(s.size());
        b.insert(b.end(), s.begin(), s.end());
    }
    void key(const std::string& k, GgufType t) {
        str(k);
        put<uint32_t>(static_cast<uint32_t>(t));
    }
    void pad_to(uint64_t a) {
        while (b.size() % a) b.push_back(0);
    }
};

// A valid v3 file: one KV of each type (plus arrays of u32, strings and arrays), alignment 64,
// and three tensors: f32 [2, 4] "a", q4_1 [3, 32] "b" (one block per row), q6_k [1, 256] "c".
std::vector<uint8_t> valid_image(uint32_t version = 3) {
    Writer w;
    w.b = {'G', 'G', 'U', 'F'};
    w.put<uint32_t>(version);
    w.put<uint64_t>(3);   // tensors
    w.put<uint64_t>(17);  // kv
    w.key("u8", GgufType::U8), w.put<uint8_t>(200);
    w.key("i8", GgufType::I8), w.put<int8_t>(-5);
    w.key("u16", GgufType::U16), w.put<uint16_t>(60000);
    w.key("i16", GgufType::I16), w.put<int16_t>(-30000);
    w.key("u32", GgufType::U32), w.put<uint32_t>(4000000000u);
    w.key("i32", GgufType::I32), w.put<int32_t>(-2000000000);
    w.key("f32", GgufType::F32), w.put<float>(1.5f);
    w.key("bool", GgufType::BOOL), w.put<uint8_t>(1);
    w.key("general.architecture", GgufType::STRING), w.str("llama");
    w.key("u64", GgufType::U64), w.put<uint64_t>(1ull << 40);
    w.key("i64", GgufType::I64), w.put<int64_t>(-(1ll << 40));
    w.key("f64", GgufType::F64), w.put<double>(0.25);
    w.key("arr.u32", GgufType::ARRAY), w.put<uint32_t>(static_cast<uint32_t>(GgufType::U32)), w.put<uint64_t>(3);
    for (uint32_t v : {7u, 8u, 9u}) w.put<uint32_t>(v);
    w.key("arr.str", GgufType::ARRAY), w.put<uint32_t>(static_cast<uint32_t>(GgufType::STRING)), w.put<uint64_t>(3);
    for (const char* s : {"<s>", "", "h\xc3\xa9llo"}) w.str(s);
    w.key("arr.arr", GgufType::ARRAY), w.put<uint32_t>(static_cast<uint32_t>(GgufType::ARRAY)), w.put<uint64_t>(2);
    for (uint64_t n : {1ull, 2ull}) {
        w.put<uint32_t>(static_cast<uint32_t>(GgufType::I8));
        w.put<uint64_t>(n);
        for (uint64_t i = 0; i < n; ++i) w.put<int8_t>(static_cast<int8_t>(i));
    }
    w.key("empty", GgufType::STRING), w.str("");
    w.key("general.alignment", GgufType::U32), w.put<uint32_t>(64);
    // tensors: name, n_dims, ne (innermost first), type, offset
    w.str("a"), w.put<uint32_t>(2), w.put<uint64_t>(4), w.put<uint64_t>(2), w.put<uint32_t>(0), w.put<uint64_t>(0);
    w.str("b"), w.put<uint32_t>(2), w.put<uint64_t>(32), w.put<uint64_t>(3), w.put<uint32_t>(3), w.put<uint64_t>(64);
    w.str("c"), w.put<uint32_t>(2), w.put<uint64_t>(256), w.put<uint64_t>(1), w.put<uint32_t>(14),
        w.put<uint64_t>(128);
    w.pad_to(64);
    const size_t data = w.b.size();
    w.b.resize(data + 128 + 210, 0);
    for (int i = 0; i < 8; ++i) {
        const float v = static_cast<float>(i);
        std::memcpy(w.b.data() + data + 4 * i, &v, 4);
    }
    return w.b;
}

// Index of the first byte of `needle` in the image (to patch a field in place).
size_t find_bytes(const std::vector<uint8_t>& b, const std::string& needle) {
    for (size_t i = 0; i + needle.size() <= b.size(); ++i)
        if (std::memcmp(b.data() + i, needle.data(), needle.size()) == 0) return i;
    return SIZE_MAX;
}

GgufFile parse(const std::vector<uint8_t>& b) { return GgufFile(b.data(), b.size(), "test.gguf"); }

}  // namespace

TEST(gguf_reads_every_metadata_type_arrays_and_the_tensor_table) {
    const std::vector<uint8_t> img = valid_image();
    const GgufFile g = parse(img);
    CHECK(g.version() == 3);
    CHECK(g.alignment() == 64);
    CHECK(g.find_kv("u8")->u64 == 200);
    CHECK(g.find_kv("i8")->i64 == -5);
    CHECK(g.find_kv("u16")->u64 == 60000);
    CHECK(g.find_kv("i16")->i64 == -30000);
    CHECK(g.find_kv("u32")->u64 == 4000000000u);
    CHECK(g.find_kv("i32")->i64 == -2000000000);
    CHECK(g.find_kv("f32")->f64 == 1.5);
    CHECK(g.find_kv("bool")->u64 == 1);
    CHECK(g.find_kv("general.architecture")->str == "llama");
    CHECK(g.find_kv("u64")->u64 == (1ull << 40));
    CHECK(g.find_kv("i64")->i64 == -(1ll << 40));
    CHECK(g.find_kv("f64")->f64 == 0.25);
    CHECK(g.find_kv("empty")->str.empty());
    const GgufValue* arr = g.find_kv("arr.u32");
    CHECK(arr->arr_type == GgufType::U32 && arr->arr_count == 3 && arr->arr_bytes == 12);
    uint32_t third;
    std::memcpy(&third, arr->arr_data + 8, 4);
    CHECK(third == 9);
    CHECK((g.array_strings(*g.find_kv("arr.str")) == std::vector<std::string>{"<s>", "", "h\xc3\xa9llo"}));
    CHECK(g.find_kv("arr.arr")->arr_count == 2 && g.find_kv("arr.arr")->arr_bytes == 2 * 12 + 3);
    CHECK(g.find_kv("missing") == nullptr);

    CHECK(g.tensors().size() == 3);
    const GgufTensor& a = g.require("a", {2, 4});
    CHECK(a.dtype == DType::F32 && a.n_bytes == 32);
    float a7;
    std::memcpy(&a7, a.data + 28, 4);
    CHECK(a7 == 7.0f);
    const GgufTensor& b = g.require("b", {3, 32});
    CHECK(b.dtype == DType::Q4_1 && b.n_bytes == 60 && b.data == a.data + 64);
    const GgufTensor& c = g.require("c", {1, 256});
    CHECK(c.dtype == DType::Q6_K && c.n_bytes == 210 && c.data == a.data + 128);
    CHECK((reinterpret_cast<uintptr_t>(a.data) - reinterpret_cast<uintptr_t>(img.data())) % 64 == 0);
    CHECK(parse(valid_image(2)).version() == 2);
}

TEST(gguf_names_the_file_tensor_and_expectation_on_each_kind_of_corruption) {
    std::vector<uint8_t> img = valid_image();
    CHECK_THROWS(parse(img).require("a", {4, 2}), ModelFileError, "tensor 'a': expected shape [4, 2], found [2, 4]");
    CHECK_THROWS(parse(img).require("zz", {1}), ModelFileError, "test.gguf: missing tensor 'zz'");

    auto patched = [&](size_t at, const void* v, size_t n) {
        std::vector<uint8_t> b = img;
        std::memcpy(b.data() + at, v, n);
        return b;
    };
    CHECK_THROWS(parse(patched(0, "GGML", 4)), ModelFileError, "test.gguf: bad magic");
    const uint32_t v1 = 1;
    CHECK_THROWS(parse(patched(4, &v1, 4)), UnsupportedError, "version: expected 2 or 3, found 1");
    // tensor "b"'s type field follows its name, n_dims and two ne values
    const size_t b_type = find_bytes(img, std::string("\x01\0\0\0\0\0\0\0b", 9)) + 9 + 4 + 16;
    const uint32_t unknown = 99, q8_1 = 9, q4_0 = 2;
    CHECK_THROWS(parse(patched(b_type, &unknown, 4)), ModelFileError, "tensor 'b': unknown ggml type 99");
    CHECK_THROWS(parse(patched(b_type, &q8_1, 4)), UnsupportedError, "tensor 'b': weight format q8_1 is not supported");
    {  // q4_0 is smaller (18 bytes a row): still fits; its offset stays aligned
        const GgufFile g = parse(patched(b_type, &q4_0, 4));
        CHECK(g.find("b")->dtype == DType::Q4_0 && g.find("b")->n_bytes == 54);
    }
    const uint64_t past = 1 << 20, misaligned = 65;
    CHECK_THROWS(parse(patched(b_type + 4, &past, 8)), ModelFileError, "tensor 'b': data [");
    CHECK_THROWS(parse(patched(b_type + 4, &past, 8)), ModelFileError, "ends past the end of the file");
    CHECK_THROWS(parse(patched(b_type + 4, &misaligned, 8)), ModelFileError,
                 "tensor 'b': data offset 65 is not a multiple of the alignment 64");
    const uint64_t huge_ne = 1ull << 39;  // 2^39 x 3 rows of q4_1 is far past the file
    CHECK_THROWS(parse(patched(b_type - 16, &huge_ne, 8)), ModelFileError, "tensor 'b'");
    const uint64_t ragged = 33;
    CHECK_THROWS(parse(patched(b_type - 16, &ragged, 8)), ModelFileError,
                 "tensor 'b': q4_1 rows hold whole blocks of 32 values, found a row of 33");
    const uint32_t five_dims = 5;
    CHECK_THROWS(parse(patched(b_type - 20, &five_dims, 4)), ModelFileError, "tensor 'b': expected 1..4 dimensions");
    const size_t f32_type = find_bytes(img, "f32") + 3;
    const uint32_t bad_kv_type = 13;
    CHECK_THROWS(parse(patched(f32_type, &bad_kv_type, 4)), ModelFileError,
                 "metadata 'f32' (type): expected a value type 0..12, found 13");
    const uint8_t two = 2;
    CHECK_THROWS(parse(patched(find_bytes(img, "bool") + 8, &two, 1)), ModelFileError, "metadata 'bool'");
    const uint64_t n_kv_huge = 1ull << 60;
    CHECK_THROWS(parse(patched(16, &n_kv_huge, 8)), ModelFileError, "metadata count");
    CHECK_THROWS(parse(patched(8, &n_kv_huge, 8)), ModelFileError, "tensor count");
    const uint32_t align3 = 3;
    CHECK_THROWS(parse(patched(find_bytes(img, "general.alignment") + 17 + 4, &align3, 4)), ModelFileError,
                 "general.alignment': expected a power of two");
    {  // a duplicated key: rename "i8" to "u8"
        std::vector<uint8_t> b = img;
        b[find_bytes(img, "i8")] = 'u';
        CHECK_THROWS(parse(b), ModelFileError, "metadata 'u8': key appears twice");
    }
    // Truncation anywhere is an error naming what was being read, never a crash.
    for (size_t n = 0; n < img.size(); ++n) {
        std::vector<uint8_t> b(img.begin(), img.begin() + static_cast<std::ptrdiff_t>(n));
        bool threw = false;
        try {
            GgufFile g(b.data(), b.size(), "cut.gguf");
        } catch (const ModelFileError& e) {
            threw = std::string(e.what()).find("cut.gguf") != std::string::npos;
        }
        CHECK(threw);
    }
}

TEST(gguf_header_fuzz_never_crashes_and_fails_only_with_model_errors) {
    // Fixed seed: 4000 mutants of the valid image, each with 1-8 bytes overwritten (mostly
    // in the header, where the lengths and counts live), some also truncated. Each parse
    // either succeeds or throws lmx::Error; ASan checks that no read leaves the buffer.
    const std::vector<uint8_t> img = valid_image();
    size_t header = img.size() - 128 - 210;
    Rng rng{20261204};
    int n_ok = 0, n_err = 0, n_other = 0;
    for (int it = 0; it < 4000; ++it) {
        std::vector<uint8_t> b = img;
        const int n_mut = 1 + static_cast<int>(rng.next() % 8);
        for (int m = 0; m < n_mut; ++m) {
            const size_t at = rng.next() % 4 ? rng.next() % header : rng.next() % b.size();
            const uint64_t kind = rng.next() % 4;
            if (kind == 0) b[at] = static_cast<uint8_t>(rng.next());
            else if (kind == 1) b[at] ^= static_cast<uint8_t>(1u << (rng.next() % 8));
            else if (kind == 2) b[at] = 0xff;
            else b[at] = 0;
        }
        if (rng.next() % 4 == 0) b.resize(rng.next() % (b.size() + 1));
        std::vector<uint8_t> exact(b);  // exactly sized: ASan flags any read past it
        exact.shrink_to_fit();
        try {
            GgufFile g(exact.data(), exact.size(), "fuzz.gguf");
            for (const auto& kv : g.metadata()) (void)g.array_strings(kv.second);
            for (const auto& t : g.tensors()) CHECK(t.second.data + t.second.n_bytes <= exact.data() + exact.size());
            ++n_ok;
        } catch (const Error&) {
            ++n_err;
        } catch (...) {
            ++n_other;
        }
    }
    CHECK(n_other == 0);
    CHECK(n_err > 1000);  // most mutants are corrupt...
    CHECK(n_ok > 10);     // ...and some still parse (a changed value, not a changed structure)
}

TEST(gguf_file_maps_a_real_file_and_names_it_in_errors) {
    const std::string path = "/tmp/lmx_test_gguf_" + std::to_string(::getpid()) + ".gguf";
    std::vector<uint8_t> img = valid_image();
    FILE* f = std::fopen(path.c_str(), "wb");
    CHECK(f != nullptr);
    std::fwrite(img.data(), 1, img.size(), f);
    std::fclose(f);
    {
        const GgufFile g(path);
        CHECK(g.path() == path && g.find("c") != nullptr);
    }
    f = std::fopen(path.c_str(), "wb");
    std::fwrite(img.data(), 1, img.size() - 1, f);  // the last tensor now ends past the end
    std::fclose(f);
    CHECK_THROWS(GgufFile{path}, ModelFileError, (path + ": tensor 'c': data [").c_str());
    std::remove(path.c_str());
}
