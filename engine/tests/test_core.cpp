// test_core.cpp — ledger, CPU arena, paged KV, the scheduler as a step function, residency policy.
// Owner: engine tests. Expectations are exact: which sequences run, which unit is evicted.
#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <thread>

#include "check.h"
#include "engine.h"
#include "kv_cache.h"
#include "ledger.h"
#include "residency.h"
#include "scheduler.h"
#include "tiny_model.h"

using namespace lmx;

namespace {
std::unique_ptr<Ledger> make_ledger(uint64_t budget, double cap = 0.9) {
    return std::make_unique<Ledger>(std::make_unique<CpuDevice>(budget), cap);
}
std::string tmpdir() {
    char tmpl[] = "/tmp/lmx_core_XXXXXX";
    return std::string(mkdtemp(tmpl));
}
std::unique_ptr<Sequence> make_seq(int64_t id, int model, int n_prompt, int max_tokens = 4) {
    auto s = std::make_unique<Sequence>();
    s->id = id;
    s->model = model;
    for (int i = 0; i < n_prompt; i++) s->tokens.push_back(i % 50 + 1);
    s->n_prompt = n_prompt;
    s->params.max_tokens = max_tokens;
    return s;
}
}  // namespace

TEST(ledger_refuses_past_cap_as_a_normal_result_and_returns_to_zero) {
    auto L = make_ledger(1000 * 64, 0.5);  // cap 32000 bytes
    CHECK(L->cap_bytes() == 32000);
    DeviceBuffer a = L->alloc("m", BookKind::Weights, 20000);
    CHECK(static_cast<bool>(a));
    DeviceBuffer b = L->alloc("m", BookKind::Kv, 20000);  // would pass the cap
    CHECK(!b);
    CHECK(L->snapshot().n_denied == 1);
    CHECK(L->snapshot().owners["m"].weights_bytes == 20032);  // booked in 64-byte units
    L->free(a);
    CHECK(L->snapshot().used_bytes == 0);
    CHECK(L->snapshot().owners.empty());
}

TEST(cpu_arena_coalesces_freed_ranges) {
    CpuDevice d(64 * 10);
    void* p[10];
    for (auto& x : p) x = d.alloc(64);
    CHECK(d.alloc(64) == nullptr);  // full
    d.free(p[3]);
    d.free(p[5]);
    CHECK(d.alloc(128) == nullptr);  // two holes, not adjacent
    d.free(p[4]);
    void* q = d.alloc(192);  // 3,4,5 merged
    CHECK(q == p[3]);
}

// A GPU device's memory is several allocations: a range may never span two of them, so freed
// neighbours merge only within one block (the `boundary`), from either end.
TEST(range_alloc_never_merges_or_places_across_a_boundary) {
    RangeAlloc r(256, 64, 128);  // blocks [0, 128) and [128, 256)
    CHECK(!r.alloc(192, Placement::Low).has_value());  // no block holds 192
    const auto a = r.alloc(64, Placement::Low), b = r.alloc(64, Placement::Low);
    const auto c = r.alloc(64, Placement::High), d = r.alloc(64, Placement::High);
    CHECK(a == 0u && b == 64u && c == 192u && d == 128u);
    CHECK(r.free(*b) == 64u && r.free(*d) == 64u);  // 64..192 free, but in two blocks
    CHECK(!r.alloc(128, Placement::Low).has_value());
    CHECK(r.free(*a) == 64u && r.free(*c) == 64u);
    CHECK(r.alloc(128, Placement::High) == 128u);
    CHECK(r.alloc(128, Placement::Low) == 0u);
    CHECK(!r.alloc(1, Placement::Low).has_value());
}

