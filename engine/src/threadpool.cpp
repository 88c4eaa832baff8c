// threadpool.cpp — persistent workers that spin briefly, then sleep, between parallel_for calls.
// Owner: kernels. Thread-safety: as threadpool.h — parallel_for from one thread at a
// time; the workers only ever run tasks of the job being published.
//
// Hand-off protocol. state_ packs [generation | next task index]. A call publishes
// generation g by writing its job into slot g % 2 and then storing [g | 0] (release).
// Anyone — the caller included — claims a task by a CAS that increments the index
// while the generation still reads g and the index is below n_tasks. The call returns
// when n_done_ reaches n_tasks: every task has returned, whoever ran it.
//
// The caller never waits for a worker that did not claim a task. That matters when
// the machine is oversubscribed: a worker descheduled for a few milliseconds simply
// misses the job, where a "wait for every worker to check in" protocol would stall
// each op for a whole scheduler slice. A late worker is harmless: its CAS fails
// because the generation moved on, and the slot it may have read belongs to g or g+2
// — g+2 can only be written after g+1 was published, when no claim on g can succeed.
//
// Why spin. A forward pass issues one matmul per projection, tens of microseconds
// apart; a condvar sleep/wake costs a futex round trip (5-50 us) per op. So workers
// poll state_ for kSpinWindow after a job before they block, and the caller polls
// n_done_ the same way; pause keeps the poll cheap. Past the window an idle engine
// sleeps.
#include "threadpool.h"

#include <chrono>
#include <exception>
#include <memory>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LMX_CPU_RELAX() _mm_pause()
#else
#define LMX_CPU_RELAX() ((void)0)
#endif

namespace lmx {

namespace {

// How long a worker (or the caller) polls before it blocks on a condvar.
constexpr auto kSpinWindow = std::chrono::microseconds(200);
// pause instructions between two clock reads while polling.
constexpr int kPausesPerClockRead = 32;
constexpr uint64_t kIndexMask = 0xffffffffull;
constexpr int64_t kMaxTasksPerJob = static_cast<int64_t>(kIndexMask);  // the index field saturates here

inline uint32_t generation_of(uint64_t state) { return static_cast<uint32_t>(state >> 32); }

// Polls pred() for up to kSpinWindow; true if it became true.
template <class Pred>
bool spin_until(Pred pred) {
    const auto deadline = std::chrono::steady_clock::now() + kSpinWindow;
    for (;;) {
        for (int i = 0; i < kPausesPerClockRead; ++i) {
            if (pred()) return true;
            LMX_CPU_RELAX();
        }
        if (std::chrono::steady_clock::now() >= deadline) return pred();
    }
}

}  // namespace

ThreadPool::ThreadPool(int n_threads) {
    if (n_threads <= 0) n_threads = static_cast<int>(std::thread::hardware_concurrency());
    if (n_threads <= 0) n_threads = 1;
    n_threads_ = n_threads;
    workers_.reserve(static_cast<size_t>(n_threads_ - 1));
    for (int t = 1; t < n_threads_; ++t) workers_.emplace_back(&ThreadPool::worker_main, this, t);
}

ThreadPool::~ThreadPool() {
    stop_.store(true);
    { std::lock_guard<std::mutex> lk(mu_); }  // a worker between its check and its wait sees stop_
    cv_start_.notify_all();
    for (auto& w : workers_) w.join();
}

void ThreadPool::parallel_for(int64_t n_tasks, const Fn& fn) {
    if (n_tasks <= 0) return;
    // One task or no workers: nothing to share, skip the hand-off entirely.
    if (n_tasks == 1 || workers_.empty()) {
        for (int64_t t = 0; t < n_tasks; ++t) fn(t, 0);
        return;
    }
    if (n_tasks <= kMaxTasksPerJob) {
        run_job(n_tasks, fn);
        return;
    }
    for (int64_t first = 0; first < n_tasks; first += kMaxTasksPerJob) {  // never in practice
        const int64_t n = n_tasks - first < kMaxTasksPerJob ? n_tasks - first : kMaxTasksPerJob;
        const Fn shifted = [&fn, first](int64_t task, int thread) { fn(first + task, thread); };
        run_job(n, shifted);
    }
}

void ThreadPool::run_job(int64_t n_tasks, const Fn& fn) {
    const uint32_t gen = generation_of(state_.load(std::memory_order_relaxed)) + 1;
    Job& job = jobs_[gen & 1];
    job.fn.store(&fn, std::memory_order_relaxed);
    job.n_tasks.store(n_tasks, std::memory_order_relaxed);
    n_done_.store(0, std::memory_order_relaxed);
    state_.store(static_cast<uint64_t>(gen) << 32, std::memory_order_release);  // publishes the three above
    { std::lock_guard<std::mutex> lk(mu_); }  // pairs with the predicate check in worker_main
    cv_start_.notify_all();                   // no syscall when every worker is still spinning

    try {
        run_tasks(gen, 0);
    } catch (...) {
        // Close the job so no task starts any more, count the task that threw as
        // finished, wait for the ones other threads already claimed (they hold &fn,
        // which dies as we unwind), then rethrow.
        const uint64_t closed = state_.exchange((static_cast<uint64_t>(gen) << 32) | kIndexMask);
        const int64_t idx = static_cast<int64_t>(closed & kIndexMask);
        const int64_t claimed = idx < n_tasks ? idx : n_tasks;
        n_done_.fetch_add(1, std::memory_order_acq_rel);
        while (n_done_.load(std::memory_order_acquire) < claimed) std::this_thread::yield();
        throw;
    }

    auto all_done = [this, n_tasks] { return n_done_.load(std::memory_order_acquire) == n_tasks; };
    if (!spin_until(all_done)) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_done_.wait(lk, all_done);
    }
}

void ThreadPool::run_tasks(uint32_t gen, int thread) {
    const Job& job = jobs_[gen & 1];
    const Fn* fn = job.fn.load(std::memory_order_relaxed);
    const int64_t n_tasks = job.n_tasks.load(std::memory_order_relaxed);
    uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
        if (generation_of(s) != gen) return;
        const int64_t idx = static_cast<int64_t>(s & kIndexMask);
        if (idx >= n_tasks) return;
        if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
        // The claim succeeded under generation gen, so job gen is still running and
        // fn / n_tasks read above are its own.
        (*fn)(idx, thread);
        if (n_done_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_tasks && thread != 0) {
            { std::lock_guard<std::mutex> lk(mu_); }  // the caller may be between its check and its wait
            cv_done_.notify_one();
        }
        s = state_.load(std::memory_order_acquire);
    }
}

void ThreadPool::worker_main(int thread) {
    uint32_t seen = 0;  // the last generation this worker looked at
    for (;;) {
        auto published = [this, &seen] {
            return stop_.load(std::memory_order_acquire) ||
                   generation_of(state_.load(std::memory_order_acquire)) != seen;
        };
        if (!spin_until(published)) {
            std::unique_lock<std::mutex> lk(mu_);
            cv_start_.wait(lk, published);
        }
        if (stop_.load(std::memory_order_acquire)) return;
        seen = generation_of(state_.load(std::memory_order_acquire));
        run_tasks(seen, thread);
    }
}

}  // namespace lmx
