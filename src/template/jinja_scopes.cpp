// Jinja decides at compile time where each name in a scope comes from, and one outcome is
// visible in output: a name whose first mention in a scope is an unconditional assignment starts
// that scope undefined, even when the context (or an enclosing scope that never mentions it)
// has a value, e.g.
//
//   {% for m in messages %}{{ x }}{% endfor %}{% set x = 1 %}
//
// prints nothing for `x` even when the caller passed x: the top-level `set` makes `x` a
// template variable, undefined until the set runs. This pass reproduces Jinja's symbol analysis
// (jinja2/idtracking.py: which statements a scope's analysis visits, how `if` branches merge)
// and records, per scope, the names that start undefined; the interpreter applies them when it
// enters the scope. Scopes: the template, each for-loop iteration (its else block and filter
// test separately), macro calls, and with/set/filter/generation blocks. `if` blocks share their
// enclosing scope.
#include <map>
#include <set>
#include <string>
#include <vector>

#include "template/jinja_ast.h"

namespace kestrel::jinja {
namespace {

enum class Origin : uint8_t { parameter, resolve, alias, undefined };

struct Symbols {
  const Symbols* parent = nullptr;
  std::map<std::string, Origin> refs;
  std::set<std::string> stores;

  bool has_ref(const std::string& name) const {
    for (const Symbols* s = this; s; s = s->parent) {
      if (s->refs.count(name)) return true;
    }
    return false;
  }
  void load(const std::string& name) {
    if (!has_ref(name)) refs[name] = Origin::resolve;
  }
  void store(const std::string& name) {
    stores.insert(name);
    if (refs.count(name)) return;
    refs[name] = (parent && parent->has_ref(name)) ? Origin::alias : Origin::undefined;
  }
  void parameter(const std::string& name) {
    stores.insert(name);
    refs[name] = Origin::parameter;
  }
  // After an `if`: names stored in only some branches come from outside until assigned.
  void branch_update(const std::vector<Symbols>& branches) {
    std::map<std::string, size_t> counts;
    for (const Symbols& b : branches) {
      for (const auto& name : b.stores) {
        if (!stores.count(name)) ++counts[name];
      }
    }
    for (const Symbols& b : branches) {
      for (const auto& [name, origin] : b.refs) refs[name] = origin;
      stores.insert(b.stores.begin(), b.stores.end());
    }
    for (const auto& [name, count] : counts) {
      if (count == branches.size()) continue;
      refs[name] = (parent && parent->has_ref(name)) ? Origin::alias : Origin::resolve;
    }
  }
  std::vector<std::string> undefined_names() const {
    std::vector<std::string> out;
    for (const auto& [name, origin] : refs) {
      if (origin == Origin::undefined) out.push_back(name);
    }
    return out;
  }
};

void visit_expr(const Expr* e, Symbols& s) {
  if (!e) return;
  if (e->kind == ExprKind::name) s.load(e->name);
  for (const ExprPtr& c : e->children) visit_expr(c.get(), s);
  for (const auto& [key, value] : e->kwargs) visit_expr(value.get(), s);
}

void visit_stmt(const Node& n, Symbols& s);

void visit_body(const Body& body, Symbols& s) {
  for (const NodePtr& n : body) visit_stmt(*n, s);
}

// Jinja's If node holds the first branch; the elif branches are nested If nodes visited together
// as one branch, each merging its own body as one of three branches.
void visit_if(const Node& n, Symbols& s) {
  visit_expr(n.branches[0].condition.get(), s);
  std::vector<Symbols> merged(3, s);
  visit_body(n.branches[0].body, merged[0]);
  for (size_t i = 1; i < n.branches.size(); ++i) {
    Symbols& elif = merged[1];
    visit_expr(n.branches[i].condition.get(), elif);
    std::vector<Symbols> inner(3, elif);
    visit_body(n.branches[i].body, inner[0]);
    elif.branch_update(inner);
  }
  visit_body(n.else_body, merged[2]);
  s.branch_update(merged);
}

void visit_stmt(const Node& n, Symbols& s) {
  switch (n.kind) {
    case NodeKind::output:
      visit_expr(n.expr.get(), s);
      return;
    case NodeKind::if_block:
      visit_if(n, s);
      return;
    case NodeKind::for_loop:
      visit_expr(n.expr.get(), s);
      return;
    case NodeKind::set:
      visit_expr(n.expr.get(), s);
      if (!n.attribute.empty()) {
        s.load(n.targets[0]);
      } else {
        for (const auto& t : n.targets) s.store(t);
      }
      return;
    case NodeKind::set_block:
      s.store(n.targets[0]);
      return;
    case NodeKind::macro:
      s.store(n.name);
      return;
    case NodeKind::filter_block:
      for (const ExprPtr& f : n.filters) visit_expr(f.get(), s);
      return;
    case NodeKind::with_block:
      for (const Param& p : n.params) visit_expr(p.value.get(), s);
      return;
    default:
      return;
  }
}

void resolve_body(Body& body, const Symbols& frame);

// Analyzes the scope a node opens with `params` declared, records its undefined names, and
// recurses into the scopes nested in it.
std::vector<std::string> resolve_frame(Body& body, const Symbols& parent,
                                       const std::vector<std::string>& params) {
  Symbols frame;
  frame.parent = &parent;
  for (const auto& p : params) frame.parameter(p);
  visit_body(body, frame);
  resolve_body(body, frame);
  return frame.undefined_names();
}

void resolve_node(Node& n, const Symbols& frame) {
  switch (n.kind) {
    case NodeKind::if_block:
      for (Branch& b : n.branches) resolve_body(b.body, frame);
      resolve_body(n.else_body, frame);
      return;
    case NodeKind::for_loop: {
      std::vector<std::string> params = n.targets;
      params.push_back("loop");
      n.frame_undefined = resolve_frame(n.body, frame, params);
      n.else_undefined = resolve_frame(n.else_body, frame, {});
      return;
    }
    case NodeKind::macro: {
      std::vector<std::string> params;
      for (const Param& p : n.params) params.push_back(p.name);
      n.frame_undefined = resolve_frame(n.body, frame, params);
      return;
    }
    case NodeKind::with_block: {
      std::vector<std::string> params;
      for (const Param& p : n.params) params.push_back(p.name);
      n.frame_undefined = resolve_frame(n.body, frame, params);
      return;
    }
    case NodeKind::set_block:
    case NodeKind::filter_block:
    case NodeKind::generation:
      n.frame_undefined = resolve_frame(n.body, frame, {});
      return;
    default:
      return;
  }
}

void resolve_body(Body& body, const Symbols& frame) {
  for (NodePtr& n : body) resolve_node(*n, frame);
}

}  // namespace

void resolve_scopes(Template& tmpl) {
  Symbols root;
  visit_body(tmpl.body, root);
  resolve_body(tmpl.body, root);
  tmpl.root_undefined = root.undefined_names();
}

}  // namespace kestrel::jinja
