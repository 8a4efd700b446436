"""Secure aggregation in the scheduler: the coordinator learns only the (weighted, clipped, noised) sum.

``SecAgg(FedAvg(), clip=..., noise_multiplier=...)`` wraps any strategy whose aggregate depends on the
updates only through their weighted mean (FedAvg, FedProx, FedAvgM, the FedOpt family: the strategies that
say ``aggregates_weighted_mean``). The robust rules (FedMedian, FedTrimmedAvg, Krum, Bulyan) need each
update on its own, which is exactly what secure aggregation hides, so the constructor refuses them.
Its round, run by ``Federation``:

1. every participant gets the global model and the round's ``SecAggConfig``, keeps a copy of the
   global parameters, and advertises its two public keys (``secagg`` step ``advertise``); then fits;
2. the coordinator relays to each worker its neighbours' keys; each worker returns its Shamir shares,
   encrypted for each neighbour (while the workers fit: key sharing does not wait for the slowest fit);
3. the coordinator routes the shares; each worker returns its *masked* update (trained minus global,
   clipped, weighted, noised, quantized, masked);
4. the coordinator shows each survivor who survived; each commits to that and confirms it to the other
   survivors under keys the coordinator does not hold (``confirm``), so that no two survivors reveal
   for different sets;
5. the coordinator asks them to unmask; from their shares it removes the masks and gets the
   weighted mean update, which it hands to the wrapped strategy as if it were one worker's model.

Neighbours: with many participants the round is SecAgg+ (Bell et al. 2020): each worker shares keys,
shares and masks with the ``k = O(log n)`` neighbours of a random graph (``fedzmq.secagg.graph``), so
what a worker receives and computes grows with ``k``, not ``n``. ``degree=None`` picks ``k`` and the
per-neighbourhood threshold with ``choose_parameters(n)`` (the complete graph, Bonawitz et al., where no
sparse graph meets its bounds: below about 100 participants at the defaults).

A worker that errors, times out or dies at any step is left out; the protocol recovers as long as at
least ``threshold`` workers remain at every step, and the round fails cleanly (model unchanged)
otherwise. With ``noise_multiplier > 0`` an accountant reports (epsilon, delta) after each round, and
``target_epsilon`` stops the training before the budget would be exceeded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import weakref
from typing import Any, Awaitable, Callable, Mapping, Sequence, TypeVar

import torch
from torch import nn

from ..client.pointers import Broadcast, ModulePointer
from ..client.worker import RemoteWorker
from ..errors import ObjectNotFound
from ..secagg import GraphParameters, SecAggAborted, SecAggConfig, SecAggProtocolError, SecAggServer, choose_parameters
from ..torchmodes import in_default_modes
from .base import strategy_name
from .protocols import RoundContext, RoundOutcome, RoundProtocol, hosted_model, worker_key
from .strategies import Aggregator, State, Strategy

log = logging.getLogger("fedzmq.federated")

T = TypeVar("T")


class SecAgg(Strategy):
    """Secure aggregation (Bonawitz et al. 2017; SecAgg+, Bell et al. 2020, for many workers) around a
    weighted-mean strategy, with optional central DP.

    ``degree``: None chooses the round's graph with ``fedzmq.secagg.choose_parameters(n)`` for the ``n``
    participants, at drop-out fraction ``dropout`` and corrupted fraction ``corrupt``: a sparse graph of
    degree ``O(log n)`` where one meets the bounds stated there, else the complete graph. An int fixes the
    degree (even; ``n - 1`` or more is the complete graph). ``threshold``: None is the chosen one (per
    neighbourhood with a sparse graph; a strict majority with the complete graph).

    ``clip``: the L2 bound on each worker's update (trained minus global weights). Without DP the default
    is None: no clipping, and updates are encoded in a 64-bit ring so the mean is exact to about 1e-12
    (the same model as the wrapped strategy's, up to that). With ``noise_multiplier > 0`` (DP) a clip is
    required (the noise is calibrated to it; 1.0 if not given). Each round reports ``clipped_fraction``,
    the fraction of the survivors' updates that were clipped, aggregated inside the secure sum (no
    worker's own bit is revealed), except under DP.

    DP (``noise_multiplier`` ``sigma`` > 0) is DP-FedAvg (McMahan et al. 2018) with the noise added by the
    clients inside the secure sum: each survivor's clipped update counts with weight 1, and the sum
    carries N(0, (sigma * clip)**2) or more. ``expected_survivors`` (a fraction of the round's participants)
    says for how many survivors each client calibrates its share of the noise: the default None is the
    threshold, the fewest that can finish a round, so the noise never falls short, and is
    ``sqrt(participants / threshold)`` (about 1.4) times more than needed when nobody drops out; 1.0
    gives exactly ``sigma`` when nobody drops out, and less when some do (the accountant always counts
    the noise actually present). Under ``Federation(sampling="poisson")`` the accountant amplifies by
    the sampling rate and the sum is divided by the expected number of participants."""

    def __init__(self, inner: Strategy, *, clip: float | None = None, threshold: int | None = None,
                 noise_multiplier: float = 0.0, delta: float = 1e-5, target_epsilon: float | None = None,
                 ring_bits: int | None = None, expected_survivors: float | None = None,
                 degree: int | None = None, dropout: float = 0.05, corrupt: float = 0.05) -> None:
        if isinstance(inner, SecAgg) or not inner.aggregates_weighted_mean:
            raise ValueError(f"{type(inner).__name__} does not aggregate a weighted sum: it needs each update on its "
                             "own (to sort, compare or chain them), and secure aggregation reveals only the masked "
                             "sum of the updates. SecAgg can wrap FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, "
                             "FedAdagrad, or a strategy of your own that declares aggregates_weighted_mean = True")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be > 0 or None, got {clip}")
        if expected_survivors is not None and not 0 < expected_survivors <= 1:
            raise ValueError(f"expected_survivors must be a fraction in (0, 1] or None, got {expected_survivors}")
        self.expected_survivors = expected_survivors
        self.inner = inner
        self.name = f"secagg({strategy_name(inner)})"
        dp = noise_multiplier > 0
        #: None: no clipping (a bound far above any real update, in a 64-bit ring)
        self.clip = clip if clip is not None or not dp else 1.0
        self.threshold = threshold
        self.degree, self.dropout, self.corrupt = degree, dropout, corrupt
        self.ring_bits = ring_bits or (64 if self.clip is None else 32)
        self.noise_multiplier, self.delta, self.target_epsilon = noise_multiplier, delta, target_epsilon
        self.accountant = None
        if dp:
            from ..secagg import PrivacyAccountant
            self.accountant = PrivacyAccountant(noise_multiplier, 1.0, delta)
        #: per federation (the module its rounds send) and worker, the federation's round its last secure round
        #: was and the number it went by on the worker's session
        self._on_workers: weakref.WeakKeyDictionary[nn.Module, weakref.WeakKeyDictionary[RemoteWorker, tuple[int, int]]]
        self._on_workers = weakref.WeakKeyDictionary()

    def number_on(self, worker: RemoteWorker, model: nn.Module, round_number: int) -> int:
        """What ``worker``'s session calls round ``round_number`` of the federation whose rounds send ``model``:
        a number no other round of its connection's sessions goes by (another federation's round 1 at once,
        even one sharing this strategy, is another round), the same again when the round is run again
        (cancelled, then retried): its session then replaces the cancelled round's state instead of keeping
        it, and its copy of the model, until it ages out."""
        numbers = self._on_workers.setdefault(model, weakref.WeakKeyDictionary())
        last = numbers.get(worker)
        if last is not None and last[0] == round_number:
            return last[1]
        number = worker.secure_round_number()
        numbers[worker] = (round_number, number)
        return number

    @property
    def min_updates(self) -> int:
        """Two, or ``threshold`` when it is fixed: a secure round of fewer participants aborts at once. The
        federation skips a Poisson draw of fewer (the model unchanged, the run going on) and refuses a
        federation that could never take as many; with the default 1, a draw of one worker (at 20 workers
        and ``fraction=0.1``, a round in four) ended the run with ``RoundFailed`` (found by h43)."""
        return max(2, self.threshold or 2)

    def graph_for(self, n: int) -> GraphParameters:
        """The degree (None: complete graph) and threshold of a round of ``n`` participants."""
        chosen = choose_parameters(n, dropout=self.dropout, corrupt=self.corrupt, degree=self.degree)
        if self.threshold is not None:
            chosen = dataclasses.replace(chosen, threshold=self.threshold)
        return chosen

    def configure_fit(self, round_number: int) -> dict[str, Any]:
        return self.inner.configure_fit(round_number)

    def round_protocol(self) -> "RoundProtocol":
        return SecureRound(self)

    def begin_round(self, round_number: int, global_state: State) -> Aggregator:
        """Not available, and so neither is ``aggregate()``: the clipping, weighting, noise and masking
        happen on the workers, inside a ``Federation`` round. ``SecAgg(s).inner.aggregate(...)`` is the same
        round without them."""
        raise NotImplementedError("secure aggregation runs only inside a Federation round; call aggregate() on "
                                  "the wrapped strategy (.inner) for the same round without clipping, noise or masks")

    @property
    def epsilon(self) -> float | None:
        return self.accountant.epsilon if self.accountant is not None and self.accountant.rounds else None

    def stop_reason(self, round_number: int, sampling_rate: float) -> str | None:
        """Stop before a round that would take the privacy spent past ``target_epsilon``."""
        if self.accountant is None or self.target_epsilon is None:
            return None
        from ..secagg import PrivacyAccountant
        # the rounds so far as they were accounted, and the next at the nominal multiplier and this rate
        after = PrivacyAccountant.from_state_dict(self.accountant.state_dict())
        next_epsilon = after.step(noise_multiplier=self.noise_multiplier, sampling_rate=sampling_rate).epsilon
        if next_epsilon <= self.target_epsilon:
            return None
        return f"it would exceed the privacy budget (epsilon {next_epsilon:.2f} > {self.target_epsilon})"

    def state_dict(self) -> dict[str, Any]:
        state = {f"inner.{k}": v for k, v in self.inner.state_dict().items()}
        if self.accountant is not None:
            state["dp_rounds"] = self.accountant.rounds
            state["dp_accountant"] = self.accountant.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("inner.")})
        if self.accountant is not None and state.get("dp_accountant"):
            from ..secagg import PrivacyAccountant
            self.accountant = PrivacyAccountant.from_state_dict(state["dp_accountant"])
        elif self.accountant is not None and state.get("dp_rounds"):  # a checkpoint from before the history
            self.accountant.step(int(state["dp_rounds"]))


#: the clip standing for "no clipping": far above the L2 norm of any real model update
NO_CLIP = 1e6


class SecureRound(RoundProtocol):
    """Secure aggregation's round: every step pipelined where the protocol allows.

    1. each participant gets the global weights and, in the same burst, the round's configuration
       (``advertise``: it keeps a copy of the global parameters and answers with its public keys);
    2. the coordinator relays the keys; each worker's ``share_keys`` and its fit are queued together,
       so the shares go round while the workers train;
    3. each survivor sends its masked update (trained minus global, clipped, weighted, noised,
       quantized, masked); 4. each survivor commits to the survivor set it is shown and confirms it to
       the others (``confirm``); 5. the confirmers unmask, and the coordinator gets the weighted mean
       update, which the wrapped strategy receives as one update.
    """

    def __init__(self, strategy: SecAgg) -> None:
        self.strategy = strategy

    async def run(self, context: RoundContext) -> RoundOutcome:
        dropped: dict[str, str] = {}
        try:
            return await self._run(context, dropped)
        except SecAggAborted as exc:  # below the threshold at some step: no update, the model unchanged
            return RoundOutcome({}, {**dropped, "secure aggregation": str(exc)}, commit=lambda: None)

    async def _run(self, context: RoundContext, dropped: dict[str, str]) -> RoundOutcome:
        strategy, participants, number = self.strategy, list(context.participants), context.number
        model_state = context.model.state_dict()
        float_names = [k for k, v in model_state.items() if v.is_floating_point()]
        length = sum(model_state[k].numel() for k in float_names)
        ids = {worker: n for n, worker in enumerate(participants)}
        # what each worker's session calls this round: not the federation's round number, which another
        # federation's secure round over the same sessions at once has too (each overwrote the other's keys)
        on_worker = {worker: strategy.number_on(worker, context.remote_model, number) for worker in participants}
        name = {n: worker_key(w) for w, n in ids.items()}
        if len(participants) < 2:
            raise SecAggAborted(f"{len(participants)} participants: secure aggregation needs at least 2", "select")
        graph = strategy.graph_for(len(participants))
        threshold = graph.threshold
        if len(participants) < max(2, threshold):
            raise SecAggAborted(f"{len(participants)} participants cannot meet the threshold {threshold}", "select")
        dp = strategy.noise_multiplier > 0
        if dp:
            weight_cap = 1.0  # DP: every client weighs the same (sample counts would be revealed, noise grow)
        else:  # exact sample-weighted FedAvg
            weight_cap = float(max((await _dataset_sizes(participants, context.fit.dataset)).values()))
        config = SecAggConfig(client_ids=tuple(ids.values()), threshold=threshold, vector_length=length,
                              clip=strategy.clip or NO_CLIP, ring_bits=strategy.ring_bits, weight_cap=weight_cap,
                              noise_multiplier=strategy.noise_multiplier, clip_bits=not dp,
                              expected_survivors=_noise_survivors(strategy, len(participants)),
                              round_id=os.urandom(16), degree=graph.degree, graph_seed=os.urandom(16))
        server = SecAggServer(config)
        broadcast = Broadcast(model_state)
        fit_kwargs = context.fit_kwargs()
        fits: dict[str, dict[str, Any]] = {}
        pointers: dict[RemoteWorker, ModulePointer] = {}

        async def guarded(worker: RemoteWorker, call: Callable[[RemoteWorker], Awaitable[Any]]) -> tuple[bool, Any]:
            """``call(worker)`` under the round deadline; a timeout or error makes the worker a drop-out."""
            try:
                async with asyncio.timeout_at(context.deadline):
                    return True, await call(worker)
            except Exception as exc:
                dropped[name[ids[worker]]] = context.why_left_out(exc)
            return False, None

        async def each(workers: Sequence[RemoteWorker], call: Callable[[RemoteWorker], Awaitable[Any]]) -> dict:
            outcomes = await asyncio.gather(*(in_default_modes(guarded(w, call)) for w in workers))
            return {w: answer for w, (ok, answer) in zip(workers, outcomes) if ok}

        def add_each(add: Callable[[Any], None], messages: dict[RemoteWorker, Any]) -> dict[RemoteWorker, Any]:
            """The messages ``add`` took; a worker whose message it refused (malformed, or of another
            version of the protocol) is a drop-out, not the end of the round."""
            taken = {}
            for worker, message in messages.items():
                try:
                    add(message)
                except SecAggProtocolError as exc:
                    dropped[name[ids[worker]]] = context.why_left_out(exc)
                else:
                    taken[worker] = message
            return taken

        wire_config = config.to_wire()  # once: it lists every participant

        async def advertise(worker: RemoteWorker) -> Any:
            for attempt in (1, 2):
                remote = pointers[worker] = await hosted_model(worker, context.remote_model)
                loaded = await remote.start_load(broadcast)  # pipelined: the configuration follows at once
                try:
                    keys = worker.secagg("advertise", on_worker[worker], wire_config, module=remote.id,
                                         client=ids[worker])
                except BaseException:
                    loaded.cancel()
                    await asyncio.gather(loaded, return_exceptions=True)
                    raise
                try:
                    await loaded
                    return await keys
                except ObjectNotFound:  # its copy of the model is gone (as in fit_trip): send it again
                    if attempt == 2:
                        raise
                    worker.forget(context.remote_model)
                finally:  # whichever of the two is still pending (the other failed) is not left behind
                    for pending in (loaded, keys):
                        pending.cancel()
                    await asyncio.gather(loaded, keys, return_exceptions=True)

        async def fit(worker: RemoteWorker) -> None:
            fits[name[ids[worker]]] = await pointers[worker].fit(context.fit.dataset, **fit_kwargs)

        advertised = await each(participants, advertise)
        # the server's work (checking keys, routing shares, unmasking) grows with n log n and takes seconds
        # at a thousand clients: it runs on a thread, so the event loop keeps answering and sending
        # heartbeats meanwhile (the daemons would otherwise free the sessions: --session-timeout)
        advertised = await off_loop(add_each, server.add_advertise, advertised)
        await off_loop(server.end_advertise)
        alive = [w for w in participants if w in advertised]
        # key sharing overlaps the local fits: each worker's share_keys is queued in its session before its
        # fit, so the keys and shares go round while the workers train. Each worker gets only its
        # neighbours' keys (all of U0's with the complete graph)
        keys = await off_loop(lambda: {w: server.keys_for(ids[w]) for w in alive})
        sharing = {w: w.secagg("share_keys", on_worker[w], keys[w]) for w in alive}
        fitting = {w: asyncio.ensure_future(in_default_modes(guarded(w, fit))) for w in alive}
        try:
            shares = await each(alive, lambda w: sharing[w])
            await off_loop(add_each, server.add_shares, shares)
            routed = await off_loop(server.end_shares)
            for worker, task in fitting.items():
                if ids[worker] not in routed:
                    task.cancel()  # out of the round already: its fit no longer matters
            await asyncio.gather(*fitting.values(), return_exceptions=True)
        finally:
            for pending in [*fitting.values(), *sharing.values()]:
                pending.cancel()
            await asyncio.gather(*fitting.values(), *sharing.values(), return_exceptions=True)
        # a worker whose fit failed has shared its keys: it drops out before its masked input, and the
        # survivors' shares remove its masks
        alive = [w for w in alive if ids[w] in routed and name[ids[w]] in fits]

        async def masked_input(worker: RemoteWorker) -> None:
            """Its masked vector, added into the server's ring sum as it arrives (a numpy add, cheap on the
            loop) and dropped: the coordinator never holds a thousand of them at once. A malformed one
            changes nothing in the server, and its sender is left out as a drop-out."""
            server.add_masked(await worker.secagg("masked_input", on_worker[worker], routed[ids[worker]],
                                                  module=pointers[worker].id))

        await each(alive, masked_input)
        await off_loop(server.end_masked)
        u2 = set(server.u2)
        alive = [w for w in alive if ids[w] in u2]
        # each survivor commits to the survivor set it is shown and confirms it to the others, under keys
        # the coordinator does not hold: a worker reveals shares only for a set t of them confirmed
        confirm_requests = await off_loop(lambda: {w: server.confirm_request_for(ids[w]) for w in alive})

        async def confirm(worker: RemoteWorker) -> None:  # a malformed answer: a drop-out, as for masked inputs
            server.add_confirm(await worker.secagg("confirm", on_worker[worker], confirm_requests[worker]))

        await each(alive, confirm)
        await off_loop(server.end_confirm)
        confirmers = set(server.confirmers)
        alive = [w for w in alive if ids[w] in confirmers]
        requests = await off_loop(lambda: {w: server.request_for(ids[w]) for w in alive})
        answers = await each(alive, lambda w: w.secagg("unmask", on_worker[w], requests[w]))
        result = await off_loop(server.finish, answers.values())
        for n in result.dropped:  # sent shares, then vanished before their masked input counted
            dropped.setdefault(name[n], "dropped out before its masked update arrived")
        for n in result.excluded:
            dropped.setdefault(name[n], "dropped out before sharing its keys")
        survivors = [name[n] for n in result.survivors]
        # a survivor that failed to confirm or unmask is in the sum all the same: a participant, not
        # left out; why it fell silent is kept apart
        silent = {worker: dropped.pop(worker) for worker in survivors if worker in dropped}
        facts: dict[str, Any] = {
            "secure_aggregation": True, "threshold": threshold, "quantization_error_bound": result.error_bound,
            "secagg_degree": graph.degree,  # None: the complete graph
            "survivors": survivors,
            # shared their keys, then dropped out: the survivors' shares removed their masks
            "dropped_after_sharing": [name[n] for n in result.dropped],
            # sent their masked updates (in the sum), then did not confirm the survivors or unmask
            "silent_after_masking": silent}
        if result.clip_fraction is not None:
            facts["clipped_fraction"] = max(0.0, 1.0 - result.clip_fraction)
            if facts["clipped_fraction"] > 0:
                log.warning("round %d: %.0f%% of the updates were clipped to norm %g (SecAgg(clip=...)); "
                            "clip=None does not clip", number, 100 * facts["clipped_fraction"], config.clip)
        if strategy.accountant is not None:
            strategy.accountant.step(noise_multiplier=result.effective_noise_multiplier,
                                     sampling_rate=context.sampling_rate)
            facts.update(epsilon=strategy.accountant.epsilon, delta=strategy.delta,
                         noise_multiplier=result.effective_noise_multiplier, sampling_rate=context.sampling_rate)
        mean = result.mean
        if dp and context.expected_participants:  # Poisson sampling: the fixed denominator q * clients
            mean = (result.weighted_sum / context.expected_participants).to(torch.float32)

        def commit() -> None:
            _apply_mean_update(context.model, strategy, number, float_names, mean)

        return RoundOutcome({k: v for k, v in fits.items() if k in survivors}, dropped, commit, facts)


async def off_loop(work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` on a thread of the loop's executor, the loop free meanwhile. Only this round's
    ``SecAggServer`` is touched there, and the round awaits each step before the next, so the server is
    never used from two threads at once. Cancelled (the round's deadline, a stopped federation), the
    round stops waiting at once; the step finishes on its thread and its result is dropped with the server."""
    return await asyncio.to_thread(work, *args)


