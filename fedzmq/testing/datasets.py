"""Small synthetic datasets for tests, written as the files a daemon loads with ``--data NAME=PATH``.

Every maker returns what the ``datasets=`` argument of the ``fedzmq_daemons`` and
``fedzmq_virtual_workers`` fixtures takes: ``{worker_id: {dataset_name: path}}``.

    shards = digits_shards(tmp_path, ["bob", "alice"], alpha=0.5)   # non-IID split of sklearn's digits
    bob, alice = await fedzmq_daemons("bob", "alice", datasets=shards)
    shards.test                                                       # the held-out (x, y) for evaluation
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors.torch import save_file

from ..examples.seed import toy_data

PathLike = str | os.PathLike[str]


def worker_ids(ids: Sequence[str | int] | int) -> list[str]:
    """``("bob", "alice")`` as given, or a count (``3`` or ``(3,)``) as ``["worker0", "worker1", "worker2"]``."""
    if isinstance(ids, int):
        ids = (ids,)
    if len(ids) == 1 and isinstance(ids[0], int) and not isinstance(ids[0], bool):
        return [f"worker{i}" for i in range(ids[0])]
    names = [str(i) for i in ids]
    if len(set(names)) != len(names):
        raise ValueError(f"worker ids must be distinct, got {names}")
    return names


def write_dataset(path: PathLike, features: torch.Tensor, labels: torch.Tensor, description: str = "",
                  tags: Iterable[str] = ()) -> Path:
    """Write ``features``/``labels`` as a safetensors file a daemon loads with ``--data NAME=PATH``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: write_dataset writes .safetensors files")
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows but {len(labels)} labels")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"x": features.detach().contiguous(), "y": labels.detach().contiguous()}, str(path),
              metadata={"description": description, "tags": ",".join(tags)})
    return path


def toy_dataset(path: PathLike, rows: slice = slice(None)) -> Path:
    """The seed tutorial's toy data (4 points in 2-D, float targets: use ``loss="mse_loss"``), or some
    of its rows, as a dataset file. Returns the path."""
    x, y = toy_data()
    return write_dataset(path, x[rows], y[rows], "the seed tutorial's toy data", ["toy", "regression"])


def toy_shards(directory: PathLike, ids: Sequence[str | int] | int = ("bob", "alice"),
               name: str = "toy") -> dict[str, dict[str, str]]:
    """The toy data split between workers in order, as the seed splits it (bob rows 0-1, alice 2-3)."""
    names = worker_ids(ids)
    if not 1 <= len(names) <= 4:
        raise ValueError("the toy data has 4 rows: give 1 to 4 workers")
    bounds = [round(i * 4 / len(names)) for i in range(len(names) + 1)]
    return {w: {name: str(toy_dataset(Path(directory) / f"{w}-{name}.safetensors", slice(a, b)))}
            for w, a, b in zip(names, bounds, bounds[1:])}


class DigitsShards(dict[str, dict[str, str]]):
    """``{worker_id: {"digits": path}}`` (pass it as ``datasets=``), plus what the split kept aside:
    ``test`` and ``train`` as ``(x, y)`` tensors, ``sizes`` (samples of each class per worker),
    ``paths`` (worker_id -> Path) and ``directory``."""

    directory: Path
    paths: dict[str, Path]
    sizes: dict[str, list[int]]
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


def digits_shards(directory: PathLike, ids: Sequence[str | int] | int, alpha: float = 0.5, seed: int = 0,
                  name: str = "digits", test_fraction: float = 0.2) -> DigitsShards:
    """A non-IID split of scikit-learn's digits (8x8 images, 10 classes; bundled, no download).

    ``test_fraction`` of the 1,797 images is held out; the rest is divided among ``ids`` by a
    Dirichlet(``alpha``) split over classes (smaller ``alpha``, more skewed) and written as one
    safetensors shard per worker in ``directory``. Needs scikit-learn (``pip install fedzmq[demo]``)."""
    try:
        import sklearn  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("digits_shards needs scikit-learn: pip install 'fedzmq[demo]'") from None
    from ..examples import digits

    names = worker_ids(ids)
    split = digits.prepare(directory, names, alpha=alpha, seed=seed, test_fraction=test_fraction)
    shards = DigitsShards({w: {name: str(path)} for w, path in split.shards.items()})
    shards.directory = Path(directory)
    shards.paths = dict(split.shards)
    shards.sizes = split.sizes
    shards.train = split.train
    shards.test = split.test
    return shards


__all__ = ["DigitsShards", "digits_shards", "toy_dataset", "toy_shards", "worker_ids", "write_dataset"]
