"""A thousand clients' data, made on the spot: scikit-learn's ``make_classification`` split non-IID.

``prepare`` draws a classification task (no download), keeps a held-out test set for the coordinator,
divides the rest among N clients by a Dirichlet split over classes, and writes each client's shard as
``DIR/daemonK/<client>.safetensors`` for K daemons, which serve them with ``--clients-from``. That is
the simulation of many clients on one machine: real daemons, the same commands as production.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from .digits import dirichlet_split

DATASET = "data"


@dataclass
class Population:
    #: one folder of client shards per daemon
    folders: list[Path]
    clients: int
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    features: int
    classes: int


#: the fewest rows a shard gets (when there are enough samples): daemons serving the shards should use it
#: as ``--min-batch-size`` at most, or a client with a smaller shard refuses every fit and counts as a
#: drop-out (which, under DP, costs privacy budget)
MIN_ROWS = 10


def prepare(directory: str | Path, clients: int, daemons: int, *, samples: int | None = None, features: int = 20,
            classes: int = 10, alpha: float = 0.5, seed: int = 0, test_fraction: float = 0.1) -> Population:
    """``clients`` shards (about 100 samples each unless ``samples`` says otherwise) over ``daemons``."""
    from sklearn.datasets import make_classification

    samples = samples or 100 * clients
    x, y = make_classification(n_samples=samples, n_features=features, n_informative=max(2, features // 2),
                               n_redundant=features // 4, n_classes=classes, n_clusters_per_class=1,
                               class_sep=1.5, random_state=seed)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    rng = np.random.default_rng(seed)
    order = rng.permutation(samples)
    n_test = int(samples * test_fraction)
    test, train = order[:n_test], order[n_test:]
    xt, yt = torch.tensor(x[train], dtype=torch.float32), torch.tensor(y[train], dtype=torch.int64)
    root = Path(directory)
    folders = [root / f"daemon{k}" for k in range(daemons)]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    min_size = max(1, min(MIN_ROWS, len(train) // (4 * clients)))
    for n, index in enumerate(dirichlet_split(yt.numpy(), clients, alpha, rng, min_size=min_size)):
        save_file({"x": xt[index].contiguous(), "y": yt[index].contiguous()},
                  str(folders[n % daemons] / f"client{n:05d}.safetensors"))
    return Population(folders, clients, (xt, yt),
                      (torch.tensor(x[test], dtype=torch.float32), torch.tensor(y[test], dtype=torch.int64)),
                      features, classes)


def make_model(features: int = 20, classes: int = 10, hidden: int = 128, seed: int = 0) -> nn.Module:
    """About 10^4 parameters at the defaults (11,594)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden // 2), nn.ReLU(),
                         nn.Linear(hidden // 2, classes))


__all__ = ["DATASET", "MIN_ROWS", "Population", "make_model", "prepare"]
