// test_backend.cpp — the forward pass through the Backend seam: against a naive reference,
// streamed == resident bit for bit, the copy/compute fence contract, and no pinned slot
// after a failed step.
// Owner: engine tests. check_forward_against_naive takes any Device (backend_checks.h), so a
// new device (vulkan/) runs the same whole-forward check.
#include <stdlib.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <vector>

#include "backend.h"
#include "backend_cpu.h"
#include "backend_checks.h"
#include "check.h"
#include "forward.h"
#include "kernels/kernels.h"
#include "kv_cache.h"
#include "ledger.h"
#include "residency.h"
#include "test_rand.h"
#include "tiny_model.h"

using namespace lmx;

namespace {

std::string tmpdir() {
    char tmpl[] = "/tmp/lmx_backend_XXXXXX";
    return std::string(mkdtemp(tmpl));
}

// One model on one device: ledger, residency, KV cache and a workspace, as the engine holds them.
struct Rig {
    std::shared_ptr<const ModelWeights> w;
    std::unique_ptr<Ledger> ledger;
    std::unique_ptr<Residency> res;
    std::unique_ptr<KvCache> kv;
    DeviceBuffer ws_mem;
    Workspace ws;
    static constexpr int kMaxTokens = 64, kMaxRows = 8;

    Rig(std::shared_ptr<const ModelWeights> weights, std::unique_ptr<Device> dev, bool resident, int n_slots,
        int depth, int block_tokens = 4)
        : w(std::move(weights)) {
        ledger = std::make_unique<Ledger>(std::move(dev), 1.0);
        res = std::make_unique<Residency>(*ledger, depth, Eviction::Belady);
        CHECK(res->add_model(0, w, "tiny", resident, n_slots));
        const ModelSpec& s = w->spec();
        kv = std::make_unique<KvCache>(*ledger, "tiny", s.n_layer, s.kv_dim(), block_tokens);
        const int lanes = ledger->device().backend().scratch_lanes();
        ws_mem = ledger->alloc("tiny", BookKind::Workspace, workspace_bytes(s, kMaxTokens, kMaxRows, lanes));
        CHECK(ws_mem);
        workspace_init(ws, ws_mem.ptr, s, kMaxTokens, kMaxRows, lanes);
    }
    ~Rig() {
        ledger->free(ws_mem);
        kv.reset();
        res->remove_model(0);
    }
    void schedule() {
        std::vector<UnitRef> order;
        for (int u = 0; u < w->n_units(); u++) order.push_back(UnitRef{0, u});
        res->set_schedule(order);
    }
};

// A sequence being run: its tokens and block table.
struct Seq {
    std::vector<int32_t> tokens;
    std::vector<int32_t> blocks;
    int64_t n_computed = 0;
};

// Runs one step over seqs: each runs `n[i]` more tokens (0 = not in the step) and wants logits.
// Returns the logits, [rows, n_vocab], copied out.
std::vector<float> step(Rig& rig, std::vector<Seq>& seqs, const std::vector<int>& n, Backend& be) {
    std::vector<ForwardItem> items;
    for (size_t i = 0; i < seqs.size(); i++) {
        if (n[i] == 0) continue;
        Seq& q = seqs[i];
        CHECK(rig.kv->reserve(q.blocks, q.n_computed + n[i]) == BookResult::Ok);
        items.push_back(ForwardItem{q.tokens.data() + q.n_computed, n[i], q.n_computed, &q.blocks, true});
    }
    rig.schedule();
    const float* logits = forward_step(*rig.w, 0, *rig.res, *rig.kv, rig.ws, items, be);
    for (size_t i = 0; i < seqs.size(); i++) seqs[i].n_computed += n[i];
    return std::vector<float>(logits, logits + items.size() * static_cast<size_t>(rig.w->spec().n_vocab));
}

// The model computed the plainest way: scalar reference kernels, one sequence at a time,
// its whole prefix every time, its KV in one contiguous block. Last-position logits.
std::vector<float> naive_logits(const ModelWeights& w, const std::vector<int32_t>& tokens) {
    const ModelSpec& s = w.spec();
    const int64_t T = static_cast<int64_t>(tokens.size()), dim = s.dim, qd = s.q_dim(), kvd = s.kv_dim(), ffn = s.ffn_dim;
    CpuDevice host(1 << 20);  // only for assemble_unit's copies into the vectors below
    std::vector<std::vector<uint8_t>> units(static_cast<size_t>(w.n_units()));
    for (int u = 0; u < w.n_units(); u++) {
        units[static_cast<size_t>(u)].resize(w.unit(u).n_bytes + 64);
        w.assemble_unit(u, units[static_cast<size_t>(u)].data(), host);
    }
    auto f = [&](int u, uint64_t off) { return reinterpret_cast<const float*>(units[static_cast<size_t>(u)].data() + off); };
    auto m = [&](int u, uint64_t off, int64_t n_out, int64_t n_in) {
        return WeightView{units[static_cast<size_t>(u)].data() + off, w.matrix_dtype(), n_out, n_in};
    };
    std::vector<float> x(static_cast<size_t>(T * dim)), xb(x.size()), q(static_cast<size_t>(T * qd)), att(q.size()),
        k(static_cast<size_t>(T * kvd)), v(k.size()), kvblk(static_cast<size_t>(2 * T * kvd)),
        gate(static_cast<size_t>(T * ffn)), up(gate.size()), scratch(static_cast<size_t>(T + 16));
    for (int64_t t = 0; t < T; t++) dequantize_row(w.embed(), tokens[static_cast<size_t>(t)], x.data() + t * dim);
    const LayerLayout& L = w.layer_layout();
    for (int l = 0; l < s.n_layer; l++) {
        ref::rmsnorm(x.data(), f(l, L.attn_norm), s.rms_eps, T, dim, xb.data());
        ref::matmul(m(l, L.wq, qd, dim), xb.data(), T, q.data(), nullptr);
        ref::matmul(m(l, L.wk, kvd, dim), xb.data(), T, k.data(), nullptr);
        ref::matmul(m(l, L.wv, kvd, dim), xb.data(), T, v.data(), nullptr);
        for (int64_t t = 0; t < T; t++) {
            ref::rope(q.data() + t * qd, s.n_heads, s.head_dim, t, s.rope_inv_freq.data());
            ref::rope(k.data() + t * kvd, s.n_kv_heads, s.head_dim, t, s.rope_inv_freq.data());
        }
        std::memcpy(kvblk.data(), k.data(), k.size() * 4);
        std::memcpy(kvblk.data() + T * kvd, v.data(), v.size() * 4);
        const float* kb[1] = {kvblk.data()};
        const float* vb[1] = {kvblk.data() + T * kvd};
        ref::attention(q.data(), T, 0, kb, vb, static_cast<int>(T), s.n_heads, s.n_kv_heads, s.head_dim,
                       1.0f / std::sqrt(static_cast<float>(s.head_dim)), att.data(), scratch.data());
        ref::matmul(m(l, L.wo, dim, qd), att.data(), T, xb.data(), nullptr);
        for (size_t i = 0; i < x.size(); i++) x[i] += xb[i];
        ref::rmsnorm(x.data(), f(l, L.ffn_norm), s.rms_eps, T, dim, xb.data());
        ref::matmul(m(l, L.w_gate, ffn, dim), xb.data(), T, gate.data(), nullptr);
        ref::matmul(m(l, L.w_up, ffn, dim), xb.data(), T, up.data(), nullptr);
        ref::silu_mul(gate.data(), up.data(), gate.data(), T * ffn);
        ref::matmul(m(l, L.w_down, dim, ffn), gate.data(), T, xb.data(), nullptr);
        for (size_t i = 0; i < x.size(); i++) x[i] += xb[i];
    }
    const HeadLayout& H = w.head_layout();
    std::vector<float> row(x.end() - dim, x.end()), logits(static_cast<size_t>(s.n_vocab));
    ref::rmsnorm(row.data(), f(s.n_layer, H.norm), s.rms_eps, 1, dim, row.data());
    ref::matmul(m(s.n_layer, H.lm_head, s.n_vocab, dim), row.data(), 1, logits.data(), nullptr);
    return logits;
}

double max_rel_err(const float* a, const std::vector<float>& b) {
    double err = 0, scale = 0;
    for (size_t i = 0; i < b.size(); i++) {
        err = std::max(err, static_cast<double>(std::fabs(a[i] - b[i])));
        scale = std::max(scale, static_cast<double>(std::fabs(b[i])));
    }
    return err / scale;
}

std::vector<Seq> three_seqs() {
    std::vector<Seq> seqs(3);
    for (int i = 0; i < 22; i++) seqs[0].tokens.push_back((i * 7 + 3) % 64);
    for (int i = 0; i < 9; i++) seqs[1].tokens.push_back((i * 5 + 1) % 64);
    for (int i = 0; i < 13; i++) seqs[2].tokens.push_back((i * 11 + 2) % 64);
    return seqs;
}

void check_forward_against_naive_on(std::unique_ptr<Device> dev, bool resident, double tol) {
    const std::string dir = tmpdir();
    auto w = std::make_shared<const ModelWeights>(lmx_test::write_tiny_model(dir, 3), nullptr);
    Rig rig(w, std::move(dev), resident, 2, 1);
    Backend& be = rig.ledger->device().backend();
    std::vector<Seq> seqs = three_seqs();
    const std::vector<std::vector<int>> plan = {{10, 7, 0}, {10, 2, 0}, {2, 0, 13}, {1, 1, 1}, {1, 1, 1}};
    for (const std::vector<int>& run : plan) {
        for (size_t i = 0; i < seqs.size(); i++)  // decode: the sequence's next token
            while (seqs[i].tokens.size() < static_cast<size_t>(seqs[i].n_computed + run[i]))
                seqs[i].tokens.push_back(static_cast<int32_t>((seqs[i].tokens.size() * 13) % 64));
        const std::vector<float> got = step(rig, seqs, run, be);
        size_t row = 0;
        for (size_t i = 0; i < seqs.size(); i++) {
            if (run[i] == 0) continue;
            const std::vector<int32_t> prefix(seqs[i].tokens.begin(), seqs[i].tokens.begin() + seqs[i].n_computed);
            const double e = max_rel_err(got.data() + row * 64, naive_logits(*w, prefix));
            CHECK(e < tol);
            row++;
        }
    }
    for (Seq& q : seqs) rig.kv->release(q.blocks);
}

}  // namespace

