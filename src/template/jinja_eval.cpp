// Evaluator of the chat-template interpreter: statements, expressions, Python arithmetic and
// comparison semantics, scoping (a for-loop iteration, macro call or `with` block is a new scope;
// `if` is not), and the sandbox limits.
#include <algorithm>
#include <climits>
#include <cmath>
#include <string>
#include <vector>

#include "template/jinja_interp.h"
#include "template/jinja_search.h"

namespace kestrel::jinja {
namespace {

// Nested evaluation frames (expressions, statements, macro calls) allowed at once. Each frame is
// small (the per-kind work lives in separate functions), so this stays far below any thread's
// stack size while leaving room for max_recursion_depth macro calls of ordinary templates.
constexpr int kMaxEvalDepth = 2000;

Status located(const Status& s, int line) {
  if (s.is_ok() || s.message().rfind("line ", 0) == 0) return s;
  return Status::error("line " + std::to_string(line) + ": " + s.message());
}

template <typename T>
Result<T> located(Result<T> r, int line) {
  if (r.is_ok()) return r;
  return located(r.status(), line);
}

std::string op_symbol(Op op) {
  switch (op) {
    case Op::add:
      return "+";
    case Op::sub:
      return "-";
    case Op::mul:
      return "*";
    case Op::div:
      return "/";
    case Op::floordiv:
      return "//";
    case Op::mod:
      return "%";
    case Op::pow:
      return "**";
    case Op::concat:
      return "~";
    case Op::eq:
      return "==";
    case Op::ne:
      return "!=";
    case Op::lt:
      return "<";
    case Op::le:
      return "<=";
    case Op::gt:
      return ">";
    case Op::ge:
      return ">=";
    case Op::in:
      return "in";
    case Op::not_in:
      return "not in";
    default:
      return "?";
  }
}

Status unsupported_operands(Op op, const Value& a, const Value& b) {
  return Status::error("unsupported operand type(s) for " + op_symbol(op) + ": '" + type_name(a) +
                       "' and '" + type_name(b) + "'");
}

Status int_overflow() {
  return Status::error("integer overflow (values beyond 64 bits are not supported)");
}

int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

int64_t floor_mod(int64_t a, int64_t b) {
  int64_t m = a % b;
  if (m != 0 && ((m < 0) != (b < 0))) m += b;
  return m;
}

// Python's float divmod.
void float_divmod(double vx, double wx, double* floordiv, double* mod) {
  double m = std::fmod(vx, wx);
  double div = (vx - m) / wx;
  if (m != 0.0) {
    if ((wx < 0) != (m < 0)) {
      m += wx;
      div -= 1.0;
    }
  } else {
    m = std::copysign(0.0, wx);
  }
  double fd;
  if (div != 0.0) {
    fd = std::floor(div);
    if (div - fd > 0.5) fd += 1.0;
  } else {
    fd = std::copysign(0.0, vx / wx);
  }
  *floordiv = fd;
  *mod = m;
}

Result<Value> repeat_sequence(Interpreter& in, const Value& seq, int64_t times) {
  if (seq.is_string()) {
    const std::string& s = seq.as_string();
    if (times <= 0 || s.empty()) return Value::string("");
    const uint64_t bytes = static_cast<uint64_t>(times) > (UINT64_MAX / s.size())
                               ? UINT64_MAX
                               : static_cast<uint64_t>(times) * s.size();
    KS_RETURN_IF_ERROR(in.check_string_size(bytes));
    std::string out;
    out.reserve(bytes);
    for (int64_t i = 0; i < times; ++i) out += s;
    return Value::string(std::move(out));
  }
  const ListData& l = seq.as_list();
  if (times <= 0 || l.items.empty()) return Value::list({}, l.is_tuple);
  if (static_cast<uint64_t>(times) > in.limits().max_output_bytes / l.items.size()) {
    return Status::error("list repetition of " + std::to_string(times) + " is too large");
  }
  KS_RETURN_IF_ERROR(in.charge_work(static_cast<uint64_t>(times) * l.items.size() * kItemBytes));
  std::vector<Value> out;
  out.reserve(static_cast<size_t>(times) * l.items.size());
  for (int64_t i = 0; i < times; ++i) out.insert(out.end(), l.items.begin(), l.items.end());
  return Value::list(std::move(out), l.is_tuple);
}

[[gnu::noinline]] Result<Value> binary_op(Interpreter& in, Op op, const Value& a, const Value& b) {
  if (op == Op::concat) {
    // `~` converts both sides with str(), undefined included.
    std::string s = a.is_string() ? a.as_string() : to_str(a);
    const std::string t = b.is_string() ? b.as_string() : to_str(b);
    KS_RETURN_IF_ERROR(in.check_string_size(s.size() + t.size()));
    s += t;
    return Value::string(std::move(s));
  }
  if (a.is_undefined()) return undefined_error(a);
  if (b.is_undefined()) return undefined_error(b);
  const bool ints = a.is_integral() && b.is_integral();
  const bool nums = a.is_number() && b.is_number();
  switch (op) {
    case Op::add:
      if (ints) {
        int64_t r;
        if (__builtin_add_overflow(a.as_integral(), b.as_integral(), &r)) return int_overflow();
        return Value::integer(r);
      }
      if (nums) return Value::floating(a.as_number() + b.as_number());
      if (a.is_string() && b.is_string()) {
        const uint64_t bytes = a.as_string().size() + b.as_string().size();
        KS_RETURN_IF_ERROR(in.check_string_size(bytes));
        std::string s;
        s.reserve(bytes);
        s += a.as_string();
        s += b.as_string();
        return Value::string(std::move(s));
      }
      if (a.is_sequence_list() && b.is_sequence_list() &&
          a.as_list().is_tuple == b.as_list().is_tuple) {
        KS_RETURN_IF_ERROR(
            in.charge_work((a.as_list().items.size() + b.as_list().items.size()) * kItemBytes));
        std::vector<Value> items = a.as_list().items;
        items.insert(items.end(), b.as_list().items.begin(), b.as_list().items.end());
        return Value::list(std::move(items), a.as_list().is_tuple);
      }
      if (a.is_string()) {
        return Status::error("can only concatenate str (not \"" + type_name(b) + "\") to str");
      }
      return unsupported_operands(op, a, b);
    case Op::sub:
      if (ints) {
        int64_t r;
        if (__builtin_sub_overflow(a.as_integral(), b.as_integral(), &r)) return int_overflow();
        return Value::integer(r);
      }
      if (nums) return Value::floating(a.as_number() - b.as_number());
      return unsupported_operands(op, a, b);
    case Op::mul:
      if (ints) {
        int64_t r;
        if (__builtin_mul_overflow(a.as_integral(), b.as_integral(), &r)) return int_overflow();
        return Value::integer(r);
      }
      if (nums) return Value::floating(a.as_number() * b.as_number());
      if ((a.is_string() || a.is_sequence_list()) && b.is_integral()) {
        return repeat_sequence(in, a, b.as_integral());
      }
      if (a.is_integral() && (b.is_string() || b.is_sequence_list())) {
        return repeat_sequence(in, b, a.as_integral());
      }
      return unsupported_operands(op, a, b);
    case Op::div:
      if (!nums) return unsupported_operands(op, a, b);
      if (b.as_number() == 0.0) return Status::error("division by zero");
      if (ints) {
        // Python divides ints exactly before rounding to float; doubles do the same for the
        // values below 2^53 that templates use.
        return Value::floating(static_cast<double>(a.as_integral()) /
                               static_cast<double>(b.as_integral()));
      }
      return Value::floating(a.as_number() / b.as_number());
    case Op::floordiv:
    case Op::mod:
      if (a.is_string() && op == Op::mod) {
        return Status::error("printf-style string formatting with '%' is not supported");
      }
      if (!nums) return unsupported_operands(op, a, b);
      if (ints) {
        const int64_t x = a.as_integral(), y = b.as_integral();
        if (y == 0) return Status::error("integer division or modulo by zero");
        if (x == INT64_MIN && y == -1) {
          if (op == Op::mod) return Value::integer(0);
          return int_overflow();
        }
        return Value::integer(op == Op::floordiv ? floor_div(x, y) : floor_mod(x, y));
      } else {
        if (b.as_number() == 0.0) return Status::error("float division or modulo by zero");
        double fd, m;
        float_divmod(a.as_number(), b.as_number(), &fd, &m);
        return Value::floating(op == Op::floordiv ? fd : m);
      }
    case Op::pow: {
      if (!nums) return unsupported_operands(op, a, b);
      if (ints && b.as_integral() >= 0) {
        int64_t base = a.as_integral(), exp = b.as_integral(), result = 1;
        while (exp > 0) {
          if (exp & 1) {
            if (__builtin_mul_overflow(result, base, &result)) return int_overflow();
          }
          exp >>= 1;
          if (exp > 0 && __builtin_mul_overflow(base, base, &base)) return int_overflow();
        }
        return Value::integer(result);
      }
      const double x = a.as_number(), y = b.as_number();
      if (x == 0.0 && y < 0) return Status::error("0.0 cannot be raised to a negative power");
      if (x < 0 && y != std::trunc(y)) {
        return Status::error("a negative number to a fractional power is complex (unsupported)");
      }
      return Value::floating(std::pow(x, y));
    }
    default:
      return Status::error("internal error: unknown binary operator");
  }
}

Value make_loop_object(size_t i, size_t n, const std::vector<Value>& items) {
  const int64_t index0 = static_cast<int64_t>(i);
  const int64_t length = static_cast<int64_t>(n);
  std::vector<std::pair<Value, Value>> e;
  e.reserve(12);
  e.emplace_back(Value::string("index0"), Value::integer(index0));
  e.emplace_back(Value::string("index"), Value::integer(index0 + 1));
  e.emplace_back(Value::string("revindex0"), Value::integer(length - index0 - 1));
  e.emplace_back(Value::string("revindex"), Value::integer(length - index0));
  e.emplace_back(Value::string("first"), Value::boolean(i == 0));
  e.emplace_back(Value::string("last"), Value::boolean(i + 1 == n));
  e.emplace_back(Value::string("length"), Value::integer(length));
  e.emplace_back(Value::string("depth"), Value::integer(1));
  e.emplace_back(Value::string("depth0"), Value::integer(0));
  if (i > 0) e.emplace_back(Value::string("previtem"), items[i - 1]);
  if (i + 1 < n) e.emplace_back(Value::string("nextitem"), items[i + 1]);
  e.emplace_back(
      Value::string("cycle"),
      Value::callable("loop.cycle", [index0](Interpreter&, CallArgs& args) -> Result<Value> {
        if (!args.keyword.empty()) {
          return Status::error("loop.cycle() takes no keyword arguments");
        }
        if (args.positional.empty()) {
          return Status::error("loop.cycle(): no items for cycling given");
        }
        return args.positional[static_cast<size_t>(index0) % args.positional.size()];
      }));
  return Value::dict(std::move(e));
}

}  // namespace

Status undefined_error(const Value& v) {
  const std::string& hint = v.is_undefined() ? v.undefined_hint() : std::string();
  return Status::error(hint.empty() ? "undefined value used" : hint);
}

const Value* Scope::find(std::string_view name) const {
  for (const Scope* s = this; s; s = s->parent_) {
    for (const auto& [k, v] : s->vars_) {
      if (k == name) return &v;
    }
  }
  return nullptr;
}

void Scope::hide(const std::vector<std::string>& names) {
  for (const auto& name : names) set(name, Value::undefined("'" + name + "' is undefined"));
}

void Scope::set(const std::string& name, Value value) {
  for (auto& [k, v] : vars_) {
    if (k == name) {
      v = std::move(value);
      return;
    }
  }
  vars_.emplace_back(name, std::move(value));
}

Result<std::vector<std::optional<Value>>> bind_args(CallArgs& args, std::string_view function,
                                                    std::initializer_list<const char*> names,
                                                    size_t required) {
  std::vector<std::optional<Value>> bound(names.size());
  if (args.positional.size() > names.size()) {
    return Status::error(std::string(function) + "() takes at most " +
                         std::to_string(names.size()) + " argument(s), got " +
                         std::to_string(args.positional.size()));
  }
  for (size_t i = 0; i < args.positional.size(); ++i) bound[i] = std::move(args.positional[i]);
  for (auto& [key, value] : args.keyword) {
    size_t idx = 0;
    bool found = false;
    for (const char* n : names) {
      if (key == n) {
        found = true;
        break;
      }
      ++idx;
    }
    if (!found) {
      return Status::error(std::string(function) + "() got an unexpected keyword argument '" + key +
                           "'");
    }
    if (bound[idx]) {
      return Status::error(std::string(function) + "() got multiple values for argument '" + key +
                           "'");
    }
    bound[idx] = std::move(value);
  }
  size_t idx = 0;
  for (const char* n : names) {
    if (idx < required && !bound[idx]) {
      return Status::error(std::string(function) + "() missing required argument '" + n + "'");
    }
    ++idx;
  }
  return bound;
}

Result<Value> slice_value(const Value& v, std::optional<int64_t> start_opt,
                          std::optional<int64_t> stop_opt, std::optional<int64_t> step_opt) {
  if (v.is_undefined()) return undefined_error(v);
  // Jinja compiles a slice to a plain Python subscript (no sandbox getitem that would turn
  // failures into undefined), so slicing anything but a sequence is an error.
  if (v.is_dict()) return Status::error("unhashable type: 'slice'");
  if (!v.is_sequence_list() && !v.is_string()) {
    return Status::error("'" + type_name(v) + "' object is not subscriptable");
  }
  const int64_t step = step_opt.value_or(1);
  if (step == 0) return Status::error("slice step cannot be zero");
  const bool ascii = v.is_string() && is_ascii(v.as_string());
  std::u32string cps;
  if (v.is_string() && !ascii) cps = decode_utf8(v.as_string());
  const int64_t length = v.is_list() ? static_cast<int64_t>(v.as_list().items.size())
                         : ascii     ? static_cast<int64_t>(v.as_string().size())
                                     : static_cast<int64_t>(cps.size());
  constexpr int64_t kBig = int64_t{1} << 62;
  auto adjust = [&](std::optional<int64_t> bound, bool is_start) {
    int64_t x;
    if (!bound) {
      x = is_start ? (step < 0 ? length - 1 : 0) : (step < 0 ? -1 : length);
      return x;
    }
    x = std::clamp(*bound, -kBig, kBig);
    if (x < 0) {
      x += length;
      if (x < 0) x = step < 0 ? -1 : 0;
    } else if (x >= length) {
      x = step < 0 ? length - 1 : length;
    }
    return x;
  };
  const int64_t start = adjust(start_opt, true);
  const int64_t stop = adjust(stop_opt, false);
  std::vector<int64_t> picks;
  if (step > 0) {
    for (int64_t i = start; i < stop; i += step) picks.push_back(i);
  } else {
    for (int64_t i = start; i > stop; i += step) picks.push_back(i);
  }
  if (v.is_list()) {
    const ListData& l = v.as_list();
    std::vector<Value> out;
    out.reserve(picks.size());
    for (int64_t i : picks) out.push_back(l.items[static_cast<size_t>(i)]);
    return Value::list(std::move(out), l.is_tuple);
  }
  std::string out;
  if (ascii) {
    out.reserve(picks.size());
    for (int64_t i : picks) out.push_back(v.as_string()[static_cast<size_t>(i)]);
  } else {
    for (int64_t i : picks) append_utf8(out, cps[static_cast<size_t>(i)]);
  }
  return Value::string(std::move(out));
}

Result<bool> contains(const Value& container, const Value& item) {
  switch (container.kind()) {
    case Value::Kind::string:
      if (!item.is_string()) {
        return Status::error("'in <string>' requires string as left operand, not " +
                             type_name(item));
      }
      return Searcher<char>(item.as_string()).find(container.as_string()) != std::string::npos;
    case Value::Kind::list: {
      const ListData& l = container.as_list();
      if (l.view == ListView::generator) {
        if (l.deferred_error) return Status::error(*l.deferred_error);
        if (l.consumed) return false;
        l.consumed = true;
      }
      for (const Value& v : l.items) {
        if (equals(v, item)) return true;
      }
      return false;
    }
    case Value::Kind::dict:
      if (item.is_list() || item.is_dict()) {
        return Status::error("unhashable type: '" + type_name(item) + "'");
      }
      return container.as_dict().find(item) != nullptr;
    case Value::Kind::undefined:
      return false;
    default:
      return Status::error("argument of type '" + type_name(container) + "' is not iterable");
  }
}

Interpreter::Interpreter(const Limits& limits, std::time_t now)
    : limits_(limits), now_(now), globals_(make_globals()) {}

Status Interpreter::charge_work(uint64_t bytes) {
  work_ += bytes;
  if (work_ > limits_.max_work_bytes) {
    return Status::error("template exceeded its work limit (" +
                         std::to_string(limits_.max_work_bytes) +
                         " bytes read and produced by string and list operations)");
  }
  return Status::ok();
}

Status Interpreter::charge_read(const Value& v) {
  if (v.is_string()) return charge_work(v.as_string().size());
  if (v.is_list()) return charge_work(kReadItemBytes * v.as_list().items.size());
  if (v.is_dict()) return charge_work(kReadItemBytes * v.as_dict().entries.size());
  return Status::ok();
}

Status Interpreter::charge_call(const Value& self, const CallArgs& args) {
  KS_RETURN_IF_ERROR(charge_read(self));
  for (const Value& v : args.positional) KS_RETURN_IF_ERROR(charge_read(v));
  for (const auto& [name, v] : args.keyword) KS_RETURN_IF_ERROR(charge_read(v));
  return Status::ok();
}

Status Interpreter::check_result(const Value& v) {
  return v.is_string() ? check_string_size(v.as_string().size()) : Status::ok();
}

Status Interpreter::charge_iteration() {
  if (++iterations_ > limits_.max_iterations) {
    return Status::error("template exceeded its limit of " +
                         std::to_string(limits_.max_iterations) +
                         " loop iterations and macro calls");
  }
  return Status::ok();
}

Status Interpreter::check_growing_size(uint64_t bytes) const {
  if (bytes > limits_.max_output_bytes) {
    return Status::error("a string of " + std::to_string(bytes) + " bytes exceeds the limit of " +
                         std::to_string(limits_.max_output_bytes) + " bytes");
  }
  return Status::ok();
}

Status Interpreter::check_string_size(uint64_t bytes) {
  KS_RETURN_IF_ERROR(check_growing_size(bytes));
  return charge_work(bytes);
}

Status Interpreter::check_value(const Value& v) const {
  if (v.depth() > kMaxValueDepth) {
    return Status::error("value nests deeper than " + std::to_string(kMaxValueDepth) + " levels");
  }
  return Status::ok();
}

Status Interpreter::emit(std::string_view text) {
  if (out_->size() + text.size() > limits_.max_output_bytes) {
    return Status::error("rendered output exceeds the limit of " +
                         std::to_string(limits_.max_output_bytes) + " bytes");
  }
  KS_RETURN_IF_ERROR(charge_work(text.size()));
  if (capturing_ > 0) {
    captured_ += text.size();
    const uint64_t limit = kMaxCapturedOutputs * limits_.max_output_bytes;
    if (captured_ > limit) {
      return Status::error("the blocks and macro calls being rendered hold more than " +
                           std::to_string(limit) + " bytes of output together");
    }
  }
  out_->append(text);
  return Status::ok();
}

Result<std::string> Interpreter::render(const Template& tmpl,
                                        std::vector<std::pair<std::string, Value>> context) {
  Scope root(nullptr);
  for (auto& [name, value] : context) {
    KS_RETURN_IF_ERROR(check_value(value).with_context("variable '" + name + "'"));
    root.set(name, std::move(value));
  }
  root.hide(tmpl.root_undefined);
  std::string out;
  out_ = &out;
  root_ = &root;
  flow_ = Flow::normal;
  iterations_ = 0;
  work_ = 0;
  macro_depth_ = 0;
  eval_depth_ = 0;
  const Status s = exec_body(tmpl.body, root);
  out_ = nullptr;
  root_ = nullptr;
  if (!s.is_ok()) return s;
  return out;
}

Result<Value> Interpreter::lookup(const std::string& name, const Scope& scope) const {
  if (const Value* v = scope.find(name)) return *v;
  for (const auto& [k, v] : globals_) {
    if (k == name) return v;
  }
  return Value::undefined("'" + name + "' is undefined");
}

Result<std::vector<Value>> Interpreter::iterate(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::list: {
      const ListData& l = v.as_list();
      if (l.view == ListView::generator) {
        if (l.deferred_error) return Status::error(*l.deferred_error);
        if (l.consumed) return std::vector<Value>{};
        l.consumed = true;
      }
      // The copy is the items' Values, not their text (strings are shared), but a loop inside
      // a loop copies its list once an outer iteration.
      KS_RETURN_IF_ERROR(charge_work(kItemBytes * l.items.size()));
      return l.items;
    }
    case Value::Kind::dict: {
      KS_RETURN_IF_ERROR(charge_work(kItemBytes * v.as_dict().entries.size()));
      std::vector<Value> keys;
      keys.reserve(v.as_dict().entries.size());
      for (const auto& [k, val] : v.as_dict().entries) keys.push_back(k);
      return keys;
    }
    case Value::Kind::string: {
      KS_RETURN_IF_ERROR(charge_work(v.as_string().size() * kStringItemBytes));
      std::vector<Value> chars;
      for (char32_t c : decode_utf8(v.as_string())) {
        std::string s;
        append_utf8(s, c);
        chars.push_back(Value::string(std::move(s)));
      }
      return chars;
    }
    case Value::Kind::undefined:
      return std::vector<Value>{};
    default:
      return Status::error("'" + type_name(v) + "' object is not iterable");
  }
}

