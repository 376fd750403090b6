#include "template/jinja_value.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <limits>

namespace kestrel::jinja {

namespace {

std::shared_ptr<ListData> make_list_data(std::vector<Value> items) {
  auto data = std::make_shared<ListData>();
  int depth = 0;
  bool refs = false;
  for (const Value& v : items) {
    depth = std::max(depth, v.depth());
    refs = refs || v.holds_reference();
  }
  data->depth = depth + 1;
  data->holds_reference = refs;
  data->items = std::move(items);
  return data;
}

}  // namespace

Value Value::list(std::vector<Value> items, bool is_tuple) {
  auto data = make_list_data(std::move(items));
  data->is_tuple = is_tuple;
  return Value(Storage(std::shared_ptr<const ListData>(std::move(data))));
}

Value Value::dict_view(std::vector<Value> items, ListView view) {
  auto data = make_list_data(std::move(items));
  data->view = view;
  return Value(Storage(std::shared_ptr<const ListData>(std::move(data))));
}

Value Value::failed_generator(const std::string& error) {
  auto data = make_list_data({});
  data->view = ListView::generator;
  data->deferred_error = std::make_shared<const std::string>(error);
  return Value(Storage(std::shared_ptr<const ListData>(std::move(data))));
}

bool Value::is_generator() const {
  return is_list() && as_list().view == ListView::generator;
}

bool Value::is_sequence_list() const {
  return is_list() && as_list().view == ListView::none;
}

Value Value::dict(std::vector<std::pair<Value, Value>> entries) {
  auto data = std::make_shared<DictData>();
  int depth = 0;
  bool refs = false;
  for (const auto& [k, v] : entries) {
    depth = std::max({depth, k.depth(), v.depth()});
    refs = refs || k.holds_reference() || v.holds_reference();
  }
  data->depth = depth + 1;
  data->holds_reference = refs;
  data->entries = std::move(entries);
  return Value(Storage(std::shared_ptr<const DictData>(std::move(data))));
}

Value Value::string(std::string s) {
  if (s.empty()) {
    static const std::shared_ptr<const std::string> empty = std::make_shared<const std::string>();
    return Value(Storage(empty));
  }
  return Value(Storage(std::make_shared<const std::string>(std::move(s))));
}

Value Value::new_namespace() {
  return Value(Storage(std::make_shared<NamespaceData>()));
}

Value Value::callable(std::string name, NativeFunction fn, std::string display) {
  auto data = std::make_shared<CallableData>();
  data->display = display.empty() ? "<function " + name + ">" : std::move(display);
  data->name = std::move(name);
  data->function = std::move(fn);
  return Value(Storage(std::shared_ptr<const CallableData>(std::move(data))));
}

const void* Value::identity() const {
  if (is_namespace()) return std::get<std::shared_ptr<NamespaceData>>(data_).get();
  if (is_callable()) return std::get<std::shared_ptr<const CallableData>>(data_).get();
  if (is_list()) return std::get<std::shared_ptr<const ListData>>(data_).get();
  if (is_dict()) return std::get<std::shared_ptr<const DictData>>(data_).get();
  return nullptr;
}

int Value::depth() const {
  switch (kind()) {
    case Kind::list:
      return as_list().depth;
    case Kind::dict:
      return as_dict().depth;
    case Kind::ns: {
      int depth = 0;
      for (const auto& [name, v] : as_namespace().attributes) depth = std::max(depth, v.depth());
      return depth + 1;
    }
    default:
      return 0;
  }
}

bool Value::holds_reference() const {
  switch (kind()) {
    case Kind::ns:
    case Kind::callable:
      return true;
    case Kind::list:
      return as_list().holds_reference;
    case Kind::dict:
      return as_dict().holds_reference;
    default:
      return false;
  }
}

const Value* DictData::find(const Value& key) const {
  for (const auto& [k, v] : entries) {
    if (equals(k, key)) return &v;
  }
  return nullptr;
}

const Value* DictData::find(std::string_view key) const {
  for (const auto& [k, v] : entries) {
    if (k.is_string() && k.as_string() == key) return &v;
  }
  return nullptr;
}

const Value* NamespaceData::find(std::string_view name) const {
  for (const auto& [k, v] : attributes) {
    if (k == name) return &v;
  }
  return nullptr;
}

void NamespaceData::set(const std::string& name, Value value) {
  for (auto& [k, v] : attributes) {
    if (k == name) {
      v = std::move(value);
      return;
    }
  }
  attributes.emplace_back(name, std::move(value));
}

bool truthy(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::undefined:
    case Value::Kind::none:
      return false;
    case Value::Kind::boolean:
      return v.as_bool();
    case Value::Kind::integer:
      return v.as_int() != 0;
    case Value::Kind::floating:
      return v.as_float() != 0.0;
    case Value::Kind::string:
      return !v.as_string().empty();
    case Value::Kind::list:
      return v.as_list().view == ListView::generator || !v.as_list().items.empty();
    case Value::Kind::dict:
      return !v.as_dict().entries.empty();
    case Value::Kind::ns:
    case Value::Kind::callable:
      return true;
  }
  return false;
}

