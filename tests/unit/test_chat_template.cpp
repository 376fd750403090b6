// Chat-template interpreter tests. The fixtures in tests/golden/templates/ were rendered by
// Hugging Face transformers (scripts/make_golden_templates.py): every conversation must render
// byte-identically, and every template transformers rejected must be rejected here too. The
// packaged templates are read from the tokenizer cache that scripts/fetch_tokenizers.sh fills.
#include "template/chat_template.h"
#include "template/jinja_value.h"

#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace kestrel {
namespace {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

std::string source_path(const std::string& relative) {
  return std::string(KESTREL_SOURCE_DIR) + "/" + relative;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<ojson> read_jsonl(const std::string& path) {
  std::vector<ojson> lines;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty()) lines.push_back(ojson::parse(line));
  }
  return lines;
}

// The packaged tokenizer_config.json of `name` (llama3_1 or qwen3), or a test failure that says
// how to get it.
Result<ChatTemplateConfig> packaged_config(const std::string& name) {
  const std::string path =
      source_path(".cache/tokenizers/" + name + "/models/tokenizer_config.json");
  if (!fs::exists(path)) {
    return Status::error(path +
                         " is missing (the tokenizer cache is filled by "
                         "scripts/fetch_tokenizers.sh: run it)");
  }
  return load_chat_template(path);
}

ChatTemplateOptions fixed_clock() {
  ChatTemplateOptions options;
  options.now = 1721995200;  // 2024-07-26 12:00 UTC: the 26th in every time zone within ±11h
  return options;
}

// Renders every case of a conversation fixture file and compares with transformers' output.
void check_conversations(const ChatTemplateConfig& config, const std::string& fixture) {
  const auto cases = read_jsonl(source_path("tests/golden/templates/" + fixture));
  ASSERT_GE(cases.size(), 30u) << fixture;
  int rendered = 0;
  for (const ojson& c : cases) {
    const std::string id = c["id"].get<std::string>();
    auto out = render_chat_template(config, c["messages"], c["add_generation_prompt"].get<bool>(),
                                    c["extra"], fixed_clock());
    if (c.contains("error")) {
      EXPECT_FALSE(out.is_ok()) << fixture << " " << id << ": transformers raised " << c["error"]
                                << " but Kestrel rendered:\n"
                                << (out.is_ok() ? out.value() : "");
      continue;
    }
    ASSERT_TRUE(out.is_ok()) << fixture << " " << id << ": " << out.status().message();
    EXPECT_EQ(out.value(), c["expected"].get<std::string>()) << fixture << " " << id;
    ++rendered;
  }
  EXPECT_GT(rendered, 25) << fixture;
}

TEST(ChatTemplateGolden, Qwen3MatchesTransformers) {
  auto config = packaged_config("qwen3");
  ASSERT_TRUE(config.is_ok()) << config.status().message();
  EXPECT_FALSE(config->special_tokens.contains("bos_token"));  // null in the package
  EXPECT_EQ(config->special_tokens["eos_token"], "<|im_end|>");
  check_conversations(config.value(), "qwen3.jsonl");
}

TEST(ChatTemplateGolden, Llama31MatchesTransformers) {
  auto config = packaged_config("llama3_1");
  ASSERT_TRUE(config.is_ok()) << config.status().message();
  EXPECT_EQ(config->special_tokens["bos_token"], "<|begin_of_text|>");
  check_conversations(config.value(), "llama3_1.jsonl");
}

// Meta's Llama 3.1 Instruct template: tools, tojson(indent=4), reject/join, items, date_string,
// raise_exception.
TEST(ChatTemplateGolden, Llama31InstructToolsMatchesTransformers) {
  auto config = packaged_config("llama3_1");
  ASSERT_TRUE(config.is_ok()) << config.status().message();
  config->template_text =
      read_text(source_path("tests/golden/templates/llama3_1_instruct_tools.jinja"));
  ASSERT_FALSE(config->template_text.empty());
  check_conversations(config.value(), "llama3_1_instruct_tools.jsonl");
}

// One small template per Jinja feature, rendered by transformers' template environment.
TEST(ChatTemplateGolden, FeaturesMatchTransformers) {
  const auto cases = read_jsonl(source_path("tests/golden/templates/features.jsonl"));
  ASSERT_GE(cases.size(), 60u);
  for (const ojson& c : cases) {
    const std::string id = c["id"].get<std::string>();
    const ojson& ctx = c["context"];
    const ojson messages = ctx.contains("messages") ? ctx["messages"] : ojson::array();
    auto out =
        render_chat_template(c["template"].get<std::string>(), messages, false, ctx, fixed_clock());
    if (c.contains("error")) {
      EXPECT_FALSE(out.is_ok()) << id << ": transformers raised " << c["error"];
      continue;
    }
    ASSERT_TRUE(out.is_ok()) << id << ": " << out.status().message();
    EXPECT_EQ(out.value(), c["expected"].get<std::string>()) << id;
  }
}