Result<Value> Interpreter::get_attribute(const Value& obj, const std::string& name) {
  switch (obj.kind()) {
    case Value::Kind::undefined:
      return undefined_error(obj);
    case Value::Kind::dict: {
      if (auto m = bound_method(obj, name)) return *m;
      if (const Value* v = obj.as_dict().find(name)) return *v;
      return Value::undefined("'dict object' has no attribute '" + name + "'");
    }
    case Value::Kind::ns: {
      if (const Value* v = obj.as_namespace().find(name)) return *v;
      return Value::undefined("'Namespace object' has no attribute '" + name + "'");
    }
    case Value::Kind::string:
    case Value::Kind::list:
      if (auto m = bound_method(obj, name)) return *m;
      return Value::undefined("'" + type_name(obj) + " object' has no attribute '" + name + "'");
    case Value::Kind::none:
      return Value::undefined("'None' has no attribute '" + name + "'");
    default:
      return Value::undefined("'" + type_name(obj) + " object' has no attribute '" + name + "'");
  }
}

Result<Value> Interpreter::get_item(const Value& obj, const Value& key) {
  switch (obj.kind()) {
    case Value::Kind::undefined:
      return undefined_error(obj);
    case Value::Kind::dict: {
      if (const Value* v = obj.as_dict().find(key)) return *v;
      if (key.is_string()) {
        if (auto m = bound_method(obj, key.as_string())) return *m;
        return Value::undefined("'dict object' has no attribute '" + key.as_string() + "'");
      }
      return Value::undefined("'dict object' has no element " + repr(key));
    }
    case Value::Kind::list:
    case Value::Kind::string: {
      if (obj.is_list() && !obj.is_sequence_list()) {
        return Value::undefined("'" + type_name(obj) + "' object is not subscriptable");
      }
      if (key.is_integral()) {
        int64_t i = key.as_integral();
        if (obj.is_list()) {
          const auto& items = obj.as_list().items;
          const int64_t n = static_cast<int64_t>(items.size());
          if (i < 0) i += n;
          if (i >= 0 && i < n) return items[static_cast<size_t>(i)];
        } else {
          const std::string& s = obj.as_string();
          KS_RETURN_IF_ERROR(charge_read(obj));  // the scan for ASCII, or the decoding
          if (is_ascii(s)) {
            const int64_t n = static_cast<int64_t>(s.size());
            if (i < 0) i += n;
            if (i >= 0 && i < n) return Value::string(std::string(1, s[static_cast<size_t>(i)]));
          } else {
            const std::u32string cps = decode_utf8(s);
            const int64_t n = static_cast<int64_t>(cps.size());
            if (i < 0) i += n;
            if (i >= 0 && i < n) {
              std::string c;
              append_utf8(c, cps[static_cast<size_t>(i)]);
              return Value::string(std::move(c));
            }
          }
        }
        return Value::undefined("'" + type_name(obj) + " object' has no element " +
                                std::to_string(key.as_integral()));
      }
      if (key.is_string()) return get_attribute(obj, key.as_string());
      return Value::undefined("'" + type_name(obj) + " object' has no element " + repr(key));
    }
    case Value::Kind::ns:
      if (key.is_string()) return get_attribute(obj, key.as_string());
      return Value::undefined("'Namespace object' has no element " + repr(key));
    default:
      return Value::undefined("'" + type_name(obj) + " object' has no element " + repr(key));
  }
}

