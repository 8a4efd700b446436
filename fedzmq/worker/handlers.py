"""One handler per command of ``fedzmq.commands.COMMANDS``: what a worker does with a request.

Handlers are plain functions of (session, args) that return the reply's result. They never see
sockets, and they run either on the event loop or in the worker's thread pool (the command table
says which), one at a time per session.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..codec import DTYPE_NAMES, DTYPES, Limits, Ref, StreamInfo, dtype_itemsize
from ..commands import COMMANDS, INLINE_NUMEL
from ..errors import BadRequest, ObjectNotFound, PermissionDenied, UnknownCommand
from ..modeldesc import ModelRegistry, check_state, instantiate
from ..ops import OPS
from ..optimizers import OPTIMIZERS
from . import training
from .datasets import Dataset
from .session import PartialTensor, RemoteOptimizer, Session, storage_key

def resolve(session: Session, value: Any) -> Any:
    """Replace every ``Ref`` in an argument structure by the session's tensor."""
    if isinstance(value, Ref):
        return session.tensor(value.id)
    if isinstance(value, list):
        return [resolve(session, v) for v in value]
    if isinstance(value, tuple):
        return tuple(resolve(session, v) for v in value)
    if isinstance(value, dict):
        return {k: resolve(session, v) for k, v in value.items()}
    return value


def referenced_numel(session: Session, value: Any) -> int:
    """How many elements the tensors referenced by ``value`` hold (to decide where to run an op)."""
    if isinstance(value, Ref):
        obj = session.objects.get(value.id)
        return obj.numel() if isinstance(obj, torch.Tensor) else 0
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (list, tuple)):
        return sum(referenced_numel(session, v) for v in value)
    if isinstance(value, dict):
        return sum(referenced_numel(session, v) for v in value.values())
    return 0


def tensor_info(tensor: torch.Tensor) -> list[Any]:
    return [DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype)), list(tensor.shape)]


def _unshared(result: Any, module: nn.Module) -> Any:
    """Outputs that are the module's own parameters (a forward returning ``self.weight``) are copied:
    a stored tensor must never change, and a step changes parameters in place."""
    storages = {storage_key(p.untyped_storage()) for p in module.parameters()}
    outputs = result if isinstance(result, tuple) else (result,)
    fixed = tuple(o.clone() if isinstance(o, torch.Tensor) and storage_key(o.untyped_storage()) in storages else o
                  for o in outputs)
    return fixed if isinstance(result, tuple) else fixed[0]


_SCALARS = (bool, int, float)


def _operand_ok(value: Any, depth: int = 0) -> bool:
    if isinstance(value, torch.Tensor) or value is None or value is Ellipsis or isinstance(value, torch.dtype):
        return True
    if type(value) in _SCALARS:
        return not (type(value) is int and abs(value) > 2**63)
    if isinstance(value, slice):
        return all(v is None or type(v) is int for v in (value.start, value.stop, value.step))
    if isinstance(value, (list, tuple)) and depth < 2:
        return all(_operand_ok(v, depth + 1) for v in value)
    return False


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (list, tuple)) and any(_has_tensor(v) for v in value)


