// Built-ins of the chat-template interpreter: Jinja's filters and tests, the str/dict/list
// methods Jinja's sandbox lets templates call, and the global functions (range, dict, namespace,
// and transformers' raise_exception and strftime_now). Each follows the Python/Jinja function it
// is named after, argument names and defaults included.
#include <algorithm>
#include <charconv>
#include <cmath>
#include <ctime>
#include <optional>
#include <string>
#include <vector>

#include "template/jinja_interp.h"
#include "template/jinja_search.h"

namespace kestrel::jinja {
namespace {

using Bound = std::vector<std::optional<Value>>;

Status type_error(const std::string& what, const Value& v) {
  return Status::error(what + ", not " + type_name(v));
}

Result<std::string> want_string(const Value& v, const std::string& what) {
  if (v.is_string()) return v.as_string();
  if (v.is_undefined()) return undefined_error(v);
  return type_error(what + " must be a string", v);
}

Result<int64_t> want_int(const Value& v, const std::string& what) {
  if (v.is_integral()) return v.as_integral();
  if (v.is_undefined()) return undefined_error(v);
  return type_error(what + " must be an integer", v);
}

// Jinja's soft_str: what str() gives, undefined as "".
std::string soft_str(const Value& v) {
  return v.is_string() ? v.as_string() : to_str(v);
}

Result<size_t> py_len(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::string:
      return utf8_length(v.as_string());
    case Value::Kind::list:
      if (v.is_generator()) return Status::error("object of type 'generator' has no len()");
      return v.as_list().items.size();
    case Value::Kind::dict:
      return v.as_dict().entries.size();
    case Value::Kind::undefined:
      return size_t{0};
    default:
      return Status::error("object of type '" + type_name(v) + "' has no len()");
  }
}

// Jinja's make_attrgetter: "a.b.0" walks getitem one part at a time, digits as indexes.
Result<Value> get_path(Interpreter& in, const Value& item, const Value& attribute) {
  if (attribute.is_integral()) return in.get_item(item, attribute);
  KS_ASSIGN_OR_RETURN(std::string path, want_string(attribute, "attribute"));
  Value cur = item;
  size_t start = 0;
  while (true) {
    const size_t dot = path.find('.', start);
    const std::string part = path.substr(start, dot == std::string::npos ? dot : dot - start);
    Value key = Value::string(part);
    if (!part.empty() &&
        std::all_of(part.begin(), part.end(), [](char c) { return c >= '0' && c <= '9'; })) {
      int64_t idx = 0;
      if (std::from_chars(part.data(), part.data() + part.size(), idx).ec == std::errc()) {
        key = Value::integer(idx);
      }
    }
    KS_ASSIGN_OR_RETURN(cur, in.get_item(cur, key));
    if (dot == std::string::npos) return cur;
    start = dot + 1;
  }
}

Value ignore_case(const Value& v) {
  return v.is_string() ? Value::string(py_lower(v.as_string())) : v;
}

// Stable sort by a key with Python's `<`; the first comparison error is returned.
Status sort_values(std::vector<Value>& values, const std::vector<Value>& keys, bool reverse) {
  std::vector<size_t> order(values.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  Status error = Status::ok();
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    if (!error.is_ok()) return false;
    Result<int> c = reverse ? compare(keys[b], keys[a]) : compare(keys[a], keys[b]);
    if (!c.is_ok()) {
      error = c.status();
      return false;
    }
    return c.value() < 0;
  });
  KS_RETURN_IF_ERROR(error);
  std::vector<Value> sorted;
  sorted.reserve(values.size());
  for (size_t i : order) sorted.push_back(std::move(values[i]));
  values = std::move(sorted);
  return Status::ok();
}

// ---- Python string helpers -------------------------------------------------------------------

bool is_line_break(char32_t c) {
  return c == '\n' || c == '\r' || c == 0x0b || c == 0x0c || c == 0x1c || c == 0x1d || c == 0x1e ||
         c == 0x85 || c == 0x2028 || c == 0x2029;
}

// The parts of a split, each charged to the work budget as it is made (kStringItemBytes plus
// its text), so that splitting a long string into one-character parts stops at the budget
// instead of building every part first: a 16 MB string held ~0.5 GB of parts before the charge.
class SplitParts {
 public:
  explicit SplitParts(Interpreter& in) : in_(in) {}
  Status add(std::string part) {
    KS_RETURN_IF_ERROR(in_.charge_work(kStringItemBytes + part.size()));
    parts_.push_back(std::move(part));
    return Status::ok();
  }
  size_t size() const { return parts_.size(); }
  void reverse() { std::reverse(parts_.begin(), parts_.end()); }
  std::vector<std::string> take() { return std::move(parts_); }

 private:
  Interpreter& in_;
  std::vector<std::string> parts_;
};

Result<std::vector<std::string>> py_splitlines(Interpreter& in, const std::string& s,
                                               bool keepends) {
  SplitParts lines(in);
  const std::u32string cps = decode_utf8(s);
  size_t start = 0, i = 0;
  while (i < cps.size()) {
    if (!is_line_break(cps[i])) {
      ++i;
      continue;
    }
    size_t eol = i + 1;
    if (cps[i] == '\r' && eol < cps.size() && cps[eol] == '\n') ++eol;
    KS_RETURN_IF_ERROR(lines.add(
        encode_utf8(std::u32string_view(cps).substr(start, (keepends ? eol : i) - start))));
    start = i = eol;
  }
  if (start < cps.size()) {
    KS_RETURN_IF_ERROR(lines.add(encode_utf8(std::u32string_view(cps).substr(start))));
  }
  return lines.take();
}

// str.split / str.rsplit.
Result<std::vector<std::string>> py_split(Interpreter& in, const std::string& s,
                                          const std::string* sep, int64_t maxsplit,
                                          bool from_right) {
  SplitParts parts(in);
  auto below_max = [&] { return maxsplit < 0 || static_cast<int64_t>(parts.size()) < maxsplit; };
  if (sep) {
    const Searcher<char> search(*sep);
    if (!from_right) {
      size_t start = 0;
      while (below_max()) {
        const size_t p = search.find(s, start);
        if (p == std::string::npos) break;
        KS_RETURN_IF_ERROR(parts.add(s.substr(start, p - start)));
        start = p + sep->size();
      }
      KS_RETURN_IF_ERROR(parts.add(s.substr(start)));
    } else {
      size_t end = s.size();
      while (below_max()) {
        if (end < sep->size()) break;
        const size_t p = search.rfind(s, end);
        if (p == std::string::npos) break;
        KS_RETURN_IF_ERROR(parts.add(s.substr(p + sep->size(), end - p - sep->size())));
        end = p;
      }
      KS_RETURN_IF_ERROR(parts.add(s.substr(0, end)));
      parts.reverse();
    }
    return parts.take();
  }
  const std::u32string cps = decode_utf8(s);
  const std::u32string_view view(cps);
  const size_t n = cps.size();
  if (!from_right) {
    size_t i = 0;
    while (true) {
      while (i < n && is_py_space(cps[i])) ++i;
      if (i >= n) break;
      if (!below_max()) {
        KS_RETURN_IF_ERROR(parts.add(encode_utf8(view.substr(i))));
        break;
      }
      size_t j = i;
      while (j < n && !is_py_space(cps[j])) ++j;
      KS_RETURN_IF_ERROR(parts.add(encode_utf8(view.substr(i, j - i))));
      i = j;
    }
  } else {
    size_t i = n;
    while (true) {
      while (i > 0 && is_py_space(cps[i - 1])) --i;
      if (i == 0) break;
      if (!below_max()) {
        KS_RETURN_IF_ERROR(parts.add(encode_utf8(view.substr(0, i))));
        break;
      }
      size_t j = i;
      while (j > 0 && !is_py_space(cps[j - 1])) --j;
      KS_RETURN_IF_ERROR(parts.add(encode_utf8(view.substr(j, i - j))));
      i = j;
    }
    parts.reverse();
  }
  return parts.take();
}

Result<std::string> py_replace(Interpreter& in, const std::string& s, const std::string& old,
                               const std::string& repl, int64_t count) {
  std::string out;
  if (old.empty()) {
    // Python inserts the replacement before every character and at the end.
    const std::u32string cps = decode_utf8(s);
    int64_t done = 0;
    for (char32_t c : cps) {
      if (count < 0 || done < count) {
        out += repl;
        ++done;
      }
      append_utf8(out, c);
      KS_RETURN_IF_ERROR(in.check_growing_size(out.size()));
    }
    if (count < 0 || done < count) out += repl;
    KS_RETURN_IF_ERROR(in.check_string_size(out.size()));
    return out;
  }
  const Searcher<char> search(old);
  size_t start = 0;
  int64_t done = 0;
  while (count < 0 || done < count) {
    const size_t p = search.find(s, start);
    if (p == std::string::npos) break;
    out.append(s, start, p - start);
    out += repl;
    start = p + old.size();
    ++done;
    if (repl.size() > old.size()) KS_RETURN_IF_ERROR(in.check_growing_size(out.size()));
  }
  out.append(s, start, std::string::npos);
  KS_RETURN_IF_ERROR(in.check_string_size(out.size()));
  return out;
}

