#!/usr/bin/env python
"""Benchmark of one FedAvg round of fedzmq, against raw pyzmq moving the same bytes in the same run.

    python scripts/bench_federated.py --quick           # about a minute on 2 cores
    python scripts/bench_federated.py                   # the full run, about 3-5 minutes on 2 cores
    python scripts/bench_federated.py --json out.json   # also write every sample as JSON
    python scripts/bench_federated.py --configs 16x1e7 --reps 3   # only some cells of the table

For every cell (number of daemons N in 2, 4, 8, 16; model of 10^4, 10^6, 10^7 float32 parameters):

* **fedzmq round**: ``Federation.run_round()`` with ``FedAvg`` over N ``fedzmq-worker`` daemons (subprocesses
  on loopback tcp), the model a single ``nn.Linear`` sized to the parameter count, trivial local work
  (``FitConfig(steps=1, batch_size=4)`` on a 4-sample dataset each daemon loads from its own safetensors file).
  One round does, per worker concurrently: ping, send the model (``module_put`` the first time, ``module_load``
  after: the model's bytes out), ``fit``, then, one worker at a time, ``module_state`` (the model's bytes
  back) folded into the FedAvg aggregate. Whatever the library does inside is measured through this API only.
* **raw transfer**: the same shape of traffic with raw pyzmq against N raw server processes (this file re-run
  as ``--raw-echo-server ADDRESS``: a ``zmq.asyncio`` ROUTER that keeps what it is sent and returns it on
  request). Per server concurrently: a DEALER sends the model's tensors as frames (``copy=False``) and awaits
  a small ack, then, one server at a time (an ``asyncio.Semaphore(1)``, as the Federation's download slot),
  it asks for them back and receives the same bytes (``copy=False``). Concurrent broadcast, sequential
  download: the Federation's pattern, with nothing but the transfers.
* **coordinator peak / model size**: the benchmark process's peak RSS during the round minus its RSS before
  the cell's first round (model built, sessions open, after ``gc.collect()``), divided by the model's bytes:
  what federating costs the coordinator beyond holding the model. (Not the RSS just before the round: memory
  the previous round left pinned would hide in that baseline; the diagnostics table shows that figure too.)
  The peak is the kernel's own high-water mark (``VmHWM``, reset before each round by writing 5 to
  ``/proc/self/clear_refs``); where that is not available, a background thread samples ``VmRSS`` every ms.

Every cell is warmed up with one fedzmq round (it sends the model with ``module_put``; later rounds use
``module_load``) and one raw round, then fedzmq and raw rounds alternate (raw, fedzmq, fedzmq, raw, ...)
so the noise of a shared machine falls on both alike; times are medians over the repetitions, memory the
maximum. Before every timed round (untimed) each fedzmq worker is pinged, so that every round starts from
the same state: the fedzmq client keeps the last message of each connection alive until the next one
arrives, and a round that follows a raw round would otherwise start with that memory already freed by
heartbeats while one that follows a fedzmq round would not. Targets: round time <= 1.5x the raw transfer time at 10^7 parameters; coordinator peak < 3 model
copies whatever the number of workers (judged for models of at least 1 MB: below that, RSS noise and the
round's fixed overhead of a few hundred KB dominate the ratio).

All daemons of the run are started once at the beginning (a cell with N daemons uses the first N) and are
stopped at the end, on Ctrl-C, on SIGTERM and on any error; each cell opens its own sessions and closes
them at its end, so the daemons free its models.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from benchkit import ServerDied, raw_dealer, run_raw_server, supervised, table, tidy_scratch  # scripts/ is on sys.path

MB = 1e6
TIME_TARGET = 1.5  # fedzmq round / raw transfer, at 10^7 parameters
MEM_TARGET = 3.0  # coordinator peak above the cell's baseline, in model copies
MEM_JUDGED_FROM = 1 << 20  # bytes: smaller models are shown but not judged (RSS noise)
SAMPLES = 4  # samples in each daemon's dataset
BATCH = 4


# ---------------------------------------------------------------------------------------------------
# The raw server (a subprocess: this file with --raw-echo-server)


def raw_echo_server(bind: str) -> int:
    """A ROUTER that keeps each client's last upload and sends it back on request, all with copy=False.

    Messages from a DEALER: [b"P", *frames] -> keep the frames, reply [b"ok"];
    [b"G"] -> reply [b"D", *kept frames]; [b"X"] -> forget them, reply [b"ok"]; anything else is echoed."""
    kept: dict[bytes, list[Any]] = {}

    async def serve_loop(sock: Any) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            rid, kind = frames[0], frames[1].bytes if len(frames) > 1 else b""
            if kind == b"P":
                kept[rid.bytes] = frames[2:]
                await sock.send_multipart([rid, b"ok"])
            elif kind == b"G":
                await sock.send_multipart([rid, b"D", *kept.get(rid.bytes, [])], copy=False)
            elif kind == b"X":
                kept.pop(rid.bytes, None)
                await sock.send_multipart([rid, b"ok"])
            else:
                await sock.send_multipart(frames, copy=False)
            del frames, rid  # hold only what ``kept`` holds between requests

    return run_raw_server(bind, serve_loop)


# ---------------------------------------------------------------------------------------------------
# Memory: peak RSS of this process during an awaited piece of work


def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(field_name)


def _rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kb("VmHWM")
        return True
    except OSError:
        return False


class PeakRSS:
    """``async with PeakRSS() as m: ...`` then ``m.before`` (RSS on entry, after ``gc.collect()``), ``m.peak``
    (highest RSS inside), in bytes; ``m.above(baseline)`` is ``peak - baseline`` (``baseline`` defaults to
    ``before``)."""

    hwm = _can_reset_hwm() if sys.platform.startswith("linux") else False

    def __init__(self) -> None:
        self.before = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def above(self, baseline: int | None = None) -> int:
        return max(0, self.peak - (self.before if baseline is None else baseline))

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_bytes())

    async def __aenter__(self) -> "PeakRSS":
        gc.collect()
        self.before = self.peak = _rss_bytes()
        if self.hwm:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := current RSS
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.hwm:
            self.peak = max(self.peak, _status_kb("VmHWM") * 1024)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())


# ---------------------------------------------------------------------------------------------------
# Processes


def start_raw_servers(count: int, log_dir: str) -> list[Any]:
    from fedzmq.launcher import DaemonProcess

    class RawEchoProcess(DaemonProcess):
        """The launcher's process handling (ready line, SIGTERM, SIGKILL fallback) for a raw server."""

        @property
        def command(self) -> list[str]:
            return [sys.executable, os.path.abspath(__file__), "--raw-echo-server", self.address or self.bind]

    procs = [RawEchoProcess(f"raw-{i}", "tcp://127.0.0.1:0", log_dir=log_dir) for i in range(count)]
    for p in procs:
        p.spawn()
    return procs


