"""Shard files for daemons that host many clients (``fedzmq-worker --clients-from FOLDER``) in tests."""

from pathlib import Path

import torch

from fedzmq.testing import write_dataset


def write_shards(folder: Path, names: str, features: int, seed: int, rows: int = 64) -> None:
    """One dataset file per name in a new ``folder``: ``rows`` random rows of ``features`` columns,
    labelled by whether the first column passes 0.5, drawn from a generator seeded with ``seed``."""
    folder.mkdir()
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        x = torch.rand(rows, features, generator=generator)
        write_dataset(folder / f"{name}.safetensors", x, (x[:, 0] > 0.5).long())
