#!/usr/bin/env python
"""FedAvg round time through ``Federation.run_round`` against the raw pyzmq floor for the same bytes.

    python scripts/bench_rounds.py --quick          # N = 2, 8 x 10^4, 10^6; N = 2 x 10^7 (about a minute)
    python scripts/bench_rounds.py                  # N = 2, 8, 16 x 10^4, 10^6; N = 2, 8 x 10^7
    python scripts/bench_rounds.py --configs 16x1e7 --reps 3
    python scripts/bench_rounds.py --steps 1        # one local SGD step per round instead of none

For every cell (N daemons, a model of P float32 parameters):

* **fedzmq**: ``await federation.run_round()`` with ``FedAvg`` over N ``fedzmq-worker`` daemons
  (subprocesses on loopback tcp). The model is one ``nn.Linear`` of P parameters; the fit is
  ``FitConfig(steps=0)`` by default: each daemon loads the global weights and sends them back, which is
  the equivalent of what the floor's peers do (``--steps 1`` adds one SGD step on 4 samples).
* **floor**: the best raw pyzmq can do for the same bytes. N raw peers (this file re-run as
  ``--raw-peer ADDRESS``: a ``zmq.asyncio`` ROUTER that sends every message back as it came, zero-copy)
  are sent the model's tensors as frames (``copy=False``) all at once, all N replies (the same bytes)
  are received at once, each added into a float32 running sum as it arrives (``torch.frombuffer`` on
  the received frames, no copy; the same sum every round, zeroed), and the sum divided by N: a
  round's traffic and its averaging with nothing else.

The table also gives the coordinator's CPU time per round (this process, all its threads; medians),
which a shared machine's load disturbs less than the wall time.

Rounds alternate (floor, fedzmq, fedzmq, floor, ...) after one warm-up of each, so the load of a shared
machine falls on both alike; the table gives medians. The 1-minute load average before and after the
run is printed with the table.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from benchkit import ServerDied, raw_dealer, run_raw_server, supervised, table, tidy_scratch  # scripts/ is on sys.path
from bench_federated import SHAPES, fmt_params, machine_line, make_model, model_bytes, write_datasets

GOALS = {10**4: 3.0, 10**6: 1.5, 10**7: 1.5}  # fedzmq / floor, issue 17


def raw_peer(bind: str) -> int:
    """The floor's peer: every message straight back, zero-copy (receive, reply with the same bytes)."""

    async def echo(sock: Any) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            await sock.send_multipart(frames, copy=False)
            del frames

    return run_raw_server(bind, echo)


def start_raw_peers(count: int, log_dir: str) -> list[Any]:
    from fedzmq.launcher import DaemonProcess

    class RawPeerProcess(DaemonProcess):
        @property
        def command(self) -> list[str]:
            return [sys.executable, os.path.abspath(__file__), "--raw-peer", self.address or self.bind]

    procs = [RawPeerProcess(f"raw-{i}", "tcp://127.0.0.1:0", log_dir=log_dir) for i in range(count)]
    for p in procs:
        p.spawn()
    return procs


async def floor_round(socks: Sequence[Any], frames: list[Any], acc: Any) -> Any:
    """Send to all at once, receive from all at once, average (float32 running sum, then / N). The sum is
    ``acc``, zeroed, the same memory every round: a fresh one cost a page fault per 4 KiB (about a
    thousand per round at 10^6 parameters, and the heap churn slowed the fedzmq rounds beside it)."""
    import torch

    acc.zero_()
    await asyncio.gather(*(s.send_multipart(frames, copy=False) for s in socks))

    async def one(sock: Any) -> None:
        reply = await sock.recv_multipart(copy=False)
        at = 0
        for frame in reply:
            values = torch.frombuffer(frame.buffer, dtype=torch.float32)
            acc[at:at + values.numel()].add_(values)
            at += values.numel()

    await asyncio.gather(*(one(s) for s in socks))
    return acc.div_(len(socks))


@dataclass
class Cell:
    daemons: int
    params: int
    exact_params: int = 0
    model_bytes: int = 0
    fz: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)
    fit_ms: list[float] = field(default_factory=list)
    #: this process's CPU time per round (all its threads): less sensitive to a shared machine's load
    fz_cpu: list[float] = field(default_factory=list)
    floor_cpu: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return statistics.median(self.fz) / statistics.median(self.floor)

    @property
    def met(self) -> bool:
        return self.ratio <= GOALS[self.params]


def say(*args: Any) -> None:
    print(*args, flush=True)


