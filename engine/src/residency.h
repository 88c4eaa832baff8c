// residency.h — which model units are in device memory, and the copy thread that streams them.
// Owner: engine core. Mutators: add_model/remove_model (loader or step thread),
// set_schedule/acquire/release (step thread only). Thread-safety: every method locks mu_;
// the copy thread is the only one that writes slot contents.
//
// Policy. A model that fits stays resident: all its units are booked and copied
// once. Otherwise its head (final norm + lm_head, as large as several layers for a
// 150k vocabulary) stays resident and its layers stream through n_slots slots of
// one layer's size. The step thread announces the order in which it will
// acquire units (set_schedule) — the current model's layers, then the next
// model's — so the copy thread can keep up to prefetch_depth copies ahead of
// compute. Depth counts copies, not schedule positions: units still in a slot
// from an earlier pass are skipped, so a cached run of layers never hides the
// next miss from the copy thread. Each copy in flight occupies a slot that
// cannot cache, so a depth of d costs d slots of the stable subset below.
// Because that order is known, eviction picks the slot whose unit is next
// used farthest in the future (Belady's MIN): on a cyclic scan larger than the
// cache, LRU evicts exactly the unit needed next and misses every time, while MIN
// keeps a stable subset resident and misses only on the rest. LRU stays available
// for comparison. Units needed before the one being loaded are never evicted.
//
// Lending (adaptive turns, turns.h). A streamed model's head and slots are booked one by one, as
// before, and usually land side by side (weights are placed from the top of the arena); each run of
// adjacent buffers is a region. While another model's turn borrows it (set_tenants), a region is
// re-carved into slots of the borrower's layer size, so a 3 MiB-layer model's region can hold a
// 7 MiB-layer model's layers. A loan may be partial: the borrower takes a prefix of the region,
// enough for the slots it lacks, and the lender keeps its slots (and head) past it with their layers;
// what the prefix held comes back (copied again) when the region does. Nothing is booked or freed by a loan: the ledger's figures
// do not move, so a loan can never starve KV or fail to return.
//
// Whole-model swapping (SwapPool below) is the third mode, kept apart from the two above:
// it is the baseline layermux is measured against, not a policy it runs.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "ledger.h"
#include "model.h"
#include "trace.h"

namespace lmx {

enum class Eviction : uint8_t { Belady = 0, Lru = 1 };
Eviction eviction_from_name(const std::string& s);
const char* eviction_name(Eviction e);

struct UnitRef {
    int model = -1;
    int unit = -1;
    bool operator==(const UnitRef& o) const { return model == o.model && unit == o.unit; }
};

// A unit in device memory, pinned: its address, and the copy fence compute must wait for
// before reading it (0 on the CPU, where copies are synchronous).
struct UnitHandle {
    const uint8_t* data = nullptr;
    CopyFence ready;
};

struct ResidencyStats {
    uint64_t bytes_copied = 0;
    uint64_t n_loads = 0;      // units copied in
    uint64_t n_hits = 0;       // acquires of streamed units already loaded
    uint64_t n_misses = 0;     // acquires that had to wait for a copy
    uint64_t wait_ns = 0;      // time acquire() spent waiting for copies
    // time spent issuing copies, on the copy thread or (load on demand, whole-model swaps) the step
    // thread; on a synchronous device (the CPU) the whole copy, paced by its link model (device.h)
    uint64_t copy_ns = 0;
};

struct ModelResidency {
    bool resident = false;
    int n_slots = 0;           // streamed models: its own layer slots (what it has when nothing is lent)
    int n_units_loaded = 0;    // units currently in device memory
    uint64_t slot_bytes = 0;
    int n_cached = 0;          // streamed: its layers on device now, in its own or borrowed slots
    bool head_ready = true;    // streamed: its head is on device (false while its region is lent)
    uint64_t region_bytes = 0; // streamed: bytes it can lend (all its regions)
    int n_held_slots = 0;      // streamed: slots it holds now (own + borrowed - lent)
};

// Whole-model swapping, what Ollama does and the baseline layermux is measured against: a
// swap-mode model is either wholly in device memory or not at all. Nothing is booked at load;
// the first acquire of a swapped-out model books and copies ALL its units synchronously (a
// swap is a stall), evicting other idle swap-mode models whole, the one the schedule needs
// last first. It has no slots, no prefetch and no copy thread: Residency hands it the units
// of swap-mode models and the streaming path never sees them.
// Thread-safety: none of its own; Residency calls it under its lock (swap_in drops the lock
// for the copies, which is safe because only the step thread acquires and releases).
class SwapPool {
public:
    explicit SwapPool(Ledger& ledger) : ledger_(ledger) {}
    ~SwapPool();
    SwapPool(const SwapPool&) = delete;
    SwapPool& operator=(const SwapPool&) = delete;

