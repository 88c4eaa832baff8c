// turns.cpp — the adaptive-turn policy (turns.h): price a turn streamed and borrowed, pick the cheaper,
// rotate turns by longest wait. Owner: engine core. Thread-safety: pure functions.
#include "turns.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <limits>

namespace lmx {

namespace {
bool busy(const TurnModel& m) { return m.n_seqs > 0; }

// Copies of one warm step with `slots` slots: the layers beyond the stable subset.
int step_copies(const TurnModel& m, int slots, int depth) {
    if (m.resident || slots >= m.n_layer) return 0;
    return m.n_layer - std::max(0, slots - depth);
}

// Longest wait first: steps, then milliseconds, then the lower stride pass, then the lower id.
bool waited_longer(const TurnModel& a, const TurnModel& b) {
    if (a.waited_steps != b.waited_steps) return a.waited_steps > b.waited_steps;
    if (a.waited_ms != b.waited_ms) return a.waited_ms > b.waited_ms;
    if (a.pass != b.pass) return a.pass < b.pass;
    return a.model < b.model;
}
}  // namespace

int turn_borrowable_slots(const TurnModel& m, const std::vector<TurnModel>& models) {
    if (m.resident || m.layer_bytes == 0) return 0;
    int n = m.n_slots;
    for (const TurnModel& o : models)
        if (o.model != m.model && !o.resident) n += static_cast<int>(o.region_bytes / m.layer_bytes);
    return n;
}

uint64_t turn_stream_step_bytes(const TurnModel& m, int slots, int prefetch_depth) {
    return static_cast<uint64_t>(step_copies(m, slots, prefetch_depth)) * m.layer_bytes;
}

TurnState turn_advance(const TurnState& state, const TurnDecision& d) {
    if (d.model < 0) return TurnState{};
    if (d.continues && state.owner == d.model) {
        TurnState s = state;
        s.n_steps++;
        s.borrow = d.borrow;
        return s;
    }
    return TurnState{d.model, 1, d.n_steps, d.borrow};
}

TurnDecision plan_turn(const std::vector<TurnModel>& models, const TurnState& state, const TurnConfig& cfg) {
    assert(cfg.max_turn_steps >= 1);
    TurnDecision d;
    std::vector<const TurnModel*> live;
    double w_max = 0, w_min = std::numeric_limits<double>::infinity();
    for (const TurnModel& m : models)
        if (busy(m)) {
            live.push_back(&m);
            w_max = std::max(w_max, m.weight);
            w_min = std::min(w_min, m.weight);
        }
    if (live.empty()) return d;
    auto turn_cap = [&](const TurnModel& m) {
        if (live.size() == 1) return std::numeric_limits<int>::max();  // alone: as long as it has work
        return std::max(1, static_cast<int>(std::floor(cfg.max_turn_steps * m.weight / w_max)));
    };
    auto overdue_other = [&](int owner) {
        for (const TurnModel* m : live)
            if (m->model != owner && m->waited_ms >= cfg.max_wait_ms) return true;
        return false;
    };
    auto unstarted_other = [&](int owner) {  // first tokens first
        for (const TurnModel* m : live)
            if (m->model != owner && m->n_unstarted > 0) return true;
        return false;
    };

    // 1. The turn in progress goes on while it has work, steps left and no one else is overdue.
    //    Its cap is re-read: a model that was alone may have company now. A prefill turn (another
    //    model waits for first tokens) runs until its model's prompts are in, however many steps its
    //    decodes stretch that to; any other turn runs its planned steps.
    const TurnModel* next = nullptr;
    int cont_cap = 0;
    for (const TurnModel* m : live) {
        if (m->model != state.owner) continue;
        const int cap = unstarted_other(m->model) ? (m->n_prefilling > 0 ? turn_cap(*m) : 0)
                                                  : std::min(state.n_planned, turn_cap(*m));
        if (state.n_steps < cap && !overdue_other(m->model)) {
            next = m;
            cont_cap = cap;
        }
    }
    // 2. Else a new turn for the longest waiter; the previous owner, if it still has work, waits for the others.
    if (next == nullptr) {
        for (const TurnModel* m : live) {
            if (live.size() > 1 && m->model == state.owner) continue;
            if (next == nullptr || waited_longer(*m, *next)) next = m;
        }
    }
    // 3. Price the turn's remaining steps both ways, at every step: new work or a finished sequence can
    //    tip the balance within a turn.
    const TurnModel& m = *next;
    d.model = m.model;
    d.continues = cont_cap > 0;
    const int depth = cfg.prefetch_depth;
    int k = std::max(1, std::min(d.continues ? cont_cap - state.n_steps : turn_cap(m), m.n_steps_left));
    const bool first_tokens = unstarted_other(m.model);
    if (first_tokens) k = std::max(1, std::min(k, m.prefill_steps));  // its prefill only
    const double tokens = static_cast<double>(k) * std::max(1, m.gen_per_step);
    const double L = static_cast<double>(m.layer_bytes);

    // Streaming: its own slots; the first step also refills what a loan took (its head, its cache).
    const int c_own = step_copies(m, m.n_slots, depth);
    const int stable = m.n_slots >= m.n_layer ? m.n_layer : std::max(0, m.n_slots - depth);
    const int cold = m.resident ? 0 : std::max(0, stable - m.n_cached);
    const double head = m.head_ready ? 0.0 : static_cast<double>(m.head_bytes);
    const double stream_bytes = head + (static_cast<double>(c_own) * k + cold) * L;
    d.stream_bytes_per_token = stream_bytes / tokens;

    // Borrowing: the regions of other streamed models, for k steps. Every set of lenders is priced (each
    // lender must copy back its head and cache) and the cheapest wins: a model a few slots short borrows
    // one idle region, not every model's cache. Past kMaxLenders candidates, the cheapest per slot first.
    struct Loan {
        int model;
        int slots;
        double cost;
    };
    std::vector<Loan> loans;
    if (!m.resident && m.layer_bytes > 0)
        for (const TurnModel& o : models) {
            if (o.model == m.model || o.resident || o.region_bytes == 0) continue;
            const int slots = static_cast<int>(o.region_bytes / m.layer_bytes);
            if (slots == 0) continue;
            loans.push_back({o.model, slots,
                             (o.head_ready ? static_cast<double>(o.head_bytes) : 0.0) +
                                 static_cast<double>(o.n_cached) * static_cast<double>(o.layer_bytes)});
        }
    constexpr size_t kMaxLenders = 10;
    if (loans.size() > kMaxLenders) {
        std::stable_sort(loans.begin(), loans.end(),
                         [](const Loan& a, const Loan& b) { return a.cost * b.slots < b.cost * a.slots; });
        loans.resize(kMaxLenders);
    }
    const int first = std::max(0, m.n_layer - m.n_cached);
    double borrow_bytes = std::numeric_limits<double>::infinity();
    uint32_t best_set = 0;
    for (uint32_t set = 1; set < (1u << loans.size()); set++) {
        int s_b = m.n_slots;
        double lend = 0;
        for (size_t i = 0; i < loans.size(); i++)
            if (set & (1u << i)) {
                s_b += loans[i].slots;
                lend += loans[i].cost;
            }
        const double b = head + (first + static_cast<double>(step_copies(m, s_b, depth)) * (k - 1)) * L + lend;
        if (b < borrow_bytes) {
            borrow_bytes = b;
            best_set = set;
        }
    }
    d.borrow_bytes_per_token = borrow_bytes / tokens;
    d.borrow = borrow_bytes < stream_bytes;
    // A streamed turn runs one step per weight unit (stride's proportion); a borrowed one, or a prefill
    // turn, its full k.
    d.n_steps = d.continues ? cont_cap
                : d.borrow || first_tokens ? k
                                           : std::max(1, std::min(k, static_cast<int>(std::lround(m.weight / w_min))));
    if (d.borrow) {
        for (size_t i = 0; i < loans.size(); i++)
            if (best_set & (1u << i)) d.lenders.push_back(loans[i].model);
        std::sort(d.lenders.begin(), d.lenders.end());
    }
    return d;
}

int turn_min_prefill_chunk(uint64_t step_copy_bytes, double link_bytes_per_ms, double compute_ms_per_token,
                           int max_batch_tokens) {
    if (step_copy_bytes == 0 || !(link_bytes_per_ms > 0) || !(compute_ms_per_token > 0)) return 1;
    const double copy_ms = static_cast<double>(step_copy_bytes) / link_bytes_per_ms;
    const double n = std::ceil(copy_ms / compute_ms_per_token);
    return static_cast<int>(std::max(1.0, std::min(static_cast<double>(max_batch_tokens), n)));
}

}  // namespace lmx
