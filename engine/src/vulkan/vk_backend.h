// vulkan/vk_backend.h — the forward pass's ops on a Vulkan device, behind the Backend seam.
// Owner: the Vulkan device. Thread-safety: as Backend: one driving thread (the step thread).
//
// Recording. Ops are recorded into the compute stream's command buffer as they are called;
// begin_unit first submits whatever was recorded outside a unit (the embedding, the head's
// row gather), end_unit submits the unit's ops waiting on the GPU for that unit's copy fence
// only, and returns the compute fence the unit's slot may be refilled after. read_host
// submits a copy into a host-visible readback buffer and waits for it.
//
// Per-step host data (token rows of the host embedding table, RoPE cos/sin, the KV block
// tables) lives in host-visible chunks that the GPU reads directly; a step writes them before
// the submission that reads them and end_step waits for the step's work, so the next step
// may overwrite them.
//
// Copy wait. How long compute waited for host->device copies (ResidencyStats::wait_ns on this
// device, Engine::stats): every compute submission of a step is bracketed by two timestamps on
// the compute queue (a start at the compute stage, which the batch's semaphore waits hold back,
// and an end at the bottom of the pipe); a unit whose copy fence had not completed when the
// unit began is charged the queue's idle gap before it: its start less the end of the step's
// previous submission (with copies on the compute queue, their execution is inside the gap).
// Where the compute queue has no timestamps (timestampValidBits 0, or LMX_VK_NO_TIMESTAMPS=1)
// the step thread instead waits on the host for such a unit's copy before submitting it and is
// charged that wait (an upper bound: the GPU may still have been busy with earlier work).
//
// KV. The blocks a step touches are grouped into at most four windows, each inside one device
// memory block and no longer than one storage binding (kv_cache books them with Placement::Low,
// so they pack at the bottom of the device: usually one window); a table entry holds its block's
// window (top 2 bits) and start there (in KV elements: f32, or f16 packed two to a word when
// kv_dtype = "f16"), and a layer adds its offset.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include "backend.h"
#include "threadpool.h"
#include "vulkan/vk_device.h"
#include "vulkan/vk_ops.h"

namespace lmx::vk {

class VulkanBackend final : public Backend {
public:
    explicit VulkanBackend(VulkanDevice& dev);
    ~VulkanBackend() override;

    const char* name() const override { return "vulkan"; }
    ThreadPool& host_pool() override { return pool_; }
    int scratch_lanes() const override { return 0; }

    void begin_step(const StepDesc& step) override;
    void begin_unit(CopyFence ready) override;
    ComputeFence end_unit() override;
    void end_step() override;
    void abort_step() noexcept override;

    void embed(const WeightView& table, const int32_t* tokens, float* x) override;
    void rmsnorm(const float* x, const float* weight, float eps, int64_t n_rows, int64_t dim, float* y) override;
    void matmul_many(const MatmulOut* outs, int n_outs, const float* x, int64_t n_rows) override;
    void rope(float* x, int n_heads, int head_dim, const float* inv_freq) override;
    void kv_append(int layer, const float* k, const float* v) override;
    void attention(int layer, const float* q, const AttnParams& p, float* out) override;
    void silu_mul(const float* gate, const float* up, float* out, int64_t n) override;
    void add(float* x, const float* y, int64_t n) override;
    void gelu_tanh_mul(const float* gate, const float* up, float* out, int64_t n) override;
    void softcap(float* x, int64_t n, float cap) override;
    void scale(float* x, float s, int64_t n) override;
    void gather_rows(const float* x, int64_t dim, float* rows) override;
    float* read_host(float* src, int64_t n) override;

    // Nanoseconds end_step / read_host spent waiting on the GPU (diagnostics).
    uint64_t wait_ns() const { return wait_ns_; }
    // Compute's wait for copies so far (see the header); any thread.
    bool device_copy_wait_ns(uint64_t* ns) const override {
        *ns = copy_wait_ns_.load();
        return true;
    }
    bool timestamps() const { return qpool_ != VK_NULL_HANDLE; }

private:
    struct Chunk {
        HostBuffer hb;
        uint64_t used = 0;
    };
    struct HostSlice {
        uint8_t* p;
        Binding b;
        VkBuffer buf;
        uint64_t offset;
    };
    HostSlice host_take(uint64_t n_bytes);
    void recording();  // begins a command buffer when none is open (with its start timestamp)
    // Ends and submits the open command buffer (with its end timestamp); copy_pending: it is a
    // unit whose copy had not landed when the unit began (charged the idle gap before it).
    uint64_t submit(const std::vector<std::pair<VkSemaphore, uint64_t>>& waits, bool copy_pending = false);
    void read_timestamps();  // after the step's work finished: adds its copy waits
    Binding act(const void* p, int64_t n_floats) const { return dev_.bind(p, static_cast<uint64_t>(n_floats) * 4); }
    KvBindings kv_windows(int layer) const;  // the step's KV windows, each long enough for `layer`
    KvGeom kv_geom(int layer, const AttnParams* p) const;

    VulkanDevice& dev_;
    Context& ctx_;
    CmdStream& s_;
    ThreadPool pool_;
    StepDesc step_{};
    std::vector<StepSeq> seqs_;
    std::vector<int64_t> pos_;  // [n_tokens]
    std::vector<Chunk> chunks_;
    CopyFence ready_{};
    bool in_unit_ = false;
    // KV of the step
    struct KvWindow {
        const uint8_t* lo;  // its lowest block start
        const uint8_t* hi;  // its highest block start
    };
    std::vector<KvWindow> kv_windows_;  // ascending, at most KvBindings::kMax
    Binding tok_b_{}, tables_b_{}, dst_b_{};
    std::map<std::pair<const float*, int>, Binding> rope_tables_;  // (inv_freq, head_dim) -> cos/sin
    HostBuffer readback_;
    uint64_t wait_ns_ = 0;
    // copy wait
    static constexpr uint32_t kMaxQueries = 1024;  // 2 per submission; a step past 512 stops measuring
    VkQueryPool qpool_ = VK_NULL_HANDLE;           // null: no timestamps, the host-measured fallback
    bool queries_reset_ = false;                   // this step's first command buffer reset them
    uint32_t n_queries_ = 0;                       // used this step
    int64_t cur_query_ = -1;                       // the open command buffer's start query, -1: none
    struct Submitted {
        uint32_t query;  // start; end = query + 1
        bool copy_pending;
    };
    std::vector<Submitted> submitted_;  // this step's timed submissions, in queue order
    bool unit_copy_pending_ = false;
    std::atomic<uint64_t> copy_wait_ns_{0};
};

}  // namespace lmx::vk
