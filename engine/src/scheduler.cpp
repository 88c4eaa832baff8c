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

StepPlan Scheduler::schedule() {
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

void Scheduler::update(const StepPlan& plan) {
    for (const PlanItem& it : plan.items) it.seq->n_computed += it.n_tokens;
}

std::vector<int> Scheduler::upcoming_models(int n) const {
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
