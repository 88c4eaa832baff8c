// test_sampler.cpp — sampler: greedy, penalties, validation, NaN/inf rows, reproducibility, and
// sampled distributions checked against exact expectations with a chi-square test.
// Owner: sampler. Thread-safety: tests run one at a time on the main thread.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <set>
#include <vector>

#include "check.h"
#include "common.h"
#include "sampler.h"

using lmx::SamplerScratch;
using lmx::SamplingParams;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Every distribution test draws kDraws tokens at steps 0..kDraws-1 of one fixed seed,
// so it is deterministic: it cannot flake, and a change to the sampler that moves the
// histogram shows up as a different statistic. kAlpha is the chi-square test's
// significance level: a correct sampler exceeds the critical value with probability
// 1e-3 for a given seed.
constexpr int kDraws = 20000;
constexpr double kAlpha = 1e-3;

// ---- chi-square machinery --------------------------------------------------------

// Regularised lower incomplete gamma P(a, x): series below a + 1, Lentz's continued
// fraction for the upper tail above (Numerical Recipes, gser / gcf).
double gamma_p(double a, double x) {
    if (x <= 0.0) return 0.0;
    const double log_prefactor = -x + a * std::log(x) - std::lgamma(a);
    if (x < a + 1.0) {
        double ap = a, del = 1.0 / a, sum = del;
        for (int i = 0; i < 100000 && std::fabs(del) > std::fabs(sum) * 1e-16; ++i) {
            ap += 1.0;
            del *= x / ap;
            sum += del;
        }
        return sum * std::exp(log_prefactor);
    }
    const double tiny = 1e-300;
    double b = x + 1.0 - a, c = 1.0 / tiny, d = 1.0 / b, h = d;
    for (int i = 1; i < 100000; ++i) {
        const double an = -i * (i - a);
        b += 2.0;
        d = an * d + b;
        if (std::fabs(d) < tiny) d = tiny;
        c = b + an / c;
        if (std::fabs(c) < tiny) c = tiny;
        d = 1.0 / d;
        const double del = d * c;
        h *= del;
        if (std::fabs(del - 1.0) < 1e-16) break;
    }
    return 1.0 - std::exp(log_prefactor) * h;
}

