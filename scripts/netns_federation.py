#!/usr/bin/env python
"""Federated training across real network hops: daemons and coordinator in their own network namespaces.

    sudo python scripts/netns_federation.py --workers 3 --rounds 10 --delay-ms 20 --loss 1

Topology: one namespace for the coordinator and one per worker, each worker joined to the
coordinator's namespace by its own veth pair (10.77.N.1 <-> 10.77.N.2), with ``tc netem`` latency and
loss on both ends when the kernel has netem. Every daemon binds a non-loopback address, so keys are
mandatory: they are generated for the run. The script prints each step, runs ``fedzmq train`` in the
coordinator's namespace, and removes every namespace and link it made, whatever happens.

Exit codes: 0 trained, 1 training failed, 77 the machine does not allow namespaces (reason printed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SKIP = 77
PREFIX = "fzns"


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check)


def can_use_namespaces() -> str | None:
    """None if namespaces work here, else the reason they do not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    result = run("ip", "netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"'ip netns add' is not allowed here: {result.stderr.strip()}"
    run("ip", "netns", "del", probe, check=False)
    return None


class Network:
    """The namespaces and links of one run; ``close`` removes them all."""

    def __init__(self, workers: int, delay_ms: float, loss: float) -> None:
        self.tag = f"{PREFIX}{os.getpid() % 10000}"
        self.coordinator = f"{self.tag}-c"
        self.workers = [f"{self.tag}-w{i}" for i in range(workers)]
        self.created: list[str] = []
        self.netem = "off"
        self.delay_ms, self.loss = delay_ms, loss

    def run_in(self, namespace: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", namespace, *cmd]

    def build(self) -> list[str]:
        """Create everything; returns the workers' addresses."""
        run("ip", "netns", "add", self.coordinator)
        self.created.append(self.coordinator)
        run(*self.run_in(self.coordinator, "ip", "link", "set", "lo", "up"))
        addresses = []
        for n, ns in enumerate(self.workers):
            run("ip", "netns", "add", ns)
            self.created.append(ns)
            here, there = f"{self.tag}a{n}", f"{self.tag}b{n}"
            run("ip", "link", "add", here, "type", "veth", "peer", "name", there)
            run("ip", "link", "set", here, "netns", self.coordinator)
            run("ip", "link", "set", there, "netns", ns)
            run(*self.run_in(self.coordinator, "ip", "addr", "add", f"10.77.{n}.1/24", "dev", here))
            run(*self.run_in(ns, "ip", "addr", "add", f"10.77.{n}.2/24", "dev", there))
            for namespace, dev in ((self.coordinator, here), (ns, there)):
                run(*self.run_in(namespace, "ip", "link", "set", dev, "up"))
                self._netem(namespace, dev)
            run(*self.run_in(ns, "ip", "link", "set", "lo", "up"))
            addresses.append(f"tcp://10.77.{n}.2:5555")
        return addresses

    def _netem(self, namespace: str, dev: str) -> None:
        if self.delay_ms <= 0 and self.loss <= 0:
            return
        result = run(*self.run_in(namespace, "tc", "qdisc", "add", "dev", dev, "root", "netem",
                                "delay", f"{self.delay_ms}ms", "loss", f"{self.loss}%"), check=False)
        if result.returncode == 0:
            self.netem = f"delay {self.delay_ms} ms, loss {self.loss}% on every link end"
        elif self.netem == "off":
            self.netem = f"unavailable ({result.stderr.strip()}): running without added latency or loss"

    def close(self) -> None:
        for namespace in reversed(self.created):  # deleting a namespace deletes its veth ends too
            run("ip", "netns", "del", namespace, check=False)
        self.created.clear()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--delay-ms", type=float, default=20.0)
    p.add_argument("--loss", type=float, default=1.0, help="packet loss in percent")
    p.add_argument("--out", help="folder for keys, data, logs and metrics (default: a temporary folder)")
    args = p.parse_args()

    reason = can_use_namespaces()
    if reason:
        print(f"SKIP: {reason}", flush=True)
        return SKIP
    out = Path(args.out or tempfile.mkdtemp(prefix="fedzmq-netns-"))
    from fedzmq.examples import digits
    from fedzmq.security import provision_keys
    from safetensors.torch import save_file

    network = Network(args.workers, args.delay_ms, args.loss)
    daemons: list[subprocess.Popen[bytes]] = []
    try:
        ids = [f"owner{i}" for i in range(args.workers)]
        split = digits.prepare(out / "data", ids, alpha=0.5)
        save_file({"x": split.test[0], "y": split.test[1]}, str(out / "data" / "test.safetensors"))
        keys = provision_keys(out / "keys", ids)
        addresses = network.build()
        print(f"namespaces: coordinator {network.coordinator}, workers {network.workers}; netem: {network.netem}",
              flush=True)
        (out / "logs").mkdir(parents=True, exist_ok=True)
        for worker, ns, address in zip(ids, network.workers, addresses):
            log = open(out / "logs" / f"{worker}.log", "wb")
            daemons.append(subprocess.Popen(network.run_in(ns, sys.executable, "-m", "fedzmq.worker", "--id", worker,
                                                         "--bind", address, *keys.daemon_args(worker),
                                                         "--data", f"digits={split.shards[worker]}"),
                                            stdout=log, stderr=subprocess.STDOUT))
        time.sleep(3)
        command = network.run_in(network.coordinator, sys.executable, "-m", "fedzmq", "train", "--dataset", "digits",
                               "--in-features", "64", "--classes", "10", "--rounds", str(args.rounds),
                               "--test-data", str(out / "data" / "test.safetensors"), "--no-progress",
                               "--client-key", str(keys.client[1]), "--out", str(out / "run"), "--round-timeout", "60")
        for worker, address in zip(ids, addresses):
            command += ["--worker", address, "--server-key", str(keys.servers[worker][0])]
        print("coordinator:", " ".join(command[4:]), flush=True)
        result = subprocess.run(command, text=True, capture_output=True, timeout=600)
        print(result.stdout[-3000:], flush=True)
        if result.returncode != 0:
            print(result.stderr[-3000:], file=sys.stderr)
            return 1
        return 0
    finally:
        for daemon in daemons:
            daemon.terminate()
        for daemon in daemons:
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()
        network.close()


if __name__ == "__main__":
    sys.exit(main())