def write_datasets(count: int, data_dir: str) -> dict[str, list[str]]:
    """Per daemon, two tiny datasets (4 samples): "f100" (100 features) and "f1000" (1000 features)."""
    import torch
    from safetensors.torch import save_file

    args: dict[str, list[str]] = {}
    for i in range(count):
        g = torch.Generator().manual_seed(1000 + i)
        flags = []
        for features, classes in ((100, 100), (1000, 1000)):
            path = os.path.join(data_dir, f"w{i}-f{features}.safetensors")
            save_file({"x": torch.randn(SAMPLES, features, generator=g),
                       "y": torch.randint(0, classes, (SAMPLES,), generator=g)}, path)
            flags += ["--data", f"f{features}={path}"]
        # synthetic data of 4 rows: the privacy floor on rows per step (default 16) would refuse every step
        args[f"w{i}"] = flags + ["--min-batch-size", str(SAMPLES)]
    return args


# ---------------------------------------------------------------------------------------------------
# Models and the two kinds of round

#: parameters wanted -> (in_features, out_features, dataset); the bias adds out_features parameters
SHAPES = {10**4: (100, 100, "f100"), 10**6: (1000, 1000, "f1000"), 10**7: (1000, 10_000, "f1000")}


def make_model(params: int) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    fan_in, fan_out, _ = SHAPES[params]
    return nn.Linear(fan_in, fan_out)


