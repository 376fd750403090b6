#include "sample/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "core/argmax.h"
#include "sample/stop.h"

namespace kestrel {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

std::vector<float> random_logits(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Logits whose softmax is exactly `probs` (up to rounding).
std::vector<float> logits_for(const std::vector<double>& probs) {
  std::vector<float> v;
  for (double p : probs) v.push_back(p > 0 ? static_cast<float>(std::log(p)) : kNegInf);
  return v;
}

std::map<int32_t, int> histogram(Sampler& s, const std::vector<float>& logits, int draws) {
  std::map<int32_t, int> counts;
  for (int i = 0; i < draws; ++i) ++counts[s.sample(logits, {})];
  return counts;
}

SamplingParams sampling(float temperature, uint64_t seed = 1) {
  SamplingParams p;
  p.temperature = temperature;
  p.seed = seed;
  return p;
}

TEST(Sampler, GreedyTakesTheLowestIdAmongTheMaxima) {
  Sampler s(SamplingParams{}, 6);
  const std::vector<float> logits = {0.5f, 2.0f, -1.0f, 2.0f, 1.9f, 2.0f};
  EXPECT_EQ(s.sample(logits, {}), 1);
  Sampler big(SamplingParams{}, 1000);
  for (uint32_t seed = 0; seed < 20; ++seed) {
    const auto l = random_logits(1000, seed);
    const int32_t expected = static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin());
    EXPECT_EQ(big.sample(l, {}), expected);
  }
}

TEST(Sampler, TopKOfOneIsGreedyAtAnyTemperature) {
  SamplingParams p = sampling(1.5f, 99);
  p.top_k = 1;
  Sampler s(p, 5000);
  for (uint32_t seed = 0; seed < 50; ++seed) {
    const auto l = random_logits(5000, seed);
    EXPECT_EQ(s.sample(l, {}), std::max_element(l.begin(), l.end()) - l.begin());
  }
}

TEST(Sampler, SameSeedSameTokensDifferentSeedsDiffer) {
  const auto logits = random_logits(8000, 7);
  std::vector<int32_t> a, b, c;
  Sampler s1(sampling(1.0f, 42), 8000), s2(sampling(1.0f, 42), 8000), s3(sampling(1.0f, 43), 8000);
  for (int i = 0; i < 200; ++i) {
    a.push_back(s1.sample(logits, {}));
    b.push_back(s2.sample(logits, {}));
    c.push_back(s3.sample(logits, {}));
  }
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  EXPECT_GT(std::set<int32_t>(a.begin(), a.end()).size(), 10u);  // it is not stuck on one token
}

TEST(Sampler, RngIsTheReferenceXoshiro256StarStar) {
  // splitmix64(0) seeds, then xoshiro256**: these values are fixed by the algorithms, so a
  // platform or library change cannot silently change sampled tokens.
  SamplingRng rng(0);
  uint64_t state = 0;
  uint64_t s[4];
  for (uint64_t& x : s) {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    x = z ^ (z >> 31);
  }
  EXPECT_EQ(s[0], 0xe220a8397b1dcdafull);  // splitmix64's published first output for seed 0
  for (int i = 0; i < 5; ++i) {
    const uint64_t x = s[1] * 5;
    const uint64_t expected = ((x << 7) | (x >> 57)) * 9;
    const uint64_t t = s[1] << 17;
    s[2] ^= s[0], s[3] ^= s[1], s[1] ^= s[2], s[0] ^= s[3], s[2] ^= t;
    s[3] = (s[3] << 45) | (s[3] >> 19);
    EXPECT_EQ(rng.next(), expected);
  }
  SamplingRng u(5);
  for (int i = 0; i < 1000; ++i) {
    const double x = u.uniform();
    EXPECT_GE(x, 0.0);
    EXPECT_LT(x, 1.0);
  }
}

TEST(Sampler, DrawsFollowTheSoftmax) {
  const std::vector<double> probs = {0.4, 0.3, 0.2, 0.1};
  Sampler s(sampling(1.0f, 3), 4);
  const int draws = 40000;
  const auto counts = histogram(s, logits_for(probs), draws);
  for (int i = 0; i < 4; ++i) {
    const double p = probs[i];
    const double sigma = std::sqrt(p * (1 - p) / draws);
    EXPECT_NEAR(counts.count(i) ? counts.at(i) / double(draws) : 0.0, p, 5 * sigma) << i;
  }
}

TEST(Sampler, TemperatureScalesLogits) {
  // Logits 0 and 1 at T = 2 give p(1) = e^0.5 / (1 + e^0.5).
  Sampler s(sampling(2.0f, 11), 2);
  const int draws = 40000;
  const auto counts = histogram(s, {0.0f, 1.0f}, draws);
  const double expected = std::exp(0.5) / (1 + std::exp(0.5));
  EXPECT_NEAR(counts.at(1) / double(draws), expected, 5 * std::sqrt(0.25 / draws));
  // A low temperature concentrates on the top token.
  Sampler cold(sampling(0.05f, 11), 2);
  EXPECT_GT(histogram(cold, {0.0f, 1.0f}, 1000).at(1), 995);
  const auto d = cold.distribution(std::vector<float>{0.0f, 1.0f}, {});
  EXPECT_NEAR(d[0].second, 1 / (1 + std::exp(-20.0)), 1e-12);
}

TEST(Sampler, TopPKeepsTheSmallestNucleus) {
  SamplingParams p = sampling(1.0f, 5);
  p.top_p = 0.75f;  // 0.5 + 0.3 reaches it: tokens 2 and 3 are dropped
  Sampler s(p, 4);
  const auto logits = logits_for({0.5, 0.3, 0.15, 0.05});
  const auto d = s.distribution(logits, {});
  ASSERT_EQ(d.size(), 2u);
  EXPECT_EQ(d[0].first, 0);
  EXPECT_NEAR(d[0].second, 0.5 / 0.8, 1e-6);
  EXPECT_EQ(d[1].first, 1);
  const int draws = 20000;
  const auto counts = histogram(s, logits, draws);
  EXPECT_EQ(counts.count(2) + counts.count(3), 0u);
  EXPECT_NEAR(counts.at(0) / double(draws), 0.625, 5 * std::sqrt(0.625 * 0.375 / draws));
  // Just above 0.8 the third token is needed.
  p.top_p = 0.81f;
  Sampler wider(p, 4);
  EXPECT_EQ(wider.distribution(logits, {}).size(), 3u);
}

TEST(Sampler, TopPOnALargeVocabularyMatchesAFullSort) {
  const size_t vocab = 50000;
  const auto logits = random_logits(vocab, 21);
  SamplingParams p = sampling(0.8f, 1);
  p.top_p = 0.95f;
  Sampler s(p, static_cast<int32_t>(vocab));
  const auto d = s.distribution(logits, {});
  // Independent reference: sort everything, keep while the mass before a token is < top_p.
  std::vector<std::pair<double, int32_t>> all;
  double maxl = -1e30;
  for (float l : logits) maxl = std::max(maxl, l / 0.8);
  double total = 0;
  for (size_t i = 0; i < vocab; ++i) {
    all.emplace_back(std::exp(logits[i] / 0.8 - maxl), static_cast<int32_t>(i));
    total += all.back().first;
  }
  std::sort(all.begin(), all.end(), [](auto& a, auto& b) { return a.first > b.first; });
  size_t keep = 0;
  double before = 0;
  while (keep < all.size() && (keep == 0 || before < 0.95 * total)) before += all[keep++].first;
  ASSERT_EQ(d.size(), keep);
  EXPECT_GT(keep, 256u);  // exercises the incremental sort beyond its first block
  for (size_t i = 0; i < keep; ++i) EXPECT_EQ(d[i].first, all[i].second) << i;
}

// The nucleus by radix select (Sampler::nucleus) against a full sort, on vocabularies from 1 to
// 70000 tokens: flat rows (nearly every token in the nucleus), peaked ones, rows of few
// distinct values (ties), NaN and -inf, with and without top-k, at several temperatures.
TEST(Sampler, NucleusMatchesAFullSortOnManyShapes) {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 300; ++trial) {
    const size_t vocab = trial < 20 ? size_t(trial + 1) : size_t(rng() % 70000 + 1);
    const float scales[] = {0.001f, 0.3f, 3.0f, 30.0f};
    std::normal_distribution<float> dist(0.0f, scales[rng() % 4]);
    const int shape = int(rng() % 4);  // 0 plain, 1 ties, 2 NaN and -inf, 3 all equal
    std::vector<float> logits(vocab);
    for (float& l : logits) {
      l = dist(rng);
      if (shape == 1) l = std::round(l * 4) / 4;
      if (shape == 2 && rng() % 8 == 0) l = rng() % 2 ? kNegInf : std::nanf("");
      if (shape == 3) l = 1.5f;
    }
    SamplingParams p = sampling(0.25f + float(rng() % 8) * 0.25f);
    p.top_p = float(rng() % 1000 + 1) / 1000.0f;
    p.top_k = rng() % 3 == 0 ? int(rng() % 3000) : 0;
    SCOPED_TRACE("trial " + std::to_string(trial) + " vocab " + std::to_string(vocab) + " shape " +
                 std::to_string(shape) + " top_p " + std::to_string(p.top_p) + " top_k " +
                 std::to_string(p.top_k));
    Sampler s(p, static_cast<int32_t>(vocab));
    const auto got = s.distribution(logits, {});

    // Reference: the same probabilities, every candidate sorted, then the same rules.
    std::vector<float> valid;
    for (float l : logits) {
      if (!std::isnan(l) && l != kNegInf) valid.push_back(l);
    }
    if (valid.empty()) continue;
    std::sort(valid.begin(), valid.end(), std::greater<float>());
    const float bar =
        p.top_k > 0 && size_t(p.top_k) < valid.size() ? valid[size_t(p.top_k) - 1] : kNegInf;
    const double inv_t = 1.0 / double(p.temperature);
    std::vector<std::pair<double, int32_t>> all;
    for (size_t i = 0; i < vocab; ++i) {
      if (!std::isnan(logits[i]) && logits[i] != kNegInf && logits[i] >= bar) {
        all.emplace_back(double(logits[i]) * inv_t, int32_t(i));
      }
    }
    double top = -1e300;
    for (const auto& a : all) top = std::max(top, a.first);
    std::vector<double> probs;
    for (const auto& a : all) probs.push_back(a.first - top);
    exp_in_place(probs);  // the sampler's exponential (checked against std::exp below)
    // The sampler's fixed-point masses (draw_rules.h): round(p * 2^40), summed exactly.
    std::vector<std::pair<uint64_t, int32_t>> fixed;
    uint64_t total = 0;
    for (size_t i = 0; i < all.size(); ++i) {
      fixed.emplace_back(uint64_t(std::nearbyint(std::ldexp(probs[i], 40))), all[i].second);
      total += fixed.back().first;
    }
    std::sort(fixed.begin(), fixed.end(), [](const auto& a, const auto& b) {
      return a.first != b.first ? a.first > b.first : a.second < b.second;
    });
    const uint64_t target = uint64_t(std::nearbyint(double(p.top_p) * double(total)));
    size_t keep = 0;
    for (uint64_t before = 0; keep < fixed.size() && (keep == 0 || before < target); ++keep) {
      before += fixed[keep].first;
    }
    // distribution() lists the kept tokens with any mass.
    while (keep > 1 && fixed[keep - 1].first == 0) --keep;
    std::vector<std::pair<double, int32_t>> kept_ids;
    for (size_t i = 0; i < keep; ++i) kept_ids.emplace_back(0.0, fixed[i].second);
    all = kept_ids;
    ASSERT_EQ(got.size(), keep);
    for (size_t i = 0; i < keep; ++i) ASSERT_EQ(got[i].first, all[i].second) << "rank " << i;
  }
}

