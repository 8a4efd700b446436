"""What a federated round reports, and how a person sees it: JSON lines, a summary table, a plot."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence


@dataclass
class RoundMetrics:
    """What one round did. ``selected``: the workers chosen for it; ``participants``: those whose update
    arrived and went into the model; ``dropped``: those selected but left out, each with why (an error,
    the round's deadline, a worker that died meanwhile); ``unreachable``: workers not answering when the
    round began, so not selected."""

    round: int
    participants: list[str]
    dropped: dict[str, str] = field(default_factory=dict)
    selected: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)
    train_loss: float | None = None
    #: per participant: loss, samples and seconds of its local fit
    fits: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    #: federated evaluation on the workers' own data (sample-weighted), when enabled
    worker_eval_loss: float | None = None
    worker_eval_accuracy: float | None = None
    seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    #: bytes moved both ways per second over the round (sends, chunked streams and downloads)
    transfer_mb_per_s: float = 0.0
    #: differential privacy spent so far (epsilon at the strategy's delta), when DP is on
    epsilon: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v not in (None, {}) or k == "dropped"},
                          sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RoundMetrics":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def summary_table(history: Sequence[RoundMetrics]) -> str:
    """A plain-text table, one row per round; with the participants' own evaluation (``evaluate_on_workers``)
    when the rounds have one."""
    on_workers = any(m.worker_eval_accuracy is not None for m in history)
    rows = [("round", "workers", "dropped", "train loss", "eval loss", "eval acc",
             *(("workers' acc",) if on_workers else ()), "seconds", "MB out", "MB in")]
    for m in history:
        rows.append((str(m.round), str(len(m.participants)), ",".join(sorted(m.dropped)) or "-",
                     _fmt(m.train_loss, "{:.4f}"), _fmt(m.eval_loss, "{:.4f}"), _fmt(m.eval_accuracy, "{:.2%}"),
                     *((_fmt(m.worker_eval_accuracy, "{:.2%}"),) if on_workers else ()), f"{m.seconds:.2f}",
                     f"{m.bytes_sent / 1e6:.2f}", f"{m.bytes_received / 1e6:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(history: Sequence[RoundMetrics], path: str | Path, title: str = "fedzmq training",
         reference_accuracy: float | None = None) -> Path:
    """Loss and accuracy per round as a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [m.round for m in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(rounds, [m.train_loss for m in history], marker="o", label="train loss (workers)")
    if any(m.eval_loss is not None for m in history):
        ax_loss.plot(rounds, [m.eval_loss for m in history], marker="s", label="test loss")
    ax_loss.set_xlabel("round")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if any(m.eval_accuracy is not None for m in history):
        ax_acc.plot(rounds, [m.eval_accuracy for m in history], marker="s", color="tab:green", label="test accuracy")
    if any(m.worker_eval_accuracy is not None for m in history):
        ax_acc.plot(rounds, [m.worker_eval_accuracy for m in history], marker="o", color="tab:orange",
                    label="accuracy on workers' data")
    if reference_accuracy is not None:
        ax_acc.axhline(reference_accuracy, color="gray", linestyle="--", label="centralized training")
    ax_acc.set_xlabel("round")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    ax_acc.legend(loc="lower right")
    ax_acc.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