// The value a chi-square variable with df degrees of freedom exceeds with
// probability alpha (bisection on the CDF P(df/2, x/2)).
double chi2_critical(int df, double alpha) {
    double lo = 0.0, hi = df + 40.0 * std::sqrt(2.0 * df) + 100.0;
    for (int i = 0; i < 200; ++i) {
        const double mid = 0.5 * (lo + hi);
        if (gamma_p(df / 2.0, mid / 2.0) < 1.0 - alpha) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return 0.5 * (lo + hi);
}

struct ChiSquare {
    double stat;
    int df;
};

// Pearson's statistic of the counts against probabilities q. A drawn token that q
// gives no mass makes the hypothesis impossible: the statistic is +inf.
ChiSquare chi_square(const std::vector<int>& observed, const std::vector<double>& q) {
    long total = 0;
    for (int o : observed) total += o;
    double stat = 0.0;
    int bins = 0;
    for (size_t i = 0; i < q.size(); ++i) {
        if (q[i] == 0.0) {
            if (observed[i] > 0) stat = kInf;
            continue;
        }
        const double e = static_cast<double>(total) * q[i];
        stat += (observed[i] - e) * (observed[i] - e) / e;
        bins++;
    }
    return {stat, bins - 1};
}

double total_variation(const std::vector<double>& a, const std::vector<double>& b) {
    double s = 0.0;
    for (size_t i = 0; i < a.size(); ++i) s += std::fabs(a[i] - b[i]);
    return 0.5 * s;
}

// The histogram fits `expected` at level kAlpha.
void check_fits(const std::vector<int>& hist, const std::vector<double>& expected) {
    for (double q : expected) CHECK(q == 0.0 || q * kDraws >= 5.0);  // Pearson's approximation holds
    const ChiSquare fit = chi_square(hist, expected);
    CHECK(fit.df >= 1);
    const double critical = chi2_critical(std::max(fit.df, 1), kAlpha);
    if (!(fit.stat <= critical)) {
        std::fprintf(stderr, "  chi-square %.2f > critical %.2f (df %d)\n", fit.stat, critical, fit.df);
    }
    CHECK(fit.stat <= critical);
}

// The histogram fits `expected` and rejects `wrong` — the distribution a sampler
// that skipped the feature under test would produce. The rejection proves the test
// can fail: the two must differ meaningfully and the same draws must tell them apart.
void check_fits_not(const std::vector<int>& hist, const std::vector<double>& expected, const std::vector<double>& wrong) {
    check_fits(hist, expected);
    CHECK(total_variation(expected, wrong) > 0.05);
    const ChiSquare alt = chi_square(hist, wrong);
    CHECK(alt.stat > 10.0 * chi2_critical(std::max(alt.df, 1), kAlpha));
}

// ---- drawing and reference distributions ----------------------------------------

std::vector<int> histogram(const std::vector<float>& logits, const SamplingParams& p,
                           const std::vector<int32_t>& prompt = {}, const std::vector<int32_t>& generated = {}) {
    const int32_t n = static_cast<int32_t>(logits.size());
    lmx::sampling_params_validate(p, n);
    SamplerScratch scratch;
    std::vector<int> hist(logits.size(), 0);
    std::vector<float> row;
    for (uint64_t step = 0; step < kDraws; ++step) {
        row = logits;
        const int32_t t = lmx::sample(row.data(), n, p, prompt, generated, step, scratch);
        CHECK(t >= 0 && t < n);
        if (t >= 0 && t < n) hist[static_cast<size_t>(t)]++;
    }
    return hist;
}

std::vector<float> logits_of(const std::vector<double>& probs) {
    std::vector<float> l;
    for (double q : probs) l.push_back(static_cast<float>(std::log(q)));
    return l;
}

struct Reference {
    std::vector<double> q;  // [n_vocab] the distribution sample() must draw from
    double margin;          // distance of the top-p / min-p decisions from their thresholds
};

// The distribution sample() should draw from, computed independently: double
// precision, full sorts, the header's order of operations. A test whose margin is tiny
// would hinge on rounding, so callers check it. renormalise_after_top_k = false gives
// the (wrong) variant that measures top-p against the whole vocabulary's mass.
Reference reference_distribution(const std::vector<float>& logits, const SamplingParams& p,
                                 const std::vector<int32_t>& prompt = {}, const std::vector<int32_t>& generated = {},
                                 bool renormalise_after_top_k = true) {
    const size_t n = logits.size();
    std::vector<double> l(logits.begin(), logits.end());
    std::vector<bool> seen(n, false);
    std::vector<int> count(n, 0);
    for (int32_t t : prompt) seen[static_cast<size_t>(t)] = true;
    for (int32_t t : generated) {
        seen[static_cast<size_t>(t)] = true;
        count[static_cast<size_t>(t)]++;
    }
    for (size_t i = 0; i < n; ++i) {
        if (seen[i]) l[i] = l[i] > 0 ? l[i] / p.repetition_penalty : l[i] * p.repetition_penalty;
        l[i] -= p.frequency_penalty * count[i] + (count[i] > 0 ? p.presence_penalty : 0.0);
    }
    const double m = *std::max_element(l.begin(), l.end());
    std::vector<double> w(n);
    double sum = 0.0;
    for (size_t i = 0; i < n; ++i) sum += (w[i] = std::exp((l[i] - m) / p.temperature));
    for (double& x : w) x /= sum;
    std::vector<size_t> order(n);
    for (size_t i = 0; i < n; ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return w[a] > w[b] || (w[a] == w[b] && a < b); });

    size_t kept = n;
    double margin = kInf;
    if (p.top_k > 0 && static_cast<size_t>(p.top_k) < n) kept = static_cast<size_t>(p.top_k);
    if (p.top_p < 1.0f) {
        double mass = 1.0;
        if (renormalise_after_top_k) {
            mass = 0.0;
            for (size_t j = 0; j < kept; ++j) mass += w[order[j]];
        }
        double cum = 0.0;
        for (size_t j = 0; j < kept; ++j) {
            cum += w[order[j]] / mass;
            if (cum >= p.top_p) {
                margin = std::min(cum - p.top_p, p.top_p - (cum - w[order[j]] / mass));
                kept = j + 1;
                break;
            }
        }
    }
    if (p.min_p > 0.0f) {
        const double threshold = p.min_p * w[order[0]];
        for (size_t j = 0; j < kept; ++j) margin = std::min(margin, std::fabs(w[order[j]] - threshold) / w[order[0]]);
        while (kept > 1 && w[order[kept - 1]] < threshold) kept--;
    }
    Reference r{std::vector<double>(n, 0.0), margin};
    double kept_mass = 0.0;
    for (size_t j = 0; j < kept; ++j) kept_mass += w[order[j]];
    for (size_t j = 0; j < kept; ++j) r.q[order[j]] = w[order[j]] / kept_mass;
    return r;
}

// softmax(logits / temperature) with no penalty or truncation.
std::vector<double> untruncated(const std::vector<float>& logits, float temperature) {
    SamplingParams p;
    p.temperature = temperature;
    return reference_distribution(logits, p).q;
}

int32_t sample_once(std::vector<float> logits, const SamplingParams& p, uint64_t step,
                    const std::vector<int32_t>& prompt = {}, const std::vector<int32_t>& generated = {}) {
    SamplerScratch scratch;
    return lmx::sample(logits.data(), static_cast<int32_t>(logits.size()), p, prompt, generated, step, scratch);
}

// True when, after penalties, token t's logit is exactly `expected`. Greedy probes it:
// a rival token (the last id, outside the history) holding `expected` loses the tie
// to t (lower id), and holding the next float above `expected` beats t.
bool penalised_logit_is(float base, int32_t t, float expected, SamplingParams p, const std::vector<int32_t>& prompt,
                        const std::vector<int32_t>& generated) {
    p.temperature = 0.0f;
    const int32_t rival = 7;
    std::vector<float> l(8, -1e30f);
    l[static_cast<size_t>(t)] = base;
    l[rival] = expected;
    const int32_t at_tie = sample_once(l, p, 0, prompt, generated);
    l[rival] = std::nextafter(expected, kInf);
    const int32_t one_ulp_above = sample_once(l, p, 0, prompt, generated);
    if (at_tie != t || one_ulp_above != rival) {
        std::fprintf(stderr, "  token %d from %g: expected %g, tie -> %d, ulp above -> %d\n", t, base, expected, at_tie,
                     one_ulp_above);
    }
    return at_tie == t && one_ulp_above == rival;
}

