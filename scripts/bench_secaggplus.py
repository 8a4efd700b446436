"""SecAgg+ benchmark (issue 17): a secure round against a plain round of the same hosted clients, and the
cost per client of the protocol itself as n grows.

Part A -- hosted clients. ``n`` clients (``fedzmq.examples.population``, about 10^4 parameters) hosted by
two real daemons (``--clients-from``), as ``fedzmq simulate`` runs them. For each n: a warm-up plain
FedAvg round, then a timed plain round and a timed secure round (``SecAgg(FedAvg(), clip=...)`` with
``degree=None``: ``choose_parameters(n)``), then the same two rounds again under tracemalloc for the
coordinator's peak of Python allocations in the round. ``ru_maxrss`` is the coordinator process's peak
RSS after each step (it only grows). The plain round is the floor: results are stated as ratios to it,
measured in the same run on the same clients. At n = 100 the secure round also runs on the complete
graph (Bonawitz et al.), for comparison.

Part B -- the protocol alone (``fedzmq.secagg.run_round``, in process, no transport, vectors of
``--length`` values): CPU seconds of a whole round, all clients and the server, for n = 50, 100, 500,
1000, divided by ``n * k``; and the entries (keys, ids, ciphertexts) the busiest client receives. With
``k = O(log n)`` the first stays roughly flat and the second grows with ``k``, not ``n``.

    python scripts/bench_secaggplus.py              # both parts, n = 100 and 1000 (several minutes)
    python scripts/bench_secaggplus.py --clients 100 --sizes 50 100
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import table  # noqa: E402

import fedzmq as fz  # noqa: E402
from fedzmq.client.worker import RemoteWorker  # noqa: E402
from fedzmq.examples import population  # noqa: E402
from fedzmq.federated.secure import SecAgg  # noqa: E402
from fedzmq.launcher import start_daemons, stop_all  # noqa: E402
from fedzmq.secagg import SecAggConfig, choose_parameters, run_round  # noqa: E402


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


async def timed_round(federation: fz.Federation, traced: bool) -> tuple[float, float, Any]:
    """Seconds of one round, and the coordinator's peak of traced allocations in it (MB; 0 if not traced)."""
    gc.collect()
    if traced:
        tracemalloc.start()
        tracemalloc.reset_peak()
    started = time.perf_counter()
    metrics = await federation.run_round()
    seconds = time.perf_counter() - started
    peak = 0.0
    if traced:
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return seconds, peak, metrics


async def part_a_size(n: int, root: Path, steps: int, complete_too: bool, trace: bool) -> list[list[str]]:
    data = population.prepare(root / f"data{n}", n, 2, seed=0)
    ids = [f"plus{n}-{k}" for k in range(2)]
    # the daemons' default --session-timeout (60 s): the coordinator's secure-aggregation work runs off its
    # event loop, so heartbeats keep every hosted client's session alive through the longest step
    terms = ["--min-batch-size", "8", "--min-metric-rows", "1", "--secagg-allow-sparse"]
    daemons = start_daemons(ids, per_daemon_args={
        host: ["--clients-from", f"{population.DATASET}={folder}", *terms] for host, folder in zip(ids, data.folders)},
        log_dir=str(root / f"logs{n}"))
    rows: list[list[str]] = []
    hosts = [RemoteWorker(d.address) for d in daemons if d.address]
    workers: list[RemoteWorker] = []
    try:
        await asyncio.gather(*(h.connect() for h in hosts))
        workers = [c for clients in await asyncio.gather(*(h.clients() for h in hosts)) for c in clients]
        await asyncio.gather(*(h.close() for h in hosts))
        fit = fz.FitConfig(dataset=population.DATASET, steps=steps, batch_size=8)
        model = population.make_model(data.features, data.classes, seed=0)
        params = sum(p.numel() for p in model.parameters())
        rss_start = maxrss_mb()
        plain = fz.Federation(workers, model, fit, fz.FedAvg(), seed=1, round_timeout=1800)
        await plain.run_round()  # warm-up: every client gets its model hosted
        strategies = [("secure, degree=None", SecAgg(fz.FedAvg(), clip=100.0))]
        if complete_too:
            strategies.append(("secure, complete graph", SecAgg(fz.FedAvg(), clip=100.0, degree=n - 1)))
        runs: dict[str, list[float]] = {}
        extra: dict[str, Any] = {}
        for traced in (False, True) if trace else (False,):
            for label, strategy in [("plain FedAvg", None), *strategies]:
                federation = plain if strategy is None else fz.Federation(
                    workers, model, fit, strategy, seed=1, round_timeout=1800)
                seconds, peak, metrics = await timed_round(federation, traced)
                if len(metrics.participants) != n:
                    raise RuntimeError(f"{label}: only {len(metrics.participants)} of {n} clients took part "
                                       f"({dict(list(metrics.dropped.items())[:3])})")
                runs.setdefault(label, []).extend([seconds, peak] if traced else [seconds, maxrss_mb(), 0.0, 0.0])
                extra[label] = metrics.extra
                print(f"  n={n} {label}{' (traced)' if traced else ''}: {seconds:.2f} s"
                      + (f", peak {peak:.1f} MB traced" if traced else f", ru_maxrss {maxrss_mb():.0f} MB"),
                      flush=True)
        base = runs["plain FedAvg"]
        for label, (seconds, rss, _none, _zero, *traced_run) in runs.items():
            peak = traced_run[1] if traced_run else float("nan")
            degree = extra[label].get("secagg_degree", "-") if label != "plain FedAvg" else "-"
            threshold = extra[label].get("threshold", "-") if label != "plain FedAvg" else "-"
            rows.append([str(n), f"{params:,}", label, str(degree if degree is not None else n - 1), str(threshold),
                         f"{seconds:.2f}", f"{seconds / base[0]:.2f}x", f"{peak:.1f}" if trace else "-",
                         f"{peak / base[5]:.2f}x" if trace else "-",
                         f"{rss - rss_start:+.0f}"])
    finally:
        await asyncio.gather(*(w.close() for w in workers), *(h.close() for h in hosts), return_exceptions=True)
        stop_all(daemons)
    return rows


