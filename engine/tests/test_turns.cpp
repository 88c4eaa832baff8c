// test_turns.cpp — adaptive turns: the policy's decisions (turns.h) as a pure step function, the scheduler's
// turns, residency lending a region and taking it back, and the engine: same tokens as per-step streaming and
// as alone, and the starvation bound with three models.
// Owner: engine tests. Expectations are exact: which model runs, for how many steps, whose slots it borrows.
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <memory>
#include <thread>

#include "check.h"
#include "engine.h"
#include "kv_cache.h"
#include "ledger.h"
#include "residency.h"
#include "scheduler.h"
#include "tiny_model.h"
#include "turns.h"

using namespace lmx;

namespace {
constexpr uint64_t MiB = 1 << 20;

// A streamed model of n_layer layers of layer_mib MiB, n_slots own slots, head_mib, idle and warm.
TurnModel streamed(int id, int n_layer, uint64_t layer_mib, int n_slots, uint64_t head_mib = 4) {
    TurnModel m;
    m.model = id;
    m.n_layer = n_layer;
    m.layer_bytes = layer_mib * MiB;
    m.head_bytes = head_mib * MiB;
    m.n_slots = n_slots;
    m.n_cached = std::max(0, n_slots - 2);
    m.region_bytes = (head_mib + static_cast<uint64_t>(n_slots) * layer_mib) * MiB;
    return m;
}
TurnModel& busy(TurnModel& m, int n_seqs, int steps_left) {
    m.n_seqs = n_seqs;
    m.gen_per_step = n_seqs;
    m.n_steps_left = steps_left;
    return m;
}

// Three streamed models (the 75 % cell's shapes) whose 16 requests each arrived at once: none started,
// 4 prefill steps and 20 steps in all each.
std::vector<TurnModel> three_queues_at_once() {
    std::vector<TurnModel> ms{streamed(0, 16, 3, 9, 6), streamed(1, 12, 5, 6, 14), streamed(2, 16, 7, 8, 16)};
    for (TurnModel& m : ms) {
        busy(m, 16, 20);
        m.n_unstarted = m.n_prefilling = 16;
        m.prefill_steps = 4;
    }
    return ms;
}

// Runs the policy as the scheduler does for n steps: every model keeps its work, waits grow for the
// models that did not run. Returns the models in step order ('A' + id) and the longest wait seen.
std::string simulate(std::vector<TurnModel> ms, const TurnConfig& cfg, int n, int* max_wait = nullptr) {
    TurnState st;
    std::string order;
    int worst = 0;
    for (int i = 0; i < n; i++) {
        const TurnDecision d = plan_turn(ms, st, cfg);
        st = turn_advance(st, d);
        order += static_cast<char>('A' + d.model);
        for (TurnModel& m : ms) {
            if (m.n_seqs == 0) continue;
            if (m.model == d.model) {
                m.waited_steps = 0;
            } else {
                m.waited_steps++;
                worst = std::max(worst, m.waited_steps);
            }
        }
    }
    if (max_wait) *max_wait = worst;
    return order;
}

// One pass of a model's units through residency, announced twice over (so eviction sees them recur).
void one_pass(Residency& r, int model, int n_units) {
    std::vector<UnitRef> o;
    for (int c = 0; c < 2; c++)
        for (int u = 0; u < n_units; u++) o.push_back(UnitRef{model, u});
    r.set_schedule(o);
    for (int u = 0; u < n_units; u++) {
        r.acquire(UnitRef{model, u});
        r.release(UnitRef{model, u});
    }
}

std::string tmpdir() {
    char tmpl[] = "/tmp/lmx_turns_XXXXXX";
    return std::string(mkdtemp(tmpl));
}
}  // namespace

// ---- the policy (pure) ----

TEST(turns_borrow_for_a_deep_queue_when_the_borrowed_regions_hold_the_whole_model) {
    // The 75 % cell of bench/multimodel.py --small in MiB: a Llama-like model with half its layers in slots.
    std::vector<TurnModel> ms{streamed(0, 16, 3, 9, 6), streamed(1, 12, 5, 6, 14), streamed(2, 16, 7, 8, 16)};
    busy(ms[2], 16, 20);
    CHECK(turn_borrowable_slots(ms[2], ms) == 8 + 33 / 7 + 44 / 7);  // its 8 + what the two regions hold
    const TurnDecision d = plan_turn(ms, TurnState{}, TurnConfig{});
    CHECK(d.model == 2 && d.borrow);
    CHECK(d.n_steps == 20);  // alone with work: the whole queue
    // It lacks 8 slots: model 0's whole region (4 of them; its head and 7 cached layers, 6 + 7 x 3 MiB, come
    // back later) and 4 from model 1's (a 28 MiB prefix: at worst its 4 cached layers, 20 MiB; its head,
    // at the region's end, stays). Model 1 whole + 2 from model 0 would cost 34 + 15; both whole, 34 + 27.
    CHECK((d.lenders == std::vector<int>{0, 1}) && (d.lend_slots == std::vector<int>{4, 4}));
    CHECK(d.borrow_bytes_per_token < d.stream_bytes_per_token);
    // Streaming copies 16 - (8 - 2) = 10 layers a step, 70 MiB for 16 tokens; borrowing copies the 10
    // layers once, and what the lenders lost.
    CHECK_NEAR(d.stream_bytes_per_token, 10.0 * 7 * MiB / 16, 1.0);
    CHECK_NEAR(d.borrow_bytes_per_token, (70.0 + 0.5 * (27 + 20)) * MiB / (20 * 16), 1.0);  // idle lenders: half
}

