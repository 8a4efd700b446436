"""A standing red-team campaign a data owner runs against their own fedzmq daemon (issue 16).

The attacker is a coordinator with an allowed key that sends any bytes it likes (docs/security.md).
This script is that attacker: it speaks the wire protocol on a raw ZeroMQ socket, so nothing the
client library refuses locally stops it, and it tries every route of issue 16's five classes:

1. taint: buffers, gradients, optimizer state, aliasing, ``out=``, views, loaded weights;
2. side channels: error text, data-dependent shapes, aggregate scalars, crafted metrics;
3. graph programs held to the op schema (keywords, ``out=``, Python numbers, mutating methods);
4. denial of service, with an honest client pinging beside each attack (its p99 in ms);
5. bind-address tricks against the no-keys guard (in this process, nothing is exposed).

It prints one line per route: ``refused`` (the daemon said no), ``held`` (the attack ran and the
data owner's promise held), ``leaked N values``, a ping p99, or ``limit: ...`` for a route that
measures what docs/security.md states as left (it does not fail the campaign). The exit code is 1 if anything leaked
or an honest client's ping p99 reached a second, else 0.

    python scripts/redteam.py --spawn                         # a daemon of its own, on made-up rows
    python scripts/redteam.py --address tcp://127.0.0.1:5555 --dataset digits \\
        --truth shards/bob.safetensors                        # your daemon; your file says what a leak is
    python scripts/redteam.py --address tcp://host:5555 --server-key bob.key --client-key me.key_secret

Against your own daemon, name the protected dataset (``--dataset``), optionally an open one
(``--open-dataset``) and a daemon that requires secure aggregation (``--secure-address``); routes
that need what you did not give are skipped. With ``--truth`` (the dataset's file) a returned value
counts as leaked when it equals one of your rows' values; without it, every value returned from a
route that should have been refused counts. Denial-of-service routes assume the daemon's quota is
small enough for the attack to hit it (``--spawn`` starts one with 64 MiB per session).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import torch
import zmq
import zmq.asyncio
from torch import nn

import fedzmq as fz
from fedzmq.codec import Limits, NodeRef, Ref, decode_reply, encode_request
from fedzmq.launcher import DaemonProcess
from fedzmq.modeldesc import describe
from fedzmq.security import apply_client_keys
from fedzmq.testing import write_dataset
from fedzmq.worker.config import WorkerConfig
from fedzmq.worker.datasets import load_dataset
from fedzmq.worker.server import Worker

ROWS, FEATURES, CLASSES = 100, 8, 10
#: the state of a crafted model's one do-nothing parameter
W0 = {"w": torch.zeros(1)}
#: an honest client's ping p99 at or above this is a failure (issue 16: "under 1 s at p99")
PING_LIMIT_MS = 1000.0


# --- the target and the attacker's socket -----------------------------------------------------------

@dataclass
class Target:
    address: str
    dataset: str
    open_dataset: str | None = None
    secure_address: str | None = None
    server_key: str | None = None
    client_key: str | None = None
    #: the protected rows and labels, when the owner gave them (or made them, with --spawn)
    truth: tuple[torch.Tensor, torch.Tensor] | None = None
    #: the dataset name of the logical clients the daemon hosts (--clients-from NAME=DIR), if any
    hosted_dataset: str | None = None
    rows: int = ROWS
    features: int = FEATURES

    def connect(self, address: str | None = None) -> Any:
        return fz.connect(address or self.address, server_key=self.server_key, client_key=self.client_key)


class Denied(Exception):
    """The daemon answered with an error: the route was refused."""

    def __init__(self, error: dict[str, str]) -> None:
        super().__init__(f"{error.get('type')}: {error.get('message')}")
        self.error = error


class Attacker:
    """A raw DEALER socket speaking fedzmq's protocol: any command, any arguments, in any order."""

    def __init__(self, target: Target, address: str | None = None) -> None:
        self.target, self.address = target, address or target.address
        self.ids = itertools.count(1)
        self.objects = itertools.count(1_000)
        self.socket: zmq.asyncio.Socket | None = None

    async def __aenter__(self) -> "Attacker":
        self.socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if self.target.server_key:
            apply_client_keys(self.socket, self.target.server_key, self.target.client_key)
        self.socket.connect(self.address)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.socket is not None
        with contextlib.suppress(Exception):
            await self.call("close", {}, timeout=2)
        self.socket.close(linger=0)

    def new(self) -> int:
        return next(self.objects)

    async def send(self, cmd: str, args: dict[str, Any], client: str | None = None) -> int:
        assert self.socket is not None
        request_id = next(self.ids)
        await self.socket.send_multipart(encode_request(request_id, cmd, args, client=client), copy=False)
        return request_id

    async def call(self, cmd: str, args: dict[str, Any], timeout: float = 60, client: str | None = None) -> Any:
        assert self.socket is not None
        request_id = await self.send(cmd, args, client)
        async with asyncio.timeout(timeout):
            while True:
                reply = decode_reply(await self.socket.recv_multipart(), Limits())
                if reply.id == request_id or (reply.id is None and not reply.ok):  # None: its header was refused
                    if not reply.ok:
                        assert reply.error is not None
                        raise Denied(reply.error)
                    return reply.result

    async def store(self, value: torch.Tensor) -> int:
        out = self.new()
        await self.call("store", {"out": out, "value": value})
        return out

    async def op(self, name: str, *args: Any, **kwargs: Any) -> int:
        out = self.new()
        await self.call("op", {"op": name, "args": list(args), "kwargs": kwargs, "out": [out]})
        return out

    async def module(self, model: nn.Module | dict[str, Any], state: dict[str, Any] | None = None) -> int:
        out = self.new()
        if isinstance(model, nn.Module):
            model, state = describe(model), {k: v.detach() for k, v in model.state_dict().items()}
        await self.call("module_put", {"out": out, "spec": model, "state": state or {}})
        return out

    async def sgd(self, module: int, **hyper: Any) -> int:
        out = self.new()
        await self.call("optim_create", {"out": out, "cls": "SGD", "module": module,
                                         "groups": [{"params": [0], "lr": 1.0, **hyper}]})
        return out

    async def forward(self, module: int, *inputs: Any) -> int:
        out = self.new()
        await self.call("module_call", {"obj": module, "args": list(inputs), "kwargs": {}, "out": [out]})
        return out

    async def rows(self, dataset: str) -> int:
        out = self.new()
        await self.call("dataset_tensor", {"dataset": dataset, "part": "features", "out": out})
        return out


