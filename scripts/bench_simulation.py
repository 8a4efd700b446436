#!/usr/bin/env python
"""Simulation of many clients on one machine: hosted clients (``fedzmq-worker --clients-from``) on two
daemons, the rounds through ``Federation.run_round`` with FedAvg, as ``fedzmq simulate`` runs them.

    python scripts/bench_simulation.py                 # all three setups (a few minutes on 2 cores)
    python scripts/bench_simulation.py --setup noop    # 1,000 clients of 10^4 parameters, no-op fits
    python scripts/bench_simulation.py --setup small   # 1,000 clients of 10^4 parameters, all in every round
    python scripts/bench_simulation.py --setup big     # 1,000 clients of 10^6 parameters, 100 per round
    python scripts/bench_simulation.py --flower /work/flwr-venv/bin/python   # and Flower's simulation, same setups

Setups (the data: ``fedzmq.examples.population``, make_classification over 20 features, 10 classes,
about 100 samples per client, split non-IID; the model ``population.make_model``: an MLP of 11,594
parameters, or 1,017,110 with ``hidden=1400``; local work ``FitConfig(steps=1, batch_size=8)``, or
``steps=0`` for **noop**):

* **noop**: as **small**, with fits as cheap as Flower's no-op: ``steps=0``, each client loads the
  global weights and returns them (as ``scripts/bench_rounds.py`` does). This is the like-for-like
  comparison with Flower's simulation engine, and measures the framework itself.
* **small**: 1,000 clients x 10^4 parameters, all in every round: median seconds per round (goal <= 0.2 s
  on 2 cores), and the coordinator's RSS growth per 100 clients: its RSS after the timed rounds minus its
  RSS with the two host connections open and before it asked for the clients, divided by 10 (goal < 1 MB).
* **big**: 1,000 clients x 10^6 parameters, 100 sampled per round: median seconds per round against the
  raw floor for the bytes that must cross a socket. The hosts combine their clients' updates (FedAvg
  takes sums), so what crosses is the model out to each of the 2 daemons and one model-sized sum back from
  each: the floor is ``bench_rounds.floor_round`` with 2 raw peers and the model's bytes (send to both at
  once, receive both at once, average), measured interleaved with the fedzmq rounds.

With ``--flower PYTHON`` the same setups run under Flower's simulation engine (``flwr.simulation``, Ray)
in that interpreter (a separate venv: ``scripts/flower_sim.py``), numpy clients doing the same work
(one SGD step of the same MLP shape is not reproduced there: Flower's clients return their weights
plus a small perturbation, less work than fedzmq's fit, which only favours Flower).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchkit import ServerDied, raw_dealer, supervised, table, tidy_scratch  # scripts/ is on sys.path
from bench_federated import machine_line
from bench_rounds import floor_round, start_raw_peers

CLIENTS = 1000
DAEMONS = 2
#: ``steps``: the local work of each client's fit (0: load the global weights and return them, as cheap as
#: Flower's no-op fit; 1: one SGD step of batch 8)
SETUPS = {"noop": {"hidden": 128, "per_round": 1000, "rounds": 7, "steps": 0},
          "small": {"hidden": 128, "per_round": 1000, "rounds": 7, "steps": 1},
          "big": {"hidden": 1400, "per_round": 100, "rounds": 5, "steps": 1}}


def say(*args: Any) -> None:
    print(*args, flush=True)


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise KeyError("VmRSS")


async def run_setup(name: str, addresses: list[str], raw_addresses: list[str]) -> dict[str, Any]:
    import torch
    import zmq.asyncio

    import fedzmq as fz
    from fedzmq.examples import population

    spec = SETUPS[name]
    model = population.make_model(hidden=spec["hidden"])
    params = sum(p.numel() for p in model.parameters())
    hosts = list(await asyncio.gather(*(fz.connect(a) for a in addresses)))
    gc.collect()
    before = rss()
    clients = [c for h in hosts for c in await h.clients()]
    await asyncio.gather(*(h.close() for h in hosts))
    ctx = zmq.asyncio.Context.instance()
    socks = [raw_dealer(ctx, a) for a in raw_addresses]
    raw_state = [t.detach().clone().reshape(-1) for t in model.state_dict().values()]
    frames = [memoryview(t.view(torch.uint8).numpy()) for t in raw_state]
    sizes = [t.numel() * 4 for t in raw_state]
    fit = fz.FitConfig(dataset=population.DATASET, optimizer={"cls": "SGD", "lr": 0.05}, steps=spec["steps"],
                      batch_size=8)
    federation = fz.Federation(clients, model, fit, fz.FedAvg(), fraction=spec["per_round"] / len(clients),
                               round_timeout=600.0)
    out: dict[str, Any] = {"setup": name, "clients": len(clients), "params": params,
                           "per_round": spec["per_round"], "fz": [], "floor": []}
    try:
        t0 = time.perf_counter()
        await federation.run_round()  # warm-up: the model goes to both daemons
        out["warmup"] = time.perf_counter() - t0
        await floor_round(socks, frames, sizes)
        for rep in range(spec["rounds"]):
            for kind in (("floor", "fz") if rep % 2 == 0 else ("fz", "floor")):
                t0 = time.perf_counter()
                if kind == "fz":
                    metrics = await federation.run_round()
                    if len(metrics.participants) != spec["per_round"] or metrics.dropped:
                        raise RuntimeError(f"{len(metrics.participants)} took part, dropped {metrics.dropped}")
                else:
                    await floor_round(socks, frames, sizes)
                out[kind].append(time.perf_counter() - t0)
        gc.collect()
        out["rss_growth_per_100"] = (rss() - before) / (len(clients) / 100)
        out["fits_on_daemons"] = statistics.median(
            sum(f["seconds"] for f in m.fits.values()) for m in federation.history[1:])
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        for s in socks:
            s.close(linger=0)
    return out


FIT_PATHS = ("torch optimizer", "fedzmq fit")


def fit_pass(path: str, clients: int = 200, passes: int = 10) -> list[float]:
    """CPU seconds per client (of this process: less sensitive to the load of others than wall time) of
    ``passes`` passes over ``clients`` fits down one fit path, in this process
    (no daemon, no wire): one SGD step of batch 8 on a 100-row shard of the small MLP, the weights reset
    before each client, as a daemon runs it for each hosted client. "torch optimizer" builds
    ``torch.optim.SGD`` over ``module.parameters()`` and walks the module for every fit (the fit path
    before ``PlainSGD`` and ``Trainee``); "fedzmq fit" is the daemon's path now (an optimizer
    description: ``PlainSGD``, bit-identical; the module walked once for all clients)."""
    import torch

    from fedzmq.examples import population
    from fedzmq.worker import training
    from fedzmq.worker.datasets import Dataset

    torch.set_num_threads(1)
    model = population.make_model()
    g = torch.Generator().manual_seed(0)
    data = Dataset("data", torch.randn(100, 20, generator=g), torch.randint(0, 10, (100,), generator=g))
    terms = training.Terms(min_batch=8, shuffle_key=b"bench")
    current = model.state_dict()
    start = {k: v.clone() for k, v in current.items()}
    common: dict[str, Any] = dict(loss="cross_entropy", batch_size=8, epochs=None, steps=1, prox_mu=0.0, seed=0)
    out = []
    for _ in range(passes + 1):
        t0 = time.process_time()
        trainee = training.Trainee(model)
        for n in range(clients):
            for k, t in current.items():
                t.copy_(start[k])
            if path == FIT_PATHS[0]:
                training.fit(model, data, terms, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                             salt=str(n), **common)
            else:
                training.fit(trainee, data, terms, optimizer={"cls": "SGD", "lr": 0.05}, salt=str(n), **common)
        out.append((time.process_time() - t0) / clients)
    return out[1:]  # the first pass warms up


def fit_cost(processes: int = 3) -> list[list[str]]:
    """The two fit paths of ``fit_pass``, each in processes of its own (as a daemon runs only one),
    interleaved: the median over the processes of their median and of their fastest pass."""
    import json

    runs: dict[str, list[list[float]]] = {path: [] for path in FIT_PATHS}
    for rep in range(processes):
        for path in FIT_PATHS if rep % 2 == 0 else FIT_PATHS[::-1]:
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--fit-pass", path],
                                  capture_output=True, text=True, timeout=600, check=True)
            runs[path].append(json.loads(done.stdout.splitlines()[-1]))
    median = {p: statistics.median(statistics.median(r) for r in rs) for p, rs in runs.items()}
    fastest = {p: statistics.median(min(r) for r in rs) for p, rs in runs.items()}
    base = FIT_PATHS[0]
    return [[p, f"{1e3 * median[p]:.3f}", f"{median[p] / median[base]:.2f}x", f"{1e3 * fastest[p]:.3f}",
             f"{fastest[p] / fastest[base]:.2f}x"] for p in FIT_PATHS]


def run_flower(python: str, setup: str) -> dict[str, Any] | None:
    """Flower's simulation of the same setup in the other venv; None if it fails (the reason printed)."""
    import json

    spec = SETUPS[setup]
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flower_sim.py")
    cmd = [python, script, "--clients", str(CLIENTS), "--per-round", str(spec["per_round"]),
           "--hidden", str(spec["hidden"]), "--rounds", str(spec["rounds"] + 1)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        say(f"Flower ({setup}): timed out")
        return None
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        say(f"Flower ({setup}) failed with {done.returncode}: {done.stderr[-2000:]}")
        return None
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", choices=sorted(SETUPS), action="append", help="default: both")
    p.add_argument("--flower", metavar="PYTHON", help="also run Flower's simulation with this interpreter")
    p.add_argument("--fit-pass", choices=FIT_PATHS, help=argparse.SUPPRESS)  # one process of fit_cost
    args = p.parse_args(argv)
    if args.fit_pass:
        import json

        say(json.dumps(fit_pass(args.fit_pass)))
        return 0
    setups = args.setup or ["noop", "small", "big"]

    import torch

    from fedzmq.examples import population
    from fedzmq.launcher import start_daemons, stop_all

    torch.set_num_threads(1)

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    load_before = os.getloadavg()[0]
    work = tempfile.mkdtemp(prefix="fedzmq-bench-sim-")
    ok = False
    processes: list[Any] = []
    results, flower = [], {}
    try:
        data = population.prepare(os.path.join(work, "data"), CLIENTS, DAEMONS, seed=0)
        raws = start_raw_peers(DAEMONS, work)
        processes.extend(raws)
        ids = [f"host{k}" for k in range(DAEMONS)]
        processes.extend(start_daemons(ids, log_dir=work, per_daemon_args={
            h: ["--clients-from", f"{population.DATASET}={folder}", "--min-batch-size", "8",
                "--min-metric-rows", "1"] for h, folder in zip(ids, data.folders)}))
        raw_addresses = [r.wait_ready(600.0) for r in raws]
        addresses = [d.address for d in processes[DAEMONS:]]
        for setup in setups:
            result = asyncio.run(supervised(run_setup(setup, addresses, raw_addresses), processes))
            results.append(result)
            say(f"  {setup}: fedzmq {statistics.median(result['fz']):.3f} s/round, "
                f"floor {statistics.median(result['floor']):.4f} s")
            if args.flower:  # Flower's clients are no-ops in every setup: run each shape once
                same = [s for s in flower if SETUPS[s]["hidden"] == SETUPS[setup]["hidden"]
                        and SETUPS[s]["per_round"] == SETUPS[setup]["per_round"]]
                flower[setup] = flower[same[0]] if same else run_flower(args.flower, setup)
        rows = []
        for r in results:
            fz_s, floor_s = statistics.median(r["fz"]), statistics.median(r["floor"])
            fl = flower.get(r["setup"])
            fl_s = statistics.median(fl["rounds"][1:]) if fl else None
            rows.append([f"{r['clients']} x {r['params']:,}", str(r["per_round"]), str(SETUPS[r["setup"]]["steps"]),
                         f"{fz_s:.3f}",
                         f"{r['fits_on_daemons']:.3f}", f"{floor_s:.4f}", f"{fz_s / floor_s:.1f}x",
                         f"{r['rss_growth_per_100'] / 1e6:.2f}",
                         f"{fl_s:.3f} ({fl_s / fz_s:.1f}x fedzmq)" if fl_s else "not run"])
        say("\n" + table(["clients x params", "per round", "local steps", "fedzmq s/round (median)",
                          "daemons' fit s (sum)", "floor s", "fedzmq / floor", "coordinator RSS MB per 100 clients",
                          "Flower s/round"], rows) + "\n")
        say(f"{machine_line()}; {DAEMONS} daemons; 1-min load average before/after: "
            f"{load_before:.1f}/{os.getloadavg()[0]:.1f}")
        if "small" in setups:
            load = os.getloadavg()[0]
            say("\nPer-client CPU cost of one SGD step, without daemon or wire: each path in 3 processes of its "
                "own, interleaved, each 10 passes over 200 clients (medians over the processes):\n")
            say(table(["fit path", "CPU ms per client (median pass)", "/ torch optimizer", "CPU ms (fastest pass)",
                       "/ torch optimizer"], fit_cost()))
            say(f"\n1-min load average before/after: {load:.1f}/{os.getloadavg()[0]:.1f}")
        ok = True
        return 0
    except KeyboardInterrupt:
        return 130
    except ServerDied as exc:
        say(f"error: {exc}")
        return 1
    finally:
        stop_all(processes)
        tidy_scratch(work, ok)


if __name__ == "__main__":
    sys.exit(main())