// --- unit tests -------------------------------------------------------------------------------

Result<std::string> render(const std::string& tmpl, const ojson& context = ojson::object(),
                           const ChatTemplateOptions& options = fixed_clock()) {
  const ojson messages = context.contains("messages") ? context["messages"] : ojson::array();
  return render_chat_template(tmpl, messages, false, context, options);
}

std::string ok(const std::string& tmpl, const ojson& context = ojson::object()) {
  auto r = render(tmpl, context);
  EXPECT_TRUE(r.is_ok()) << tmpl << "\n" << r.status().message();
  return r.is_ok() ? r.value() : "<error>";
}

std::string error_of(const std::string& tmpl, const ojson& context = ojson::object(),
                     const ChatTemplateOptions& options = fixed_clock()) {
  auto r = render(tmpl, context, options);
  EXPECT_FALSE(r.is_ok()) << tmpl << " rendered: " << (r.is_ok() ? r.value() : "");
  return r.is_ok() ? "" : r.status().message();
}

TEST(ChatTemplate, ExpressionsFollowPython) {
  EXPECT_EQ(ok("{{ 7 // 2 }},{{ -7 // 2 }},{{ -7 % 3 }},{{ 7 / 2 }},{{ 2 ** 10 }}"),
            "3,-4,2,3.5,1024");
  EXPECT_EQ(ok("{{ 0.1 + 0.2 }} {{ 1e16 }} {{ 1e-5 }} {{ 2.0 }} {{ 1/3 }}"),
            "0.30000000000000004 1e+16 1e-05 2.0 0.3333333333333333");
  EXPECT_EQ(ok("{{ 0 or 'x' }}|{{ 'a' and 'b' }}|{{ [] and 1 }}|{{ not none }}"), "x|b|[]|True");
  EXPECT_EQ(ok("{{ 1 < 2 < 3 }}{{ 3 > 2 > 2 }}{{ 1 == 1.0 == true }}"), "TrueFalseTrue");
  EXPECT_EQ(ok("{{ 'y' if x > 1 else 'n' }}{{ 'z' if false }}.", {{"x", 5}}), "y.");
  EXPECT_EQ(ok("{{ 'a' ~ 1 ~ none ~ nothing }}"), "a1None");
  EXPECT_EQ(ok("{{ [1, 'a', none, true, 1.5] }} {{ {'k': [2]} }} {{ ('x',) }}"),
            "[1, 'a', None, True, 1.5] {'k': [2]} ('x',)");
  EXPECT_EQ(ok("{{ \"it's\" }} {{ [\"it's\", 'q\"'] }}"), "it's [\"it's\", 'q\"']");
  // Filters bind tighter than arithmetic; `~` binds tighter than `+` but looser than `*`.
  EXPECT_EQ(ok("{{ [1, 2, 3] | length - 1 }} {{ 2 * 3 ~ 4 }} {{ -2 ** 2 }}"), "2 64 4");
  EXPECT_FALSE(render("{{ 1 + 2 ~ 3 }}").is_ok());  // 1 + "23"
  EXPECT_EQ(ok("{{ 'b' in 'abc' }}{{ 3 not in [1, 2] }}{{ 'k' in {'k': 0} }}"), "TrueTrueTrue");
}

TEST(ChatTemplate, Slicing) {
  const ojson ctx = {{"l", {0, 1, 2, 3, 4, 5}}, {"s", "héllo wörld"}};
  EXPECT_EQ(ok("{{ l[::-1] }}", ctx), "[5, 4, 3, 2, 1, 0]");
  EXPECT_EQ(ok("{{ l[1:-1:2] }} {{ l[-2:] }} {{ l[10:] }} {{ l[4:1:-1] }}", ctx),
            "[1, 3] [4, 5] [] [4, 3, 2]");
  EXPECT_EQ(ok("{{ s[::-1] }}|{{ s[1:4] }}|{{ s[-5:] }}|{{ s[1] }}", ctx),
            "dlröw olléh|éll|wörld|é");
  // Python's slice bounds clamp instead of failing; indexes out of range are undefined.
  EXPECT_EQ(ok("{{ l[-100:100] | length }} {{ l[99] is defined }}", ctx), "6 False");
  EXPECT_NE(error_of("{{ l[::0] }}", ctx).find("zero"), std::string::npos);
}

