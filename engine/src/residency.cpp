// residency.cpp — slots, the copy thread, next-use (Belady) / LRU eviction, and whole-model swapping (SwapPool).
// Owner: engine core. Thread-safety: see residency.h; every member access holds mu_
// except the memcpy of a job, which runs unlocked on a slot marked loading.
#include "residency.h"

#include <algorithm>
#include <cassert>
#include <chrono>
#include <limits>

namespace lmx {

namespace {
// Slots carved from a region start at multiples of this (a GPU's storage-buffer offset alignment).
constexpr uint64_t kCarveAlign = 256;
uint64_t carve_stride(uint64_t n) { return (n + kCarveAlign - 1) / kCarveAlign * kCarveAlign; }
// Slots of unit_bytes that fit n_bytes at kCarveAlign strides (the last one needs only unit_bytes).
int carve_count(uint64_t n_bytes, uint64_t unit_bytes) {
    if (unit_bytes == 0 || n_bytes < unit_bytes) return 0;
    return 1 + static_cast<int>((n_bytes - unit_bytes) / carve_stride(unit_bytes));
}
// Bytes from begin to the first kCarveAlign boundary: where a region's carved slots start.
uint64_t carve_lead(const uint8_t* begin) {
    const uint64_t skew = reinterpret_cast<uintptr_t>(begin) % kCarveAlign;
    return skew == 0 ? 0 : kCarveAlign - skew;
}
// Slots of unit_bytes carved from [begin, begin + n_bytes).
int carve_slots(const uint8_t* begin, uint64_t n_bytes, uint64_t unit_bytes) {
    const uint64_t lead = carve_lead(begin);
    return n_bytes > lead ? carve_count(n_bytes - lead, unit_bytes) : 0;
}
}  // namespace

Eviction eviction_from_name(const std::string& s) {
    if (s == "belady") return Eviction::Belady;
    if (s == "lru") return Eviction::Lru;
    throw InvalidArgument("eviction: expected 'belady' or 'lru', found '" + s + "'");
}

const char* eviction_name(Eviction e) { return e == Eviction::Belady ? "belady" : "lru"; }

Residency::Residency(Ledger& ledger, int prefetch_depth, Eviction eviction, Tracer* tracer)
    : ledger_(ledger), tracer_(tracer), depth_(prefetch_depth), eviction_(eviction),
      copy_beside_(ledger.device().copies_beside_compute()), swap_(ledger) {
    if (prefetch_depth < 0) throw InvalidArgument("prefetch_depth: expected >= 0, found " + std::to_string(prefetch_depth));
    if (depth_ > 0) copy_thread_ = std::thread([this] { copy_main(); });
}

Residency::~Residency() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        stop_ = true;
    }
    cv_copy_.notify_all();
    if (copy_thread_.joinable()) copy_thread_.join();
    for (auto& kv : models_) {
        for (DeviceBuffer& b : kv.second.units) ledger_.free(b);
        for (Region& r : kv.second.regions)
            for (DeviceBuffer& b : r.bufs) ledger_.free(b);
    }
}

