"""What a command's declared charges (``Command.charges``) hold against its session's quota while it runs.

Each function sizes one kind of charge for a bound request, before the handler runs, and refuses work
that would not fit the command's time budget. The executor reserves the sum while the handler runs;
what the command then stores is charged to the objects that hold it.
"""

from __future__ import annotations

import math
from typing import Callable, Hashable

import torch

from ..codec import DTYPES, Ref, dtype_itemsize
from ..errors import BadRequest, LimitExceeded
from ..ops import MAX_DIMS, check_loss_shapes
from ..secagg.wire import PACKED_KEY, PACKED_MAX_VALUES
from .binding import Binding, Context
from .cost import Footprint, check_work, element_work
from .datasets import Dataset
from .handlers.modules import adoptable, check_named_once
from .kept import KEPT_READ_BYTES
from .objects import BYTES_PER_OPTIMIZED_PARAMETER, HostedModule, HostedOptimizer
from .secure import peer_count
from .training import label_copy_dtype, loss_function

#: the most state an allowlisted optimizer keeps per parameter, in copies of it (Adam with amsgrad,
#: RMSprop centered with momentum: three)
OPTIMIZER_STATE_COPIES = 3
#: copies of a parameter an allowlisted optimizer's step makes on its way (and drops); SGD's (weight decay,
#: ``maximize``, the first momentum buffer)
OPTIMIZER_STEP_COPIES = 3
SGD_STEP_COPIES = 2
#: copies of each parameter an allowlisted optimizer fills when it is made (the others make their state at
#: their first step, charged then): Adagrad's running sums
CREATED_STATE_COPIES = {"Adagrad": 1}
#: work (``cost.WORK_PER_SECOND`` units) of one optimizer step per element it steps: Adam's reads and writes
#: of the parameter, its gradient and two moments, with a square root and a division, at most
STEP_WORK_PER_ELEMENT = 32
#: what a tensor costs beside its bytes, once made and once in a reply (torch's and Python's objects, its
#: frame and its header entry): a red team's 141,000 one-element clones in one reply grew a daemon by 1.9 KB each
TENSOR_OBJECT_BYTES = 2048
#: the bytes of one element of the float64 sums a fit over many clients folds its clients' weights into
FLOAT64_BYTES = 8


def outputs(context: Context, binding: Binding) -> int:
    """An op's outputs and what it makes on its way, sized on the meta device: checked against the op's
    schema first."""
    name, args, kwargs = binding.args["op"], binding.args["args"], binding.args["kwargs"]
    cost = context.coster.op(name, args, kwargs, scope=binding.session.user)
    binding.cost = cost
    if cost.error is not None:  # the op fails on these shapes: it does not run (``handlers.tensors.op``)
        return 0
    check_work(cost.work, context.config.max_command_seconds, name)
    if len(cost.outputs) != len(binding.args["out"]):
        raise BadRequest.new(f"{name} returns {len(cost.outputs)} tensor(s); the request names "
                             f"{len(binding.args['out'])} output(s)")
    return cost.new_bytes + cost.scratch