TEST(ChatTemplate, MessagesReversedWithLoopIndex) {
  const ojson ctx = {{"messages",
                      {{{"role", "user"}, {"content", "a"}},
                       {{"role", "assistant"}, {"content", "b"}},
                       {{"role", "user"}, {"content", "c"}}}}};
  EXPECT_EQ(
      ok("{% for m in messages[::-1] %}{{ (messages|length - 1) - loop.index0 }}{{ m.content }}"
         "{% if not loop.last %},{% endif %}{% endfor %}",
         ctx),
      "2c,1b,0a");
}

TEST(ChatTemplate, WhitespaceControl) {
  // trim_blocks drops the newline after a block tag; lstrip_blocks the indentation before it.
  EXPECT_EQ(ok("{% if true %}\nyes\n{% endif %}\nafter"), "yes\nafter");
  EXPECT_EQ(ok("a\n    {% if true %}\n    b\n    {% endif %}\nc"), "a\n    b\nc");
  EXPECT_EQ(ok("a\n    {{ 'x' }}\n"), "a\n    x");  // not for {{ }}; final newline dropped
  EXPECT_EQ(ok("a  \n  {%- if true -%}  \n  b  {{- ' c ' -}}  d{% endif %}"), "ab c d");
  EXPECT_EQ(ok("a\n  {%+ if true %}b{% endif %}"), "a\n  b");
  EXPECT_EQ(ok("{% if true +%}\nb{% endif %}"), "\nb");
  EXPECT_EQ(ok("a {# note #} b\n  {# own line #}\nc"), "a  b\nc");
  EXPECT_EQ(ok("x\r\ny{% if true %}\r\nz{% endif %}"), "x\nyz");
  EXPECT_EQ(ok("{% raw %}{{ not evaluated }}{% endraw %}"), "{{ not evaluated }}");
}

TEST(ChatTemplate, NamespacesAndScopes) {
  EXPECT_EQ(ok("{% set ns = namespace(n=0, last=none) %}{% for i in range(4) %}"
               "{% set ns.n = ns.n + i %}{% set ns.last = i %}{% endfor %}{{ ns.n }}{{ ns.last }}"),
            "63");
  // A plain set inside a loop stays in that iteration, as in Jinja.
  EXPECT_EQ(
      ok("{% set x = 1 %}{% for i in [1, 2] %}{% set x = x + 10 %}{{ x }} {% endfor %}{{ x }}"),
      "11 11 1");
  // A top-level set hides the caller's value from loops that run before it.
  EXPECT_EQ(ok("{% for i in [1] %}[{{ x }}]{% endfor %}{% set x = 2 %}{{ x }}", {{"x", 7}}), "[]2");
  EXPECT_NE(error_of("{% set d = {} %}{% set d.x = 1 %}").find("namespace"), std::string::npos);
  EXPECT_NE(error_of("{% set ns = namespace() %}{% set ns.self = ns %}").find("namespace"),
            std::string::npos);
}

TEST(ChatTemplate, FiltersAndTests) {
  const ojson ctx = {{"users", {{{"name", "ann"}, {"admin", true}}, {{"name", "bo"}}}},
                     {"d", {{"b", 2}, {"a", 1}}}};
  EXPECT_EQ(ok("{{ users | selectattr('admin') | map(attribute='name') | join(',') }}", ctx),
            "ann");
  EXPECT_EQ(ok("{{ users | rejectattr('admin') | map(attribute='name') | first }}", ctx), "bo");
  EXPECT_EQ(ok("{{ d | items | list }} {{ d | dictsort }}", ctx),
            "[('b', 2), ('a', 1)] [('a', 1), ('b', 2)]");
  EXPECT_EQ(ok("{{ '  x \n' | trim }}|{{ 'Ab' | upper }}{{ 'Ab' | lower }}|{{ none | string }}"),
            "x|ABab|None");
  EXPECT_EQ(ok("{{ missing | default('d') }}{{ '' | default('e', true) }}"), "de");
  EXPECT_EQ(ok("{{ ['b', 'A', 'c'] | sort | join }}{{ [3, 1, 3] | unique | list }}"), "Abc[3, 1]");
  EXPECT_EQ(ok("{{ x is defined }}{{ y is undefined }}{{ none is none }}{{ 's' is string }}"
               "{{ {} is mapping }}{{ 'a' is iterable }}{{ {} is sequence }}{{ 1.5 is number }}"
               "{{ true is boolean }}{{ 3 is odd }}{{ 0 is false }}",
               {{"x", 1}}),
            "TrueTrueTrueTrueTrueTrueTrueTrueTrueTrueFalse");
  // A filter result that Jinja produces lazily is always true, even when empty.
  EXPECT_EQ(ok("{{ 'yes' if ([] | select('odd')) else 'no' }}"), "yes");
}