bool Residency::add_model(int model_id, std::shared_ptr<const ModelWeights> w, const std::string& owner, bool resident,
                          int n_slots) {
    Entry e;
    e.w = std::move(w);
    e.owner = owner;
    e.resident = resident;
    std::vector<DeviceBuffer> bufs;  // streamed: the head, then the slots
    auto undo = [&] {
        for (DeviceBuffer& b : e.units) ledger_.free(b);
        for (DeviceBuffer& b : bufs) ledger_.free(b);
    };
    if (resident) {
        for (int u = 0; u < e.w->n_units(); u++) {
            DeviceBuffer b = ledger_.alloc(owner, BookKind::Weights, e.w->unit(u).n_bytes);
            if (!b) {
                undo();
                return false;
            }
            e.copied = fence_later(e.copied, e.w->assemble_unit(u, b.ptr, ledger_.device()));
            e.units.push_back(b);
        }
    } else {
        const int head = e.w->n_units() - 1;
        const int n = std::max(1, std::min(n_slots, e.w->n_units() - 1));
        e.n_own_slots = n;
        for (int i = 0; i <= n; i++) {
            DeviceBuffer b = ledger_.alloc(owner, BookKind::Weights, i == 0 ? e.w->unit(head).n_bytes : e.w->layer_unit_bytes());
            if (!b) {
                undo();
                return false;
            }
            bufs.push_back(b);
        }
        e.head = bufs[0].ptr;
        e.copied = e.w->assemble_unit(head, e.head, ledger_.device());
        e.head_ready = true;
        // Regions: runs of buffers that touch (one ends, rounded to kAlign, where the next begins), so
        // nothing of anyone else's lies between them.
        std::vector<DeviceBuffer> by_addr = bufs;
        std::sort(by_addr.begin(), by_addr.end(), [](const DeviceBuffer& a, const DeviceBuffer& b) { return a.ptr < b.ptr; });
        for (const DeviceBuffer& b : by_addr) {
            const bool joins = !e.regions.empty() && e.regions.back().begin + e.regions.back().n_bytes == b.ptr;
            if (!joins) {
                e.regions.emplace_back();
                e.regions.back().begin = b.ptr;
                e.regions.back().tenant = model_id;
            }
            Region& r = e.regions.back();
            r.bufs.push_back(b);
            r.n_bytes = static_cast<uint64_t>(b.ptr - r.begin) + align_up(b.n_bytes, kAlign);
            if (b.ptr == e.head) {
                r.has_head = true;
            } else {
                r.own_slots.push_back(b.ptr);
            }
        }
        for (Region& r : e.regions) r.n_bytes -= align_up(r.bufs.back().n_bytes, kAlign) - r.bufs.back().n_bytes;
    }
    std::lock_guard<std::mutex> lk(mu_);
    models_[model_id] = std::move(e);
    Entry& added = models_[model_id];
    for (size_t i = 0; i < added.regions.size(); i++) {
        Region& r = added.regions[i];
        carve(model_id, r, static_cast<int>(i), r.begin + r.n_bytes);
    }
    return true;
}

// The slots of region r (regions[region_index] of owner): the owner's own slots past the lent prefix (all
// of them when r is not lent), and the tenant's, carved at kCarveAlign strides from the prefix's first
// aligned byte. `from` is where the owner's slots that are still held end: only own slots at or past it
// are added (those before it were lent and come back empty). New slots wait for r's readers.
void Residency::carve(int owner, Region& r, int region_index, const uint8_t* from) {
    auto add = [&](Entry& to, uint8_t* p) {
        Slot sl;
        sl.ptr = p;
        sl.region_owner = owner;
        sl.region_index = region_index;
        sl.last_read = r.last_read;
        to.slots.push_back(sl);
    };
    const bool lent = r.tenant != owner;
    const uint8_t* past = lent ? r.begin + r.lent : r.begin;  // the owner's part of r starts here
    Entry& o = models_.at(owner);
    for (uint8_t* p : r.own_slots)
        if (p >= past && p < from) add(o, p);
    if (!lent) return;
    Entry& t = models_.at(r.tenant);
    const uint64_t lead = carve_lead(r.begin), stride = carve_stride(t.w->layer_unit_bytes());
    const int n = carve_slots(r.begin, r.lent, t.w->layer_unit_bytes());
    for (int i = 0; i < n; i++) add(t, r.begin + lead + static_cast<uint64_t>(i) * stride);
}

uint64_t Residency::lend_prefix(const Region& r, uint64_t unit_bytes, int n_slots) {
    if (n_slots <= 0 || n_slots >= carve_slots(r.begin, r.n_bytes, unit_bytes)) return r.n_bytes;
    return carve_lead(r.begin) + static_cast<uint64_t>(n_slots - 1) * carve_stride(unit_bytes) + unit_bytes;
}

bool Residency::head_lent(const Entry& e, int owner) const {
    for (const Region& r : e.regions)
        if (r.has_head && r.tenant != owner && e.head < r.begin + r.lent) return true;
    return false;
}

void Residency::set_tenants(int borrower, const std::vector<int>& lenders, const std::vector<int>& lend_slots) {
    std::unique_lock<std::mutex> lk(mu_);
    retenant_locked(borrower, lenders, lend_slots, lk);
    lk.unlock();
    cv_copy_.notify_all();
}