namespace lmx_test {
void check_forward_against_naive(const std::function<std::unique_ptr<Device>()>& make_device, double tol) {
    check_forward_against_naive_on(make_device(), true, tol);
    check_forward_against_naive_on(make_device(), false, tol);
}
}  // namespace lmx_test

TEST(backend_forward_matches_the_naive_model_resident_and_streamed) {
    lmx_test::check_forward_against_naive([] { return std::make_unique<CpuDevice>(16 << 20, 2); }, 1e-5);
}

// The CPU backend splits its row-wise and element-wise ops over the pool once a step is large
// (a prefill's); the split must not change a bit. Every such op on a 2-sequence, 300-token step,
// on 1 thread and on 3, f16 and f32 KV: equal bits, and equal to the kernels called on the whole.
TEST(backend_cpu_split_ops_are_thread_count_invariant_bitwise) {
    constexpr int kDim = 320, kHeads = 5, kHeadDim = 64, kKvDim = 128, kFfn = 1100, kBlock = 16, kVocab = 50;
    const int32_t n_tok[2] = {217, 83};
    const int64_t pos0[2] = {0, 40};
    constexpr int64_t T = 300;
    lmx_test::Rng rng(31);
    using lmx_test::random_vec;
    const std::vector<float> x0 = random_vec(rng, T * kDim), nw = random_vec(rng, kDim), add0 = random_vec(rng, T * kDim);
    const std::vector<float> q0 = random_vec(rng, T * kHeads * kHeadDim), k0 = random_vec(rng, T * kKvDim, -4, 4);
    const std::vector<float> v0 = random_vec(rng, T * kKvDim), g0 = random_vec(rng, T * kFfn, -12, 12);
    const std::vector<float> u0 = random_vec(rng, T * kFfn), table = random_vec(rng, kVocab * kDim);
    std::vector<float> inv_freq(kHeadDim / 2);
    for (int i = 0; i < kHeadDim / 2; i++) inv_freq[static_cast<size_t>(i)] = std::pow(10000.0f, -2.0f * i / kHeadDim);
    std::vector<int32_t> tokens(T);
    for (int64_t t = 0; t < T; t++) tokens[static_cast<size_t>(t)] = static_cast<int32_t>((t * 7) % kVocab);
    for (const bool f16 : {false, true}) {
        std::vector<std::vector<float>> runs;
        for (const int n_threads : {1, 3}) {
            CpuBackend be(n_threads);
            const int64_t esz = f16 ? 2 : 4, block_floats = 2 * kBlock * kKvDim * esz / 4;  // one layer
            std::vector<std::vector<float>> mem(2);
            std::vector<std::vector<float*>> blocks(2);
            StepSeq seqs[2];
            for (int i = 0; i < 2; i++) {
                const int n_blocks = static_cast<int>((pos0[i] + n_tok[i] + kBlock - 1) / kBlock);
                mem[static_cast<size_t>(i)].assign(static_cast<size_t>(n_blocks * block_floats), 0.0f);
                for (int b = 0; b < n_blocks; b++)
                    blocks[static_cast<size_t>(i)].push_back(mem[static_cast<size_t>(i)].data() + b * block_floats);
                seqs[i] = StepSeq{n_tok[i], pos0[i], blocks[static_cast<size_t>(i)].data(), n_blocks, true};
            }
            StepDesc d;
            d.seqs = seqs;
            d.n_seqs = 2;
            d.n_tokens = T;
            d.n_logit_rows = 2;
            d.kv = KvGeometry{kBlock, kKvDim, 2 * kBlock * kKvDim, kBlock * kKvDim, f16, 1};
            be.begin_step(d);
            std::vector<float> out, x = x0, q = q0, g = g0, emb(static_cast<size_t>(T * kDim));
            be.embed(WeightView{table.data(), DType::F32, kVocab, kDim}, tokens.data(), emb.data());
            be.rmsnorm(x.data(), nw.data(), 1e-6f, T, kDim, x.data());
            be.rmsnorm(q.data(), nw.data(), 1e-6f, T * kHeads, kHeadDim, q.data());  // per head, as QK-norm
            be.rope(q.data(), kHeads, kHeadDim, inv_freq.data());
            be.add(x.data(), add0.data(), T * kDim);
            be.scale(x.data(), 25.3f, T * kDim);
            be.kv_append(0, k0.data(), v0.data());
            std::vector<float> s = g;
            be.silu_mul(s.data(), u0.data(), s.data(), T * kFfn);
            be.gelu_tanh_mul(g.data(), u0.data(), g.data(), T * kFfn);
            be.end_step();
            for (const std::vector<float>* part : {&emb, &x, &q, &s, &g, &mem[0], &mem[1]})
                out.insert(out.end(), part->begin(), part->end());
            runs.push_back(out);
            if (n_threads == 1) {  // the kernels on the whole arrays, no backend
                std::vector<float> xw = x0, gw = g0;
                lmx::rmsnorm(xw.data(), nw.data(), 1e-6f, T, kDim, xw.data());
                lmx::gelu_tanh_mul(gw.data(), u0.data(), gw.data(), T * kFfn);
                CHECK(std::memcmp(gw.data(), g.data(), gw.size() * 4) == 0);
                for (size_t i = 0; i < xw.size(); i++) xw[i] = (xw[i] + add0[i]) * 25.3f;
                CHECK(std::memcmp(xw.data(), x.data(), xw.size() * 4) == 0);
            }
        }
        CHECK(runs[0].size() == runs[1].size());
        CHECK(std::memcmp(runs[0].data(), runs[1].data(), runs[0].size() * 4) == 0);
    }
}

