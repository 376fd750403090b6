// Recursive-descent parser for the Jinja subset, with Jinja's operator precedence (lowest first):
// `x if c else y`, or, and, not, comparisons and `in`, + -, ~, * / // %, **, unary - +, then
// postfix `.attr` `[i]` `[a:b:c]` `(args)` and filters/tests (`|f`, `is t`), which bind tighter
// than any binary operator (`a + b|length` is `a + (b|length)`).
#include <string>
#include <vector>

#include "template/jinja_ast.h"

namespace kestrel::jinja {
namespace {

// Deeper nesting than this is refused so that neither the parser nor the evaluator (which
// recurses along the same tree) can exhaust the stack on hostile input.
constexpr int kMaxParseDepth = 200;
// Every visitor after the parser (evaluation, the tree's destructor) recurses once per level of
// an expression tree. Nesting is bounded by kMaxParseDepth as it is parsed, but chains
// (a + b + c ..., x|f|g ..., a.b.c ...) are parsed in loops and grow a tree as tall as they are
// long, so the tree's height is bounded too, link by link.
constexpr int kMaxExprHeight = 500;

class Parser {
 public:
  explicit Parser(std::vector<Token> tokens) : tokens_(std::move(tokens)) {}

  Result<std::shared_ptr<const Template>> run() {
    auto tmpl = std::make_shared<Template>();
    std::string found;
    KS_ASSIGN_OR_RETURN(tmpl->body, parse_body({}, &found, "", 0));
    if (!pending_.empty()) return Status::error(pending_.front());
    resolve_scopes(*tmpl);
    return std::shared_ptr<const Template>(std::move(tmpl));
  }

 private:
  // Jinja rejects an unknown filter or test when it compiles the template, except in code that
  // may not run (an `if` block or condition, or a conditional expression), where it fails only
  // when evaluated. `soft_` tracks that context; errors outside it are collected in `pending_`
  // and reported after the syntax check, as Jinja reports them after parsing.
  struct SoftGuard {
    SoftGuard(bool& flag, bool value) : flag(flag), saved(flag) { flag = value; }
    ~SoftGuard() { flag = saved; }
    bool& flag;
    bool saved;
  };

  struct DepthGuard {
    explicit DepthGuard(int& d) : depth(d) { ++depth; }
    ~DepthGuard() { --depth; }
    bool exceeded() const { return depth > kMaxParseDepth; }
    int& depth;
  };

  const Token& cur() const { return tokens_[pos_]; }
  const Token& peek(size_t k = 1) const { return tokens_[std::min(pos_ + k, tokens_.size() - 1)]; }
  void next() {
    if (pos_ + 1 < tokens_.size()) ++pos_;
  }
  bool is_op(const char* op) const { return cur().type == TokenType::op && cur().text == op; }
  bool is_name(const char* name) const {
    return cur().type == TokenType::name && cur().text == name;
  }
  bool skip_op(const char* op) {
    if (!is_op(op)) return false;
    next();
    return true;
  }
  bool skip_name(const char* name) {
    if (!is_name(name)) return false;
    next();
    return true;
  }

  static std::string describe(const Token& t) {
    switch (t.type) {
      case TokenType::text:
        return "template text";
      case TokenType::variable_begin:
        return "'{{'";
      case TokenType::variable_end:
        return "'}}'";
      case TokenType::block_begin:
        return "'{%'";
      case TokenType::block_end:
        return "'%}'";
      case TokenType::name:
      case TokenType::op:
        return "'" + t.text + "'";
      case TokenType::string:
        return "a string";
      case TokenType::integer:
      case TokenType::floating:
        return "a number";
      case TokenType::eof:
        return "end of template";
    }
    return "token";
  }

  Status error_at(int line, const std::string& message) const {
    return Status::error("line " + std::to_string(line) + ": " + message);
  }
  Status error(const std::string& message) const { return error_at(cur().line, message); }
  Status unexpected(const std::string& expected) const {
    return error("expected " + expected + ", got " + describe(cur()));
  }

  Status expect_op(const char* op) {
    if (!skip_op(op)) return unexpected(std::string("'") + op + "'");
    return Status::ok();
  }
  Status expect_block_end() {
    if (cur().type != TokenType::block_end) return unexpected("'%}'");
    next();
    return Status::ok();
  }
  Result<std::string> expect_name() {
    if (cur().type != TokenType::name) return unexpected("a name");
    std::string name = cur().text;
    next();
    return name;
  }

