// Tokens and syntax tree of the chat-template (Jinja subset) interpreter, and the parser entry
// point. The lexer follows Jinja's own rules as transformers configures them: newlines normalized
// to "\n", one trailing newline dropped, trim_blocks and lstrip_blocks on, `-`/`+` whitespace
// control on every tag.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/status.h"
#include "template/jinja_value.h"

namespace kestrel::jinja {

enum class TokenType : uint8_t {
  text,
  variable_begin,
  variable_end,
  block_begin,
  block_end,
  name,
  string,
  integer,
  floating,
  op,
  eof
};

struct Token {
  TokenType type = TokenType::eof;
  std::string text;  // text, name, operator, or the decoded string literal
  int64_t int_value = 0;
  double float_value = 0.0;
  int line = 1;
};

Result<std::vector<Token>> lex_template(std::string_view source);

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

enum class ExprKind : uint8_t {
  literal,
  name,
  list,
  tuple,
  dict,         // children alternate key, value
  attribute,    // children[0].name
  item,         // children[0][children[1]]
  slice,        // children[0][children[1]:children[2]:children[3]], absent bounds are null
  call,         // children[0](children[1..], kwargs)
  filter,       // children[0] | name(children[1..], kwargs); children[0] null inside {% filter %}
  test,         // children[0] is [not] name(children[1..], kwargs)
  unary,        // op children[0]
  binary,       // children[0] op children[1]
  logical_and,  // children[0] and children[1]
  logical_or,   // children[0] or children[1]
  compare,      // children[0] ops[0] children[1] ops[1] children[2] ...
  conditional   // children[0] if children[1] else children[2] (null: undefined)
};

enum class Op : uint8_t {
  add,
  sub,
  mul,
  div,
  floordiv,
  mod,
  pow,
  concat,
  neg,
  pos,
  logical_not,
  eq,
  ne,
  lt,
  le,
  gt,
  ge,
  in,
  not_in
};

struct Expr {
  ExprKind kind = ExprKind::literal;
  int line = 1;
  Value literal;
  std::string name;
  Op op = Op::add;
  bool negated = false;  // `is not`
  std::vector<ExprPtr> children;
  std::vector<Op> compare_ops;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  int height = 1;  // levels from here to the deepest leaf (set by the parser)
};

struct Node;
using NodePtr = std::unique_ptr<Node>;
using Body = std::vector<NodePtr>;

enum class NodeKind : uint8_t {
  text,       // text
  output,     // {{ expr }}
  if_block,   // branches, else_body
  for_loop,   // targets in expr [if condition]: body, else_body
  set,        // targets (or targets[0].attribute) = expr
  set_block,  // {% set targets[0] | filters %}body{% endset %}
  macro,      // name(params) body
  break_loop,
  continue_loop,
  filter_block,  // {% filter filters %}body{% endfilter %}
  with_block,    // {% with params %}body{% endwith %}
  generation     // transformers' {% generation %}body{% endgeneration %}: renders its body
};

struct Branch {
  ExprPtr condition;
  Body body;
};

struct Param {
  std::string name;
  ExprPtr value;  // default (macro) or assigned value (with); may be null for macro params
};

struct Node {
  NodeKind kind = NodeKind::text;
  int line = 1;
  std::string text;
  std::string name;       // macro name
  std::string attribute;  // set ns.attribute = ...
  ExprPtr expr;
  ExprPtr condition;
  std::vector<std::string> targets;
  bool unpack = false;     // targets came as a tuple (`for a, b in ...`, `set a, b = ...`)
  bool uses_loop = false;  // a for loop whose body mentions `loop` (else it is not built)
  // Names the scope this node opens (for-loop iteration, macro call, with/set/filter block)
  // starts with as undefined, hiding outer values; `else_undefined` for a for loop's else block.
  // See resolve_scopes().
  std::vector<std::string> frame_undefined;
  std::vector<std::string> else_undefined;
  std::vector<Branch> branches;
  std::vector<Param> params;
  std::vector<ExprPtr> filters;
  Body body;
  Body else_body;
};

struct Template {
  Body body;
  std::vector<std::string> root_undefined;  // hidden context variables, see resolve_scopes()
};

// Parses a template; the error names the line and the construct that is malformed or
// unsupported.
Result<std::shared_ptr<const Template>> parse_template(std::string_view source);

// Records which names each scope starts undefined (jinja_scopes.cpp); parse_template calls it.
void resolve_scopes(Template& tmpl);

// Filters and tests are resolved when the template is parsed, as Jinja does, so a template that
// names an unknown one is rejected even if that line never runs.
bool is_known_filter(std::string_view name);
bool is_known_test(std::string_view name);

}  // namespace kestrel::jinja