std::string type_name(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::undefined:
      return "Undefined";
    case Value::Kind::none:
      return "NoneType";
    case Value::Kind::boolean:
      return "bool";
    case Value::Kind::integer:
      return "int";
    case Value::Kind::floating:
      return "float";
    case Value::Kind::string:
      return "str";
    case Value::Kind::list:
      switch (v.as_list().view) {
        case ListView::dict_keys:
          return "dict_keys";
        case ListView::dict_values:
          return "dict_values";
        case ListView::dict_items:
          return "dict_items";
        case ListView::generator:
          return "generator";
        default:
          return v.as_list().is_tuple ? "tuple" : "list";
      }
    case Value::Kind::dict:
      return "dict";
    case Value::Kind::ns:
      return "Namespace";
    case Value::Kind::callable:
      return "function";
  }
  return "object";
}

std::string float_repr(double f) {
  if (std::isnan(f)) return "nan";
  if (std::isinf(f)) return f < 0 ? "-inf" : "inf";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), f, std::chars_format::scientific);
  std::string_view sci(buf, res.ptr - buf);  // "-d.ddde+XX"
  std::string out;
  if (!sci.empty() && sci[0] == '-') {
    out.push_back('-');
    sci.remove_prefix(1);
  }
  size_t e = sci.find('e');
  std::string digits;
  for (char c : sci.substr(0, e)) {
    if (c != '.') digits.push_back(c);
  }
  int exponent = 0;
  std::string_view exp_text = sci.substr(e + 1);
  if (!exp_text.empty() && exp_text[0] == '+') exp_text.remove_prefix(1);
  std::from_chars(exp_text.data(), exp_text.data() + exp_text.size(), exponent);
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  // Python's repr switches to exponent notation when the decimal point would sit more than 16
  // digits right of the first digit or 4 or more zeros left of it.
  const int decpt = exponent + 1;
  if (decpt > 16 || decpt < -3) {
    out += digits[0];
    if (digits.size() > 1) {
      out += '.';
      out.append(digits, 1);
    }
    out += 'e';
    out += exponent < 0 ? '-' : '+';
    std::string mag = std::to_string(std::abs(exponent));
    if (mag.size() < 2) mag.insert(0, "0");
    out += mag;
  } else if (decpt <= 0) {
    out += "0.";
    out.append(static_cast<size_t>(-decpt), '0');
    out += digits;
  } else if (static_cast<size_t>(decpt) >= digits.size()) {
    out += digits;
    out.append(static_cast<size_t>(decpt) - digits.size(), '0');
    out += ".0";
  } else {
    out.append(digits, 0, static_cast<size_t>(decpt));
    out += '.';
    out.append(digits, static_cast<size_t>(decpt));
  }
  return out;
}