  // Sets e's height from its children; an error once it passes kMaxExprHeight.
  Result<ExprPtr> sealed(ExprPtr e) {
    int below = 0;
    for (const ExprPtr& child : e->children) {
      if (child) below = std::max(below, child->height);
    }
    for (const auto& [name, value] : e->kwargs) {
      if (value) below = std::max(below, value->height);
    }
    e->height = below + 1;
    if (e->height > kMaxExprHeight) {
      return error_at(e->line, "expression nests too deeply (more than " +
                                   std::to_string(kMaxExprHeight) + " levels, chains included)");
    }
    return e;
  }

  ExprPtr make(ExprKind kind, int line) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->line = line;
    return e;
  }

  // ---- statements ------------------------------------------------------------------------

  // Parses nodes until a `{% tag %}` whose name is one of `end_tags`; consumes the block start
  // and the tag name, stores the name in `found`, and leaves the rest of that tag to the caller.
  Result<Body> parse_body(const std::vector<std::string>& end_tags, std::string* found,
                          const char* opener, int opener_line) {
    DepthGuard guard(depth_);
    if (guard.exceeded()) return error("blocks nest too deeply");
    Body body;
    while (true) {
      const Token& t = cur();
      if (t.type == TokenType::eof) {
        if (end_tags.empty()) return body;
        std::string wanted;
        for (const auto& tag : end_tags) wanted += (wanted.empty() ? "'" : " or '") + tag + "'";
        return error_at(opener_line, std::string("'") + opener + "' is never closed (expected " +
                                         wanted + " before the end of the template)");
      }
      if (t.type == TokenType::text) {
        auto node = std::make_unique<Node>();
        node->kind = NodeKind::text;
        node->line = t.line;
        node->text = t.text;
        body.push_back(std::move(node));
        next();
        continue;
      }
      if (t.type == TokenType::variable_begin) {
        auto node = std::make_unique<Node>();
        node->kind = NodeKind::output;
        node->line = t.line;
        next();
        KS_ASSIGN_OR_RETURN(node->expr, parse_tuple(true, {}, false));
        if (cur().type != TokenType::variable_end) return unexpected("'}}'");
        next();
        body.push_back(std::move(node));
        continue;
      }
      if (t.type != TokenType::block_begin) return unexpected("template text or a tag");
      next();
      if (cur().type != TokenType::name) return unexpected("a statement name after '{%'");
      const std::string name = cur().text;
      for (const auto& tag : end_tags) {
        if (name == tag) {
          *found = name;
          next();
          return body;
        }
      }
      KS_ASSIGN_OR_RETURN(NodePtr node, parse_statement(name));
      body.push_back(std::move(node));
    }
  }

  Result<NodePtr> parse_statement(const std::string& name) {
    const int line = cur().line;
    if (name == "if") return parse_if();
    if (name == "for") return parse_for();
    if (name == "set") return parse_set();
    if (name == "macro") return parse_macro();
    if (name == "filter") return parse_filter_block();
    if (name == "with") return parse_with();
    if (name == "generation") return parse_generation();
    if (name == "break" || name == "continue") {
      if (loop_depth_ == 0) return error("'" + name + "' outside of a for loop");
      next();
      KS_RETURN_IF_ERROR(expect_block_end());
      auto node = std::make_unique<Node>();
      node->kind = name == "break" ? NodeKind::break_loop : NodeKind::continue_loop;
      node->line = line;
      return node;
    }
    static const char* kUnsupported[] = {"include", "import", "from",  "extends",
                                         "block",   "call",   "do",    "autoescape",
                                         "trans",   "raw",    "print", "recursive"};
    for (const char* u : kUnsupported) {
      if (name == u) return error("unsupported statement '" + name + "'");
    }
    return error("unknown statement '" + name + "'");
  }