TEST(turns_borrow_the_cheapest_regions_that_hold_the_model_not_every_cache) {
    // The 100 % cell: the Qwen-like model is 3 layers short. 3 of its slots from the SmolLM-like region (a
    // 15 MiB prefix: at worst 5 of its cached 3 MiB layers) are enough; the same from the Llama-like region
    // would lose 3 of its 7 MiB layers, and any whole region its head and whole cache.
    std::vector<TurnModel> ms{streamed(0, 16, 3, 14, 6), streamed(1, 12, 5, 9, 14), streamed(2, 16, 7, 12, 16)};
    busy(ms[1], 1, 17);
    TurnDecision d = plan_turn(ms, TurnState{}, TurnConfig{});
    CHECK(d.model == 1 && d.borrow && (d.lenders == std::vector<int>{0}) && (d.lend_slots == std::vector<int>{3}));
    CHECK_NEAR(d.borrow_bytes_per_token, (5.0 * 5 + 0.5 * 5 * 3) * MiB / 17, 1.0);
}

TEST(turns_take_the_idle_lenders_slots_before_a_busy_ones_of_equal_loss) {
    // A Llama-like model 4 slots short; two Qwen-like lenders of the same shape: either gives 4 slots (a
    // 28 MiB prefix, at worst its 4 cached 5 MiB layers). The one without work lends: the other runs next.
    for (int idle = 1; idle <= 2; idle++) {
        std::vector<TurnModel> ms{streamed(0, 16, 7, 12, 16), streamed(1, 12, 5, 6, 14), streamed(2, 12, 5, 6, 14)};
        busy(ms[0], 1, 20);
        busy(ms[3 - idle], 1, 20);
        ms[3 - idle].waited_steps = -1;  // it ran last: model 0's turn now
        const TurnDecision d = plan_turn(ms, TurnState{}, TurnConfig{});
        CHECK(d.model == 0 && d.borrow && (d.lenders == std::vector<int>{idle}) && (d.lend_slots == std::vector<int>{4}));
        CHECK_NEAR(d.borrow_bytes_per_token, (6.0 * 7 + 0.5 * 4 * 5) * MiB / 20, 1.0);  // its 6 uncached layers
    }
}

TEST(turns_price_a_busy_lenders_slots_by_what_they_hold_at_its_turn_where_the_link_refills_them) {
    // The 75 % cell, one request per model, after a prefill round: the Llama-like model (2) borrows for its
    // decode turn, 8 slots short. The Qwen-like model (1) is done (idle, its 7 layers cached); the SmolLM-like
    // one (0) runs next, but an earlier loan emptied its region: 4 of its 10 slots hold layers now.
    std::vector<TurnModel> ms{streamed(0, 16, 3, 10, 6), streamed(1, 12, 5, 7, 14), streamed(2, 16, 7, 8, 16)};
    busy(ms[2], 1, 15);
    busy(ms[0], 1, 15);
    ms[0].n_cached = 4;
    ms[1].n_cached = 7;
    ms[0].waited_steps = -1;  // model 2's turn now
    // Priced by their cache: model 0's whole region (5 slots) costs its head and 4 layers, 18 MiB, and 3
    // slots of model 1 (a 21 MiB prefix over 5 of its layers) half of 25: 30.5 MiB, against 33.5 for model 1
    // whole (half of 14 + 35) and 1 slot of model 0 (a 7 MiB prefix over 3 of its cached layers).
    TurnDecision d = plan_turn(ms, TurnState{}, TurnConfig{});
    CHECK(d.model == 2 && d.borrow && (d.lenders == std::vector<int>{0, 1}) && (d.lend_slots == std::vector<int>{5, 3}));
    // Where the link refills model 0's empty slots while model 2 computes, its whole region costs its head
    // and 10 layers (36 MiB) and 1 slot 3 layers (9 MiB): model 1 lends whole, model 0 one slot.
    TurnConfig refill;
    refill.refill_lenders = true;
    d = plan_turn(ms, TurnState{}, refill);
    CHECK(d.model == 2 && d.borrow && (d.lenders == std::vector<int>{0, 1}) && (d.lend_slots == std::vector<int>{1, 7}));
    CHECK_NEAR(d.borrow_bytes_per_token, (10.0 * 7 + 9 + 0.5 * 49) * MiB / 15, 1.0);  // its 10 uncached layers
}

