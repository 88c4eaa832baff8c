// engine.cpp — model loading, the command inbox, the step loop, sampling and events.
// Owner: engine core. Thread-safety: see engine.h. Lock order: mu_ before ev_mu_;
// the step thread never holds mu_ while computing.
#include "engine.h"
#include "kernels/kernels.h"
#include "vulkan/vk_probe.h"

#include <sched.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cmath>
#include <fstream>

#include <algorithm>
#include <unordered_set>
#include <cassert>
#include <cerrno>
#include <cstring>

namespace lmx {

const char* residency_mode_name(ResidencyMode m) {
    switch (m) {
        case ResidencyMode::Auto: return "auto";
        case ResidencyMode::Resident: return "resident";
        case ResidencyMode::Streamed: return "streamed";
        case ResidencyMode::Swap: break;
    }
    return "swap";
}

const char* finish_reason_name(FinishReason r) {
    switch (r) {
        case FinishReason::None: return "none";
        case FinishReason::Stop: return "stop";
        case FinishReason::Length: return "length";
        case FinishReason::Cancelled: break;
    }
    return "cancelled";
}

const char* error_code_name(ErrorCode c) {
    switch (c) {
        case ErrorCode::None: return "none";
        case ErrorCode::KvExceedsBudget: return "kv_exceeds_budget";
        case ErrorCode::ModelUnloaded: return "model_unloaded";
        case ErrorCode::EngineFailure: return "engine_failure";
        case ErrorCode::Shutdown: break;
    }
    return "shutdown";
}

namespace {
double ms_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}
std::string mib(uint64_t n) { return std::to_string(n / (1024 * 1024)) + " MiB (" + std::to_string(n) + " bytes)"; }

// Cores this process may really use: its CPU affinity, further limited by a
// cgroup v2 CPU quota (containers), so n_threads = 0 never oversubscribes.
int usable_cores() {
    int n = static_cast<int>(std::thread::hardware_concurrency());
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) n = CPU_COUNT(&set);
    std::ifstream f("/sys/fs/cgroup/cpu.max");
    std::string quota;
    double period = 0;
    if (f >> quota >> period && quota != "max" && period > 0) {
        const int limit = static_cast<int>(std::ceil(std::stod(quota) / period));
        if (limit >= 1 && limit < n) n = limit;
    }
    return std::max(1, n);
}
}  // namespace

// The device EngineConfig names (engine.h: device_kind, device_index).
static std::unique_ptr<Device> make_device(const EngineConfig& cfg) {
    if (cfg.kv_dtype != "f32" && cfg.kv_dtype != "f16")
        throw InvalidArgument("kv_dtype: expected \"f32\" or \"f16\", found \"" + cfg.kv_dtype + "\"");
    if (cfg.device_kind == "cpu")
        return std::make_unique<CpuDevice>(cfg.budget_bytes, cfg.n_threads > 0 ? cfg.n_threads : usable_cores(),
                                           cfg.link_gbps);
    if (cfg.device_kind == "vulkan") {
        if (cfg.matmul_precision != MatmulPrecision::Exact)
            throw InvalidArgument("matmul_precision: the vulkan device runs exact only, found fast (a CPU option)");
        return make_vulkan_device(cfg.device_index, cfg.budget_bytes);
    }
    throw InvalidArgument("device kind: expected \"cpu\" or \"vulkan\", found \"" + cfg.device_kind + "\"");
}

Engine::Engine(const EngineConfig& cfg)
    : cfg_(cfg),
      ledger_(make_device(cfg), cfg.cap_fraction),
      backend_(ledger_.device().backend()),
      pool_(backend_.host_pool()),
      residency_(ledger_, cfg.prefetch_depth, cfg.eviction, &tracer_),
      scheduler_(cfg.max_batch_tokens, cfg.max_seqs_per_step) {
    if (cfg.kv_block_tokens < 1)
        throw InvalidArgument("kv_block_tokens: expected >= 1, found " + std::to_string(cfg.kv_block_tokens));
    if (cfg.prefetch_depth < 0)
        throw InvalidArgument("prefetch_depth: expected >= 0, found " + std::to_string(cfg.prefetch_depth));
    scheduler_.set_turns(TurnConfig{cfg.max_turn_steps, cfg.max_wait_ms, cfg.prefetch_depth, cfg.first_token_ms,
                                    ledger_.device().copies_beside_compute()});
    if (!(cfg.kv_reserve_fraction >= 0.0 && cfg.kv_reserve_fraction < 1.0))
        throw InvalidArgument("kv_reserve_fraction: expected a value in [0, 1), found " +
                              std::to_string(cfg.kv_reserve_fraction));
    event_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (event_fd_ < 0) throw Error(std::string("eventfd: ") + std::strerror(errno));
    scratch_.resize(static_cast<size_t>(pool_.n_threads()));
    last_loop_ticks_ = std::chrono::steady_clock::now().time_since_epoch().count();
    step_thread_ = std::thread([this] { step_main(); });
}

