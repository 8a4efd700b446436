"""The worker's sizing of forwards on the meta device: shared by every session and hosted client that sends
the same model description, and never confused between two descriptions."""

from __future__ import annotations

import torch
from torch import nn

from fedzmq.modeldesc import build, describe
from fedzmq.worker.cost import Coster
from fedzmq.worker.objects import HostedModule


def hosted(module: nn.Module) -> HostedModule:
    spec = describe(module)
    return HostedModule(build(spec, {}), spec)


def test_a_forward_is_measured_once_per_description_whatever_the_sessions_that_host_it() -> None:
    """The hosted clients of a secure round each build the same model: measuring its forward once per
    client was 4-5 ms each, seconds a round at a thousand clients."""
    coster = Coster({})
    rows = [torch.empty(8, 16)]
    first = coster.forward(hosted(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))), rows, {}, True)
    again = coster.forward(hosted(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))), rows, {}, True)
    assert first is not None and again is first  # the same measurement, not a second one


def test_footprints_of_other_descriptions_inputs_or_modes_are_their_own() -> None:
    coster = Coster({})
    rows = [torch.empty(8, 16)]
    small = coster.forward(hosted(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))), rows, {}, True)
    wide = coster.forward(hosted(nn.Sequential(nn.Linear(16, 512), nn.ReLU(), nn.Linear(512, 4))), rows, {}, True)
    assert small is not None and wide is not None and wide.nbytes > small.nbytes and wide.flops > small.flops
    more_rows = coster.forward(hosted(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))),
                               [torch.empty(64, 16)], {}, True)
    assert more_rows is not None and more_rows.nbytes > small.nbytes
    model = hosted(nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 4)))
    training = coster.forward(model, rows, {}, True)
    model.module.eval()
    evaluating = coster.forward(model, rows, {}, True)
    assert training is not None and evaluating is not None and evaluating is not training
