#!/usr/bin/env python
"""A long fuzz campaign against a real worker daemon (the CI test sends 10,000 messages; this, millions).

    python scripts/fuzz_campaign.py --messages 200000 --seed 1
    python scripts/fuzz_campaign.py --minutes 10

It starts a daemon, keeps an honest session with an object in it, sends seeded random hostile
messages (fedzmq.testing.fuzz: bit flips, truncations, swapped frames, huge shapes, deep nesting,
NaN/inf, wrong types in every header field, random bytes, valid commands) and prints: messages sent,
replies by type, crashes, hangs, and the daemon's memory before and after. Exit code 1 on any crash,
hang or damage to the honest session.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import sys
import time

import msgpack
import torch
import zmq

import fedzmq as fz
from fedzmq.launcher import DaemonProcess
from fedzmq.testing.fuzz import Mutator, valid_messages


def attack(address: str, messages: int, seconds: float, seed: int, report_every: int) -> collections.Counter[str]:
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    mutator = Mutator(random.Random(seed), valid_messages())
    outcomes: collections.Counter[str] = collections.Counter()
    started = time.monotonic()
    try:
        while outcomes["sent"] < messages and time.monotonic() - started < seconds:
            name, frames = mutator.message()
            sock.send_multipart(frames)
            outcomes["sent"] += 1
            outcomes[f"mutation:{name}"] += 1
            if not sock.poll(10_000):
                outcomes["hangs"] += 1
                print(f"no reply within 10 s to a {name} message", flush=True)
                break
            reply = msgpack.unpackb(sock.recv_multipart()[0])
            outcomes["reply:" + ("ok" if reply.get("ok") else reply.get("error", {}).get("type", "?"))] += 1
            if outcomes["sent"] % report_every == 0:
                rate = outcomes["sent"] / (time.monotonic() - started)
                print(f"  {outcomes['sent']:>9} messages, {rate:,.0f}/s", flush=True)
        sock.send_multipart([msgpack.packb({"v": 1, "id": 1, "cmd": "close", "args": {}})])
        sock.poll(10_000)
    finally:
        sock.close()
        context.term()
    outcomes["seconds"] = int(time.monotonic() - started)
    return outcomes


async def campaign(args: argparse.Namespace) -> int:
    daemon = DaemonProcess("fuzz", extra_args=["--max-message-bytes", str(1 << 20)])
    await asyncio.to_thread(daemon.start)
    try:
        async with fz.connect(daemon.address) as honest:
            kept = await honest.send(torch.arange(1000.0))
            before = await honest.status()
            outcomes = await asyncio.to_thread(attack, daemon.address, args.messages, args.minutes * 60,
                                               args.seed, args.report_every)
            crashed = not daemon.running
            intact = not crashed and torch.equal(await kept.get(), torch.arange(1000.0))
            after = await honest.status() if not crashed else {}
    finally:
        code = await asyncio.to_thread(daemon.stop)
    print("\nmutations:", {k.split(":", 1)[1]: v for k, v in sorted(outcomes.items()) if k.startswith("mutation:")})
    print("replies:  ", {k.split(":", 1)[1]: v for k, v in sorted(outcomes.items()) if k.startswith("reply:")})
    errors = sum(v for k, v in outcomes.items() if k.startswith("reply:") and k != "reply:ok")
    print(f"messages sent {outcomes['sent']} in {outcomes['seconds']} s; error replies {errors}; "
          f"hangs {outcomes['hangs']}; crashes {int(crashed)}; honest session intact: {intact}; "
          f"daemon exit code {code}")
    if after:
        print(f"daemon memory: {before['rss_bytes'] / 2**20:.0f} MiB before, {after['rss_bytes'] / 2**20:.0f} MiB "
              f"after; malformed counted {after['malformed']}; objects {before['objects']} -> {after['objects']}")
    return 0 if intact and not outcomes["hangs"] and code == 0 else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=1_000_000)
    p.add_argument("--minutes", type=float, default=10.0, help="stop after this long even if messages remain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-every", type=int, default=50_000)
    return asyncio.run(campaign(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
