"""Fixed-point encoding of real vectors into the ring ``Z_{2**k}``, and the key derivations of the protocol.

Quantization (client side): ``q = clamp(round(v * scale), -Q, Q)`` as int64, then reduced mod ``2**k``
(two's complement) into uint32/uint64 ring elements. Decoding (server side) reads the ring sum as a
signed integer in ``[-2**(k-1), 2**(k-1))`` and divides by the scale. Because every client's integers are
bounded by ``Q = (2**(k-1) - 1) // n``, the sum of at most ``n`` of them is read back exactly; the only
error is each client's rounding, ``<= 1/(2*scale)`` (nearest) or ``< 1/scale`` (stochastic, unbiased).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable, Iterable

import numpy as np

from . import crypto
from .config import SecAggConfig
from .crypto import CsprngStream
from .errors import SecAggProtocolError
from .shamir import Share

SECRET_BYTES = 32
SHARE_BYTES = 6 + 3 * 16  # Share.to_bytes() of a 32-byte secret
_PAIR = struct.Struct(">II")
PLAINTEXT_BYTES = _PAIR.size + 2 * SHARE_BYTES
CIPHERTEXT_BYTES = crypto.NONCE_BYTES + PLAINTEXT_BYTES + crypto.TAG_BYTES


# --------------------------------------------------------------------------------------------------
# quantization


def quantize(values: np.ndarray, scale: float, bound: int, rounding: str, stream: CsprngStream | None = None
             ) -> tuple[np.ndarray, int]:
    """``clamp(round(values * scale), -bound, bound)`` as int64, and how many values were clamped."""
    scaled = np.multiply(values, scale, dtype=np.float64)
    clamped = round_and_clamp(scaled, scale=1.0, bound=bound, rounding=rounding, stream=stream)
    out = scaled.astype(np.int64)
    np.clip(out, -bound, bound, out=out)  # float(bound) may round up past bound when bound > 2**53
    return out, clamped


def round_and_clamp(values: np.ndarray, *, scale: float, bound: int, rounding: str,
                    stream: CsprngStream | None = None) -> int:
    """In place: ``values = clamp(round(values * scale), -bound, bound)`` (float64), in as few passes over
    the memory as numpy allows (a million coordinates per client per round). Returns how many were clamped."""
    if values.dtype != np.float64:
        raise TypeError("round_and_clamp works on float64 in place")
    if scale != 1.0:
        values *= scale
    if rounding == "nearest":
        np.rint(values, out=values)
    elif rounding == "stochastic":
        if stream is None:
            raise ValueError("stochastic rounding needs a CsprngStream")
        values += stream.uniform(values.size)
        np.floor(values, out=values)
    else:
        raise ValueError(f"unknown rounding {rounding!r}")
    if not values.size or (values.min() >= -bound and values.max() <= bound):
        return 0  # the common case: nothing to clamp (two read-only passes instead of three)
    clamped = int(np.count_nonzero(np.abs(values) > bound))
    np.clip(values, -bound, bound, out=values)
    return clamped


#: coordinates per step of ``encode``: its float64 scratch (512 KiB) stays in the CPU's cache
ENCODE_BLOCK = 1 << 16


def encode(x: np.ndarray, coefficient: float, meta: np.ndarray, config: SecAggConfig,
           stream: CsprngStream | None = None, checkpoint: Callable[[], None] | None = None
           ) -> tuple[np.ndarray, int]:
    """A client's ring vector: ``coefficient * x + noise`` at ``data_scale`` followed by ``meta`` at
    ``meta_scale``, each rounded, clamped to the per-client bound and reduced into the ring; and how
    many coordinates were clamped.

    Block by block through one small float64 scratch, so no float64 copy of the whole update is ever
    made (the update has a million coordinates per client per round, and every pass over memory and
    every fresh page costs). The noise (``config.client_noise_std``) and the stochastic rounding draw from
    ``stream``. ``checkpoint`` is called before each block: a host stops the encoding of a big model there
    by raising (with DP noise a block takes about 2-3 ms).
    """
    d = x.size
    if d != config.vector_length or meta.size != config.masked_length - d:
        raise ValueError("x and meta do not have the round's lengths")
    y = np.empty(config.masked_length, dtype=config.ring_dtype)
    scratch = np.empty(min(max(d, 1), ENCODE_BLOCK), dtype=np.float64)
    clamped = 0
    for start in range(0, d, ENCODE_BLOCK):
        if checkpoint is not None:
            checkpoint()
        part = scratch[:min(ENCODE_BLOCK, d - start)]
        np.multiply(x[start:start + part.size], coefficient, out=part, dtype=np.float64)  # in float64, like the bound
        if config.client_noise_std > 0:
            if stream is None:
                raise ValueError("noise needs a CsprngStream")
            part += config.client_noise_std * stream.normal(part.size)
        clamped += round_and_clamp(part, scale=config.data_scale, bound=config.per_client_bound,
                                   rounding=config.rounding, stream=stream)
        y[start:start + part.size] = to_ring(part, config)
    tail = np.array(meta, dtype=np.float64)
    clamped += round_and_clamp(tail, scale=config.meta_scale, bound=config.per_client_bound,
                               rounding=config.rounding, stream=stream)
    y[d:] = to_ring(tail, config)
    return y, clamped


def to_ring(q: np.ndarray, config: SecAggConfig) -> np.ndarray:
    """Signed integers (any integer dtype, or integral float64 within the per-client bound) to ring
    elements: two's complement, reduced mod ``2**ring_bits``."""
    q = np.asarray(q)
    if config.ring_bits <= 32 and q.dtype == np.float64:
        # rounded and clamped to the per-client bound, so |q| < 2**31: one pass, and int32's two's
        # complement is already the residue mod 2**32
        ring = q.astype(np.int32).view(np.uint32)
    else:
        ints = np.ascontiguousarray(q, dtype=np.int64)
        if q.dtype.kind == "f":  # float(bound) may round up past bound when bound > 2**53
            ints = np.clip(ints, -config.per_client_bound, config.per_client_bound)
        ring = ints.view(np.uint64).astype(config.ring_dtype)  # keeps the low bits
    return reduce_ring(ring, config)