// sample() is pick() with the sampler's next uniform number, on every kind of setting; the
// generator is consumed once a sampled token, whatever the row holds (a device draw takes the
// number before it sees the row).
TEST(Sampler, SampleIsPickWithTheNextUniform) {
  std::mt19937 rng(8);
  for (int trial = 0; trial < 200; ++trial) {
    const size_t vocab = size_t(rng() % 5000 + 1);
    std::vector<float> logits = random_logits(vocab + 3, uint32_t(trial));
    if (trial % 7 == 0) std::fill(logits.begin(), logits.end(), std::nanf(""));
    SamplingParams p = sampling(0.1f + float(rng() % 30) * 0.1f, uint64_t(trial));
    p.top_k = rng() % 3 == 0 ? int(rng() % 100) : 0;
    p.top_p = rng() % 2 ? 1.0f : float(rng() % 1000 + 1) / 1000.0f;
    p.min_p = rng() % 3 == 0 ? 0.1f : 0.0f;
    Sampler s(p, int32_t(vocab));
    SamplingRng numbers(p.seed);
    for (int step = 0; step < 3; ++step) {
      const double u = numbers.uniform();
      const int32_t want = Sampler::pick(logits, p, int32_t(vocab), u);
      ASSERT_EQ(s.sample(logits, {}), want) << "trial " << trial << " step " << step;
    }
    EXPECT_TRUE(s.draws_from_row() == (p.top_k != 1));
  }
  SamplingParams penalized = sampling(1.0f);
  penalized.repetition_penalty = 1.2f;
  EXPECT_FALSE(Sampler(penalized, 10).draws_from_row());
  EXPECT_FALSE(Sampler(sampling(0.0f), 10).draws_from_row());
}