TEST(backend_streamed_forward_equals_resident_bit_for_bit) {
    const std::string dir = tmpdir();
    auto w = std::make_shared<const ModelWeights>(lmx_test::write_tiny_model(dir, 4), nullptr);
    std::vector<std::vector<float>> outs;
    for (int mode = 0; mode < 2; mode++) {
        Rig rig(w, std::make_unique<CpuDevice>(16 << 20, 3), mode == 0, 1, 0);  // one slot, loads on demand
        Backend& be = rig.ledger->device().backend();
        std::vector<Seq> seqs = three_seqs();
        std::vector<float> all;
        for (const std::vector<int>& n : {std::vector<int>{22, 9, 13}}) {
            const std::vector<float> got = step(rig, seqs, n, be);
            all.insert(all.end(), got.begin(), got.end());
        }
        outs.push_back(all);
        for (Seq& q : seqs) rig.kv->release(q.blocks);
    }
    CHECK(outs[0].size() == 3 * 64);
    CHECK(std::memcmp(outs[0].data(), outs[1].data(), outs[0].size() * 4) == 0);
}

namespace {

// A device whose copies and compute report real timeline values (1, 2, 3, ...), as a GPU's
// do, around the CPU's memory and kernels. It logs, in order, every copy and every unit it
// was given, so a test can check the synchronization contract of docs/engine.md on the code
// that drives a device (copies come from the copy thread: the log is locked).
class FencedDevice final : public Device, public Backend {
public:
    struct Event {
        bool is_copy;
        const void* addr;  // copy: its destination; unit: the first weight its matmuls read
        uint64_t fence;    // copy: its fence; unit: the fence begin_unit was given
        uint64_t after;    // copy: the compute it waits for; unit: the fence end_unit returned
    };
    explicit FencedDevice(uint64_t capacity) : cpu_(capacity, 2) {}