std::string py_capitalize(const std::string& s) {
  const std::u32string cps = decode_utf8(s);
  std::string out;
  for (size_t i = 0; i < cps.size(); ++i) {
    append_utf8(out, i == 0 ? to_upper_char(cps[i]) : to_lower_char(cps[i]));
  }
  return out;
}

// Python's str.title(): a letter after a non-letter is upper-cased, every other letter lowered.
std::string py_title(const std::string& s) {
  std::string out;
  bool prev_cased = false;
  for (char32_t c : decode_utf8(s)) {
    const bool cased = is_cased_upper(c) || is_cased_lower(c);
    append_utf8(out, cased ? (prev_cased ? to_lower_char(c) : to_upper_char(c)) : c);
    prev_cased = cased;
  }
  return out;
}

bool is_word_char(char32_t c) {
  if (c < 0x80)
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
  return !is_py_space(c) && !(c >= 0x2000 && c <= 0x206f) && !(c >= 0x3000 && c <= 0x303f) &&
         !(c >= 0xff00 && c <= 0xff0f) && c != 0xa0 && !(c >= 0x80 && c <= 0xbf);
}

bool is_alpha_char(char32_t c) {
  if (c < 0x80) return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
  return is_cased_upper(c) || is_cased_lower(c) || c == 0xaa || c == 0xba ||
         (c >= 0x5d0 && c <= 0x5ea) || (c >= 0x620 && c <= 0x64a) ||
         (c >= 0x3041 && c <= 0x30ff && c != 0x30fb) || (c >= 0x3400 && c <= 0x4dbf) ||
         (c >= 0x4e00 && c <= 0x9fff) || (c >= 0xac00 && c <= 0xd7a3);
}

// Code-point positions of `sub` in `s` within [start, end) (Python's str.find family).
struct CodePointRange {
  std::u32string text;
  int64_t start = 0, end = 0;
};

Result<CodePointRange> find_range(const std::string& s, const Bound& b, size_t start_index) {
  CodePointRange r;
  r.text = decode_utf8(s);
  const int64_t n = static_cast<int64_t>(r.text.size());
  auto adjust = [&](const std::optional<Value>& v, int64_t dflt) -> Result<int64_t> {
    if (!v || v->is_none()) return dflt;
    KS_ASSIGN_OR_RETURN(int64_t x, want_int(*v, "slice index"));
    if (x < 0) x = std::max<int64_t>(0, x + n);
    return std::min(x, n);
  };
  KS_ASSIGN_OR_RETURN(r.start, adjust(b[start_index], 0));
  KS_ASSIGN_OR_RETURN(r.end, adjust(b[start_index + 1], n));
  return r;
}

// ---- methods ------------------------------------------------------------------------------

using MethodFunction = Result<Value> (*)(Interpreter&, const Value& self, CallArgs& args);

Result<Value> m_strip_impl(const Value& self, CallArgs& a, const char* name, bool l, bool r) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, name, {"chars"}, 0));
  if (b[0] && !b[0]->is_none()) {
    KS_ASSIGN_OR_RETURN(std::string chars, want_string(*b[0], "strip chars"));
    return Value::string(py_strip(self.as_string(), &chars, l, r));
  }
  return Value::string(py_strip(self.as_string(), nullptr, l, r));
}
Result<Value> m_strip(Interpreter&, const Value& s, CallArgs& a) {
  return m_strip_impl(s, a, "strip", true, true);
}
Result<Value> m_lstrip(Interpreter&, const Value& s, CallArgs& a) {
  return m_strip_impl(s, a, "lstrip", true, false);
}
Result<Value> m_rstrip(Interpreter&, const Value& s, CallArgs& a) {
  return m_strip_impl(s, a, "rstrip", false, true);
}

Result<Value> split_impl(Interpreter& in, const Value& self, CallArgs& a, bool from_right) {
  KS_ASSIGN_OR_RETURN(Bound b,
                      bind_args(a, from_right ? "rsplit" : "split", {"sep", "maxsplit"}, 0));
  int64_t maxsplit = -1;
  if (b[1]) {
    KS_ASSIGN_OR_RETURN(maxsplit, want_int(*b[1], "maxsplit"));
  }
  std::optional<std::string> sep;
  if (b[0] && !b[0]->is_none()) {
    KS_ASSIGN_OR_RETURN(sep, want_string(*b[0], "separator"));
    if (sep->empty()) return Status::error("empty separator");
  }
  KS_RETURN_IF_ERROR(in.charge_work(self.as_string().size()));
  KS_ASSIGN_OR_RETURN(std::vector<std::string> parts,
                      py_split(in, self.as_string(), sep ? &*sep : nullptr, maxsplit, from_right));
  std::vector<Value> items;
  items.reserve(parts.size());
  for (auto& p : parts) items.push_back(Value::string(std::move(p)));
  return Value::list(std::move(items));
}
Result<Value> m_split(Interpreter& in, const Value& s, CallArgs& a) {
  return split_impl(in, s, a, false);
}
Result<Value> m_rsplit(Interpreter& in, const Value& s, CallArgs& a) {
  return split_impl(in, s, a, true);
}

Result<Value> m_splitlines(Interpreter& in, const Value& self, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "splitlines", {"keepends"}, 0));
  KS_RETURN_IF_ERROR(in.charge_work(self.as_string().size()));
  KS_ASSIGN_OR_RETURN(std::vector<std::string> lines,
                      py_splitlines(in, self.as_string(), b[0] && truthy(*b[0])));
  std::vector<Value> items;
  items.reserve(lines.size());
  for (auto& l : lines) items.push_back(Value::string(std::move(l)));
  return Value::list(std::move(items));
}

Result<Value> affix_impl(const Value& self, CallArgs& a, bool prefix) {
  const char* name = prefix ? "startswith" : "endswith";
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, name, {"affix", "start", "end"}, 1));
  std::vector<std::string> affixes;
  if (b[0]->is_list() && b[0]->as_list().is_tuple) {
    for (const Value& v : b[0]->as_list().items) {
      KS_ASSIGN_OR_RETURN(std::string s, want_string(v, std::string(name) + " tuple item"));
      affixes.push_back(std::move(s));
    }
  } else {
    KS_ASSIGN_OR_RETURN(std::string s, want_string(*b[0], std::string(name) + " argument"));
    affixes.push_back(std::move(s));
  }
  std::string text = self.as_string();
  if (b[1] || b[2]) {
    KS_ASSIGN_OR_RETURN(CodePointRange r, find_range(text, b, 1));
    if (r.start > r.end) return Value::boolean(false);
    text = encode_utf8(std::u32string_view(r.text).substr(r.start, r.end - r.start));
  }
  for (const auto& x : affixes) {
    if (x.size() > text.size()) continue;
    if (prefix ? text.compare(0, x.size(), x) == 0
               : text.compare(text.size() - x.size(), x.size(), x) == 0) {
      return Value::boolean(true);
    }
  }
  return Value::boolean(false);
}
Result<Value> m_startswith(Interpreter&, const Value& s, CallArgs& a) {
  return affix_impl(s, a, true);
}
Result<Value> m_endswith(Interpreter&, const Value& s, CallArgs& a) {
  return affix_impl(s, a, false);
}

Result<Value> m_replace(Interpreter& in, const Value& self, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "replace", {"old", "new", "count"}, 2));
  KS_ASSIGN_OR_RETURN(std::string old, want_string(*b[0], "replace() argument 1"));
  KS_ASSIGN_OR_RETURN(std::string repl, want_string(*b[1], "replace() argument 2"));
  int64_t count = -1;
  if (b[2]) {
    KS_ASSIGN_OR_RETURN(count, want_int(*b[2], "replace() count"));
  }
  KS_ASSIGN_OR_RETURN(std::string out, py_replace(in, self.as_string(), old, repl, count));
  return Value::string(std::move(out));
}

Result<Value> no_args(CallArgs& a, const char* name) {
  KS_RETURN_IF_ERROR(bind_args(a, name, {}, 0).status());
  return Value();
}

Result<Value> m_upper(Interpreter&, const Value& s, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "upper").status());
  return Value::string(py_upper(s.as_string()));
}
Result<Value> m_lower(Interpreter&, const Value& s, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "lower").status());
  return Value::string(py_lower(s.as_string()));
}
Result<Value> m_title(Interpreter&, const Value& s, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "title").status());
  return Value::string(py_title(s.as_string()));
}
Result<Value> m_capitalize(Interpreter&, const Value& s, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "capitalize").status());
  return Value::string(py_capitalize(s.as_string()));
}

Result<Value> find_impl(const Value& self, CallArgs& a, const char* name, bool reverse,
                        bool raise) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, name, {"sub", "start", "end"}, 1));
  KS_ASSIGN_OR_RETURN(std::string sub, want_string(*b[0], std::string(name) + " argument"));
  KS_ASSIGN_OR_RETURN(CodePointRange r, find_range(self.as_string(), b, 1));
  const std::u32string needle = decode_utf8(sub);
  int64_t found = -1;
  if (r.start <= r.end && static_cast<int64_t>(needle.size()) <= r.end - r.start) {
    const std::u32string_view hay = std::u32string_view(r.text).substr(r.start, r.end - r.start);
    const Searcher<char32_t> search(needle);
    const size_t p = reverse ? search.rfind(hay) : search.find(hay);
    if (p != std::u32string_view::npos) found = r.start + static_cast<int64_t>(p);
  }
  if (found < 0 && raise) return Status::error(std::string(name) + "(): substring not found");
  return Value::integer(found);
}
Result<Value> m_find(Interpreter&, const Value& s, CallArgs& a) {
  return find_impl(s, a, "find", false, false);
}
Result<Value> m_rfind(Interpreter&, const Value& s, CallArgs& a) {
  return find_impl(s, a, "rfind", true, false);
}
Result<Value> m_index(Interpreter&, const Value& s, CallArgs& a) {
  return find_impl(s, a, "index", false, true);
}
Result<Value> m_rindex(Interpreter&, const Value& s, CallArgs& a) {
  return find_impl(s, a, "rindex", true, true);
}