// The draw walks the kept tokens in id order by their fixed-point masses: two equal logits are
// 2^40 each, so u below one half draws the first, and u = 0.5 exactly (the point 2^40) the
// second; a third token 1000 nats lower carries no mass and is never drawn.
TEST(Sampler, PickSplitsTheUnitIntervalByExactMasses) {
  const std::vector<float> logits = {2.0f, -998.0f, 2.0f};
  const SamplingParams p = sampling(1.0f);
  EXPECT_EQ(Sampler::pick(logits, p, 3, 0.0), 0);
  EXPECT_EQ(Sampler::pick(logits, p, 3, 0.5 - 0x1.0p-53), 0);
  EXPECT_EQ(Sampler::pick(logits, p, 3, 0.5), 2);
  EXPECT_EQ(Sampler::pick(logits, p, 3, 1.0 - 0x1.0p-53), 2);
  // Greedy settings take the argmax whatever u is; nothing but NaN gives token 0.
  EXPECT_EQ(Sampler::pick(logits, sampling(0.0f), 3, 0.9), 0);
  const std::vector<float> nan_row(4, std::nanf(""));
  EXPECT_EQ(Sampler::pick(nan_row, p, 4, 0.3), 0);
  // Two infinite logits are two top tokens of 2^40 each, and a top token's probability is
  // exactly 1 at any temperature, so min_p 1 keeps both: a fused multiply-add in the scaled
  // logits would leave the top below 2^40 (or +inf's far off), and fall back to the argmax.
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(Sampler::pick(std::vector<float>{inf, inf}, sampling(0.7f), 2, 0.75), 1);
  for (const float t : {0.001f, 0.002f}) {
    SamplingParams strict = sampling(t);
    strict.min_p = 1.0f;
    for (const float l : {30.0f, 60.0f}) {
      EXPECT_EQ(Sampler::pick(std::vector<float>{l, l}, strict, 2, 0.75), 1) << l << " at " << t;
    }
  }
  // A vocabulary narrower than the row: its columns only.
  const std::vector<float> padded = {1.0f, 1.0f, 50.0f};
  for (double u : {0.0, 0.3, 0.7, 0.99}) EXPECT_NE(Sampler::pick(padded, p, 2, u), 2);
}