namespace {

// Characters Python's str.isprintable() rejects, so repr() escapes them: controls, separators
// other than the ASCII space, format characters and private use (unassigned code points, which
// Python also escapes, would need the Unicode database and are printed as they are).
bool is_py_unprintable(char32_t c) {
  if (c < 0x20 || (c >= 0x7f && c <= 0xa0) || c == 0xad) return true;
  if (c == 0x1680 || (c >= 0x2000 && c <= 0x200f) || (c >= 0x2028 && c <= 0x202f)) return true;
  if ((c >= 0x205f && c <= 0x2064) || (c >= 0x2066 && c <= 0x206f) || c == 0x3000) return true;
  if ((c >= 0x600 && c <= 0x605) || c == 0x61c || c == 0x6dd || c == 0x70f || c == 0x180e) {
    return true;
  }
  if (c == 0xfeff || (c >= 0xfff9 && c <= 0xfffb)) return true;
  if (c >= 0xd800 && c <= 0xf8ff) return true;  // surrogates and private use
  if (c == 0xe0001 || (c >= 0xe0020 && c <= 0xe007f) || c >= 0xf0000) return true;
  return false;
}

void append_hex(std::string& out, char32_t c, int digits) {
  static const char* kHex = "0123456789abcdef";
  for (int i = digits - 1; i >= 0; --i) out.push_back(kHex[(c >> (4 * i)) & 0xf]);
}

std::string repr_string(const std::string& s) {
  const std::u32string cps = decode_utf8(s);
  const bool has_single = s.find('\'') != std::string::npos;
  const bool has_double = s.find('"') != std::string::npos;
  const char quote = (has_single && !has_double) ? '"' : '\'';
  std::string out(1, quote);
  for (char32_t c : cps) {
    if (c == static_cast<char32_t>(quote) || c == U'\\') {
      out.push_back('\\');
      out.push_back(static_cast<char>(c));
    } else if (c == U'\n') {
      out += "\\n";
    } else if (c == U'\r') {
      out += "\\r";
    } else if (c == U'\t') {
      out += "\\t";
    } else if (c >= 0xdc80 && c <= 0xdcff) {
      out += "\\udc";
      append_hex(out, c & 0xff, 2);
    } else if (is_py_unprintable(c)) {
      if (c <= 0xff) {
        out += "\\x";
        append_hex(out, c, 2);
      } else if (c <= 0xffff) {
        out += "\\u";
        append_hex(out, c, 4);
      } else {
        out += "\\U";
        append_hex(out, c, 8);
      }
    } else {
      append_utf8(out, c);
    }
  }
  out.push_back(quote);
  return out;
}

void append_repr(std::string& out, const Value& v, size_t max);

void append_str(std::string& out, const Value& v, size_t max) {
  switch (v.kind()) {
    case Value::Kind::undefined:
      return;
    case Value::Kind::string:
      out += v.as_string();
      return;
    default:
      append_repr(out, v, max);
  }
}

void append_repr(std::string& out, const Value& v, size_t max) {
  // Values share their lists, so a small value can stand for an enormous text ([x, x] nested 60
  // times): stop once past `max`, which the caller's size check then refuses.
  if (out.size() > max) return;
  switch (v.kind()) {
    case Value::Kind::undefined:
      out += "Undefined";
      return;
    case Value::Kind::none:
      out += "None";
      return;
    case Value::Kind::boolean:
      out += v.as_bool() ? "True" : "False";
      return;
    case Value::Kind::integer:
      out += std::to_string(v.as_int());
      return;
    case Value::Kind::floating:
      out += float_repr(v.as_float());
      return;
    case Value::Kind::string:
      out += repr_string(v.as_string());
      return;
    case Value::Kind::list: {
      const ListData& l = v.as_list();
      if (l.view == ListView::generator) {
        out += "<generator object>";
        return;
      }
      if (l.view != ListView::none) out += type_name(v) + "(";
      out += l.is_tuple ? '(' : '[';
      for (size_t i = 0; i < l.items.size(); ++i) {
        if (i) out += ", ";
        append_repr(out, l.items[i], max);
      }
      if (l.is_tuple && l.items.size() == 1) out += ',';
      out += l.is_tuple ? ')' : ']';
      if (l.view != ListView::none) out += ")";
      return;
    }
    case Value::Kind::dict: {
      const DictData& d = v.as_dict();
      out += '{';
      for (size_t i = 0; i < d.entries.size(); ++i) {
        if (i) out += ", ";
        append_repr(out, d.entries[i].first, max);
        out += ": ";
        append_repr(out, d.entries[i].second, max);
      }
      out += '}';
      return;
    }
    case Value::Kind::ns: {
      out += "<Namespace {";
      const auto& attrs = v.as_namespace().attributes;
      for (size_t i = 0; i < attrs.size(); ++i) {
        if (i) out += ", ";
        out += repr_string(attrs[i].first);
        out += ": ";
        append_repr(out, attrs[i].second, max);
      }
      out += "}>";
      return;
    }
    case Value::Kind::callable:
      out += v.as_callable().display;
      return;
  }
}

}  // namespace