TEST(cpu_arena_places_high_from_the_top_and_low_from_the_bottom) {
    CpuDevice d(64 * 10);
    auto* base = static_cast<uint8_t*>(d.alloc(64, Placement::Low));
    auto* top = static_cast<uint8_t*>(d.alloc(128, Placement::High));
    CHECK(top == base + 64 * 8);  // the last two units
    auto* low2 = static_cast<uint8_t*>(d.alloc(64, Placement::Low));
    CHECK(low2 == base + 64);
    d.free(base);
    // High takes the highest range that fits: the 5-unit middle one, at its end, not the hole at 0.
    auto* mid = static_cast<uint8_t*>(d.alloc(64, Placement::High));
    CHECK(mid == base + 64 * 7);
    CHECK(d.alloc(64 * 6, Placement::High) == nullptr);  // 1 + 5 units free, apart
    CHECK(d.alloc(64 * 5, Placement::High) == base + 64 * 2);
    CHECK(d.alloc(64, Placement::High) == base);  // the hole at 0 last
    CHECK(d.alloc(64, Placement::Low) == nullptr);  // full
}

TEST(ledger_keeps_kv_blocks_away_from_weights_so_a_swapped_out_model_leaves_one_hole) {
    // Whole-model swapping: model A's weights, KV blocks booked while A runs, A swapped out,
    // more KV, then model B's weights. With weights at the top and KV at the bottom, A's bytes
    // and the free middle form one range; with first fit alone B would find 30 + 50 units apart.
    auto L = make_ledger(64 * 100, 1.0);
    DeviceBuffer a = L->alloc("a", BookKind::Weights, 64 * 40);
    CHECK(a);
    std::vector<DeviceBuffer> kv;
    for (int i = 0; i < 10; i++) kv.push_back(L->alloc("a", BookKind::Kv, 64));
    L->free(a);
    for (int i = 0; i < 10; i++) kv.push_back(L->alloc("b", BookKind::Kv, 64));
    for (auto& k : kv) CHECK(k);
    DeviceBuffer b = L->alloc("b", BookKind::Weights, 64 * 80);
    CHECK(b);
    L->free(b);
    for (auto& k : kv) L->free(k);
    CHECK(L->snapshot().used_bytes == 0);
}

TEST(kv_reserve_is_all_or_nothing) {
    auto L = make_ledger(64 * 1024, 1.0);
    KvCache kv(*L, "m", 2, 16, 4);  // block = 2*2*4*16*4 = 1024 bytes
    CHECK(kv.block_bytes() == 1024);
    CHECK(kv.bytes_for(5) == 2048);
    std::vector<int32_t> t1;
    CHECK(kv.reserve(t1, 4 * 60) == BookResult::Ok);  // 60 blocks
    std::vector<int32_t> t2;
    CHECK(kv.reserve(t2, 4 * 10) == BookResult::NoSpace);  // only 4 left
    CHECK(t2.empty());
    CHECK(kv.n_blocks_in_use() == 60);
    kv.release(t1);
    CHECK(L->snapshot().used_bytes == 0);
}

TEST(scheduler_splits_steps_by_weight_with_stride) {
    auto L = make_ledger(1 << 20, 1.0);
    KvCache kva(*L, "a", 1, 8, 16), kvb(*L, "b", 1, 8, 16);
    Scheduler s(64, 8);
    s.add_model(0, 2.0, 4, &kva, 1000);
    s.add_model(1, 1.0, 4, &kvb, 1000);
    auto a = make_seq(1, 0, 2, 1000), b = make_seq(2, 1, 2, 1000);
    s.add(a.get());
    s.add(b.get());
    std::string order;
    for (int i = 0; i < 9; i++) {
        StepPlan p = s.schedule();
        order += p.model == 0 ? 'A' : 'B';
        s.update(p);
        for (const PlanItem& it : p.items) it.seq->tokens.push_back(7);  // as if sampled
    }
    CHECK(order == "ABAABAABA");
}