// The sampler's exponential against the C library's: within 1 ulp over the whole range a
// sampler uses (logits less their maximum), subnormal results included, exact at the ends.
TEST(Sampler, ExpInPlaceIsWithinAnUlpOfStdExp) {
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<double> wide(-760.0, 0.0);
  std::normal_distribution<double> near(0.0, 3.0);
  std::vector<double> x(200000);
  for (size_t i = 0; i < x.size(); ++i) x[i] = i % 2 ? wide(rng) : -std::fabs(near(rng));
  x.insert(x.end(), {0.0, -0.0, -1e-300, -1e-17, -708.39, -708.4, -745.1, -745.2, -746.0, -1e9,
                     -std::numeric_limits<double>::infinity()});
  std::vector<double> y = x;
  exp_in_place(y);
  for (size_t i = 0; i < x.size(); ++i) {
    const double want = std::exp(x[i]);
    // One unit in the last place of the result (of the subnormals, below the normal range).
    const double ulp = std::nextafter(want, 1.0) - want;
    ASSERT_LE(std::fabs(y[i] - want), ulp) << "exp(" << x[i] << ")";
  }
  EXPECT_EQ(y[x.size() - 11], 1.0);
  EXPECT_EQ(y[x.size() - 10], 1.0);
  EXPECT_EQ(y[x.size() - 3], 0.0);
  EXPECT_EQ(y[x.size() - 2], 0.0);
  EXPECT_EQ(y[x.size() - 1], 0.0);
}

