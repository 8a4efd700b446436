"""Secure aggregation in the scheduler: the coordinator learns only the (weighted, clipped, noised) sum.

``SecAgg(FedAvg(), clip=..., noise_multiplier=...)`` wraps any strategy whose aggregate depends on the
updates only through their weighted mean (FedAvg, FedProx, FedAvgM, the FedOpt family: the strategies that
say ``aggregates_weighted_mean``). The robust rules (FedMedian, FedTrimmedAvg, Krum, Bulyan) need each
update on its own, which is exactly what secure aggregation hides, so the constructor refuses them.
Its round, run by ``Federation``:

1. every participant gets the global model and the round's ``SecAggConfig``, keeps a copy of the
   global parameters, and advertises its two public keys (``secagg`` step ``advertise``); then fits;
2. the coordinator relays the keys; each worker returns its Shamir shares, encrypted for each peer
   (while the workers fit: key sharing does not wait for the slowest fit);
3. the coordinator routes the shares; each worker returns its *masked* update (trained minus global,
   clipped, weighted, noised, quantized, masked);
4. the coordinator asks the survivors to unmask; from their shares it removes the masks and gets the
   weighted mean update, which it hands to the wrapped strategy as if it were one worker's model.

A worker that errors, times out or dies at any step is left out; the protocol recovers as long as at
least ``threshold`` workers remain at every step, and the round fails cleanly (model unchanged)
otherwise. With ``noise_multiplier > 0`` an accountant reports (epsilon, delta) after each round, and
``target_epsilon`` stops the training before the budget would be exceeded.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, Sequence

import torch

from ..client.transfers import retrieve_error
from ..client.worker import RemoteWorker
from ..secagg import SecAggAborted, SecAggConfig, SecAggServer, default_threshold
from ..secagg.wire import from_codec, to_codec
from .strategies import State, Strategy

if TYPE_CHECKING:
    from .federation import Federation


class SecAgg(Strategy):
    """Secure aggregation (Bonawitz et al. 2017) around a weighted-mean strategy, with optional central DP."""

    secure = True

    def __init__(self, inner: Strategy, *, clip: float = 10.0, threshold: int | None = None,
                 noise_multiplier: float = 0.0, delta: float = 1e-5, target_epsilon: float | None = None,
                 ring_bits: int = 32) -> None:
        if isinstance(inner, SecAgg) or not inner.aggregates_weighted_mean:
            raise ValueError(f"{type(inner).__name__} does not aggregate a weighted sum: it needs each update on its "
                             "own (to sort, compare or chain them), and secure aggregation reveals only the masked "
                             "sum of the updates. SecAgg can wrap FedAvg, FedProx, FedAvgM, FedAdam, FedYogi or "
                             "FedAdagrad")
        self.inner = inner
        self.name = f"secagg({inner.name})"
        self.clip, self.threshold, self.ring_bits = clip, threshold, ring_bits
        self.noise_multiplier, self.delta, self.target_epsilon = noise_multiplier, delta, target_epsilon
        self.accountant = None
        if noise_multiplier > 0:
            from ..secagg import PrivacyAccountant
            self.accountant = PrivacyAccountant(noise_multiplier, 1.0, delta)

    def configure_fit(self, round_number: int) -> dict[str, Any]:
        return self.inner.configure_fit(round_number)

    def begin_round(self, round_number: int, global_state: State):  # noqa: ANN201 - the inner aggregator
        return self.inner.begin_round(round_number, global_state)

    def aggregate(self, round_number: int, global_state: Any, updates: Any) -> State:
        """Not available: the clipping, weighting, noise and masking happen on the workers, inside a
        ``Federation`` round. ``SecAgg(s).inner.aggregate(...)`` is the same round without them."""
        raise NotImplementedError("secure aggregation runs only inside a Federation round; call aggregate() on "
                                  "the wrapped strategy (.inner) for the same round without clipping, noise or masks")

    @property
    def epsilon(self) -> float | None:
        return self.accountant.epsilon if self.accountant is not None and self.accountant.rounds else None

    def budget_left(self, sampling_rate: float) -> bool:
        """Whether one more round stays within ``target_epsilon``."""
        if self.accountant is None or self.target_epsilon is None:
            return True
        from ..secagg import compute_epsilon
        next_epsilon = compute_epsilon(self.noise_multiplier, sampling_rate, self.accountant.rounds + 1, self.delta)
        return next_epsilon <= self.target_epsilon

    def state_dict(self) -> dict[str, Any]:
        state = {f"inner.{k}": v for k, v in self.inner.state_dict().items()}
        if self.accountant is not None:
            state["dp_rounds"] = self.accountant.rounds
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("inner.")})
        if self.accountant is not None and state.get("dp_rounds"):
            self.accountant.step(int(state["dp_rounds"]))


async def run_secure_round(federation: "Federation", strategy: SecAgg, participants: Sequence[RemoteWorker],
                           number: int, deadline: float) -> tuple[dict[str, dict[str, Any]], dict[str, str], dict]:
    """One secure round; returns (fits, dropped, facts). Raises ``SecAggAborted`` below the threshold."""
    model_state = federation.model.state_dict()
    float_names = [k for k, v in model_state.items() if v.is_floating_point()]
    length = sum(model_state[k].numel() for k in float_names)
    ids = {worker: n for n, worker in enumerate(participants)}
    name = {n: (w.id or w.address) for w, n in ids.items()}
    threshold = strategy.threshold or default_threshold(len(participants))
    if len(participants) < max(2, threshold):
        raise SecAggAborted(f"{len(participants)} participants cannot meet the threshold {threshold}", "select")
    if strategy.noise_multiplier > 0:
        weight_cap = 1.0  # DP: every client weighs the same (sample counts would be revealed, noise grow)
    else:  # exact sample-weighted FedAvg
        weight_cap = float(max((await _dataset_sizes(participants, federation.fit_config.dataset)).values()))
    config = SecAggConfig(client_ids=list(ids.values()), threshold=threshold, vector_length=length,
                          clip=strategy.clip, ring_bits=strategy.ring_bits, weight_cap=weight_cap,
                          noise_multiplier=strategy.noise_multiplier, session=os.urandom(16))
    server = SecAggServer(config)
    dropped: dict[str, str] = {}
    fits: dict[str, dict[str, Any]] = {}
    pointers: dict[RemoteWorker, Any] = {}

    async def guarded(worker: RemoteWorker, call: Callable[[RemoteWorker], Awaitable[Any]]) -> tuple[bool, Any]:
        """``call(worker)`` under the round deadline; a timeout or error makes the worker a drop-out."""
        try:
            async with asyncio.timeout_at(deadline):
                return True, await call(worker)
        except TimeoutError:
            dropped[name[ids[worker]]] = f"missed the round deadline of {federation.round_timeout:g}s"
        except Exception as exc:
            from .federation import _reason
            dropped[name[ids[worker]]] = _reason(exc)
        return False, None

    async def each(workers: Sequence[RemoteWorker], call: Callable[[RemoteWorker], Awaitable[Any]]) -> dict:
        outcomes = await asyncio.gather(*(guarded(w, call) for w in workers))
        return {w: answer for w, (ok, answer) in zip(workers, outcomes) if ok}

    def secagg(worker: RemoteWorker, step: str, payload: Any, **extra: Any) -> asyncio.Future[Any]:
        """Submit one step now (so it takes its place in the worker's session queue); await the reply later."""
        return worker._submit("secagg", {"step": step, "round": number, "payload": to_codec(payload), **extra})

    async def advertise(worker: RemoteWorker) -> Any:
        await worker.refresh()
        remote = pointers[worker] = await worker.send(federation.model)
        return from_codec(await worker._wait(secagg(worker, "advertise", config.to_wire(), module=remote.id,
                                                     client=ids[worker])))

    async def fit(worker: RemoteWorker) -> None:
        fits[name[ids[worker]]] = await federation._fit(worker, pointers[worker], number)

    advertised = await each(participants, advertise)
    keys = server.collect_keys(advertised.values())
    alive = [w for w in participants if w in advertised]
    # key sharing overlaps the local fits: each worker's share_keys request is queued in its session
    # before its fit, so the keys and shares go round while the workers train
    sharing = {w: secagg(w, "share_keys", keys) for w in alive}
    fitting = {w: asyncio.ensure_future(guarded(w, fit)) for w in alive}
    try:
        shares = await each(alive, lambda w: worker_reply(w, sharing[w]))
        routed = server.route_shares(shares.values())
        for worker, task in fitting.items():
            if ids[worker] not in routed:
                task.cancel()  # out of the round already: its fit no longer matters
        await asyncio.gather(*fitting.values(), return_exceptions=True)
    finally:
        for task in fitting.values():
            task.cancel()
        await asyncio.gather(*fitting.values(), return_exceptions=True)
        for future in sharing.values():
            future.add_done_callback(retrieve_error)
    # a worker whose fit failed has shared its keys: it drops out before its masked input, and the
    # survivors' shares remove its masks
    alive = [w for w in alive if ids[w] in routed and name[ids[w]] in fits]
    masked = await each(alive, lambda w: worker_reply(w, secagg(w, "masked_input", routed[ids[w]],
                                                                module=pointers[w].id)))
    request = server.collect_masked(masked.values())
    alive = [w for w in alive if ids[w] in request["u2"]]
    answers = await each(alive, lambda w: worker_reply(w, secagg(w, "unmask", request)))
    result = server.finish(answers.values())
    for n in result.dropped:  # sent shares, then vanished before their masked input counted
        dropped.setdefault(name[n], "dropped out before its masked update arrived")
    for n in result.excluded:
        dropped.setdefault(name[n], "dropped out before sharing its keys")
    survivors = [name[n] for n in result.survivors]
    _apply_mean_update(federation, strategy, number, float_names, result.mean)
    facts = {"secure_aggregation": True, "threshold": threshold, "quantization_error_bound": result.error_bound,
             "survivors": survivors,
             # shared their keys, then dropped out: the survivors' shares removed their masks
             "dropped_after_sharing": [name[n] for n in result.dropped]}
    if strategy.accountant is not None:
        strategy.accountant.step(noise_multiplier=result.effective_noise_multiplier)
        facts.update(epsilon=strategy.accountant.epsilon, delta=strategy.delta,
                     noise_multiplier=result.effective_noise_multiplier)
    return {k: v for k, v in fits.items() if k in survivors}, dropped, facts


async def worker_reply(worker: RemoteWorker, future: asyncio.Future[Any]) -> Any:
    """The reply to a submitted request, as secure-aggregation message data."""
    return from_codec(await worker._wait(future))


def _apply_mean_update(federation: "Federation", strategy: SecAgg, number: int, float_names: list[str],
                       mean: torch.Tensor) -> None:
    """global + mean update, handed to the wrapped strategy as one worker's model."""
    state = federation.model.state_dict()
    aggregator = strategy.inner.begin_round(number, state)
    aggregator.begin_update(1)
    offset = 0
    for name, tensor in state.items():
        if name in float_names:
            n = tensor.numel()
            aggregator.add_slice(name, 0, tensor.reshape(-1).float() + mean[offset:offset + n])
            offset += n
        else:
            aggregator.add_slice(name, 0, tensor.reshape(-1))
    aggregator.end_update()
    aggregator.write_result(state)


async def _dataset_sizes(workers: Sequence[RemoteWorker], dataset: str) -> Mapping[RemoteWorker, int]:
    """Each worker's dataset size (asked concurrently; 1 where it does not answer)."""
    async def size(worker: RemoteWorker) -> int:
        try:
            found = [d for d in await worker.datasets(timeout=10) if d.name == dataset]
            return found[0].samples if found else 1
        except Exception:
            return 1

    sizes = await asyncio.gather(*(size(w) for w in workers))
    return dict(zip(workers, sizes)) or {None: 1}  # type: ignore[dict-item]


__all__ = ["SecAgg", "run_secure_round"]