void Residency::retenant_locked(int borrower, const std::vector<int>& lenders, const std::vector<int>& lend_slots,
                                std::unique_lock<std::mutex>& lk) {
    // What each region should be: (tenant, bytes lent from its start). A lender gives its regions in
    // address order until the borrower has the slots asked of it (0 or absent: all of them).
    const bool can_borrow = borrower >= 0 && models_.count(borrower) != 0 && !models_.at(borrower).resident;
    const uint64_t unit = can_borrow ? models_.at(borrower).w->layer_unit_bytes() : 0;
    std::map<std::pair<int, size_t>, std::pair<int, uint64_t>> want;
    for (auto& kv : models_) {
        const auto at = std::find(lenders.begin(), lenders.end(), kv.first);
        const bool lends = can_borrow && kv.first != borrower && at != lenders.end();
        const size_t li = static_cast<size_t>(at - lenders.begin());
        int left = lends && li < lend_slots.size() ? lend_slots[li] : 0;
        const bool all = left <= 0;
        for (size_t i = 0; i < kv.second.regions.size(); i++) {
            const Region& r = kv.second.regions[i];
            std::pair<int, uint64_t> w{kv.first, 0};
            if (lends && (all || left > 0)) {
                w = {borrower, lend_prefix(r, unit, all ? 0 : left)};
                if (!all) left -= carve_slots(r.begin, w.second, unit);
            }
            want[{kv.first, i}] = w;
        }
    }
    auto differs = [&](int owner, size_t i, const Region& r) {
        const std::pair<int, uint64_t>& w = want.at({owner, i});
        return r.tenant != w.first || (w.first != owner && r.lent != w.second);
    };
    bool change = false;
    for (auto& kv : models_)
        for (size_t i = 0; i < kv.second.regions.size(); i++) change = change || differs(kv.first, i, kv.second.regions[i]);
    if (!change) return;
    // Slots are re-carved below: no copy may be writing into one (the copy thread holds a reference).
    // The copy thread starts no new copy meanwhile (pick_job): each copy's end would otherwise find the
    // next one started, and the wait last as long as the copy thread has work. The wait is a copy wait.
    retenanting_ = true;
    const auto t0 = std::chrono::steady_clock::now();
    cv_ready_.wait(lk, [&] {
        for (const auto& kv : models_) {
            if (kv.second.head_loading) return false;
            for (const Slot& sl : kv.second.slots)
                if (sl.loading) return false;
        }
        return true;
    });
    retenanting_ = false;
    const auto t1 = std::chrono::steady_clock::now();
    stats_.wait_ns += static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count());
    if (tracer_ && tracer_->on() && t1 - t0 >= std::chrono::microseconds(1))
        tracer_->record_wait({borrower, -1, trace_us(t0), trace_us(t1)});
    for (auto& kv : models_) {
        for (size_t i = 0; i < kv.second.regions.size(); i++) {
            Region& r = kv.second.regions[i];
            if (!differs(kv.first, i, r)) continue;
            const std::pair<int, uint64_t> w = want.at({kv.first, i});
            const int idx = static_cast<int>(i);
            const uint8_t* old_past = r.tenant != kv.first ? r.begin + r.lent : r.begin;
            const uint8_t* new_past = w.first != kv.first ? r.begin + w.second : r.begin;
            // The tenant's slots in r go; so do the owner's that the new prefix covers. The owner's slots
            // past both prefixes keep their layers.
            auto fold_out = [&](std::vector<Slot>& held, auto&& gone) {
                for (const Slot& x : held)
                    if (gone(x)) {
                        assert(x.pins == 0 && "a region is lent between steps only");
                        r.last_read = fence_later(r.last_read, x.last_read);
                    }
                held.erase(std::remove_if(held.begin(), held.end(), gone), held.end());
            };
            auto in_r = [&](const Slot& x) { return x.region_owner == kv.first && x.region_index == idx; };
            if (r.tenant != kv.first) fold_out(models_.at(r.tenant).slots, in_r);
            fold_out(kv.second.slots, [&](const Slot& x) { return in_r(x) && x.ptr < new_past; });
            r.last_read = fence_later(r.last_read, last_read_);  // the head's readers are not tracked per slot
            if (r.has_head && kv.second.head >= old_past && kv.second.head < new_past)
                kv.second.head_ready = false;  // the loan overwrites it
            r.tenant = w.first;
            r.lent = w.first != kv.first ? w.second : 0;
            carve(kv.first, r, idx, old_past);
        }
    }
}

void Residency::add_swap_model(int model_id, std::shared_ptr<const ModelWeights> w, const std::string& owner) {
    std::lock_guard<std::mutex> lk(mu_);
    swap_.add(model_id, std::move(w), owner);
}

