// range_alloc.cpp — see range_alloc.h.
#include "range_alloc.h"

#include <algorithm>
#include <cassert>
#include <iterator>

namespace lmx {

RangeAlloc::RangeAlloc(uint64_t capacity, uint64_t align, uint64_t boundary) : align_(align), boundary_(boundary) {
    assert(align > 0 && capacity % align == 0 && boundary % align == 0);
    const uint64_t step = boundary == 0 ? capacity : boundary;
    for (uint64_t off = 0; off < capacity; off += step) free_[off] = std::min(step, capacity - off);
}

std::optional<uint64_t> RangeAlloc::alloc(uint64_t n_bytes, Placement where) {
    const uint64_t need = (std::max<uint64_t>(n_bytes, 1) + align_ - 1) / align_ * align_;
    if (where == Placement::High) {
        for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
            if (it->second < need) continue;
            const uint64_t start = it->first, rest = it->second - need;
            free_.erase(std::next(it).base());
            if (rest > 0) free_[start] = rest;
            used_[start + rest] = need;
            return start + rest;
        }
        return std::nullopt;
    }
    for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->second < need) continue;
        const uint64_t off = it->first, rest = it->second - need;
        free_.erase(it);
        if (rest > 0) free_[off + need] = rest;
        used_[off] = need;
        return off;
    }
    return std::nullopt;
}

uint64_t RangeAlloc::free(uint64_t off) {
    auto u = used_.find(off);
    assert(u != used_.end() && "free of an offset the arena did not hand out");
    if (u == used_.end()) return 0;
    const uint64_t n = u->second;
    used_.erase(u);
    uint64_t start = off, size = n;
    const auto at_boundary = [&](uint64_t x) { return boundary_ != 0 && x % boundary_ == 0; };
    auto next = free_.lower_bound(start);
    if (next != free_.end() && start + size == next->first && !at_boundary(next->first)) {
        size += next->second;
        next = free_.erase(next);
    }
    if (next != free_.begin()) {
        auto prev = std::prev(next);
        if (prev->first + prev->second == start && !at_boundary(start)) {
            start = prev->first;
            size += prev->second;
            free_.erase(prev);
        }
    }
    free_[start] = size;
    return n;
}

}  // namespace lmx
