"""``fedzmq``: the command line.

    fedzmq demo                      the main job: digits, non-IID over 4 local daemons, FedAvg
    fedzmq simulate --clients 1000   many clients on one machine, hosted by a few real daemons
    fedzmq train --config run.toml   a training over running daemons, from a TOML file or flags
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import math
import shutil
import sys
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .client.addresses import check_address
from .errors import AddressError, CheckpointMismatch, WorkerError
from .federated.base import Strategy, strategy_name
from .federated.fedbuff import STALENESS, FedBuff
from .federated.federation import Federation, FitConfig, RoundFailed, fixed_sample_size, sampling_rate
from .federated.metrics import RoundMetrics, plot, summary_table
from .federated.strategies import STRATEGIES
from .optimizers import DEFAULT_OPTIMIZER
from .worker.config import WorkerConfig

if TYPE_CHECKING:
    from .client.worker import RemoteWorker

#: the strategies ``--strategy`` names: every synchronous one of ``make_strategy``, and FedBuff, whose rounds
#: are asynchronous (a round is one publication of K updates; ``Federation.run`` runs either)
CLI_STRATEGIES: dict[str, type[Strategy]] = {**STRATEGIES, "fedbuff": FedBuff}

#: flags (and TOML keys) that are a strategy's constructor arguments; each applies to the strategies that take it
STRATEGY_FLAGS = ("buffer_size", "staleness", "max_staleness", "server_learning_rate", "server_momentum",
                  "proximal_mu")


#: the ways a round's participants are drawn (``Federation``'s ``sampling``)
SAMPLINGS = ("fixed", "poisson")


def _add_training_flags(p: argparse.ArgumentParser, config: bool = False) -> None:
    """The flags every command that trains takes (``config``: the command also reads a ``--config`` file,
    where the strategies' other arguments go; demo and simulate take only these flags)."""
    others = "strategy_args of a --config file" if config else "fedzmq train's TOML file (strategy_args) or Python"
    p.add_argument("--rounds", type=int, help="rounds in total (default 40; a resumed run continues to this)")
    p.add_argument("--strategy", help=f"one of {sorted(CLI_STRATEGIES)} (default fedavg)")
    p.add_argument("--buffer-size", type=int, help="fedbuff: updates per publication, K (default 10)")
    p.add_argument("--staleness", choices=sorted(STALENESS), help="fedbuff: an update tau versions old weighs "
                   "1/sqrt(1 + tau) (sqrt, the default) or 1 (constant)")
    p.add_argument("--max-staleness", type=int, help="fedbuff: drop updates staler than this (default: keep all)")
    p.add_argument("--server-learning-rate", type=float, help="fedbuff and fedavgm: the server's step on the "
                   "round's mean (default 1.0)")
    p.add_argument("--server-momentum", type=float, help="fedavgm: the server's momentum (default 0.0)")
    p.add_argument("--proximal-mu", type=float, help="fedprox: the proximal term's weight mu (default 0.01); the "
                   f"other strategies' arguments go in {others}")
    p.add_argument("--local-epochs", type=int, help="local epochs per round (default 2)")
    p.add_argument("--local-steps", type=int, help="local steps per round instead of epochs (0: no training, the "
                   "round trip alone, to measure the framework)")
    p.add_argument("--batch-size", type=int, help="local minibatch size (default 32)")
    p.add_argument("--lr", type=float, help="local SGD learning rate (default 0.1)")
    p.add_argument("--fraction", type=float, help="fraction of workers per round (default 1.0)")
    p.add_argument("--sampling", choices=SAMPLINGS, help="fixed: exactly fraction x workers each round "
                   "(the default); poisson: each worker independently with probability --fraction, the sampling "
                   "under which --dp-epsilon's accounting may claim amplification")
    p.add_argument("--min-workers", type=int, help="updates a round needs to succeed (default 1)")
    p.add_argument("--round-timeout", type=float, help="seconds a round may take (default 60)")
    p.add_argument("--seed", type=int, help="seed for the model, the split, sampling and the shuffles of the daemons "
                   "these commands launch: a rerun with the same seed repeats the run (default 0)")
    p.add_argument("--out", help="folder for metrics.jsonl, plot.png and checkpoints (default runs/<command>)")
    p.add_argument("--no-progress", action="store_true", default=None,
                   help="no progress bar: each round's metrics as one JSON line on stdout instead (for logs)")
    p.add_argument("--secure-aggregation", action="store_true", default=None,
                   help="the coordinator sees only the sum of the updates (Bonawitz et al. secure aggregation)")
    p.add_argument("--dp-epsilon", type=float, help="central differential privacy: noise calibrated so that "
                   "all rounds together spend this epsilon (implies --secure-aggregation)")
    p.add_argument("--dp-delta", type=float, help="the delta of the DP guarantee (default 1e-5)")
    p.add_argument("--clip", type=float, help="L2 bound on each worker's update under secure aggregation "
                   "(default: no clipping; 1 with --dp-epsilon)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedzmq", description="Federated learning for PyTorch over ZeroMQ.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train on scikit-learn's digits over local worker daemons (the main job)")
    demo.add_argument("--workers", type=int, default=4, help="worker daemons to launch (default 4)")
    demo.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha of the non-IID split (default 0.5)")
    demo.add_argument("--secure", action="store_true", help="generate keys on the fly: encrypted, authenticated "
                                                            "connections (CurveZMQ)")
    demo.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out instead of "
                                                            "starting afresh")
    _add_training_flags(demo)

    simulate = sub.add_parser("simulate", help="many clients on one machine: a make_classification task split "
                              "non-IID over --clients logical clients, hosted by --daemons real daemons")
    simulate.add_argument("--clients", type=int, default=1000, help="logical clients (default 1000)")
    simulate.add_argument("--daemons", type=int, default=2, help="daemons hosting them (default 2)")
    simulate.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha of the non-IID split (default 0.5)")
    simulate.add_argument("--samples", type=int, help="samples in all (default 100 per client)")
    simulate.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    _add_training_flags(simulate)

    keygen = sub.add_parser("keygen", help="write a CurveZMQ key pair (NAME.key public, NAME.key_secret secret)")
    keygen.add_argument("name", help="the key's name, e.g. bob or coordinator")
    keygen.add_argument("--dir", default="keys", help="folder to write the files to (default ./keys)")
    keygen.add_argument("--force", action="store_true", help="replace a key pair of that name (its old secret key "
                        "is lost: every side that allowed its public key must be given the new one)")

    train = sub.add_parser("train", help="train over running worker daemons")
    train.add_argument("--config", help="TOML file with the settings below (flags win)")
    train.add_argument("--worker", action="append", dest="workers", metavar="ADDRESS", help="a daemon (repeatable)")
    train.add_argument("--server-key", action="append", dest="server_keys", metavar="FILE",
                       help="each daemon's public key file, in the order of --worker (turns keys on)")
    train.add_argument("--client-key", help="this coordinator's .key_secret file (with --server-key)")
    train.add_argument("--test-data", help="a local safetensors file (x, y) for central evaluation each round")
    train.add_argument("--dataset", help="the dataset name every worker holds")
    train.add_argument("--model", help="mlp or logreg (default mlp)")
    train.add_argument("--in-features", type=int, help="input features of the model")
    train.add_argument("--classes", type=int, help="output classes of the model")
    train.add_argument("--hidden", type=int, help="hidden units of the mlp (default 64)")
    train.add_argument("--resume", action="store_true", default=None,
                       help="continue from the checkpoint in --out instead of starting afresh")
    _add_training_flags(train, config=True)
    return parser