def check_operands(name: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Ops compute on tensors: at least one operand is a tensor, the rest plain numbers, slices and
    dtypes. (Without this, ``pow(10, 10**8)`` would compute a huge Python int on the event loop.)"""
    if not _has_tensor(args) or not all(_operand_ok(v) for v in [*args, *kwargs.values()]):
        raise BadRequest.new(f"{name}: operands must be tensors (at least one), numbers, slices or dtypes")


def check_output_size(session: Session, name: str, fn: Any, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Run the op on the meta device first (shapes only, no data) and refuse an output over the quota
    before allocating it: an outer product of two modest vectors can be gigabytes. An output that views
    an operand (or is it, after an in-place op) needs no room: the session is charged by storage."""
    operands: list[torch.Tensor] = []

    def meta(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            operands.append(value.detach().to("meta").requires_grad_(value.requires_grad))
            return operands[-1]
        if isinstance(value, (list, tuple)):
            return type(value)(meta(v) for v in value)
        return value

    def new_bytes(output: torch.Tensor) -> int:
        if storage_key(output.untyped_storage()) in {storage_key(m.untyped_storage()) for m in operands}:
            return 0
        return output.numel() * output.element_size()

    try:
        outputs = fn(*meta(args), **{k: meta(v) for k, v in kwargs.items()})
    except Exception:
        return  # the real call will raise the real error
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    session.check_room(sum(new_bytes(o) for o in outputs if isinstance(o, torch.Tensor)), f"{name}'s output")


def byte_range(tensor: torch.Tensor, offset: int, length: int) -> torch.Tensor:
    """Bytes ``offset`` to ``offset + length`` of the tensor laid out contiguously (a stream's piece),
    copying about that many bytes: a whole ``contiguous()`` copy per piece would make streaming a
    transposed view quadratic, and each copy would be memory the session is not charged for."""
    itemsize = tensor.element_size()
    first = offset // itemsize
    elements = _element_range(tensor, first, -(-(offset + length) // itemsize))
    if elements.numel() <= 1:  # contiguous whatever its stride, but view() needs a stride of 1
        elements = elements.as_strided((elements.numel(),), (1,))
    return elements.view(torch.uint8)[offset - first * itemsize: offset - first * itemsize + length]


def _element_range(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Elements ``start`` to ``stop`` of ``tensor`` in row-major order, as a contiguous 1-D tensor. A
    range within one or two rows of the first dimension descends into those rows; a range over more
    rows copies them, which is at most three times the range (every row inside it is whole)."""
    if tensor.is_contiguous():
        return tensor.reshape(-1)[start:stop]
    if stop <= start:
        return tensor.new_empty(0)
    if tensor.dim() == 1:
        return tensor[start:stop].contiguous()
    row = tensor[0].numel()
    first, last = start // row, -(-stop // row)
    if last - first > 2:
        return tensor[first:last].contiguous().view(-1)[start - first * row: stop - first * row]
    return torch.cat([_element_range(tensor[r], max(start - r * row, 0), min(stop - r * row, row))
                      for r in range(first, last)])


class LiveReply(dict):
    """A reply holding live tensors (a module's parameters), sent without copying them: the session
    runs its next command only once ZeroMQ has sent these bytes, so no later step can change them
    mid-send. (It saves a model-sized copy per download of a federated round.)"""


def refs_in(value: Any) -> list[int]:
    """The object ids an argument structure refers to."""
    if isinstance(value, Ref):
        return [value.id]
    if isinstance(value, (list, tuple)):
        return [i for v in value for i in refs_in(v)]
    if isinstance(value, dict):
        return [i for v in value.values() for i in refs_in(v)]
    return []


#: ops whose scalar result, computed from private data, the "aggregates" policy releases
AGGREGATES = frozenset({"sum", "mean", "mse_loss", "l1_loss", "cross_entropy", "nll_loss", "binary_cross_entropy",
                        "binary_cross_entropy_with_logits"})


def _store_outputs(session: Session, out: list[int], result: Any, what: str, private: bool = False,
                   releasable: bool = False) -> list[list[Any]]:
    """Store an op's output tensors; outputs of private inputs stay private (scalars may be released)."""
    results = result if isinstance(result, tuple) else (result,)
    if len(results) != len(out) or not all(isinstance(r, torch.Tensor) for r in results):
        raise BadRequest.new(f"{what} returned {len(results)} value(s) of type "
                             f"{[type(r).__name__ for r in results]}; the request expected {len(out)} tensor(s)")
    for obj_id, tensor in zip(out, results):
        session.put(obj_id, tensor, private=private, releasable=releasable and tensor.numel() == 1)
    return None  # the client names the results; an empty reply keeps the pipelined path cheap


class Handlers:
    """The commands of one worker. ``status`` is a callable so the handlers need no server reference."""

    def __init__(self, worker_id: str, limits: Limits, models: ModelRegistry,
                 status: Callable[[], dict[str, Any]], ping: Callable[[], dict[str, Any]],
                 fault_injection: bool = False, datasets: dict[str, Dataset] | None = None,
                 private_release: str = "aggregates", require_secure_aggregation: bool = False) -> None:
        self.worker_id = worker_id
        self.private_release = private_release
        self.require_secure_aggregation = require_secure_aggregation
        #: the worker's WorkerConfig, for policies checked by handlers (secure aggregation's terms)
        self.policy: Any = None
        self.datasets = datasets or {}
        self.limits = limits
        self.fault_injection = fault_injection
        #: seconds every queued command waits before it runs (fault injection: a slow worker)
        self.delay = 0.0
        self.models = models
        self._status = status
        self._ping = ping
        missing = [name for name in COMMANDS if not callable(getattr(self, f"cmd_{name}", None))]
        if missing:
            raise RuntimeError(f"no handler for commands {missing}")

    def handler(self, cmd: str) -> Callable[[Session, dict[str, Any]], Any]:
        return getattr(self, f"cmd_{cmd}")

    # --- liveness ------------------------------------------------------------------------------

    def cmd_ping(self, session: Session, args: dict[str, Any]) -> Any:
        return {**self._ping(), "session": session.uid}

    def cmd_heartbeat(self, session: Session, args: dict[str, Any]) -> Any:
        return {"running": session.running, "last_done": session.last_done, "session": session.uid}

    def cmd_status(self, session: Session, args: dict[str, Any]) -> Any:
        return self._status()

    def cmd_debug_delay(self, session: Session, args: dict[str, Any]) -> Any:
        if not self.fault_injection:
            raise PermissionDenied.new("fault injection is off on this worker (start it with --fault-injection)")
        if not 0 <= args["seconds"] <= 3600:
            raise BadRequest.new("delay must be between 0 and 3600 seconds")
        self.delay = float(args["seconds"])
        return None

    def cmd_close(self, session: Session, args: dict[str, Any]) -> Any:
        session.clear()
        return None

    # --- tensors -------------------------------------------------------------------------------

    def cmd_store(self, session: Session, args: dict[str, Any]) -> Any:
        value = args["value"]
        if not isinstance(value, torch.Tensor):
            raise BadRequest.new("store takes a tensor")
        session.put(args["out"], value)
        return None

    def cmd_get(self, session: Session, args: dict[str, Any]) -> Any:
        tensor = session.tensor(args["obj"])
        session.check_release(args["obj"])
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > self.limits.chunk_bytes:
            return StreamInfo(DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), nbytes, tensor.requires_grad)
        return tensor.detach().requires_grad_(tensor.requires_grad)

    def cmd_info(self, session: Session, args: dict[str, Any]) -> Any:
        tensor = session.tensor(args["obj"])
        return {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                "requires_grad": tensor.requires_grad, "nbytes": tensor.numel() * tensor.element_size()}

    def cmd_delete(self, session: Session, args: dict[str, Any]) -> Any:
        return session.delete(args["objs"])

    def cmd_alloc(self, session: Session, args: dict[str, Any]) -> Any:
        dtype, shape = args["dtype"], args["shape"]
        if dtype not in DTYPES or not all(type(d) is int and d >= 0 for d in shape) or len(shape) > 32:
            raise BadRequest.new("alloc needs an allowlisted dtype and a shape of non-negative ints")
        numel = 1
        for d in shape:
            numel *= d
        if args.get("grad") and not DTYPES[dtype].is_floating_point:
            raise BadRequest.new("only floating point tensors can require gradients")
        nbytes = numel * dtype_itemsize(dtype)
        session.check_room(nbytes, "a stream")  # refuse before allocating anything
        tensor = torch.empty(shape, dtype=DTYPES[dtype])
        session.put(args["out"], PartialTensor(tensor, requires_grad=bool(args.get("grad"))))
        return None

    def cmd_write(self, session: Session, args: dict[str, Any]) -> Any:
        partial = session.partial(args["obj"])
        data = args["data"]
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
            raise BadRequest.new("write takes a flat uint8 tensor of bytes")
        target = partial.flat_bytes
        if args["offset"] != partial.written or partial.written + data.numel() > target.numel():
            raise BadRequest.new(f"chunk at offset {args['offset']} of {data.numel()} bytes does not continue "
                                 f"the stream ({partial.written} of {target.numel()} bytes written)")
        target[partial.written: partial.written + data.numel()].copy_(data)
        partial.written += data.numel()
        if partial.written == target.numel():
            tensor = partial.tensor.requires_grad_(partial.requires_grad)
            session.replace(args["obj"], tensor)
        return partial.written

    def cmd_read(self, session: Session, args: dict[str, Any]) -> Any:
        tensor = session.tensor(args["obj"]).detach()
        session.check_release(args["obj"])
        offset, length = args["offset"], args["length"]
        if offset + length > tensor.numel() * tensor.element_size() or length > self.limits.chunk_bytes:
            raise BadRequest.new(f"read of {length} bytes at {offset} is out of range or above the chunk size")
        return byte_range(tensor, offset, length)

    def cmd_op(self, session: Session, args: dict[str, Any]) -> Any:
        name = args["op"]
        fn = OPS.get(name)
        if fn is None:
            raise UnknownCommand.new(f"operation {name!r} is not on the worker's allowlist")
        if "out" in args["kwargs"] or "inplace" in args["kwargs"]:
            # stored tensors never change once made: replies send them without copying
            raise BadRequest.new(f"{name}: in-place forms (out=, inplace=) are not allowed")
        operands, options = resolve(session, args["args"]), resolve(session, args["kwargs"])
        check_operands(name, operands, options)
        if referenced_numel(session, args) > INLINE_NUMEL:
            check_output_size(session, name, fn, operands, options)
        with session.charging_saved_tensors():
            result = fn(*operands, **options)
        private = any(i in session.private for i in refs_in(args))
        releasable = private and self.private_release == "aggregates" and name in AGGREGATES
        return _store_outputs(session, args["out"], result, name, private, releasable)

    def cmd_backward(self, session: Session, args: dict[str, Any]) -> Any:
        tensor = session.tensor(args["obj"])
        grad = resolve(session, args.get("grad"))
        tensor.backward(grad)
        if self.require_secure_aggregation and (args["obj"] in session.private or
                                                any(i in session.private for i in refs_in(args.get("grad")))):
            # gradients of private data carry it into the parameters (a model can be built to
            # memorize its input): every module of the session is now private, like after fit
            session.private.update(i for i, v in session.objects.items() if isinstance(v, nn.Module))
        return None

    # --- modules -------------------------------------------------------------------------------

    def cmd_module_put(self, session: Session, args: dict[str, Any]) -> Any:
        # big tensors arrive beforehand as streamed objects and are named here by reference; the
        # module adopts them (no copy) and they leave the session's object table
        state, adopted = {}, []
        for name, value in args["state"].items():
            if isinstance(value, Ref):
                session.check_release(value.id)  # private data never becomes a model parameter
                state[name] = session.tensor(value.id)
                adopted.append(value.id)
            else:
                state[name] = value
        if args["out"] in session.objects:
            raise BadRequest.new(f"object id {args['out']} is already in use in this session")
        module = instantiate(args["spec"], state, self.models)
        session.delete(adopted)  # their bytes now belong to the module, counted by put below
        session.put(args["out"], module)
        return None

    def cmd_module_load(self, session: Session, args: dict[str, Any]) -> Any:
        """Update some or all parameters and buffers in place (the rest come by ``module_write``)."""
        module = session.module(args["obj"])
        current = module.state_dict()
        unknown = set(args["state"]) - set(current)
        if unknown:
            raise BadRequest.new(f"model has no parameters or buffers named {sorted(unknown)}")
        check_state({k: current[k] for k in args["state"]}, args["state"])
        with torch.no_grad():
            for name, tensor in args["state"].items():
                current[name].copy_(tensor)
        return None

    def _module_bytes(self, session: Session, obj: int, name: str) -> torch.Tensor:
        tensor = session.module(obj).state_dict().get(name)
        if tensor is None:
            raise BadRequest.new(f"model has no parameter or buffer named {name!r}")
        if not tensor.is_contiguous():
            raise BadRequest.new(f"{name!r} is not contiguous and cannot be streamed")
        return tensor.detach().view(-1).view(torch.uint8)

    def cmd_module_write(self, session: Session, args: dict[str, Any]) -> Any:
        target, data, offset = self._module_bytes(session, args["obj"], args["name"]), args["data"], args["offset"]
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
            raise BadRequest.new("module_write takes a flat uint8 tensor of bytes")
        if offset + data.numel() > target.numel():
            raise BadRequest.new(f"chunk of {data.numel()} bytes at {offset} runs past {args['name']!r}")
        with torch.no_grad():
            target[offset: offset + data.numel()].copy_(data)
        return None

    def cmd_module_read(self, session: Session, args: dict[str, Any]) -> Any:
        session.check_release(args["obj"])
        source, offset, length = self._module_bytes(session, args["obj"], args["name"]), args["offset"], args["length"]
        if offset + length > source.numel() or length > self.limits.chunk_bytes:
            raise BadRequest.new(f"read of {length} bytes at {offset} is out of range or above the chunk size")
        return source[offset: offset + length].clone()  # a snapshot: later steps must not change what is sent

    def cmd_module_call(self, session: Session, args: dict[str, Any]) -> Any:
        module = session.module(args["obj"])
        with session.charging_saved_tensors():
            result = module(*resolve(session, args["args"]), **resolve(session, args["kwargs"]))
        result = _unshared(result, module)
        private = args["obj"] in session.private or any(i in session.private for i in refs_in(args))
        return _store_outputs(session, args["out"], result, "forward", private)

    def cmd_module_state(self, session: Session, args: dict[str, Any]) -> Any:
        """Parameters and buffers: small ones inline (snapshots, up to one chunk in all), the others as
        ``StreamInfo`` for the client to fetch with ``module_read`` (so no reply exceeds a chunk)."""
        session.check_release(args["obj"])
        budget = self.limits.chunk_bytes
        result: dict[str, Any] = {}
        for name, tensor in session.module(args["obj"]).state_dict().items():
            nbytes = tensor.numel() * tensor.element_size()
            if nbytes <= budget and tensor.is_contiguous():
                result[name] = tensor.detach()  # sent without a copy; see LiveReply
                budget -= nbytes
            else:
                result[name] = StreamInfo(DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), nbytes, False)
        return LiveReply(result)

    def cmd_module_mode(self, session: Session, args: dict[str, Any]) -> Any:
        session.module(args["obj"]).train(args["train"])
        return None

    # --- optimizers ----------------------------------------------------------------------------

    def cmd_optim_create(self, session: Session, args: dict[str, Any]) -> Any:
        name = args["cls"]
        if name not in OPTIMIZERS:
            raise UnknownCommand.new(f"optimizer {name!r} is not on the allowlist {sorted(OPTIMIZERS)}")
        cls, allowed = OPTIMIZERS[name]
        module = session.module(args["module"])
        params = list(module.parameters())
        groups = []
        for group in args["groups"]:
            if not isinstance(group, dict) or not isinstance(group.get("params"), list):
                raise BadRequest.new("each parameter group must be a map with a 'params' list")
            hyper = {k: v for k, v in group.items() if k != "params"}
            unknown = set(hyper) - allowed
            if unknown:
                raise BadRequest.new(f"{name} does not take {sorted(unknown)} (allowed: {sorted(allowed)})")
            for key, value in hyper.items():
                if not _is_hyper(value):
                    raise BadRequest.new(f"hyper-parameter {key!r} must be a number, bool or tuple of numbers")
            indexes = group["params"]
            if not all(type(i) is int and 0 <= i < len(params) for i in indexes):
                raise BadRequest.new(f"parameter indexes must be in [0, {len(params)})")
            groups.append({"params": [params[i] for i in indexes], **hyper})
        session.put(args["out"], RemoteOptimizer(cls(groups), args["module"]))
        return None

    def cmd_optim_zero_grad(self, session: Session, args: dict[str, Any]) -> Any:
        session.optimizer(args["obj"]).optimizer.zero_grad(set_to_none=args.get("set_to_none", True))
        return None

    def cmd_optim_step(self, session: Session, args: dict[str, Any]) -> Any:
        optimizer = session.optimizer(args["obj"]).optimizer
        _reserve_state(session, optimizer, lambda p: p.grad is not None)
        try:
            optimizer.step()
        finally:  # a step that failed half-way may have made some state
            session.recount(args["obj"])
        return None

    # --- datasets and local training ------------------------------------------------------------

    def dataset(self, name: str) -> Dataset:
        if name not in self.datasets:
            raise ObjectNotFound.new(f"no dataset {name!r} on worker {self.worker_id!r} "
                                     f"(it has: {sorted(self.datasets) or 'none'})")
        return self.datasets[name]

    def cmd_datasets(self, session: Session, args: dict[str, Any]) -> Any:
        query = args.get("query")
        return [d.info() for d in self.datasets.values() if query is None or d.matches(query)]

    def cmd_fit(self, session: Session, args: dict[str, Any]) -> Any:
        module = session.module(args["module"])
        if ("optimizer" in args) == ("optim" in args):
            raise BadRequest.new("fit needs either optimizer={'cls': ...} (a fresh one) or optim=<id> (a remote one)")
        if "optim" in args:
            remote = session.optimizer(args["optim"])
            if remote.module_id != args["module"]:
                raise BadRequest.new("that optimizer was created over another module")
            optimizer = remote.optimizer
        else:
            optimizer = training.make_optimizer(args["optimizer"], module)  # its state lives as long as the fit
        state_room = _reserve_state(session, optimizer, lambda p: p.requires_grad)
        if self.require_secure_aggregation:  # its parameters now carry the data: only masked updates leave
            session.private.add(args["module"])
        try:
            with session.reserving(state_room):  # the first step's activations are checked beside it
                result = training.fit(module, self.dataset(args["dataset"]), loss=args["loss"], optimizer=optimizer,
                                      batch_size=args["batch_size"], epochs=args.get("epochs"), steps=args.get("steps"),
                                      prox_mu=float(args.get("prox_mu", 0.0)), seed=args.get("seed", 0),
                                      first_step=session.charging_saved_tensors)
        finally:
            if "optim" in args:
                session.recount(args["optim"])
        session.trained_samples[args["module"]] = result["num_examples"]
        return result

    def cmd_dataset_tensor(self, session: Session, args: dict[str, Any]) -> Any:
        dataset = self.dataset(args["dataset"])
        if args["part"] not in ("features", "labels"):
            raise BadRequest.new("part must be 'features' or 'labels'")
        tensor = dataset.features if args["part"] == "features" else dataset.labels
        session.put(args["out"], tensor, private=True)  # shared, not copied: it is never written to
        return tensor_info(tensor)

    def cmd_secagg(self, session: Session, args: dict[str, Any]) -> Any:
        from . import secure  # the crypto is loaded by the daemons that take part in secure rounds only

        return secure.handle(session, args, self.policy)

    def cmd_evaluate(self, session: Session, args: dict[str, Any]) -> Any:
        return training.evaluate(session.module(args["module"]), self.dataset(args["dataset"]), loss=args["loss"],
                                 batch_size=args.get("batch_size", 1024))


#: the most state an allowlisted optimizer keeps per parameter, in copies of it (Adam with amsgrad,
#: RMSprop centered with momentum: three)
OPTIMIZER_STATE_COPIES = 3


def _reserve_state(session: Session, optimizer: torch.optim.Optimizer,
                   will_step: Callable[[torch.Tensor], bool]) -> int:
    """Check the session's quota before ``optimizer`` makes state for parameters that have none yet
    (those ``will_step`` picks): room for the most any allowlisted optimizer keeps. Returns that room,
    in bytes. A stored optimizer's true size is counted after the step (``Session.recount``)."""
    new = sum(p.numel() * p.element_size() for group in optimizer.param_groups for p in group["params"]
              if p not in optimizer.state and will_step(p))
    if new:
        session.check_room(OPTIMIZER_STATE_COPIES * new, "the optimizer's state")
    return OPTIMIZER_STATE_COPIES * new


def _is_hyper(value: Any) -> bool:
    if type(value) in (int, float, bool):
        return True
    return isinstance(value, (list, tuple)) and len(value) <= 4 and all(type(v) in (int, float) for v in value)


__all__ = ["Handlers", "OPTIMIZERS"]
