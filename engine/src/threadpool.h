// threadpool.h — a fixed pool of worker threads for data-parallel kernels.
// Owner: kernels. Thread-safety: parallel_for may be called from ONE thread at a
// time (the engine's step thread); the pool's workers never call back into it.
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
    // must not depend on which thread runs it.
    void parallel_for(int64_t n_tasks, const std::function<void(int64_t task, int thread)>& fn);

private:
    void worker_main(int thread);

    int n_threads_;
    std::vector<std::thread> workers_;
    std::mutex mu_;
    std::condition_variable cv_start_;
    std::condition_variable cv_done_;
    const std::function<void(int64_t, int)>* job_ = nullptr;
    int64_t n_tasks_ = 0;
    std::atomic<int64_t> next_task_{0};
    int n_active_ = 0;
    uint64_t generation_ = 0;
    bool stop_ = false;
};

}  // namespace lmx