DEFAULTS: dict[str, Any] = {"rounds": 40, "strategy": "fedavg", "local_epochs": 2, "local_steps": None,
                            "batch_size": 32, "lr": DEFAULT_OPTIMIZER["lr"], "fraction": 1.0, "sampling": "fixed",
                            "min_workers": 1,
                            "round_timeout": 60.0,
                            "seed": 0, "no_progress": False, "model": "mlp", "hidden": 64, "strategy_args": {}}


#: TOML keys spelled as the repeatable flag is (``--worker``), for the setting it fills (``workers``)
CONFIG_ALIASES = {"worker": "workers", "server_key": "server_keys"}


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """DEFAULTS, then the ``--config`` TOML file, then the flags given. A key of the file that names no
    setting is an error: a typo (``local_epoch``) used to be ignored, and the run took the default."""
    settings = dict(DEFAULTS)
    if getattr(args, "config", None):
        with open(args.config, "rb") as f:
            given = {k.replace("-", "_"): v for k, v in tomllib.load(f).items()}
        given = {CONFIG_ALIASES.get(k, k): v for k, v in given.items()}
        known = (set(vars(args)) | set(DEFAULTS)) - {"command", "config"}
        unknown = sorted(set(given) - known)
        if unknown:  # a usage error, as a flag that does not exist is (exit code 2)
            print(f"fedzmq {args.command}: {args.config} has keys that are no settings: {', '.join(unknown)} "
                  f"(settings are the flags' names with underscores: {', '.join(sorted(known))})", file=sys.stderr)
            raise SystemExit(2)
        settings.update(given)
    settings.update({k: v for k, v in vars(args).items() if v is not None})
    settings.setdefault("out", f"runs/{args.command}")
    return settings


def base_strategy(settings: dict[str, Any]) -> Strategy:
    """The strategy ``--strategy`` names, with its arguments: ``strategy_args`` of the TOML file, and the
    strategy flags given (they win). A flag the strategy does not take is an error, not silently ignored."""
    name = str(settings["strategy"]).lower()
    cls = CLI_STRATEGIES.get(name)
    if cls is None:
        raise ValueError(f"unknown strategy {settings['strategy']!r}; known: {', '.join(sorted(CLI_STRATEGIES))}")
    kwargs = dict(settings.get("strategy_args", {}))
    takes = inspect.signature(cls.__init__).parameters
    for key in STRATEGY_FLAGS:
        if settings.get(key) is not None:
            if key not in takes:
                raise ValueError(f"--{key.replace('_', '-')} does not apply to --strategy {name}")
            kwargs[key] = settings[key]
    return cls(**kwargs)


