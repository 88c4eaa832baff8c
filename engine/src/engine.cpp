// engine.cpp — model loading, the command inbox, the step loop, sampling and events.
// Owner: engine core. Thread-safety: see engine.h. Lock order: mu_ before ev_mu_;
// the step thread never holds mu_ while computing.
#include "engine.h"
#include "kernels/kernels.h"

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

Engine::Engine(const EngineConfig& cfg)
    : cfg_(cfg),
      ledger_(std::make_unique<CpuDevice>(cfg.budget_bytes, cfg.n_threads > 0 ? cfg.n_threads : usable_cores()),
              cfg.cap_fraction),
      backend_(ledger_.device().backend()),
      pool_(backend_.host_pool()),
      residency_(ledger_, cfg.prefetch_depth, eviction_from_name(cfg.eviction)),
      scheduler_(cfg.max_batch_tokens, cfg.max_seqs_per_step) {
    if (cfg.kv_block_tokens < 1)
        throw InvalidArgument("kv_block_tokens: expected >= 1, found " + std::to_string(cfg.kv_block_tokens));
    if (cfg.matmul_precision != "exact" && cfg.matmul_precision != "fast")  // applied per model at load
        throw InvalidArgument("matmul_precision: expected 'exact' or 'fast', found '" + cfg.matmul_precision + "'");
    event_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (event_fd_ < 0) throw Error(std::string("eventfd: ") + std::strerror(errno));
    scratch_.resize(static_cast<size_t>(pool_.n_threads()));
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
    if (opt.residency != "auto" && opt.residency != "resident" && opt.residency != "streamed" && opt.residency != "swap")
        throw InvalidArgument("residency: expected auto, resident, streamed or swap, found '" + opt.residency + "'");
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
    load_spec.matmul_precision = cfg_.matmul_precision == "fast" ? MatmulPrecision::fast : MatmulPrecision::exact;
    auto w = std::make_shared<const ModelWeights>(load_spec, progress);
    auto m = std::make_shared<ModelRt>();
    m->name = spec.name;
    m->w = w;
    m->opt = opt;
    {
        std::lock_guard<std::mutex> lk(mu_);
        m->id = next_model_id_++;
    }
    const int max_rows = std::min(cfg_.max_seqs_per_step, cfg_.max_batch_tokens);
    const uint64_t ws_bytes = workspace_bytes(spec, cfg_.max_batch_tokens, max_rows, backend_.scratch_lanes());
    const uint64_t cap = ledger_.cap_bytes();
    const uint64_t reserve = static_cast<uint64_t>(static_cast<double>(cap) * cfg_.kv_reserve_fraction);
    const uint64_t headroom = ledger_.headroom_bytes();
    const uint64_t spare = headroom > ws_bytes + reserve ? headroom - ws_bytes - reserve : 0;

    // Auto residency: resident when the weights fit next to the KV reserve.
    // Otherwise the head stays resident and layers stream through slots: at
    // least 2 (double buffering), and at most half of the spare bytes, so models
    // loaded later still find room (Belady turns extra slots into hits).
    const int n_layer = spec.n_layer;
    bool resident = opt.residency == "resident" || (opt.residency == "auto" && w->total_unit_bytes() <= spare);
    int n_slots = 0;
    if (!resident) {
        const uint64_t head = w->unit(n_layer).n_bytes;
        const uint64_t layer = std::max<uint64_t>(w->layer_unit_bytes(), 1);
        const int min_slots = 2;
        const uint64_t fair = spare > head ? (spare - head) / 2 / layer : 0;
        n_slots = opt.stream_slots > 0 ? opt.stream_slots
                                       : std::max<int>(min_slots, static_cast<int>(std::min<uint64_t>(
                                                                      fair, static_cast<uint64_t>(n_layer - 1))));
        n_slots = std::max(1, std::min(n_slots, n_layer));
    }
    const uint64_t weight_need = resident ? w->total_unit_bytes()
                                          : w->unit(n_layer).n_bytes + static_cast<uint64_t>(n_slots) * w->layer_unit_bytes();
    m->ws_mem = ledger_.alloc(spec.name, BookKind::Workspace, ws_bytes);
    if (m->ws_mem && opt.residency == "swap") {
        if (w->total_unit_bytes() > headroom - std::min(headroom, ws_bytes)) {
            ledger_.free(m->ws_mem);
            throw NoSpaceError("cannot load model '" + spec.name + "' for whole-model swapping: its weights need " +
                               mib(w->total_unit_bytes()) + " but only " + mib(headroom) + " are free");
        }
        residency_.add_swap_model(m->id, w, spec.name);
    } else if (!m->ws_mem || !residency_.add_model(m->id, w, spec.name, resident, n_slots)) {
        ledger_.free(m->ws_mem);
        throw NoSpaceError("cannot load model '" + spec.name + "': it needs " + mib(weight_need + ws_bytes) + " of device memory (" +
                           (resident ? std::string("all weights resident") : std::to_string(n_slots) + " layer slots") +
                           " + workspace) but the ledger has " + mib(headroom) + " free under its cap of " + mib(cap) +
                           "; raise the device budget, unload a model, or choose streamed residency / smaller weights");
    }
    workspace_init(m->ws, m->ws_mem.ptr, spec, cfg_.max_batch_tokens, max_rows, backend_.scratch_lanes());
    m->kv = std::make_unique<KvCache>(ledger_, spec.name, spec.n_layer, spec.kv_dim(), cfg_.kv_block_tokens);
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
                    bool capture_logits, bool ignore_eos) {
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
    if (params.stop_token_ids.empty() && !ignore_eos) params.stop_token_ids = s.eos_ids;

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
    i.weights = dtype_name(m.w->dtype());
    i.matrix_format = dtype_name(m.w->matrix_dtype());
    const ModelResidency r = residency_.model_info(m.id);
    i.resident = r.resident;
    i.n_slots = r.n_slots;
    i.n_units_loaded = r.n_units_loaded;
    i.weight_bytes = m.w->total_unit_bytes();
    i.device_weight_bytes = r.resident ? m.w->total_unit_bytes()
                                       : m.w->unit(s.n_layer).n_bytes + static_cast<uint64_t>(r.n_slots) * r.slot_bytes;
    i.workspace_bytes = m.ws_mem.n_bytes;
    i.kv_block_bytes = m.kv ? m.kv->block_bytes() : 0;
    i.kv_bytes_per_token = static_cast<uint64_t>(s.n_layer) * 2 * static_cast<uint64_t>(s.kv_dim()) * 4;
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
    return s;
}