def graph(program: list[list[Any]], params: tuple[tuple[str, tuple[int, ...]], ...] = ()) -> dict[str, Any]:
    """A described model whose forward is ``program`` (fedzmq's traced-program format)."""
    return {"kind": "graph", "children": [], "params": [[n, list(s), True] for n, s in params], "buffers": [],
            "program": program}


def program(*nodes: list[Any]) -> list[list[Any]]:
    """``x`` as node 0, then ``nodes``, the last one's value the output."""
    return [["placeholder", "x", [], {}], *nodes, ["output", "output", [NodeRef(len(nodes))], {}]]


# --- outcomes -------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    route: str
    kind: str
    result: str
    leaked: int = 0
    failed: bool = False


@dataclass
class Campaign:
    target: Target
    outcomes: list[Outcome] = field(default_factory=list)

    def leaked_values(self, values: Any) -> int:
        """How many of ``values`` are the owner's (with the truth), or how many came back (without)."""
        flat = torch.as_tensor(values, dtype=torch.float64).reshape(-1) if not isinstance(values, torch.Tensor) \
            else values.detach().double().reshape(-1)
        if self.target.truth is None:
            return flat.numel()
        truth = torch.cat([t.double().reshape(-1) for t in self.target.truth]).unique()
        return int(sum(bool(torch.isclose(truth, v, rtol=0, atol=1e-3).any()) for v in flat[:4096]))


Route = Callable[[Campaign], Awaitable[str | tuple[str, int] | None]]
ROUTES: list[tuple[str, str, str | None, Route]] = []


def route(kind: str, name: str, needs: str | None = None) -> Callable[[Route], Route]:
    """Register a route: it returns ``"refused"``/``"held"``/a note, or ``("leaked", n)``; None: skipped."""
    def register(fn: Route) -> Route:
        ROUTES.append((kind, name, needs, fn))
        return fn
    return register


async def refused(attempt: Awaitable[Any]) -> bool:
    try:
        await attempt
    except Denied:
        return True
    return False


async def got(campaign: Campaign, attempt: Awaitable[Any]) -> str | tuple[str, int]:
    """Run a read that should be refused: ``refused``, or what of the owner's data it returned."""
    try:
        value = await attempt
    except Denied:
        return "refused"
    if isinstance(value, dict):  # a module's state
        value = torch.cat([v.detach().double().reshape(-1) for v in value.values() if isinstance(v, torch.Tensor)])
    return "leaked", campaign.leaked_values(value)


# --- class 1: taint follows storage ------------------------------------------------------------------

def _bilinear(rows: int, features: int) -> dict[str, Any]:
    """loss = (W * x).sum(): W.grad == x, and W after one SGD step with lr 1 is -x."""
    return graph(program(["get_attr", "w", [], {}], ["call_function", "mul", [NodeRef(1), NodeRef(0)], {}],
                         ["call_method", "sum", [NodeRef(2)], {}]), params=(("w", (rows, features)),))


@route("1 taint", "BatchNorm running stats after a forward on rows", needs="open")
async def bn_stats(c: Campaign) -> Any:
    async with Attacker(c.target) as a:
        rows = await a.rows(c.target.open_dataset)
        norm = await a.module(nn.BatchNorm1d(c.target.features, momentum=1.0))
        await a.forward(norm, Ref(rows))
        return await got(c, a.call("module_state", {"obj": norm}))


@route("1 taint", ".grad of a leaf after a loss on rows (W.grad == x)", needs="open")
async def leaf_grad(c: Campaign) -> Any:
    async with Attacker(c.target) as a:
        rows = await a.rows(c.target.open_dataset)
        w = await a.store(torch.zeros(c.target.rows, c.target.features, requires_grad=True))
        total = await a.op("sum", Ref(await a.op("mul", Ref(w), Ref(rows))))
        await a.call("backward", {"obj": total})
        grad = a.new()
        with contextlib.suppress(Denied):
            await a.call("grad", {"obj": w, "out": grad})
        return await got(c, a.call("get", {"obj": grad}))


@route("1 taint", "parameter after an optimizer step (W = -x)", needs="open")
async def stepped(c: Campaign) -> Any:
    async with Attacker(c.target) as a:
        rows = await a.rows(c.target.open_dataset)
        model = await a.module(_bilinear(c.target.rows, c.target.features), {"w": torch.zeros(c.target.rows,
                                                                                              c.target.features)})
        await a.call("backward", {"obj": await a.forward(model, Ref(rows))})
        await a.call("optim_step", {"obj": await a.sgd(model)})
        return await got(c, a.call("module_read", {"obj": model, "name": "w", "offset": 0, "length": 4096}))