def forward(context: Context, binding: Binding) -> int:
    """A forward pass's intermediates (every tensor it makes), and for ``fit`` its backward's as many
    again. Also refuses a forward (or one training step) that would run past the time budget, and a
    fit whose model's output would broadcast against its labels in an elementwise loss."""
    hosted: HostedModule = binding.objects.get("obj") or binding.objects["module"]
    seconds = context.config.max_command_seconds
    training: bool | None = None  # a call runs in the modules' own modes; a fit trains, an evaluation does not
    if binding.command.name == "module_call":
        inputs, kwargs, grad, passes = binding.args["args"], binding.args["kwargs"], True, 1
    else:
        training = binding.command.name == "fit"
        rows = torch.empty((batch_rows(binding), *_dataset(binding).features.shape[1:]),
                           dtype=_dataset(binding).features.dtype, device="meta")
        inputs, kwargs = [rows], {}
        grad, passes = binding.command.name == "fit", 2 if binding.command.name == "fit" else 1
    scope = binding.session.user
    # an evaluation runs the model a row at a time; so does a fit's reported loss where the owner's terms
    # want per-row metrics (``training._row_loss``), after its training, a batch at a time
    per_row = binding.command.name == "evaluate"
    footprint = context.coster.forward(hosted, inputs, kwargs, grad, training=training, scope=scope, per_row=per_row)
    if footprint is None:
        return 0
    binding.extra["calls"] = footprint.calls  # the nodes its output's graph gains (``Session.put``)
    loss = loss_work(context, binding, footprint, scope) if binding.command.name != "module_call" else 0
    # a call stores its outputs, copying those that are the model's parameters (a fit or an evaluation does not)
    copied, copy_work = (footprint.copied, footprint.copy_work) if binding.command.name == "module_call" else (0, 0)
    check_work((footprint.flops + loss) * (1 + passes) + copy_work, seconds, "one forward"
               + (" and its loss" if loss else "") + (" and backward" if passes == 2 else "")
               + (" row by row" if per_row else "") + (" and copies of its parameters" if copied else ""))
    if binding.command.name == "fit" and footprint.output is not None:  # (evaluate pairs each row with its label)
        labels = _dataset(binding).labels
        check_loss_shapes(binding.args["loss"], torch.empty(footprint.output, device="meta"),
                          torch.empty((inputs[0].shape[0], *labels.shape[1:]), device="meta"))
        check_classes(binding.args["loss"], footprint.output, _dataset(binding))
    elif binding.command.name == "evaluate" and footprint.output is not None:  # measured row by row: (rows, 1, ...)
        check_classes(binding.args["loss"], footprint.output[1:], _dataset(binding))
    held = passes * footprint.nbytes + copied + loss_bytes(binding, footprint, passes)
    if binding.command.name == "fit" and context.terms.row_metrics:
        rows_alone = context.coster.forward(hosted, inputs, kwargs, False, training=False, scope=scope, per_row=True)
        if rows_alone is not None:
            check_work(rows_alone.flops * 2, seconds, "the trained model's loss row by row")
            held = max(held, rows_alone.nbytes)
    return held


#: tensors of the output's size a loss makes, per pass: its own intermediate (mse's difference, cross-entropy's
#: log-softmax) and, in a fit, its backward's gradient of the output
LOSS_COPIES = 1
#: the losses that make more than ``LOSS_COPIES`` per pass: ``l1_loss`` the difference and its absolute value
#: (and its backward the difference's sign), ``binary_cross_entropy`` its logs' terms. Charged one copy, a fit
#: of 512 outputs of 256 x 256 grew a daemon 257 and 130 MiB past its quota (red team h30)
LOSS_COPIES_OF = {"l1_loss": 2, "binary_cross_entropy": 2}
#: the same for an evaluation, whose loss runs under ``torch.func.vmap`` (``training.row_terms``): a composite
#: loss is taken apart there into ops each of which makes a tensor of the output's size. Measured (red team
#: h30): charged one copy, an evaluation under ``binary_cross_entropy_with_logits`` of 256 outputs of 256 x 256
#: grew a daemon 452 MiB past its quota (seven copies more); ``l1_loss`` two more, ``mse_loss`` one
EVAL_LOSS_COPIES_OF = {"binary_cross_entropy_with_logits": 9, "mse_loss": 2, "l1_loss": 3, "binary_cross_entropy": 2}


