"""Seeded random interleavings within one worker: many coroutines pipelining ops (some failing on
purpose, each with its own sizes so its error text is its own), awaiting some, gathering others. Every
result and every error must be exactly what the same calls give run one after another."""

import asyncio
import random

import pytest
import torch

import fedzmq as fz


async def _job(worker: fz.RemoteWorker, seed: int) -> list:
    rng = random.Random(seed)
    out = []
    x = await worker.send(torch.arange(6.0) + seed)
    acc = x
    for step in range(8):
        choice = rng.randrange(4)
        if choice == 0:
            acc = acc * 2 + step
        elif choice == 1:
            bad = acc + torch.ones(seed % 5 + 7)  # fails: sizes 6 vs (7..11)
            try:
                await bad.get()
                out.append("no error")
            except fz.RemoteError as exc:
                out.append((type(exc).__name__, exc.remote_type, exc.remote_message.split("object")[0]))
        elif choice == 2:
            out.append((await acc.get()).tolist())
        else:
            await asyncio.sleep(0)
            out.append((await (acc.sum() + seed).get()).item())
    out.append((await acc.get()).tolist())
    return out


async def _check(worker: fz.RemoteWorker) -> None:
    seeds = list(range(12))
    sequential = [await _job(worker, s) for s in seeds]
    for trial in range(3):
        order = seeds[:]
        random.Random(trial).shuffle(order)
        concurrent = dict(zip(order, await asyncio.gather(*(_job(worker, s) for s in order))))
        assert [concurrent[s] for s in seeds] == sequential, trial


@pytest.mark.timeout(120)
async def test_interleaved_jobs_with_errors_equal_sequential_virtual(fedzmq_virtual_workers):
    [bob] = await fedzmq_virtual_workers("bob")
    await _check(bob)


@pytest.mark.timeout(120)
async def test_interleaved_jobs_with_errors_equal_sequential_daemon(fedzmq_daemons):
    [bob] = await fedzmq_daemons("bob")
    await _check(bob.worker)
