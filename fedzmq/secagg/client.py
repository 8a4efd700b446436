"""The client (worker) side of secure aggregation: one ``SecAggClient`` per client per round.

The object is a small state machine, one method per round, each callable once in order::

    client = SecAggClient(client_id, config)
    adv    = client.advertise()                       # round 0 -> server
    shares = client.share_keys(keys_msg)              # round 1 -> server (ciphertexts for each peer)
    masked = client.masked_input(update, weight, routed_msg)   # round 2 -> server
    tags   = client.confirm(confirm_request)          # round 3 -> server (a tag for each survivor)
    resp   = client.unmask(unmask_request)            # round 4 -> server

It keeps, between rounds, only: its two X25519 secret keys (until it has masked its input), its
self-mask seed ``b`` (likewise), the peers' public keys, the shares it holds for its peers, and which
shares it has revealed. It never keeps the update. Everything it receives is validated; a message that
breaks the protocol raises ``SecAggProtocolError`` before any state changes, and a round that can no
longer be secure (fewer than ``threshold`` peers) raises ``SecAggAborted``.
"""

from __future__ import annotations

import hmac
import math
import os
from collections.abc import Callable, Mapping, Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import crypto, shamir
from .config import SecAggConfig
from .crypto import CsprngStream
from .encoding import (
    CIPHERTEXT_BYTES, SECRET_BYTES, b_commitment, confirm_key, confirm_tag, encode, pack_shares, pairwise_seed,
    reduce_ring, share_aad, share_key, unpack_shares, view_bytes,
)
from .errors import SecAggAborted, SecAggProtocolError
from .messages import (
    MAX_LIST, VERSION, AdvertiseMsg, ConfirmMsg, ConfirmRequestMsg, KeysMsg, MaskedMsg, RoutedSharesMsg, SharesMsg,
    UnmaskMsg, UnmaskRequestMsg,
    as_bytes, as_id, as_id_list, as_pairs, check_message,
)

_STAGES = ("new", "advertised", "shared", "masked", "confirmed", "unmasked")


@dataclass
class ClientStats:
    """What the client may log locally (never sent): its update's norm and clipping."""

    norm: float = math.nan
    clip_factor: float = math.nan
    effective_weight: float = math.nan
    clamped: int = 0


@dataclass
class _PeerKeys:
    c_pk: bytes
    s_pk: bytes


@dataclass
class _Held:
    """The shares this client holds for each peer (and itself), and what it has revealed."""

    b: dict[int, shamir.Share] = field(default_factory=dict)
    s: dict[int, shamir.Share] = field(default_factory=dict)
    revealed_b: set[int] = field(default_factory=set)
    revealed_s: set[int] = field(default_factory=set)


def _no_checkpoint() -> None:
    """No time budget: a step runs to its end."""


