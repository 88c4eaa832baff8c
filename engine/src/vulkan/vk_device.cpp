// vulkan/vk_device.cpp — block-backed device memory, address translation, staged copies.
// Owner: the Vulkan device. Thread-safety: see vk_device.h.
#include "vulkan/vk_device.h"

#include <sys/mman.h>

#include <algorithm>
#include <cassert>
#include <cstdlib>
#include <cstring>
#include <iterator>

#include "vulkan/vk_backend.h"

namespace lmx::vk {

namespace {
constexpr uint64_t kDevAlign = 256;  // >= minStorageBufferOffsetAlignment on every device we target
}

VulkanDevice::VulkanDevice(std::shared_ptr<Context> ctx, uint64_t budget_bytes, uint64_t block_bytes,
                           uint64_t staging_bytes)
    : ctx_(std::move(ctx)) {
    const Info& in = ctx_->info();
    capacity_ = std::min(budget_bytes, in.device_local_heap_bytes) / kDevAlign * kDevAlign;
    if (capacity_ == 0) throw InvalidArgument("device budget: expected a positive number of bytes, found 0");
    if (block_bytes == 0) block_bytes = ctx_->options().block_bytes;
    block_bytes_ = block_bytes != 0 ? block_bytes : std::min<uint64_t>(1ull << 30, in.max_allocation_bytes);
    block_bytes_ = std::max<uint64_t>(kDevAlign, block_bytes_ / kDevAlign * kDevAlign);
    void* p = mmap(nullptr, capacity_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw Error("vulkan: could not reserve " + std::to_string(capacity_) + " bytes of address space");
    base_ = static_cast<uint8_t*>(p);
    try {
        blocks_.resize(static_cast<size_t>((capacity_ + block_bytes_ - 1) / block_bytes_));
        ctx_->alloc_device_block(std::min(block_bytes_, capacity_), &blocks_[0].buf, &blocks_[0].mem);  // throws
        ranges_ = RangeAlloc(capacity_, kDevAlign, block_bytes_);
        ring_ = ctx_->alloc_host(std::max<uint64_t>(staging_bytes / kRingParts * kRingParts, kRingParts * kDevAlign));
        xfer_ = std::make_unique<CmdStream>(*ctx_, true);
        comp_ = std::make_unique<CmdStream>(*ctx_, false);
        backend_ = std::make_unique<VulkanBackend>(*this);
    } catch (...) {
        release();
        throw;
    }
}

VulkanDevice::~VulkanDevice() { release(); }

void VulkanDevice::release() noexcept {
    backend_.reset();
    xfer_.reset();  // each stream waits for its own submissions
    comp_.reset();
    if (ctx_->device() != VK_NULL_HANDLE) fns().vkDeviceWaitIdle(ctx_->device());
    ctx_->free_host(ring_);
    for (Block& b : blocks_) ctx_->free_device_block(b.buf, b.mem);  // null handles: never allocated
    blocks_.clear();
    if (base_ != nullptr) munmap(base_, capacity_);
    base_ = nullptr;
}

Backend& VulkanDevice::backend() { return *backend_; }

bool VulkanDevice::ensure_block(size_t b) {
    Block& blk = blocks_[b];
    if (blk.mem != VK_NULL_HANDLE) return true;
    const uint64_t n = std::min(block_bytes_, capacity_ - b * block_bytes_);
    const int held = n_blocks_allocated();
    std::string why;
    if (const char* v = std::getenv("LMX_VK_FAIL_ALLOC_AFTER"); v != nullptr && v[0] != '\0' &&
                                                                 held >= std::atoi(v)) {
        why = std::string(vk_result_name(VK_ERROR_OUT_OF_DEVICE_MEMORY)) + " (injected: LMX_VK_FAIL_ALLOC_AFTER=" + v + ")";
    } else {
        try {
            ctx_->alloc_device_block(n, &blk.buf, &blk.mem);
            return true;
        } catch (const Error& e) {
            blk = Block{};
            why = e.what();
        }
    }
    const uint64_t held_bytes = static_cast<uint64_t>(held) * block_bytes_;
    alloc_failure_ = "the GPU refused device memory: vkAllocateMemory of a " + std::to_string(n >> 20) + " MiB block (" +
                     std::to_string(n) + " bytes) failed: " + why + "; layermux holds " + std::to_string(held_bytes >> 20) +
                     " MiB in " + std::to_string(held) + " blocks of its " + std::to_string(capacity_ >> 20) +
                     " MiB budget, the device-local heap is " + std::to_string(ctx_->info().device_local_heap_bytes >> 20) +
                     " MiB (other processes may hold the rest): free GPU memory or lower [device] budget";
    return false;
}

int VulkanDevice::n_blocks_allocated() const {
    int n = 0;
    for (const Block& b : blocks_) n += b.mem != VK_NULL_HANDLE ? 1 : 0;
    return n;
}

std::string VulkanDevice::take_alloc_failure() {
    std::lock_guard<std::mutex> lk(mu_);
    std::string s;
    s.swap(alloc_failure_);
    return s;
}

void* VulkanDevice::alloc(uint64_t n_bytes, Placement where) {
    std::lock_guard<std::mutex> lk(mu_);
    const std::optional<uint64_t> off = ranges_.alloc(n_bytes, where);
    if (!off) return nullptr;
    if (!ensure_block(static_cast<size_t>(*off / block_bytes_))) {  // out of device memory: a normal "no"
        ranges_.free(*off);
        return nullptr;
    }
    return base_ + *off;
}

void VulkanDevice::free(void* p) {
    if (p == nullptr) return;
    std::lock_guard<std::mutex> lk(mu_);
    ranges_.free(static_cast<uint64_t>(static_cast<uint8_t*>(p) - base_));
}

VulkanDevice::Loc VulkanDevice::locate(const void* p) const {
    const uint64_t off = static_cast<uint64_t>(static_cast<const uint8_t*>(p) - base_);
    assert(off < capacity_);
    const size_t b = static_cast<size_t>(off / block_bytes_);
    const uint64_t in_block = off - b * block_bytes_;
    const uint64_t block_size = std::min(block_bytes_, capacity_ - b * block_bytes_);
    return Loc{blocks_[b].buf, in_block, block_size - in_block};
}

Binding VulkanDevice::bind(const void* p, uint64_t n_bytes) const {
    const Loc l = locate(p);
    assert(n_bytes <= l.block_left);
    return ctx_->bind(l.buf, l.offset, n_bytes);
}

VkSemaphore VulkanDevice::xfer_timeline() const { return xfer_->timeline(); }
uint64_t VulkanDevice::xfer_completed() const { return xfer_->completed(); }

void VulkanDevice::copy_wait(CopyFence f) {
    if (f.value != 0) xfer_->wait(f.value);
}

// Regions are packed into the current ring part; a part is submitted (one command buffer,
// waiting for `after` on the compute timeline) when full or at the end of the batch.
void VulkanDevice::check_fault() const {
    if (faulted_.load()) throw DeviceLostError("vulkan device faulted: " + fault() + " (restart the worker)");
    if (ctx_->lost())
        throw DeviceLostError("vulkan device lost: VK_ERROR_DEVICE_LOST (injected: LMX_VK_LOSE_DEVICE_AFTER) "
                              "(restart the worker)");
}

std::string VulkanDevice::fault() const {
    std::lock_guard<std::mutex> lk(mu_);
    return fault_;
}

void VulkanDevice::inject_fault(const std::string& what) {
    std::lock_guard<std::mutex> lk(mu_);
    if (fault_.empty()) fault_ = what;
    faulted_.store(true);
}

CopyFence VulkanDevice::copy_in(const CopyRegion* regions, size_t n_regions, ComputeFence after) {
    if (faulted_.load()) return CopyFence{};
    try {
        return copy_in_locked(regions, n_regions, after);
    } catch (const std::exception& e) {
        inject_fault(std::string("a host-to-device copy failed: ") + e.what());
        return CopyFence{};
    }
}

CopyFence VulkanDevice::copy_in_locked(const CopyRegion* regions, size_t n_regions, ComputeFence after) {
    std::lock_guard<std::mutex> lk(copy_mu_);
    const uint64_t part = ring_.n_bytes / kRingParts;
    uint64_t value = 0, used = 0;
    int k = -1;
    std::vector<VkBufferCopy> pending;
    VkBuffer pending_dst = VK_NULL_HANDLE;
    auto flush = [&]() {
        if (pending.empty()) return;
        VkCommandBuffer cb = xfer_->begin();
        fns().vkCmdCopyBuffer(cb, ring_.buf, pending_dst, static_cast<uint32_t>(pending.size()), pending.data());
        std::vector<std::pair<VkSemaphore, uint64_t>> waits;
        if (after.value != 0) waits.push_back({comp_->timeline(), after.value});
        value = xfer_->submit(waits);
        ring_part_value_[k] = value;
        pending.clear();
    };
    auto next_part = [&]() {
        flush();
        k = ring_next_;
        ring_next_ = (ring_next_ + 1) % kRingParts;
        if (ring_part_value_[k] != 0) xfer_->wait(ring_part_value_[k]);  // its last copy has read it
        used = 0;
    };
    for (size_t r = 0; r < n_regions; r++) {
        const CopyRegion& reg = regions[r];
        const Loc loc = locate(reg.dst);
        assert(reg.n_bytes <= loc.block_left);
        for (uint64_t done = 0; done < reg.n_bytes;) {
            if (k < 0 || used + 16 > part || (pending_dst != VK_NULL_HANDLE && pending_dst != loc.buf)) next_part();
            const uint64_t n = std::min(part - used, reg.n_bytes - done);
            std::memcpy(ring_.map + static_cast<uint64_t>(k) * part + used, static_cast<const uint8_t*>(reg.src) + done, n);
            pending.push_back({static_cast<uint64_t>(k) * part + used, loc.offset + done, n});
            pending_dst = loc.buf;
            used = align_up(used + n, 16);
            done += n;
        }
        bytes_copied_ += reg.n_bytes;
    }
    flush();
    return CopyFence{value};
}

void VulkanDevice::copy_out(void* dst, const void* src, uint64_t n_bytes) {
    std::lock_guard<std::mutex> lk(copy_mu_);
    HostBuffer rb = ctx_->alloc_host(std::max<uint64_t>(n_bytes, 4));
    const Loc loc = locate(src);
    VkCommandBuffer cb = xfer_->begin();
    VkBufferCopy region{loc.offset, 0, n_bytes};
    fns().vkCmdCopyBuffer(cb, loc.buf, rb.buf, 1, &region);
    xfer_->barrier_to_host();
    const uint64_t v = xfer_->submit({{comp_->timeline(), comp_->last_submitted()}});
    xfer_->wait(v);
    std::memcpy(dst, rb.map, n_bytes);
    ctx_->free_host(rb);
}

}  // namespace lmx::vk
