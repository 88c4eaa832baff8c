// engine.h — the engine: models, the step thread, requests in, token events out.
// Owner: engine core. Public methods are thread-safe (called from Python threads
// with the GIL released); the step thread alone touches the scheduler, sequences,
// KV caches and workspaces. load_model runs on the caller's thread so loading
// never blocks serving; it hands the finished model to the step thread.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "footprint.h"
#include "forward.h"
#include "kv_cache.h"
#include "ledger.h"
#include "model.h"
#include "residency.h"
#include "sampler.h"
#include "scheduler.h"
#include "threadpool.h"
#include "trace.h"

namespace lmx {

// Raised by load_model when the model's bytes cannot be booked; the message
// carries the numbers (needed, headroom, cap). Nothing stays booked.
struct NoSpaceError : Error {
    using Error::Error;
};

// Every default below is THE default: Python reads it from the bound type (engine._core),
// the worker's settings take theirs from here. Enum values are CamelCase in C++ and
// lowercase in Python ("belady", "exact", "kv_exceeds_budget"), as in config files.
struct EngineConfig {
    uint64_t budget_bytes = 2ull << 30;  // the whole device; the ledger books at most cap_fraction of it
    double cap_fraction = 0.9;
    int n_threads = 0;       // 0: one per usable core
    int prefetch_depth = 2;  // layer copies the copy thread may run ahead of compute (0: load on demand)
    Eviction eviction = Eviction::Belady;
    int kv_block_tokens = 16;
    int max_batch_tokens = 512;
    int max_seqs_per_step = 64;
    double kv_reserve_fraction = 0.25;  // of the cap, kept free for KV when planning residency
    // exact: bitwise the same tokens on every ISA; fast: denser dot products where the CPU has
    // them (kernels.h). Carried by each model's weight views: per engine, never process-wide.
    MatmulPrecision matmul_precision = MatmulPrecision::Exact;
    // The device: "cpu" (the RAM arena and the SIMD kernels) or "vulkan" (GPU device_index;
    // engine/src/vulkan, docs/vulkan.md). Vulkan where none exists is an Error naming what was found.
    std::string device_kind = "cpu";
    int device_index = 0;
    // The CPU device's link model (device.h): every host->device copy takes at least bytes /
    // (link_gbps * 1e9 bytes/s), so the CPU reproduces a GPU's copy-to-compute ratio.
    // 0: unthrottled. The vulkan device ignores it (its link is real).
    double link_gbps = 0.0;
    // How KV pages hold K and V: "f16" (half the bytes: more sequences per budget; attention
    // widens each element to f32 exactly; logits within 5e-3 of f32 KV on every architecture,
    // tests/test_kv_f16.py), or "f32". Both devices (vulkan packs two halves a word).
    std::string kv_dtype = "f16";
    // Adaptive turns (turns.h): a model keeps the device for up to max_turn_steps steps while others
    // have work, streaming on its own slots or borrowing theirs, whichever copies fewer bytes per
    // token; a model with work waits at most (models with work - 1) * max_turn_steps steps, and a turn
    // ends once another model has waited max_wait_ms. 0: no turns (every step re-picks by stride,
    // streamed models keep their own slots: the fixed policy before turns).
    int max_turn_steps = 32;
    double max_wait_ms = 2000.0;
    // First tokens first (turns.h): while a model has requests that have not started, another model's
    // turn drains only if that (its copies over the link, its steps at its recent step time), plus the
    // wait so far, stays within first_token_ms; else the turn is its prefill steps only, and every model
    // gets its first tokens after one round. Lower: lower time to first token; higher: fewer copies
    // (each model of a prefill round copies its layers again to decode). 0: always first tokens first.
    double first_token_ms = 30.0;
};

enum class ResidencyMode : uint8_t { Auto = 0, Resident = 1, Streamed = 2, Swap = 3 };
const char* residency_mode_name(ResidencyMode m);

struct ModelLoadOptions {
    ResidencyMode residency = ResidencyMode::Auto;  // Swap: whole-model swapping, the benchmark baseline
    double sched_weight = 1.0;
    int max_running = 32;  // concurrent sequences of this model
    int stream_slots = 0;  // Streamed: layer slots; 0 = as the single-model plan gives (>= 2)
};

struct ModelInfo {
    std::string name;
    int id = -1;
    int n_layer = 0, n_vocab = 0, n_ctx = 0;
    DType weights = DType::F32;
    DType matrix_format = DType::F32;  // how the device holds the matrices: weights, or their x16 form under fast
    bool resident = false;
    int n_slots = 0;
    int n_units_loaded = 0;
    uint64_t weight_bytes = 0;         // all units
    uint64_t device_weight_bytes = 0;  // booked for weights (resident units or head + slots)
    uint64_t workspace_bytes = 0;
    ModelFootprint footprint;          // what each residency choice costs (footprint.h)
    double sched_weight = 1.0;
    int max_running = 0;
    int n_requests = 0;  // submitted and not finished (queued or running)
    std::vector<int32_t> eos_ids;
};

enum class EventKind : uint8_t { Token = 0, Done = 1, Error = 2 };
// Why a request ended (Done events); None on Token and Error events.
enum class FinishReason : uint8_t { None = 0, Stop = 1, Length = 2, Cancelled = 3 };
// Why a request failed (Error events); None on Token and Done events. The worker maps
// these to the wire protocol's codes in one table (worker/engine_driver.py).
enum class ErrorCode : uint8_t {
    None = 0,
    KvExceedsBudget = 1,  // its KV can never fit the device, even with every other request paused
    ModelUnloaded = 2,    // its model was unloaded while it was queued or running
    EngineFailure = 3,    // a step failed (e.g. a whole-model swap found no room); other requests go on
    Shutdown = 4,         // the engine shut down before it finished
};
const char* finish_reason_name(FinishReason r);
const char* error_code_name(ErrorCode c);

struct EngineEvent {
    int64_t req_id = 0;
    EventKind kind = EventKind::Token;
    int32_t token = -1;
    int32_t index = -1;  // generation index of token
    FinishReason finish_reason = FinishReason::None;
    ErrorCode error_code = ErrorCode::None;
    std::string message;  // Error: what happened, with the numbers
    int32_t prompt_tokens = 0;
    double prefill_ms = 0, decode_ms = 0;
    int32_t n_preempted = 0;
};

struct EngineStats {
    uint64_t n_steps = 0;
    uint64_t n_tokens_computed = 0;
    uint64_t n_tokens_generated = 0;
    uint64_t n_preemptions = 0;
    uint64_t n_turns = 0;         // adaptive turns begun (a new model, or a new turn of the same)
    uint64_t n_borrow_turns = 0;  // of which borrowed other models' slots
    double step_ms_total = 0;
    ResidencyStats residency;
};

// Liveness of the step thread. n_loops grows every time the thread goes round its loop (after
// a step, or a wait for KV, or before sleeping with nothing to do); busy says whether requests
// or commands are waiting on it. A thread that stays busy while n_loops stands still is stuck.
struct EngineHealth {
    uint64_t n_loops = 0;
    bool busy = false;
    double since_loop_s = 0;  // seconds since n_loops last grew
    // "" while the device computes; else why it cannot (a GPU lost, backend.h DeviceFaultError):
    // every request on it ends with an error until the engine is recreated (the worker restarted).
    std::string device_fault;
};

// How one model is placed by a residency plan.
struct ModelPlacement {
    std::string name;
    ResidencyMode residency = ResidencyMode::Resident;  // Resident or Streamed
    int n_slots = 0;                                    // Streamed: layer slots
    uint64_t device_bytes = 0;                          // weights on device + workspace
};

class Engine {
public:
    explicit Engine(const EngineConfig& cfg);
    ~Engine();
    Engine(const Engine&) = delete;
    Engine& operator=(const Engine&) = delete;

