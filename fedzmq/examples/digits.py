"""The main job's data and model: scikit-learn's bundled digits (no download), split non-IID.

``prepare`` splits the 1,797 8x8 images into a held-out test set (kept by the coordinator) and a
training set divided among N data owners by a Dirichlet split over classes (smaller ``alpha``, more
skewed), and writes each owner's shard as a safetensors file their daemon loads with ``--data``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

DATASET = "digits"


@dataclass
class DigitsSplit:
    shards: dict[str, Path]
    sizes: dict[str, list[int]]          # per worker: samples of each class
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    return x, y


def dirichlet_split(labels: np.ndarray, workers: int, alpha: float, rng: np.random.Generator,
                    min_size: int = 10) -> list[np.ndarray]:
    """Indices per worker: for each class, proportions drawn from Dir(alpha) (redrawn until every
    worker has at least ``min_size`` samples)."""
    if workers * min_size > len(labels):  # no draw can succeed: refuse at once, not after 1000 (a minute on CI)
        raise ValueError(_unsplittable(workers, min_size, alpha))
    classes = np.unique(labels)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(workers)]
        for c in classes:
            index = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * workers)) * len(index)).astype(int)[:-1]
            for w, chunk in enumerate(np.split(index, cuts)):
                parts[w].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.array(sorted(p)) for p in parts]
    raise ValueError(_unsplittable(workers, min_size, alpha))


def _unsplittable(workers: int, min_size: int, alpha: float) -> str:
    """One message for both refusals: the CLI's users see the same words either way."""
    return f"could not split into {workers} shards of at least {min_size} samples with alpha={alpha}"


def prepare(directory: str | os.PathLike[str], worker_ids: list[str], alpha: float = 0.5, seed: int = 0,
            test_fraction: float = 0.2) -> DigitsSplit:
    x, y = load_digits_tensors()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_test = int(len(y) * test_fraction)
    test_index, train_index = order[:n_test], order[n_test:]
    x_train, y_train = x[train_index], y[train_index]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards, sizes = {}, {}
    for worker, index in zip(worker_ids, dirichlet_split(y_train.numpy(), len(worker_ids), alpha, rng)):
        path = directory / f"{worker}.safetensors"
        xs, ys = x_train[index].contiguous(), y_train[index].contiguous()
        save_file({"x": xs, "y": ys}, str(path), metadata={
            "description": f"scikit-learn digits, {worker}'s non-IID share (Dirichlet alpha={alpha})",
            "tags": "digits,images,non-iid",
        })
        shards[worker] = path
        sizes[worker] = torch.bincount(ys, minlength=10).tolist()
    (directory / "split.json").write_text(json.dumps({"alpha": alpha, "seed": seed, "sizes": sizes}, indent=1))
    return DigitsSplit(shards, sizes, (x_train, y_train), (x[test_index], y[test_index]))


def make_model(hidden: int = 64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    was = model.training
    model.train(False)
    out = model(x)
    model.train(was)
    return {"loss": nn.functional.cross_entropy(out, y).item(),
            "accuracy": (out.argmax(1) == y).float().mean().item()}


def train_centrally(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float,
                    batch_size: int = 32, seed: int = 0) -> nn.Module:
    """The baseline: the same model trained on all the training data in one place."""
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            index = order[start:start + batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            opt.step()
    return model