  Result<NodePtr> parse_if() {
    SoftGuard soft(soft_, true);
    auto node = std::make_unique<Node>();
    node->kind = NodeKind::if_block;
    node->line = cur().line;
    next();
    Branch first;
    KS_ASSIGN_OR_RETURN(first.condition, parse_tuple(false, {}, false));
    KS_RETURN_IF_ERROR(expect_block_end());
    std::string found;
    KS_ASSIGN_OR_RETURN(first.body,
                        parse_body({"elif", "else", "endif"}, &found, "if", node->line));
    node->branches.push_back(std::move(first));
    while (found == "elif") {
      Branch branch;
      KS_ASSIGN_OR_RETURN(branch.condition, parse_tuple(false, {}, false));
      KS_RETURN_IF_ERROR(expect_block_end());
      KS_ASSIGN_OR_RETURN(branch.body,
                          parse_body({"elif", "else", "endif"}, &found, "if", node->line));
      node->branches.push_back(std::move(branch));
    }
    if (found == "else") {
      KS_RETURN_IF_ERROR(expect_block_end());
      KS_ASSIGN_OR_RETURN(node->else_body, parse_body({"endif"}, &found, "if", node->line));
    }
    KS_RETURN_IF_ERROR(expect_block_end());
    return node;
  }

  // Names for `for` targets and tuple assignments: `a`, `a, b`, `(a, b)`.
  Status parse_name_targets(Node& node) {
    const bool parenthesized = skip_op("(");
    while (true) {
      KS_ASSIGN_OR_RETURN(std::string target, expect_name());
      node.targets.push_back(std::move(target));
      if (!skip_op(",")) break;
      node.unpack = true;
      if (parenthesized && is_op(")")) break;
      if (cur().type != TokenType::name) break;
    }
    if (parenthesized) {
      node.unpack = true;
      KS_RETURN_IF_ERROR(expect_op(")"));
    }
    for (const auto& t : node.targets) {
      if (t == "true" || t == "false" || t == "none" || t == "True" || t == "False" ||
          t == "None") {
        return error("cannot assign to '" + t + "'");
      }
    }
    return Status::ok();
  }

  Result<NodePtr> parse_for() {
    auto node = std::make_unique<Node>();
    node->kind = NodeKind::for_loop;
    node->line = cur().line;
    next();
    KS_RETURN_IF_ERROR(parse_name_targets(*node));
    if (!skip_name("in")) return unexpected("'in'");
    const int loop_references_before = loop_references_;
    KS_ASSIGN_OR_RETURN(node->expr, parse_tuple(false, {"recursive", "if"}, false));
    if (skip_name("if")) {
      KS_ASSIGN_OR_RETURN(node->condition, parse_expression(true));
    }
    if (is_name("recursive")) return error("unsupported: recursive for loops");
    KS_RETURN_IF_ERROR(expect_block_end());
    std::string found;
    SoftGuard soft(soft_, false);
    ++loop_depth_;
    auto body = parse_body({"endfor", "else"}, &found, "for", node->line);
    --loop_depth_;
    if (!body.is_ok()) return body.status();
    node->body = std::move(body).value();
    node->uses_loop = loop_references_ > loop_references_before;
    if (found == "else") {
      KS_RETURN_IF_ERROR(expect_block_end());
      KS_ASSIGN_OR_RETURN(node->else_body, parse_body({"endfor"}, &found, "for", node->line));
    }
    KS_RETURN_IF_ERROR(expect_block_end());
    return node;
  }

  Result<NodePtr> parse_set() {
    auto node = std::make_unique<Node>();
    node->kind = NodeKind::set;
    node->line = cur().line;
    next();
    if (cur().type == TokenType::name && peek().type == TokenType::op && peek().text == ".") {
      node->targets.push_back(cur().text);
      next();
      next();
      KS_ASSIGN_OR_RETURN(node->attribute, expect_name());
    } else {
      KS_RETURN_IF_ERROR(parse_name_targets(*node));
    }
    if (skip_op("=")) {
      KS_ASSIGN_OR_RETURN(node->expr, parse_tuple(true, {}, false));
      KS_RETURN_IF_ERROR(expect_block_end());
      return node;
    }
    if (!node->attribute.empty() || node->unpack) {
      return error("a {% set %} block assigns to one plain name");
    }
    node->kind = NodeKind::set_block;
    while (skip_op("|")) {
      KS_ASSIGN_OR_RETURN(ExprPtr f, parse_filter(nullptr));
      node->filters.push_back(std::move(f));
    }
    KS_RETURN_IF_ERROR(expect_block_end());
    SoftGuard soft(soft_, false);
    std::string found;
    KS_ASSIGN_OR_RETURN(node->body, parse_body({"endset"}, &found, "set", node->line));
    KS_RETURN_IF_ERROR(expect_block_end());
    return node;
  }