    void add(int model_id, std::shared_ptr<const ModelWeights> w, const std::string& owner);
    bool has(int model_id) const { return models_.count(model_id) != 0; }
    void remove(int model_id);  // precondition: no unit of it is acquired

    // Swaps the model in when it is out (lk is released while copying), then pins it.
    // next_use(model): schedule position of the model's next use (victims: largest first).
    // after: every compute that may still read the bytes the units are copied over.
    UnitHandle acquire(UnitRef u, const std::function<size_t(int)>& next_use, ComputeFence after,
                       std::unique_lock<std::mutex>& lk, ResidencyStats& stats);
    void release(UnitRef u);
    ModelResidency info(int model_id) const;
    int n_pins(int model_id) const;

private:
    struct Model {
        std::shared_ptr<const ModelWeights> w;
        std::string owner;
        int in_use = 0;                   // units acquired and not released
        std::vector<DeviceBuffer> units;  // all units while swapped in, empty while out
        CopyFence copied;                 // when the swap-in's copies land
    };
    void swap_in(int model, Model& m, const std::function<size_t(int)>& next_use, ComputeFence after,
                 std::unique_lock<std::mutex>& lk);

    Ledger& ledger_;
    std::map<int, Model> models_;
};

class Residency {
public:
    // tracer: where copies and waits are recorded when tracing is on (trace.h); outlives this.
    Residency(Ledger& ledger, int prefetch_depth, Eviction eviction, Tracer* tracer = nullptr);
    ~Residency();
    Residency(const Residency&) = delete;
    Residency& operator=(const Residency&) = delete;

    // Resident: books and copies every unit. Streamed: books n_slots slots.
    // Returns false with nothing booked when the ledger cannot hold it.
    bool add_model(int model_id, std::shared_ptr<const ModelWeights> w, const std::string& owner, bool resident,
                   int n_slots);
    // Whole-model swapping (SwapPool): nothing is booked at load.
    void add_swap_model(int model_id, std::shared_ptr<const ModelWeights> w, const std::string& owner);
    void remove_model(int model_id);  // precondition: no unit of it is acquired
    ModelResidency model_info(int model_id) const;

    void set_schedule(std::vector<UnitRef> order);
    // Blocks until u's copy is submitted (on the CPU: done) and pins it; the handle's fence
    // says when the copy lands. Use UnitPin, which releases on every path.
    UnitHandle acquire(UnitRef u);
    // Unpins u. done: the compute that read it; its slot is refilled only after done.
    void release(UnitRef u, ComputeFence done = {});

    // Adaptive turns: the streamed regions of each model in `lenders` are re-carved for `borrower`'s
    // layers — lend_slots[i] of its slots from lenders[i] (a prefix of its regions in address order; the
    // lender keeps its slots and head past it, with their layers), or all of them when 0 or absent;
    // every other region goes back to its owner (borrower -1: all go back). Waits for copies in flight;
    // no unit may be pinned (step thread, between steps). A no-op when nothing changes.
    void set_tenants(int borrower, const std::vector<int>& lenders, const std::vector<int>& lend_slots = {});

    ResidencyStats stats() const;
    int prefetch_depth() const { return depth_; }
    Eviction eviction() const { return eviction_; }