Result<Value> Interpreter::call(const Value& callee, CallArgs& args) {
  if (callee.is_undefined()) return undefined_error(callee);
  if (!callee.is_callable()) {
    return Status::error("'" + type_name(callee) + "' object is not callable");
  }
  return callee.as_callable().function(*this, args);
}

Result<Value> Interpreter::apply_filter(std::string_view name, const Value& operand,
                                        CallArgs& args) {
  FilterFunction f = find_filter(name);
  if (!f) return Status::error("unknown filter '" + std::string(name) + "'");
  KS_RETURN_IF_ERROR(charge_call(operand, args));
  Result<Value> r = f(*this, operand, args);
  if (!r.is_ok()) {
    static const char* kGeneratorFilters[] = {"items",      "map",        "select", "reject",
                                              "selectattr", "rejectattr", "unique", "batch"};
    for (const char* g : kGeneratorFilters) {
      if (name == g) return Value::failed_generator(r.status().message());
    }
    return r.status();
  }
  Value v = std::move(r).value();
  KS_RETURN_IF_ERROR(check_value(v));
  KS_RETURN_IF_ERROR(check_result(v));
  return v;
}

Result<bool> Interpreter::apply_test(std::string_view name, const Value& operand, CallArgs& args) {
  TestFunction t = find_test(name);
  if (!t) return Status::error("unknown test '" + std::string(name) + "'");
  return t(*this, operand, args);
}

