// scheduler.cpp — stride scheduling across models, batching and KV reservation within one.
// Owner: engine core. Thread-safety: step thread only (see scheduler.h).
#include "scheduler.h"

#include <algorithm>
#include <cassert>
#include <limits>

namespace lmx {

Scheduler::Scheduler(int max_batch_tokens, int max_seqs_per_step)
    : max_batch_tokens_(max_batch_tokens), max_seqs_per_step_(max_seqs_per_step) {
    if (max_batch_tokens < 1)
        throw InvalidArgument("max_batch_tokens: expected >= 1, found " + std::to_string(max_batch_tokens));
    if (max_seqs_per_step < 1)
        throw InvalidArgument("max_seqs_per_step: expected >= 1, found " + std::to_string(max_seqs_per_step));
}

void Scheduler::add_model(int model, double weight, int max_running, KvCache* kv, int64_t n_ctx) {
    if (!(weight > 0)) throw InvalidArgument("sched_weight: expected > 0, found " + std::to_string(weight));
    if (max_running < 1) throw InvalidArgument("max_running: expected >= 1, found " + std::to_string(max_running));
    ModelQueue q;
    q.weight = weight;
    q.max_running = max_running;
    q.kv = kv;
    q.n_ctx = n_ctx;
    models_[model] = std::move(q);
}

std::vector<Sequence*> Scheduler::remove_model(int model) {
    std::vector<Sequence*> out;
    auto it = models_.find(model);
    if (it == models_.end()) return out;
    for (Sequence* s : it->second.running) {
        it->second.kv->release(s->blocks);
        out.push_back(s);
    }
    for (Sequence* s : it->second.waiting) out.push_back(s);
    models_.erase(it);
    return out;
}

void Scheduler::insert_waiting(ModelQueue& q, Sequence* s) {
    auto pos = std::find_if(q.waiting.begin(), q.waiting.end(), [&](Sequence* o) { return o->arrival > s->arrival; });
    q.waiting.insert(pos, s);
}

void Scheduler::add(Sequence* seq) {
    auto it = models_.find(seq->model);
    assert(it != models_.end());
    seq->arrival = next_arrival_++;
    seq->state = SeqState::Waiting;
    it->second.waiting.push_back(seq);
}

void Scheduler::finish(Sequence* seq) {
    auto it = models_.find(seq->model);
    if (it == models_.end()) return;
    ModelQueue& q = it->second;
    q.kv->release(seq->blocks);
    q.running.erase(std::remove(q.running.begin(), q.running.end(), seq), q.running.end());
    q.waiting.erase(std::remove(q.waiting.begin(), q.waiting.end(), seq), q.waiting.end());
    seq->state = SeqState::Finished;
    // Turns: a model left without work is idle now (its wait restarts when work comes, even if no
    // step is scheduled in between).
    if (turns_on_ && q.running.empty() && q.waiting.empty()) q.active = false;
}

bool Scheduler::has_work() const {
    for (const auto& kv : models_)
        if (!kv.second.running.empty() || !kv.second.waiting.empty()) return true;
    return false;
}

int Scheduler::n_running(int model) const {
    auto it = models_.find(model);
    return it == models_.end() ? 0 : static_cast<int>(it->second.running.size());
}

int Scheduler::n_waiting(int model) const {
    auto it = models_.find(model);
    return it == models_.end() ? 0 : static_cast<int>(it->second.waiting.size());
}

void Scheduler::preempt(ModelQueue& q, Sequence* s, StepPlan& plan) {
    q.kv->release(s->blocks);
    s->n_computed = 0;
    s->n_preempted++;
    q.running.erase(std::remove(q.running.begin(), q.running.end(), s), q.running.end());
    s->state = SeqState::Waiting;
    insert_waiting(q, s);
    plan.preempted.push_back(s);
    plan.items.erase(std::remove_if(plan.items.begin(), plan.items.end(), [&](const PlanItem& it) { return it.seq == s; }),
                     plan.items.end());
}

// Builds model's step into plan. False when nothing could be scheduled.
bool Scheduler::try_plan(int model, ModelQueue& q, StepPlan& plan) {
    plan.model = model;
    int budget = max_batch_tokens_;
    auto chunk_of = [&](Sequence* s) {
        const int64_t left = s->n_tokens() - s->n_computed;
        return static_cast<int32_t>(std::min<int64_t>(left, budget));
    };
    // Reserve KV for s to cover n more positions, preempting the newest running
    // sequence of this model while that is not s itself (the newest is never one
    // planned before s: running is in arrival order and s is planned in that order).
    auto reserve = [&](Sequence* s, int32_t n) {
        while (q.kv->reserve(s->blocks, s->n_computed + n) != BookResult::Ok) {
            if (q.running.empty() || q.running.back() == s) return false;
            preempt(q, q.running.back(), plan);
        }
        return true;
    };

    // 1. Running sequences, decode (one token) before prompt chunks.
    std::vector<Sequence*> order = q.running;
    std::stable_partition(order.begin(), order.end(), [](Sequence* s) { return s->n_tokens() - s->n_computed == 1; });
    for (Sequence* s : order) {
        if (s->state != SeqState::Running) continue;  // preempted meanwhile
        if (budget == 0 || static_cast<int>(plan.items.size()) >= max_seqs_per_step_) break;
        const int32_t n = chunk_of(s);
        if (!reserve(s, n)) {
            // All the KV anyone holds is s's own and it still cannot grow: it never will.
            if (kv_blocks_held() == static_cast<int64_t>(s->blocks.size())) {
                reject(q, s, plan);
                continue;
            }
            preempt(q, s, plan);
            continue;
        }
        plan.items.push_back({s, n, s->n_computed + n == s->n_tokens()});
        budget -= n;
    }
    // 2. Admit waiting sequences in arrival order.
    while (!q.waiting.empty() && budget > 0 && static_cast<int>(q.running.size()) < q.max_running &&
           static_cast<int>(plan.items.size()) < max_seqs_per_step_) {
        Sequence* s = q.waiting.front();
        const int32_t n = chunk_of(s);
        // A streamed model pays its layer copies per step: no small chunk that leaves the prompt unfinished.
        if (n < q.min_prefill_chunk && s->n_computed + n < s->n_tokens() && !plan.items.empty()) break;
        if (q.kv->reserve(s->blocks, s->n_computed + n) != BookResult::Ok) break;  // stays waiting, holds nothing
        q.waiting.pop_front();
        s->state = SeqState::Running;
        q.running.push_back(s);
        plan.items.push_back({s, n, s->n_computed + n == s->n_tokens()});
        budget -= n;
    }
    return !plan.items.empty();
}

int64_t Scheduler::kv_blocks_held() const {
    int64_t held = 0;
    for (const auto& kv : models_) held += kv.second.kv->n_blocks_in_use();
    return held;
}

void Scheduler::reject(ModelQueue& q, Sequence* s, StepPlan& plan) {
    q.kv->release(s->blocks);
    q.running.erase(std::remove(q.running.begin(), q.running.end(), s), q.running.end());
    q.waiting.erase(std::remove(q.waiting.begin(), q.waiting.end(), s), q.waiting.end());
    s->state = SeqState::Finished;
    plan.rejected.push_back(s);
}

std::vector<std::pair<double, int>> Scheduler::wake_and_rank() {
    // Wake-ups join at the lowest pass among the already active models.
    double min_pass = std::numeric_limits<double>::infinity();
    for (auto& kv : models_)
        if (kv.second.active) min_pass = std::min(min_pass, kv.second.pass);
    if (min_pass == std::numeric_limits<double>::infinity()) min_pass = 0;
    std::vector<std::pair<double, int>> cands;
    for (auto& kv : models_) {
        ModelQueue& q = kv.second;
        const bool busy = !q.running.empty() || !q.waiting.empty();
        if (busy && !q.active) q.pass = std::max(q.pass, min_pass);
        q.active = busy;
        if (busy) cands.push_back({q.pass, kv.first});
    }
    std::sort(cands.begin(), cands.end());
    return cands;
}

StepPlan Scheduler::schedule() {
    const std::vector<std::pair<double, int>> cands = wake_and_rank();
    StepPlan none;  // what failed attempts rejected or preempted travels with the plan returned
    for (const auto& c : cands) {
        StepPlan plan;
        ModelQueue& q = models_[c.second];
        const bool ok = try_plan(c.second, q, plan);
        none.rejected.insert(none.rejected.end(), plan.rejected.begin(), plan.rejected.end());
        none.preempted.insert(none.preempted.end(), plan.preempted.begin(), plan.preempted.end());
        if (ok) {
            q.pass += 1.0 / q.weight;
            plan.rejected = std::move(none.rejected);
            plan.preempted = std::move(none.preempted);
            return plan;
        }
        // Nothing fit for this model; the preempted (if any) wait. Try the next.
    }
    // Work exists but no model could take a step. If no KV is held anywhere, the
    // head of the first queue cannot fit even alone: it will never run.
    if (cands.empty()) return none;
    if (kv_blocks_held() == 0) {
        ModelQueue& q = models_[cands.front().second];
        if (!q.waiting.empty()) reject(q, q.waiting.front(), none);
    }
    return none;
}

void Scheduler::set_turns(const TurnConfig& cfg) {
    if (cfg.max_turn_steps < 0)
        throw InvalidArgument("max_turn_steps: expected >= 0 (0 = no turns), found " + std::to_string(cfg.max_turn_steps));
    if (!(cfg.max_wait_ms > 0)) throw InvalidArgument("max_wait_ms: expected > 0, found " + std::to_string(cfg.max_wait_ms));
    if (!(cfg.first_token_ms >= 0))
        throw InvalidArgument("first_token_ms: expected >= 0 (0 = always first tokens first), found " +
                              std::to_string(cfg.first_token_ms));
    turn_cfg_ = cfg;
    turns_on_ = cfg.max_turn_steps >= 1;
}

void Scheduler::set_min_prefill_chunk(int model, int n) {
    auto it = models_.find(model);
    if (it != models_.end()) it->second.min_prefill_chunk = std::max(1, n);
}

// The queue's side of a TurnModel: work, batch, steps left, wait.
void Scheduler::queue_fields(int model, const ModelQueue& q, double now_ms, TurnModel& t) const {
    t.model = model;
    t.weight = q.weight;
    t.pass = q.pass;
    t.n_seqs = static_cast<int>(q.running.size() + q.waiting.size());
    t.gen_per_step = std::max(1, std::min({t.n_seqs, q.max_running, max_seqs_per_step_, max_batch_tokens_}));
    int64_t prompt_left = 0, gen_left = 0;
    t.n_unstarted = t.n_prefilling = 0;
    auto count = [&](const Sequence* s) {
        prompt_left += std::max<int64_t>(0, s->n_prompt - s->n_computed);
        t.n_unstarted += s->n_computed == 0 && s->n_generated() == 0 ? 1 : 0;
        t.n_prefilling += s->n_tokens() - s->n_computed > 1 ? 1 : 0;
        gen_left = std::max<int64_t>(gen_left, std::max(1, s->params.max_tokens - s->n_generated()));
    };
    for (const Sequence* s : q.running) count(s);
    for (const Sequence* s : q.waiting) count(s);
    // Decodes of the sequences already in take a token of the budget each step: about one per sequence.
    const int64_t prefill_steps = prompt_left == 0 ? 0 : (prompt_left + t.n_seqs + max_batch_tokens_ - 1) / max_batch_tokens_;
    t.prefill_steps = static_cast<int>(std::min<int64_t>(prefill_steps, 1 << 30));
    const int64_t steps = gen_left + prefill_steps;
    t.n_steps_left = static_cast<int>(std::min<int64_t>(steps, 1 << 30));
    t.waited_steps = t.n_seqs > 0 ? q.waited_steps : 0;
    t.waited_ms = t.n_seqs > 0 ? std::max(0.0, now_ms - q.wait_since_ms) : 0.0;
}

StepPlan Scheduler::schedule(double now_ms, const std::vector<TurnModel>& device) {
    if (!turns_on_) return schedule();
    // A model that gets work starts waiting now.
    for (auto& kv : models_) {
        ModelQueue& q = kv.second;
        const bool busy = !q.running.empty() || !q.waiting.empty();
        if (busy && !q.active) {
            q.waited_steps = 0;
            q.wait_since_ms = now_ms;
        }
    }
    const std::vector<std::pair<double, int>> by_pass = wake_and_rank();
    if (by_pass.empty()) {
        turn_ = TurnState{};
        return StepPlan{};
    }
    std::vector<TurnModel> tm;
    for (auto& kv : models_) {
        TurnModel t;
        for (const TurnModel& d : device)
            if (d.model == kv.first) t = d;
        queue_fields(kv.first, kv.second, now_ms, t);
        tm.push_back(t);
    }
    const TurnDecision d = plan_turn(tm, turn_, turn_cfg_);
    // The policy's model first; when its KV does not fit, the others by longest wait (a one-step turn).
    std::vector<int> order{d.model};
    std::vector<const TurnModel*> rest;
    for (const TurnModel& t : tm)
        if (t.n_seqs > 0 && t.model != d.model) rest.push_back(&t);
    std::sort(rest.begin(), rest.end(), [](const TurnModel* a, const TurnModel* b) {
        if (a->waited_steps != b->waited_steps) return a->waited_steps > b->waited_steps;
        if (a->pass != b->pass) return a->pass < b->pass;
        return a->model < b->model;
    });
    for (const TurnModel* t : rest) order.push_back(t->model);
    StepPlan none;
    for (int model : order) {
        StepPlan plan;
        ModelQueue& q = models_[model];
        const bool ok = try_plan(model, q, plan);
        none.rejected.insert(none.rejected.end(), plan.rejected.begin(), plan.rejected.end());
        none.preempted.insert(none.preempted.end(), plan.preempted.begin(), plan.preempted.end());
        if (!ok) continue;
        q.pass += 1.0 / q.weight;
        if (model == d.model) {
            plan.new_turn = !(d.continues && turn_.owner == model);
            turn_ = turn_advance(turn_, d);
            plan.borrow = d.borrow;
            plan.lenders = d.lenders;
            plan.lend_slots = d.lend_slots;
            plan.turn_steps = d.n_steps;
        } else {
            plan.new_turn = turn_.owner != model;
            turn_ = TurnState{model, 1, 1, false, false, {}, {}};
        }
        for (auto& kv : models_) {
            ModelQueue& o = kv.second;
            if (kv.first == model) {
                o.waited_steps = 0;
                o.wait_since_ms = now_ms;
            } else if (!o.running.empty() || !o.waiting.empty()) {
                o.waited_steps++;
            }
        }
        plan.rejected = std::move(none.rejected);
        plan.preempted = std::move(none.preempted);
        return plan;
    }
    if (kv_blocks_held() == 0) {
        ModelQueue& q = models_[order.front()];
        if (!q.waiting.empty()) reject(q, q.waiting.front(), none);
    }
    return none;
}

void Scheduler::update(const StepPlan& plan) {
    for (const PlanItem& it : plan.items) it.seq->n_computed += it.n_tokens;
}

std::vector<int> Scheduler::upcoming_models(int n) const {
    if (turns_on_) {
        // The turn's remaining steps, then the others by longest wait, then the owner again, round and
        // round; the owner never past its work (the step being run is not counted), so no layer is
        // prefetched for a pass that will never run.
        std::vector<int> out;
        auto busy = [&](int m) {
            auto it = models_.find(m);
            return it != models_.end() && (!it->second.running.empty() || !it->second.waiting.empty());
        };
        int owner_left = 0;
        if (busy(turn_.owner)) {
            TurnModel t;
            queue_fields(turn_.owner, models_.at(turn_.owner), 0.0, t);
            owner_left = t.n_steps_left - 1;
        }
        for (int i = turn_.n_steps; i < turn_.n_planned && owner_left > 0 && static_cast<int>(out.size()) < n; i++) {
            out.push_back(turn_.owner);
            owner_left--;
        }
        std::vector<std::pair<int, int>> others;  // (-waited_steps, model)
        for (const auto& kv : models_)
            if (kv.first != turn_.owner && busy(kv.first)) others.push_back({-kv.second.waited_steps, kv.first});
        std::sort(others.begin(), others.end());
        std::vector<int> cycle;
        for (const auto& o : others) cycle.push_back(o.second);
        if (owner_left > 0) cycle.push_back(turn_.owner);
        while (!cycle.empty() && static_cast<int>(out.size()) < n) {
            for (int m : cycle) {
                if (static_cast<int>(out.size()) >= n) break;
                if (m == turn_.owner && owner_left-- <= 0) continue;
                out.push_back(m);
            }
            if (owner_left <= 0) cycle.erase(std::remove(cycle.begin(), cycle.end(), turn_.owner), cycle.end());
        }
        return out;
    }
    std::vector<std::pair<double, int>> sim;
    std::vector<double> step;
    for (const auto& kv : models_) {
        if (kv.second.running.empty() && kv.second.waiting.empty()) continue;
        sim.push_back({kv.second.pass, kv.first});
        step.push_back(1.0 / kv.second.weight);
    }
    std::vector<int> out;
    if (sim.empty()) return out;
    for (int i = 0; i < n; i++) {
        size_t best = 0;
        for (size_t j = 1; j < sim.size(); j++)
            if (sim[j] < sim[best]) best = j;
        out.push_back(sim[best].second);
        sim[best].first += step[best];
    }
    return out;
}

}  // namespace lmx