TEST(ChatTemplate, ToJsonMatchesPythonJsonDumps) {
  const ojson ctx = {{"v", ojson::parse(R"({"z": 1, "a": [1.5, null, true, "é\"\n"], "f": 1e-7,
                                            "e": {}, "l": []})")}};
  EXPECT_EQ(ok("{{ v | tojson }}", ctx),
            R"({"z": 1, "a": [1.5, null, true, "é\"\n"], "f": 1e-07, "e": {}, "l": []})");
  EXPECT_EQ(ok("{{ v.a | tojson(indent=2) }}", ctx),
            "[\n  1.5,\n  null,\n  true,\n  \"é\\\"\\n\"\n]");
  EXPECT_EQ(ok("{{ {'b': 1, 'a': 2} | tojson(sort_keys=true, separators=(',', ':')) }}"),
            R"({"a":2,"b":1})");
  EXPECT_EQ(ok("{{ '🦅é' | tojson(ensure_ascii=true) }}"), R"("\ud83e\udd85\u00e9")");
  EXPECT_FALSE(render("{{ missing | tojson }}").is_ok());
}

TEST(ChatTemplate, StringMethods) {
  const ojson ctx = {{"s", "<think>\nplan\n</think>\n\nanswer"}};
  EXPECT_EQ(ok("{{ s.split('</think>')[-1].lstrip('\\n') }}|"
               "{{ s.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') }}",
               ctx),
            "answer|plan");
  EXPECT_EQ(ok("{{ s.startswith('<think>') }}{{ s.endswith(('x', 'er')) }}", ctx), "TrueTrue");
  EXPECT_EQ(ok("{{ ' a  b '.split() }}{{ 'a,b,c'.rsplit(',', 1) }}{{ 'x-y'.replace('-', '+') }}"),
            "['a', 'b']['a,b', 'c']x+y");
  EXPECT_EQ(ok("{{ 'héllo'.find('l') }}{{ 'abc'.upper() }}{{ ', '.join(['a', 'b']) }}"),
            "2ABCa, b");
  EXPECT_NE(error_of("{{ 'a{}'.format(1) }}").find("not supported"), std::string::npos);
  // Mutating methods are refused by the sandbox.
  EXPECT_FALSE(render("{{ l.append(1) }}", {{"l", {1}}}).is_ok());
  EXPECT_EQ(ok("{{ l.append is defined }}", {{"l", {1}}}), "False");
}

TEST(ChatTemplate, MacrosAndControlFlow) {
  EXPECT_EQ(ok("{% macro f(n) %}{% if n <= 1 %}1{% else %}{{ n * f(n - 1) | int }}{% endif %}"
               "{% endmacro %}{{ f(10) }}"),
            "3628800");
  EXPECT_EQ(ok("{% for i in range(10) %}{% if i == 2 %}{% continue %}{% endif %}"
               "{% if i > 4 %}{% break %}{% endif %}{{ i }}{% endfor %}"),
            "0134");
  EXPECT_EQ(ok("{% for i in [] %}x{% else %}empty{% endfor %}"), "empty");
  EXPECT_EQ(ok("{% for k, v in {'a': 1} | items %}{{ k }}={{ v }}{% endfor %}"), "a=1");
}

TEST(ChatTemplate, RaiseExceptionAndStrftime) {
  const std::string err = error_of("line one\n{{ raise_exception('Roles must alternate') }}");
  EXPECT_NE(err.find("Roles must alternate"), std::string::npos) << err;
  EXPECT_NE(err.find("line 2"), std::string::npos) << err;
  EXPECT_EQ(ok("{{ strftime_now('%d %b %Y') }}|{{ strftime_now('%Y-%m-%d%z%Z') }}"),
            "26 Jul 2024|2024-07-26");
}

