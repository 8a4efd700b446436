"""Cryptographic building blocks, all from ``cryptography`` (OpenSSL) and the OS's CSPRNG.

* X25519 key pairs and key agreement (RFC 7748);
* HKDF-SHA256 key derivation (RFC 5869), always with a salt that binds the round's configuration;
* AES-256-GCM authenticated encryption with a random 96-bit nonce;
* a pseudo-random generator for masks: the AES-256-CTR keystream under a 32-byte seed, viewed as a
  vector of ring elements (uint32 or uint64, little-endian) without copying;
* ``CsprngStream``: uniform and Gaussian float64 samples drawn from an AES-CTR keystream under a
  fresh ``os.urandom`` key (or a fixed seed, for reproducible tests only). Neither ``random`` nor
  torch's or numpy's generators are used anywhere in this package.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import SecAggProtocolError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_ZERO_IV = bytes(16)
_CHUNK = 1 << 26  # keystream bytes per OpenSSL call
_BLOCK = 1 << 18  # keystream bytes per step of add_prg: small enough to stay in the CPU's cache


# --------------------------------------------------------------------------------------------------
# X25519


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes: ``(secret_key, public_key)``, 32 bytes each."""
    sk = X25519PrivateKey.generate()
    return sk.private_bytes_raw(), sk.public_key().public_bytes_raw()


def public_key_of(secret_key: bytes) -> bytes:
    """The raw public key of a raw X25519 secret key."""
    return X25519PrivateKey.from_private_bytes(bytes(secret_key)).public_key().public_bytes_raw()


def private_key(secret_key: bytes) -> X25519PrivateKey:
    """The key object of a raw secret key: loading costs as much as one agreement, so a client that
    agrees with each of its neighbours loads its key once."""
    return X25519PrivateKey.from_private_bytes(bytes(secret_key))


def agree(secret_key: bytes | X25519PrivateKey, public_key: bytes, peer: int | None = None) -> bytes:
    """Raw X25519 shared secret. A malformed or low-order public key raises ``SecAggProtocolError``."""
    if len(public_key) != KEY_BYTES:
        raise SecAggProtocolError("public key must be 32 bytes", peer)
    key = secret_key if isinstance(secret_key, X25519PrivateKey) else private_key(secret_key)
    try:
        return key.exchange(
            X25519PublicKey.from_public_bytes(bytes(public_key)))
    except ValueError as exc:  # all-zero shared secret: a low-order point
        raise SecAggProtocolError(f"unusable X25519 public key ({exc})", peer) from None


