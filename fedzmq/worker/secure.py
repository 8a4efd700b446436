"""The worker's side of a secure-aggregation round (``secagg`` command; see docs/secagg.md).

Per round, the session keeps the ``SecAggClient`` (its secret keys and self-mask seed), the module it
masks, and a copy of that module's float parameters as they were when the round began (the global
model), so that what it masks is its *update*: trained parameters minus the global ones. Nothing of
this leaves the worker except the protocol's own messages; with ``--require-secure-aggregation`` the
trained module itself cannot be downloaded either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import budget
from ..errors import BadRequest, PermissionDenied
from ..secagg import SecAggClient, SecAggConfig
from ..secagg.wire import from_codec, to_codec

if TYPE_CHECKING:
    from .binding import Binding
    from .config import WorkerConfig
    from .ledger import ReleaseLedger

#: rounds a session may have under way at once (older ones are forgotten)
LIVE_ROUNDS = 4
#: what a round keeps, charged to the session: per client it invites (its id), and per peer it shares
#: with (all the others, or a SecAgg+ round's neighbours: their public keys, the shares this client holds,
#: the keys derived; about 1.1 KB measured), rounded up
ROUND_BYTES_PER_INVITED, ROUND_BYTES_PER_PEER = 64, 2048


@dataclass
class SecureRound:
    client: SecAggClient
    module_id: int
    #: the module's float parameters when the round began, flat; released once the masked input is made
    reference: torch.Tensor
    #: what the round's state for its clients is charged (``round_bytes``)
    state_bytes: int


def peer_count(config: SecAggConfig) -> int:
    """The most peers a client of the round shares keys and masks with: all the others, or a SecAgg+
    round's neighbours."""
    return len(config.client_ids) - 1 if config.complete else min(config.degree or 0, len(config.client_ids) - 1)


def round_bytes(config: SecAggConfig) -> int:
    """What a round keeps of its clients: their ids, and per peer keys and shares."""
    return len(config.client_ids) * ROUND_BYTES_PER_INVITED + peer_count(config) * ROUND_BYTES_PER_PEER


def round_holder(number: int) -> int:
    """The quota holder of a secure round's copy of the model: below every object id (those are >= 0)."""
    return -1 - number


def float_parameters(module: nn.Module) -> torch.Tensor:
    """The module's floating-point parameters and buffers, flattened in state_dict order."""
    parts = [t.detach().reshape(-1).float() for t in module.state_dict().values() if t.is_floating_point()]
    return torch.cat(parts) if parts else torch.empty(0)


def smallest_sum_noise(config: SecAggConfig, honest: int | None = None) -> float:
    """The noise multiplier of the smallest sum a round can release: ``threshold`` survivors, each adding
    ``sigma * C / sqrt(expected_survivors)``, carry ``sigma * sqrt(threshold / expected_survivors)``
    between them. The coordinator chooses ``expected_survivors``: set far above the threshold, it would
    spread the owner's least noise over workers a sum need not have (its own Sybils in their place).

    With ``clip_bits`` the round also releases the count of unclipped clients (sensitivity 1/2 per
    client, noise ``clip_bit_noise`` spread likewise): the two are one Gaussian mechanism of multiplier
    ``(s**-2 + (2 s_b)**-2) ** -1/2`` (Andrew et al. 2021, Theorem 1), less than either alone, and 0 when
    the bits carry no noise (each round's count is then one exact bit about the update's norm).

    ``honest``: the participants whose noise the sum carries, in place of ``threshold`` (1: this worker's own
    share alone, when every other participant is the coordinator's: ``--secagg-own-noise``)."""
    spread = math.sqrt((config.threshold if honest is None else honest) / config.n_expected)
    data = config.noise_multiplier * spread
    if not config.clip_bits:
        return data
    bits = 2 * config.clip_bit_noise * spread
    return (data ** -2 + bits ** -2) ** -0.5 if data > 0 and bits > 0 else 0.0