    // Test hooks: the unit each slot of a streamed model holds (-1 = empty); pins held on
    // a model's units (acquired and not released).
    std::vector<int> slot_units(int model_id) const;
    int n_pins(int model_id) const;

private:
    struct Slot {
        uint8_t* ptr = nullptr;  // device memory carved from a region, one layer unit of its tenant
        int region_owner = -1;   // the region it was carved from: regions[region_index] of that model
        int region_index = -1;
        int unit = -1;
        bool ready = false;
        bool loading = false;
        bool ahead = false;  // copied (or copying) for a use compute has not reached yet
        int pins = 0;
        uint64_t last_use = 0;
        CopyFence copied;        // when the unit's copy lands
        ComputeFence last_read;  // the last compute that read it: a refill waits for it
    };
    // A streamed model's booked bytes, carved into its head and slots, or into a borrower's slots.
    struct Region {
        std::vector<DeviceBuffer> bufs;  // the owner's adjacent buffers (head and / or slots), booked while loaded
        uint8_t* begin = nullptr;        // [begin, begin + n_bytes): their bytes, end to end
        uint64_t n_bytes = 0;
        int tenant = -1;                 // the model whose units it holds: the owner unless lent
        uint64_t lent = 0;               // lent: the tenant's bytes [begin, begin + lent); the owner keeps the rest
        bool has_head = false;           // the owner's head is one of its buffers
        std::vector<uint8_t*> own_slots; // the owner's slots in it
        ComputeFence last_read;  // reads of its bytes under an earlier carving: a refill waits for them
    };
    struct Entry {
        std::shared_ptr<const ModelWeights> w;
        std::string owner;
        bool resident = false;
        std::vector<DeviceBuffer> units;  // resident models
        std::vector<Region> regions;      // streamed models: head + slots, lendable
        uint8_t* head = nullptr;          // streamed models: the head unit, in regions[0]
        bool head_ready = false;          // on device (false while lent and until copied back)
        bool head_loading = false;        // the copy thread is copying it
        std::vector<Slot> slots;          // streamed models: the layer slots it holds (own and borrowed)
        CopyFence copied;                 // resident and head units: when their copies land
        int n_own_slots = 0;
    };
    struct Job {
        int model = -1;
        int unit = -1;
        int slot = -1;  // -1: the model's head
    };

    // All below: caller holds mu_.
    void carve(int owner, Region& r, int region_index, const uint8_t* from);  // r's slots (residency.cpp)
    void retenant_locked(int borrower, const std::vector<int>& lenders, const std::vector<int>& lend_slots,
                         std::unique_lock<std::mutex>& lk);
    // Bytes from r's start that hold n_slots slots of unit_bytes (all of r when n_slots <= 0 or more fit).
    static uint64_t lend_prefix(const Region& r, uint64_t unit_bytes, int n_slots);
    bool head_lent(const Entry& e, int owner) const;  // its head's bytes are in a lent prefix
    Slot* find_slot(Entry& e, int unit);
    bool pick_job(Job& job);
    // The copy thread sleeps and pick_job has a job for it. Acquire, release and set_schedule wake it
    // only then: a wake-up per layer that finds nothing to do preempts a compute thread (the pool's
    // workers spin between kernels), about 0.2 ms per decode step on 2 cores.
    bool copy_has_work_locked();
    int pick_victim(Entry& e, int model, size_t target_pos) const;
    int free_slot(const Entry& e, int model) const;
    size_t next_use(int model, int unit, size_t from) const;
    void copy_main();

    Ledger& ledger_;
    Tracer* const tracer_;  // may be null
    const int depth_;
    const Eviction eviction_;
    const bool copy_beside_;  // the device's copies run beside compute: copy past the depth (pick_job)
    mutable std::mutex mu_;
    std::condition_variable cv_copy_;   // wakes the copy thread
    std::condition_variable cv_ready_;  // wakes acquire()
    std::map<int, Entry> models_;  // resident and streamed models
    SwapPool swap_;                // swap-mode models
    std::vector<UnitRef> sched_;
    size_t cursor_ = 0;  // sched_[cursor_] is the next unit compute will acquire
    uint64_t clock_ = 0;
    ResidencyStats stats_;
    ComputeFence last_read_;  // the last compute that read any unit (whole-model swaps wait for it)
    bool stop_ = false;
    bool copy_idle_ = false;  // the copy thread waits on cv_copy_: pick_job found nothing
    bool retenanting_ = false;  // set_tenants waits for copies in flight: no new one starts
    std::thread copy_thread_;
};

}  // namespace lmx

namespace lmx {

// Pins one unit for a scope: acquires it in the constructor and releases it in the
// destructor, so a step that throws halfway (a failed op, a swap that cannot fit) never
// leaves a slot pinned — a pinned slot can never be refilled, and with few slots the next
// step would wait for it forever. done() records the compute that read the unit, so the
// slot is refilled only after it (on the CPU that compute has already finished).
class UnitPin {
public:
    UnitPin(Residency& r, UnitRef u) : r_(r), u_(u), h_(r.acquire(u)) {}
    ~UnitPin() { r_.release(u_, done_); }
    UnitPin(const UnitPin&) = delete;
    UnitPin& operator=(const UnitPin&) = delete;

    const uint8_t* data() const { return h_.data; }
    CopyFence ready() const { return h_.ready; }
    void done(ComputeFence f) { done_ = f; }

private:
    Residency& r_;
    UnitRef u_;
    UnitHandle h_;
    ComputeFence done_;
};

}  // namespace lmx