TEST(scheduler_batches_decode_first_then_prompt_chunks_within_token_budget) {
    auto L = make_ledger(1 << 20, 1.0);
    KvCache kv(*L, "a", 1, 8, 4);
    Scheduler s(10, 8);
    s.add_model(0, 1.0, 8, &kv, 1000);
    auto x = make_seq(1, 0, 4), y = make_seq(2, 0, 4), z = make_seq(3, 0, 4);
    s.add(x.get());
    s.add(y.get());
    s.add(z.get());
    StepPlan p = s.schedule();
    CHECK(p.items.size() == 3);
    CHECK(p.items[0].seq == x.get() && p.items[0].n_tokens == 4 && p.items[0].samples);
    CHECK(p.items[1].seq == y.get() && p.items[1].n_tokens == 4 && p.items[1].samples);
    CHECK(p.items[2].seq == z.get() && p.items[2].n_tokens == 2 && !p.items[2].samples);
    s.update(p);
    x->tokens.push_back(9);
    y->tokens.push_back(9);
    p = s.schedule();  // decodes of x and y first, then z's remaining chunk
    CHECK(p.items.size() == 3);
    CHECK(p.items[0].seq == x.get() && p.items[0].n_tokens == 1);
    CHECK(p.items[1].seq == y.get() && p.items[1].n_tokens == 1);
    CHECK(p.items[2].seq == z.get() && p.items[2].n_tokens == 2 && p.items[2].samples);
}

TEST(scheduler_preempts_newest_when_kv_runs_out_and_it_holds_nothing) {
    // Room for exactly 3 blocks of 4 tokens.
    auto L2 = make_ledger(3 * 512, 1.0);
    KvCache kv2(*L2, "a", 1, 16, 4);  // block = 1*2*4*16*4 = 512 bytes
    Scheduler s(64, 8);
    s.add_model(0, 1.0, 8, &kv2, 1000);
    auto x = make_seq(1, 0, 4, 100), y = make_seq(2, 0, 4, 100);
    s.add(x.get());
    s.add(y.get());
    StepPlan p = s.schedule();  // x: 1 block, y: 1 block
    CHECK(p.items.size() == 2);
    s.update(p);
    x->tokens.push_back(5);
    y->tokens.push_back(5);
    p = s.schedule();  // both need a 2nd block; only 1 left: y (newest) is preempted
    CHECK(p.items.size() == 1 && p.items[0].seq == x.get());
    CHECK(p.preempted.size() == 1 && p.preempted[0] == y.get());
    CHECK(y->blocks.empty() && y->n_computed == 0 && y->state == SeqState::Waiting);
    CHECK(kv2.n_blocks_in_use() == 2);
    s.update(p);
    s.finish(x.get());
    CHECK(kv2.n_blocks_in_use() == 0);
    p = s.schedule();  // y resumes: recomputes its 5 tokens
    CHECK(p.items.size() == 1 && p.items[0].seq == y.get() && p.items[0].n_tokens == 5 && p.items[0].samples);
}

TEST(scheduler_rejects_a_sequence_that_cannot_fit_even_alone) {
    auto L = make_ledger(2 * 512, 1.0);
    KvCache kv(*L, "a", 1, 16, 4);
    Scheduler s(64, 8);
    s.add_model(0, 1.0, 8, &kv, 1000);
    auto x = make_seq(1, 0, 12);  // 3 blocks, 2 fit
    s.add(x.get());
    StepPlan p = s.schedule();
    CHECK(p.empty());
    CHECK(p.rejected.size() == 1 && p.rejected[0] == x.get());
    CHECK(!s.has_work());
}

TEST(scheduler_rejects_a_running_sequence_that_outgrows_the_device_alone) {
    // Room for 2 blocks of 4 tokens: x fits as a prompt, then grows past what the device holds.
    auto L = make_ledger(2 * 512, 1.0);
    KvCache kv(*L, "a", 1, 16, 4);
    Scheduler s(64, 8);
    s.add_model(0, 1.0, 8, &kv, 1000);
    auto x = make_seq(1, 0, 7, 100);
    s.add(x.get());
    StepPlan p = s.schedule();  // 7 tokens: 2 blocks
    CHECK(p.items.size() == 1 && kv.n_blocks_in_use() == 2);
    s.update(p);
    x->tokens.push_back(5);
    p = s.schedule();  // position 8 fits the 2nd block
    CHECK(p.items.size() == 1 && p.items[0].n_tokens == 1);
    s.update(p);
    x->tokens.push_back(6);
    p = s.schedule();  // position 9 needs a 3rd block; x alone holds every block: rejected, not preempted
    CHECK(p.empty() && p.preempted.empty());
    CHECK(p.rejected.size() == 1 && p.rejected[0] == x.get() && x->state == SeqState::Finished);
    CHECK(kv.n_blocks_in_use() == 0 && !s.has_work());
}