def hkdf(ikm: bytes, *, salt: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 (extract-then-expand)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


# --------------------------------------------------------------------------------------------------
# authenticated encryption


def aead_encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: ``nonce (12 bytes) || ciphertext || tag (16 bytes)``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def aead_decrypt(key: bytes, blob: bytes, aad: bytes, peer: int | None = None) -> bytes:
    """Inverse of ``aead_encrypt``; any tampering (or a wrong key or context) raises ``SecAggProtocolError``."""
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise SecAggProtocolError("ciphertext too short", peer)
    try:
        return AESGCM(key).decrypt(bytes(blob[:NONCE_BYTES]), bytes(blob[NONCE_BYTES:]), aad)
    except InvalidTag:
        raise SecAggProtocolError("ciphertext failed authentication (tampered, or another round/key)", peer) from None


# --------------------------------------------------------------------------------------------------
# keystreams


def _keystream(encryptor, nbytes: int) -> np.ndarray:
    """The next ``nbytes`` keystream bytes (CTR mode encrypting zeros), written straight into a fresh,
    aligned array (``update_into`` wants 15 spare bytes past the output, hence the padding)."""
    raw = np.empty(nbytes + 16, dtype=np.uint8)
    view = raw.data
    zeros = bytes(min(nbytes, _CHUNK))
    done = 0
    while done < nbytes:
        step = min(_CHUNK, nbytes - done)
        done += encryptor.update_into(zeros if step == len(zeros) else zeros[:step], view[done:done + step + 15])
    return raw[:nbytes]


def prg(seed: bytes, length: int, dtype: np.dtype | type = np.uint32) -> np.ndarray:
    """``length`` pseudo-random ring elements of ``dtype`` (uint32 or uint64) expanded from a 32-byte seed.

    The AES-256-CTR keystream with the seed as key and a zero counter block, viewed (no copy) as
    little-endian unsigned integers. Every seed in this package is either fresh randomness or an HKDF
    output bound to one (round, pair), and keys exactly one stream, so the fixed IV never repeats under
    one key.
    """
    if len(seed) != KEY_BYTES:
        raise ValueError("PRG seeds are 32 bytes")
    dtype = np.dtype(dtype).newbyteorder("<")
    encryptor = Cipher(algorithms.AES(bytes(seed)), modes.CTR(_ZERO_IV)).encryptor()
    return _keystream(encryptor, length * dtype.itemsize).view(dtype)


def add_prg(target: np.ndarray, seed: bytes, sign: int = 1, checkpoint: Callable[[], None] | None = None) -> None:
    """``target += sign * prg(seed, target.size, target.dtype)`` in the ring, in place.

    The same keystream as ``prg``, made and added block by block: each block is still in the CPU's cache
    when it is added, and no mask-sized array is ever allocated. A client adds one mask per peer plus its
    self-mask to a vector of a million ring elements every round, so this is most of its masking cost.
    ``checkpoint`` is called before each block: a host stops a mask over a big model there by raising.
    """
    if len(seed) != KEY_BYTES:
        raise ValueError("PRG seeds are 32 bytes")
    if sign not in (1, -1):
        raise ValueError("sign is 1 or -1")
    if target.ndim != 1 or not target.flags.c_contiguous or target.dtype not in (np.uint32, np.uint64):
        raise ValueError("add_prg works on a contiguous 1-D uint32 or uint64 array")
    dtype = target.dtype.newbyteorder("<")
    per_block = _BLOCK // dtype.itemsize
    encryptor = Cipher(algorithms.AES(bytes(seed)), modes.CTR(_ZERO_IV)).encryptor()
    scratch = np.empty(_BLOCK + 16, dtype=np.uint8)  # update_into wants 15 spare bytes past the output
    view = scratch.data
    zeros = bytes(_BLOCK)
    combine = np.add if sign > 0 else np.subtract
    for start in range(0, target.size, per_block):
        if checkpoint is not None:
            checkpoint()
        part = target[start:start + per_block]
        nbytes = part.size * dtype.itemsize
        encryptor.update_into(zeros if nbytes == _BLOCK else zeros[:nbytes], view[:nbytes + 15])
        combine(part, scratch[:nbytes].view(dtype), out=part)


class CsprngStream:
    """Uniform and Gaussian float64 samples from an AES-256-CTR keystream.

    ``seed=None`` (the default, and the only choice for real use) takes a fresh key from ``os.urandom``.
    A fixed 32-byte ``seed`` makes the stream reproducible: for tests and benchmarks only, since anyone
    who knows the seed knows the noise.
    """

    def __init__(self, seed: bytes | None = None) -> None:
        key = os.urandom(KEY_BYTES) if seed is None else bytes(seed)
        if len(key) != KEY_BYTES:
            raise ValueError("CsprngStream seeds are 32 bytes")
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_IV)).encryptor()

    def words(self, n: int) -> np.ndarray:
        """``n`` uniform uint64 values."""
        return _keystream(self._encryptor, 8 * n).view("<u8")

    def uniform(self, n: int) -> np.ndarray:
        """``n`` floats uniform on [0, 1), multiples of 2**-53."""
        return (self.words(n) >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def normal(self, n: int) -> np.ndarray:
        """``n`` standard normal floats (Box-Muller on 53-bit uniforms).

        Floating-point samplers are not bit-exact Gaussians (cf. Mironov, CCS 2012); at the noise
        levels used here the deviation is far below the quantization step of the ring encoding.
        """
        pairs = (n + 1) // 2
        w = self.words(2 * pairs) >> np.uint64(11)
        u1 = (w[:pairs].astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]: log is finite
        u2 = w[pairs:].astype(np.float64) * 2.0**-53
        r = np.sqrt(-2.0 * np.log(u1))
        theta = 2.0 * np.pi * u2
        out = np.empty(2 * pairs, dtype=np.float64)
        np.multiply(r, np.cos(theta), out=out[:pairs])
        np.multiply(r, np.sin(theta), out=out[pairs:])
        return out[:n]