Engine::~Engine() {
    shutdown();
    // Sequences and models go before the residency and ledger members do.
    for (auto& kv : by_id_) {
        ledger_.free(kv.second->ws_mem);
        kv.second->kv.reset();
        residency_.remove_model(kv.second->id);
    }
    if (event_fd_ >= 0) close(event_fd_);
}

void Engine::shutdown() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        if (stop_ && !step_thread_.joinable()) return;
        stop_ = true;
    }
    cv_.notify_all();
    if (step_thread_.joinable()) step_thread_.join();
}

// ---- loading (caller's thread) ----

ModelInfo Engine::load_model(const ModelSpec& spec, const ModelLoadOptions& opt, const LoadProgress& progress) {
    if (!(opt.sched_weight > 0)) throw InvalidArgument("sched_weight: expected > 0, found " + std::to_string(opt.sched_weight));
    if (opt.max_running < 1) throw InvalidArgument("max_running: expected >= 1, found " + std::to_string(opt.max_running));
    {
        std::lock_guard<std::mutex> lk(mu_);
        if (stop_) throw Error("engine is shut down");
        if (models_.count(spec.name) != 0 || loading_.count(spec.name) != 0)
            throw InvalidArgument("model '" + spec.name + "' is already loaded; unload it first or choose another name");
        loading_[spec.name] = 1;
    }
    struct Unmark {
        Engine* e;
        std::string name;
        ~Unmark() {
            std::lock_guard<std::mutex> lk(e->mu_);
            e->loading_.erase(name);
        }
    } unmark{this, spec.name};

    // This engine's matmul precision; under fast, q8_0 / q4_0 matrices load repacked (x16).
    ModelSpec load_spec = spec;
    load_spec.matmul_precision = cfg_.matmul_precision;
    auto w = std::make_shared<const ModelWeights>(load_spec, progress);
    auto m = std::make_shared<ModelRt>();
    m->name = spec.name;
    m->w = w;
    m->opt = opt;
    {
        std::lock_guard<std::mutex> lk(mu_);
        m->id = next_model_id_++;
    }
    // Auto residency: the one-model plan (footprint.h) against the headroom now.
    m->footprint = model_footprint(load_spec, cfg_, backend_.scratch_lanes());
    const ModelFootprint& fp = m->footprint;
    const int n_layer = spec.n_layer;
    const uint64_t cap = ledger_.cap_bytes();
    const uint64_t headroom = ledger_.headroom_bytes();
    const uint64_t ws_bytes = fp.workspace_bytes;
    const uint64_t kv_room = static_cast<uint64_t>(static_cast<double>(cap) * cfg_.kv_reserve_fraction);
    const auto plan = plan_slots({fp}, {spec.name}, headroom, kv_room);
    const int given = plan ? plan->front() : kMinSlots;  // minimums short: the booking below says so
    bool resident = opt.residency == ResidencyMode::Resident || (opt.residency == ResidencyMode::Auto && given >= n_layer);
    int n_slots = 0;
    if (!resident) n_slots = opt.stream_slots > 0 ? opt.stream_slots : std::min(given, n_layer - 1);
    if (!resident) n_slots = std::max(1, std::min(n_slots, n_layer));
    const uint64_t weight_need = resident ? fp.weight_bytes() : fp.head_bytes + static_cast<uint64_t>(n_slots) * fp.layer_bytes;
    m->ws_mem = ledger_.alloc(spec.name, BookKind::Workspace, ws_bytes);
    if (m->ws_mem && opt.residency == ResidencyMode::Swap) {
        if (w->total_unit_bytes() > headroom - std::min(headroom, ws_bytes)) {
            ledger_.free(m->ws_mem);
            throw NoSpaceError("cannot load model '" + spec.name + "' for whole-model swapping: its weights need " +
                               mib(w->total_unit_bytes()) + " but only " + mib(headroom) + " are free");
        }
        residency_.add_swap_model(m->id, w, spec.name);
    } else if (!m->ws_mem || !residency_.add_model(m->id, w, spec.name, resident, n_slots)) {
        ledger_.free(m->ws_mem);
        const std::string refused = vulkan_alloc_failure(ledger_.device());  // the GPU said no, not the ledger
        if (!refused.empty())
            throw NoSpaceError("cannot load model '" + spec.name + "': it needs " + mib(weight_need + ws_bytes) +
                               " of device memory and the ledger has " + mib(headroom) + " free, but " + refused);
        throw NoSpaceError("cannot load model '" + spec.name + "': it needs " + mib(weight_need + ws_bytes) + " of device memory (" +
                           (resident ? std::string("all weights resident") : std::to_string(n_slots) + " layer slots") +
                           " + workspace) but the ledger has " + mib(headroom) + " free under its cap of " + mib(cap) +
                           "; raise the device budget, unload a model, or choose streamed residency / smaller weights");
    }
    const int max_rows = std::min(cfg_.max_seqs_per_step, cfg_.max_batch_tokens);
    workspace_init(m->ws, m->ws_mem.ptr, spec, cfg_.max_batch_tokens, max_rows, backend_.scratch_lanes());
    m->kv = std::make_unique<KvCache>(ledger_, spec.name, spec.n_layer, spec.kv_dim(), cfg_.kv_block_tokens,
                                      kv_elem_bytes(cfg_));
    {
        std::lock_guard<std::mutex> lk(mu_);
        models_[spec.name] = m;
        by_id_[m->id] = m;
        Command c{Command::AddModel, nullptr, 0, m->id};
        inbox_.push_back(std::move(c));
    }
    cv_.notify_all();
    std::lock_guard<std::mutex> lk(mu_);
    return info_locked(*m);
}