TEST(ChatTemplate, MalformedTemplatesAreErrorsNamingTheLine) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{% if x %}never closed", "'if' is never closed"},
      {"a\n{{ 1 + }}", "line 2"},
      {"{% endfor %}", "unknown statement 'endfor'"},
      {"{{ x | no_such_filter }}", "unknown filter 'no_such_filter'"},
      {"{{ x is no_such_test }}", "unknown test 'no_such_test'"},
      {"{% include 'other.html' %}", "unsupported statement 'include'"},
      {"{% break %}", "outside of a for loop"},
      {"{{ 'unterminated }}", "unterminated string"},
      {"{{ (1, 2] }}", "unexpected ']'"},
      {"{# no end", "missing end of comment"},
      {"{{ 1 }", "unexpected '}'"},
      {"{{ 1 ", "missing '}}'"},
      {"{{ 99999999999999999999 }}", "too large"},
      {"{{ 'a' % 1 }}", "not supported"},
  };
  for (const auto& [tmpl, want] : cases) {
    const std::string err = error_of(tmpl);
    EXPECT_NE(err.find(want), std::string::npos) << tmpl << " -> " << err;
  }
  // Unknown filters in code that may not run fail only when reached, as in Jinja.
  EXPECT_EQ(ok("{% if false %}{{ x | no_such_filter }}{% endif %}ok"), "ok");
}

TEST(ChatTemplate, LimitsBoundLoopsRecursionAndOutput) {
  ChatTemplateOptions options = fixed_clock();
  options.limits.max_iterations = 1000;
  std::string err = error_of(
      "{% for a in range(100) %}{% for b in range(100) %}{% endfor %}{% endfor %}", {}, options);
  EXPECT_NE(err.find("1000 loop iterations"), std::string::npos) << err;

  // Exponential macro recursion is stopped by the iteration budget as well.
  err = error_of(
      "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
      "{{ f(40) }}",
      {}, options);
  EXPECT_NE(err.find("loop iterations and macro calls"), std::string::npos) << err;

  err = error_of("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}");
  EXPECT_NE(err.find("nest deeper than the limit of 200"), std::string::npos) << err;
  // 150 nested calls are fine.
  EXPECT_EQ(ok("{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{% else %}done{% endif %}{% endmacro %}"
               "{{ f(150) }}"),
            "done");

  options = fixed_clock();
  options.limits.max_output_bytes = 1 << 16;
  err = error_of("{% for i in range(10000) %}0123456789{% endfor %}", {}, options);
  EXPECT_NE(err.find("exceeds the limit"), std::string::npos) << err;
  err = error_of("{{ 'x' * 100000000000 }}", {}, options);
  EXPECT_NE(err.find("exceeds the limit"), std::string::npos) << err;
  err = error_of(
      "{% set ns = namespace(s='ab') %}{% for i in range(40) %}"
      "{% set ns.s = ns.s + ns.s %}{% endfor %}",
      {}, options);
  EXPECT_NE(err.find("exceeds the limit"), std::string::npos) << err;
  EXPECT_NE(error_of("{{ range(1000000) | length }}").find("too big"), std::string::npos);

  // Deep nesting is refused by the parser rather than exhausting the stack.
  EXPECT_FALSE(
      render("{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}").is_ok());
  EXPECT_FALSE(render("{{ " + std::string(5000, '[') + std::string(5000, ']') + " }}").is_ok());
  std::string nested_ifs;
  for (int i = 0; i < 1000; ++i) nested_ifs += "{% if true %}";
  EXPECT_FALSE(render(nested_ifs).is_ok());
  // A value built one level deeper per iteration stops at the nesting limit.
  err = error_of(
      "{% set ns = namespace(v=[]) %}{% for i in range(1000) %}{% set ns.v = [ns.v] %}"
      "{% endfor %}");
  EXPECT_NE(err.find("nests deeper"), std::string::npos) << err;
}

// Chains are parsed in loops, not by recursion, so the nesting guard never sees them; each shape
// of chain must still stop at a height every later visitor can recurse through.
TEST(ChatTemplate, LongChainsAreRefusedNotAStackOverflow) {
  auto chain = [](const std::string& first, const std::string& link, int n) {
    std::string text = "{{ " + first;
    for (int i = 0; i < n; ++i) text += link;
    return text + " }}";
  };
  const std::vector<std::string> templates = {
      chain("1", " + 1", 100000),
      chain("1", " ~ 1", 100000),
      chain("1", " * 1", 100000),
      chain("true", " and true", 100000),
      chain("false", " or false", 100000),
      chain("x", ".a", 100000),
      chain("'a'", " | lower", 100000),
      chain("x", "[0]", 100000),
      chain("1", " if true else 1", 100000),
  };
  for (const std::string& tmpl : templates) {
    const std::string err = error_of(tmpl);
    EXPECT_NE(err.find("nests too deeply"), std::string::npos) << tmpl.substr(0, 40) << ": " << err;
  }
  // Ordinary chains are untouched.
  EXPECT_EQ(ok(chain("1", " + 1", 300)), "301");
}