TEST(turns_keep_a_loan_to_the_turns_end) {
    // The 75 % cell's borrowed turn (first test above): on its last step, priced afresh, one step would
    // stream, but the loan stands: dropping it would copy again the 8 layers the borrowed slots hold.
    std::vector<TurnModel> ms{streamed(0, 16, 3, 9, 6), streamed(1, 12, 5, 6, 14), streamed(2, 16, 7, 8, 16)};
    busy(ms[2], 16, 20);
    const TurnDecision d0 = plan_turn(ms, TurnState{}, TurnConfig{});
    CHECK(d0.borrow && (d0.lenders == std::vector<int>{0, 1}) && (d0.lend_slots == std::vector<int>{4, 4}));
    TurnState st = turn_advance(TurnState{}, d0);
    for (int i = 1; i < 19; i++) st = turn_advance(st, plan_turn(ms, st, TurnConfig{}));
    CHECK(st.n_steps == 19 && (st.lenders == d0.lenders) && (st.lend_slots == d0.lend_slots));
    busy(ms[2], 16, 1);
    ms[2].n_cached = 16;
    ms[0].n_cached = ms[1].n_cached = 0;
    ms[0].head_ready = false;
    const TurnDecision fresh = plan_turn(ms, TurnState{}, TurnConfig{});
    CHECK(!(fresh.borrow && fresh.lenders == d0.lenders && fresh.lend_slots == d0.lend_slots));
    const TurnDecision d = plan_turn(ms, st, TurnConfig{});
    CHECK(d.model == 2 && d.continues && d.borrow && (d.lenders == d0.lenders) && (d.lend_slots == d0.lend_slots));
}

TEST(turns_stream_a_one_step_turn_and_a_model_its_own_slots_hold) {
    std::vector<TurnModel> ms{streamed(0, 16, 3, 9, 6), streamed(1, 12, 5, 6, 14), streamed(2, 16, 7, 8, 16)};
    busy(ms[0], 1, 16);
    busy(ms[2], 1, 16);
    TurnConfig one;
    one.max_turn_steps = 1;  // others have work: a turn is one step, a loan cannot pay for itself
    TurnDecision d = plan_turn(ms, TurnState{}, one);
    CHECK(d.model == 0 && !d.borrow && d.n_steps == 1 && d.lenders.empty());
    // A model whose own slots hold all its layers never borrows, however long its turn.
    std::vector<TurnModel> fit{streamed(0, 4, 3, 4), streamed(1, 12, 5, 6)};
    fit[0].n_cached = 4;
    busy(fit[0], 8, 30);
    d = plan_turn(fit, TurnState{}, TurnConfig{});
    CHECK(d.model == 0 && !d.borrow && d.stream_bytes_per_token == 0);
    // A resident model neither borrows nor lends.
    fit[1].resident = true;
    busy(fit[1], 8, 30);
    CHECK(turn_borrowable_slots(fit[1], fit) == 0);
}

TEST(turns_rotate_by_longest_wait_and_no_model_waits_past_the_bound) {
    std::vector<TurnModel> ms{streamed(0, 16, 3, 4, 6), streamed(1, 12, 5, 3, 14), streamed(2, 16, 7, 4, 16)};
    for (TurnModel& m : ms) busy(m, 16, 1000);
    TurnConfig cfg;
    cfg.max_turn_steps = 4;
    int worst = 0;
    const std::string order = simulate(ms, cfg, 24, &worst);
    CHECK(order == "AAAABBBBCCCCAAAABBBBCCCC");  // borrowed turns of max_turn_steps, round the models
    CHECK(worst == (3 - 1) * cfg.max_turn_steps);  // the stated bound, reached exactly
    // One step left: a turn never outlasts the owner's work.
    std::vector<TurnModel> two{streamed(0, 16, 3, 4, 6), streamed(1, 12, 5, 3, 14)};
    busy(two[0], 16, 2);
    busy(two[1], 16, 1000);
    CHECK(plan_turn(two, TurnState{}, cfg).n_steps == 2);
}

