// check.h — the tiny test harness of the C++ test executable (engine_tests).
// Owner: engine tests. Thread-safety: tests run one at a time on the main thread.
// A test is `TEST(name) { CHECK(cond); CHECK_NEAR(a, b, tol); }`; main() runs
// all registered tests (or those whose name contains argv[1]) and exits non-zero
// on any failure, printing "N passed, N failed".
#pragma once

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace lmx_test {

struct TestCase {
    const char* name;
    std::function<void()> fn;
};
std::vector<TestCase>& registry();
extern int g_failures;

struct Registrar {
    Registrar(const char* name, std::function<void()> fn) { registry().push_back({name, std::move(fn)}); }
};

}  // namespace lmx_test

#define LMX_CAT2(a, b) a##b
#define LMX_CAT(a, b) LMX_CAT2(a, b)
#define TEST(name)                                                                     \
    static void name();                                                                \
    static ::lmx_test::Registrar LMX_CAT(registrar_, name)(#name, name);               \
    static void name()

#define CHECK(cond)                                                                    \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            std::fprintf(stderr, "  %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
            ::lmx_test::g_failures++;                                                  \
        }                                                                              \
    } while (0)

#define CHECK_NEAR(a, b, tol)                                                          \
    do {                                                                               \
        const double va_ = (a), vb_ = (b);                                             \
        if (!(std::fabs(va_ - vb_) <= (tol))) {                                        \
            std::fprintf(stderr, "  %s:%d: |%s - %s| = |%g - %g| > %g\n", __FILE__, __LINE__, #a, #b, va_, vb_, \
                         static_cast<double>(tol));                                    \
            ::lmx_test::g_failures++;                                                  \
        }                                                                              \
    } while (0)

// CHECK_THROWS(expr, ExceptionType, "substring expected in what()")
#define CHECK_THROWS(expr, Exc, substr)                                                \
    do {                                                                               \
        bool thrown_ = false;                                                          \
        try {                                                                          \
            (void)(expr);                                                              \
        } catch (const Exc& e_) {                                                      \
            thrown_ = true;                                                            \
            if (std::string(e_.what()).find(substr) == std::string::npos) {            \
                std::fprintf(stderr, "  %s:%d: message '%s' lacks '%s'\n", __FILE__, __LINE__, e_.what(), substr); \
                ::lmx_test::g_failures++;                                              \
            }                                                                          \
        }                                                                              \
        if (!thrown_) {                                                                \
            std::fprintf(stderr, "  %s:%d: %s did not throw %s\n", __FILE__, __LINE__, #expr, #Exc); \
            ::lmx_test::g_failures++;                                                  \
        }                                                                              \
    } while (0)
