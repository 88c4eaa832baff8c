// scheduler.h — the step function: which model runs next, which sequences, how many tokens each.
// Owner: engine core; only the step thread calls it (tests call it directly).
// Thread-safety: NOT thread-safe. It owns no memory but KV blocks via KvCache.
//
// Policy. Models share the device by stride scheduling: each model with work has
// a pass value; the model with the lowest pass runs the next step and its pass
// grows by 1/weight, so over time steps split in proportion to the weights and a
// busy model cannot starve a quiet one. A model that wakes up joins at the
// current minimum pass (no credit banked while idle). Within the chosen model,
// every running sequence is batched into the step — decode tokens first, then
// prompt chunks — up to max_batch_tokens, then waiting sequences are admitted in
// arrival order up to max_running. KV blocks are reserved before the step; when
// they run out the most recently arrived running sequence is preempted: its
// blocks are released and it is recomputed later (recompute rather than swap:
// on this device the prompt is cheaper to recompute than host RAM is to book, and
// sampling is keyed by (seed, index), so the resumed output is identical).
//
// Adaptive turns (set_turns, turns.h). With turns on, the model to run comes from plan_turn: a turn
// of one or more steps, streamed on the model's own slots or borrowing the other models' slot regions
// (plan.borrow, plan.lenders: the engine hands them to Residency::set_tenants), chosen by expected
// bytes copied per generated token, bounded by the starvation rule stated in turns.h. The scheduler
// keeps the turn state and each model's wait (steps, and ms on the clock the caller passes in); the
// stride pass only breaks ties. A streamed model's prompt chunks are at least its min_prefill_chunk
// tokens unless they finish the prompt (FlexGen: a layer copy is paid per step, so it is spread over
// enough tokens).
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <string>
#include <vector>

#include "common.h"
#include "kv_cache.h"
#include "sampler.h"
#include "turns.h"

namespace lmx {

enum class SeqState : uint8_t { Waiting, Running, Finished };

struct Sequence {
    int64_t id = 0;
    int model = -1;
    std::vector<int32_t> tokens;  // prompt followed by generated tokens
    int32_t n_prompt = 0;
    SamplingParams params;
    std::vector<int32_t> blocks;  // KV block table
    int64_t n_computed = 0;       // positions whose K/V are in the cache
    SeqState state = SeqState::Waiting;
    uint64_t arrival = 0;
    bool cancel_requested = false;
    bool capture_logits = false;
    int32_t n_preempted = 0;
    std::chrono::steady_clock::time_point t_submit, t_first_token;

    int64_t n_tokens() const { return static_cast<int64_t>(tokens.size()); }
    int32_t n_generated() const { return static_cast<int32_t>(tokens.size()) - n_prompt; }
};

struct PlanItem {
    Sequence* seq;
    int32_t n_tokens;  // tokens[seq->n_computed .. +n_tokens) run this step
    bool samples;      // reaches the end of the sequence: its logits give the next token
};

struct StepPlan {
    int model = -1;  // -1: nothing to run
    std::vector<PlanItem> items;
    std::vector<Sequence*> preempted;  // released their KV this step
    std::vector<Sequence*> rejected;   // can never fit even alone: the engine fails them (kv_exceeds_budget)
    // Adaptive turns: the step borrows the slot regions of `lenders`; turn_steps = the turn's planned length.
    bool borrow = false;
    std::vector<int> lenders;
    std::vector<int> lend_slots;  // the borrower's slots each lender gives (parallel to lenders)
    int turn_steps = 1;
    bool new_turn = true;  // the first step of a turn
    bool empty() const { return items.empty(); }
};

class Scheduler {
public:
    Scheduler(int max_batch_tokens, int max_seqs_per_step);

    void add_model(int model, double weight, int max_running, KvCache* kv, int64_t n_ctx);
    // Returns the model's sequences (all states but Finished) for the caller to fail.
    std::vector<Sequence*> remove_model(int model);
    void add(Sequence* seq);          // enters Waiting
    void finish(Sequence* seq);       // leaves the scheduler; its KV is released
    bool has_work() const;

    StepPlan schedule();

    // Adaptive turns: on when cfg.max_turn_steps >= 1 (then schedule(now_ms, device) decides by
    // plan_turn). device: one TurnModel per loaded model with its device fields filled (n_layer,
    // layer_bytes, head_bytes, resident, n_slots, n_cached, head_ready, region_bytes); the scheduler
    // fills the queue fields. now_ms: any monotonic clock in milliseconds.
    void set_turns(const TurnConfig& cfg);
    bool turns_on() const { return turns_on_; }
    StepPlan schedule(double now_ms, const std::vector<TurnModel>& device);
    // Prompt chunks of `model` that do not finish their prompt carry at least n tokens (turns.h).
    void set_min_prefill_chunk(int model, int n);
    const TurnState& turn_state() const { return turn_; }
    // Records that the plan ran: advances n_computed of every item.
    void update(const StepPlan& plan);

    // Models in the order the next n steps are expected to run them (the current
    // pass values, assuming demand stays): the prefetcher's view of the future.
    std::vector<int> upcoming_models(int n) const;

    int n_running(int model) const;
    int n_waiting(int model) const;

private:
    struct ModelQueue {
        double weight = 1.0;
        int max_running = 64;
        int64_t n_ctx = 0;
        KvCache* kv = nullptr;
        double pass = 0.0;
        bool active = false;
        int min_prefill_chunk = 1;
        int waited_steps = 0;      // turns: steps others ran since it last ran, while it had work
        double wait_since_ms = 0;  // turns: when it last ran or got work
        std::vector<Sequence*> running;  // arrival order
        std::deque<Sequence*> waiting;   // arrival order (preempted ones keep theirs)
    };
    bool try_plan(int model, ModelQueue& q, StepPlan& plan);
    std::vector<std::pair<double, int>> wake_and_rank();  // busy models by pass; wakes join at the minimum
    void queue_fields(int model, const ModelQueue& q, double now_ms, TurnModel& t) const;
    void preempt(ModelQueue& q, Sequence* s, StepPlan& plan);
    void insert_waiting(ModelQueue& q, Sequence* s);
    void reject(ModelQueue& q, Sequence* s, StepPlan& plan);  // s can never fit: it leaves, Finished
    int64_t kv_blocks_held() const;                           // by every model

    int max_batch_tokens_;
    int max_seqs_per_step_;
    uint64_t next_arrival_ = 0;
    std::map<int, ModelQueue> models_;
    bool turns_on_ = false;
    TurnConfig turn_cfg_;
    TurnState turn_;
};

}  // namespace lmx