  Result<NodePtr> parse_macro() {
    auto node = std::make_unique<Node>();
    node->kind = NodeKind::macro;
    node->line = cur().line;
    SoftGuard soft(soft_, false);
    next();
    KS_ASSIGN_OR_RETURN(node->name, expect_name());
    KS_RETURN_IF_ERROR(expect_op("("));
    bool saw_default = false;
    while (!is_op(")")) {
      if (!node->params.empty()) KS_RETURN_IF_ERROR(expect_op(","));
      if (is_op(")")) break;
      Param p;
      KS_ASSIGN_OR_RETURN(p.name, expect_name());
      if (skip_op("=")) {
        KS_ASSIGN_OR_RETURN(p.value, parse_expression(true));
        saw_default = true;
      } else if (saw_default) {
        return error("macro parameter '" + p.name +
                     "' without a default follows one with a default");
      }
      node->params.push_back(std::move(p));
    }
    next();
    KS_RETURN_IF_ERROR(expect_block_end());
    const int saved_loop_depth = loop_depth_;
    loop_depth_ = 0;
    std::string found;
    auto body = parse_body({"endmacro"}, &found, "macro", node->line);
    loop_depth_ = saved_loop_depth;
    if (!body.is_ok()) return body.status();
    node->body = std::move(body).value();
    if (cur().type == TokenType::name) next();  // `{% endmacro name %}`
    KS_RETURN_IF_ERROR(expect_block_end());
    return node;
  }

  Result<NodePtr> parse_filter_block() {
    auto node = std::make_unique<Node>();
    node->kind = NodeKind::filter_block;
    node->line = cur().line;
    next();
    do {
      KS_ASSIGN_OR_RETURN(ExprPtr f, parse_filter(nullptr));
      node->filters.push_back(std::move(f));
    } while (skip_op("|"));
    KS_RETURN_IF_ERROR(expect_block_end());
    SoftGuard soft(soft_, false);
    std::string found;
    KS_ASSIGN_OR_RETURN(node->body, parse_body({"endfilter"}, &found, "filter", node->line));
    KS_RETURN_IF_ERROR(expect_block_end());
    return node;
  }

  Result<NodePtr> parse_with() {
    auto node = std::make_unique<Node>();
    node->kind = NodeKind::with_block;
    node->line = cur().line;
    next();
    while (cur().type != TokenType::block_end) {
      if (!node->params.empty()) KS_RETURN_IF_ERROR(expect_op(","));
      Param p;
      KS_ASSIGN_OR_RETURN(p.name, expect_name());
      KS_RETURN_IF_ERROR(expect_op("="));
      KS_ASSIGN_OR_RETURN(p.value, parse_expression(true));
      node->params.push_back(std::move(p));
    }
    next();
    SoftGuard soft(soft_, false);
    std::string found;
    KS_ASSIGN_OR_RETURN(node->body, parse_body({"endwith"}, &found, "with", node->line));
    KS_RETURN_IF_ERROR(expect_block_end());
    return node;
  }

  Result<NodePtr> parse_generation() {
    auto node = std::make_unique<Node>();
    node->kind = NodeKind::generation;
    node->line = cur().line;
    SoftGuard soft(soft_, false);
    next();
    KS_RETURN_IF_ERROR(expect_block_end());
    std::string found;
    KS_ASSIGN_OR_RETURN(node->body,
                        parse_body({"endgeneration"}, &found, "generation", node->line));
    KS_RETURN_IF_ERROR(expect_block_end());
    return node;
  }

  // ---- expressions -----------------------------------------------------------------------

  bool at_tuple_end(const std::vector<std::string>& extra_end) const {
    const Token& t = cur();
    if (t.type == TokenType::variable_end || t.type == TokenType::block_end ||
        (t.type == TokenType::op && t.text == ")")) {
      return true;
    }
    if (t.type == TokenType::name) {
      for (const auto& e : extra_end) {
        if (t.text == e) return true;
      }
    }
    return false;
  }

  Result<ExprPtr> parse_tuple(bool with_condexpr, const std::vector<std::string>& extra_end,
                              bool explicit_parens) {
    const int line = cur().line;
    std::vector<ExprPtr> items;
    bool is_tuple = false;
    while (true) {
      if (!items.empty()) KS_RETURN_IF_ERROR(expect_op(","));
      if (at_tuple_end(extra_end)) break;
      KS_ASSIGN_OR_RETURN(ExprPtr e, parse_expression(with_condexpr));
      items.push_back(std::move(e));
      if (is_op(",")) {
        is_tuple = true;
      } else {
        break;
      }
    }
    if (!is_tuple) {
      if (!items.empty()) return std::move(items[0]);
      if (!explicit_parens) return unexpected("an expression");
    }
    ExprPtr t = make(ExprKind::tuple, line);
    t->children = std::move(items);
    return t;
  }

