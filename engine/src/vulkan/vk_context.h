// vulkan/vk_context.h — one Vulkan device opened for compute: instance (+ validation), queues,
// timeline semaphores, pipelines, command streams, host-visible buffers.
// Owner: the Vulkan device (engine/src/vulkan). Thread-safety: the context is immutable after
// construction except pipeline() (locked) and queue submission (submit_locked under queue_mu);
// a CmdStream is used by one thread at a time (its owner locks around it).
//
// Synchronization, in one paragraph. There are two timelines (Vulkan 1.2 timeline
// semaphores): `xfer` counts host->device copies, `comp` counts compute submissions. A copy
// into a layer slot waits (on the GPU) for the comp value of the last submission that read
// that slot, so a slot is overwritten only after the compute that read it finished; a layer's
// compute waits for the xfer value of the last copy into that layer's memory and nothing
// else. With a dedicated transfer queue the two run concurrently; without one, copies go to
// the compute queue (still on their own timeline). Inside a command buffer every dispatch is
// followed by one global compute->compute|transfer barrier; each command buffer starts with a
// barrier from earlier transfer/compute work, which orders it after every earlier submission
// on its queue.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "backend.h"
#include "common.h"
#include "vulkan/vk_loader.h"

namespace lmx::vk {

// Typed device faults (the engine maps them to request errors, see docs/vulkan.md).
struct DeviceLostError : DeviceFaultError {
    using DeviceFaultError::DeviceFaultError;
};
struct DeviceOutOfMemoryError : Error {
    using Error::Error;
};

// Throws DeviceLostError / DeviceOutOfMemoryError / Error naming `what` when r != VK_SUCCESS.
void vk_check(VkResult r, const char* what);

struct Options {
    int device_index = 0;
    bool validation = false;        // VK_LAYER_KHRONOS_validation + synchronization validation
    uint64_t max_binding_bytes = 0; // 0: the device's maxStorageBufferRange (tests force less)
    bool use_transfer_queue = true; // a dedicated transfer queue when the device has one
    bool use_timestamps = true;     // measure copy waits with GPU timestamps when the compute queue has them
    uint64_t block_bytes = 0;       // device memory block size; 0: min(1 GiB, maxMemoryAllocationSize)
    // Fault injection (tests): the queue submission after the first lose_device_after ones fails with
    // VK_ERROR_DEVICE_LOST, and so does every submission and wait after it, as on a GPU that was reset.
    int64_t lose_device_after = -1;
    // From the environment: LMX_VK_VALIDATION=1, LMX_VK_MAX_BINDING_BYTES=N, LMX_VK_NO_TRANSFER_QUEUE=1,
    // LMX_VK_NO_TIMESTAMPS=1 (the host-measured fallback of a queue without timestamps; tests),
    // LMX_VK_BLOCK_BYTES=N, LMX_VK_LOSE_DEVICE_AFTER=N (tests). LMX_VK_FAIL_ALLOC_AFTER=N is read by
    // the device at each block allocation (vk_device.h).
    static Options from_env(int device_index);
};

struct Info {
    std::string name;           // "llvmpipe (LLVM 15.0.6, 256 bits)"
    std::string driver;         // "llvmpipe Mesa 22.3.6 (LLVM 15.0.6)"
    std::string type;           // "discrete" | "integrated" | "cpu" | "virtual" | "other"
    uint32_t api_version = 0;
    uint64_t device_local_heap_bytes = 0;
    uint64_t max_storage_buffer_range = 0;
    uint64_t max_binding_bytes = 0;  // what we bind at most (<= max_storage_buffer_range)
    uint64_t max_allocation_bytes = 0;
    uint64_t min_storage_offset_align = 0;
    uint32_t subgroup_size = 0;
    bool dedicated_transfer_queue = false;
    uint32_t compute_family = 0, transfer_family = 0;
    // Timestamps of the compute queue: valid bits (0: none, or Options::use_timestamps off) and
    // nanoseconds per tick (VkPhysicalDeviceLimits::timestampPeriod).
    uint32_t timestamp_valid_bits = 0;
    double timestamp_period_ns = 0;
};

// Every physical device the loader lists, as "0: name (type, Vulkan 1.3)"; empty with *why
// set when there is no loader or no device.
std::vector<std::string> list_devices(std::string* why);

// Validation messages seen by every context of this process (the debug messenger's count);
// tests fail on any. last_validation_message() is the most recent text.
uint64_t validation_message_count();
std::string last_validation_message();

// A buffer in host-visible, host-coherent memory (staging, per-step uploads, readback).
struct HostBuffer {
    VkBuffer buf = VK_NULL_HANDLE;
    VkDeviceMemory mem = VK_NULL_HANDLE;
    uint8_t* map = nullptr;
    uint64_t n_bytes = 0;
};

// One binding: a buffer range no longer than Info::max_binding_bytes, starting at an offset
// aligned to minStorageBufferOffsetAlignment; `skip_bytes` is where the caller's data starts.
struct Binding {
    VkBuffer buf = VK_NULL_HANDLE;
    uint64_t offset = 0;
    uint64_t range = 0;
    uint32_t skip_bytes = 0;
};

class Context;

// Records command buffers for one queue and submits them on one timeline. A submitted
// command buffer (and its descriptor pool) is recycled once the timeline passes its value.
class CmdStream {
public:
    CmdStream(Context& ctx, bool transfer);
    ~CmdStream();
    CmdStream(const CmdStream&) = delete;
    CmdStream& operator=(const CmdStream&) = delete;