@route("1 taint", "optimizer momentum carried into a later step", needs="open")
async def momentum(c: Campaign) -> Any:
    async with Attacker(c.target) as a:
        rows = await a.rows(c.target.open_dataset)
        model = await a.module(_bilinear(c.target.rows, c.target.features), {"w": torch.zeros(c.target.rows,
                                                                                              c.target.features)})
        optim = await a.sgd(model, momentum=0.9)
        await a.call("backward", {"obj": await a.forward(model, Ref(rows))})
        await a.call("optim_step", {"obj": optim})
        await a.call("module_load", {"obj": model, "state": {"w": torch.zeros(c.target.rows, c.target.features)}})
        await a.call("optim_zero_grad", {"obj": optim, "set_to_none": False})
        await a.call("optim_step", {"obj": optim})  # moves w by the momentum alone: 0.9 * x
        return await got(c, a.call("module_state", {"obj": model}))


@route("1 taint", "module_put adopting a tensor another object views", needs="open")
async def aliasing(c: Campaign) -> Any:
    async with Attacker(c.target) as a:
        rows = await a.rows(c.target.open_dataset)
        tensor = await a.store(torch.zeros(c.target.rows, c.target.features))
        view = await a.op("reshape", Ref(tensor), -1)
        model = await a.module(_bilinear(c.target.rows, c.target.features), {"w": Ref(tensor)})
        await a.call("backward", {"obj": await a.forward(model, Ref(rows))})
        await a.call("optim_step", {"obj": await a.sgd(model)})
        value = await a.call("get", {"obj": view})
        return ("leaked", c.leaked_values(value)) if value.abs().sum() else "held"


@route("1 taint", "out= into the owner's rows (op and program), then a fresh session", needs="open")
async def out_target(c: Campaign) -> Any:
    async with Attacker(c.target) as a:
        rows = await a.rows(c.target.open_dataset)
        op_refused = await refused(a.call("op", {"op": "mul", "args": [Ref(rows), 0.0], "kwargs": {"out": Ref(rows)},
                                                 "out": [a.new()]}))
        poison = program(["call_function", "mul", [NodeRef(0), 0.0], {"out": NodeRef(0)}])
        program_refused = await refused(a.module(graph(poison), {}))
        return "refused" if op_refused and program_refused else ("leaked", c.target.rows * c.target.features)


@route("1 taint", "views, copies, casts, max/amax/argmax of rows, an index by one", needs="open")
async def views(c: Campaign) -> Any:
    async with Attacker(c.target) as a:
        rows = await a.rows(c.target.open_dataset)
        public = await a.store(torch.arange(float(c.target.rows * c.target.features)))
        made = []
        for name, args in (("reshape", [Ref(rows), -1]), ("t", [Ref(rows)]), ("getitem", [Ref(rows), (slice(0, 2),)]),
                           ("clone", [Ref(rows)]), ("long", [Ref(rows)]), ("amax", [Ref(rows)]),
                           ("view", [Ref(rows), -1]), ("argmax", [Ref(rows)])):
            with contextlib.suppress(Denied):
                made.append(await a.op(name, *args))
        with contextlib.suppress(Denied):  # a public tensor indexed by a data value
            made.append(await a.op("getitem", Ref(public), Ref(made[-1])))
        leaked = 0
        for obj in made:
            outcome = await got(c, a.call("get", {"obj": obj}))
            leaked += outcome[1] if isinstance(outcome, tuple) else 0
        return ("leaked", leaked) if leaked else "refused"


@route("1 taint", "rows loaded into a model by evaluate(load=...), read back", needs="open")
async def loaded(c: Campaign) -> Any:
    async with Attacker(c.target) as a:
        rows = await a.rows(c.target.open_dataset)
        initial = nn.Linear(c.target.features, c.target.rows, bias=False)
        model = await a.module(initial)
        with contextlib.suppress(Denied):  # refused before it runs: its metrics would tell the weights
            await a.call("evaluate", {"module": model, "dataset": c.target.dataset, "loss": "mse_loss",
                                      "load": {"weight": Ref(rows)}})
        try:
            state = await a.call("module_state", {"obj": model})
        except Denied:
            return "refused"
        if torch.equal(state["weight"], initial.weight.detach()):
            return "refused"  # nothing was loaded: the weights that come back are the ones sent
        return "leaked", c.leaked_values(state["weight"])


@route("1 taint", "a pointer to protected rows (dataset_tensor)")
async def pointer(c: Campaign) -> Any:
    async with Attacker(c.target) as a:
        return await got(c, a.rows(c.target.dataset))


