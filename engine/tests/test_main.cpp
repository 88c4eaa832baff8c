// test_main.cpp — runs every TEST registered in engine/tests/*.cpp.
// Owner: engine tests. Usage: engine_tests [name-substring]
#include <cstring>

#include "check.h"

namespace lmx_test {
std::vector<TestCase>& registry() {
    static std::vector<TestCase> r;
    return r;
}
int g_failures = 0;
}  // namespace lmx_test

int main(int argc, char** argv) {
    int passed = 0, failed = 0;
    for (const auto& t : lmx_test::registry()) {
        if (argc > 1 && std::strstr(t.name, argv[1]) == nullptr) continue;
        const int before = lmx_test::g_failures;
        std::fprintf(stderr, "[ RUN  ] %s\n", t.name);
        try {
            t.fn();
        } catch (const std::exception& e) {
            std::fprintf(stderr, "  uncaught exception: %s\n", e.what());
            lmx_test::g_failures++;
        }
        if (lmx_test::g_failures == before) {
            passed++;
        } else {
            failed++;
            std::fprintf(stderr, "[ FAIL ] %s\n", t.name);
        }
    }
    std::printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 && passed > 0 ? 0 : 1;
}