// ---- statements ----------------------------------------------------------------------------

Status Interpreter::exec_body(const Body& body, Scope& scope) {
  for (const NodePtr& node : body) {
    KS_RETURN_IF_ERROR(exec_node(*node, scope));
    if (flow_ != Flow::normal) return Status::ok();
  }
  return Status::ok();
}

Result<std::string> Interpreter::capture(const Body& body, const Scope& parent,
                                         const std::vector<std::string>& undefined) {
  Scope scope(&parent);
  scope.hide(undefined);
  std::string buffer;
  std::string* saved = out_;
  out_ = &buffer;
  ++capturing_;
  const Status s = exec_body(body, scope);
  --capturing_;
  captured_ -= buffer.size();
  out_ = saved;
  if (!s.is_ok()) return s;
  return buffer;
}

Result<Value> Interpreter::apply_filter_chain(const std::vector<ExprPtr>& filters, Value value,
                                              Scope& scope) {
  for (const ExprPtr& f : filters) {
    CallArgs args;
    KS_RETURN_IF_ERROR(eval_args(*f, 1, scope, args));
    KS_ASSIGN_OR_RETURN(value, located(apply_filter(f->name, value, args), f->line));
  }
  return value;
}

Status Interpreter::exec_node(const Node& node, Scope& scope) {
  if (eval_depth_ >= kMaxEvalDepth) {
    return located(Status::error("template nests too deeply"), node.line);
  }
  ++eval_depth_;
  struct Leave {
    int& depth;
    ~Leave() { --depth; }
  } leave{eval_depth_};
  switch (node.kind) {
    case NodeKind::text:
      return located(emit(node.text), node.line);
    case NodeKind::output: {
      KS_ASSIGN_OR_RETURN(Value v, eval(*node.expr, scope));
      if (v.is_string()) return located(emit(v.as_string()), node.line);
      return located(emit(to_str(v)), node.line);
    }
    case NodeKind::if_block:
      for (const Branch& b : node.branches) {
        KS_ASSIGN_OR_RETURN(Value cond, eval(*b.condition, scope));
        if (truthy(cond)) return exec_body(b.body, scope);
      }
      return exec_body(node.else_body, scope);
    case NodeKind::for_loop:
      return exec_for(node, scope);
    case NodeKind::set:
      return exec_set(node, scope);
    case NodeKind::set_block: {
      KS_ASSIGN_OR_RETURN(std::string text, capture(node.body, scope, node.frame_undefined));
      KS_ASSIGN_OR_RETURN(Value v,
                          apply_filter_chain(node.filters, Value::string(std::move(text)), scope));
      scope.set(node.targets[0], std::move(v));
      return Status::ok();
    }
    case NodeKind::macro: {
      const Node* macro = &node;
      scope.set(node.name, Value::callable(
                               node.name,
                               [macro](Interpreter& in, CallArgs& args) {
                                 return in.call_macro(*macro, args);
                               },
                               "<Macro '" + node.name + "'>"));
      return Status::ok();
    }
    case NodeKind::break_loop:
      flow_ = Flow::break_loop;
      return Status::ok();
    case NodeKind::continue_loop:
      flow_ = Flow::continue_loop;
      return Status::ok();
    case NodeKind::filter_block: {
      KS_ASSIGN_OR_RETURN(std::string text, capture(node.body, scope, node.frame_undefined));
      KS_ASSIGN_OR_RETURN(Value v,
                          apply_filter_chain(node.filters, Value::string(std::move(text)), scope));
      return located(emit(to_str(v)), node.line);
    }
    case NodeKind::with_block: {
      std::vector<Value> values;
      for (const Param& p : node.params) {
        KS_ASSIGN_OR_RETURN(Value v, eval(*p.value, scope));
        values.push_back(std::move(v));
      }
      Scope inner(&scope);
      inner.hide(node.frame_undefined);
      for (size_t i = 0; i < node.params.size(); ++i) inner.set(node.params[i].name, values[i]);
      return exec_body(node.body, inner);
    }
    case NodeKind::generation: {
      // transformers implements {% generation %} as a call block, whose body is a scope.
      Scope inner(&scope);
      inner.hide(node.frame_undefined);
      return exec_body(node.body, inner);
    }
  }
  return Status::ok();
}

