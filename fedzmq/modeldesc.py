"""Models as data: describe an ``nn.Module`` on the client, rebuild it on the worker, run no wire code.

A description is a tree of plain values:

- ``{"kind": "layer", "type": "Linear", "kwargs": {...}}`` for a standard layer from ``LAYERS``;
- ``{"kind": "sequential", "children": [[name, spec], ...]}`` for ``nn.Sequential``;
- ``{"kind": "registered", "name": ..., "kwargs": {...}}`` for a class the daemon installed and
  registered by name (custom architectures, shipped to data owners like any other software);
- ``{"kind": "graph", "children": ..., "params": ..., "buffers": ..., "program": [...]}`` for any other
  module: its ``forward`` is traced with ``torch.fx`` on the client into a list of nodes, each calling
  a submodule, an op from ``fedzmq.ops`` or ``size``/``dim``. The worker interprets that list (no code
  generation, no ``exec``), checking every call against the op's schema (``fedzmq.ops.check_call``,
  the same check the ``op`` command makes: no ``out=``, no in-place, no arithmetic on plain Python
  numbers) and its command's time budget at every node. A forward that fx cannot trace
  (data-dependent control flow) gets a ``ModelDescriptionError`` that says to register the class.

Parameters and buffers are not part of the description: they travel as raw tensor frames and must
match, name for name and shape for shape, the module the description builds (checked on the meta
device first, so a hostile description cannot make the worker allocate more than it sent).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.fx
from torch import nn

from . import budget
from .codec import DTYPES, NodeRef
from .errors import BadRequest, ModelDescriptionError, quoted
from .ops import KINDS, METHODS, OP_NAMES, OPS, SCHEMAS, check_call


_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode",
         "bias")
_NORM = ("num_features", "eps", "momentum", "affine", "track_running_stats")
_MAXPOOL = ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")
_AVGPOOL = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")

#: the dtype a description's layers and parameters are built in. Named, not left to torch's default dtype:
#: that is the process's, and an in-process worker builds on its torch threads while its caller's thread
#: may have changed it for a moment (a model built in float64 then refused its own float32 weights)
PARAMETER_DTYPE = torch.float32

#: standard layers a worker builds: name -> (class, its constructor arguments, read off an instance by
#: attribute of the same name; "bias" is read as "has a bias"). ``inplace`` is never one of them: a
#: layer working in place could change the data owner's dataset, so the worker builds every layer
#: out of place (the results are the same).
LAYERS: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "Linear": (nn.Linear, ("in_features", "out_features", "bias")),
    "Conv1d": (nn.Conv1d, _CONV),
    "Conv2d": (nn.Conv2d, _CONV),
    "BatchNorm1d": (nn.BatchNorm1d, _NORM),
    "BatchNorm2d": (nn.BatchNorm2d, _NORM),
    "LayerNorm": (nn.LayerNorm, ("normalized_shape", "eps", "elementwise_affine", "bias")),
    "GroupNorm": (nn.GroupNorm, ("num_groups", "num_channels", "eps", "affine")),
    # not ``sparse``: a sparse gradient has no storage for the daemon to label or charge
    "Embedding": (nn.Embedding, ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                                 "scale_grad_by_freq")),
    "Dropout": (nn.Dropout, ("p",)),
    "Dropout1d": (nn.Dropout1d, ("p",)),
    "Dropout2d": (nn.Dropout2d, ("p",)),
    "Flatten": (nn.Flatten, ("start_dim", "end_dim")),
    "Unflatten": (nn.Unflatten, ("dim", "unflattened_size")),
    "MaxPool1d": (nn.MaxPool1d, _MAXPOOL),
    "MaxPool2d": (nn.MaxPool2d, _MAXPOOL),
    "AvgPool1d": (nn.AvgPool1d, _AVGPOOL),
    "AvgPool2d": (nn.AvgPool2d, (*_AVGPOOL, "divisor_override")),
    "AdaptiveAvgPool1d": (nn.AdaptiveAvgPool1d, ("output_size",)),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, ("output_size",)),
    "ReLU": (nn.ReLU, ()),
    "LeakyReLU": (nn.LeakyReLU, ("negative_slope",)),
    "ELU": (nn.ELU, ("alpha",)),
    "SiLU": (nn.SiLU, ()),
    "GELU": (nn.GELU, ("approximate",)),
    "Tanh": (nn.Tanh, ()),
    "Sigmoid": (nn.Sigmoid, ()),
    "Identity": (nn.Identity, ()),
    "Softmax": (nn.Softmax, ("dim",)),
    "LogSoftmax": (nn.LogSoftmax, ("dim",)),
}
#: the layers that make tensors of their own (they take ``dtype=``, as torch's factory arguments go)
TAKES_DTYPE = frozenset(name for name, (cls, _) in LAYERS.items()
                        if "dtype" in inspect.signature(cls.__init__).parameters)
_LAYER_NAMES = {cls: name for name, (cls, _) in LAYERS.items()}


def layer_kwargs(module: nn.Module, names: tuple[str, ...]) -> dict[str, Any]:
    return {n: getattr(module, "bias", None) is not None if n == "bias" else getattr(module, n) for n in names}


#: tensor methods a forward program may call besides the ops (they return sizes, not tensors)
PROGRAM_METHODS: dict[str, Callable[..., Any]] = {"size": torch.Tensor.size, "dim": torch.Tensor.dim}


def _check_size_call(target: str, args: Any, kwargs: Any) -> None:
    """``x.size()``, ``x.size(d)``, ``x.dim()``: a tensor, and for size at most one int dim."""
    extra = list(args[1:]) + list(kwargs.values())
    if (not args or not isinstance(args[0], torch.Tensor) or set(kwargs) - {"dim"}
            or len(extra) > (1 if target == "size" else 0) or not all(KINDS["int"](v) for v in extra)):
        raise BadRequest.new(f"{target}: takes a tensor" + (" and at most one int dim" if target == "size" else ""))

ModelRegistry = Mapping[str, Callable[..., nn.Module]]


# ---------------------------------------------------------------------------------------------------
# Client side: describe


def describe(module: nn.Module) -> dict[str, Any]:
    """The description of ``module`` that a worker can rebuild, or ``ModelDescriptionError``. Its parameters
    frozen with ``requires_grad_(False)`` are named in ``frozen``: the worker builds them frozen, so a fit
    leaves them as they are, as torch's optimizers do (a layer's own description has no flag for it)."""
    spec = _describe(module)
    frozen = [name for name, parameter in module.named_parameters() if not parameter.requires_grad]
    return {**spec, "frozen": frozen} if frozen else spec


def _describe(module: nn.Module) -> dict[str, Any]:
    registered = getattr(type(module), "fedzmq_name", None)
    if registered:
        return {"kind": "registered", "name": registered, "kwargs": dict(getattr(module, "fedzmq_kwargs", {}))}
    if type(module) in _LAYER_NAMES:
        name = _LAYER_NAMES[type(module)]
        return {"kind": "layer", "type": name, "kwargs": layer_kwargs(module, LAYERS[name][1])}
    if type(module) is nn.Sequential:
        return {"kind": "sequential", "children": [[n, _describe(c)] for n, c in module.named_children()]}
    return _describe_graph(module)


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) in _LAYER_NAMES or bool(getattr(type(m), "fedzmq_name", None))


def _describe_container(module: nn.Module) -> dict[str, Any]:
    children = []
    for name, child in module.named_children():
        if type(child) in _LAYER_NAMES or type(child) is nn.Sequential or getattr(type(child), "fedzmq_name", None):
            children.append([name, _describe(child)])
        else:
            children.append([name, _describe_container(child)])
    return {
        "kind": "container",
        "children": children,
        "params": [[n, list(p.shape), p.requires_grad] for n, p in module.named_parameters(recurse=False)],
        "buffers": [[n, list(b.shape), str(b.dtype).removeprefix("torch.")]
                    for n, b in module.named_buffers(recurse=False)],
    }


def _describe_graph(module: nn.Module) -> dict[str, Any]:
    cls = type(module).__name__
    try:
        graph = _Tracer().trace(module)
    except Exception as exc:
        raise ModelDescriptionError(
            f"cannot describe {cls}: torch.fx could not trace its forward ({type(exc).__name__}: {exc}). "
            f"Install the class on the worker and register it by name (set {cls}.fedzmq_name)."
        ) from exc
    index: dict[torch.fx.Node, int] = {}
    program: list[list[Any]] = []

    def arg(value: Any) -> Any:
        if isinstance(value, torch.fx.Node):
            return NodeRef(index[value])
        if isinstance(value, (list, tuple)):
            converted = [arg(v) for v in value]
            return tuple(converted) if isinstance(value, tuple) else converted
        if isinstance(value, dict):
            return {k: arg(v) for k, v in value.items()}
        if isinstance(value, torch.Tensor):
            raise ModelDescriptionError(f"cannot describe {cls}: its forward uses a tensor constant; "
                                        "register it as a buffer instead")
        return value

    for node in graph.nodes:
        if node.op == "call_function":
            target = OP_NAMES.get(node.target)
            if target is None:
                raise ModelDescriptionError(
                    f"cannot describe {cls}: its forward calls {getattr(node.target, '__name__', node.target)}, "
                    "which is not on fedzmq's op allowlist (fedzmq.ops.OPS)")
        elif node.op == "call_method":
            target = node.target
            if target not in METHODS and target not in PROGRAM_METHODS:
                raise ModelDescriptionError(
                    f"cannot describe {cls}: its forward calls the tensor method .{target}(), "
                    "which is not on fedzmq's allowlist")
        else:
            target = node.target
        index[node] = len(program)
        kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}  # the worker never works in place
        program.append([node.op, target, arg(node.args), arg(kwargs)])

    spec = _describe_container(module)
    spec["kind"] = "graph"
    spec["program"] = program
    return spec


# ---------------------------------------------------------------------------------------------------
# Worker side: build


class GraphModule(nn.Module):
    """A module whose forward interprets a described program over its submodules."""

    def __init__(self, program: list[list[Any]]) -> None:
        super().__init__()
        self._program = program

    def forward(self, *inputs: Any) -> Any:
        values: list[Any] = []
        placeholders = iter(inputs)
        for position, (op, target, args, kwargs) in enumerate(self._program):
            budget.check()
            if op == "output":
                return _resolve(args, values)[0]
            if op == "placeholder":
                value = next(placeholders, None)
                if value is None:
                    if not args:
                        raise TypeError(f"forward() missing input {target!r}")
                    value = args[0]
                values.append(value)
                continue
            args, kwargs = _resolve(args, values), _resolve(kwargs, values)
            if op == "call_module":
                if not all(KINDS["operand"](v) for v in (*args, *kwargs.values())):
                    raise BadRequest.new(f"program node {position}: a submodule takes tensors and numbers")
                values.append(self.get_submodule(target)(*args, **kwargs))
            elif op in ("call_function", "call_method") and target in PROGRAM_METHODS:
                _check_size_call(target, args, kwargs)
                values.append(PROGRAM_METHODS[target](*args, **kwargs))
            elif op in ("call_function", "call_method"):
                try:
                    check_call(target, args, kwargs)  # the op command's own check: one schema per op
                except BadRequest as exc:
                    raise BadRequest.new(f"program node {position}: {exc.remote_message}") from None
                values.append(OPS[target](*args, **kwargs))
            elif op == "get_attr":
                values.append(_get_attr(self, target))
        raise BadRequest.new("forward program has no output node")


#: layers that index with their input's values (an index out of range raises)
_INDEXING_LAYERS = (nn.Embedding, nn.EmbeddingBag)


def holds_registered(spec: Any) -> bool:
    """Whether a description names an owner's registered class anywhere in it: that class's code, and so
    its errors' words, are the owner's, not made from the description's public facts alone."""
    if not isinstance(spec, dict):
        return False
    if spec.get("kind") == "registered":
        return True
    children = spec.get("children")
    return isinstance(children, list) and any(isinstance(entry, list) and len(entry) == 2 and holds_registered(entry[1])
                                              for entry in children)