def _apply_mean_update(model: nn.Module, strategy: SecAgg, number: int, float_names: list[str],
                       mean: torch.Tensor) -> None:
    """global + mean update, handed to the wrapped strategy as one worker's model."""
    state = model.state_dict()
    aggregator = strategy.inner.begin_round(number, state)
    aggregator.begin_update(1)
    offset = 0
    for name, tensor in state.items():
        if name in float_names:
            n = tensor.numel()
            aggregator.add_slice(name, 0, tensor.reshape(-1).double() + mean[offset:offset + n].double())
            offset += n
        else:
            aggregator.add_slice(name, 0, tensor.reshape(-1))
    aggregator.end_update()
    aggregator.write_result(state)


def _noise_survivors(strategy: SecAgg, participants: int) -> int | None:
    """How many survivors each client's share of the DP noise is calibrated for (None: the threshold)."""
    if strategy.expected_survivors is None:
        return None
    return max(1, min(participants, round(strategy.expected_survivors * participants)))


async def _dataset_sizes(workers: Sequence[RemoteWorker], dataset: str) -> Mapping[RemoteWorker, int]:
    """Each worker's dataset size (asked concurrently; 1 where it does not answer)."""
    async def size(worker: RemoteWorker) -> int:
        try:
            found = [d for d in await worker.datasets(timeout=10) if d.name == dataset]
            return found[0].samples if found else 1
        except Exception:
            return 1

    sizes = await asyncio.gather(*(in_default_modes(size(w)) for w in workers))
    return dict(zip(workers, sizes)) or {None: 1}  # type: ignore[dict-item]


__all__ = ["NO_CLIP", "SecAgg", "SecureRound"]