    const char* name() const override { return "fenced-cpu"; }
    uint64_t capacity_bytes() const override { return cpu_.capacity_bytes(); }
    void* alloc(uint64_t n, Placement where) override { return cpu_.alloc(n, where); }
    void free(void* p) override { cpu_.free(p); }
    CopyFence copy_in(const CopyRegion* r, size_t n, ComputeFence after) override {
        cpu_.copy_in(r, n, after);
        std::lock_guard<std::mutex> lk(mu_);
        const uint64_t f = ++copy_clock_;
        for (size_t i = 0; i < n; i++) log_.push_back({true, r[i].dst, f, after.value});
        return CopyFence{f};
    }
    void copy_wait(CopyFence) override {}
    Backend& backend() override { return *this; }

    ThreadPool& host_pool() override { return be().host_pool(); }
    int scratch_lanes() const override { return 2; }  // the CPU backend's, 2 threads
    void begin_step(const StepDesc& d) override { be().begin_step(d); }
    void begin_unit(CopyFence ready) override {
        std::lock_guard<std::mutex> lk(mu_);
        unit_ = log_.size();
        log_.push_back({false, nullptr, ready.value, 0});
    }
    ComputeFence end_unit() override {
        std::lock_guard<std::mutex> lk(mu_);
        log_[unit_].after = ++compute_clock_;
        unit_ = SIZE_MAX;
        return ComputeFence{compute_clock_};
    }
    void end_step() override { be().end_step(); }
    void abort_step() noexcept override { be().abort_step(); }
    void embed(const WeightView& t, const int32_t* tok, float* x) override { be().embed(t, tok, x); }
    void rmsnorm(const float* x, const float* w, float eps, int64_t n, int64_t d, float* y) override {
        be().rmsnorm(x, w, eps, n, d, y);
    }
    void matmul_many(const MatmulOut* o, int n, const float* x, int64_t rows) override {
        {
            std::lock_guard<std::mutex> lk(mu_);
            CHECK(unit_ != SIZE_MAX);  // weights are read only inside a unit's bracket
            if (unit_ != SIZE_MAX && log_[unit_].addr == nullptr) log_[unit_].addr = o[0].w.data;
        }
        if (fail_at_ > 0 && ++n_matmuls_ == fail_at_) throw std::runtime_error("injected op failure");
        be().matmul_many(o, n, x, rows);
    }
    void rope(float* x, int h, int hd, const float* f) override { be().rope(x, h, hd, f); }
    void kv_append(int l, const float* k, const float* v) override { be().kv_append(l, k, v); }
    void attention(int l, const float* q, const AttnParams& p, float* out) override { be().attention(l, q, p, out); }
    void silu_mul(const float* g, const float* u, float* o, int64_t n) override { be().silu_mul(g, u, o, n); }
    void add(float* x, const float* y, int64_t n) override { be().add(x, y, n); }
    void gather_rows(const float* x, int64_t d, float* rows) override { be().gather_rows(x, d, rows); }
    float* read_host(float* src, int64_t n) override { return be().read_host(src, n); }