std::string to_str(const Value& v, size_t max_bytes) {
  std::string out;
  append_str(out, v, max_bytes);
  return out;
}

std::string repr(const Value& v, size_t max_bytes) {
  std::string out;
  append_repr(out, v, max_bytes);
  return out;
}

namespace {

// int == float exactly, as Python does (no rounding of large ints through double).
bool int_equals_float(int64_t i, double f) {
  if (!std::isfinite(f) || f != std::trunc(f)) return false;
  if (f < -9.2233720368547758e18 || f >= 9.2233720368547758e18) return false;
  return static_cast<int64_t>(f) == i;
}

int compare_int_float(int64_t i, double f) {
  if (std::isnan(f)) return 0;  // callers treat NaN separately
  if (f >= 9.2233720368547758e18) return -1;
  if (f < -9.2233720368547758e18) return 1;
  const double t = std::trunc(f);
  const int64_t ti = static_cast<int64_t>(t);
  if (i != ti) return i < ti ? -1 : 1;
  if (f > t) return -1;
  if (f < t) return 1;
  return 0;
}

}  // namespace

bool equals(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.is_float() && b.is_float()) return a.as_float() == b.as_float();
    if (a.is_float()) return int_equals_float(b.as_integral(), a.as_float());
    if (b.is_float()) return int_equals_float(a.as_integral(), b.as_float());
    return a.as_integral() == b.as_integral();
  }
  if (a.kind() != b.kind()) return false;
  switch (a.kind()) {
    case Value::Kind::undefined:
    case Value::Kind::none:
      return true;
    case Value::Kind::string:
      return a.as_string() == b.as_string();
    case Value::Kind::list: {
      const ListData& x = a.as_list();
      const ListData& y = b.as_list();
      if (x.view != ListView::none || y.view != ListView::none) {
        // Key and item views compare as sets; value views only by identity.
        if (x.view != y.view) return false;
        if (x.view == ListView::dict_values || x.view == ListView::generator) {
          return a.identity() == b.identity();
        }
        if (x.items.size() != y.items.size()) return false;
        for (const Value& item : x.items) {
          bool found = false;
          for (const Value& other : y.items) found = found || equals(item, other);
          if (!found) return false;
        }
        return true;
      }
      if (x.is_tuple != y.is_tuple || x.items.size() != y.items.size()) return false;
      for (size_t i = 0; i < x.items.size(); ++i) {
        if (!equals(x.items[i], y.items[i])) return false;
      }
      return true;
    }
    case Value::Kind::dict: {
      const DictData& x = a.as_dict();
      const DictData& y = b.as_dict();
      if (x.entries.size() != y.entries.size()) return false;
      for (const auto& [k, v] : x.entries) {
        const Value* other = y.find(k);
        if (!other || !equals(v, *other)) return false;
      }
      return true;
    }
    case Value::Kind::ns:
    case Value::Kind::callable:
      return a.identity() == b.identity();
    default:
      return false;
  }
}