  Result<ExprPtr> parse_expression(bool with_condexpr) {
    DepthGuard guard(depth_);
    if (guard.exceeded()) return error("expression nests too deeply");
    KS_ASSIGN_OR_RETURN(ExprPtr e, with_condexpr ? parse_condexpr() : parse_or());
    return sealed(std::move(e));
  }

  Result<ExprPtr> parse_condexpr() {
    const size_t pending_mark = pending_.size();
    KS_ASSIGN_OR_RETURN(ExprPtr expr, parse_or());
    if (is_name("if")) pending_.resize(pending_mark);
    SoftGuard soft(soft_, soft_ || is_name("if"));
    while (is_name("if")) {
      const int line = cur().line;
      next();
      KS_ASSIGN_OR_RETURN(ExprPtr cond, parse_or());
      ExprPtr otherwise;
      if (skip_name("else")) {
        DepthGuard guard(depth_);
        if (guard.exceeded()) return error("expression nests too deeply");
        KS_ASSIGN_OR_RETURN(otherwise, parse_condexpr());
      }
      ExprPtr c = make(ExprKind::conditional, line);
      c->children.push_back(std::move(expr));
      c->children.push_back(std::move(cond));
      c->children.push_back(std::move(otherwise));
      KS_ASSIGN_OR_RETURN(expr, sealed(std::move(c)));
    }
    return expr;
  }

  Result<ExprPtr> parse_or() {
    KS_ASSIGN_OR_RETURN(ExprPtr left, parse_and());
    while (is_name("or")) {
      const int line = cur().line;
      next();
      KS_ASSIGN_OR_RETURN(ExprPtr right, parse_and());
      ExprPtr e = make(ExprKind::logical_or, line);
      e->children.push_back(std::move(left));
      e->children.push_back(std::move(right));
      KS_ASSIGN_OR_RETURN(left, sealed(std::move(e)));
    }
    return left;
  }

  Result<ExprPtr> parse_and() {
    KS_ASSIGN_OR_RETURN(ExprPtr left, parse_not());
    while (is_name("and")) {
      const int line = cur().line;
      next();
      KS_ASSIGN_OR_RETURN(ExprPtr right, parse_not());
      ExprPtr e = make(ExprKind::logical_and, line);
      e->children.push_back(std::move(left));
      e->children.push_back(std::move(right));
      KS_ASSIGN_OR_RETURN(left, sealed(std::move(e)));
    }
    return left;
  }

  Result<ExprPtr> parse_not() {
    if (is_name("not")) {
      const int line = cur().line;
      next();
      DepthGuard guard(depth_);
      if (guard.exceeded()) return error("expression nests too deeply");
      KS_ASSIGN_OR_RETURN(ExprPtr operand, parse_not());
      ExprPtr e = make(ExprKind::unary, line);
      e->op = Op::logical_not;
      e->children.push_back(std::move(operand));
      return sealed(std::move(e));
    }
    return parse_compare();
  }

  Result<ExprPtr> parse_compare() {
    const int line = cur().line;
    KS_ASSIGN_OR_RETURN(ExprPtr first, parse_math1());
    ExprPtr cmp;
    while (true) {
      Op op;
      if (cur().type == TokenType::op &&
          (cur().text == "==" || cur().text == "!=" || cur().text == "<" || cur().text == "<=" ||
           cur().text == ">" || cur().text == ">=")) {
        const std::string& t = cur().text;
        op = t == "=="   ? Op::eq
             : t == "!=" ? Op::ne
             : t == "<"  ? Op::lt
             : t == "<=" ? Op::le
             : t == ">"  ? Op::gt
                         : Op::ge;
        next();
      } else if (is_name("in")) {
        op = Op::in;
        next();
      } else if (is_name("not") && peek().type == TokenType::name && peek().text == "in") {
        op = Op::not_in;
        next();
        next();
      } else {
        break;
      }
      if (!cmp) {
        cmp = make(ExprKind::compare, line);
        cmp->children.push_back(std::move(first));
      }
      KS_ASSIGN_OR_RETURN(ExprPtr operand, parse_math1());
      cmp->compare_ops.push_back(op);
      cmp->children.push_back(std::move(operand));
    }
    if (cmp) return sealed(std::move(cmp));
    return first;
  }