def from_ring(ring: np.ndarray, config: SecAggConfig) -> np.ndarray:
    """Ring elements (any representative) to signed int64 in ``[-2**(k-1), 2**(k-1))``."""
    k = config.ring_bits
    if k == 64:
        return ring.astype(np.uint64).view(np.int64).copy()
    if k == 32:
        return ring.astype(np.uint32).view(np.int32).astype(np.int64)
    v = (ring.astype(np.uint64) & np.uint64(config.ring_mask)).astype(np.int64)
    v[v >= (1 << (k - 1))] -= 1 << k
    return v


def reduce_ring(ring: np.ndarray, config: SecAggConfig) -> np.ndarray:
    """Reduce in place mod ``2**ring_bits`` (a no-op for 32 and 64 bits, which wrap natively)."""
    if config.ring_bits not in (32, 64):
        ring &= ring.dtype.type(config.ring_mask)
    return ring


# --------------------------------------------------------------------------------------------------
# key derivations: every one is salted with the configuration's digest


def _info(label: bytes, a: int, b: int) -> bytes:
    return b"fedzmq-secagg/1 " + label + _PAIR.pack(min(a, b), max(a, b))


def share_key(c_sk: bytes | crypto.X25519PrivateKey, peer_c_pk: bytes, me: int, peer: int,
              config: SecAggConfig) -> bytes:
    """The AES-256-GCM key shared by ``me`` and ``peer`` for the encrypted shares (same both ways)."""
    secret = crypto.agree(c_sk, peer_c_pk, peer)
    return crypto.hkdf(secret, salt=config.digest(), info=_info(b"share-encryption", me, peer))


def confirm_key(shared: bytes, me: int, peer: int, config: SecAggConfig) -> bytes:
    """The key ``me`` and ``peer`` confirm their views of the round under (same both ways), derived from
    the key of their encrypted shares for this one use."""
    return crypto.hkdf(shared, salt=config.digest(), info=_info(b"view-confirmation", me, peer))


def view_bytes(u1: Iterable[int], u2: Iterable[int]) -> bytes:
    """A view (U1 and U2) as a confirmation tag covers it: both sorted, packed. Made once per view, not
    per peer: with the complete graph every peer's is the same, and sorting it per peer made a round of
    n clients cost n sorts of n (a red team's 65,536 repeated entries ran 9 s under a 4 s budget)."""
    message = b""
    for ids in (sorted(u1), sorted(u2)):
        message += struct.pack(f">I{len(ids)}I", len(ids), *ids)
    return message


def confirm_tag(key: bytes, config: SecAggConfig, sender: int, receiver: int, view: bytes) -> bytes:
    """``sender``'s word to ``receiver``, under their ``confirm_key``, on the U1 it masked with and the
    U2 it was told survived (both within their two neighbourhoods, ``view_bytes``): the coordinator,
    which relays it, cannot make one for a view it did not show ``sender``."""
    return hmac.new(key, config.digest() + _PAIR.pack(sender, receiver) + view, hashlib.sha256).digest()


def share_aad(config: SecAggConfig, sender: int, receiver: int) -> bytes:
    return config.digest() + _PAIR.pack(sender, receiver)


def pairwise_seed(s_sk: bytes | crypto.X25519PrivateKey, peer_s_pk: bytes, me: int, peer: int,
                  config: SecAggConfig) -> bytes:
    """``s_{me,peer}``: the seed of the pairwise mask between ``me`` and ``peer`` (same both ways)."""
    secret = crypto.agree(s_sk, peer_s_pk, peer)
    return crypto.hkdf(secret, salt=config.digest(), info=_info(b"pairwise-mask", me, peer))


def b_commitment(config: SecAggConfig, client: int, b: bytes) -> bytes:
    """A hiding, binding commitment to the self-mask seed (``b`` is 256 random bits): lets the server
    check the seed it reconstructs."""
    return hashlib.sha256(b"fedzmq-secagg/1 b-commit" + config.digest() + struct.pack(">I", client) + b).digest()


def pack_shares(sender: int, receiver: int, b_share: Share, s_share: Share) -> bytes:
    return _PAIR.pack(sender, receiver) + b_share.to_bytes() + s_share.to_bytes()


def unpack_shares(plaintext: bytes, sender: int, receiver: int) -> tuple[Share, Share]:
    if len(plaintext) != PLAINTEXT_BYTES or _PAIR.unpack_from(plaintext) != (sender, receiver):
        raise SecAggProtocolError("share plaintext does not name this sender and receiver", sender)
    b = Share.from_bytes(plaintext[_PAIR.size:_PAIR.size + SHARE_BYTES], sender)
    s = Share.from_bytes(plaintext[_PAIR.size + SHARE_BYTES:], sender)
    for share in (b, s):
        if share.x != receiver + 1 or share.length != SECRET_BYTES:
            raise SecAggProtocolError("share is not for this receiver", sender)
    return b, s
