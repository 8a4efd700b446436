#!/usr/bin/env python
"""Benchmark of secure aggregation (SecAgg) and central differential privacy in fedzmq.

    python scripts/bench_secagg.py --quick            # ~2 min on 2 cores: 1 seed, 4 workers, 3 timed rounds
    python scripts/bench_secagg.py                    # ~10-25 min: 3 seeds, 4 and 8 workers, 9 timed rounds
    python scripts/bench_secagg.py --part a           # only the accuracy-vs-privacy table
    python scripts/bench_secagg.py --part b --reps 15 # only the round-time table, more rounds
    python scripts/bench_secagg.py --json out.json    # also write every sample as JSON
    python scripts/bench_secagg.py --report out.json  # print the tables of a saved run, run nothing

Part A, accuracy vs privacy: ``python -m fedzmq demo --no-progress --out DIR ...`` (scikit-learn digits,
non-IID over N local worker daemons, an MLP of 4,810 parameters), run as a subprocess once per setting and
seed, each in its own folder under a temporary directory, with the same rounds, local epochs and seed:

* ``plain FedAvg``                      no secure aggregation, no noise;
* ``SecAgg, no noise``                  ``--secure-aggregation`` (clip 10, the CLI's default);
* ``SecAgg + DP eps=E`` for E in 8, 4, 1 ``--dp-epsilon E --clip C`` (central DP, noise calibrated for all
                                         rounds; ``--dp-clip`` and ``--dp-lr`` choose C and the local lr).

It reads ``result.json`` (final federated and centralized test accuracy) and ``metrics.jsonl`` (the epsilon
of the last round, the seconds of each round) and prints, per number of workers, one table:
setting | epsilon reached | final test accuracy | centralized accuracy | seconds (sum of the round times /
the whole command's wall time, which includes starting the daemons and the centralized reference training).
With several seeds a cell is ``mean ± sample standard deviation``, the per-seed values in the JSON.

Part B, the cost of secure aggregation: 8 ``fedzmq-worker`` daemons (``fedzmq.launcher.start_daemons``),
each loading a 4-sample safetensors shard (``x``: 4 x 1000 float32, ``y``: 4 labels in [0, 1000)) with
``--data tiny=PATH``; a model ``nn.Sequential(nn.Linear(1000, 1000))`` (1,001,000 float32 parameters);
trivial local work ``FitConfig(dataset="tiny", steps=1, batch_size=4)``. Two federations over the same
connected workers, each with its own copy of the model:

* plain:  ``fz.Federation(workers, model_a, fit, fz.FedAvg())``
* secagg: ``fz.Federation(workers, model_b, fit, SecAgg(fz.FedAvg(), clip=1e3))``

One warm-up round each (the first round puts the model on the daemons), then ``--reps`` timed rounds of
each, alternating (plain, secagg, secagg, plain, ...) so the noise of a shared machine falls on both alike;
the table gives the median wall time of ``await federation.run_round()`` and the ratio to plain (target:
at most 3x). ``torch.set_num_threads(1)`` here; the daemons use one torch thread each by default. A
diagnostics table splits the secure round into its four phases as the coordinator sees them (the
coordinator-side ``SecAggServer`` is wrapped to timestamp its calls; nothing in the library is changed),
with the CPU seconds of the daemons (/proc) and of this process per round. Unless ``--quick`` or
``--no-blas-diagnostic``, part B runs a second time with OPENBLAS_NUM_THREADS=1 (and OMP/MKL) in the
daemons' environment: numpy's BLAS threads are not limited by the daemon's ``--threads`` (see
docs/benchmarks_secagg.md). Results and their reading: docs/benchmarks_secagg.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def say(*args: Any) -> None:
    print(*args, flush=True)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def spread(values: Sequence[float], fmt: str, scale: float = 1.0) -> str:
    """``mean ± sample std`` (or the single value) of the non-missing values."""
    values = [v * scale for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    mean, std = statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
    if format(std, fmt) == format(0.0, fmt):  # one value, or all the same (e.g. the epsilon of equal runs)
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(std, fmt)}"


# ---------------------------------------------------------------------------------------------------
# Part A: accuracy vs privacy, through the command line


@dataclass
class Setting:
    label: str
    flags: list[str]
    epsilon: float | None = None
    lr: float | None = None


@dataclass
class DemoRun:
    setting: str
    workers: int
    seed: int
    flags: list[str]
    returncode: int = 0
    federated_accuracy: float | None = None
    centralized_accuracy: float | None = None
    rounds: int | None = None
    epsilon: float | None = None
    round_seconds: float | None = None
    wall_seconds: float | None = None
    error: str | None = None


def part_a_settings(args: argparse.Namespace) -> list[Setting]:
    settings = [Setting("plain FedAvg", []),
                Setting("SecAgg, no noise", ["--secure-aggregation"])]
    for eps in args.epsilons:
        settings.append(Setting(f"SecAgg + DP eps={eps:g}",
                                ["--dp-epsilon", f"{eps:g}", "--clip", f"{args.dp_clip:g}"], eps, args.dp_lr))
    return settings


def run_demo(setting: Setting, workers: int, seed: int, args: argparse.Namespace, root: Path) -> DemoRun:
    out = root / f"{setting.label.replace(' ', '_').replace(',', '').replace('+', '').replace('=', '')}-w{workers}-s{seed}"
    lr = setting.lr if setting.lr is not None else args.lr
    flags = ["--rounds", str(args.rounds), "--local-epochs", str(args.local_epochs), "--lr", f"{lr:g}",
             "--seed", str(seed), "--workers", str(workers), *setting.flags]
    run = DemoRun(setting.label, workers, seed, flags)
    command = [sys.executable, "-m", "fedzmq", "demo", "--no-progress", "--out", str(out), *flags]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=args.demo_timeout, check=False)
    run.wall_seconds = time.perf_counter() - started
    run.returncode = proc.returncode
    (root / f"{out.name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    try:
        result = json.loads((out / "result.json").read_text())
        run.federated_accuracy = result["federated_accuracy"]
        run.centralized_accuracy = result["centralized_accuracy"]
        run.rounds = result.get("rounds")
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        run.round_seconds = sum(m.get("seconds") or 0.0 for m in lines)
        run.epsilon = lines[-1].get("epsilon") if lines else None
    except (OSError, ValueError, KeyError) as exc:
        run.error = f"{type(exc).__name__}: {exc}; exit code {proc.returncode}; stderr tail: {proc.stderr[-500:]}"
    if proc.returncode != 0 and run.error is None:
        run.error = f"exit code {proc.returncode}; stderr tail: {proc.stderr[-500:]}"
    return run


def part_a(args: argparse.Namespace, root: Path) -> tuple[str, list[DemoRun]]:
    settings = part_a_settings(args)
    runs: list[DemoRun] = []
    total = len(settings) * len(args.seeds) * len(args.workers)
    done = 0
    for workers in args.workers:
        for seed in args.seeds:  # seeds outermost within a worker count: a slow spell hits all settings alike
            for setting in settings:
                done += 1
                run = run_demo(setting, workers, seed, args, root)
                runs.append(run)
                acc = f"{run.federated_accuracy:.2%}" if run.federated_accuracy is not None else "failed"
                eps = f", eps {run.epsilon:.2f}" if run.epsilon is not None else ""
                say(f"  [{done}/{total}] {setting.label}, {workers} workers, seed {seed}: {acc}{eps} "
                    f"({run.wall_seconds:.0f}s wall){'  ERROR ' + run.error if run.error else ''}")
    return report_a(runs, settings, args), runs


def report_a(runs: list[DemoRun], settings: list[Setting], args: argparse.Namespace) -> str:
    parts = []
    for workers in args.workers:
        rows = []
        for setting in settings:
            mine = [r for r in runs if r.setting == setting.label and r.workers == workers]
            if not mine:
                continue
            failed = sum(r.error is not None for r in mine)
            eps = "none" if setting.epsilon is None else spread([r.epsilon for r in mine], ".2f")
            rounds = sorted({r.rounds for r in mine if r.rounds is not None})
            if rounds and rounds != [args.rounds]:  # stopped early by the privacy budget
                eps += f" ({'/'.join(map(str, rounds))} rounds)"
            seconds = (f"{spread([r.round_seconds for r in mine], '.1f')} / "
                       f"{spread([r.wall_seconds for r in mine], '.0f')}")
            label = setting.label + (f" (clip {args.dp_clip:g}, lr {setting.lr if setting.lr is not None else args.lr:g})"
                                     if setting.epsilon is not None else "")
            rows.append([label + (f" [{failed} failed]" if failed else ""), eps,
                         spread([r.federated_accuracy for r in mine], ".1f", 100.0) + " %",
                         spread([r.centralized_accuracy for r in mine], ".1f", 100.0) + " %", seconds])
        heading = (f"**{workers} workers**, MLP 64-64-10 (4,810 parameters), {args.rounds} rounds, {args.local_epochs} local epochs, lr {args.lr:g}, "
                   f"delta 1e-5, seeds {', '.join(map(str, args.seeds))}"
                   + (" (mean ± sample std)" if len(args.seeds) > 1 else ""))
        parts.append(heading + "\n\n" + table(
            ["setting", "epsilon reached", "final test accuracy", "centralized accuracy",
             "seconds (rounds / wall)"], rows))
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------------
# Part B: the round time of secure aggregation next to plain FedAvg


SAMPLES = 4
FEATURES = 1000


@dataclass
class PartB:
    workers: int
    params: int = 0
    plain: list[float] = field(default_factory=list)
    secure: list[float] = field(default_factory=list)
    warmup_plain: float = 0.0
    warmup_secure: float = 0.0
    plain_bytes: int = 0
    secure_bytes: int = 0
    phases: list[dict[str, float]] = field(default_factory=list)
    cpu_plain: list[tuple[float, float]] = field(default_factory=list)   # (daemons, coordinator) CPU seconds
    cpu_secure: list[tuple[float, float]] = field(default_factory=list)
    server_compute: list[float] = field(default_factory=list)
    fit_seconds: list[float] = field(default_factory=list)
    max_weight_difference: float | None = None

    @property
    def ratio(self) -> float:
        return statistics.median(self.secure) / statistics.median(self.plain)


def write_shards(count: int, directory: Path) -> dict[str, list[str]]:
    import torch
    from safetensors.torch import save_file

    flags = {}
    for i in range(count):
        g = torch.Generator().manual_seed(1000 + i)
        path = directory / f"w{i}.safetensors"
        save_file({"x": torch.randn(SAMPLES, FEATURES, generator=g),
                   "y": torch.randint(0, FEATURES, (SAMPLES,), generator=g)}, str(path))
        # the benchmark's own daemons: terms that let its one step of 4 rows run
        flags[f"w{i}"] = ["--data", f"tiny={path}", "--min-batch-size", str(SAMPLES), "--min-metric-rows", "1"]
    return flags


class PhaseClock:
    """Timestamps of the coordinator's ``SecAggServer`` calls: where the phases of a secure round end."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}
        self.compute = 0.0

    def install(self) -> None:
        from fedzmq.federated import secure
        from fedzmq.secagg import SecAggServer

        clock = self

        class TimedServer(SecAggServer):
            def _timed(self, name: str, method: Any, *a: Any, **k: Any) -> Any:
                arrived = time.perf_counter()
                clock.marks.setdefault(name, arrived)  # the phase's replies are in: the server is called
                try:
                    return method(*a, **k)
                finally:
                    clock.compute += time.perf_counter() - arrived
                    clock.marks[name + ".done"] = time.perf_counter()

            def collect_keys(self, *a: Any, **k: Any) -> Any:
                return self._timed("keys", super().collect_keys, *a, **k)

            def route_shares(self, *a: Any, **k: Any) -> Any:
                return self._timed("shares", super().route_shares, *a, **k)

            def end_masked(self, *a: Any, **k: Any) -> Any:
                return self._timed("masked", super().end_masked, *a, **k)

            def end_confirm(self, *a: Any, **k: Any) -> Any:
                return self._timed("confirm", super().end_confirm, *a, **k)

            def finish(self, *a: Any, **k: Any) -> Any:
                return self._timed("unmask", super().finish, *a, **k)

        secure.SecAggServer = TimedServer  # type: ignore[misc]

    def start(self) -> float:
        self.marks.clear()
        self.compute = 0.0
        return time.perf_counter()

    def phases(self, started: float, ended: float) -> dict[str, float]:
        m = self.marks
        return {"send model + advertise": m["keys"] - started,
                "share_keys (while the workers fit)": m["shares"] - m["keys.done"],
                "end of the fits + masked_input": m["masked"] - m["shares.done"],
                "confirm the survivors": m["confirm"] - m["masked.done"],
                "unmask": m["unmask"] - m["confirm.done"],
                "server finish": m["unmask.done"] - m["unmask"],
                "apply + metrics": ended - m["unmask.done"]}


