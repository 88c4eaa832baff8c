// vulkan/vk_device.h — device memory of a Vulkan GPU behind the Device interface.
// Owner: the Vulkan device. Thread-safety: alloc/free/locate/mark_read under mu_; copy_in
// from any thread (the staging ring has its own lock, copies are serialised through it).
//
// Addresses. alloc() hands out pointers into a private reserved (PROT_NONE) range of the
// process's address space, capacity bytes long: the rest of the engine keeps treating
// device memory as pointers (the ledger, residency, KV block tables), but any CPU access
// to one faults at once instead of silently reading garbage. locate() translates an address
// into (VkBuffer, offset). The range is backed by a few large device-local blocks
// (block_bytes each, the last one shorter), each with one storage buffer over it; an
// allocation never straddles two blocks. Kernels bind ranges no longer than
// Info::max_binding_bytes (maxStorageBufferRange), so a block — and a weight arena — may
// be larger than any one binding.
//
// Blocks are allocated when first used (block 0, where KV pages start, at construction), so
// memory another process holds shows up when a model loads, not as a failed start. A block
// the driver refuses (out of device memory) makes alloc() return nullptr — running out is a
// normal result to the ledger — and leaves a one-line note (alloc_failure) that the engine
// adds to the load's error: the bytes asked, what the device holds, the heap. Test hook:
// LMX_VK_FAIL_ALLOC_AFTER=N (read at each block allocation) refuses every block past N held.
//
// Copies. copy_in stages host bytes in a pinned (host-visible) ring, split in kRingParts parts,
// and copies them with the transfer stream (the dedicated transfer queue when there is one),
// on the GPU after the compute fence `after` (the slot's previous reader), and returns the
// copy fence the backend's begin_unit waits for: a layer's compute waits for its own copy only.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <string>
#include <memory>
#include <mutex>
#include <vector>

#include "device.h"
#include "vulkan/vk_context.h"

namespace lmx::vk {

class VulkanBackend;

class VulkanDevice final : public Device {
public:
    // capacity = min(budget_bytes, the device-local heap). block_bytes 0: min(1 GiB,
    // maxMemoryAllocationSize). Allocates every block now (DeviceOutOfMemoryError if refused).
    VulkanDevice(std::shared_ptr<Context> ctx, uint64_t budget_bytes, uint64_t block_bytes = 0,
                 uint64_t staging_bytes = 16ull << 20);
    ~VulkanDevice() override;

    const char* name() const override { return "vulkan"; }
    uint64_t capacity_bytes() const override { return capacity_; }
    void* alloc(uint64_t n_bytes, Placement where = Placement::Low) override;
    void free(void* p) override;
    CopyFence copy_in(const CopyRegion* regions, size_t n_regions, ComputeFence after) override;
    void copy_wait(CopyFence f) override;
    Backend& backend() override;

    Context& ctx() { return *ctx_; }
    const std::shared_ptr<Context>& ctx_ptr() const { return ctx_; }
    struct Loc {
        VkBuffer buf;
        uint64_t offset;      // within buf
        uint64_t block_left;  // bytes from offset to the end of its block
    };
    Loc locate(const void* p) const;  // precondition: p is inside the device's range
    // A binding of [p, p + n_bytes) (see Context::bind).
    Binding bind(const void* p, uint64_t n_bytes) const;
    VkSemaphore xfer_timeline() const;
    uint64_t xfer_completed() const;  // the copy timeline's value now (copies up to it have landed)
    CmdStream& compute() { return *comp_; }  // the backend's stream (step thread only)
    // Synchronous device -> host copy (tests, diagnostics) after every submitted copy and compute.
    void copy_out(void* dst, const void* src, uint64_t n_bytes);
    uint64_t block_bytes() const { return block_bytes_; }
    int n_blocks() const { return static_cast<int>(blocks_.size()); }
    uint64_t bytes_copied() const { return bytes_copied_; }

    // The last refused block allocation, one line; "" when none since the last call (clears it).
    std::string take_alloc_failure();
    int n_blocks_allocated() const;

    // Faults. A copy that fails (device lost, out of memory) cannot throw: it runs on the
    // residency's copy thread. It marks the device faulted instead and returns an empty fence;
    // from then on every step throws DeviceLostError (check_fault, called by the backend at
    // begin_step), so the engine ends the affected requests with engine_failure and keeps
    // serving (failing) until the worker is restarted. fault() is the message, "" while healthy.
    void check_fault() const;
    std::string fault() const;
    void inject_fault(const std::string& what);  // tests: as if a copy had failed with `what`

private:
    struct Block {
        VkBuffer buf = VK_NULL_HANDLE;
        VkDeviceMemory mem = VK_NULL_HANDLE;
    };
    void release() noexcept;
    bool ensure_block(size_t b);  // under mu_: allocates block b if needed; false (with a note) if refused
    CopyFence copy_in_locked(const CopyRegion* regions, size_t n_regions, ComputeFence after);

    std::shared_ptr<Context> ctx_;
    uint64_t capacity_ = 0;
    uint64_t block_bytes_ = 0;
    uint8_t* base_ = nullptr;  // PROT_NONE reservation: addresses only
    std::vector<Block> blocks_;
    mutable std::mutex mu_;
    RangeAlloc ranges_{0, 1};  // laid out by the constructor: ranges never span a block boundary

    std::mutex copy_mu_;  // the transfer stream and the ring
    std::unique_ptr<CmdStream> xfer_;
    std::unique_ptr<CmdStream> comp_;
    HostBuffer ring_;
    static constexpr int kRingParts = 4;
    uint64_t ring_part_value_[kRingParts] = {};
    int ring_next_ = 0;
    uint64_t bytes_copied_ = 0;
    std::atomic<bool> faulted_{false};
    std::string fault_;  // under mu_
    std::string alloc_failure_;  // under mu_
    std::unique_ptr<VulkanBackend> backend_;
};

}  // namespace lmx::vk