def model_bytes(model: Any) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


class RawClient:
    def __init__(self, ctx: Any, address: str) -> None:
        self.sock = raw_dealer(ctx, address)

    async def put(self, frames: list[Any]) -> None:
        await self.sock.send_multipart([b"P", *frames], copy=False)
        await self.sock.recv_multipart(copy=False)

    async def get(self) -> int:
        await self.sock.send_multipart([b"G"])
        reply = await self.sock.recv_multipart(copy=False)
        return sum(len(f.buffer) for f in reply[1:])

    async def close(self) -> None:
        await self.sock.send_multipart([b"X"])
        await asyncio.wait_for(self.sock.recv_multipart(copy=False), 10.0)
        self.sock.close(linger=0)


async def raw_round(clients: Sequence[RawClient], frames: list[Any], expected: int) -> None:
    """Upload to every server concurrently; download from one server at a time (the Federation's pattern)."""
    slot = asyncio.Semaphore(1)

    async def one(client: RawClient) -> None:
        await client.put(frames)
        async with slot:
            got = await client.get()
        if got != expected:
            raise RuntimeError(f"raw server returned {got} bytes, expected {expected}")

    await asyncio.gather(*(one(c) for c in clients))


class _TimedAggregator:
    """Stands in for the round's aggregator and passes everything through to it, adding up the seconds its
    methods take: the coordinator's own arithmetic, to tell it apart from waiting on the network. A proxy
    rather than a subclass, so it follows whatever methods the scheduler calls (``add``, ``add_slice``, ...)."""

    def __init__(self, inner: Any, owner: Any) -> None:
        self._inner, self._owner = inner, owner

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if not callable(value):
            return value

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return value(*args, **kwargs)
            finally:
                self._owner.seconds += time.perf_counter() - t0
        return timed


def make_timed_fedavg() -> Any:
    """FedAvg, unchanged, whose aggregators are wrapped in ``_TimedAggregator``."""
    from fedzmq.federated.strategies import FedAvg

    class TimedFedAvg(FedAvg):
        def __init__(self) -> None:
            super().__init__()
            self.seconds = 0.0

        def begin_round(self, round_number: int, global_state: Any) -> Any:
            return _TimedAggregator(super().begin_round(round_number, global_state), self)

    return TimedFedAvg()


# ---------------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class Plan:
    cells: list[tuple[int, int]]  # (daemons, params)
    reps: dict[int, int]  # params -> timed repetitions


def _cells(daemons: Sequence[int], sizes: Sequence[int]) -> list[tuple[int, int]]:
    return [(n, p) for p in sizes for n in daemons]


QUICK = Plan(cells=_cells((2, 8), (10**4, 10**6)) + [(4, 10**7)], reps={10**4: 5, 10**6: 5, 10**7: 5})
FULL = Plan(cells=_cells((2, 4, 8, 16), (10**4, 10**6, 10**7)), reps={10**4: 11, 10**6: 9, 10**7: 7})


