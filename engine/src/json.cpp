// json.cpp — strict recursive-descent JSON parser (see json.h for the accepted language).
// Owner: loaders. Thread-safety: no shared state; every parse owns its Parser.
// Limits (RFC 8259 section 9 allows them): nesting depth, int64 integers, finite doubles.
#include "json.h"

#include <charconv>
#include <cstdio>
#include <cstring>
#include <unordered_set>

namespace lmx {

namespace {

bool is_digit(char c) { return c >= '0' && c <= '9'; }

void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
        out += static_cast<char>(cp);
    } else if (cp < 0x800) {
        out += static_cast<char>(0xC0 | (cp >> 6));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        out += static_cast<char>(0xE0 | (cp >> 12));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
        out += static_cast<char>(0xF0 | (cp >> 18));
        out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (cp & 0x3F));
    }
}

// Cursor over [begin_, end_). Every read checks p_ < end_ first: the text is not
// NUL-terminated (it is usually a slice of a memory-mapped file).
class Parser {
public:
    Parser(std::string_view text, size_t base_offset, int max_depth)
        : begin_(text.data()), p_(text.data()), end_(text.data() + text.size()), base_(base_offset),
          max_depth_(max_depth) {}

    JsonValue parse_document() {
        skip_ws();
        JsonValue v = parse_value(0);
        skip_ws();
        if (p_ != end_) fail(p_, "expected end of input after the value, found " + found(p_));
        return v;
    }

private:
    const char* begin_;
    const char* p_;
    const char* end_;
    size_t base_;
    int max_depth_;

    size_t pos(const char* at) const { return base_ + static_cast<size_t>(at - begin_); }

    [[noreturn]] void fail(const char* at, const std::string& msg) const {
        throw ModelFileError("invalid JSON at byte " + std::to_string(pos(at)) + ": " + msg);
    }

    std::string found(const char* at) const {
        if (at >= end_) return "end of input";
        const unsigned char c = static_cast<unsigned char>(*at);
        if (c >= 0x20 && c < 0x7F) return std::string("'") + static_cast<char>(c) + "'";
        char buf[16];
        std::snprintf(buf, sizeof buf, "byte 0x%02x", c);
        return buf;
    }

    bool at(char c) const { return p_ < end_ && *p_ == c; }

    void skip_ws() {
        while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
    }

    JsonValue parse_value(int depth) {
        if (p_ == end_) fail(p_, "expected a value, found end of input");
        JsonValue v;
        v.offset = pos(p_);
        switch (*p_) {
            case '{': parse_object(v, depth); break;
            case '[': parse_array(v, depth); break;
            case '"':
                v.kind = JsonValue::Kind::String;
                v.string = parse_string();
                break;
            case 't': parse_word("true", v, JsonValue::Kind::Bool, true); break;
            case 'f': parse_word("false", v, JsonValue::Kind::Bool, false); break;
            case 'n': parse_word("null", v, JsonValue::Kind::Null, false); break;
            default:
                if (*p_ == '-' || is_digit(*p_)) {
                    parse_number(v);
                } else {
                    fail(p_, "expected a value, found " + found(p_));
                }
        }
        return v;
    }

    void parse_word(const char* word, JsonValue& v, JsonValue::Kind kind, bool b) {
        const size_t n = std::strlen(word);
        if (static_cast<size_t>(end_ - p_) < n || std::memcmp(p_, word, n) != 0)
            fail(p_, "expected a value, found " + found(p_));
        p_ += n;
        v.kind = kind;
        v.boolean = b;
    }

    void enter(int depth) const {
        if (depth >= max_depth_) fail(p_, "nesting deeper than " + std::to_string(max_depth_) + " levels");
    }

    void parse_array(JsonValue& v, int depth) {
        enter(depth);
        v.kind = JsonValue::Kind::Array;
        ++p_;  // '['
        skip_ws();
        if (at(']')) {
            ++p_;
            return;
        }
        for (;;) {
            skip_ws();
            v.array.push_back(parse_value(depth + 1));
            skip_ws();
            if (at(',')) {
                ++p_;
                continue;
            }
            if (at(']')) {
                ++p_;
                return;
            }
            fail(p_, "expected ',' or ']' after array element, found " + found(p_));
        }
    }