  ExprPtr binary(Op op, ExprPtr left, ExprPtr right, int line) {
    ExprPtr e = make(ExprKind::binary, line);
    e->op = op;
    e->children.push_back(std::move(left));
    e->children.push_back(std::move(right));
    return e;
  }

  Result<ExprPtr> parse_math1() {
    KS_ASSIGN_OR_RETURN(ExprPtr left, parse_concat());
    while (is_op("+") || is_op("-")) {
      const Op op = is_op("+") ? Op::add : Op::sub;
      const int line = cur().line;
      next();
      KS_ASSIGN_OR_RETURN(ExprPtr right, parse_concat());
      KS_ASSIGN_OR_RETURN(left, sealed(binary(op, std::move(left), std::move(right), line)));
    }
    return left;
  }

  Result<ExprPtr> parse_concat() {
    KS_ASSIGN_OR_RETURN(ExprPtr left, parse_math2());
    while (is_op("~")) {
      const int line = cur().line;
      next();
      KS_ASSIGN_OR_RETURN(ExprPtr right, parse_math2());
      KS_ASSIGN_OR_RETURN(left,
                          sealed(binary(Op::concat, std::move(left), std::move(right), line)));
    }
    return left;
  }

  Result<ExprPtr> parse_math2() {
    KS_ASSIGN_OR_RETURN(ExprPtr left, parse_pow());
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const std::string& t = cur().text;
      const Op op = t == "*" ? Op::mul : t == "/" ? Op::div : t == "//" ? Op::floordiv : Op::mod;
      const int line = cur().line;
      next();
      KS_ASSIGN_OR_RETURN(ExprPtr right, parse_pow());
      KS_ASSIGN_OR_RETURN(left, sealed(binary(op, std::move(left), std::move(right), line)));
    }
    return left;
  }

  Result<ExprPtr> parse_pow() {
    KS_ASSIGN_OR_RETURN(ExprPtr left, parse_unary(true));
    while (is_op("**")) {
      const int line = cur().line;
      next();
      KS_ASSIGN_OR_RETURN(ExprPtr right, parse_unary(true));
      KS_ASSIGN_OR_RETURN(left, sealed(binary(Op::pow, std::move(left), std::move(right), line)));
    }
    return left;
  }

  Result<ExprPtr> parse_unary(bool with_filter) {
    DepthGuard guard(depth_);
    if (guard.exceeded()) return error("expression nests too deeply");
    ExprPtr node;
    if (is_op("-") || is_op("+")) {
      const Op op = is_op("-") ? Op::neg : Op::pos;
      const int line = cur().line;
      next();
      KS_ASSIGN_OR_RETURN(ExprPtr operand, parse_unary(false));
      node = make(ExprKind::unary, line);
      node->op = op;
      node->children.push_back(std::move(operand));
    } else {
      KS_ASSIGN_OR_RETURN(node, parse_primary());
    }
    KS_ASSIGN_OR_RETURN(node, sealed(std::move(node)));
    KS_ASSIGN_OR_RETURN(node, parse_postfix(std::move(node)));
    if (with_filter) {
      KS_ASSIGN_OR_RETURN(node, parse_filter_expr(std::move(node)));
    }
    return node;
  }

  Result<ExprPtr> parse_primary() {
    const Token& t = cur();
    const int line = t.line;
    switch (t.type) {
      case TokenType::name: {
        ExprPtr e = make(ExprKind::literal, line);
        if (t.text == "true" || t.text == "True") {
          e->literal = Value::boolean(true);
        } else if (t.text == "false" || t.text == "False") {
          e->literal = Value::boolean(false);
        } else if (t.text == "none" || t.text == "None") {
          e->literal = Value::none();
        } else {
          e->kind = ExprKind::name;
          e->name = t.text;
          if (t.text == "loop") ++loop_references_;
        }
        next();
        return e;
      }
      case TokenType::string: {
        std::string s;
        while (cur().type == TokenType::string) {
          s += cur().text;
          next();
        }
        ExprPtr e = make(ExprKind::literal, line);
        e->literal = Value::string(std::move(s));
        return e;
      }
      case TokenType::integer: {
        ExprPtr e = make(ExprKind::literal, line);
        e->literal = Value::integer(t.int_value);
        next();
        return e;
      }
      case TokenType::floating: {
        ExprPtr e = make(ExprKind::literal, line);
        e->literal = Value::floating(t.float_value);
        next();
        return e;
      }
      case TokenType::op:
        if (t.text == "(") {
          next();
          KS_ASSIGN_OR_RETURN(ExprPtr e, parse_tuple(true, {}, true));
          KS_RETURN_IF_ERROR(expect_op(")"));
          return e;
        }
        if (t.text == "[") return parse_list();
        if (t.text == "{") return parse_dict();
        break;
      default:
        break;
    }
    return unexpected("an expression");
  }