@route("1 taint", "secure-only weights: module_state, a forward, fit(load=) laundering", needs="secure")
async def launder(c: Campaign) -> Any:
    async with Attacker(c.target, c.target.secure_address) as a:
        model = await a.module(nn.Linear(c.target.features, CLASSES))
        await a.call("fit", {"module": model, "dataset": c.target.dataset, "loss": "cross_entropy", "batch_size": 16,
                             "steps": 2, "optimizer": {"cls": "SGD", "lr": 0.1}})
        eye = await a.store(torch.eye(c.target.features))
        weight = await a.op("t", Ref(await a.forward(model, Ref(eye))))
        initial = nn.Linear(c.target.features, CLASSES)
        fresh = await a.module(initial)
        with contextlib.suppress(Denied):
            await a.call("fit", {"module": fresh, "dataset": c.target.dataset, "loss": "cross_entropy",
                                 "batch_size": 16, "steps": 0, "optimizer": {"cls": "SGD", "lr": 0.0},
                                 "load": {"weight": Ref(weight)}})
        leaked = 0
        for attempt in (a.call("module_state", {"obj": model}), a.call("get", {"obj": weight}),
                        a.call("module_state", {"obj": fresh})):
            try:
                value = await attempt
            except Denied:
                continue
            if isinstance(value, dict):  # the laundered model: leaked if it is not what we sent
                value = value["weight"] if not torch.equal(value["weight"], initial.weight.detach()) else None
            leaked += 0 if value is None else value.numel()
        return ("leaked", leaked) if leaked else "refused"


# --- class 2: side channels ------------------------------------------------------------------------------

@route("2 side channel", "error text after computing on rows (index, size, target)", needs="open")
async def error_text(c: Campaign) -> Any:
    async with Attacker(c.target) as a:
        rows = await a.rows(c.target.open_dataset)
        value = await a.op("long", Ref(await a.op("getitem", Ref(rows), (0, 3))))
        public = await a.store(torch.arange(10.0))
        texts = []
        for name, args in (("getitem", [Ref(public), Ref(value)]), ("reshape", [Ref(rows), Ref(value)]),
                           ("cross_entropy", [Ref(rows), Ref(await a.op("long", Ref(rows)))])):
            try:
                await a.op(name, *args)
            except Denied as denied:
                texts.append(denied.error["message"] + denied.error.get("traceback", ""))
        return _numbers_in(c, texts)


def _numbers_in(c: Campaign, texts: list[str]) -> Any:
    """How many of the owner's values appear in ``texts``: decimals as torch prints them, and, in a text
    that was not sanitized, integers of three digits or more (an index, a size, a target)."""
    import re

    if c.target.truth is None:
        loose = [t for t in texts if "withheld" not in t]
        return ("leaked", len(loose)) if loose else "refused"
    x = c.target.truth[0]
    hits = 0
    for text in texts:
        for number in re.findall(r"\d+\.\d+", text):
            hits += bool(((x - float(number)).abs() < 0.01).any())
        if "withheld" not in text:
            for number in re.findall(r"\b\d{3,}\b", text):
                hits += bool(((x.floor() - int(number)).abs() < 0.5).any())
    return ("leaked", hits) if hits else "refused"


@route("2 side channel", "a data-dependent shape through info", needs="open")
async def shapes(c: Campaign) -> Any:
    async with Attacker(c.target) as a:
        rows = await a.rows(c.target.open_dataset)
        try:
            mask = await a.op("gt", Ref(rows), float(c.target.truth[0].median()) if c.target.truth else 500.0)
            selected = await a.op("getitem", Ref(rows), Ref(mask))
            shape = (await a.call("info", {"obj": selected}))["shape"]
        except Denied:
            return "refused"
        return "leaked", len(shape)


@route("2 side channel", "aggregate scalars, one row value per get", needs="open")
async def aggregates(c: Campaign) -> Any:
    async with Attacker(c.target) as a:
        rows = await a.rows(c.target.open_dataset)
        leaked = 0
        for i, j in itertools.product(range(2), range(4)):
            outcome = await got(c, a.call("get", {"obj": await a.op("sum", Ref(await a.op("getitem", Ref(rows),
                                                                                            (i, j))))}))
            leaked += outcome[1] if isinstance(outcome, tuple) else 0
        return ("leaked", leaked) if leaked else "refused"


@route("2 side channel", "a fit step on fewer than --min-batch-size rows")
async def few_rows(c: Campaign) -> Any:
    async with Attacker(c.target) as a:
        model = await a.module(nn.Linear(c.target.features, CLASSES))
        fit = {"module": model, "dataset": c.target.dataset, "loss": "cross_entropy",
               "optimizer": {"cls": "SGD", "lr": 0.1}}
        if not await refused(a.call("fit", {**fit, "batch_size": 1, "steps": 1})):
            return "leaked", 1
        return "refused"


def _row_spy(row: int, column: int) -> dict[str, Any]:
    """For every row of its batch, the batch's value at (row, column): a mean loss over the batch is
    then a function of that one value. (Its parameter ``w`` does nothing: a fit needs one to step.)"""
    pick = (slice(row, row + 1), slice(column, column + 1))
    return _with_parameter(program(["call_function", "getitem", [NodeRef(0), pick], {}],
                         ["call_method", "reshape", [NodeRef(1), -1], {}],
                         ["call_function", "mul", [NodeRef(0), 0.0], {}], ["call_method", "sum", [NodeRef(3), 1], {}],
                         ["call_function", "add", [NodeRef(4), NodeRef(2)], {}]))


def _with_parameter(nodes: list[list[Any]]) -> dict[str, Any]:
    """``nodes``' program plus ``0 * w`` on its output, for a parameter ``w`` of one element."""
    *body, output = nodes
    last = len(body) - 1
    body += [["get_attr", "w", [], {}], ["call_function", "mul", [NodeRef(last + 1), 0.0], {}],
             ["call_function", "add", [NodeRef(last), NodeRef(last + 2)], {}]]
    return graph([*body, ["output", "output", [NodeRef(last + 3)], {}]], params=(("w", (1,)),))