    void parse_object(JsonValue& v, int depth) {
        enter(depth);
        v.kind = JsonValue::Kind::Object;
        ++p_;  // '{'
        skip_ws();
        if (at('}')) {
            ++p_;
            return;
        }
        std::unordered_set<std::string> seen;
        for (;;) {
            skip_ws();
            if (!at('"')) fail(p_, "expected a string key, found " + found(p_));
            const char* key_at = p_;
            std::string key = parse_string();
            if (!seen.insert(key).second) fail(key_at, "duplicate key \"" + json_printable(key) + "\"");
            skip_ws();
            if (!at(':')) fail(p_, "expected ':' after object key, found " + found(p_));
            ++p_;
            skip_ws();
            JsonValue child = parse_value(depth + 1);
            v.members.push_back(JsonMember{std::move(key), std::move(child)});
            skip_ws();
            if (at(',')) {
                ++p_;
                continue;
            }
            if (at('}')) {
                ++p_;
                return;
            }
            fail(p_, "expected ',' or '}' after object member, found " + found(p_));
        }
    }

    uint32_t parse_hex4() {  // p_ is just past "\u"
        if (end_ - p_ < 4) fail(p_, "expected 4 hex digits after \\u, found end of input");
        uint32_t cp = 0;
        for (int i = 0; i < 4; ++i) {
            const char c = p_[i];
            uint32_t d;
            if (c >= '0' && c <= '9') {
                d = static_cast<uint32_t>(c - '0');
            } else if (c >= 'a' && c <= 'f') {
                d = static_cast<uint32_t>(c - 'a' + 10);
            } else if (c >= 'A' && c <= 'F') {
                d = static_cast<uint32_t>(c - 'A' + 10);
            } else {
                fail(p_ + i, "expected 4 hex digits after \\u, found " + found(p_ + i));
            }
            cp = cp << 4 | d;
        }
        p_ += 4;
        return cp;
    }

