"""The server (coordinator) side of secure aggregation: one ``SecAggServer`` per round.

Each round has an incremental form (``add_*`` for each message as it arrives, ``end_*`` when the
step's deadline passes) and a batch form that does both::

    server = SecAggServer(config)
    server.collect_keys(advertise_msgs)     # round 0: send server.keys_for(i) to each i in U0
    routed = server.route_shares(share_msgs)  # round 1: send routed[j] to each j in U1
    server.collect_masked(masked_msgs)      # round 2: send server.confirm_request_for(i) to each i in U2
    server.collect_confirms(confirm_msgs)   # round 3: send server.request_for(i) to each i in confirmers
    result = server.finish(unmask_msgs)     # round 4: the weighted mean, and nothing else

With the complete graph (``config.degree`` None) every client gets the same keys and requests, which
``collect_keys``/``end_advertise``, ``collect_masked``/``end_masked`` and ``collect_confirms``/``end_confirm``
also return (a broadcast); with
SecAgg+ (a ``degree``) those return None and each client gets only its neighbours' keys, shares and
survivors, so a client's messages hold O(degree) entries, not O(n).

The server only relays keys and ciphertexts, and adds masked vectors into one running ring sum as they
arrive (no individual masked vector is kept). At the end it reconstructs, from at least ``threshold``
clients' shares, the self-mask seeds of the survivors and the mask keys of the dropped, removes those
masks, and decodes the sum. With SecAgg+, every one of those secrets is rebuilt from ``threshold`` shares
of its owner's neighbourhood, and a dropped client's masks are removed only toward its surviving
neighbours (the only clients that masked against it). ``add_*`` validates a message completely before recording it: on
``SecAggProtocolError`` nothing changed and the caller may treat the sender as dropped. Fewer than
``threshold`` clients at any ``end_*`` raises ``SecAggAborted``, after which every call raises it; so
does, with SecAgg+, a neighbourhood that falls under ``threshold`` where a secret must be rebuilt.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import crypto, shamir
from .config import SecAggConfig
from .encoding import CIPHERTEXT_BYTES, SECRET_BYTES, b_commitment, from_ring, pairwise_seed, reduce_ring
from .errors import SecAggAborted, SecAggProtocolError
from .messages import (
    VERSION, AdvertiseMsg, ConfirmMsg, ConfirmRequestMsg, KeysMsg, MaskedMsg, RoutedSharesMsg, SharesMsg, UnmaskMsg,
    MAX_LIST, UnmaskRequestMsg, as_bytes, as_id, as_pairs, check_message,
)


@dataclass(frozen=True)
class SecAggResult:
    """The outcome of a round: the aggregate and what the server necessarily learns besides it.

    mean: ``sum(w_i * clip(x_i) + noise_i) / sum(w_i)`` over U2, float32, shape ``(vector_length,)``.
    weighted_sum: the numerator, float64.
    total_weight: the denominator ``sum(w_i)`` (each ``w_i`` in [0, 1], see ``SecAggConfig.weight_cap``).
    survivors: U2, whose inputs are in the sum. dropped: U1 minus U2. responders: U3, who answered the
        unmask request. excluded: invited clients that never sent their shares (U0 minus U1, or not even in U0).
    clip_fraction: with ``clip_bits``, the noisy fraction of survivors whose update norm was <= clip.
    noise_std: the std of the DP noise actually in ``weighted_sum``: ``sigma*C*sqrt(|U2| / n_expected)``.
    effective_noise_multiplier: ``noise_std / C``, the multiplier to give the accountant for this round.
    error_bound: a bound on ``|mean - exact|`` per coordinate, where ``exact`` is the same ratio computed
        in real arithmetic from the clients' (clipped, weighted, noised) values: quantization of the
        numerator and denominator plus float32 rounding (clamping excluded: it never fires without DP
        noise, and with noise only beyond ``noise_bound`` standard deviations).
    """

    mean: torch.Tensor
    weighted_sum: torch.Tensor
    total_weight: float
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    responders: tuple[int, ...]
    excluded: tuple[int, ...]
    clip_fraction: float | None
    noise_std: float
    effective_noise_multiplier: float
    error_bound: float


class SecAggServer:
    """The coordinator's side of one round. It never sees an unmasked individual input."""

    def __init__(self, config: SecAggConfig) -> None:
        self.config = config
        self._stage = "keys"
        self._aborted: SecAggAborted | None = None
        self._keys: dict[int, tuple[bytes, bytes]] = {}  # U0: id -> (c_pk, s_pk)
        self._public_keys: set[bytes] = set()  # every key of U0 (a key used twice is refused)
        self._shares: dict[int, dict[int, bytes]] = {}  # U1: sender -> receiver -> ciphertext
        self._b_commit: dict[int, bytes] = {}
        self._sum: np.ndarray | None = None
        self._u2: list[int] = []
        self._unmask: dict[int, tuple[dict[int, shamir.Share], dict[int, shamir.Share]]] = {}
        self._result: SecAggResult | None = None
        self._broadcast_keys: KeysMsg | None = None
        self._dropped: list[int] = []
        self._u2_set: set[int] = set()
        self._dropped_set: set[int] = set()
        #: the survivors' words to each other on their view (round 3), by receiver: [[from, to, tag], ...]
        self._confirms: dict[int, list[list[Any]]] = {}
        self._confirmers: set[int] = set()

    # ---- bookkeeping

    @property
    def stage(self) -> str:
        """``keys``, ``shares``, ``masked``, ``confirm``, ``unmask``, ``done`` or ``aborted``."""
        return "aborted" if self._aborted else self._stage

    @property
    def u0(self) -> list[int]:
        return sorted(self._keys)

    @property
    def u1(self) -> list[int]:
        return sorted(self._shares) if self._stage not in ("keys", "shares") else []

    @property
    def u2(self) -> list[int]:
        return list(self._u2)

    def _expect(self, stage: str) -> None:
        if self._aborted is not None:
            raise self._aborted
        if self._stage != stage:
            raise SecAggProtocolError(f"server is at stage {self._stage!r}, not {stage!r}")

    def _abort(self, reason: str, step: str) -> SecAggAborted:
        self._aborted = SecAggAborted(reason, step)
        self._sum = None
        self._unmask.clear()
        return self._aborted

    def _check_count(self, count: int, what: str, step: str) -> None:
        if count < self.config.threshold:
            raise self._abort(f"only {count} clients {what}, threshold is {self.config.threshold}", step)

    # ---- round 0: AdvertiseKeys

    def add_advertise(self, msg: AdvertiseMsg | Mapping[str, Any]) -> None:
        self._expect("keys")
        msg = check_message(msg, "secagg.advertise", {"from", "c_pk", "s_pk"})
        i = as_id(msg["from"], "from")
        if i not in self.config.invited:
            raise SecAggProtocolError("not invited to this round", i)
        if i in self._keys:
            raise SecAggProtocolError("advertised twice", i)
        c_pk = as_bytes(msg["c_pk"], "c_pk", i, length=32)
        s_pk = as_bytes(msg["s_pk"], "s_pk", i, length=32)
        if c_pk == s_pk or c_pk in self._public_keys or s_pk in self._public_keys:
            raise SecAggProtocolError("public key already in use", i)
        self._keys[i] = (c_pk, s_pk)
        self._public_keys.update((c_pk, s_pk))

    def end_advertise(self) -> KeysMsg | None:
        """Close round 0. Send ``keys_for(i)`` to each ``i`` in U0; with the complete graph that is the
        same message for everyone, which is also returned (None with SecAgg+)."""
        self._expect("keys")
        self._check_count(len(self._keys), "advertised keys", "AdvertiseKeys")
        self._stage = "shares"
        if not self.config.complete:
            return None
        self._broadcast_keys = {"v": VERSION, "type": "secagg.keys",
                                "keys": [[i, c, s] for i, (c, s) in sorted(self._keys.items())]}
        return self._broadcast_keys

    def _local(self, i: int, members: set[int] | frozenset[int] | Mapping[int, Any]) -> list[int]:
        """``members`` restricted to ``i``'s neighbourhood (``i`` included), sorted: O(k) for a
        neighbourhood of k (members is a set or map), not O(n), as it is asked for every client."""
        if self.config.complete:
            return sorted(members)
        return sorted(j for j in self.config.neighbourhood(i) if j in members)

    def keys_for(self, client_id: int) -> KeysMsg:
        """Round 0's message for one client of U0: the public keys of its neighbourhood in U0 (its own
        included), and nobody else's."""
        if self._aborted is not None:
            raise self._aborted
        if self._stage == "keys":
            raise SecAggProtocolError("the keys are known only once round 0 is closed (end_advertise)")
        if client_id not in self._keys:
            raise SecAggProtocolError("did not advertise keys", client_id)
        if self._broadcast_keys is not None:
            return self._broadcast_keys
        return {"v": VERSION, "type": "secagg.keys",
                "keys": [[j, *self._keys[j]] for j in self._local(client_id, self._keys)]}

    def collect_keys(self, msgs: Iterable[AdvertiseMsg | Mapping[str, Any]]) -> KeysMsg | None:
        for msg in msgs:
            self.add_advertise(msg)
        return self.end_advertise()

    # ---- round 1: ShareKeys

    def add_shares(self, msg: SharesMsg | Mapping[str, Any]) -> None:
        self._expect("shares")
        msg = check_message(msg, "secagg.shares", {"from", "b_commit", "shares"})
        i = as_id(msg["from"], "from")
        if i not in self._keys:
            raise SecAggProtocolError("sent shares without having advertised keys", i)
        if i in self._shares:
            raise SecAggProtocolError("sent shares twice", i)
        commit = as_bytes(msg["b_commit"], "b_commit", i, length=32)
        entries = as_pairs(msg["shares"], "shares", i)
        if set(entries) != set(self._local(i, self._keys)) - {i}:
            raise SecAggProtocolError("shares must be addressed to exactly every other client of its neighbourhood "
                                      "in U0", i)
        self._shares[i] = {j: as_bytes(ct, "ciphertext", i, length=CIPHERTEXT_BYTES) for j, (ct,) in entries.items()}
        self._b_commit[i] = commit

    def end_shares(self) -> dict[int, RoutedSharesMsg]:
        """Close round 1; U1 is who sent shares. Send ``routed[j]`` to each ``j`` in U1."""
        self._expect("shares")
        self._check_count(len(self._shares), "shared keys", "ShareKeys")
        u1 = sorted(self._shares)
        self._stage = "masked"
        routed: dict[int, RoutedSharesMsg] = {}
        for j in u1:
            local = self._local(j, self._shares)  # the neighbours of j that sent shares: j masks against them only
            routed[j] = {"v": VERSION, "type": "secagg.routed", "to": j, "u1": local,
                         "shares": [[i, self._shares[i][j]] for i in local if i != j]}
        return routed

    def route_shares(self, msgs: Iterable[SharesMsg | Mapping[str, Any]]) -> dict[int, RoutedSharesMsg]:
        for msg in msgs:
            self.add_shares(msg)
        return self.end_shares()

    # ---- round 2: MaskedInputCollection

    def add_masked(self, msg: MaskedMsg | Mapping[str, Any]) -> None:
        """Add one masked vector into the running ring sum (the vector itself is not kept)."""
        self._expect("masked")
        cfg = self.config
        msg = check_message(msg, "secagg.masked", {"from", "masked"})
        i = as_id(msg["from"], "from")
        if i not in self._shares:
            raise SecAggProtocolError("sent a masked input without being in U1", i)
        if i in self._u2_set:
            raise SecAggProtocolError("sent a masked input twice", i)
        data = msg["masked"]
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise SecAggProtocolError("masked must be bytes", i)
        if len(data) != cfg.masked_bytes:
            raise SecAggProtocolError(f"masked input has {len(data)} bytes, expected {cfg.masked_bytes}", i)
        y = np.frombuffer(data, dtype=cfg.ring_dtype)
        if cfg.ring_bits not in (32, 64) and np.any(y > cfg.ring_mask):
            raise SecAggProtocolError(f"masked input has values outside Z_2^{cfg.ring_bits}", i)
        if self._sum is None:
            self._sum = np.zeros(cfg.masked_length, dtype=cfg.ring_dtype)
        self._sum += y
        self._u2.append(i)
        self._u2_set.add(i)

    def end_masked(self) -> ConfirmRequestMsg | None:
        """Close round 2; U2 is who sent masked inputs. Send ``confirm_request_for(i)`` to each ``i`` in U2;
        with the complete graph that is the same request for everyone, which is also returned (None with
        SecAgg+).

        With SecAgg+ the round aborts here already if some client of U1 has fewer than ``threshold``
        of its neighbourhood in U2: its secret could never be rebuilt."""
        self._expect("masked")
        self._check_count(len(self._u2), "sent masked inputs", "MaskedInputCollection")
        self._u2.sort()
        self._dropped = sorted(set(self._shares) - self._u2_set)
        self._dropped_set = set(self._dropped)
        self._check_neighbourhoods(self._u2_set, "sent masked inputs", "MaskedInputCollection")
        self._stage = "confirm"
        return self.confirm_request_for(self._u2[0]) if self.config.complete else None

    def _check_neighbourhoods(self, members: set[int], what: str, step: str) -> None:
        """With SecAgg+: abort unless every client of U1 has ``threshold`` of ``members`` in its
        neighbourhood (else its secret could never be rebuilt, and nobody should reveal anything)."""
        if self.config.complete:
            return
        for j in sorted(self._shares):
            holders = len(self.config.neighbourhood(j) & members)
            if holders < self.config.threshold:
                raise self._abort(f"only {holders} of client {j}'s neighbourhood {what}, "
                                  f"threshold is {self.config.threshold}", step)

    def confirm_request_for(self, client_id: int) -> ConfirmRequestMsg:
        """Round 3's request for one survivor: the survivors and the dropped of its neighbourhood (with
        the complete graph, all of U2 and all the dropped), which it commits to and confirms to the
        other survivors."""
        self._expect("confirm")
        if client_id not in self._u2_set:
            raise SecAggProtocolError("is not in U2", client_id)
        u2, dropped = self._view_of(client_id)
        return {"v": VERSION, "type": "secagg.confirm_request", "u2": u2, "dropped": dropped}

    def _view_of(self, client_id: int) -> tuple[list[int], list[int]]:
        """The survivors and the dropped of ``client_id``'s neighbourhood (all of them: complete graph)."""
        if self.config.complete:
            return list(self._u2), list(self._dropped)
        return self._local(client_id, self._u2_set), self._local(client_id, self._dropped_set)

    # ---- round 3: ConsistencyCheck

    def add_confirm(self, msg: ConfirmMsg | Mapping[str, Any]) -> None:
        """Keep one survivor's tags for the survivors of its neighbourhood, to route them on."""
        self._expect("confirm")
        msg = check_message(msg, "secagg.confirm", {"from", "tags"})
        i = as_id(msg["from"], "from")
        if i not in self._u2_set:
            raise SecAggProtocolError("confirmed without being in U2", i)
        if i in self._confirmers:
            raise SecAggProtocolError("confirmed twice", i)
        entries = as_pairs(msg["tags"], "tags", i)
        if not set(entries) <= set(self._local(i, self._u2_set)) - {i}:
            raise SecAggProtocolError("sent tags to clients outside the survivors of its neighbourhood", i)
        tags = [(j, as_bytes(tag, "tag", i, length=32)) for j, (tag,) in entries.items()]  # all checked first
        for j, tag in tags:
            self._confirms.setdefault(j, []).append([i, j, tag])
        self._confirmers.add(i)

    def end_confirm(self) -> UnmaskRequestMsg | None:
        """Close round 3. Send ``request_for(i)`` to each ``i`` that confirmed; with the complete graph of at
        most 256 clients the returned request carries every tag and serves everyone (else None: it would
        hold n(n-1) tags).

        With SecAgg+ the round aborts here if some client of U1 has fewer than ``threshold`` confirmers in
        its neighbourhood: its secret could never be rebuilt, and nobody should reveal anything."""
        self._expect("confirm")
        self._check_count(len(self._confirmers), "confirmed the survivors", "ConsistencyCheck")
        self._check_neighbourhoods(self._confirmers, "confirmed the survivors", "ConsistencyCheck")
        self._stage = "unmask"
        if not self.config.complete or len(self._u2) * (len(self._u2) - 1) > MAX_LIST:
            return None
        u2, dropped = self._view_of(self._u2[0])
        every = [entry for j in self._u2 for entry in self._confirms.get(j, ())]
        return {"v": VERSION, "type": "secagg.unmask_request", "u2": u2, "dropped": dropped, "confirm": every}

    def collect_confirms(self, msgs: Iterable[ConfirmMsg | Mapping[str, Any]]) -> UnmaskRequestMsg | None:
        for msg in msgs:
            self.add_confirm(msg)
        return self.end_confirm()

    @property
    def confirmers(self) -> list[int]:
        """The survivors that confirmed their view (round 3): those to ask to unmask."""
        return sorted(self._confirmers)

    def request_for(self, client_id: int) -> UnmaskRequestMsg:
        """Round 4's request for one survivor that confirmed: its view again, and the other survivors'
        tags to it."""
        self._expect("unmask")
        if client_id not in self._confirmers:
            raise SecAggProtocolError("did not confirm the survivors", client_id)
        u2, dropped = self._view_of(client_id)
        return {"v": VERSION, "type": "secagg.unmask_request", "u2": u2, "dropped": dropped,
                "confirm": list(self._confirms.get(client_id, ()))}

    def collect_masked(self, msgs: Iterable[MaskedMsg | Mapping[str, Any]]) -> ConfirmRequestMsg | None:
        for msg in msgs:
            self.add_masked(msg)
        return self.end_masked()

    # ---- round 4: Unmasking

    def add_unmask(self, msg: UnmaskMsg | Mapping[str, Any]) -> None:
        self._expect("unmask")
        msg = check_message(msg, "secagg.unmask", {"from", "b_shares", "s_shares"})
        i = as_id(msg["from"], "from")
        if i not in self._confirmers:
            raise SecAggProtocolError("answered the unmask request without having confirmed the survivors", i)
        if i in self._unmask:
            raise SecAggProtocolError("answered the unmask request twice", i)
        b_entries = as_pairs(msg["b_shares"], "b_shares", i)
        s_entries = as_pairs(msg["s_shares"], "s_shares", i)
        if set(b_entries) != set(self._local(i, self._u2_set)) \
                or set(s_entries) != set(self._local(i, self._dropped_set)):
            raise SecAggProtocolError("unmask answer must hold b-shares of exactly U2 and s-shares of exactly the "
                                      "dropped (of its neighbourhood, with SecAgg+)", i)
        parsed = []
        for entries in (b_entries, s_entries):
            shares = {}
            for j, (raw,) in entries.items():
                share = shamir.Share.from_bytes(as_bytes(raw, "share", i, max_length=1024), i)
                if share.x != i + 1 or share.length != SECRET_BYTES:
                    raise SecAggProtocolError("share is not at the sender's point or not of a 32-byte secret", i)
                shares[j] = share
            parsed.append(shares)
        self._unmask[i] = (parsed[0], parsed[1])

    def finish(self, msgs: Iterable[UnmaskMsg | Mapping[str, Any]] = ()) -> SecAggResult:
        """Close round 4: reconstruct, unmask, decode. Needs answers from at least ``threshold`` clients."""
        for msg in msgs:
            self.add_unmask(msg)
        self._expect("unmask")
        cfg = self.config
        responders = sorted(self._unmask)
        self._check_count(len(responders), "answered the unmask request", "Unmasking")
        u2 = list(self._u2)
        dropped = list(self._dropped)
        # each secret from ``threshold`` of the shares its owner's neighbourhood revealed, unverified: the
        # commitment to b and the public key of s_sk check every rebuilt secret, and checking each further
        # share against the polynomial would cost O(t^2) per share, O(n t^3) per round
        b_shares = self._gather(0, u2, responders)
        s_shares = self._gather(1, dropped, responders)
        assert self._sum is not None
        total = self._sum.copy()
        try:
            for j in u2:
                b = shamir.recover(b_shares[j], cfg.threshold, verify=False)
                if b_commitment(cfg, j, b) != self._b_commit[j]:
                    raise SecAggProtocolError("reconstructed self-mask seed does not match its commitment", j)
                crypto.add_prg(total, b, -1)
            for j in dropped:
                s_sk = shamir.recover(s_shares[j], cfg.threshold, verify=False)
                if crypto.public_key_of(s_sk) != self._keys[j][1]:
                    raise SecAggProtocolError("reconstructed mask key does not match its public key", j)
                for i in self._local(j, self._u2_set):  # only j's surviving neighbours masked against j
                    # survivor i added +PRG(s_ij) if i < j, else -PRG(s_ij): remove it
                    crypto.add_prg(total, pairwise_seed(s_sk, self._keys[i][1], j, i, cfg), -1 if i < j else 1)
        except SecAggProtocolError as exc:  # includes ShamirError: inconsistent or corrupted shares
            raise self._abort(f"cannot remove the masks: {exc}", "Unmasking") from None
        reduce_ring(total, cfg)
        # the signed reading of the sum: for 32 and 64 bits the two's complement view itself, no copy
        q = total.view(np.int32 if cfg.ring_bits == 32 else np.int64) if cfg.ring_bits in (32, 64) \
            else from_ring(total, cfg)
        d = cfg.vector_length
        weighted_sum = np.divide(q[:d], cfg.data_scale, dtype=np.float64)
        total_weight = float(q[d]) / cfg.meta_scale
        clip_fraction = None
        if cfg.clip_bits:
            clip_fraction = (float(q[d + 1]) / cfg.meta_scale + 0.5 * len(u2)) / len(u2)
        m = len(u2)
        err_sum, err_weight = m * cfg.rounding_error, m * cfg.meta_rounding_error
        if total_weight - err_weight <= 0:
            raise self._abort(f"total weight {total_weight:g} is not positive", "Unmasking")
        mean64 = weighted_sum / total_weight
        peak = max(float(mean64.max()), -float(mean64.min())) if d else 0.0
        bound = (err_sum + peak * err_weight) / (total_weight - err_weight) + peak * 2.0**-24
        noise_std = cfg.noise_multiplier * cfg.clip * math.sqrt(m / cfg.n_expected)
        self._result = SecAggResult(
            mean=torch.from_numpy(mean64.astype(np.float32)),
            weighted_sum=torch.from_numpy(weighted_sum),
            total_weight=total_weight,
            survivors=tuple(u2),
            dropped=tuple(dropped),
            responders=tuple(responders),
            excluded=tuple(sorted(set(cfg.client_ids) - set(self._shares))),
            clip_fraction=clip_fraction,
            noise_std=noise_std,
            effective_noise_multiplier=noise_std / cfg.clip,
            error_bound=bound,
        )
        self._stage = "done"
        self._sum = None
        self._unmask.clear()
        return self._result

    def _gather(self, kind: int, owners: list[int], responders: list[int]) -> dict[int, list[shamir.Share]]:
        """The revealed shares of each owner's secret (kind 0: ``b``, 1: ``s_sk``); aborts if an owner's
        neighbourhood revealed fewer than ``threshold``."""
        gathered: dict[int, list[shamir.Share]] = {j: [] for j in owners}
        for r in responders:
            for j, share in self._unmask[r][kind].items():
                gathered[j].append(share)
        t = self.config.threshold
        for j, shares in gathered.items():
            if len(shares) < t:
                what = "self-mask seed" if kind == 0 else "mask key"
                raise self._abort(f"only {len(shares)} of client {j}'s neighbourhood revealed shares of its {what}, "
                                  f"threshold is {t}", "Unmasking")
        return gathered

    @property
    def result(self) -> SecAggResult | None:
        return self._result
