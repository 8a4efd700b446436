#!/usr/bin/env python
"""Big objects (issue 8), each beside raw pyzmq in the same run.

    python scripts/bench_big.py                       # 1 GiB and 4 GiB transfers; FedAvg at 1e8 params, 8 and 16 daemons
    python scripts/bench_big.py --sizes-gib 1 --daemons 8 --params 1e7   # smaller

Part 1, transfers: ``ptr = await w.send(t); back = await ptr.get()`` of a tensor of the given size
against two raw pyzmq baselines, one frame each way with ``copy=False``: an echo server
(``scripts/bench_core.py --raw-echo-server``) and a store-and-fetch server (``--raw-store-server``),
which holds the bytes until asked for them, as a daemon holds a sent tensor. MB/s counts bytes moved
both ways. Three methods: every measurement in a fresh client process with a fresh server (the same
starting state for each); repeated measurements in one process with the sides alternating (each
inherits the memory the other side freed); and in one process with each side's measurements in a row
(its steady state). See docs/benchmarks_big.md for why all three.

Part 2, a FedAvg round over N daemons with a model of P float32 parameters (one ``nn.Linear``, trivial
local work: one step on 4 samples), after a warm-up round; the coordinator's peak resident memory
during the round (Linux VmHWM, reset before the round) is reported as multiples of the model's size
above the memory it held before the round (the model itself). The raw baseline moves the same bytes to
and from N raw echo servers (broadcast concurrently, collected one at a time, as the scheduler does).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import zmq
import zmq.asyncio
from safetensors.torch import save_file
from torch import nn

import fedzmq as fz
from fedzmq.launcher import start_daemons, stop_all
from fedzmq.worker.server import peak_rss_bytes

GIB = 1 << 30
HERE = Path(__file__).resolve().parent


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@contextlib.contextmanager
def raw_echo_servers(count: int, store: bool = False):
    """``count`` raw pyzmq servers as subprocesses, echo servers or (``store``) store-and-fetch
    servers (this file with ``--raw-store-server``); yields their addresses."""
    procs, addresses = [], []
    try:
        for _ in range(count):
            with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as probe:
                port = probe.bind_to_random_port("tcp://127.0.0.1")
            address = f"tcp://127.0.0.1:{port}"
            command = [str(HERE / "bench_big.py"), "--raw-store-server"] if store else [
                str(HERE / "bench_core.py"), "--raw-echo-server"]
            procs.append(subprocess.Popen([sys.executable, *command, address], stdout=subprocess.PIPE, text=True))
            addresses.append(address)
        for proc in procs:  # each prints a line once its socket is bound (benchkit.run_raw_server)
            if "ready" not in (proc.stdout.readline() if proc.stdout else ""):
                raise RuntimeError(f"a raw server exited before it was ready ({proc.args})")
        yield addresses
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


async def raw_round_trip(sock: zmq.asyncio.Socket, payload: memoryview) -> zmq.Frame:
    await sock.send(payload, copy=False)
    return await sock.recv(copy=False)


async def raw_store_and_fetch(sock: zmq.asyncio.Socket, payload: memoryview) -> zmq.Frame:
    """The raw form of send+get: the server keeps the bytes (acknowledging them), then sends them back
    when asked, as a daemon holds a sent tensor until its get."""
    await sock.send(payload, copy=False)
    await sock.recv()
    await sock.send(b"")
    return await sock.recv(copy=False)


def check_reply(reply: zmq.Frame, nbytes: int) -> None:
    """A raw baseline's reply carries every byte (checked outside the timed region)."""
    if len(reply.buffer) != nbytes:
        raise RuntimeError(f"a raw server answered {len(reply.buffer)} bytes instead of {nbytes}")


async def store_server_loop(sock: zmq.asyncio.Socket) -> None:
    """``--raw-store-server``: a non-empty message is stored and acknowledged; an empty one fetches
    the stored bytes, which the server then forgets."""
    stored = None
    while True:
        routing, payload = await sock.recv_multipart(copy=False)
        if len(payload.buffer):
            stored = payload
            await sock.send_multipart([routing, b""])
        else:
            fetched, stored = stored, None
            await sock.send_multipart([routing, fetched if fetched is not None else b""], copy=False)
        # Hold nothing between requests but the stored bytes, as a daemon frees a deleted object at
        # once: a payload kept until the next request would tax whatever is measured in between.
        del routing, payload
        fetched = None


async def timed_send_get(worker: fz.RemoteWorker, tensor: torch.Tensor) -> dict[str, float]:
    """One fedzmq send+get, timed (send, get, total); the copy is checked and deleted untimed."""
    started = time.perf_counter()
    ptr = await worker.send(tensor)
    sent = time.perf_counter()
    back = await ptr.get()
    done = time.perf_counter()
    assert torch.equal(back, tensor)
    del back
    await ptr.delete()
    return {"send": sent - started, "get": done - sent, "total": done - started}


