// The dynamic value type of the chat-template interpreter, with Python semantics: what `str()`,
// `repr()`, `==`, `<` and `json.dumps` do to it is what Jinja (a Python library) would do, because
// a chat template must render byte-identically to Hugging Face's.
//
// Lists and dicts are immutable once built (transformers renders with Jinja's
// ImmutableSandboxedEnvironment, so templates cannot mutate them) and shared by pointer. Only a
// namespace() object is mutable. A namespace attribute may not hold a namespace or a function,
// which rules out reference cycles; every container records its nesting depth so that deep values
// are refused before any recursive walk (repr, tojson, ==, destruction) could exhaust the stack.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "core/status.h"

namespace kestrel::jinja {

class Value;
class Interpreter;

struct CallArgs {
  std::vector<Value> positional;
  std::vector<std::pair<std::string, Value>> keyword;
};

using NativeFunction = std::function<Result<Value>(Interpreter&, CallArgs&)>;

struct ListData;
struct DictData;
struct NamespaceData;
struct CallableData;

// dict.keys() / .values() / .items() return views in Python: iterable, but printed as
// "dict_keys([...])", not indexable and not JSON serializable. Jinja's select, reject,
// selectattr, rejectattr, map, unique, items, batch and reverse filters return generators:
// always true, without a length, and used up by the first iteration.
enum class ListView : uint8_t { none, dict_keys, dict_values, dict_items, generator };

// Undefined carries a description of how it came about, for the error raised when it is used.
struct UndefinedData {
  std::string hint;
};

class Value {
 public:
  enum class Kind : uint8_t {
    undefined,
    none,
    boolean,
    integer,
    floating,
    string,
    list,
    dict,
    ns,
    callable
  };

  Value() = default;
  static Value undefined(std::string hint = {}) {
    return Value(Storage(UndefinedData{std::move(hint)}));
  }
  static Value none() { return Value(Storage(nullptr)); }
  static Value boolean(bool b) { return Value(Storage(b)); }
  static Value integer(int64_t i) { return Value(Storage(i)); }
  static Value floating(double f) { return Value(Storage(f)); }
  // Strings are shared and never changed, as in Python: copying a Value (a variable read, a list
  // repeated or concatenated, a loop's items) never copies its text, so a template's memory is
  // bounded by the bytes its operations produce, which the work budget counts.
  static Value string(std::string s);
  static Value list(std::vector<Value> items, bool is_tuple = false);
  static Value dict_view(std::vector<Value> items, ListView view);
  static Value generator(std::vector<Value> items) {
    return dict_view(std::move(items), ListView::generator);
  }
  bool is_generator() const;
  static Value failed_generator(const std::string& error);
  static Value dict(std::vector<std::pair<Value, Value>> entries);
  static Value new_namespace();
  // `display` is what str() prints; "<function NAME>" when empty.
  static Value callable(std::string name, NativeFunction fn, std::string display = {});

  Kind kind() const { return static_cast<Kind>(data_.index()); }
  bool is_undefined() const { return kind() == Kind::undefined; }
  bool is_none() const { return kind() == Kind::none; }
  bool is_bool() const { return kind() == Kind::boolean; }
  bool is_int() const { return kind() == Kind::integer; }
  bool is_float() const { return kind() == Kind::floating; }
  // Python's numbers: bool is a subclass of int.
  bool is_number() const { return is_bool() || is_int() || is_float(); }
  bool is_integral() const { return is_bool() || is_int(); }
  bool is_string() const { return kind() == Kind::string; }
  bool is_list() const { return kind() == Kind::list; }
  // A list, tuple or dict view whose items can be indexed, sliced and concatenated.
  bool is_sequence_list() const;
  bool is_dict() const { return kind() == Kind::dict; }
  bool is_namespace() const { return kind() == Kind::ns; }
  bool is_callable() const { return kind() == Kind::callable; }

  bool as_bool() const { return std::get<bool>(data_); }
  int64_t as_int() const { return std::get<int64_t>(data_); }
  // Integer value of a bool or int.
  int64_t as_integral() const { return is_bool() ? (as_bool() ? 1 : 0) : as_int(); }
  double as_float() const { return std::get<double>(data_); }
  // Numeric value of a bool, int or float.
  double as_number() const { return is_float() ? as_float() : static_cast<double>(as_integral()); }
  const std::string& as_string() const {
    return *std::get<std::shared_ptr<const std::string>>(data_);
  }
  const std::string& undefined_hint() const { return std::get<UndefinedData>(data_).hint; }
  const ListData& as_list() const { return *std::get<std::shared_ptr<const ListData>>(data_); }
  const DictData& as_dict() const { return *std::get<std::shared_ptr<const DictData>>(data_); }
  NamespaceData& as_namespace() const { return *std::get<std::shared_ptr<NamespaceData>>(data_); }
  const CallableData& as_callable() const {
    return *std::get<std::shared_ptr<const CallableData>>(data_);
  }
  // Identity of a shared object (namespaces and functions compare by identity, as in Python).
  const void* identity() const;