  Result<ExprPtr> parse_list() {
    ExprPtr e = make(ExprKind::list, cur().line);
    next();
    while (!is_op("]")) {
      if (!e->children.empty()) KS_RETURN_IF_ERROR(expect_op(","));
      if (is_op("]")) break;
      KS_ASSIGN_OR_RETURN(ExprPtr item, parse_expression(true));
      e->children.push_back(std::move(item));
    }
    next();
    return e;
  }

  Result<ExprPtr> parse_dict() {
    ExprPtr e = make(ExprKind::dict, cur().line);
    next();
    while (!is_op("}")) {
      if (!e->children.empty()) KS_RETURN_IF_ERROR(expect_op(","));
      if (is_op("}")) break;
      KS_ASSIGN_OR_RETURN(ExprPtr key, parse_expression(true));
      KS_RETURN_IF_ERROR(expect_op(":"));
      KS_ASSIGN_OR_RETURN(ExprPtr value, parse_expression(true));
      e->children.push_back(std::move(key));
      e->children.push_back(std::move(value));
    }
    next();
    return e;
  }

  Result<ExprPtr> parse_postfix(ExprPtr node) {
    while (true) {
      if (is_op(".") || is_op("[")) {
        KS_ASSIGN_OR_RETURN(node, parse_subscript(std::move(node)));
      } else if (is_op("(")) {
        KS_ASSIGN_OR_RETURN(node, parse_call(std::move(node)));
      } else {
        return node;
      }
      KS_ASSIGN_OR_RETURN(node, sealed(std::move(node)));
    }
  }

  Result<ExprPtr> parse_filter_expr(ExprPtr node) {
    while (true) {
      if (is_op("|")) {
        next();
        KS_ASSIGN_OR_RETURN(node, parse_filter(std::move(node)));
      } else if (is_name("is")) {
        KS_ASSIGN_OR_RETURN(node, parse_test(std::move(node)));
      } else if (is_op("(")) {
        KS_ASSIGN_OR_RETURN(node, parse_call(std::move(node)));
      } else {
        return node;
      }
      KS_ASSIGN_OR_RETURN(node, sealed(std::move(node)));
    }
  }

  Result<ExprPtr> parse_subscript(ExprPtr node) {
    const int line = cur().line;
    if (skip_op(".")) {
      if (cur().type == TokenType::name) {
        ExprPtr e = make(ExprKind::attribute, line);
        e->name = cur().text;
        e->children.push_back(std::move(node));
        next();
        return e;
      }
      if (cur().type == TokenType::integer) {
        ExprPtr index = make(ExprKind::literal, line);
        index->literal = Value::integer(cur().int_value);
        next();
        ExprPtr e = make(ExprKind::item, line);
        e->children.push_back(std::move(node));
        e->children.push_back(std::move(index));
        return e;
      }
      return unexpected("an attribute name after '.'");
    }
    next();  // '['
    ExprPtr parts[3];
    bool is_slice = false;
    if (!is_op(":")) {
      KS_ASSIGN_OR_RETURN(parts[0], parse_expression(true));
    }
    if (skip_op(":")) {
      is_slice = true;
      if (!is_op("]") && !is_op(":")) {
        KS_ASSIGN_OR_RETURN(parts[1], parse_expression(true));
      }
      if (skip_op(":") && !is_op("]")) {
        KS_ASSIGN_OR_RETURN(parts[2], parse_expression(true));
      }
    }
    if (is_op(",")) return error("unsupported: tuple subscripts");
    KS_RETURN_IF_ERROR(expect_op("]"));
    if (!is_slice) {
      if (!parts[0]) return unexpected("an index");
      ExprPtr e = make(ExprKind::item, line);
      e->children.push_back(std::move(node));
      e->children.push_back(std::move(parts[0]));
      return e;
    }
    ExprPtr e = make(ExprKind::slice, line);
    e->children.push_back(std::move(node));
    for (auto& p : parts) e->children.push_back(std::move(p));
    return e;
  }