// ---- whole-model swapping ----

SwapPool::~SwapPool() {
    for (auto& kv : models_)
        for (DeviceBuffer& b : kv.second.units) ledger_.free(b);
}

void SwapPool::add(int model_id, std::shared_ptr<const ModelWeights> w, const std::string& owner) {
    Model m;
    m.w = std::move(w);
    m.owner = owner;
    models_[model_id] = std::move(m);
}

void SwapPool::remove(int model_id) {
    auto it = models_.find(model_id);
    if (it == models_.end()) return;
    assert(it->second.in_use == 0);
    for (DeviceBuffer& b : it->second.units) ledger_.free(b);
    models_.erase(it);
}

UnitHandle SwapPool::acquire(UnitRef u, const std::function<size_t(int)>& next_use, ComputeFence after,
                             std::unique_lock<std::mutex>& lk, ResidencyStats& stats) {
    Model& m = models_.at(u.model);
    if (m.units.empty()) {
        stats.n_misses++;
        const auto t0 = std::chrono::steady_clock::now();
        swap_in(u.model, m, next_use, after, lk);
        stats.n_loads += static_cast<uint64_t>(m.w->n_units());
        stats.bytes_copied += m.w->total_unit_bytes();
        const auto swap_ns = static_cast<uint64_t>(
            std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
        stats.wait_ns += swap_ns;
        stats.copy_ns += swap_ns;  // the swap's copies run on this thread
    } else {
        stats.n_hits++;
    }
    m.in_use++;
    return UnitHandle{m.units[static_cast<size_t>(u.unit)].ptr, m.copied};
}

void SwapPool::release(UnitRef u) {
    Model& m = models_.at(u.model);
    assert(m.in_use > 0);
    m.in_use--;
}

ModelResidency SwapPool::info(int model_id) const {
    ModelResidency r;
    auto it = models_.find(model_id);
    if (it != models_.end()) r.n_units_loaded = static_cast<int>(it->second.units.size());
    return r;
}

int SwapPool::n_pins(int model_id) const {
    auto it = models_.find(model_id);
    return it == models_.end() ? 0 : it->second.in_use;
}

// Books and copies every unit of a swapped-out model, evicting idle swap-mode
// models whole until it fits. The copy is synchronous: a swap is a stall.
// Victims go in next-use order (the model the schedule needs last goes first).
// KV blocks booked between swaps fragment the arena, so the ledger can have room
// while no hole holds a unit: units are placed largest first (for the reference
// models, the head), and when one still finds no hole, the partial booking is undone,
// one more model is evicted and placement starts over.
// Precondition: the model is swapped out (m.units empty); caller holds lk.
void SwapPool::swap_in(int model, Model& m, const std::function<size_t(int)>& next_use, ComputeFence after,
                       std::unique_lock<std::mutex>& lk) {
    auto evict_one = [&] {
        Model* victim = nullptr;
        size_t victim_next = 0;
        for (auto& kv : models_) {
            Model& o = kv.second;
            if (kv.first == model || o.in_use != 0 || o.units.empty()) continue;
            const size_t nu = next_use(kv.first);
            if (victim == nullptr || nu > victim_next) {
                victim = &o;
                victim_next = nu;
            }
        }
        if (victim == nullptr) return false;
        for (DeviceBuffer& vb : victim->units) ledger_.free(vb);
        victim->units.clear();
        return true;
    };
    const int n = m.w->n_units();
    std::vector<int> order(static_cast<size_t>(n));
    for (int u = 0; u < n; u++) order[static_cast<size_t>(u)] = u;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return m.w->unit(a).n_bytes > m.w->unit(b).n_bytes; });
    while (ledger_.headroom_bytes() < m.w->total_unit_bytes() && evict_one()) {
    }
    for (;;) {
        m.units.assign(static_cast<size_t>(n), DeviceBuffer{});
        bool placed = true;
        for (int u : order) {
            DeviceBuffer& b = m.units[static_cast<size_t>(u)];
            b = ledger_.alloc(m.owner, BookKind::Weights, m.w->unit(u).n_bytes);
            if (!b) {
                placed = false;
                break;
            }
        }
        if (placed) break;
        for (DeviceBuffer& b : m.units) ledger_.free(b);
        m.units.clear();
        if (!evict_one())
            throw Error("whole-model swap: '" + m.owner + "' does not fit the device budget with every other model " +
                        "evicted (" + std::to_string(m.w->total_unit_bytes()) + " weight bytes, " +
                        std::to_string(ledger_.headroom_bytes()) + " bytes of headroom; KV blocks may fragment it)");
    }
    lk.unlock();
    CopyFence copied;
    for (int u = 0; u < n; u++)
        copied = fence_later(copied, m.w->assemble_unit(u, m.units[static_cast<size_t>(u)].ptr, ledger_.device(), after));
    lk.lock();
    m.copied = copied;
}