void Engine::unload_model(const std::string& name) {
    int id;
    {
        std::lock_guard<std::mutex> lk(mu_);
        auto it = models_.find(name);
        if (it == models_.end()) throw InvalidArgument("unload_model: no model named '" + name + "' is loaded");
        id = it->second->id;
        models_.erase(it);
        inbox_.push_back(Command{Command::RemoveModel, nullptr, 0, id});
    }
    cv_.notify_all();
    std::unique_lock<std::mutex> lk(unload_mu_);
    unload_cv_.wait(lk, [&] { return std::find(removed_.begin(), removed_.end(), id) != removed_.end(); });
}

// ---- requests ----

void Engine::submit(int64_t req_id, const std::string& model, std::vector<int32_t> prompt, SamplingParams params,
                    bool capture_logits) {
    std::shared_ptr<ModelRt> m;
    {
        std::lock_guard<std::mutex> lk(mu_);
        auto it = models_.find(model);
        if (it == models_.end()) throw InvalidArgument("model: no model named '" + model + "' is loaded");
        m = it->second;
        if (live_ids_.count(req_id) != 0)
            throw InvalidArgument("request id " + std::to_string(req_id) + " is already running; ids must be unique");
    }
    const ModelSpec& s = m->w->spec();
    if (prompt.empty()) throw InvalidArgument("prompt: expected at least one token, found none");
    for (int32_t t : prompt)
        if (t < 0 || t >= s.n_vocab)
            throw InvalidArgument("prompt: token id " + std::to_string(t) + " is outside the vocabulary [0, " +
                                  std::to_string(s.n_vocab) + ")");
    if (static_cast<int64_t>(prompt.size()) >= s.n_ctx)
        throw InvalidArgument("prompt: " + std::to_string(prompt.size()) + " tokens leave no room in the context of " +
                              std::to_string(s.n_ctx) + " tokens");
    sampling_params_validate(params, s.n_vocab);
    if (!params.ignore_eos)
        for (int32_t id : s.eos_ids)
            if (std::find(params.stop_token_ids.begin(), params.stop_token_ids.end(), id) == params.stop_token_ids.end())
                params.stop_token_ids.push_back(id);

    auto seq = std::make_unique<Sequence>();
    seq->id = req_id;
    seq->model = m->id;
    seq->n_prompt = static_cast<int32_t>(prompt.size());
    seq->tokens = std::move(prompt);
    seq->params = std::move(params);
    seq->capture_logits = capture_logits;
    seq->t_submit = std::chrono::steady_clock::now();
    {
        std::lock_guard<std::mutex> lk(mu_);
        if (stop_) throw Error("engine is shut down");
        live_ids_[req_id] = m->id;
        inbox_.push_back(Command{Command::Submit, std::move(seq), req_id, m->id});
    }
    cv_.notify_all();
}