TEST(Sampler, TopKKeepsTiesAtTheBoundary) {
  SamplingParams p = sampling(1.0f);
  p.top_k = 2;
  Sampler s(p, 5);
  const auto d = s.distribution(std::vector<float>{1.0f, 3.0f, 2.0f, 2.0f, 0.0f}, {});
  std::set<int32_t> ids;
  for (auto& [id, prob] : d) ids.insert(id);
  EXPECT_EQ(ids, (std::set<int32_t>{1, 2, 3}));  // HF keeps every logit equal to the k-th
}

TEST(Sampler, MinPDropsTokensBelowTheThreshold) {
  SamplingParams p = sampling(1.0f, 9);
  p.min_p = 0.09f;  // threshold 0.09 * 0.6 = 0.054: keeps 0.06, drops 0.04
  Sampler s(p, 4);
  const auto logits = logits_for({0.6, 0.3, 0.06, 0.04});
  const auto d = s.distribution(logits, {});
  ASSERT_EQ(d.size(), 3u);
  EXPECT_NEAR(d[2].second, 0.06 / 0.96, 1e-6);
  const auto counts = histogram(s, logits, 20000);
  EXPECT_EQ(counts.count(3), 0u);
  EXPECT_GT(counts.at(2), 0);
}

TEST(Sampler, PenaltiesFollowHfAndOpenAi) {
  SamplingParams p;
  p.repetition_penalty = 2.0f;
  Sampler rep(p, 5);
  std::vector<float> logits = {2.0f, -2.0f, 3.0f, 0.5f, 0.0f};
  const std::vector<int32_t> history = {0, 1, 1, 4, 77, -3};  // repeats and out-of-range ids
  rep.apply_penalties(logits, history);
  EXPECT_EQ(logits, (std::vector<float>{1.0f, -4.0f, 3.0f, 0.5f, 0.0f}));

  p.repetition_penalty = 1.0f;
  p.presence_penalty = 0.5f;
  Sampler presence(p, 5);
  logits = {2.0f, -2.0f, 3.0f, 0.5f, 0.0f};
  presence.apply_penalties(logits, history);
  EXPECT_EQ(logits, (std::vector<float>{1.5f, -2.5f, 3.0f, 0.5f, -0.5f}));

  // Frequency counts every occurrence: token 1 appears twice.
  p.presence_penalty = 0.0f;
  p.frequency_penalty = 0.25f;
  Sampler frequency(p, 5);
  logits = {2.0f, -2.0f, 3.0f, 0.5f, 0.0f};
  frequency.apply_penalties(logits, history);
  EXPECT_EQ(logits, (std::vector<float>{1.75f, -2.5f, 3.0f, 0.5f, -0.25f}));
  p.frequency_penalty = 0.0f;

  // Greedy sees the penalized logits: token 2 wins once token 0 is penalized enough.
  p.presence_penalty = 0.0f;
  p.repetition_penalty = 1.6f;
  Sampler greedy(p, 3);
  const std::vector<float> l = {4.0f, 0.0f, 3.0f};
  EXPECT_EQ(greedy.sample(l, {}), 0);
  const std::vector<int32_t> seen = {0};
  EXPECT_EQ(greedy.sample(l, seen), 2);
}

TEST(Sampler, NanAndPaddingLogitsAreNeverChosen) {
  Sampler s(sampling(1.0f, 4), 3);  // the lm_head has 5 rows, the vocabulary 3
  const std::vector<float> logits = {std::nanf(""), 0.0f, 1.0f, 50.0f, 60.0f};
  for (int i = 0; i < 2000; ++i) {
    const int32_t t = s.sample(logits, {});
    EXPECT_TRUE(t == 1 || t == 2) << t;
  }
  Sampler g(SamplingParams{}, 3);
  EXPECT_EQ(g.sample(logits, {}), 2);
}

