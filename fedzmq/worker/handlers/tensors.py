"""Tensors: store, read back, stream, compute (``op``), and gradients."""

from __future__ import annotations

from typing import Any

import torch

from ... import budget
from ...codec import DTYPE_NAMES, DTYPES, StreamInfo
from ...errors import BadRequest
from ...ops import OPS
from ..binding import Binding, Context, Made
from ..cost import check_work, copy_units, element_work
from ..objects import PartialTensor


def store(context: Context, binding: Binding) -> Any:
    value = binding.args["value"]
    if not isinstance(value, torch.Tensor):
        raise BadRequest.new("store takes a tensor")
    return Made([value])


def get(context: Context, binding: Binding) -> Any:
    """The tensor itself (its memory is the reply's), or a copy in row-major order of a view that is
    not: made here, sized first, and so on a torch thread when it is big (``Executor``), not by the
    reply's encoding on the event loop. Past ``chunk_bytes``, how to stream it in pieces (``read``)."""
    tensor: torch.Tensor = binding.objects["obj"]
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes > binding.session.reply_chunk(context.config.limits.chunk_bytes):
        return StreamInfo(DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), nbytes, tensor.requires_grad)
    requires_grad = tensor.requires_grad
    if not tensor.is_contiguous():
        check_work(element_work(tensor), context.config.max_command_seconds, "copying this view in order")
        tensor = tensor.detach().contiguous()
    return tensor.detach().requires_grad_(requires_grad)


def info(context: Context, binding: Binding) -> Any:
    """A tensor's dtype and shape: never data-dependent (every op's output size is known before it runs)."""
    tensor: torch.Tensor = binding.objects["obj"]
    return {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
            "requires_grad": tensor.requires_grad, "nbytes": tensor.numel() * tensor.element_size()}


def delete(context: Context, binding: Binding) -> Any:
    return binding.session.delete(binding.args["objs"])


def alloc(context: Context, binding: Binding) -> Any:
    """A tensor to be streamed in by ``write`` chunks (its size was checked as the command's charge)."""
    tensor = torch.empty(binding.args["shape"], dtype=DTYPES[binding.args["dtype"]])
    return Made([PartialTensor(tensor, requires_grad=bool(binding.args.get("grad")))])


def check_chunk(context: Context, data: Any, command: str) -> None:
    """A stream's chunk (``write``, ``module_write``) is a flat uint8 tensor of at most ``--chunk-bytes``,
    and its copy fits the command's time: one copy cannot be stopped half-way."""
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
        raise BadRequest.new(f"{command} takes a flat uint8 tensor of bytes")
    chunk_bytes = context.config.limits.chunk_bytes
    if data.numel() > chunk_bytes:
        raise BadRequest.new(f"a chunk of {data.numel()} bytes is more than this worker's chunk size "
                             f"({chunk_bytes} bytes, --chunk-bytes)")
    check_work(element_work(data), context.config.max_command_seconds, "copying this chunk")


def write(context: Context, binding: Binding) -> Any:
    partial: PartialTensor = binding.objects["obj"]
    data, offset = binding.args["data"], binding.args["offset"]
    check_chunk(context, data, "write")
    target = partial.flat_bytes
    if offset != partial.written or partial.written + data.numel() > target.numel():
        raise BadRequest.new(f"chunk at offset {offset} of {data.numel()} bytes does not continue "
                             f"the stream ({partial.written} of {target.numel()} bytes written)")
    target[partial.written: partial.written + data.numel()].copy_(data)
    partial.written += data.numel()
    if partial.written == target.numel():
        binding.session.table.replace(binding.request.args["obj"], partial.tensor.requires_grad_(partial.requires_grad))
    return partial.written


