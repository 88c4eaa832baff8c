// membw.h — this machine's streaming-read bandwidth, the floor batch-1 decode is held to.
// Owner: kernels. Thread-safety: uses the given pool; call from its one calling thread.
#pragma once

#include <cstddef>

namespace lmx {

class ThreadPool;

// Best GB/s (1e9 bytes/s) of `repeats` passes reading n_bytes once, split over the pool's
// threads. The buffer is an anonymous mapping as the device arena is (touched before
// timing), and each task reads 4 interleaved sequential streams, as a matmul tile reads
// its rows: what the memory gives a decode step, without numpy's per-core compute limits.
double read_bandwidth_gbs(ThreadPool& pool, size_t n_bytes, int repeats);

}  // namespace lmx