// The server takes a greedy request's token from the device's argmax when picks_argmax() says
// the sampler would pick row_argmax of the row: both must be the same token on every row, NaN,
// infinities and ties included, whatever the history.
TEST(Sampler, PicksArgmaxOnlyWhenItsPickIsTheRowsArgmax) {
  SamplingParams greedy;
  SamplingParams top1 = sampling(0.8f);
  top1.top_k = 1;
  const SamplingParams warm = sampling(0.8f);
  SamplingParams repeat = greedy, present = greedy, frequent = greedy;
  repeat.repetition_penalty = 1.3f;
  present.presence_penalty = 0.5f;
  frequent.frequency_penalty = -0.5f;
  const int32_t vocab = 40;
  EXPECT_TRUE(Sampler(greedy, vocab).picks_argmax());
  EXPECT_TRUE(Sampler(top1, vocab).picks_argmax());
  EXPECT_FALSE(Sampler(warm, vocab).picks_argmax());
  EXPECT_FALSE(Sampler(repeat, vocab).picks_argmax());
  EXPECT_FALSE(Sampler(present, vocab).picks_argmax());
  EXPECT_FALSE(Sampler(frequent, vocab).picks_argmax());

  std::mt19937 rng(11);
  const float specials[] = {std::nanf(""), kNegInf, -kNegInf, 0.0f, 2.5f};
  int penalised_differs = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    // Few distinct values, so ties are common; some rows are mostly (or wholly) NaN and -inf.
    const int special_share = int(rng() % 5);
    std::vector<float> row(static_cast<size_t>(vocab));
    for (float& v : row) {
      v = int(rng() % 4) < special_share ? specials[rng() % 5] : float(int(rng() % 7) - 3);
    }
    std::vector<int32_t> history;
    for (int i = int(rng() % 6); i > 0; --i) history.push_back(int32_t(rng() % uint32_t(vocab)));
    const int32_t want = row_argmax(row.data(), vocab);
    for (const SamplingParams& p : {greedy, top1}) {
      Sampler s(p, vocab);
      ASSERT_EQ(s.sample(row, history), want) << "trial " << trial;
    }
    // Where a penalty moves the pick, the server must not use the device's argmax.
    Sampler r(repeat, vocab), f(frequent, vocab);
    penalised_differs += r.sample(row, history) != want || f.sample(row, history) != want;
  }
  EXPECT_GT(penalised_differs, 0);  // the picks_argmax() == false cases above are real
}

TEST(Sampler, ValidationNamesTheParameter) {
  EXPECT_TRUE(validate_sampling_params(SamplingParams{}).is_ok());
  SamplingParams p;
  p.top_p = 0;
  EXPECT_NE(validate_sampling_params(p).message().find("top_p"), std::string::npos);
  p = {};
  p.temperature = -1;
  EXPECT_NE(validate_sampling_params(p).message().find("temperature"), std::string::npos);
  p = {};
  p.min_p = 1.5f;
  EXPECT_NE(validate_sampling_params(p).message().find("min_p"), std::string::npos);
  p = {};
  p.repetition_penalty = 0;
  EXPECT_NE(validate_sampling_params(p).message().find("repetition_penalty"), std::string::npos);
  p = {};
  p.top_k = -2;
  EXPECT_NE(validate_sampling_params(p).message().find("top_k"), std::string::npos);
}

// --- stop conditions --------------------------------------------------------------------------

StopConditions stops(std::vector<int32_t> eos, std::vector<std::string> strings,
                     int64_t max_new = -1, int64_t min_new = 0) {
  StopConditions c;
  c.eos_ids = std::move(eos);
  c.stop_strings = std::move(strings);
  c.max_new_tokens = max_new;
  c.min_new_tokens = min_new;
  return c;
}

TEST(StopChecker, StopsOnAnyEosId) {
  StopChecker c(stops({7, 9}, {}));
  EXPECT_EQ(c.add(1, "a"), StopReason::none);
  EXPECT_EQ(c.add(9, "<eos>"), StopReason::eos);
  EXPECT_TRUE(c.done());
  EXPECT_EQ(c.text(), "a");  // the eos token's text is not output
}

