#!/usr/bin/env python
"""The seed tutorial, both parts, on fedzmq: central training, then federated over bob and alice.

    python scripts/seed_tutorial.py                 # two in-process VirtualWorkers
    python scripts/seed_tutorial.py --daemons       # two worker daemons started here, over tcp
    python scripts/seed_tutorial.py --connect tcp://127.0.0.1:5555 tcp://127.0.0.1:5556
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

import torch
from torch import nn

import fedzmq as fz
from fedzmq.examples.seed import central_training, federated_training, local_reference
from fedzmq.launcher import start_daemons, stop_all


async def federated(addresses: list[str] | None) -> tuple[list[float], nn.Module]:
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    if addresses is None:
        async with fz.VirtualWorker("bob") as bob, fz.VirtualWorker("alice") as alice:
            return await federated_training(model, bob, alice), model
    async with fz.connect(addresses[0]) as bob, fz.connect(addresses[1]) as alice:
        return await federated_training(model, bob, alice), model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--daemons", action="store_true", help="start two worker daemons and use them")
    p.add_argument("--connect", nargs=2, metavar="ADDRESS", help="use two running daemons")
    args = p.parse_args()

    print("== Part 1: central training ==")
    torch.manual_seed(0)
    central_training(nn.Linear(2, 1))

    print("== Part 2: federated training over bob and alice ==")
    daemons = []
    with contextlib.ExitStack() as stack:
        addresses = args.connect
        if args.daemons:
            daemons = start_daemons(["bob", "alice"])
            stack.callback(stop_all, daemons)
            addresses = [d.address for d in daemons]
        losses, model = asyncio.run(federated(addresses))

    torch.manual_seed(0)
    reference = nn.Linear(2, 1)
    expected = local_reference(reference)
    worst = max(abs(a - b) for a, b in zip(losses, expected))
    same_weights = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(model.state_dict().values(),
                                                                       reference.state_dict().values()))
    print(f"largest difference from plain torch over {len(losses)} losses: {worst:.2e}; "
          f"final weights equal: {same_weights}")
    return 0 if worst <= 1e-6 and same_weights else 1


if __name__ == "__main__":
    sys.exit(main())
