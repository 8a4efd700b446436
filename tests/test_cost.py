"""The worker's sizing of forwards on the meta device: shared by every session and hosted client that sends
the same model description, and never confused between two descriptions."""

from __future__ import annotations

import gc
import sys
import tracemalloc

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


def test_measurements_are_kept_per_client_key() -> None:
    """How fast a forward is sized must not tell one coordinator which model another one runs: a
    cache hit is several times faster than a measurement."""
    coster = Coster({})
    rows = [torch.empty(8, 16)]
    alice = coster.forward(hosted(nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4))), rows, {}, True, scope="alice")
    mallory = coster.forward(hosted(nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4))), rows, {}, True,
                             scope="mallory")
    alice_again = coster.forward(hosted(nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4))), rows, {}, True,
                                 scope="alice")
    assert mallory is not alice and alice_again is alice and mallory == alice


def test_the_cache_keeps_no_value_from_a_request() -> None:
    """A plain value passed through a model (a string through ``nn.Identity``) was kept in the cache's
    key: 4,096 entries of 4 MiB strings, uncharged to any session and kept after it closed."""
    coster = Coster({})
    big = "x" * 1_000_000
    before = sys.getrefcount(big)
    coster.forward(hosted(nn.Identity()), [big], {}, True)
    assert sys.getrefcount(big) == before


def test_a_fit_is_sized_in_training_mode_whatever_mode_the_model_was_left_in() -> None:
    """A fit trains every module (dropout on, batch norm keeping its batch statistics): a model switched
    to eval mode before its fit was charged for an evaluation's forward, half of what the fit used."""
    coster = Coster({})
    rows = [torch.empty(64, 16)]
    layers = (nn.Linear(16, 256), nn.Dropout(0.5), nn.BatchNorm1d(256), nn.Linear(256, 4))
    training = coster.forward(hosted(nn.Sequential(*layers)), rows, {}, True)
    left_in_eval = hosted(nn.Sequential(*layers))
    left_in_eval.module.eval()
    evaluating = coster.forward(left_in_eval, rows, {}, True)
    as_a_fit = coster.forward(left_in_eval, rows, {}, True, training=True)
    assert training is not None and evaluating is not None and as_a_fit is not None
    assert evaluating.nbytes < training.nbytes and as_a_fit.nbytes == training.nbytes


def test_sizing_ops_keeps_no_request_values_in_the_cache() -> None:
    """A red team sized 4,096 ``cat``s of 1,024 tensors of 32 dims, each with another out-of-range dim
    (failed sizings are kept too): 3 GB stayed in the cache's keys, charged to no session. Keys are now
    digests."""
    coster = Coster({})
    tensors = [torch.zeros([1] * 32)] * 256
    for dim in range(2):  # warm-up: what the first sizings allocate once
        coster.op("cat", [tensors], {"dim": 100_000 + dim})
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for dim in range(2, 202):
            coster.op("cat", [tensors], {"dim": 100_000 + dim})
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 200 * 4096, f"{kept} bytes kept for 200 sizings"  # a signature's tuples were ~80 KB each


def test_one_keys_sizings_do_not_evict_anothers() -> None:
    """Each client key has its own LRU: a coordinator filling the cache neither slows another down nor
    learns, by timing its own lookups, how many new calls the other made."""
    coster = Coster({}, cache_size=8)
    x = torch.zeros(3, 4)
    alices = coster.op("add", [x, 1], {}, scope="alice")
    for n in range(1, 40):
        coster.op("add", [torch.zeros(n, 5), 1], {}, scope="mallory")
    assert coster.op("add", [x, 1], {}, scope="alice") is alices


def test_a_small_call_is_found_again_nan_included() -> None:
    """Small calls are kept under their signature itself (``call_key``): a NaN scalar equals nothing, and
    a key holding one would be measured anew on every call."""
    coster = Coster({})
    x = torch.zeros(4, 4)
    for scalar in (1, 0.5, float("nan"), float("-inf"), True):
        first = coster.op("add", [x, scalar], {})
        assert coster.op("add", [x, scalar], {}) is first, scalar
    assert coster.op("add", [x, 1], {}) is not coster.op("add", [x, 1.0], {})  # 1 and 1.0 make other dtypes


def test_small_calls_keep_little_memory_in_their_keys() -> None:
    """A small call's key is its signature: at most ``SMALL_CALL_ARGS`` numbers or tensors of at most
    ``SMALL_CALL_DIMS`` dims. Larger calls, of as many different shapes, are kept under digests."""
    coster = Coster({}, cache_size=4096)

    def linear(side: int) -> None:  # three tensors of up to 4 dims, of dims past 256 (ints Python does not share)
        big = 2 ** 12 + side
        coster.op("linear", [torch.zeros(big, big, big, big, device="meta"), torch.zeros(big, big, device="meta"),
                             torch.zeros(big, device="meta")], {})

    for side in range(2):  # warm-up: what the first sizings allocate once
        linear(side)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for side in range(2, 1002):
            linear(side)
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 1000 * 4096, f"{kept} bytes kept for 1,000 sizings"
