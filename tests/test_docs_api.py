"""docs/api.md answers without the source, and cannot drift from it: every public name of fedzmq and
every exception class fedzmq defines is on the page, the exception tree on it is the classes' real
hierarchy, and the tables of FitConfig, Federation, ConnectionSettings and RoundMetrics list every
field with its default as the code has it."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import pkgutil
import re
from pathlib import Path

import fedzmq
import fedzmq as fz
from fedzmq.optimizers import DEFAULT_OPTIMIZER

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
TEXT = DOC.read_text()
TREE = re.search(r"## Exceptions.*?```text\n(.*?)```", TEXT, re.S).group(1)


def _exception_classes() -> dict[str, type]:
    """Every public exception class defined in a module of fedzmq, by name."""
    found: dict[str, type] = {}
    for module in pkgutil.walk_packages(fedzmq.__path__, "fedzmq."):
        if module.name.rsplit(".", 1)[-1] == "__main__":  # importing those runs a command line
            continue
        for name, obj in vars(importlib.import_module(module.name)).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__.startswith("fedzmq")
                    and not name.startswith("_") and obj.__name__ == name):
                found[name] = obj
    return found


def _tree() -> list[tuple[int, str]]:
    """(depth, class name) of each entry of the page's exception tree."""
    entries = []
    for line in TREE.splitlines():
        if match := re.match(r"^([│ ]*)[├└]── (\w+)", line):
            entries.append((len(match.group(1)) // 4 + 1, match.group(2)))
        elif match := re.match(r"^(\w+)\s", line):
            entries.append((0, match.group(1)))
    return entries


def _default(field: dataclasses.Field) -> str:  # type: ignore[type-arg]
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    text = json.dumps(value) if isinstance(value, (dict, str)) else repr(value)
    return f"`{text}`"


def _row(name: str, default: str) -> bool:
    return re.search(rf"^\| `{re.escape(name)}` \| {re.escape(default)} \|", TEXT, re.M) is not None


def test_every_public_name_is_on_the_page():
    missing = [name for name in fz.__all__ if not re.search(rf"(?<![\w.]){re.escape(name)}\b", TEXT)
               and f"fz.{name}" not in TEXT]
    assert not missing, f"docs/api.md does not mention {missing}"


def test_every_exception_class_is_in_the_tree_under_its_real_base():
    classes = _exception_classes()
    assert {"FedzmqError", "WorkerError", "RequestTimeout", "DaemonError", "SecAggError"} <= set(classes)
    entries = _tree()
    named = [name for _, name in entries]
    assert sorted(set(classes) - set(named)) == [], "exceptions missing from the tree on docs/api.md"
    parents: list[str] = []
    for depth, name in entries:
        parents = parents[:depth]
        if name in classes and parents:
            assert issubclass(classes[name], classes[parents[-1]]), f"{name} is not a {parents[-1]}"
        parents.append(name)
    for name, cls in classes.items():
        assert issubclass(cls, fz.FedzmqError), f"{name} does not derive from FedzmqError"
    # the built-in types each is also an instance of, as the tree says
    for name, cls in classes.items():
        for base in cls.__bases__:
            if base.__module__ == "builtins" and base not in (Exception, BaseException, object):
                line = next(line for line in TREE.splitlines() if re.search(rf"── {name}\b|^{name}\b", line))
                assert f"also {base.__name__}" in line, f"the tree should say {name} is also a {base.__name__}"


def test_remote_errors_of_builtin_types_are_instances_of_them():
    from fedzmq.errors import remote_error

    error = remote_error("RuntimeError", "boom")
    assert type(error).__name__ == "RemoteRuntimeError" and isinstance(error, RuntimeError)
    assert isinstance(error, fz.RemoteError) and "RemoteRuntimeError" in TEXT
    assert issubclass(fz.RequestTimeout, TimeoutError) and "RequestTimeout (also TimeoutError)" in TREE


def test_the_tables_list_every_field_with_its_default():
    for field in dataclasses.fields(fz.FitConfig):
        assert _row(field.name, _default(field)), f"FitConfig.{field.name}: want | `{field.name}` | {_default(field)} |"
    for field in dataclasses.fields(fz.ConnectionSettings):
        default = _default(field) if field.name != "limits" else "`Limits()`"
        assert _row(field.name, default), f"ConnectionSettings.{field.name}"
    for parameter in inspect.signature(fz.Federation).parameters.values():
        if parameter.default is inspect.Parameter.empty:
            default = "(required)"
        elif parameter.name == "strategy":
            default = "`FedAvg()`"
        elif parameter.name == "eval_dataset":
            default = "the fit's dataset"
        else:
            default = f"`{parameter.default!r}`"
        assert _row(parameter.name, default), f"Federation({parameter.name}=...): want {default}"
    for field in dataclasses.fields(fz.RoundMetrics):
        assert re.search(rf"^\| [^|]*`{field.name}`", TEXT, re.M), f"RoundMetrics.{field.name}"
    for field in dataclasses.fields(fz.WorkerConfig):
        assert f"`{field.name}" in TEXT, f"WorkerConfig.{field.name}"


def test_one_default_learning_rate_is_stated():
    assert DEFAULT_OPTIMIZER == {"cls": "SGD", "lr": 0.1}
    assert f"one default learning rate: {DEFAULT_OPTIMIZER['lr']}" in TEXT.lower().replace("**", "")
    assert fz.FitConfig("d").optimizer == DEFAULT_OPTIMIZER


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_pages_lead_somewhere():
    root = DOC.parent.parent
    checked = 0
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#:\s]*\.md)?(?:#([^)\s]+))?\)", page.read_text()):
            if not target and not anchor:
                continue
            checked += 1
            linked = (page.parent / target).resolve() if target else page
            assert linked.is_file(), f"{page.name} links to {target}, which does not exist"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
                assert anchor in {_slug(h) for h in headings}, f"{page.name} links to {target}#{anchor}: no such heading"
    assert checked > 20
