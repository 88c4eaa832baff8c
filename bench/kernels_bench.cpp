// bench/kernels_bench.cpp — matmul throughput per weight format, against the memory-bandwidth floor.
// Owner: kernels. Thread-safety: single-threaded driver over one ThreadPool.
//
// Build (from the repo root; the ISA files need their own flags, as in CMakeLists.txt):
//   mkdir -p build/bench && cd build/bench
//   S=../../engine/src; F="-O3 -std=gnu++17 -I$S"
//   g++ $F -c $S/kernels/kernels_avx2.cpp -mavx2 -mfma -mf16c
//   g++ $F -c $S/kernels/kernels_avx512.cpp -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16
//       -mavx512vnni -mfma -mf16c -mavx2                                  (one line)
//   g++ $F ../../bench/kernels_bench.cpp $S/kernels/dispatch.cpp $S/kernels/reference.cpp $S/kernels/quants.cpp
//       $S/threadpool.cpp $S/common.cpp kernels_avx2.o kernels_avx512.o -pthread -o kernels_bench   (one line)
// Run: ./kernels_bench [n_threads=all] [cold|hot] [passes=3]   (LMX_KERNELS=avx2 forces the AVX2 table)
// One command (the build above into build/bench, then a run with these arguments): bench/kernels_bench.sh
//
// What it prints. For y[n_tok, n_out] = x[n_tok, n_in] W^T, per format and n_tok:
// time per call, GFLOP/s (2 n_out n_in n_tok / t) and GB/s of weights streamed (each
// call reads W once whatever n_tok). By default every call reads a different copy of W
// out of >= 256 MiB of copies, so weights come from DRAM as in a real decode step (a
// whole model does not fit the L3); pass "hot" to reuse one copy (L3-resident for the
// small shapes). The anchor line measures plain streaming-read bandwidth with the same
// threads; "floor%" is the call's weight traffic rate as a share of that anchor, which
// is the ceiling for batch-1 decode. "tok/s" is the call's token throughput relative to
// n_tok = 1 (n_tok * t(1) / t(n_tok)): what batching decode sequences buys.
// "q8_0x16", "q4_0x16" are the same weights repacked in 16-row groups (what a model
// loaded under fast precision holds): int8 activations, one vpdpbusd per 4 x 16 MACs.
// "bf16*" is bf16 weights under MatmulPrecision::Fast (bf16 activations, vdpbf16ps),
// listed only where the CPU has AVX512_BF16; "q8_0*", "q4_0*" are q8_0 / q4_0 under
// MatmulPrecision::Fast (int8 activations, integer block dots). The GGUF block formats
// (q4_1 .. q6_K: random quants, finite f16 scales) come the same two ways: "q4_K" exact
// (dequantise, f32 FMA), "q4_K*" fast (int8 activations). A shape whose n_in is not a whole
// number of the format's blocks (960 for the 256-element k-quants) is skipped (no line).
// Gemma 3 270M's layer shapes (Q4_K_M: q/k/gate/up q5_0, v q8_0, o q4_K, down q6_K / q4_K,
// head q8_0): LMX_BENCH_SHAPES=1024x640,256x640,2048x640,640x1024,640x2048,262144x640
// Optional 4th argument: a comma-separated subset of the format names, e.g. q8_0,q8_0*.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "kernels/kernels.h"
#include "kernels/quants.h"
#include "threadpool.h"

using namespace lmx;
using Clock = std::chrono::steady_clock;