// ---- resident and streamed models ----

void Residency::remove_model(int model_id) {
    std::unique_lock<std::mutex> lk(mu_);
    if (swap_.has(model_id)) {
        swap_.remove(model_id);
        return;
    }
    if (models_.count(model_id) == 0) return;
    retenant_locked(-1, {}, {}, lk);  // every loan ends: its regions hold only its own units
    auto it = models_.find(model_id);
    // Wait out an in-flight copy into one of its slots or its head.
    cv_ready_.wait(lk, [&] {
        if (it->second.head_loading) return false;
        for (const Slot& s : it->second.slots)
            if (s.loading) return false;
        return true;
    });
    Entry e = std::move(it->second);
    models_.erase(it);
    lk.unlock();
    for (DeviceBuffer& b : e.units) ledger_.free(b);
    for (const Slot& s : e.slots) {
        (void)s;
        assert(s.pins == 0);
    }
    for (Region& r : e.regions)
        for (DeviceBuffer& b : r.bufs) ledger_.free(b);
}

ModelResidency Residency::model_info(int model_id) const {
    std::lock_guard<std::mutex> lk(mu_);
    if (swap_.has(model_id)) return swap_.info(model_id);
    ModelResidency r;
    auto it = models_.find(model_id);
    if (it == models_.end()) return r;
    r.resident = it->second.resident;
    if (r.resident) {
        r.n_units_loaded = static_cast<int>(it->second.units.size());
    } else {
        const Entry& e = it->second;
        r.n_slots = e.n_own_slots;
        r.n_held_slots = static_cast<int>(e.slots.size());
        r.slot_bytes = e.w->layer_unit_bytes();
        r.head_ready = e.head_ready;
        for (const Slot& s : e.slots) r.n_cached += s.ready ? 1 : 0;
        r.n_units_loaded = r.n_cached + (e.head_ready ? 1 : 0);
        for (const Region& g : e.regions) r.region_bytes += g.n_bytes;
    }
    return r;
}

std::vector<int> Residency::slot_units(int model_id) const {
    std::lock_guard<std::mutex> lk(mu_);
    std::vector<int> out;
    auto it = models_.find(model_id);
    if (it == models_.end()) return out;
    for (const Slot& s : it->second.slots) out.push_back(s.ready || s.loading ? s.unit : -1);
    return out;
}

void Residency::set_schedule(std::vector<UnitRef> order) {
    bool wake = false;
    {
        std::lock_guard<std::mutex> lk(mu_);
        sched_ = std::move(order);
        cursor_ = 0;
        wake = copy_has_work_locked();
    }
    if (wake) cv_copy_.notify_one();
}

bool Residency::copy_has_work_locked() {
    Job job;
    return copy_idle_ && pick_job(job);
}

Residency::Slot* Residency::find_slot(Entry& e, int unit) {
    for (Slot& s : e.slots)
        if (s.unit == unit && (s.ready || s.loading)) return &s;
    return nullptr;
}

size_t Residency::next_use(int model, int unit, size_t from) const {
    for (size_t j = from; j < sched_.size(); j++)
        if (sched_[j].model == model && sched_[j].unit == unit) return j;
    return std::numeric_limits<size_t>::max();
}

// The slot to overwrite so that the unit scheduled at target_pos can load, or -1.
// Never evicts a pinned or loading slot, nor a unit needed at or before target_pos.
int Residency::pick_victim(Entry& e, int model, size_t target_pos) const {
    int best = -1;
    size_t best_next = 0;
    uint64_t best_lru = std::numeric_limits<uint64_t>::max();
    for (size_t i = 0; i < e.slots.size(); i++) {
        const Slot& s = e.slots[i];
        if (s.pins > 0 || s.loading) continue;
        if (!s.ready) return static_cast<int>(i);  // empty slot
        const size_t nu = next_use(model, s.unit, cursor_);
        if (nu <= target_pos) continue;
        if (eviction_ == Eviction::Belady) {
            if (best < 0 || nu > best_next) {
                best = static_cast<int>(i);
                best_next = nu;
            }
        } else if (s.last_use < best_lru) {
            best = static_cast<int>(i);
            best_lru = s.last_use;
        }
    }
    return best;
}