Status Interpreter::assign_targets(const Node& node, const Value& value, Scope& scope) {
  if (!node.unpack) {
    scope.set(node.targets[0], value);
    return Status::ok();
  }
  KS_ASSIGN_OR_RETURN(std::vector<Value> parts, located(iterate(value), node.line));
  if (parts.size() != node.targets.size()) {
    return located(
        Status::error("cannot unpack " + std::to_string(parts.size()) + " value(s) into " +
                      std::to_string(node.targets.size()) + " names"),
        node.line);
  }
  for (size_t i = 0; i < parts.size(); ++i) scope.set(node.targets[i], std::move(parts[i]));
  return Status::ok();
}

Status Interpreter::exec_for(const Node& node, Scope& scope) {
  KS_ASSIGN_OR_RETURN(Value iterable, eval(*node.expr, scope));
  KS_ASSIGN_OR_RETURN(std::vector<Value> items, located(iterate(iterable), node.line));
  if (node.condition) {
    std::vector<Value> kept;
    for (Value& item : items) {
      KS_RETURN_IF_ERROR(located(charge_iteration(), node.line));
      Scope probe(&scope);
      KS_RETURN_IF_ERROR(assign_targets(node, item, probe));
      KS_ASSIGN_OR_RETURN(Value keep, eval(*node.condition, probe));
      if (truthy(keep)) kept.push_back(std::move(item));
    }
    items = std::move(kept);
  }
  if (items.empty()) {
    Scope inner(&scope);
    inner.hide(node.else_undefined);
    return exec_body(node.else_body, inner);
  }
  const size_t n = items.size();
  for (size_t i = 0; i < n; ++i) {
    KS_RETURN_IF_ERROR(located(charge_iteration(), node.line));
    Scope inner(&scope);
    inner.hide(node.frame_undefined);
    KS_RETURN_IF_ERROR(assign_targets(node, items[i], inner));
    if (node.uses_loop) inner.set("loop", make_loop_object(i, n, items));
    KS_RETURN_IF_ERROR(exec_body(node.body, inner));
    if (flow_ == Flow::break_loop) {
      flow_ = Flow::normal;
      break;
    }
    flow_ = Flow::normal;
  }
  return Status::ok();
}