def loss_bytes(binding: Binding, footprint: Footprint, passes: int) -> int:
    """What a fit's or an evaluation's loss makes beside the forward's tensors (``LOSS_COPIES`` of the output
    per pass, or its loss's ``LOSS_COPIES_OF`` or ``EVAL_LOSS_COPIES_OF``): uncharged, a fit of 512 outputs of
    256 x 256 under ``mse_loss`` grew a daemon 260 MiB past its quota (red team h25). Nothing for a call, which
    computes no loss."""
    if binding.command.name == "module_call" or footprint.output is None or footprint.output_dtype is None:
        return 0
    table = EVAL_LOSS_COPIES_OF if binding.command.name == "evaluate" else LOSS_COPIES_OF
    copies = table.get(binding.args["loss"], LOSS_COPIES)
    return copies * passes * math.prod(footprint.output) * footprint.output_dtype.itemsize


#: the losses whose target is a class index along the output's dim 1
CLASS_INDEX_LOSSES = frozenset({"cross_entropy", "nll_loss"})


def check_classes(loss: str, output: tuple[int, ...], dataset: Dataset) -> None:
    """Refuse, before a row is read, a classifier with fewer outputs than the dataset's classes (a fit's,
    or an evaluation's: the same "Target 2 is out of bounds" was withheld from it). torch's
    own error ("Target 7 is out of bounds") quotes a label, so on protected rows it is withheld and the
    client learns nothing; the class count is listed to every client (``datasets``), so saying it is not."""
    if loss not in CLASS_INDEX_LOSSES or len(output) < 2:
        return
    check_class_labels(loss, output, dataset)
    classes = dataset.info()["num_classes"]
    if classes is not None and output[1] < classes:
        raise BadRequest.new(f"{loss}: the model gives {output[1]} outputs per row, and dataset "
                             f"{dataset.name!r} has {classes} classes (labels 0 to {classes - 1}); end the model "
                             f"with {classes} outputs")


def check_class_labels(loss: str, output: tuple[int, ...], dataset: Dataset) -> None:
    """Refuse float labels where ``loss`` reads class indices: ``nll_loss`` always, ``cross_entropy`` unless
    they are class probabilities of the output's shape. torch's words ("expected target dtype to be Long")
    are withheld on protected rows; the labels' dtype and shape are listed to every client (``datasets``)."""
    labels = dataset.labels
    if not labels.dtype.is_floating_point:
        return
    row = list(labels.shape[1:])
    if loss == "cross_entropy" and tuple(row) == tuple(output[1:]):
        return
    dtype = str(labels.dtype).removeprefix("torch.")
    probabilities = f", or class probabilities of shape {list(output[1:])}" if loss == "cross_entropy" else ""
    raise BadRequest.new(f"{loss}: dataset {dataset.name!r} has {dtype} labels of shape {row}; it takes class "
                         f"indices as integers (labels saved as int64){probabilities}")


def loss_work(context: Context, binding: Binding, footprint: Footprint, scope: Hashable) -> int:
    """The work of a fit's or an evaluation's loss over one batch: the model's output against the
    dataset's labels, measured on the meta device (``cross_entropy`` over two classes runs a log-softmax
    at 22 ns an element: unsized, a fit's step ran ten times what it was admitted for). 0 when the
    model's output is not one tensor (the loss then fails as it runs, with its own error)."""
    if footprint.output is None or footprint.output_dtype is None or not footprint.output:
        return 0
    labels = _dataset(binding).labels
    output = torch.empty(footprint.output, dtype=footprint.output_dtype, device="meta")
    target = torch.empty((footprint.output[0], *labels.shape[1:]), dtype=labels.dtype, device="meta")
    name = binding.args["loss"]
    try:
        return context.coster.call_work(loss_function(name), name, [output, target], scope)
    except LimitExceeded:
        raise
    except Exception:  # a loss that does not take this output and these labels fails as it runs, as before
        return 0