def read(context: Context, binding: Binding) -> Any:
    tensor: torch.Tensor = binding.objects["obj"].detach()
    offset, length = binding.args["offset"], binding.args["length"]
    if offset + length > tensor.numel() * tensor.element_size() or length > context.config.limits.chunk_bytes:
        raise BadRequest.new(f"read of {length} bytes at {offset} is out of range or above the chunk size")
    # a piece of a view copies its elements (``byte_range``; two more at most, for its ends' bytes)
    elements = -(-length // tensor.element_size()) + 2
    check_work(elements * copy_units(tensor), context.config.max_command_seconds, "copying this piece in order")
    return byte_range(tensor, offset, length)


def op(context: Context, binding: Binding) -> Any:
    """An allowlisted op (checked against its schema and sized before this runs)."""
    if binding.cost is not None and binding.cost.error is not None:  # the meta device refused these shapes
        # raised without running: an op refused on the meta device is unsized, and running it for torch's
        # CPU words made what it made before failing (a matmul expanding both batch dims: 2 GiB, then
        # its shape error). The meta kernel's words are torch's too, of shapes and dtypes only
        error = binding.cost.error  # a copy is raised: the cached one would keep this call's frames alive
        raise type(error)(*error.args)
    result = OPS[binding.args["op"]](*binding.args["args"], **binding.args["kwargs"])
    results = list(result) if isinstance(result, tuple) else [result]
    if not all(isinstance(r, torch.Tensor) for r in results):
        raise BadRequest.new(f"{binding.args['op']} returned {[type(r).__name__ for r in results]}, not tensors")
    return Made(results)


def backward(context: Context, binding: Binding) -> Any:
    """Backpropagate from the object, checking the command's time budget before each node of its graph:
    the graph is the coordinator's ops, each sized alone, and their backward passes can cost far more
    together (a slice is free to make and its backward fills a gradient of its whole input: 1,024
    slices of a 64 MiB tensor held a torch thread 34 s under a 1 s limit, in one call)."""
    root: torch.Tensor = binding.objects["obj"]
    hooks = [node.register_prehook(_check_budget) for node in graph_nodes(root)]
    try:
        root.backward(binding.args.get("grad"))
    finally:
        for hook in hooks:
            hook.remove()
    return None


def _check_budget(grad_outputs: Any) -> None:
    budget.check()


def graph_nodes(root: torch.Tensor) -> list[Any]:
    """Every node of the autograd graph that ends at ``root`` (its leaves' ``AccumulateGrad`` included)."""
    nodes, seen, stack = [], set(), [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack.extend(parent for parent, _ in node.next_functions)
    return nodes


def grad(context: Context, binding: Binding) -> Any:
    """A snapshot of a leaf's gradient, as a new object (later backward passes do not change it)."""
    leaf: torch.Tensor = binding.objects["obj"]
    if leaf.grad is None:
        raise BadRequest.new(f"object {binding.request.args['obj']} has no gradient (it does not require one, or no "
                             "backward pass reached it yet)")
    return Made([leaf.grad.detach().clone()])


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
    """Elements ``start`` to ``stop`` of ``tensor`` in row-major order, as a contiguous 1-D tensor: a view
    of a contiguous tensor, else a copy of exactly those elements. (It was a slice of a copy of the whole
    rows the range spans, up to three times the range, and a reply's frame keeps all of its storage
    alive while charged its own bytes: a red team's unread reads held four times their quota.)"""
    if tensor.is_contiguous():
        return tensor.reshape(-1)[start:stop]
    out = tensor.new_empty(max(0, stop - start))
    if stop > start:
        _copy_range(tensor, start, stop, out)
    return out


def _copy_range(tensor: torch.Tensor, start: int, stop: int, out: torch.Tensor) -> None:
    """Copy elements ``start`` to ``stop`` (row-major) of ``tensor`` into the contiguous ``out``: the whole
    rows of the first dimension in one copy, a partial first and last row by descending into them."""
    if tensor.dim() <= 1 or tensor.is_contiguous():
        out.copy_(tensor.reshape(-1)[start:stop])
        return
    row = tensor[0].numel()
    if start // row == (stop - 1) // row:  # within one row
        first = start // row
        _copy_range(tensor[first], start - first * row, stop - first * row, out)
        return
    whole_from, whole_to = -(-start // row), stop // row
    at = whole_from * row - start
    if at:
        _copy_range(tensor[whole_from - 1], row - at, row, out[:at])
    if whole_to > whole_from:
        rows = tensor[whole_from:whole_to]
        out[at: at + rows.numel()].view(rows.shape).copy_(rows)
        at += rows.numel()
    if at < out.numel():
        _copy_range(tensor[whole_to], 0, out.numel() - at, out[at:])
