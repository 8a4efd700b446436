#!/usr/bin/env python
"""FedBuff against synchronous FedAvg when one of 8 workers is 10x slower: time to a target accuracy.

    python scripts/bench_fedbuff.py                     # target 90%, buffer of 4, two repetitions
    python scripts/bench_fedbuff.py --target 0.92 --buffer-size 3 --reps 3

Eight ``fedzmq-worker`` daemons (subprocesses on loopback tcp) hold non-IID shares of scikit-learn's digits
(Dirichlet alpha 1). One of them is made 10x slower with the daemons' fault injection (``debug_delay``: every
command waits before it runs), calibrated in the same run: a synchronous round of the seven fast daemons is
timed, the slow daemon's delay set to nine times that, and a round of the slow daemon alone timed to report
the ratio it really has. Then, alternating, each repetition trains a fresh model from the same seed:

* **FedAvg**, synchronous: every round waits for all eight, so for the slow one;
* **FedBuff** (``buffer_size=K``, 1/sqrt(1 + staleness), server learning rate 1): a publication every K
  updates; the slow worker's updates arrive late and weigh less.

Each is stopped once the coordinator's held-out accuracy reaches the target (or after ``--max-seconds``).
The table gives the median wall-clock time to the target, the rounds (publications) it took, and the ratio
of FedBuff's time to FedAvg's in the same run: the floor both are measured against is synchronous FedAvg
itself on the same daemons, data and model, so the ratio is what asynchrony buys.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import statistics
import sys
import tempfile
import time

import fedzmq as fz
from fedzmq import launcher
from fedzmq.examples import digits

IDS = [f"owner{i}" for i in range(1, 9)]
SLOW = IDS[-1]
FIT = fz.FitConfig(dataset=digits.DATASET, optimizer={"cls": "SGD", "lr": 0.1}, epochs=2, batch_size=16)


async def set_delay(worker: fz.RemoteWorker, seconds: float) -> None:
    await worker.request("debug_delay", {"seconds": float(seconds)}, timeout=30.0)  # the test kit's slow()


async def timed_round(workers: list[fz.RemoteWorker], reps: int = 3) -> float:
    """Median seconds of a synchronous FedAvg round of ``workers`` (after one warm-up round)."""
    federation = fz.Federation(workers, digits.make_model(), FIT, fz.FedAvg(), min_workers=len(workers))
    await federation.run_round()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        await federation.run_round()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def time_to_target(workers: list[fz.RemoteWorker], strategy: fz.Strategy, split: digits.DigitsSplit,
                         target: float, max_seconds: float) -> tuple[float, int, float]:
    """(seconds until the held-out accuracy reached ``target``, rounds, accuracy then)."""
    federation = fz.Federation(workers, digits.make_model(seed=0), FIT, strategy, min_workers=1, round_timeout=300,
                               evaluate=lambda m: digits.evaluate(m, *split.test))
    started = time.perf_counter()
    try:
        while True:
            metrics = await federation.run_round()
            elapsed = time.perf_counter() - started
            accuracy = float(metrics.eval_accuracy or 0.0)
            if accuracy >= target or elapsed > max_seconds:
                return elapsed, metrics.round, accuracy
    finally:
        await federation.close()


async def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="fedzmq-fedbuff-") as folder:
        split = digits.prepare(folder, IDS, alpha=1.0, seed=args.seed)
        flags = {i: ["--data", f"digits={split.shards[i]}", "--fault-injection", "--shuffle-secret", "bench"]
                 for i in IDS}
        daemons = [launcher.DaemonProcess(i, extra_args=flags[i], log_dir=folder) for i in IDS]
        workers: dict[str, fz.RemoteWorker] = {}
        try:
            for daemon in daemons:
                daemon.spawn()
            for daemon in daemons:  # a shared machine may take minutes to start eight daemons
                workers[daemon.id] = await fz.connect(await asyncio.to_thread(daemon.wait_ready, 600.0))
            everyone = [workers[i] for i in IDS]
            fast = await timed_round(everyone[:-1])
            delay = 9 * fast
            await set_delay(workers[SLOW], delay)
            slow = await timed_round([workers[SLOW]], reps=1)
            print(f"calibration: a round of the 7 fast daemons {fast * 1e3:.0f} ms; the slow daemon alone "
                  f"{slow * 1e3:.0f} ms ({slow / fast:.1f}x), delay {delay * 1e3:.0f} ms per command", file=sys.stderr)
            results: dict[str, list[tuple[float, int, float]]] = {"FedAvg": [], "FedBuff": []}
            for rep in range(args.reps):
                for name in ("FedAvg", "FedBuff") if rep % 2 == 0 else ("FedBuff", "FedAvg"):
                    strategy = fz.FedAvg() if name == "FedAvg" else fz.FedBuff(buffer_size=args.buffer_size)
                    results[name].append(await time_to_target(everyone, strategy, split, args.target,
                                                              args.max_seconds))
                    print(f"  rep {rep + 1} {name}: {results[name][-1][0]:.1f} s, {results[name][-1][1]} rounds, "
                          f"accuracy {results[name][-1][2]:.1%}", file=sys.stderr)
                    await asyncio.sleep(2 * slow)  # a cancelled trip of the slow daemon finishes meanwhile
        finally:
            for worker in workers.values():
                await worker.close()
            launcher.stop_all(daemons)
    sync = statistics.median(r[0] for r in results["FedAvg"])
    print(f"digits, 8 daemons, {SLOW} {slow / fast:.1f}x slower than a round of the others (debug_delay), "
          f"target {args.target:.0%}, {args.reps} repetitions, {datetime.date.today().isoformat()}")
    print("| strategy | time to target (median) | rounds / publications | accuracy reached | time / sync FedAvg |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        seconds = statistics.median(r[0] for r in runs)
        print(f"| {name}{f' (K={args.buffer_size})' if name == 'FedBuff' else ''} | {seconds:.1f} s | "
              f"{statistics.median(r[1] for r in runs):.0f} | {min(r[2] for r in runs):.1%} | {seconds / sync:.2f} |")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--target", type=float, default=0.90)
    parser.add_argument("--buffer-size", type=int, default=4)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    sys.exit(asyncio.run(main(parser.parse_args())))
