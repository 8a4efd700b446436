#!/usr/bin/env python
"""Page faults and CPU time of every process, phase by phase, of fedzmq send+get and a raw pyzmq echo.

    python scripts/probe_faults.py                          # 1 GiB, the sides in turn: f f r r f r f r
    python scripts/probe_faults.py --gib 4 --sequence ffrr

Wall time alone cannot tell a transfer that touched more fresh memory from one whose every touch cost
more. On this VM the cost of a page fault depends on how much memory the whole machine has in use, so
the difference matters. For each phase (fedzmq's send, its get, one raw echo round trip) this prints
the wall time, and the minor page faults and CPU seconds of the client, the daemon and the raw echo
server, with the machine's free memory when the phase began. It is how the alternating penalty of
``bench_big.py`` was traced to the raw servers' leftover payloads (docs/benchmarks_big.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import zmq
import zmq.asyncio

import fedzmq as fz
from fedzmq.launcher import start_daemons, stop_all

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_big import GIB, check_reply, raw_round_trip  # noqa: E402  (scripts/ is on sys.path)


def free_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemFree:"):
                return int(line.split()[1]) / (1 << 20)
    return float("nan")


def faults_and_cpu(pid: int | None) -> tuple[int, float]:
    """Minor page faults and CPU seconds (user + system) of a process so far; None: this process."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_minflt, usage.ru_utime + usage.ru_stime
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[7]), (int(fields[11]) + int(fields[12])) / ticks


@contextlib.contextmanager
def phase(label: str, processes: dict[str, int | None]) -> Iterator[None]:
    """Print one row: the wall time of the block, and each process's faults and CPU seconds in it."""
    free = free_gib()
    before = {name: faults_and_cpu(pid) for name, pid in processes.items()}
    started = time.perf_counter()
    yield
    wall = time.perf_counter() - started
    cells = []
    for name, pid in processes.items():
        faults, cpu = faults_and_cpu(pid)
        cells += [f"{faults - before[name][0]:,}", f"{cpu - before[name][1]:.2f}"]
    print(f"| {label} | {wall:.3f} | {free:.1f} | " + " | ".join(cells) + " |", flush=True)


async def probe(nbytes: int, sequence: str, settle: float) -> None:
    tensor = torch.empty(nbytes, dtype=torch.uint8)
    tensor.random_(0, 255)
    [daemon] = start_daemons(["probe"])
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as spare:
        address = f"tcp://127.0.0.1:{spare.bind_to_random_port('tcp://127.0.0.1')}"
    echo = subprocess.Popen([sys.executable, str(HERE / "bench_core.py"), "--raw-echo-server", address],
                            stdout=subprocess.PIPE, text=True)
    try:
        if "ready" not in (echo.stdout.readline() if echo.stdout else ""):
            raise RuntimeError("the raw echo server exited before it was ready")
        processes = {"client": None, "daemon": daemon.pid, "raw echo server": echo.pid}
        print("| phase | wall s | free GiB | " + " | ".join(f"{n} faults | {n} CPU s" for n in processes) + " |")
        print("|---|---|---|" + "---|---|" * len(processes))
        raw = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        raw.connect(address)
        async with fz.connect(daemon.address) as worker:
            for side in sequence:
                await asyncio.sleep(settle)
                if side == "f":
                    with phase("fedzmq send", processes):
                        pointer = await worker.send(tensor)
                    with phase("fedzmq get", processes):
                        back = await pointer.get()
                    del back
                    await pointer.delete()
                else:
                    with phase("raw echo", processes):
                        reply = await raw_round_trip(raw, memoryview(tensor.numpy()))
                    check_reply(reply, nbytes)
                    del reply
        raw.close(linger=0)
    finally:
        echo.terminate()
        echo.wait(10)
        stop_all([daemon])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0, help="tensor size in GiB")
    p.add_argument("--sequence", default="ffrrfrfr", help="f: a fedzmq send+get, r: a raw echo, in this order")
    p.add_argument("--settle", type=float, default=3.0, help="seconds of quiet before each f or r")
    args = p.parse_args()
    if set(args.sequence) - {"f", "r"}:
        p.error("--sequence takes only the letters f and r")
    torch.set_num_threads(1)
    asyncio.run(probe(int(args.gib * GIB), args.sequence, args.settle))
    return 0


if __name__ == "__main__":
    sys.exit(main())
