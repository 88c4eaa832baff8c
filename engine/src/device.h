// device.h — where device bytes physically live: the Device interface and the CPU arena.
// Owner: engine core; a CUDA device implements the same interface later.
// Thread-safety: alloc/free are internally locked; copy_in may run on any thread.
//
// Nothing outside ledger.cpp calls alloc/free: every device byte is booked in
// the Ledger first (see ledger.h), so the arena can never be over-committed.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>

namespace lmx {

// Where an allocation should go. Long-lived, large buffers (weights, layer slots, workspaces)
// are placed from the top of the device, short-lived small ones (KV blocks) from the bottom, so
// KV churn does not scatter holes between weight buffers: a whole-model swap or a new slot
// then finds one contiguous range where the bytes are free.
enum class Placement : uint8_t { Low = 0, High = 1 };

class Device {
public:
    virtual ~Device() = default;
    virtual const char* name() const = 0;
    virtual uint64_t capacity_bytes() const = 0;
    // nullptr when no contiguous range is free (fragmentation): a normal result.
    virtual void* alloc(uint64_t n_bytes, Placement where = Placement::Low) = 0;
    virtual void free(void* p) = 0;
    // Host -> device copy (the layer streamer's only transfer).
    virtual void copy_in(void* dst, const void* src, uint64_t n_bytes) = 0;
};

// CPU device: one anonymous mapping of capacity bytes (MAP_NORESERVE, so pages
// cost RAM only once touched), carved by a two-ended allocator whose free ranges
// coalesce on free: Placement::Low takes the lowest free range that fits (first
// fit, at its start), Placement::High the highest (at its end). Allocations are
// aligned to kAlign (64) bytes.
class CpuDevice final : public Device {
public:
    explicit CpuDevice(uint64_t capacity_bytes);
    ~CpuDevice() override;
    const char* name() const override { return "cpu"; }
    uint64_t capacity_bytes() const override { return capacity_; }
    void* alloc(uint64_t n_bytes, Placement where = Placement::Low) override;
    void free(void* p) override;
    void copy_in(void* dst, const void* src, uint64_t n_bytes) override;

private:
    uint8_t* base_ = nullptr;
    uint64_t capacity_ = 0;
    std::mutex mu_;
    std::map<uint64_t, uint64_t> free_;  // offset -> size, non-adjacent
    std::map<uint64_t, uint64_t> used_;  // offset -> size
};

}  // namespace lmx