def checks_values(module: nn.Module) -> bool:
    """Whether a forward of ``module`` can fail on the values of its inputs or weights, not only on their
    shapes: it holds a layer that indexes with them (an embedding), or a program that passes a tensor
    it computed where an op checks values (``fedzmq.ops.OpSchema.checks_values``). The code of an
    owner's registered class is the owner's, and is not looked into beyond its layers."""
    for sub in module.modules():
        if isinstance(sub, _INDEXING_LAYERS):
            return True
        if isinstance(sub, GraphModule) and any(_node_checks_values(node) for node in sub._program):
            return True
    return False


#: layers whose forward draws from torch's default generator (in training mode)
_DRAWING_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
#: the classes a description builds besides an owner's registered ones
_BUILT_CLASSES = frozenset({*(cls for cls, _ in LAYERS.values()), nn.Sequential, GraphModule, nn.Module})


def draws_random(module: nn.Module) -> bool:
    """Whether a forward of ``module`` may draw from torch's default generator: it holds a dropout layer, a
    program op that draws (``fedzmq.ops.OpSchema.draws_random``), or an owner's registered class (whose code
    is the owner's, and is not looked into)."""
    for sub in module.modules():
        if isinstance(sub, _DRAWING_LAYERS) or type(sub) not in _BUILT_CLASSES:
            return True
        if isinstance(sub, GraphModule) and any(
                op in ("call_function", "call_method") and target in SCHEMAS and SCHEMAS[target].draws_random
                for op, target, _, _ in sub._program):
            return True
    return False


