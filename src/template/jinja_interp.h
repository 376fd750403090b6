// The evaluator of the chat-template interpreter and the interface its built-ins (filters, tests,
// methods, global functions) are written against.
#pragma once

#include <cstdint>
#include <ctime>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/status.h"
#include "template/jinja_ast.h"
#include "template/jinja_value.h"

namespace kestrel::jinja {

struct Limits {
  uint64_t max_iterations = 1'000'000;  // loop iterations and macro calls, whole render
  int max_recursion_depth = 200;        // nested macro calls
  size_t max_output_bytes = 16u << 20;  // rendered text, and any single string value
  uint64_t max_work_bytes = 1u << 30;   // bytes produced by string/list operations, whole render
};

// Deepest list/dict nesting a value may have (JSON input or built by the template).
constexpr int kMaxValueDepth = 128;
// What the work budget counts for each item an operation makes: a Value; a Value and its own
// text's shared block (a character of an iterated string, a part of a split); a Value holding a
// two-item tuple (a dict's items).
constexpr uint64_t kItemBytes = sizeof(Value);
// What reading an item costs (a filter's list operand, `in`): nothing is copied, so less than
// making one; Qwen3's template reads `messages|length` once a message, n^2 in all.
constexpr uint64_t kReadItemBytes = 16;
constexpr uint64_t kStringItemBytes = sizeof(Value) + sizeof(std::string) + 16;
constexpr uint64_t kPairItemBytes = sizeof(Value) + sizeof(ListData) + 2 * sizeof(Value) + 16;
// The output that nested capture buffers ({% set %} and {% filter %} blocks, macro calls) may
// hold together, in units of Limits::max_output_bytes.
constexpr uint64_t kMaxCapturedOutputs = 4;

// A variable scope: the template's top level, one iteration of a for loop, a macro call or a
// `with` block. Lookups fall back to the enclosing scope; assignments stay in this one.
class Scope {
 public:
  explicit Scope(const Scope* parent) : parent_(parent) {}
  // Defines each name as undefined in this scope (see resolve_scopes()).
  void hide(const std::vector<std::string>& names);
  const Value* find(std::string_view name) const;
  void set(const std::string& name, Value value);

 private:
  std::vector<std::pair<std::string, Value>> vars_;
  const Scope* parent_;
};

class Interpreter {
 public:
  Interpreter(const Limits& limits, std::time_t now);

  // Renders `tmpl` with the given top-level variables (which shadow the global functions).
  Result<std::string> render(const Template& tmpl,
                             std::vector<std::pair<std::string, Value>> context);

  // --- for built-ins -----------------------------------------------------------------------
  const Limits& limits() const { return limits_; }
  std::time_t now() const { return now_; }
  // Counts bytes that an operation is about to produce against the work budget.
  Status charge_work(uint64_t bytes);
  Status charge_iteration();
  // Counts what an operation reads (a string's bytes; 16 bytes a list item or dict entry) against
  // the same budget, so that an operation that produces little from much (upper, strip, ==, in,
  // find, unique) is bounded too: repeated on a 16 MB string it ran for hours uncharged.
  Status charge_read(const Value& v);
  // charge_read of a receiver or operand and of every argument of a built-in's call.
  Status charge_call(const Value& self, const CallArgs& args);
  // A built-in's result: a string within the size limit, charged as produced.
  Status check_result(const Value& v);
  // A string value about to be built of `bytes` bytes: within the limits?
  Status check_string_size(uint64_t bytes);
  // A string being built piece by piece has reached `bytes`: within the size limit? Charges no
  // work (charging each partial size would count the string quadratically); the finished string
  // goes through check_string_size once.
  Status check_growing_size(uint64_t bytes) const;
  // Refuses values nested deeper than kMaxValueDepth.
  Status check_value(const Value& v) const;

  Result<Value> call(const Value& callee, CallArgs& args);
  Result<Value> apply_filter(std::string_view name, const Value& operand, CallArgs& args);
  Result<bool> apply_test(std::string_view name, const Value& operand, CallArgs& args);
  // Jinja's sandboxed getattr: `obj.name`. Dict keys, namespace attributes and whitelisted
  // methods of str/dict/list; anything else is undefined.
  Result<Value> get_attribute(const Value& obj, const std::string& name);
  // Jinja's getitem: `obj[key]`, falling back to the attribute for string keys.
  Result<Value> get_item(const Value& obj, const Value& key);
  // Python iteration: list items, dict keys, string characters; undefined is empty.
  Result<std::vector<Value>> iterate(const Value& v);