  Status parse_call_args(Expr& call) {
    KS_RETURN_IF_ERROR(expect_op("("));
    bool first = true;
    while (!is_op(")")) {
      if (!first) KS_RETURN_IF_ERROR(expect_op(","));
      first = false;
      if (is_op(")")) break;
      if (is_op("*") || is_op("**")) return error("unsupported: *args / **kwargs in calls");
      if (cur().type == TokenType::name && peek().type == TokenType::op && peek().text == "=") {
        std::string key = cur().text;
        next();
        next();
        for (const auto& [k, v] : call.kwargs) {
          if (k == key) return error("keyword argument '" + key + "' repeated");
        }
        KS_ASSIGN_OR_RETURN(ExprPtr value, parse_expression(true));
        call.kwargs.emplace_back(std::move(key), std::move(value));
      } else {
        if (!call.kwargs.empty()) return error("positional argument follows keyword argument");
        KS_ASSIGN_OR_RETURN(ExprPtr value, parse_expression(true));
        call.children.push_back(std::move(value));
      }
    }
    next();
    return Status::ok();
  }

  Result<ExprPtr> parse_call(ExprPtr callee) {
    ExprPtr e = make(ExprKind::call, cur().line);
    e->children.push_back(std::move(callee));
    KS_RETURN_IF_ERROR(parse_call_args(*e));
    return e;
  }

  Result<std::string> parse_dotted_name() {
    KS_ASSIGN_OR_RETURN(std::string name, expect_name());
    while (is_op(".") && peek().type == TokenType::name) {
      next();
      name += "." + cur().text;
      next();
    }
    return name;
  }

  // `| name(args)`, the '|' already consumed; `operand` null inside {% filter %} / {% set %}.
  Result<ExprPtr> parse_filter(ExprPtr operand) {
    const int line = cur().line;
    KS_ASSIGN_OR_RETURN(std::string name, parse_dotted_name());
    if (!is_known_filter(name) && !soft_) {
      pending_.push_back("line " + std::to_string(line) + ": unknown filter '" + name + "'");
    }
    ExprPtr e = make(ExprKind::filter, line);
    e->name = std::move(name);
    e->children.push_back(std::move(operand));
    if (is_op("(")) KS_RETURN_IF_ERROR(parse_call_args(*e));
    return e;
  }

  Result<ExprPtr> parse_test(ExprPtr operand) {
    const int line = cur().line;
    next();  // 'is'
    const bool negated = skip_name("not");
    KS_ASSIGN_OR_RETURN(std::string name, parse_dotted_name());
    if (!is_known_test(name) && !soft_) {
      pending_.push_back("line " + std::to_string(line) + ": unknown test '" + name + "'");
    }
    ExprPtr e = make(ExprKind::test, line);
    e->name = std::move(name);
    e->negated = negated;
    e->children.push_back(std::move(operand));
    if (is_op("(")) {
      KS_RETURN_IF_ERROR(parse_call_args(*e));
    } else {
      const Token& t = cur();
      const bool starts_operand =
          t.type == TokenType::name || t.type == TokenType::string ||
          t.type == TokenType::integer || t.type == TokenType::floating ||
          (t.type == TokenType::op && (t.text == "(" || t.text == "[" || t.text == "{"));
      const bool is_keyword =
          t.type == TokenType::name && (t.text == "else" || t.text == "or" || t.text == "and");
      if (starts_operand && !is_keyword) {
        if (is_name("is")) return error("tests cannot be chained with 'is'");
        DepthGuard guard(depth_);
        if (guard.exceeded()) return error("expression nests too deeply");
        KS_ASSIGN_OR_RETURN(ExprPtr arg, parse_primary());
        KS_ASSIGN_OR_RETURN(arg, parse_postfix(std::move(arg)));
        e->children.push_back(std::move(arg));
      }
    }
    return e;
  }

  std::vector<Token> tokens_;
  size_t pos_ = 0;
  int depth_ = 0;
  int loop_depth_ = 0;
  int loop_references_ = 0;
  bool soft_ = false;
  std::vector<std::string> pending_;
};

}  // namespace

Result<std::shared_ptr<const Template>> parse_template(std::string_view source) {
  KS_ASSIGN_OR_RETURN(std::vector<Token> tokens, lex_template(source));
  Parser parser(std::move(tokens));
  return parser.run();
}

}  // namespace kestrel::jinja