@dataclass
class Cell:
    daemons: int
    params: int  # nominal: 10^4, 10^6, 10^7
    exact_params: int = 0
    model_bytes: int = 0
    fz: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    fz_mem: list[int] = field(default_factory=list)  # peak above the cell's baseline (model built, sessions open)
    fz_mem_pre: list[int] = field(default_factory=list)  # peak above the RSS just before the round
    raw_mem: list[int] = field(default_factory=list)  # peak above the RSS just before the round
    fit_seconds: list[float] = field(default_factory=list)  # per worker per timed round, daemon-measured
    agg_seconds: list[float] = field(default_factory=list)  # per timed round: aggregator add + result
    bytes_moved: int = 0  # fedzmq bytes sent + received in the last timed round
    warmup_fz: float = 0.0

    @property
    def fz_median(self) -> float:
        return statistics.median(self.fz)

    @property
    def raw_median(self) -> float:
        return statistics.median(self.raw)

    @property
    def ratio(self) -> float:
        return self.fz_median / self.raw_median

    @property
    def mem_copies(self) -> float:
        return max(self.fz_mem) / self.model_bytes

    @property
    def raw_mem_copies(self) -> float:
        return max(self.raw_mem) / self.model_bytes

    @property
    def time_met(self) -> bool | None:
        return self.ratio <= TIME_TARGET if self.params >= 10**7 else None

    @property
    def mem_met(self) -> bool | None:
        return self.mem_copies < MEM_TARGET if self.model_bytes >= MEM_JUDGED_FROM else None


def say(*args: Any) -> None:
    print(*args, flush=True)


async def run_cell(cell: Cell, fz_addresses: Sequence[str], raw_addresses: Sequence[str], reps: int) -> None:
    import torch
    import zmq.asyncio

    import fedzmq as fz

    n = cell.daemons
    model = make_model(cell.params)
    cell.exact_params = sum(p.numel() for p in model.parameters())
    cell.model_bytes = model_bytes(model)
    raw_state = [t.detach().clone() for t in model.state_dict().values()]  # separate bytes, same layout
    frames = [memoryview(t.reshape(-1).view(torch.uint8).numpy()) for t in raw_state]
    ctx = zmq.asyncio.Context.instance()
    strategy = make_timed_fedavg()
    fit = fz.FitConfig(dataset=SHAPES[cell.params][2], loss="cross_entropy", optimizer={"cls": "SGD", "lr": 0.01},
                       steps=1, batch_size=BATCH)
    workers: list[Any] = []
    raws: list[RawClient] = []
    try:
        workers = list(await asyncio.gather(*(fz.connect(a) for a in fz_addresses[:n])))
        raws = [RawClient(ctx, a) for a in raw_addresses[:n]]
        federation = fz.Federation(workers, model, fit, strategy, round_timeout=600.0)
        gc.collect()
        baseline = _rss_bytes()  # the model built, sessions open, nothing sent yet

        async def fz_round() -> None:
            metrics = await federation.run_round()
            if len(metrics.participants) != n or metrics.dropped:
                raise RuntimeError(f"round {metrics.round}: {len(metrics.participants)} of {n} workers took part; "
                                   f"dropped: {metrics.dropped}")
            cell.bytes_moved = metrics.bytes_sent + metrics.bytes_received
            cell.fit_seconds.extend(f["seconds"] for f in metrics.fits.values())

        async def raw() -> None:
            await raw_round(raws, frames, cell.model_bytes)

        t0 = time.perf_counter()
        await fz_round()  # warm-up: module_put
        cell.warmup_fz = time.perf_counter() - t0
        await raw()
        cell.fit_seconds.clear()
        for rep in range(reps):
            order = ("raw", "fz") if rep % 2 == 0 else ("fz", "raw")
            for kind in order:
                # every round starts from the same state: a ping to each fedzmq worker lets the client drop
                # what it still held from the previous round (see docs/benchmarks_federated.md)
                await asyncio.gather(*(w.ping() for w in workers))
                strategy.seconds = 0.0
                async with PeakRSS() as mem:
                    t0 = time.perf_counter()
                    await (fz_round() if kind == "fz" else raw())
                    elapsed = time.perf_counter() - t0
                if kind == "fz":
                    cell.fz.append(elapsed)
                    cell.fz_mem.append(mem.above(baseline))
                    cell.fz_mem_pre.append(mem.above())
                    cell.agg_seconds.append(strategy.seconds)
                else:
                    cell.raw.append(elapsed)
                    cell.raw_mem.append(mem.above())
    finally:
        await asyncio.gather(*(w.close() for w in workers), *(r.close() for r in raws), return_exceptions=True)


