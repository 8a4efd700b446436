"""The table of commands: the single source of truth for the client and the worker.

Each command names its arguments and how the worker schedules it. The codec validates every request
against this table before anything else looks at it; the worker has exactly one handler per entry
(``Handlers.cmd_<name>``, checked when the worker starts); the client sends only these names.

Scheduling:
- ``control`` commands (ping, heartbeat, status) are answered by the receive loop at once, even while
  the session is busy with a long command: they are how liveness is observed.
- every other command goes through its session's queue, so one session's commands run in the order
  they were sent, even when pipelined; different sessions do not wait on each other.
- ``offload`` says where torch work runs: "never" on the event loop (cheap bookkeeping), "always" in
  the worker's thread pool (forward, backward, optimizer steps, training), "large" in the pool only
  when the inputs hold more than ``INLINE_NUMEL`` elements (tensor operations).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

MAX_ID = 2**63 - 1
#: an op whose inputs hold more elements than this runs in the thread pool: below it, even a
#: broadcast or a matmul of the inputs stays small enough not to hold up the event loop
INLINE_NUMEL = 1 << 10

Validator = Callable[[Any], bool]


def _is_id(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_ID


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and len(value) <= 1 << 16 and all(_is_id(v) for v in value)


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


def _is_list(value: Any) -> bool:
    return isinstance(value, list)


def _is_map(value: Any) -> bool:
    return isinstance(value, dict)


def _is_any(value: Any) -> bool:
    return True


ID, IDS, INT, NONNEG, NUMBER, STR, BOOL, LIST, MAP, VALUE = (
    _is_id, _is_ids, _is_int, _is_nonneg_int, _is_number, _is_str, _is_bool, _is_list, _is_map, _is_any,
)


@dataclass(frozen=True)
class Command:
    name: str
    required: dict[str, Validator] = field(default_factory=dict)
    optional: dict[str, Validator] = field(default_factory=dict)
    control: bool = False
    offload: Literal["never", "always", "large"] = "never"
    #: argument names that hold ids of objects this command creates (a failed command marks them failed)
    outputs: tuple[str, ...] = ()

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
            valid = self.optional.get(name)
            if valid is None:
                return f"{self.name}: unknown argument {name!r}"
            if not valid(value):
                return f"{self.name}: argument {name!r} has a wrong type or value"
        return None


def _table(*commands: Command) -> dict[str, Command]:
    return {c.name: c for c in commands}


COMMANDS: dict[str, Command] = _table(
    # liveness and introspection
    Command("ping", control=True),
    Command("heartbeat", control=True),
    Command("status", control=True),
    Command("close"),
    # tests only: refused unless the daemon runs with --fault-injection
    Command("debug_delay", {"seconds": NUMBER}, control=True),
    # tensors
    Command("store", {"out": ID, "value": VALUE}, outputs=("out",)),
    Command("get", {"obj": ID}),
    Command("info", {"obj": ID}),
    Command("delete", {"objs": IDS}),
    Command("alloc", {"out": ID, "dtype": STR, "shape": LIST}, {"grad": BOOL}, outputs=("out",)),
    Command("write", {"obj": ID, "offset": NONNEG, "data": VALUE}, offload="always"),  # a chunk's copy
    Command("read", {"obj": ID, "offset": NONNEG, "length": NONNEG}),
    Command("op", {"op": STR, "args": LIST, "kwargs": MAP, "out": IDS}, offload="large", outputs=("out",)),
    Command("backward", {"obj": ID}, {"grad": VALUE}, offload="always"),
    # modules
    Command("module_put", {"out": ID, "spec": MAP, "state": MAP}, offload="always", outputs=("out",)),
    Command("module_load", {"obj": ID, "state": MAP}, offload="always"),
    Command("module_call", {"obj": ID, "args": LIST, "kwargs": MAP, "out": IDS}, offload="always", outputs=("out",)),
    Command("module_state", {"obj": ID}, offload="always"),
    # big models: one parameter's bytes in chunks, straight into / out of the module
    Command("module_write", {"obj": ID, "name": STR, "offset": NONNEG, "data": VALUE}, offload="always"),
    Command("module_read", {"obj": ID, "name": STR, "offset": NONNEG, "length": NONNEG}, offload="always"),
    Command("module_mode", {"obj": ID, "train": BOOL}),
    # optimizers
    Command("optim_create", {"out": ID, "cls": STR, "module": ID, "groups": LIST}, outputs=("out",)),
    Command("optim_zero_grad", {"obj": ID}, {"set_to_none": BOOL}),
    Command("optim_step", {"obj": ID}, offload="always"),
    # the data owner's datasets, and training on them
    Command("datasets", {}, {"query": STR}),
    Command("dataset_tensor", {"dataset": STR, "part": STR, "out": ID}, outputs=("out",)),
    Command("fit", {"module": ID, "dataset": STR, "loss": STR, "batch_size": NONNEG},
            {"optimizer": MAP, "optim": ID, "epochs": NONNEG, "steps": NONNEG, "prox_mu": NUMBER, "seed": INT},
            offload="always"),
    # secure aggregation: one command, four steps (advertise, share_keys, masked_input, unmask)
    Command("secagg", {"step": STR, "round": NONNEG, "payload": VALUE},
            {"module": ID, "client": NONNEG, "weight": NUMBER}, offload="always"),
    Command("evaluate", {"module": ID, "dataset": STR, "loss": STR}, {"batch_size": NONNEG}, offload="always"),
)