  // Nesting depth: 0 for scalars, 1 + the deepest element for lists and dicts.
  int depth() const;
  // True for namespaces, functions and containers holding either.
  bool holds_reference() const;

 private:
  using Storage = std::variant<UndefinedData, std::nullptr_t, bool, int64_t, double,
                               std::shared_ptr<const std::string>, std::shared_ptr<const ListData>,
                               std::shared_ptr<const DictData>, std::shared_ptr<NamespaceData>,
                               std::shared_ptr<const CallableData>>;
  explicit Value(Storage data) : data_(std::move(data)) {}
  Storage data_;
};

struct ListData {
  std::vector<Value> items;
  bool is_tuple = false;
  ListView view = ListView::none;
  mutable bool consumed = false;  // a generator that has been iterated
  // A generator whose filter failed: Jinja's generator filters only run when iterated, so the
  // error is raised then, not when the filter is applied.
  std::shared_ptr<const std::string> deferred_error;
  int depth = 1;
  bool holds_reference = false;
};

// Insertion-ordered, like a Python dict. Lookups are linear: chat-template dicts are small.
struct DictData {
  std::vector<std::pair<Value, Value>> entries;
  int depth = 1;
  bool holds_reference = false;
  const Value* find(const Value& key) const;
  const Value* find(std::string_view key) const;
};

struct NamespaceData {
  std::vector<std::pair<std::string, Value>> attributes;
  const Value* find(std::string_view name) const;
  void set(const std::string& name, Value value);
};

struct CallableData {
  std::string name;
  std::string display;
  NativeFunction function;
};

// Python truthiness.
bool truthy(const Value& v);
// Python's type name, as used in its error messages ("str", "NoneType", ...).
std::string type_name(const Value& v);
// Python's str(): what `{{ v }}` prints. Undefined prints as nothing.
// Text of values beyond this size is cut off there; every caller's own size limit is smaller
// and refuses it.
constexpr size_t kMaxValueTextBytes = 64u << 20;
std::string to_str(const Value& v, size_t max_bytes = kMaxValueTextBytes);
// Python's repr().
std::string repr(const Value& v, size_t max_bytes = kMaxValueTextBytes);
// Python's repr() of a float: the shortest string that round-trips ("0.1", "1e-05", "1e+16").
std::string float_repr(double f);
// Python's == (1 == 1.0 == True; lists and tuples never equal each other).
bool equals(const Value& a, const Value& b);
// Python's ordering for numbers, strings, lists and tuples: <0, 0 or >0; an error otherwise.
Result<int> compare(const Value& a, const Value& b);

struct JsonFormat {
  bool indent = false;  // json.dumps(indent=None) when false
  std::string indent_unit;
  std::string item_separator = ", ";
  std::string key_separator = ": ";
  bool sort_keys = false;
  bool ensure_ascii = false;              // escape non-ASCII as \uXXXX
  size_t max_bytes = kMaxValueTextBytes;  // an error past this
};
// json.dumps(v, ensure_ascii=False, ...) as transformers' `tojson` filter calls it.
Result<std::string> to_json(const Value& v, const JsonFormat& format);

// Converts a JSON document into values, keeping object key order. Refuses nesting deeper than
// `max_depth`.
Result<Value> from_json(const nlohmann::ordered_json& j, int max_depth);

// --- Python str semantics on UTF-8 text -----------------------------------------------------

// Decodes UTF-8; an invalid byte b becomes the lone code point 0xDC00 + b (Python's
// surrogateescape), so decoding then encoding gives the original bytes back.
std::u32string decode_utf8(std::string_view s);
void append_utf8(std::string& out, char32_t c);
std::string encode_utf8(std::u32string_view s);
bool is_ascii(std::string_view s);
// Number of code points.
size_t utf8_length(std::string_view s);
// Python's str.isspace() for one code point (also what `\s` matches in Python's re).
bool is_py_space(char32_t c);
// Python's str.strip / lstrip / rstrip; `chars` null means whitespace.
std::string py_strip(std::string_view s, const std::string* chars, bool left, bool right);
// Upper/lower case mapping for ASCII, Latin-1, Latin Extended-A/B and Additional, Greek,
// Cyrillic, Armenian and fullwidth Latin; characters of other cased scripts are left unchanged
// (Python would map them too).
char32_t to_upper_char(char32_t c);
char32_t to_lower_char(char32_t c);
std::string py_upper(std::string_view s);
std::string py_lower(std::string_view s);
bool is_cased_upper(char32_t c);
bool is_cased_lower(char32_t c);

}  // namespace kestrel::jinja
