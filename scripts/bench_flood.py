#!/usr/bin/env python
"""An honest client's op+get while another peer floods the daemon from many sessions.

    python scripts/bench_flood.py                    # 8 and 32 flooding sessions, single and batched
    python scripts/bench_flood.py --sessions 32 --batched

A ``fedzmq-worker`` daemon runs as a subprocess on loopback tcp. A flooding process (this file re-run
as ``--flood``) opens K sessions with raw DEALER sockets and keeps 256 cheap commands (``info``) in
flight in each, sent one per message or in batches of 64 (docs/protocol.md, section 3). Meanwhile this
process times 100 ``await (x + 1).get()`` of an honest client on its own connection, 10 ms apart, and
prints the median, the 90th percentile and the worst. It measures what docs/security.md ("Bounded
work") promises: a flood delays the others by a pass of the event loop, not by the whole flood.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time

IN_FLIGHT = 256
BATCH = 64


def flood(address: str, sessions: int, seconds: float, batched: bool) -> None:
    """Keep ``IN_FLIGHT`` info commands in flight in each of ``sessions`` sessions."""
    import torch
    import zmq

    from fedzmq.codec import Limits, encode_batch, encode_request, is_batch, split_batch

    context = zmq.Context()
    sockets = []
    for _ in range(sessions):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        sock.send_multipart(encode_request(1, "store", {"out": 1, "value": torch.zeros(64)}))
        sock.recv_multipart()
        sockets.append(sock)
    poller = zmq.Poller()
    for sock in sockets:
        poller.register(sock, zmq.POLLIN)
    outstanding, request_id, end = [0] * sessions, 10, time.time() + seconds
    while time.time() < end:
        for k, sock in enumerate(sockets):
            if outstanding[k] < IN_FLIGHT:
                messages = []
                for _ in range(BATCH):
                    request_id += 1
                    messages.append(encode_request(request_id, "info", {"obj": 1}))
                if batched:
                    sock.send_multipart(encode_batch(messages))
                else:
                    for message in messages:
                        sock.send_multipart(message)
                outstanding[k] += BATCH
        for sock, _ in poller.poll(5):
            k = sockets.index(sock)
            while sock.poll(0):
                frames = sock.recv_multipart()
                outstanding[k] -= len(split_batch(frames, Limits())) if is_batch(frames) else 1
    context.destroy(linger=0)


async def honest(address: str) -> list[float]:
    import torch

    import fedzmq as fz

    async with fz.connect(address) as worker:
        x = await worker.send(torch.arange(8.0))
        latencies = []
        for _ in range(100):
            started = time.perf_counter()
            await (x + 1).get()
            latencies.append((time.perf_counter() - started) * 1e3)
            await asyncio.sleep(0.01)
    return sorted(latencies)


def one_run(sessions: int, batched: bool) -> list[str]:
    from fedzmq.launcher import DaemonProcess

    with tempfile.TemporaryDirectory() as logs:
        daemon = DaemonProcess("bob", log_dir=logs)
        address = daemon.start()
        try:
            flooding = subprocess.Popen([sys.executable, __file__, "--flood", address, str(sessions),
                                         "6", "1" if batched else "0"])
            time.sleep(1.5)  # the flood fills the daemon first
            latencies = asyncio.run(honest(address))
            flooding.wait(timeout=60)
        finally:
            daemon.stop()
    return [str(sessions), "batches of 64" if batched else "one per message",
            f"{latencies[50]:.1f}", f"{latencies[90]:.1f}", f"{latencies[-1]:.1f}"]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--flood":
        flood(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5] == "1")
        return 0
    from benchkit import table  # scripts/ is on sys.path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, action="append", help="flooding sessions (default: 8 and 32)")
    parser.add_argument("--batched", action="store_true", help="only the flood in batches")
    args = parser.parse_args()
    rows = [one_run(k, batched) for k in args.sessions or [8, 32]
            for batched in ([True] if args.batched else [False, True])]
    print()
    print(table(["flooding sessions", "flood sent as", "honest op+get p50 ms", "p90 ms", "worst ms"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
