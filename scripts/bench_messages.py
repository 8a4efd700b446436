#!/usr/bin/env python
"""The per-message cost under every round, against a raw asyncio DEALER -> ROUTER echo in the same run.

    python scripts/bench_messages.py             # 11 interleaved repetitions (about a minute)
    python scripts/bench_messages.py --reps 5    # shorter
    python scripts/bench_messages.py --profile client.prof   # also cProfile the client side of op+get
    python scripts/bench_messages.py --reps 1 --py-spy daemon.txt   # and py-spy the daemon (collapsed stacks)

Measured, one ``fedzmq-worker`` daemon and one raw echo server (``bench_core.py --raw-echo-server``: a
``zmq.asyncio`` ROUTER sending every message back as it came) as subprocesses on loopback tcp, both
talked to from this process's one event loop:

* **op+get**: ``await (x + 1).get()`` on a 16-element float32 tensor ``x`` already on the daemon: the
  op returns a pointer at once, and the ``get`` asked for in the same pass joins it: one command and
  one round trip (docs/protocol.md, ``op``'s ``fetch``). Against one raw round trip of a 64-byte
  message (the tensor's bytes). Goal: <= 2x.
* **ping**: ``await worker.ping()`` against the same raw round trip (the protocol's floor).
* **pipelined**: 2,000 ``x + 1`` issued without awaiting, then all awaited; ops/s against raw sending
  2,000 64-byte messages, then receiving the 2,000 echoes (messages/s). Goal: >= 1/3 of raw.

Blocks of fedzmq and raw alternate (raw, fedzmq, raw, ...) so the load of a shared machine falls on
both alike; round trips are the median of each block's median, rates the median of the blocks.

A second table gives the CPU per call of both ends (this process with its ZeroMQ I/O thread, and the
daemon or the raw echo server, from ``/proc``), summed over the timed blocks: on a shared machine, and
under a virtual machine's CPU steal, the CPU each side spends moves far less than wall time does. Its
last two rows give the same per message of the pipelined bursts: a burst's rate is bound by its busier
end, which for fedzmq is the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import sys
import tempfile
import time
from typing import Any, Awaitable, Callable

from benchkit import ServerDied, raw_dealer, supervised, table, tidy_scratch  # scripts/ is on sys.path
from bench_core import start_raw_echo
from bench_federated import machine_line

PIPELINED = 2000
SAMPLES = 400  # round trips per block


def say(*args: Any) -> None:
    print(*args, flush=True)


async def timed(fn: Callable[[], Awaitable[Any]], n: int) -> float:
    """Median seconds of ``n`` calls one after the other."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def process_cpu(pid: int) -> float:
    """CPU seconds a process has used, all its threads (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


class CpuPerCall:
    """CPU per call of this process and of the peer it talks to, summed over blocks of calls: a shared
    machine's load and CPU steal move wall times far more than the CPU each side spends."""

    def __init__(self) -> None:
        self.calls = 0
        self.client = 0.0
        self.server = 0.0

    async def measure(self, fn: Callable[[], Awaitable[Any]], n: int, server_pid: int) -> float:
        c0, s0 = time.process_time(), process_cpu(server_pid)
        median = await timed(fn, n)
        self.client += time.process_time() - c0
        self.server += process_cpu(server_pid) - s0
        self.calls += n
        return median

    async def measure_burst(self, burst: Callable[[], Awaitable[float]], n: int, server_pid: int) -> float:
        """``burst()`` (``n`` messages or ops; it returns its rate) with its CPU counted per message."""
        c0, s0 = time.process_time(), process_cpu(server_pid)
        rate = await burst()
        self.client += time.process_time() - c0
        self.server += process_cpu(server_pid) - s0
        self.calls += n
        return rate

    def us(self) -> tuple[float, float]:
        return self.client / self.calls * 1e6, self.server / self.calls * 1e6