def batch(context: Context, binding: Binding) -> int:
    """The batch a fit gathers (``features[index]``) or an evaluation clones, rows and labels: what the
    forward's charge does not count (it counts what the model makes). A fit over hosted clients makes
    one at a time (they share a row shape)."""
    dataset = _dataset(binding)
    labels = dataset.labels
    # labels reach the loss as a copy of another dtype (``training._labels_for``): integer class labels as int64,
    # any but float32 ones of an elementwise loss as float32 (uint8 masks of 256 x 256 in a batch of 1024 are
    # 512 MiB more as int64, 256 MiB as float32)
    copy = label_copy_dtype(binding.args["loss"], labels.dtype)
    widened = math.prod(labels.shape[1:]) * copy.itemsize if copy is not None else 0
    return batch_rows(binding) * (_row_bytes(dataset.features) + _row_bytes(labels) + widened)


def batch_rows(binding: Binding) -> int:
    """Rows in one batch of a fit or an evaluation: what it asks for, at most the dataset's rows."""
    return min(binding.args.get("batch_size", 1024) or 1, max(1, len(_dataset(binding))))


def _dataset(binding: Binding) -> Dataset:
    assert binding.dataset is not None
    return binding.dataset


def _row_bytes(tensor: torch.Tensor) -> int:
    """Bytes of one row (the first dim's element) of a dataset's features or labels."""
    return math.prod(tensor.shape[1:]) * tensor.element_size()


def state(context: Context, binding: Binding) -> int:
    """Room for the state an optimizer makes for parameters that have none yet: the most any allowlisted
    optimizer keeps (a stored optimizer's true size is charged after its step); and for what a step makes
    on its way, parameter by parameter (torch's single-tensor path on CPU): Adam with amsgrad, weight
    decay and ``maximize`` made about three more copies of a parameter (a red team ran 114 MiB past a
    quota with one 64 MiB parameter)."""
    if binding.command.name == "optim_create":
        return created_state(binding)
    optimizer = binding.objects.get("obj") or binding.objects.get("optim")
    if isinstance(optimizer, HostedOptimizer):
        opt = optimizer.optimizer
        training = binding.command.name == "fit"  # a fit steps every trained parameter; a step those with gradients
        stepped = [p for group in opt.param_groups for p in group["params"]
                   if (p.requires_grad if training else p.grad is not None)]
        fresh = [p for p in stepped if p not in opt.state]
    else:  # a fit's own optimizer, made for this fit: state for every trained parameter
        hosted: HostedModule = binding.objects["module"]
        fresh = stepped = [p for p in hosted.module.parameters() if p.requires_grad]
    largest = max((p.numel() * p.element_size() for p in stepped), default=0)
    name = binding.args.get("optimizer", {}).get("cls") if not isinstance(optimizer, HostedOptimizer) \
        else optimizer.optimizer.__class__.__name__
    step = SGD_STEP_COPIES if name in ("SGD", "PlainSGD") else OPTIMIZER_STEP_COPIES
    check_work(STEP_WORK_PER_ELEMENT * sum(p.numel() for p in stepped), context.config.max_command_seconds,
               "one optimizer step")
    return OPTIMIZER_STATE_COPIES * sum(p.numel() * p.element_size() for p in fresh) + step * largest \
        + prox_anchor(binding)


#: copies of the trained parameters a FedProx fit keeps: its anchor, and each parameter's difference from it,
#: which the proximal term's backward saves
PROX_COPIES = 2


def prox_anchor(binding: Binding) -> int:
    """A FedProx fit's (``prox_mu``) anchor and differences: ``PROX_COPIES`` of the parameters it trains. A red
    team (h25) held 48 MiB past a 540 MiB quota with a 64 MiB model, uncharged."""
    if binding.command.name != "fit" or not binding.args.get("prox_mu"):
        return 0
    hosted: HostedModule = binding.objects["module"]
    return PROX_COPIES * sum(p.numel() * p.element_size() for p in hosted.module.parameters() if p.requires_grad)


