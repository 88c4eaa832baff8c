// device.h — a device: its memory face (arena, copy stream) and its compute face (Backend).
// Owner: engine core; every device (CPU here, Vulkan in vulkan/) implements this interface.
// Thread-safety: alloc/free are internally locked; copy_in may be called from several
// threads at once (the copy thread and, for whole-model swaps, the step thread); backend()
// is driven by the step thread only (see backend.h).
//
// Nothing outside ledger.cpp calls alloc/free: every device byte is booked in
// the Ledger first (see ledger.h), so the arena can never be over-committed.
// Device memory is named by the addresses alloc hands out. On the CPU they are real host
// pointers; a GPU device hands out addresses in a private virtual range and translates
// them to (buffer, offset) itself, so the ledger, residency and the KV cache never learn
// which device they drive. Only the device itself (and its Backend) may dereference them.
//
// Synchronization: a device has two timelines, copy and compute, whose points are
// CopyFence and ComputeFence values (as Vulkan timeline semaphores count). A layer's compute
// waits only for the copy of that layer (Backend::begin_unit takes the CopyFence the copy
// returned), and a slot is overwritten only after the compute that read it finished
// (copy_in takes the ComputeFence the compute returned). Value 0 means "already complete":
// a synchronous device such as the CPU returns 0 from everything and never waits.
// The full contract, in prose, is in docs/engine.md.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "range_alloc.h"

namespace lmx {

class Backend;
class CpuBackend;


// A point on the copy timeline: complete once every copy of the copy_in call that
// returned it is in device memory. 0: already complete. Values only grow, and a fence
// completes only after every smaller one (fence_later picks the later of two).
struct CopyFence {
    uint64_t value = 0;
};
// A point on the compute timeline: complete once the ops submitted by the
// Backend::end_unit call that returned it have finished. 0: already complete.
// Values only grow, so the later of two fences is the larger (fence_later).
struct ComputeFence {
    uint64_t value = 0;
};
inline ComputeFence fence_later(ComputeFence a, ComputeFence b) { return a.value >= b.value ? a : b; }
inline CopyFence fence_later(CopyFence a, CopyFence b) { return a.value >= b.value ? a : b; }

// One host -> device copy of a batch (a unit is assembled from several tensors).
struct CopyRegion {
    void* dst;        // device address (from alloc)
    const void* src;  // host memory; stays valid until the batch's CopyFence completes
    uint64_t n_bytes;
};

class Device {
public:
    virtual ~Device() = default;
    virtual const char* name() const = 0;
    virtual uint64_t capacity_bytes() const = 0;
    // nullptr when no contiguous range is free (fragmentation): a normal result.
    virtual void* alloc(uint64_t n_bytes, Placement where = Placement::Low) = 0;
    virtual void free(void* p) = 0;

    // The copy stream, host -> device: the layer streamer's only transfer. Copies the regions
    // once every compute up to `after` finished (the slot's previous reader), and returns the
    // fence that completes when they are in device memory. The CPU copies before returning.
    virtual CopyFence copy_in(const CopyRegion* regions, size_t n_regions, ComputeFence after) = 0;
    // Blocks the calling thread until f completed (a whole-model swap, tests).
    virtual void copy_wait(CopyFence f) = 0;

    // The compute face: runs the ops of the forward pass on this device's memory.
    virtual Backend& backend() = 0;

    // Copies run beside compute, not on its cores: a GPU's transfers, or the CPU device's link model
    // (a paced copy is mostly its wait). The copy thread then copies ahead wherever it evicts nothing
    // the schedule needs (residency.cpp, pick_job); where a copy is a memcpy on the cores compute uses
    // (the CPU device unthrottled), copying earlier gains nothing and it keeps to the prefetch depth.
    virtual bool copies_beside_compute() const { return true; }
};

// CPU device: one anonymous mapping of capacity bytes (MAP_NORESERVE, so pages
// cost RAM only once touched), carved by a two-ended allocator whose free ranges
// coalesce on free: Placement::Low takes the lowest free range that fits (first
// fit, at its start), Placement::High the highest (at its end). Allocations are
// aligned to kAlign (64) bytes. Compute: the CPU backend (backend_cpu.h) with a pool
// of n_threads threads. Copies and compute are synchronous: every fence is 0.
//
// The link model (link_gbps > 0, gigabytes = 1e9 bytes per second): host and "device" share
// DRAM here, so a copy costs about what a compute read costs; a GPU behind PCIe fills its memory
// 10-30x slower than it reads it. To reproduce that ratio, each copy_in reserves the link for
// bytes / link rate after the link's previous reservation ends (one link: concurrent copies queue
// on it) and returns no earlier than that reservation's end, sleeping on the calling thread
// (residency's copy thread, or the step thread for a whole-model swap). 0: unthrottled.
class CpuDevice final : public Device {
public:
    explicit CpuDevice(uint64_t capacity_bytes, int n_threads = 1, double link_gbps = 0.0);
    ~CpuDevice() override;
    const char* name() const override { return "cpu"; }
    uint64_t capacity_bytes() const override { return capacity_; }
    void* alloc(uint64_t n_bytes, Placement where = Placement::Low) override;
    void free(void* p) override;
    CopyFence copy_in(const CopyRegion* regions, size_t n_regions, ComputeFence after) override;
    void copy_wait(CopyFence) override {}
    Backend& backend() override;
    bool copies_beside_compute() const override { return link_bytes_per_ns_ > 0.0; }

private:
    uint8_t* base_ = nullptr;
    uint64_t capacity_ = 0;
    std::mutex mu_;
    RangeAlloc ranges_;  // under mu_
    std::unique_ptr<CpuBackend> backend_;
    double link_bytes_per_ns_ = 0.0;                     // 0: unthrottled
    std::mutex link_mu_;
    std::chrono::steady_clock::time_point link_free_;    // when the link's last reservation ends
};

}  // namespace lmx
