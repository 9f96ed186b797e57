"""The package layout's dependency rule, read from the imports themselves (ast, no import).

    schema  <- redis <- dataplane              (the hot path: never the control plane)
    schema  <- redis <- control <- admin, cli  (adapters: parse, one call, print)
    runtime: config, logs, metrics, fdlimit are leaves anyone may use (they may use schema,
    which every layer may: config checks webhook endpoints with it); server, embedded and
    admin_app compose the planes onto listeners; only the entry points start them.

Every import counts, at module level or inside a function (a lazy import is still a
dependency), and the module graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "sidecar"
LEAVES = {"sidecar.runtime.config", "sidecar.runtime.logs", "sidecar.runtime.metrics",
          "sidecar.runtime.fdlimit"}
# layer -> the layers it may import (besides itself and the runtime leaves)
ALLOWED = {
    "schema": set(),
    "leaf": {"schema"},
    "redis": {"schema"},
    "dataplane": {"schema", "redis"},
    "control": {"schema", "redis"},
    "admin": {"control", "schema", "redis"},
    "runtime": {"dataplane", "admin", "control", "schema", "redis"},
    "cli": {"runtime", "control", "schema", "redis", "dataplane"},
    "entry": {"cli"},
}


def layer(module: str) -> str:
    if module in LEAVES:
        return "leaf"
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return "entry"
    return parts[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The sidecar modules one file imports, wherever in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "sidecar"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] +
                                ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "sidecar":
                continue
            for alias in node.names:   # `from pkg import module` names the module
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return found - {name}


def graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def violations(edges: dict[str, set[str]]) -> list[str]:
    out = []
    for module, targets in edges.items():
        mine = layer(module)
        for target in sorted(targets):
            theirs = layer(target)
            if theirs in (mine, "leaf") and mine != "leaf" or target == "sidecar":
                continue
            if mine == "leaf" and theirs == "leaf":
                continue
            if theirs not in ALLOWED[mine]:
                out.append(f"{module} -> {target} ({mine} may not import {theirs})")
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_is_in_a_known_layer():
    assert {layer(m) for m in graph()} <= set(ALLOWED)


def test_dependencies_point_one_way():
    assert violations(graph()) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_adapters_are_imported_only_by_the_entry_points():
    edges = graph()
    for module, targets in edges.items():
        for target in targets:
            if layer(target) == "admin" and layer(module) != "admin":
                assert module == "sidecar.runtime.admin_app", (module, target)
            if layer(target) == "cli" and layer(module) != "cli":
                assert layer(module) == "entry", (module, target)


def test_the_checks_see_a_broken_rule():
    # the rule and the cycle finder themselves: a forbidden edge and a loop are reported
    assert violations({"sidecar.dataplane.x": {"sidecar.control.store"}})
    assert violations({"sidecar.schema.keys": {"sidecar.redis.runner"}})
    assert violations({"sidecar.runtime.config": {"sidecar.runtime.server"}})
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_class_names_are_unique():
    # one name, one thing: a reader (or grep) never has to ask which `Call` is meant
    seen: dict[str, str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                where = module_name(path)
                assert seen.setdefault(node.name, where) == where, (node.name, where)
