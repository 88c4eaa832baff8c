// range_alloc.h — two-ended first-fit allocation of byte offsets in [0, capacity): the
// arithmetic under every device's arena (the CPU's RAM mapping, the Vulkan device's blocks).
// Owner: engine core. Thread-safety: none; the device that owns one locks around every call.
//
// Placement::Low takes the lowest free range that fits (at its start), Placement::High the
// highest (at its end), so long-lived buffers and short-lived KV blocks grow from opposite
// ends (see Placement). Freed ranges coalesce with free neighbours, except across a multiple
// of `boundary`: a GPU device's memory is several allocations, and no buffer may span two.
#pragma once

#include <cstdint>
#include <map>
#include <optional>

namespace lmx {

// Where an allocation should go. Long-lived, large buffers (weights, layer slots, workspaces)
// are placed from the top of the device, short-lived small ones (KV blocks) from the bottom, so
// KV churn does not scatter holes between weight buffers: a whole-model swap or a new slot
// then finds one contiguous range where the bytes are free.
enum class Placement : uint8_t { Low = 0, High = 1 };

class RangeAlloc {
public:
    // capacity and boundary are multiples of align; boundary 0: one range, merged freely.
    RangeAlloc(uint64_t capacity, uint64_t align, uint64_t boundary = 0);
    // The offset of n_bytes (rounded up to align; 0 counts as 1), or nullopt when no free range
    // fits (fragmentation or a full device: a normal result).
    std::optional<uint64_t> alloc(uint64_t n_bytes, Placement where);
    // Frees the range alloc returned at off; returns its size (0 for an offset never handed out).
    uint64_t free(uint64_t off);

private:
    uint64_t align_, boundary_;
    std::map<uint64_t, uint64_t> free_;  // offset -> size, non-adjacent within a boundary
    std::map<uint64_t, uint64_t> used_;  // offset -> size
};

}  // namespace lmx