TEST(turns_serve_first_tokens_first_then_drain) {
    // All three queues arrive at once: each model's turn is its prefill, so every request has its first
    // token after one round; the last model to start keeps the device into its decode steps.
    std::vector<TurnModel> ms = three_queues_at_once();
    TurnState st;
    TurnDecision d = plan_turn(ms, st, TurnConfig{});
    CHECK(d.model == 0 && d.n_steps == 4 && d.first_tokens);  // priced over its 4 prefill steps only
                                                              // (step time unmeasured: too long to drain)
    st = turn_advance(st, d);
    ms[0].n_unstarted = 0;  // its prompts have started; one is still in prefill
    ms[0].n_prefilling = 1;
    ms[1].waited_steps = ms[2].waited_steps = 1;
    d = plan_turn(ms, st, TurnConfig{});
    CHECK(d.model == 0 && d.continues);
    st = turn_advance(st, d);
    ms[0].n_prefilling = 0;  // prefill done: model 1 has not started, so the turn ends here
    ms[1].waited_steps = ms[2].waited_steps = 2;
    d = plan_turn(ms, st, TurnConfig{});
    CHECK(d.model == 1 && !d.continues && d.n_steps == 4);
    st = turn_advance(st, d);
    ms[1].n_unstarted = ms[1].n_prefilling = 0;
    ms[0].waited_steps = 1;
    ms[2].waited_steps = 3;
    st.n_steps = 4;  // model 1's prefill turn is over
    d = plan_turn(ms, st, TurnConfig{});
    CHECK(d.model == 2 && d.n_steps == 20 && d.borrow);  // no one else waits for a first token: the whole queue
}

TEST(turns_drain_when_the_first_tokens_can_wait_and_run_a_prefill_round_when_they_cannot) {
    // The three queues of the test above, with their step time and the link measured: model 0's drained
    // turn (20 steps, borrowing 7 slots of model 1's region: its 9 missing layers of 3 MiB and, at worst,
    // model 1's 4 cached layers of 5 MiB to copy back, 47 MiB) takes 47 MiB / 2.68 GB/s + 20 x 1 ms = 38.4 ms.
    std::vector<TurnModel> ms = three_queues_at_once();
    for (TurnModel& m : ms) {
        m.step_ms = 1.0;
        m.link_bytes_per_ms = 2.68e6;
    }
    TurnConfig cfg;
    cfg.first_token_ms = 100;  // the others' first tokens can wait 38.4 ms
    TurnDecision d = plan_turn(ms, TurnState{}, cfg);
    CHECK(d.model == 0 && !d.first_tokens && d.n_steps == 20 && d.borrow);
    CHECK(std::abs(d.drained_ms - 38.39) < 0.05);
    ms[0].waited_steps = 1;  // (model 0 still goes first)
    ms[1].waited_ms = 62;    // ...but not when one of them has already waited 62 ms of it
    d = plan_turn(ms, TurnState{}, cfg);
    CHECK(d.model == 0 && d.first_tokens && d.n_steps == 4);
    ms[1].waited_ms = 61;
    d = plan_turn(ms, TurnState{}, cfg);
    CHECK(d.model == 0 && !d.first_tokens && d.n_steps == 20);
    ms[0].waited_steps = 0;
    ms[1].waited_ms = 0;
    cfg.first_token_ms = 35;  // nor with a tighter bound
    d = plan_turn(ms, TurnState{}, cfg);
    CHECK(d.model == 0 && d.first_tokens && d.n_steps == 4);
    cfg.first_token_ms = 0;  // 0: always first tokens first, however short the turn
    for (TurnModel& m : ms) m.link_bytes_per_ms = 1e12;
    d = plan_turn(ms, TurnState{}, cfg);
    CHECK(d.first_tokens && d.n_steps == 4);
    for (TurnModel& m : ms) m.step_ms = 0;  // unmeasured: counts as too long
    d = plan_turn(ms, TurnState{}, TurnConfig{});
    CHECK(d.first_tokens && d.n_steps == 4);
}

TEST(turns_skip_a_model_with_no_prompt_left_in_a_prefill_round) {
    // Mid-round: model 0's prompts are in (it decodes), model 1 just ran its prefill turn, model 2 has not
    // started. Model 0 waited longest, but its drained turn (20 steps of 1 ms) would keep model 2's first
    // token waiting past 30 ms, and a prefill turn of it would be one decode step: model 2 runs instead.
    std::vector<TurnModel> ms = three_queues_at_once();
    for (TurnModel& m : ms) {
        m.step_ms = 1.0;
        m.link_bytes_per_ms = 2.68e6;
    }
    ms[0].n_unstarted = ms[0].n_prefilling = ms[0].prefill_steps = 0;
    ms[1].n_unstarted = ms[1].n_prefilling = ms[1].prefill_steps = 0;
    ms[0].waited_steps = 4;
    ms[2].waited_steps = 2;
    const TurnState st{1, 4, 4, false, true, {}, {}};
    TurnDecision d = plan_turn(ms, st, TurnConfig{});
    CHECK(d.model == 2 && !d.continues);
    // Overdue, model 0 runs (a one-step prefill turn: the bound on waits comes first).
    ms[0].waited_ms = 2000;
    d = plan_turn(ms, st, TurnConfig{});
    CHECK(d.model == 0 && d.first_tokens && d.n_steps == 1);
}

