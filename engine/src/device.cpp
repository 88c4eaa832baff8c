// device.cpp — the CPU device: two-ended first-fit allocation over one anonymous mapping, and its backend.
// Owner: engine core. Thread-safety: alloc/free under mu_; the link model's reservation under link_mu_.
#include "device.h"

#include <sys/mman.h>

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstring>
#include <iterator>
#include <thread>

#include "backend_cpu.h"
#include "common.h"

namespace lmx {

CpuDevice::CpuDevice(uint64_t capacity_bytes, int n_threads, double link_gbps)
    : capacity_(align_up(capacity_bytes, kAlign)),
      ranges_(capacity_, kAlign),
      backend_(std::make_unique<CpuBackend>(n_threads)) {
    if (capacity_ == 0) throw InvalidArgument("device budget: expected a positive number of bytes, found 0");
    if (!(link_gbps >= 0.0) || std::isinf(link_gbps))
        throw InvalidArgument("link_gbps: expected a finite number of gigabytes per second >= 0 (0 = unthrottled), found " +
                              std::to_string(link_gbps));
    link_bytes_per_ns_ = link_gbps;  // 1 GB/s = 1e9 bytes / 1e9 ns
    link_free_ = std::chrono::steady_clock::now();
    void* p = mmap(nullptr, capacity_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        throw InvalidArgument("device budget: could not reserve " + std::to_string(capacity_) +
                              " bytes of address space for the CPU arena: " + std::strerror(errno));
    base_ = static_cast<uint8_t*>(p);
}

CpuDevice::~CpuDevice() {
    if (base_ != nullptr) munmap(base_, capacity_);
}

void* CpuDevice::alloc(uint64_t n_bytes, Placement where) {
    std::lock_guard<std::mutex> lk(mu_);
    const std::optional<uint64_t> off = ranges_.alloc(n_bytes, where);
    return off ? base_ + *off : nullptr;
}

void CpuDevice::free(void* p) {
    if (p == nullptr) return;
    std::lock_guard<std::mutex> lk(mu_);
    const uint64_t off = static_cast<uint64_t>(static_cast<uint8_t*>(p) - base_);
    const uint64_t size = ranges_.free(off);
    // Return the pages to the OS for big ranges so an idle arena costs no RAM.
    if (size >= (1u << 20)) madvise(base_ + off, size, MADV_DONTNEED);
}

CopyFence CpuDevice::copy_in(const CopyRegion* regions, size_t n_regions, ComputeFence) {
    // Compute on the CPU is synchronous: whatever read the destination has finished.
    std::chrono::steady_clock::time_point done;
    if (link_bytes_per_ns_ > 0.0) {
        uint64_t total = 0;
        for (size_t i = 0; i < n_regions; i++) total += regions[i].n_bytes;
        const auto dur = std::chrono::nanoseconds(
            static_cast<int64_t>(std::ceil(static_cast<double>(total) / link_bytes_per_ns_)));
        std::lock_guard<std::mutex> lk(link_mu_);
        const auto now = std::chrono::steady_clock::now();
        link_free_ = std::max(link_free_, now) + dur;
        done = link_free_;
    }
    for (size_t i = 0; i < n_regions; i++) std::memcpy(regions[i].dst, regions[i].src, regions[i].n_bytes);
    if (link_bytes_per_ns_ > 0.0) std::this_thread::sleep_until(done);
    return {};
}

Backend& CpuDevice::backend() { return *backend_; }

}  // namespace lmx