Status Interpreter::exec_set(const Node& node, Scope& scope) {
  KS_ASSIGN_OR_RETURN(Value value, eval(*node.expr, scope));
  if (node.attribute.empty()) return assign_targets(node, value, scope);
  const Value* target = scope.find(node.targets[0]);
  if (!target || !target->is_namespace()) {
    return located(Status::error("cannot assign attribute '" + node.attribute + "' on '" +
                                 node.targets[0] + "', which is not a namespace()"),
                   node.line);
  }
  if (value.holds_reference()) {
    return located(Status::error("a namespace attribute cannot hold a namespace, function or "
                                 "loop object"),
                   node.line);
  }
  target->as_namespace().set(node.attribute, std::move(value));
  return located(check_value(*target), node.line);
}

Result<Value> Interpreter::call_macro(const Node& macro, CallArgs& args) {
  KS_RETURN_IF_ERROR(charge_iteration());
  if (macro_depth_ >= limits_.max_recursion_depth) {
    return Status::error("macro calls nest deeper than the limit of " +
                         std::to_string(limits_.max_recursion_depth));
  }
  if (args.positional.size() > macro.params.size()) {
    return Status::error("macro '" + macro.name + "' takes at most " +
                         std::to_string(macro.params.size()) + " argument(s)");
  }
  for (const auto& [key, value] : args.keyword) {
    bool known = false;
    for (const Param& p : macro.params) known = known || p.name == key;
    if (!known) {
      return Status::error("macro '" + macro.name + "' has no parameter named '" + key + "'");
    }
  }
  Scope local(root_);
  local.hide(macro.frame_undefined);
  for (size_t i = 0; i < macro.params.size(); ++i) {
    const Param& p = macro.params[i];
    std::optional<Value> v;
    if (i < args.positional.size()) v = args.positional[i];
    for (auto& [key, value] : args.keyword) {
      if (key == p.name) {
        if (v)
          return Status::error("macro '" + macro.name + "' got multiple values for '" + key + "'");
        v = value;
      }
    }
    if (!v && p.value) {
      KS_ASSIGN_OR_RETURN(Value d, eval(*p.value, local));
      v = std::move(d);
    }
    local.set(p.name,
              v ? std::move(*v) : Value::undefined("parameter '" + p.name + "' was not provided"));
  }
  ++macro_depth_;
  Result<std::string> text = capture(macro.body, local, {});
  --macro_depth_;
  if (!text.is_ok()) return text.status();
  return Value::string(std::move(text).value());
}

