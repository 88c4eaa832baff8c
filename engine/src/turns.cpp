// turns.cpp — the adaptive-turn policy (turns.h): price a turn streamed and borrowed, pick the cheaper,
// rotate turns by longest wait. Owner: engine core. Thread-safety: pure functions.
#include "turns.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <limits>
#include <map>

namespace lmx {

namespace {
bool busy(const TurnModel& m) { return m.n_seqs > 0; }

constexpr double kIdleLenderWeight = 0.5;

// Copies of one warm step with `slots` slots: the layers beyond the stable subset.
int step_copies(const TurnModel& m, int slots, int depth) {
    if (m.resident || slots >= m.n_layer) return 0;
    return m.n_layer - std::max(0, slots - depth);
}

// What a lender's copy-back is expected to cost, per byte it loses: a lender with work copies it back at
// its next turn, in this rotation; an idle one only if work comes before its slots are lent again.
double lender_weight(const TurnModel& o) { return busy(o) ? 1.0 : kIdleLenderWeight; }

// What lending a prefix covering `covered` (<= n_slots) of o's slots, and its head when `head`, takes from it,
// in bytes before weighting: the layers and head on device now, or, for a busy lender whose slots fill again
// while the link idles (TurnConfig::refill_lenders, turns.h), those its slots would hold by its turn.
double lender_loss(const TurnModel& o, int covered, bool head, bool refill) {
    const bool refills = refill && busy(o);
    const int layers = refills ? covered : std::min(o.n_cached, covered);
    const double h = head && (refills || o.head_ready) ? static_cast<double>(o.head_bytes) : 0.0;
    return h + static_cast<double>(layers) * static_cast<double>(o.layer_bytes);
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
        s.first_tokens = d.first_tokens;
        s.lenders = d.lenders;
        s.lend_slots = d.lend_slots;
        return s;
    }
    return TurnState{d.model, 1, d.n_steps, d.borrow, d.first_tokens, d.lenders, d.lend_slots};
}

namespace {
// A turn of k steps of m priced both ways, in bytes (turns.h), with the cheapest set of lenders.
struct Price {
    double stream = 0, borrow = std::numeric_limits<double>::infinity();
    std::vector<int> lenders;     // of the cheapest borrowing (sorted)
    std::vector<int> lend_slots;  // the borrower's slots each of them gives
};

Price price_turn(const TurnModel& m, const std::vector<TurnModel>& models, int k, int depth, bool refill) {
    Price p;
    const double L = static_cast<double>(m.layer_bytes);
    // Streaming: its own slots; the first step also refills what a loan took (its head, its cache).
    const int c_own = step_copies(m, m.n_slots, depth);
    const int stable = m.n_slots >= m.n_layer ? m.n_layer : std::max(0, m.n_slots - depth);
    const int cold = m.resident ? 0 : std::max(0, stable - m.n_cached);
    const double head = m.head_ready ? 0.0 : static_cast<double>(m.head_bytes);
    p.stream = head + (static_cast<double>(c_own) * k + cold) * L;

    // Borrowing: slots carved from the regions of other streamed models, for k steps. A loan is partial:
    // the borrower takes from a lender only the slots it still lacks (a prefix of the lender's region),
    // and the lender copies back what that prefix held — at worst as many of its cached layers as the
    // prefix covers of its slots, and its head when the prefix reaches it (the head sits at the region's
    // end) — or its head and whole cache when the whole region goes (the layers in its own slots: any it
    // holds in slots borrowed earlier go back with that loan anyway). Past kMaxLenders candidates, the
    // cheapest per slot first.
    struct Loan {
        const TurnModel* o;
        int slots;      // the borrower's slots its whole region holds
        double whole;   // what the lender copies back after lending all of it
    };
    std::vector<Loan> loans;
    if (!m.resident && m.layer_bytes > 0)
        for (const TurnModel& o : models) {
            if (o.model == m.model || o.resident || o.region_bytes == 0) continue;
            const int slots = static_cast<int>(o.region_bytes / m.layer_bytes);
            if (slots == 0) continue;
            loans.push_back({&o, slots, lender_weight(o) * lender_loss(o, o.n_slots, true, refill)});
        }
    constexpr size_t kMaxLenders = 10;
    std::stable_sort(loans.begin(), loans.end(),
                     [](const Loan& a, const Loan& b) { return a.whole * b.slots < b.whole * a.slots; });
    if (loans.size() > kMaxLenders) loans.resize(kMaxLenders);
    auto lend_cost = [&](const Loan& l, int x) {
        if (x >= l.slots) return l.whole;
        const TurnModel& o = *l.o;
        const double taken = static_cast<double>(x) * static_cast<double>(m.layer_bytes);
        const int covered = std::min(o.n_slots, static_cast<int>(std::ceil(taken / static_cast<double>(o.layer_bytes))));
        const bool head = taken > static_cast<double>(o.region_bytes - std::min(o.region_bytes, o.head_bytes));
        return lender_weight(o) * lender_loss(o, covered, head, refill);
    };
    const int first = std::max(0, m.n_layer - m.n_cached);
    const int need = std::max(0, m.n_layer - m.n_slots);
    auto price_set = [&](uint32_t set, int partial) {  // every lender of `set` whole but `partial` (-1: none)
        int s_b = m.n_slots, whole_slots = 0;
        double lend = 0;
        std::vector<std::pair<int, int>> given;
        for (size_t i = 0; i < loans.size(); i++)
            if ((set & (1u << i)) && static_cast<int>(i) != partial) {
                whole_slots += loans[i].slots;
                lend += loans[i].whole;
                given.emplace_back(loans[i].o->model, loans[i].slots);
            }
        s_b += whole_slots;
        if (partial >= 0) {
            const Loan& l = loans[static_cast<size_t>(partial)];
            const int x = need - whole_slots;  // what the whole ones leave
            if (x <= 0 || x >= l.slots) return;  // useless, or not partial: priced as whole
            s_b += x;
            lend += lend_cost(l, x);
            given.emplace_back(l.o->model, x);
        }
        const double b = head + (first + static_cast<double>(step_copies(m, s_b, depth)) * (k - 1)) * L + lend;
        if (b < p.borrow) {
            p.borrow = b;
            p.lenders.clear();
            p.lend_slots.clear();
            std::sort(given.begin(), given.end());
            for (const auto& g : given) {
                p.lenders.push_back(g.first);
                p.lend_slots.push_back(g.second);
            }
        }
    };
    // Each set of lenders all whole, or with one of them partial (giving just the slots the others leave
    // short): a cheapest loan needs at most one partial lender.
    for (uint32_t set = 1; set < (1u << loans.size()); set++) {
        price_set(set, -1);
        for (size_t i = 0; i < loans.size(); i++)
            if (set & (1u << i)) price_set(set, static_cast<int>(i));
    }
    return p;
}

// A turn of k steps of m, timed: its cheaper bytes over the link plus k steps at its recent step time.
// Infinity while either is unmeasured (and needed).
double turn_ms(const TurnModel& m, const Price& p, int k) {
    const double bytes = std::min(p.stream, p.borrow);
    if (m.step_ms <= 0 || (bytes > 0 && !(m.link_bytes_per_ms > 0))) return std::numeric_limits<double>::infinity();
    return (bytes > 0 ? bytes / m.link_bytes_per_ms : 0.0) + k * m.step_ms;
}
}  // namespace

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
    const int depth = cfg.prefetch_depth;
    // A turn priced once per (model, steps): the drained timing and the decision often price the same turn.
    std::map<std::pair<int, int>, Price> prices;
    auto priced = [&](const TurnModel& m, int k) -> const Price& {
        auto it = prices.find({m.model, k});
        if (it == prices.end())
            it = prices.emplace(std::make_pair(m.model, k), price_turn(m, models, k, depth, cfg.refill_lenders)).first;
        return it->second;
    };
    auto turn_cap = [&](const TurnModel& m) {
        if (live.size() == 1) return std::numeric_limits<int>::max();  // alone: as long as it has work
        return std::max(1, static_cast<int>(std::floor(cfg.max_turn_steps * m.weight / w_max)));
    };
    auto overdue_other = [&](int owner) {
        for (const TurnModel* m : live)
            if (m->model != owner && m->waited_ms >= cfg.max_wait_ms) return true;
        return false;
    };
    // The longest wait for a first token among the other models; negative when none waits for one.
    auto first_token_wait = [&](int owner) {
        double w = -1;
        for (const TurnModel* m : live)
            if (m->model != owner && m->n_unstarted > 0) w = std::max(w, m->waited_ms);
        return w;
    };
    // First tokens first when draining k more steps of m would keep an unstarted model waiting past
    // first_token_ms; returns the drained turn's timed length plus that wait (0 when no one waits).
    auto drained_wait_ms = [&](const TurnModel& m, int k) {
        const double w = first_token_wait(m.model);
        if (w < 0) return 0.0;
        return w + turn_ms(m, priced(m, k), k);
    };
    auto wants_prefill_round = [&](double drained) {
        return drained > 0 && (cfg.first_token_ms <= 0 || drained > cfg.first_token_ms);
    };

