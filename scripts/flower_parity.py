"""Every fedzmq strategy against Flower's own class of the same name, on fresh random inputs with a Byzantine
client: prints the largest absolute difference of the global model after each round, and exits 1 if any
exceeds the tolerance. The tests do not need it (they check against hand-worked values and a numpy
implementation of their own); this is the cross-check against Flower itself.

It needs flwr and torch in one environment; keep them out of the project's venv, e.g.::

    python3 -m venv /tmp/flwr-venv
    /tmp/flwr-venv/bin/pip install torch==2.13.0 'flwr==1.42.*' pyzmq msgpack safetensors tqdm cryptography
    PYTHONPATH=. /tmp/flwr-venv/bin/python scripts/flower_parity.py --clients 3 7

Both sides get the same updates each round (honest clients near Flower's current global model, one Byzantine
client far away that claims ten times the samples), and each keeps its own global model and server state.

Flower gets the round's results in fedzmq's content order (the order every fedzmq robust rule sees its held
updates in, ``content_digest``): Krum with n − f − 2 <= 1 and Bulyan with f = 1 or 2 meet exact ties, which
Flower breaks by the order its results arrived in and fedzmq by that content order, so only the same order
compares the rules themselves. ``--arrival-order`` hands Flower the clients' own order instead, to see the ties.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import fedzmq as fz
from fedzmq.federated.aggregators import content_digest

try:
    import flwr
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import strategy as flower
except ImportError:  # pragma: no cover - the point of the script is the comparison
    sys.exit("flwr is not importable here: install 'flwr==1.42.*' in a separate venv (see this script's docstring)")

SHAPES = {"fc1.weight": (8, 5), "fc1.bias": (8,), "fc2.weight": (3, 8), "fc2.bias": (3,)}


def cases(clients: int) -> list[tuple[str, Callable[[Any], Any], Callable[[], fz.Strategy], bool]]:
    """(label, Flower factory given initial parameters, fedzmq factory, expected to agree)."""
    f = max(0, (clients - 3) // 4)  # the most Byzantine clients Bulyan tolerates with this many (n >= 4f + 3)
    bulyan = [(f"Bulyan(f={f})", lambda p: flower.Bulyan(num_malicious_clients=f, to_keep=0),
               lambda: fz.Bulyan(num_malicious_clients=f), True)] if clients >= 3 else []  # both refuse fewer
    return [
        ("FedAvg", lambda p: flower.FedAvg(), fz.FedAvg, True),
        ("FedProx(proximal_mu=0.1)", lambda p: flower.FedProx(proximal_mu=0.1),
         lambda: fz.FedProx(proximal_mu=0.1), True),
        ("FedAvgM(lr=0.7, momentum=0.9)",
         lambda p: flower.FedAvgM(initial_parameters=p, server_learning_rate=0.7, server_momentum=0.9),
         lambda: fz.FedAvgM(server_learning_rate=0.7, server_momentum=0.9), True),
        ("FedAdam, Flower's defaults", lambda p: flower.FedAdam(initial_parameters=p),
         lambda: fz.FedAdam(eta=0.1, tau=1e-9, bias_correction=True), True),
        ("FedYogi, Flower's defaults", lambda p: flower.FedYogi(initial_parameters=p), fz.FedYogi, True),
        ("FedAdagrad, Flower's defaults", lambda p: flower.FedAdagrad(initial_parameters=p),
         lambda: fz.FedAdagrad(tau=1e-9), True),
        ("FedMedian", lambda p: flower.FedMedian(), fz.FedMedian, True),
        ("FedTrimmedAvg(beta=0.34)", lambda p: flower.FedTrimmedAvg(beta=0.34),
         lambda: fz.FedTrimmedAvg(beta=0.34), True),
        ("Krum(f=1)", lambda p: flower.Krum(num_malicious_clients=1), lambda: fz.Krum(num_malicious_clients=1), True),
        ("Multi-Krum(f=1, keep=2)", lambda p: flower.Krum(num_malicious_clients=1, num_clients_to_keep=2),
         lambda: fz.Krum(num_malicious_clients=1, num_clients_to_keep=2), True),
        *bulyan,
        # the check is sensitive: the paper's FedAdam (no bias correction) is not Flower's
        ("FedAdam bias_correction=False (should differ)", lambda p: flower.FedAdam(initial_parameters=p),
         lambda: fz.FedAdam(eta=0.1, tau=1e-9), False),
    ]


def fit_res(arrays: list[np.ndarray], num_examples: int) -> FitRes:
    return FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters(arrays),
                  num_examples=num_examples, metrics={})


def content_order(updates: list[list[np.ndarray]], samples: list[int]) -> list[int]:
    """The clients' indices in the order fedzmq's held-updates aggregators sort the same updates into."""
    keys = [(content_digest({k: torch.from_numpy(a) for k, a in zip(SHAPES, u)}), n) for u, n in zip(updates, samples)]
    return sorted(range(len(keys)), key=keys.__getitem__)


def run(clients: int, rounds: int, seed: int, dtype: np.dtype, shift: float,
        arrival_order: bool = False) -> list[tuple[str, list[float], bool]]:
    rows = []
    for label, make_flower, make_fedzmq, agree in cases(clients):
        rng = np.random.default_rng(seed)
        start = [rng.normal(0, 1, shape).astype(dtype) for shape in SHAPES.values()]
        theirs = make_flower(ndarrays_to_parameters(start))
        ours = make_fedzmq()
        flower_global = [a.copy() for a in start]
        our_global = {k: torch.from_numpy(a.copy()) for k, a in zip(SHAPES, start)}
        diffs = []
        for r in range(1, rounds + 1):
            byzantine = int(rng.integers(clients))
            updates, samples = [], []
            for c in range(clients):
                mean, scale = (shift, 3.0) if c == byzantine else (0.0, 0.1)
                updates.append([(g + rng.normal(mean, scale, g.shape)).astype(dtype) for g in flower_global])
                samples.append(int(rng.integers(20, 200)) * (10 if c == byzantine else 1))
            order = range(clients) if arrival_order else content_order(updates, samples)
            result, _ = theirs.aggregate_fit(r, [(None, fit_res(updates[i], samples[i])) for i in order], [])
            flower_global = parameters_to_ndarrays(result)
            our_updates = [({k: torch.from_numpy(a) for k, a in zip(SHAPES, u)}, n) for u, n in zip(updates, samples)]
            our_global = ours.aggregate(r, our_global, our_updates)
            diffs.append(max(float(np.abs(our_global[k].double().numpy() - f.astype(np.float64)).max())
                             for k, f in zip(SHAPES, flower_global)))
        rows.append((label, diffs, agree))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[3, 7])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--byzantine-shift", type=float, default=5.0, help="how far the Byzantine client moves")
    parser.add_argument("--arrival-order", action="store_true",
                        help="give Flower the results in the clients' order, not fedzmq's content order (ties differ)")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)  # Flower warns about metrics functions nobody gave it
    print(f"flwr {flwr.__version__}, fedzmq {fz.__version__}, torch {torch.__version__}, numpy {np.__version__}; "
          f"{args.dtype}, {args.rounds} rounds, seed {args.seed}, one Byzantine client per round, shifted by "
          f"{args.byzantine_shift:g}\n")
    failed = False
    for clients in args.clients:
        print(f"| {clients} clients | " + " | ".join(f"round {r}" for r in range(1, args.rounds + 1)) + " | agrees |")
        print("|---|" + "---|" * (args.rounds + 1))
        for label, diffs, agree in run(clients, args.rounds, args.seed, np.dtype(args.dtype), args.byzantine_shift,
                                       args.arrival_order):
            ok = max(diffs) <= args.tolerance
            failed |= ok != agree
            print(f"| {label} | " + " | ".join(f"{d:.1e}" for d in diffs) + f" | {'yes' if ok else 'no'} |")
        print()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