def _constant(value: float) -> dict[str, Any]:
    return _with_parameter(program(["call_function", "mul", [NodeRef(0), 0.0], {}],
                                   ["call_method", "sum", [NodeRef(1), 1], {}],
                                   ["call_function", "add", [NodeRef(2), value], {}]))


@route("2 side channel", "evaluate of a model that copies one row to every output (l1)")
async def eval_spy(c: Campaign) -> Any:
    async with Attacker(c.target) as a:
        evaluate = {"dataset": c.target.dataset, "loss": "l1_loss", "batch_size": c.target.rows}
        try:
            base = await a.call("evaluate", {"module": await a.module(_constant(1e4), W0), **evaluate})
            guesses = [(await a.call("evaluate", {"module": await a.module(_row_spy(r, j), W0), **evaluate}))["loss"]
                       + 1e4 - base["loss"] for r, j in ((3, 1), (37, 5))]
        except Denied:
            return "refused"
        return ("leaked", c.leaked_values(guesses)) if c.leaked_values(guesses) else "held"


@route("2 side channel", "evaluate: one output per label of the batch (broadcast), mse")
async def eval_broadcast(c: Campaign) -> Any:
    async with Attacker(c.target) as a:
        n = c.target.rows

        async def spread(weights: torch.Tensor) -> float:
            nodes = (["get_attr", "w", [], {}], ["call_function", "mul", [NodeRef(0), 0.0], {}],
                     ["call_method", "sum", [NodeRef(2), 1, True], {}],
                     ["call_function", "add", [NodeRef(3), NodeRef(1)], {}])
            model = await a.module(graph(program(*nodes), params=(("w", (n,)),)), {"w": weights})
            return (await a.call("evaluate", {"module": model, "dataset": c.target.dataset, "loss": "mse_loss",
                                              "batch_size": n}))["loss"]
        try:
            base = await spread(torch.zeros(n))
            picks = []
            for row in (3, 37):
                picker = torch.zeros(n)
                picker[row] = 1000.0
                picks.append((1e6 + base - await spread(picker)) / 2000)
        except Denied:
            return "refused"
        if c.target.truth is None:
            return "held" if all(abs(p - round(p)) > 1e-3 for p in picks) else ("leaked", len(picks))
        labels = c.target.truth[1]
        hits = sum(abs(p - labels[row].item()) < 1e-3 for p, row in zip(picks, (3, 37)))
        return ("leaked", hits) if hits else "held"


@route("2 side channel", "fit's loss metric of a row-copying model, secure aggregation required", needs="secure")
async def fit_spy(c: Campaign) -> Any:
    async with Attacker(c.target, c.target.secure_address) as a:
        fit = {"dataset": c.target.dataset, "loss": "l1_loss", "batch_size": c.target.rows, "steps": 1,
               "optimizer": {"cls": "SGD", "lr": 0.0}}
        try:
            base = await a.call("fit", {"module": await a.module(_constant(1e4), W0), **fit})
            guesses = [(await a.call("fit", {"module": await a.module(_row_spy(0, j), W0), **fit}))["loss"]
                       + 1e4 - base["loss"] for j in (1, 5)]
        except Denied as denied:
            return f"refused ({denied.error['type']})"
        return ("leaked", c.leaked_values(guesses)) if c.leaked_values(guesses) else "held"


@route("2 side channel", "whether a fit fails, bisected: a column's minimum (documented limit)", needs="secure")
async def fit_bit(c: Campaign) -> Any:
    """log(x[:, j] - t) is NaN on a row below t, and a fit whose loss is not finite fails: one bit per fit
    (also under secure aggregation), so 24 fits find the smallest value of column j. docs/security.md
    states this as left; the route measures it and does not fail the campaign."""
    async with Attacker(c.target, c.target.secure_address) as a:
        low, high, fits = 0.0, 1e4, 0
        for _ in range(24):
            t = (low + high) / 2
            nodes = program(["call_function", "getitem", [NodeRef(0), (slice(None), slice(1, 2))], {}],
                            ["call_function", "sub", [NodeRef(1), t], {}], ["call_function", "log", [NodeRef(2)], {}],
                            ["call_method", "reshape", [NodeRef(3), -1], {}])
            model = await a.module(_with_parameter(nodes), W0)
            fits += 1
            try:
                await a.call("fit", {"module": model, "dataset": c.target.dataset, "loss": "l1_loss",
                                     "batch_size": c.target.rows, "steps": 1, "optimizer": {"cls": "SGD", "lr": 0.0}})
                low = t  # every row is above t
            except Denied:
                high = t
        found = c.leaked_values([low]) if c.target.truth is None or \
            abs(c.target.truth[0][:, 1].min().item() - low) < 0.01 else 0
        return f"limit: {found} value(s) in {fits} fits (bisection on one bit per fit)"


@route("2 side channel", "other sessions' objects by guessing ids")
async def guess_ids(c: Campaign) -> Any:
    async with c.target.connect() as honest, Attacker(c.target) as a:
        kept = await honest.send(torch.full((4,), 31337.0))
        leaked = 0
        for obj in range(0, 64):
            with contextlib.suppress(Denied):
                value = await a.call("get", {"obj": obj})
                leaked += int(isinstance(value, torch.Tensor) and bool((value == 31337.0).any()))
        assert kept is not None
        return ("leaked", leaked) if leaked else "refused"


@route("2 side channel", "hosted clients (--clients-from): a shard's rows, another client's objects",
       needs="hosted")
