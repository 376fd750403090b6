#!/usr/bin/env python3
"""Reference chat-template renderings for Kestrel's template tests, made by Hugging Face
transformers (its own apply_chat_template machinery; Kestrel's output is never used here).

Runs where transformers and jinja2 are installed (the GPU machine; no network needed):

    python3 scripts/make_golden_templates.py TOKENIZERS_DIR OUT_DIR

TOKENIZERS_DIR holds <name>/models/tokenizer_config.json and tokenizer.json as
scripts/fetch_tokenizers.sh lays them out (.cache/tokenizers). Writes to OUT_DIR:

  llama3_1.jsonl, qwen3.jsonl   the packages' own chat_template, rendered with
                                tokenizer.apply_chat_template(messages, tokenize=False, ...)
  llama3_1_instruct_tools.jsonl Meta's Llama 3.1 Instruct template with tools
                                (llama3_1_instruct_tools.jinja, next to the fixtures), rendered
                                the same way with chat_template=<that text>
  features.jsonl                small templates exercising one Jinja feature each, rendered by
                                transformers' compiled template environment
                                (_compile_jinja_template(...).render(**context))
  provenance.json               versions of transformers/jinja2/Python used

Each conversation line is {"id", "messages", "add_generation_prompt", "extra", "expected"} (or
"error" instead of "expected" when transformers raised). Dates: the Llama 3.1 Instruct template
only calls for a date through `date_string` (default "26 Jul 2024"); cases pass it explicitly or
rely on that default, so no fixture depends on the day it was made. strftime_now is not used by
any fixture for the same reason (the C++ tests check it against a fixed clock instead).
"""
import json
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS_TEMPLATE = os.path.join(HERE, "..", "tests", "golden", "templates",
                              "llama3_1_instruct_tools.jinja")

LONG = ("Kestrel hovers over the meadow, scanning for voles. " * 60).strip()
UNICODE = ("日本語のテキスト、中文文本。한국어 텍스트. العربية نص. Ελληνικά. Русский текст. "
           "emoji 🦅🚀👩‍👩‍👧‍👦 flags 🇫🇷 combining é e\u0301 n\u0303 zero-width\u200bjoiner")
TRICKY = "Braces {{ not a tag }} {% if x %} {# no comment #} and quotes ' \" \\ backslash \\n"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


# Conversations every template must render: (id, messages).
COMMON = [
    ("user_only", [user("Hello!")]),
    ("system_user", [system("You are a helpful assistant."), user("What is 2+2?")]),
    ("system_user_assistant", [system("You are terse."), user("Capital of France?"),
                               assistant("Paris.")]),
    ("multi_turn", [user("Hi"), assistant("Hello! How can I help?"), user("Tell me a joke.")]),
    ("long_multi_turn", [system("Be nice."), user("one"), assistant("two"), user("three"),
                         assistant("four"), user("five")]),
    ("unicode", [system("Réponds en français, s'il te plaît."), user(UNICODE)]),
    ("empty_user", [user("")]),
    ("empty_assistant", [user("Say nothing."), assistant("")]),
    ("multiline", [user("  line one\n\tline two  \n\nline four\r\nline five\n  ")]),
    ("tricky_characters", [user(TRICKY), assistant("Escapes: \\t \\u00e9 {{ }}")]),
    ("long_content", [user(LONG), assistant(LONG[:500])]),
    ("whitespace_only", [user(" \n\t \u3000\u00a0 ")]),
    ("only_system", [system("System prompt only.")]),
    ("assistant_last", [user("Count to three."), assistant("1, 2, 3")]),
    ("extra_message_keys", [{"role": "user", "content": "Hi", "name": "alice"},
                            {"role": "assistant", "content": "Hello alice"}]),
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city. Unicode: °C / °F, 東京",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
            },
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web.",
        "parameters": {"type": "object",
                       "properties": {"query": {"type": "string"},
                                      "top_k": {"type": "number", "default": 2.5}},
                       "required": ["query"]},
    },
}


def tool_call(name, arguments, wrap=True):
    call = {"name": name, "arguments": arguments}
    return {"type": "function", "function": call} if wrap else call


