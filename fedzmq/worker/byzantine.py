"""A hostile participant, for tests and demos only: the daemon distorts the update it returns from a fit.

Robust aggregation (Krum, Bulyan, FedMedian, FedTrimmedAvg) is only worth something if it is shown to
hold against a participant that really misbehaves over the wire, not just against numbers made up in a
test. ``fedzmq-worker --fault-injection --byzantine sign-flip`` (or ``scale=K``) makes a real daemon
that trains honestly and then returns a distorted update::

    sign-flip   x' = g - (x - g)       the honest move, reversed
    scale=K     x' = g + K * (x - g)   the honest move, times K (K = -10: reversed and ten times longer)

``g`` is the model the fit started from (the round's global model), ``x`` the honestly trained one.
Only floating-point entries are changed (a BatchNorm counter stays honest). The flag is refused unless
``--fault-injection`` is also given, and it is off by default: no production daemon lies by accident.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from ..errors import FedzmqError


class ByzantineConfigError(FedzmqError, ValueError):
    """A ``--byzantine`` setting that cannot be used: malformed, or given without ``--fault-injection``."""


@dataclass(frozen=True)
class Attack:
    """What a hostile daemon does to the move of its trained model away from the start: multiply it by
    ``factor`` (-1 for a sign flip)."""

    name: str
    factor: float

    def apply(self, module: nn.Module, start: Mapping[str, torch.Tensor]) -> None:
        """Replace ``module``'s trained state x by g + factor * (x - g) in place, g = ``start``."""
        with torch.no_grad():
            for name, tensor in module.state_dict().items():
                if tensor.is_floating_point():
                    g = start[name]
                    tensor.sub_(g).mul_(self.factor).add_(g)


def parse_attack(spec: str) -> Attack:
    """``sign-flip`` or ``scale=K`` (K a finite number), as ``--byzantine`` takes it."""
    text = spec.strip().lower()
    if text in ("sign-flip", "signflip", "sign_flip"):
        return Attack("sign-flip", -1.0)
    if text.startswith("scale="):
        try:
            factor = float(text.removeprefix("scale="))
        except ValueError:
            factor = math.nan
        if math.isfinite(factor):
            return Attack(f"scale={factor:g}", factor)
    raise ByzantineConfigError(f"--byzantine takes 'sign-flip' or 'scale=K' with K a finite number, got {spec!r}")


def check_setting(byzantine: str | None, fault_injection: bool) -> None:
    """Refuse a hostile setting on a daemon that does not take fault injection, or a malformed one."""
    if byzantine is None:
        return
    parse_attack(byzantine)
    if not fault_injection:
        raise ByzantineConfigError("--byzantine is a test-only fault and needs --fault-injection as well")


__all__ = ["Attack", "ByzantineConfigError", "check_setting", "parse_attack"]