Result<Value> m_str_count(Interpreter&, const Value& self, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "count", {"sub", "start", "end"}, 1));
  KS_ASSIGN_OR_RETURN(std::string sub, want_string(*b[0], "count argument"));
  KS_ASSIGN_OR_RETURN(CodePointRange r, find_range(self.as_string(), b, 1));
  if (r.start > r.end) return Value::integer(0);
  const std::u32string needle = decode_utf8(sub);
  const std::u32string_view hay = std::u32string_view(r.text).substr(r.start, r.end - r.start);
  if (needle.empty()) return Value::integer(static_cast<int64_t>(hay.size()) + 1);
  int64_t count = 0;
  const Searcher<char32_t> search(needle);
  for (size_t p = search.find(hay); p != std::u32string_view::npos;
       p = search.find(hay, p + needle.size())) {
    ++count;
  }
  return Value::integer(count);
}

Result<Value> m_join(Interpreter& in, const Value& self, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "join", {"iterable"}, 1));
  KS_ASSIGN_OR_RETURN(std::vector<Value> items, in.iterate(*b[0]));
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) {
    if (!items[i].is_string()) {
      return Status::error("sequence item " + std::to_string(i) + ": expected str instance, " +
                           type_name(items[i]) + " found");
    }
    if (i) out += self.as_string();
    out += items[i].as_string();
    KS_RETURN_IF_ERROR(in.check_growing_size(out.size()));
  }
  KS_RETURN_IF_ERROR(in.check_string_size(out.size()));
  return Value::string(std::move(out));
}

template <bool (*Pred)(char32_t)>
Result<Value> char_class(Interpreter&, const Value& self, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "is...").status());
  const std::u32string cps = decode_utf8(self.as_string());
  if (cps.empty()) return Value::boolean(false);
  for (char32_t c : cps) {
    if (!Pred(c)) return Value::boolean(false);
  }
  return Value::boolean(true);
}
bool pred_digit(char32_t c) {
  return c >= '0' && c <= '9';
}
bool pred_alpha(char32_t c) {
  return is_alpha_char(c);
}
bool pred_alnum(char32_t c) {
  return is_alpha_char(c) || pred_digit(c);
}
bool pred_space(char32_t c) {
  return is_py_space(c);
}

Result<Value> case_check(const Value& self, CallArgs& a, bool upper) {
  KS_RETURN_IF_ERROR(no_args(a, upper ? "isupper" : "islower").status());
  bool any_cased = false;
  for (char32_t c : decode_utf8(self.as_string())) {
    if (upper ? is_cased_lower(c) : is_cased_upper(c)) return Value::boolean(false);
    any_cased = any_cased || is_cased_upper(c) || is_cased_lower(c);
  }
  return Value::boolean(any_cased);
}
Result<Value> m_isupper(Interpreter&, const Value& s, CallArgs& a) {
  return case_check(s, a, true);
}
Result<Value> m_islower(Interpreter&, const Value& s, CallArgs& a) {
  return case_check(s, a, false);
}

Result<Value> pad_impl(Interpreter& in, const Value& self, CallArgs& a, const char* name,
                       int align) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, name, {"width", "fillchar"}, 1));
  KS_ASSIGN_OR_RETURN(int64_t width, want_int(*b[0], "width"));
  std::string fill = " ";
  if (b[1]) {
    KS_ASSIGN_OR_RETURN(fill, want_string(*b[1], "fillchar"));
    if (utf8_length(fill) != 1)
      return Status::error("the fill character must be exactly one character long");
  }
  const std::string& s = self.as_string();
  const int64_t len = static_cast<int64_t>(utf8_length(s));
  if (width <= len) return self;
  KS_RETURN_IF_ERROR(in.check_string_size(static_cast<uint64_t>(width) * fill.size()));
  const int64_t pad = width - len;
  int64_t left = align < 0 ? 0 : align > 0 ? pad : pad / 2 + (pad & width & 1);
  std::string out;
  for (int64_t i = 0; i < left; ++i) out += fill;
  out += s;
  for (int64_t i = 0; i < pad - left; ++i) out += fill;
  return Value::string(std::move(out));
}
Result<Value> m_center(Interpreter& in, const Value& s, CallArgs& a) {
  return pad_impl(in, s, a, "center", 0);
}
Result<Value> m_ljust(Interpreter& in, const Value& s, CallArgs& a) {
  return pad_impl(in, s, a, "ljust", -1);
}
Result<Value> m_rjust(Interpreter& in, const Value& s, CallArgs& a) {
  return pad_impl(in, s, a, "rjust", 1);
}

Result<Value> m_zfill(Interpreter& in, const Value& self, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "zfill", {"width"}, 1));
  KS_ASSIGN_OR_RETURN(int64_t width, want_int(*b[0], "width"));
  const std::string& s = self.as_string();
  const int64_t len = static_cast<int64_t>(utf8_length(s));
  if (width <= len) return self;
  KS_RETURN_IF_ERROR(in.check_string_size(static_cast<uint64_t>(width)));
  const bool sign = !s.empty() && (s[0] == '+' || s[0] == '-');
  std::string out = sign ? s.substr(0, 1) : "";
  out.append(static_cast<size_t>(width - len), '0');
  out += sign ? s.substr(1) : s;
  return Value::string(std::move(out));
}

Result<Value> partition_impl(const Value& self, CallArgs& a, bool reverse) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, reverse ? "rpartition" : "partition", {"sep"}, 1));
  KS_ASSIGN_OR_RETURN(std::string sep, want_string(*b[0], "separator"));
  if (sep.empty()) return Status::error("empty separator");
  const std::string& s = self.as_string();
  const Searcher<char> search(sep);
  const size_t p = reverse ? search.rfind(s) : search.find(s);
  std::vector<Value> parts;
  if (p == std::string::npos) {
    parts = reverse ? std::vector<Value>{Value::string(""), Value::string(""), self}
                    : std::vector<Value>{self, Value::string(""), Value::string("")};
  } else {
    parts = {Value::string(s.substr(0, p)), Value::string(sep),
             Value::string(s.substr(p + sep.size()))};
  }
  return Value::list(std::move(parts), true);
}
Result<Value> m_partition(Interpreter&, const Value& s, CallArgs& a) {
  return partition_impl(s, a, false);
}
Result<Value> m_rpartition(Interpreter&, const Value& s, CallArgs& a) {
  return partition_impl(s, a, true);
}

Result<Value> remove_affix(const Value& self, CallArgs& a, bool prefix) {
  KS_ASSIGN_OR_RETURN(Bound b,
                      bind_args(a, prefix ? "removeprefix" : "removesuffix", {"affix"}, 1));
  KS_ASSIGN_OR_RETURN(std::string x, want_string(*b[0], "argument"));
  const std::string& s = self.as_string();
  if (x.size() > s.size()) return self;
  if (prefix && s.compare(0, x.size(), x) == 0) return Value::string(s.substr(x.size()));
  if (!prefix && s.compare(s.size() - x.size(), x.size(), x) == 0) {
    return Value::string(s.substr(0, s.size() - x.size()));
  }
  return self;
}
Result<Value> m_removeprefix(Interpreter&, const Value& s, CallArgs& a) {
  return remove_affix(s, a, true);
}
Result<Value> m_removesuffix(Interpreter&, const Value& s, CallArgs& a) {
  return remove_affix(s, a, false);
}

Result<Value> m_dict_get(Interpreter&, const Value& self, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "get", {"key", "default"}, 1));
  if (b[0]->is_list() || b[0]->is_dict()) {
    return Status::error("unhashable type: '" + type_name(*b[0]) + "'");
  }
  if (const Value* v = self.as_dict().find(*b[0])) return *v;
  return b[1] ? *b[1] : Value::none();
}
Result<Value> m_dict_items(Interpreter& in, const Value& self, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "items").status());
  std::vector<Value> items;
  KS_RETURN_IF_ERROR(in.charge_work(self.as_dict().entries.size() * kPairItemBytes));
  for (const auto& [k, v] : self.as_dict().entries) items.push_back(Value::list({k, v}, true));
  return Value::dict_view(std::move(items), ListView::dict_items);
}
Result<Value> m_dict_keys(Interpreter& in, const Value& self, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "keys").status());
  KS_ASSIGN_OR_RETURN(std::vector<Value> keys, in.iterate(self));
  return Value::dict_view(std::move(keys), ListView::dict_keys);
}
Result<Value> m_dict_values(Interpreter&, const Value& self, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "values").status());
  std::vector<Value> values;
  for (const auto& [k, v] : self.as_dict().entries) values.push_back(v);
  return Value::dict_view(std::move(values), ListView::dict_values);
}
Result<Value> m_copy(Interpreter&, const Value& self, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "copy").status());
  return self;  // values are immutable, so a copy may share them
}
Result<Value> m_list_count(Interpreter&, const Value& self, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "count", {"value"}, 1));
  int64_t n = 0;
  for (const Value& v : self.as_list().items) n += equals(v, *b[0]) ? 1 : 0;
  return Value::integer(n);
}
Result<Value> m_list_index(Interpreter&, const Value& self, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "index", {"value"}, 1));
  const auto& items = self.as_list().items;
  for (size_t i = 0; i < items.size(); ++i) {
    if (equals(items[i], *b[0])) return Value::integer(static_cast<int64_t>(i));
  }
  return Status::error(repr(*b[0]) + " is not in list");
}

