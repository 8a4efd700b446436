#!/usr/bin/env python
"""Flower's simulation engine on the setups of ``bench_simulation.py``; run it with Flower's interpreter
(a venv of its own: ``python -m venv /work/flwr-venv && /work/flwr-venv/bin/pip install "flwr[simulation]"``).

    /work/flwr-venv/bin/python scripts/flower_sim.py --clients 1000 --per-round 1000 --hidden 128 --rounds 6

Clients are ``NumPyClient``s holding the weights of the same MLP shape (20 -> hidden -> hidden/2 -> 10) as
numpy arrays; ``fit`` returns the weights it was sent plus a small step (no real training: less work than
fedzmq's one SGD step, which only favours Flower). The server runs Flower's ``FedAvg`` with
``fraction_fit = per_round / clients`` and no evaluation. Seconds per round are the times between the
ends of consecutive ``aggregate_fit`` calls; one JSON line with them is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def shapes(hidden: int) -> list[tuple[int, ...]]:
    return [(hidden, 20), (hidden,), (hidden // 2, hidden), (hidden // 2,), (10, hidden // 2), (10,)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--per-round", type=int, default=1000)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--cpus", type=float, default=2.0)
    args = p.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")

    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    class Client(NumPyClient):
        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            return [w - np.float32(0.001) * w for w in parameters], 100, {}

    def client_fn(context: Context):  # type: ignore[no-untyped-def]
        return Client().to_client()

    ends: list[float] = []

    class TimedFedAvg(FedAvg):
        def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
            out = super().aggregate_fit(server_round, results, failures)
            ends.append(time.perf_counter())
            return out

    rng = np.random.default_rng(0)
    initial = [rng.standard_normal(s).astype(np.float32) for s in shapes(args.hidden)]
    fraction = args.per_round / args.clients

    def server_fn(context: Context) -> ServerAppComponents:
        strategy = TimedFedAvg(fraction_fit=fraction, fraction_evaluate=0.0, min_fit_clients=args.per_round,
                               min_available_clients=args.clients, min_evaluate_clients=0,
                               initial_parameters=ndarrays_to_parameters(initial))
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=args.rounds))

    started = time.perf_counter()
    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=args.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": args.cpus}})
    rounds = [b - a for a, b in zip(ends, ends[1:])]
    print(json.dumps({"rounds": rounds, "total": time.perf_counter() - started,
                      "params": sum(int(np.prod(s)) for s in shapes(args.hidden))}), flush=True)


if __name__ == "__main__":
    main()