async def hosted(c: Campaign) -> Any:
    async with Attacker(c.target) as a:
        first, second = (await a.call("clients", {}))[:2]
        leaked = 0
        for client in (first, second):  # a pointer to a hosted client's rows, from its own session
            with contextlib.suppress(Denied):
                out = a.new()
                await a.call("dataset_tensor", {"dataset": c.target.hosted_dataset, "part": "features", "out": out},
                             client=client)
                value = await a.call("get", {"obj": out}, client=client)
                leaked += value.numel()
        kept = a.new()
        await a.call("store", {"out": kept, "value": torch.full((4,), 31337.0)}, client=first)
        with contextlib.suppress(Denied):  # the same id, from the other client's session
            value = await a.call("get", {"obj": kept}, client=second)
            leaked += int((value == 31337.0).sum())
        return ("leaked", leaked) if leaked else "refused"


@route("2 side channel", "status, datasets and clients listings")
async def listings(c: Campaign) -> Any:
    async with Attacker(c.target) as a:
        status = await a.call("status", {})
        infos = await a.call("datasets", {})
        await a.call("clients", {})
        # a dataset's listing says its size, shapes and number of classes (max label + 1): metadata the
        # owner publishes; status says every session's totals (objects, bytes), not values
        keys = {key for info in infos for key in info}
        expected = {"name", "samples", "feature_shape", "feature_dtype", "label_shape", "label_dtype", "num_classes",
                    "description", "tags", "policy"}
        return "held (metadata: sizes, shapes, num_classes)" if keys <= expected and "rows" not in status \
            else ("leaked", len(keys - expected))


# --- class 3: graph programs against the op schema --------------------------------------------------------

@route("3 graph programs", "keywords (out=, inplace=, alpha=), mutating and escaping methods")
async def program_schema(c: Campaign) -> Any:
    async with Attacker(c.target) as a:
        accepted = []
        nodes = {"out=": ["call_function", "add", [NodeRef(0), 1.0], {"out": NodeRef(0)}],
                 "inplace=": ["call_function", "relu", [NodeRef(0)], {"inplace": True}],
                 "alpha=": ["call_function", "add", [NodeRef(0), 1.0], {"alpha": 2}]}
        nodes.update({f".{m}()": ["call_method", m, [NodeRef(0), *extra], {}] for m, extra in (
            ("copy_", [NodeRef(0)]), ("fill_", [0.0]), ("zero_", []), ("item", []), ("tolist", []), ("numpy", []),
            ("set_", []), ("resize_", [1]), ("__setitem__", [0, 0.0]), ("requires_grad_", []), ("data_ptr", []),
            ("__reduce_ex__", [2]), ("storage", []), ("untyped_storage", []))})
        for name, node in nodes.items():
            try:
                model = await a.module(graph(program(node)), {})
                await a.forward(model, Ref(await a.store(torch.ones(2, 2))))
                accepted.append(name)
            except Denied:
                pass
        return ("leaked", len(accepted)) if accepted else "refused"


@route("3 graph programs", "Python ints, lists and big numbers in a program")
async def program_numbers(c: Campaign) -> Any:
    async with Attacker(c.target) as a:
        x = await a.store(torch.ones(3, 2))
        ran = 0
        for nodes in ([["call_method", "size", [NodeRef(0), 0], {}],
                       ["call_function", "pow", [NodeRef(1), 10 ** 8], {}]],
                      [["call_function", "mul", [[NodeRef(0)], 10 ** 8], {}]],
                      [["call_function", "add", [NodeRef(0), 2 ** 62], {}]]):
            try:
                await a.forward(await a.module(graph(program(*nodes)), {}), Ref(x))
                ran += 1
            except Denied:
                pass
        return ("leaked", ran) if ran > 1 else "refused"


# --- class 4: denial of service, with an honest client pinging beside ------------------------------------

@contextlib.asynccontextmanager
async def honest_pings(c: Campaign, min_seconds: float = 1.0) -> Any:
    """An honest client pinging every 20 ms while the block runs (and at least ``min_seconds``)."""
    latencies: list[float] = []
    started = time.perf_counter()
    async with c.target.connect() as honest:
        kept = await honest.send(torch.arange(5.0))
        stop = asyncio.Event()

        async def loop() -> None:
            while not stop.is_set():
                sent = time.perf_counter()
                await honest.ping(timeout=60)
                latencies.append(time.perf_counter() - sent)
                await asyncio.sleep(0.02)

        task = asyncio.ensure_future(loop())
        try:
            yield latencies
            await asyncio.sleep(max(0.0, min_seconds - (time.perf_counter() - started)))
        finally:
            stop.set()
            await task
        if not torch.equal(await kept.get(), torch.arange(5.0)):
            raise RuntimeError("the honest session lost an object")


def p99_ms(latencies: list[float]) -> float:
    ordered = sorted(latencies) or [float("inf")]
    return 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def dos(name: str) -> Callable[[Callable[[Campaign, Attacker], Awaitable[Any]]], Route]:
    """A denial-of-service route: the attack runs while an honest client pings; reports its p99."""
    def wrap(attack: Callable[[Campaign, Attacker], Awaitable[Any]]) -> Route:
        async def run(c: Campaign) -> Any:
            async with honest_pings(c) as latencies, Attacker(c.target) as a:
                note = await attack(c, a)
            return f"p99 {p99_ms(latencies):.0f} ms" + (f" ({note})" if note else "")
        return route("4 denial of service", name)(run)
    return wrap