def _node_checks_values(node: list[Any]) -> bool:
    op, target, args, kwargs = node
    if op not in ("call_function", "call_method") or target not in SCHEMAS or not SCHEMAS[target].checks_values:
        return False
    schema = SCHEMAS[target]
    named = list(zip((param for param, _ in schema.params), args)) + list(kwargs.items())
    return any(param in schema.checks_values and any(isinstance(leaf, NodeRef) for leaf in _leaves(value))
               for param, value in named)


def _get_attr(module: nn.Module, path: str) -> Any:
    owner, _, name = path.rpartition(".")
    holder = module.get_submodule(owner) if owner else module
    if name in holder._parameters:
        return holder._parameters[name]
    if name in holder._buffers:
        return holder._buffers[name]
    raise BadRequest.new(f"get_attr of {path!r}: no such parameter or buffer")


def _resolve(value: Any, values: list[Any]) -> Any:
    if isinstance(value, NodeRef):
        return values[value.index]
    if isinstance(value, list):
        return [_resolve(v, values) for v in value]
    if isinstance(value, tuple):
        return tuple(_resolve(v, values) for v in value)
    if isinstance(value, dict):
        return {k: _resolve(v, values) for k, v in value.items()}
    return value


def build(spec: Any, registry: ModelRegistry) -> nn.Module:
    """Build the module a description names (parameters uninitialized: call on the meta device), with the
    parameters it names in ``frozen`` not requiring gradients."""
    module = _build(spec, registry)
    freeze(module, spec.get("frozen"))
    return module


