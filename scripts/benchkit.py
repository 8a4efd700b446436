"""Pieces the benchmark scripts share: supervising server subprocesses, and markdown tables."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from typing import Any, Awaitable, Callable, Sequence


class ServerDied(RuntimeError):
    """A server subprocess exited while the benchmark was running."""


async def supervised(work: Awaitable[Any], processes: Sequence[Any]) -> Any:
    """Run ``work``, but stop it (running its cleanup) if a server process dies, instead of waiting
    forever for replies that will not come. ``processes`` are ``fedzmq.launcher.DaemonProcess``-like."""
    main_task = asyncio.ensure_future(work)

    async def watch() -> Any:
        while True:
            await asyncio.sleep(0.5)
            for proc in processes:
                if not proc.running:
                    return proc

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.wait({main_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if main_task.done():
            return main_task.result()
        dead = watcher.result()
        raise ServerDied(f"{dead.id} (pid {dead.pid}) exited with code {dead.process.returncode} during the run; "
                         f"log tail:\n{dead.log_tail()}")
    finally:
        for task in (watcher, main_task):
            if not task.done():
                task.cancel()
        await asyncio.gather(watcher, main_task, return_exceptions=True)


def tidy_scratch(path: str, ok: bool) -> None:
    """Remove a run's scratch folder (daemons' logs, generated datasets: a simulation's are tens of MB) once
    its servers have stopped, if the run went well; after a failure keep it, and say where, for the logs."""
    if ok:
        shutil.rmtree(path, ignore_errors=True)
    else:
        print(f"logs kept in {path}", file=sys.stderr)


def raw_dealer(ctx: Any, address: str) -> Any:
    """The raw pyzmq baseline's client socket: a DEALER with the daemon's settings (no HWM, no linger)."""
    import zmq

    sock = ctx.socket(zmq.DEALER)
    for opt, value in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0)):
        sock.setsockopt(opt, value)
    sock.connect(address)
    return sock


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table with aligned columns."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def run_raw_server(bind: str, serve_loop: Callable[[Any], Awaitable[None]]) -> int:
    """Run a raw pyzmq ROUTER (the baseline of a benchmark) in this process until SIGTERM/SIGINT, or
    until the benchmark that started it dies. ``serve_loop(socket)`` answers the messages."""
    import zmq
    import zmq.asyncio

    async def serve() -> None:
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.ROUTER)
        for opt, value in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0)):
            sock.setsockopt(opt, value)
        sock.bind(bind)
        address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        parent = os.getppid()

        async def orphan_watch() -> None:  # exit if the benchmark died without stopping us
            while os.getppid() == parent:
                await asyncio.sleep(1.0)
            stop.set()

        tasks = [asyncio.create_task(serve_loop(sock)), asyncio.create_task(orphan_watch())]
        print(f"raw-echo ready at {address}", flush=True)
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        sock.close(linger=0)
        ctx.term()

    asyncio.run(serve())
    return 0
