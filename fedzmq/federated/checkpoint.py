"""Checkpoints of a federated training: global model, strategy state, round number and history.

Each finished round is written to ``DIR/round-NNNNNN/`` through a temporary folder and one atomic
rename, so a coordinator killed at any moment leaves either the previous checkpoint or the new one,
never half of one. Tensors go to safetensors files (no pickle anywhere); everything else to JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "round-"


@dataclass
class Checkpoint:
    round: int
    model: dict[str, torch.Tensor]
    strategy: dict[str, Any]
    history: list[dict[str, Any]]
    #: the strategy's ``name`` (e.g. ``fedadam``, ``secagg(fedavg)``): a run resumed under another strategy
    #: would drop or misread its server state. None in checkpoints written before it was recorded
    strategy_name: str | None = None


def _split(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {k: v.detach().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    plain = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    return tensors, plain


def check_strategy_state(state: dict[str, Any]) -> None:
    """``TypeError`` naming the first entry of a strategy's ``state_dict`` a checkpoint cannot keep: each must be a
    tensor or a JSON value (numbers, strings, booleans, None, and lists or dicts of those). A federation checks
    this when it is made, so that a user's strategy is not found out only after a round was committed."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"the strategy's state entry {key!r} cannot be checkpointed ({exc}): give each tensor an "
                            "entry of its own (e.g. 'momentum.w'), and the rest as numbers, strings, lists or dicts"
                            ) from None


def save(directory: str | os.PathLike[str], checkpoint: Checkpoint, keep: int = 2) -> Path:
    """Write a checkpoint atomically and keep only the newest ``keep`` ones."""
    check_strategy_state(checkpoint.strategy)
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{checkpoint.round:06d}"
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        save_file({k: v.detach().contiguous().clone() for k, v in checkpoint.model.items()},
                  str(staging / "model.safetensors"))
        tensors, plain = _split(checkpoint.strategy)
        save_file(tensors, str(staging / "strategy.safetensors"))
        meta = {"round": checkpoint.round, "strategy": plain, "history": checkpoint.history,
                "strategy_name": checkpoint.strategy_name}
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in sorted(root.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(directory: str | os.PathLike[str]) -> Checkpoint | None:
    """The newest complete checkpoint in ``directory``, or None."""
    root = Path(directory)
    if not root.is_dir():
        return None
    for folder in sorted(root.glob(f"{PREFIX}*"), reverse=True):
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            continue
        meta = json.loads(meta_path.read_text())
        strategy = {**meta.get("strategy", {}), **load_file(str(folder / "strategy.safetensors"))}
        return Checkpoint(int(meta["round"]), load_file(str(folder / "model.safetensors")), strategy,
                          list(meta.get("history", [])), meta.get("strategy_name"))
    return None
