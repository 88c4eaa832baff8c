// trace.cpp — the step trace's rings (trace.h).
// Owner: engine core. Thread-safety: every member access holds mu_ except the on_ flag.
#include "trace.h"

#include <utility>

namespace lmx {

void Tracer::enable(size_t capacity) {
    std::lock_guard<std::mutex> lk(mu_);
    capacity_ = capacity;
    steps_.clear();
    copies_.clear();
    waits_.clear();
    n_dropped_ = 0;
    pending_units_ = 0;
    pending_bytes_ = 0;
    pending_wait_us_ = 0;
    on_.store(capacity > 0, std::memory_order_relaxed);
}

template <class T>
void Tracer::push(std::deque<T>& ring, const T& v) {
    if (ring.size() >= capacity_) {
        ring.pop_front();
        n_dropped_++;
    }
    ring.push_back(v);
}

void Tracer::record_copy(const CopyTrace& c) {
    if (!on()) return;
    std::lock_guard<std::mutex> lk(mu_);
    if (capacity_ == 0) return;  // turned off between the check and the lock
    pending_units_ += c.n_units;
    pending_bytes_ += c.n_bytes;
    push(copies_, c);
}

void Tracer::record_wait(const WaitTrace& w) {
    if (!on()) return;
    std::lock_guard<std::mutex> lk(mu_);
    if (capacity_ == 0) return;
    pending_wait_us_ += w.end_us - w.start_us;
    push(waits_, w);
}

void Tracer::record_step(StepTrace s, bool device_wait) {
    if (!on()) return;
    std::lock_guard<std::mutex> lk(mu_);
    if (capacity_ == 0) return;
    s.n_units_copied = pending_units_;
    s.bytes_copied = pending_bytes_;
    if (!device_wait) s.copy_wait_us = pending_wait_us_;
    pending_units_ = 0;
    pending_bytes_ = 0;
    pending_wait_us_ = 0;
    push(steps_, std::move(s));
}

Trace Tracer::take() {
    std::lock_guard<std::mutex> lk(mu_);
    Trace t;
    t.steps.assign(steps_.begin(), steps_.end());
    t.copies.assign(copies_.begin(), copies_.end());
    t.waits.assign(waits_.begin(), waits_.end());
    t.n_dropped = n_dropped_;
    steps_.clear();
    copies_.clear();
    waits_.clear();
    n_dropped_ = 0;
    return t;
}

}  // namespace lmx