QWEN3_EXTRA = [
    ("think_in_history", [user("2+2?"), assistant("<think>\nAdd them.\n</think>\n\n4"),
                          user("3+3?")]),
    ("think_last_assistant", [user("2+2?"),
                              assistant("<think>\nAdd two and two.\n</think>\n\nIt is 4.")]),
    ("think_no_newlines", [user("q"), assistant("<think>r</think>a")]),
    ("think_only_close_tag", [user("q"), assistant("reasoning here</think>\n\nanswer")]),
    ("reasoning_content_field", [user("Why?"),
                                 {"role": "assistant", "content": "Because.",
                                  "reasoning_content": "\nThinking hard.\n"}]),
    ("reasoning_content_none", [user("Why?"),
                                {"role": "assistant",
                                 "content": "<think>\ninline\n</think>\n\nBecause.",
                                 "reasoning_content": None}]),
    ("think_between_turns", [system("S"), user("a"), assistant("<think>x</think>b"), user("c"),
                             assistant("<think>\ny\n</think>\n\nd")]),
    ("tool_call_flow", [user("Weather in Paris?"),
                        {"role": "assistant", "content": "",
                         "tool_calls": [tool_call("get_weather",
                                                  {"city": "Paris", "unit": "celsius"})]},
                        {"role": "tool", "content": "{\"temp\": 21.5, \"sky\": \"clear\"}"}]),
    ("parallel_tool_calls", [user("Weather in Paris and Tokyo?"),
                             {"role": "assistant", "content": "Checking both.",
                              "tool_calls": [tool_call("get_weather", {"city": "Paris"}),
                                             tool_call("get_weather",
                                                       {"city": "東京", "days": 3})]},
                             {"role": "tool", "content": "Paris: 21C"},
                             {"role": "tool", "content": "Tokyo: 18C"},
                             assistant("Paris is 21C, Tokyo 18C.")]),
    ("tool_call_string_arguments", [user("Search kestrels"),
                                    {"role": "assistant", "content": "",
                                     "tool_calls": [tool_call(
                                         "search", "{\"query\": \"kestrel\", \"top_k\": 3}")]}]),
    ("tool_call_unwrapped", [user("Search"),
                             {"role": "assistant", "content": "",
                              "tool_calls": [tool_call("search", {"query": "x"}, wrap=False)]}]),
    ("tool_arguments_numbers", [user("n"),
                                {"role": "assistant", "content": "",
                                 "tool_calls": [tool_call("search", {
                                     "query": "q", "floats": [0.1, 1e-7, 1e16, 100.0, -0.0, 2.5e-5,
                                                              123456789.125],
                                     "ints": [0, -7, 12345678901234], "flag": True,
                                     "nothing": None, "nested": {"a": [{"b": []}, {}]},
                                     "text": "tab\tquote\" slash\\ é 🦅 \u0001"})]}]),
    ("multi_step_tools", [system("Use tools."), user("Plan a trip"),
                          {"role": "assistant", "content": "<think>\nneed weather\n</think>\n\n",
                           "tool_calls": [tool_call("get_weather", {"city": "Rome"})]},
                          {"role": "tool", "content": "Rome: sunny"},
                          {"role": "assistant", "content": "<think>\nnow search\n</think>\n\n",
                           "tool_calls": [tool_call("search", {"query": "Rome hotels"})]},
                          {"role": "tool", "content": "Hotel A, Hotel B"},
                          assistant("<think>\ndone\n</think>\n\nGo to Rome, stay at Hotel A.")]),
    ("user_looks_like_tool_response", [user("q"), assistant("a"),
                                       user("<tool_response>\nfake\n</tool_response>")]),
    ("system_in_middle", [user("a"), system("Mid-conversation system note."), user("b")]),
    ("assistant_first", [assistant("I start."), user("Okay.")]),
    # Qwen3's template tests `'</think>' in message.content`, which fails on a null content.
    ("assistant_content_null_raises", [user("q"), {"role": "assistant", "content": None}]),
]

QWEN3_TOOLS_CASES = [
    ("tools_user", [user("Weather in Oslo?")], {"tools": [WEATHER_TOOL, SEARCH_TOOL]}),
    ("tools_system_user", [system("You are a weather bot."), user("Oslo?")],
     {"tools": [WEATHER_TOOL]}),
    ("tools_full_flow", [system("Bot."), user("Weather in Oslo?"),
                         {"role": "assistant", "content": "",
                          "tool_calls": [tool_call("get_weather", {"city": "Oslo"})]},
                         {"role": "tool", "content": "Oslo: -3C, snow ❄"}],
     {"tools": [WEATHER_TOOL, SEARCH_TOOL]}),
    ("enable_thinking_false", [user("Quick answer please.")], {"enable_thinking": False}),
    ("enable_thinking_true", [user("Think about it.")], {"enable_thinking": True}),
]

LLAMA_EXTRA = [
    ("content_none", [user("before"), {"role": "assistant", "content": None}]),
    ("trimmed_edges", [system("\n\n  padded system  \n"), user("\t padded user \n")]),
    ("custom_roles", [{"role": "ipython", "content": "{\"result\": 1}"},
                      {"role": "tool", "content": "tool text"}, user("continue")]),
]

TOOLS_TEMPLATE_CASES = [
    ("no_system", [user("Hi there")], {}),
    ("system_user", [system("  You are a pirate.  "), user("Ahoy?")], {}),
    ("date_string", [user("What day is it?")], {"date_string": "01 Jan 2025"}),
    ("tools_in_user_message", [system("Sys"), user("  Weather in Lima?  ")],
     {"tools": [WEATHER_TOOL, SEARCH_TOOL]}),
    ("tools_in_system", [system("Sys"), user("Weather in Lima?")],
     {"tools": [WEATHER_TOOL], "tools_in_user_message": False}),
    ("custom_tools", [user("Search it")], {"custom_tools": [SEARCH_TOOL]}),
    ("builtin_tools_call", [system("Sys"), user("Search the web for kestrels"),
                            {"role": "assistant",
                             "tool_calls": [tool_call("brave_search", {"query": "kestrel"})]},
                            {"role": "ipython", "content": "Kestrels are falcons."}],
     {"builtin_tools": ["brave_search", "wolfram_alpha", "code_interpreter"]}),
    ("custom_tool_call", [user("Weather in Lima?"),
                          {"role": "assistant",
                           "tool_calls": [tool_call("get_weather",
                                                    {"city": "Lima", "unit": "celsius"})]},
                          {"role": "tool", "content": {"temp": 19.5, "sky": ["clear", "warm"]}}],
     {"tools": [WEATHER_TOOL], "tools_in_user_message": False}),
    ("tool_response_string", [user("q"),
                              {"role": "assistant",
                               "tool_calls": [tool_call("search", {"query": "q"})]},
                              {"role": "tool", "content": "plain text result"}], {}),
    ("two_tool_calls_raise", [user("q"),
                              {"role": "assistant",
                               "tool_calls": [tool_call("search", {"query": "a"}),
                                              tool_call("search", {"query": "b"})]}], {}),
    ("tools_without_user_raise", [system("Only a system message.")], {"tools": [SEARCH_TOOL]}),
    ("unicode", [user(UNICODE)], {"date_string": "29 Feb 2024"}),
    ("multi_turn", [system("S"), user("a"), assistant("b"), user("c")], {}),
]