def freeze(module: nn.Module, frozen: Any) -> None:
    """Stop the parameters ``frozen`` names requiring gradients (a description's ``frozen``: None or a list
    of distinct names of ``module``'s parameters, each checked: it comes from the client)."""
    if frozen is None:
        return
    parameters = dict(module.named_parameters())
    if not isinstance(frozen, list) or not all(isinstance(name, str) for name in frozen):
        raise BadRequest.new("a description's frozen must be a list of parameter names")
    if len(set(frozen)) != len(frozen):
        raise BadRequest.new("a description's frozen names a parameter twice")
    for name in frozen:
        if name not in parameters:
            raise BadRequest.new(f"a description's frozen names {quoted(name)}, which is no parameter of the model")
        parameters[name].requires_grad_(False)


def _build(spec: Any, registry: ModelRegistry) -> nn.Module:
    if not isinstance(spec, dict):
        raise BadRequest.new("a model description must be a map")
    kind = spec.get("kind")
    known = DESCRIPTION_KEYS.get(kind, set(spec)) if isinstance(kind, str) else set(spec)  # (a bad kind: below)
    unknown_keys = set(spec) - known
    if unknown_keys:  # kept with the model, so nothing it does not use (a red team's 3 MiB "note" in each)
        raise BadRequest.new(f"a {kind} description has no {sorted(unknown_keys)}")
    if kind == "layer":
        name = spec.get("type")
        if name not in LAYERS:
            raise BadRequest.new(f"layer type {name!r} is not on the worker's allowlist")
        cls, allowed = LAYERS[name]
        kwargs = _plain_kwargs(spec.get("kwargs"))
        unknown = set(kwargs) - set(allowed)
        if unknown:
            raise BadRequest.new(f"{name}: unknown arguments {sorted(unknown)}")
        return cls(**kwargs, **({"dtype": PARAMETER_DTYPE} if name in TAKES_DTYPE else {}))
    if kind == "registered":
        name = spec.get("name")
        if not isinstance(name, str) or name not in registry:
            raise BadRequest.new(f"model {name!r} is not registered on this worker "
                                 f"(registered: {sorted(registry) or 'none'})")
        return registry[name](**_plain_kwargs(spec.get("kwargs")))
    if kind == "sequential":
        return nn.Sequential(OrderedDict(_children(spec, registry)))
    if kind in ("container", "graph"):
        module = GraphModule(_checked_program(spec.get("program"))) if kind == "graph" else nn.Module()
        for name, child in _children(spec, registry).items():
            module.add_module(name, child)
        for entry in spec.get("params") or []:
            name, shape, requires_grad = _triple(entry)
            module.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=PARAMETER_DTYPE),
                                                         requires_grad=bool(requires_grad)))
        for entry in spec.get("buffers") or []:
            name, shape, dtype = _triple(entry)
            if dtype not in DTYPES:
                raise BadRequest.new(f"buffer dtype {dtype!r} is not on the allowlist")
            module.register_buffer(name, torch.empty(shape, dtype=DTYPES[dtype]))
        return module
    raise BadRequest.new(f"unknown model description kind {kind!r}")