Result<int> compare(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.is_float() || b.is_float()) {
      if (a.is_float() && b.is_float()) {
        const double x = a.as_float(), y = b.as_float();
        return x < y ? -1 : (x > y ? 1 : 0);
      }
      if (a.is_float()) return -compare_int_float(b.as_integral(), a.as_float());
      return compare_int_float(a.as_integral(), b.as_float());
    }
    const int64_t x = a.as_integral(), y = b.as_integral();
    return x < y ? -1 : (x > y ? 1 : 0);
  }
  if (a.is_string() && b.is_string()) {
    // UTF-8 byte order is code point order, which is what Python compares.
    const int c = a.as_string().compare(b.as_string());
    return c < 0 ? -1 : (c > 0 ? 1 : 0);
  }
  if (a.is_sequence_list() && b.is_sequence_list() &&
      a.as_list().is_tuple == b.as_list().is_tuple) {
    const auto& x = a.as_list().items;
    const auto& y = b.as_list().items;
    for (size_t i = 0; i < x.size() && i < y.size(); ++i) {
      if (equals(x[i], y[i])) continue;
      return compare(x[i], y[i]);
    }
    return x.size() < y.size() ? -1 : (x.size() > y.size() ? 1 : 0);
  }
  return Status::error("ordering is not supported between instances of '" + type_name(a) +
                       "' and '" + type_name(b) + "'");
}

namespace {

void append_json_string_ascii_body(std::string& out, const std::string& s);

// json.dumps string escaping: quotes, backslashes and control characters; non-ASCII kept as is
// (ensure_ascii=False) or written as \uXXXX escapes with surrogate pairs (ensure_ascii=True).
void append_json_string(std::string& out, const std::string& s, bool ensure_ascii) {
  out.push_back('"');
  if (ensure_ascii && !is_ascii(s)) {
    for (char32_t c : decode_utf8(s)) {
      if (c < 0x80) {
        const std::string one(1, static_cast<char>(c));
        append_json_string_ascii_body(out, one);
      } else if (c < 0x10000) {
        out += "\\u";
        append_hex(out, c, 4);
      } else {
        const char32_t v = c - 0x10000;
        out += "\\u";
        append_hex(out, 0xd800 + (v >> 10), 4);
        out += "\\u";
        append_hex(out, 0xdc00 + (v & 0x3ff), 4);
      }
    }
    out.push_back('"');
    return;
  }
  append_json_string_ascii_body(out, s);
  out.push_back('"');
}

void append_json_string_ascii_body(std::string& out, const std::string& s) {
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      default:
        if (c < 0x20) {
          out += "\\u00";
          append_hex(out, c, 2);
        } else {
          out.push_back(static_cast<char>(c));
        }
    }
  }
}

std::string json_float(double f) {
  if (std::isnan(f)) return "NaN";
  if (std::isinf(f)) return f < 0 ? "-Infinity" : "Infinity";
  return float_repr(f);
}

Result<std::string> json_key(const Value& k) {
  switch (k.kind()) {
    case Value::Kind::string:
      return k.as_string();
    case Value::Kind::boolean:
      return std::string(k.as_bool() ? "true" : "false");
    case Value::Kind::none:
      return std::string("null");
    case Value::Kind::integer:
      return std::to_string(k.as_int());
    case Value::Kind::floating:
      return json_float(k.as_float());
    default:
      return Status::error("tojson: keys must be str, int, float, bool or None, not " +
                           type_name(k));
  }
}

