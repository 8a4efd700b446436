"""The parameters of one secure-aggregation round, shared by the coordinator and every client.

The coordinator builds a ``SecAggConfig`` for the round and sends ``config.to_wire()`` to each
selected worker with the first request; the worker rebuilds it with ``SecAggConfig.from_wire`` and
should check it against its own policy (minimum threshold, clip, noise) before taking part. Every key
derivation and every authenticated-encryption tag is bound to ``config.digest()``, so a client holding
a different configuration cannot take part by mistake: its ciphertexts fail authentication.

Encoding of a client's contribution (see docs/secagg.md, "Quantization"):

* data coordinates ``v = w * clip(x) + noise`` are mapped to integers ``q = round(v * data_scale)``
  clamped to ``[-Q, Q]`` with ``Q = (2**(ring_bits-1) - 1) // n`` and ``data_scale = min(Q, 2**52) / data_bound``,
  ``data_bound = clip + noise_bound * client_noise_std``. A sum of at most ``n`` such integers never
  leaves ``(-2**(ring_bits-1), 2**(ring_bits-1))``, so the signed reading of the ring sum is exact;
* one more coordinate carries the weight ``w`` in ``[0, 1]``, and with ``clip_bits`` one more carries
  the adaptive-clipping indicator ``1[||x|| <= clip] - 1/2`` (plus its noise), both at ``meta_scale``.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import struct
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np

from .errors import SecAggProtocolError
from .graph import NeighbourGraph, check_degree, is_complete

PROTOCOL = b"fedzmq-secagg/1"
MAX_CLIENT_ID = (1 << 32) - 2  # Shamir points are client_id + 1 < 2**32
#: the most clients a round may invite (what the messages' lists may hold, ``messages.MAX_LIST``)
MAX_CLIENTS = 1 << 16
Rounding = Literal["nearest", "stochastic"]


def default_threshold(n: int) -> int:
    """The recommended threshold for ``n`` clients: a strict majority, ``n // 2 + 1`` (at least 2)."""
    return max(2, n // 2 + 1)


@dataclass(frozen=True)
class SecAggConfig:
    """One round's parameters. All clients and the server must hold equal configurations.

    client_ids: the clients invited to the round (distinct, in ``[0, 2**32 - 2]``); ``n = len(client_ids)``.
    threshold: ``t``, the Shamir threshold and the minimum number of clients at every step
        (``2 <= t <= n``; ``default_threshold(n)``, a strict majority, is recommended). With a ``degree``
        it is per neighbourhood (``2 <= t <= degree + 1``): every client needs ``t`` of its neighbourhood
        at every step, and every secret is rebuilt from ``t`` of its owner's neighbourhood.
    vector_length: ``d``, the length of each (flat) update.
    clip: ``C``, the L2 norm bound applied to each update before anything else (required, > 0).
    ring_bits: ``k``: sums are computed in ``Z_{2**k}``, ``8 <= k <= 64`` (uint32 storage up to 32, uint64 above).
    weight_cap: the weight rule: a client of weight ``m`` (e.g. its number of samples) contributes with
        ``w = min(m, weight_cap) / weight_cap``; the result is ``sum(w_i * clip(x_i)) / sum(w_i)``. The
        default ``1.0`` with everyone passing ``weight=1`` is the unweighted mean; ``weight_cap >= max m``
        is exactly sample-weighted FedAvg; a smaller cap bounds each client's influence (DP-FedAvg).
    rounding: ``"nearest"`` (deterministic, error <= 1/(2*scale)) or ``"stochastic"`` (unbiased, error < 1/scale).
    noise_multiplier: ``sigma``; each client adds N(0, (sigma*C)**2 / expected_survivors) to its
        contribution, so the sum over ``expected_survivors`` clients carries N(0, (sigma*C)**2). 0 disables DP.
    expected_survivors: the ``n_expected`` of the noise rule; defaults to ``threshold``, the fewest clients
        a finished round can have, so the sum never carries less noise than ``sigma*C``.
    clip_bits: also aggregate the adaptive-clipping indicator bits (Andrew et al. 2021).
    clip_bit_noise: ``sigma_b``, the std of the noise on the sum of the indicator bits (distributed likewise).
    noise_bound: clamp each client's noisy coordinates at ``clip + noise_bound`` client noise stds (a
        numerical guard; at 10 stds it fires with probability < 2e-23 per coordinate).
    round_id: opaque bytes naming the round (federation id, round number); bound into every key.
    degree: SecAgg+ (Bell et al. 2020, ``fedzmq.secagg.graph``): each client shares keys, Shamir shares and
        pairwise masks only with its ``degree`` neighbours in the round's graph, and ``threshold`` is then
        the threshold of each neighbourhood (a client and its neighbours, ``degree + 1`` points). None,
        or ``n - 1`` and above, is the complete graph: Bonawitz et al. 2017 as before. Even below ``n - 1``;
        ``graph.choose_parameters(n)`` gives a degree and threshold with stated guarantees.
    graph_seed: the bytes the server draws per round (``os.urandom``) from which every client computes
        the same graph. Ignored by the complete graph.
    """

    client_ids: tuple[int, ...]
    threshold: int
    vector_length: int
    clip: float
    ring_bits: int = 32
    weight_cap: float = 1.0
    rounding: Rounding = "nearest"
    noise_multiplier: float = 0.0
    expected_survivors: int | None = None
    clip_bits: bool = False
    clip_bit_noise: float = 0.0
    noise_bound: float = 10.0
    round_id: bytes = b""
    degree: int | None = None
    graph_seed: bytes = b""
    _graph: NeighbourGraph | None = field(init=False, repr=False, compare=False, default=None)
    _digest: bytes = field(init=False, repr=False, compare=False, default=b"")
    _invited: frozenset[int] = field(init=False, repr=False, compare=False, default=frozenset())

    def __post_init__(self) -> None:
        ids = tuple(self.client_ids)
        if len(ids) > MAX_CLIENTS:  # checked first: each id below costs a daemon time and memory
            raise ValueError(f"a round may invite at most {MAX_CLIENTS} clients, not {len(ids)}")
        if any(type(i) is not int or not 0 <= i <= MAX_CLIENT_ID for i in ids):
            raise ValueError(f"client ids must be integers in [0, {MAX_CLIENT_ID}]")
        if len(set(ids)) != len(ids):
            raise ValueError("client ids must be distinct")
        object.__setattr__(self, "client_ids", tuple(sorted(ids)))
        object.__setattr__(self, "_invited", frozenset(ids))
        n = len(ids)
        if n < 2:
            raise ValueError("secure aggregation needs at least 2 clients")
        check_degree(n, self.degree)
        points = self.share_holders
        if type(self.threshold) is not int or not 2 <= self.threshold <= points:
            raise ValueError(f"threshold must be an integer in [2, {points}], got {self.threshold!r}")
        if type(self.vector_length) is not int or self.vector_length < 1:
            raise ValueError("vector_length must be a positive integer")
        for name in ("clip", "weight_cap", "noise_multiplier", "clip_bit_noise", "noise_bound"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number")
            object.__setattr__(self, name, float(value))
        if type(self.clip_bits) is not bool:
            raise ValueError("clip_bits must be a bool")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError("clip must be a positive finite number (clipping is required)")
        if type(self.ring_bits) is not int or not 8 <= self.ring_bits <= 64:
            raise ValueError("ring_bits must be an integer in [8, 64]")
        if self.per_client_bound < 1:
            raise ValueError(f"a ring of 2**{self.ring_bits} is too small for {n} clients")
        if not (math.isfinite(self.weight_cap) and self.weight_cap > 0):
            raise ValueError("weight_cap must be a positive finite number")
        if self.rounding not in ("nearest", "stochastic"):
            raise ValueError("rounding must be 'nearest' or 'stochastic'")
        for name in ("noise_multiplier", "clip_bit_noise"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0")
        if not (math.isfinite(self.noise_bound) and self.noise_bound >= 1):
            raise ValueError("noise_bound must be a finite number >= 1")
        if self.expected_survivors is None:
            object.__setattr__(self, "expected_survivors", self.threshold)
        if type(self.expected_survivors) is not int or not 1 <= self.expected_survivors <= n:
            raise ValueError(f"expected_survivors must be an integer in [1, {n}]")
        for name in ("round_id", "graph_seed"):
            value = getattr(self, name)
            if not isinstance(value, (bytes, bytearray)) or len(value) > 1024:
                raise ValueError(f"{name} must be at most 1024 bytes")
            object.__setattr__(self, name, bytes(value))
        object.__setattr__(self, "_digest", self._compute_digest())

    # ---- derived quantities

    @property
    def invited(self) -> frozenset[int]:
        """``client_ids`` as a set: asking whether a client is invited must not walk them (65,536 such
        questions about a round of 65,536 made one step take 15 s)."""
        return self._invited

    @property
    def n(self) -> int:
        return len(self.client_ids)

    @property
    def share_holders(self) -> int:
        """How many clients hold shares of one client's secrets (itself included): all ``n`` in the
        complete graph, its neighbourhood of ``degree + 1`` in SecAgg+. ``threshold`` of them rebuild one."""
        return self.n if self.complete else int(self.degree or 0) + 1

    @property
    def complete(self) -> bool:
        """Everybody is everybody's neighbour (``degree`` None or >= n - 1): Bonawitz et al. 2017."""
        return is_complete(self.n, self.degree)

    @property
    def graph(self) -> NeighbourGraph:
        """The round's graph, built on first use (an O(n log n) permutation) and kept with the config."""
        if self._graph is None:
            object.__setattr__(self, "_graph", NeighbourGraph(self.client_ids, self.degree, self.graph_seed))
        assert self._graph is not None
        return self._graph

    def neighbours(self, client_id: int) -> tuple[int, ...]:
        """The clients ``client_id`` shares keys, shares and masks with (sorted, itself excluded)."""
        return self.graph.neighbours(client_id)

    def neighbourhood(self, client_id: int) -> frozenset[int]:
        """``client_id`` and its neighbours: where its Shamir shares go (its own share stays with it)."""
        return self.graph.neighbourhood(client_id)

    @property
    def extra_coordinates(self) -> int:
        """Coordinates appended to the update: the weight, and the clip bit with ``clip_bits``."""
        return 2 if self.clip_bits else 1

    @property
    def masked_length(self) -> int:
        """Ring elements in each masked vector: ``vector_length + extra_coordinates``."""
        return self.vector_length + self.extra_coordinates

    @property
    def ring_dtype(self) -> np.dtype:
        return np.dtype("<u4") if self.ring_bits <= 32 else np.dtype("<u8")

    @property
    def ring_mask(self) -> int:
        return (1 << self.ring_bits) - 1

    @property
    def masked_bytes(self) -> int:
        return self.masked_length * self.ring_dtype.itemsize

    @property
    def per_client_bound(self) -> int:
        """``Q``: each client's integers lie in ``[-Q, Q]``, so n of them sum inside the signed ring."""
        return ((1 << (self.ring_bits - 1)) - 1) // len(self.client_ids)

    @property
    def scale_bound(self) -> int:
        """``min(Q, 2**52)``: scaled values stay where float64 holds integers exactly (matters above 53 bits)."""
        return min(self.per_client_bound, 1 << 52)

    @property
    def n_expected(self) -> int:
        """``expected_survivors``, which ``__post_init__`` has set (to ``threshold`` when not given)."""
        return self.threshold if self.expected_survivors is None else self.expected_survivors

    @property
    def client_noise_std(self) -> float:
        """Std of the Gaussian noise each client adds to each data coordinate: ``sigma*C/sqrt(n_expected)``."""
        return self.noise_multiplier * self.clip / math.sqrt(self.n_expected)

    @property
    def client_bit_noise_std(self) -> float:
        return self.clip_bit_noise / math.sqrt(self.n_expected)

    @property
    def data_bound(self) -> float:
        return self.clip + self.noise_bound * self.client_noise_std

    @property
    def meta_bound(self) -> float:
        return max(1.0, 0.5 + self.noise_bound * self.client_bit_noise_std)

    @property
    def data_scale(self) -> float:
        return self.scale_bound / self.data_bound

    @property
    def meta_scale(self) -> float:
        return self.scale_bound / self.meta_bound

    @property
    def _rounding_units(self) -> float:
        # 1/2 unit (nearest) or 1 unit (stochastic), plus the float64 error of forming v * scale
        # (|v * scale| <= scale_bound, relative error 2**-53; doubled to cover the added uniform)
        return (0.5 if self.rounding == "nearest" else 1.0) + (self.scale_bound + 1) * 2.0**-52

    @property
    def rounding_error(self) -> float:
        """Largest quantization error per client and data coordinate, before division by the total weight:
        ``(1/2 + eps) / data_scale`` (nearest) or ``(1 + eps) / data_scale`` (stochastic), where
        ``eps = (scale_bound + 1) * 2**-52`` is float64's share (2**-21 at 32 bits)."""
        return self._rounding_units / self.data_scale

    @property
    def meta_rounding_error(self) -> float:
        return self._rounding_units / self.meta_scale

    # ---- identity and wire form

    def digest(self) -> bytes:
        """SHA-256 of the canonical encoding: bound into every HKDF salt and AEAD associated data."""
        return self._digest

    def _compute_digest(self) -> bytes:
        h = hashlib.sha256(PROTOCOL)
        h.update(struct.pack(">I", len(self.client_ids)))
        h.update(b"".join(struct.pack(">I", i) for i in self.client_ids))
        h.update(struct.pack(">IQI", self.threshold, self.vector_length, self.ring_bits))
        h.update(struct.pack(">dddd", self.clip, self.weight_cap, self.noise_multiplier, self.clip_bit_noise))
        h.update(struct.pack(">dI?", self.noise_bound, self.expected_survivors, self.clip_bits))
        h.update(self.rounding.encode())
        h.update(struct.pack(">I", len(self.round_id)) + self.round_id)
        h.update(struct.pack(">I", 0 if self.degree is None else self.degree))
        h.update(struct.pack(">I", len(self.graph_seed)) + self.graph_seed)
        return h.digest()

    def to_wire(self) -> dict[str, Any]:
        """Plain msgpack-able values (string keys; ``round_id`` and ``graph_seed`` are bytes)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.init:
                value = getattr(self, f.name)
                out[f.name] = list(value) if f.name == "client_ids" else value
        return out

    @classmethod
    def from_wire(cls, data: Any) -> "SecAggConfig":
        """Rebuild and validate a configuration received from the coordinator."""
        names = {f.name for f in fields(cls) if f.init}
        if not isinstance(data, dict) or not set(data) <= names or "client_ids" not in data:
            raise SecAggProtocolError("malformed secure-aggregation configuration")
        args = dict(data)
        if not isinstance(args["client_ids"], (list, tuple)):
            raise SecAggProtocolError("client_ids must be a list")
        args["client_ids"] = tuple(args["client_ids"])
        for name in ("clip", "weight_cap", "noise_multiplier", "clip_bit_noise", "noise_bound"):
            if name in args:
                if type(args[name]) not in (int, float):
                    raise SecAggProtocolError(f"{name} must be a number")
                args[name] = float(args[name])
        try:
            return cls(**args)
        except (TypeError, ValueError) as exc:
            raise SecAggProtocolError(f"invalid secure-aggregation configuration: {exc}") from None