// ---- expressions ---------------------------------------------------------------------------

Status Interpreter::eval_args(const Expr& e, size_t first, Scope& scope, CallArgs& args) {
  for (size_t i = first; i < e.children.size(); ++i) {
    KS_ASSIGN_OR_RETURN(Value v, eval(*e.children[i], scope));
    args.positional.push_back(std::move(v));
  }
  for (const auto& [key, expr] : e.kwargs) {
    KS_ASSIGN_OR_RETURN(Value v, eval(*expr, scope));
    args.keyword.emplace_back(key, std::move(v));
  }
  return Status::ok();
}

Result<Value> Interpreter::eval(const Expr& e, Scope& scope) {
  if (eval_depth_ >= kMaxEvalDepth) {
    return located(Status::error("template nests too deeply"), e.line);
  }
  ++eval_depth_;
  Result<Value> r = eval_uncounted(e, scope);
  --eval_depth_;
  return r;
}

namespace {

Result<std::optional<int64_t>> slice_bound(const Value& v) {
  if (v.is_none()) return std::optional<int64_t>();
  if (v.is_integral()) return std::optional<int64_t>(v.as_integral());
  if (v.is_undefined()) return undefined_error(v);
  return Status::error("slice indices must be integers or None, not " + type_name(v));
}

}  // namespace

Result<Value> Interpreter::eval_uncounted(const Expr& e, Scope& scope) {
  // Each kind is evaluated in its own function so that this frame, which every level of
  // expression nesting passes through, stays small.
  switch (e.kind) {
    case ExprKind::literal:
      return e.literal;
    case ExprKind::name:
      return lookup(e.name, scope);
    case ExprKind::list:
    case ExprKind::tuple:
      return eval_sequence(e, scope);
    case ExprKind::dict:
      return eval_dict(e, scope);
    case ExprKind::attribute:
    case ExprKind::item:
    case ExprKind::slice:
      return eval_access(e, scope);
    case ExprKind::call:
    case ExprKind::filter:
    case ExprKind::test:
      return eval_call(e, scope);
    case ExprKind::unary:
      return eval_unary(e, scope);
    case ExprKind::binary:
      return eval_binary(e, scope);
    case ExprKind::logical_and:
    case ExprKind::logical_or:
    case ExprKind::conditional:
      return eval_logic(e, scope);
    case ExprKind::compare:
      return eval_compare(e, scope);
  }
  return Status::error("internal error: unknown expression kind");
}

Result<Value> Interpreter::eval_sequence(const Expr& e, Scope& scope) {
  std::vector<Value> items;
  items.reserve(e.children.size());
  for (const ExprPtr& c : e.children) {
    KS_ASSIGN_OR_RETURN(Value v, eval(*c, scope));
    items.push_back(std::move(v));
  }
  Value list = Value::list(std::move(items), e.kind == ExprKind::tuple);
  KS_RETURN_IF_ERROR(located(check_value(list), e.line));
  return list;
}

Result<Value> Interpreter::eval_dict(const Expr& e, Scope& scope) {
  std::vector<std::pair<Value, Value>> entries;
  for (size_t i = 0; i + 1 < e.children.size(); i += 2) {
    KS_ASSIGN_OR_RETURN(Value k, eval(*e.children[i], scope));
    KS_ASSIGN_OR_RETURN(Value v, eval(*e.children[i + 1], scope));
    if (k.is_list() || k.is_dict() || k.is_undefined()) {
      return located(Status::error("unhashable dict key of type '" + type_name(k) + "'"), e.line);
    }
    bool replaced = false;
    for (auto& entry : entries) {
      if (equals(entry.first, k)) {
        entry.second = v;  // a repeated key keeps its first position, as in Python
        replaced = true;
      }
    }
    if (!replaced) entries.emplace_back(std::move(k), std::move(v));
  }
  Value dict = Value::dict(std::move(entries));
  KS_RETURN_IF_ERROR(located(check_value(dict), e.line));
  return dict;
}