TEST(turns_cut_a_drained_turn_to_first_tokens_when_a_request_arrives_that_cannot_wait_for_it) {
    // Model 0 is 5 steps into a 20-step turn on model 1's region (all of its layers on device, model 1's
    // region lent: nothing left to copy); then model 1 gets a request.
    std::vector<TurnModel> ms{streamed(0, 16, 3, 9, 6), streamed(1, 12, 5, 6, 14)};
    busy(ms[0], 16, 15);
    ms[0].n_cached = 16;
    ms[1].n_cached = 0;
    ms[1].head_ready = false;
    for (TurnModel& m : ms) m.link_bytes_per_ms = 2.68e6;
    ms[0].step_ms = 1.0;
    const TurnState st{0, 5, 20, true, false, {1}, {0}};
    busy(ms[1], 1, 17);
    ms[1].n_unstarted = ms[1].n_prefilling = 1;
    ms[1].prefill_steps = 1;
    TurnDecision d = plan_turn(ms, st, TurnConfig{});
    CHECK(d.model == 0 && d.continues && !d.first_tokens);  // 15 more steps of 1 ms: its first token waits
    ms[0].step_ms = 10.0;                                     // 15 x 10 ms: it cannot wait
    d = plan_turn(ms, st, TurnConfig{});
    CHECK(d.model == 1 && !d.continues && !d.first_tokens);  // model 0 has no prompt left: its turn ends
    ms[0].n_prefilling = 1;  // a prompt of model 0 still in prefill: the turn goes on as a prefill turn
    ms[0].prefill_steps = 1;
    d = plan_turn(ms, st, TurnConfig{});
    CHECK(d.model == 0 && d.continues && d.first_tokens);
}

TEST(turns_end_once_another_model_has_waited_max_wait_ms) {
    std::vector<TurnModel> ms{streamed(0, 16, 3, 4, 6), streamed(1, 12, 5, 3, 14)};
    busy(ms[0], 16, 1000);
    busy(ms[1], 16, 1000);
    TurnConfig cfg;
    cfg.max_turn_steps = 10;
    cfg.max_wait_ms = 50;
    TurnState st{0, 3, 10, true, false, {1}, {0}};  // model 0 is 3 steps into a 10-step turn on model 1's region
    ms[1].waited_steps = 3;
    ms[1].waited_ms = 49;
    TurnDecision d = plan_turn(ms, st, cfg);
    CHECK(d.model == 0 && d.continues && d.borrow && (d.lenders == std::vector<int>{1}));
    ms[1].waited_ms = 50;
    d = plan_turn(ms, st, cfg);
    CHECK(d.model == 1 && !d.continues);
}

TEST(turns_scale_turn_length_by_weight) {
    std::vector<TurnModel> ms{streamed(0, 16, 3, 4, 6), streamed(1, 12, 5, 3, 14)};
    for (TurnModel& m : ms) busy(m, 16, 1000);
    ms[0].weight = 2.0;
    TurnConfig cfg;
    cfg.max_turn_steps = 4;
    CHECK(simulate(ms, cfg, 12) == "AAAABBAAAABB");  // borrowed turns: 4 and 4 * 1/2 steps
    // Streamed one-step turns (nothing to borrow) keep stride's proportion: 2 steps to 1.
    std::vector<TurnModel> rs{streamed(0, 4, 3, 4), streamed(1, 4, 3, 4)};
    for (TurnModel& m : rs) {
        busy(m, 4, 1000);
        m.region_bytes = 0;
    }
    rs[0].weight = 2.0;
    CHECK(simulate(rs, cfg, 9) == "AABAABAAB");
}

TEST(turns_min_prefill_chunk_hides_a_step_of_copies_behind_compute) {
    // 10 layers of 7 MiB at 2.4 GB/s = 30.6 ms of copies a step; 0.5 ms of compute a token -> 62 tokens.
    CHECK(turn_min_prefill_chunk(70 * MiB, 2.4e6, 0.5, 512) == 62);
    CHECK(turn_min_prefill_chunk(70 * MiB, 2.4e6, 0.5, 32) == 32);  // never past the step's budget
    CHECK(turn_min_prefill_chunk(0, 2.4e6, 0.5, 512) == 1);         // nothing streams
    CHECK(turn_min_prefill_chunk(70 * MiB, 0, 0.5, 512) == 1);      // link rate unknown yet
}

// ---- the scheduler with turns ----

