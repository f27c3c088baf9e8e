"""The import rules of the house, read from the source with `ast` (every import: module level, inside
functions, under TYPE_CHECKING), so a rule breaks here before it breaks a deployment:

- stream.core imports only stream.core (and nothing of Faust, Kafka, ClickHouse or torch);
- stream.model (the artefact layer serving, export and the trainer share) imports only stream.core and itself;
- the trainer never imports stream.serving;
- stream.serving never imports trainer, export or torch (nor transformers, peft, optimum);
- no module outside stream.tools and stream.app reads stream.settings: settings are read at the edge;
- no import circle among the modules of stream/, trainer/ and export/.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("stream", "trainer", "export")
TORCH_SIDE = ("torch", "transformers", "peft", "optimum", "trainer", "export")
NOT_IN_CORE = ("faust", "aiokafka", "kafka", "clickhouse_connect", "chdb", "torch", "transformers", "onnxruntime",
               "stream.settings")
# the edge: the entry points that read the environment (stream.settings) and hand typed configs on
EDGE = ("stream.settings", "stream.app", "stream.tools", "trainer", "export")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imports_of(name: str, source: str, is_package: bool = False) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement anywhere in `source`; `from a import b` gives both
    `a` and `a.b` (b may be a module); relative imports resolved against `name`."""
    out: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            out.append((base, node.lineno))
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names if a.name != "*"]
    return out


def graph(mods: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {project module it imports: line}."""
    g: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        edges: dict[str, int] = {}
        for target, line in imports_of(name, path.read_text(), path.name == "__init__.py"):
            if target in mods and target != name:
                edges.setdefault(target, line)
        g[name] = edges
    return g


def all_imports(mods: dict[str, Path]) -> Iterable[tuple[str, str, int]]:
    for name, path in mods.items():
        for target, line in imports_of(name, path.read_text(), path.name == "__init__.py"):
            yield name, target, line


def within(module: str, prefix: str | tuple[str, ...]) -> bool:
    prefixes = (prefix,) if isinstance(prefix, str) else prefix
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def violations(mods: dict[str, Path]) -> list[str]:
    bad = []
    for src, target, line in all_imports(mods):
        where = f"{mods[src].relative_to(REPO)}:{line}: {src} imports {target}"
        project = within(target, PACKAGES)
        if within(src, "stream.core") and ((project and not within(target, "stream.core"))
                                           or within(target, NOT_IN_CORE)):
            bad.append(f"{where} (core imports only core)")
        if within(src, "stream.model") and ((project and not within(target, ("stream.core", "stream.model")))
                                            or within(target, TORCH_SIDE)):
            bad.append(f"{where} (the model layer imports only core and itself, never torch)")
        if within(src, "trainer") and within(target, "stream.serving"):
            bad.append(f"{where} (the trainer never imports the serving path)")
        if within(src, "stream.serving") and within(target, TORCH_SIDE):
            bad.append(f"{where} (serving imports no trainer, export or torch)")
        if within(target, "stream.settings") and not within(src, EDGE):
            bad.append(f"{where} (settings are read at the edge: pass the part its config)")
    return bad


def cycles(g: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return found


def test_every_import_keeps_the_layer_rules():
    mods = modules()
    assert {"stream.core.trends", "stream.model.artefact", "stream.serving.scorer", "trainer.fit",
            "export.onnx", "stream.tools.replay"} <= set(mods)
    assert violations(mods) == []


def test_no_import_circle():
    assert cycles(graph(modules())) == []


def test_the_rules_catch_what_they_forbid(tmp_path, monkeypatch):
    """The checker itself: imports hidden in a function or under TYPE_CHECKING count, and a circle is found."""
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    files = {
        "stream/core/a.py": "def f():\n    from stream.serving import x\n",
        "stream/core/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import faust\n",
        "stream/serving/x.py": "import torch\nfrom stream.serving import y\n",
        "stream/serving/y.py": "from . import x\n",
        "stream/serving/__init__.py": "",
        "stream/ingest/w.py": "from stream.settings import load_settings\n",
        "stream/settings.py": "",
        "trainer/m.py": "def g():\n    from stream.serving.x import z\n",
        "stream/model/l.py": "import trainer.m\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    mods = modules()
    found = "\n".join(violations(mods))
    for expected in ("stream.core.a imports stream.serving (core", "stream.core.b imports faust (core",
                     "stream.serving.x imports torch (serving", "trainer.m imports stream.serving.x (the trainer",
                     "stream.ingest.w imports stream.settings (settings", "stream.model.l imports trainer.m (the model"):
        assert expected in found, found
    assert cycles(graph(mods)) == [["stream.serving.x", "stream.serving.y"]]


@pytest.mark.parametrize("source, expected", [
    ("from . import b", {"p.q.b", "p.q"}),
    ("from .. import c", {"p", "p.c"}),
    ("import os.path", {"os.path"}),
])
def test_relative_imports_resolve(source, expected):
    assert {m for m, _ in imports_of("p.q.a", source)} == expected
