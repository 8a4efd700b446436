"""The data owner's datasets, and the only commands that read their rows: fit, evaluate, secure rounds."""

from __future__ import annotations

from typing import Any

import logging

import torch

from ... import budget
from ...errors import BadRequest, LimitExceeded, quoted
from .. import training
from ..byzantine import parse_attack
from ..policy import sanitized
from ..randomness import module_draws
from ..binding import Binding, Context, Made
from .modules import InlineRoom, entries_reply, state_reply

log = logging.getLogger("fedzmq.worker")


def datasets(context: Context, binding: Binding) -> Any:
    query = binding.args.get("query")
    return [d.info() for d in binding.session.datasets.values() if query is None or d.matches(query)]


def dataset_tensor(context: Context, binding: Binding) -> Any:
    """A pointer to an open dataset's rows (shared, not copied: nothing ever writes to them)."""
    dataset = binding.dataset
    assert dataset is not None
    if binding.args["part"] not in ("features", "labels"):
        raise BadRequest.new("part must be 'features' or 'labels'")
    tensor = dataset.features if binding.args["part"] == "features" else dataset.labels
    return Made([tensor], result=[str(tensor.dtype).removeprefix("torch."), list(tensor.shape)])


def fit(context: Context, binding: Binding) -> Any:
    args, hosted, dataset = binding.args, binding.objects["module"], binding.dataset
    assert dataset is not None
    if ("optimizer" in args) == ("optim" in args):
        raise BadRequest.new("fit needs either optimizer={'cls': ...} (a fresh one) or optim=<id> (a remote one)")
    if "clients" in args:
        return fit_clients(context, binding)
    if "optim" in args:
        remote = binding.objects["optim"]
        if remote.module_id != binding.request.args["module"]:
            raise BadRequest.new("that optimizer was created over another module")
        optimizer = remote.optimizer
    else:
        optimizer = training.make_optimizer(args["optimizer"], hosted.module)  # lives as long as the fit
    attack = parse_attack(context.config.byzantine) if context.config.byzantine is not None else None
    binding.session.trained_by.add(binding.session.client or "")
    start = {k: t.clone() for k, t in hosted.module.state_dict().items()} if attack is not None else {}
    result = training.fit(hosted.module, dataset, context.terms, loss=args["loss"], optimizer=optimizer,
                          batch_size=args["batch_size"], epochs=args.get("epochs"), steps=args.get("steps"),
                          prox_mu=float(args.get("prox_mu", 0.0)), seed=args.get("seed", 0),
                          salt=binding.session.client or "", draws=module_draws(hosted))
    if attack is not None:  # a test-only hostile daemon (--byzantine): the update it returns is distorted
        attack.apply(hosted.module, start)
    hosted.trained_samples = result["num_examples"]
    if args.get("reply_state"):  # the trained weights, in the same trip (released: checked before it ran)
        return {"metrics": result,
                "state": state_reply(binding, "module",
                                     binding.session.reply_chunk(context.config.limits.chunk_bytes))}
    return result


