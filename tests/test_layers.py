"""The import contract: each layer imports only what docs/architecture.md ("Layers") says it may.

Every module under src/grokgate is read with `ast` (never imported), and every `import` in it is checked,
those inside functions and under `if TYPE_CHECKING:` included: a type-only import is still a dependency of the
layer. The rules are data (`RULES`), kept in step with the doc's table; the checker itself is tested on a copy of
the tree with one forbidden import added, so a rule that can never fire does not pass unnoticed.
"""

from __future__ import annotations

import ast
import functools
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "grokgate"
DOC = ROOT / "docs" / "architecture.md"

# The HTTP framework and its server belong to api/, app.py, server.py and the CLI; SQL belongs to store/.
WEB = frozenset({"fastapi", "fastapi_offline", "starlette", "uvicorn", "httptools"})
SQL = frozenset({"sqlalchemy", "alembic", "asyncpg", "aiosqlite"})
ANY = frozenset({"*"})


@dataclass(frozen=True)
class Rule:
    """What a layer may import: grokgate packages or modules (`providers`, `providers.model_files`), and
    third-party distributions: `stdlib_only`, or anything but `forbidden`."""

    grokgate: frozenset[str]
    stdlib_only: bool = False
    forbidden: frozenset[str] = frozenset()


def rule(*grokgate: str, stdlib_only: bool = False, forbidden: frozenset[str] = frozenset()) -> Rule:
    return Rule(frozenset(grokgate), stdlib_only, forbidden)


# Layer (a package under grokgate/ or a top-level module) -> its rule. A layer may always import itself.
RULES: dict[str, Rule] = {
    "core": rule(stdlib_only=True),
    "schemas": rule("core", forbidden=WEB | SQL),
    "providers": rule("core", "schemas", forbidden=WEB | SQL),
    "store": rule("core", forbidden=WEB),
    # The settings validate GROKGATE_LOCAL_MODEL against the catalog's names.
    "settings": rule("providers.model_files", forbidden=WEB | SQL),
    # The routing file -> ModelTable (routing.py; config.py before issue 10 named it for what it holds).
    "routing": rule("providers", "settings", forbidden=WEB | SQL),
    "config": rule("providers", "settings", forbidden=WEB | SQL),
    # Metrics and the log line; backend_state reads the providers' status at scrape time.
    "observability": rule("core", "providers", forbidden=WEB | SQL),
    # One request's life (admission -> generation -> stream or collect -> settlement), wire-neutral: no HTTP
    # framework, no SQL; the store is reached through core's admission protocol.
    "serving": rule("core", "schemas", "providers", "observability", forbidden=WEB | SQL),
    "api": rule("core", "schemas", "providers", "store", "routing", "config", "settings", "observability",
                "serving"),
    # xAI's native gRPC API: a transport layer beside api/ (it shares api/deps.py's Gateway), no HTTP framework.
    "rpc": rule("core", "schemas", "providers", "store", "routing", "settings", "observability", "serving", "api",
                forbidden=WEB),
    # Entry points and wiring: app.py picks the concrete classes; the CLI and the HTTP server start them.
    "app": rule(*ANY),
    "cli": rule(*ANY),
    "cli_admin": rule(*ANY),
    "server": rule(*ANY),
    "drain": rule(*ANY),
    "runtime": rule(*ANY),
    # `grokgate serve --workers` (docs/operations.md): a supervisor wiring stores, engine and processes, like app.py.
    "workers": rule(*ANY),
    "workers_sqlite": rule(*ANY),
    "workers_engine": rule(*ANY),
    "__main__": rule(*ANY),
    "__init__": rule(),
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. grokgate.core.events
    line: int
    target: str  # what it imports, absolute, e.g. grokgate.api.chat or starlette.responses


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path, src: Path) -> tuple[Import, ...]:
    module = module_name(path, src)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return _imports(module, package, path.read_text())