def process_cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the given processes (all their threads), from /proc; 0 where unavailable."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


async def part_b_rounds(addresses: Sequence[str], result: PartB, reps: int, pids: Sequence[int] = ()) -> None:
    import copy

    import torch
    from torch import nn

    import fedzmq as fz
    from fedzmq.federated.secure import SecAgg

    clock = PhaseClock()
    clock.install()
    torch.manual_seed(0)
    model_plain = nn.Sequential(nn.Linear(FEATURES, FEATURES))
    model_secure = copy.deepcopy(model_plain)
    result.params = sum(p.numel() for p in model_plain.parameters())
    fit = fz.FitConfig(dataset="tiny", loss="cross_entropy", optimizer={"cls": "SGD", "lr": 0.01}, steps=1,
                       batch_size=SAMPLES)
    workers: list[Any] = []
    try:
        workers = list(await asyncio.gather(*(fz.connect(a) for a in addresses)))
        plain = fz.Federation(workers, model_plain, fit, fz.FedAvg(), round_timeout=600.0)
        secure = fz.Federation(workers, model_secure, fit, SecAgg(fz.FedAvg(), clip=1e3), round_timeout=600.0)

        async def one(kind: str) -> float:
            federation = plain if kind == "plain" else secure
            await asyncio.gather(*(w.ping() for w in workers))  # untimed: every round starts alike
            cpu_daemons, cpu_here = process_cpu_seconds(pids), time.process_time()
            started = clock.start()
            metrics = await federation.run_round()
            elapsed = time.perf_counter() - started
            cpu = (process_cpu_seconds(pids) - cpu_daemons, time.process_time() - cpu_here)
            (result.cpu_plain if kind == "plain" else result.cpu_secure).append(cpu)
            if len(metrics.participants) != len(workers) or metrics.dropped:
                raise RuntimeError(f"{kind} round {metrics.round}: {len(metrics.participants)} of {len(workers)} "
                                   f"workers took part; dropped: {metrics.dropped}")
            moved = metrics.bytes_sent + metrics.bytes_received
            if kind == "plain":
                result.plain_bytes = moved
            else:
                result.secure_bytes = moved
                result.phases.append(clock.phases(started, started + elapsed))
                result.server_compute.append(clock.compute)
            result.fit_seconds.extend(f["seconds"] for f in metrics.fits.values())
            return elapsed

        result.warmup_plain = await one("plain")
        result.warmup_secure = await one("secure")
        result.phases.clear()
        result.cpu_plain.clear()
        result.cpu_secure.clear()
        result.server_compute.clear()
        result.fit_seconds.clear()
        for rep in range(reps):
            for kind in (("plain", "secure") if rep % 2 == 0 else ("secure", "plain")):
                elapsed = await one(kind)
                (result.plain if kind == "plain" else result.secure).append(elapsed)
            say(f"  rep {rep + 1}/{reps}: plain {result.plain[-1]:.3f}s, secagg {result.secure[-1]:.3f}s")
        # the two federations trained the same model from the same weights; a sanity check that the
        # secure mean is FedAvg's mean (same data, same seeds; clip 1e3 never binds here)
        diff = max((a - b).abs().max().item() for a, b in zip(model_plain.state_dict().values(),
                                                                  model_secure.state_dict().values()))
        result.max_weight_difference = diff
    finally:
        await asyncio.gather(*(w.close() for w in workers), return_exceptions=True)


