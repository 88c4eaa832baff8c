// sampler.cpp — the sampling pipeline: penalties, temperature, top-k, top-p, min-p, counter-based draw.
// Owner: sampler. Thread-safety: no state of its own; sample() touches only its arguments and the
// caller's scratch, so calls with separate scratch may run concurrently.
#include "sampler.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>

#include "common.h"

namespace lmx {

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

std::string fmt_num(double v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g", v);
    return buf;
}

[[noreturn]] void invalid(const char* field, const char* expected, const std::string& found) {
    throw InvalidArgument(std::string(field) + ": expected " + expected + ", found " + found);
}

// SplitMix64's output function (Steele, Lea & Flood 2014, with Stafford's "Mix13"
// constants): a bijection on 64-bit words in which every input bit flips about half
// of the output bits.
uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;  // SplitMix64's Weyl increment, 2^64 / phi

uint32_t float_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

// The draw order: weight descending, then token id ascending — a strict total order,
// so every sort or selection under it has exactly one answer, whatever the algorithm.
// As one integer: a non-negative float's bit pattern orders like its value, and the
// complemented id makes the lower id the larger key. Earlier in the order = larger key.
uint64_t draw_key(const float* w, int32_t t) {
    return static_cast<uint64_t>(float_bits(w[t])) << 32 | static_cast<uint32_t>(~t);
}
struct DrawOrder {
    const float* w;  // [n_vocab] weights, never NaN
    bool operator()(int32_t a, int32_t b) const { return draw_key(w, a) > draw_key(w, b); }
};

// A token's weight: the integer part of its w, which lies in [0, 2^63) (see sample()).
uint64_t weight(float w) { return static_cast<uint64_t>(static_cast<int64_t>(w)); }

int bit_width(uint32_t v) {
    int bits = 0;
    for (; v != 0; v >>= 1) ++bits;
    return bits;
}

// Penalties index logits by token id, so a bad id would be an out-of-bounds write.
// The engine validates prompts on admission; this is the last line of defence.
void check_ids(TokenSpan ids, int32_t n_vocab, const char* what) {
    for (int32_t t : ids) {
        if (t < 0 || t >= n_vocab) {
            throw InvalidArgument(std::string("sample: ") + what + " token id " + std::to_string(t) +
                                  " is outside the vocabulary [0, " + std::to_string(n_vocab) + ")");
        }
    }
}

// Repetition penalty (HF: once per distinct token of prompt + generated, dividing a
// positive logit and multiplying a non-positive one), then presence and frequency
// penalties (OpenAI / vLLM: over generated tokens only, logit -= frequency * count,
// then -= presence if count > 0).
//
// counts is the caller's scratch and holds garbage. Rather than clearing all n_vocab
// slots on every token, each pass first zeroes exactly the slots of the ids it is
// about to read, so the cost is O(history), not O(vocab), and no garbage is ever read.
void apply_penalties(float* logits, int32_t n_vocab, const SamplingParams& p, TokenSpan prompt, TokenSpan generated,
                     std::vector<int32_t>& counts) {
    const bool repetition = p.repetition_penalty != 1.0f;
    const bool presence_frequency = p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f;
    if (!repetition && !presence_frequency) return;
    if (repetition) check_ids(prompt, n_vocab, "prompt");
    check_ids(generated, n_vocab, "generated");
    if (counts.size() < static_cast<size_t>(n_vocab)) counts.resize(static_cast<size_t>(n_vocab));
    int32_t* c = counts.data();  // [n_vocab]

    if (repetition) {
        const float r = p.repetition_penalty;
        for (int32_t t : prompt) c[t] = 0;
        for (int32_t t : generated) c[t] = 0;
        auto penalise_once = [&](int32_t t) {
            if (c[t] != 0) return;
            c[t] = 1;
            logits[t] = logits[t] > 0.0f ? logits[t] / r : logits[t] * r;
        };
        for (int32_t t : prompt) penalise_once(t);
        for (int32_t t : generated) penalise_once(t);
    }
    if (presence_frequency) {
        for (int32_t t : generated) c[t] = 0;
        for (int32_t t : generated) c[t]++;
        for (int32_t t : generated) {
            if (c[t] == 0) continue;  // already applied for an earlier occurrence
            logits[t] -= p.frequency_penalty * static_cast<float>(c[t]);
            logits[t] -= p.presence_penalty;
            c[t] = 0;
        }
    }
}

// Lowest id wins ties; NaN never wins (it compares false), so an all-NaN or all -inf
// row yields token 0.
int32_t argmax(const float* x, int32_t n) {
    int32_t best = 0;
    float best_v = -kInf;
    for (int32_t i = 0; i < n; ++i) {
        if (x[i] > best_v) {
            best_v = x[i];
            best = i;
        }
    }
    return best;
}

float float_from_bits(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

// 2^k * exp(x) for x <= 0 (or -inf): the sampler's softmax numerator. Cephes'
// single-precision expf: x = n ln2 + r with ln2 split in two so that n ln2 is exact, a
// degree-5 polynomial for e^r on |r| <= ln2/2 (within 2 ulp), then 2^(n+k) put
// straight into the exponent bits. Written without libm calls or branches so that the
// loop calling it vectorises (a call to glibc's expf per token was most of the
// sampler's time at 152k tokens), and so that every machine running the same build
// computes the same bits (glibc's expf may change between versions). Where
// 2^(n+k) < 1/4 the result (< 0.36) is flushed to exactly 0: such a weight is never
// drawn, and the flush keeps subnormals, a hundred times slower, out of the arithmetic.
inline float exp_scaled(float x, int k) {
    constexpr float kLog2e = 1.44269504088896341f;
    constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    // x = max(x, -104), done on the bits: a float compare would stop vectorisation
    // (it may trap), and the clamp also maps -inf. e^-104 * 2^62 < 1/4.
    const uint32_t magnitude = std::min(float_bits(x) & 0x7FFFFFFFu, float_bits(104.0f));
    x = -float_from_bits(magnitude);
    const float n = (x * kLog2e + kRound) - kRound;
    const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    float q = 1.9875691500e-4f;
    q = q * r + 1.3981999507e-3f;
    q = q * r + 8.3334519073e-3f;
    q = q * r + 4.1665795894e-2f;
    q = q * r + 1.6666665459e-1f;
    q = q * r + 5.0000001201e-1f;
    q = q * r * r + r + 1.0f;  // e^r, in [0.7, 1.42]
    const int e = static_cast<int>(n) + k;
    const uint32_t biased = static_cast<uint32_t>(e >= -2) * static_cast<uint32_t>(e + 127);
    return q * float_from_bits(biased << 23);
}

// Quickselect steered by a measure instead of rank, for select_by below: partition
// around a pivot, then go on into the side where the running measure crosses target.
// The partition is Lomuto's without branches (the comparison feeds the store index),
// since in a flat distribution which side a token falls on is a coin toss. A depth
// limit (introselect's) hands a range that keeps splitting badly to a sort, bounding
// the worst case at O(n log n).
template <class Measure>
int32_t quickselect_by(int32_t* idx, int32_t n, const float* w, uint64_t target, Measure measure) {
    constexpr int32_t kSmallRange = 16;
    int32_t lo = 0, hi = n;     // the crossing lies in idx[lo, hi)
    uint64_t mass_before = 0;  // measure of idx[0, lo), always < target
    const DrawOrder before{w};
    for (int depth_left = 2 * bit_width(static_cast<uint32_t>(n)); hi - lo > kSmallRange && depth_left > 0;
         --depth_left) {
        int32_t* a = idx + lo;
        int32_t* b = idx + lo + (hi - lo) / 2;
        int32_t* c = idx + hi - 1;
        if (before(*b, *a)) std::swap(*a, *b);
        if (before(*c, *b)) std::swap(*b, *c);
        if (before(*b, *a)) std::swap(*a, *b);
        std::swap(*b, *c);  // the median of three is the pivot, parked at hi - 1
        const int32_t pivot = *c;
        const uint64_t pivot_key = draw_key(w, pivot);
        int32_t store = lo;
        uint64_t left = 0;
        for (int32_t i = lo; i < hi - 1; ++i) {
            const int32_t t = idx[i];
            const uint64_t is_before = draw_key(w, t) > pivot_key;
            left += measure(t) & (0 - is_before);
            idx[i] = idx[store];
            idx[store] = t;
            store += static_cast<int32_t>(is_before);
        }
        std::swap(idx[store], idx[hi - 1]);
        if (mass_before + left >= target) {
            hi = store;
            continue;
        }
        mass_before += left + measure(pivot);
        if (mass_before >= target) return store;
        lo = store + 1;
    }
    std::sort(idx + lo, idx + hi, before);
    for (int32_t i = lo; i < hi; ++i) {
        mass_before += measure(idx[i]);
        if (mass_before >= target) return i;
    }
    return std::max(hi - 1, 0);  // only if target exceeds the total measure
}

// Lay the tokens of idx[0, n) out in draw order and add up a measure of each — its
// weight, or 1 to count tokens: returns the position at which the running measure
// first reaches target_of(total measure), reordering idx so that idx[0, pos) holds
// the tokens before it (in no particular order) and idx[pos] the token itself. top-k,
// top-p and the draw are all this one question. Precondition: n >= 1 and
// 1 <= target_of(total) <= total.
//
// Policy: sorting a 152k vocabulary for every token costs milliseconds. Instead, one
// pass adds each token's measure into a bucket chosen by the top bits of its weight's
// float (exponent and three mantissa bits: a bucket spans a factor of at most
// 2^(1/8)); the buckets, walked from the heaviest, name the one where the running
// measure crosses target and the exact measure above it. Two partitions gather the
// tokens above that bucket and in it, and only the crossing bucket — usually a handful
// of tokens — is searched token by token. Measures being integers, the answer is
// exactly the one a full sort and a running sum would give.
template <class Measure, class TargetOf>
int32_t select_by(int32_t* idx, int32_t n, const float* w, Measure measure, TargetOf target_of) {
    assert(n >= 1);
    // Weights lie in [1, 2^63): float exponents 127..189, so 63 * 8 buckets suffice.
    constexpr int kBucketShift = 20, kBucketBase = 127 << 3, kBuckets = 512;
    auto bucket_of = [&](int32_t t) { return static_cast<int>(float_bits(w[t]) >> kBucketShift) - kBucketBase; };
    uint64_t hist[kBuckets] = {};  // [bucket] total measure
    uint64_t total = 0;
    for (int32_t i = 0; i < n; ++i) {
        const uint64_t x = measure(idx[i]);
        hist[bucket_of(idx[i])] += x;
        total += x;
    }
    const uint64_t target = target_of(total);
    assert(target >= 1 && target <= total);
    int b = kBuckets - 1;
    uint64_t above = 0;  // measure of the buckets heavier than b
    for (; b > 0 && above + hist[b] < target; --b) above += hist[b];

    int32_t* first = std::partition(idx, idx + n, [&](int32_t t) { return bucket_of(t) > b; });
    int32_t* last = std::partition(first, idx + n, [&](int32_t t) { return bucket_of(t) == b; });
    if (first == last) return n - 1;  // only if target exceeds the total measure
    return static_cast<int32_t>(first - idx) +
           quickselect_by(first, static_cast<int32_t>(last - first), w, target - above, measure);
}

template <class TargetOf>
int32_t select_by_mass(int32_t* idx, int32_t n, const float* w, TargetOf target_of) {
    return select_by(idx, n, w, [w](int32_t t) { return weight(w[t]); }, target_of);
}

int32_t select_by_count(int32_t* idx, int32_t n, const float* w, uint64_t target) {
    return select_by(idx, n, w, [](int32_t) { return uint64_t{1}; }, [target](uint64_t) { return target; });
}

}  // namespace

void sampling_params_validate(const SamplingParams& p, int32_t n_vocab) {
    if (n_vocab < 1) invalid("n_vocab", "a value >= 1", std::to_string(n_vocab));
    // Comparisons are written so that NaN fails them.
    if (!(std::isfinite(p.temperature) && p.temperature >= 0.0f))
        invalid("temperature", "a finite value >= 0 (0 means greedy)", fmt_num(p.temperature));
    if (p.top_k < 0) invalid("top_k", "a value >= 0 (0 means off)", std::to_string(p.top_k));
    if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) invalid("top_p", "a value in (0, 1]", fmt_num(p.top_p));
    if (!(p.min_p >= 0.0f && p.min_p <= 1.0f)) invalid("min_p", "a value in [0, 1]", fmt_num(p.min_p));
    if (!(std::isfinite(p.repetition_penalty) && p.repetition_penalty > 0.0f))
        invalid("repetition_penalty", "a finite value > 0 (1 means off)", fmt_num(p.repetition_penalty));
    if (!std::isfinite(p.presence_penalty))
        invalid("presence_penalty", "a finite value", fmt_num(p.presence_penalty));
    if (!std::isfinite(p.frequency_penalty))
        invalid("frequency_penalty", "a finite value", fmt_num(p.frequency_penalty));
    if (p.max_tokens < 1) invalid("max_tokens", "a value >= 1", std::to_string(p.max_tokens));
    for (int32_t t : p.stop_token_ids) {
        if (t < 0 || t >= n_vocab) {
            const std::string range = "token ids in [0, " + std::to_string(n_vocab) + ")";
            invalid("stop_token_ids", range.c_str(), std::to_string(t));
        }
    }
}