def fit_clients(context: Context, binding: Binding) -> Any:
    """One round for many of the logical clients this daemon hosts, in one command: each starts from the
    weights loaded into the module (the round's global model), trains on its own dataset, and its
    trained weights are either kept apart (``combine`` false: one state per client in the reply) or
    folded into ``sum(n_i * x_i)`` in float64 with ``sum(n_i)`` (``combine``: what a weighted mean needs,
    exactly; one state whatever the number of clients). Per-client metrics come back as
    ``[loss, samples_seen, num_examples, steps, seconds]`` (or an error), in the clients' order."""
    args, module = binding.args, binding.objects["module"].module
    if "optim" in args:
        raise BadRequest.new("a fit over many clients makes a fresh optimizer for each (optimizer={...})")
    if args.get("reply_state") is not True:
        raise BadRequest.new("a fit over many clients replies with their trained states (reply_state=True)")
    current = module.state_dict()  # views of the module's own tensors: they follow every step
    combine = bool(args.get("combine"))
    if not combine:
        check_states_reply(context, len(args["clients"]), current)
    start = {name: tensor.clone() for name, tensor in current.items()}
    trainee = training.Trainee(module)  # its walks of the module once, for all the clients
    draws = module_draws(binding.objects["module"])
    sums: dict[str, torch.Tensor] = {}
    metrics: dict[str, Any] = {}
    states: list[dict[str, Any]] = []
    weight = 0
    failed: list[tuple[str, str]] = []
    try:
        for n, client in enumerate(args["clients"]):
            budget.check()
            if n:  # every client starts from the round's weights
                for name, tensor in current.items():
                    tensor.copy_(start[name])
            try:
                dataset = context.dataset(binding.session, args["dataset"], client)
                binding.session.trained_by.add(client)
                result = training.fit(trainee, dataset, context.terms, loss=args["loss"], optimizer=args["optimizer"],
                                      batch_size=args["batch_size"], epochs=args.get("epochs"), steps=args.get("steps"),
                                      prox_mu=float(args.get("prox_mu", 0.0)), seed=args.get("seed", 0), salt=client,
                                      draws=draws)
            except LimitExceeded:  # out of time: the whole command stops
                raise
            except Exception as exc:  # this client is left out of the round; the others go on
                # one line per command, below: the coordinator names the clients, as many as it likes
                log.debug("fit of hosted client %s failed", quoted(client), exc_info=exc)
                failed.append((client, type(exc).__name__))  # not the exception: its frames hold tensors
                metrics[client] = {"error": sanitized(exc, binding.request.id)}
                continue
            metrics[client] = [result[key] for key in training.METRICS]
            if context.config.byzantine is not None:  # test only: every hosted client's update is distorted
                parse_attack(context.config.byzantine).apply(module, start)
            if not combine:
                states.append({name: tensor.clone() for name, tensor in current.items()})
                continue
            samples = result["num_examples"]
            weight += samples
            for name, tensor in current.items():
                if not tensor.is_floating_point():
                    sums[name] = tensor.clone() if name not in sums else torch.maximum(sums[name], tensor)
                elif name in sums:
                    sums[name].add_(tensor, alpha=samples)
                else:
                    # a copy also when the entry is float64 already (``to`` would return the module's own tensor)
                    sums[name] = tensor.to(torch.float64, copy=True).mul_(samples)
        for name, tensor in current.items():
            tensor.copy_(start[name])
    finally:  # (also when the command stops: out of time, or cancelled)
        if failed:
            first, error = failed[0]
            log.warning("fit over %d hosted clients: %d failed (the first, %s: %s)", len(args["clients"]),
                        len(failed), quoted(first), error)
    # streamed past the piece size the client reads, as a fit's ``reply_state`` is (read from the model's id)
    room = InlineRoom(binding.session.reply_chunk(context.config.limits.chunk_bytes))
    if combine:
        return {"metrics": metrics, "weighted_sum": entries_reply(binding, "module", sums, room, made=True),
                "weight": weight}
    return {"metrics": metrics,
            "states": [entries_reply(binding, "module", state, room, made=True) for state in states]}


#: values a tensor takes in a reply's header beside its shape's (its entry's name, ``{"$tensor": [dtype,
#: shape, frame, requires_grad]}``)
TENSOR_HEADER_VALUES = 7


def check_states_reply(context: Context, clients: int, state: dict[str, torch.Tensor]) -> None:
    """Refuse, before any client trains, a fit whose kept-apart states no message could carry (a frame
    and a few header values a tensor: ``Executor.execute`` would answer it with an error, after the work):
    a red team's 64 clients of a 2,201-entry model held the event loop 2-4 s encoding 141,000 tensors."""
    limits = context.config.limits
    tensors = clients * len(state)
    values = clients * (1 + sum(TENSOR_HEADER_VALUES + t.dim() for t in state.values()))
    if tensors > limits.max_frames or values > limits.max_items:
        raise BadRequest.new(f"a fit over {clients} clients of a model of {len(state)} entries would reply {tensors} "
                             f"tensors ({values} header values), more than one message carries ({limits.max_frames} "
                             f"and {limits.max_items}); fit fewer clients at a time, or fold them into one state "
                             "(combine=True)")


def evaluate(context: Context, binding: Binding) -> Any:
    assert binding.dataset is not None
    # counted before the rows are read, failed evaluations too: whether one failed is a bit of the rows
    context.evaluations.charge([binding.session.client or ""])
    return training.evaluate(binding.objects["module"].module, binding.dataset, context.terms,
                             loss=binding.args["loss"], batch_size=binding.args.get("batch_size", 1024))


def secagg(context: Context, binding: Binding) -> Any:
    from .. import secure  # the crypto is loaded by the daemons that take part in secure rounds only

    return secure.handle(binding, context.config, context.ledger)
