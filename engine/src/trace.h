// trace.h — the step trace: what each engine step computed, which units were copied in and when, and how
// long compute waited for copies, kept in bounded rings for a timeline (bench/timeline.py).
// Owner: engine core. The Engine owns one Tracer; Residency records copies and waits into it. Thread-safe:
// every method may be called from any thread; while tracing is off each record call is one relaxed load.
//
// Off by default: a serving engine pays nothing for it. Engine::trace_enable(capacity) turns it on with
// room for `capacity` records of each kind (steps, copies, waits); when a ring is full the oldest record
// is dropped and counted, so a trace left on for hours costs a fixed amount of memory. trace_take() hands
// over what was recorded and empties the rings; recording goes on.
//
// Times are steady-clock microseconds (trace_now_us(): an arbitrary origin, the same one for every record
// of the process). Attribution: a step's copy figures are the copies that *landed* after the previous step
// ended and up to its own end, whichever model they belong to (the copy thread prefetches the next model's
// layers while this one computes), so over a run the steps' bytes add up to what the residency copied.
// A step's wait figure is the time its acquires spent blocked on copies (a whole-model swap: the swap).
// On a GPU device a copy's span is the time spent issuing it on the copy thread, not the transfer itself.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <vector>

namespace lmx {

inline int64_t trace_us(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration_cast<std::chrono::microseconds>(t.time_since_epoch()).count();
}
inline int64_t trace_now_us() { return trace_us(std::chrono::steady_clock::now()); }

// One copy into device memory: a streamed layer (n_units 1) or a whole-model swap-in (unit -1).
struct CopyTrace {
    int model = -1;
    int unit = -1;
    int n_units = 1;
    uint64_t n_bytes = 0;
    int64_t start_us = 0, end_us = 0;
};

// One time compute blocked waiting for a copy.
struct WaitTrace {
    int model = -1;
    int unit = -1;  // -1: a whole-model swap, or a loan that waited for copies in flight (set_tenants)
    int64_t start_us = 0, end_us = 0;
};

struct StepTrace {
    uint64_t index = 0;  // steps the engine ran before this one (EngineStats.n_steps before it)
    int model = -1;
    int64_t start_us = 0, end_us = 0;
    int n_seqs = 0;          // sequences in the step
    int64_t n_tokens = 0;    // tokens computed (prefill chunks + decode tokens)
    int n_generated = 0;     // tokens sampled
    int n_units_copied = 0;  // units whose copy landed since the previous step ended (any model's)
    uint64_t bytes_copied = 0;
    int64_t copy_wait_us = 0;  // time this step blocked on copies (a GPU: as the device measured it)
    bool new_turn = true;      // the first step of a scheduler turn (scheduler.h, StepPlan)
    bool borrowed = false;     // adaptive turns: the step ran on slots borrowed from other models
};

struct Trace {
    std::vector<StepTrace> steps;
    std::vector<CopyTrace> copies;
    std::vector<WaitTrace> waits;
    uint64_t n_dropped = 0;  // records of any kind dropped because a ring was full
};

class Tracer {
public:
    // capacity > 0: record, keeping at most capacity records of each kind; 0: stop. Either way what was
    // recorded before is discarded.
    void enable(size_t capacity);
    bool on() const { return on_.load(std::memory_order_relaxed); }

    // Each is a no-op while off. Steps come from the step thread; copies from the copy thread or the step
    // thread; waits from the step thread.
    void record_copy(const CopyTrace& c);
    void record_wait(const WaitTrace& w);
    // Fills s's copy figures from what was recorded since the previous step, and its wait figure too
    // unless the device measured it (device_wait: s.copy_wait_us is the device's), then keeps it.
    void record_step(StepTrace s, bool device_wait = false);

    Trace take();

private:
    template <class T>
    void push(std::deque<T>& ring, const T& v);

    std::atomic<bool> on_{false};
    std::mutex mu_;
    size_t capacity_ = 0;
    std::deque<StepTrace> steps_;
    std::deque<CopyTrace> copies_;
    std::deque<WaitTrace> waits_;
    uint64_t n_dropped_ = 0;
    // since the previous step ended
    int pending_units_ = 0;
    uint64_t pending_bytes_ = 0;
    int64_t pending_wait_us_ = 0;
};

}  // namespace lmx