// Deterministic normal variates for large random rows (SplitMix64 + Box-Muller),
// independent of the sampler's own generator.
struct TestRng {
    uint64_t s;
    double uniform() {
        uint64_t z = (s += 0x9E3779B97F4A7C15ULL);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        return static_cast<double>((z ^ (z >> 31)) >> 11) * 0x1.0p-53;
    }
    double normal() { return std::sqrt(-2.0 * std::log(1.0 - uniform())) * std::cos(6.283185307179586 * uniform()); }
};

// sampler.cpp's softmax numerator 2^k * exp(x), restated bit for bit: the exact-match
// test below pins the sampler to it, and sampler_weight_formula_tracks_std_exp pins
// it to std::exp.
float restated_exp_scaled(float x, int k) {
    auto bits = [](float f) {
        uint32_t u;
        std::memcpy(&u, &f, sizeof u);
        return u;
    };
    auto from_bits = [](uint32_t u) {
        float f;
        std::memcpy(&f, &u, sizeof f);
        return f;
    };
    x = -from_bits(std::min(bits(x) & 0x7FFFFFFFu, bits(104.0f)));
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    float q = 1.9875691500e-4f;
    q = q * r + 1.3981999507e-3f;
    q = q * r + 8.3334519073e-3f;
    q = q * r + 4.1665795894e-2f;
    q = q * r + 1.6666665459e-1f;
    q = q * r + 5.0000001201e-1f;
    q = q * r * r + r + 1.0f;
    const int e = static_cast<int>(n) + k;
    return q * from_bits(static_cast<uint32_t>(e >= -2) * static_cast<uint32_t>(e + 127) << 23);
}

int weight_shift(size_t n_vocab) {  // k: n_vocab * 2^k <= 2^63
    int bits = 0;
    for (size_t v = n_vocab; v != 0; v >>= 1) ++bits;
    return 63 - bits;
}

// The draw done the slow, obvious way — every candidate fully sorted, running sums —
// in the arithmetic sampler.cpp specifies (weights: the integer part of
// w = 2^k * exp((l - m) / T)), for checking its selection fast path exactly.
int32_t reference_sample(std::vector<float> l, const SamplingParams& p, const std::vector<int32_t>& prompt,
                         const std::vector<int32_t>& generated, uint64_t step) {
    const size_t n = l.size();
    if (p.repetition_penalty != 1.0f) {
        std::vector<bool> seen(n, false);
        for (const auto* ids : {&prompt, &generated}) {
            for (int32_t t : *ids) {
                if (seen[static_cast<size_t>(t)]) continue;
                seen[static_cast<size_t>(t)] = true;
                float& x = l[static_cast<size_t>(t)];
                x = x > 0.0f ? x / p.repetition_penalty : x * p.repetition_penalty;
            }
        }
    }
    std::vector<int> count(n, 0);
    for (int32_t t : generated) count[static_cast<size_t>(t)]++;
    for (size_t i = 0; i < n; ++i) {
        if (count[i] == 0) continue;
        l[i] -= p.frequency_penalty * static_cast<float>(count[i]);
        l[i] -= p.presence_penalty;
    }
    const int k = weight_shift(n);
    const float w_max = std::ldexp(1.0f, k);
    const float m = *std::max_element(l.begin(), l.end());
    std::vector<float> w(n);
    std::vector<int32_t> order;
    for (size_t i = 0; i < n; ++i) {
        w[i] = restated_exp_scaled((l[i] - m) / p.temperature, k);
        if (w[i] >= 1.0f) order.push_back(static_cast<int32_t>(i));
    }
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return w[a] > w[b] || (w[a] == w[b] && a < b); });
    auto weight = [&](size_t j) { return static_cast<uint64_t>(w[static_cast<size_t>(order[j])]); };
    size_t kept = order.size();
    if (p.top_k > 0 && static_cast<size_t>(p.top_k) < kept) kept = static_cast<size_t>(p.top_k);
    if (p.top_p < 1.0f) {
        uint64_t total = 0, cum = 0;
        for (size_t j = 0; j < kept; ++j) total += weight(j);
        const double want = std::ceil(static_cast<double>(p.top_p) * static_cast<double>(total));
        const uint64_t target = std::min(total, std::max<uint64_t>(1, static_cast<uint64_t>(want)));
        for (size_t j = 0; j < kept; ++j) {
            cum += weight(j);
            if (cum >= target) {
                kept = j + 1;
                break;
            }
        }
    }
    if (p.min_p > 0.0f) {
        while (kept > 1 && w[static_cast<size_t>(order[kept - 1])] < p.min_p * w_max) kept--;
    }
    uint64_t total = 0, cum = 0;
    for (size_t j = 0; j < kept; ++j) total += weight(j);
    uint64_t r = static_cast<uint64_t>(lmx::sampler_uniform(p.seed, step) * static_cast<double>(total));
    if (r >= total) r = total - 1;
    for (size_t j = 0; j < kept; ++j) {
        cum += weight(j);
        if (cum > r) return order[j];
    }
    return -1;
}

}  // namespace

