"""Assertions a federated test needs."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

StateDict = nn.Module | Mapping[str, Any]


def _state(value: StateDict) -> dict[str, Any]:
    return dict(value.state_dict() if isinstance(value, nn.Module) else value)


def _index(flat: int, shape: torch.Size) -> str:
    """``[1, 2]`` for element 5 of a 2x3 tensor (nothing for a 0-dimensional one)."""
    index = []
    for size in reversed(shape):
        flat, rest = divmod(flat, size)
        index.append(rest)
    return f" at [{', '.join(str(i) for i in reversed(index))}]" if shape else ""


def _tensor_diff(x: torch.Tensor, y: torch.Tensor, atol: float, rtol: float, equal_nan: bool) -> str | None:
    """How ``x`` and ``y`` (same shape and dtype) differ, or None if they are close."""
    if torch.equal(x, y):  # the common case, without copies (False whenever there is a NaN)
        return None
    wide = torch.complex128 if x.is_complex() else torch.float64
    x, y = x.detach().cpu().to(wide), y.detach().cpu().to(wide)
    close = torch.isclose(x, y, rtol=rtol, atol=atol, equal_nan=equal_nan)
    if bool(close.all()):
        return None
    diff = (x - y).abs()
    rank = torch.where(close, torch.tensor(-1.0, dtype=torch.float64), diff.nan_to_num(nan=float("inf")))
    worst = int(rank.reshape(-1).argmax())  # the first of equals: the same element every time
    a, b = x.reshape(-1)[worst].item(), y.reshape(-1)[worst].item()
    return (f"{int((~close).sum())} of {x.numel()} elements differ; max |diff| {diff.reshape(-1)[worst].item():.3g}"
            f"{_index(worst, x.shape)} ({a:.6g} vs {b:.6g})")


def _unequal(x: Any, y: Any) -> bool:
    try:
        return bool(x != y)
    except Exception:  # an array's != has no single truth value
        return repr(x) != repr(y)


def state_dict_diff(a: StateDict, b: StateDict, atol: float = 1e-6, rtol: float = 0.0, *,
                    equal_nan: bool = False) -> list[str]:
    """One line per entry that differs between two models (or state dicts); empty when they match.

    Tensors match when every element does: ``|a - b| <= atol + rtol * |b|`` (``torch.isclose``).
    NaN matches nothing, not even a NaN at the same place, unless ``equal_nan=True``: a model that
    diverged to NaN on both sides is rarely what a test means by equal. Infinities match infinities
    of the same sign. A line names the entry, how many elements differ, and the largest difference
    with its index (``[1, 2]``; NaN counts as largest) and both values. Entries in one side only,
    different shapes or dtypes, and other values that are not equal get a line each. The order is
    stable: the first side's entries in their order, then those only in the second, in theirs."""
    sa, sb = _state(a), _state(b)
    problems = []
    for key, x in sa.items():
        if key not in sb:
            problems.append(f"{key}: only in the first")
            continue
        y = sb[key]
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
                problems.append(f"{key}: {type(x).__name__} vs {type(y).__name__}")
            elif _unequal(x, y):
                problems.append(f"{key}: {x!r} vs {y!r}")
            continue
        if x.shape != y.shape or x.dtype != y.dtype:
            problems.append(f"{key}: shape/dtype {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}")
            continue
        differs = _tensor_diff(x, y, atol, rtol, equal_nan)
        if differs:
            problems.append(f"{key}: {differs}")
    problems += [f"{key}: only in the second" for key in sb if key not in sa]
    return problems


def assert_state_dicts_close(a: StateDict, b: StateDict, atol: float = 1e-6, rtol: float = 0.0, *,
                             equal_nan: bool = False) -> None:
    """Assert two models (or state dicts) are equal within a tolerance; the message lists each entry
    that differs (``state_dict_diff``), under the tolerance that was used."""
    __tracebackhide__ = True  # pytest shows the caller's line, not this one
    problems = state_dict_diff(a, b, atol, rtol, equal_nan=equal_nan)
    if problems:
        nan = "NaN equals NaN" if equal_nan else "NaN equals nothing"
        raise AssertionError(f"state dicts differ (atol={atol:g}, rtol={rtol:g}, {nan}):\n  " + "\n  ".join(problems))