@functools.cache  # by text: the copies of the tree below parse only the file they changed
def _imports(module: str, package: str, text: str) -> tuple[Import, ...]:
    found: list[Import] = []
    for node in ast.walk(ast.parse(text, module)):
        if isinstance(node, ast.Import):
            found += [Import(module, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            # `from grokgate import config` imports the module grokgate.config: check each name as a module.
            if target == "grokgate":
                found += [Import(module, node.lineno, f"grokgate.{alias.name}") for alias in node.names]
            else:
                found.append(Import(module, node.lineno, target))
    return tuple(found)


def allowed(rule_: Rule, layer: str, target: str) -> bool:
    top = target.split(".")[0]
    if top == "__future__":
        return True
    if top == "grokgate":
        inner = target.split(".")[1:]
        if not inner or inner[0] == layer or "*" in rule_.grokgate:
            return True
        return any(inner[: len(g.split("."))] == g.split(".") for g in rule_.grokgate)
    if rule_.stdlib_only:
        return top in sys.stdlib_module_names
    return top not in rule_.forbidden


def violations(src: Path, rules: dict[str, Rule] = RULES) -> list[str]:
    """Every import that breaks its layer's rule, as `module:line imports target (layer rule)`."""
    found = []
    for path in sorted(src.rglob("*.py")):
        module = module_name(path, src)
        layer = layer_of(module)
        if layer not in rules:
            found.append(f"{module}: no layer rule for {layer!r} (add it to RULES and docs/architecture.md)")
            continue
        for imp in imports(path, src):
            if not allowed(rules[layer], layer, imp.target):
                found.append(f"{module}:{imp.line} imports {imp.target} ({layer} may not)")
    return found


def test_every_module_keeps_to_its_layer() -> None:
    assert violations(SRC) == []


def test_every_layer_in_the_doc_has_a_rule() -> None:
    """Each row of docs/architecture.md's layer table names a layer that RULES checks."""
    section = DOC.read_text().split("### Layers", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)(?:/|\.py)?` \|", section, flags=re.MULTILINE)
    assert rows, "the layer table was not found in docs/architecture.md"
    assert sorted(set(rows) - set(RULES)) == []


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("layers") / "grokgate"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__", "web", "migrations"))
    return copy


# (module file, the forbidden line added to it, the violation expected)
BROKEN = [
    ("core/events.py", "import starlette.responses", "grokgate.core.events:{n} imports starlette.responses"),
    ("core/billing.py", "from pydantic import BaseModel", "grokgate.core.billing:{n} imports pydantic"),
    ("core/pricing.py", "def f():\n    from grokgate.api import errors",
     "grokgate.core.pricing:{n} imports grokgate.api"),
    ("core/limits.py", "from ..store import sql", "grokgate.core.limits:{n} imports grokgate.store"),
    ("schemas/chat.py", "from grokgate.store.sql import SqlStore",
     "grokgate.schemas.chat:{n} imports grokgate.store.sql"),
    ("providers/base.py", "from grokgate.api.sse import CHAT_SSE",
     "grokgate.providers.base:{n} imports grokgate.api.sse"),
    ("providers/local.py", "from fastapi import FastAPI", "grokgate.providers.local:{n} imports fastapi"),
    ("store/sql.py", "from grokgate import providers", "grokgate.store.sql:{n} imports grokgate.providers"),
    ("settings.py", "from grokgate.providers import local", "grokgate.settings:{n} imports grokgate.providers"),
    ("serving/__init__.py", "import sqlalchemy", "grokgate.serving:{n} imports sqlalchemy"),
    ("serving/__init__.py", "from grokgate.api import chat", "grokgate.serving:{n} imports grokgate.api"),
    ("serving/__init__.py", "from starlette.responses import Response", "grokgate.serving:{n} imports starlette"),
    ("api/chat.py", "from grokgate.app import create_app", "grokgate.api.chat:{n} imports grokgate.app"),
]


@pytest.mark.parametrize(("file", "line", "expected"), BROKEN, ids=[f"{f}: {t.splitlines()[-1].strip()}"
                                                                      for f, t, _ in BROKEN])
def test_a_forbidden_import_is_caught(tree: Path, file: str, line: str, expected: str) -> None:
    path = tree / file
    if not path.exists():
        pytest.skip(f"{file} is not in this tree")
    original = path.read_text()
    try:
        path.write_text(f"{original.rstrip()}\n\n\n{line}\n")
        number = original.rstrip().count("\n") + 4 + line.count("\n")  # the snippet's last line: the import
        found = violations(tree)
    finally:
        path.write_text(original)
    assert len(found) == 1, found
    assert found[0].startswith(expected.format(n=number)), (found, number)


def test_a_module_outside_every_layer_is_reported(tree: Path) -> None:
    extra = tree / "gadgets.py"
    extra.write_text("import os\n")
    try:
        assert violations(tree) == ["grokgate.gadgets: no layer rule for 'gadgets' (add it to RULES and "
                                    "docs/architecture.md)"]
    finally:
        extra.unlink()


# -- per-request state: one frozen Call, never ContextVars or a rewritten request -----------------------------------

# Where a request is served: its options travel in the frozen `Call` (providers/base.py), never in context
# variables, and what the client sent is never rewritten on the way (a feature that keeps state then cannot be
# written without naming whose it is: `Call.tenant`).
REQUEST_PATH = ("api", "serving", "providers", "core", "schemas")
REQUEST_NAMES = frozenset({"request", "body", "chat"})  # names the parsed request goes by in these layers


def request_state_violations(src: Path) -> list[str]:
    """`contextvars` imported, an attribute of the parsed request assigned (`request.max_tokens = ...`,
    `call.request.x = ...`, `setattr(request, ...)`), or `object.__setattr__` on anything but `self`."""
    found = []
    for path in sorted(src.rglob("*.py")):
        module = module_name(path, src)
        if layer_of(module) not in REQUEST_PATH:
            continue
        for node in ast.walk(ast.parse(path.read_text(), module)):
            where = f"{module}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(n.split(".")[0] == "contextvars" for n in names):
                    found.append(f"{where} imports contextvars")
            elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Attribute) and _is_request(target.value):
                        found.append(f"{where} assigns {ast.unparse(target)}")
            elif isinstance(node, ast.Call) and node.args:
                func = ast.unparse(node.func)
                first = node.args[0]
                if func == "setattr" and _is_request(first):
                    found.append(f"{where} calls setattr on {ast.unparse(first)}")
                if func == "object.__setattr__" and not (isinstance(first, ast.Name) and first.id == "self"):
                    found.append(f"{where} calls object.__setattr__ on {ast.unparse(first)}")
    return found


def _is_request(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id in REQUEST_NAMES) or (
        isinstance(node, ast.Attribute) and node.attr == "request")


def test_no_context_variables_and_no_rewritten_requests() -> None:
    assert request_state_violations(SRC) == []


@pytest.mark.parametrize(("file", "line", "expected"), [
    ("serving/lifecycle.py", "from contextvars import ContextVar", "imports contextvars"),
    ("providers/local.py", "def f(request):\n    request.max_tokens = 4", "assigns request.max_tokens"),
    ("serving/chat.py", "def f(call):\n    call.request.n += 1", "assigns call.request.n"),
    ("providers/xai.py", "def f(request):\n    object.__setattr__(request, '_k', 1)",
     "calls object.__setattr__ on request"),
], ids=["contextvar", "assign", "augassign", "setattr"])
def test_a_rewritten_request_is_caught(tree: Path, file: str, line: str, expected: str) -> None:
    path = tree / file
    original = path.read_text()
    try:
        path.write_text(f"{original.rstrip()}\n\n\n{line}\n")
        found = request_state_violations(tree)
    finally:
        path.write_text(original)
    assert len(found) == 1 and found[0].endswith(expected), found