TEST(scheduler_turns_run_a_borrowing_model_for_its_turn_and_name_the_lenders) {
    auto L = std::make_unique<Ledger>(std::make_unique<CpuDevice>(1 << 20), 1.0);
    KvCache ka(*L, "a", 1, 8, 16), kb(*L, "b", 1, 8, 16);
    Scheduler s(64, 8);
    s.add_model(0, 1.0, 4, &ka, 1000);
    s.add_model(1, 1.0, 4, &kb, 1000);
    TurnConfig cfg;
    cfg.max_turn_steps = 3;
    s.set_turns(cfg);
    std::vector<TurnModel> dev{streamed(0, 16, 3, 4, 6), streamed(1, 12, 5, 3, 14)};
    std::vector<std::unique_ptr<Sequence>> seqs;  // 2 per model, 3-token prompts, 100 tokens each
    for (int i = 0; i < 4; i++) {
        auto q = std::make_unique<Sequence>();
        q->id = i;
        q->model = i % 2;
        q->tokens = {1, 2, 3};
        q->n_prompt = 3;
        q->params.max_tokens = 100;
        s.add(q.get());
        seqs.push_back(std::move(q));
    }
    // The residency as the engine reports it: a borrowing model keeps what its slots hold, its lenders
    // lose their heads and caches; a streaming one keeps n_slots - depth layers and its head.
    auto ran = [&](const StepPlan& p) {
        TurnModel& r = dev[static_cast<size_t>(p.model)];
        TurnModel& o = dev[static_cast<size_t>(1 - p.model)];
        const int held = p.borrow ? turn_borrowable_slots(r, dev) : r.n_slots;
        r.n_cached = std::min(r.n_layer, held - 2);
        r.head_ready = true;
        if (p.borrow) {
            o.n_cached = 0;
            o.head_ready = false;
        } else {  // its regions came home: what its own slots held
            o.n_cached = std::min(o.n_cached, o.n_slots);
        }
    };
    std::string order;
    int n_new = 0, n_borrowed = 0, worst_wait = 0;
    int waited[2] = {0, 0};
    for (int i = 0; i < 12; i++) {
        StepPlan p = s.schedule(10.0 * i, dev);
        order += static_cast<char>('A' + p.model);
        n_new += p.new_turn ? 1 : 0;
        n_borrowed += p.borrow ? 1 : 0;
        if (i == 0) {  // B has not started: A's turn is its prefill, one step, streamed
            CHECK(!p.borrow && p.lenders.empty() && p.turn_steps == 1);
        }
        CHECK(p.borrow ? p.lenders == std::vector<int>{1 - p.model} : p.lenders.empty());
        waited[p.model] = 0;
        worst_wait = std::max(worst_wait, ++waited[1 - p.model]);
        ran(p);
        s.update(p);
        for (const PlanItem& it : p.items) it.seq->tokens.push_back(7);
    }
    CHECK(order.substr(0, 7) == "ABBBAAA");  // then turns of up to 3 steps, streamed or borrowed as priced
    CHECK(n_borrowed >= 6);
    CHECK(worst_wait <= 3);  // (2 models - 1) x max_turn_steps
    CHECK(n_new >= 4);
    const TurnState& t = s.turn_state();
    const std::vector<int> next = s.upcoming_models(4);
    CHECK(next.size() == 4);
    CHECK((next[0] == t.owner) == (t.n_steps < t.n_planned));  // the turn's steps first, then the other model
}

// ---- residency: lending a region ----

TEST(residency_lends_a_region_recarved_for_the_borrower_and_takes_it_back_with_its_head) {
    const std::string da = tmpdir(), db = tmpdir();
    auto wa = std::make_shared<const ModelWeights>(lmx_test::write_tiny_model(da, 4, 1), nullptr);
    auto wb = std::make_shared<const ModelWeights>(lmx_test::write_tiny_model(db, 6, 2), nullptr);
    auto L = std::make_unique<Ledger>(std::make_unique<CpuDevice>(8 << 20), 1.0);
    Residency r(*L, 0, Eviction::Belady);
    CHECK(r.add_model(0, wa, "a", false, 2));
    CHECK(r.add_model(1, wb, "b", false, 3));
    const uint64_t booked = L->snapshot().used_bytes;
    const int lent = static_cast<int>(r.model_info(1).region_bytes / wa->layer_unit_bytes());
    CHECK(lent >= 3);  // b's head + 3 slots hold at least 3 of a's layers
    auto pass = [&](int model, int n_units) { one_pass(r, model, n_units); };
    r.set_tenants(0, {1});
    CHECK(r.model_info(0).n_held_slots == 2 + lent);
    CHECK(r.model_info(1).n_held_slots == 0 && !r.model_info(1).head_ready);
    CHECK(L->snapshot().used_bytes == booked);  // a loan books and frees nothing
    pass(0, 5);
    const uint64_t misses = r.stats().n_misses;
    pass(0, 5);
    CHECK(r.stats().n_misses == misses);  // every layer of a stayed on device
    r.set_tenants(-1, {});                // the loan ends
    CHECK(r.model_info(0).n_held_slots == 2);
    CHECK(r.model_info(1).n_held_slots == 3 && r.model_info(1).n_cached == 0);
    const uint64_t bytes = r.stats().bytes_copied;
    pass(1, 7);  // b's head comes back on its first acquire
    CHECK(r.model_info(1).head_ready);
    CHECK(r.stats().bytes_copied - bytes == 6 * wb->layer_unit_bytes() + wb->unit(6).n_bytes);
    CHECK(r.n_pins(0) == 0 && r.n_pins(1) == 0);
}