// ---- the step thread ----

void Engine::finish(Sequence* s, EventKind kind, const std::string& detail) {
    EngineEvent ev;
    ev.req_id = s->id;
    ev.kind = kind;
    ev.detail = detail;
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
                finish(s, EventKind::Error, "model unloaded while the request was queued or running");
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
            if (it != seqs_.end()) finish(it->second.get(), EventKind::Done, "cancelled");
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
    residency_.set_schedule(std::move(order));

    std::vector<ForwardItem> items;
    int64_t n_tok = 0;
    for (const PlanItem& it : plan.items) {
        Sequence* s = it.seq;
        items.push_back(ForwardItem{s->tokens.data() + s->n_computed, it.n_tokens, s->n_computed, &s->blocks, it.samples});
        n_tok += it.n_tokens;
    }
    float* step_logits = forward_step(*m->w, m->id, residency_, *m->kv, m->ws, items, backend_);
    scheduler_.update(plan);

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
        const std::vector<int32_t> prompt(s->tokens.begin(), s->tokens.begin() + s->n_prompt);
        const std::vector<int32_t> gen(s->tokens.begin() + s->n_prompt, s->tokens.end());
        chosen[static_cast<size_t>(r)] = sample(logits, spec.n_vocab, s->params, prompt, gen,
                                                static_cast<uint64_t>(s->n_generated()), scratch_[static_cast<size_t>(thread)]);
    });
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
            finish(s, EventKind::Done, "stop");
        } else if (s->n_generated() >= s->params.max_tokens || s->n_tokens() >= spec.n_ctx) {
            finish(s, EventKind::Done, "length");
        }
    }
    std::lock_guard<std::mutex> lk(stats_mu_);
    stats_.n_steps++;
    stats_.n_tokens_computed += static_cast<uint64_t>(n_tok);
    stats_.n_tokens_generated += sampling.size();
    stats_.n_preemptions += plan.preempted.size();
    stats_.step_ms_total += ms_since(t0);
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
        finish(it.seq, EventKind::Error,
               "engine_failure: a step of model '" + name + "' failed and the request was stopped: " + what);
    }
}

void Engine::step_main() {
    for (;;) {
        std::deque<Command> cmds;
        {
            std::unique_lock<std::mutex> lk(mu_);
            cv_.wait(lk, [&] { return stop_ || !inbox_.empty() || scheduler_.has_work(); });
            if (stop_) break;
            cmds.swap(inbox_);
        }
        for (Command& c : cmds) apply(c);
        StepPlan plan = scheduler_.schedule();
        for (Sequence* s : plan.rejected)
            finish(s, EventKind::Error,
                   "kv_exceeds_budget: the request needs more KV blocks than the device can hold even alone (" +
                       std::to_string(s->n_tokens()) + " tokens)");
        if (plan.empty()) {
            // Work exists but must wait (for KV freed by another model's progress).
            std::unique_lock<std::mutex> lk(mu_);
            cv_.wait_for(lk, std::chrono::milliseconds(2), [&] { return stop_ || !inbox_.empty(); });
            continue;
        }
        try {
            run_plan(plan);
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
    for (Sequence* s : left) finish(s, EventKind::Error, "engine shut down before the request finished");
}

}  // namespace lmx
