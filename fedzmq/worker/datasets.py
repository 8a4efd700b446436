"""Datasets a data owner gives a daemon at start-up (``--data NAME=PATH``).

Formats that carry arrays and nothing executable: safetensors, ``.npz`` read with
``allow_pickle=False``, and CSV (numbers only, the label in the last column). A file holds the
features as ``x`` (or ``features``) and the labels as ``y`` (or ``labels``). A description and tags
come from the safetensors metadata or from a JSON file beside the data (``PATH.json``):
``{"description": "...", "tags": ["digits", "non-iid"]}``.

Each dataset has the owner's policy (``--data`` and ``--open-data``):

- ``protected`` (``--data``, the default): the coordinator never holds a pointer to its rows. Only the
  daemon's own ``fit`` and ``evaluate`` of a described model read them; what leaves is trained
  parameters (from batches of at least ``--min-batch-size`` rows, shuffled by the daemon) and metrics
  aggregated over at least ``--min-metric-rows`` rows.
- ``open`` (``--open-data``): also reachable through pointers (``ds.features()``), for data the owner
  is willing to show; what is computed from its rows leaves only as ``--private-release`` allows.

Clients see a dataset's name, size, shapes, tags and policy, never its values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from ..codec import DTYPE_NAMES
from ..errors import FedzmqError

DataPolicy = Literal["protected", "open"]


class DatasetError(FedzmqError, ValueError):
    """A dataset file could not be loaded."""


@dataclass
class Dataset:
    name: str
    features: torch.Tensor
    labels: torch.Tensor
    description: str = ""
    tags: list[str] = field(default_factory=list)
    policy: DataPolicy = "protected"

    def __post_init__(self) -> None:
        if self.policy not in ("protected", "open"):
            raise DatasetError(f"dataset {self.name}: policy must be 'protected' or 'open', not {self.policy!r}")
        if len(self.features) != len(self.labels):
            raise DatasetError(f"dataset {self.name}: {len(self.features)} feature rows but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.features)

    def info(self) -> dict[str, Any]:
        classes = None
        if not self.labels.dtype.is_floating_point and len(self.labels):
            classes = int(self.labels.max().item()) + 1
        return {
            "name": self.name,
            "samples": len(self),
            "feature_shape": list(self.features.shape[1:]),
            "feature_dtype": DTYPE_NAMES.get(self.features.dtype, str(self.features.dtype)),
            "label_shape": list(self.labels.shape[1:]),
            "label_dtype": DTYPE_NAMES.get(self.labels.dtype, str(self.labels.dtype)),
            "num_classes": classes,
            "description": self.description,
            "tags": list(self.tags),
            "policy": self.policy,
        }

    def matches(self, query: str) -> bool:
        q = query.lower()
        return q in self.name.lower() or q in self.description.lower() or any(q in t.lower() for t in self.tags)


def _pick(arrays: dict[str, Any], names: tuple[str, ...], path: Path) -> Any:
    for name in names:
        if name in arrays:
            return arrays[name]
    raise DatasetError(f"{path}: needs an array named one of {names}, found {sorted(arrays)}")


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _csv_table(name: str, path: Path) -> np.ndarray:
    """A CSV file's numbers, one row per sample with its label last; a first row of column names (no cell
    a number) is skipped. A byte-order mark (a spreadsheet's "CSV UTF-8") is not part of the first cell."""
    with path.open(encoding="utf-8-sig") as f:
        first = f.readline()
    header = int(not any(_is_number(cell) for cell in first.split(",")))
    try:
        return np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2, skiprows=header, encoding="utf-8-sig")
    except ValueError as exc:
        raise DatasetError(f"dataset {name}: {path} is not a table of numbers (label last): {exc}") from None

def load_dataset(name: str, path: str | Path, policy: DataPolicy = "protected") -> Dataset:
    """Load one dataset file; raises ``DatasetError`` with the reason."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset {name}: no file at {path}")
    meta: dict[str, Any] = {}
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            arrays = {k: f.get_tensor(k) for k in f.keys()}
            meta = dict(f.metadata() or {})
        if isinstance(meta.get("tags"), str):
            meta["tags"] = [t for t in meta["tags"].split(",") if t]
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: torch.from_numpy(npz[k].copy()) for k in npz.files}
    elif suffix == ".csv":
        table = _csv_table(name, path)
        labels = table[:, -1]
        arrays = {"x": torch.from_numpy(table[:, :-1].copy()),
                  "y": torch.from_numpy(labels.astype(np.int64) if np.all(labels == labels.round()) else labels)}
    else:
        raise DatasetError(f"dataset {name}: {path.suffix} files are not supported (use .safetensors, .npz or .csv)")
    sidecar = path.with_name(path.name + ".json")
    if sidecar.is_file():
        meta.update(json.loads(sidecar.read_text()))
    features = _pick(arrays, ("x", "features"), path)
    labels = _pick(arrays, ("y", "labels"), path)
    if features.dtype == torch.float64:
        features = features.float()
    tags = meta.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise DatasetError(f"dataset {name}: tags must be a list of strings")
    return Dataset(name, features.contiguous(), labels.contiguous(), str(meta.get("description", "")), tags, policy)


def parse_data_flags(entries: Sequence[str], open_entries: Sequence[str] = ()) -> dict[str, Dataset]:
    """``--data`` (protected) and ``--open-data`` entries, ``NAME=PATH`` each -> datasets by name."""
    datasets: dict[str, Dataset] = {}
    flags: tuple[tuple[str, DataPolicy, Sequence[str]], ...] = (("--data", "protected", entries),
                                                               ("--open-data", "open", open_entries))
    for flag, policy, given in flags:
        for entry in given:
            name, sep, path = entry.partition("=")
            if not sep or not name or not path:
                raise DatasetError(f"{flag} takes NAME=PATH, got {entry!r}")
            if name in datasets:
                raise DatasetError(f"dataset {name!r} given twice")
            datasets[name] = load_dataset(name, path, policy)
    return datasets


def load_clients(entries: Sequence[str]) -> dict[str, dict[str, Dataset]]:
    """``--clients-from NAME=DIR`` (or ``DIR`` alone: NAME is then the folder's own name) entries: every
    dataset file in DIR is one logical client (its id the file's name without the suffix) holding it
    as its dataset NAME, protected. One daemon then serves many clients, each with its own data (a
    simulation on one machine, the same code as production)."""
    clients: dict[str, dict[str, Dataset]] = {}
    for entry in entries:
        name, folder = clients_entry(entry)
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".safetensors", ".npz", ".csv"))
        if not files:
            raise DatasetError(f"--clients-from {entry}: no .safetensors, .npz or .csv files in {folder}")
        for path in files:
            datasets = clients.setdefault(path.stem, {})
            if name in datasets:
                raise DatasetError(f"client {path.stem!r} has two files for dataset {name!r}")
            datasets[name] = load_dataset(name, path)
    return clients


def clients_entry(entry: str) -> tuple[str, Path]:
    """The dataset name and the folder of one ``--clients-from`` entry: ``NAME=DIR``, or a folder alone
    (a path that is a folder wins over reading ``=`` in it), named after itself."""
    alone = Path(entry)
    if alone.is_dir():
        name, folder = alone.resolve().name, alone
    else:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            raise DatasetError(f"--clients-from takes DIR or NAME=DIR; {entry!r} is not a folder")
        folder = Path(path)
    if not folder.is_dir():
        raise DatasetError(f"--clients-from {entry}: {str(folder)!r} is not a folder")
    return name, folder
