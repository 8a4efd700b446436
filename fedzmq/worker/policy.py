"""The data owner's terms: what may leave the daemon, and in what words a failure is reported.

What may leave is decided by a small set of declared releases (TensorFlow Federated's lesson), applied
to the label of the value asked for (``fedzmq.worker.taint``):

| label     | ``get``/``read`` of a tensor             | model state                  | secure round's masked update |
|-----------|-------------------------------------------|------------------------------|------------------------------|
| public    | yes                                       | yes                          | yes                          |
| ROWS      | aggregate scalars, with ``aggregates``    | with ``aggregates``          | with ``aggregates``          |
| SECURE    | no                                        | no                           | yes                          |
| PRIVATE   | no                                        | no                           | no                           |

``fit`` is the declared release of trained parameters: what it writes is public, or SECURE on a daemon
that requires secure aggregation. ``evaluate`` releases its metrics. A load that overwrites a storage
whole gives it the label of what it copied (``TaintRecord.replace``). Nothing else lowers a label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import PermissionDenied, RemoteError
from .taint import Label

#: ops whose one-element result, computed from an open dataset's rows, ``--private-release
#: aggregates`` releases (the seed tutorial's ``loss.get()``)
AGGREGATES = frozenset({"sum", "mean", "mse_loss", "l1_loss", "cross_entropy", "nll_loss", "binary_cross_entropy",
                        "binary_cross_entropy_with_logits"})

Release = Literal["value", "state", "masked"]


@dataclass(frozen=True)
class Policy:
    private_release: Literal["aggregates", "none"] = "none"
    require_secure_aggregation: bool = False
    #: send remote tracebacks with errors (never for errors of commands on private data)
    tracebacks: bool = True

    @property
    def trained(self) -> Label:
        """The label of what ``fit`` writes: the owner releases trained parameters, masked or not."""
        return Label.SECURE if self.require_secure_aggregation else Label.PUBLIC

    def released_when_made(self, op: str, label: Label, numel: int) -> bool:
        """Whether an op's output is released as it is made (an aggregate scalar of open rows)."""
        return label == Label.ROWS and numel == 1 and op in AGGREGATES and self.private_release == "aggregates"

    def releases(self, label: Label, how: Release, released: bool) -> bool:
        """Whether the terms let a value of ``label`` leave as ``how`` (``released``: the object was
        released as it was made, ``released_when_made``)."""
        if not label:
            return True
        aggregates = self.private_release == "aggregates"
        if label == Label.ROWS and aggregates and (how != "value" or released):
            return True
        return how == "masked" and not label & ~(Label.SECURE | (Label.ROWS if aggregates else Label.PUBLIC))

    def discloses_failure(self, label: Label) -> bool:
        """Whether a computation on values of ``label`` may fail where torch checks the values (an index
        in range, a divisor not zero): its failure tells something of them, as much as a model state of
        that label would (public values, and rows under ``aggregates``, which releases their aggregates)."""
        return self.releases(label, "state", False)

    def check_failure_disclosed(self, label: Label, what: str) -> None:
        """Refuse, before it runs, a call whose success would tell something of ``what`` (of ``label``)."""
        if not self.discloses_failure(label):
            raise PermissionDenied.new(
                f"{what} {_REASONS[_worst(label)]}; torch checks its values as it runs (an index or class in "
                "range, a divisor not zero, a probability in [0, 1]), so whether it failed would tell them, "
                "and the data owner's terms do not release that")

    def check_release(self, label: Label, how: Release, released: bool, what: str) -> None:
        """Refuse to let ``what`` (of ``label``) leave as ``how``, unless the terms release it."""
        if self.releases(label, how, released):
            return
        raise PermissionDenied.new(f"{what} {_REASONS[_worst(label)]}; the data owner's terms do not release it "
                                   f"this way ({_RELEASED[how]})")


def _worst(label: Label) -> Label:
    for flag in (Label.PRIVATE, Label.SECURE, Label.ROWS):
        if label & flag:
            return flag
    return Label.PUBLIC


_REASONS = {
    Label.PRIVATE: "was computed from a protected dataset's rows",
    Label.SECURE: "was trained on this worker's data, which leaves only as a masked update of a secure "
                  "aggregation round (--require-secure-aggregation)",
    Label.ROWS: "was computed from a dataset's rows",
}
_RELEASED = {
    "value": "values computed from rows leave only as aggregate scalars, and only with --private-release "
             "aggregates",
    "state": "model state computed from rows through pointers leaves only with --private-release aggregates; "
             "fit releases trained parameters",
    "masked": "masked updates of what was computed from rows leave only with --private-release aggregates",
}


def sanitized(exc: BaseException, request_id: int) -> dict[str, str]:
    """What goes back for a failure of a command that touched private data: the type and a fixed
    message. fedzmq's own refusals (``RemoteError`` subclasses) are built from public facts (shapes,
    sizes, names, quotas) and keep their words; anything torch or Python said may quote a value."""
    if isinstance(exc, RemoteError):
        return {"type": exc.remote_type, "message": exc.remote_message, "traceback": ""}
    name = type(exc).__name__
    return {"type": name, "message": f"{name} in a command that computed on private data; the message is withheld "
                                     f"because it could quote the data (the data owner's log has it, request "
                                     f"{request_id})", "traceback": ""}


__all__ = ["AGGREGATES", "Policy", "sanitized"]