async def run(fz_address: str, raw_address: str, reps: int, profile: str | None, pids: tuple[int, int],
              py_spy: tuple[int, str] | None = None) -> tuple[list[list[str]], list[list[str]]]:
    """The wall-time table and the CPU table; ``pids``: the daemon's and the raw echo server's."""
    import torch
    import zmq.asyncio

    import fedzmq as fz

    ctx = zmq.asyncio.Context.instance()
    sock = raw_dealer(ctx, raw_address)
    payload = [os.urandom(64)]
    worker = await fz.connect(fz_address)
    try:
        x = await worker.send(torch.arange(16, dtype=torch.float32))

        async def raw_rtt() -> None:
            await sock.send_multipart(payload)
            await sock.recv_multipart(copy=False)

        async def raw_pipelined() -> float:
            t0 = time.perf_counter()
            for _ in range(PIPELINED):
                await sock.send_multipart(payload)
            for _ in range(PIPELINED):
                await sock.recv_multipart(copy=False)
            return PIPELINED / (time.perf_counter() - t0)

        async def op_get() -> None:
            await (x + 1).get()

        async def ping() -> None:
            await worker.ping()

        async def fz_pipelined() -> float:
            t0 = time.perf_counter()
            pending = [x + 1 for _ in range(PIPELINED)]
            for p in pending:
                await p
            rate = PIPELINED / (time.perf_counter() - t0)
            del pending
            await worker.ping()  # the dropped pointers' deletes go out before the next block
            return rate

        expected = torch.arange(16, dtype=torch.float32) + 1
        if not torch.equal(await (x + 1).get(), expected):
            raise RuntimeError("op+get returned a wrong value")
        for fn in (raw_rtt, op_get, ping):  # warm-up
            await timed(fn, 200)
        await raw_pipelined()
        await fz_pipelined()
        if profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
            await timed(op_get, 3000)
            prof.disable()
            prof.dump_stats(profile)
            say(f"client profile of 3000 op+get written to {profile}")
        if py_spy:  # 15 s of op+get while py-spy samples the daemon (pip install py-spy)
            pid, path = py_spy
            spy = await asyncio.create_subprocess_exec(
                "py-spy", "record", "-p", str(pid), "-d", "15", "-r", "500", "--format", "raw", "-o", path,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            count = 0
            while spy.returncode is None:
                await timed(op_get, 200)
                count += 200
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(spy.wait(), 0.001)
            say(f"daemon stacks of {count} op+get written to {path} (py-spy exit {spy.returncode})")
        res: dict[str, list[float]] = {k: [] for k in ("raw", "op_get", "ping", "raw_pipe", "fz_pipe")}
        cpu = {k: CpuPerCall() for k in ("raw", "op_get", "ping", "raw_pipe", "fz_pipe")}
        daemon_pid, raw_pid = pids
        for rep in range(reps):
            res["raw"].append(await cpu["raw"].measure(raw_rtt, SAMPLES, raw_pid))
            res["op_get"].append(await cpu["op_get"].measure(op_get, SAMPLES, daemon_pid))
            res["raw"].append(await cpu["raw"].measure(raw_rtt, SAMPLES, raw_pid))
            res["ping"].append(await cpu["ping"].measure(ping, SAMPLES, daemon_pid))
            fz_block = cpu["fz_pipe"].measure_burst(fz_pipelined, PIPELINED, daemon_pid)
            raw_block = cpu["raw_pipe"].measure_burst(raw_pipelined, PIPELINED, raw_pid)
            first, second = ("fz_pipe", fz_block), ("raw_pipe", raw_block)
            for key, block in (first, second) if rep % 2 else (second, first):
                res[key].append(await block)
        m = {k: statistics.median(v) for k, v in res.items()}
        pipe = m["fz_pipe"] / m["raw_pipe"]
        raw_client, raw_server = cpu["raw"].us()
        cpu_rows = []
        for key, what in (("raw", "raw round trip (64 bytes)"), ("op_get", "op+get"), ("ping", "ping")):
            client, server = cpu[key].us()
            cpu_rows.append([what, f"{client:.0f}", f"{server:.0f}", f"{client + server:.0f}",
                             f"{(client + server) / (raw_client + raw_server):.2f}x"])
        # a burst's rate is bound by its busier end: each end's CPU per message, against raw's
        raw_client, raw_server = cpu["raw_pipe"].us()
        for key, what in (("raw_pipe", f"raw, per message of {PIPELINED} pipelined"),
                          ("fz_pipe", f"fedzmq, per op of {PIPELINED} pipelined")):
            client, server = cpu[key].us()
            cpu_rows.append([what, f"{client:.0f}", f"{server:.0f}", f"{client + server:.0f}",
                             f"{(client + server) / (raw_client + raw_server):.2f}x"])
        return cpu_rows, [
            ["op+get, 16 floats (await (x + 1).get())", f"{m['op_get'] * 1e6:.0f} us", f"{m['raw'] * 1e6:.0f} us",
             f"{m['op_get'] / m['raw']:.2f}x", "<= 2x", "yes" if m["op_get"] / m["raw"] <= 2 else "NO"],
            ["ping (await worker.ping())", f"{m['ping'] * 1e6:.0f} us", f"{m['raw'] * 1e6:.0f} us",
             f"{m['ping'] / m['raw']:.2f}x", "-", "-"],
            [f"{PIPELINED} pipelined x + 1", f"{m['fz_pipe']:,.0f} ops/s", f"{m['raw_pipe']:,.0f} msg/s",
             f"{pipe:.2f}x", ">= 0.33x", "yes" if pipe >= 1 / 3 else "NO"],
        ]
    finally:
        await worker.close()
        sock.close(linger=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--profile", metavar="PATH", help="cProfile 3000 op+get on the client side into PATH")
    p.add_argument("--py-spy", metavar="PATH", help="py-spy the daemon during 15 s of op+get (raw stacks to PATH)")
    args = p.parse_args(argv)

    from fedzmq.launcher import DaemonProcess, stop_all

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    load_before = os.getloadavg()[0]
    log_dir = tempfile.mkdtemp(prefix="fedzmq-bench-msg-")
    ok = False
    processes: list[Any] = []
    try:
        raw = start_raw_echo(log_dir)
        processes.append(raw)
        daemon = DaemonProcess("w0", "tcp://127.0.0.1:0", [], log_dir)  # start_daemons, with a longer wait
        processes.append(daemon)
        daemon.spawn()
        daemon.wait_ready(600.0)  # (importing torch takes minutes on a machine at load 20)
        raw_address = raw.wait_ready(600.0)
        spy = (processes[1].pid, args.py_spy) if args.py_spy else None
        cpu_rows, rows = asyncio.run(supervised(run(processes[1].address, raw_address, args.reps, args.profile,
                                                    (processes[1].pid or 0, processes[0].pid or 0), spy), processes))
        say("\n" + table(["what", "fedzmq", "raw pyzmq", "ratio", "goal", "met"], rows) + "\n")
        say("CPU per call, summed over the timed blocks (this process with its I/O thread; the server: the "
            "daemon or the raw echo server, all threads):\n")
        say(table(["call", "client CPU us", "server CPU us", "both us", "both / raw"], cpu_rows) + "\n")
        say(f"{machine_line()}; {args.reps} interleaved repetitions; 1-min load average before/after: "
            f"{load_before:.1f}/{os.getloadavg()[0]:.1f}")
        ok = True
        return 0
    except KeyboardInterrupt:
        return 130
    except ServerDied as exc:
        say(f"error: {exc}")
        return 1
    finally:
        stop_all(processes)
        tidy_scratch(log_dir, ok)


if __name__ == "__main__":
    sys.exit(main())