BLAS_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
BLAS_HEADING = ("\n\nDiagnostic run, the same with " + ", ".join(f"{k}={v}" for k, v in BLAS_ENV.items())
                + " in the daemons' environment (one BLAS thread each; see docs/benchmarks_secagg.md):\n\n")


def part_b_once(args: argparse.Namespace, root: Path, daemon_env: dict[str, str] | None = None) -> PartB:
    """Start the daemons (with ``daemon_env`` added to their environment), time the rounds, stop them."""
    import torch

    from fedzmq.launcher import start_daemons, stop_all

    torch.set_num_threads(1)
    count = args.b_workers
    folder = root / ("b-" + ("-".join(f"{k}={v}" for k, v in sorted(daemon_env.items())) if daemon_env else "default"))
    folder.mkdir(parents=True, exist_ok=True)
    shard_flags = write_shards(count, folder)
    result = PartB(count)
    saved = {k: os.environ.get(k) for k in (daemon_env or {})}
    os.environ.update(daemon_env or {})  # the daemons inherit it; this process's numpy is already loaded
    try:
        daemons = start_daemons(list(shard_flags), per_daemon_args=shard_flags, log_dir=str(folder / "logs"))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        asyncio.run(part_b_rounds([d.address for d in daemons if d.address], result, args.reps,
                                  [d.pid for d in daemons if d.pid]))
    finally:
        codes = stop_all(daemons)
    if any(codes.values()):
        say(f"  warning: daemon exit codes {codes}")
    return result