def fit_config(settings: dict[str, Any], dataset: str) -> FitConfig:
    """The local training the flags ask for (``FitConfig`` checks its own values)."""
    steps = settings.get("local_steps")
    return FitConfig(dataset=dataset, optimizer={"cls": "SGD", "lr": settings["lr"]},
                     epochs=None if steps is not None else settings["local_epochs"], steps=steps,
                     batch_size=settings["batch_size"])


def _out_of_range(settings: dict[str, Any], flag: str, least: float, most: float = math.inf,
                  open_below: bool = False) -> str | None:
    """``--flag must be ...`` when the setting is given and outside its range (NaN included), else None."""
    value = settings.get(flag.replace("-", "_"))
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):  # (a TOML file's "0.5", say)
        return f"--{flag} must be a number, got {value!r}"
    if flag in INTEGER_FLAGS and not isinstance(value, int):  # (a TOML file's 2.5: argparse refuses --rounds 2.5)
        return f"--{flag} must be an integer, got {value!r}"  # (3.0 as written: "got 3" looked like an integer)
    above = value > least if open_below else value >= least
    if above and value <= most:
        return None
    low = f"> {_number(least)}" if open_below else f">= {_number(least)}"
    return f"--{flag} must be {low}{'' if most == math.inf else f' and <= {_number(most)}'}, got {_number(value)}"