// ---- greedy ----------------------------------------------------------------------

TEST(sampler_greedy_picks_argmax_and_lowest_id_on_ties) {
    SamplingParams p;
    p.temperature = 0.0f;
    CHECK(sample_once({0.5f, 3.0f, -1.0f, 3.0f, 2.9f}, p, 0) == 1);
    CHECK(sample_once({2.0f, 2.0f, 2.0f}, p, 0) == 0);
    CHECK(sample_once({-5.0f, -4.0f, -4.5f}, p, 0) == 1);
    CHECK(sample_once({7.0f}, p, 0) == 0);
}

TEST(sampler_greedy_ignores_seed_step_and_truncation) {
    SamplingParams p;
    p.temperature = 0.0f;
    p.top_k = 2;
    p.top_p = 0.1f;
    p.min_p = 0.9f;
    for (uint64_t step = 0; step < 50; ++step) {
        p.seed = step * 7919;
        CHECK(sample_once({0.5f, 1.0f, 3.0f, 2.99f}, p, step) == 2);
    }
}

// ---- the counter-based generator -------------------------------------------------

TEST(sampler_uniform_is_uniform_over_steps_and_over_seeds) {
    const int bins = 20;
    std::vector<double> flat(bins, 1.0 / bins), tilted(bins);
    for (int b = 0; b < bins; ++b) tilted[b] = (0.5 + static_cast<double>(b) / (bins - 1)) / bins;
    std::vector<int> over_steps(bins, 0), over_seeds(bins, 0);
    bool in_range = true;
    for (uint64_t i = 0; i < kDraws; ++i) {
        const double a = lmx::sampler_uniform(12345, i);  // one request's tokens
        const double b = lmx::sampler_uniform(i, 0);      // the first token of many requests
        in_range = in_range && a >= 0.0 && a < 1.0 && b >= 0.0 && b < 1.0;
        over_steps[static_cast<size_t>(a * bins)]++;
        over_seeds[static_cast<size_t>(b * bins)]++;
    }
    CHECK(in_range);
    check_fits_not(over_steps, flat, tilted);
    check_fits_not(over_seeds, flat, tilted);
}

TEST(sampler_uniform_consecutive_steps_are_independent) {
    // Non-overlapping pairs (u[2i], u[2i+1]) must fill a 4x4 grid evenly.
    const int side = 4;
    std::vector<int> grid(side * side, 0);
    std::vector<double> flat(side * side, 1.0 / (side * side));
    for (uint64_t i = 0; i < kDraws; i += 2) {
        const int a = static_cast<int>(lmx::sampler_uniform(99, i) * side);
        const int b = static_cast<int>(lmx::sampler_uniform(99, i + 1) * side);
        grid[static_cast<size_t>(a * side + b)]++;
    }
    const ChiSquare fit = chi_square(grid, flat);
    CHECK(fit.stat <= chi2_critical(fit.df, kAlpha));
    CHECK(lmx::sampler_uniform(5, 17) == lmx::sampler_uniform(5, 17));
    CHECK(lmx::sampler_uniform(5, 17) != lmx::sampler_uniform(5, 18));
    CHECK(lmx::sampler_uniform(5, 17) != lmx::sampler_uniform(6, 17));
}

// ---- reproducibility -------------------------------------------------------------

TEST(sampler_same_seed_and_step_reproduce_the_token_whatever_the_scratch) {
    std::vector<float> logits(50);
    for (size_t i = 0; i < logits.size(); ++i) logits[i] = static_cast<float>(std::sin(1.7 * i));
    SamplingParams p;
    p.seed = 42;
    p.repetition_penalty = 1.2f;
    p.frequency_penalty = 0.3f;
    const std::vector<int32_t> prompt = {3, 4, 5, 3}, generated = {5, 9, 9};

    // A scratch full of garbage, and one last used for a larger vocabulary.
    SamplerScratch dirty;
    dirty.counts.assign(64, 12345);
    dirty.probs.assign(64, kNaN);
    dirty.idx.assign(64, -7);

    SamplingParams other = p;
    other.seed = 43;
    std::set<int32_t> seen;
    int differs_from_other_seed = 0;
    for (uint64_t step = 0; step < 200; ++step) {
        const int32_t fresh = sample_once(logits, p, step, prompt, generated);
        std::vector<float> row = logits;
        const int32_t reused = lmx::sample(row.data(), 50, p, prompt, generated, step, dirty);
        CHECK(fresh == reused);
        CHECK(fresh == sample_once(logits, p, step, prompt, generated));
        seen.insert(fresh);
        if (sample_once(logits, other, step, prompt, generated) != fresh) differs_from_other_seed++;
    }
    CHECK(seen.size() >= 20);               // different steps draw different tokens
    CHECK(differs_from_other_seed >= 150);  // a different seed is a different sequence
}

// ---- sampled distributions -------------------------------------------------------

TEST(sampler_temperature_draws_softmax_of_scaled_logits) {
    const std::vector<float> logits = {2.0f, 1.0f, 0.5f, 0.0f, -0.5f, -1.0f};
    for (float t : {0.5f, 2.0f}) {
        SamplingParams p;
        p.temperature = t;
        p.seed = 1;
        check_fits_not(histogram(logits, p), untruncated(logits, t), untruncated(logits, 1.0f));
    }
    SamplingParams p;  // temperature 1 is plain softmax
    p.seed = 2;
    check_fits_not(histogram(logits, p), untruncated(logits, 1.0f), untruncated(logits, 0.5f));
}