def part_b(args: argparse.Namespace, root: Path) -> tuple[str, list[PartB]]:
    results = [part_b_once(args, root)]
    text = report_b(results[0], args)
    if args.blas_diagnostic:
        say(f"\n  again, with {' '.join(f'{k}={v}' for k, v in BLAS_ENV.items())} in the daemons' environment")
        results.append(part_b_once(args, root, BLAS_ENV))
        text += BLAS_HEADING + report_b(results[1], args)
    return text, results


def report_b(r: PartB, args: argparse.Namespace) -> str:
    med_plain, med_secure = statistics.median(r.plain), statistics.median(r.secure)
    params = f"{r.params:,}"
    main = table(["mode", "workers", "params", "round seconds (median)", "ratio to plain"], [
        ["plain FedAvg", str(r.workers), params, f"{med_plain:.3f}", "1.00x"],
        ["SecAgg(FedAvg)", str(r.workers), params, f"{med_secure:.3f}",
         f"{r.ratio:.2f}x (target <= 3x: {'met' if r.ratio <= 3 else 'NOT met'})"],
    ])
    diag_rows = [
        ["timed rounds each", str(len(r.plain))],
        ["plain min / max (s)", f"{min(r.plain):.3f} / {max(r.plain):.3f}"],
        ["secagg min / max (s)", f"{min(r.secure):.3f} / {max(r.secure):.3f}"],
        ["warm-up round plain / secagg (s)", f"{r.warmup_plain:.3f} / {r.warmup_secure:.3f}"],
        ["bytes moved per round plain / secagg (MB)", f"{r.plain_bytes / 1e6:.1f} / {r.secure_bytes / 1e6:.1f}"],
        ["local fit per worker, median (ms)", f"{statistics.median(r.fit_seconds) * 1e3:.1f}"],
    ]
    if r.cpu_plain and r.cpu_secure:
        for label, cpu in (("plain", r.cpu_plain), ("secagg", r.cpu_secure)):
            diag_rows.append([f"CPU seconds per {label} round, median: all daemons + coordinator",
                              f"{statistics.median(c[0] for c in cpu):.3f} + {statistics.median(c[1] for c in cpu):.3f}"])
    if r.phases:
        for name in r.phases[0]:
            diag_rows.append([f"secagg phase: {name}, median (s)",
                              f"{statistics.median(p[name] for p in r.phases):.3f}"])
        diag_rows.append(["coordinator SecAggServer compute per round, median (s)",
                          f"{statistics.median(r.server_compute):.3f}"])
    if r.max_weight_difference is not None:
        diag_rows.append(["max |plain - secagg| weight after all rounds", f"{r.max_weight_difference:.2e}"])
    return main + "\n\nDiagnostics:\n\n" + table(["quantity", "value"], diag_rows)