namespace {

struct FreeDeleter {
    void operator()(void* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<uint8_t, FreeDeleter>;

Buffer alloc_bytes(size_t n) {
    void* p = std::aligned_alloc(64, (n + 63) / 64 * 64);
    if (!p) {
        std::fprintf(stderr, "out of memory (%zu bytes)\n", n);
        std::exit(1);
    }
    std::memset(p, 0, n);  // fault the pages in before timing
    return Buffer(static_cast<uint8_t*>(p));
}

uint64_t g_rng = 88172645463325252ull;
float rand_unit() {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return static_cast<float>(g_rng >> 40) * 0x1p-23f - 1.0f;
}

// n_rows x n_cols of GGUF block format t: random quant and scale bytes, f16 scales in +-0.02
// (convert_rows does not quantise to these formats; the kernels' speed does not depend on values).
void random_gguf_blocks(DType t, uint8_t* w, int64_t n_rows, int64_t n_cols) {
    const int64_t n_bytes = row_bytes(t, n_cols) * n_rows, bb = dtype_block_bytes(t);
    for (int64_t i = 0; i < n_bytes; ++i) w[i] = static_cast<uint8_t>(rand_unit() * 127.0f + 128.0f);
    int offs[2] = {0, 2}, n_offs = 2;  // byte offsets of the f16 fields of one block
    if (t == DType::Q5_0) n_offs = 1;
    if (t == DType::Q2_K) offs[0] = 80, offs[1] = 82;
    if (t == DType::Q3_K) offs[0] = 108, n_offs = 1;
    if (t == DType::Q6_K) offs[0] = 208, n_offs = 1;
    for (int64_t b = 0; b < n_bytes / bb; ++b)
        for (int k = 0; k < n_offs; ++k) {
            const uint16_t h = f32_to_f16(rand_unit() * 0.02f);
            std::memcpy(w + b * bb + offs[k], &h, 2);
        }
}

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Streaming-read bandwidth of `bytes` spread over the pool, in GB/s (best of `reps`).
// Eight independent 64-bit accumulators: cheap enough per byte that DRAM, not the
// loop, is the limit even in baseline SSE2 code.
double read_bandwidth_gbs(ThreadPool& pool, const uint8_t* buf, size_t bytes, int reps) {
    const int64_t n_chunks = 64;
    const size_t chunk = bytes / n_chunks / 64 * 64;
    std::vector<uint64_t> sink(static_cast<size_t>(n_chunks));
    double best = 0.0;
    for (int rep = 0; rep < reps; ++rep) {
        const auto t0 = Clock::now();
        pool.parallel_for(n_chunks, [&](int64_t c, int) {
            const uint8_t* p = buf + static_cast<size_t>(c) * chunk;
            uint64_t acc[8] = {};
            for (size_t i = 0; i + 64 <= chunk; i += 64)
                for (int j = 0; j < 8; ++j) {
                    uint64_t v;
                    std::memcpy(&v, p + i + 8 * static_cast<size_t>(j), 8);
                    acc[j] += v;
                }
            uint64_t s = 0;
            for (uint64_t a : acc) s ^= a;
            sink[static_cast<size_t>(c)] = s;
        });
        const double gbs = static_cast<double>(chunk * n_chunks) / seconds_since(t0) / 1e9;
        if (gbs > best) best = gbs;
    }
    return best;
}

}  // namespace

int main(int argc, char** argv) {
    const int n_threads = argc > 1 ? std::atoi(argv[1]) : 0;
    const bool hot = argc > 2 && std::strcmp(argv[2], "hot") == 0;
    const int n_passes = argc > 3 ? std::atoi(argv[3]) : 3;
    ThreadPool pool(n_threads);

    struct Shape {
        int64_t n_out, n_in;
    };
    // LMX_BENCH_SHAPES="n_outxn_in,..." replaces the SmolLM2-360M layer shapes below, e.g.
    // Llama-3.2-1B: 2048x2048,512x2048,8192x2048,2048x8192,128256x2048.
    std::vector<Shape> shapes = {{320, 960}, {960, 960}, {2560, 960}, {960, 2560}, {49152, 960}};
    if (const char* env = std::getenv("LMX_BENCH_SHAPES")) {
        shapes.clear();
        for (const char* p = env; *p;) {
            char* end = nullptr;
            const long long o = std::strtoll(p, &end, 10);
            if (*end != 'x') break;
            const long long i = std::strtoll(end + 1, &end, 10);
            shapes.push_back({o, i});
            p = *end == ',' ? end + 1 : end;
        }
        if (shapes.empty()) {
            std::fprintf(stderr, "LMX_BENCH_SHAPES: expected n_outxn_in[,n_outxn_in...], found '%s'\n", env);
            return 2;
        }
    }
    struct Fmt {
        DType dtype;
        MatmulPrecision precision;
        const char* name;
    };
    std::vector<Fmt> fmts = {{DType::F32, MatmulPrecision::Exact, "f32"},
                             {DType::F16, MatmulPrecision::Exact, "f16"},
                             {DType::BF16, MatmulPrecision::Exact, "bf16"},
                             {DType::Q8_0, MatmulPrecision::Exact, "q8_0"},
                             {DType::Q8_0, MatmulPrecision::Fast, "q8_0*"},
                             {DType::Q4_0, MatmulPrecision::Exact, "q4_0"},
                             {DType::Q4_0, MatmulPrecision::Fast, "q4_0*"},
                             {DType::Q8_0X16, MatmulPrecision::Fast, "q8_0x16"},
                             {DType::Q4_0X16, MatmulPrecision::Fast, "q4_0x16"}};
    const struct {
        DType dtype;
        const char *exact, *fast;
    } gguf[] = {{DType::Q4_1, "q4_1", "q4_1*"}, {DType::Q5_0, "q5_0", "q5_0*"}, {DType::Q5_1, "q5_1", "q5_1*"},
                {DType::Q2_K, "q2_K", "q2_K*"}, {DType::Q3_K, "q3_K", "q3_K*"}, {DType::Q4_K, "q4_K", "q4_K*"},
                {DType::Q5_K, "q5_K", "q5_K*"}, {DType::Q6_K, "q6_K", "q6_K*"}};
    for (const auto& g : gguf) {
        fmts.push_back({g.dtype, MatmulPrecision::Exact, g.exact});
        fmts.push_back({g.dtype, MatmulPrecision::Fast, g.fast});
    }
    if (std::strcmp(kernels_isa(), "avx512") == 0 && __builtin_cpu_supports("avx512bf16"))
        fmts.push_back({DType::BF16, MatmulPrecision::Fast, "bf16*"});
    if (argc > 4) {  // keep only the named formats
        const std::string want = std::string(",") + argv[4] + ",";
        std::vector<Fmt> kept;
        for (const Fmt& f : fmts)
            if (want.find(std::string(",") + f.name + ",") != std::string::npos) kept.push_back(f);
        fmts = kept;
    }
    const int64_t tok_counts[] = {1, 4, 16, 64};
    constexpr int64_t kMaxTok = 64;
    const size_t kColdBytes = size_t{256} << 20;
    const size_t n_tc = sizeof tok_counts / sizeof tok_counts[0];

    // Best seconds per call, [shape][fmt][n_tok]. Every pass measures every row again:
    // on a shared machine the per-row minimum over passes spread in time is the
    // kernel's own speed.
    std::vector<double> best(shapes.size() * fmts.size() * n_tc, 1e30);
    std::vector<size_t> w_bytes_of(shapes.size() * fmts.size());
    Buffer anchor_buf = alloc_bytes(size_t{512} << 20);
    double anchor = 0.0;

    for (int pass = 0; pass < n_passes; ++pass) {
        const double a = read_bandwidth_gbs(pool, anchor_buf.get(), size_t{512} << 20, 5);
        if (a > anchor) anchor = a;
        std::fprintf(stderr, "pass %d/%d (anchor %.1f GB/s)\n", pass + 1, n_passes, a);
        for (size_t si = 0; si < shapes.size(); ++si) {
            const Shape& s = shapes[si];
            std::vector<float> wf(static_cast<size_t>(s.n_out * s.n_in));
            for (float& v : wf) v = rand_unit();
            std::vector<float> x(static_cast<size_t>(kMaxTok * s.n_in)), y(static_cast<size_t>(kMaxTok * s.n_out));
            for (float& v : x) v = rand_unit();
            for (size_t fi = 0; fi < fmts.size(); ++fi) {
                const DType dt = fmts[fi].dtype;
                if (s.n_in % dtype_block_elems(dt) != 0) continue;  // not whole blocks: skipped
                const size_t w_bytes = static_cast<size_t>(row_bytes(dt, s.n_in) * s.n_out);
                w_bytes_of[si * fmts.size() + fi] = w_bytes;
                const size_t n_copies = hot ? 1 : (kColdBytes + w_bytes - 1) / w_bytes + 1;
                Buffer w = alloc_bytes(w_bytes * n_copies);
                if (dtype_is_x16(dt)) {  // quantise, then repack (the loader's two steps)
                    const DType plain = dt == DType::Q8_0X16 ? DType::Q8_0 : DType::Q4_0;
                    std::vector<uint8_t> tmp(w_bytes);
                    convert_rows(wf.data(), DType::F32, tmp.data(), plain, s.n_out, s.n_in);
                    repack_x16(tmp.data(), plain, w.get(), s.n_out, s.n_in);
                } else if (dtype_is_gguf_quant(dt)) {
                    random_gguf_blocks(dt, w.get(), s.n_out, s.n_in);
                } else {
                    convert_rows(wf.data(), DType::F32, w.get(), dt, s.n_out, s.n_in);
                }
                for (size_t c = 1; c < n_copies; ++c) std::memcpy(w.get() + c * w_bytes, w.get(), w_bytes);
                for (size_t ti = 0; ti < n_tc; ++ti) {
                    const int64_t n_tok = tok_counts[ti];
                    size_t copy = 0;
                    auto call = [&] {
                        const WeightView v{w.get() + copy * w_bytes, dt, s.n_out, s.n_in, fmts[fi].precision};
                        matmul(v, x.data(), n_tok, y.data(), nullptr, pool);
                        copy = (copy + 1) % n_copies;
                    };
                    call();  // warm-up
                    double& b = best[(si * fmts.size() + fi) * n_tc + ti];
                    const auto t_start = Clock::now();
                    do {  // best of 20 ms trials for 0.25 s
                        int64_t n_calls = 0;
                        const auto t0 = Clock::now();
                        double el = 0.0;
                        do {
                            call();
                            ++n_calls;
                            el = seconds_since(t0);
                        } while (el < 0.02);
                        const double per_call = el / static_cast<double>(n_calls);
                        if (per_call < b) b = per_call;
                    } while (seconds_since(t_start) < 0.25);
                }
            }
        }
    }

    std::printf("kernels: %s   threads: %d   weights: %s   passes: %d\n", kernels_isa(), pool.n_threads(),
                hot ? "hot (one copy, reused)" : "cold (rotating copies, >= 256 MiB)", n_passes);
    std::printf("anchor: streaming read %.1f GB/s (memory-bandwidth floor for batch-1 decode)\n\n", anchor);
    std::printf("%-13s %-5s %5s %10s %9s %8s %7s %8s\n", "shape", "dtype", "n_tok", "us/call", "GFLOP/s", "GB/s", "floor%",
                "tok/s");
    for (size_t si = 0; si < shapes.size(); ++si)
        for (size_t fi = 0; fi < fmts.size(); ++fi) {
            const Shape& s = shapes[si];
            const size_t w_bytes = w_bytes_of[si * fmts.size() + fi];
            if (w_bytes == 0) continue;  // skipped: n_in is not whole blocks of this format
            const double t_one = best[(si * fmts.size() + fi) * n_tc];
            for (size_t ti = 0; ti < n_tc; ++ti) {
                const int64_t n_tok = tok_counts[ti];
                const double t = best[(si * fmts.size() + fi) * n_tc + ti];
                const double gflops = 2.0 * static_cast<double>(s.n_out * s.n_in * n_tok) / t / 1e9;
                const double gbs = static_cast<double>(w_bytes) / t / 1e9;
                char shape[48];
                std::snprintf(shape, sizeof shape, "[%lldx%lld]", static_cast<long long>(s.n_out),
                              static_cast<long long>(s.n_in));
                std::printf("%-13s %-5s %5lld %10.1f %9.1f %8.1f %6.0f%% %7.1fx\n", shape, fmts[fi].name,
                            static_cast<long long>(n_tok), t * 1e6, gflops, gbs, 100.0 * gbs / anchor,
                            static_cast<double>(n_tok) * t_one / t);
            }
        }
    return 0;
}
