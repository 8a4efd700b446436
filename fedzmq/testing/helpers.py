"""Assertions a federated test needs."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


def state_dict_diff(a: nn.Module | Mapping[str, torch.Tensor], b: nn.Module | Mapping[str, torch.Tensor],
                    atol: float = 1e-6, rtol: float = 0.0) -> list[str]:
    """Lines describing each tensor that differs between two models (empty when they match)."""
    sa = a.state_dict() if isinstance(a, nn.Module) else dict(a)
    sb = b.state_dict() if isinstance(b, nn.Module) else dict(b)
    problems = [f"{k}: only in the first" for k in sa.keys() - sb.keys()]
    problems += [f"{k}: only in the second" for k in sb.keys() - sa.keys()]
    for key in sorted(sa.keys() & sb.keys()):
        x, y = sa[key].detach(), sb[key].detach()
        if x.shape != y.shape or x.dtype != y.dtype:
            problems.append(f"{key}: shape/dtype {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}")
            continue
        if not torch.allclose(x.double(), y.double(), atol=atol, rtol=rtol, equal_nan=True):
            delta = (x.double() - y.double()).abs()
            worst = int(delta.argmax())
            problems.append(f"{key}: max |diff| {delta.max().item():.3g} at flat index {worst} "
                            f"({x.reshape(-1)[worst].item():.6g} vs {y.reshape(-1)[worst].item():.6g}), "
                            f"{int((delta > atol + rtol * y.double().abs()).sum())} of {x.numel()} elements differ")
    return problems


def assert_state_dicts_close(a: nn.Module | Mapping[str, torch.Tensor], b: nn.Module | Mapping[str, torch.Tensor],
                             atol: float = 1e-6, rtol: float = 0.0) -> None:
    """Assert two models (or state dicts) are equal within a tolerance, saying which tensors differ."""
    problems = state_dict_diff(a, b, atol, rtol)
    if problems:
        raise AssertionError("state dicts differ:\n  " + "\n  ".join(problems))