TEST(sampler_top_k_draws_only_the_k_most_likely) {
    const std::vector<float> logits = {0.2f, 1.0f, -0.4f, 0.6f, 0.0f, 0.8f, -0.2f, 0.4f};
    SamplingParams p;
    p.top_k = 3;
    p.seed = 3;
    const Reference ref = reference_distribution(logits, p);
    CHECK(ref.q[1] > 0 && ref.q[5] > 0 && ref.q[3] > 0 && ref.q[7] == 0.0);
    check_fits_not(histogram(logits, p), ref.q, untruncated(logits, 1.0f));

    p.top_k = 100;  // larger than the vocabulary: off
    check_fits(histogram(logits, p), untruncated(logits, 1.0f));
}

TEST(sampler_top_k_ties_at_the_boundary_go_to_lower_ids) {
    const std::vector<float> logits = {0.0f, 1.0f, 1.0f, 1.0f, 0.0f};
    SamplingParams p;
    p.top_k = 2;
    p.seed = 4;
    check_fits_not(histogram(logits, p), {0.0, 0.5, 0.5, 0.0, 0.0}, untruncated(logits, 1.0f));
}

TEST(sampler_top_p_keeps_the_smallest_nucleus_reaching_top_p) {
    // Sorted: 0.4 (id 1), 0.25 (id 3), 0.15 (id 5) reach 0.8 >= 0.75; 0.65 does not.
    const std::vector<float> logits = logits_of({0.06, 0.4, 0.1, 0.25, 0.04, 0.15});
    SamplingParams p;
    p.top_p = 0.75f;
    p.seed = 5;
    const Reference ref = reference_distribution(logits, p);
    CHECK(ref.margin > 0.01);
    CHECK(ref.q[1] > 0 && ref.q[3] > 0 && ref.q[5] > 0 && ref.q[2] == 0.0);
    check_fits_not(histogram(logits, p), ref.q, untruncated(logits, 1.0f));

    p.top_p = 0.01f;  // a nucleus never drops its top token
    for (uint64_t step = 0; step < 100; ++step) CHECK(sample_once(logits, p, step) == 1);
}

TEST(sampler_top_p_after_top_k_measures_the_renormalised_mass) {
    // After top-k = 3 the kept mass is 0.6: renormalised 0.5, 0.33, 0.17, so top-p 0.8
    // keeps two tokens. Against the whole vocabulary it would keep all three.
    std::vector<double> probs = {0.3, 0.2, 0.1};
    for (int i = 0; i < 7; ++i) probs.push_back(0.4 / 7);
    const std::vector<float> logits = logits_of(probs);
    SamplingParams p;
    p.top_k = 3;
    p.top_p = 0.8f;
    p.seed = 6;
    const Reference ref = reference_distribution(logits, p);
    const Reference unnormalised = reference_distribution(logits, p, {}, {}, false);
    CHECK(ref.margin > 0.01);
    check_fits_not(histogram(logits, p), ref.q, unnormalised.q);
}

TEST(sampler_min_p_drops_tokens_below_a_fraction_of_the_top) {
    // min_p 0.2 of the top 0.4 is 0.08: keeps 0.4, 0.25, 0.15, 0.1; drops 0.06, 0.04.
    const std::vector<float> logits = logits_of({0.1, 0.04, 0.25, 0.4, 0.06, 0.15});
    SamplingParams p;
    p.min_p = 0.2f;
    p.seed = 7;
    const Reference ref = reference_distribution(logits, p);
    CHECK(ref.margin > 0.01);
    CHECK(ref.q[0] > 0 && ref.q[1] == 0.0 && ref.q[4] == 0.0);
    check_fits_not(histogram(logits, p), ref.q, untruncated(logits, 1.0f));
}

TEST(sampler_full_pipeline_with_penalties_matches_reference) {
    const std::vector<float> logits = {1.5f, 2.2f, -0.3f, 1.9f, 0.7f, 2.0f, -1.0f, 1.1f, 0.4f, 1.7f};
    const std::vector<int32_t> prompt = {1, 6, 1, 2}, generated = {3, 5, 3, 6};
    SamplingParams p;
    p.repetition_penalty = 1.3f;
    p.presence_penalty = 0.4f;
    p.frequency_penalty = 0.3f;
    p.temperature = 0.8f;
    p.top_k = 6;
    p.top_p = 0.9f;
    p.min_p = 0.05f;
    p.seed = 8;
    const Reference ref = reference_distribution(logits, p, prompt, generated);
    CHECK(ref.margin > 0.005);
    int n_kept = 0;
    for (double q : ref.q) n_kept += q > 0.0;
    CHECK(n_kept >= 3 && n_kept < 6);  // top-p, not only top-k, is cutting
    check_fits_not(histogram(logits, p, prompt, generated), ref.q, untruncated(logits, p.temperature));
}

