#!/usr/bin/env python
"""The Byzantine demo on real daemons: digits over 8 ``fedzmq-worker`` daemons, one of them hostile.

    python scripts/byzantine.py                         # 12 rounds, attacks scale=-10 and sign-flip
    python scripts/byzantine.py --rounds 8 --attacks scale=-10 scale=100 sign-flip

Seven owners are honest; the eighth trains honestly and then returns a distorted update every round
(``fedzmq-worker --fault-injection --byzantine ATTACK``: ``sign-flip`` reverses its move away from the global
model, ``scale=K`` multiplies it by K). For each attack, FedAvg, Krum, Bulyan, FedMedian and FedTrimmedAvg
(each told f = 1) train a fresh model from the same seed; the reference is FedAvg over the same eight shares
with the eighth daemon honest. Prints a markdown table: strategy, attack, accuracy on the coordinator's
held-out test set after the last round, the honest accuracy, and the difference. See
``fedzmq.examples.byzantine`` for the setting.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
import tempfile
import time

import fedzmq as fz
from fedzmq import launcher
from fedzmq.examples import byzantine


def hostile_id(attack: str) -> str:
    return f"{byzantine.ATTACKER}-{attack.replace('=', '').replace('.', '_')}"


async def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="fedzmq-byzantine-") as folder:
        split = byzantine.prepare(folder, seed=args.seed)
        common = ["--shuffle-secret", f"byzantine-demo-{args.seed}"]  # the same shuffles on every run
        data = {owner: ["--data", f"digits={split.shards[owner]}", *common] for owner in byzantine.OWNERS}
        for attack in args.attacks:
            data[hostile_id(attack)] = ["--data", f"digits={split.shards[byzantine.ATTACKER]}",
                                        "--fault-injection", "--byzantine", attack, *common]
        daemons = [launcher.DaemonProcess(name, extra_args=flags, log_dir=folder) for name, flags in data.items()]
        workers: dict[str, fz.RemoteWorker] = {}
        try:
            for daemon in daemons:  # all spawned first: their imports of torch overlap
                daemon.spawn()
            for daemon in daemons:  # a shared machine may take minutes to start ten daemons
                workers[daemon.id] = await fz.connect(await asyncio.to_thread(daemon.wait_ready, 600.0))
            honest_workers = [workers[o] for o in byzantine.OWNERS]
            started = time.perf_counter()
            honest = await byzantine.run(honest_workers, split, "FedAvg", "none", args.rounds, args.seed)
            outcomes = []
            for attack in args.attacks:
                attacked = [workers[o] for o in byzantine.HONEST] + [workers[hostile_id(attack)]]
                for strategy in byzantine.STRATEGIES:
                    outcomes.append(await byzantine.run(attacked, split, strategy, attack, args.rounds, args.seed))
                    print(f"  {strategy:>13} under {attack}: {outcomes[-1].accuracy:.1%}", file=sys.stderr)
            seconds = time.perf_counter() - started
        finally:
            for worker in workers.values():
                await worker.close()
            launcher.stop_all(daemons)
    print(f"digits, 8 daemons (1 hostile), {args.rounds} rounds of {byzantine.FIT.epochs} local epochs, "
          f"seed {args.seed}, {datetime.date.today().isoformat()}, {seconds:.0f} s")
    print(byzantine.table([honest, *outcomes], honest.accuracy))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--rounds", type=int, default=byzantine.ROUNDS)
    parser.add_argument("--attacks", nargs="+", default=["scale=-10", "sign-flip"])
    parser.add_argument("--seed", type=int, default=0)
    sys.exit(asyncio.run(main(parser.parse_args())))
