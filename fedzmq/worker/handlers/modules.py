"""Models: built from their descriptions (never from code on the wire), loaded, called, read back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ... import budget
from ...codec import DTYPE_NAMES, Ref, StreamInfo, is_shape
from ...errors import BadRequest, quoted
from ...modeldesc import check_state, instantiate
from ..binding import Binding, Context, Made
from ..cost import check_work, element_work, own_storages
from ..objects import HostedModule
from ..taint import storage_key
from .tensors import check_chunk


def module_put(context: Context, binding: Binding) -> Any:
    """Build a model from its description and state. Big entries arrive beforehand as streamed objects
    named by reference: the client hands them over (they leave the object table), and the model adopts
    their memory when nothing else holds or views it; otherwise it takes a copy, so that no other live
    object ever aliases a parameter that training will change."""
    session = binding.session
    state: dict[str, Any] = {}
    handed_over = []
    check_named_once(binding)
    for name, raw in binding.request.args["state"].items():
        value = binding.args["state"][name]
        if isinstance(raw, Ref):
            handed_over.append(raw.id)
            if not isinstance(value, torch.Tensor):
                raise BadRequest.new(f"state entry {name!r} names object {raw.id}, which is not a tensor")
            if not adoptable(binding, value):  # in order, whatever the source's strides: the model's forwards
                # are sized on a twin built from the description, whose entries are in order (a transposed
                # entry made every reshape a copy: 1.4 GiB under a 256 MiB quota)
                value = value.detach().clone(memory_format=torch.contiguous_format)
        state[name] = value
    session.table.check_new(binding.request.args["out"])
    module = instantiate(binding.args["spec"], state, context.models)
    session.delete(handed_over)
    return Made([HostedModule(module, binding.args["spec"])])


def check_named_once(binding: Binding) -> None:
    """``BadRequest`` if two entries of a ``module_put``'s state name one object. Each entry becomes its own
    parameter (a leaf, with a gradient of its own) over the memory it names, and the quota charges a
    storage, and the room for a leaf's gradient, once per storage (``quota.gradient_key``): a red team
    named one 1 MiB object in 128 entries, and a backward made 128 gradients under a 16 MiB quota, charged
    1 MiB. A client sends each entry as its own value; tied weights arrive as two."""
    seen: dict[int, str] = {}
    for name, raw in binding.request.args["state"].items():
        if isinstance(raw, Ref):
            if raw.id in seen:
                raise BadRequest.new(f"state entries {quoted(seen[raw.id])} and {quoted(name)} name the same object "
                                     f"{raw.id}: each entry of a model is its own parameter, sent as its own value")
            seen[raw.id] = name


def adoptable(binding: Binding, tensor: Any) -> bool:
    """A tensor's memory may become a parameter only if this object alone holds its storage, whole, and
    it is public (never an owner's dataset, nor anything computed from one)."""
    if not isinstance(tensor, torch.Tensor):
        return False
    session = binding.session
    whole = tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return whole and tensor.is_contiguous() and session.quota.holders_of(tensor) <= 1 \
        and not session.taint.of_tensor(tensor)


def module_load(context: Context, binding: Binding) -> Any:
    """Update some or all parameters and buffers in place (the rest come by ``module_write``)."""
    load_into(binding.objects["obj"].module, binding.args["state"], context.config.max_command_seconds)
    return None


def load_into(module: nn.Module, state: dict[str, Any], seconds: float) -> None:
    """Copy ``state`` (some or all entries, checked against the module first) into ``module`` in place;
    refused if the copies would take more than ``seconds`` (a view out of order is slow to copy:
    ``cost.element_work``; one copy cannot be stopped)."""
    current = module.state_dict()
    unknown = set(state) - set(current)
    if unknown:
        raise BadRequest.new(f"model has no parameters or buffers named {sorted(unknown)}")
    check_state({k: current[k] for k in state}, state)
    check_work(sum(element_work(t) for t in state.values() if isinstance(t, torch.Tensor)),
               budget.seconds_left(seconds), "copying these weights in")
    for name, tensor in state.items():
        current[name].copy_(tensor)  # state_dict() entries are detached: no grad mode needed


def whole_copies(module: nn.Module, state: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (entry of ``module``, value of ``state``) pairs whose copy (``load_into``) overwrites the
    entry's storage whole: an entry that is all of its storage, contiguous. After such a copy the
    storage holds the value and nothing else (an entry that is a view into a bigger storage does not)."""
    current = module.state_dict()
    pairs = []
    for name, value in state.items():
        entry = current.get(name)
        if entry is None or not isinstance(value, torch.Tensor) or entry.layout != torch.strided:
            continue
        if entry.storage_offset() == 0 and entry.is_contiguous() and \
                entry.numel() * entry.element_size() == entry.untyped_storage().nbytes():
            pairs.append((entry, value))
    return pairs


def module_call(context: Context, binding: Binding) -> Any:
    module = binding.objects["obj"].module
    result = module(*binding.args["args"], **binding.args["kwargs"])
    outputs = list(result) if isinstance(result, tuple) else [result]
    if len(outputs) != len(binding.args["out"]) or not all(isinstance(o, torch.Tensor) for o in outputs):
        raise BadRequest.new(f"forward returned {len(outputs)} value(s) of type {[type(o).__name__ for o in outputs]}; "
                             f"the request expected {len(binding.args['out'])} tensor(s)")
    return Made(unshared(outputs, module))


def unshared(outputs: list[torch.Tensor], module: nn.Module) -> list[torch.Tensor]:
    """Outputs that are the module's own parameters or buffers (a forward returning ``self.weight``, or a
    batch norm's ``running_mean``) are copied: a stored tensor must not change under its pointer, and a
    step or a train-mode forward changes them in place. Each output its own copy, so that no two stored
    outputs alias either; sized and charged with the forward, before it runs (``cost.parameter_copies``)."""
    storages = own_storages(module)
    return [o.clone() if storage_key(o.untyped_storage()) in storages else o for o in outputs]


def module_state(context: Context, binding: Binding) -> Any:
    """Parameters and buffers: small ones inline (up to one chunk in all), the others as ``StreamInfo``
    for the client to fetch with ``module_read`` (so no reply exceeds a chunk)."""
    return state_reply(binding, "obj", binding.session.reply_chunk(context.config.limits.chunk_bytes))


def state_reply(binding: Binding, arg: str, inline_bytes: int) -> dict[str, Any]:
    """The state of the model the command's ``arg`` names, for a reply: entries inline up to ``inline_bytes``
    bytes in all (the parameters themselves, sent uncopied: a later command that may change them waits
    until they have left), the others as ``StreamInfo`` to fetch with ``module_read``, each a read the
    session keeps as the entry is now (``fedzmq.worker.kept``)."""
    module = binding.objects[arg].module
    return entries_reply(binding, arg, module.state_dict(), InlineRoom(inline_bytes), made=False)


@dataclass
class InlineRoom:
    """The bytes of tensors a reply may still carry inline (the rest go as streams); one per reply, shared
    by the states in it."""

    bytes: int

    def take(self, tensor: torch.Tensor) -> bool:
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > self.bytes or not tensor.is_contiguous():
            return False
        self.bytes -= nbytes
        return True


def entries_reply(binding: Binding, arg: str, state: dict[str, torch.Tensor], room: InlineRoom, *,
                  made: bool) -> dict[str, Any]:
    """``state`` for a reply: as many entries inline as ``room`` takes, the others as ``StreamInfo``.
    ``state`` is the model's own (``made`` false: reads kept as the entries are now, copied only if a write
    comes first) or tensors the command made under the model's entry names (a fit over hosted clients'
    sums: each kept as it is, read from ``module_read`` of the model ``arg`` names)."""
    module, obj_id = binding.objects[arg].module, binding.request.args[arg]
    result: dict[str, Any] = {}
    streamed: list[tuple[str, int, torch.Tensor]] = []
    indexes = {name: index for index, name in enumerate(module.state_dict())} if made else {}
    for index, (name, tensor) in enumerate(state.items()):
        if room.take(tensor):
            result[name] = tensor.detach()
        else:
            result[name] = None  # (the entries keep their order)
            streamed.append((name, indexes[name] if made else index, tensor))
    report = binding.session.kept.report_made if made else binding.session.kept.report
    tokens = report(obj_id, module, [(index, tensor) for _, index, tensor in streamed])
    for (name, _, tensor), token in zip(streamed, tokens):
        nbytes = tensor.numel() * tensor.element_size()
        result[name] = StreamInfo(DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), nbytes, False, token)
    return result


def _entry_bytes(binding: Binding, state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    name = binding.args["name"]
    tensor = (state if state is not None else binding.objects["obj"].module.state_dict()).get(name)
    if tensor is None:
        raise BadRequest.new(f"model has no parameter or buffer named {name!r}")
    if not tensor.is_contiguous():
        raise BadRequest.new(f"{name!r} is not contiguous and cannot be streamed")
    return tensor.detach().view(-1).view(torch.uint8)


def module_write(context: Context, binding: Binding) -> Any:
    """One piece of an entry's bytes, written in place. A write in pieces sends, with its first piece, the
    dtype and shape of every entry it will load (``entries``: the streamed ones and those its last command
    carries), checked here before anything is written: the pieces are raw bytes, and an entry of another
    dtype or shape would be written reinterpreted, or in part."""
    if "entries" in binding.args:
        check_entries(binding.objects["obj"].module, binding.args["entries"])
    target, data, offset = _entry_bytes(binding), binding.args["data"], binding.args["offset"]
    check_chunk(context, data, "module_write")
    if offset + data.numel() > target.numel():
        raise BadRequest.new(f"chunk of {data.numel()} bytes at {offset} runs past {binding.args['name']!r}")
    target[offset: offset + data.numel()].copy_(data)
    return None


def check_entries(module: nn.Module, entries: dict[str, Any]) -> None:
    """``BadRequest`` unless every entry (``name: [dtype, shape, streamed]``) names one of the module's
    parameters or buffers, of that dtype and shape, and a streamed one is in order in memory (its bytes
    are written straight in): the checks a load makes of a state (``load_into``), made of a state whose
    big entries will arrive in pieces."""
    current = module.state_dict()
    unknown = sorted(set(entries) - set(current))
    if unknown:
        raise BadRequest.new(f"model has no parameters or buffers named {unknown}")
    for name, entry in entries.items():
        if not (isinstance(entry, list) and len(entry) == 3 and type(entry[0]) is str and is_shape(entry[1])
                and type(entry[2]) is bool):
            raise BadRequest.new(f"entry {quoted(name)} of a write must be [dtype, shape, streamed]")
        dtype, shape, streamed = entry
        tensor = current[name]
        if DTYPE_NAMES.get(tensor.dtype) != dtype or list(tensor.shape) != shape:
            raise BadRequest.new(f"model state {name!r}: got {tuple(shape)} {quoted(dtype)}, the model has "
                                 f"{tuple(tensor.shape)} {DTYPE_NAMES.get(tensor.dtype, tensor.dtype)}")
        if streamed and not tensor.is_contiguous():
            raise BadRequest.new(f"{name!r} is not contiguous and cannot be streamed")


def module_read(context: Context, binding: Binding) -> Any:
    """Bytes of one entry: of the model as it is, or with ``stream``, of the entry as the reply that
    reported it saw it (a copy, if a command wrote it since). A kept read ends with its last byte's read
    (a read of nothing at its end gives it up)."""
    offset, length, token = binding.args["offset"], binding.args["length"], binding.args.get("stream")
    state = binding.objects["obj"].module.state_dict()  # (listed once per read: a model can have thousands)
    kept = None
    if token is not None:
        kept = binding.session.kept.read(token, binding.request.args["obj"], list(state), binding.args["name"])
    source = kept.copy if kept is not None and kept.copy is not None else _entry_bytes(binding, state)
    if offset + length > source.numel() or length > context.config.limits.chunk_bytes:
        raise BadRequest.new(f"read of {length} bytes at {offset} is out of range or above the chunk size")
    if token is not None and kept is not None and offset + length == kept.nbytes:
        binding.session.kept.end(token)
    return source[offset: offset + length].clone()  # a snapshot: later steps must not change what is sent


def module_mode(context: Context, binding: Binding) -> Any:
    binding.objects["obj"].module.train(binding.args["train"])
    return None