TEST(StopChecker, MinNewTokensSuppressesEos) {
  StopChecker c(stops({2, 4}, {}, -1, 2));
  std::vector<float> logits(6, 1.0f);
  c.suppress_eos(logits);
  EXPECT_EQ(logits, (std::vector<float>{1, 1, kNegInf, 1, kNegInf, 1}));
  c.add(0, "x");
  logits.assign(6, 1.0f);
  c.suppress_eos(logits);
  EXPECT_EQ(logits[2], kNegInf);
  EXPECT_TRUE(c.suppresses_eos());
  c.add(0, "y");
  EXPECT_FALSE(c.suppresses_eos());
  logits.assign(6, 1.0f);
  c.suppress_eos(logits);
  EXPECT_EQ(logits, std::vector<float>(6, 1.0f));
  // With no eos ids there is nothing to suppress.
  EXPECT_FALSE(StopChecker(stops({}, {}, -1, 2)).suppresses_eos());
}

TEST(StopChecker, MaxNewTokens) {
  StopChecker c(stops({}, {}, 3));
  EXPECT_EQ(c.add(1, "a"), StopReason::none);
  EXPECT_EQ(c.add(1, "b"), StopReason::none);
  EXPECT_FALSE(c.done());
  EXPECT_EQ(c.add(1, "c"), StopReason::max_tokens);
  EXPECT_TRUE(c.done());
  EXPECT_TRUE(StopChecker(stops({}, {}, 0)).done());
}

TEST(StopChecker, StopStringAcrossTokensIsHeldBackThenCut) {
  StopChecker c(stops({}, {"o Wo"}));
  std::string streamed;
  EXPECT_EQ(c.add(1, "Hel"), StopReason::none);
  streamed += c.take_ready_text();
  EXPECT_EQ(streamed, "Hel");
  EXPECT_EQ(c.add(2, "lo W"), StopReason::none);
  EXPECT_EQ(c.held_back_bytes(), 3u);  // "o W" may become "o Wo"
  streamed += c.take_ready_text();
  EXPECT_EQ(streamed, "Hell");
  EXPECT_EQ(c.add(3, "orld"), StopReason::stop_string);
  streamed += c.take_ready_text() + c.take_remaining_text();
  EXPECT_EQ(streamed, "Hell");
  EXPECT_EQ(c.text(), "Hell");
  EXPECT_EQ(c.add(4, "more"), StopReason::stop_string);  // stays stopped
}

TEST(StopChecker, EarliestOfSeveralStopStringsWins) {
  StopChecker c(stops({}, {"END", "\n\n", "ND!"}));
  EXPECT_EQ(c.add(1, "abc\n"), StopReason::none);
  EXPECT_EQ(c.add(2, "\nxEND!"), StopReason::stop_string);
  EXPECT_EQ(c.text(), "abc");
}

TEST(StopChecker, HeldBackTextIsReleasedWhenItCannotMatch) {
  StopChecker c(stops({}, {"STOP"}, 2));
  c.add(1, "abcST");
  EXPECT_EQ(c.take_ready_text(), "abc");
  EXPECT_EQ(c.add(2, "AR"), StopReason::max_tokens);  // "STAR" is not "STOP"
  EXPECT_EQ(c.take_ready_text() + c.take_remaining_text(), "STAR");
}

TEST(StopChecker, StopStringsCountOnlyAfterMinNewTokens) {
  StopChecker c(stops({}, {"##"}, -1, 2));
  EXPECT_EQ(c.add(1, "a##b"), StopReason::none);  // too early
  EXPECT_EQ(c.add(2, "c#"), StopReason::none);
  EXPECT_EQ(c.add(3, "#d"), StopReason::stop_string);  // spans tokens 2 and 3
  EXPECT_EQ(c.text(), "a##bc");
}

TEST(StopChecker, RandomSplitsGiveTheSameResultAsWholeText) {
  const std::string text = "The kestrel hovers; it STOPs, then dives. STOP here";
  std::mt19937 rng(3);
  for (int trial = 0; trial < 200; ++trial) {
    StopChecker c(stops({}, {"STOP", "dives."}));
    std::string streamed;
    size_t pos = 0;
    StopReason r = StopReason::none;
    while (pos < text.size() && r == StopReason::none) {
      const size_t len = 1 + rng() % 6;
      r = c.add(1, std::string_view(text).substr(pos, len));
      pos += len;
      streamed += c.take_ready_text();
    }
    streamed += c.take_remaining_text();
    EXPECT_EQ(r, StopReason::stop_string);
    EXPECT_EQ(streamed, "The kestrel hovers; it ");
  }
}

}  // namespace
}  // namespace kestrel
