"""Optimizers over a hosted model's parameters, with their state kept on the worker."""

from __future__ import annotations

from collections import Counter
from typing import Any

from ...errors import BadRequest, UnknownCommand
from ...optimizers import OPTIMIZERS, check_hyper
from ..binding import Binding, Context, Made
from ..objects import HostedOptimizer


def optim_create(context: Context, binding: Binding) -> Any:
    name = binding.args["cls"]
    if name not in OPTIMIZERS:
        raise UnknownCommand.new(f"optimizer {name!r} is not on the allowlist {sorted(OPTIMIZERS)}")
    cls, allowed = OPTIMIZERS[name]
    params = list(binding.objects["module"].module.parameters())
    groups, listed = [], set()
    for group in binding.args["groups"]:
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise BadRequest.new("each parameter group must be a map with a 'params' list")
        hyper = {k: v for k, v in group.items() if k != "params"}
        check_hyper(name, hyper)
        indexes = group["params"]
        if not all(type(i) is int and 0 <= i < len(params) for i in indexes):
            raise BadRequest.new(f"parameter indexes must be in [0, {len(params)})")
        # each parameter once in all: torch only warns of one listed twice in a group, and the optimizer then
        # repeats its work per listing (one 4 MiB parameter listed 12,000 times: a step of 17.8 s)
        counts: Counter[int] = Counter(indexes)
        twice = sorted({i for i, n in counts.items() if n > 1 or i in listed})
        if twice:
            raise BadRequest.new(f"parameter indexes {twice[:10]} are listed more than once (each parameter goes in "
                                 "one group, once)")
        listed.update(indexes)
        groups.append({"params": [params[i] for i in indexes], **hyper})
    return Made([HostedOptimizer(cls(groups), binding.request.args["module"])])  # type: ignore[call-arg]


def optim_zero_grad(context: Context, binding: Binding) -> Any:
    binding.objects["obj"].optimizer.zero_grad(set_to_none=binding.args.get("set_to_none", True))
    return None


def optim_step(context: Context, binding: Binding) -> Any:
    binding.objects["obj"].optimizer.step()
    return None
