"""The table of commands: the single source of truth for the client and the worker.

Each command names its arguments, how the worker schedules it, and what it does to the privacy of the
data (see ``Command``). The codec validates every request against this table before anything else
looks at it; the worker has exactly one handler per entry (``fedzmq.worker.handlers.HANDLERS``,
checked when the worker starts) and one executor that applies the declarations; the client sends
only these names.

Scheduling:
- ``control`` commands (ping, heartbeat, status) are answered by the receive loop at once, even while
  the session is busy with a long command: they are how liveness is observed.
- every other command goes through its session's queue, so one session's commands run in the order
  they were sent, even when pipelined; different sessions do not wait on each other.
- ``offload`` says where torch work runs: "never" on the event loop (cheap bookkeeping), "always" in
  the worker's thread pool (forward, backward, optimizer steps, training), "large" in the pool unless
  its inputs and outputs are small (tensor operations; see ``fedzmq.worker.cost.INLINE_NUMEL``; a fit
  of a few steps of a small model: ``fedzmq.worker.executor.small_fit``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from .errors import quoted

MAX_ID = 2**63 - 1

Validator = Callable[[Any], bool]


def _is_id(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_ID


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and len(value) <= 1 << 14 and all(_is_id(v) for v in value)


def _is_int(value: Any) -> bool:
    return type(value) is int


def _is_nonneg_int(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_ID


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


def _is_str(value: Any) -> bool:
    return type(value) is str and len(value) <= 256


def _is_bool(value: Any) -> bool:
    return type(value) is bool


def _is_strs(value: Any) -> bool:
    return isinstance(value, list) and 0 < len(value) <= 1 << 14 and all(_is_str(v) for v in value)


def _is_list(value: Any) -> bool:
    return isinstance(value, list)


def _is_map(value: Any) -> bool:
    return isinstance(value, dict)


def _is_any(value: Any) -> bool:
    return True


ID, IDS, INT, NONNEG, NUMBER, STR, STRS, BOOL, LIST, MAP, VALUE = (
    _is_id, _is_ids, _is_int, _is_nonneg_int, _is_number, _is_str, _is_strs, _is_bool, _is_list, _is_map, _is_any,
)


@dataclass(frozen=True)
class Command:
    """One command: its arguments, how the worker schedules it, and what it does to the data's privacy.

    The privacy fields are declarations the worker's executor applies, the same way for every
    command (handlers only do their own work):

    - ``refs``: the arguments that name objects, with the kind each must be (``"gradient"``: a
      tensor whose gradient the command reads). The executor looks them up once, before the handler
      runs; a request's label is the join of theirs and of every tensor it references.
    - ``takes_refs``: the arguments that may reference the session's tensors (``codec.Ref``) anywhere
      inside them, as inputs: an op's and a forward's arguments, a state loaded or put, a backward's
      gradient. A reference anywhere else is refused before the command runs: a secure step's payload,
      a stream's chunk and a stored value take bytes from the wire (a red team built a secure step's
      message around one byte of the owner's rows, and read every byte from whether the step failed as
      "not invited" or as "too few peers").
    - ``writes``: what the command may change besides its outputs: ``"module"`` (the module named
      by the ``obj``/``module`` argument: its parameters, buffers and gradients, and a fit's
      optimizer's state), ``"optimizer"`` (its module's parameters and its own state), ``"graph"``
      (backward: the gradients of the graph's leaves), ``"stream"`` (the tensor being streamed in).
      Whatever it changed joins the label of what it wrote.
    - ``derives``: the label of what it writes and makes: ``"inputs"`` (the request's label: the join
      of everything it referenced, and of the dataset it read), or ``"trained"`` (fit: the owner's
      release of trained parameters, joined with the labels of the model and optimizer it used).
    - ``releases``: the argument naming the object whose value the reply carries, checked against the
      release policy; ``"masked"`` for secure aggregation's masked update; ``"after"`` for the model's
      state as the command leaves it (a fit with ``reply_state``: checked, before it runs, with the
      label the model will have).
    - ``charges``: what the quota holds while the command runs, beside the objects it stores:
      ``"outputs"`` (sized on the meta device before running), ``"forward"`` (a forward's
      intermediates), ``"batch"`` (the batch a fit or an evaluation copies out of the dataset),
      ``"state"`` (an optimizer's first state), ``"stream"`` (a stream's buffer), ``"clients"`` (a fit
      over hosted clients' trained states or sums), ``"copies"`` (a model's entries sent by reference
      that it copies), ``"gradient"`` (the copy of a gradient), ``"secure"`` (a secure round's copies of the
      model), ``"graph"`` (what autograd saves, for as long as the graph lives).
    - ``reads_dataset``: it reads the owner's rows (its errors are sanitized).
    - ``reports_metrics``: its reply carries metrics computed with the model (a loss, an accuracy):
      released as the rows' part of the owner's terms allows, but they tell the model's weights too,
      so a model whose weights (or the state it loads) could not leave as a model state is refused
      before it runs (secure aggregation's label aside: its rounds report their fits' metrics).
    - ``fails_on_values``: where torch may check values as the command runs, so that whether it fails
      tells something of them: an op's schema (``"op"``, ``fedzmq.ops.OpSchema.checks_values``) or a
      model's layers and program (``"module"``, ``fedzmq.modeldesc.checks_values``). Such a call on
      values the terms keep is refused before it runs, whatever the values.
    - ``loads``: its optional ``load`` argument (a model state the client sent) is copied into its
      module before it runs, as ``module_load`` would: a round's weights in the same trip as its work.
    - ``changes_nothing``: it writes no tensor that exists before it runs (it reads, makes new objects,
      or drops some). Replies leave uncopied, their frames the objects' own memory, so a command that
      may change memory first waits until ZeroMQ has sent the session's earlier replies
      (``Worker._sent``); one that changes nothing need not. Undeclared, a command waits.
    - ``frees``: it drops objects (``delete``): it waits as a command that changes memory does, since
      an unsent reply's frames may be a dropped object's memory, charged to the session only while the
      object is (a 64 KiB slice of a 16 MiB tensor replied to a client that stopped reading, then
      deleted, kept 16 MiB charged 64 KiB: 1.9 GiB under a 32 MiB quota after 150 of them).
    """

    name: str
    required: dict[str, Validator] = field(default_factory=dict)
    optional: dict[str, Validator] = field(default_factory=dict)
    control: bool = False
    offload: Literal["never", "always", "large"] = "never"
    #: argument names that hold ids of objects this command creates (a failed command marks them failed)
    outputs: tuple[str, ...] = ()
    refs: dict[str, str] = field(default_factory=dict)
    takes_refs: tuple[str, ...] = ()
    writes: Literal["module", "optimizer", "graph", "stream"] | None = None
    derives: Literal["inputs", "trained"] = "inputs"
    releases: str | None = None
    charges: tuple[str, ...] = ()
    reads_dataset: bool = False
    loads: bool = False
    reports_metrics: bool = False
    fails_on_values: Literal["op", "module"] | None = None
    changes_nothing: bool = False
    frees: bool = False

    @property
    def waits_for_replies(self) -> bool:
        """Whether it runs only once the session's replies that left uncopied have been sent."""
        return not self.changes_nothing or self.frees

    def output_args(self, args: dict[str, Any]) -> dict[str, Any]:
        """The arguments of ``args`` that name this command's outputs and pass its own checks: the ids a
        request refused unread has its outputs marked failed under (never ids a full decode refuses)."""
        checks = {**self.optional, **self.required}
        return {name: args[name] for name in self.outputs if name in args and checks[name](args[name])}

    def check_args(self, args: dict[str, Any]) -> str | None:
        """Return why ``args`` do not fit this command, or None when they do."""
        for name, valid in self.required.items():
            if name not in args:
                return f"{self.name}: missing argument {name!r}"
            if not valid(args[name]):
                return f"{self.name}: argument {name!r} has a wrong type or value"
        for name, value in args.items():
            if name in self.required:
                continue
            optional = self.optional.get(name)
            if optional is None:
                return f"{self.name}: unknown argument {quoted(name)}"
            if not optional(value):
                return f"{self.name}: argument {name!r} has a wrong type or value"
        return None


def _table(*commands: Command) -> dict[str, Command]:
    return {c.name: c for c in commands}


#: what a daemon offers beyond the protocol's first version, named in its ping; a client uses one only
#: when its daemon names it. ``"fetch"``: an op and a ``get`` of its output as one command (``op``'s
#: ``fetch`` argument), which ``await (x + 1).get()`` becomes when nothing was sent between the two.
FEATURES = ("fetch",)

COMMANDS: dict[str, Command] = _table(
    # liveness and introspection (a client announces its heartbeat interval: silent for many, it is gone)
    Command("ping", {}, {"interval": NUMBER, "chunk_bytes": NONNEG}, control=True),
    Command("heartbeat", {}, {"interval": NUMBER, "chunk_bytes": NONNEG}, control=True),
    Command("status", control=True),
    Command("close"),
    # tests only: refused unless the daemon runs with --fault-injection
    Command("debug_delay", {"seconds": NUMBER}, control=True),
    # tensors
    Command("store", {"out": ID, "value": VALUE}, outputs=("out",), changes_nothing=True),
    Command("get", {"obj": ID}, offload="large", refs={"obj": "tensor"}, releases="obj", changes_nothing=True),
    Command("info", {"obj": ID}, refs={"obj": "tensor"}, changes_nothing=True),
    Command("delete", {"objs": IDS}, offload="large", changes_nothing=True, frees=True),
    Command("alloc", {"out": ID, "dtype": STR, "shape": LIST}, {"grad": BOOL}, outputs=("out",),
            charges=("stream",), changes_nothing=True),
    Command("write", {"obj": ID, "offset": NONNEG, "data": VALUE}, offload="always", refs={"obj": "partial"},
            writes="stream"),  # a chunk's copy
    Command("read", {"obj": ID, "offset": NONNEG, "length": NONNEG}, offload="always", refs={"obj": "tensor"},
            releases="obj", changes_nothing=True),
    # ``fetch``: then a ``get`` of its one output, in the same reply (``Executor.execute``)
    Command("op", {"op": STR, "args": LIST, "kwargs": MAP, "out": IDS}, {"fetch": BOOL}, offload="large",
            outputs=("out",), takes_refs=("args", "kwargs"),
            charges=("outputs", "graph"), fails_on_values="op", changes_nothing=True),
    Command("backward", {"obj": ID}, {"grad": VALUE}, offload="always", refs={"obj": "tensor"}, takes_refs=("grad",),
            writes="graph"),
    Command("grad", {"obj": ID, "out": ID}, offload="large", refs={"obj": "gradient"}, outputs=("out",),
            changes_nothing=True, charges=("gradient",)),
    # modules
    Command("module_put", {"out": ID, "spec": MAP, "state": MAP}, offload="always", outputs=("out",),
            takes_refs=("state",), changes_nothing=True, charges=("copies",)),
    Command("module_load", {"obj": ID, "state": MAP}, offload="always", refs={"obj": "module"}, takes_refs=("state",),
            writes="module"),
    Command("module_call", {"obj": ID, "args": LIST, "kwargs": MAP, "out": IDS}, offload="always",
            outputs=("out",), refs={"obj": "module"}, takes_refs=("args", "kwargs"), writes="module",
            charges=("forward", "graph"),
            fails_on_values="module"),
    Command("module_state", {"obj": ID}, offload="always", refs={"obj": "module"}, releases="obj",
            changes_nothing=True),
    # big models: one parameter's bytes in chunks, straight into / out of the module
    Command("module_write", {"obj": ID, "name": STR, "offset": NONNEG, "data": VALUE}, {"entries": MAP},
            offload="always",
            refs={"obj": "module"}, writes="module"),
    Command("module_read", {"obj": ID, "name": STR, "offset": NONNEG, "length": NONNEG}, {"stream": ID},
            offload="always",
            refs={"obj": "module"}, releases="obj", changes_nothing=True),
    Command("module_mode", {"obj": ID, "train": BOOL}, refs={"obj": "module"}, changes_nothing=True),
    # optimizers
    # made and zeroed on a torch thread when big (``Executor._large``): Adagrad fills its state when made, and
    # zeroing gradients in place writes every one (work the size of the model)
    Command("optim_create", {"out": ID, "cls": STR, "module": ID, "groups": LIST}, offload="large",
            outputs=("out",), refs={"module": "module"}, changes_nothing=True, charges=("state",)),
    Command("optim_zero_grad", {"obj": ID}, {"set_to_none": BOOL}, offload="large", refs={"obj": "optimizer"}),
    Command("optim_step", {"obj": ID}, offload="always", refs={"obj": "optimizer"}, writes="optimizer",
            charges=("state",)),
    # the data owner's datasets, and training on them
    Command("datasets", {}, {"query": STR}, changes_nothing=True),
    Command("dataset_tensor", {"dataset": STR, "part": STR, "out": ID}, outputs=("out",), reads_dataset=True,
            changes_nothing=True),
    # one trip of a federated round: load the global weights (``load``), train, and send the trained
    # state back in the reply (``reply_state``)
    Command("fit", {"module": ID, "dataset": STR, "loss": STR, "batch_size": NONNEG},
            {"optimizer": MAP, "optim": ID, "epochs": NONNEG, "steps": NONNEG, "prox_mu": NUMBER, "seed": INT,
             "load": MAP, "reply_state": BOOL, "clients": STRS, "combine": BOOL},
            offload="large", refs={"module": "module", "optim": "optimizer"}, takes_refs=("load",), writes="module",
            derives="trained",
            releases="after", charges=("forward", "batch", "state", "clients"), reads_dataset=True, loads=True,
            reports_metrics=True),
    # the logical clients a daemon hosts (--clients-from)
    Command("clients", changes_nothing=True),
    # secure aggregation: one command, five steps (advertise, share_keys, masked_input, confirm, unmask)
    Command("secagg", {"step": STR, "round": NONNEG, "payload": VALUE},
            {"module": ID, "client": NONNEG, "weight": NUMBER}, offload="always", refs={"module": "module"},
            releases="masked", charges=("secure",)),
    Command("evaluate", {"module": ID, "dataset": STR, "loss": STR}, {"batch_size": NONNEG, "load": MAP},
            offload="always",
            refs={"module": "module"}, takes_refs=("load",), writes="module", charges=("forward", "batch"),
            reads_dataset=True, loads=True,
            reports_metrics=True),
)