async def bench_transfer(nbytes: int, repeats: int, settle: float, alternate: bool = True) -> dict[str, float]:
    """Median send+get times of fedzmq and raw pyzmq in this process, after one warm-up of each.

    Fairness on a VM that returns freed memory to its host (free page reporting, as here): touching
    memory that was handed back costs several times a normal page fault, and memory freed moments ago
    has not been handed back yet. So each measurement starts after ``settle`` seconds of quiet.
    ``alternate``: the sides take turns, in an order that alternates (fedzmq first, then raw first);
    else each side runs all its measurements in a row (the steady state of one kind of work)."""
    tensor = torch.empty(nbytes, dtype=torch.uint8)
    tensor.random_(0, 255)
    [daemon] = start_daemons(["big"])
    try:
        with raw_echo_servers(1) as [raw_address], raw_echo_servers(1, store=True) as [store_address]:
            ctx = zmq.asyncio.Context.instance()
            raw = ctx.socket(zmq.DEALER)
            raw.connect(raw_address)
            store = ctx.socket(zmq.DEALER)
            store.connect(store_address)
            times: dict[str, list[float]] = {"send": [], "get": [], "fedzmq": [], "raw": [], "store": []}
            async with fz.connect(daemon.address) as worker:

                async def fedzmq_once() -> None:
                    timed = await timed_send_get(worker, tensor)
                    times["send"].append(timed["send"])
                    times["get"].append(timed["get"])
                    times["fedzmq"].append(timed["total"])

                async def raw_once() -> None:
                    started = time.perf_counter()
                    reply = await raw_round_trip(raw, memoryview(tensor.numpy()))
                    times["raw"].append(time.perf_counter() - started)
                    check_reply(reply, nbytes)

                async def store_once() -> None:
                    started = time.perf_counter()
                    reply = await raw_store_and_fetch(store, memoryview(tensor.numpy()))
                    times["store"].append(time.perf_counter() - started)
                    check_reply(reply, nbytes)

                if alternate:
                    sequence = [m for rep in range(repeats + 1)  # rep 0 is the warm-up
                                for m in ((raw_once, store_once, fedzmq_once) if rep % 2 else
                                          (fedzmq_once, store_once, raw_once))]
                else:
                    sequence = [m for m in (fedzmq_once, store_once, raw_once) for _ in range(repeats + 1)]
                for measure in sequence:
                    await asyncio.sleep(settle)
                    await measure()
                # what a receiver pays for fresh memory with the object held by the daemon and the
                # client (as during a get): both receivers' time is mostly first-touch page faults
                ptr = await worker.send(tensor)
                await asyncio.sleep(settle)
                started = time.perf_counter()
                torch.empty(min(nbytes, GIB), dtype=torch.uint8).fill_(1)
                times["touch"] = [0.0, (time.perf_counter() - started) * GIB / min(nbytes, GIB)]
                await ptr.delete()
            raw.close(linger=0)
            store.close(linger=0)
    finally:
        stop_all([daemon])
    return {k: statistics.median(v[1:]) for k, v in times.items()}


async def one_transfer(mode: str, nbytes: int, settle: float) -> dict[str, float]:
    """One send+get of ``nbytes`` by ``mode`` (fedzmq, echo or store) from this fresh process to a fresh
    server: what ``fresh_transfers`` runs in a subprocess (``--one-transfer``)."""
    tensor = torch.empty(nbytes, dtype=torch.uint8)
    tensor.random_(0, 255)
    await asyncio.sleep(settle)
    if mode == "fedzmq":
        [daemon] = start_daemons(["big"])
        try:
            async with fz.connect(daemon.address) as worker:
                await asyncio.sleep(settle)
                return await timed_send_get(worker, tensor)
        finally:
            stop_all([daemon])
    with raw_echo_servers(1, store=mode == "store") as [address]:
        sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        sock.connect(address)
        await asyncio.sleep(settle)
        started = time.perf_counter()
        reply = await (raw_store_and_fetch if mode == "store" else raw_round_trip)(sock, memoryview(tensor.numpy()))
        done = time.perf_counter()
        check_reply(reply, nbytes)
        sock.close(linger=0)
    return {"total": done - started}


def fresh_transfers(nbytes: int, repeats: int, settle: float) -> dict[str, float]:
    """Median send+get times, each measurement in a fresh client process with a fresh server.

    The other method (``bench_transfer``) repeats measurements in one process; on this VM a
    measurement then runs in memory the one before it freed, which costs a fraction of fresh memory,
    so its ratios swing with the order and the host's state. Here every measurement starts from the
    same state: a new process that holds the tensor, a new server, ``settle`` seconds of quiet."""
    times: dict[str, list[float]] = {"send": [], "get": [], "fedzmq": [], "raw": [], "store": []}
    names = {"fedzmq": "fedzmq", "echo": "raw", "store": "store"}
    modes = ["fedzmq", "store", "echo"]
    for rep in range(repeats):
        for mode in modes[rep % 3:] + modes[:rep % 3]:  # rotated: each side in each position in turn
            run = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one-transfer", mode, str(nbytes),
                                  str(settle)], capture_output=True, text=True, timeout=900)
            if run.returncode != 0:
                raise RuntimeError(f"--one-transfer {mode} failed: {run.stderr[-2000:]}")
            result = json.loads(run.stdout.strip().splitlines()[-1])
            times[names[mode]].append(result["total"])
            if mode == "fedzmq":
                times["send"].append(result["send"])
                times["get"].append(result["get"])
    return {k: statistics.median(v) for k, v in times.items()}


