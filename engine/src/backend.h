// backend.h — the compute face of a device: the ops of the forward pass, run on device memory.
// Owner: engine core. This is the seam every device implements (backend_cpu.h, vulkan/): an
// op added here is added to every backend in the same change (docs/engine.md, "Adding an op").
// Thread-safety: a Backend is driven by ONE thread at a time, the engine's step thread;
// host_pool() is that thread's to use between steps (sampling).
//
// Shape of a step (forward.cpp is the only caller):
//
//   begin_step(desc)                      the step's sequences, positions, KV block tables
//   embed(...)                            host table -> residual stream
//   for each unit (layer, then the head):
//     begin_unit(copy fence of the unit)  ops below read the unit only after its copy landed
//     rmsnorm / matmul_many / rope / kv_append / attention / silu_mul / add / gather_rows
//     end_unit() -> compute fence         submitted; the unit's slot may be refilled after it
//   read_host(logits) -> host pointer     waits for the step's work; valid until next begin_step
//   end_step()                            every op of the step finished
//
// A backend may run each op as it is called (the CPU) or record the ops of a unit into one
// command buffer and submit it at end_unit (a GPU). Either way the ops of one backend run in
// call order: an op sees every earlier op's writes. On an exception anywhere in a step the
// caller calls abort_step(), which drops recorded, unsubmitted work and waits for submitted
// work, so nothing reads a slot or a KV block after the step returns. end_unit either submits
// and returns a fence or throws having submitted nothing.
//
// Addresses. Every float* / const void* below is a device address handed out by the
// device's arena (weights in units, workspace buffers, KV blocks), unless marked "host".
// The CPU dereferences them; a GPU translates them to (buffer, offset). All activations
// are f32, row-major, one row per token of the step in item order.
#pragma once

#include <cstdint>

#include "device.h"
#include "kernels/kernels.h"

namespace lmx {

class ThreadPool;

// How a KV block lays out its layers: a block of the step's tables holds block_tokens
// positions of every layer; layer l's K rows start layer_stride floats after layer l-1's,
// its V rows v_offset elements after its K rows; a row is kv_dim elements. An element is an
// f32, or an f16 when f16 is set (EngineConfig.kv_dtype; a backend that cannot read f16 pages
// refuses the setting when the engine is made).
struct KvGeometry {
    int block_tokens = 0;
    int64_t kv_dim = 0;
    int64_t layer_stride = 0;  // elements
    int64_t v_offset = 0;      // elements
    bool f16 = false;
    int n_layer = 0;           // a block holds n_layer * layer_stride elements
};

// A device that can no longer compute (a GPU lost: reset, driver crash). Thrown by a step; every
// later step on that device throws it too. The engine ends every live request on it (not only the
// step's) with an error and reports the fault in its health (engine.h); only a new engine (a
// restarted worker) computes again.
struct DeviceFaultError : Error {
    using Error::Error;
};

// One sequence's part of a step: a prefill chunk or its one decode token.
struct StepSeq {
    int32_t n_tokens = 0;
    int64_t pos0 = 0;                         // position of its first token
    float* const* kv_blocks = nullptr;  // host array [n_blocks] of device addresses (block starts)
    int32_t n_blocks = 0;                     // covers pos0 + n_tokens positions
    bool want_logits = false;                 // its last token's hidden state gets logits
};

struct StepDesc {
    const StepSeq* seqs = nullptr;  // host, [n_seqs]; valid until end_step / abort_step
    int n_seqs = 0;
    int64_t n_tokens = 0;           // sum of seqs[i].n_tokens
    int64_t n_logit_rows = 0;       // count of seqs[i].want_logits
    KvGeometry kv;
    float* scratch = nullptr;       // the workspace's scratch: scratch_lanes() lanes
    int64_t scratch_lane_floats = 0;  // of scratch_lane_floats floats each
};

struct AttnParams {
    int n_heads = 0;
    int n_kv_heads = 0;  // query head h reads KV head h / (n_heads / n_kv_heads)
    int head_dim = 0;
    float scale = 1.0f;  // applied to q.k before the softmax
    int64_t window = 0;  // > 0: a query at position p sees keys p - window + 1 .. p only (sliding-window layer)
};

class Backend {
public:
    virtual ~Backend() = default;
    virtual const char* name() const = 0;

