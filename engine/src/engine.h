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
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "forward.h"
#include "kv_cache.h"
#include "ledger.h"
#include "model.h"
#include "residency.h"
#include "sampler.h"
#include "scheduler.h"
#include "threadpool.h"

namespace lmx {

// Raised by load_model when the model's bytes cannot be booked; the message
// carries the numbers (needed, headroom, cap). Nothing stays booked.
struct NoSpaceError : Error {
    using Error::Error;
};

struct EngineConfig {
    uint64_t budget_bytes = 1ull << 30;
    double cap_fraction = 0.9;
    int n_threads = 0;  // 0: all cores
    int prefetch_depth = 2;
    std::string eviction = "belady";
    int kv_block_tokens = 16;
    int max_batch_tokens = 512;
    int max_seqs_per_step = 64;
    double kv_reserve_fraction = 0.25;  // of the cap, kept free for KV when deciding residency
    // "exact" (bitwise the same on every ISA) or "fast" (denser dot products where the CPU has
    // them; see kernels.h). Process-wide: the last engine constructed decides.
    std::string matmul_precision = "exact";
};

struct ModelLoadOptions {
    std::string residency = "auto";  // auto | resident | streamed | swap (whole-model swapping baseline)
    double sched_weight = 1.0;
    int max_running = 64;
    int stream_slots = 0;  // 0: as many as fit next to the KV reserve (>= prefetch_depth + 1)
};

struct ModelInfo {
    std::string name;
    int id = -1;
    int n_layer = 0, n_vocab = 0, n_ctx = 0;
    std::string weights;
    std::string matrix_format;  // how the device holds the matrices: weights, or its x16 form under fast precision
    bool resident = false;
    int n_slots = 0;
    int n_units_loaded = 0;
    uint64_t weight_bytes = 0;      // all units
    uint64_t device_weight_bytes = 0;  // booked for weights (resident units or slots)
    uint64_t workspace_bytes = 0;
    uint64_t kv_bytes_per_token = 0;
    uint64_t kv_block_bytes = 0;
    double sched_weight = 1.0;
    int max_running = 0;
    int n_requests = 0;  // submitted and not finished (queued or running)
    std::vector<int32_t> eos_ids;
};

enum class EventKind : int32_t { Token = 0, Done = 1, Error = 2 };

struct EngineEvent {
    int64_t req_id = 0;
    EventKind kind = EventKind::Token;
    int32_t token = -1;
    int32_t index = -1;       // generation index of token
    std::string detail;       // finish_reason ("stop" | "length" | "cancelled") or error message
    int32_t prompt_tokens = 0;
    double prefill_ms = 0, decode_ms = 0;
    int32_t n_preempted = 0;
};

struct EngineStats {
    uint64_t n_steps = 0;
    uint64_t n_tokens_computed = 0;
    uint64_t n_tokens_generated = 0;
    uint64_t n_preemptions = 0;
    double step_ms_total = 0;
    ResidencyStats residency;
};

class Engine {
public:
    explicit Engine(const EngineConfig& cfg);
    ~Engine();
    Engine(const Engine&) = delete;
    Engine& operator=(const Engine&) = delete;

    ModelInfo load_model(const ModelSpec& spec, const ModelLoadOptions& opt, const LoadProgress& progress);
    void unload_model(const std::string& name);  // fails the model's requests, frees its bytes

    // Throws InvalidArgument (unknown model, empty or too long prompt, bad params, duplicate id).
    // ignore_eos: no stop ids beyond params.stop_token_ids (otherwise the model's EOS ids are added when it is empty).
    void submit(int64_t req_id, const std::string& model, std::vector<int32_t> prompt, SamplingParams params,
                bool capture_logits, bool ignore_eos = false);
    void cancel(int64_t req_id);  // no-op when unknown or finished

    int event_fd() const { return event_fd_; }
    std::vector<EngineEvent> drain_events();
    std::vector<float> take_logits(int64_t req_id);  // of a capture_logits request, first sampled position

    LedgerSnapshot ledger() const { return ledger_.snapshot(); }
    std::vector<ModelInfo> models() const;
    uint64_t kv_bytes_for(const std::string& model, int64_t n_tokens) const;
    EngineStats stats() const;
    const EngineConfig& config() const { return cfg_; }
    int n_threads() const { return pool_.n_threads(); }
    void shutdown();

private:
    struct ModelRt {
        int id;
        std::string name;
        std::shared_ptr<const ModelWeights> w;
        std::unique_ptr<KvCache> kv;
        DeviceBuffer ws_mem;
        Workspace ws;
        ModelLoadOptions opt;
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
    void fail_plan(StepPlan& plan, const std::string& what);  // ends the plan's live sequences with an error
    void finish(Sequence* s, EventKind kind, const std::string& detail);
    void emit(EngineEvent ev);
    ModelInfo info_locked(const ModelRt& m) const;

    EngineConfig cfg_;
    Ledger ledger_;
    Backend& backend_;  // the device's compute face (forward_step runs on it)
    ThreadPool& pool_;  // the backend's host pool: sampling
    Residency residency_;
    Scheduler scheduler_;  // step thread only
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

    std::thread step_thread_;
};

}  // namespace lmx
