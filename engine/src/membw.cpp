// membw.cpp — streaming-read bandwidth over the engine's thread pool (see membw.h).
// Owner: kernels. Thread-safety: see membw.h.
#include "membw.h"

#include <sys/mman.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"
#include "threadpool.h"

namespace lmx {

double read_bandwidth_gbs(ThreadPool& pool, size_t n_bytes, int repeats) {
    constexpr size_t kHuge = size_t{2} << 20, kStreams = 4, kTasks = 64;
    if (n_bytes < kTasks * kStreams * 64 || repeats < 1)
        throw InvalidArgument("read_bandwidth_gbs: expected n_bytes >= " + std::to_string(kTasks * kStreams * 64) +
                              " and repeats >= 1, found " + std::to_string(n_bytes) + " and " +
                              std::to_string(repeats));
    const size_t size = (n_bytes + kHuge - 1) / kHuge * kHuge;
    void* p = mmap(nullptr, size + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw Error("read_bandwidth_gbs: could not map " + std::to_string(size) + " bytes");
    uint8_t* buf = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(p) + kHuge - 1) / kHuge * kHuge);
    std::memset(buf, 1, size);
    const size_t stream = n_bytes / kTasks / kStreams / 64 * 64;  // bytes per stream
    std::vector<uint64_t> sink(kTasks);
    double best = 0.0;
    for (int rep = 0; rep < repeats; ++rep) {
        const auto t0 = std::chrono::steady_clock::now();
        pool.parallel_for(static_cast<int64_t>(kTasks), [&](int64_t task, int) {
            const uint8_t* s = buf + static_cast<size_t>(task) * kStreams * stream;
            uint64_t acc[8] = {};
            for (size_t i = 0; i < stream; i += 64)
                for (size_t k = 0; k < kStreams; ++k)
                    for (int j = 0; j < 8; ++j) {
                        uint64_t v;
                        std::memcpy(&v, s + k * stream + i + 8 * static_cast<size_t>(j), 8);
                        acc[j] += v;
                    }
            uint64_t x = 0;
            for (uint64_t a : acc) x ^= a;
            sink[static_cast<size_t>(task)] = x;
        });
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const double gbs = static_cast<double>(stream * kStreams * kTasks) / s / 1e9;
        if (gbs > best) best = gbs;
    }
    munmap(p, size + kHuge);
    return best;
}

}  // namespace lmx