namespace {
// Acquires units in order with release, as forward_step does.
void scan(Residency& r, int model, int n_units) {
    for (int u = 0; u < n_units; u++) {
        r.acquire(UnitRef{model, u});
        r.release(UnitRef{model, u});
    }
}
std::vector<UnitRef> cycles(int model, int n_units, int n) {
    std::vector<UnitRef> o;
    for (int c = 0; c < n; c++)
        for (int u = 0; u < n_units; u++) o.push_back(UnitRef{model, u});
    return o;
}
}  // namespace

TEST(residency_belady_keeps_a_stable_subset_where_lru_misses_every_time) {
    const std::string dir = tmpdir();
    auto w = std::make_shared<const ModelWeights>(lmx_test::write_tiny_model(dir, 5), nullptr);  // 5 layers + head
    uint64_t misses[2];
    for (int pol = 0; pol < 2; pol++) {
        auto L = make_ledger(8 << 20, 1.0);
        Residency r(*L, 0, pol == 0 ? Eviction::Belady : Eviction::Lru);
        CHECK(r.add_model(0, w, "tiny", false, 3));
        r.set_schedule(cycles(0, 6, 2));
        scan(r, 0, 6);
        if (pol == 0) {
            CHECK((r.slot_units(0) == std::vector<int>{0, 1, 4}));  // 2 then 3 were next used farthest
        } else {
            CHECK((r.slot_units(0) == std::vector<int>{3, 4, 2}));  // 0 then 1 were least recent
        }
        const uint64_t before = r.stats().n_misses;
        scan(r, 0, 6);
        misses[pol] = r.stats().n_misses - before;
    }
    CHECK(misses[1] == 5);  // LRU: every unit of the second pass missed
    CHECK(misses[0] == 2);  // MIN: 0, 1 and 4 stayed resident
}