Status append_json(std::string& out, const Value& v, const JsonFormat& fmt, int level) {
  if (out.size() > fmt.max_bytes) {
    return Status::error("tojson(): the JSON text is longer than " + std::to_string(fmt.max_bytes) +
                         " bytes");
  }
  auto newline = [&](int lvl) {
    out.push_back('\n');
    for (int i = 0; i < lvl; ++i) out += fmt.indent_unit;
  };
  switch (v.kind()) {
    case Value::Kind::none:
      out += "null";
      return Status::ok();
    case Value::Kind::boolean:
      out += v.as_bool() ? "true" : "false";
      return Status::ok();
    case Value::Kind::integer:
      out += std::to_string(v.as_int());
      return Status::ok();
    case Value::Kind::floating:
      out += json_float(v.as_float());
      return Status::ok();
    case Value::Kind::string:
      append_json_string(out, v.as_string(), fmt.ensure_ascii);
      return Status::ok();
    case Value::Kind::list: {
      if (v.as_list().view != ListView::none) {
        return Status::error("tojson: object of type " + type_name(v) +
                             " is not JSON serializable");
      }
      const auto& items = v.as_list().items;
      if (items.empty()) {
        out += "[]";
        return Status::ok();
      }
      out.push_back('[');
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) out += fmt.item_separator;
        if (fmt.indent) newline(level + 1);
        KS_RETURN_IF_ERROR(append_json(out, items[i], fmt, level + 1));
      }
      if (fmt.indent) newline(level);
      out.push_back(']');
      return Status::ok();
    }
    case Value::Kind::dict: {
      const auto& entries = v.as_dict().entries;
      if (entries.empty()) {
        out += "{}";
        return Status::ok();
      }
      std::vector<std::pair<std::string, const Value*>> keyed;
      keyed.reserve(entries.size());
      for (const auto& [k, val] : entries) {
        KS_ASSIGN_OR_RETURN(std::string key, json_key(k));
        keyed.emplace_back(std::move(key), &val);
      }
      if (fmt.sort_keys) {
        std::stable_sort(keyed.begin(), keyed.end(),
                         [](const auto& a, const auto& b) { return a.first < b.first; });
      }
      out.push_back('{');
      for (size_t i = 0; i < keyed.size(); ++i) {
        if (i) out += fmt.item_separator;
        if (fmt.indent) newline(level + 1);
        append_json_string(out, keyed[i].first, fmt.ensure_ascii);
        out += fmt.key_separator;
        KS_RETURN_IF_ERROR(append_json(out, *keyed[i].second, fmt, level + 1));
      }
      if (fmt.indent) newline(level);
      out.push_back('}');
      return Status::ok();
    }
    default:
      return Status::error("tojson: object of type " + type_name(v) + " is not JSON serializable");
  }
}

}  // namespace

Result<std::string> to_json(const Value& v, const JsonFormat& format) {
  std::string out;
  KS_RETURN_IF_ERROR(append_json(out, v, format, 0));
  return out;
}

namespace {

Result<Value> from_json_at(const nlohmann::ordered_json& j, int depth, int max_depth) {
  using T = nlohmann::ordered_json::value_t;
  switch (j.type()) {
    case T::null:
      return Value::none();
    case T::boolean:
      return Value::boolean(j.get<bool>());
    case T::number_integer:
      return Value::integer(j.get<int64_t>());
    case T::number_unsigned: {
      const uint64_t u = j.get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return Status::error("integer " + std::to_string(u) + " is too large");
      }
      return Value::integer(static_cast<int64_t>(u));
    }
    case T::number_float:
      return Value::floating(j.get<double>());
    case T::string:
      return Value::string(j.get<std::string>());
    case T::array:
    case T::object: {
      if (depth >= max_depth) {
        return Status::error("JSON input nests deeper than " + std::to_string(max_depth) +
                             " levels");
      }
      if (j.is_array()) {
        std::vector<Value> items;
        items.reserve(j.size());
        for (const auto& e : j) {
          KS_ASSIGN_OR_RETURN(Value v, from_json_at(e, depth + 1, max_depth));
          items.push_back(std::move(v));
        }
        return Value::list(std::move(items));
      }
      std::vector<std::pair<Value, Value>> entries;
      entries.reserve(j.size());
      for (auto it = j.begin(); it != j.end(); ++it) {
        KS_ASSIGN_OR_RETURN(Value v, from_json_at(it.value(), depth + 1, max_depth));
        entries.emplace_back(Value::string(it.key()), std::move(v));
      }
      return Value::dict(std::move(entries));
    }
    default:
      return Status::error("unsupported JSON value (binary or discarded)");
  }
}

}  // namespace

Result<Value> from_json(const nlohmann::ordered_json& j, int max_depth) {
  return from_json_at(j, 0, max_depth);
}