void Engine::cancel(int64_t req_id) {
    {
        std::lock_guard<std::mutex> lk(mu_);
        if (live_ids_.count(req_id) == 0) return;
        inbox_.push_back(Command{Command::Cancel, nullptr, req_id, -1});
    }
    cv_.notify_all();
}

void Engine::emit(EngineEvent ev) {
    std::lock_guard<std::mutex> lk(ev_mu_);
    const bool was_empty = events_.empty();
    events_.push_back(std::move(ev));
    if (was_empty) {
        const uint64_t one = 1;
        ssize_t r = write(event_fd_, &one, sizeof one);
        (void)r;  // EAGAIN only when the counter is saturated: the fd is readable anyway
    }
}

std::vector<EngineEvent> Engine::drain_events() {
    std::vector<EngineEvent> out;
    std::lock_guard<std::mutex> lk(ev_mu_);
    uint64_t n;
    ssize_t r = read(event_fd_, &n, sizeof n);
    (void)r;
    out.swap(events_);
    return out;
}

std::vector<float> Engine::take_logits(int64_t req_id) {
    std::lock_guard<std::mutex> lk(ev_mu_);
    auto it = captured_.find(req_id);
    if (it == captured_.end()) return {};
    std::vector<float> out = std::move(it->second);
    captured_.erase(it);
    return out;
}

// ---- introspection ----

ModelInfo Engine::info_locked(const ModelRt& m) const {
    const ModelSpec& s = m.w->spec();
    ModelInfo i;
    i.name = m.name;
    i.id = m.id;
    i.n_layer = s.n_layer;
    i.n_vocab = s.n_vocab;
    i.n_ctx = s.n_ctx;
    i.weights = m.w->dtype();
    i.matrix_format = m.w->matrix_dtype();
    const ModelResidency r = residency_.model_info(m.id);
    i.resident = r.resident;
    i.n_slots = r.n_slots;
    i.n_units_loaded = r.n_units_loaded;
    i.weight_bytes = m.w->total_unit_bytes();
    i.device_weight_bytes = r.resident ? m.w->total_unit_bytes()
                                       : m.w->unit(s.n_layer).n_bytes + static_cast<uint64_t>(r.n_slots) * r.slot_bytes;
    i.workspace_bytes = m.ws_mem.n_bytes;
    i.footprint = m.footprint;
    i.sched_weight = m.opt.sched_weight;
    i.max_running = m.opt.max_running;
    i.eos_ids = s.eos_ids;
    for (const auto& kv : live_ids_)
        if (kv.second == m.id) i.n_requests++;
    return i;
}

std::vector<ModelInfo> Engine::models() const {
    std::lock_guard<std::mutex> lk(mu_);
    std::vector<ModelInfo> out;
    for (const auto& kv : models_) out.push_back(info_locked(*kv.second));
    return out;
}

ModelFootprint Engine::footprint(const ModelSpec& spec) const {
    return model_footprint(spec, cfg_, backend_.scratch_lanes());
}

std::optional<std::vector<ModelPlacement>> Engine::plan_residency(const std::vector<ModelSpec>& specs) const {
    std::vector<ModelFootprint> fps;
    std::vector<std::string> names;
    for (const ModelSpec& spec : specs) {
        fps.push_back(footprint(spec));
        names.push_back(spec.name);
    }
    const uint64_t kv_room = static_cast<uint64_t>(static_cast<double>(ledger_.cap_bytes()) * cfg_.kv_reserve_fraction);
    const auto slots = plan_slots(fps, names, ledger_.headroom_bytes(), kv_room);
    if (!slots) return std::nullopt;
    std::vector<ModelPlacement> out;
    for (size_t i = 0; i < specs.size(); i++) {
        ModelPlacement p;
        p.name = names[i];
        const int n = (*slots)[i];
        p.residency = n >= fps[i].n_layer ? ResidencyMode::Resident : ResidencyMode::Streamed;
        p.n_slots = p.residency == ResidencyMode::Resident ? 0 : n;
        p.device_bytes = fps[i].device_bytes(n);
        out.push_back(std::move(p));
    }
    return out;
}

