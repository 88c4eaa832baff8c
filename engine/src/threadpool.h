// threadpool.h — a fixed pool of worker threads for data-parallel kernels.
// Owner: kernels; the engine's pool belongs to the CPU backend (backend_cpu.h), which lends
// it to the step thread for sampling. Thread-safety: parallel_for may be called from ONE
// thread at a time (the engine's step thread); the pool's workers never call back into it.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace lmx {

class ThreadPool {
public:
    // n_threads <= 0 means std::thread::hardware_concurrency(). The calling
    // thread takes part in the work, so n_threads - 1 workers are started.
    explicit ThreadPool(int n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int n_threads() const { return n_threads_; }

    // Runs fn(task, thread) for task in [0, n_tasks), spread over the threads,
    // and returns when all have run. thread is in [0, n_threads()).
    // Tasks are handed out dynamically (an atomic counter), so a task's result
    // must not depend on which thread runs it. If fn throws on the calling
    // thread, no further task starts and the exception is rethrown once the
    // running ones return; fn must not throw on a worker (std::terminate).
    // Idle workers spin ~200 us for the next call, then sleep on a condvar.
    void parallel_for(int64_t n_tasks, const std::function<void(int64_t task, int thread)>& fn);

private:
    using Fn = std::function<void(int64_t, int)>;
    // One published job. Generation g uses slot g % 2, so a worker that wakes up late
    // can never mistake the next job's fields for its own (see threadpool.cpp).
    struct Job {
        std::atomic<const Fn*> fn{nullptr};
        std::atomic<int64_t> n_tasks{0};
    };

    void worker_main(int thread);
    // Claims and runs tasks of generation gen until none is left.
    void run_tasks(uint32_t gen, int thread);
    // One generation: fn(task, thread) for task in [0, n_tasks), n_tasks < 2^32.
    void run_job(int64_t n_tasks, const Fn& fn);

    int n_threads_;
    std::vector<std::thread> workers_;
    std::mutex mu_;                     // only for sleeping on the condvars
    std::condition_variable cv_start_;  // workers wait here for a new generation
    std::condition_variable cv_done_;   // the caller waits here for the last task
    Job jobs_[2];
    std::atomic<uint64_t> state_{0};  // [generation : 32 | next task index : 32]
    std::atomic<int64_t> n_done_{0};  // tasks of the current generation that have returned
    std::atomic<bool> stop_{false};
};

}  // namespace lmx
