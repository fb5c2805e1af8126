"""The import direction DESIGN.md's "Layout" states, read from the source's AST.

- The product (``resumer/`` minus ``resumer/lab/``) never imports ``resumer.lab``, except
  ``resumer/demo.py``; and ``resumer.demo`` is imported only by the CLI, inside its demo
  command, so nothing else loads the lab.
- Only ``http.py``, ``fetch.py`` and ``serve/`` import aiohttp at runtime (an import under
  ``if TYPE_CHECKING:`` is a type, not a dependency).
- The lower layers (errors, events, digest, config, store, content/) never import the
  upper ones (cli, engine, download, pull, registry, serve), not even for a type.
- Inside ``registry/``: reference ← platform ← manifest ← auth ← client, no cycles.

A rule that holds because the scanner sees nothing would prove nothing, so the last test
checks the scanner against imports known to be there.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "resumer"


@dataclass(frozen=True)
class Import:
    """One imported module, as seen from one file."""

    module: str  # absolute: ``resumer.registry.client``, ``aiohttp.web``
    line: int
    type_checking: bool  # under ``if TYPE_CHECKING:``
    lazy: bool  # inside a function body

    def of(self, target: str) -> bool:
        return self.module == target or self.module.startswith(target + ".")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def imports(path: Path) -> list[Import]:
    """Every import in ``path``, relative ones resolved. ``from a import b`` yields ``a``
    and ``a.b`` (``b`` may be a submodule; an attribute's name only ever lengthens ``a``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[Import] = []

    def visit(node: ast.AST, type_checking: bool, lazy: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True, lazy)
            for child in node.orelse:
                visit(child, type_checking, lazy)
            return
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            lazy = True
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append(Import(alias.name, node.lineno, type_checking, lazy))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                base_name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                base_name = node.module or ""
            if node.module:
                out.append(Import(base_name, node.lineno, type_checking, lazy))
            for alias in node.names:
                out.append(Import(f"{base_name}.{alias.name}", node.lineno, type_checking, lazy))
        for child in ast.iter_child_nodes(node):
            visit(child, type_checking, lazy)

    visit(ast.parse(path.read_text(), str(path)), False, False)
    return out


def product_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "lab" not in p.relative_to(PACKAGE).parts)


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def violations(files: list[Path], forbidden: list[str], *, runtime_only: bool = False) -> list[str]:
    found = []
    for path in files:
        for imp in imports(path):
            if runtime_only and imp.type_checking:
                continue
            if any(imp.of(t) for t in forbidden):
                found.append(f"{rel(path)}:{imp.line} imports {imp.module}")
    return sorted(set(found))


def test_the_product_reaches_the_lab_only_through_the_demo_command() -> None:
    others = [p for p in product_files() if rel(p) != "resumer/demo.py"]
    assert violations(others, ["resumer.lab"]) == []
    # demo.py imports the lab at its top, so whoever imports demo loads the lab: only the
    # CLI may, and only when the demo command runs.
    demo_users = [
        f"{rel(path)}:{imp.line} (lazy={imp.lazy})"
        for path in product_files()
        for imp in imports(path)
        if imp.of("resumer.demo")
    ]
    assert demo_users, "the CLI's demo command should import resumer.demo"
    for path in product_files():
        for imp in imports(path):
            if imp.of("resumer.demo"):
                assert rel(path) == "resumer/cli.py" and imp.lazy, demo_users


#: The modules allowed to import aiohttp at runtime: the HTTP edge and the server.
AIOHTTP_AT_RUNTIME = ("resumer/http.py", "resumer/fetch.py", "resumer/serve/")


def test_only_the_http_edge_and_the_server_import_aiohttp_at_runtime() -> None:
    others = [p for p in product_files() if not rel(p).startswith(AIOHTTP_AT_RUNTIME)]
    assert violations(others, ["aiohttp"], runtime_only=True) == []


LOWER = ["errors.py", "events.py", "digest.py", "config.py", "store.py", "content/"]
UPPER = ["cli", "engine", "download", "pull", "registry", "serve"]


def test_lower_layers_never_import_upper_ones() -> None:
    lower = [p for p in product_files() if rel(p).removeprefix("resumer/").startswith(tuple(LOWER))]
    assert len(lower) >= len(LOWER)  # every layer named exists (content/ is several files)
    assert violations(lower, [f"resumer.{name}" for name in UPPER]) == []


#: registry/'s modules, lowest first: each imports only those before it.
REGISTRY_ORDER = ["reference", "platform", "manifest", "auth", "client"]


@pytest.mark.parametrize("index", range(len(REGISTRY_ORDER)))
def test_registry_modules_point_one_way(index: int) -> None:
    path = PACKAGE / "registry" / f"{REGISTRY_ORDER[index]}.py"
    later = [f"resumer.registry.{name}" for name in REGISTRY_ORDER[index:]]
    assert violations([path], later) == []
    # and nothing from outside the package that imports the package back
    assert violations([path], ["resumer.pull", "resumer.engine", "resumer.serve"]) == []


def test_registry_package_has_exactly_the_modules_ordered() -> None:
    modules = {p.stem for p in (PACKAGE / "registry").glob("*.py")} - {"__init__"}
    assert modules == set(REGISTRY_ORDER)


def test_the_scanner_sees_the_imports_that_are_there() -> None:
    """Each rule above is only as good as ``imports``: check it on imports known to exist."""
    http_imports = imports(PACKAGE / "http.py")
    assert any(i.of("aiohttp") and not i.type_checking and not i.lazy for i in http_imports)
    engine = imports(PACKAGE / "engine.py")
    # engine.py: aiohttp for a type only, RegistryClient both for a type and lazily
    assert any(i.of("aiohttp") and i.type_checking for i in engine)
    assert not any(i.of("aiohttp") and not i.type_checking for i in engine)
    assert any(i.of("resumer.registry.client") and i.lazy for i in engine)
    cli = imports(PACKAGE / "cli.py")
    assert any(i.module == "resumer.config" and not i.lazy for i in cli)  # from . import config
    demo = imports(PACKAGE / "demo.py")
    assert any(i.of("resumer.lab.proxy") and not i.lazy for i in demo)
    client = imports(PACKAGE / "registry" / "client.py")
    assert any(i.module == "resumer.http" for i in client)  # from .. import http
    assert any(i.of("resumer.registry.reference") for i in client)