@dos("big-int arithmetic in a graph program")
async def big_ints(c: Campaign, a: Attacker) -> Any:
    x = await a.store(torch.ones(3, 2))
    nodes = [["call_method", "size", [NodeRef(0), 0], {}], ["call_function", "pow", [NodeRef(1), 10 ** 8], {}]]
    return "refused" if await refused(a.forward(await a.module(graph(program(*nodes)), {}), Ref(x))) else "ran"


@dos("fit(epochs=10**12), then a fit past the time budget")
async def huge_epochs(c: Campaign, a: Attacker) -> Any:
    model = await a.module(nn.Sequential(nn.Linear(c.target.features, 512), nn.ReLU(), nn.Linear(512, CLASSES)))
    fit = {"module": model, "dataset": c.target.dataset, "loss": "cross_entropy", "batch_size": 16,
           "optimizer": {"cls": "SGD", "lr": 0.01}}
    first = await refused(a.call("fit", {**fit, "epochs": 10 ** 12}))
    started = time.perf_counter()
    try:
        second = await refused(a.call("fit", {**fit, "epochs": 50_000}, timeout=30))
    except TimeoutError:
        return "still running after 30 s (lower --max-command-seconds?)"
    return f"{'refused' if first else 'ran'}; stopped after {time.perf_counter() - started:.1f}s" if second else "ran"


@dos("a 1-element tensor indexed by a 1,000,000-long list")
async def index_list(c: Campaign, a: Attacker) -> Any:
    assert a.socket is not None
    one = await a.store(torch.ones(1))
    # encoded off the loop: the honest pinger shares this process, and must measure the daemon, not us
    frames = await asyncio.to_thread(encode_request, 0, "op", {"op": "getitem", "args": [Ref(one), [0] * 1_000_000],
                                                                  "kwargs": {}, "out": [a.new()]})
    outcomes = []
    for _ in range(3):
        await a.socket.send_multipart(frames, copy=False)
        reply = await asyncio.wait_for(a.socket.recv_multipart(), 30)
        outcomes.append(b"ProtocolError" in reply[0] or b"header" in reply[0])
    return "refused" if all(outcomes) else "ran"


@dos("a forward whose intermediates are 2.5 GB; an op whose output is")
async def intermediates(c: Campaign, a: Attacker) -> Any:
    outer = program(["call_method", "unsqueeze", [NodeRef(0), -1], {}],
                    ["call_method", "unsqueeze", [NodeRef(0), -2], {}],
                    ["call_function", "mul", [NodeRef(1), NodeRef(2)], {}], ["call_method", "sum", [NodeRef(3)], {}])
    vector = await a.store(torch.ones(25_000))
    first = await refused(a.forward(await a.module(graph(outer), {}), Ref(vector)))
    column = await a.op("unsqueeze", Ref(vector), -1)
    second = await refused(a.op("mul", Ref(column), Ref(await a.op("unsqueeze", Ref(vector), -2))))
    status = await a.call("status", {})
    return ("refused" if first and second else "ran") + f"; rss {status['rss_bytes'] >> 20} MiB"


@dos("a client that stops reading 200 replies of 8 MiB")
async def stops_reading(c: Campaign, a: Attacker) -> Any:
    assert a.socket is not None
    a.socket.setsockopt(zmq.RCVHWM, 1)
    big = await a.store(torch.zeros(4 << 20))
    for _ in range(200):
        view = a.new()
        await a.send("op", {"op": "getitem", "args": [Ref(big), slice(None, None, 2)], "kwargs": {}, "out": [view]})
        await a.send("get", {"obj": view})
    await asyncio.sleep(2)
    async with c.target.connect() as other:
        status = await other.status()
    return f"rss {status['rss_bytes'] >> 20} MiB"


@dos("sessions of clients that vanish without closing, until the daemon is full")
async def vanishing(c: Campaign, a: Attacker) -> Any:
    gone = 0
    for _ in range(300):
        async with contextlib.AsyncExitStack() as stack:
            ghost = Attacker(c.target)
            await ghost.__aenter__()
            stack.callback(ghost.socket.close, 0)  # vanish: no close command, no more heartbeats
            try:
                await ghost.call("ping", {"interval": 0.1})  # it says it beats every 0.1 s
                await ghost.call("store", {"out": 1, "value": torch.ones(3)})
            except Denied:
                break  # full
            gone += 1
    started = time.perf_counter()
    while time.perf_counter() - started < 30:
        try:
            async with c.target.connect() as newcomer:
                await newcomer.ping()
                return f"{gone} gone; a new client got in after {time.perf_counter() - started:.1f}s"
        except fz.LimitExceeded:
            await asyncio.sleep(0.25)
    return f"{gone} gone; LOCKED OUT"


# --- class 5: the bind guard (in this process: nothing is exposed) ---------------------------------------

@route("5 bind guard", "no-keys daemon on 0.0.0.0:0@127.0.0.1, *, 0.0.0.0, eth0, user@, ;, [::]")
async def bind_guard(c: Campaign) -> Any:
    served = []
    for address in ("tcp://0.0.0.0:0@127.0.0.1", "tcp://*:0", "tcp://0.0.0.0:0", "tcp://eth0:0",
                    "tcp://user@127.0.0.1:0", "tcp://127.0.0.1:0;0.0.0.0:0", "tcp://[::]:0", "tcp://[::ffff:0.0.0.0]:0"):
        worker = Worker("redteam-bind", config=WorkerConfig())
        try:
            bound = worker.bind(address)
            if not bound.startswith(("tcp://127.", "tcp://[::1]")):
                served.append(f"{address} -> {bound}")
        except Exception:
            pass
        finally:
            await worker.close()
    return ("leaked", len(served)) if served else "refused"