std::u32string decode_utf8(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      out.push_back(c);
      ++i;
      continue;
    }
    int len = 0;
    char32_t cp = 0;
    char32_t min = 0;
    if ((c & 0xe0) == 0xc0) {
      len = 2, cp = c & 0x1f, min = 0x80;
    } else if ((c & 0xf0) == 0xe0) {
      len = 3, cp = c & 0x0f, min = 0x800;
    } else if ((c & 0xf8) == 0xf0) {
      len = 4, cp = c & 0x07, min = 0x10000;
    }
    bool ok = len > 0 && i + len <= n;
    for (int k = 1; ok && k < len; ++k) {
      const unsigned char cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xc0) != 0x80) {
        ok = false;
      } else {
        cp = (cp << 6) | (cc & 0x3f);
      }
    }
    if (ok && (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))) ok = false;
    if (ok) {
      out.push_back(cp);
      i += len;
    } else {
      out.push_back(0xdc00 + c);
      ++i;
    }
  }
  return out;
}

void append_utf8(std::string& out, char32_t c) {
  if (c < 0x80) {
    out.push_back(static_cast<char>(c));
  } else if (c >= 0xdc80 && c <= 0xdcff) {
    out.push_back(static_cast<char>(c & 0xff));  // a byte that was not valid UTF-8
  } else if (c < 0x800) {
    out.push_back(static_cast<char>(0xc0 | (c >> 6)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3f)));
  } else if (c < 0x10000) {
    out.push_back(static_cast<char>(0xe0 | (c >> 12)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3f)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3f)));
  } else {
    out.push_back(static_cast<char>(0xf0 | (c >> 18)));
    out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3f)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3f)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3f)));
  }
}

std::string encode_utf8(std::u32string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : s) append_utf8(out, c);
  return out;
}

bool is_ascii(std::string_view s) {
  for (char c : s) {
    if (static_cast<unsigned char>(c) >= 0x80) return false;
  }
  return true;
}

size_t utf8_length(std::string_view s) {
  if (is_ascii(s)) return s.size();
  return decode_utf8(s).size();
}

bool is_py_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f ||
         c == 0x205f || c == 0x3000;
}

std::string py_strip(std::string_view s, const std::string* chars, bool left, bool right) {
  const std::u32string cps = decode_utf8(s);
  std::u32string set;
  if (chars) set = decode_utf8(*chars);
  auto strip_it = [&](char32_t c) {
    return chars ? set.find(c) != std::u32string::npos : is_py_space(c);
  };
  size_t b = 0, e = cps.size();
  if (left) {
    while (b < e && strip_it(cps[b])) ++b;
  }
  if (right) {
    while (e > b && strip_it(cps[e - 1])) --e;
  }
  return encode_utf8(std::u32string_view(cps).substr(b, e - b));
}

namespace {

// Ranges where upper and lower case letters alternate (upper at even offsets from `first`).
struct AlternatingRange {
  char32_t first, last;
};
constexpr AlternatingRange kAlternating[] = {
    {0x100, 0x12f},   {0x132, 0x137}, {0x139, 0x148}, {0x14a, 0x177}, {0x179, 0x17e},
    {0x460, 0x481},   {0x48a, 0x4bf}, {0x4c1, 0x4ce}, {0x4d0, 0x52f}, {0x1e00, 0x1e95},
    {0x1ea0, 0x1eff}, {0x1cd, 0x1dc}, {0x1de, 0x1ef}, {0x1f4, 0x1f5}, {0x1f8, 0x21f},
    {0x222, 0x233},   {0x246, 0x24f},
};

// Latin digraphs with upper, title and lower case forms (DŽ Dž dž, LJ Lj lj, NJ Nj nj, DZ Dz dz).
constexpr char32_t kDigraphUpper[] = {0x1c4, 0x1c7, 0x1ca, 0x1f1};

// Ranges where an upper case block maps onto a lower case block at a fixed offset.
struct OffsetRange {
  char32_t first, last;
  int32_t to_lower;
};
constexpr OffsetRange kOffset[] = {
    {0x41, 0x5a, 32},   {0xc0, 0xd6, 32},   {0xd8, 0xde, 32},     {0x391, 0x3a1, 32},
    {0x3a3, 0x3ab, 32}, {0x388, 0x38a, 37}, {0x38e, 0x38f, 63},   {0x410, 0x42f, 32},
    {0x400, 0x40f, 80}, {0x531, 0x556, 48}, {0xff21, 0xff3a, 32},
};

}  // namespace

