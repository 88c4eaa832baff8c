// json.h — a minimal strict JSON parser (RFC 8259) for the loaders' headers and configs.
// Owner: loaders. Thread-safety: json_parse is reentrant; a JsonValue is plain data.
// Syntax errors throw ModelFileError "invalid JSON at byte N: ..."; callers add their stage.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common.h"

namespace lmx {

struct JsonMember;

// A parsed value. Strict means: no comments, no trailing commas, no NaN/Infinity,
// no leading zeros, no control characters or invalid UTF-8 inside strings, no lone
// surrogates in \u escapes, and no duplicate keys within one object. A number
// written without fraction or exponent is an Int and must fit in int64; anything
// else numeric is a Number (double).
struct JsonValue {
    enum class Kind : uint8_t { Null, Bool, Int, Number, String, Array, Object };

    Kind kind = Kind::Null;
    size_t offset = 0;  // byte where the value starts (plus json_parse's base_offset)
    bool boolean = false;
    int64_t integer = 0;  // Int only
    double number = 0;    // Int and Number
    std::string string;
    std::vector<JsonValue> array;
    std::vector<JsonMember> members;  // Object members in file order; keys are unique

    bool is_int() const { return kind == Kind::Int; }
    bool is_string() const { return kind == Kind::String; }
    bool is_array() const { return kind == Kind::Array; }
    bool is_object() const { return kind == Kind::Object; }
    // The member named key of an Object, or nullptr (also for non-objects). Linear scan.
    const JsonValue* find(std::string_view key) const;
    // "an object", "an integer", ...: for messages of the form "expected X, found Y".
    const char* kind_name() const;
};

struct JsonMember {
    std::string key;
    JsonValue value;
};

constexpr int kJsonMaxDepth = 64;  // nesting of arrays + objects; deeper input is rejected

// Parses exactly one JSON value surrounded by optional whitespace. Byte offsets in
// errors and in JsonValue::offset are counted from the start of text plus base_offset
// (so a caller can report positions in the enclosing file).
JsonValue json_parse(std::string_view text, size_t base_offset = 0, int max_depth = kJsonMaxDepth);

// s made safe to quote in an error message: control bytes become \xNN and anything
// past max_bytes is cut (at a UTF-8 boundary) and marked "...". Names read from a
// file may be arbitrarily long or contain "\u0000".
std::string json_printable(std::string_view s, size_t max_bytes = 200);

}  // namespace lmx
