// ledger.cpp — booking arithmetic under one mutex, and the book-then-allocate path.
// Owner: engine core. Thread-safety: see ledger.h.
#include "ledger.h"

#include <cassert>

#include "common.h"

namespace lmx {

namespace {
uint64_t& field(OwnerUsage& u, BookKind k) {
    switch (k) {
        case BookKind::Weights: return u.weights_bytes;
        case BookKind::Kv: return u.kv_bytes;
        case BookKind::Workspace: break;
    }
    return u.workspace_bytes;
}
}  // namespace

Ledger::Ledger(std::unique_ptr<Device> device, double cap_fraction) : device_(std::move(device)) {
    if (!(cap_fraction > 0.0 && cap_fraction <= 1.0))
        throw InvalidArgument("cap_fraction: expected a value in (0, 1], found " + std::to_string(cap_fraction));
    budget_ = device_->capacity_bytes();
    cap_ = static_cast<uint64_t>(static_cast<double>(budget_) * cap_fraction);
}

BookResult Ledger::book(const std::string& owner, BookKind kind, uint64_t n_bytes) {
    std::lock_guard<std::mutex> lk(mu_);
    if (n_bytes > cap_ - used_) {
        n_denied_++;
        return BookResult::NoSpace;
    }
    used_ += n_bytes;
    if (used_ > peak_) peak_ = used_;
    field(owners_[owner], kind) += n_bytes;
    return BookResult::Ok;
}

void Ledger::release(const std::string& owner, BookKind kind, uint64_t n_bytes) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = owners_.find(owner);
    assert(it != owners_.end());
    uint64_t& f = field(it->second, kind);
    assert(f >= n_bytes && used_ >= n_bytes);
    f -= n_bytes;
    used_ -= n_bytes;
    if (it->second.total() == 0) owners_.erase(it);
}

bool Ledger::would_fit(uint64_t n_bytes) const {
    std::lock_guard<std::mutex> lk(mu_);
    return n_bytes <= cap_ - used_;
}

DeviceBuffer Ledger::alloc(const std::string& owner, BookKind kind, uint64_t n_bytes) {
    // Bookings are made in whole allocation units so the ledger matches the arena.
    const uint64_t booked = align_up(n_bytes == 0 ? 1 : n_bytes, kAlign);
    DeviceBuffer buf;
    if (book(owner, kind, booked) != BookResult::Ok) return buf;
    // KV blocks come and go every step; weights and workspaces stay: keep them at opposite ends.
    void* p = device_->alloc(booked, kind == BookKind::Kv ? Placement::Low : Placement::High);
    if (p == nullptr) {
        release(owner, kind, booked);
        std::lock_guard<std::mutex> lk(mu_);
        n_denied_++;
        return buf;
    }
    buf.ptr = static_cast<uint8_t*>(p);
    buf.n_bytes = booked;
    buf.kind = kind;
    buf.owner = owner;
    return buf;
}

void Ledger::free(DeviceBuffer& buf) {
    if (!buf) return;
    device_->free(buf.ptr);
    release(buf.owner, buf.kind, buf.n_bytes);
    buf = DeviceBuffer{};
}

LedgerSnapshot Ledger::snapshot() const {
    std::lock_guard<std::mutex> lk(mu_);
    LedgerSnapshot s;
    s.budget_bytes = budget_;
    s.cap_bytes = cap_;
    s.used_bytes = used_;
    s.peak_bytes = peak_;
    s.n_denied = n_denied_;
    s.owners = owners_;
    uint64_t fixed = 0;
    for (const auto& kv : owners_) fixed += kv.second.weights_bytes + kv.second.workspace_bytes;
    s.kv_capacity_bytes = cap_ > fixed ? cap_ - fixed : 0;
    return s;
}

uint64_t Ledger::headroom_bytes() const {
    std::lock_guard<std::mutex> lk(mu_);
    return cap_ - used_;
}

}  // namespace lmx