char32_t to_lower_char(char32_t c) {
  if (c < 0x80) return (c >= 'A' && c <= 'Z') ? c + 32 : c;
  for (char32_t d : kDigraphUpper) {
    if (c == d || c == d + 1) return d + 2;
  }
  for (const auto& r : kOffset) {
    if (c >= r.first && c <= r.last) return c + r.to_lower;
  }
  for (const auto& r : kAlternating) {
    if (c >= r.first && c <= r.last) return ((c - r.first) % 2 == 0) ? c + 1 : c;
  }
  switch (c) {
    case 0x178:
      return 0xff;
    case 0x386:
      return 0x3ac;
    case 0x38c:
      return 0x3cc;
    case 0x4c0:
      return 0x4cf;
    case 0x1e9e:
      return 0xdf;
    default:
      return c;
  }
}

char32_t to_upper_char(char32_t c) {
  if (c < 0x80) return (c >= 'a' && c <= 'z') ? c - 32 : c;
  for (char32_t d : kDigraphUpper) {
    if (c == d + 1 || c == d + 2) return d;
  }
  for (const auto& r : kOffset) {
    if (c >= r.first + r.to_lower && c <= r.last + r.to_lower) return c - r.to_lower;
  }
  for (const auto& r : kAlternating) {
    if (c >= r.first && c <= r.last) return ((c - r.first) % 2 == 1) ? c - 1 : c;
  }
  switch (c) {
    case 0xb5:
      return 0x39c;
    case 0xff:
      return 0x178;
    case 0x131:
      return 'I';
    case 0x17f:
      return 'S';
    case 0x3c2:
      return 0x3a3;
    case 0x3ac:
      return 0x386;
    case 0x3cc:
      return 0x38c;
    case 0x4cf:
      return 0x4c0;
    default:
      return c;
  }
}

bool is_cased_upper(char32_t c) {
  return to_lower_char(c) != c || c == 0x130;
}
bool is_cased_lower(char32_t c) {
  return to_upper_char(c) != c || c == 0xdf || c == 0x149 || c == 0x138;
}

std::string py_upper(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  if (is_ascii(s)) {
    for (char c : s) out.push_back((c >= 'a' && c <= 'z') ? static_cast<char>(c - 32) : c);
    return out;
  }
  for (char32_t c : decode_utf8(s)) {
    if (c == 0xdf) {
      out += "SS";  // full case mapping, as Python's str.upper() does
    } else {
      append_utf8(out, to_upper_char(c));
    }
  }
  return out;
}

std::string py_lower(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  if (is_ascii(s)) {
    for (char c : s) out.push_back((c >= 'A' && c <= 'Z') ? static_cast<char>(c + 32) : c);
    return out;
  }
  const std::u32string cps = decode_utf8(s);
  auto cased = [](char32_t c) { return is_cased_upper(c) || is_cased_lower(c); };
  for (size_t i = 0; i < cps.size(); ++i) {
    const char32_t c = cps[i];
    if (c == 0x130) {
      out += "i\xcc\x87";  // İ lowers to i + combining dot above
    } else if (c == 0x3a3) {
      // Final sigma: a capital sigma that ends a word lowers to ς.
      const bool after_letter = i > 0 && cased(cps[i - 1]);
      const bool before_letter = i + 1 < cps.size() && cased(cps[i + 1]);
      append_utf8(out, (after_letter && !before_letter) ? 0x3c2 : 0x3c3);
    } else {
      append_utf8(out, to_lower_char(c));
    }
  }
  return out;
}

}  // namespace kestrel::jinja