TEST(sampler_weight_formula_tracks_std_exp) {
    // Within 4 float ulps of 2^k * e^x over the whole range that yields weights >= 1,
    // exactly 2^k at x = 0, and exactly 0 (never a subnormal) far below.
    const int k = weight_shift(152064);
    double worst = 0.0;
    for (double x = 0.0; x > -31.0; x -= 1e-4) {
        const double want = std::ldexp(std::exp(static_cast<double>(static_cast<float>(x))), k);
        const double got = restated_exp_scaled(static_cast<float>(x), k);
        worst = std::max(worst, std::fabs(got - want) / want);
    }
    CHECK(worst < 4.0 * 0x1.0p-24);
    CHECK(restated_exp_scaled(0.0f, k) == std::ldexp(1.0f, k));
    CHECK(restated_exp_scaled(-200.0f, k) == 0.0f);
    CHECK(restated_exp_scaled(-kInf, k) == 0.0f);
    CHECK(restated_exp_scaled(-35.0f, 0) == 0.0f);
}

TEST(sampler_large_vocab_matches_full_sort_reference) {
    // Three rows of a Qwen-sized vocabulary: spread-out logits with a few confident
    // tokens; logits rounded to halves, so that ties (broken by id) are everywhere; and
    // a flat row, where every token ties and a single weight bucket holds them all.
    const int32_t n = 152064;
    TestRng rng{2024};
    std::vector<std::vector<float>> rows(3, std::vector<float>(static_cast<size_t>(n), 0.0f));
    for (size_t i = 0; i < rows[0].size(); ++i) {
        rows[0][i] = static_cast<float>(2.5 * rng.normal());
        rows[1][i] = std::round(2.0f * rows[0][i]) / 2.0f;
    }
    for (int i = 0; i < 5; ++i) rows[0][static_cast<size_t>(rng.uniform() * n)] += 8.0f;
    std::vector<int32_t> prompt, generated;
    for (int i = 0; i < 3000; ++i) prompt.push_back(static_cast<int32_t>(rng.uniform() * n));
    for (int i = 0; i < 200; ++i) generated.push_back(static_cast<int32_t>(rng.uniform() * 500));

    struct Case {
        float temperature;
        int32_t top_k;
        float top_p, min_p, repetition, presence, frequency;
    };
    const Case cases[] = {
        {1.0f, 0, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f},      {0.7f, 40, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f},
        {1.0f, 0, 0.9f, 0.0f, 1.0f, 0.0f, 0.0f},      {1.5f, 2000, 0.95f, 0.02f, 1.0f, 0.0f, 0.0f},
        {1.0f, 0, 1.0f, 0.1f, 1.0f, 0.0f, 0.0f},      {3.0f, 0, 0.99f, 0.0f, 1.0f, 0.0f, 0.0f},
        {0.9f, 0, 0.95f, 0.0f, 1.15f, 0.5f, 0.2f},    {8.0f, 0, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f},
        {1.0f, 100000, 0.5f, 0.0f, 1.0f, 0.0f, 0.0f},
    };
    SamplerScratch scratch;
    std::vector<float> row;
    for (size_t ri = 0; ri < rows.size(); ++ri) {
        for (const Case& c : cases) {
            SamplingParams p;
            p.temperature = c.temperature;
            p.top_k = c.top_k;
            p.top_p = c.top_p;
            p.min_p = c.min_p;
            p.repetition_penalty = c.repetition;
            p.presence_penalty = c.presence;
            p.frequency_penalty = c.frequency;
            lmx::sampling_params_validate(p, n);
            for (uint64_t step = 0; step < 4; ++step) {
                p.seed = 1000 + step * 31 + ri;
                row = rows[ri];
                const int32_t got = lmx::sample(row.data(), n, p, prompt, generated, step, scratch);
                const int32_t want = reference_sample(rows[ri], p, prompt, generated, step);
                if (got != want) {
                    std::fprintf(stderr, "  row %d T=%g k=%d p=%g step %d: %d != %d\n", static_cast<int>(ri),
                                 c.temperature, c.top_k, c.top_p, static_cast<int>(step), got, want);
                }
                CHECK(got == want);
            }
        }
    }
}

// ---- penalties (exact values, probed through greedy) -------------------------------

TEST(sampler_repetition_penalty_divides_positive_multiplies_negative_once_per_token) {
    SamplingParams p;
    p.repetition_penalty = 1.5f;
    CHECK(penalised_logit_is(3.0f, 2, 2.0f, p, {2}, {}));
    CHECK(penalised_logit_is(-1.0f, 2, -1.5f, p, {}, {2}));
    CHECK(penalised_logit_is(0.0f, 2, 0.0f, p, {2}, {}));
    CHECK(penalised_logit_is(3.0f, 2, 2.0f, p, {2, 2, 2}, {2, 2}));  // once, not five times
    CHECK(penalised_logit_is(3.0f, 2, 3.0f, p, {1, 3}, {4}));        // not in the history
    p.repetition_penalty = 0.5f;                                     // below 1 encourages
    CHECK(penalised_logit_is(3.0f, 2, 6.0f, p, {2}, {}));
    CHECK(penalised_logit_is(-1.0f, 2, -0.5f, p, {2}, {}));
}