    void fail_at_matmul(int n) {
        fail_at_ = n;
        n_matmuls_ = 0;
    }
    std::vector<Event> log() {
        std::lock_guard<std::mutex> lk(mu_);
        return log_;
    }

private:
    Backend& be() { return cpu_.backend(); }
    CpuDevice cpu_;
    std::mutex mu_;
    std::vector<Event> log_;
    size_t unit_ = SIZE_MAX;  // log index of the open unit
    uint64_t copy_clock_ = 0, compute_clock_ = 0;
    int fail_at_ = 0, n_matmuls_ = 0;
};

}  // namespace

// The contract a GPU device relies on: a unit's compute waits for the copy that filled its
// slot (begin_unit gets that copy's fence), and a slot is refilled only after the compute
// that last read it (copy_in gets that compute's fence). Streamed through 2 slots with a
// copy thread, over several steps, so slots are refilled while other units compute.
TEST(backend_unit_waits_for_its_copy_and_a_slot_refill_waits_for_its_last_reader) {
    const std::string dir = tmpdir();
    auto w = std::make_shared<const ModelWeights>(lmx_test::write_tiny_model(dir, 5), nullptr);
    auto dev = std::make_unique<FencedDevice>(16 << 20);
    FencedDevice* fd = dev.get();
    Rig rig(w, std::move(dev), false, 2, 1);
    std::vector<Seq> seqs = three_seqs();
    for (const std::vector<int>& n : {std::vector<int>{5, 4, 3}, std::vector<int>{1, 1, 1}, std::vector<int>{1, 1, 1}})
        step(rig, seqs, n, *fd);
    // Replay the log: the latest copy into each address, and the last unit that read it.
    std::map<const void*, uint64_t> copied, read_done;
    int n_units = 0, n_refills = 0;
    for (const FencedDevice::Event& e : fd->log()) {
        if (e.is_copy) {
            if (read_done.count(e.addr) != 0) n_refills++;
            CHECK(e.after >= (read_done.count(e.addr) != 0 ? read_done[e.addr] : 0));
            copied[e.addr] = e.fence;
        } else {
            n_units++;
            CHECK(e.addr != nullptr && copied.count(e.addr) != 0);
            CHECK(e.fence == copied[e.addr]);  // waits for exactly the copy that filled it
            CHECK(e.after != 0);
            read_done[e.addr] = e.after;
        }
    }
    CHECK(n_units == 3 * 6);   // 5 layers and the head, 3 steps
    CHECK(n_refills >= 6);  // 5 layers through 2 slots: slots are refilled every step (Belady keeps a few hits)
    for (Seq& q : seqs) rig.kv->release(q.blocks);
}

