#include "sample/beam.h"

#include <algorithm>
#include <cmath>

namespace kestrel {
namespace {

// log(sum(exp(row))) in double, stable.
double log_sum_exp(const float* row, int64_t n) {
  float max_value = row[0];
  for (int64_t i = 1; i < n; ++i) max_value = std::max(max_value, row[i]);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(double(row[i]) - double(max_value));
  return double(max_value) + std::log(sum);
}

// Indices of the k largest values of row (ties: the lower index first), best first.
std::vector<int32_t> top_k(const float* row, int64_t n, int64_t k) {
  std::vector<int32_t> best;
  best.reserve(size_t(k) + 1);
  auto better = [&](int32_t a, int32_t b) {
    return row[a] > row[b] || (row[a] == row[b] && a < b);
  };
  for (int64_t i = 0; i < n; ++i) {
    if (int64_t(best.size()) == k && !better(int32_t(i), best.back())) continue;
    auto at = std::upper_bound(best.begin(), best.end(), int32_t(i), better);
    best.insert(at, int32_t(i));
    if (int64_t(best.size()) > k) best.pop_back();
  }
  return best;
}

}  // namespace

Status advance_beams(std::vector<Beam>& live, const float* rows, int64_t vocab, int64_t n_beams,
                     int32_t first_slot, const CopySlot& copy_slot) {
  struct Candidate {
    double score;
    int32_t parent;
    int32_t token;
  };
  std::vector<Candidate> candidates;
  for (size_t p = 0; p < live.size(); ++p) {
    const float* row = rows + int64_t(p) * vocab;
    const double lse = log_sum_exp(row, vocab);
    for (int32_t token : top_k(row, vocab, n_beams)) {
      candidates.push_back({live[p].score + double(row[token]) - lse, int32_t(p), token});
    }
  }
  std::sort(candidates.begin(), candidates.end(), [](const Candidate& a, const Candidate& b) {
    if (a.score != b.score) return a.score > b.score;
    if (a.parent != b.parent) return a.parent < b.parent;
    return a.token < b.token;
  });
  candidates.resize(size_t(std::min<int64_t>(n_beams, int64_t(candidates.size()))));

  std::vector<bool> has_child(live.size(), false);
  for (const Candidate& c : candidates) has_child[size_t(c.parent)] = true;
  std::vector<bool> slot_kept(size_t(n_beams), false);
  for (size_t p = 0; p < live.size(); ++p) {
    if (has_child[p]) slot_kept[size_t(live[p].slot - first_slot)] = true;
  }
  std::vector<int32_t> free_slots;
  for (int64_t i = n_beams - 1; i >= 0; --i) {
    if (!slot_kept[size_t(i)]) free_slots.push_back(first_slot + int32_t(i));
  }
  std::vector<bool> slot_taken(live.size(), false);
  std::vector<Beam> next;
  next.reserve(candidates.size());
  for (const Candidate& c : candidates) {
    const Beam& parent = live[size_t(c.parent)];
    Beam beam;
    if (!slot_taken[size_t(c.parent)]) {
      slot_taken[size_t(c.parent)] = true;
      beam.slot = parent.slot;
    } else {
      beam.slot = free_slots.back();
      free_slots.pop_back();
      KS_RETURN_IF_ERROR(copy_slot(parent.slot, beam.slot));
    }
    beam.score = c.score;
    beam.tokens = parent.tokens;
    beam.tokens.push_back(c.token);
    next.push_back(std::move(beam));
  }
  live = std::move(next);
  return Status::ok();
}

}  // namespace kestrel