TEST(residency_lends_part_of_a_region_and_the_lender_keeps_the_rest_with_its_layers) {
    const std::string da = tmpdir(), db = tmpdir();
    auto wa = std::make_shared<const ModelWeights>(lmx_test::write_tiny_model(da, 4, 1), nullptr);
    auto wb = std::make_shared<const ModelWeights>(lmx_test::write_tiny_model(db, 6, 2), nullptr);
    CHECK(wa->layer_unit_bytes() <= wb->layer_unit_bytes());  // one slot of a's fits in one of b's
    auto L = std::make_unique<Ledger>(std::make_unique<CpuDevice>(8 << 20), 1.0);
    Residency r(*L, 0, Eviction::Belady);
    CHECK(r.add_model(0, wa, "a", false, 2));
    CHECK(r.add_model(1, wb, "b", false, 3));
    const uint64_t booked = L->snapshot().used_bytes;
    auto pass = [&](int model, int n_units) { one_pass(r, model, n_units); };
    pass(1, 7);
    CHECK(r.model_info(1).n_cached == 3);  // b's three slots hold three of its layers
    r.set_tenants(0, {1}, {1});             // a borrows one slot's worth of b's region
    CHECK(r.model_info(0).n_held_slots == 3);
    CHECK(r.model_info(1).n_held_slots == 2 && r.model_info(1).n_cached == 2);  // the prefix took one slot
    CHECK(r.model_info(1).head_ready);      // and not the head, at the region's end
    CHECK(L->snapshot().used_bytes == booked);
    pass(0, 5);
    r.set_tenants(0, {1}, {1});  // the same loan: nothing moves
    CHECK(r.model_info(1).n_cached == 2);
    r.set_tenants(-1, {});       // the loan ends: the lent slot comes back empty, the others kept their layers
    CHECK(r.model_info(0).n_held_slots == 2);
    CHECK(r.model_info(1).n_held_slots == 3 && r.model_info(1).n_cached == 2 && r.model_info(1).head_ready);
    const uint64_t bytes = r.stats().bytes_copied;
    pass(1, 7);
    CHECK(r.stats().bytes_copied - bytes < 6 * wb->layer_unit_bytes());  // not all of b again
    r.set_tenants(0, {1});  // a whole loan after a partial one: b's head goes too
    CHECK(r.model_info(1).n_held_slots == 0 && !r.model_info(1).head_ready);
    r.set_tenants(-1, {});
    CHECK(r.n_pins(0) == 0 && r.n_pins(1) == 0);
}

TEST(residency_copies_past_the_prefetch_depth_only_into_slots_nothing_scheduled_needs) {
    const std::string da = tmpdir(), db = tmpdir();
    auto wa = std::make_shared<const ModelWeights>(lmx_test::write_tiny_model(da, 4, 1), nullptr);
    auto wb = std::make_shared<const ModelWeights>(lmx_test::write_tiny_model(db, 6, 2), nullptr);
    // A link model: copies run beside compute (unthrottled, the copy thread keeps to the depth:
    // test_core's residency_prefetch_loads_upcoming_units_before_compute_asks).
    auto L = std::make_unique<Ledger>(std::make_unique<CpuDevice>(8 << 20, 1, 50.0), 1.0);
    Residency r(*L, 1, Eviction::Belady);  // a copy thread, one copy ahead of compute
    CHECK(r.add_model(0, wa, "a", true, 0));
    CHECK(r.add_model(1, wb, "b", false, 3));
    auto held = [&](int unit) {
        const std::vector<int> su = r.slot_units(1);
        return std::count(su.begin(), su.end(), unit) == 1;
    };
    auto settle = [&](const std::vector<int>& units) {  // the copy thread works on its own: give it time
        auto all = [&] { return std::all_of(units.begin(), units.end(), held); };
        for (int i = 0; i < 2000 && !all(); i++) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        return all();
    };
    // a (resident) computes, then b's six layers: b's three empty slots fill, though one copy is the depth.
    std::vector<UnitRef> order;
    for (int u = 0; u < 5; u++) order.push_back(UnitRef{0, u});
    for (int u = 0; u < 6; u++) order.push_back(UnitRef{1, u});
    const uint64_t bytes0 = r.stats().bytes_copied;
    r.set_schedule(order);
    CHECK(settle({0, 1, 2}));
    // Layer 3 would evict a layer needed before it: past the depth it waits.
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    CHECK((r.slot_units(1) == std::vector<int>{0, 1, 2}));
    CHECK(r.stats().bytes_copied - bytes0 == 3 * wb->layer_unit_bytes());
    // A schedule that needs none of them: the one copy ahead, and one more over a layer no longer scheduled.
    r.set_schedule({UnitRef{1, 3}, UnitRef{1, 4}});
    CHECK(settle({3, 4}));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    CHECK(r.stats().bytes_copied - bytes0 == 5 * wb->layer_unit_bytes());
}

// ---- the engine ----

