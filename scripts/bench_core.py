#!/usr/bin/env python
"""Core benchmark of fedzmq, every result stated as a ratio to raw pyzmq measured in the same run.

    python scripts/bench_core.py --quick          # about half a minute
    python scripts/bench_core.py                  # the full run, a few minutes on 2 cores
    python scripts/bench_core.py --json out.json  # also write the results as JSON

Two servers run as subprocesses on loopback tcp for the whole run:

* a ``fedzmq-worker`` daemon (started with ``fedzmq.launcher``), and
* a raw echo server: this file re-executed as ``--raw-echo-server ADDRESS``, a ``zmq.asyncio``
  ROUTER that sends every message back as it came (``copy=False``).

The client process talks to both from one asyncio event loop and one ``zmq.asyncio.Context``;
fedzmq blocks and raw blocks are interleaved (A B A B ...) so that the noise of a shared machine falls
on both alike, and each number is the median over repetitions. What is measured:

1. round trip of a tiny remote op awaited one at a time: ``await (x + 1)`` ("op") and
   ``await x.get()`` ("get") on a 1-element tensor, against a raw DEALER sending a 64-byte message to
   the echo server and awaiting the reply (p50, p99);
2. pipelined remote ops per second with 1, 16 and 256 in flight (``x + 1`` without awaiting; the
   oldest pointer is awaited when N are outstanding), against raw requests with N outstanding;
3. tensor send+get throughput at 1, 16 and 128 MiB: ``ptr = await w.send(t); back = await ptr.get()``
   against sending the same bytes (``copy=False``) to the echo server and receiving them back; the
   rate counts the bytes moved both ways (2 x size / round-trip time), in MB/s (10^6 bytes/s);
4. receive-side copies: whether the tensor returned by ``get`` is a view of the received ZeroMQ frame
   (its ``data_ptr`` lies inside the frame's buffer, captured by wrapping the client's
   ``decode_reply``), i.e. no copy beyond the one ZeroMQ makes from the socket.

A diagnostics table follows (ping round trip, op round trip with the result pointers kept alive,
client-side submit cost, pipelined gets of a 256 KiB tensor, a local memcpy of the largest size) to
help explain the ratios. The pipelined gets have no raw floor (the echo server would send twice the
bytes); they guard against replies that leave uncopied holding up the commands behind them, which
once cost ten times their rate (672 against 6,563 gets/s on the same run, `--quick`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from benchkit import (  # noqa: E402  (scripts/ is on sys.path)
    ServerDied, raw_dealer, run_raw_server, supervised, table, tidy_scratch)

RAW_PAYLOAD = 64  # bytes: about the size of a fedzmq op request header
MiB = 1 << 20
#: the tensor of the pipelined-get diagnostic: big enough that its replies leave the daemon uncopied
PIPELINED_GET_BYTES = 256 * 1024


# ---------------------------------------------------------------------------------------------------
# The raw echo server (a subprocess: this file with --raw-echo-server)


def raw_echo_server(bind: str) -> int:
    async def echo(sock: Any) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            await sock.send_multipart(frames, copy=False)  # routing id + payload, zero-copy
            # Release the payload now, not when the next message replaces it: a server that kept a
            # big payload between measurements would tax whatever the benchmark measures next
            # (bench_big.py), while a fedzmq daemon frees a deleted object at once.
            del frames

    return run_raw_server(bind, echo)


# ---------------------------------------------------------------------------------------------------
# Statistics and tables


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    return percentile(values, 0.5)


@dataclass
class Row:
    """One line of the final table. ``kind`` says how the ratio reads and how the target is checked."""

    name: str
    fz: float | None
    raw: float | None
    unit: str
    kind: str  # "latency" (ratio = fz/raw, lower is better), "rate" (ratio = fz/raw, higher is better), "text"
    target: float | None = None
    fz_text: str | None = None
    raw_text: str | None = None
    met_text: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.fz is None or not self.raw:
            return None
        return self.fz / self.raw

    @property
    def met(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        return self.ratio <= self.target if self.kind == "latency" else self.ratio >= self.target

    def cells(self) -> list[str]:
        if self.unit in ("ops/s", "MB/s"):
            fmt = lambda v: f"{v:,.0f} {self.unit}"  # noqa: E731
        elif self.unit:
            fmt = lambda v: f"{v:,.1f} {self.unit}"  # noqa: E731
        else:
            fmt = lambda v: f"{v:.2f}"  # noqa: E731
        fz = self.fz_text or (fmt(self.fz) if self.fz is not None else "-")
        raw = self.raw_text or (fmt(self.raw) if self.raw is not None else "-")
        ratio = "-"
        if self.ratio is not None:
            ratio = f"{self.ratio:.2f}x"
            if self.target is not None and f"{self.ratio:.2f}" == f"{self.target:.2f}":
                ratio = f"{self.ratio:.3f}x"  # so that a near miss does not read as the target itself
        if self.target is None:
            target = "-" if self.kind != "text" else self.extra.get("target", "-")
        else:
            target = f"<= {self.target:g}x" if self.kind == "latency" else f">= {self.target:.2f}x"
        met = self.met_text or {True: "yes", False: "NO", None: "-"}[self.met]
        return [self.name, fz, raw, ratio, target, met]


# ---------------------------------------------------------------------------------------------------
# Processes


def start_raw_echo(log_dir: str) -> Any:
    from fedzmq.launcher import DaemonProcess

    class RawEchoProcess(DaemonProcess):
        """The launcher's process handling (ready line, SIGTERM, SIGKILL fallback) for our echo server."""

        @property
        def command(self) -> list[str]:
            return [sys.executable, os.path.abspath(__file__), "--raw-echo-server", self.address or self.bind]

    proc = RawEchoProcess("raw-echo", "tcp://127.0.0.1:0", log_dir=log_dir)
    proc.spawn()
    return proc