std::string Engine::device_summary() const {
    Device& d = const_cast<Ledger&>(ledger_).device();
    const std::string gpu = vulkan_device_summary(d);
    return std::string(d.name()) + (gpu.empty() ? "" : ": " + gpu);
}

LedgerSnapshot Engine::ledger() const {
    LedgerSnapshot snap = ledger_.snapshot();
    std::lock_guard<std::mutex> lk(mu_);
    for (const auto& kv : models_) {
        const ModelFootprint& f = kv.second->footprint;
        const uint64_t blocks = f.kv_block_bytes > 0 ? snap.kv_capacity_bytes / f.kv_block_bytes : 0;
        OwnerUsage& o = snap.owners[kv.first];
        o.kv_capacity_blocks = blocks;
        o.kv_capacity_tokens = blocks * static_cast<uint64_t>(f.kv_block_tokens);
    }
    return snap;
}

EngineHealth Engine::health() const {
    EngineHealth h;
    h.n_loops = n_loops_.load();
    {
        std::lock_guard<std::mutex> lk(mu_);
        h.busy = !live_ids_.empty() || !inbox_.empty();
        h.device_fault = device_fault_;
    }
    const std::chrono::steady_clock::duration since(std::chrono::steady_clock::now().time_since_epoch().count() -
                                                     last_loop_ticks_.load());
    h.since_loop_s = std::chrono::duration<double>(since).count();
    return h;
}

void Engine::debug_stall(bool on) {
    {
        std::lock_guard<std::mutex> lk(mu_);
        stalled_ = on;
    }
    cv_.notify_all();
}

void Engine::note_loop() {
    last_loop_ticks_ = std::chrono::steady_clock::now().time_since_epoch().count();
    n_loops_++;
}

uint64_t Engine::kv_bytes_for(const std::string& model, int64_t n_tokens) const {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = models_.find(model);
    if (it == models_.end()) throw InvalidArgument("model: no model named '" + model + "' is loaded");
    return it->second->kv->bytes_for(n_tokens);
}

EngineStats Engine::stats() const {
    std::lock_guard<std::mutex> lk(stats_mu_);
    EngineStats s = stats_;
    s.residency = residency_.stats();
    uint64_t device_wait_ns = 0;  // a GPU measures compute's wait for copies itself
    if (backend_.device_copy_wait_ns(&device_wait_ns)) s.residency.wait_ns = device_wait_ns;
    return s;
}

// ---- the step thread ----

void Engine::finish(Sequence* s, EventKind kind, FinishReason reason, ErrorCode code, const std::string& message) {
    assert((kind == EventKind::Done) == (reason != FinishReason::None));
    assert((kind == EventKind::Error) == (code != ErrorCode::None));
    EngineEvent ev;
    ev.req_id = s->id;
    ev.kind = kind;
    ev.finish_reason = reason;
    ev.error_code = code;
    ev.message = message;
    ev.prompt_tokens = s->n_prompt;
    ev.n_preempted = s->n_preempted;
    if (s->n_generated() > 0) {
        ev.prefill_ms = std::chrono::duration<double, std::milli>(s->t_first_token - s->t_submit).count();
        ev.decode_ms = ms_since(s->t_first_token);
    }
    if (s->state != SeqState::Finished) scheduler_.finish(s);
    {
        std::lock_guard<std::mutex> lk(mu_);
        live_ids_.erase(s->id);
    }
    emit(std::move(ev));
    seqs_.erase(s->id);  // s is gone after this line
}

