"""Pieces the benchmark scripts share: supervising server subprocesses, and markdown tables."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Sequence


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


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table with aligned columns."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