def part_b_size(n: int, length: int) -> list[str]:
    params = choose_parameters(n)
    k = params.degree if params.degree is not None else n - 1
    cfg = SecAggConfig(client_ids=tuple(range(n)), threshold=params.threshold, vector_length=length, clip=100.0,
                       degree=params.degree, graph_seed=os.urandom(16))
    g = torch.Generator().manual_seed(n)
    updates = {i: torch.randn(length, generator=g) for i in range(n)}
    received: dict[int, int] = defaultdict(int)

    def deliver(to: int, step: str, msg: Any) -> None:
        for key in ("keys", "u1", "shares", "u2", "dropped"):
            received[to] += len(msg.get(key, ()))

    gc.collect()
    cpu = time.process_time()
    result = run_round(cfg, updates, deliver=deliver, serialize=False)
    cpu = time.process_time() - cpu
    assert len(result.survivors) == n
    return [str(n), "complete" if params.degree is None else str(k), str(params.threshold), f"{cpu:.1f}",
            f"{1e3 * cpu / n:.1f}", f"{1e6 * cpu / (n * k):.0f}", str(max(received.values()))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="*", default=[100, 1000], help="part A sizes (hosted clients)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[50, 100, 500, 1000], help="part B sizes")
    parser.add_argument("--length", type=int, default=1000, help="part B vector length (default 1000)")
    parser.add_argument("--trace-up-to", type=int, default=1000,
                        help="repeat the rounds under tracemalloc for n up to this (default 1000)")
    parser.add_argument("--steps", type=int, default=1, help="local steps per round in part A (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the daemons share the machine's cores with us
    print(f"fedzmq SecAgg+ benchmark; torch {torch.__version__}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    if args.clients:
        rows = []
        with tempfile.TemporaryDirectory(prefix="fedzmq-secaggplus-") as tmp:
            for n in args.clients:
                rows += asyncio.run(part_a_size(n, Path(tmp), args.steps, complete_too=n <= 100,
                                                trace=n <= args.trace_up_to))
        print("\nPart A: one round of n hosted clients on 2 daemons; ratios to the plain round of the same run\n")
        print(table(["n", "params", "round", "degree k", "threshold t", "seconds", "/ plain", "traced peak MB",
                     "/ plain", "ru_maxrss growth MB"], rows))
    if args.sizes:
        rows = [part_b_size(n, args.length) for n in args.sizes]
        print(f"\nPart B: the protocol alone, in process, vectors of {args.length}, parameters of "
              "choose_parameters(n); CPU of all clients and the server\n")
        print(table(["n", "degree k", "threshold t", "CPU s", "ms / client", "us / (n k)",
                     "entries to the busiest client"], rows))
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