void Engine::apply(Command& c) {
    switch (c.kind) {
        case Command::AddModel: {
            std::shared_ptr<ModelRt> m;
            {
                std::lock_guard<std::mutex> lk(mu_);
                m = by_id_[c.model];
            }
            scheduler_.add_model(m->id, m->opt.sched_weight, m->opt.max_running, m->kv.get(), m->w->spec().n_ctx);
            break;
        }
        case Command::RemoveModel: {
            for (Sequence* s : scheduler_.remove_model(c.model)) {
                s->state = SeqState::Finished;
                finish(s, EventKind::Error, FinishReason::None, ErrorCode::ModelUnloaded,
                       "model unloaded while the request was queued or running");
            }
            std::shared_ptr<ModelRt> m;
            {
                std::lock_guard<std::mutex> lk(mu_);
                m = by_id_[c.model];
                by_id_.erase(c.model);
            }
            ledger_.free(m->ws_mem);
            m->kv.reset();
            residency_.remove_model(c.model);
            {
                std::lock_guard<std::mutex> lk(unload_mu_);
                removed_.push_back(c.model);
            }
            unload_cv_.notify_all();
            break;
        }
        case Command::Submit: {
            Sequence* s = c.seq.get();
            seqs_[s->id] = std::move(c.seq);
            scheduler_.add(s);
            break;
        }
        case Command::Cancel: {
            auto it = seqs_.find(c.req_id);
            if (it != seqs_.end()) finish(it->second.get(), EventKind::Done, FinishReason::Cancelled);
            break;
        }
    }
}

