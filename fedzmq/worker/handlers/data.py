"""The data owner's datasets, and the only commands that read their rows: fit, evaluate, secure rounds."""

from __future__ import annotations

from typing import Any

from ...errors import BadRequest
from .. import training
from ..binding import Binding, Context, LiveReply, Made
from .modules import state_reply


def datasets(context: Context, binding: Binding) -> Any:
    query = binding.args.get("query")
    return [d.info() for d in context.datasets.values() if query is None or d.matches(query)]


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
    if "optim" in args:
        remote = binding.objects["optim"]
        if remote.module_id != binding.request.args["module"]:
            raise BadRequest.new("that optimizer was created over another module")
        optimizer = remote.optimizer
    else:
        optimizer = training.make_optimizer(args["optimizer"], hosted.module)  # lives as long as the fit
    result = training.fit(hosted.module, dataset, context.terms, loss=args["loss"], optimizer=optimizer,
                          batch_size=args["batch_size"], epochs=args.get("epochs"), steps=args.get("steps"),
                          prox_mu=float(args.get("prox_mu", 0.0)), seed=args.get("seed", 0))
    hosted.trained_samples = result["num_examples"]
    if args.get("reply_state"):  # the trained weights, in the same trip (released: checked before it ran)
        return LiveReply({"metrics": result,
                          "state": state_reply(hosted.module, context.config.limits.chunk_bytes)})
    return result


def evaluate(context: Context, binding: Binding) -> Any:
    assert binding.dataset is not None
    return training.evaluate(binding.objects["module"].module, binding.dataset, context.terms,
                             loss=binding.args["loss"], batch_size=binding.args.get("batch_size", 1024))


def secagg(context: Context, binding: Binding) -> Any:
    from .. import secure  # the crypto is loaded by the daemons that take part in secure rounds only

    return secure.handle(binding, context.config)