def created_state(binding: Binding) -> int:
    """The state an optimizer fills when it is made (``CREATED_STATE_COPIES``), for the parameters its
    groups list (each counted once: ``handlers.optim.optim_create`` refuses one listed twice)."""
    params = list(binding.objects["module"].module.parameters())
    listed = {i for group in binding.args["groups"] if isinstance(group, dict) and isinstance(group.get("params"), list)
              for i in group["params"] if type(i) is int and 0 <= i < len(params)}
    copies = CREATED_STATE_COPIES.get(binding.args["cls"], 0)
    return copies * sum(params[i].numel() * params[i].element_size() for i in listed) + \
        BYTES_PER_OPTIMIZED_PARAMETER * len(listed)


def copies(context: Context, binding: Binding) -> int:
    """``module_put``: the entries sent by reference whose memory the model cannot adopt
    (``handlers.modules.adoptable``) are copied (each object named by one entry: ``check_named_once``):
    sized, and their copying's time checked, before any is made (one 4 MiB view named by 250 entries made
    250 copies, 1 GiB under a 16 MiB quota, before the description was checked)."""
    check_named_once(binding)  # (refused before anything is sized: each object is named by one entry)
    named = {raw.id: binding.args["state"][name] for name, raw in binding.request.args["state"].items()
             if isinstance(raw, Ref)}
    copied = [t for t in named.values() if isinstance(t, torch.Tensor) and not adoptable(binding, t)]
    check_work(sum(element_work(t) for t in copied), context.config.max_command_seconds,
               "copying the entries sent by reference")
    return sum(t.numel() * t.element_size() for t in copied)


def gradient(context: Context, binding: Binding) -> int:
    """``grad``: the copy of a leaf's gradient (its copy was refused only once made, and made on the event
    loop: a 512 MiB gradient held every session 0.2-0.4 s a call)."""
    grad = binding.objects["obj"].grad
    if grad is None:
        return 0
    check_work(element_work(grad), context.config.max_command_seconds, "copying the gradient")
    return grad.numel() * grad.element_size()


def clients(context: Context, binding: Binding) -> int:
    """A fit over many hosted clients: the round's starting weights, and either each client's trained
    state (kept apart) or the sums they fold into (``handlers.data.fit_clients``): float64 for a floating
    point entry, whatever its own dtype (a float16 entry's sum is four times its size), and for another
    entry its running maximum with the new one ``torch.maximum`` makes beside it."""
    hosted_clients = binding.args.get("clients")
    if not hosted_clients:
        return 0
    hosted: HostedModule = binding.objects["module"]
    entries = list(hosted.module.state_dict().values())
    model = sum(t.numel() * t.element_size() for t in entries)
    # each client's entries cloned: their bytes, and each a tensor object (more than a kept read's bookkeeping)
    if not binding.args.get("combine"):
        return model + len(hosted_clients) * (model + TENSOR_OBJECT_BYTES * len(entries))
    # (and a kept read's bookkeeping per entry, should the sums stream: ``KeptReads.report_made`` checks neither)
    sums = sum(t.numel() * FLOAT64_BYTES if t.is_floating_point() else 2 * t.numel() * t.element_size()
               for t in entries) + KEPT_READ_BYTES * len(entries)
    # adding a client's entry to its float64 sum widens the entry first, a float64 copy of it, one at a time
    widened = max((t.numel() * FLOAT64_BYTES for t in entries if t.is_floating_point()), default=0)
    return model + sums + widened


def stream(context: Context, binding: Binding) -> int:
    """A stream's buffer, allocated whole before its chunks arrive."""
    dtype, shape = binding.args["dtype"], binding.args["shape"]
    if dtype not in DTYPES or len(shape) > MAX_DIMS or not all(type(d) is int and d >= 0 for d in shape):
        raise BadRequest.new("alloc needs an allowlisted dtype and a shape of at most 32 non-negative ints")
    if binding.args.get("grad") and not DTYPES[dtype].is_floating_point:
        raise BadRequest.new("only floating point tensors can require gradients")
    numel = 1
    for d in shape:
        numel *= d
    return numel * dtype_itemsize(dtype)