// A slot whose loss costs no copy: an empty one first, else one holding a unit the schedule does not use
// again; -1 if none. Unlike pick_victim, it does not depend on the unit to be loaded.
int Residency::free_slot(const Entry& e, int model) const {
    int unscheduled = -1;
    for (size_t i = 0; i < e.slots.size(); i++) {
        const Slot& s = e.slots[i];
        if (s.pins > 0 || s.loading) continue;
        if (!s.ready) return static_cast<int>(i);
        if (unscheduled < 0 && next_use(model, s.unit, cursor_) == std::numeric_limits<size_t>::max())
            unscheduled = static_cast<int>(i);
    }
    return unscheduled;
}

// The earliest scheduled unit that is not in device memory, with a slot to load
// it into, provided fewer than prefetch_depth copies are already ahead of compute.
// Units that stayed in a slot since an earlier use (hits) cost no copy and do not
// count against the depth, so the copy thread looks past a cached run of layers
// (and past the current model into the next one) to the next miss.
// Past the depth it still takes a copy that evicts nothing the schedule uses: into an
// empty slot, over a unit not scheduled again, or a head back from a loan (its own
// buffer). Such a copy costs no later copy, so the link, idle while a model computes
// on cached layers, fills the next model's slots before its turn (a slot a loan
// emptied, a prefill round's next model) instead of at it. Only where copies run
// beside compute (Device::copies_beside_compute).
bool Residency::pick_job(Job& job) {
    if (retenanting_) return false;  // set_tenants waits for the copies in flight
    const int depth = std::max(depth_, 1);
    int n_ahead = 0;
    // Past the depth: models found without a free slot (free_slot), searched once per call: this also runs
    // on the step thread, per acquire and release (copy_has_work_locked).
    constexpr int kMaxFull = 8;
    int full[kMaxFull];
    int n_full = 0;
    for (size_t i = cursor_; i < sched_.size(); i++) {
        const bool free_only = n_ahead >= depth;
        if (free_only && !copy_beside_) return false;
        const UnitRef u = sched_[i];
        auto it = models_.find(u.model);
        if (it == models_.end() || it->second.resident) continue;  // swap-mode models are not in models_
        Entry& e = it->second;
        if (u.unit == e.w->n_units() - 1) {  // the head: copied back after a loan, else resident
            if (e.head_loading) n_ahead++;
            if (e.head_ready || e.head_loading || e.regions.empty() || head_lent(e, u.model)) continue;
            job = Job{u.model, u.unit, -1};
            return true;
        }
        if (const Slot* s = find_slot(it->second, u.unit)) {
            n_ahead += s->ahead ? 1 : 0;
            continue;
        }
        int v = -1;
        if (!free_only) {
            v = pick_victim(e, u.model, i);
            if (v < 0) return false;  // later units must wait for slots to free up
        } else {
            if (std::find(full, full + n_full, u.model) != full + n_full) continue;
            v = free_slot(e, u.model);
            if (v < 0) {
                if (n_full < kMaxFull) full[n_full++] = u.model;
                continue;
            }
        }
        job = Job{u.model, u.unit, v};
        return true;
    }
    return false;
}

