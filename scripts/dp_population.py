"""DP-FedAvg that is useful: a thousand clients, secure aggregation, epsilon 8 and 4 at delta 1e-5.

The task: ``sklearn.datasets.make_classification`` (100,000 samples, 20 features, 10 informative; no
download), 10% held out on the coordinator for the test accuracy, the rest split non-IID over 1,000
clients by a Dirichlet split over the classes (``fedzmq.examples.population.prepare``). Two real daemons
host 500 clients each (``fedzmq-worker --clients-from``); the coordinator addresses every client as its
own ``RemoteWorker``, as it would separate machines.

Three runs with the same rounds budget, the same model initialisation and the same local training:

* **non-private**: FedAvg (sample-weighted, no clipping, no noise);
* **epsilon 8** and **epsilon 4**: ``SecAgg(FedAvg(), clip=C, noise_multiplier=sigma, target_epsilon=eps)``,
  DP-FedAvg (McMahan et al. 2018) with the clients adding the Gaussian noise inside secure aggregation.
  ``sigma`` is the smallest multiplier whose epsilon after the rounds budget is at most ``eps``
  (``noise_multiplier_for_epsilon``, RDP accounting of the Poisson-subsampled Gaussian mechanism).

Every run samples clients by Poisson sampling (``Federation(sampling="poisson")``): each client takes part
in a round independently with probability ``q = --fraction``, which is what the accountant's
amplification by sampling assumes. The table states the epsilon the accountant reached, the mean number of
clients per round, the final test accuracy and the wall time, and the ratio of the DP runs' accuracy to
the non-private one (the accuracy is the point here; docs/benchmarks_secagg.md has the secure rounds' cost).

    PYTHONPATH=. python scripts/dp_population.py                 # the README's table (about 15 minutes)
    PYTHONPATH=. python scripts/dp_population.py --clients 200 --samples 20000 --rounds 10   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import fedzmq as fz
from fedzmq.examples import population
from fedzmq.examples.digits import evaluate
from fedzmq.launcher import start_daemons, stop_all
from fedzmq.secagg import noise_multiplier_for_epsilon


#: each client's share of the noise is calibrated for 95% of the round's participants surviving: the sum
#: carries the nominal noise (sqrt(1/0.95) = 1.026 times it when all survive) unless more than 5% drop out
EXPECTED_SURVIVORS = 0.95


@dataclass
class Run:
    name: str
    epsilon_target: float | None
    noise_multiplier: float
    epsilon: float | None
    rounds: int
    clients_per_round: float
    accuracy: float
    seconds: float
    stopped: str | None


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--daemons", type=int, default=2)
    p.add_argument("--samples", type=int, default=100_000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha of the non-IID split")
    p.add_argument("--fraction", type=float, default=0.05, help="q, each client's chance to take part in a round")
    p.add_argument("--rounds", type=int, default=10, help="the rounds budget of every run")
    p.add_argument("--epsilons", type=float, nargs="*", default=[8.0, 4.0])
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--clip", type=float, default=1.0, help="L2 clip of each client's update (DP runs)")
    p.add_argument("--hidden", type=int, default=32, help="hidden width of the MLP (0: logistic regression)")
    p.add_argument("--lr", type=float, default=0.2, help="local SGD learning rate")
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--round-timeout", type=float, default=300.0)
    p.add_argument("--out", help="folder for the shards and daemon logs (default: a temporary one)")
    return p.parse_args(argv)


def make_model(features: int, classes: int, hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if hidden <= 0:
        return torch.nn.Linear(features, classes)
    return torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes))


async def run_one(addresses: list[str], data: population.Population, args: argparse.Namespace, name: str,
                  epsilon: float | None) -> Run:
    # a secure round of ~100 clients on the complete key graph keeps the coordinator's event loop busy
    # for many seconds at a time (the key and share routing is pure Python); a heartbeat interval of
    # 10 s (and --session-timeout 600) lets the daemons wait minutes before they free its sessions
    settings = fz.ConnectionSettings(heartbeat_interval=10.0)
    workers = [c for a in addresses for c in await fz.connect_clients(a, settings=settings)]
    try:
        model = make_model(data.features, data.classes, args.hidden, args.seed)
        fit = fz.FitConfig(dataset=population.DATASET, optimizer={"cls": "SGD", "lr": args.lr},
                           steps=args.local_steps, batch_size=args.batch_size)
        sigma = 0.0
        if epsilon is None:
            strategy: fz.Strategy = fz.FedAvg()
        else:
            sigma = noise_multiplier_for_epsilon(epsilon, args.delta, args.rounds, args.fraction)
            strategy = fz.SecAgg(fz.FedAvg(), clip=args.clip, noise_multiplier=sigma, delta=args.delta,
                                 target_epsilon=epsilon, expected_survivors=EXPECTED_SURVIVORS)
        x_test, y_test = data.test
        federation = fz.Federation(workers, model, fit, strategy, fraction=args.fraction, sampling="poisson",
                                   round_timeout=args.round_timeout, seed=args.seed,
                                   evaluate=lambda m: evaluate(m, x_test, y_test))
        started = time.perf_counter()

        def progress(m: Any) -> None:
            extra = (f" epsilon {m.epsilon:.2f} (noise multiplier {m.extra['noise_multiplier']:.4f})"
                     if m.epsilon is not None else "")
            print(f"  {name} round {m.round}: {len(m.participants)} clients, {m.seconds:.1f}s, "
                  f"accuracy {m.eval_accuracy:.3f}{extra}", file=sys.stderr, flush=True)
            for who, why in sorted(m.dropped.items()):
                print(f"    left out {who}: {why}", file=sys.stderr, flush=True)

        history = await federation.run(args.rounds, on_round=progress)
        seconds = time.perf_counter() - started
        return Run(name, epsilon, sigma, strategy.epsilon if isinstance(strategy, fz.SecAgg) else None, len(history),
                   statistics.mean(len(m.participants) for m in history) if history else 0.0,
                   history[-1].eval_accuracy if history else float("nan"), seconds, federation.stopped_early)
    finally:
        for worker in workers:  # one by one: the clients of a daemon share its connection
            await worker.close()


def table(runs: list[Run], baseline: float) -> str:
    lines = ["| run | noise multiplier | epsilon reached (delta 1e-5) | rounds | clients per round (mean) "
             "| test accuracy | accuracy / non-private | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        eps = "none (not private)" if r.epsilon is None else f"{r.epsilon:.2f} (target {r.epsilon_target:g})"
        lines.append(f"| {r.name} | {r.noise_multiplier:.3f} | {eps} | {r.rounds} | {r.clients_per_round:.1f} | "
                     f"{r.accuracy:.1%} | {r.accuracy / baseline:.2f} | {r.seconds:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # dp-accounting logs each fractional Renyi order it cannot evaluate (and then leaves out, which only
    # makes its epsilon a looser upper bound): hundreds of lines per run, none of them actionable
    logging.getLogger("absl").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # the daemons share the machine's cores with us
    out = Path(args.out or tempfile.mkdtemp(prefix="fedzmq-dp-"))
    data = population.prepare(out / "data", args.clients, args.daemons, samples=args.samples, classes=args.classes,
                              alpha=args.alpha, seed=args.seed)
    chance = max(torch.bincount(data.test[1]).tolist()) / len(data.test[1])
    ids = [f"host{k}" for k in range(args.daemons)]
    terms = ["--min-batch-size", str(min(8, args.batch_size)), "--min-metric-rows", "1", "--session-timeout", "600",
             "--secagg-allow-sparse"]  # the simulation's owner is its coordinator: SecAgg+ is fine
    daemons = start_daemons(ids, per_daemon_args={
        h: ["--clients-from", f"{population.DATASET}={folder}", *terms] for h, folder in zip(ids, data.folders)},
        log_dir=str(out / "logs"))
    runs: list[Run] = []
    try:
        addresses = [d.address for d in daemons if d.address]
        runs.append(asyncio.run(run_one(addresses, data, args, "non-private FedAvg", None)))
        for eps in args.epsilons or []:
            runs.append(asyncio.run(run_one(addresses, data, args, f"SecAgg + DP, epsilon {eps:g}", eps)))
    finally:
        stop_all(daemons)
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()} {platform.processor() or ''}, "
          f"Python {platform.python_version()}, torch {torch.__version__}")
    print(f"command: python scripts/dp_population.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"{args.clients} clients on {args.daemons} daemons; make_classification({args.samples} samples, "
          f"20 features, {args.classes} classes), Dirichlet alpha {args.alpha}; q = {args.fraction}; clip "
          f"{args.clip}; {args.local_steps} local SGD steps of batch {args.batch_size} at lr {args.lr}; model: "
          f"{'logistic regression' if args.hidden <= 0 else f'MLP 20-{args.hidden}-{args.classes}'}; "
          f"chance (majority class) {chance:.1%}")
    print()
    print(table(runs, runs[0].accuracy))
    for r in runs:
        if r.stopped:
            print(f"{r.name}: {r.stopped}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