async def bench_round(daemons: int, params: int, rounds: int) -> dict[str, float]:
    side = int(math.isqrt(params))
    model = nn.Linear(side, side, bias=False)
    model_bytes = side * side * 4
    data_dir = Path(tempfile.mkdtemp(prefix="fedzmq-bench-big-"))
    ids = [f"w{i}" for i in range(daemons)]
    extra = {}
    for i in ids:
        path = data_dir / f"{i}.safetensors"
        save_file({"x": torch.randn(4, side), "y": torch.randn(4, side)}, str(path))
        extra[i] = ["--data", f"d={path}"]
    handles = start_daemons(ids, per_daemon_args=extra)
    try:
        async with contextlib.AsyncExitStack() as stack:
            workers = [await stack.enter_async_context(fz.connect(h.address)) for h in handles]
            fit = fz.FitConfig(dataset="d", loss="mse_loss", optimizer={"cls": "SGD", "lr": 1e-6}, steps=1, batch_size=4)
            federation = fz.Federation(workers, model, fit, fz.FedAvg(), round_timeout=600)
            await federation.run_round()  # warm-up: module_put everywhere
            times, peaks = [], []
            for _ in range(rounds):
                baseline = rss()
                reset_peak()
                started = time.perf_counter()
                await federation.run_round()
                times.append(time.perf_counter() - started)
                peaks.append(((peak_rss_bytes() or 0) - baseline) / model_bytes)
        with raw_echo_servers(daemons) as addresses:
            ctx = zmq.asyncio.Context.instance()
            socks = []
            for a in addresses:
                s = ctx.socket(zmq.DEALER)
                s.connect(a)
                socks.append(s)
            payload = memoryview(model.weight.detach().numpy()).cast("B")
            raw_times = []
            for _ in range(rounds):
                started = time.perf_counter()
                await asyncio.gather(*(s.send(payload, copy=False) for s in socks))  # broadcast
                for s in socks:  # collect one at a time
                    await s.recv(copy=False)
                raw_times.append(time.perf_counter() - started)
            for s in socks:
                s.close(linger=0)
    finally:
        stop_all(handles)
        shutil.rmtree(data_dir, ignore_errors=True)
    return {"round": statistics.median(times), "raw": statistics.median(raw_times), "peak": max(peaks)}


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-gib", type=float, nargs="+", default=[1, 4])
    p.add_argument("--daemons", type=int, nargs="*", default=[8, 16], help="daemon counts for the FedAvg rounds (none: skip them)")
    p.add_argument("--params", type=float, default=1e8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-transfers", action="store_true")
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds of quiet before each transfer measurement (see bench_transfer)")
    args = p.parse_args()
    torch.set_num_threads(1)
    print("| transfer | method | fedzmq send+get | (send / get) | raw pyzmq echo | ratio | raw store+fetch | ratio "
          "| target | first touch of fresh memory |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    if not args.skip_transfers:
        for size in args.sizes_gib:
            nbytes = int(size * GIB)
            rate = lambda seconds: 2 * nbytes / seconds / 1e6  # noqa: E731  (bytes moved both ways)
            for method in ("fresh processes", "one process, alternating", "one process, each side in a row"):
                if method == "fresh processes":
                    t = fresh_transfers(nbytes, args.repeats, args.settle)
                else:
                    t = await bench_transfer(nbytes, args.repeats, args.settle, alternate=method.endswith("alternating"))
                touch = f"{t['touch']:.2f} s/GiB" if "touch" in t else "-"
                print(f"| {size:g} GiB | {method} | {rate(t['fedzmq']):,.0f} MB/s | ({t['send']:.2f} s / {t['get']:.2f} s) | "
                      f"{rate(t['raw']):,.0f} MB/s | {t['raw'] / t['fedzmq']:.2f}x | {rate(t['store']):,.0f} MB/s | "
                      f"{t['store'] / t['fedzmq']:.2f}x | >= 0.70x | {touch} |", flush=True)
    print()
    print("| daemons | params | FedAvg round | raw transfer | ratio | coordinator peak above baseline | target |")
    print("|---|---|---|---|---|---|---|")
    for n in args.daemons:
        r = await bench_round(n, int(args.params), args.rounds)
        print(f"| {n} | {args.params:.0e} | {r['round']:.2f} s | {r['raw']:.2f} s | {r['round'] / r['raw']:.2f}x | "
              f"{r['peak']:.2f} model copies | < 3 copies |", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--raw-store-server":
        from benchkit import run_raw_server

        sys.exit(run_raw_server(sys.argv[2], store_server_loop))
    if len(sys.argv) == 5 and sys.argv[1] == "--one-transfer":
        result = asyncio.run(one_transfer(sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
        print(json.dumps(result))
        sys.exit(0)
    sys.exit(asyncio.run(main()))
