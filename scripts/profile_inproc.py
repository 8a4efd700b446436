#!/usr/bin/env python
"""Client and daemon in one process (``VirtualWorker``: the daemon's own code behind ``inproc://``), so
one profiler sees both sides of a round trip. Used for docs/profile.md:

    python scripts/profile_inproc.py opget 3000            # N op+get on a 16-float tensor
    python scripts/profile_inproc.py pipelined 20          # N bursts of 2,000 ops sent at once, then awaited
    python scripts/profile_inproc.py round 10 1e6          # N FedAvg rounds, 2 workers, P parameters, steps=0
    py-spy record -r 1000 --format raw -o stacks.txt -- python scripts/profile_inproc.py opget 20000

Prints the wall time per operation and, for op+get, the process's CPU time per operation (client and
daemon together; on a loaded machine the wall time is mostly waiting for a core). The work of each
phase runs under a function named after it (``phase_opget``, ``phase_round``), so the stacks of the
phase can be told from start-up's.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Awaitable, Callable

import torch


async def phase_opget(x: object, n: int) -> None:
    for _ in range(n):
        await (x + 1).get()  # type: ignore[operator]


async def on_a_virtual_worker(phase: Callable[[object, int], Awaitable[None]], warm_up: int,
                              n: int) -> tuple[float, float]:
    """Seconds of wall time and of this process's CPU that ``phase(x, n)`` took, ``x`` being 16 floats
    on a ``VirtualWorker``, after ``phase(x, warm_up)``."""
    import fedzmq as fz

    async with fz.VirtualWorker("w") as w:
        x = await w.send(torch.arange(16, dtype=torch.float32))
        await phase(x, warm_up)
        t0, c0 = time.perf_counter(), time.process_time()
        await phase(x, n)
        return time.perf_counter() - t0, time.process_time() - c0


async def opget(n: int) -> None:
    wall, cpu = await on_a_virtual_worker(phase_opget, 200, n)
    print(f"op+get: {wall / n * 1e6:.1f} us each of wall time, {cpu / n * 1e6:.1f} us of CPU ({n})")


async def phase_pipelined(x: object, n: int) -> None:
    for _ in range(n):
        pointers = [x + 1 for _ in range(2000)]  # type: ignore[operator]
        for pointer in pointers:
            await pointer


async def pipelined(n: int) -> None:
    wall, cpu = await on_a_virtual_worker(phase_pipelined, 1, n)
    ops = 2000 * n
    print(f"pipelined: {ops / wall:,.0f} ops/s of wall time, {cpu / ops * 1e6:.1f} us of CPU each ({ops})")


async def phase_round(federation: object, n: int) -> None:
    for _ in range(n):
        await federation.run_round()  # type: ignore[attr-defined]


async def rounds(n: int, params: int) -> None:
    import fedzmq as fz
    from fedzmq.worker.datasets import Dataset

    fan_in, fan_out = {10**4: (100, 100), 10**6: (1000, 1000), 10**7: (1000, 10_000)}[params]
    torch.manual_seed(0)
    model = torch.nn.Linear(fan_in, fan_out)
    data = {"d": Dataset("d", torch.randn(4, fan_in), torch.randint(0, fan_out, (4,)))}
    workers = [fz.VirtualWorker(f"w{i}", datasets=dict(data)) for i in range(2)]
    try:
        fit = fz.FitConfig(dataset="d", steps=0, batch_size=4)
        federation = fz.Federation(workers, model, fit, fz.FedAvg(), round_timeout=600.0)
        await phase_round(federation, 2)
        t0 = time.perf_counter()
        await phase_round(federation, n)
        print(f"round (2 workers, {params} params): {(time.perf_counter() - t0) / n * 1e3:.2f} ms each ({n})")
    finally:
        await asyncio.gather(*(w.close() for w in workers))


def main() -> None:
    torch.set_num_threads(1)
    what, n = sys.argv[1], int(sys.argv[2])
    if what == "opget":
        asyncio.run(opget(n))
    elif what == "pipelined":
        asyncio.run(pipelined(n))
    else:
        asyncio.run(rounds(n, int(float(sys.argv[3]))))


if __name__ == "__main__":
    main()
