#include "sample/stop.h"

#include <algorithm>
#include <limits>
#include <utility>

namespace kestrel {

const char* stop_reason_name(StopReason reason) {
  switch (reason) {
    case StopReason::none:
      return "none";
    case StopReason::eos:
      return "eos";
    case StopReason::stop_string:
      return "stop_string";
    case StopReason::max_tokens:
      return "max_tokens";
    case StopReason::interrupted:
      return "interrupted";
  }
  return "unknown";
}

StopChecker::StopChecker(StopConditions conditions) : conditions_(std::move(conditions)) {
  auto& stops = conditions_.stop_strings;
  stops.erase(std::remove(stops.begin(), stops.end(), std::string()), stops.end());
  for (const auto& s : stops) longest_stop_ = std::max(longest_stop_, s.size());
}

bool StopChecker::suppresses_eos() const {
  return generated_ < conditions_.min_new_tokens && !conditions_.eos_ids.empty();
}

void StopChecker::suppress_eos(std::span<float> logits) const {
  if (!suppresses_eos()) return;
  for (const int32_t id : conditions_.eos_ids) {
    if (id >= 0 && static_cast<size_t>(id) < logits.size()) {
      logits[id] = -std::numeric_limits<float>::infinity();
    }
  }
}

bool StopChecker::done() const {
  return reason_ != StopReason::none ||
         (conditions_.max_new_tokens >= 0 && generated_ >= conditions_.max_new_tokens);
}

StopReason StopChecker::add(int32_t token, std::string_view text) {
  if (reason_ != StopReason::none) return reason_;
  ++generated_;
  if (std::find(conditions_.eos_ids.begin(), conditions_.eos_ids.end(), token) !=
      conditions_.eos_ids.end()) {
    reason_ = StopReason::eos;
    return reason_;
  }
  text_.append(text);
  if (generated_ >= conditions_.min_new_tokens) {
    // Only matches that end in the text added since the last search are new.
    size_t earliest = std::string::npos;
    for (const auto& stop : conditions_.stop_strings) {
      const size_t start = searched_to_ >= stop.size() - 1 ? searched_to_ - (stop.size() - 1) : 0;
      const size_t at = text_.find(stop, start);
      if (at != std::string::npos) earliest = std::min(earliest, at);
    }
    if (earliest != std::string::npos) {
      text_.resize(earliest);
      streamed_ = std::min(streamed_, text_.size());
      reason_ = StopReason::stop_string;
      return reason_;
    }
  }
  searched_to_ = text_.size();
  if (conditions_.max_new_tokens >= 0 && generated_ >= conditions_.max_new_tokens) {
    reason_ = StopReason::max_tokens;
  }
  return reason_;
}

size_t StopChecker::held_back_bytes() const {
  if (reason_ != StopReason::none) return 0;
  size_t held = 0;
  for (const auto& stop : conditions_.stop_strings) {
    // The longest proper prefix of `stop` that text_ ends with.
    for (size_t k = std::min(stop.size() - 1, text_.size()); k > held; --k) {
      if (text_.compare(text_.size() - k, k, stop, 0, k) == 0) {
        held = k;
        break;
      }
    }
  }
  return held;
}

std::string StopChecker::take_ready_text() {
  const size_t end = text_.size() - held_back_bytes();
  if (end <= streamed_) return {};
  std::string out = text_.substr(streamed_, end - streamed_);
  streamed_ = end;
  return out;
}

std::string StopChecker::take_remaining_text() {
  if (streamed_ >= text_.size()) return {};
  std::string out = text_.substr(streamed_);
  streamed_ = text_.size();
  return out;
}

}  // namespace kestrel