struct MethodEntry {
  const char* name;
  MethodFunction function;
};

constexpr MethodEntry kStringMethods[] = {
    {"strip", m_strip},
    {"lstrip", m_lstrip},
    {"rstrip", m_rstrip},
    {"split", m_split},
    {"rsplit", m_rsplit},
    {"splitlines", m_splitlines},
    {"startswith", m_startswith},
    {"endswith", m_endswith},
    {"replace", m_replace},
    {"upper", m_upper},
    {"lower", m_lower},
    {"title", m_title},
    {"capitalize", m_capitalize},
    {"find", m_find},
    {"rfind", m_rfind},
    {"index", m_index},
    {"rindex", m_rindex},
    {"count", m_str_count},
    {"join", m_join},
    {"isdigit", char_class<pred_digit>},
    {"isdecimal", char_class<pred_digit>},
    {"isnumeric", char_class<pred_digit>},
    {"isalpha", char_class<pred_alpha>},
    {"isalnum", char_class<pred_alnum>},
    {"isspace", char_class<pred_space>},
    {"isupper", m_isupper},
    {"islower", m_islower},
    {"center", m_center},
    {"ljust", m_ljust},
    {"rjust", m_rjust},
    {"zfill", m_zfill},
    {"partition", m_partition},
    {"rpartition", m_rpartition},
    {"removeprefix", m_removeprefix},
    {"removesuffix", m_removesuffix},
};
// Real str methods this interpreter does not implement: calling one is a clear error.
constexpr const char* kUnsupportedStringMethods[] = {
    "format",    "format_map", "encode",  "casefold",     "swapcase",    "expandtabs",
    "translate", "maketrans",  "istitle", "isidentifier", "isprintable", "isascii"};

constexpr MethodEntry kDictMethods[] = {{"get", m_dict_get},
                                        {"items", m_dict_items},
                                        {"keys", m_dict_keys},
                                        {"values", m_dict_values},
                                        {"copy", m_copy}};
constexpr const char* kUnsafeDictMethods[] = {"pop",    "popitem", "setdefault",
                                              "update", "clear",   "fromkeys"};

constexpr MethodEntry kListMethods[] = {
    {"count", m_list_count}, {"index", m_list_index}, {"copy", m_copy}};
constexpr const char* kUnsafeListMethods[] = {"append", "extend",  "insert", "pop",
                                              "remove", "reverse", "sort",   "clear"};

template <size_t N>
const MethodEntry* find_method(const MethodEntry (&table)[N], const std::string& name) {
  for (const auto& m : table) {
    if (name == m.name) return &m;
  }
  return nullptr;
}

template <size_t N>
bool in_list(const char* const (&names)[N], std::string_view name) {
  for (const char* n : names) {
    if (name == n) return true;
  }
  return false;
}

Value bind(const Value& self, const MethodEntry& m) {
  const MethodFunction fn = m.function;
  return Value::callable(type_name(self) + "." + m.name,
                         [self, fn](Interpreter& in, CallArgs& args) -> Result<Value> {
                           KS_RETURN_IF_ERROR(in.charge_call(self, args));
                           KS_ASSIGN_OR_RETURN(Value v, fn(in, self, args));
                           KS_RETURN_IF_ERROR(in.check_result(v));
                           return v;
                         });
}

// ---- filters ------------------------------------------------------------------------------

Result<Value> f_abs(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "abs").status());
  if (v.is_float()) return Value::floating(std::fabs(v.as_float()));
  if (v.is_integral()) {
    if (v.as_integral() == INT64_MIN) return Status::error("integer overflow in abs()");
    return Value::integer(std::llabs(v.as_integral()));
  }
  if (v.is_undefined()) return undefined_error(v);
  return Status::error("bad operand type for abs(): '" + type_name(v) + "'");
}

Result<Value> f_attr(Interpreter&, const Value& v, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "attr", {"name"}, 1));
  KS_ASSIGN_OR_RETURN(std::string name, want_string(*b[0], "attribute name"));
  if (v.is_namespace()) {
    if (const Value* x = v.as_namespace().find(name)) return *x;
  } else if (auto m = bound_method(v, name)) {
    return *m;
  }
  return Value::undefined("'" + type_name(v) + " object' has no attribute '" + name + "'");
}

Result<Value> f_batch(Interpreter& in, const Value& v, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "batch", {"linecount", "fill_with"}, 1));
  KS_ASSIGN_OR_RETURN(int64_t n, want_int(*b[0], "linecount"));
  if (n <= 0) return Status::error("batch(): linecount must be positive");
  KS_ASSIGN_OR_RETURN(std::vector<Value> items, in.iterate(v));
  std::vector<Value> batches;
  std::vector<Value> cur;
  for (Value& item : items) {
    cur.push_back(std::move(item));
    if (static_cast<int64_t>(cur.size()) == n) {
      batches.push_back(Value::list(std::move(cur)));
      cur.clear();
    }
  }
  if (!cur.empty()) {
    if (b[1] && !b[1]->is_none()) {
      while (static_cast<int64_t>(cur.size()) < n) cur.push_back(*b[1]);
    }
    batches.push_back(Value::list(std::move(cur)));
  }
  return Value::generator(std::move(batches));
}

Result<Value> f_capitalize(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "capitalize").status());
  return Value::string(py_capitalize(soft_str(v)));
}

Result<Value> f_center(Interpreter& in, const Value& v, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "center", {"width"}, 0));
  CallArgs pass;
  pass.positional.push_back(b[0] ? *b[0] : Value::integer(80));
  return m_center(in, Value::string(soft_str(v)), pass);
}

Result<Value> f_length(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "length").status());
  KS_ASSIGN_OR_RETURN(size_t n, py_len(v));
  return Value::integer(static_cast<int64_t>(n));
}

Result<Value> f_default(Interpreter&, const Value& v, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "default", {"default_value", "boolean"}, 0));
  const bool boolean = b[1] && truthy(*b[1]);
  if (v.is_undefined() || (boolean && !truthy(v))) return b[0] ? *b[0] : Value::string("");
  return v;
}

Result<Value> f_dictsort(Interpreter&, const Value& v, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "dictsort", {"case_sensitive", "by", "reverse"}, 0));
  if (!v.is_dict()) return type_error("dictsort() needs a mapping", v);
  const bool case_sensitive = b[0] && truthy(*b[0]);
  std::string by = "key";
  if (b[1]) {
    KS_ASSIGN_OR_RETURN(by, want_string(*b[1], "dictsort by"));
  }
  if (by != "key" && by != "value") {
    return Status::error("dictsort(): you can only sort by either 'key' or 'value'");
  }
  std::vector<Value> pairs, keys;
  for (const auto& [k, val] : v.as_dict().entries) {
    pairs.push_back(Value::list({k, val}, true));
    const Value& key = by == "key" ? k : val;
    keys.push_back(case_sensitive ? key : ignore_case(key));
  }
  KS_RETURN_IF_ERROR(sort_values(pairs, keys, b[2] && truthy(*b[2])));
  return Value::list(std::move(pairs));
}

Result<Value> f_escape(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "escape").status());
  std::string out;
  for (char c : soft_str(v)) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&#34;";
        break;
      case '\'':
        out += "&#39;";
        break;
      default:
        out.push_back(c);
    }
  }
  return Value::string(std::move(out));
}

Result<Value> f_first(Interpreter& in, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "first").status());
  KS_ASSIGN_OR_RETURN(std::vector<Value> items, in.iterate(v));
  if (items.empty()) return Value::undefined("no first item, sequence was empty");
  return items.front();
}

Result<Value> f_last(Interpreter& in, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "last").status());
  if (v.is_generator()) return Status::error("'generator' object is not reversible");
  KS_ASSIGN_OR_RETURN(std::vector<Value> items, in.iterate(v));
  if (items.empty()) return Value::undefined("no last item, sequence was empty");
  return items.back();
}