def check_policy(config: SecAggConfig, policy: "WorkerConfig") -> None:
    """The data owner's terms for joining a round, checked before any key is made."""
    problems = []
    if config.n < policy.secagg_min_clients:
        problems.append(f"{config.n} clients (this worker needs at least {policy.secagg_min_clients})")
    if config.threshold < policy.secagg_min_threshold:
        problems.append(f"threshold {config.threshold} (needs at least {policy.secagg_min_threshold})")
    if not config.complete and not policy.secagg_allow_sparse:
        problems.append(f"a sparse graph of degree {config.degree} (SecAgg+), whose views are confirmed within "
                        "neighbourhoods only (--secagg-allow-sparse to join such rounds)")
    holders, colluders = config.share_holders, max(0, policy.secagg_colluders)
    if 2 * config.threshold <= holders + colluders:  # else two sets of `threshold` confirmers can exist
        # (colluding participants confirm whatever they are shown: they count in both)
        with_colluders = f" with {colluders} of them working with the coordinator" if colluders else ""
        problems.append(f"threshold {config.threshold} of the {holders} clients holding a client's shares "
                        f"(needs a strict majority{with_colluders}, at least {(holders + colluders) // 2 + 1}: "
                        f"a coordinator telling two halves different survivors could rebuild both secrets of one "
                        f"client and unmask its update)")
    if config.noise_multiplier < policy.secagg_min_noise:
        problems.append(f"noise multiplier {config.noise_multiplier} (needs at least {policy.secagg_min_noise})")
    elif policy.secagg_min_noise > 0 and smallest_sum_noise(config) < policy.secagg_min_noise:
        bits = f" and the clipping bits' noise {config.clip_bit_noise}" if config.clip_bits else ""
        problems.append(f"noise multiplier {config.noise_multiplier}{bits} spread over {config.n_expected} expected "
                        f"survivors: a sum of the threshold's {config.threshold} would carry "
                        f"{smallest_sum_noise(config):.4g} (needs at least {policy.secagg_min_noise})")
    own = smallest_sum_noise(config, honest=1)
    if policy.secagg_own_noise > 0 and own < policy.secagg_own_noise:
        problems.append(f"noise multiplier {config.noise_multiplier} spread over {config.n_expected} expected "
                        f"survivors leaves this worker's own share {own:.4g}, which is all its update carries when "
                        f"the others are the coordinator's (needs at least {policy.secagg_own_noise}, "
                        "--secagg-own-noise)")
    if problems:
        raise PermissionDenied.new("this worker's policy refuses the round: " + "; ".join(problems))


def handle(binding: "Binding", policy: "WorkerConfig", ledger: "ReleaseLedger") -> Any:
    """One step of a secure round. ``advertise`` and ``masked_input`` name the module (the executor
    checked that the owner's terms let it leave masked); the others carry protocol messages only."""
    args, session = binding.args, binding.session
    step, number = args["step"], args["round"]
    rounds: dict[int, SecureRound] = session.secure_rounds
    if step in ("advertise", "masked_input") and "module" not in binding.objects:
        raise BadRequest.new(f"the {step} step names the module it masks (module=<id>)")
    if step == "advertise":
        hosted = binding.objects["module"]
        module = hosted.module
        config = SecAggConfig.from_wire(from_codec(args["payload"]))
        check_policy(config, policy)
        reference = float_parameters(module)  # a fresh copy (torch.cat's), held for the round below
        if reference.numel() != config.vector_length:
            raise BadRequest.new(f"the round masks {config.vector_length} values, the model has {reference.numel()}")
        if number in rounds:
            session.quota.drop(round_holder(number))
            del rounds[number]
        # what the round keeps of its clients (their ids, and per peer its keys and shares as they come):
        # four rounds of 4M client ids each had held 770 MiB uncharged (a red team's find)
        for_clients = round_bytes(config)
        session.quota.check(for_clients, "a secure round's state for its clients")
        # the long steps stop at --max-command-seconds, or when the session ends (a revoked key), as a fit does
        client = SecAggClient(args["client"], config, checkpoint=budget.check)
        rounds[number] = SecureRound(client, binding.request.args["module"], reference, for_clients)
        # charged as the session's objects are (the command's reservation sized the copy): four live rounds
        # of a 30 MiB float16 model had held 240 MiB beside a 64 MiB quota that never saw them
        session.quota.hold(round_holder(number), [reference], extra=for_clients)
        while len(rounds) > LIVE_ROUNDS:  # the oldest go (not the smallest number: that may be this one)
            oldest = next(iter(rounds))
            rounds.pop(oldest)
            session.quota.drop(round_holder(oldest))
        return to_codec(rounds[number].client.advertise())
    state = rounds.get(number)
    if state is None:
        raise BadRequest.new(f"no secure-aggregation round {number} under way in this session")
    payload = from_codec(args["payload"])
    if step == "share_keys":
        return to_codec(state.client.share_keys(payload))
    if step == "masked_input":
        if binding.request.args["module"] != state.module_id:
            raise BadRequest.new(f"round {number} masks module {state.module_id}, not {binding.request.args['module']}")
        hosted = binding.objects["module"]
        update = float_parameters(hosted.module)
        update.sub_(state.reference)  # in place: the concatenation is already a fresh copy
        # the weight is the worker's own count of the samples it trained on, not the coordinator's word
        weight = float(hosted.trained_samples)
        holders = set(session.trained_by)  # whose rows any fit of the session read: one more round each
        ledger.charge(holders)
        try:
            masked = state.client.masked_input(update, weight, payload)
        except BaseException:  # nothing left: the round is given back
            ledger.refund(holders)
            raise
        # the copy of the model has done its work: uncharged now, not when the round ages out (a federation
        # of 4 MiB models under a 40 MiB quota had stopped at its third round)
        state.reference = torch.empty(0)
        session.quota.hold(round_holder(number), [], extra=state.state_bytes)  # (in place of what it held)
        return to_codec(masked)
    if step == "confirm":
        return to_codec(state.client.confirm(payload))
    if step == "unmask":
        answer = state.client.unmask(payload)
        return to_codec(answer)
    raise BadRequest.new(f"unknown secure-aggregation step {step!r}")