def fmt_params(p: int) -> str:
    return f"10^{len(str(p)) - 1}"


def yes_no(v: bool | None) -> str:
    return {True: "yes", False: "NO", None: "-"}[v]


def report(cells: list[Cell]) -> str:
    main_rows = []
    for c in cells:
        met = f"time {yes_no(c.time_met)}, mem {yes_no(c.mem_met)}"
        main_rows.append([str(c.daemons), fmt_params(c.params), f"{c.fz_median:.3f}", f"{c.raw_median:.3f}",
                          f"{c.ratio:.2f}x", f"{c.mem_copies:.2f}", met])
    main = table(["daemons", "params", "fedzmq round (s)", "raw transfer (s)", "ratio",
                  "coordinator peak / model size", "target met"], main_rows)
    diag_rows = []
    for c in cells:
        diag_rows.append([
            str(c.daemons), f"{c.exact_params:,}", f"{c.model_bytes / MB:.2f}",
            f"{min(c.fz):.3f} / {max(c.fz):.3f}", f"{min(c.raw):.3f} / {max(c.raw):.3f}", f"{c.warmup_fz:.3f}",
            f"{statistics.median(c.fit_seconds) * 1e3:.1f} / {max(c.fit_seconds) * 1e3:.1f}",
            f"{statistics.median(c.agg_seconds) * 1e3:.1f}",
            f"{max(c.fz_mem) / MB:.1f}", f"{max(c.fz_mem_pre) / c.model_bytes:.2f}", f"{c.raw_mem_copies:.2f}",
            f"{c.bytes_moved / (2 * c.daemons * c.model_bytes):.4f}",
        ])
    diag = table(["daemons", "exact params", "model MB", "fedzmq min / max (s)", "raw min / max (s)",
                  "warm-up round (s)", "fit ms median / max", "aggregate ms", "fedzmq peak MB",
                  "fedzmq peak over pre-round RSS / model", "raw peak / model", "fedzmq bytes / (2 N model)"], diag_rows)
    return main + "\n\nDiagnostics:\n\n" + diag


def machine_line() -> str:
    import platform
    import subprocess

    import torch
    import zmq

    import fedzmq

    root = os.path.dirname(os.path.dirname(os.path.abspath(fedzmq.__file__)))
    state = ""
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "fedzmq"], capture_output=True,
                               text=True, timeout=5, check=True).stdout.strip()
        state = f" (git {head}{', fedzmq/ modified' if dirty else ''})"
    except (OSError, subprocess.SubprocessError):
        pass
    return (f"fedzmq {fedzmq.__version__}{state}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}, "
            f"memory peak via {'VmHWM reset' if PeakRSS.hwm else 'VmRSS sampled every 1 ms'}")


def parse_cells(text: str) -> list[tuple[int, int]]:
    cells = []
    for item in text.split(","):
        n, _, p = item.strip().lower().partition("x")
        params = int(float(p))
        if params not in SHAPES:
            raise SystemExit(f"--configs: params must be one of 1e4, 1e6, 1e7, got {p!r}")
        cells.append((int(n), params))
    return cells