namespace {
struct Run {
    std::map<int64_t, std::vector<int32_t>> tokens;
    std::vector<int> step_models;
    EngineStats stats;
};

// Three streamed tiny models (3 layers, 1 own slot each: a loan of the other two regions holds a whole
// model), n requests per model submitted while the step thread is held, so all are queued at once.
Run run_three(const std::vector<ModelSpec>& specs, int max_turn_steps, int n_per_model, const std::vector<int>& only = {}) {
    EngineConfig c;
    c.budget_bytes = 32 << 20;
    c.n_threads = 2;
    c.max_turn_steps = max_turn_steps;
    Engine e(c);
    for (const ModelSpec& s : specs) {
        ModelLoadOptions o;
        o.residency = ResidencyMode::Streamed;
        o.stream_slots = 1;
        e.load_model(s, o, nullptr);
    }
    e.trace_enable(100000);
    e.debug_stall(true);
    int n_open = 0;
    for (size_t m = 0; m < specs.size(); m++) {
        if (!only.empty() && std::find(only.begin(), only.end(), static_cast<int>(m)) == only.end()) continue;
        for (int i = 0; i < n_per_model; i++) {
            SamplingParams p;
            p.temperature = 0.8f;
            p.seed = static_cast<uint64_t>(100 + 10 * m + i);
            p.max_tokens = 6 + 3 * i;
            p.ignore_eos = true;
            const int64_t id = static_cast<int64_t>(m * 100 + i);
            std::vector<int32_t> prompt;
            for (int k = 0; k < 3 + i; k++) prompt.push_back(static_cast<int32_t>((id * 7 + k) % 60 + 1));
            e.submit(id, specs[m].name, prompt, p);
            n_open++;
        }
    }
    e.debug_stall(false);
    Run out;
    for (int i = 0; i < 20000 && n_open > 0; i++) {
        for (const EngineEvent& ev : e.drain_events()) {
            if (ev.kind == EventKind::Token) out.tokens[ev.req_id].push_back(ev.token);
            else n_open--;
        }
        if (n_open > 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    CHECK(n_open == 0);
    for (const StepTrace& st : e.trace_take().steps) out.step_models.push_back(st.model);
    out.stats = e.stats();
    return out;
}

std::vector<ModelSpec> three_models() {
    std::vector<ModelSpec> specs;
    for (int m = 0; m < 3; m++) {
        ModelSpec s = lmx_test::write_tiny_model(tmpdir(), 3, 10 + static_cast<unsigned>(m));
        s.name = "tiny" + std::to_string(m);
        specs.push_back(s);
    }
    return specs;
}
}  // namespace

TEST(engine_adaptive_turns_give_the_tokens_of_per_step_streaming_and_of_each_request_alone) {
    const std::vector<ModelSpec> specs = three_models();
    const Run turns = run_three(specs, 4, 4);
    const Run stream = run_three(specs, 0, 4);
    CHECK(turns.stats.n_borrow_turns > 0);  // the turns really borrowed
    CHECK(stream.stats.n_borrow_turns == 0);
    CHECK(turns.tokens.size() == 12);
    CHECK(turns.tokens == stream.tokens);
    // Each model alone (its regions lent to no one, or to itself when alone) gives the same tokens.
    for (int m = 0; m < 3; m++) {
        const Run alone = run_three(specs, 4, 4, {m});
        for (const auto& kv : alone.tokens) CHECK(turns.tokens.at(kv.first) == kv.second);
    }
}

TEST(engine_turns_keep_every_model_with_work_within_the_starvation_bound) {
    const std::vector<ModelSpec> specs = three_models();
    const int T = 3;
    const Run r = run_three(specs, T, 4);
    // Replay the steps: a model has work from the start until its last step.
    std::map<int, size_t> last;
    for (size_t i = 0; i < r.step_models.size(); i++) last[r.step_models[i]] = i;
    CHECK(last.size() == 3);
    int worst = 0, longest_turn = 0, run = 0;
    std::map<int, int> waited;
    for (size_t i = 0; i < r.step_models.size(); i++) {
        const int m = r.step_models[i];
        run = i > 0 && r.step_models[i - 1] == m ? run + 1 : 1;
        bool company = false;  // another model still has work: the turn cap applies
        for (const auto& kv : last) company = company || (kv.first != m && i < kv.second);
        if (company) longest_turn = std::max(longest_turn, run);
        for (auto& kv : last) {
            if (kv.first == m) {
                waited[m] = 0;
            } else if (i < kv.second) {
                worst = std::max(worst, ++waited[kv.first]);
            }
        }
    }
    CHECK(longest_turn > 1);           // turns, not per-step interleaving
    CHECK(longest_turn <= T);          // no turn past max_turn_steps while others have work...
    CHECK(worst <= (3 - 1) * T);       // ...so no model with work waits past the bound
    CHECK(r.stats.n_turns >= 3);
}