def conversation_cases(name):
    cases = []
    for cid, msgs in COMMON:
        for agp in (False, True):
            cases.append((f"{cid}/{'gen' if agp else 'nogen'}", msgs, agp, {}))
    if name == "qwen3":
        for cid, msgs in QWEN3_EXTRA:
            for agp in (False, True):
                cases.append((f"{cid}/{'gen' if agp else 'nogen'}", msgs, agp, {}))
        for cid, msgs, extra in QWEN3_TOOLS_CASES:
            cases.append((cid, msgs, True, extra))
    elif name == "llama3_1":
        for cid, msgs in LLAMA_EXTRA:
            for agp in (False, True):
                cases.append((f"{cid}/{'gen' if agp else 'nogen'}", msgs, agp, {}))
    elif name == "llama3_1_instruct_tools":
        cases = []
        for cid, msgs, extra in TOOLS_TEMPLATE_CASES:
            for agp in (False, True):
                cases.append((f"{cid}/{'gen' if agp else 'nogen'}", msgs, agp, extra))
        for cid, msgs in COMMON[:6]:
            cases.append((f"common_{cid}", msgs, True, {}))
    return cases


# Small templates exercising one feature each: (id, template, context). Rendered by the same
# Jinja environment transformers compiles chat templates with.
FEATURES = [
    ("trim_blocks", "{% if true %}\nyes\n{% endif %}\nafter", {}),
    ("lstrip_blocks", "a\n    {% if true %}\n    b\n    {% endif %}\nc", {}),
    ("lstrip_not_for_variables", "a\n    {{ 'x' }}\n", {}),
    ("plus_disables_lstrip", "a\n    {%+ if true %}b{% endif %}", {}),
    ("plus_disables_trim", "{% if true +%}\nb{% endif %}", {}),
    ("dash_strips_both", "a   \n  {%- if true -%}  \n  b  {{- ' c ' -}}  d", {}),
    ("comments", "a {# note #} b\n  {# own line #}\nc {#- strip -#}   d", {}),
    ("trailing_newline_dropped", "line\n", {}),
    ("crlf_normalized", "a\r\nb\rc{% if true %}\r\nd{% endif %}", {}),
    ("raw_block", "{% raw %}{{ not evaluated }}{% endraw %}!", {}),
    ("string_escapes", "{{ 'tab\\there' }}|{{ \"q\\\"uote\" }}|{{ 'uni\\u00e9\\x41' }}|{{ 'keep\\q' }}", {}),
    ("adjacent_strings", "{{ 'a' 'b' \"c\" }}", {}),
    ("arithmetic", "{{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 2 ** 10 }} "
     "{{ 1 + 2 * 3 }} {{ (1 + 2) * 3 }} {{ 10 - 2 - 3 }} {{ 2 ** 3 ** 2 }}", {}),
    ("float_output", "{{ 0.1 + 0.2 }} {{ 1.0 }} {{ 1e16 }} {{ 1e-5 }} {{ 3 * 1.5 }} {{ 1/3 }} "
     "{{ 100.0 }} {{ 1.5e300 * 1e10 }} {{ -0.0 }}", {}),
    ("float_floordiv_mod", "{{ 7.5 // 2 }} {{ -7.5 // 2 }} {{ 7.5 % 2 }} {{ -7.5 % 2 }}", {}),
    ("concat_tilde", "{{ 'a' ~ 1 ~ none ~ true ~ [1, 'x'] ~ undefined_thing }}", {}),
    ("string_plus", "{{ 'a' + 'b' }}{{ [1] + [2, 3] }}", {}),
    ("string_repeat", "{{ 'ab' * 3 }}{{ 2 * 'c' }}{{ [0] * 3 }}", {}),
    ("comparisons", "{{ 1 < 2 < 3 }} {{ 3 > 2 > 2 }} {{ 'a' < 'b' }} {{ [1, 2] < [1, 3] }} "
     "{{ 1 == 1.0 }} {{ 1 == true }} {{ 'a' != 'b' }} {{ none == none }}", {}),
    ("logic_values", "{{ 0 or 'x' }}|{{ 'a' and 'b' }}|{{ '' and 'b' }}|{{ not [] }}|"
     "{{ none or [] }}", {}),
    ("ternary", "{{ 'y' if true else 'n' }}{{ 'y' if false else 'n' }}[{{ 'y' if false }}]", {}),
    ("in_operator", "{{ 'b' in 'abc' }} {{ 2 in [1, 2] }} {{ 'k' in {'k': 1} }} "
     "{{ 'z' not in 'abc' }} {{ 3 not in [1] }}", {}),
    ("print_values", "{{ none }}|{{ true }}|{{ [1, 'a', none, true, 1.5] }}|{{ {'a': 1, 'b': [2]} }}|"
     "{{ ('x',) }}|{{ ('a', 1) }}|{{ \"it's\" }}|{{ ['it\\'s', 'q\"'] }}", {}),
    ("slicing", "{{ 'abcdef'[1:4] }} {{ 'abcdef'[::-1] }} {{ 'abcdef'[::2] }} {{ 'abcdef'[-2:] }} "
     "{{ [1,2,3,4,5][1:-1] }} {{ [1,2,3,4,5][::-2] }} {{ [1,2,3][5:] }} {{ 'abc'[-10:10] }} "
     "{{ [1,2,3,4,5][4:1:-1] }} {{ 'héllo'[1:3] }}", {}),
    ("indexing", "{{ 'héllo'[1] }} {{ [1,2,3][-1] }} {{ [1,2,3][5] is defined }} "
     "{{ messages[0].role }} {{ messages[-1]['content'] }}",
     {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
    ("messages_reversed", "{% for m in messages[::-1] %}{{ loop.index0 }}:{{ m.content }} {% endfor %}",
     {"messages": [{"role": "user", "content": "1"}, {"role": "user", "content": "2"},
                   {"role": "user", "content": "3"}]}),
    ("loop_vars", "{% for x in 'abc' %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}"
     "{{ loop.revindex0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}"
     "{{ loop.previtem is defined }}{{ loop.nextitem | default('-') }}{{ loop.cycle('o', 'e') }};"
     "{% endfor %}", {}),
    ("loop_else_and_filter", "{% for x in [] %}{{ x }}{% else %}empty{% endfor %}|"
     "{% for x in range(10) if x is odd %}{{ x }}{{ '' if loop.last else ',' }}{% endfor %}", {}),
    ("loop_controls", "{% for x in range(10) %}{% if x == 2 %}{% continue %}{% endif %}"
     "{% if x > 4 %}{% break %}{% endif %}{{ x }}{% endfor %}", {}),
    ("loop_unpack", "{% for k, v in {'a': 1, 'b': 2} | items %}{{ k }}={{ v }} {% endfor %}"
     "{% for a, b in [[1, 2], (3, 4)] %}{{ a + b }}{% endfor %}", {}),
    ("loop_scoping", "{% set x = 'outer' %}{% for i in [1, 2] %}{{ x }}{% set x = 'inner' ~ i %}"
     "{{ x }} {% endfor %}{{ x }}", {}),
    ("if_scoping", "{% if true %}{% set y = 5 %}{% endif %}{{ y }}", {}),
    ("nested_loops", "{% for i in range(3) %}{% for j in range(i) %}{{ i }}{{ j }}"
     "{{ loop.length }} {% endfor %}{{ loop.index }}|{% endfor %}", {}),
    ("namespace", "{% set ns = namespace(count=0, found=false) %}{% for i in range(5) %}"
     "{% set ns.count = ns.count + i %}{% if i == 3 %}{% set ns.found = true %}{% endif %}"
     "{% endfor %}{{ ns.count }} {{ ns.found }}", {}),
    ("namespace_from_dict", "{% set ns = namespace({'a': 1}, b=2) %}{{ ns.a }}{{ ns.b }}"
     "{{ ns.c is defined }}", {}),
    ("set_tuple_and_block", "{% set a, b = 1, 2 %}{{ a }}{{ b }}{% set blk %}  Block {{ a }} "
     "{% endset %}[{{ blk }}]{% set up | upper %}shout{% endset %}{{ up }}", {}),
    ("macro", "{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}"
     "{{ greet('Ann') }} {{ greet('Bo', punct='?') }} {{ greet(name='Cy') }}", {}),
    ("macro_recursion", "{% macro fact(n) %}{% if n <= 1 %}1{% else %}{{ n * fact(n - 1) | int }}"
     "{% endif %}{% endmacro %}{{ fact(10) }}", {}),
    ("with_block", "{% with a = 1, b = 2 %}{{ a + b }}{% endwith %}{{ a is defined }}", {}),
    ("filter_block", "{% filter upper %}hello {{ 'world' }}{% endfilter %}", {}),
    ("generation_block", "A{% generation %}B{{ 1 }}{% endgeneration %}C", {}),
    ("filters_string", "{{ '  hi  ' | trim }}|{{ 'xxhixx' | trim('x') }}|{{ 'Hello' | lower }}|"
     "{{ 'hello world' | upper }}|{{ 'hello wORLD-foo(bar' | title }}|{{ 'hELLO' | capitalize }}|"
     "{{ 'a-b-c' | replace('-', '+') }}|{{ 'aaa' | replace('a', 'b', 2) }}|{{ 'abc' | replace('', '.') }}|"
     "{{ 'abc' | reverse }}|{{ 'ab' | center(6) }}|{{ 'one two  three' | wordcount }}|"
     "{{ '<a href=\"x\">&\\'' | escape }}|{{ 42 | string }}{{ none | string }}", {}),
    ("filters_length_etc", "{{ [1, 2, 3] | length }} {{ 'héllo' | length }} {{ {'a': 1} | length }} "
     "{{ [] | count }} {{ [3, 1, 2] | first }} {{ [3, 1, 2] | last }} {{ 'abc' | list }} "
     "{{ [3, 1, 2] | sort }} {{ [3, 1, 2] | sort(reverse=true) }} {{ ['b', 'A', 'a'] | sort }} "
     "{{ ['b', 'A', 'a'] | sort(case_sensitive=true) }} {{ [1, 2, 1, 3] | unique | list }} "
     "{{ [1, 5, 3] | max }} {{ [4, 2, 8] | min }} {{ [1, 2, 3] | sum }} {{ [1.5, 2] | sum(start=1) }}",
     {}),
    ("filters_join_map_select", "{{ [1, 2, 3] | join(', ') }}|{{ users | map(attribute='name') | join }}|"
     "{{ users | selectattr('admin') | map(attribute='name') | list }}|"
     "{{ users | rejectattr('admin') | map(attribute='name') | first }}|"
     "{{ [1, 2, 3, 4] | select('even') | list }}|{{ [1, 2, 3, 4] | reject('odd') | list }}|"
     "{{ ['a', 'b', 'c'] | reject('equalto', 'b') | join(', ') }}|{{ ['x', 'Y'] | map('upper') | list }}|"
     "{{ users | map(attribute='age', default=0) | list }}|{{ users | join(', ', attribute='name') }}|"
     "{{ users | selectattr('age', 'gt', 20) | map(attribute='name') | list }}",
     {"users": [{"name": "ann", "admin": True, "age": 31}, {"name": "bo", "admin": False}]}),
    ("filters_numbers", "{{ -3 | abs }} {{ '42' | int }} {{ '4.7' | int }} {{ 'x' | int(7) }} "
     "{{ '0x1A' | int(0, 16) }} {{ '2.5' | float }} {{ 3 | float }} {{ 2.675 | round(2) }} "
     "{{ 2.5 | round }} {{ 3.5 | round }} {{ 2.1 | round(0, 'ceil') }} {{ 7 | round }}", {}),
    ("filters_default", "{{ missing | default('d') }}|{{ none | default('d') }}|"
     "{{ '' | default('d', true) }}|{{ missing | d('x') }}|{{ 0 | default('d', boolean=true) }}", {}),
    ("filters_dict", "{{ d | items | list }} {{ d | dictsort }} {{ d | dictsort(by='value', reverse=true) }} "
     "{% for k in d %}{{ k }}{% endfor %} {{ d.keys() | list }} {{ d.values() | list }} "
     "{{ d.get('b') }} {{ d.get('zz', 'none') }} {{ d.items() | list }}",
     {"d": {"b": 2, "a": 3, "c": 1}}),
    ("filters_misc", "{{ [1, 2, 3, 4, 5] | batch(2) | list }} {{ 'a\nb\n\nc' | indent(2) }} "
     "{{ 'a\nb' | indent(2, true) }} {{ 'x' | attr('upper') is defined }}", {}),
    ("tojson", "{{ data | tojson }}|{{ data | tojson(indent=2) }}|{{ data | tojson(sort_keys=true) }}|"
     "{{ data | tojson(separators=(',', ':')) }}|{{ 'é\"\\n' | tojson }}|{{ 'é' | tojson(ensure_ascii=true) }}|"
     "{{ [] | tojson(indent=2) }}|{{ {} | tojson }}|{{ none | tojson }}|{{ 1.0 | tojson }}",
     {"data": {"z": 1, "a": [1.5, None, True, "ü🦅"], "m": {"k": [], "e": {}},
               "f": 1e-7, "big": 12345678901234567}}),
    ("tests", "{{ x is defined }} {{ y is undefined }} {{ none is none }} {{ 's' is string }} "
     "{{ 1 is number }} {{ true is number }} {{ 1 is integer }} {{ 1.0 is float }} "
     "{{ true is boolean }} {{ {} is mapping }} {{ [] is iterable }} {{ 'a' is iterable }} "
     "{{ {} is sequence }} {{ 3 is odd }} {{ 4 is even }} {{ 9 is divisibleby 3 }} "
     "{{ 1 is eq 1 }} {{ 2 is gt 1 }} {{ 'a' is in 'abc' }} {{ true is true }} {{ 0 is false }} "
     "{{ x is not none }} {{ 'ab' is lower }} {{ 'AB' is upper }} {{ range is callable }} "
     "{{ none is sameas none }}", {"x": 1}),
    ("string_methods", "{{ s.strip() }}|{{ s.lstrip() }}|{{ s.rstrip() }}|{{ s.strip(' \\nx') }}|"
     "{{ s.split() }}|{{ 'a,b,,c'.split(',') }}|{{ 'a,b,c'.split(',', 1) }}|{{ 'a,b,c'.rsplit(',', 1) }}|"
     "{{ s.startswith('  x') }}|{{ s.endswith(('z', '\\n')) }}|{{ 'Hello'.upper() }}|{{ 'Hello'.lower() }}|"
     "{{ 'hello world'.title() }}|{{ 'abcabc'.replace('b', 'X') }}|{{ 'abcabc'.find('c') }}|"
     "{{ 'abcabc'.rfind('c') }}|{{ 'abcabc'.count('bc') }}|{{ '-'.join(['a', 'b']) }}|"
     "{{ 'a\\nb\\r\\nc'.splitlines() }}|{{ '42'.isdigit() }}|{{ 'ab'.isalpha() }}|{{ ' '.isspace() }}|"
     "{{ '7'.zfill(3) }}|{{ 'k=v'.partition('=') }}|{{ 'éa'.find('a') }}|{{ 'x'.center(5, '*') }}|"
     "{{ 'abc'.capitalize() }}|{{ '  a  b '.split(' ') }}",
     {"s": "  x y\tz \n"}),
    ("qwen_think_split", "{% set c = content.split('</think>')[-1].lstrip('\\n') %}"
     "{% set r = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
     "[{{ r }}][{{ c }}][{{ r.strip('\\n') }}]",
     {"content": "<think>\n\nstep 1\nstep 2\n\n</think>\n\nfinal answer\n"}),
    ("dict_literal_and_access", "{% set d = {'a': 1, 'b': {'c': [10, 20]}} %}{{ d.a }}{{ d['b'].c[1] }}"
     "{{ d.b['c'][0] }}{{ d.missing is defined }}{{ d['missing'] is defined }}", {}),
    ("dict_global", "{{ dict(a=1, b=2) }} {{ dict({'x': 1}, y=2) | length }}", {}),
    ("range_forms", "{{ range(3) | list }} {{ range(1, 10, 3) | list }} {{ range(5, 0, -2) | list }} "
     "{{ range(0) | list }}", {}),
    ("attribute_on_none", "{{ none.attr is defined }} {{ x.y is defined }}", {"x": {"z": 1}}),
    ("unicode_case", "{{ 'ÉCOLE ΣΟΦΊΑ Straße' | lower }}|{{ 'école straße ǆ' | upper }}", {}),
    ("python_strip_unicode_space", "[{{ '\u3000\u00a0 x \u2003\n' | trim }}][{{ ' \u00a0y'.strip() }}]", {}),
    ("concat_binds_tighter_than_plus", "{{ 1 + 2 ~ 3 }}", {}),
    ("whitespace_in_output", "{%- for m in messages -%}\n  <{{ m }}>\n{%- endfor -%}\n  end  ",
     {"messages": ["a", "b"]}),
    ("raise_exception", "ok{{ raise_exception('Conversation roles must alternate') }}", {}),
    ("undefined_attribute_error", "{{ missing.attr }}", {}),
    ("undefined_arithmetic_error", "{{ missing + 1 }}", {}),
    ("type_error_concat", "{{ 'a' + 1 }}", {}),
    ("none_plus_string_error", "{{ messages[0].content + 'x' }}",
     {"messages": [{"role": "user", "content": None}]}),
    ("in_none_error", "{{ 'x' in messages[0].content }}",
     {"messages": [{"role": "user", "content": None}]}),
    ("divide_by_zero_error", "{{ 1 / 0 }}", {}),
    ("namespace_assign_error", "{% set d = {} %}{% set d.x = 1 %}", {}),
]


# Corner cases of Jinja's semantics (scoping, laziness, whitespace, literals) that a
# reimplementation is likely to get wrong.
FEATURES += [
    ('whitespace_1', '  {% if true %}  x  {% endif %}  \n{% for i in [1] %}\n  {{ i }}\n{% endfor %}\n', {}),
    ('whitespace_2', "{% if true -%}\n\n   a{%- endif %}  b\n\t{# c #}\n\t{{- 'd' }}", {}),
    ('whitespace_3', 'x {%- raw -%}  {{ y }}  {%- endraw -%}  z', {}),
    ('whitespace_4', 'x\n  {% raw %}\n  {{ y }}\n  {% endraw %}\n  z', {}),
    ('whitespace_5', 'a{#\n#}\n  b\n{#- x #}c\n   {#+ y #}d', {}),
    ('whitespace_6', "{{ 'a' }}\n   {%- set x = 1 %}\n   {{ x }}\n\n", {}),
    ('whitespace_7', '\xa0 {%- if true %}x{% endif %}', {}),
    ('whitespace_8', 'a  {% if true %}\n b{% endif %}', {}),
    ('expr_1', "{{ {'a': {'b': 1}} }}{{ {'x':1}['x'] }}", {}),
    ('expr_2', "{{ [1,2,3][True] }}{{ 'abc'[-1] }}{{ 'abc'[1:] ~ 'abc'[:-1] }}", {}),
    ('expr_3', '{{ x[::-1] }}{{ x[1::2] }}{{ x[-1:-10:-3] }}{{ x[100:-100:-1] }}', {'x': [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}),
    ('expr_4', '{% for a in x %}{{ a }}{% endfor %}', {'x': {'b': 1, 'a': 2}}),
    ('expr_5', '{{ 1 if x else 2 if y else 3 }}', {'x': False, 'y': False}),
    ('expr_6', '{{ (1, 2) }}{{ () }}{{ (1) }}{{ [] }}{{ [1,] }}', {}),
    ('expr_7', '{{ 10 // 3 * 3 + 10 % 3 }} {{ 2**-1 }} {{ 1e3 }} {{ 1_000 }} {{ 0x1f }} {{ 0b101 }}', {}),
    ('expr_8', '{% set ns = namespace(a=[]) %}{% set ns.a = ns.a + [1] %}{% set ns.a = ns.a + [2] %}{{ ns.a }}{{ ns }}', {}),
    ('expr_9', "{{ 'a' is string and 1 is number }} {{ not none is none }} {{ -x|abs }}", {'x': 3}),
    ('expr_10', "{{ 'Hello %s' }}{{ '%' }}", {}),
    ('expr_11', "{{ x.items() | list }}{{ x['items'] }}", {'x': {'items': 5}}),
    ('expr_12', '{{ 3.0 == 3 }} {{ 0.1 * 3 }} {{ 2.0 ** 0.5 }} {{ 1e308 * 10 }} {{ -1e308 * 10 }}', {}),
    ('expr_13', "{{ [1, [2, [3, {'a': none}]]] | tojson }} {{ {'b': 1, 'a': 2} | tojson(indent=1, sort_keys=true) }}", {}),
    ('expr_14', '{{ x | tojson }}', {'x': '\u2028\x00\x1f\x7f'}),
    ('expr_15', '{{ [\'\xa0\', \'\u200b\', \'\n\', \'é\', \'\\\\\', \'a"b\\\'c\'] }}', {}),
    ('expr_16', "{{ x.split('|') }}{{ x.upper().lower() }}{{ x[0].upper() ~ x[1:] }}", {'x': 'a|b|c'}),
    ('expr_17', '{{ 5 is divisibleby(2) }}{{ x is sequence }}{{ x is mapping }}{{ range(3) is iterable }}', {'x': 's'}),
    ('expr_18', "{{ 'ab' in ['ab'] }}{{ 1 in [1.0] }}{{ 'a' in {'a':1} }}{{ none in [none] }}", {}),
    ('expr_19', '{% for i in range(3) %}{% set x = loop.index %}{% if loop.first %}F{% elif loop.last %}L{% else %}M{% endif %}{{ x }}{% endfor %}{{ x is defined }}', {}),
    ('expr_20', "{{ messages | selectattr('role', 'equalto', 'user') | list | length }}", {'messages': [{'role': 'user'}, {'role': 'assistant'}, {'role': 'user'}]}),
    ('expr_21', "{{ x | map('int') | sum }}{{ x | map('string') | join('+') }}", {'x': ['1', '2', '3']}),
    ('expr_22', '{{ 7 | string | length }}{{ none | length is defined }}', {}),
    ('expr_23', "{{ 'abc' | first }}{{ 'abc' | last }}{{ {'q':1} | first }}{{ [] | first is defined }}", {}),
    ('expr_24', "{{ 'x' ~ (1 if true) ~ 'y' }}{{ 'a' if none else 'b' }}", {}),
    ('expr_25', '{{ x|default }}{{ x|default(none) }}.', {}),
    ('expr_26', "{{ '\\x41\\101\\u0042\\U0001F985\\N' }}", {}),
    ('expr_27', "{{ 'é\\é' }}", {}),
    ('expr_28', "{{ 1 < 2 > 1 == 1 != 2 }}{{ 'a' < 'B' }}{{ (1, 2) < (1, 2, 0) }}", {}),
    ('expr_29', '{{ x.content is string }}{{ x.content is none }}{{ x.nope is none }}', {'x': {'content': None}}),
    ('expr_30', "{% macro m(a, b=a ~ '!') %}{{ a }}{{ b }}{% endmacro %}{{ m('x') }}{{ m }}", {}),
    ('unknown_filter_1', '{% if false %}{{ x | nosuch }}{% endif %}ok', {}),
    ('unknown_filter_2', '{{ x | nosuch if false else 1 }}', {}),
    ('unknown_filter_3', '{% for i in [] %}{{ x | nosuch }}{% endfor %}ok', {}),
    ('unknown_filter_4', '{% if true %}{{ x | nosuch }}{% endif %}ok', {}),
    ('unknown_filter_5', '{% if false %}{% for i in [] %}{{ x | nosuch }}{% endfor %}{% endif %}ok', {}),
    ('unknown_filter_6', '{{ 1 is nosuchtest if false else 2 }}{% if x is nosuch %}{% endif %}', {}),
    ('unknown_filter_7', "{{ 'a' if false }}{% set x = 1 | nosuch %}", {}),
    ('scope_1', '{% for m in l %}{{ x }}{% endfor %}{% set x = 1 %}{{ x }}', {'x': 5, 'l': [1]}),
    ('scope_2', '{{ x }}{% for m in l %}{{ x }}{% endfor %}{% set x = 1 %}{{ x }}', {'x': 5, 'l': [1]}),
    ('scope_3', '{% if c %}{% set x = 1 %}{% endif %}{% for m in l %}{{ x }}{% endfor %}', {'x': 5, 'l': [1], 'c': False}),
    ('scope_4', '{% if c %}{% set x = 1 %}{% else %}{% set x = 2 %}{% endif %}{% for m in l %}{{ x }}{% endfor %}', {'x': 5, 'l': [1], 'c': False}),
    ('scope_5', '{% for a in l %}{% for b in l %}[{{ y }}]{% endfor %}{% set y = a %}{% endfor %}', {'y': 5, 'l': [1, 2]}),
    ('scope_6', '{% macro m() %}{{ x }}{% endmacro %}{{ m() }}{% set x = 3 %}{{ m() }}', {'x': 5}),
    ('scope_7', '{% set x %}{% set y = 1 %}{{ y }}{% endset %}{{ x }}{{ y }}', {}),
    ('scope_8', "{% filter upper %}{% set z = 'q' %}{{ z }}{% endfilter %}{{ z }}", {}),
    ('scope_9', "{% for i in l %}{% if loop.first %}{% set t = 'F' %}{% endif %}{{ t }}{% endfor %}", {'t': 'ctx', 'l': [1, 2]}),
    ('scope_10', '{% with %}{% set w = 1 %}{% endwith %}{{ w }}', {'w': 'ctx'}),
    ('generator_1', "{% set g = l | select('odd') %}{{ 'yes' if g else 'no' }}{{ g | list }}{{ g | list }}", {'l': [2, 4]}),
    ('generator_2', "{{ (l | map('upper') | list) }}{{ 'x' if (l | selectattr('a')) }}", {'l': ['a']}),
    ('generator_3', '{{ l | items | list }}', {'l': ['a']}),
    ('generator_4', "{{ 'ok' if (l | items) }}", {'l': ['a']}),
    ('operator_precedence_ok', "{{ 2 * 3 ~ 4 }} {{ -2 ** 2 }} {{ not 1 == 2 }} {{ [1, 2, 3] | length - 1 }} {{ 10 - 3 | abs }} {{ 'a' ~ 'b' if false else 'c' }}", {}),
    # Slices of variables are plain Python subscripts in Jinja's compiled code, so they fail
    # where an index would give undefined.
    ('slice_none_error', '{{ n[::-1] }}', {'n': None}),
    ('slice_int_error', '{{ i[1:] }}', {'i': 5}),
    ('slice_dict_error', '{{ d[0:1] }}', {'d': {'a': 1}}),
    ('int_of_undefined_error', '{{ missing | int }}', {}),
    ('namespace_of_undefined_error', '{% set ns = namespace(missing) %}', {}),
    ('comment_open_at_end', 'abc{#', {}),
    ('dict_views', "{{ d.items() }} {{ d.keys() }} {{ d.values() | list }} {{ d.keys() | length }} {{ 'a' in d.keys() }}", {'d': {'a': 1, 'b': [2]}}),
    ('dict_view_tojson_error', '{{ d.keys() | tojson }}', {'d': {'a': 1}}),
    ('generator_length_error', "{{ [1, 2] | select('odd') | length }}", {}),
    ('loop_cycle_prev_next', "{% for x in [1, 2, 3] %}{{ loop.cycle('a', 'b') }}{{ loop.previtem | default('^') }}{{ loop.nextitem | default('$') }} {% endfor %}", {}),
    ('string_literal_crlf', "{{ 'a\r\nb' | length }}", {}),
]


def render_features(out_dir):
    from transformers.utils.chat_template_utils import _compile_jinja_template
    lines = []
    for fid, template, context in FEATURES:
        full = {"messages": [], "tools": None, "documents": None, "add_generation_prompt": False}
        full.update(context)
        case = {"id": fid, "template": template, "context": context}
        try:
            case["expected"] = _compile_jinja_template(template).render(**full)
        except Exception as e:  # the C++ interpreter must fail on these too
            case["error"] = f"{type(e).__name__}: {e}"
        lines.append(case)
    write_jsonl(os.path.join(out_dir, "features.jsonl"), lines)


def render_conversations(tokenizer, name, template_text, out_dir):
    import jinja2
    lines = []
    for cid, messages, agp, extra in conversation_cases(name):
        case = {"id": cid, "messages": messages, "add_generation_prompt": agp, "extra": extra}
        kwargs = dict(extra)
        if template_text is not None:
            kwargs["chat_template"] = template_text
        try:
            out = tokenizer.apply_chat_template(messages, tokenize=False, return_dict=False,
                                                add_generation_prompt=agp, **kwargs)
        except (jinja2.exceptions.TemplateError, TypeError, ValueError) as e:
            # A template that fails in transformers must fail in Kestrel too.
            case["error"] = f"{type(e).__name__}: {e}"
            print(f"  {name}/{cid}: raised {case['error']}")
        else:
            if not isinstance(out, str):
                sys.exit(f"apply_chat_template returned {type(out).__name__}, not str")
            case["expected"] = out
        lines.append(case)
    write_jsonl(os.path.join(out_dir, f"{name}.jsonl"), lines)
    errors = sum(1 for c in lines if "error" in c)
    if errors * 4 > len(lines):
        sys.exit(f"{name}: {errors} of {len(lines)} cases raised; the harness, not the template, "
                 "is probably wrong")
    print(f"{name}: {len(lines)} cases ({errors} expected errors)")
    print(f"  first: {lines[0]['id']}: {lines[0].get('expected', lines[0].get('error'))!r}")


def write_jsonl(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    tokenizers_dir, out_dir = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)

    import jinja2
    import transformers
    from transformers import AutoTokenizer

    with open(TOOLS_TEMPLATE, encoding="utf-8") as f:
        tools_template = f.read()
    llama = AutoTokenizer.from_pretrained(os.path.join(tokenizers_dir, "llama3_1", "models"))
    qwen = AutoTokenizer.from_pretrained(os.path.join(tokenizers_dir, "qwen3", "models"))
    render_conversations(llama, "llama3_1", None, out_dir)
    render_conversations(qwen, "qwen3", None, out_dir)
    render_conversations(llama, "llama3_1_instruct_tools", tools_template, out_dir)
    render_features(out_dir)
    print(f"features: {len(FEATURES)} cases")
    with open(os.path.join(out_dir, "provenance.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "jinja2": jinja2.__version__,
                   "python": platform.python_version(),
                   "renderer": "AutoTokenizer.apply_chat_template(tokenize=False); features via "
                               "transformers.utils.chat_template_utils._compile_jinja_template"},
                  f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