TEST(sampler_presence_and_frequency_penalties_count_generated_tokens_only) {
    SamplingParams p;
    p.presence_penalty = 0.5f;
    p.frequency_penalty = 0.25f;
    CHECK(penalised_logit_is(1.0f, 2, -0.25f, p, {}, {2, 1, 2, 2}));  // 1 - 0.25 * 3 - 0.5
    CHECK(penalised_logit_is(1.0f, 2, 0.25f, p, {}, {2}));            // 1 - 0.25 - 0.5
    CHECK(penalised_logit_is(1.0f, 2, 1.0f, p, {2, 2}, {1}));         // prompt does not count
    p.presence_penalty = -1.0f;                                       // negative values encourage
    p.frequency_penalty = -0.5f;
    CHECK(penalised_logit_is(1.0f, 2, 3.0f, p, {}, {2, 2}));
}

TEST(sampler_penalties_apply_repetition_first_then_presence_and_frequency) {
    SamplingParams p;
    p.repetition_penalty = 1.5f;
    p.presence_penalty = 0.5f;
    p.frequency_penalty = 0.25f;
    // (3 / 1.5) - 0.25 * 2 - 0.5 = 1; the other order would give (3 - 1) / 1.5.
    CHECK(penalised_logit_is(3.0f, 4, 1.0f, p, {4}, {4, 4}));
}

TEST(sampler_penalties_also_shape_random_draws) {
    SamplingParams p;
    p.presence_penalty = 200.0f;  // 5 - 200: the token's mass underflows to exactly 0
    for (uint64_t step = 0; step < 500; ++step) CHECK(sample_once({5.0f, 0.0f, 0.1f}, p, step, {}, {0}) != 0);
}

// ---- NaN and infinity ------------------------------------------------------------

TEST(sampler_nan_logits_count_as_minus_infinity) {
    const std::vector<float> logits = {kNaN, 1.0f, kNaN, 0.5f};
    SamplingParams p;
    p.temperature = 0.0f;
    CHECK(sample_once(logits, p, 0) == 1);
    p.temperature = 1.0f;
    p.seed = 9;
    const double e = std::exp(-0.5);
    check_fits(histogram(logits, p), {0.0, 1.0 / (1.0 + e), 0.0, e / (1.0 + e)});
    p.top_k = 3;  // NaN must not take a top-k slot or break the ordering
    p.top_p = 0.9f;
    p.min_p = 0.1f;
    for (uint64_t step = 0; step < 200; ++step) {
        const int32_t t = sample_once(logits, p, step);
        CHECK(t == 1 || t == 3);
    }
}

TEST(sampler_rows_without_mass_give_token_0) {
    SamplingParams greedy, random, truncated;
    greedy.temperature = 0.0f;
    truncated.top_k = 2;
    truncated.top_p = 0.5f;
    truncated.min_p = 0.5f;
    for (const SamplingParams& p : {greedy, random, truncated}) {
        for (uint64_t step = 0; step < 10; ++step) {
            CHECK(sample_once({kNaN, kNaN, kNaN}, p, step) == 0);
            CHECK(sample_once({-kInf, -kInf, -kInf, -kInf}, p, step) == 0);
            CHECK(sample_once({-kInf, kNaN, -kInf}, p, step) == 0);
        }
    }
}

TEST(sampler_positive_infinite_logits_share_all_mass) {
    const std::vector<float> logits = {1.0f, kInf, 0.0f, kInf, kNaN};
    SamplingParams p;
    p.temperature = 0.0f;
    CHECK(sample_once(logits, p, 0) == 1);
    p.temperature = 0.7f;
    p.seed = 10;
    check_fits(histogram(logits, p), {0.0, 0.5, 0.0, 0.5, 0.0});
}

TEST(sampler_penalty_that_makes_nan_counts_as_minus_infinity) {
    // inf - 1e38 * 10 = inf - inf = NaN: the token must lose, not crash the draw.
    SamplingParams p;
    p.frequency_penalty = 1e38f;
    for (uint64_t step = 0; step < 20; ++step) {
        CHECK(sample_once({kInf, 1.0f, 0.5f}, p, step, {}, std::vector<int32_t>(10, 0)) != 0);
    }
    p.temperature = 0.0f;
    CHECK(sample_once({kInf, 1.0f, 0.5f}, p, 0, {}, std::vector<int32_t>(10, 0)) == 1);
}

TEST(sampler_history_token_outside_vocab_throws) {
    SamplingParams p;
    p.repetition_penalty = 1.2f;
    CHECK_THROWS(sample_once({0.0f, 1.0f}, p, 0, {0, 2}, {}), lmx::InvalidArgument,
                 "prompt token id 2 is outside the vocabulary [0, 2)");
    p.repetition_penalty = 1.0f;
    p.presence_penalty = 0.5f;
    CHECK_THROWS(sample_once({0.0f, 1.0f}, p, 0, {}, {-1}), lmx::InvalidArgument, "generated token id -1");
}

// ---- validation ------------------------------------------------------------------

TEST(sampler_validate_accepts_defaults_and_boundaries) {
    SamplingParams p;
    lmx::sampling_params_validate(p, 32000);
    p.temperature = 0.0f;
    p.top_k = 32000 * 2;  // larger than the vocabulary: treated as off
    p.top_p = 1.0f;
    p.min_p = 1.0f;
    p.repetition_penalty = 0.01f;
    p.presence_penalty = -2.0f;
    p.frequency_penalty = 2.0f;
    p.max_tokens = 1;
    p.stop_token_ids = {0, 31999};
    lmx::sampling_params_validate(p, 32000);
    p.min_p = 0.0f;
    p.top_p = 1e-6f;
    lmx::sampling_params_validate(p, 32000);  // a throw fails the test
}

