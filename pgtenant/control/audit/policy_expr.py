"""Does a policy expression confine rows to the current tenant? Read from its parse tree.

A policy's ``USING`` / ``WITH CHECK`` text (``pg_get_expr``) is parsed with pglast (the
server's own grammar) and read structurally, so ``org_id = current_tenant() OR true`` or a
comparison of the wrong column is not mistaken for a tenant check the way a text search
would be. The rule: an expression *constrains the tenant* when

* it compares a tenant column of the table with the tenant value (``=``, ``IN (SELECT ...)``
  or ``= ANY (SELECT ...)`` where the sub-select reads the tenant value), or
* it is an ``AND`` with at least one such part, or an ``OR`` whose every part is one.

The *tenant value* is ``pgtenant.current_tenant()``, ``current_setting('app.tenant_id'...)``
(possibly cast or wrapped in a sub-select), or a call of a function whose body reads one of
those (``tenant_functions``: the names of such functions, looked up in the catalog by the
caller), so a helper like the seed story's ``get_user_org_id()`` counts only when it really
reads pgtenant's context.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

from pglast.parser import ParseError, parse_sql_json

__all__ = ["ExprFacts", "analyse"]

_TENANT_SETTING = "app.tenant_id"
_CURRENT_TENANT = "current_tenant"


@dataclass(frozen=True, slots=True)
class ExprFacts:
    """What one policy expression does with the tenant."""

    constrains: bool        # confines rows to the tenant (see the module docstring)
    raw_setting: bool       # reads current_setting('app.tenant_id') itself
    per_row_call: bool      # a tenant call outside any sub-select: evaluated per row
    parsed: bool = True     # False: the text did not parse (then constrains is False)


def analyse(expr: str | None, tenant_columns: Collection[str],
            tenant_functions: Collection[str] = ()) -> ExprFacts:
    """Returns: the facts of policy expression ``expr`` (None, an absent expression, means
    "no condition": it constrains nothing).

    ``tenant_columns``: the table's tenant column names (lower case); ``tenant_functions``:
    lower-case names (bare and schema-qualified) of functions known to read the tenant
    context.
    """
    if expr is None:
        return ExprFacts(constrains=False, raw_setting=False, per_row_call=False)
    try:
        tree = json.loads(parse_sql_json(f"SELECT {expr}"))
        node = tree["stmts"][0]["stmt"]["SelectStmt"]["targetList"][0]["ResTarget"]["val"]
    except (ParseError, KeyError, IndexError, TypeError, ValueError):
        return ExprFacts(constrains=False, raw_setting=False, per_row_call=False, parsed=False)
    reader = _Reader(frozenset(c.lower() for c in tenant_columns),
                     frozenset(f.lower() for f in tenant_functions))
    return ExprFacts(
        constrains=reader.constrains(node),
        raw_setting=any(reader.is_raw_setting(n) for n in _walk(node)),
        per_row_call=reader.per_row_call(node),
    )


def _walk(node: Any) -> Iterator[Any]:
    """Yields: every dict node under ``node`` (itself included), depth first."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _one(node: Any) -> tuple[str, Any]:
    """Returns: (node type, body) of a pglast JSON node ``{"Type": {...}}``."""
    if isinstance(node, dict) and len(node) == 1:
        ((kind, body),) = node.items()
        return kind, body
    return "", node


def _names(items: list[Any] | None) -> list[str]:
    return [n["String"]["sval"].lower() for n in items or [] if "String" in n]


class _Reader:
    def __init__(self, columns: frozenset[str], functions: frozenset[str]) -> None:
        self.columns = columns
        self.functions = functions

    def is_raw_setting(self, node: Any) -> bool:
        kind, body = _one(node)
        if kind != "FuncCall" or _names(body.get("funcname"))[-1:] != ["current_setting"]:
            return False
        args = body.get("args") or []
        return bool(args) and self._string_const(args[0]) == _TENANT_SETTING

    def _string_const(self, node: Any) -> str | None:
        kind, body = _one(node)
        while kind == "TypeCast":
            kind, body = _one(body["arg"])
        if kind == "A_Const" and "sval" in body:
            return str(body["sval"]["sval"]).lower()
        return None

    def is_tenant_call(self, node: Any) -> bool:
        """A call that yields the tenant id: current_tenant(), the raw setting, or a
        function known to read either."""
        kind, body = _one(node)
        if kind != "FuncCall":
            return False
        names = _names(body.get("funcname"))
        if names[-1:] == [_CURRENT_TENANT] or self.is_raw_setting(node):
            return True
        return names[-1] in self.functions or ".".join(names) in self.functions

    def is_tenant_value(self, node: Any) -> bool:
        """The tenant id, through casts, COALESCE-free wrappers and scalar sub-selects."""
        kind, body = _one(node)
        if kind == "TypeCast":
            return self.is_tenant_value(body["arg"])
        if kind == "A_Expr" and body.get("kind") == "AEXPR_NULLIF":
            return self.is_tenant_value(body.get("lexpr"))  # nullif(setting, ''): NULL or it
        if kind == "CoalesceExpr":
            # coalesce(setting, fallback): the tenant, or a constant no row carries (a
            # constant that is a real tenant's id would be a hole no parse tree can see).
            args = body.get("args") or []
            return bool(args) and self.is_tenant_value(args[0])
        if kind == "SubLink" and body.get("subLinkType") == "EXPR_SUBLINK":
            select = _one(body.get("subselect"))[1]
            targets = select.get("targetList") or []
            return (len(targets) == 1 and not select.get("fromClause")
                    and self.is_tenant_value(_one(targets[0])[1].get("val")))
        return self.is_tenant_call(node)

    def is_tenant_column(self, node: Any) -> bool:
        kind, body = _one(node)
        while kind == "TypeCast":
            kind, body = _one(body["arg"])
        return kind == "ColumnRef" and _names(body.get("fields"))[-1:] != [] \
            and _names(body.get("fields"))[-1] in self.columns

    def _mentions_tenant(self, node: Any) -> bool:
        return any(self.is_tenant_call(n) for n in _walk(node))

    def constrains(self, node: Any) -> bool:
        kind, body = _one(node)
        if kind == "BoolExpr":
            args = body.get("args") or []
            if body.get("boolop") == "AND_EXPR":
                return any(self.constrains(a) for a in args)
            if body.get("boolop") == "OR_EXPR":
                return bool(args) and all(self.constrains(a) for a in args)
            return False  # NOT x: the rows of every tenant but one
        if kind == "A_Expr":
            op = _names(body.get("name"))
            if body.get("kind") == "AEXPR_OP" and op == ["="]:
                left, right = body.get("lexpr"), body.get("rexpr")
                return ((self.is_tenant_column(left) and self.is_tenant_value(right))
                        or (self.is_tenant_column(right) and self.is_tenant_value(left)))
            return False
        if kind == "SubLink" and body.get("subLinkType") == "ANY_SUBLINK":
            # col IN (SELECT ... WHERE ... current_tenant() ...): a membership table.
            return (self.is_tenant_column(body.get("testexpr"))
                    and _names(body.get("operName")) in ([], ["="])
                    and self._mentions_tenant(body.get("subselect")))
        return False

    def per_row_call(self, node: Any) -> bool:
        """Whether a tenant call sits outside every sub-select (so the planner cannot turn
        it into an initplan evaluated once)."""
        stack = [node]
        while stack:
            item = stack.pop()
            kind, _ = _one(item)
            if kind == "SubLink":
                continue
            if kind == "FuncCall" and self.is_tenant_call(item):
                return True
            if isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
        return False
