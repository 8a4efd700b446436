"""A request bound to its session: every object it names looked up once, and the label of it all.

The executor binds a request before anything runs: references in its arguments become the session's
tensors, the objects its command names (``Command.refs``) are fetched with their kinds checked, the
dataset it reads is found, and the join of the labels of everything referenced is computed. Handlers
then work on the binding; none of them looks an object up or computes a label again.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from ..codec import Ref, Request
from ..commands import Command
from ..errors import BadRequest, ObjectNotFound, PermissionDenied, quoted
from .datasets import Dataset
from .ledger import ReleaseLedger
from .objects import HostedModule, HostedOptimizer, PartialTensor, module_tensors, optimizer_state
from .session import Session
from .taint import Label, storage_key

if TYPE_CHECKING:
    from ..modeldesc import ModelRegistry
    from .config import WorkerConfig
    from .cost import Coster, OpCost
    from .policy import Policy
    from .training import Terms


@dataclass
class Context:
    """What handlers may use besides their binding: the worker's settings and shared services."""

    worker_id: str
    config: "WorkerConfig"
    policy: "Policy"
    datasets: dict[str, Dataset]
    #: the logical clients this daemon hosts: client id -> its datasets
    clients: dict[str, dict[str, Dataset]]
    models: "ModelRegistry"
    coster: "Coster"
    #: the worker's status and ping answers (callables: the handlers hold no server reference)
    status: Callable[[], dict[str, Any]]
    ping: Callable[[], dict[str, Any]]
    #: the owner's terms for training and evaluating on its rows
    terms: "Terms"
    #: seconds every queued command waits before it runs (fault injection: a slow worker)
    delay: float = 0.0
    #: the secure rounds each data holder gave a masked update to (``--secagg-max-rounds``)
    ledger: ReleaseLedger = field(default_factory=ReleaseLedger)
    #: the evaluations each data holder answered (``--max-evaluations``)
    evaluations: ReleaseLedger = field(default_factory=ReleaseLedger)

    def dataset(self, session: Session, name: str, client: str | None = None) -> Dataset:
        """Dataset ``name`` of the session's client (or of the daemon), or of ``client`` when a session
        with the daemon names one of its hosted clients."""
        if client is not None:
            if client not in self.clients:
                raise ObjectNotFound.new(f"worker {self.worker_id!r} hosts no client {client!r}")
            datasets, whose = self.clients[client], f"client {client!r}"
        else:
            datasets, whose = session.datasets, f"worker {self.worker_id!r}" if session.client is None \
                else f"client {session.client!r}"
        if name not in datasets:
            raise ObjectNotFound.new(f"no dataset {name!r} on {whose} (it has: {sorted(datasets) or 'none'})")
        return datasets[name]


@dataclass
class Binding:
    request: Request
    command: Command
    session: Session
    #: the request's arguments, every ``Ref`` replaced by the session's object
    args: dict[str, Any]
    #: the objects the command names (``Command.refs``), by argument name
    objects: dict[str, Any]
    #: the tensors referenced anywhere in the arguments (operands, a gradient, a model's state)
    tensors: list[torch.Tensor]
    #: the join of the labels of everything referenced (objects and tensors); not the dataset's rows
    label: Label
    dataset: Dataset | None = None
    #: what the executor measured before running (an op's output sizes)
    cost: "OpCost | None" = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: it may draw from torch's default generator (``fedzmq.worker.randomness.may_draw``; the executor sets it)
    draws: bool = False

    @property
    def data_label(self) -> Label:
        """The label of the rows the command reads: PRIVATE for a protected dataset, ROWS for an open one."""
        if self.dataset is None:
            return Label.PUBLIC
        return Label.PRIVATE if self.dataset.policy == "protected" else Label.ROWS

    @property
    def input_label(self) -> Label:
        """Everything the command reads: what it references, and the rows it reads."""
        return self.label if self.dataset is None else self.label | self.data_label  # a Flag's | is slow

    @property
    def touches_private(self) -> bool:
        """Whether the command computes on anything labelled, or on the owner's rows: its errors could
        quote them, so they go back sanitized."""
        return bool(self.label) or self.dataset is not None


def bind(session: Session, request: Request, command: Command, context: Context) -> Binding:
    table = session.table
    objects = {name: table.get(request.args[name], kind) for name, kind in command.refs.items()
               if name in request.args}
    tensors: list[torch.Tensor] = []
    args = {name: value if value is None or type(value) in _PLAIN  # (most: ids, names, flags, numbers)
            else _resolve(value, session, tensors) if name in command.takes_refs else _no_refs(name, value, command)
            for name, value in request.args.items()}
    dataset = None
    if command.reads_dataset:
        hosted = request.args.get("clients")  # a fit over many hosted clients
        dataset = biggest_dataset(context, session, request.args["dataset"], hosted) if hosted else \
            context.dataset(session, request.args["dataset"])
    if command.name == "dataset_tensor" and dataset is not None and dataset.policy == "protected":
        raise PermissionDenied.new(f"dataset {dataset.name!r} is protected: no pointer to its rows is given out; "
                                   "only the worker's own fit and evaluate of a model read them")
    label = references_label(session, command, objects, tensors)
    return Binding(request, command, session, args, objects, tensors, label, dataset)