Result<Value> Interpreter::eval_access(const Expr& e, Scope& scope) {
  KS_ASSIGN_OR_RETURN(Value obj, eval(*e.children[0], scope));
  if (e.kind == ExprKind::attribute) return located(get_attribute(obj, e.name), e.line);
  if (e.kind == ExprKind::item) {
    KS_ASSIGN_OR_RETURN(Value key, eval(*e.children[1], scope));
    return located(get_item(obj, key), e.line);
  }
  std::optional<int64_t> bounds[3];
  for (int i = 0; i < 3; ++i) {
    if (!e.children[i + 1]) continue;
    KS_ASSIGN_OR_RETURN(Value b, eval(*e.children[i + 1], scope));
    KS_ASSIGN_OR_RETURN(bounds[i], located(slice_bound(b), e.line));
  }
  KS_RETURN_IF_ERROR(located(charge_read(obj), e.line));
  KS_ASSIGN_OR_RETURN(Value sliced,
                      located(slice_value(obj, bounds[0], bounds[1], bounds[2]), e.line));
  KS_RETURN_IF_ERROR(located(check_result(sliced), e.line));
  return sliced;
}

Result<Value> Interpreter::eval_call(const Expr& e, Scope& scope) {
  if (e.kind == ExprKind::call) {
    KS_ASSIGN_OR_RETURN(Value callee, eval(*e.children[0], scope));
    CallArgs args;
    KS_RETURN_IF_ERROR(eval_args(e, 1, scope, args));
    KS_ASSIGN_OR_RETURN(Value r, located(call(callee, args), e.line));
    KS_RETURN_IF_ERROR(located(check_value(r), e.line));
    return r;
  }
  KS_ASSIGN_OR_RETURN(Value operand, eval(*e.children[0], scope));
  CallArgs args;
  KS_RETURN_IF_ERROR(eval_args(e, 1, scope, args));
  if (e.kind == ExprKind::filter) return located(apply_filter(e.name, operand, args), e.line);
  KS_ASSIGN_OR_RETURN(bool r, located(apply_test(e.name, operand, args), e.line));
  return Value::boolean(r != e.negated);
}

Result<Value> Interpreter::eval_unary(const Expr& e, Scope& scope) {
  KS_ASSIGN_OR_RETURN(Value v, eval(*e.children[0], scope));
  if (e.op == Op::logical_not) return Value::boolean(!truthy(v));
  if (v.is_undefined()) return located(undefined_error(v), e.line);
  if (!v.is_number()) {
    return located(
        Status::error("bad operand type for unary " + std::string(e.op == Op::neg ? "-" : "+") +
                      ": '" + type_name(v) + "'"),
        e.line);
  }
  if (v.is_float()) return Value::floating(e.op == Op::neg ? -v.as_float() : v.as_float());
  if (e.op == Op::pos) return Value::integer(v.as_integral());
  if (v.as_integral() == INT64_MIN) return located(int_overflow(), e.line);
  return Value::integer(-v.as_integral());
}

Result<Value> Interpreter::eval_binary(const Expr& e, Scope& scope) {
  KS_ASSIGN_OR_RETURN(Value a, eval(*e.children[0], scope));
  KS_ASSIGN_OR_RETURN(Value b, eval(*e.children[1], scope));
  return located(binary_op(*this, e.op, a, b), e.line);
}

Result<Value> Interpreter::eval_logic(const Expr& e, Scope& scope) {
  if (e.kind == ExprKind::conditional) {
    KS_ASSIGN_OR_RETURN(Value cond, eval(*e.children[1], scope));
    if (truthy(cond)) return eval(*e.children[0], scope);
    if (e.children[2]) return eval(*e.children[2], scope);
    return Value::undefined("the inline if-expression on line " + std::to_string(e.line) +
                            " evaluated to false and has no else section");
  }
  // Python's `and` / `or` return an operand, not a bool.
  KS_ASSIGN_OR_RETURN(Value a, eval(*e.children[0], scope));
  if (truthy(a) == (e.kind == ExprKind::logical_or)) return a;
  return eval(*e.children[1], scope);
}

Result<Value> Interpreter::eval_compare(const Expr& e, Scope& scope) {
  KS_ASSIGN_OR_RETURN(Value left, eval(*e.children[0], scope));
  for (size_t i = 0; i < e.compare_ops.size(); ++i) {
    KS_ASSIGN_OR_RETURN(Value right, eval(*e.children[i + 1], scope));
    const Op op = e.compare_ops[i];
    bool r = false;
    if (op == Op::eq || op == Op::ne || op == Op::in || op == Op::not_in) {
      KS_RETURN_IF_ERROR(located(charge_read(left), e.line));
      KS_RETURN_IF_ERROR(located(charge_read(right), e.line));
    }
    if (op == Op::eq || op == Op::ne) {
      r = equals(left, right) == (op == Op::eq);
    } else if (op == Op::in || op == Op::not_in) {
      if (right.is_string() && left.is_undefined()) {
        return located(undefined_error(left), e.line);
      }
      KS_ASSIGN_OR_RETURN(bool c, located(contains(right, left), e.line));
      r = c == (op == Op::in);
    } else {
      if (left.is_undefined()) return located(undefined_error(left), e.line);
      if (right.is_undefined()) return located(undefined_error(right), e.line);
      Result<int> c = compare(left, right);
      if (!c.is_ok()) {
        return located(
            Status::error("'" + op_symbol(op) + "' not supported between instances of '" +
                          type_name(left) + "' and '" + type_name(right) + "'"),
            e.line);
      }
      const int v = c.value();
      r = op == Op::lt ? v < 0 : op == Op::le ? v <= 0 : op == Op::gt ? v > 0 : v >= 0;
    }
    if (!r) return Value::boolean(false);
    left = std::move(right);
  }
  return Value::boolean(true);
}

}  // namespace kestrel::jinja
