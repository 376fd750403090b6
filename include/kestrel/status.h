// Errors are values: library code returns Status or Result<T>; only the CLI prints and exits.
// Messages name the file, tensor or setting at fault in the library's terms (EngineOptions
// fields, not command-line flags).
#pragma once

#include <optional>
#include <string>
#include <utility>

namespace kestrel {

class [[nodiscard]] Status {
 public:
  Status() = default;
  static Status ok() { return Status(); }
  static Status error(std::string message) { return Status(std::move(message), true); }

  bool is_ok() const { return !failed_; }
  const std::string& message() const { return message_; }

  // Prefixes context ("file.safetensors: ") onto an error; ok stays ok.
  Status with_context(const std::string& context) const {
    return failed_ ? Status(context + ": " + message_, true) : *this;
  }

 private:
  Status(std::string message, bool failed) : message_(std::move(message)), failed_(failed) {}
  std::string message_;
  bool failed_ = false;
};

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}          // NOLINT: implicit by design
  Result(Status status) : status_(std::move(status)) {}  // NOLINT: implicit by design

  bool is_ok() const { return value_.has_value(); }
  const Status& status() const { return status_; }
  T& value() & { return *value_; }
  const T& value() const& { return *value_; }
  T&& value() && { return std::move(*value_); }
  T* operator->() { return &*value_; }
  const T* operator->() const { return &*value_; }
  T& operator*() { return *value_; }

 private:
  std::optional<T> value_;
  Status status_;
};

}  // namespace kestrel

#define KS_CONCAT_INNER(a, b) a##b
#define KS_CONCAT(a, b) KS_CONCAT_INNER(a, b)

// Returns the Status from the enclosing function when `expr` fails.
#define KS_RETURN_IF_ERROR(expr)                \
  do {                                          \
    ::kestrel::Status ks_status_ = (expr);      \
    if (!ks_status_.is_ok()) return ks_status_; \
  } while (0)

// `KS_ASSIGN_OR_RETURN(auto x, make_x());` unwraps a Result or returns its Status.
#define KS_ASSIGN_OR_RETURN(lhs, expr) \
  KS_ASSIGN_OR_RETURN_IMPL(KS_CONCAT(ks_result_, __LINE__), lhs, expr)
#define KS_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                             \
  if (!tmp.is_ok()) return tmp.status();         \
  lhs = std::move(tmp).value()