// A step whose op throws halfway through a layer must release that layer's slot: with one
// slot and no copy thread, a slot left pinned could never be refilled and the next step
// would find no slot to load into. The next step then computes what a fresh rig computes.
TEST(forward_step_that_throws_leaves_no_slot_pinned_and_the_next_step_runs) {
    const std::string dir = tmpdir();
    auto w = std::make_shared<const ModelWeights>(lmx_test::write_tiny_model(dir, 3), nullptr);
    std::vector<float> want;
    {
        Rig fresh(w, std::make_unique<CpuDevice>(16 << 20, 2), false, 1, 0);
        std::vector<Seq> seqs = three_seqs();
        want = step(fresh, seqs, {6, 0, 0}, fresh.ledger->device().backend());
        for (Seq& q : seqs) fresh.kv->release(q.blocks);
    }
    auto dev = std::make_unique<FencedDevice>(16 << 20);
    FencedDevice* fd = dev.get();
    Rig rig(w, std::move(dev), false, 1, 0);
    std::vector<Seq> seqs = three_seqs();
    for (int fail_at : {1, 5, 6}) {  // layer 0's qkv; layer 1's wo; layer 1's gate/up
        fd->fail_at_matmul(fail_at);
        CHECK_THROWS(step(rig, seqs, {6, 0, 0}, *fd), std::runtime_error, "injected op failure");
        CHECK(rig.res->n_pins(0) == 0);
    }
    fd->fail_at_matmul(0);
    const std::vector<float> got = step(rig, seqs, {6, 0, 0}, *fd);
    CHECK(got.size() == want.size() && std::memcmp(got.data(), want.data(), got.size() * 4) == 0);
    for (Seq& q : seqs) rig.kv->release(q.blocks);
}