#: the keys each kind of description has
DESCRIPTION_KEYS: dict[Any, set[str]] = {
    "layer": {"kind", "type", "kwargs", "frozen"}, "registered": {"kind", "name", "kwargs", "frozen"},
    "sequential": {"kind", "children", "frozen"},
    "container": {"kind", "children", "params", "buffers", "frozen"},
    "graph": {"kind", "children", "params", "buffers", "program", "frozen"},
}


def _plain_kwargs(kwargs: Any) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise BadRequest.new("model kwargs must be a map")
    for key, value in kwargs.items():
        if not _is_plain(value):
            raise BadRequest.new(f"model argument {key!r} must be plain data (numbers, strings, lists)")
    return kwargs


def _is_plain(value: Any) -> bool:
    if value is None or type(value) in (bool, int, float, str):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return False


def _children(spec: dict[str, Any], registry: ModelRegistry) -> dict[str, nn.Module]:
    children = spec.get("children") or []
    if not isinstance(children, list):
        raise BadRequest.new("children must be a list")
    out: dict[str, nn.Module] = {}
    for entry in children:
        if not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str):
            raise BadRequest.new("each child must be [name, description]")
        if not entry[0] or "." in entry[0] or entry[0] in out:
            raise BadRequest.new(f"bad or repeated child name {entry[0]!r}")
        out[entry[0]] = build(entry[1], registry)
    return out