// A line of many tags used to be parsed in time quadratic in the tags (each one searched back to
// the start of its line): 100k pairs took minutes. Linear, it takes well under a second; the bound
// below is far above that, to hold on a busy machine.
TEST(ChatTemplate, ManyTagsOnOneLineParseInLinearTime) {
  std::string line;
  for (int i = 0; i < 100000; ++i) line += "{% if true %}{% endif %}";
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(ok(line + "done"), "done");
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 25.0);
}

// What an operation reads counts against the work budget, not only what it produces; built-ins'
// string results and nested capture buffers stay within the output limit (a review's
// reproductions, scaled down: each ran for hours or took gigabytes at the default limits).
TEST(ChatTemplate, LimitsBoundWhatOperationsReadAndHold) {
  ChatTemplateOptions options = fixed_clock();
  options.limits.max_output_bytes = 1 << 16;
  options.limits.max_work_bytes = 4 << 20;
  auto work_error = [&](const std::string& tmpl) {
    const std::string err = error_of(tmpl, {}, options);
    EXPECT_NE(err.find("work limit"), std::string::npos) << tmpl << ": " << err;
  };
  const std::string big = "{% set big = 'a' * 60000 %}";
  work_error(big + "{% for i in range(1000) %}{% set x = big.upper() %}{% endfor %}");
  work_error(big + "{% for i in range(1000) %}{% set x = big == big %}{% endfor %}");
  work_error(big + "{% for i in range(1000) %}{% set x = 'b' in big %}{% endfor %}");
  work_error(big + "{% for i in range(1000) %}{% set x = big[5] %}{% endfor %}");
  work_error(big + "{% for i in range(1000) %}{% set x %}{{ big }}{% endset %}{% endfor %}");
  work_error("{{ range(3000) | unique | list | length }}");
  std::string err = error_of(
      "{% set ns = namespace(s='&' * 10000) %}{% for i in range(3) %}"
      "{% set ns.s = ns.s | e %}{% endfor %}",
      {}, options);
  EXPECT_NE(err.find("exceeds the limit"), std::string::npos) << err;
  err = error_of("{% set s = (['a' * 30000] * 5) | string %}", {}, options);
  EXPECT_NE(err.find("exceeds the limit"), std::string::npos) << err;
  err = error_of(
      "{% macro m(n) %}{{ 'a' * 40000 }}{% if n > 0 %}{{ m(n - 1) }}{% endif %}{% endmacro %}"
      "{{ m(20) }}",
      {}, options);
  EXPECT_NE(err.find("hold more than"), std::string::npos) << err;
  // Within the limits the same operations work.
  EXPECT_EQ(ok("{{ ('ab' * 3).upper() }} {{ [1, 1, 2] | unique | list }} {{ 'a<b' | e }}"),
            "ABABAB [1, 2] a&lt;b");
}

// Strings are shared, so a value repeated or copied into a list holds its text once: `[s] * 1000`
// of a 16 MB string used to hold 16 GB while the budget counted 16 KB. A list copied by a loop
// (once for each iteration of an outer one) counts against the work budget.
TEST(ChatTemplate, CopiedStringsShareTheirText) {
  const jinja::Value a = jinja::Value::string(std::string(1000, 'x'));
  const jinja::Value b = a;
  EXPECT_EQ(&a.as_string(), &b.as_string());
  ChatTemplateOptions options = fixed_clock();
  options.limits.max_output_bytes = 1 << 16;
  options.limits.max_work_bytes = 4 << 20;
  const Result<std::string> repeated = render_chat_template(
      "{% set s = 'x' * 60000 %}{% set l = [s] * 5000 %}{{ l | length }} {{ l[4999] | length }}",
      ojson::array(), false, ojson::object(), options);
  ASSERT_TRUE(repeated.is_ok()) << repeated.status().message();
  EXPECT_EQ(repeated.value(), "5000 60000");
  const std::string err = error_of(
      "{% set l = [0] * 20000 %}{% for i in range(10) %}{% for x in l %}{% endfor %}{% endfor %}",
      {}, options);
  EXPECT_NE(err.find("work limit"), std::string::npos) << err;
  EXPECT_EQ(ok("{% set l = [0] * 200 %}{% for i in range(10) %}{% for x in l %}{% endfor %}"
               "{% endfor %}done"),
            "done");
}