void Residency::copy_main() {
    std::unique_lock<std::mutex> lk(mu_);
    while (!stop_) {
        Job job;
        if (!pick_job(job)) {
            copy_idle_ = true;
            cv_copy_.wait(lk);
            copy_idle_ = false;
            continue;
        }
        Entry& e = models_[job.model];
        if (job.slot < 0) {  // the head, back from a loan
            e.head_loading = true;
            std::shared_ptr<const ModelWeights> w = e.w;
            uint8_t* dst = e.head;
            const ComputeFence after = e.regions[0].last_read;
            lk.unlock();
            const auto c0 = std::chrono::steady_clock::now();
            const CopyFence copied = w->assemble_unit(job.unit, dst, ledger_.device(), after);
            const auto c_ns = static_cast<uint64_t>(
                std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - c0).count());
            if (tracer_ && tracer_->on())
                tracer_->record_copy({job.model, job.unit, 1, w->unit(job.unit).n_bytes, trace_us(c0),
                                      trace_us(c0) + static_cast<int64_t>(c_ns / 1000)});
            lk.lock();
            stats_.copy_ns += c_ns;
            e.copied = copied;
            e.head_loading = false;
            e.head_ready = true;
            stats_.n_loads++;
            stats_.bytes_copied += w->unit(job.unit).n_bytes;
            cv_ready_.notify_all();
            continue;
        }
        Slot& s = e.slots[static_cast<size_t>(job.slot)];
        s.unit = job.unit;
        s.ready = false;
        s.loading = true;
        s.ahead = true;
        std::shared_ptr<const ModelWeights> w = e.w;
        uint8_t* dst = s.ptr;
        const ComputeFence after = s.last_read;
        lk.unlock();
        const auto c0 = std::chrono::steady_clock::now();
        const CopyFence copied = w->assemble_unit(job.unit, dst, ledger_.device(), after);
        const auto c_ns = static_cast<uint64_t>(
            std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - c0).count());
        lk.lock();
        stats_.copy_ns += c_ns;
        s.copied = copied;
        s.loading = false;
        s.ready = true;
        s.last_use = ++clock_;
        stats_.n_loads++;
        stats_.bytes_copied += w->unit(job.unit).n_bytes;
        if (tracer_ && tracer_->on())
            tracer_->record_copy({job.model, job.unit, 1, w->unit(job.unit).n_bytes, trace_us(c0),
                                  trace_us(c0) + static_cast<int64_t>(c_ns / 1000)});
        cv_ready_.notify_all();
    }
}