 private:
  enum class Flow : uint8_t { normal, break_loop, continue_loop };

  Status exec_body(const Body& body, Scope& scope);
  Status exec_node(const Node& node, Scope& scope);
  Status exec_for(const Node& node, Scope& scope);
  Status exec_set(const Node& node, Scope& scope);
  Status assign_targets(const Node& node, const Value& value, Scope& scope);
  // Runs `body` in a new scope (starting `undefined` names undefined) and returns its output.
  Result<std::string> capture(const Body& body, const Scope& parent,
                              const std::vector<std::string>& undefined);
  Result<Value> apply_filter_chain(const std::vector<ExprPtr>& filters, Value value, Scope& scope);
  Result<Value> call_macro(const Node& macro, CallArgs& args);
  Status emit(std::string_view text);

  Result<Value> eval(const Expr& e, Scope& scope);
  Result<Value> eval_uncounted(const Expr& e, Scope& scope);
  [[gnu::noinline]] Result<Value> eval_sequence(const Expr& e, Scope& scope);
  [[gnu::noinline]] Result<Value> eval_dict(const Expr& e, Scope& scope);
  [[gnu::noinline]] Result<Value> eval_access(const Expr& e, Scope& scope);
  [[gnu::noinline]] Result<Value> eval_call(const Expr& e, Scope& scope);
  [[gnu::noinline]] Result<Value> eval_unary(const Expr& e, Scope& scope);
  [[gnu::noinline]] Result<Value> eval_binary(const Expr& e, Scope& scope);
  [[gnu::noinline]] Result<Value> eval_logic(const Expr& e, Scope& scope);
  [[gnu::noinline]] Result<Value> eval_compare(const Expr& e, Scope& scope);
  Status eval_args(const Expr& e, size_t first, Scope& scope, CallArgs& args);
  Result<Value> lookup(const std::string& name, const Scope& scope) const;

  Limits limits_;
  std::time_t now_;
  std::vector<std::pair<std::string, Value>> globals_;
  std::string* out_ = nullptr;
  // Bytes held in the capture buffers of the blocks and macro calls being rendered, together
  // (each alone is within max_output_bytes; 200 nested ones held 3.2 GB).
  uint64_t captured_ = 0;
  int capturing_ = 0;  // capture buffers open
  const Scope* root_ = nullptr;
  Flow flow_ = Flow::normal;
  uint64_t iterations_ = 0;
  uint64_t work_ = 0;
  int macro_depth_ = 0;
  int eval_depth_ = 0;
};

// Binds Python-style call arguments to parameter `names` (positional first, then by keyword);
// the first `required` must be given. Unknown keywords or too many arguments are errors naming
// `function`.
Result<std::vector<std::optional<Value>>> bind_args(CallArgs& args, std::string_view function,
                                                    std::initializer_list<const char*> names,
                                                    size_t required);

// Error for using an undefined value, with Jinja's message ("'x' is undefined", "'dict object'
// has no attribute 'y'").
Status undefined_error(const Value& v);

// Built-ins (jinja_builtins.cpp).
using FilterFunction = Result<Value> (*)(Interpreter&, const Value& operand, CallArgs& args);
using TestFunction = Result<bool> (*)(Interpreter&, const Value& operand, CallArgs& args);
FilterFunction find_filter(std::string_view name);
TestFunction find_test(std::string_view name);
// `receiver.name` when `name` is a method of str, dict or list: the method bound to its receiver
// (`"a b".split`), or an undefined value for methods the sandbox forbids (those that mutate).
// nullopt when the type has no such method.
std::optional<Value> bound_method(const Value& receiver, const std::string& name);
// range, dict, namespace, and transformers' raise_exception and strftime_now.
std::vector<std::pair<std::string, Value>> make_globals();

// Python slicing with None bounds (nullopt) and negative steps, on lists, tuples and strings.
Result<Value> slice_value(const Value& v, std::optional<int64_t> start, std::optional<int64_t> stop,
                          std::optional<int64_t> step);

// Python's `item in container`.
Result<bool> contains(const Value& container, const Value& item);

}  // namespace kestrel::jinja