    void parse_escape(std::string& out) {  // p_ is at the backslash
        const char* esc = p_;
        ++p_;
        if (p_ == end_) fail(esc, "unterminated escape sequence");
        const char c = *p_++;
        switch (c) {
            case '"': out += '"'; return;
            case '\\': out += '\\'; return;
            case '/': out += '/'; return;
            case 'b': out += '\b'; return;
            case 'f': out += '\f'; return;
            case 'n': out += '\n'; return;
            case 'r': out += '\r'; return;
            case 't': out += '\t'; return;
            case 'u': break;
            default: fail(esc, "invalid escape sequence \\" + json_printable(std::string_view(&c, 1)));
        }
        uint32_t cp = parse_hex4();
        if (cp >= 0xDC00 && cp <= 0xDFFF) fail(esc, "lone low surrogate in \\u escape");
        if (cp >= 0xD800 && cp <= 0xDBFF) {  // a UTF-16 pair: the low half must follow
            if (end_ - p_ < 2 || p_[0] != '\\' || p_[1] != 'u')
                fail(esc, "high surrogate in \\u escape is not followed by a low surrogate");
            p_ += 2;
            const uint32_t lo = parse_hex4();
            if (lo < 0xDC00 || lo > 0xDFFF)
                fail(esc, "high surrogate in \\u escape is not followed by a low surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        }
        append_utf8(out, cp);
    }

    // Copies one UTF-8 sequence starting at p_ after checking it is well formed
    // (RFC 3629: no overlong forms, no surrogates, nothing above U+10FFFF).
    void copy_utf8(std::string& out) {
        const unsigned char c = static_cast<unsigned char>(*p_);
        int n_cont;
        uint32_t cp;
        if (c >= 0xC2 && c <= 0xDF) {
            n_cont = 1;
            cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            n_cont = 2;
            cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            n_cont = 3;
            cp = c & 0x07;
        } else {
            fail(p_, "invalid UTF-8 in string: " + found(p_));
        }
        if (end_ - p_ <= n_cont) fail(p_, "invalid UTF-8 in string: sequence cut by end of input");
        for (int i = 1; i <= n_cont; ++i) {
            const unsigned char b = static_cast<unsigned char>(p_[i]);
            if ((b & 0xC0) != 0x80) fail(p_ + i, "invalid UTF-8 in string: expected a continuation byte, found " + found(p_ + i));
            cp = cp << 6 | (b & 0x3F);
        }
        const bool bad = (n_cont == 2 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
                         (n_cont == 3 && (cp < 0x10000 || cp > 0x10FFFF));
        if (bad) fail(p_, "invalid UTF-8 in string: overlong form, surrogate or code point above U+10FFFF");
        out.append(p_, static_cast<size_t>(n_cont + 1));
        p_ += n_cont + 1;
    }

    std::string parse_string() {  // p_ is at the opening quote
        const char* start = p_;
        ++p_;
        std::string out;
        for (;;) {
            if (p_ == end_) fail(start, "unterminated string");
            const unsigned char c = static_cast<unsigned char>(*p_);
            if (c == '"') {
                ++p_;
                return out;
            }
            if (c == '\\') {
                parse_escape(out);
            } else if (c < 0x20) {
                fail(p_, "unescaped control character " + found(p_) + " in string");
            } else if (c < 0x80) {
                out += static_cast<char>(c);
                ++p_;
            } else {
                copy_utf8(out);
            }
        }
    }

    void parse_number(JsonValue& v) {
        const char* start = p_;
        const bool negative = at('-');
        if (negative) ++p_;
        if (p_ == end_ || !is_digit(*p_)) fail(p_, "expected a digit, found " + found(p_));
        if (*p_ == '0') {
            ++p_;
            if (p_ < end_ && is_digit(*p_)) fail(start, "number with a leading zero");
        } else {
            while (p_ < end_ && is_digit(*p_)) ++p_;
        }
        bool integral = true;
        if (at('.')) {
            integral = false;
            ++p_;
            if (p_ == end_ || !is_digit(*p_)) fail(p_, "expected a digit after '.', found " + found(p_));
            while (p_ < end_ && is_digit(*p_)) ++p_;
        }
        if (at('e') || at('E')) {
            integral = false;
            ++p_;
            if (at('+') || at('-')) ++p_;
            if (p_ == end_ || !is_digit(*p_)) fail(p_, "expected a digit in exponent, found " + found(p_));
            while (p_ < end_ && is_digit(*p_)) ++p_;
        }
        const std::string_view text(start, static_cast<size_t>(p_ - start));
        const std::string shown = json_printable(text, 40);
        if (integral) {
            // Accumulate toward the sign so INT64_MIN is representable.
            int64_t acc = 0;
            for (const char* q = start + (negative ? 1 : 0); q < p_; ++q) {
                const int d = *q - '0';
                const bool overflow = __builtin_mul_overflow(acc, int64_t{10}, &acc) ||
                                      (negative ? __builtin_sub_overflow(acc, int64_t{d}, &acc)
                                                : __builtin_add_overflow(acc, int64_t{d}, &acc));
                if (overflow) fail(start, "integer " + shown + " does not fit in 64 bits");
            }
            v.kind = JsonValue::Kind::Int;
            v.integer = acc;
            v.number = static_cast<double>(acc);
            return;
        }
        double d = 0;
        const auto r = std::from_chars(start, p_, d);  // locale-independent, unlike strtod
        if (r.ec == std::errc::result_out_of_range) fail(start, "number " + shown + " is out of the range of a double");
        if (r.ec != std::errc() || r.ptr != p_) fail(start, "malformed number " + shown);
        v.kind = JsonValue::Kind::Number;
        v.number = d;
    }
};

}  // namespace

const JsonValue* JsonValue::find(std::string_view key) const {
    for (const JsonMember& m : members)
        if (m.key == key) return &m.value;
    return nullptr;
}

const char* JsonValue::kind_name() const {
    switch (kind) {
        case Kind::Null: return "null";
        case Kind::Bool: return "a boolean";
        case Kind::Int: return "an integer";
        case Kind::Number: return "a number";
        case Kind::String: return "a string";
        case Kind::Array: return "an array";
        case Kind::Object: return "an object";
    }
    return "?";
}

JsonValue json_parse(std::string_view text, size_t base_offset, int max_depth) {
    return Parser(text, base_offset, max_depth).parse_document();
}

std::string json_printable(std::string_view s, size_t max_bytes) {
    size_t n = s.size();
    bool cut = false;
    if (n > max_bytes) {
        n = max_bytes;
        while (n > 0 && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;  // back to a boundary
        cut = true;
    }
    std::string out;
    out.reserve(n + 4);
    for (size_t i = 0; i < n; ++i) {
        const unsigned char c = static_cast<unsigned char>(s[i]);
        if (c < 0x20 || c == 0x7F) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\x%02x", c);
            out += buf;
        } else {
            out += static_cast<char>(c);
        }
    }
    if (cut) out += "...";
    return out;
}

}  // namespace lmx