// Python's float() of a string: surrounding whitespace, underscores between digits, inf/nan.
std::optional<double> parse_py_float(const std::string& text) {
  std::string s = py_strip(text, nullptr, true, true);
  std::string clean;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '_') {
      if (i == 0 || i + 1 >= s.size() || !std::isdigit(static_cast<unsigned char>(s[i - 1])) ||
          !std::isdigit(static_cast<unsigned char>(s[i + 1]))) {
        return std::nullopt;
      }
      continue;
    }
    clean.push_back(s[i]);
  }
  std::string lower = py_lower(clean);
  const bool neg = !lower.empty() && lower[0] == '-';
  const std::string body =
      (!lower.empty() && (lower[0] == '-' || lower[0] == '+')) ? lower.substr(1) : lower;
  if (body == "inf" || body == "infinity") return neg ? -HUGE_VAL : HUGE_VAL;
  if (body == "nan") return std::nan("");
  if (body.empty()) return std::nullopt;
  const char* begin = clean.data() + (clean[0] == '+' ? 1 : 0);
  double d = 0;
  auto r = std::from_chars(begin, clean.data() + clean.size(), d);
  if (r.ptr != clean.data() + clean.size()) return std::nullopt;
  if (r.ec == std::errc::result_out_of_range) {
    const bool tiny = lower.find("e-") != std::string::npos;
    return tiny ? (neg ? -0.0 : 0.0) : (neg ? -HUGE_VAL : HUGE_VAL);
  }
  if (r.ec != std::errc()) return std::nullopt;
  return d;
}

// Python's int(text, base).
std::optional<int64_t> parse_py_int(const std::string& text, int64_t base) {
  std::string s = py_strip(text, nullptr, true, true);
  bool neg = false;
  size_t i = 0;
  if (i < s.size() && (s[i] == '+' || s[i] == '-')) neg = s[i++] == '-';
  if (base == 0 || base == 16 || base == 8 || base == 2) {
    if (i + 1 < s.size() && s[i] == '0') {
      const char p = static_cast<char>(s[i + 1] | 0x20);
      const int64_t prefixed = p == 'x' ? 16 : p == 'o' ? 8 : p == 'b' ? 2 : 0;
      if (prefixed && (base == 0 || base == prefixed)) {
        base = prefixed;
        i += 2;
        if (i < s.size() && s[i] == '_') ++i;
      }
    }
    if (base == 0) base = 10;
  }
  if (base < 2 || base > 36 || i >= s.size()) return std::nullopt;
  uint64_t value = 0;
  bool any = false;
  for (; i < s.size(); ++i) {
    const char c = s[i];
    if (c == '_' && any && i + 1 < s.size() && s[i + 1] != '_') continue;
    int d = -1;
    if (c >= '0' && c <= '9') d = c - '0';
    if (c >= 'a' && c <= 'z') d = c - 'a' + 10;
    if (c >= 'A' && c <= 'Z') d = c - 'A' + 10;
    if (d < 0 || d >= base) return std::nullopt;
    if (value > (static_cast<uint64_t>(INT64_MAX) - static_cast<uint64_t>(d)) /
                    static_cast<uint64_t>(base)) {
      return std::nullopt;
    }
    value = value * static_cast<uint64_t>(base) + static_cast<uint64_t>(d);
    any = true;
  }
  if (!any) return std::nullopt;
  return neg ? -static_cast<int64_t>(value) : static_cast<int64_t>(value);
}

Result<Value> f_float(Interpreter&, const Value& v, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "float", {"default"}, 0));
  const Value dflt = b[0] ? *b[0] : Value::floating(0.0);
  if (v.is_undefined()) return undefined_error(v);  // float(Undefined) raises in Jinja
  if (v.is_number()) return Value::floating(v.as_number());
  if (v.is_string()) {
    if (auto d = parse_py_float(v.as_string())) return Value::floating(*d);
  }
  return dflt;
}

Result<Value> f_int(Interpreter&, const Value& v, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "int", {"default", "base"}, 0));
  const Value dflt = b[0] ? *b[0] : Value::integer(0);
  int64_t base = 10;
  if (b[1]) {
    KS_ASSIGN_OR_RETURN(base, want_int(*b[1], "base"));
  }
  if (v.is_undefined()) return undefined_error(v);  // int(Undefined) raises in Jinja
  if (v.is_integral()) return Value::integer(v.as_integral());
  if (v.is_float()) {
    const double f = v.as_float();
    if (!std::isfinite(f) || std::fabs(f) >= 9.2e18) return dflt;
    return Value::integer(static_cast<int64_t>(std::trunc(f)));
  }
  if (v.is_string()) {
    if (auto i = parse_py_int(v.as_string(), base)) return Value::integer(*i);
    if (auto d = parse_py_float(v.as_string())) {
      if (std::isfinite(*d) && std::fabs(*d) < 9.2e18) {
        return Value::integer(static_cast<int64_t>(std::trunc(*d)));
      }
    }
  }
  return dflt;
}

Result<Value> f_indent(Interpreter& in, const Value& v, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "indent", {"width", "first", "blank"}, 0));
  std::string indention = "    ";
  if (b[0]) {
    if (b[0]->is_string()) {
      indention = b[0]->as_string();
    } else {
      KS_ASSIGN_OR_RETURN(int64_t w, want_int(*b[0], "indent width"));
      if (w > 4096) return Status::error("indent(): width is too large");
      indention.assign(static_cast<size_t>(std::max<int64_t>(w, 0)), ' ');
    }
  }
  const bool first = b[1] && truthy(*b[1]);
  const bool blank = b[2] && truthy(*b[2]);
  if (!v.is_string()) {
    if (v.is_undefined()) return undefined_error(v);
    return type_error("indent() needs a string", v);
  }
  KS_ASSIGN_OR_RETURN(std::vector<std::string> lines,
                      py_splitlines(in, v.as_string() + "\n", false));
  KS_RETURN_IF_ERROR(
      in.check_string_size(soft_str(v).size() + lines.size() * (indention.size() + 1)));
  std::string out;
  if (blank) {
    for (size_t i = 0; i < lines.size(); ++i) {
      if (i) out += "\n" + indention;
      out += lines[i];
    }
  } else {
    out = lines.empty() ? "" : lines[0];
    for (size_t i = 1; i < lines.size(); ++i) {
      out += "\n";
      if (!lines[i].empty()) out += indention;
      out += lines[i];
    }
  }
  if (first) out = indention + out;
  return Value::string(std::move(out));
}

Result<Value> f_items(Interpreter& in, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "items").status());
  if (v.is_undefined()) return Value::generator({});
  if (!v.is_dict()) return type_error("items() can only get item pairs from a mapping", v);
  KS_RETURN_IF_ERROR(in.charge_work(v.as_dict().entries.size() * kPairItemBytes));
  std::vector<Value> items;
  for (const auto& [k, x] : v.as_dict().entries) items.push_back(Value::list({k, x}, true));
  return Value::generator(std::move(items));
}

Result<Value> f_join(Interpreter& in, const Value& v, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "join", {"d", "attribute"}, 0));
  const std::string sep = b[0] ? soft_str(*b[0]) : "";
  KS_ASSIGN_OR_RETURN(std::vector<Value> items, in.iterate(v));
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) {
    Value item = items[i];
    if (b[1]) {
      KS_ASSIGN_OR_RETURN(item, get_path(in, item, *b[1]));
    }
    if (i) out += sep;
    out += soft_str(item);
    KS_RETURN_IF_ERROR(in.check_growing_size(out.size()));
  }
  KS_RETURN_IF_ERROR(in.check_string_size(out.size()));
  return Value::string(std::move(out));
}

Result<Value> f_list(Interpreter& in, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "list").status());
  KS_ASSIGN_OR_RETURN(std::vector<Value> items, in.iterate(v));
  return Value::list(std::move(items));
}

Result<Value> f_lower(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "lower").status());
  return Value::string(py_lower(soft_str(v)));
}
Result<Value> f_upper(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "upper").status());
  return Value::string(py_upper(soft_str(v)));
}

// Jinja's title filter upper-cases the first character of each word, where words begin after
// a run of whitespace or one of "-({[<", and lower-cases the rest.
Result<Value> f_title(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "title").status());
  const std::u32string cps = decode_utf8(soft_str(v));
  auto is_sep = [](char32_t c) {
    return is_py_space(c) || c == '-' || c == '(' || c == '{' || c == '[' || c == '<';
  };
  std::string out;
  bool word_start = true;
  for (char32_t c : cps) {
    if (is_sep(c)) {
      append_utf8(out, c);
      word_start = true;
    } else {
      append_utf8(out, word_start ? to_upper_char(c) : to_lower_char(c));
      word_start = false;
    }
  }
  return Value::string(std::move(out));
}

Result<Value> f_trim(Interpreter&, const Value& v, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "trim", {"chars"}, 0));
  if (b[0] && !b[0]->is_none()) {
    KS_ASSIGN_OR_RETURN(std::string chars, want_string(*b[0], "trim chars"));
    return Value::string(py_strip(soft_str(v), &chars, true, true));
  }
  return Value::string(py_strip(soft_str(v), nullptr, true, true));
}

Result<Value> f_replace(Interpreter& in, const Value& v, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "replace", {"old", "new", "count"}, 2));
  int64_t count = -1;
  if (b[2] && !b[2]->is_none()) {
    KS_ASSIGN_OR_RETURN(count, want_int(*b[2], "replace count"));
  }
  KS_ASSIGN_OR_RETURN(std::string out,
                      py_replace(in, soft_str(v), soft_str(*b[0]), soft_str(*b[1]), count));
  return Value::string(std::move(out));
}

Result<Value> f_reverse(Interpreter& in, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "reverse").status());
  if (v.is_string()) return slice_value(v, std::nullopt, std::nullopt, -1);
  const bool reversible = v.is_sequence_list() || v.is_dict() || v.is_list();
  KS_ASSIGN_OR_RETURN(std::vector<Value> items, in.iterate(v));
  std::reverse(items.begin(), items.end());
  // reversed() gives an iterator; a generator (not reversible) is listed first, giving a list.
  if (reversible && !v.is_generator()) return Value::generator(std::move(items));
  return Value::list(std::move(items));
}