void Engine::run_plan(StepPlan& plan) {
    const auto t0 = std::chrono::steady_clock::now();
    std::shared_ptr<ModelRt> m;
    {
        std::lock_guard<std::mutex> lk(mu_);
        m = by_id_[plan.model];
    }
    const ModelSpec& spec = m->w->spec();

    // Tell the prefetcher what comes: this model's units, then the next models'.
    std::vector<UnitRef> order;
    std::vector<int> next = scheduler_.upcoming_models(4);
    next.insert(next.begin(), plan.model);
    for (int mid : next) {
        std::shared_ptr<ModelRt> nm;
        {
            std::lock_guard<std::mutex> lk(mu_);
            auto it = by_id_.find(mid);
            if (it == by_id_.end()) continue;
            nm = it->second;
        }
        for (int u = 0; u < nm->w->n_units(); u++) order.push_back(UnitRef{mid, u});
    }
    // Adaptive turns: the slot regions this step borrows (or, when streaming, every loan returned).
    if (scheduler_.turns_on()) residency_.set_tenants(plan.borrow ? plan.model : -1, plan.lenders, plan.lend_slots);
    residency_.set_schedule(std::move(order));
    const uint64_t wait_ns0 = residency_.stats().wait_ns;
    uint64_t device_wait_ns0 = 0;  // the step trace: a GPU measures its own wait for copies
    const bool device_wait = tracer_.on() && backend_.device_copy_wait_ns(&device_wait_ns0);

    std::vector<ForwardItem> items;
    int64_t n_tok = 0;
    for (const PlanItem& it : plan.items) {
        Sequence* s = it.seq;
        items.push_back(ForwardItem{s->tokens.data() + s->n_computed, it.n_tokens, s->n_computed, &s->blocks, it.samples});
        n_tok += it.n_tokens;
    }
    float* step_logits = forward_step(*m->w, m->id, residency_, *m->kv, m->ws, items, backend_);
    scheduler_.update(plan);
    if (scheduler_.turns_on() && n_tok > 0) {
        // FlexGen's lesson (turns.h): size this model's prompt chunks so its layer copies hide behind compute.
        const ResidencyStats rs = residency_.stats();
        const double compute_ms = std::max(0.0, ms_since(t0) - static_cast<double>(rs.wait_ns - wait_ns0) / 1e6);
        const double per_tok = compute_ms / static_cast<double>(n_tok);
        m->compute_ms_per_token = m->compute_ms_per_token > 0 ? 0.8 * m->compute_ms_per_token + 0.2 * per_tok : per_tok;
        m->compute_ms_per_step = m->compute_ms_per_step > 0 ? 0.8 * m->compute_ms_per_step + 0.2 * compute_ms : compute_ms;
        const double link_bytes_per_ms = cfg_.link_gbps > 0 ? cfg_.link_gbps * 1e6
                                         : rs.copy_ns > 0 ? static_cast<double>(rs.bytes_copied) / (static_cast<double>(rs.copy_ns) / 1e6)
                                                          : 0.0;
        link_bytes_per_ms_ = link_bytes_per_ms;
        const ModelResidency r = residency_.model_info(m->id);
        TurnModel t;
        t.n_layer = spec.n_layer;
        t.layer_bytes = m->w->layer_unit_bytes();
        t.resident = r.resident || r.n_slots == 0;
        scheduler_.set_min_prefill_chunk(
            m->id, turn_min_prefill_chunk(turn_stream_step_bytes(t, r.n_slots, cfg_.prefetch_depth), link_bytes_per_ms,
                                          m->compute_ms_per_token, cfg_.max_batch_tokens));
    }

    // Sample every sequence that reached its end; rows are independent.
    std::vector<PlanItem*> sampling;
    for (PlanItem& it : plan.items)
        if (it.samples) sampling.push_back(&it);
    std::vector<int32_t> chosen(sampling.size());
    pool_.parallel_for(static_cast<int64_t>(sampling.size()), [&](int64_t r, int thread) {
        Sequence* s = sampling[static_cast<size_t>(r)]->seq;
        float* logits = step_logits + r * spec.n_vocab;
        if (s->capture_logits && s->n_generated() == 0) {
            std::lock_guard<std::mutex> lk(ev_mu_);
            captured_[s->id].assign(logits, logits + spec.n_vocab);
        }
        const TokenSpan prompt{s->tokens.data(), static_cast<size_t>(s->n_prompt)};
        const TokenSpan gen{s->tokens.data() + s->n_prompt, static_cast<size_t>(s->n_generated())};
        chosen[static_cast<size_t>(r)] = sample(logits, spec.n_vocab, s->params, prompt, gen,
                                                static_cast<uint64_t>(s->n_generated()), scratch_[static_cast<size_t>(thread)]);
    });
    // The step is counted (and traced) before its events go out, so whoever reads stats() after a
    // request's done event sees the step that produced it.
    {
        std::lock_guard<std::mutex> lk(stats_mu_);
        if (tracer_.on()) {
            StepTrace st;
            st.index = stats_.n_steps;
            st.model = plan.model;
            st.start_us = trace_us(t0);
            st.end_us = trace_now_us();
            st.n_seqs = static_cast<int>(plan.items.size());
            st.n_tokens = n_tok;
            st.n_generated = static_cast<int>(sampling.size());
            st.new_turn = plan.new_turn;
            st.borrowed = plan.borrow;
            uint64_t device_wait_ns1 = 0;
            if (device_wait && backend_.device_copy_wait_ns(&device_wait_ns1))
                st.copy_wait_us = static_cast<int64_t>((device_wait_ns1 - device_wait_ns0) / 1000);
            tracer_.record_step(st, device_wait);
        }
        stats_.n_steps++;
        stats_.n_tokens_computed += static_cast<uint64_t>(n_tok);
        stats_.n_tokens_generated += sampling.size();
        stats_.n_preemptions += plan.preempted.size();
        if (scheduler_.turns_on()) {
            stats_.n_turns += plan.new_turn ? 1 : 0;
            stats_.n_borrow_turns += plan.new_turn && plan.borrow ? 1 : 0;
        }
        stats_.step_ms_total += ms_since(t0);
    }
    for (size_t r = 0; r < sampling.size(); r++) {
        Sequence* s = sampling[r]->seq;
        const int32_t tok = chosen[r];
        if (s->n_generated() == 0 && s->t_first_token == std::chrono::steady_clock::time_point{})
            s->t_first_token = std::chrono::steady_clock::now();
        s->tokens.push_back(tok);
        EngineEvent ev;
        ev.req_id = s->id;
        ev.kind = EventKind::Token;
        ev.token = tok;
        ev.index = s->n_generated() - 1;
        emit(std::move(ev));
        const auto& stops = s->params.stop_token_ids;
        if (std::find(stops.begin(), stops.end(), tok) != stops.end()) {
            finish(s, EventKind::Done, FinishReason::Stop);
        } else if (s->n_generated() >= s->params.max_tokens || s->n_tokens() >= spec.n_ctx) {
            finish(s, EventKind::Done, FinishReason::Length);
        }
    }
}

