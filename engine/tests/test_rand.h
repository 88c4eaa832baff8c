// test_rand.h — what the C++ tests share to make data and compare it: a seeded splitmix64
// generator, random vectors, the kernel tables of this CPU, bitwise equality.
// Owner: the tests. Thread-safety: an Rng is one test's own; nothing here is global.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/kernels_impl.h"

namespace lmx_test {

struct Rng {  // splitmix64: deterministic, no global state
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed) {}
    uint64_t next() {
        uint64_t z = (s += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    }
    float uniform(float lo, float hi) { return lo + (hi - lo) * static_cast<float>(next() >> 40) * 0x1p-24f; }
};

inline std::vector<float> random_vec(Rng& rng, int64_t n, float lo = -1.0f, float hi = 1.0f) {
    std::vector<float> v(static_cast<size_t>(n));
    for (auto& x : v) x = rng.uniform(lo, hi);
    return v;
}

// The scalar reference first, then every SIMD table this CPU runs.
inline std::vector<const lmx::KernelTable*> tables() {
    std::vector<const lmx::KernelTable*> t{lmx::kernels_table_scalar()};
    if (lmx::kernels_table_avx2()) t.push_back(lmx::kernels_table_avx2());
    if (lmx::kernels_table_avx512()) t.push_back(lmx::kernels_table_avx512());
    return t;
}

inline bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace lmx_test
