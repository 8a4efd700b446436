"""The Byzantine demo: digits over 8 daemons, one of them hostile, under each aggregation rule.

Seven data owners are honest. The eighth trains honestly on its share and then returns a distorted update
every round (a daemon started with ``--fault-injection --byzantine ATTACK``, ``fedzmq.worker.byzantine``).
Each strategy trains a fresh model from the same seed for the same rounds; the reference is FedAvg over the
same eight shares with the eighth daemon honest. ``scripts/byzantine.py`` prints the table and
``tests/test_byzantine.py`` checks it: FedAvg collapses, the robust rules stay near the honest run.

The split is nearly IID (Dirichlet alpha 100): Krum keeps one update per round, so under a skewed split it
would trail plain averaging even without an attacker, which is Krum's nature, not the attack's effect.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

from ..client.worker import RemoteWorker
from ..federated import Bulyan, FedAvg, Federation, FedMedian, FedTrimmedAvg, FitConfig, Krum, Strategy
from . import digits

#: the honest data owners, then the owner whose daemon is hostile in the attacked runs
HONEST = [f"owner{i}" for i in range(1, 8)]
ATTACKER = "owner8"
OWNERS = [*HONEST, ATTACKER]

#: the rules compared, each told that one participant of eight may be hostile
STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "FedAvg": FedAvg,
    "Krum": lambda: Krum(num_malicious_clients=1),
    "Bulyan": lambda: Bulyan(num_malicious_clients=1),
    "FedMedian": FedMedian,
    "FedTrimmedAvg": lambda: FedTrimmedAvg(beta=0.2),  # int(0.2 * 8) = 1 cut at each end
}

#: rounds of a run: enough for every robust rule to settle (Krum's model is one owner's, so it is the noisiest)
ROUNDS = 12

#: what every participant's local training does each round
FIT = FitConfig(dataset=digits.DATASET, optimizer={"cls": "SGD", "lr": 0.05}, epochs=5, batch_size=32)


@dataclass
class Outcome:
    strategy: str
    attack: str
    accuracy: float
    #: accuracy of each round, on the coordinator's held-out test set
    curve: list[float]


def prepare(directory: str | os.PathLike[str], seed: int = 0) -> digits.DigitsSplit:
    """The eight owners' shares (nearly IID) and the coordinator's held-out test set."""
    return digits.prepare(directory, OWNERS, alpha=100.0, seed=seed)


async def run(workers: Sequence[RemoteWorker], split: digits.DigitsSplit, strategy: str, attack: str,
              rounds: int, seed: int = 0) -> Outcome:
    """Train a fresh model for ``rounds`` rounds over ``workers`` (the eight owners, in ``OWNERS`` order,
    the last one hostile or not as ``attack`` says: it only labels the result) with ``strategy``."""
    model = digits.make_model(seed=seed)
    x_test, y_test = split.test
    federation = Federation(list(workers), model, FIT, STRATEGIES[strategy](), min_workers=len(workers),
                            round_timeout=120.0, seed=seed,
                            evaluate=lambda m: digits.evaluate(m, x_test, y_test))
    history = await federation.run(rounds)
    curve = [float(m.eval_accuracy or 0.0) for m in history]
    return Outcome(strategy, attack, curve[-1], curve)


def table(outcomes: Sequence[Outcome], honest: float) -> str:
    """Markdown: strategy, attack, accuracy, the honest FedAvg run's accuracy, and the difference."""
    lines = ["| strategy | attack | accuracy | honest FedAvg | difference |", "|---|---|---|---|---|"]
    for o in outcomes:
        lines.append(f"| {o.strategy} | {o.attack} | {o.accuracy:.1%} | {honest:.1%} | "
                     f"{(o.accuracy - honest) * 100:+.1f} points |")
    return "\n".join(lines)


__all__ = ["ATTACKER", "FIT", "ROUNDS", "HONEST", "OWNERS", "Outcome", "STRATEGIES", "prepare", "run", "table"]
