"""The coordinator's secure-aggregation work runs off the event loop (``fedzmq.federated.secure.off_loop``):
while the server unmasks, the loop keeps running other coroutines (heartbeats, replies), and the result
is the one the same step gives on the loop."""

from __future__ import annotations

import asyncio

import pytest
import torch

from fedzmq.federated.secure import off_loop
from fedzmq.secagg import SecAggClient, SecAggConfig, SecAggServer


def server_at_unmask(n: int, length: int, drop: int) -> tuple[SecAggServer, list, torch.Tensor]:
    """A round of ``n`` in-process clients up to the unmask answers (``drop`` of them vanished after
    sharing their keys, so the server must also rebuild and remove their masks)."""
    cfg = SecAggConfig(tuple(range(n)), threshold=n // 2 + 1, vector_length=length, clip=100.0)
    clients = {i: SecAggClient(i, cfg) for i in range(n)}
    server = SecAggServer(cfg)
    server.collect_keys(c.advertise() for c in clients.values())
    routed = server.route_shares(clients[i].share_keys(server.keys_for(i)) for i in range(n))
    g = torch.Generator().manual_seed(0)
    updates = {i: torch.randn(length, generator=g) * 0.01 for i in range(n)}  # norms under the clip
    survivors = range(drop, n)
    server.collect_masked(clients[i].masked_input(updates[i], 1.0, routed[i]) for i in survivors)
    server.collect_confirms(clients[i].confirm(server.confirm_request_for(i)) for i in survivors)
    answers = [clients[i].unmask(server.request_for(i)) for i in survivors]
    return server, answers, torch.stack([updates[i] for i in survivors]).mean(0)


@pytest.mark.timeout(300)
async def test_the_loop_keeps_running_while_the_server_unmasks() -> None:
    server, answers, expected = server_at_unmask(12, 400_000, drop=3)
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:  # stands for the heartbeats and replies of a real round
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.ensure_future(ticker())
    await asyncio.sleep(0)
    before = ticks
    result = await off_loop(server.finish, answers)  # 12 PRG expansions of 400k values, 3 key rebuilds
    during = ticks - before
    stop.set()
    await task
    assert during >= 3, f"the loop ran {during} times while the server unmasked"
    assert len(result.survivors) == 9 and len(result.dropped) == 3
    assert float((result.mean - expected).abs().max()) <= result.error_bound + 1e-6


async def test_a_failure_off_the_loop_reaches_the_round() -> None:
    server, answers, _ = server_at_unmask(5, 100, drop=0)
    with pytest.raises(Exception) as raised:
        await off_loop(server.finish, answers[:1])  # below the threshold: the round aborts
    assert type(raised.value).__name__ == "SecAggAborted"
