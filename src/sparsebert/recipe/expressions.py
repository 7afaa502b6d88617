"""Safe evaluation of SparseML recipe expressions: ``eval(num_epochs - 2)``, variable names.

SparseML recipes (Neural Magic, sparseml ``recipe`` docs) let a value be a top-level variable
name or ``eval(<python arithmetic>)`` over variables. We evaluate with Python's ``ast`` and
allow only numbers, strings, names, arithmetic/comparison operators and a few pure builtins,
so a recipe can never run arbitrary code.
"""

from __future__ import annotations

import ast
import operator
import re
from typing import Any, Mapping

__all__ = ["evaluate_expression", "resolve_value"]

_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_CMP = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.Eq: operator.eq, ast.NotEq: operator.ne,
}
_FUNCS = {"min": min, "max": max, "int": int, "float": float, "round": round, "abs": abs}


def evaluate_expression(expr: str, variables: Mapping[str, Any]) -> Any:
    """Evaluate an arithmetic expression over ``variables``.

    Args:
        expr: e.g. ``"num_epochs - 2"`` or ``"init_lr * 0.1"``.
        variables: name -> already-resolved value.

    Returns:
        The value (int/float/bool/str/list).

    Raises:
        ValueError: unknown name, or a construct other than arithmetic, comparison,
            conditional expression, list/tuple literal or a call of min/max/int/float/round/abs.
    """

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in variables:
                raise ValueError(f"unknown variable '{node.id}' in eval({expr})")
            return variables[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _CMP:
            return _CMP[type(node.ops[0])](ev(node.left), ev(node.comparators[0]))
        if isinstance(node, ast.IfExp):
            return ev(node.body) if ev(node.test) else ev(node.orelse)
        if isinstance(node, (ast.List, ast.Tuple)):
            return [ev(e) for e in node.elts]
        if (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCS and not node.keywords
        ):
            return _FUNCS[node.func.id](*[ev(a) for a in node.args])
        raise ValueError(f"unsupported expression in eval({expr}): {ast.dump(node)[:60]}")

    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"cannot parse eval({expr}): {e.msg}") from None
    try:
        return ev(tree)
    except (TypeError, ZeroDivisionError) as e:
        raise ValueError(f"cannot evaluate eval({expr}): {e}") from None


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def resolve_value(value: Any, variables: Mapping[str, Any]) -> Any:
    """Resolve a recipe value: a variable name, an ``eval(...)`` string, or nested lists/dicts.

    Strings that are neither (``"re:..."``, ``"cubic"``) are returned unchanged.
    """
    if isinstance(value, str):
        s = value.strip()
        if _FLOAT.fullmatch(s):  # YAML 1.1 reads "1e-4" (no dot) as a string
            return float(s)
        if s.startswith("eval(") and s.endswith(")"):
            return evaluate_expression(s[5:-1], variables)
        if s in variables:
            return variables[s]
        return value
    if isinstance(value, list):
        return [resolve_value(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: resolve_value(v, variables) for k, v in value.items()}
    return value