// A split into many parts stops at the work limit as the parts are made, not after all of them
// exist: a 4 MB string of commas made 4 million parts (~190 MB with the vector's growth) before
// its charge refused them. The child process runs with 48 MB of address space to spare.
TEST(ChatTemplate, SplitStopsAtTheWorkLimitAsItGoes) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "a sanitizer's shadow memory does not fit an address-space limit";
#else
  ChatTemplateOptions options = fixed_clock();
  options.limits.max_work_bytes = 16 << 20;
  const std::string tmpl = "{% set s = ',' * 4000000 %}{{ (s.split(',') | length) }}";
  // Within the budget the same split is whole (a smaller string).
  const auto small = render("{{ (',' * 1000).split(',') | length }}", ojson::object(), options);
  ASSERT_TRUE(small.is_ok()) << small.status().message();
  EXPECT_EQ(small.value(), "1001");
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::alarm(60);
    uint64_t vm_kb = 0;
    std::ifstream status("/proc/self/status");
    for (std::string line; std::getline(status, line);) {
      if (line.rfind("VmSize:", 0) == 0) vm_kb = std::stoull(line.substr(7));
    }
    const rlimit limit{(vm_kb << 10) + (48u << 20), (vm_kb << 10) + (48u << 20)};
    if (vm_kb == 0 || ::setrlimit(RLIMIT_AS, &limit) != 0) ::_exit(3);
    try {
      const Result<std::string> r =
          render_chat_template(tmpl, ojson::array(), false, ojson::object(), options);
      if (r.is_ok()) ::_exit(5);
      ::_exit(r.status().message().find("work limit") != std::string::npos ? 0 : 6);
    } catch (...) {
      ::_exit(7);
    }
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status)) << "child ended by signal " << WTERMSIG(status);
  if (WEXITSTATUS(status) == 3) GTEST_SKIP() << "cannot read or limit the address space here";
  EXPECT_EQ(WEXITSTATUS(status), 0)
      << "5: rendered; 6: another error; 7: an exception (out of memory)";
#endif
}

// Searches with needles past the short-needle cut-off (KMP) give Python's answers.
TEST(ChatTemplate, LongNeedlesSearchAsPythonDoes) {
  const std::string n = std::string(40, 'a') + "b";
  const ojson ctx = {{"h", "x" + n + "y" + std::string(45, 'a') + "b" + n + "z"}, {"n", n}};
  EXPECT_EQ(ok("{{ n in h }} {{ (n ~ 'q') in h }} {{ h.find(n) }} {{ h.rfind(n) }} "
               "{{ h.count(n) }} {{ h.index(n) }} {{ h.rindex(n) }}",
               ctx),
            "True False 1 89 3 1 89");  // the middle one inside the run of 45 'a's
  EXPECT_EQ(ok("{{ h.split(n) }} {{ h.rsplit(n, 1) }} {{ h.partition(n)[2] | length }} "
               "{{ h.rpartition(n)[0] | length }} {{ h.replace(n, '-') }}",
               ctx),
            "['x', 'yaaaaa', '', 'z'] ['x" + n + "y" + std::string(45, 'a') +
                "b', 'z'] 89 89 x-yaaaaa--z");
}

TEST(ChatTemplate, SharedValuesCannotExpandPastTheLimits) {
  // [x, x] sixty times over is a small value standing for 2^60 items.
  const std::string doubled =
      "{% set ns = namespace(v=[1]) %}{% for i in range(60) %}{% set ns.v = [ns.v, ns.v] %}"
      "{% endfor %}";
  for (const char* use : {"{{ ns.v | tojson }}", "{{ ns.v }}", "{{ ns.v | string }}"}) {
    const std::string err = error_of(doubled + use);
    EXPECT_FALSE(err.empty()) << use;
  }
  // jinja2 renders a 150 kB join; building it piece by piece is not quadratic work.
  const Result<std::string> joined = render("{{ (['abcdefghij'] * 15000) | join('') }}");
  ASSERT_TRUE(joined.is_ok()) << joined.status().message();
  EXPECT_EQ(joined->size(), 150000u);
}