    // Host threads for the engine's host-side work of a step (sampling). The CPU backend
    // lends its kernel pool (it is idle then); a GPU backend keeps a small one.
    virtual ThreadPool& host_pool() = 0;
    // Scratch lanes the workspace carves for this backend (StepDesc::scratch): the CPU
    // uses one per thread for attention scores; a GPU needs none.
    virtual int scratch_lanes() const = 0;
    // Time compute waited for host->device copies so far, as the device itself measures it (a
    // GPU's waits happen on the device, behind semaphores; vulkan/vk_backend.h). False where
    // Residency's own count is the truth (the CPU: its step thread is what waits). Any thread.
    virtual bool device_copy_wait_ns(uint64_t* ns) const {
        (void)ns;
        return false;
    }

    // ---- step bracketing ----
    virtual void begin_step(const StepDesc& step) = 0;
    // The ops until end_unit read a unit whose copy completes at `ready` (Residency gives it).
    virtual void begin_unit(CopyFence ready) = 0;
    // Submits the unit's ops; the fence completes when they have finished reading the unit.
    virtual ComputeFence end_unit() = 0;
    virtual void end_step() = 0;
    virtual void abort_step() noexcept = 0;

    // ---- ops ----
    // x[t, :] = row tokens[t] of table, dequantised; t over the step's tokens.
    // table: host memory (the model's embedding stays on the host); tokens: host, [n_tokens].
    virtual void embed(const WeightView& table, const int32_t* tokens, float* x) = 0;
    // y[t, :] = x[t, :] / sqrt(mean(x[t, :]^2) + eps) * weight   (x may alias y)
    virtual void rmsnorm(const float* x, const float* weight, float eps, int64_t n_rows, int64_t dim, float* y) = 0;
    // outs[j].y = x outs[j].w^T (+ outs[j].bias): 1..4 weights of the same n_in, format and
    // precision sharing one read of x [n_rows, n_in] (kernels.h's matmul_many contract,
    // batch invariance included: a row's result does not depend on n_rows).
    virtual void matmul_many(const MatmulOut* outs, int n_outs, const float* x, int64_t n_rows) = 0;
    // Rotates x [n_tokens, n_heads, head_dim] in place, token t at its step position
    // (rotate_half layout, angle = pos * inv_freq[i]). inv_freq: host, [head_dim / 2].
    virtual void rope(float* x, int n_heads, int head_dim, const float* inv_freq) = 0;
    // Writes the step's K and V rows ([n_tokens, kv_dim] each) of layer `layer` into the
    // sequences' KV blocks at their positions.
    virtual void kv_append(int layer, const float* k, const float* v) = 0;
    // Causal attention of the step's queries q [n_tokens, n_heads * head_dim] over the paged
    // KV of layer `layer` (every position up to each query's own, this step's included):
    // out [n_tokens, n_heads * head_dim].
    virtual void attention(int layer, const float* q, const AttnParams& p, float* out) = 0;
    // out[i] = silu(gate[i]) * up[i]   (out may alias gate)
    virtual void silu_mul(const float* gate, const float* up, float* out, int64_t n) = 0;
    // x[i] += y[i]
    virtual void add(float* x, const float* y, int64_t n) = 0;
    // Gemma 3's ops. A backend without them still builds and refuses such a model when it runs.
    // out[i] = gelu_tanh(gate[i]) * up[i]   (out may alias gate; kernels.h gelu_tanh_mul)
    virtual void gelu_tanh_mul(const float* gate, const float* up, float* out, int64_t n) {
        unsupported("gelu_tanh_mul");
    }
    // x[i] = cap * tanh(x[i] / cap)   (final logit soft-capping)
    virtual void softcap(float* x, int64_t n, float cap) { unsupported("softcap"); }
    // x[i] *= s   (the scaled embedding)
    virtual void scale(float* x, float s, int64_t n) { unsupported("scale"); }
    // rows[r, :] = x[last token of the r-th sequence with want_logits, :]; rows [n_logit_rows, dim].
    virtual void gather_rows(const float* x, int64_t dim, float* rows) = 0;
    // A host pointer to n floats equal to src's, after every op of the step so far finished.
    // The caller may write to it (sampling works in place); valid until the next begin_step.
    // The CPU returns src itself.
    virtual float* read_host(float* src, int64_t n) = 0;

protected:
    [[noreturn]] void unsupported(const char* op) const {
        throw UnsupportedError(std::string("the ") + name() + " backend has no " + op +
                               " op (Gemma 3 needs it); load this model on the CPU device");
    }
};

}  // namespace lmx