double sampler_uniform(uint64_t seed, uint64_t step) {
    // The step-th output of a SplitMix64 stream whose state starts at mix64(seed):
    // O(1) random access by step, and SplitMix64's output passes BigCrush. The top
    // 53 bits make a double in [0, 1) with every value equally likely.
    const uint64_t z = mix64(mix64(seed) + (step + 1) * kGolden);
    return static_cast<double>(z >> 11) * 0x1.0p-53;
}

// Precondition: p passed sampling_params_validate(p, n_vocab). With unvalidated
// params the result is unspecified but memory-safe (release builds skip the asserts).
//
// Weights. A token's probability travels as w = 2^k * exp((l - m) / T), m the largest
// logit, so the top token gets exactly 2^k; its weight is the integer part of w.
// Weights are summed in uint64, with k chosen so that a whole vocabulary sums below
// 2^63: the sums are exact, so each decision — the top-p cut, the drawn token — is a
// function of the weights alone, not of the order in which a selection algorithm
// adds them, and the fast path agrees exactly with a full sort and a running sum.
// A token with w < 1, below 2^-k of the top one (2^-45 for 152k tokens), is never
// drawn; that moves at most n_vocab * 2^-k of the mass (4e-9 for 152k tokens).
//
// +inf logits (after penalties) share all the mass equally: they are the limit of
// logits growing without bound, and softmax of that limit is uniform over them.
int32_t sample(float* logits, int32_t n_vocab, const SamplingParams& p, TokenSpan prompt, TokenSpan generated,
               uint64_t step, SamplerScratch& scratch) {
    assert(logits != nullptr && n_vocab >= 1);
    assert(p.temperature >= 0.0f && p.top_k >= 0 && p.top_p > 0.0f && p.top_p <= 1.0f);
    assert(p.min_p >= 0.0f && p.min_p <= 1.0f && p.repetition_penalty > 0.0f);

    apply_penalties(logits, n_vocab, p, prompt, generated, scratch.counts);
    if (p.temperature == 0.0f) return argmax(logits, n_vocab);

    float m = -kInf;
    for (int32_t i = 0; i < n_vocab; ++i) {
        if (std::isnan(logits[i])) {
            logits[i] = -kInf;
        } else if (logits[i] > m) {
            m = logits[i];
        }
    }
    if (m == -kInf) return 0;  // nothing has any mass: the argmax rule's answer

    // Subtracting m before dividing by T keeps a tiny temperature from overflowing.
    // Tokens of weight 0 can never be drawn and stay out of idx, the candidates.
    if (scratch.probs.size() < static_cast<size_t>(n_vocab)) scratch.probs.resize(static_cast<size_t>(n_vocab));
    if (scratch.idx.size() < static_cast<size_t>(n_vocab)) scratch.idx.resize(static_cast<size_t>(n_vocab));
    float* w = scratch.probs.data();  // [n_vocab] weights
    int32_t* idx = scratch.idx.data();  // [n] candidate token ids
    const int k = 63 - bit_width(static_cast<uint32_t>(n_vocab));
    const float w_max = std::ldexp(1.0f, k);
    if (m == kInf) {
        for (int32_t i = 0; i < n_vocab; ++i) w[i] = logits[i] == kInf ? w_max : 0.0f;
    } else {
        const float t = p.temperature;
        for (int32_t i = 0; i < n_vocab; ++i) w[i] = exp_scaled((logits[i] - m) / t, k);
    }
    int32_t n = 0;
    for (int32_t i = 0; i < n_vocab; ++i) {
        idx[n] = i;
        n += w[i] >= 1.0f;  // branch-free: near the cut-off the test is a coin toss
    }
    if (n == 0) return argmax(logits, n_vocab);  // only with a NaN temperature (unvalidated)

    // top-k keeps exactly k tokens, ties at the boundary going to the lower ids.
    if (p.top_k > 0 && p.top_k < n) {
        n = select_by_count(idx, n, w, static_cast<uint64_t>(p.top_k)) + 1;
    }
    // top-p keeps the shortest prefix (in draw order) whose weight reaches top_p of the
    // weight left after top-k — the renormalised distribution, as HF and vLLM use —
    // and so always at least the top token.
    if (p.top_p < 1.0f) {
        const double top_p = p.top_p;
        n = select_by_mass(idx, n, w, [top_p](uint64_t total) {
                const double want = std::ceil(top_p * static_cast<double>(total));
                return std::min(total, std::max<uint64_t>(1, static_cast<uint64_t>(want)));
            }) + 1;
    }
    // min-p is relative to the top token, so renormalisation does not matter.
    if (p.min_p > 0.0f) {
        const float threshold = p.min_p * w_max;
        int32_t kept = 0;
        for (int32_t i = 0; i < n; ++i) {
            if (w[idx[i]] >= threshold) idx[kept++] = idx[i];
        }
        n = kept;
        if (n == 0) return argmax(logits, n_vocab);  // only with min_p > 1 (unvalidated)
    }
    if (n == 1) return idx[0];

    // Inverse CDF in draw order: r = floor(u * total) is uniform over [0, total), and
    // the token drawn is the first whose running weight exceeds r.
    const double u = sampler_uniform(p.seed, step);
    return idx[select_by_mass(idx, n, w, [u](uint64_t total) {
        const uint64_t r = static_cast<uint64_t>(u * static_cast<double>(total));
        return std::min(r, total - 1) + 1;  // u * total can round up to total when total > 2^53
    })];
}

}  // namespace lmx