    // Loads spec's files and books its bytes (workspace, then resident units or head + slots).
    // Auto residency: the plan of this one model against the ledger's headroom now.
    ModelInfo load_model(const ModelSpec& spec, const ModelLoadOptions& opt, const LoadProgress& progress);
    void unload_model(const std::string& name);  // fails the model's requests, frees its bytes

    // What spec would cost on this engine (its config and thread count), from the file
    // headers alone: nothing is loaded or booked. Equal to what load_model books.
    ModelFootprint footprint(const ModelSpec& spec) const;
    // One plan for several models loaded together (footprint.h, plan_residency) against the
    // ledger's headroom now, keeping kv_reserve_fraction of the cap for KV. nullopt when even
    // every model's minimum does not fit.
    std::optional<std::vector<ModelPlacement>> plan_residency(const std::vector<ModelSpec>& specs) const;

    // Throws InvalidArgument (unknown model, empty or too long prompt, bad params, duplicate id).
    // Stop ids: params.stop_token_ids, plus the model's EOS ids unless params.ignore_eos.
    void submit(int64_t req_id, const std::string& model, std::vector<int32_t> prompt, SamplingParams params,
                bool capture_logits = false);
    void cancel(int64_t req_id);  // no-op when unknown or finished

    int event_fd() const { return event_fd_; }
    std::vector<EngineEvent> drain_events();
    std::vector<float> take_logits(int64_t req_id);  // of a capture_logits request, first sampled position