# ---------------------------------------------------------------------------------------------------


def git_commit() -> str:
    """The checkout's commit (with ``+dirty`` when fedzmq/ has uncommitted changes), or ``unknown``."""
    here = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fedzmq"], cwd=here, capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def torch_version() -> str:
    import torch

    return torch.__version__


def reprint(path: Path) -> int:
    """The tables of a saved ``--json`` file (the formatting of this version of the script)."""
    saved = json.loads(path.read_text())
    args = argparse.Namespace(**saved["args"])
    commits = [saved.get("commit", "unknown"), saved.get("commit_end", saved.get("commit", "unknown"))]
    texts = [f"(fedzmq at {commits[0]}" + (f", {commits[1]} at the end" if commits[1] != commits[0] else "") + ")"]
    if saved.get("part_a"):
        runs = [DemoRun(**r) for r in saved["part_a"]]
        texts.append("## Accuracy vs privacy\n\n" + report_a(runs, part_a_settings(args), args))
    if saved.get("part_b"):
        results = [PartB(**r) for r in saved["part_b"]]
        text = report_b(results[0], args)
        if len(results) > 1:
            text += BLAS_HEADING + report_b(results[1], args)
        texts.append("## Cost of secure aggregation\n\n" + text)
    print("\n\n".join(texts))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("a", "b", "all"), default="all")
    p.add_argument("--quick", action="store_true", help="part A: one seed, 4 workers; part B: 3 timed rounds")
    p.add_argument("--seeds", type=int, nargs="+", help="part A seeds (default 0 1 2; --quick: 0)")
    p.add_argument("--workers", type=int, nargs="+", help="part A worker counts (default 4 8; --quick: 4)")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 4.0, 1.0])
    p.add_argument("--dp-clip", type=float, default=0.1, help="--clip of the DP runs (default 0.1)")
    p.add_argument("--dp-lr", type=float, help="--lr of the DP runs (default: --lr)")
    p.add_argument("--demo-timeout", type=float, default=900.0, help="seconds one demo run may take")
    p.add_argument("--b-workers", type=int, default=8)
    p.add_argument("--reps", type=int, help="part B timed rounds of each mode (default 9; --quick: 3)")
    p.add_argument("--blas-diagnostic", action=argparse.BooleanOptionalAction, default=None,
                   help="part B: repeat with one OpenBLAS thread in the daemons (default: on, off with --quick)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (outputs and logs)")
    p.add_argument("--json", help="write every sample to this file")
    p.add_argument("--report", metavar="JSON", help="print the tables of an earlier run's --json file; run nothing")
    args = p.parse_args(argv)
    if args.report:
        return reprint(Path(args.report))
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.workers = args.workers or ([4] if args.quick else [4, 8])
    args.reps = args.reps or (3 if args.quick else 9)
    if args.blas_diagnostic is None:
        args.blas_diagnostic = not args.quick

    root = Path(tempfile.mkdtemp(prefix="fedzmq-bench-secagg-"))
    commit = git_commit()
    say(f"bench_secagg: fedzmq at {commit}, python {sys.version.split()[0]}, torch {torch_version()}, "
        f"{os.cpu_count()} cpus, load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}; "
        f"working folder {root}")
    out: dict[str, Any] = {"args": dict(vars(args)), "commit": commit, "load_average_start": os.getloadavg()}
    texts = []
    try:
        if args.part in ("a", "all"):
            say("\nPart A: accuracy vs privacy (fedzmq demo)")
            text, runs = part_a(args, root)
            out["part_a"] = [r.__dict__ for r in runs]
            texts.append("## Accuracy vs privacy\n\n" + text)
        if args.part in ("b", "all"):
            say(f"\nPart B: round time of secure aggregation, {args.b_workers} daemons, 10^6 parameters")
            text, results = part_b(args, root)
            out["part_b"] = [r.__dict__ for r in results]
            texts.append("## Cost of secure aggregation\n\n" + text)
    finally:
        if args.keep:
            say(f"outputs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    out["load_average_end"] = os.getloadavg()
    out["commit_end"] = git_commit()
    say(f"\nload average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}; fedzmq at {git_commit()}"
        + (" (changed during the run!)" if git_commit() != commit else "") + "\n")
    say("\n\n".join(texts))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