async def run_all(plan: Plan, fz_addresses: list[str], raw_addresses: list[str], reps: int | None) -> list[Cell]:
    cells = []
    for n, params in plan.cells:
        cell = Cell(n, params)
        r = reps or plan.reps[params]
        t0 = time.monotonic()
        await run_cell(cell, fz_addresses, raw_addresses, r)
        gc.collect()
        say(f"  {n:2d} daemons x {fmt_params(params)} params: fedzmq {cell.fz_median:.3f} s, raw {cell.raw_median:.3f} s "
            f"({cell.ratio:.2f}x), peak {cell.mem_copies:.2f} model copies  [{r} reps, {time.monotonic() - t0:.0f} s]")
        cells.append(cell)
    return cells


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 and 8 daemons x 10^4, 10^6; 4 daemons x 10^7")
    p.add_argument("--configs", metavar="NxP,...", help="only these cells, e.g. 16x1e7,2x1e4")
    p.add_argument("--reps", type=int, help="timed repetitions per cell (default: by model size)")
    p.add_argument("--json", metavar="PATH", help="also write every sample and result as JSON here")
    p.add_argument("--raw-echo-server", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.raw_echo_server:
        return raw_echo_server(args.raw_echo_server)

    import torch

    from fedzmq.launcher import DaemonProcess, start_daemons, stop_all

    torch.set_num_threads(1)

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    plan = QUICK if args.quick else FULL
    if args.configs:
        cells = parse_cells(args.configs)
        plan = Plan(cells=cells, reps=plan.reps)
    count = max(n for n, _ in plan.cells)
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    log_dir = tempfile.mkdtemp(prefix="fedzmq-bench-fed-")
    ok = False
    processes: list[DaemonProcess] = []
    try:
        say(f"starting {count} fedzmq worker daemons and {count} raw servers (logs in {log_dir}) ...")
        raws = start_raw_servers(count, log_dir)
        processes.extend(raws)
        per_daemon = write_datasets(count, log_dir)
        daemons = start_daemons(list(per_daemon), log_dir=log_dir, per_daemon_args=per_daemon)
        processes.extend(daemons)
        raw_addresses = [r.wait_ready(60.0) for r in raws]
        fz_addresses = [d.address for d in daemons]
        assert all(fz_addresses)
        say(f"ready after {time.monotonic() - started:.0f} s; measuring "
            f"{len(plan.cells)} cells (fedzmq and raw rounds alternate; medians of the timed rounds)")
        cells = asyncio.run(supervised(run_all(plan, fz_addresses, raw_addresses, args.reps), processes))
        machine = f"{machine_line()}; load average before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f}"
        text = report(cells)
        say("\n" + text + "\n\n" + machine)
        tmet = [c.time_met for c in cells if c.time_met is not None]
        mmet = [c.mem_met for c in cells if c.mem_met is not None]
        say(f"time target (<= {TIME_TARGET}x raw at 10^7): {sum(tmet)} of {len(tmet)} cells met; "
            f"memory target (< {MEM_TARGET:g} model copies, models >= 1 MB): {sum(mmet)} of {len(mmet)} cells met")
        elapsed = time.monotonic() - started
        say(f"{'quick' if args.quick else 'full'} run took {elapsed:.0f} s")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": machine, "mode": "quick" if args.quick else "full", "seconds": elapsed,
                           "cells": [{**c.__dict__, "ratio": c.ratio, "mem_copies": c.mem_copies,
                                      "time_met": c.time_met, "mem_met": c.mem_met} for c in cells],
                           "table": text}, f, indent=1)
        ok = True
        return 0
    except KeyboardInterrupt:
        say("\ninterrupted: stopping the daemons")
        return 130
    except ServerDied as exc:
        say(f"\nerror: {exc}")
        return 1
    finally:
        codes = stop_all(processes)
        killed = sorted(k for k, v in codes.items() if v == -signal.SIGKILL)
        bad = {k: v for k, v in codes.items() if v not in (0, -signal.SIGTERM, -signal.SIGKILL)}
        if killed:
            say(f"note: {', '.join(killed)} did not exit within 10 s of SIGTERM and were killed (SIGKILL)")
        if bad:
            say(f"warning: processes exited with {bad}; logs in {log_dir}")
        tidy_scratch(log_dir, ok and not bad)


if __name__ == "__main__":
    sys.exit(main())