async def run_cell(cell: Cell, fz_addresses: Sequence[str], raw_addresses: Sequence[str], reps: int,
                   steps: int) -> None:
    import torch
    import zmq.asyncio

    import fedzmq as fz

    n = cell.daemons
    model = make_model(cell.params)
    cell.exact_params = sum(p.numel() for p in model.parameters())
    cell.model_bytes = model_bytes(model)
    raw_state = [t.detach().clone().reshape(-1) for t in model.state_dict().values()]
    frames = [memoryview(t.view(torch.uint8).numpy()) for t in raw_state]
    acc = torch.zeros(sum(t.numel() for t in raw_state), dtype=torch.float32)
    ctx = zmq.asyncio.Context.instance()
    fit = fz.FitConfig(dataset=SHAPES[cell.params][2], loss="cross_entropy", optimizer={"cls": "SGD", "lr": 0.01},
                       steps=steps, batch_size=4)
    workers: list[Any] = []
    socks = [raw_dealer(ctx, a) for a in raw_addresses[:n]]
    try:
        workers = list(await asyncio.gather(*(fz.connect(a) for a in fz_addresses[:n])))
        federation = fz.Federation(workers, model, fit, fz.FedAvg(), round_timeout=600.0)

        async def fz_round() -> None:
            metrics = await federation.run_round()
            if len(metrics.participants) != n or metrics.dropped:
                raise RuntimeError(f"round {metrics.round}: {len(metrics.participants)} of {n} took part; "
                                   f"dropped: {metrics.dropped}")
            cell.fit_ms.extend(f["seconds"] * 1e3 for f in metrics.fits.values())

        async def floor() -> None:
            mean = await floor_round(socks, frames, acc)
            if mean.numel() != cell.exact_params:
                raise RuntimeError("the floor's average has the wrong size")

        await fz_round()  # warm-up: the model goes out once (module_put)
        await floor()
        cell.fit_ms.clear()
        gc.collect()
        for rep in range(reps):
            for kind in (("floor", "fz") if rep % 2 == 0 else ("fz", "floor")):
                t0, c0 = time.perf_counter(), time.process_time()
                await (fz_round() if kind == "fz" else floor())
                (cell.fz if kind == "fz" else cell.floor).append(time.perf_counter() - t0)
                (cell.fz_cpu if kind == "fz" else cell.floor_cpu).append(time.process_time() - c0)
    finally:
        await asyncio.gather(*(w.close() for w in workers), return_exceptions=True)
        for s in socks:
            s.close(linger=0)


def report(cells: list[Cell]) -> str:
    rows = [[str(c.daemons), fmt_params(c.params), f"{statistics.median(c.floor) * 1e3:.2f}",
             f"{statistics.median(c.fz) * 1e3:.2f}", f"{c.ratio:.2f}x", f"<= {GOALS[c.params]:g}x",
             "yes" if c.met else "NO", f"{statistics.median(c.floor_cpu) * 1e3:.2f}",
             f"{statistics.median(c.fz_cpu) * 1e3:.2f}", f"{statistics.median(c.fit_ms):.1f}" if c.fit_ms else "-"]
            for c in cells]
    return table(["N", "params", "floor median (ms)", "fedzmq median (ms)", "ratio", "goal", "met",
                  "floor coordinator CPU ms", "fedzmq coordinator CPU ms", "daemon fit ms (median)"], rows)


QUICK = [(2, 10**4), (8, 10**4), (2, 10**6), (8, 10**6), (2, 10**7)]
FULL = [(n, p) for p in (10**4, 10**6) for n in (2, 8, 16)] + [(2, 10**7), (8, 10**7)]
REPS = {10**4: 15, 10**6: 9, 10**7: 5}


def parse_cells(text: str) -> list[tuple[int, int]]:
    cells = []
    for item in text.split(","):
        n, _, p = item.strip().lower().partition("x")
        if int(float(p)) not in SHAPES:
            raise SystemExit(f"--configs: params must be one of 1e4, 1e6, 1e7, got {p!r}")
        cells.append((int(n), int(float(p))))
    return cells


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--configs", metavar="NxP,...", help="only these cells, e.g. 16x1e7,2x1e4")
    p.add_argument("--reps", type=int, help="timed repetitions per cell (default by size: 15, 9, 5)")
    p.add_argument("--steps", type=int, default=0, help="local SGD steps per round (default 0: load and return)")
    p.add_argument("--raw-peer", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.raw_peer:
        return raw_peer(args.raw_peer)

    import torch

    from fedzmq.launcher import DaemonProcess, stop_all

    torch.set_num_threads(1)

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    plan = parse_cells(args.configs) if args.configs else (QUICK if args.quick else FULL)
    count = max(n for n, _ in plan)
    load_before = os.getloadavg()[0]
    log_dir = tempfile.mkdtemp(prefix="fedzmq-bench-rounds-")
    ok = False
    processes: list[Any] = []
    started = time.monotonic()
    try:
        say(f"starting {count} daemons and {count} raw peers (logs in {log_dir}) ...")
        raws = start_raw_peers(count, log_dir)
        processes.extend(raws)
        per_daemon = write_datasets(count, log_dir)
        # the launcher's start_daemons, with a longer wait for "ready": sixteen daemons importing torch
        # at once on a loaded machine can take more than its 60 s
        daemons = [DaemonProcess(i, "tcp://127.0.0.1:0", per_daemon[i], log_dir) for i in per_daemon]
        processes.extend(daemons)
        for d in daemons:
            d.spawn()
        for d in daemons:
            d.wait_ready(600.0)
        raw_addresses = [r.wait_ready(600.0) for r in raws]
        fz_addresses = [d.address for d in processes[count:]]

        async def run_all() -> list[Cell]:
            cells = []
            for n, params in plan:
                cell = Cell(n, params)
                await run_cell(cell, fz_addresses, raw_addresses, args.reps or REPS[params], args.steps)
                say(f"  N={n:2d} {fmt_params(params)}: floor {statistics.median(cell.floor) * 1e3:.2f} ms, "
                    f"fedzmq {statistics.median(cell.fz) * 1e3:.2f} ms ({cell.ratio:.2f}x)")
                cells.append(cell)
            return cells

        cells = asyncio.run(supervised(run_all(), processes))
        say("\n" + report(cells) + "\n")
        say(f"{machine_line()}; local steps per round: {args.steps}; 1-min load average before/after: "
            f"{load_before:.1f}/{os.getloadavg()[0]:.1f}; {time.monotonic() - started:.0f} s")
        met = sum(c.met for c in cells)
        say(f"goals met in {met} of {len(cells)} cells")
        ok = True
        return 0
    except KeyboardInterrupt:
        say("\ninterrupted")
        return 130
    except ServerDied as exc:
        say(f"\nerror: {exc}")
        return 1
    finally:
        stop_all(processes)
        tidy_scratch(log_dir, ok)


if __name__ == "__main__":
    sys.exit(main())