# ---------------------------------------------------------------------------------------------------
# The raw pyzmq client


class RawClient:
    def __init__(self, ctx: Any, address: str) -> None:
        self.sock = raw_dealer(ctx, address)
        self.payload = os.urandom(RAW_PAYLOAD)

    async def roundtrip(self) -> None:
        await self.sock.send_multipart([self.payload])
        await self.sock.recv_multipart(copy=False)

    async def pipelined(self, in_flight: int, total: int) -> float:
        """Ops per second with at most ``in_flight`` requests outstanding."""
        sock, payload = self.sock, [self.payload]
        sent = received = 0
        start = time.perf_counter()
        while sent < min(in_flight, total):
            await sock.send_multipart(payload)
            sent += 1
        while received < total:
            await sock.recv_multipart(copy=False)
            received += 1
            if sent < total:
                await sock.send_multipart(payload)
                sent += 1
        return total / (time.perf_counter() - start)

    async def echo_bytes(self, buffer: Any) -> Any:
        await self.sock.send_multipart([buffer], copy=False)
        return await self.sock.recv_multipart(copy=False)

    def close(self) -> None:
        self.sock.close(linger=0)


# ---------------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class Plan:
    reps: int
    rtt_samples: int
    rtt_warmup: int
    pipe_total: dict[int, int]
    sizes_mib: tuple[int, ...]
    size_iters: dict[int, int]


QUICK = Plan(reps=5, rtt_samples=500, rtt_warmup=100, pipe_total={1: 500, 16: 2000, 256: 5000},
             sizes_mib=(1, 16, 128), size_iters={1: 10, 16: 3, 128: 1})
FULL = Plan(reps=11, rtt_samples=2000, rtt_warmup=300, pipe_total={1: 1500, 16: 6000, 256: 15000},
            sizes_mib=(1, 16, 128), size_iters={1: 30, 16: 6, 128: 2})


def say(*args: Any) -> None:
    print(*args, flush=True)


