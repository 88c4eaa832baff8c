// turns.h — adaptive turns: which model holds the device next, for how many steps, and whose slots it borrows.
// Owner: engine core (scheduler). A pure function of plain values: no clock, no device, no state of its own.
// Thread-safety: nothing shared; the scheduler calls it on the step thread, tests call it directly.
//
// Policy. Streaming a model that does not fit re-copies its uncached layers on every step; a drained
// model (Ollama's whole-model swap) copies each layer once per turn. Neither wins everywhere, so every
// turn is priced both ways in the one currency that the link makes scarce: expected bytes copied per
// generated token.
//   stream  the model runs on its own slots. Each step copies the layers its slots cannot keep:
//           n_layer - (n_slots - prefetch_depth) (a copy in flight holds a slot that cannot cache),
//           none when it is resident or its slots hold every layer.
//   borrow  the model also takes slots carved from other streamed models' regions (idle while it runs)
//           for a turn of k steps: only the slots it lacks, from the cheapest set of lenders, each giving a
//           prefix of its region (a partial loan) or all of it. The first step copies what is not on
//           device; later steps copy what even the borrowed slots cannot keep; and each lender must copy
//           back what its prefix held (at worst as many cached layers as the prefix covers of its slots,
//           its head when the prefix reaches it) when it next runs: a cost of the turn.
// Bytes per token = the turn's copies / (k * tokens the model generates per step). Borrowing wins when
// turns are long (a deep queue) and the borrowed slots hold (nearly) the whole model; streaming wins for
// a one-step turn and for a model whose slots already hold it.
//
// Starvation rule (the bound the tests check). Turns rotate among the models with work in order of
// longest wait (steps, then milliseconds, then the stride pass, then id), so:
//   1. a turn lasts at most max_turn_steps steps while another model has work, scaled by weight:
//      max(1, floor(max_turn_steps * weight / the largest weight with work));
//   2. hence a model with work waits at most (n_models_with_work - 1) * max_turn_steps steps;
//   3. a turn also ends at the first step boundary where another model with work has waited
//      max_wait_ms or more (wall-clock bound: wait <= max_wait_ms + the steps of the turns ahead of it,
//      which all end after one step while it is overdue).
// A model alone with work keeps the device as long as it has work.
//
// A borrowed turn keeps its loan to its end. What the lenders lost is spent when the turn begins; a loan
// re-priced later in the turn (fewer steps left, a lender gone idle) would take other slots or give some
// back, and the borrower would copy again the layers they held.
//
// Lenders with work, where copies run beside compute (refill_lenders). A borrowed turn copies its missing
// layers at its start and then computes on them while the link idles; meanwhile the copy thread fills a busy
// lender's free slots (those a past loan emptied) with its next layers (residency.h). Its loss is then what
// its slots would hold by its turn, each slot the loan covers and its head, not what they hold now: a region
// emptied by one loan is not free to the next borrower when its owner runs soon. Elsewhere (the CPU device
// unthrottled, where a copy is compute's own work) nothing refills them early, and the loss is their cache.
//
// Lenders without work. A lender with work copies back what its loan cost it at its next turn, in this
// rotation; an idle one only if work comes before its slots are lent again, so its loss is priced at half
// (kIdleLenderWeight, turns.cpp): between two equal losses the idle model lends, and the busy model's
// layers stay for its turn.
//
// First tokens first (time to first token), when a drained turn would make them wait. While another
// model with work has sequences that have not started (none of their prompt computed yet), the turn's
// drained length is timed: its bytes over the link plus its steps at the model's recent step time. When
// that, plus what the unstarted model has already waited, exceeds first_token_ms, the turn becomes a
// prefill turn: it lasts until its model has no prompt left to compute (at most its turn cap) and is
// priced over those prefill steps only, so every queued request gets its first token after one round of
// prefill turns. A drained turn in progress is re-timed at every step, so a request that arrives
// mid-turn cuts it to a prefill turn too. A model with no prompt left does not take a turn in the round
// (its prefill turn would be one decode step that copies its layers for a token): the model whose first
// token has waited longest runs instead, unless the skipped one is overdue (max_wait_ms). A prefill round
// costs throughput: each model that ran only its prefill copies its layers again when it comes back to
// decode; where turns are short (the models nearly fit, a fast link) the round is not worth its copies
// and turns drain (Ollama's order). An estimate not measured yet (no step run, no copy timed) counts as
// too long. Turns only get shorter by this, so the bounds above hold.
#pragma once