TEST(sampler_validate_names_field_expectation_and_value) {
    const int32_t n = 32000;
    auto with = [](auto mutate) {
        SamplingParams p;
        mutate(p);
        return p;
    };
    using lmx::InvalidArgument;
    using lmx::sampling_params_validate;
    CHECK_THROWS(sampling_params_validate(with([](SamplingParams& p) { p.temperature = -0.5f; }), n),
                 InvalidArgument, "temperature: expected a finite value >= 0 (0 means greedy), found -0.5");
    CHECK_THROWS(sampling_params_validate(with([](SamplingParams& p) { p.temperature = kNaN; }), n), InvalidArgument,
                 "temperature: expected a finite value >= 0 (0 means greedy), found nan");
    CHECK_THROWS(sampling_params_validate(with([](SamplingParams& p) { p.temperature = kInf; }), n), InvalidArgument,
                 "found inf");
    CHECK_THROWS(sampling_params_validate(with([](SamplingParams& p) { p.top_k = -1; }), n), InvalidArgument,
                 "top_k: expected a value >= 0 (0 means off), found -1");
    CHECK_THROWS(sampling_params_validate(with([](SamplingParams& p) { p.top_p = 1.5f; }), n), InvalidArgument,
                 "top_p: expected a value in (0, 1], found 1.5");
    CHECK_THROWS(sampling_params_validate(with([](SamplingParams& p) { p.top_p = 0.0f; }), n), InvalidArgument,
                 "top_p: expected a value in (0, 1], found 0");
    CHECK_THROWS(sampling_params_validate(with([](SamplingParams& p) { p.top_p = kNaN; }), n), InvalidArgument,
                 "top_p: expected a value in (0, 1], found nan");
    CHECK_THROWS(sampling_params_validate(with([](SamplingParams& p) { p.min_p = -0.1f; }), n), InvalidArgument,
                 "min_p: expected a value in [0, 1], found -0.1");
    CHECK_THROWS(sampling_params_validate(with([](SamplingParams& p) { p.min_p = 1.5f; }), n), InvalidArgument,
                 "min_p: expected a value in [0, 1], found 1.5");
    CHECK_THROWS(sampling_params_validate(with([](SamplingParams& p) { p.repetition_penalty = 0.0f; }), n),
                 InvalidArgument, "repetition_penalty: expected a finite value > 0 (1 means off), found 0");
    CHECK_THROWS(sampling_params_validate(with([](SamplingParams& p) { p.repetition_penalty = -1.0f; }), n),
                 InvalidArgument, "repetition_penalty: expected a finite value > 0 (1 means off), found -1");
    CHECK_THROWS(sampling_params_validate(with([](SamplingParams& p) { p.repetition_penalty = kInf; }), n),
                 InvalidArgument, "repetition_penalty: expected a finite value > 0 (1 means off), found inf");
    CHECK_THROWS(sampling_params_validate(with([](SamplingParams& p) { p.presence_penalty = kInf; }), n),
                 InvalidArgument, "presence_penalty: expected a finite value, found inf");
    CHECK_THROWS(sampling_params_validate(with([](SamplingParams& p) { p.frequency_penalty = kNaN; }), n),
                 InvalidArgument, "frequency_penalty: expected a finite value, found nan");
    CHECK_THROWS(sampling_params_validate(with([](SamplingParams& p) { p.frequency_penalty = -kInf; }), n),
                 InvalidArgument, "frequency_penalty: expected a finite value, found -inf");
    CHECK_THROWS(sampling_params_validate(with([](SamplingParams& p) { p.max_tokens = 0; }), n), InvalidArgument,
                 "max_tokens: expected a value >= 1, found 0");
    CHECK_THROWS(sampling_params_validate(with([](SamplingParams& p) { p.stop_token_ids = {5, 32000}; }), n),
                 InvalidArgument, "stop_token_ids: expected token ids in [0, 32000), found 32000");
    CHECK_THROWS(sampling_params_validate(with([](SamplingParams& p) { p.stop_token_ids = {-1}; }), n),
                 InvalidArgument, "stop_token_ids: expected token ids in [0, 32000), found -1");
    CHECK_THROWS(sampling_params_validate(SamplingParams{}, 0), InvalidArgument, "n_vocab: expected a value >= 1, found 0");
}

TEST(sampler_chi_square_critical_values_match_tables) {
    // Table values of the chi-square distribution's 0.999 quantile: the test machinery
    // itself is checked, or a broken critical value could pass anything.
    CHECK_NEAR(chi2_critical(1, 1e-3), 10.828, 2e-3);
    CHECK_NEAR(chi2_critical(2, 1e-3), 13.816, 2e-3);
    CHECK_NEAR(chi2_critical(5, 1e-3), 20.515, 2e-3);
    CHECK_NEAR(chi2_critical(15, 1e-3), 37.697, 2e-3);
    CHECK_NEAR(chi2_critical(19, 1e-3), 43.820, 2e-3);
}