    // 1. The turn in progress goes on while it has work, steps left and no one else is overdue. Its cap
    //    is re-read: a model that was alone may have company now. A prefill turn runs until its model's
    //    prompts are in, however many steps its decodes stretch that to, while another model waits for
    //    first tokens; a drained turn runs its planned steps unless a first token would wait too long
    //    behind them (a request that came mid-turn): then it becomes a prefill turn.
    const TurnModel* next = nullptr;
    int cont_cap = 0;
    bool first_tokens = false;
    double drained = 0;
    for (const TurnModel* m : live) {
        if (m->model != state.owner) continue;
        const int planned = std::min(state.n_planned, turn_cap(*m));
        bool prefill = first_token_wait(m->model) >= 0 && state.first_tokens;
        if (!prefill && state.n_steps < planned) {
            drained = drained_wait_ms(*m, std::max(1, std::min(planned - state.n_steps, m->n_steps_left)));
            prefill = wants_prefill_round(drained);
        }
        const int cap = prefill ? (m->n_prefilling > 0 ? turn_cap(*m) : 0) : planned;
        if (state.n_steps < cap && !overdue_other(m->model)) {
            next = m;
            cont_cap = cap;
            first_tokens = prefill;
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
    //    tip the balance within a turn. A new turn is timed drained first; too long for a waiting first
    //    token, it becomes its prefill steps only.
    const bool continues = cont_cap > 0;
    int k = std::max(1, std::min(continues ? cont_cap - state.n_steps : turn_cap(*next), next->n_steps_left));
    auto time_new_turn = [&](const TurnModel* m) {  // a new turn of m: its length, timed drained
        next = m;
        k = std::max(1, std::min(turn_cap(*m), m->n_steps_left));
        drained = drained_wait_ms(*m, k);
        first_tokens = wants_prefill_round(drained);
    };
    if (!continues) {
        time_new_turn(next);
        if (first_tokens && next->n_prefilling == 0 && next->waited_ms < cfg.max_wait_ms) {
            // Its prefill turn would be one decode step (it has no prompt left) that copies its layers for a
            // token while a first token waits: the model whose first token waits longest runs instead.
            const TurnModel* f = nullptr;
            for (const TurnModel* o : live)
                if (o->n_unstarted > 0 && (f == nullptr || waited_longer(*o, *f))) f = o;
            if (f != nullptr) time_new_turn(f);
        }
    }
    const TurnModel& m = *next;
    d.model = m.model;
    d.continues = continues;
    if (first_tokens) k = std::max(1, std::min(k, m.prefill_steps));  // its prefill only
    d.first_tokens = first_tokens;
    d.drained_ms = drained;
    const double tokens = static_cast<double>(k) * std::max(1, m.gen_per_step);
    Price p = priced(m, k);
    d.stream_bytes_per_token = p.stream / tokens;
    d.borrow_bytes_per_token = p.borrow / tokens;
    const bool keep_loan = d.continues && state.borrow && !state.lenders.empty();  // to the turn's end (turns.h)
    d.borrow = keep_loan || p.borrow < p.stream;
    // A streamed turn runs one step per weight unit (stride's proportion); a borrowed one, or a prefill
    // turn, its full k.
    d.n_steps = d.continues ? cont_cap
                : d.borrow || first_tokens ? k
                                           : std::max(1, std::min(k, static_cast<int>(std::lround(m.weight / w_min))));
    if (keep_loan) {
        d.lenders = state.lenders;
        d.lend_slots = state.lend_slots;
    } else if (d.borrow) {
        d.lenders = std::move(p.lenders);
        d.lend_slots = std::move(p.lend_slots);
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