// Random fragments of real template syntax: every one must render or fail cleanly.
TEST(ChatTemplate, RandomTemplatesNeverCrash) {
  const std::vector<std::string> pieces = {
      "{{",         "}}",     "{%",    "%}",         "{#",      "#}",    "-",    "+",
      "(",          ")",      "[",     "]",          "{",       "}",     "'",    "\"",
      "\\",         " if ",   " for ", " endfor ",   " endif ", " set ", " in ", " not ",
      " is ",       "|",      ".",     ":",          "::-1",    "~",     "**",   " macro ",
      " endmacro ", "loop",   "ns",    "namespace(", "\n",      " ",     "x",    "messages",
      "1e999",      "0",      "é",     "🦅",       " else ",  ",",     "=",    "*",
      "%",          "length", "tojson"};
  std::mt19937 rng(1234);
  const ojson ctx = {{"messages", {{{"role", "user"}, {"content", "hi"}}}}, {"x", 3}};
  ChatTemplateOptions options = fixed_clock();
  options.limits.max_iterations = 10000;
  for (int i = 0; i < 3000; ++i) {
    std::string tmpl;
    const int n = 1 + static_cast<int>(rng() % 40);
    for (int k = 0; k < n; ++k) tmpl += pieces[rng() % pieces.size()];
    auto r = render_chat_template(tmpl, ctx["messages"], true, ctx, options);
    if (!r.is_ok()) {
      EXPECT_FALSE(r.status().message().empty()) << tmpl;
    }
  }
}

TEST(ChatTemplate, ContextKeepsKeyOrderAndDefaultsToolsToNone) {
  const ojson args = ojson::parse(R"({"zeta": 1, "alpha": 2})");
  auto r = render_chat_template("{{ a | tojson }}{{ tools is none }}{{ documents is none }}",
                                ojson::array(), false, ojson{{"a", args}});
  ASSERT_TRUE(r.is_ok()) << r.status().message();
  EXPECT_EQ(r.value(), R"x({"zeta": 1, "alpha": 2}TrueTrue)x");
  // A plain nlohmann::json converts implicitly (its keys are already sorted).
  const nlohmann::json plain = {{"role", "user"}, {"content", "hi"}};
  auto p =
      render_chat_template("{{ messages[0] | tojson }}", nlohmann::json::array({plain}), false);
  ASSERT_TRUE(p.is_ok());
  EXPECT_EQ(p.value(), R"({"content": "hi", "role": "user"})");
  EXPECT_FALSE(render_chat_template("x", ojson::object(), false).is_ok());  // not an array
}

class ChatTemplateFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("kestrel_chat_template_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  void write(const std::string& name, const std::string& text) {
    std::ofstream(dir_ / name, std::ios::binary) << text;
  }
  fs::path dir_;
};

TEST_F(ChatTemplateFiles, LoadsNamedTemplatesAndAddedTokenObjects) {
  write("tokenizer_config.json", R"({
    "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
    "eos_token": "</s>", "pad_token": null,
    "chat_template": [{"name": "default", "template": "{{ bos_token }}D{{ eos_token }}"},
                      {"name": "tool_use", "template": "T{{ tools | length }}"}]})");
  auto def = load_chat_template((dir_ / "tokenizer_config.json").string());
  ASSERT_TRUE(def.is_ok()) << def.status().message();
  EXPECT_FALSE(def->special_tokens.contains("pad_token"));
  auto r = render_chat_template(def.value(), ojson::array(), false);
  ASSERT_TRUE(r.is_ok());
  EXPECT_EQ(r.value(), "<s>D</s>");

  auto tool = load_chat_template(dir_.string(), "tool_use");
  ASSERT_TRUE(tool.is_ok()) << tool.status().message();
  r = render_chat_template(tool.value(), ojson::array(), false, ojson{{"tools", {1, 2}}});
  ASSERT_TRUE(r.is_ok());
  EXPECT_EQ(r.value(), "T2");

  auto missing = load_chat_template(dir_.string(), "nope");
  ASSERT_FALSE(missing.is_ok());
  EXPECT_NE(missing.status().message().find("default, tool_use"), std::string::npos);
}

TEST_F(ChatTemplateFiles, PrefersChatTemplateJinjaInADirectory) {
  write("tokenizer_config.json", R"({"eos_token": "</s>", "chat_template": "old"})");
  write("chat_template.jinja", "new{{ eos_token }}\n");
  auto cfg = load_chat_template(dir_.string());
  ASSERT_TRUE(cfg.is_ok()) << cfg.status().message();
  auto r = render_chat_template(cfg.value(), ojson::array(), false);
  ASSERT_TRUE(r.is_ok());
  EXPECT_EQ(r.value(), "new</s>");
}

TEST_F(ChatTemplateFiles, MissingOrBrokenConfigIsAnError) {
  EXPECT_FALSE(load_chat_template((dir_ / "absent.json").string()).is_ok());
  write("tokenizer_config.json", "{not json");
  auto r = load_chat_template(dir_.string());
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.status().message().find("tokenizer_config.json"), std::string::npos);
  write("tokenizer_config.json", R"({"eos_token": "</s>"})");
  r = load_chat_template(dir_.string());
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.status().message().find("no chat_template"), std::string::npos);
}

}  // namespace
}  // namespace kestrel