TEST(residency_prefetch_loads_upcoming_units_before_compute_asks) {
    const std::string dir = tmpdir();
    auto w = std::make_shared<const ModelWeights>(lmx_test::write_tiny_model(dir, 4), nullptr);
    auto L = make_ledger(8 << 20, 1.0);
    Residency r(*L, 2, Eviction::Belady);
    CHECK(r.add_model(0, w, "tiny", false, 3));
    r.set_schedule(cycles(0, 5, 1));  // 4 layers + the resident head
    std::vector<int> slots;
    // The copy thread fills units 0 and 1 (depth 2) on its own, and no more: unthrottled, a CPU copy runs on
    // compute's cores (Device::copies_beside_compute; with a link model it goes on past the depth into
    // free slots, test_turns.cpp).
    for (int i = 0; i < 400; i++) {
        slots = r.slot_units(0);
        if (slots == std::vector<int>{0, 1, -1}) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    slots = r.slot_units(0);
    CHECK((slots == std::vector<int>{0, 1, -1}));
    scan(r, 0, 5);
    CHECK(r.stats().n_loads == 4);  // layers only: the head never streams
}

TEST(residency_prefetch_depth_counts_copies_so_cached_units_do_not_hide_the_next_miss) {
    const std::string dir = tmpdir();
    auto w = std::make_shared<const ModelWeights>(lmx_test::write_tiny_model(dir, 4), nullptr);
    auto L = make_ledger(8 << 20, 1.0);
    Residency r(*L, 1, Eviction::Belady);  // one copy ahead of compute
    CHECK(r.add_model(0, w, "tiny", false, 3));
    r.set_schedule(cycles(0, 5, 2));
    scan(r, 0, 5);  // pass 1 loads the 4 layers through 3 slots
    // Pass 2 starts with cached units; a window of schedule positions would see
    // only hits and copy nothing. Counting copies, the first miss of pass 2 loads
    // now, and only it (depth 1).
    uint64_t loads = 0;
    for (int i = 0; i < 400 && loads < 5; i++) {
        loads = r.stats().n_loads;
        if (loads < 5) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    CHECK(loads == 5);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    CHECK(r.stats().n_loads == 5);
    const uint64_t misses = r.stats().n_misses;
    scan(r, 0, 5);
    CHECK(r.stats().n_loads == 6);  // pass 2 misses one unit only: the 5th load was done ahead
    CHECK(r.stats().n_misses - misses <= 1);
}

TEST(residency_swap_in_evicts_the_model_needed_last_and_places_around_kv_blocks) {
    const std::string dir = tmpdir();
    auto w = std::make_shared<const ModelWeights>(lmx_test::write_tiny_model(dir, 2), nullptr);
    const uint64_t S = w->total_unit_bytes();  // every unit is a multiple of 64 bytes: no alignment slack
    // Room for two models, two 64-byte KV blocks and half a model: the third swap must evict one.
    auto L = make_ledger(2 * S + 128 + S / 2 / 64 * 64, 1.0);
    Residency r(*L, 0, Eviction::Belady);
    for (int m = 0; m < 3; m++) r.add_swap_model(m, w, "m" + std::to_string(m));
    std::vector<UnitRef> order;
    for (int m : {0, 1, 2, 1, 0})
        for (int u = 0; u < 3; u++) order.push_back(UnitRef{m, u});
    r.set_schedule(order);
    scan(r, 0, 3);
    DeviceBuffer kv0 = L->alloc("m0", BookKind::Kv, 64);  // between model 0 and model 1
    scan(r, 1, 3);
    DeviceBuffer kv1 = L->alloc("m1", BookKind::Kv, 64);
    CHECK(kv0 && kv1);
    scan(r, 2, 3);  // model 0 is needed after model 1 again: it goes, model 1 stays
    CHECK(r.model_info(0).n_units_loaded == 0);
    CHECK(r.model_info(1).n_units_loaded == 3);
    CHECK(r.model_info(2).n_units_loaded == 3);
    CHECK(r.stats().bytes_copied == 3 * S);
    CHECK(L->snapshot().owners["m2"].weights_bytes == S);
    L->free(kv0);
    L->free(kv1);
}

TEST(residency_refuses_a_model_whose_bytes_do_not_fit_and_books_nothing) {
    const std::string dir = tmpdir();
    auto w = std::make_shared<const ModelWeights>(lmx_test::write_tiny_model(dir, 4), nullptr);
    auto L = make_ledger(w->total_unit_bytes() / 2, 1.0);
    Residency r(*L, 1, Eviction::Belady);
    CHECK(!r.add_model(0, w, "tiny", true, 0));
    CHECK(L->snapshot().used_bytes == 0);
    CHECK(!r.add_model(0, w, "tiny", false, 2));  // head + 2 layers > half the weights: refused whole
    CHECK(L->snapshot().used_bytes == 0);
    CHECK(r.add_model(0, w, "tiny", false, 1));
    CHECK(L->snapshot().used_bytes == w->unit(4).n_bytes + w->layer_unit_bytes());
}

TEST(engine_streamed_and_resident_generate_the_same_tokens) {
    const std::string dir = tmpdir();
    ModelSpec spec = lmx_test::write_tiny_model(dir, 3);
    std::vector<std::vector<int32_t>> outs;
    for (ResidencyMode residency : {ResidencyMode::Resident, ResidencyMode::Streamed}) {
        EngineConfig c;
        c.budget_bytes = 16 << 20;
        c.n_threads = 2;
        Engine e(c);
        ModelLoadOptions o;
        o.residency = residency;
        o.stream_slots = 2;
        e.load_model(spec, o, nullptr);
        SamplingParams p;
        p.temperature = 0.7f;
        p.seed = 42;
        p.max_tokens = 12;
        p.ignore_eos = true;
        e.submit(1, "tiny", {1, 2, 3, 4, 5}, p);
        std::vector<int32_t> toks;
        bool done = false;
        for (int i = 0; i < 2000 && !done; i++) {
            for (const EngineEvent& ev : e.drain_events()) {
                if (ev.kind == EventKind::Token) toks.push_back(ev.token);
                if (ev.kind != EventKind::Token) done = true;
            }
            if (!done) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
        CHECK(done);
        CHECK(toks.size() == 12);
        outs.push_back(toks);
    }
    CHECK(outs[0] == outs[1]);
}