    VkCommandBuffer begin();  // starts recording (with the leading barrier)
    bool recording() const { return cur_ >= 0; }
    VkCommandBuffer cmd() const;
    // Binds pipeline `name` (spec constant 0 = spec0) with the given bindings and push constants,
    // dispatches groups, then a compute->compute|transfer barrier.
    void dispatch(const char* name, uint32_t spec0, const Binding* binds, int n_binds, const void* push,
                  uint32_t push_bytes, uint32_t gx, uint32_t gy = 1, uint32_t gz = 1);
    void barrier_to_host();  // transfer writes -> host reads (before a readback is read)
    // Timestamp queries (Info::timestamp_valid_bits > 0): reset [first, first + n) of pool; write
    // query i when every earlier command (and this batch's semaphore waits) has reached `stage`.
    void reset_queries(VkQueryPool pool, uint32_t first, uint32_t n);
    void timestamp(VkQueryPool pool, uint32_t query, VkPipelineStageFlagBits stage);
    // Records copies src -> dst, then a transfer -> compute|transfer barrier.
    void copy(VkBuffer src, VkBuffer dst, const VkBufferCopy* regions, uint32_t n_regions);
    void discard();  // ends the recording without submitting it (an aborted step)
    // Ends and submits; waits on (semaphore, value) pairs first. Returns this stream's timeline value.
    uint64_t submit(const std::vector<std::pair<VkSemaphore, uint64_t>>& waits);
    VkSemaphore timeline() const { return timeline_; }
    uint64_t last_submitted() const { return last_value_; }
    void wait(uint64_t value);  // host wait on this stream's timeline
    uint64_t completed() const;

private:
    struct Frame {
        VkCommandBuffer cb = VK_NULL_HANDLE;
        std::vector<VkDescriptorPool> pools;  // reset on reuse; grown when a recording needs more
        size_t pool_i = 0;                    // the pool sets are allocated from now
        uint64_t value = 0;  // timeline value of its last submission (0: never submitted)
    };
    VkDescriptorSet alloc_set(Frame& f);
    Context& ctx_;
    bool transfer_;
    VkCommandPool cmd_pool_ = VK_NULL_HANDLE;
    VkSemaphore timeline_ = VK_NULL_HANDLE;
    std::vector<Frame> frames_;
    int cur_ = -1;
    uint64_t last_value_ = 0;
};

class Context {
public:
    explicit Context(const Options& opt);  // throws Error naming what was found
    ~Context();
    Context(const Context&) = delete;
    Context& operator=(const Context&) = delete;

    const Info& info() const { return info_; }
    VkDevice device() const { return dev_; }
    VkPhysicalDevice physical() const { return phys_; }
    VkQueue queue(bool transfer) const { return transfer ? xfer_q_ : comp_q_; }
    uint32_t family(bool transfer) const { return transfer ? info_.transfer_family : info_.compute_family; }
    std::mutex& queue_mutex(bool transfer) { return (transfer && xfer_q_ != comp_q_) ? xfer_mu_ : comp_mu_; }
    VkPipelineLayout pipeline_layout() const { return layout_; }
    VkDescriptorSetLayout set_layout() const { return set_layout_; }
    VkPipeline pipeline(const char* name, uint32_t spec0);

    // Device-local memory of exactly n_bytes with one storage buffer over it (throws
    // DeviceOutOfMemoryError when the driver refuses).
    void alloc_device_block(uint64_t n_bytes, VkBuffer* buf, VkDeviceMemory* mem);
    HostBuffer alloc_host(uint64_t n_bytes);
    void free_host(HostBuffer& b);
    void free_device_block(VkBuffer buf, VkDeviceMemory mem);

    const Options& options() const { return opt_; }
    // Fault injection: true when this submission must fail as lost (counts submissions; sticky).
    bool submit_lost();
    bool lost() const { return lost_.load(); }

    // A binding covering [buf + off, + n_bytes); throws InvalidArgument when it is longer than
    // max_binding_bytes (callers split their work below that).
    Binding bind(VkBuffer buf, uint64_t off, uint64_t n_bytes) const;

    static constexpr int kMaxBindings = 8;
    static constexpr uint32_t kPushBytes = 128;

private:
    void release();  // destroys every handle (constructor failure paths and the destructor)
    uint32_t pick_memory_type(uint32_t bits, VkMemoryPropertyFlags want) const;

    Options opt_;
    Info info_;
    VkInstance inst_ = VK_NULL_HANDLE;
    VkDebugUtilsMessengerEXT messenger_ = VK_NULL_HANDLE;
    VkPhysicalDevice phys_ = VK_NULL_HANDLE;
    VkDevice dev_ = VK_NULL_HANDLE;
    VkQueue comp_q_ = VK_NULL_HANDLE, xfer_q_ = VK_NULL_HANDLE;
    std::mutex comp_mu_, xfer_mu_;
    VkPhysicalDeviceMemoryProperties mem_props_{};
    VkDescriptorSetLayout set_layout_ = VK_NULL_HANDLE;
    VkPipelineLayout layout_ = VK_NULL_HANDLE;
    std::mutex pipe_mu_;
    std::map<std::pair<std::string, uint32_t>, VkPipeline> pipelines_;
    std::map<std::string, VkShaderModule> modules_;
    std::atomic<int64_t> n_submits_{0};
    std::atomic<bool> lost_{false};
};

}  // namespace lmx::vk