async def timed(fn: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    """Run ``fn`` n times one after the other; return each call's duration in seconds."""
    out = []
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        await fn()
        out.append(clock() - t0)
    return out


async def fz_pipelined(x: Any, in_flight: int, total: int, keep: list[Any] | None = None) -> float:
    """Ops per second with at most ``in_flight`` ops outstanding. Awaited pointers are dropped (so the
    client batches remote deletes, as in real use) unless ``keep`` is given to hold them."""
    pending: collections.deque[Any] = collections.deque()
    start = time.perf_counter()
    for _ in range(total):
        pending.append(x + 1)
        if len(pending) >= in_flight:
            done = await pending.popleft()
            if keep is not None:
                keep.append(done)
    while pending:
        done = await pending.popleft()
        if keep is not None:
            keep.append(done)
    return total / (time.perf_counter() - start)


async def fz_pipelined_gets(pointer: Any, in_flight: int, total: int) -> float:
    """``get``s per second of one stored tensor with at most ``in_flight`` outstanding: replies big enough
    to leave the daemon uncopied, which a command that changes nothing does not wait for."""
    pending: collections.deque[Any] = collections.deque()
    start = time.perf_counter()
    for _ in range(total):
        pending.append(asyncio.ensure_future(pointer.get()))
        if len(pending) >= in_flight:
            await pending.popleft()
    while pending:
        await pending.popleft()
    return total / (time.perf_counter() - start)


async def delete_kept(worker: Any, kept: list[Any]) -> None:
    """Delete held result pointers in one request (outside the timed regions)."""
    if kept:
        await worker.request("delete", {"objs": [p.id for p in kept]})
        for p in kept:
            p.mark_deleted()
        kept.clear()


async def daemon_requests(worker: Any) -> int:
    return (await worker.status(timeout=None))["requests"]


def buffer_address(buffer: Any) -> tuple[int, int]:
    import numpy as np

    array = np.frombuffer(buffer, dtype=np.uint8)
    return array.__array_interface__["data"][0], array.nbytes


async def run_benchmark(fz_address: str, raw_address: str, plan: Plan,
                        chunk_bytes: int | None = None) -> tuple[list[Row], list[Row], dict[str, Any]]:
    import torch
    import zmq.asyncio

    import fedzmq as fz
    import fedzmq.client.connection as fz_connection

    ctx = zmq.asyncio.Context.instance()
    raw = RawClient(ctx, raw_address)
    settings = fz.ConnectionSettings(limits=fz.Limits(chunk_bytes=chunk_bytes)) if chunk_bytes else None
    worker = await fz.connect(fz_address, settings=settings)
    rows: list[Row] = []
    diag: list[Row] = []
    details: dict[str, Any] = {"plan": plan.__dict__}
    try:
        # wait until the raw echo answers, too
        await asyncio.wait_for(raw.roundtrip(), 30)

        # ---- 1. round trips ---------------------------------------------------------------------
        say(f"[1/4] round trips: {plan.reps} reps x {plan.rtt_samples} samples each ...")
        x = await worker.send(torch.zeros(1))
        kept: list[Any] = []

        async def fz_op() -> None:
            await (x + 1)

        async def fz_get() -> None:
            await x.get()

        async def fz_op_kept() -> None:  # diagnostic: the result pointer stays alive, so no delete traffic
            kept.append(await (x + 1))

        async def fz_ping() -> None:
            await worker.ping(timeout=None)

        cases: dict[str, Callable[[], Awaitable[Any]]] = {
            "raw": raw.roundtrip, "op": fz_op, "get": fz_get, "op_kept": fz_op_kept, "ping": fz_ping}
        for fn in cases.values():
            await timed(fn, plan.rtt_warmup)
        await delete_kept(worker, kept)
        p50: dict[str, list[float]] = {k: [] for k in cases}
        p99: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(plan.reps):
            for name, fn in cases.items():
                samples = await timed(fn, plan.rtt_samples)
                p50[name].append(percentile(samples, 0.5) * 1e6)
                p99[name].append(percentile(samples, 0.99) * 1e6)
                await delete_kept(worker, kept)
        before = await daemon_requests(worker)
        await timed(fz_op, 500)
        op_wire = (await daemon_requests(worker) - before - 1) / 500
        rtt = {k: (median(p50[k]), median(p99[k])) for k in cases}
        details["rtt_us"] = {k: {"p50_reps": p50[k], "p99_reps": p99[k]} for k in cases}
        rows += [
            Row("tiny op round trip p50 (await (x + 1))", rtt["op"][0], rtt["raw"][0], "us", "latency", 2.0),
            Row("tiny op round trip p99", rtt["op"][1], rtt["raw"][1], "us", "latency"),
            Row("1-element get round trip p50 (await x.get())", rtt["get"][0], rtt["raw"][0], "us", "latency", 2.0),
            Row("1-element get round trip p99", rtt["get"][1], rtt["raw"][1], "us", "latency"),
        ]
        diag += [
            Row("ping round trip p50 (control path: no session queue, no torch)", rtt["ping"][0], rtt["raw"][0], "us", "latency"),
            Row("op round trip p50, result pointers kept alive (no delete traffic)", rtt["op_kept"][0], rtt["raw"][0], "us", "latency"),
            Row("requests the daemon received per awaited op (await (x + 1) loop)", op_wire, 1.0, "", "latency"),
        ]

        # ---- 2. pipelined ops -------------------------------------------------------------------
        say(f"[2/4] pipelined ops: in flight {sorted(plan.pipe_total)}, {plan.reps} reps ...")
        await fz_pipelined(x, 16, 500)  # warm-up
        await raw.pipelined(16, 500)
        for n, total in sorted(plan.pipe_total.items()):
            fz_rates, raw_rates = [], []
            for _ in range(plan.reps):
                raw_rates.append(await raw.pipelined(n, total))
                fz_rates.append(await fz_pipelined(x, n, total))
                gc.collect()
            details[f"pipelined_{n}"] = {"fz_ops_per_s": fz_rates, "raw_ops_per_s": raw_rates}
            rows.append(Row(f"pipelined ops/s, {n} in flight", median(fz_rates), median(raw_rates), "ops/s", "rate",
                            1 / 3))
        # diagnostics: wire requests per pipelined op, and the rate with result pointers kept alive
        n_diag = max(plan.pipe_total)
        before = await daemon_requests(worker)
        await fz_pipelined(x, n_diag, plan.pipe_total[n_diag])
        await asyncio.sleep(0.05)
        pipe_wire = (await daemon_requests(worker) - before - 1) / plan.pipe_total[n_diag]
        kept_rates, dropped_rates, raw_rates = [], [], []
        for _ in range(plan.reps):
            raw_rates.append(await raw.pipelined(n_diag, plan.pipe_total[n_diag]))
            dropped_rates.append(await fz_pipelined(x, n_diag, plan.pipe_total[n_diag]))
            kept_rates.append(await fz_pipelined(x, n_diag, plan.pipe_total[n_diag], kept))
            await delete_kept(worker, kept)
            gc.collect()
        details["pipelined_diag"] = {"in_flight": n_diag, "kept": kept_rates, "dropped": dropped_rates, "raw": raw_rates}
        diag += [
            Row(f"requests the daemon received per pipelined op ({n_diag} in flight)", pipe_wire, 1.0, "", "latency"),
            Row(f"pipelined ops/s, {n_diag} in flight, result pointers kept alive", median(kept_rates),
                median(raw_rates), "ops/s", "rate"),
            Row(f"pipelined ops/s, {n_diag} in flight, pointers dropped (same blocks)", median(dropped_rates),
                median(raw_rates), "ops/s", "rate"),
        ]
        # diagnostic: what issuing one op costs the client (encode + send), without waiting
        submit_costs = []
        for _ in range(plan.reps):
            start = time.perf_counter()
            batch = [x + 1 for _ in range(2000)]
            submit_costs.append((time.perf_counter() - start) / len(batch) * 1e6)
            for ptr in batch:
                await ptr
            del batch
        diag.append(Row("client cost of issuing one op (x + 1, not awaited)", median(submit_costs), None, "us", "latency"))
        # diagnostic: pipelined gets of a 256 KiB tensor, whose replies leave the daemon uncopied. A guard
        # against commands waiting for each other's replies (none here: a get changes nothing). No raw
        # floor: the raw echo server sends back what it gets, twice the bytes of a get
        big = await worker.send(torch.zeros(PIPELINED_GET_BYTES // 4))
        await fz_pipelined_gets(big, 16, 50)  # warm-up
        get_rates = [await fz_pipelined_gets(big, 16, 200) for _ in range(plan.reps)]
        await big.delete()
        details["pipelined_gets"] = {"bytes": PIPELINED_GET_BYTES, "fz_gets_per_s": get_rates}
        diag.append(Row(f"pipelined gets of a {PIPELINED_GET_BYTES // 1024} KiB tensor, 16 in flight",
                        median(get_rates), None, "ops/s", "rate"))
        await asyncio.sleep(0.05)  # let the batched deletes go out

        # ---- 3 & 4. throughput and copies -------------------------------------------------------
        say(f"[3/4] tensor send+get at {', '.join(f'{s} MiB' for s in plan.sizes_mib)}, {plan.reps} reps ...")
        frames_seen: list[list[tuple[int, int]]] = []
        original_decode = fz_connection.decode_reply

        def spying_decode(frames: Any, limits: Any) -> Any:
            frames_seen.append([buffer_address(f.buffer if hasattr(f, "buffer") else f) for f in frames[1:]])
            return original_decode(frames, limits)

        copies: dict[int, dict[str, Any]] = {}
        for size in plan.sizes_mib:
            nbytes = size * MiB
            generator = torch.Generator().manual_seed(size)
            t = torch.randn(nbytes // 4, generator=generator)
            raw_buffer = memoryview(t.numpy()).cast("B")

            # correctness, and the copy check (4): is `back` a view of a received frame?
            fz_connection.decode_reply = spying_decode
            try:
                frames_seen.clear()
                ptr = await worker.send(t)
                back = await ptr.get()
            finally:
                fz_connection.decode_reply = original_decode
            exact = back.shape == t.shape and back.dtype == t.dtype and torch.equal(back.view(torch.int32), t.view(torch.int32))
            if not exact:
                raise AssertionError(f"fedzmq send+get of {size} MiB is not bit-exact")
            raw_back = await raw.echo_bytes(raw_buffer)
            if raw_back[0].buffer != raw_buffer:
                raise AssertionError(f"raw echo of {size} MiB came back different")
            ptr_addr = back.data_ptr()
            tensor_frames = [f for msg in frames_seen for f in msg if f[1] >= 1024]
            inside = [f for f in tensor_frames if f[0] <= ptr_addr and ptr_addr + nbytes <= f[0] + f[1]]
            copies[size] = {
                "bit_exact": exact,
                "tensor_frames_received": len(tensor_frames),
                "frame_bytes": [f[1] for f in tensor_frames],
                "shares_frame_memory": bool(inside),
                # None: the spy saw no tensor frame (the client no longer calls decode_reply by that name)
                "extra_copies_after_zmq": (0 if inside else 1) if tensor_frames else None,
            }
            await ptr.delete()
            del ptr, back, raw_back

            # throughput
            fz_times: list[float] = []
            raw_times: list[float] = []
            for rep in range(plan.reps + 1):  # the first rep is a warm-up
                t_raw, t_fz = [], []
                for _ in range(plan.size_iters[size]):
                    start = time.perf_counter()
                    echoed = await raw.echo_bytes(raw_buffer)
                    t_raw.append(time.perf_counter() - start)
                    del echoed
                for _ in range(plan.size_iters[size]):
                    start = time.perf_counter()
                    ptr = await worker.send(t)
                    back = await ptr.get()
                    t_fz.append(time.perf_counter() - start)
                    await ptr.delete()
                    del ptr, back
                if rep:
                    raw_times += t_raw
                    fz_times += t_fz
                gc.collect()
            fz_rate = 2 * nbytes / median(fz_times) / 1e6
            raw_rate = 2 * nbytes / median(raw_times) / 1e6
            details[f"throughput_{size}MiB"] = {"fz_seconds": fz_times, "raw_seconds": raw_times}
            rows.append(Row(f"send+get {size} MiB (2 x size / round trip)", fz_rate, raw_rate, "MB/s", "rate",
                            0.70 if size == max(plan.sizes_mib) else None))
            if size == max(plan.sizes_mib):
                local = torch.empty_like(t)
                warm, fresh = [], []
                for _ in range(3):
                    start = time.perf_counter()
                    local.copy_(t)
                    warm.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    torch.empty_like(t).copy_(t)  # new memory: includes the page faults of first touch
                    fresh.append(time.perf_counter() - start)
                del local
                diag += [
                    Row(f"local copy of {size} MiB into reused memory (torch copy_)", median(warm) * 1e3, None, "ms", "latency"),
                    Row(f"local copy of {size} MiB into fresh memory (torch.empty + copy_)", median(fresh) * 1e3, None,
                        "ms", "latency"),
                ]
                diag.append(Row(f"send+get {size} MiB round trip", median(fz_times) * 1e3, median(raw_times) * 1e3,
                                "ms", "latency"))
            del t, raw_buffer
            gc.collect()

        say("[4/4] receive-side copies (from the first send+get of each size) ...")
        for size, info in copies.items():
            extra = info["extra_copies_after_zmq"]
            if extra is None:
                text, met = "not observed (no frames captured)", "?"
            elif extra == 0:
                text, met = "1 copy (view of the received frame)", "yes"
            else:
                text, met = f"2 copies (assembled from {info['tensor_frames_received']} frames)", "NO"
            rows.append(Row(f"receive copies, get of {size} MiB", None, None, "", "text", fz_text=text,
                            raw_text="1 copy (zmq frame)", met_text=met, extra={"target": "<= 1 copy"}))
        details["copies"] = copies
    finally:
        raw.close()
        await worker.close()
    return rows, diag, details


def print_report(rows: list[Row], diag: list[Row], machine: str) -> str:
    headers = ["measurement", "fedzmq", "raw pyzmq", "ratio", "target", "met?"]
    out = [f"\nfedzmq vs raw pyzmq, loopback tcp, servers in subprocesses ({machine})", "",
           table(headers, [r.cells() for r in rows]), "",
           "ratio = fedzmq / raw: lower is better for round trips (us), higher is better for ops/s and MB/s.", "",
           "Diagnostics", "", table(headers, [r.cells() for r in diag])]
    text = "\n".join(out)
    print(text, flush=True)
    return text


def machine_line() -> str:
    import platform

    import torch
    import zmq

    import fedzmq

    return (f"fedzmq {fedzmq.__version__}{code_state()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}")


def code_state() -> str:
    """Which library code was measured: the git commit, and whether fedzmq/ had uncommitted changes."""
    import subprocess

    import fedzmq

    root = os.path.dirname(os.path.dirname(os.path.abspath(fedzmq.__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "fedzmq"], capture_output=True,
                                 text=True, timeout=5, check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f" (git {head}" + (f" + uncommitted changes in {len(changed)} files of fedzmq/)" if changed else ")")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short run (well under a minute)")
    p.add_argument("--json", metavar="PATH", help="also write every sample and result as JSON here")
    p.add_argument("--chunk-bytes", type=int, metavar="N",
                   help="what-if: stream tensors above N bytes in chunks of N (daemon and client; default: the "
                        "library's Limits.chunk_bytes, 64 MiB)")
    p.add_argument("--raw-echo-server", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.raw_echo_server:
        return raw_echo_server(args.raw_echo_server)

    import tempfile

    from fedzmq.launcher import DaemonProcess, stop_all

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    plan = QUICK if args.quick else FULL
    started = time.monotonic()
    load_before = os.getloadavg()[0]  # 1-minute load: other work on the machine skews the numbers
    log_dir = tempfile.mkdtemp(prefix="fedzmq-bench-")
    ok = False
    processes: list[DaemonProcess] = []
    try:
        say("starting the fedzmq worker daemon and the raw echo server ...")
        echo = start_raw_echo(log_dir)
        processes.append(echo)
        extra = ["--chunk-bytes", str(args.chunk_bytes)] if args.chunk_bytes else []
        daemon = DaemonProcess("bench", "tcp://127.0.0.1:0", extra, log_dir=log_dir)
        processes.append(daemon)
        daemon.spawn()
        raw_address = echo.wait_ready(30.0)
        fz_address = daemon.wait_ready(60.0)
        say(f"fedzmq daemon pid {daemon.pid} at {fz_address}; raw echo pid {echo.pid} at {raw_address}")
        rows, diag, details = asyncio.run(
            supervised(run_benchmark(fz_address, raw_address, plan, args.chunk_bytes), processes))
        machine = (machine_line() + (f", chunk_bytes={args.chunk_bytes}" if args.chunk_bytes else "")
                   + f"; load average before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f}")
        text = print_report(rows, diag, machine)
        elapsed = time.monotonic() - started
        say(f"\n{'quick' if args.quick else 'full'} run took {elapsed:.0f} s")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": machine, "mode": "quick" if args.quick else "full", "seconds": elapsed,
                           "rows": [dict(zip(["measurement", "fedzmq", "raw", "ratio", "target", "met"], r.cells()))
                                    for r in rows + diag],
                           "details": details, "table": text}, f, indent=1, default=str)
        ok = True
        return 0
    except KeyboardInterrupt:
        say("\ninterrupted: stopping the servers")
        return 130
    except ServerDied as exc:
        say(f"\nerror: {exc}")
        return 1
    finally:
        codes = stop_all(processes)
        bad = {k: v for k, v in codes.items() if v not in (0, -signal.SIGTERM)}
        if bad:
            say(f"warning: servers exited with {bad}; logs in {log_dir}")
        tidy_scratch(log_dir, ok and not bad)


if __name__ == "__main__":
    sys.exit(main())