def row_kind(dataset: Dataset) -> tuple[tuple[int, ...], str, tuple[int, ...], str]:
    """What a forward over a dataset's rows depends on besides their number: the shape and dtype of a row
    of its features and of its labels."""
    features, labels = dataset.features, dataset.labels
    return (tuple(features.shape[1:]), str(features.dtype), tuple(labels.shape[1:]), str(labels.dtype))


def biggest_dataset(context: Context, session: Session, name: str, clients: list[str]) -> Dataset:
    """The dataset a fit over many hosted clients is sized and checked by: the biggest of the named
    clients'. A red-team session named a 16-row shard before a 40,000-row one: sized by the first, the
    big one's full-batch step ran 975 MiB past a 64 MiB session quota. Names the daemon does not host
    fail later, each on its own; a name given twice is refused (it would repeat that client's work), and
    so are clients whose rows differ in shape or dtype: the forward is sized on one client's rows, and a
    shard of few but wide rows (images of 256 x 256 beside 4 x 4) ran 2.7 GB past a 16 MiB quota."""
    counts = Counter(clients)
    twice = sorted(client for client, count in counts.items() if count > 1)
    if twice:
        raise BadRequest.new(f"a fit over clients names {len(twice)} of them twice or more "
                             f"(the first: {quoted(twice[0])})")
    biggest: Dataset | None = None
    missing: ObjectNotFound | None = None
    for client in clients:
        try:
            found = context.dataset(session, name, client)
        except ObjectNotFound as exc:
            missing = missing or exc
            continue
        if biggest is not None and row_kind(found) != row_kind(biggest):
            raise BadRequest.new(f"a fit over clients needs clients whose rows share a row shape and dtype: "
                                 f"{quoted(client)}'s are {row_kind(found)}, another's {row_kind(biggest)}")
        if biggest is None or len(found) > len(biggest):
            biggest = found
    if biggest is None:
        assert missing is not None
        raise missing
    return biggest


def references_label(session: Session, command: Command, objects: dict[str, Any], tensors: list[torch.Tensor],
                     leave_out: frozenset[int] = frozenset()) -> Label:
    """The join of the labels of the tensors and objects a command references, without the storages in
    ``leave_out`` (those its own load replaces whole, for what it computes after the load)."""
    taint = session.taint
    if not taint:
        return Label.PUBLIC
    label = taint.of(tensors)
    for name, value in objects.items():
        held = object_tensors(value)
        if leave_out:
            held = [t for t in held if storage_key(t.untyped_storage()) not in leave_out]
        label |= taint.of(held)
        if command.refs[name] == "gradient" and value.grad is not None:
            label |= taint.of_tensor(value.grad)
    return label


def object_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors a command reads when it uses an object: a tensor's value, a module's parameters and
    buffers, an optimizer's parameters, their gradients and its state. (A gradient's own label is on
    its storage: ``grad`` makes an object of it.)"""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, PartialTensor):
        return [value.tensor]
    if isinstance(value, HostedModule):
        return module_tensors(value.module, grads=False)
    if isinstance(value, HostedOptimizer):
        params = [p for group in value.optimizer.param_groups for p in group["params"]]
        return params + [p.grad for p in params if p.grad is not None] + optimizer_state(value.optimizer)
    return []


_PLAIN = frozenset((bool, int, float, str))


def _resolve(value: Any, session: Session, tensors: list[torch.Tensor]) -> Any:
    """Replace every ``Ref`` by the session's tensor, collecting the tensors referenced. The arguments are
    as the decoder made them: containers of exactly these types, whose scalars need no call each."""
    kind = type(value)
    if value is None or kind in _PLAIN:  # most values: ids, names, flags, numbers
        return value
    if kind is Ref:
        obj = session.table.get(value.id, "tensor")
        tensors.append(obj)
        return obj
    if kind is list:
        return [v if v is None or type(v) in _PLAIN else _resolve(v, session, tensors) for v in value]
    if kind is dict:
        return {k: v if v is None or type(v) in _PLAIN else _resolve(v, session, tensors) for k, v in value.items()}
    if kind is tuple:
        return tuple(_resolve(v, session, tensors) for v in value)
    if isinstance(value, (Ref, list, tuple, dict)):  # a subclass (the decoder makes none): its refs would stay
        raise BadRequest.new(f"arguments cannot hold a {kind.__name__}")
    return value




def ref_ids(value: Any) -> Iterator[int]:
    """The object ids a request's arguments reference (``Ref``), anywhere inside them."""
    if isinstance(value, Ref):
        yield value.id
    elif isinstance(value, (list, tuple)):
        for item in value:
            if item is not None and type(item) not in _PLAIN:
                yield from ref_ids(item)
    elif isinstance(value, dict):
        for item in value.values():
            if item is not None and type(item) not in _PLAIN:
                yield from ref_ids(item)


def _no_refs(name: str, value: Any, command: Command) -> Any:
    """``value`` as it is, unless it holds a reference (``Command.takes_refs``)."""
    if value is None or type(value) in _PLAIN:
        return value
    if next(ref_ids(value), None) is not None:
        where = f" (only {', '.join(command.takes_refs)} can)" if command.takes_refs else ""
        raise BadRequest.new(f"{command.name}'s {name!r} cannot name an object{where}: it takes values sent with "
                             "the request")
    return value


@dataclass
class Made:
    """What a handler made: the new objects, in the order of the command's output ids (the executor
    stores and labels them), and the reply's result."""

    values: list[Any]
    result: Any = None


__all__ = ["Binding", "Context", "Made", "bind", "object_tensors", "ref_ids", "references_label"]
