// vulkan/vk_backend.cpp — step bracketing, per-step host data, and the ops as dispatches.
// Owner: the Vulkan device. Thread-safety: see vk_backend.h.
#include "vulkan/vk_backend.h"

#include <algorithm>
#include <cassert>
#include <chrono>
#include <cmath>
#include <cstring>
#include <thread>

#include "vulkan/vk_ops.h"

namespace lmx::vk {

namespace {
constexpr uint64_t kChunkBytes = 4ull << 20;
int host_threads() {
    const unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 1 : static_cast<int>(std::min(n, 8u));
}
}  // namespace

VulkanBackend::VulkanBackend(VulkanDevice& dev)
    : dev_(dev), ctx_(dev.ctx()), s_(dev.compute()), pool_(host_threads()) {
    if (ctx_.info().timestamp_valid_bits > 0) {
        VkQueryPoolCreateInfo qi{VK_STRUCTURE_TYPE_QUERY_POOL_CREATE_INFO};
        qi.queryType = VK_QUERY_TYPE_TIMESTAMP;
        qi.queryCount = kMaxQueries;
        vk_check(fns().vkCreateQueryPool(ctx_.device(), &qi, nullptr, &qpool_), "vkCreateQueryPool (timestamps)");
    }
}

VulkanBackend::~VulkanBackend() {
    abort_step();
    for (Chunk& c : chunks_) ctx_.free_host(c.hb);
    ctx_.free_host(readback_);
    if (qpool_ != VK_NULL_HANDLE) {
        fns().vkDeviceWaitIdle(ctx_.device());  // abort_step's wait may have thrown (lost): nothing may use it
        fns().vkDestroyQueryPool(ctx_.device(), qpool_, nullptr);
    }
}

VulkanBackend::HostSlice VulkanBackend::host_take(uint64_t n_bytes) {
    const uint64_t need = align_up(std::max<uint64_t>(n_bytes, 4), 256);
    for (Chunk& c : chunks_) {
        if (c.hb.n_bytes - c.used < need) continue;
        HostSlice s{c.hb.map + c.used, ctx_.bind(c.hb.buf, c.used, n_bytes), c.hb.buf, c.used};
        c.used += need;
        return s;
    }
    Chunk c;
    c.hb = ctx_.alloc_host(std::max(kChunkBytes, need));
    chunks_.push_back(c);
    return host_take(n_bytes);
}

void VulkanBackend::recording() {
    if (s_.recording()) return;
    s_.begin();
    if (qpool_ == VK_NULL_HANDLE) return;
    if (!queries_reset_) {
        s_.reset_queries(qpool_, 0, kMaxQueries);
        queries_reset_ = true;
    }
    if (n_queries_ + 2 <= kMaxQueries) {
        cur_query_ = n_queries_;
        s_.timestamp(qpool_, n_queries_, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT);
        n_queries_ += 2;
    }
}

uint64_t VulkanBackend::submit(const std::vector<std::pair<VkSemaphore, uint64_t>>& waits, bool copy_pending) {
    if (cur_query_ >= 0) {
        s_.timestamp(qpool_, static_cast<uint32_t>(cur_query_ + 1), VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT);
        submitted_.push_back({static_cast<uint32_t>(cur_query_), copy_pending});
        cur_query_ = -1;
    }
    return s_.submit(waits);
}

void VulkanBackend::read_timestamps() {
    if (submitted_.size() < 2) return;
    std::vector<uint64_t> ts(n_queries_);
    vk_check(fns().vkGetQueryPoolResults(ctx_.device(), qpool_, 0, n_queries_, ts.size() * 8, ts.data(), 8,
                                         VK_QUERY_RESULT_64_BIT | VK_QUERY_RESULT_WAIT_BIT),
             "vkGetQueryPoolResults");
    const uint32_t bits = ctx_.info().timestamp_valid_bits;
    const uint64_t mask = bits >= 64 ? ~0ull : (1ull << bits) - 1;
    double ticks = 0;
    for (size_t i = 1; i < submitted_.size(); i++) {
        if (!submitted_[i].copy_pending) continue;
        const uint64_t gap = (ts[submitted_[i].query] - ts[submitted_[i - 1].query + 1]) & mask;
        if (gap <= mask / 2) ticks += static_cast<double>(gap);  // else: started before the other ended
    }
    copy_wait_ns_ += static_cast<uint64_t>(ticks * ctx_.info().timestamp_period_ns);
}

void VulkanBackend::begin_step(const StepDesc& step) {
    dev_.check_fault();  // a failed copy: this step's requests end with an error, the engine lives on
    step_ = step;
    seqs_.assign(step.seqs, step.seqs + step.n_seqs);
    step_.seqs = seqs_.data();
    for (Chunk& c : chunks_) c.used = 0;  // the previous step's work has finished (end_step waited)
    rope_tables_.clear();
    in_unit_ = false;
    queries_reset_ = false;
    n_queries_ = 0;
    cur_query_ = -1;
    submitted_.clear();
    pos_.resize(static_cast<size_t>(step.n_tokens));
    // KV: the step's blocks grouped into at most KvBindings::kMax windows (a binding each), each
    // inside one device memory block and no longer than one binding (nor 2^30 elements: a table
    // entry keeps the window in its top 2 bits). Blocks are taken in address order; KV is booked
    // from the bottom of the device, so a step's blocks are usually one window.
    const int64_t elem_bytes = step.kv.f16 ? 2 : 4;
    std::vector<const uint8_t*> starts;
    for (const StepSeq& s : seqs_)
        for (int32_t b = 0; b < s.n_blocks; b++) starts.push_back(reinterpret_cast<const uint8_t*>(s.kv_blocks[b]));
    const size_t n_entries = starts.size();
    std::sort(starts.begin(), starts.end());
    starts.erase(std::unique(starts.begin(), starts.end()), starts.end());
    const uint64_t block_bytes =
        static_cast<uint64_t>(std::max(step.kv.n_layer, 1) * step.kv.layer_stride * elem_bytes);
    const uint64_t align = std::max<uint64_t>(ctx_.info().min_storage_offset_align, 4);
    const uint64_t limit = std::min<uint64_t>(ctx_.info().max_binding_bytes - align,
                                              (uint64_t{1} << kKvEntryOffsetBits) * static_cast<uint64_t>(elem_bytes));
    kv_windows_.clear();
    for (const uint8_t* p : starts) {
        if (!kv_windows_.empty() && dev_.locate(p).buf == dev_.locate(kv_windows_.back().lo).buf &&
            static_cast<uint64_t>(p - kv_windows_.back().lo) + block_bytes <= limit) {
            kv_windows_.back().hi = p;
            continue;
        }
        if (kv_windows_.size() == static_cast<size_t>(KvBindings::kMax) || block_bytes > limit)
            throw UnsupportedError("vulkan: this step's KV blocks need more than " + std::to_string(KvBindings::kMax) +
                                   " storage bindings (each inside one device memory block and at most " +
                                   std::to_string(limit) + " bytes); lower max_seqs_per_step or max_batch_tokens");
        kv_windows_.push_back({p, p});
    }
    // Entry of a block: its window (top bits) and its start there (elements).
    auto kv_entry = [&](const float* block) {
        const uint8_t* p = reinterpret_cast<const uint8_t*>(block);
        size_t w = 0;
        while (w + 1 < kv_windows_.size() && kv_windows_[w + 1].lo <= p) w++;
        return static_cast<uint32_t>(w << kKvEntryOffsetBits) |
               static_cast<uint32_t>((p - kv_windows_[w].lo) / elem_bytes);
    };
    const int64_t T = step.n_tokens;
    HostSlice tok = host_take(static_cast<uint64_t>(std::max<int64_t>(T, 1)) * 8);
    HostSlice tables = host_take(std::max<size_t>(n_entries, 1) * 4);
    HostSlice dst = host_take(static_cast<uint64_t>(std::max<int64_t>(T, 1)) * 4);
    auto* tok_u = reinterpret_cast<uint32_t*>(tok.p);
    auto* tab_u = reinterpret_cast<uint32_t*>(tables.p);
    auto* dst_u = reinterpret_cast<uint32_t*>(dst.p);
    const int bt = step.kv.block_tokens;
    uint32_t entry = 0;
    int64_t t = 0;
    for (const StepSeq& s : seqs_) {
        const uint32_t start = entry;
        for (int32_t b = 0; b < s.n_blocks; b++)
            tab_u[entry++] = kv_entry(s.kv_blocks[b]);
        for (int32_t j = 0; j < s.n_tokens; j++, t++) {
            const int64_t pos = s.pos0 + j;
            pos_[static_cast<size_t>(t)] = pos;
            assert(pos / bt < s.n_blocks);
            tok_u[2 * t] = start;
            tok_u[2 * t + 1] = static_cast<uint32_t>(pos + 1);
            dst_u[t] = tab_u[start + pos / bt] + static_cast<uint32_t>((pos % bt) * step.kv.kv_dim);
        }
    }
    tok_b_ = tok.b;
    tables_b_ = tables.b;
    dst_b_ = dst.b;
}

void VulkanBackend::begin_unit(CopyFence ready) {
    if (s_.recording()) submit({});  // ops recorded outside a unit wait for nothing
    ready_ = ready;
    in_unit_ = true;
    // Its copy still in flight now: the GPU may have to wait for it (the fence is checked, not waited on).
    unit_copy_pending_ = ready.value != 0 && dev_.xfer_completed() < ready.value;
}

ComputeFence VulkanBackend::end_unit() {
    recording();
    std::vector<std::pair<VkSemaphore, uint64_t>> waits;
    if (ready_.value != 0) waits.push_back({dev_.xfer_timeline(), ready_.value});
    if (unit_copy_pending_ && qpool_ == VK_NULL_HANDLE) {  // no timestamps: the host waits, and is charged
        const auto t0 = std::chrono::steady_clock::now();
        dev_.copy_wait(ready_);
        copy_wait_ns_ += static_cast<uint64_t>(
            std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
    }
    const uint64_t v = submit(waits, unit_copy_pending_);
    in_unit_ = false;
    unit_copy_pending_ = false;
    ready_ = CopyFence{};
    return ComputeFence{v};
}

void VulkanBackend::end_step() {
    if (s_.recording()) submit({});
    const auto t0 = std::chrono::steady_clock::now();
    if (s_.last_submitted() != 0) s_.wait(s_.last_submitted());
    wait_ns_ += static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
    read_timestamps();
    submitted_.clear();
    seqs_.clear();
}

void VulkanBackend::abort_step() noexcept {
    s_.discard();
    try {
        if (s_.last_submitted() != 0) s_.wait(s_.last_submitted());
    } catch (...) {  // device lost: nothing more will run
    }
    seqs_.clear();
    submitted_.clear();
    cur_query_ = -1;
    in_unit_ = false;
    unit_copy_pending_ = false;
}

void VulkanBackend::embed(const WeightView& table, const int32_t* tokens, float* x) {
    const int64_t T = step_.n_tokens, dim = table.n_in;
    if (T == 0) return;
    HostSlice rows = host_take(static_cast<uint64_t>(T * dim) * 4);
    for (int64_t t = 0; t < T; t++) dequantize_row(table, tokens[t], reinterpret_cast<float*>(rows.p) + t * dim);
    recording();
    const VulkanDevice::Loc dst = dev_.locate(x);
    const VkBufferCopy region{rows.offset, dst.offset, static_cast<uint64_t>(T * dim) * 4};
    s_.copy(rows.buf, dst.buf, &region, 1);
}

void VulkanBackend::rmsnorm(const float* x, const float* weight, float eps, int64_t n_rows, int64_t dim, float* y) {
    recording();
    op_rmsnorm(s_, act(x, n_rows * dim), act(weight, dim), act(y, n_rows * dim), n_rows, dim, eps);
}

void VulkanBackend::matmul_many(const MatmulOut* outs, int n_outs, const float* x, int64_t n_rows) {
    recording();
    for (int j = 0; j < n_outs; j++) {
        const WeightView& w = outs[j].w;
        const Binding y = act(outs[j].y, n_rows * w.n_out);
        const Binding bias = outs[j].bias != nullptr ? act(outs[j].bias, w.n_out) : Binding{};
        op_matmul(s_, dev_, w.data, w.dtype, w.n_out, w.n_in, act(x, n_rows * w.n_in), y,
                  outs[j].bias != nullptr ? &bias : nullptr, n_rows);
    }
}

void VulkanBackend::rope(float* x, int n_heads, int head_dim, const float* inv_freq) {
    const int64_t T = step_.n_tokens;
    if (T == 0) return;
    const int half = head_dim / 2;
    auto it = rope_tables_.find({inv_freq, head_dim});
    if (it == rope_tables_.end()) {  // cos / sin of pos * inv_freq in f32, as the CPU reference
        HostSlice cs = host_take(static_cast<uint64_t>(2 * T * half) * 4);
        float* c = reinterpret_cast<float*>(cs.p);
        for (int64_t t = 0; t < T; t++)
            for (int i = 0; i < half; i++) {
                const float angle = static_cast<float>(pos_[static_cast<size_t>(t)]) * inv_freq[i];
                c[t * half + i] = std::cos(angle);
                c[T * half + t * half + i] = std::sin(angle);
            }
        it = rope_tables_.emplace(std::make_pair(inv_freq, head_dim), cs.b).first;
    }
    recording();
    op_rope(s_, act(x, T * n_heads * head_dim), it->second, T, n_heads, head_dim,
            static_cast<int64_t>(n_heads) * head_dim);
}

KvGeom VulkanBackend::kv_geom(int layer, const AttnParams* p) const {
    KvGeom g{};
    g.n_heads = p != nullptr ? p->n_heads : 1;
    g.n_kv_heads = p != nullptr ? p->n_kv_heads : 1;
    g.head_dim = p != nullptr ? p->head_dim : static_cast<int>(step_.kv.kv_dim);
    g.block_tokens = step_.kv.block_tokens;
    g.layer_off = static_cast<uint32_t>(layer * step_.kv.layer_stride);
    g.v_off = static_cast<uint32_t>(step_.kv.v_offset);
    g.f16 = step_.kv.f16;
    return g;
}

KvBindings VulkanBackend::kv_windows(int layer) const {
    const uint64_t tail = static_cast<uint64_t>(layer * step_.kv.layer_stride + step_.kv.v_offset +
                                                static_cast<int64_t>(step_.kv.block_tokens) * step_.kv.kv_dim) *
                          (step_.kv.f16 ? 2 : 4);
    KvBindings out;
    for (const KvWindow& w : kv_windows_) out.b[out.n++] = dev_.bind(w.lo, static_cast<uint64_t>(w.hi - w.lo) + tail);
    return out;
}

void VulkanBackend::kv_append(int layer, const float* k, const float* v) {
    const int64_t T = step_.n_tokens;
    if (T == 0 || kv_windows_.empty()) return;
    recording();
    const int64_t kvd = step_.kv.kv_dim;
    op_kv_store(s_, act(k, T * kvd), act(v, T * kvd), kv_windows(layer), dst_b_, T, kv_geom(layer, nullptr));
}

void VulkanBackend::attention(int layer, const float* q, const AttnParams& p, float* out) {
    const int64_t T = step_.n_tokens;
    if (T == 0) return;
    recording();
    const int64_t qd = static_cast<int64_t>(p.n_heads) * p.head_dim;
    KvGeom g = kv_geom(layer, &p);
    g.window = static_cast<uint32_t>(std::max<int64_t>(p.window, 0));
    op_attention(s_, act(q, T * qd), kv_windows(layer), tok_b_, tables_b_, act(out, T * qd), T, g, p.scale);
}

void VulkanBackend::silu_mul(const float* gate, const float* up, float* out, int64_t n) {
    recording();
    op_silu_mul(s_, act(gate, n), act(up, n), act(out, n), n);
}

void VulkanBackend::add(float* x, const float* y, int64_t n) {
    recording();
    op_add(s_, act(y, n), act(x, n), n);
}

void VulkanBackend::gelu_tanh_mul(const float* gate, const float* up, float* out, int64_t n) {
    recording();
    op_gelu_tanh_mul(s_, act(gate, n), act(up, n), act(out, n), n);
}

void VulkanBackend::softcap(float* x, int64_t n, float cap) {
    recording();
    op_softcap(s_, act(x, n), n, cap);
}

void VulkanBackend::scale(float* x, float s, int64_t n) {
    recording();
    op_scale(s_, act(x, n), n, s);
}

void VulkanBackend::gather_rows(const float* x, int64_t dim, float* rows) {
    recording();
    int64_t t_end = 0, r = 0;
    for (const StepSeq& s : seqs_) {
        t_end += s.n_tokens;
        if (!s.want_logits) continue;
        const VulkanDevice::Loc src = dev_.locate(x + (t_end - 1) * dim);
        const VulkanDevice::Loc dst = dev_.locate(rows + r * dim);
        const VkBufferCopy region{src.offset, dst.offset, static_cast<uint64_t>(dim) * 4};
        s_.copy(src.buf, dst.buf, &region, 1);
        r++;
    }
}

float* VulkanBackend::read_host(float* src, int64_t n) {
    const uint64_t bytes = static_cast<uint64_t>(std::max<int64_t>(n, 1)) * 4;
    if (readback_.n_bytes < bytes) {
        ctx_.free_host(readback_);
        readback_ = ctx_.alloc_host(bytes);
    }
    recording();
    const VulkanDevice::Loc loc = dev_.locate(src);
    const VkBufferCopy region{loc.offset, 0, static_cast<uint64_t>(n) * 4};
    s_.copy(loc.buf, readback_.buf, &region, 1);
    s_.barrier_to_host();
    const uint64_t v = submit({});
    const auto t0 = std::chrono::steady_clock::now();
    s_.wait(v);
    wait_ns_ += static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
    return reinterpret_cast<float*>(readback_.map);
}

}  // namespace lmx::vk