// Python's round(x, ndigits): correctly rounded, ties to even on the exact binary value.
double py_round(double x, int64_t ndigits) {
  if (!std::isfinite(x)) return x;
  if (ndigits > 300) return x;
  if (ndigits < 0) {
    const double scale = std::pow(10.0, static_cast<double>(-ndigits));
    return std::nearbyint(x / scale) * scale;
  }
  char buf[512];
  auto r =
      std::to_chars(buf, buf + sizeof(buf), x, std::chars_format::fixed, static_cast<int>(ndigits));
  double out = x;
  std::from_chars(buf, r.ptr, out);
  return out;
}

Result<Value> f_round(Interpreter&, const Value& v, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "round", {"precision", "method"}, 0));
  int64_t precision = 0;
  if (b[0]) {
    KS_ASSIGN_OR_RETURN(precision, want_int(*b[0], "precision"));
  }
  std::string method = "common";
  if (b[1]) {
    KS_ASSIGN_OR_RETURN(method, want_string(*b[1], "round method"));
  }
  if (method != "common" && method != "ceil" && method != "floor") {
    return Status::error("round(): method must be 'common', 'ceil' or 'floor'");
  }
  if (!v.is_number()) {
    if (v.is_undefined()) return undefined_error(v);
    return type_error("round() needs a number", v);
  }
  if (method == "common") {
    if (v.is_integral()) return Value::integer(v.as_integral());
    return Value::floating(py_round(v.as_float(), precision));
  }
  const double scale = std::pow(10.0, static_cast<double>(precision));
  const double x = v.as_number() * scale;
  return Value::floating((method == "ceil" ? std::ceil(x) : std::floor(x)) / scale);
}

Result<Value> f_safe(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "safe").status());
  return Value::string(soft_str(v));
}

Result<Value> f_string(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "string").status());
  return Value::string(soft_str(v));
}

Result<Value> add_values(Interpreter& in, const Value& x, const Value& y) {
  if (x.is_integral() && y.is_integral()) {
    int64_t r;
    if (__builtin_add_overflow(x.as_integral(), y.as_integral(), &r)) {
      return Status::error("integer overflow in sum()");
    }
    return Value::integer(r);
  }
  if (x.is_number() && y.is_number()) return Value::floating(x.as_number() + y.as_number());
  if (x.is_undefined()) return undefined_error(x);
  if (y.is_undefined()) return undefined_error(y);
  (void)in;
  return Status::error("unsupported operand type(s) for +: '" + type_name(x) + "' and '" +
                       type_name(y) + "'");
}

Result<Value> f_sum(Interpreter& in, const Value& v, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "sum", {"attribute", "start"}, 0));
  Value total = b[1] ? *b[1] : Value::integer(0);
  KS_ASSIGN_OR_RETURN(std::vector<Value> items, in.iterate(v));
  for (const Value& item : items) {
    Value x = item;
    if (b[0]) {
      KS_ASSIGN_OR_RETURN(x, get_path(in, item, *b[0]));
    }
    KS_ASSIGN_OR_RETURN(total, add_values(in, total, x));
  }
  return total;
}

Result<Value> f_tojson(Interpreter& in, const Value& v, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(
      Bound b, bind_args(a, "tojson", {"ensure_ascii", "indent", "separators", "sort_keys"}, 0));
  JsonFormat fmt;
  fmt.ensure_ascii = b[0] && truthy(*b[0]);
  if (b[1] && !b[1]->is_none()) {
    fmt.indent = true;
    if (b[1]->is_string()) {
      fmt.indent_unit = b[1]->as_string();
    } else {
      KS_ASSIGN_OR_RETURN(int64_t n, want_int(*b[1], "tojson indent"));
      if (n > 4096) return Status::error("tojson(): indent is too large");
      fmt.indent_unit.assign(static_cast<size_t>(std::max<int64_t>(n, 0)), ' ');
    }
    fmt.item_separator = ",";
  }
  if (b[2] && !b[2]->is_none()) {
    if (!b[2]->is_list() || b[2]->as_list().items.size() != 2) {
      return Status::error("tojson(): separators must be a pair of strings");
    }
    KS_ASSIGN_OR_RETURN(fmt.item_separator, want_string(b[2]->as_list().items[0], "separator"));
    KS_ASSIGN_OR_RETURN(fmt.key_separator, want_string(b[2]->as_list().items[1], "separator"));
  }
  fmt.sort_keys = b[3] && truthy(*b[3]);
  fmt.max_bytes = in.limits().max_output_bytes;
  KS_ASSIGN_OR_RETURN(std::string json, to_json(v, fmt));
  KS_RETURN_IF_ERROR(in.check_string_size(json.size()));
  return Value::string(std::move(json));
}

Result<std::vector<Value>> unique_items(Interpreter& in, const Value& v, const Bound& b) {
  const bool case_sensitive = b[0] && truthy(*b[0]);
  KS_ASSIGN_OR_RETURN(std::vector<Value> items, in.iterate(v));
  // Each item is compared with every kept one: charged as n * n entries.
  KS_RETURN_IF_ERROR(in.charge_work(16 * uint64_t(items.size()) * items.size()));
  std::vector<Value> out, seen;
  for (const Value& item : items) {
    Value key = item;
    if (b[1] && !b[1]->is_none()) {
      KS_ASSIGN_OR_RETURN(key, get_path(in, item, *b[1]));
    }
    if (!case_sensitive) key = ignore_case(key);
    bool dup = false;
    for (const Value& s : seen) dup = dup || equals(s, key);
    if (!dup) {
      seen.push_back(key);
      out.push_back(item);
    }
  }
  return out;
}

Result<Value> f_unique(Interpreter& in, const Value& v, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "unique", {"case_sensitive", "attribute"}, 0));
  KS_ASSIGN_OR_RETURN(std::vector<Value> items, unique_items(in, v, b));
  return Value::generator(std::move(items));
}

Result<Value> f_wordcount(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "wordcount").status());
  int64_t words = 0;
  bool in_word = false;
  for (char32_t c : decode_utf8(soft_str(v))) {
    const bool w = is_word_char(c);
    if (w && !in_word) ++words;
    in_word = w;
  }
  return Value::integer(words);
}

Result<Value> extreme(Interpreter& in, const Value& v, CallArgs& a, bool want_max) {
  KS_ASSIGN_OR_RETURN(Bound b,
                      bind_args(a, want_max ? "max" : "min", {"case_sensitive", "attribute"}, 0));
  const bool case_sensitive = b[0] && truthy(*b[0]);
  KS_ASSIGN_OR_RETURN(std::vector<Value> items, in.iterate(v));
  if (items.empty()) return Value::undefined("no aggregated item, sequence was empty");
  std::optional<Value> best, best_key;
  for (const Value& item : items) {
    Value key = item;
    if (b[1] && !b[1]->is_none()) {
      KS_ASSIGN_OR_RETURN(key, get_path(in, item, *b[1]));
    }
    if (!case_sensitive) key = ignore_case(key);
    if (best) {
      KS_ASSIGN_OR_RETURN(int c, compare(key, *best_key));
      if (want_max ? c <= 0 : c >= 0) continue;
    }
    best = item;
    best_key = key;
  }
  return *best;
}
Result<Value> f_max(Interpreter& in, const Value& v, CallArgs& a) {
  return extreme(in, v, a, true);
}
Result<Value> f_min(Interpreter& in, const Value& v, CallArgs& a) {
  return extreme(in, v, a, false);
}

Result<Value> f_sort(Interpreter& in, const Value& v, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "sort", {"reverse", "case_sensitive", "attribute"}, 0));
  KS_ASSIGN_OR_RETURN(std::vector<Value> items, in.iterate(v));
  std::vector<Value> keys;
  for (const Value& item : items) {
    Value key = item;
    if (b[2] && !b[2]->is_none()) {
      KS_ASSIGN_OR_RETURN(key, get_path(in, item, *b[2]));
    }
    keys.push_back((b[1] && truthy(*b[1])) ? key : ignore_case(key));
  }
  KS_RETURN_IF_ERROR(sort_values(items, keys, b[0] && truthy(*b[0])));
  return Value::list(std::move(items));
}

Result<Value> f_map(Interpreter& in, const Value& v, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(std::vector<Value> items, in.iterate(v));
  std::vector<Value> out;
  out.reserve(items.size());
  const bool by_attribute = a.positional.empty() && !a.keyword.empty();
  if (by_attribute) {
    KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "map", {"attribute", "default"}, 1));
    for (const Value& item : items) {
      KS_ASSIGN_OR_RETURN(Value x, get_path(in, item, *b[0]));
      if (x.is_undefined() && b[1]) x = *b[1];
      out.push_back(std::move(x));
    }
    return Value::generator(std::move(out));
  }
  if (a.positional.empty()) return Status::error("map(): a filter name or attribute= is required");
  KS_ASSIGN_OR_RETURN(std::string filter, want_string(a.positional[0], "map() filter name"));
  if (!find_filter(filter)) return Status::error("map(): unknown filter '" + filter + "'");
  for (const Value& item : items) {
    CallArgs args;
    args.positional.assign(a.positional.begin() + 1, a.positional.end());
    args.keyword = a.keyword;
    KS_ASSIGN_OR_RETURN(Value x, in.apply_filter(filter, item, args));
    out.push_back(std::move(x));
  }
  return Value::generator(std::move(out));
}