def _triple(entry: Any) -> tuple[str, tuple[int, ...], Any]:
    if (not isinstance(entry, list) or len(entry) != 3 or not isinstance(entry[0], str)
            or "." in entry[0] or not entry[0] or not isinstance(entry[1], list)
            or not all(type(d) is int and d >= 0 for d in entry[1])):
        raise BadRequest.new("parameter and buffer entries must be [name, shape, extra]")
    return entry[0], tuple(entry[1]), entry[2]


_PROGRAM_OPS = {"placeholder", "get_attr", "call_module", "call_function", "call_method", "output"}


def _checked_program(program: Any) -> list[list[Any]]:
    if not isinstance(program, list) or not program:
        raise BadRequest.new("a graph model needs a non-empty program")
    for position, node in enumerate(program):
        if not isinstance(node, list) or len(node) != 4:
            raise BadRequest.new(f"program node {position} must be [op, target, args, kwargs]")
        op, target, args, kwargs = node
        if op not in _PROGRAM_OPS or not isinstance(target, str):
            raise BadRequest.new(f"program node {position}: unknown op {op!r}")
        if op == "call_function" and target not in OPS:
            raise BadRequest.new(f"program node {position}: function {target!r} is not on the allowlist")
        if op == "call_method" and target not in METHODS and target not in PROGRAM_METHODS:
            raise BadRequest.new(f"program node {position}: method {target!r} is not on the allowlist")
        if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
            raise BadRequest.new(f"program node {position}: args must be a list and kwargs a map")
        _check_refs(args, position)
        _check_refs(kwargs, position)
        if op in ("call_function", "call_method") and target in SCHEMAS:
            _check_keywords(position, target, kwargs)
    return program


def _check_keywords(position: int, target: str, kwargs: dict[str, Any]) -> None:
    """What can be checked before the program runs: the keywords the op takes (``out=`` and
    ``inplace=`` never). The rest of its schema is checked at every call, on the values."""
    schema = SCHEMAS[target]
    for key in kwargs:
        if schema.kind_of_keyword(key) is None:
            raise BadRequest.new(f"program node {position}: {target} does not take the keyword {key!r}")


def _leaves(value: Any) -> Iterator[Any]:
    """The values inside nested lists, tuples and maps (a program node's arguments, a description)."""
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    else:
        yield value


def _check_refs(value: Any, position: int) -> None:
    if any(isinstance(leaf, NodeRef) and leaf.index >= position for leaf in _leaves(value)):
        raise BadRequest.new(f"program node {position} refers to a later node")


def instantiate(spec: Any, state: Mapping[str, Any], registry: ModelRegistry) -> nn.Module:
    """Build a module and load ``state`` into it, checking it against the description first."""
    _check_no_tensors(spec, "the model description")
    with torch.device("meta"):
        skeleton = build(spec, registry)
    expected = skeleton.state_dict()
    check_state(expected, state)
    # assign=True adopts the received tensors as the parameters: no copy of the weights is made
    skeleton.load_state_dict(dict(state), strict=True, assign=True)
    return skeleton


def _check_no_tensors(value: Any, where: str) -> None:
    """A description holds plain values only: a tensor in it (a reference the request resolved, as a
    program's operand or a placeholder's default) would be computed on without being the module's
    parameter, buffer or input, so no label would follow it to the forward's output. Weights go in the
    state; data comes as inputs."""
    if any(isinstance(leaf, torch.Tensor) for leaf in _leaves(value)):
        raise BadRequest.new(f"{where} holds no tensors (weights go in the state, data in the inputs), "
                             "and this one holds one")


def check_state(expected: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> None:
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        raise BadRequest.new(f"model state does not match its description: missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)}")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise BadRequest.new(f"model state {name!r} is not a tensor")
        ref = expected[name]
        if tuple(tensor.shape) != tuple(ref.shape) or tensor.dtype != ref.dtype:
            raise BadRequest.new(f"model state {name!r}: got {tuple(tensor.shape)} {tensor.dtype}, "
                                 f"the description needs {tuple(ref.shape)} {ref.dtype}")