#: bytes of one element of the float32 copies a secure round makes of the model's float entries, and of
#: the ring vector a masked input is (``uint64`` past 32 ring bits)
FLOAT32_BYTES, RING_BYTES = 4, 8
#: what unpacking a packed secure-aggregation message (``secagg.wire``) may make: each of its values a
#: Python object (a one-character string outside Latin-1: 76 bytes; a list's slot for it: 8 more), and
#: each of its bytes twice more (a string's characters, a copy of the frame)
BYTES_PER_UNPACKED_VALUE, UNPACKED_PER_PACKED_BYTE = 128, 2
#: work (``cost.WORK_PER_SECOND`` units) per element of the model of a secure step, about twice what was
#: measured here on one thread (6 Dec 2026, 8M elements): the float32 copy of the model both steps make
#: (``secure.float_parameters``; ``masked_input`` also subtracts the round's copy and takes the norm),
#: 4-7 ns; ``masked_input``'s ``secagg.encoding.encode`` (clip, weight, DP noise, quantize into the ring),
#: 33-44 ns with noise (Box-Muller over an AES keystream), 4-9 ns without; and one PRG mask added in the ring
#: (``secagg.crypto.add_prg``), 1-2 ns, once for the client's self-mask and once per peer. Unsized, a
#: 32M-value masking ran 1.39 s under a 0.25 s limit (a red team's find)
SECURE_COPY_WORK, ENCODE_WORK, MASK_WORK = 16, 96, 8


def secure(context: Context, binding: Binding) -> int:
    """A secure round's step: its message unpacked (its values' objects, at most one a packed byte and
    ``PACKED_MAX_VALUES``, and its bytes twice more), and its copies of the model: ``advertise`` makes
    a float32 copy of its float entries (one more of each on the way, for those not float32 already),
    which the round keeps to mask the update against (held for the session, with the round's state for
    its clients: ``worker.secure``); ``masked_input`` makes the update the same way and the ring vector
    that masks it. Also refuses a step whose work over the model would not fit the time budget
    (``SECURE_COPY_WORK``): nothing can stop a masking inside ``encode`` or a mask."""
    step, payload = binding.args["step"], binding.args["payload"]
    packed = payload.get(PACKED_KEY) if isinstance(payload, dict) else None
    size = packed.numel() if isinstance(packed, torch.Tensor) else 0
    unpacked = BYTES_PER_UNPACKED_VALUE * min(size, PACKED_MAX_VALUES) + UNPACKED_PER_PACKED_BYTE * size
    if step not in ("advertise", "masked_input") or "module" not in binding.objects:
        return unpacked
    hosted: HostedModule = binding.objects["module"]
    elements = sum(t.numel() for t in hosted.module.state_dict().values() if t.is_floating_point())
    per_element = SECURE_COPY_WORK
    under_way = binding.session.secure_rounds.get(binding.args["round"])
    if step == "masked_input" and under_way is not None:  # (no round: the step is refused as it starts)
        per_element += ENCODE_WORK + (1 + peer_count(under_way.client.config)) * MASK_WORK
    check_work(elements * per_element, context.config.max_command_seconds, f"the secure step {step}")
    return unpacked + elements * (2 * FLOAT32_BYTES + (RING_BYTES if step == "masked_input" else 0))


CHARGES: dict[str, Callable[[Context, Binding], int]] = {
    "outputs": outputs, "forward": forward, "batch": batch, "state": state, "stream": stream, "clients": clients,
    "secure": secure, "copies": copies, "gradient": gradient,
}

__all__ = ["CHARGES", "CREATED_STATE_COPIES", "ENCODE_WORK", "FLOAT64_BYTES", "MASK_WORK", "OPTIMIZER_STATE_COPIES",
           "OPTIMIZER_STEP_COPIES", "SECURE_COPY_WORK", "STEP_WORK_PER_ELEMENT", "TENSOR_OBJECT_BYTES", "batch_rows",
           "created_state"]