// select / reject / selectattr / rejectattr.
Result<Value> select_impl(Interpreter& in, const Value& v, CallArgs& a, bool keep_if,
                          bool by_attribute) {
  const char* name =
      by_attribute ? (keep_if ? "selectattr" : "rejectattr") : (keep_if ? "select" : "reject");
  size_t next = 0;
  std::optional<Value> attribute;
  if (by_attribute) {
    if (a.positional.empty()) return Status::error(std::string(name) + "() needs an attribute");
    attribute = a.positional[next++];
  }
  std::optional<std::string> test;
  if (next < a.positional.size()) {
    KS_ASSIGN_OR_RETURN(test, want_string(a.positional[next++], std::string(name) + " test name"));
    if (!find_test(*test))
      return Status::error(std::string(name) + "(): unknown test '" + *test + "'");
  }
  KS_ASSIGN_OR_RETURN(std::vector<Value> items, in.iterate(v));
  std::vector<Value> out;
  for (const Value& item : items) {
    Value subject = item;
    if (attribute) {
      KS_ASSIGN_OR_RETURN(subject, get_path(in, item, *attribute));
    }
    bool ok;
    if (test) {
      CallArgs args;
      args.positional.assign(a.positional.begin() + static_cast<ptrdiff_t>(next),
                             a.positional.end());
      args.keyword = a.keyword;
      KS_ASSIGN_OR_RETURN(ok, in.apply_test(*test, subject, args));
    } else {
      ok = truthy(subject);
    }
    if (ok == keep_if) out.push_back(item);
  }
  return Value::generator(std::move(out));
}
Result<Value> f_select(Interpreter& in, const Value& v, CallArgs& a) {
  return select_impl(in, v, a, true, false);
}
Result<Value> f_reject(Interpreter& in, const Value& v, CallArgs& a) {
  return select_impl(in, v, a, false, false);
}
Result<Value> f_selectattr(Interpreter& in, const Value& v, CallArgs& a) {
  return select_impl(in, v, a, true, true);
}
Result<Value> f_rejectattr(Interpreter& in, const Value& v, CallArgs& a) {
  return select_impl(in, v, a, false, true);
}

struct FilterEntry {
  const char* name;
  FilterFunction function;
};

constexpr FilterEntry kFilters[] = {
    {"abs", f_abs},
    {"attr", f_attr},
    {"batch", f_batch},
    {"capitalize", f_capitalize},
    {"center", f_center},
    {"count", f_length},
    {"d", f_default},
    {"default", f_default},
    {"dictsort", f_dictsort},
    {"e", f_escape},
    {"escape", f_escape},
    {"first", f_first},
    {"float", f_float},
    {"forceescape", f_escape},
    {"indent", f_indent},
    {"int", f_int},
    {"items", f_items},
    {"join", f_join},
    {"last", f_last},
    {"length", f_length},
    {"list", f_list},
    {"lower", f_lower},
    {"map", f_map},
    {"max", f_max},
    {"min", f_min},
    {"reject", f_reject},
    {"rejectattr", f_rejectattr},
    {"replace", f_replace},
    {"reverse", f_reverse},
    {"round", f_round},
    {"safe", f_safe},
    {"select", f_select},
    {"selectattr", f_selectattr},
    {"sort", f_sort},
    {"string", f_string},
    {"sum", f_sum},
    {"title", f_title},
    {"tojson", f_tojson},
    {"trim", f_trim},
    {"unique", f_unique},
    {"upper", f_upper},
    {"wordcount", f_wordcount},
};

// ---- tests --------------------------------------------------------------------------------

Result<bool> t_defined(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "defined").status());
  return !v.is_undefined();
}
Result<bool> t_undefined(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "undefined").status());
  return v.is_undefined();
}
Result<bool> t_none(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "none").status());
  return v.is_none();
}
Result<bool> t_boolean(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "boolean").status());
  return v.is_bool();
}
Result<bool> t_true(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "true").status());
  return v.is_bool() && v.as_bool();
}
Result<bool> t_false(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "false").status());
  return v.is_bool() && !v.as_bool();
}
Result<bool> t_string(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "string").status());
  return v.is_string();
}
Result<bool> t_mapping(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "mapping").status());
  return v.is_dict();
}
Result<bool> t_number(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "number").status());
  return v.is_number();
}
Result<bool> t_integer(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "integer").status());
  return v.is_int();
}
Result<bool> t_float(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "float").status());
  return v.is_float();
}
Result<bool> t_callable(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "callable").status());
  return v.is_callable();
}
// Python's iter() succeeds on these (Jinja's Undefined is iterable too).
Result<bool> t_iterable(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "iterable").status());
  return v.is_list() || v.is_dict() || v.is_string() || v.is_undefined();
}
// Jinja's sequence test asks for len() and __getitem__, which dicts and Undefined have.
Result<bool> t_sequence(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "sequence").status());
  return v.is_sequence_list() || v.is_dict() || v.is_string() || v.is_undefined();
}

Result<Value> modulo(const Value& v, const Value& m) {
  if (v.is_undefined()) return undefined_error(v);
  if (!v.is_number() || !m.is_number()) {
    return Status::error("unsupported operand type(s) for %: '" + type_name(v) + "' and '" +
                         type_name(m) + "'");
  }
  if (m.as_number() == 0.0) return Status::error("integer division or modulo by zero");
  if (v.is_integral() && m.is_integral()) {
    const int64_t x = v.as_integral(), y = m.as_integral();
    if (y == -1) return Value::integer(0);
    int64_t r = x % y;
    if (r != 0 && ((r < 0) != (y < 0))) r += y;
    return Value::integer(r);
  }
  double r = std::fmod(v.as_number(), m.as_number());
  if (r != 0.0 && ((r < 0) != (m.as_number() < 0))) r += m.as_number();
  return Value::floating(r);
}

Result<bool> t_odd(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "odd").status());
  KS_ASSIGN_OR_RETURN(Value r, modulo(v, Value::integer(2)));
  return equals(r, Value::integer(1));
}
Result<bool> t_even(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "even").status());
  KS_ASSIGN_OR_RETURN(Value r, modulo(v, Value::integer(2)));
  return equals(r, Value::integer(0));
}
Result<bool> t_divisibleby(Interpreter&, const Value& v, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "divisibleby", {"num"}, 1));
  KS_ASSIGN_OR_RETURN(Value r, modulo(v, *b[0]));
  return equals(r, Value::integer(0));
}

Result<bool> t_eq(Interpreter&, const Value& v, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "eq", {"other"}, 1));
  return equals(v, *b[0]);
}
Result<bool> t_ne(Interpreter&, const Value& v, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "ne", {"other"}, 1));
  return !equals(v, *b[0]);
}

Result<bool> ordered(const Value& v, CallArgs& a, const char* name, int want_sign, bool or_equal) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, name, {"other"}, 1));
  if (v.is_undefined()) return undefined_error(v);
  if (b[0]->is_undefined()) return undefined_error(*b[0]);
  KS_ASSIGN_OR_RETURN(int c, compare(v, *b[0]));
  return c == want_sign || (or_equal && c == 0);
}
Result<bool> t_lt(Interpreter&, const Value& v, CallArgs& a) {
  return ordered(v, a, "lt", -1, false);
}
Result<bool> t_le(Interpreter&, const Value& v, CallArgs& a) {
  return ordered(v, a, "le", -1, true);
}
Result<bool> t_gt(Interpreter&, const Value& v, CallArgs& a) {
  return ordered(v, a, "gt", 1, false);
}
Result<bool> t_ge(Interpreter&, const Value& v, CallArgs& a) {
  return ordered(v, a, "ge", 1, true);
}

Result<bool> t_in(Interpreter&, const Value& v, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "in", {"seq"}, 1));
  return contains(*b[0], v);
}

// Python's `is`: singletons and small values by value, shared objects by identity.
Result<bool> t_sameas(Interpreter&, const Value& v, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "sameas", {"other"}, 1));
  const Value& o = *b[0];
  if (v.kind() != o.kind()) return false;
  switch (v.kind()) {
    case Value::Kind::none:
    case Value::Kind::undefined:
      return true;
    case Value::Kind::boolean:
    case Value::Kind::integer:
    case Value::Kind::floating:
    case Value::Kind::string:
      return equals(v, o);
    default:
      return v.identity() == o.identity();
  }
}

Result<bool> t_lower(Interpreter& in, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "lower").status());
  CallArgs none;
  KS_ASSIGN_OR_RETURN(Value r, m_islower(in, Value::string(soft_str(v)), none));
  return r.as_bool();
}
Result<bool> t_upper(Interpreter& in, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "upper").status());
  CallArgs none;
  KS_ASSIGN_OR_RETURN(Value r, m_isupper(in, Value::string(soft_str(v)), none));
  return r.as_bool();
}
Result<bool> t_escaped(Interpreter&, const Value&, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "escaped").status());
  return false;  // no autoescaping, so nothing is markup
}
Result<bool> t_filter(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "filter").status());
  return v.is_string() && find_filter(v.as_string()) != nullptr;
}
Result<bool> t_test(Interpreter&, const Value& v, CallArgs& a) {
  KS_RETURN_IF_ERROR(no_args(a, "test").status());
  return v.is_string() && find_test(v.as_string()) != nullptr;
}