# --- running the campaign ------------------------------------------------------------------------------

async def run(target: Target, only: str | None = None) -> Campaign:
    campaign = Campaign(target)
    for kind, name, needs, fn in ROUTES:
        if only and only not in name and only not in kind:
            continue
        if (needs == "open" and not target.open_dataset) or (needs == "secure" and not target.secure_address) \
                or (needs == "hosted" and not target.hosted_dataset):
            campaign.outcomes.append(Outcome(name, kind, f"skipped (no {needs} dataset/daemon given)"))
            continue
        try:
            result = await asyncio.wait_for(fn(campaign), 300)
        except Exception as exc:  # an attack that broke on the way: say so, it is not a pass
            campaign.outcomes.append(Outcome(name, kind, f"ERROR {type(exc).__name__}: {exc}"[:120], failed=True))
            continue
        if isinstance(result, tuple):
            leaked = result[1]
            text = f"leaked {leaked} value(s)" if leaked else "held"
            campaign.outcomes.append(Outcome(name, kind, text, leaked, failed=bool(leaked)))
        else:
            slow = result.startswith("p99") and float(result.split()[1]) >= PING_LIMIT_MS
            frozen = "LOCKED OUT" in result or " ran" in f" {result}"
            campaign.outcomes.append(Outcome(name, kind, result, failed=slow or frozen))
    return campaign


def table(campaign: Campaign) -> str:
    rows = [("route", "class", "result")] + [(o.route, o.kind, o.result + ("  <-- FAIL" if o.failed else ""))
                                              for o in campaign.outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    leaked = sum(o.leaked for o in campaign.outcomes)
    failed = sum(o.failed for o in campaign.outcomes)
    lines.append(f"\n{len(campaign.outcomes)} routes; {failed} failed; {leaked} value(s) leaked")
    return "\n".join(lines)


def spawn(folder: Path) -> tuple[list[DaemonProcess], Target]:
    """Two daemons of our own on made-up rows: one with the rows protected (and an open copy, for the
    pointer routes), one that also requires secure aggregation. Small quotas, short budgets."""
    generator = torch.Generator().manual_seed(16)
    x = torch.rand(ROWS, FEATURES, generator=generator) * 1000 + 123.456
    y = torch.randint(0, CLASSES, (ROWS,), generator=generator)
    path = write_dataset(folder / "rows.safetensors", x, y)
    (folder / "shards").mkdir()
    for n, client in enumerate(("client-a", "client-b")):
        write_dataset(folder / "shards" / f"{client}.safetensors", x[50 * n:50 * (n + 1)], y[50 * n:50 * (n + 1)])
    terms = ["--min-batch-size", "16", "--min-metric-rows", "16", "--max-command-seconds", "3",
             "--max-session-bytes", str(64 << 20), "--max-sessions", "16"]
    hosted = ["--clients-from", f"shard={folder / 'shards'}"]
    plain = DaemonProcess("redteam", extra_args=["--data", f"rows={path}", "--open-data", f"open_rows={path}", *hosted,
                                                 *terms], log_dir=folder)
    secure = DaemonProcess("redteam-secure", extra_args=["--data", f"rows={path}", "--require-secure-aggregation",
                                                          *terms], log_dir=folder)
    try:
        for daemon in (plain, secure):
            daemon.spawn()
        addresses = [daemon.wait_ready(timeout=90) for daemon in (plain, secure)]
    except BaseException:
        for daemon in (plain, secure):
            with contextlib.suppress(Exception):
                daemon.stop()
        raise
    return [plain, secure], Target(addresses[0], "rows", "open_rows", addresses[1], truth=(x, y),
                                   hosted_dataset="shard")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", help="the daemon to attack, e.g. tcp://127.0.0.1:5555")
    parser.add_argument("--spawn", action="store_true", help="start daemons of our own on made-up rows and attack them")
    parser.add_argument("--dataset", default="rows", help="the protected dataset's name on that daemon")
    parser.add_argument("--open-dataset", help="an open dataset's name, for the pointer routes")
    parser.add_argument("--secure-address", help="a daemon holding the dataset with --require-secure-aggregation")
    parser.add_argument("--hosted-dataset", help="the dataset name of the clients it hosts (--clients-from NAME=DIR)")
    parser.add_argument("--truth", help="the protected dataset's file: returned values are leaks if they are its")
    parser.add_argument("--server-key", help="the daemon's public .key file (CurveZMQ)")
    parser.add_argument("--client-key", help="your allowed .key_secret file")
    parser.add_argument("--only", help="run only routes whose name or class contains this")
    args = parser.parse_args(argv)
    if bool(args.address) == args.spawn:
        parser.error("give --address or --spawn")
    daemons: list[DaemonProcess] = []
    with tempfile.TemporaryDirectory(prefix="fedzmq-redteam-") as folder:
        try:
            if args.spawn:
                daemons, target = spawn(Path(folder))
            else:
                truth = None
                if args.truth:
                    data = load_dataset(args.dataset, args.truth)
                    truth = (data.features, data.labels)
                target = Target(args.address, args.dataset, args.open_dataset, args.secure_address, args.server_key,
                                args.client_key, truth, args.hosted_dataset)
            campaign = asyncio.run(run(target, args.only))
        finally:
            for daemon in daemons:
                with contextlib.suppress(Exception):
                    daemon.stop()
    print(table(campaign))
    return 1 if any(o.failed for o in campaign.outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
