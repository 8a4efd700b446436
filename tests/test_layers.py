"""The layers stand alone: codec -> worker and client -> federated -> faces, and ``secagg`` knows no
transport. Also: no module imports or reaches a private name (``_x``) of another module.

Read from the source with ``ast``, so a violation is found without importing anything, and the
message names the file and line to fix.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import fedzmq

pytestmark = pytest.mark.timeout(60)

PACKAGE = Path(fedzmq.__file__).parent

# layer (a module or package under fedzmq) -> what it must not import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "fedzmq.codec": ("fedzmq.worker", "fedzmq.client", "fedzmq.federated"),
    "fedzmq.worker": ("fedzmq.client", "fedzmq.federated"),
    "fedzmq.client": ("fedzmq.federated",),
    "fedzmq.federated": ("fedzmq.worker",),
    "fedzmq.secagg": ("zmq", "fedzmq.codec", "fedzmq.pump", "fedzmq.worker", "fedzmq.client", "fedzmq.federated"),
}


@dataclass(frozen=True)
class Imported:
    """One name one module imports: ``base`` is the absolute module, ``name`` what it takes from it."""

    module: str
    line: int
    base: str
    name: str | None


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[Imported]:
    """Every import in one file, relative ones made absolute."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Imported] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Imported(module, node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[:len(parts) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found += [Imported(module, node.lineno, base, alias.name) for alias in node.names]
    return found


def every_import() -> list[Imported]:
    return [item for path in sorted(PACKAGE.rglob("*.py")) for item in imports_of(path)]


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_walk_sees_the_package() -> None:
    found = every_import()
    assert len({item.module for item in found}) > 60
    assert any(within(item.base, "fedzmq.client") for item in found if within(item.module, "fedzmq.federated"))


def test_no_layer_imports_one_above_it() -> None:
    breaks = []
    for item in every_import():
        targets = [item.base] + ([f"{item.base}.{item.name}"] if item.name else [])
        for layer, banned in FORBIDDEN.items():
            if within(item.module, layer):
                breaks += [f"{item.module}:{item.line} imports {target}"
                           for target in targets[-1:] for ban in banned if within(target, ban)]
    assert breaks == []


def test_no_module_imports_a_private_name() -> None:
    private = [f"{item.module}:{item.line} imports {item.base}.{item.name}" for item in every_import()
               if item.name and item.name.startswith("_") and not item.name.startswith("__")]
    assert private == []


def test_no_module_reaches_a_private_name_of_a_module_it_imported() -> None:
    breaks = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        modules = {(alias.asname or alias.name).split(".")[0] for node in ast.walk(tree)
                   if isinstance(node, ast.Import | ast.ImportFrom) for alias in node.names}
        breaks += [f"{module_name(path)}:{node.lineno} reads {node.value.id}.{node.attr}"
                   for node in ast.walk(tree)
                   if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                   and node.value.id in modules and node.attr.startswith("_") and not node.attr.startswith("__")
                   and node.value.id not in ("torch", "zmq", "sys", "os")]
    assert breaks == []