struct TestEntry {
  const char* name;
  TestFunction function;
};

constexpr TestEntry kTests[] = {
    {"boolean", t_boolean},
    {"callable", t_callable},
    {"defined", t_defined},
    {"divisibleby", t_divisibleby},
    {"eq", t_eq},
    {"equalto", t_eq},
    {"==", t_eq},
    {"escaped", t_escaped},
    {"even", t_even},
    {"false", t_false},
    {"filter", t_filter},
    {"float", t_float},
    {"ge", t_ge},
    {">=", t_ge},
    {"gt", t_gt},
    {"greaterthan", t_gt},
    {">", t_gt},
    {"in", t_in},
    {"integer", t_integer},
    {"iterable", t_iterable},
    {"le", t_le},
    {"<=", t_le},
    {"lower", t_lower},
    {"lt", t_lt},
    {"lessthan", t_lt},
    {"<", t_lt},
    {"mapping", t_mapping},
    {"ne", t_ne},
    {"!=", t_ne},
    {"none", t_none},
    {"number", t_number},
    {"odd", t_odd},
    {"sameas", t_sameas},
    {"sequence", t_sequence},
    {"string", t_string},
    {"test", t_test},
    {"true", t_true},
    {"undefined", t_undefined},
    {"upper", t_upper},
};

// ---- globals ------------------------------------------------------------------------------

// Jinja's sandbox refuses ranges longer than this.
constexpr int64_t kMaxRange = 100000;

Result<Value> g_range(Interpreter& in, CallArgs& a) {
  if (!a.keyword.empty()) return Status::error("range() takes no keyword arguments");
  if (a.positional.empty() || a.positional.size() > 3) {
    return Status::error("range() takes 1 to 3 arguments");
  }
  int64_t args[3] = {0, 0, 0};
  for (size_t i = 0; i < a.positional.size(); ++i) {
    KS_ASSIGN_OR_RETURN(args[i], want_int(a.positional[i], "range() argument"));
  }
  int64_t start = 0, stop = 0, step = 1;
  if (a.positional.size() == 1) {
    stop = args[0];
  } else {
    start = args[0];
    stop = args[1];
    if (a.positional.size() == 3) step = args[2];
  }
  if (step == 0) return Status::error("range() arg 3 must not be zero");
  const __int128 span = step > 0 ? (__int128)stop - start : (__int128)start - stop;
  const __int128 absstep = step > 0 ? step : -(__int128)step;
  const __int128 count = span <= 0 ? 0 : (span + absstep - 1) / absstep;
  if (count > kMaxRange) {
    return Status::error(
        "range() is too big: " +
        std::to_string(static_cast<int64_t>(std::min<__int128>(count, INT64_MAX))) +
        " items (the sandbox allows " + std::to_string(kMaxRange) + ")");
  }
  KS_RETURN_IF_ERROR(in.charge_work(static_cast<uint64_t>(count) * kItemBytes));
  std::vector<Value> items;
  items.reserve(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) items.push_back(Value::integer(start + i * step));
  return Value::list(std::move(items));
}

// Entries of a dict(...) / namespace(...) call: an optional mapping (or list of pairs), then
// keyword arguments.
Result<std::vector<std::pair<Value, Value>>> mapping_args(Interpreter& in, CallArgs& a,
                                                          const char* name) {
  if (a.positional.size() > 1) {
    return Status::error(std::string(name) + "() takes at most 1 positional argument");
  }
  std::vector<std::pair<Value, Value>> entries;
  auto put = [&](Value k, Value v) {
    for (auto& e : entries) {
      if (equals(e.first, k)) {
        e.second = std::move(v);
        return;
      }
    }
    entries.emplace_back(std::move(k), std::move(v));
  };
  if (!a.positional.empty()) {
    const Value& src = a.positional[0];
    if (src.is_undefined()) return undefined_error(src);
    if (src.is_dict()) {
      for (const auto& [k, v] : src.as_dict().entries) put(k, v);
    } else {
      KS_ASSIGN_OR_RETURN(std::vector<Value> pairs, in.iterate(src));
      for (const Value& p : pairs) {
        if (!p.is_list() || p.as_list().items.size() != 2) {
          return Status::error(std::string(name) + "(): sequence elements must be pairs");
        }
        put(p.as_list().items[0], p.as_list().items[1]);
      }
    }
  }
  for (auto& [k, v] : a.keyword) put(Value::string(k), std::move(v));
  return entries;
}

Result<Value> g_dict(Interpreter& in, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(auto entries, mapping_args(in, a, "dict"));
  return Value::dict(std::move(entries));
}

Result<Value> g_namespace(Interpreter& in, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(auto entries, mapping_args(in, a, "namespace"));
  Value ns = Value::new_namespace();
  for (auto& [k, v] : entries) {
    if (!k.is_string()) return Status::error("namespace() attribute names must be strings");
    if (v.holds_reference()) {
      return Status::error(
          "a namespace attribute cannot hold a namespace, function or loop "
          "object");
    }
    ns.as_namespace().set(k.as_string(), std::move(v));
  }
  return ns;
}

Result<Value> g_raise_exception(Interpreter&, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "raise_exception", {"message"}, 1));
  return Status::error("template raised an exception: " + soft_str(*b[0]));
}

// transformers' strftime_now(format) is datetime.now().strftime(format): a naive local time,
// so %z and %Z are empty and %f (microseconds) is 000000 at our one-second resolution.
Result<Value> g_strftime_now(Interpreter& in, CallArgs& a) {
  KS_ASSIGN_OR_RETURN(Bound b, bind_args(a, "strftime_now", {"format"}, 1));
  KS_ASSIGN_OR_RETURN(std::string format, want_string(*b[0], "strftime_now format"));
  if (format.size() > 1024) return Status::error("strftime_now(): format is too long");
  std::string fmt;
  for (size_t i = 0; i < format.size(); ++i) {
    if (format[i] != '%' || i + 1 >= format.size()) {
      fmt.push_back(format[i]);
      continue;
    }
    const char c = format[i + 1];
    if (c == 'f') {
      fmt += "000000";
      ++i;
    } else if (c == 'z' || c == 'Z') {
      ++i;
    } else if (c == ':' && i + 2 < format.size() && format[i + 2] == 'z') {
      i += 2;
    } else {
      fmt.push_back('%');
      fmt.push_back(c);
      ++i;
    }
  }
  const std::time_t now = in.now();
  std::tm local{};
  if (!localtime_r(&now, &local)) return Status::error("strftime_now(): no local time");
  if (fmt.empty()) return Value::string("");
  std::string out(256, '\0');
  for (int attempt = 0; attempt < 8; ++attempt) {
    const size_t n = std::strftime(out.data(), out.size(), fmt.c_str(), &local);
    if (n > 0) {
      out.resize(n);
      return Value::string(std::move(out));
    }
    out.resize(out.size() * 4);
  }
  return Value::string("");  // every directive expanded to nothing
}

}  // namespace

FilterFunction find_filter(std::string_view name) {
  for (const auto& f : kFilters) {
    if (name == f.name) return f.function;
  }
  return nullptr;
}

TestFunction find_test(std::string_view name) {
  for (const auto& t : kTests) {
    if (name == t.name) return t.function;
  }
  return nullptr;
}

bool is_known_filter(std::string_view name) {
  return find_filter(name) != nullptr;
}
bool is_known_test(std::string_view name) {
  return find_test(name) != nullptr;
}

std::optional<Value> bound_method(const Value& receiver, const std::string& name) {
  auto unsafe = [&](const char* type) {
    return Value::undefined("access to attribute '" + name + "' of '" + type +
                            "' object is unsafe (templates cannot modify values)");
  };
  switch (receiver.kind()) {
    case Value::Kind::string: {
      if (const MethodEntry* m = find_method(kStringMethods, name)) return bind(receiver, *m);
      if (in_list(kUnsupportedStringMethods, name)) {
        return Value::callable("str." + name, [name](Interpreter&, CallArgs&) -> Result<Value> {
          return Status::error("str." + name + "() is not supported");
        });
      }
      return std::nullopt;
    }
    case Value::Kind::dict:
      if (const MethodEntry* m = find_method(kDictMethods, name)) return bind(receiver, *m);
      if (in_list(kUnsafeDictMethods, name)) return unsafe("dict");
      return std::nullopt;
    case Value::Kind::list:
      if (const MethodEntry* m = find_method(kListMethods, name)) return bind(receiver, *m);
      if (in_list(kUnsafeListMethods, name)) return unsafe("list");
      return std::nullopt;
    default:
      return std::nullopt;
  }
}

std::vector<std::pair<std::string, Value>> make_globals() {
  std::vector<std::pair<std::string, Value>> g;
  g.emplace_back("range", Value::callable("range", g_range));
  g.emplace_back("dict", Value::callable("dict", g_dict));
  g.emplace_back("namespace", Value::callable("namespace", g_namespace));
  g.emplace_back("raise_exception", Value::callable("raise_exception", g_raise_exception));
  g.emplace_back("strftime_now", Value::callable("strftime_now", g_strftime_now));
  return g;
}

}  // namespace kestrel::jinja
