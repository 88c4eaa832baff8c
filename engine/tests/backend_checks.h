// backend_checks.h — whole-forward checks any device can run (defined in test_backend.cpp).
// Owner: engine tests. Thread-safety: tests run one at a time on the main thread.
#pragma once

#include <functional>
#include <memory>

#include "device.h"

namespace lmx_test {

// A 3-layer tiny model, resident and then streamed through 2 slots with a copy thread, on a
// fresh device from make_device (16 MiB is plenty): prefill chunks of 10, 7, 2 and 13 tokens
// across 4-token KV blocks, then batched decode steps. Every logits row must be within tol
// (max |a - b| / max |b|) of the naive model (scalar reference kernels, contiguous KV).
void check_forward_against_naive(const std::function<std::unique_ptr<lmx::Device>()>& make_device, double tol);

}  // namespace lmx_test