std::vector<TurnModel> Engine::turn_view() const {
    std::vector<std::shared_ptr<ModelRt>> ms;
    {
        std::lock_guard<std::mutex> lk(mu_);
        for (const auto& kv : by_id_) ms.push_back(kv.second);
    }
    std::vector<TurnModel> out;
    for (const auto& m : ms) {
        const ModelResidency r = residency_.model_info(m->id);
        TurnModel t;
        t.model = m->id;
        t.n_layer = m->w->spec().n_layer;
        t.layer_bytes = m->w->layer_unit_bytes();
        t.head_bytes = m->w->unit(m->w->n_units() - 1).n_bytes;
        t.resident = r.resident || r.n_slots == 0;  // whole-model swapping: its own copies, never lends
        t.n_slots = r.n_slots;
        t.n_cached = r.n_cached;
        t.head_ready = r.head_ready;
        t.region_bytes = t.resident ? 0 : r.region_bytes;
        t.step_ms = m->compute_ms_per_step;
        t.link_bytes_per_ms = link_bytes_per_ms_;
        out.push_back(t);
    }
    return out;
}

void Engine::fail_plan(StepPlan& plan, const std::string& what) {
    std::string name;
    {
        std::lock_guard<std::mutex> lk(mu_);
        auto it = by_id_.find(plan.model);
        if (it != by_id_.end()) name = it->second->name;
    }
    // A sequence the failed step already finished is gone: match by pointer, never dereference.
    std::unordered_set<const Sequence*> live;
    for (const auto& kv : seqs_) live.insert(kv.second.get());
    for (const PlanItem& it : plan.items) {
        if (live.count(it.seq) == 0) continue;
        live.erase(it.seq);
        finish(it.seq, EventKind::Error, FinishReason::None, ErrorCode::EngineFailure,
               "a step of model '" + name + "' failed and the request was stopped: " + what);
    }
}

void Engine::fail_live(const std::string& what) {
    std::vector<Sequence*> live;
    for (auto& kv : seqs_) live.push_back(kv.second.get());
    for (Sequence* s : live)
        finish(s, EventKind::Error, FinishReason::None, ErrorCode::EngineFailure,
               "the device failed and the request was stopped: " + what);
}

void Engine::step_main() {
    for (;;) {
        std::deque<Command> cmds;
        {
            std::unique_lock<std::mutex> lk(mu_);
            note_loop();
            cv_.wait(lk, [&] { return stop_ || (!stalled_ && (!inbox_.empty() || scheduler_.has_work())); });
            if (stop_) break;
            cmds.swap(inbox_);
        }
        for (Command& c : cmds) apply(c);
        StepPlan plan = scheduler_.turns_on() ? scheduler_.schedule(
                                                        std::chrono::duration<double, std::milli>(
                                                            std::chrono::steady_clock::now().time_since_epoch()).count(),
                                                        turn_view()) : scheduler_.schedule();
        for (Sequence* s : plan.rejected) {
            uint64_t block_bytes = 0;
            {
                std::lock_guard<std::mutex> lk(mu_);
                if (auto it = by_id_.find(s->model); it != by_id_.end()) block_bytes = it->second->footprint.kv_block_bytes;
            }
            finish(s, EventKind::Error, FinishReason::None, ErrorCode::KvExceedsBudget,
                   "the request needs KV for more than " + std::to_string(s->n_tokens()) + " tokens (blocks of " +
                       std::to_string(block_bytes) + " bytes) but this device can give KV at most " +
                       std::to_string(ledger_.snapshot().kv_capacity_bytes) +
                       " bytes, even with every other request paused");
        }
        if (plan.empty()) {
            // Work exists but must wait (for KV freed by another model's progress).
            std::unique_lock<std::mutex> lk(mu_);
            cv_.wait_for(lk, std::chrono::milliseconds(2), [&] { return stop_ || !inbox_.empty(); });
            continue;
        }
        try {
            run_plan(plan);
        } catch (const DeviceFaultError& e) {
            // The device cannot compute any more (a GPU lost): every request on it would fail the
            // same way, so each ends now with one error event; later ones fail at their first step.
            {
                std::lock_guard<std::mutex> lk(mu_);
                if (device_fault_.empty()) device_fault_ = e.what();
            }
            fail_live(e.what());
        } catch (const std::exception& e) {
            // A step that cannot run (e.g. a whole-model swap with no room left next to other
            // models' KV) must not take the process down: its sequences end with an error event
            // and every other request keeps going.
            fail_plan(plan, e.what());
        }
    }
    // Shutdown: every live request ends with an event.
    std::vector<Sequence*> left;
    for (auto& kv : seqs_) left.push_back(kv.second.get());
    for (Sequence* s : left)
        finish(s, EventKind::Error, FinishReason::None, ErrorCode::Shutdown, "engine shut down before the request finished");
}

}  // namespace lmx
