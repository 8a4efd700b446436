"""Run a whole secure-aggregation round in one process, with optional drop-outs at each step.

This is the reference for wiring the protocol into a transport: the same calls, in the same order, with
each message passed through ``wire.roundtrip`` (msgpack encode/decode) to prove the messages are plain
data. Used by the tests, the benchmark in docs/secagg.md, and as executable documentation.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch

from .client import SecAggClient
from .config import SecAggConfig
from .server import SecAggResult, SecAggServer
from .wire import roundtrip


def run_round(
    config: SecAggConfig,
    updates: Mapping[int, torch.Tensor],
    weights: Mapping[int, float] | None = None,
    *,
    drop_before_keys: Collection[int] = (),
    drop_before_shares: Collection[int] = (),
    drop_before_masked: Collection[int] = (),
    drop_before_confirm: Collection[int] = (),
    drop_before_unmask: Collection[int] = (),
    record: Callable[[str, Any], None] | None = None,
    deliver: Callable[[int, str, Any], None] | None = None,
    noise_seeds: Mapping[int, bytes] | None = None,
    serialize: bool = True,
) -> SecAggResult:
    """One round among ``config.client_ids``; a client in ``drop_before_X`` goes silent before step X.

    ``updates`` and ``weights`` map client ids to their flat update and weight (default 1.0). ``record``,
    if given, is called with ``(step, message)`` for every message the server receives: everything the
    coordinator ever learns, besides the result. ``deliver``, if given, is called with
    ``(client_id, step, message)`` for every message a client receives (``keys``, ``routed``,
    ``confirm_request``, ``request``).
    """
    weights = weights or {}
    noise_seeds = noise_seeds or {}
    clients = {i: SecAggClient(i, config, noise_seed=noise_seeds.get(i)) for i in config.client_ids}
    server = SecAggServer(config)
    encode = roundtrip if serialize else (lambda m: m)

    def send(msg: Any, to: int | None = None, step: str = "") -> Any:
        msg = encode(msg)
        if deliver is not None and to is not None:
            deliver(to, step, msg)
        return msg

    def to_server(step: str, msg: Any) -> Any:
        msg = send(msg)
        if record is not None:
            record(step, msg)
        return msg

    alive = [i for i in clients if i not in drop_before_keys]
    server.collect_keys(to_server("advertise", clients[i].advertise()) for i in alive)
    alive = [i for i in alive if i not in drop_before_shares]
    routed = server.route_shares(
        to_server("shares", clients[i].share_keys(send(server.keys_for(i), i, "keys"))) for i in alive)
    alive = [i for i in routed if i not in drop_before_masked]
    server.collect_masked(
        to_server("masked", clients[i].masked_input(updates[i], weights.get(i, 1.0), send(routed[i], i, "routed")))
        for i in alive)
    server.collect_confirms(
        to_server("confirm", clients[i].confirm(send(server.confirm_request_for(i), i, "confirm_request")))
        for i in server.u2 if i not in drop_before_confirm)
    alive = [i for i in server.confirmers if i not in drop_before_unmask]
    return server.finish(
        to_server("unmask", clients[i].unmask(send(server.request_for(i), i, "request"))) for i in alive)