UnitHandle Residency::acquire(UnitRef u) {
    std::unique_lock<std::mutex> lk(mu_);
    if (cursor_ < sched_.size() && sched_[cursor_] == u) {
        cursor_++;
    } else {  // off-schedule: append so the policy sees it as the next use
        sched_.insert(sched_.begin() + static_cast<std::ptrdiff_t>(cursor_), u);
        cursor_++;
    }
    if (swap_.has(u.model)) {
        // The swapped-in units land where evicted models' units (or freed KV blocks) were:
        // the copies wait for every compute that may still read those bytes.
        // Its figures go through d: the lock is dropped during a swap-in, when the copy thread may count too.
        ResidencyStats d;
        const UnitHandle h =
            swap_.acquire(u, [&](int model) { return next_use(model, 0, cursor_); }, last_read_, lk, d);
        stats_.bytes_copied += d.bytes_copied;
        stats_.n_loads += d.n_loads;
        stats_.n_hits += d.n_hits;
        stats_.n_misses += d.n_misses;
        stats_.wait_ns += d.wait_ns;
        stats_.copy_ns += d.copy_ns;
        if (tracer_ && tracer_->on() && d.n_loads > 0) {  // a swap-in: its copies are its wait
            const int64_t t1 = trace_now_us(), t0 = t1 - static_cast<int64_t>(d.wait_ns / 1000);
            tracer_->record_copy({u.model, -1, static_cast<int>(d.n_loads), d.bytes_copied, t0, t1});
            tracer_->record_wait({u.model, -1, t0, t1});
        }
        return h;
    }
    auto it = models_.find(u.model);
    assert(it != models_.end());
    Entry& e = it->second;
    if (e.resident) return UnitHandle{e.units[static_cast<size_t>(u.unit)].ptr, e.copied};
    if (u.unit == e.w->n_units() - 1) {
        if (!e.head_ready) {  // its region came back from a loan: the head is copied again
            if (e.regions.empty() || head_lent(e, u.model))
                throw Error("residency: the head of '" + e.owner + "' is acquired while its region is lent");
            stats_.n_misses++;
            const auto t0 = std::chrono::steady_clock::now();
            if (!e.head_loading) {
                e.head_loading = true;
                const ComputeFence after = e.regions[0].last_read;
                lk.unlock();
                const CopyFence copied = e.w->assemble_unit(u.unit, e.head, ledger_.device(), after);
                lk.lock();
                e.copied = copied;
                e.head_loading = false;
                e.head_ready = true;
                stats_.n_loads++;
                stats_.bytes_copied += e.w->unit(u.unit).n_bytes;
                stats_.copy_ns += static_cast<uint64_t>(
                    std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
                if (tracer_ && tracer_->on())
                    tracer_->record_copy({u.model, u.unit, 1, e.w->unit(u.unit).n_bytes, trace_us(t0), trace_now_us()});
                cv_ready_.notify_all();
            } else {
                cv_ready_.wait(lk, [&] { return e.head_ready; });
            }
            stats_.wait_ns += static_cast<uint64_t>(
                std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
            if (tracer_ && tracer_->on()) tracer_->record_wait({u.model, u.unit, trace_us(t0), trace_now_us()});
        }
        return UnitHandle{e.head, e.copied};
    }
    Slot* s = find_slot(e, u.unit);
    if (s != nullptr && s->ready) {
        stats_.n_hits++;
    } else {
        stats_.n_misses++;
        const auto t0 = std::chrono::steady_clock::now();
        if (depth_ == 0) {  // no copy thread: load synchronously on this thread
            // The unit at cursor_-1 is the target; treat its position as cursor_-1.
            cursor_--;
            int v = pick_victim(e, u.model, cursor_);
            cursor_++;
            assert(v >= 0 && "a streamed model needs a free or evictable slot");
            s = &e.slots[static_cast<size_t>(v)];
            s->unit = u.unit;
            s->ready = false;
            s->loading = true;
            const ComputeFence after = s->last_read;
            lk.unlock();
            const auto c0 = std::chrono::steady_clock::now();
            const CopyFence copied = e.w->assemble_unit(u.unit, s->ptr, ledger_.device(), after);
            const auto c_ns = static_cast<uint64_t>(
                std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - c0).count());
            lk.lock();
            stats_.copy_ns += c_ns;
            s->copied = copied;
            s->loading = false;
            s->ready = true;
            stats_.n_loads++;
            stats_.bytes_copied += e.w->unit(u.unit).n_bytes;
            if (tracer_ && tracer_->on())
                tracer_->record_copy({u.model, u.unit, 1, e.w->unit(u.unit).n_bytes, trace_us(c0),
                                      trace_us(c0) + static_cast<int64_t>(c_ns / 1000)});
        } else {
            // The copy thread serves the earliest missing unit first; u was at
            // cursor_-1, so point its window back to include u until it is in.
            cursor_--;
            cv_copy_.notify_all();
            cv_ready_.wait(lk, [&] {
                s = find_slot(e, u.unit);
                return s != nullptr && s->ready;
            });
            cursor_++;
        }
        const auto t1 = std::chrono::steady_clock::now();
        stats_.wait_ns += static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count());
        if (tracer_ && tracer_->on()) tracer_->record_wait({u.model, u.unit, trace_us(t0), trace_us(t1)});
    }
    s->pins++;
    s->ahead = false;
    s->last_use = ++clock_;
    const UnitHandle h{s->ptr, s->copied};
    const bool wake = copy_has_work_locked();  // the window moved: prefetch further
    lk.unlock();
    if (wake) cv_copy_.notify_one();
    return h;
}

void Residency::release(UnitRef u, ComputeFence done) {
    bool wake = false;
    {
        std::lock_guard<std::mutex> lk(mu_);
        last_read_ = fence_later(last_read_, done);
        if (swap_.has(u.model)) {
            swap_.release(u);
            return;
        }
        auto it = models_.find(u.model);
        assert(it != models_.end());
        if (it->second.resident) return;
        if (u.unit == it->second.w->n_units() - 1) return;  // the resident head
        Slot* s = find_slot(it->second, u.unit);
        assert(s != nullptr && s->pins > 0);
        s->pins--;
        s->last_read = fence_later(s->last_read, done);
        wake = copy_has_work_locked();  // an unpinned slot may take the next copy
    }
    if (wake) cv_copy_.notify_one();
}

int Residency::n_pins(int model_id) const {
    std::lock_guard<std::mutex> lk(mu_);
    if (swap_.has(model_id)) return swap_.n_pins(model_id);
    auto it = models_.find(model_id);
    if (it == models_.end()) return 0;
    int n = 0;
    for (const Slot& s : it->second.slots) n += s.pins;
    return n;
}

ResidencyStats Residency::stats() const {
    std::lock_guard<std::mutex> lk(mu_);
    return stats_;
}

}  // namespace lmx