class SecAggClient:
    """One client's side of one secure-aggregation round (Bonawitz et al., CCS 2017, semi-honest).

    ``noise_seed`` fixes the stream of DP noise and stochastic rounding: for tests only (whoever knows
    the seed knows the noise). Masks and keys always come from ``os.urandom``.
    """

    def __init__(self, client_id: int, config: SecAggConfig, *, noise_seed: bytes | None = None,
                 checkpoint: Callable[[], None] | None = None) -> None:
        if client_id not in config.invited:
            raise ValueError(f"client {client_id} is not invited to this round")
        self.client_id = client_id
        self.config = config
        #: called before each neighbour's work in the long steps (keys, Shamir points) and each block of
        #: the encoding and the masks: a host stops a step that runs past its time budget by raising there
        #: (the worker's ``budget.check``).
        #: Steps change this client's state only at their end, so a stopped step leaves it as it was
        self._checkpoint = checkpoint or _no_checkpoint
        self.stats = ClientStats()
        self._stage = "new"
        self._stream = CsprngStream(noise_seed)
        self._c_sk, self._c_pk = crypto.generate_keypair()
        self._s_sk: bytes | None
        self._s_sk, self._s_pk = crypto.generate_keypair()
        self._b: bytes | None = os.urandom(SECRET_BYTES)
        self._peers: dict[int, _PeerKeys] = {}
        self._enc_keys: dict[int, bytes] = {}
        self._u0: list[int] = []
        self._u1: list[int] = []
        self._u1_set: frozenset[int] = frozenset()
        self._held = _Held()
        self._own_b_share: shamir.Share | None = None
        self._own_s_share: shamir.Share | None = None
        self._answer: tuple[tuple[int, ...], UnmaskMsg] | None = None
        #: per peer of U1, the key its word on the round's view comes under (``confirm_tag``)
        self._confirm_keys: dict[int, bytes] = {}
        #: the complete graph's one view of a survivor set, packed (``_view_bytes``): the set and its bytes
        self._whole_view: tuple[AbstractSet[int], bytes] | None = None
        #: the survivor set and drop-outs this client confirmed (``confirm``), and its answer
        self._view: tuple[list[int], list[int]] | None = None
        self._confirmed: ConfirmMsg | None = None

    @property
    def stage(self) -> str:
        """``new``, ``advertised``, ``shared``, ``masked``, ``confirmed`` or ``unmasked``."""
        return self._stage

    def _expect(self, *stages: str) -> None:
        if self._stage not in stages:
            raise SecAggProtocolError(f"client {self.client_id} is at stage {self._stage!r}, "
                                      f"expected {' or '.join(stages)}")

    # ---- round 0: AdvertiseKeys

    def advertise(self) -> AdvertiseMsg:
        """Round 0: the client's two public keys (``c`` to encrypt shares, ``s`` to agree on masks)."""
        self._expect("new")
        self._stage = "advertised"
        return {"v": VERSION, "type": "secagg.advertise", "from": self.client_id, "c_pk": self._c_pk,
                "s_pk": self._s_pk}

    # ---- round 1: ShareKeys

    def share_keys(self, keys_msg: KeysMsg | Mapping[str, Any]) -> SharesMsg:
        """Round 1: Shamir-share ``b`` and ``s_sk`` among U0 (the clients whose keys the server relayed)
        and encrypt each peer's pair of shares for that peer. Own shares stay here.

        With SecAgg+ (``config.degree``) the server relays only this client's neighbours' keys; a key of
        anybody else is refused, so nothing of this client's goes outside its neighbourhood."""
        self._expect("advertised")
        cfg, me = self.config, self.client_id
        msg = check_message(keys_msg, "secagg.keys", {"keys"})
        entries = as_pairs(msg["keys"], "keys", width=3)
        peers: dict[int, _PeerKeys] = {}
        hood = None if cfg.complete else cfg.neighbourhood(me)
        for cid, (c_pk, s_pk) in sorted(entries.items()):
            self._checkpoint()
            if cid not in cfg.invited:
                raise SecAggProtocolError(f"keys list names client {cid}, who is not invited")
            if hood is not None and cid not in hood:
                raise SecAggProtocolError(f"keys list names client {cid}, who is not a neighbour of client {me}")
            peers[cid] = _PeerKeys(as_bytes(c_pk, "c_pk", cid, length=32), as_bytes(s_pk, "s_pk", cid, length=32))
        if me not in peers or peers[me].c_pk != self._c_pk or peers[me].s_pk != self._s_pk:
            raise SecAggProtocolError("the relayed keys do not include this client's own keys unchanged")
        all_keys = [k for p in peers.values() for k in (p.c_pk, p.s_pk)]
        if len(set(all_keys)) != len(all_keys):
            raise SecAggProtocolError("the relayed keys repeat a public key")
        if len(peers) < cfg.threshold:
            raise SecAggAborted(f"only {len(peers)} clients of this client's neighbourhood advertised keys, "
                                f"threshold is {cfg.threshold}", "ShareKeys")
        # derive every encryption key first: a bad peer key raises before any state changes
        c_key = crypto.private_key(self._c_sk)
        enc_keys = {}
        for j, p in peers.items():
            if j != me:
                self._checkpoint()
                enc_keys[j] = share_key(c_key, p.c_pk, me, j, cfg)
        assert self._b is not None and self._s_sk is not None
        points = [j + 1 for j in peers]
        b_shares = shamir.split(self._b, cfg.threshold, points, self._checkpoint)
        s_shares = shamir.split(self._s_sk, cfg.threshold, points, self._checkpoint)
        out = []
        for j, key in enc_keys.items():
            self._checkpoint()
            plaintext = pack_shares(me, j, b_shares[j + 1], s_shares[j + 1])
            out.append([j, crypto.aead_encrypt(key, plaintext, share_aad(cfg, me, j))])
        self._peers = peers
        self._enc_keys = enc_keys  # kept for decrypting the shares routed back (no second agreement)
        self._u0 = list(peers)
        self._own_b_share, self._own_s_share = b_shares[me + 1], s_shares[me + 1]
        self._stage = "shared"
        return {"v": VERSION, "type": "secagg.shares", "from": me, "b_commit": b_commitment(cfg, me, self._b),
                "shares": out}

    # ---- round 2: MaskedInputCollection

    def masked_input(self, update: torch.Tensor, weight: float, routed: RoutedSharesMsg | Mapping[str, Any]
                     ) -> MaskedMsg:
        """Round 2: decrypt the shares routed from U1, then clip, weight, noise, quantize and mask ``update``.

        ``update`` is the flat float tensor of ``vector_length`` values (e.g. new model minus global model);
        ``weight`` the client's weight (e.g. its number of samples; see ``SecAggConfig.weight_cap``).
        ``routed`` names U1, the clients whose shares reached the server, and carries their ciphertexts
        for this client. The masked vector is ``y = q + PRG(b) + sum_{j in U1, j != i} sign(j - i) PRG(s_ij)``
        (mod ``2**ring_bits``), where ``sign(j - i)`` is +1 when ``i < j`` and -1 otherwise.
        """
        self._expect("shared")
        cfg, me = self.config, self.client_id
        msg = check_message(routed, "secagg.routed", {"to", "u1", "shares"})
        if as_id(msg["to"], "to") != me:
            raise SecAggProtocolError("routed shares are addressed to another client")
        u1 = as_id_list(msg["u1"], "u1")
        if not set(u1) <= set(self._u0):
            raise SecAggProtocolError("u1 names clients that did not advertise keys")
        if me not in u1:
            raise SecAggProtocolError("u1 does not include this client, which sent its shares")
        if len(u1) < cfg.threshold:
            raise SecAggAborted(f"only {len(u1)} clients shared keys, threshold is {cfg.threshold}", "MaskedInput")
        received = as_pairs(msg["shares"], "shares")
        if set(received) != set(u1) - {me}:
            raise SecAggProtocolError("routed ciphertexts do not match u1")
        x, coefficient, meta = self._prepare_update(update, weight)  # checks the update before any state changes
        held_b: dict[int, shamir.Share] = {}
        held_s: dict[int, shamir.Share] = {}
        for j, (blob,) in received.items():
            self._checkpoint()
            blob = as_bytes(blob, "ciphertext", j, length=CIPHERTEXT_BYTES)
            plaintext = crypto.aead_decrypt(self._enc_keys[j], blob, share_aad(cfg, j, me), j)
            held_b[j], held_s[j] = unpack_shares(plaintext, j, me)
        assert self._own_b_share is not None and self._own_s_share is not None
        held_b[me], held_s[me] = self._own_b_share, self._own_s_share
        assert self._s_sk is not None
        s_key = crypto.private_key(self._s_sk)
        seeds = {}
        for j in u1:
            if j != me:
                self._checkpoint()
                seeds[j] = pairwise_seed(s_key, self._peers[j].s_pk, me, j, cfg)
        confirm_keys = {j: confirm_key(self._enc_keys[j], me, j, cfg) for j in u1 if j != me}

        # w * clip(x) + noise, quantized into the ring, then masked
        y, self.stats.clamped = encode(x, coefficient, meta, cfg, self._stream, self._checkpoint)
        del x
        assert self._b is not None
        crypto.add_prg(y, self._b, checkpoint=self._checkpoint)
        for j, seed in seeds.items():  # + PRG(s_ij) toward higher ids, - toward lower: they cancel in the sum
            crypto.add_prg(y, seed, 1 if me < j else -1, self._checkpoint)
        reduce_ring(y, cfg)

        self._held.b, self._held.s = held_b, held_s
        self._u1, self._u1_set = u1, frozenset(u1)
        self._confirm_keys = confirm_keys
        # the secrets are no longer needed by this client: drop them (Python cannot wipe memory, but no
        # reference survives the round)
        self._s_sk = None
        self._b = None
        self._c_sk = b""
        self._enc_keys = {}
        self._stage = "masked"
        # the vector's own bytes, not a copy of them: a million ring elements per client per round
        return {"v": VERSION, "type": "secagg.masked", "from": me, "masked": y.data.cast("B")}

    # ---- round 3: ConsistencyCheck

    def confirm(self, request: ConfirmRequestMsg | Mapping[str, Any]) -> ConfirmMsg:
        """Round 3: commit to the survivor set the server shows this client, and tell each survivor of
        its neighbourhood, under the key only the two of them share, which U1 and U2 this client holds
        (within their two neighbourhoods). ``unmask`` reveals shares only for this same view, and only
        when ``threshold - 1`` survivors confirm it: a coordinator that showed clients different U1s or
        U2s (to get one client's self-mask from some and its partners' keys from others) cannot make
        ``threshold`` clients reveal for two views, as two disjoint sets of a strict majority do not
        exist. Repeating the identical request returns the identical answer; another is refused."""
        self._expect("masked", "confirmed")
        msg = check_message(request, "secagg.confirm_request", {"u2", "dropped"})
        u2, dropped = self._checked_view(msg)
        if self._view is not None:
            if self._view != (u2, dropped):
                raise SecAggProtocolError("already confirmed a different survivor set")
            assert self._confirmed is not None
            return self._confirmed
        me = self.client_id
        survivors = set(u2)
        tags = []
        for j in u2:
            if j != me:
                self._checkpoint()
                tags.append([j, confirm_tag(self._confirm_keys[j], self.config, me, j, self._view_bytes(j, survivors))])
        self._view = (u2, dropped)
        self._confirmed = {"v": VERSION, "type": "secagg.confirm", "from": me, "tags": tags}
        self._stage = "confirmed"
        return self._confirmed

    def _checked_view(self, msg: Mapping[str, Any]) -> tuple[list[int], list[int]]:
        """A request's ``u2`` and ``dropped``, after checking them against what this client knows."""
        me, cfg = self.client_id, self.config
        u2 = as_id_list(msg["u2"], "u2")
        dropped = as_id_list(msg["dropped"], "dropped")
        both = sorted((set(u2) & set(dropped)) | (set(u2) & self._held.revealed_s)
                      | (set(dropped) & self._held.revealed_b))
        if both:
            raise SecAggProtocolError(
                f"refusing to reveal both the self-mask share and the key share of clients {both}")
        if not set(u2) <= set(self._u1):
            raise SecAggProtocolError("u2 names clients outside u1")
        if set(dropped) != set(self._u1) - set(u2):
            raise SecAggProtocolError("dropped must be exactly u1 minus u2")
        if me not in u2:
            raise SecAggProtocolError("u2 omits this client, which sent its masked input")
        if len(u2) < cfg.threshold:
            raise SecAggAborted(f"only {len(u2)} clients sent masked inputs, threshold is {cfg.threshold}", "Unmasking")
        return sorted(u2), sorted(dropped)

    def _view_bytes(self, peer: int, u2: AbstractSet[int]) -> bytes:
        """This client's U1 and U2 within ``peer``'s neighbourhood too (``view_bytes``): what ``peer``
        holds of them as well, in an honest round (all of them with the complete graph, packed once per
        ``u2`` and kept). Per peer with SecAgg+: the intersections walk the neighbourhood (k + 1 ids),
        not U1 and U2 (up to n each)."""
        if self.config.complete:
            cached = self._whole_view
            if cached is None or cached[0] is not u2:
                cached = self._whole_view = (u2, view_bytes(self._u1_set, u2))
            return cached[1]
        hood = self.config.neighbourhood(peer)
        return view_bytes(hood & self._u1_set, hood & u2)

    def _confirmations(self, entries: Any, u2: list[int]) -> int:
        """How many survivors other than this client confirm, each under the key it shares with this
        client, the very U1 and U2 this client committed to (within their two neighbourhoods).
        ``entries`` are ``[from, to, tag]``; those addressed to others are skipped."""
        if not isinstance(entries, list) or len(entries) > MAX_LIST:
            raise SecAggProtocolError("confirm must be a list of [from, to, tag]")
        me, survivors, confirmed, seen = self.client_id, set(u2), set(), set()
        for entry in entries:
            self._checkpoint()
            if not isinstance(entry, (list, tuple)) or len(entry) != 3:
                raise SecAggProtocolError("confirm must be a list of [from, to, tag]")
            sender, receiver = as_id(entry[0], "confirm"), as_id(entry[1], "confirm")
            key = self._confirm_keys.get(sender)
            if receiver != me or sender not in survivors or key is None or sender in seen:
                continue  # one tag a sender, right or wrong: a wrong one repeated was checked every time
            seen.add(sender)
            tag = as_bytes(entry[2], "confirm tag", sender, length=32)
            if hmac.compare_digest(tag, confirm_tag(key, self.config, sender, me, self._view_bytes(sender, survivors))):
                confirmed.add(sender)
        return len(confirmed)

    def _prepare_update(self, update: torch.Tensor, weight: float) -> tuple[np.ndarray, float, np.ndarray]:
        """Check the update and weight; return ``x``, the coefficient ``w * clip factor``, and the meta
        coordinates ``[w, (1[||x|| <= C] - 1/2 + noise)]``. ``encode`` makes the ring vector of them."""
        cfg = self.config
        if not isinstance(update, torch.Tensor) or not update.is_floating_point():
            raise TypeError("update must be a floating-point tensor")
        if update.numel() != cfg.vector_length:
            raise ValueError(f"update has {update.numel()} values, the round expects {cfg.vector_length}")
        if type(weight) not in (int, float) and not isinstance(weight, (np.integer, np.floating)):
            raise TypeError("weight must be a number")
        weight = float(weight)
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError("weight must be a finite number >= 0")
        flat = update.detach().reshape(-1).cpu()
        if flat.dtype not in (torch.float32, torch.float64, torch.float16):  # what numpy cannot view
            flat = flat.to(torch.float64)
        # torch's norm, not numpy's: numpy's BLAS threads busy-wait after the call and double the
        # CPU a worker spends on a secure round. Accumulated in float64 without a float64 copy.
        norm = float(torch.linalg.vector_norm(flat, dtype=torch.float64))
        if not math.isfinite(norm):
            raise ValueError("update has non-finite values")
        factor = min(1.0, cfg.clip / norm) if norm > 0 else 1.0
        w = min(weight, cfg.weight_cap) / cfg.weight_cap
        self.stats.norm, self.stats.clip_factor, self.stats.effective_weight = norm, factor, w
        meta = [w]
        if cfg.clip_bits:
            bit = 1.0 if norm <= cfg.clip else 0.0
            noise = cfg.client_bit_noise_std * self._stream.normal(1)[0] if cfg.clip_bit_noise else 0.0
            meta.append(bit - 0.5 + noise)
        return flat.numpy(), factor * w, np.array(meta, dtype=np.float64)

    # ---- round 4: Unmasking

    def unmask(self, request: UnmaskRequestMsg | Mapping[str, Any]) -> UnmaskMsg:
        """Round 4: reveal this client's share of ``b_j`` for each survivor j in U2 and its share of
        ``s_j``'s secret key for each dropped j in U1 minus U2 — never both for one client.

        The request must name the survivor set this client committed to in ``confirm``, and carry
        ``threshold - 1`` valid tags of other survivors on that same view; the checks of ``confirm`` hold
        again (and no answer reveals both kinds of share of one client). Repeating the identical request
        returns the identical answer (a lost reply can be re-requested).
        """
        self._expect("confirmed", "unmasked")
        cfg, me = self.config, self.client_id
        msg = check_message(request, "secagg.unmask_request", {"u2", "dropped", "confirm"})
        u2, dropped = self._checked_view(msg)
        if (u2, dropped) != self._view:
            raise SecAggProtocolError("the unmask request's survivor set is not the one this client confirmed")
        confirmed = self._confirmations(msg["confirm"], u2)
        if confirmed + 1 < cfg.threshold:
            raise SecAggAborted(f"only {confirmed} other survivors confirmed the survivor set this client "
                                f"confirmed, threshold is {cfg.threshold}", "Unmasking")
        if self._answer is not None:
            return self._answer[1]
        answer: UnmaskMsg = {
            "v": VERSION, "type": "secagg.unmask", "from": me,
            "b_shares": [[j, self._held.b[j].to_bytes()] for j in u2],
            "s_shares": [[j, self._held.s[j].to_bytes()] for j in dropped],
        }
        self._held.revealed_b |= set(u2)
        self._held.revealed_s |= set(dropped)
        self._answer = (tuple(u2), answer)
        self._stage = "unmasked"
        return answer