    // The ledger's figures plus, per model, the KV it could ever hold (tokens and blocks).
    LedgerSnapshot ledger() const;
    // One line naming the device (kind; for a GPU: name, driver, heap, transfer queue).
    std::string device_summary() const;
    std::vector<ModelInfo> models() const;
    uint64_t kv_bytes_for(const std::string& model, int64_t n_tokens) const;
    EngineStats stats() const;
    EngineHealth health() const;
    const EngineConfig& config() const { return cfg_; }
    int n_threads() const { return pool_.n_threads(); }
    void shutdown();

    // The step trace (trace.h): capacity > 0 records up to that many steps, copies and waits (each
    // kind; the oldest dropped beyond it), 0 stops; either discards what was recorded. Off by default.
    void trace_enable(size_t capacity) { tracer_.enable(capacity); }
    Trace trace_take() { return tracer_.take(); }

    // Test hook: while stalled, the step thread blocks at the top of its loop (requests queue,
    // health().n_loops stops growing). Lets tests see a stuck engine for real.
    void debug_stall(bool on);

private:
    struct ModelRt {
        int id;
        std::string name;
        std::shared_ptr<const ModelWeights> w;
        std::unique_ptr<KvCache> kv;
        DeviceBuffer ws_mem;
        Workspace ws;
        ModelLoadOptions opt;
        ModelFootprint footprint;
        double compute_ms_per_token = 0;  // step thread: recent compute per token (prefill chunk sizing)
        double compute_ms_per_step = 0;   // step thread: recent compute of one step (turn timing)
    };
    struct Command {
        enum Kind { Submit, Cancel, AddModel, RemoveModel } kind;
        std::unique_ptr<Sequence> seq;
        int64_t req_id = 0;
        int model = -1;
    };

    void step_main();
    void apply(Command& c);
    void run_plan(StepPlan& plan);
    std::vector<TurnModel> turn_view() const;  // every model's device side, for the turn policy
    void fail_plan(StepPlan& plan, const std::string& what);
    void fail_live(const std::string& what);  // the device failed: ends every live request with an error
    void note_loop();  // health: one more pass of the step loop  // ends the plan's live sequences with an error
    void finish(Sequence* s, EventKind kind, FinishReason reason, ErrorCode code = ErrorCode::None,
                const std::string& message = {});
    void emit(EngineEvent ev);
    ModelInfo info_locked(const ModelRt& m) const;

    EngineConfig cfg_;
    Ledger ledger_;
    Backend& backend_;  // the device's compute face (forward_step runs on it)
    ThreadPool& pool_;  // the backend's host pool: sampling
    Tracer tracer_;  // before residency_, which records into it from its copy thread
    Residency residency_;
    Scheduler scheduler_;  // step thread only
    double link_bytes_per_ms_ = 0;  // step thread: the link as the last step saw it (turn timing)
    int event_fd_ = -1;

    mutable std::mutex mu_;
    std::condition_variable cv_;
    std::deque<Command> inbox_;
    std::map<std::string, std::shared_ptr<ModelRt>> models_;  // by name
    std::map<int, std::shared_ptr<ModelRt>> by_id_;
    int next_model_id_ = 0;
    std::unordered_map<int64_t, int> live_ids_;  // req_id -> model id, submitted and not finished
    std::map<std::string, int> loading_;         // names being loaded
    bool stop_ = false;

    std::mutex ev_mu_;
    std::vector<EngineEvent> events_;
    std::unordered_map<int64_t, std::vector<float>> captured_;

    // step thread state
    std::unordered_map<int64_t, std::unique_ptr<Sequence>> seqs_;
    std::vector<SamplerScratch> scratch_;
    EngineStats stats_;
    mutable std::mutex stats_mu_;

    std::mutex unload_mu_;
    std::condition_variable unload_cv_;
    std::vector<int> removed_;  // model ids whose removal the step thread finished

    // health (written by the step thread, read by anyone)
    std::atomic<uint64_t> n_loops_{0};
    std::atomic<int64_t> last_loop_ticks_{0};  // steady_clock ticks
    bool stalled_ = false;                  // debug_stall; guarded by mu_
    std::string device_fault_;              // health().device_fault; guarded by mu_

    std::thread step_thread_;
};

}  // namespace lmx