def _number(value: float) -> str:
    """``2``, ``1.5``, ``nan``: as the user would have typed it."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


#: (flag, least, most, open below) of the numbers every command takes; checked before anything starts
TRAINING_RANGES: tuple[tuple[str, float, float, bool], ...] = (
    ("rounds", 1, math.inf, False), ("fraction", 0, 1, True), ("min-workers", 1, math.inf, False),
    ("round-timeout", 0, math.inf, True), ("lr", 0, math.inf, False), ("clip", 0, math.inf, True),
    ("dp-epsilon", 0, math.inf, True), ("dp-delta", 0, 1, True), ("seed", -math.inf, math.inf, False))

#: the flags of those ranges that argparse reads with ``type=int``: a --config file's values are checked here
INTEGER_FLAGS = frozenset({"rounds", "min-workers", "seed", "workers", "clients", "daemons", "samples",
                           "in-features", "classes", "hidden"})

#: the same for one command's own flags; ``seed`` feeds numpy and scikit-learn there, which take 0 to 2^32 - 1
COMMAND_RANGES: dict[str, tuple[tuple[str, float, float, bool], ...]] = {
    "demo": (("workers", 1, math.inf, False), ("alpha", 0, math.inf, True), ("seed", 0, 2**32 - 1, False)),
    "simulate": (("clients", 1, math.inf, False), ("daemons", 1, math.inf, False), ("samples", 1, math.inf, False),
                 ("alpha", 0, math.inf, True), ("seed", 0, 2**32 - 1, False)),
    "train": (("in-features", 1, math.inf, False), ("classes", 1, math.inf, False), ("hidden", 1, math.inf, False)),
}


def settings_problem(settings: dict[str, Any]) -> str | None:
    """Why the numbers given cannot make a run (checked before any data is written or daemon starts), or
    None. Each used to surface later as a traceback from deep inside (scikit-learn's split, ``Federation``,
    ``FitConfig``), some only after the daemons had started, and ``--rounds 0`` ran nothing and said so
    with exit code 0."""
    for flag, least, most, open_below in (*TRAINING_RANGES, *COMMAND_RANGES.get(settings["command"], ())):
        problem = _out_of_range(settings, flag, least, most, open_below)
        if problem:
            return problem
    if settings["command"] == "simulate" and settings["daemons"] > settings["clients"]:
        return f"--daemons {settings['daemons']} is more than --clients {settings['clients']}: a daemon would host none"
    if settings["sampling"] not in SAMPLINGS:  # (a --config file's; argparse checks the flag's choices)
        return f"--sampling must be one of {', '.join(SAMPLINGS)}, got {settings['sampling']!r}"
    if settings.get("dp_delta") == 1:  # a probability of failure: (0, 1) open at both ends
        return "--dp-delta must be > 0 and < 1, got 1"
    return unused_privacy_flag(settings) or fit_problem(settings) or secure_round_problem(settings)


def too_few_per_round(strategy: Strategy, workers: int, settings: dict[str, Any]) -> str | None:
    """Why ``workers`` connected workers give the strategy too few updates a round, or None: in the flags'
    words, where ``Federation`` would raise its ``ValueError`` (a secure round takes 2: ``train
    --secure-aggregation`` over one owner's daemon, which used to fail its first round instead)."""
    per_round = fixed_sample_size(settings["fraction"], workers, round_minimum(settings))
    if per_round >= strategy.min_updates:
        return None
    return (f"{strategy_name(strategy)} needs at least {strategy.min_updates} workers a round; this run takes "
            f"{per_round} of its {workers} (--fraction {_number(settings['fraction'])}, --min-workers "
            f"{settings['min_workers']})")


def secure_round_problem(settings: dict[str, Any]) -> str | None:
    """Why the secure rounds of ``demo`` or ``simulate`` cannot run, or None: the daemons these commands start
    keep the default terms, which join a secure round only of at least ``--secagg-min-clients`` clients, and a
    run of fewer per round failed every round, after its daemons had started (``train``'s daemons are the
    owners', whose terms it cannot know)."""
    secure = settings.get("secure_aggregation") or settings.get("dp_epsilon") is not None
    population = {"demo": settings.get("workers"), "simulate": settings.get("clients")}.get(settings["command"])
    if not secure or not isinstance(population, int):
        return None
    fraction = settings["fraction"]
    per_round = fixed_sample_size(fraction, population, settings["min_workers"]) \
        if settings["sampling"] == "fixed" else fraction * population  # Poisson: on average
    least = WorkerConfig().secagg_min_clients
    if per_round >= least:
        return None
    who = "--workers" if settings["command"] == "demo" else "--clients"
    return (f"secure aggregation needs at least {least} clients per round (the daemons' --secagg-min-clients); "
            f"this run gives {_number(per_round)} clients per round (--fraction {_number(fraction)} of "
            f"{_number(population)}): raise --fraction or {who}")


def round_minimum(settings: dict[str, Any]) -> int:
    """``--min-workers``, raised to the daemons' ``--secagg-min-clients`` in a secure demo or simulate under
    Poisson sampling: a draw of fewer clients is then a skipped round (as any draw below ``--min-workers``
    is), where it failed the whole run after its daemons had started (``secure_round_problem`` checks the
    draws' mean only: 0.5 of 6 clients, and round 2 of 20 failed). Its own daemons' minimum is known; an
    owner's (``train``) is not."""
    secure = settings.get("secure_aggregation") or settings.get("dp_epsilon") is not None
    if secure and settings["sampling"] == "poisson" and settings["command"] in ("demo", "simulate"):
        return max(settings["min_workers"], WorkerConfig().secagg_min_clients)
    return settings["min_workers"]


def unused_privacy_flag(settings: dict[str, Any]) -> str | None:
    """``--clip`` without secure aggregation, or ``--dp-delta`` without ``--dp-epsilon``: the run would
    ignore it, and a user who asked for clipped updates would believe they were (a strategy flag that
    does not apply is refused the same way)."""
    secure = settings.get("secure_aggregation") or settings.get("dp_epsilon") is not None
    if settings.get("clip") is not None and not secure:
        return "--clip bounds updates under secure aggregation: give --secure-aggregation or --dp-epsilon too"
    if settings.get("dp_delta") is not None and settings.get("dp_epsilon") is None:
        return "--dp-delta is the delta of --dp-epsilon's guarantee: give --dp-epsilon too"
    return None


def fit_problem(settings: dict[str, Any]) -> str | None:
    """Why the local-training flags make no ``FitConfig``, in the flags' names, or None."""
    try:
        fit_config(settings, "data")
    except ValueError as exc:  # its messages name the field: map them to the flags
        return str(exc).replace("FitConfig epochs", "--local-epochs").replace(
            "FitConfig steps", "--local-steps").replace("FitConfig batch_size", "--batch-size")
    return None


#: the flags that make the data ``demo`` and ``simulate`` train on (the task, its split, the clients)
POPULATION_FLAGS = {"demo": ("workers", "alpha", "seed"), "simulate": ("clients", "samples", "alpha", "seed")}


def population_flags(settings: dict[str, Any]) -> dict[str, Any] | None:
    """What the run's data is made from (``--samples`` as the count it stands for), or None for ``train``,
    whose data is the daemons'."""
    keys = POPULATION_FLAGS.get(settings["command"])
    if keys is None:
        return None
    made = {key: settings.get(key) for key in keys}
    if "samples" in made and made["samples"] is None:
        made["samples"] = 100 * settings["clients"]
    return made


def resume_problem(settings: dict[str, Any]) -> str | None:
    """Why ``--resume`` cannot continue the run in ``--out``, or None. The checkpoint refuses another model or
    strategy, but demo and simulate make their data anew from the flags: a resume given another ``--seed``
    (another make_classification task), ``--clients`` or ``--alpha`` went on training the checkpoint's model
    on other data, and said nothing. ``population.json`` in ``--out`` keeps what the run was made from."""
    made = population_flags(settings)
    record = Path(settings["out"]) / "population.json"
    if made is None or not settings.get("resume") or not record.exists():
        return None
    saved = json.loads(record.read_text())
    differ = [key for key in made if saved.get(key) != made[key]]
    if not differ:
        return None
    return (f"--resume continues the run in {settings['out']}, made with "
            + ", ".join(f"--{key} {saved.get(key)}" for key in differ) + "; this command gives "
            + ", ".join(f"--{key} {made[key]}" for key in differ)
            + " (give the run's values, or another --out to start a new run)")


def record_population(settings: dict[str, Any]) -> None:
    """Keep what this run's data is made from, for a later ``--resume`` (``resume_problem``)."""
    made = population_flags(settings)
    if made is not None:
        out = Path(settings["out"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "population.json").write_text(json.dumps(made))


def strategy_problem(settings: dict[str, Any]) -> str | None:
    """Why the strategy settings cannot run (checked before any daemon starts), or None."""
    try:
        strategy = base_strategy(settings)
        if settings.get("secure_aggregation") or settings.get("dp_epsilon") is not None:
            from .federated.secure import SecAgg

            SecAgg(strategy)  # refuses strategies that need each update on its own (FedBuff, Krum, ...)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


def _strategy(settings: dict[str, Any]) -> Any:
    """The strategy the flags name, wrapped in secure aggregation (and DP) when asked."""
    strategy = base_strategy(settings)
    epsilon = settings.get("dp_epsilon")
    if not settings.get("secure_aggregation") and epsilon is None:
        return strategy
    from .federated.secure import SecAgg

    delta = settings.get("dp_delta") or 1e-5
    if epsilon is None:
        return SecAgg(strategy, clip=settings.get("clip"))  # None: no clipping, the exact mean
    from .secagg import noise_multiplier_for_epsilon

    rate = sampling_rate(settings["sampling"], settings["fraction"])  # what the run's accountant amplifies by
    sigma = noise_multiplier_for_epsilon(epsilon, delta, settings["rounds"], rate)
    print(f"differential privacy: noise multiplier {sigma:.3f} for epsilon {epsilon} at delta {delta} over "
          f"{settings['rounds']} rounds at sampling rate {rate:g}", file=sys.stderr)
    return SecAgg(strategy, clip=settings.get("clip") or 1.0, noise_multiplier=sigma, delta=delta,
                  target_epsilon=epsilon)


class Progress:
    """A progress bar over rounds with the live loss and accuracy, and one JSON line per round."""

    def __init__(self, total: int, done: int, metrics_path: Path, show: bool) -> None:
        self.metrics_file = open(metrics_path, "a")
        self.bar = None
        if show:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=done, unit="round", desc="federated training",
                            dynamic_ncols=True, file=sys.stderr)

    def __call__(self, metrics: RoundMetrics) -> None:
        self.metrics_file.write(metrics.to_json() + "\n")
        self.metrics_file.flush()
        if self.bar is not None:
            postfix = {"loss": f"{metrics.train_loss:.3f}"}
            if metrics.eval_accuracy is not None:
                postfix["test_acc"] = f"{metrics.eval_accuracy:.1%}"
            if metrics.epsilon is not None:
                postfix["eps"] = f"{metrics.epsilon:.2f}"
            postfix["moved"] = f"{(metrics.bytes_sent + metrics.bytes_received) / 1e6:.1f}MB"
            postfix["rate"] = f"{metrics.transfer_mb_per_s:.0f}MB/s"
            if metrics.dropped:
                postfix["dropped"] = ",".join(sorted(metrics.dropped))
            self.bar.set_postfix(postfix)
            self.bar.update(1)
        else:
            print(metrics.to_json(), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.metrics_file.close()


async def _train(addresses: Sequence[str], model: torch.nn.Module, settings: dict[str, Any], dataset: str,
                 evaluate: Any, keys: Sequence[dict[str, Any]] | None = None,
                 hosted_clients: bool = False) -> Federation:
    """Train ``model`` over the daemons at ``addresses`` (with ``hosted_clients``: over every logical client
    they host, ``--clients-from``)."""
    from .client.connecting import Connecting
    from .client.worker import RemoteWorker

    out = Path(settings["out"])
    out.mkdir(parents=True, exist_ok=True)
    checkpoints = out / "checkpoints"
    if settings.get("resume"):
        print(f"resuming from the checkpoints in {checkpoints} (if any)")
    elif any(checkpoints.glob("round-*")):
        print(f"starting afresh: the checkpoints of a previous run in {checkpoints} are replaced "
              "(pass --resume to continue that run instead)")
        shutil.rmtree(checkpoints, ignore_errors=True)
    workers = [RemoteWorker(a, **(keys[n] if keys else {})) for n, a in enumerate(addresses)]
    try:
        # connected together, and closed together (Ctrl-C stops every wait at once, not one after another)
        await asyncio.gather(*(Connecting(w) for w in workers))  # (a worker that does not answer: what to check)
        if hosted_clients:
            hosts, workers = workers, [c for clients in await asyncio.gather(*(h.clients() for h in workers))
                                       for c in clients]
            await asyncio.gather(*(h.close() for h in hosts))  # the clients hold the connections now
        else:
            await check_datasets(workers, dataset, settings)
        strategy = _strategy(settings)
        fit = fit_config(settings, dataset)
        problem = too_few_per_round(strategy, len(workers), settings)
        if problem:
            raise SystemExit(f"fedzmq {settings['command']}: {problem}")
        federation = Federation(workers, model, fit, strategy, fraction=settings["fraction"],
                                sampling=settings["sampling"],
                                min_workers=round_minimum(settings), round_timeout=settings["round_timeout"],
                                seed=settings["seed"], checkpoint_dir=str(checkpoints), evaluate=evaluate,
                                evaluate_on_workers=evaluate is None)
        if federation.resumed_from:
            print(resume_note(federation.resumed_from, settings["rounds"]))
        # the checkpoint's history is the record: the JSON lines are rewritten from it, so a round is
        # never listed twice or lost, wherever a previous coordinator was killed
        (out / "metrics.jsonl").write_text("".join(m.to_json() + "\n" for m in federation.history))
        progress = Progress(settings["rounds"], federation.round, out / "metrics.jsonl", not settings["no_progress"])
        try:
            await federation.run(settings["rounds"], on_round=progress)
        finally:
            progress.close()
        return federation
    finally:
        await asyncio.gather(*(w.close() for w in workers), return_exceptions=True)


def resume_note(resumed_from: int, rounds: int) -> str:
    """What a resumed run will do: ``--rounds`` counts rounds in all, so a checkpoint at or past it trains
    nothing, which "training to round 3" after round 45 did not say."""
    head = f"resumed from the checkpoint of round {resumed_from}"
    if resumed_from >= rounds:
        return f"{head}; that is already --rounds {rounds} or more, so nothing is trained (raise --rounds to go on)"
    return f"{head}; training to round {rounds}"


async def check_datasets(workers: Sequence[RemoteWorker], dataset: str, settings: dict[str, Any]) -> None:
    """Refuse, before the first round, a run whose model cannot take a worker's rows: the daemons list
    their datasets' shapes (public), while a forward that fails on protected rows may only say that
    it failed (a newcomer's --in-features 32 on 64 features got a withheld message every round)."""
    for worker in workers:
        listing = {d.name: d for d in await worker.datasets()}
        found = listing.get(dataset)
        if found is None:
            hosts = len(await worker.clients())
            hint = (f"; it hosts {hosts} logical clients (--clients-from), whose datasets fedzmq simulate or "
                    "fz.connect_clients reach") if hosts else ""
            raise SystemExit(f"fedzmq {settings['command']}: no dataset {dataset!r} on {worker.id!r} (it has: "
                             f"{', '.join(sorted(listing)) or 'none'}){hint}")
        shape, wanted = tuple(found.feature_shape), settings.get("in_features")
        if wanted is not None and shape != (wanted,):  # (the demo and simulate size their models themselves)
            what = f"{shape[0]} features" if len(shape) == 1 else f"shape {shape} (the models here take flat rows)"
            raise SystemExit(f"fedzmq {settings['command']}: the rows of {dataset!r} on {worker.id!r} have "
                             f"{what}; --in-features is {wanted}")
        if found.num_classes is not None and settings.get("classes") is not None and \
                found.num_classes > settings["classes"]:
            raise SystemExit(f"fedzmq {settings['command']}: {dataset!r} on {worker.id!r} has labels up to "
                             f"{found.num_classes - 1}; --classes is {settings['classes']}")


def exit_summary(codes: dict[str, int]) -> str:
    """How the launched daemons ended: 'all 4 daemons exited with 0', or each one's code."""
    if len(codes) == 1:
        [(name, code)] = codes.items()
        return f"daemon {name} exited with {code}"
    if len(set(codes.values())) == 1:
        return f"all {len(codes)} daemons exited with {next(iter(codes.values()))}"
    return "daemons exited with " + ", ".join(f"{name} {code}" for name, code in codes.items())


def shuffle_args(seed: int, worker: str) -> list[str]:
    """The shuffle secret of a daemon these commands launch, from the run's seed: the daemons are the
    user's own, so the run repeats (a data owner's daemon draws its secret, unknown to coordinators)."""
    return ["--shuffle-secret", f"fedzmq-{seed}-{worker}"]


def privacy_spent(federation: Federation, settings: dict[str, Any]) -> str:
    """``, epsilon spent E at delta D`` after a DP run (what its rounds cost together), else nothing."""
    epsilon = federation.history[-1].epsilon if federation.history else None
    if epsilon is None:
        return ""
    return f", epsilon spent {epsilon:.2f} at delta {settings.get('dp_delta') or 1e-5}"


def run_demo(settings: dict[str, Any]) -> int:
    from .examples import digits
    from .launcher import start_daemons, stop_all

    torch.set_num_threads(1)  # the daemons share the machine's cores with us
    out = Path(settings["out"])
    if not settings.get("resume"):
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    ids = [f"owner{i}" for i in range(settings["workers"])]
    try:
        split = digits.prepare(out / "data", ids, alpha=settings["alpha"], seed=settings["seed"])
    except ValueError as exc:  # digits' 1,797 rows over too many --workers, say
        print(f"fedzmq demo: {exc} (give fewer --workers or a larger --alpha)", file=sys.stderr)
        return 2
    record_population(settings)
    print(f"digits split non-IID (Dirichlet alpha={settings['alpha']}) over {len(ids)} data owners:")
    for worker, counts in split.sizes.items():
        print(f"  {worker}: {sum(counts):4d} samples, per class {counts}")
    started = time.perf_counter()
    daemon_args = {w: ["--data", f"{digits.DATASET}={p}", *shuffle_args(settings["seed"], w)]
                   for w, p in split.shards.items()}
    provisioned = None
    if settings.get("secure"):
        from .security import provision_keys

        shutil.rmtree(out / "keys", ignore_errors=True)
        provisioned = provision_keys(out / "keys", ids)
        daemon_args = {w: [*a, *provisioned.daemon_args(w)] for w, a in daemon_args.items()}
    daemons = start_daemons(ids, per_daemon_args=daemon_args, log_dir=str(out / "logs"))
    print(f"launched {len(daemons)} worker daemons{' with keys (CurveZMQ)' if provisioned else ''}: "
          + ", ".join(f"{d.id}@{d.address}" for d in daemons))
    keys = [provisioned.connect_kwargs(d.id) for d in daemons] if provisioned else None
    try:
        model = digits.make_model(seed=settings["seed"])
        x_test, y_test = split.test
        federation = asyncio.run(_train([d.address for d in daemons if d.address], model, settings, digits.DATASET,
                                        lambda m: digits.evaluate(m, x_test, y_test), keys))
    finally:
        codes = stop_all(daemons)
    epochs = settings["rounds"] * (settings["local_epochs"] or 1)
    central = digits.train_centrally(digits.make_model(seed=settings["seed"]), *split.train, epochs=epochs,
                                     lr=settings["lr"], batch_size=settings["batch_size"], seed=settings["seed"])
    central_result = digits.evaluate(central, x_test, y_test)
    final = digits.evaluate(model, x_test, y_test)
    print()
    print(summary_table(federation.history))
    path = plot(federation.history, out / "plot.png",
                title=f"{settings['strategy']} on digits, {len(ids)} non-IID data owners",
                reference_accuracy=central_result["accuracy"])
    print()
    if federation.stopped_early:
        print(federation.stopped_early)
    label = strategy_name(federation.strategy)
    print(f"final test accuracy, federated ({label}, {federation.round} rounds{privacy_spent(federation, settings)}): "
          f"{final['accuracy']:.2%}")
    print(f"final test accuracy, centralized training of the same model ({epochs} epochs): "
          f"{central_result['accuracy']:.2%}")
    print(f"difference: {(final['accuracy'] - central_result['accuracy']) * 100:+.2f} points; "
          f"time {time.perf_counter() - started:.1f}s; {exit_summary(codes)}")
    print(f"plot: {path}   metrics: {out / 'metrics.jsonl'}   checkpoints: {out / 'checkpoints'}")
    (out / "result.json").write_text(json.dumps({"federated_accuracy": final["accuracy"],
                                                 "centralized_accuracy": central_result["accuracy"],
                                                 "rounds": federation.round}, indent=1))
    return 0


def run_simulate(settings: dict[str, Any]) -> int:
    from .examples import population
    from .launcher import start_daemons, stop_all

    torch.set_num_threads(1)  # the daemons share the machine's cores with us
    out = Path(settings["out"])
    started = time.perf_counter()
    try:
        data = population.prepare(out / "data", settings["clients"], settings["daemons"],
                                  samples=settings.get("samples"), alpha=settings["alpha"], seed=settings["seed"])
    except ValueError as exc:  # the split's own words, before any daemon starts: not a traceback
        print(f"fedzmq simulate: {exc} (give more --samples, fewer --clients or a larger --alpha)", file=sys.stderr)
        return 2
    record_population(settings)
    print(f"{data.clients} clients (make_classification, non-IID with Dirichlet alpha={settings['alpha']}, "
          f"{len(data.train[1])} training samples) on {settings['daemons']} daemons")
    ids = [f"host{k}" for k in range(settings["daemons"])]
    # the simulation's daemons and its coordinator are one person's: SecAgg+ rounds are welcome
    terms = ["--min-batch-size", str(min(population.MIN_ROWS, settings["batch_size"])), "--min-metric-rows", "1",
             "--secagg-allow-sparse"]
    daemons = start_daemons(ids, per_daemon_args={
        host: ["--clients-from", f"{population.DATASET}={folder}", *terms, *shuffle_args(settings["seed"], host)]
        for host, folder in zip(ids, data.folders)},
        log_dir=str(out / "logs"))
    try:
        model = population.make_model(data.features, data.classes, seed=settings["seed"])
        x_test, y_test = data.test
        from .examples.digits import evaluate as evaluate_on
        federation = asyncio.run(_train([d.address for d in daemons if d.address], model, settings,
                                        population.DATASET, lambda m: evaluate_on(m, x_test, y_test),
                                        hosted_clients=True))
    finally:
        stop_all(daemons)
    history = federation.history
    print()
    print(summary_table(history))
    if history:
        seconds = sorted(m.seconds for m in history)
        print(f"\n{len(history[-1].participants)} clients in the last round; median round "
              f"{seconds[len(seconds) // 2]:.3f}s; final test accuracy {history[-1].eval_accuracy:.2%}"
              f"{privacy_spent(federation, settings)}; total {time.perf_counter() - started:.1f}s")
    print(f"metrics: {out / 'metrics.jsonl'}   checkpoints: {out / 'checkpoints'}")
    if federation.stopped_early:
        print(federation.stopped_early)
    return 0


def run_train(settings: dict[str, Any]) -> int:
    from torch import nn

    torch.set_num_threads(1)
    addresses = settings.get("workers") or []
    if not addresses or not settings.get("dataset"):
        print("fedzmq train: give the workers (--worker ADDRESS, repeatable) and --dataset", file=sys.stderr)
        return 2
    for address in addresses:  # all of them before connecting to any
        try:
            check_address(address)
        except AddressError as exc:
            print(f"fedzmq train: --worker {exc}", file=sys.stderr)
            return 2
    if not settings.get("in_features") or not settings.get("classes"):
        print("fedzmq train: give --in-features and --classes for the model", file=sys.stderr)
        return 2
    torch.manual_seed(settings["seed"])
    if settings["model"] == "logreg":
        model: nn.Module = nn.Linear(settings["in_features"], settings["classes"])
    else:
        model = nn.Sequential(nn.Linear(settings["in_features"], settings["hidden"]), nn.ReLU(),
                              nn.Linear(settings["hidden"], settings["classes"]))
    keys = None
    if settings.get("server_keys") or settings.get("client_key"):
        if len(settings.get("server_keys") or []) != len(addresses) or not settings.get("client_key"):
            print("fedzmq train: give one --server-key per --worker, and --client-key", file=sys.stderr)
            return 2
        keys = [{"server_key": k, "client_key": settings["client_key"]} for k in settings["server_keys"]]
    evaluate = None
    if settings.get("test_data"):
        from safetensors.torch import load_file

        from .examples.digits import evaluate as evaluate_on
        test = load_file(settings["test_data"])
        evaluate = lambda m: evaluate_on(m, test["x"], test["y"])  # noqa: E731
    federation = asyncio.run(_train(addresses, model, settings, settings["dataset"], evaluate, keys))
    print(summary_table(federation.history))
    last = federation.history[-1] if federation.history else None
    if last is not None and last.eval_accuracy is not None:
        print(f"final test accuracy: {last.eval_accuracy:.2%}")
    privacy = privacy_spent(federation, settings)
    if privacy:
        print(privacy.removeprefix(", "))
    if last is not None and last.worker_eval_accuracy is not None:
        print(f"final accuracy on the last round's {len(last.participants)} participants' own data "
              f"(sample-weighted): {last.worker_eval_accuracy:.2%}")
    print(f"plot: {plot(federation.history, Path(settings['out']) / 'plot.png')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "keygen":
        from .security import generate_keypair

        existing = [p for p in (Path(args.dir) / f"{args.name}.key", Path(args.dir) / f"{args.name}.key_secret")
                    if p.exists()]
        if existing and not args.force:
            print(f"fedzmq keygen: {existing[0]} exists; pass --force to replace the key pair (the old secret key "
                  "is then lost)", file=sys.stderr)
            return 2
        public, secret = generate_keypair(args.dir, args.name)
        print(f"public key (give it to the other side): {public}\nsecret key (keep it here): {secret}")
        return 0
    settings = settings_from(args)
    problem = settings_problem(settings) or strategy_problem(settings) or resume_problem(settings)
    if problem is not None:
        print(f"fedzmq {args.command}: {problem}", file=sys.stderr)
        return 2
    try:
        if args.command == "demo":
            return run_demo(settings)
        if args.command == "simulate":
            return run_simulate(settings)
        return run_train(settings)
    except RoundFailed as exc:
        print(f"fedzmq: {exc}", file=sys.stderr)
        return 1
    except CheckpointMismatch as exc:  # --resume (or --out) pointing at another run's checkpoints
        print(f"fedzmq {args.command}: {exc}", file=sys.stderr)
        return 2
    except AddressError as exc:  # a host that does not resolve (a malformed address is caught before)
        print(f"fedzmq: {exc}", file=sys.stderr)
        return 2
    except WorkerError as exc:  # a daemon that does not answer, or died: one line saying so, not a traceback
        print(f"fedzmq: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedzmq: interrupted; every round that finished is in the checkpoint (--resume goes on from it; "
              "there is none if no round finished)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
