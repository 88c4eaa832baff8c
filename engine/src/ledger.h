// ledger.h — the book of every device byte: weights, KV blocks, workspace, per owner.
// Owner: engine core. The ONLY path to device memory is Ledger::alloc, which books
// then allocates. Thread-safety: all methods lock mu_ (the loader thread books
// weights while the step thread books KV blocks).
//
// The cap (default 90 % of the budget) is a hard line: a booking that would pass
// it returns NoSpace — a normal result the caller handles (preempt, wait, refuse),
// never an exception. Admission control reads headroom() to decide what to read
// from Redis, so the figures here are the single source of truth.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "device.h"

namespace lmx {

enum class BookKind : uint8_t { Weights = 0, Kv = 1, Workspace = 2 };
enum class BookResult : uint8_t { Ok = 0, NoSpace = 1 };

struct OwnerUsage {
    uint64_t weights_bytes = 0;
    uint64_t kv_bytes = 0;
    uint64_t workspace_bytes = 0;
    // KV this model could ever hold: kv_capacity_bytes in its whole blocks (filled by the
    // engine, which knows block sizes; 0 in a bare ledger's snapshot).
    uint64_t kv_capacity_blocks = 0;
    uint64_t kv_capacity_tokens = 0;
    uint64_t total() const { return weights_bytes + kv_bytes + workspace_bytes; }
};

struct LedgerSnapshot {
    uint64_t budget_bytes = 0;
    uint64_t cap_bytes = 0;
    uint64_t used_bytes = 0;
    uint64_t peak_bytes = 0;
    uint64_t n_denied = 0;  // bookings refused because of the cap
    // What KV can ever get: the cap less every booking that is not KV (weights, workspaces).
    uint64_t kv_capacity_bytes = 0;
    std::map<std::string, OwnerUsage> owners;
    uint64_t headroom_bytes() const { return cap_bytes - used_bytes; }
};

// A device allocation together with its booking; released by Ledger::free.
struct DeviceBuffer {
    uint8_t* ptr = nullptr;
    uint64_t n_bytes = 0;
    BookKind kind = BookKind::Workspace;
    std::string owner;
    explicit operator bool() const { return ptr != nullptr; }
};

class Ledger {
public:
    Ledger(std::unique_ptr<Device> device, double cap_fraction);
    Device& device() { return *device_; }

    // Books n_bytes for owner, then allocates them on the device. Returns an empty
    // buffer (NoSpace) when the booking would pass the cap or the arena has no
    // contiguous range; in both cases nothing stays booked.
    DeviceBuffer alloc(const std::string& owner, BookKind kind, uint64_t n_bytes);
    void free(DeviceBuffer& buf);  // precondition: buf came from alloc; buf is emptied

    // Accounting alone (unit tests and admission what-ifs).
    BookResult book(const std::string& owner, BookKind kind, uint64_t n_bytes);
    void release(const std::string& owner, BookKind kind, uint64_t n_bytes);
    bool would_fit(uint64_t n_bytes) const;

    LedgerSnapshot snapshot() const;
    uint64_t headroom_bytes() const;
    uint64_t cap_bytes() const { return cap_; }

private:
    std::unique_ptr<Device> device_;
    uint64_t budget_;
    uint64_t cap_;
    mutable std::mutex mu_;
    uint64_t used_ = 0;
    uint64_t peak_ = 0;
    uint64_t n_denied_ = 0;
    std::map<std::string, OwnerUsage> owners_;
};

}  // namespace lmx
