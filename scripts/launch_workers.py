#!/usr/bin/env python
"""Start N local worker daemons, print their addresses, and stop them all on Ctrl-C.

    python scripts/launch_workers.py --ids bob alice            # ports chosen by the system
    python scripts/launch_workers.py -n 4 --base-port 5555      # worker0..worker3 on 5555..5558
    python scripts/launch_workers.py --ids bob alice --write workers.json

Extra daemon flags go after ``--``: ``... -- --threads 2``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time

from fedzmq.launcher import start_daemons, stop_all, wait_answering
from fedzmq.security import provision_keys


def main() -> int:
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[: argv.index("--")]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ids", nargs="+", help="worker ids (default worker0..workerN-1)")
    p.add_argument("-n", type=int, default=2, help="number of workers when --ids is not given")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--base-port", type=int, default=0, help="first port (0: let the system choose)")
    p.add_argument("--write", help="write {id: address} as JSON to this file")
    p.add_argument("--log-dir", help="where daemon logs go (default: a temporary folder)")
    p.add_argument("--secure", metavar="KEY_DIR", help="generate keys into KEY_DIR: each daemon gets a key pair "
                                                       "and allows the client key KEY_DIR/clients/coordinator.key_secret")
    args = p.parse_args(argv)

    ids = args.ids or [f"worker{i}" for i in range(args.n)]
    ports = [args.base_port + i for i in range(len(ids))] if args.base_port else None
    provisioned = provision_keys(args.secure, ids) if args.secure else None
    per_daemon = {i: provisioned.daemon_args(i) for i in ids} if provisioned else None
    daemons = start_daemons(ids, extra, host=args.host, ports=ports, log_dir=args.log_dir, per_daemon_args=per_daemon)
    addresses = {d.id: d.address for d in daemons}
    try:
        asyncio.run(wait_answering([a for a in addresses.values() if a],
                                   keys=[provisioned.connect_kwargs(i) for i in addresses] if provisioned else None))
    except BaseException:
        stop_all(daemons)
        raise
    for d in daemons:
        key = f"\tserver_key={provisioned.servers[d.id][0]}" if provisioned else ""
        print(f"{d.id}\t{d.address}\tpid={d.pid}\tlog={d.log_path}{key}", flush=True)
    if provisioned:
        print(f"connect with fz.connect(address, server_key=<the daemon's server_key>, "
              f"client_key='{provisioned.client[1]}')", flush=True)
    if args.write:
        with open(args.write, "w") as f:
            json.dump(addresses, f, indent=2)
    print("all workers answer; Ctrl-C stops them", flush=True)

    stopping = False

    def request_stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    while not stopping:
        dead = [d.id for d in daemons if not d.running]
        if dead:
            print(f"worker(s) exited on their own: {dead}", flush=True)
            break
        time.sleep(0.5)
    codes = stop_all(daemons)
    print("stopped: " + ", ".join(f"{i} (exit {c})" for i, c in codes.items()), flush=True)
    return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
