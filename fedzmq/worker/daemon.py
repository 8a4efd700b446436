"""``fedzmq-worker``: run a worker daemon until SIGTERM or SIGINT.

    fedzmq-worker --id bob --bind tcp://127.0.0.1:5555

Settings come from flags or from a TOML file (``--config``, same names with underscores); flags win.
Once bound, the daemon prints one line ``fedzmq-worker <id> ready at <address>`` to stdout, which
launchers wait for (with port 0 the address shows the port the system chose).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import importlib
import logging
import os
import signal
import sys
import tomllib
from typing import Any, Callable, Sequence

import torch
import zmq.asyncio
from torch import nn

from ..codec import Limits
from .config import WorkerConfig
from .datasets import load_clients, parse_data_flags
from .server import Worker
from .watchdog import watch_parent

log = logging.getLogger("fedzmq.worker")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedzmq-worker", description="Run a fedzmq worker daemon.")
    p.add_argument("--config", help="TOML file with any of the settings below")
    p.add_argument("--id", help="the worker's id, e.g. bob")
    p.add_argument("--bind", help="address to serve on, e.g. tcp://127.0.0.1:5555 (port 0 picks a free one)")
    p.add_argument("--threads", type=int, help="threads for torch work (default 1)")
    p.add_argument("--session-timeout", type=float, help="seconds of silence before a session is freed")
    p.add_argument("--max-frame-bytes", "--max-message-bytes", type=int, dest="max_frame_bytes",
                   help="largest buffer frame accepted (default 1 GiB); a message may hold several. "
                   "--max-message-bytes is its old name")
    p.add_argument("--max-header-bytes", type=int, help="largest msgpack header accepted")
    p.add_argument("--chunk-bytes", type=int, help="largest tensor sent in one message (128 MiB); bigger ones stream "
                   "in "
                   "pieces of at most this size (clients use 16 MiB or this, whichever is smaller)")
    p.add_argument("--model", action="append", default=None, metavar="NAME=module:Class",
                   help="register a model class the data owner installed (repeatable)")
    p.add_argument("--secret-key", help="this daemon's .key_secret file: encrypt and authenticate (CurveZMQ)")
    p.add_argument("--allowed-keys", help="folder of client .key files allowed to connect (SIGHUP reloads it; a key "
                   "taken out loses its open connections too)")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="allow a non-loopback address without keys (anyone who can reach it may connect)")
    p.add_argument("--max-sessions", type=int, help="concurrent client sessions (default 256)")
    p.add_argument("--max-sessions-per-key", type=int,
                   help="concurrent sessions of one client key, when keys are on (default 32)")
    p.add_argument("--max-objects", type=int, help="objects one session may hold (default 100000)")
    p.add_argument("--max-session-bytes", type=int, help="bytes one session may hold (default 8 GiB)")
    p.add_argument("--max-inflight", type=int, help="commands of one session waiting to run (default 4096)")
    p.add_argument("--max-command-seconds", type=float, help="the longest one command may run; longer ones are "
                   "stopped, and ones sized to need longer are refused (default 300)")
    p.add_argument("--max-fit-samples", type=int, help="the most rows one fit may process, epochs x rows "
                   "(default 10,000,000)")
    data = p.add_argument_group(
        "the data owner's data and terms",
        "--data datasets are PROTECTED (the default): the coordinator never gets a pointer to their rows; "
        "only this daemon's own fit and evaluate of a described model read them, and what leaves is trained "
        "parameters (from batches of at least --min-batch-size rows, shuffled by the daemon) and metrics over at "
        "least --min-metric-rows rows; with --require-secure-aggregation, trained parameters leave only as "
        "masked updates of a secure round of at least --secagg-min-clients. --open-data datasets are also "
        "reachable through pointers, for data you are willing to show; what is computed from their rows "
        "leaves only as --private-release allows.")
    data.add_argument("--data", action="append", default=None, metavar="NAME=PATH",
                      help="a protected dataset (.safetensors, .npz, .csv; repeatable)")
    data.add_argument("--open-data", action="append", default=None, metavar="NAME=PATH",
                      help="an open dataset, reachable through pointers (repeatable)")
    data.add_argument("--clients-from", action="append", default=None, metavar="[NAME=]DIR",
                      help="host one logical client per dataset file in DIR (its id the file's stem), each holding "
                      "its file as its protected dataset NAME (default: DIR's own name): many clients on one "
                      "daemon, addressed like separate daemons (fz.connect_clients)")
    data.add_argument("--private-release", choices=["aggregates", "none"],
                      help="what computed from open datasets' rows through pointers may leave: nothing (default), "
                      "or aggregate scalars and model state ('aggregates' lets a coordinator read any value, one "
                      "scalar per request: only for data you would show)")
    data.add_argument("--min-batch-size", type=int, help="the fewest rows one training step may use (default 16)")
    data.add_argument("--min-metric-rows", type=int, help="the fewest rows a metric may cover: evaluate is refused "
                      "below it, and a fit's loss withheld (NaN) (default 16)")
    data.add_argument("--shuffle-secret", help="this daemon's secret for shuffling fit's rows (default: drawn at "
                      "start-up; set it to repeat runs across restarts)")
    data.add_argument("--remote-tracebacks", action=argparse.BooleanOptionalAction, default=None,
                      help="send Python tracebacks with errors (default: only without protected data; errors of "
                      "commands on private data never carry them)")
    data.add_argument("--require-secure-aggregation", action="store_true", default=None,
                      help="models trained here leave only as masked updates of secure aggregation rounds")
    data.add_argument("--secagg-min-clients", type=int, help="join only secure-aggregation rounds of at least this "
                      "many clients (default 3)")
    data.add_argument("--secagg-min-threshold", type=int, help="... whose threshold is at least this (default 2)")
    data.add_argument("--secagg-min-noise", type=float, help="... that add at least this DP noise multiplier, "
                      "also to a sum of only `threshold` survivors (default 0)")
    data.add_argument("--secagg-allow-sparse", action="store_true", default=None,
                      help="also join SecAgg+ rounds (a sparse graph, for many clients): they are safe against a "
                      "coordinator that follows the protocol, not against one that lies to different "
                      "neighbourhoods (default: complete-graph rounds only)")
    data.add_argument("--secagg-colluders", type=int, metavar="C", help="join only secure rounds that hold "
                      "even if C participants work with the coordinator: 2 * threshold > share holders + C "
                      "(default 0)")
    data.add_argument("--secagg-own-noise", type=float, metavar="S", help="join only secure rounds in which this "
                      "worker's own share of the noise has a multiplier of at least S: it holds even when every "
                      "other participant is the coordinator's (default 0)")
    data.add_argument("--max-evaluations", type=int, metavar="N", help="answer at most N evaluate commands per "
                      "data holder (these datasets; each hosted client), counted from start-up: each answers a "
                      "question of the coordinator's choice about the rows (default: no limit)")
    data.add_argument("--evaluations-ledger", metavar="FILE", help="keep the evaluations counted for "
                      "--max-evaluations in FILE, across restarts (default: counted from start-up)")
    data.add_argument("--secagg-max-rounds", type=int, metavar="N", help="give a masked update to at most N secure "
                      "rounds per data holder (these datasets; each hosted client): repeated rounds average the "
                      "noise away (default: no limit)")
    data.add_argument("--secagg-ledger", metavar="FILE", help="keep the secure rounds counted for "
                      "--secagg-max-rounds in FILE, across restarts (default: counted from start-up)")
    p.add_argument("--fault-injection", action="store_true", default=None,
                   help="accept the test-only debug_delay command (for test suites; never in production)")
    p.add_argument("--byzantine", metavar="sign-flip|scale=K",
                   help="TEST ONLY, needs --fault-injection: train honestly, then return a distorted update from "
                   "every fit (the move away from the start reversed, or multiplied by K), to test robust aggregation")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default INFO)")
    return p


#: the class of argparse's ``action="append"`` (a repeatable flag), found through its public API
APPEND_ACTION = type(argparse.ArgumentParser().add_argument("--flag", action="append"))

#: settings a --config file may give beside the flags' own names: a flag's old spelling, and the flag it is
_CONFIG_ALIASES = {"max_message_bytes": "max_frame_bytes"}


def _config_value_problem(action: argparse.Action, value: Any) -> str | None:
    """Why a --config value is not what its flag takes, or None. TOML values skip argparse's types and choices:
    ``insecure = "false"`` is a non-empty string, so true, and served without keys on any address."""
    if action.nargs == 0:  # a switch: store_true, or --x/--no-x
        return None if isinstance(value, bool) else "give true or false, unquoted"
    if isinstance(action, APPEND_ACTION):  # a repeatable flag
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return None if ok else 'give a list of strings, e.g. ["name=path"]'
    number = action.type in (int, float)
    wanted: tuple[type, ...] = (int,) if action.type is int else (int, float) if number else (str,)
    if isinstance(value, bool) or not isinstance(value, wanted):
        return "give a whole number, unquoted" if action.type is int else "give a number, unquoted" if number \
            else "give a string"
    if action.choices is not None and value not in action.choices:
        return f"give one of {', '.join(map(repr, action.choices))}"
    return None


def load_settings(argv: Sequence[str] | None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings: dict[str, Any] = {}
    if args.config:
        with open(args.config, "rb") as f:
            settings.update({k.replace("-", "_"): v for k, v in tomllib.load(f).items()})
        # a misspelt key would leave that term at its default (min_batch_sise = 64 served 16-row steps): refuse it,
        # as a flag that does not exist is refused
        unknown = sorted(set(settings) - (set(vars(args)) - {"config"}) - set(_CONFIG_ALIASES))
        if unknown:
            parser.error(f"{args.config} has keys that are no settings: {', '.join(unknown)} "
                         "(the flags' names, with underscores)")
        actions = {action.dest: action for action in parser._actions}
        for key, value in settings.items():
            problem = _config_value_problem(actions[_CONFIG_ALIASES.get(key, key)], value)
            if problem:
                parser.error(f"{args.config}: {key} = {value!r}: {problem}")
    settings.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    for required in ("id", "bind"):
        if not settings.get(required):
            build_parser().error(f"--{required} is required (as a flag or in --config)")
    return settings


def model_registry(entries: Sequence[str]) -> dict[str, Callable[..., nn.Module]]:
    """Import the model classes the data owner named. This runs the owner's installed code, not wire bytes.
    Modules are looked for in the working directory too, as ``python -m`` does (the ``fedzmq-worker``
    script's own path does not have it: ``--model branch=mymodels:Branch`` next to ``mymodels.py`` failed)."""
    registry: dict[str, Callable[..., nn.Module]] = {}
    if entries and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # after the installed packages: a file here cannot shadow one of them
    for entry in entries:
        name, _, target = entry.partition("=")
        module_name, _, attr = target.partition(":")
        if not name or not module_name or not attr:
            raise SystemExit(f"--model takes NAME=module:Class, got {entry!r}")
        try:
            registry[name] = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise SystemExit(f"--model {entry}: {type(exc).__name__}: {exc} (looked in {os.getcwd()} "
                             "and the installed packages)") from None
    return registry


def config_from(settings: dict[str, Any]) -> WorkerConfig:
    defaults = Limits()
    limits = Limits(
        max_header_bytes=settings.get("max_header_bytes", defaults.max_header_bytes),
        max_frame_bytes=settings.get("max_frame_bytes", settings.get("max_message_bytes", defaults.max_frame_bytes)),
        chunk_bytes=settings.get("chunk_bytes", defaults.chunk_bytes),
    )
    names = {f.name for f in dataclasses.fields(WorkerConfig)} - {"limits"}
    return WorkerConfig(limits=limits, **{k: v for k, v in settings.items() if k in names})


def terms_warnings(config: WorkerConfig) -> list[str]:
    """What the owner's terms leave open that an operator would expect them to close (logged at start)."""
    warnings = []
    if config.require_secure_aggregation and not config.secagg_min_noise and not config.secagg_own_noise:
        warnings.append("--require-secure-aggregation without --secagg-min-noise: the coordinator chooses what "
                        "the other participants train (a learning rate of 0 makes their updates zero), so a "
                        "secure round can be one participant's update alone; set a noise floor, --secagg-own-noise "
                        "for one that holds then too (docs/security.md)")
    if config.require_secure_aggregation and config.secagg_max_rounds is None:
        warnings.append("--require-secure-aggregation without --secagg-max-rounds: repeated rounds average "
                        "the noise away (docs/secagg.md)")
    return warnings


def flush_subnormals() -> bool:
    """Compute with subnormal floats flushed to zero, on this thread and every thread started after it
    (threads inherit the floating point environment: the torch pool's, OpenMP's). Subnormal arithmetic
    is several times slower, so how long an op took told a hostile coordinator whether a private value
    made its operand subnormal: a red-team session read rows' labels and pixels by timing ``sqrt``
    (docs/security.md). Called first in the daemon's own process only: an in-process ``Worker`` shares
    its threads with the caller's code. False where the CPU cannot flush (not x86 with SSE3)."""
    supported = bool(torch.set_flush_denormal(True))
    if not supported:
        log.warning("this CPU cannot flush subnormal floats to zero: how long an op takes may tell "
                    "something of the values it computed on")
    return supported


def leave_startup_objects_out_of_collections() -> None:
    """Start-up makes about 300,000 objects that live as long as the daemon (torch's modules and their
    functions, the datasets, the hosted clients). The garbage collector's full passes walked them all,
    137 ms each, every few thousand commands: 15% of a daemon's CPU per pipelined op. Frozen, they are
    left out of every collection; what is made after start-up is collected as before."""
    gc.collect()
    gc.freeze()


async def run(settings: dict[str, Any]) -> None:
    config = config_from(settings)
    torch.set_num_threads(max(1, config.threads))  # a daemon shares its machine with the others
    # the first optimizer torch builds imports its compiler stack (about a second): pay it before
    # "ready", not in the first round's fit
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    datasets = parse_data_flags(settings.get("data", []), settings.get("open_data", []))
    clients = load_clients(settings.get("clients_from", []))
    worker = Worker(settings["id"], config=config, models=model_registry(settings.get("model", [])),
                    datasets=datasets, clients=clients)
    address = worker.bind(settings["bind"])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload_keys, worker)
    watch_parent(loop, stop.set)  # stop when the launcher dies, if it gave us a pipe (watchdog.py)
    worker.start()
    leave_startup_objects_out_of_collections()
    print(f"fedzmq-worker {worker.id} ready at {address}", flush=True)
    if config.byzantine is not None:
        log.warning("worker %s is HOSTILE (test only): every fit returns a %s update", worker.id, config.byzantine)
    for warning in terms_warnings(config):
        log.warning("worker %s: %s", worker.id, warning)
    log.info("worker %s serving on %s with datasets %s%s", worker.id, address,
             {name: len(d) for name, d in datasets.items()} or "none",
             f" and {len(clients)} hosted clients" if clients else "")
    stopping = asyncio.ensure_future(stop.wait())
    broken = asyncio.ensure_future(worker.wait_closed())
    await asyncio.wait([stopping, broken], return_when=asyncio.FIRST_COMPLETED)
    if broken.done():  # a serving loop died: exit non-zero instead of staying up deaf
        stopping.cancel()
        await worker.close()
        broken.result()
        raise RuntimeError("a serving loop of the worker ended")
    broken.cancel()
    log.info("worker %s stopping", worker.id)
    for sig in (signal.SIGTERM, signal.SIGINT):  # we are on our way out: a repeated signal changes nothing
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    worker.say_stopping()
    await worker.close()


def _reload_keys(worker: Worker) -> None:
    try:
        count = worker.reload_keys()
    except Exception as exc:  # reload() leaves unreadable files out itself; anything else is logged here
        log.error("could not reload the allowed keys: %s", exc)
        return
    if count is None:
        log.info("SIGHUP: this daemon runs without keys; nothing to reload")


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(argv)
    logging.basicConfig(level=getattr(logging, str(settings.get("log_level", "INFO")).upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    flush_subnormals()  # before any thread starts, so that all inherit it
    try:
        asyncio.run(run(settings))
    except Exception as exc:  # a clear one-line reason instead of a traceback for bind errors and the like
        print(f"fedzmq-worker: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    # The last replies (say_stopping's "is stopping") may still sit in ZeroMQ's I/O thread: terminating
    # the context waits for them, up to the socket's linger (FAREWELL_SECONDS). os._exit alone killed that
    # thread with them, and a loaded host's clients then learnt of the stop from silent heartbeats.
    zmq.asyncio.Context.instance().destroy(linger=0)  # sockets closed already keep their own linger
    # everything is closed: skip the interpreter's slow final garbage collection (about a second with
    # torch loaded; many daemons stopping together on few cores would otherwise time out)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