#include <cstdint>
#include <vector>

namespace lmx {

struct TurnConfig {
    int max_turn_steps = 32;     // the longest turn while another model has work
    double max_wait_ms = 2000;   // a model with work never waits longer (plus one step per turn ahead of it)
    int prefetch_depth = 2;      // slots a copy in flight occupies (the residency's depth)
    double first_token_ms = 30;  // an unstarted model's wait behind a drained turn past this: a prefill round
                                 // first (0: always first tokens first)
    bool refill_lenders = false; // copies run beside compute: a busy lender's slots fill again during a loan's
                                 // turn (Device::copies_beside_compute; see "Lenders with work" above)
};

// One model as the policy sees it.
struct TurnModel {
    int model = -1;
    double weight = 1.0;
    double pass = 0.0;          // stride pass: breaks ties between equal waits (the lower runs first)
    int n_seqs = 0;             // sequences with work (running + waiting); 0 = idle
    int gen_per_step = 1;       // tokens one step of it generates now (its batch)
    int n_steps_left = 1;       // steps until its current work is done if it ran alone
    int n_unstarted = 0;        // sequences with none of their prompt computed yet
    int n_prefilling = 0;       // sequences with prompt tokens still to compute (unstarted included)
    int prefill_steps = 0;      // steps to compute the prompt tokens left at the step budget
    int n_layer = 0;
    uint64_t layer_bytes = 0;
    uint64_t head_bytes = 0;
    bool resident = false;      // every unit always on device: never copies, never lends
    int n_slots = 0;            // its own layer slots (streamed)
    int n_cached = 0;           // its layers on device now, in any slots it holds
    bool head_ready = true;     // its head is on device (false while its region is lent)
    uint64_t region_bytes = 0;  // bytes it can lend (its head and slots as one region); 0: cannot lend
    int waited_steps = 0;       // steps other models ran since it last ran, while it had work
    double waited_ms = 0;       // time since it last ran (or got work), while it had work
    double step_ms = 0;         // compute of one of its recent steps, copy waits excluded (0: not measured)
    double link_bytes_per_ms = 0;  // the host->device link's speed (0: not measured)
};

// The turn in progress (the scheduler keeps it between steps).
struct TurnState {
    int owner = -1;
    int n_steps = 0;    // steps it has run in this turn
    int n_planned = 0;  // the turn's planned length
    bool borrow = false;
    bool first_tokens = false;  // a prefill turn: it ends when its model's prompts are in
    std::vector<int> lenders;     // a borrowed turn's loan (TurnDecision), kept to the turn's end
    std::vector<int> lend_slots;
};

struct TurnDecision {
    int model = -1;              // -1: no model has work
    int n_steps = 0;             // planned length of the turn (this step included)
    bool borrow = false;         // run on the borrowed regions of `lenders`
    bool continues = false;      // the turn in progress goes on (nothing to re-plan)
    bool first_tokens = false;   // a prefill turn (another model waits for first tokens)
    double drained_ms = 0;       // the drained turn's timed length (+ the longest first-token wait), when priced
    std::vector<int> lenders;    // models whose regions the turn borrows (empty when streaming)
    std::vector<int> lend_slots; // the borrower's slots each lender gives (Residency::set_tenants)
    double stream_bytes_per_token = 0, borrow_bytes_per_token = 0;  // the two prices (new turns)
};

// Layers a model of layer_bytes keeps with `slots` own slots plus the regions of lenders (each region
// holds floor(region_bytes / layer_bytes) of its layers).
int turn_borrowable_slots(const TurnModel& m, const std::vector<TurnModel>& models);
// Bytes one streaming step of m copies once warm.
uint64_t turn_stream_step_bytes(const TurnModel& m, int slots, int prefetch_depth);
TurnDecision plan_turn(const std::vector<TurnModel>& models, const TurnState& state, const TurnConfig& cfg);
// The next state after running `d` for one step.
TurnState turn_advance(const TurnState& state, const TurnDecision& d);

// FlexGen's lesson for a streamed model's prompt chunks: a step pays one copy of every uncached layer
// whatever its token count, so a prompt chunk should carry at least the tokens whose compute hides that
// copy: copy_ms / compute_ms_per_token, clamped to [1, max_batch_tokens]. 1 when nothing streams.
int turn_min_prefill_chunk(uint64_t step_copy_bytes, double link_bytes_per_ms, double compute_ms_per_token,
                           int max_batch_tokens);

}  // namespace lmx
