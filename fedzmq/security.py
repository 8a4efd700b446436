"""Keys and authentication: CurveZMQ for encryption, ZAP for deciding who may connect.

A daemon with a secret key encrypts all traffic (CurveZMQ) and, through a ZAP authenticator on its
own event loop, accepts only clients whose public key is in its allowed-keys folder (ZeroMQ's
certificate files, as written by ``fedzmq keygen``). Clients without a key, or with an unknown one,
never complete the handshake: no message of theirs reaches the worker. Denials are logged and counted.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Union
from urllib.parse import urlsplit

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from .errors import FedzmqError

log = logging.getLogger("fedzmq.security")

KeyPath = Union[str, os.PathLike[str]]
ZAP_DOMAIN = "fedzmq"


class SecurityError(FedzmqError):
    """Keys are missing, unreadable, or the configuration is unsafe."""


def generate_keypair(directory: KeyPath, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public, share it) and ``NAME.key_secret`` (keep it) in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


@dataclass(frozen=True)
class Provisioned:
    """Keys made on the fly for local daemons and one coordinator (demos, launcher, tests)."""

    servers: dict[str, tuple[Path, Path]]  # daemon id -> (public, secret)
    client: tuple[Path, Path]
    allowed_dir: Path

    def daemon_args(self, daemon_id: str) -> list[str]:
        return ["--secret-key", str(self.servers[daemon_id][1]), "--allowed-keys", str(self.allowed_dir)]

    def connect_kwargs(self, daemon_id: str) -> dict[str, Path]:
        return {"server_key": self.servers[daemon_id][0], "client_key": self.client[1]}


def provision_keys(directory: KeyPath, daemon_ids: list[str], client_name: str = "coordinator") -> Provisioned:
    """A key pair per daemon and one for the coordinator, whose public key every daemon allows."""
    directory = Path(directory)
    servers = {i: generate_keypair(directory / "daemons", i) for i in daemon_ids}
    client = generate_keypair(directory / "clients", client_name)
    allowed = directory / "allowed"
    allowed.mkdir(parents=True, exist_ok=True)
    shutil.copy(client[0], allowed / client[0].name)
    return Provisioned(servers, client, allowed)


def _require_file(path: KeyPath | bytes, what: str) -> None:
    """Say a key file is missing as such: pyzmq reads a missing file as "Invalid certificate file",
    which sent a newcomer with a typo in the path looking for a corrupt key."""
    if not Path(os.fsdecode(path)).is_file():
        raise SecurityError(f"no file at {os.fsdecode(path)!r} ({what}); check the path, or write a key pair "
                            "with 'fedzmq keygen NAME --dir DIR'")


def load_keypair(secret_file: KeyPath) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file."""
    _require_file(secret_file, "a .key_secret file was expected")
    try:
        public, secret = zmq.auth.load_certificate(str(secret_file))
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read the key pair in {secret_file}: {exc}") from None
    if not secret:
        raise SecurityError(f"{secret_file} holds no secret key (pass the .key_secret file)")
    return public, secret


def load_public_key(key: KeyPath | bytes) -> bytes:
    """A public key given as z85 bytes (40 characters) or as a public ``.key`` file (never a secret one)."""
    if isinstance(key, bytes) and len(key) == 40:
        return key
    _require_file(key, "a public .key file was expected")
    try:
        public, secret = zmq.auth.load_certificate(os.fsdecode(key))
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read a public key from {key!r}: {exc}") from None
    if secret:
        raise SecurityError(_secret_file_refusal(Path(os.fsdecode(key))))
    return public


def _secret_file_refusal(path: Path) -> str:
    """Why a secret key file is refused where a public key is asked for: it would work (the file holds the
    public key too), and so hide that a secret left the machine it belongs to."""
    public_name = path.name.removesuffix("_secret")
    owner = public_name.removesuffix(".key")
    return (f"{path} holds a secret key, which must stay on the machine it belongs to; pass {owner}'s public "
            f".key file instead ({public_name}, written beside it by 'fedzmq keygen')")


def load_allowed_keys(directory: KeyPath) -> set[bytes]:
    """Every key of the folder, for a daemon starting: one that cannot be read stops it (``SecurityError``)."""
    keys, problems = read_allowed_keys(directory)
    if problems:
        raise SecurityError(problems[0])
    return keys


def read_allowed_keys(directory: KeyPath) -> tuple[set[bytes], list[str]]:
    """The public keys of the folder's readable ``.key`` files, and why each other file (or the folder) was
    left out. A reload uses this: a broken file must not keep a key the owner took out (fail closed)."""
    directory = Path(directory)
    if not directory.is_dir():
        return set(), [f"allowed-keys folder {directory} does not exist"]
    keys: set[bytes] = set()
    problems: list[str] = []
    for path in sorted(directory.glob("*.key")):
        try:
            keys.add(load_public_key(path))
        except SecurityError as exc:
            problems.append(str(exc))
    return keys, problems


def address_problem(address: str) -> str | None:
    """Why ``address`` is not a plain ``scheme://host:port`` (or inproc/ipc name), or None. Anything else
    (user info, a path, a query, a source address) is where libzmq and a URL parser may disagree on
    which interface is meant."""
    parts = urlsplit(address)
    if parts.scheme in ("inproc", "ipc"):
        return None
    if parts.scheme != "tcp":
        return f"{address!r}: only tcp://HOST:PORT, ipc:// and inproc:// addresses are served"
    if "@" in parts.netloc or ";" in parts.netloc or parts.path or parts.query or parts.fragment:
        return f"{address!r} is not a plain tcp://HOST:PORT address"
    return None


def is_loopback_address(address: str) -> bool:
    """True for inproc/ipc and tcp on a loopback host; a tcp wildcard or any other host is not. Decide
    on the endpoint libzmq actually bound (``LAST_ENDPOINT``), not on what was asked for."""
    parts = urlsplit(address)
    if parts.scheme in ("inproc", "ipc"):
        return True
    host = (parts.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class KeyGate:
    """The ZAP side of a daemon: which client keys may connect, reloadable, with counters."""

    def __init__(self, context: zmq.asyncio.Context, allowed_dir: KeyPath) -> None:
        self.allowed_dir = Path(allowed_dir)
        self.allowed = load_allowed_keys(self.allowed_dir)
        self.denied = 0
        self.accepted = 0
        self._authenticator = AsyncioAuthenticator(context, log=logging.getLogger("fedzmq.zap"))

    def start(self) -> None:
        self._authenticator.start()
        self._authenticator.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self)

    def stop(self) -> None:
        self._authenticator.stop()

    def reload(self) -> int:
        """Read the allowed-keys folder again (SIGHUP); returns how many keys are allowed now. Only the keys it
        can read are allowed from now on: a file it cannot read (or a missing folder) is logged and left out,
        so a key the owner took out is revoked whatever else is in the folder."""
        self.allowed, problems = read_allowed_keys(self.allowed_dir)
        for problem in problems:
            log.error("reloading the allowed keys: %s; it is left out (allows nobody)", problem)
        log.info("allowed keys reloaded from %s: %d keys", self.allowed_dir, len(self.allowed))
        return len(self.allowed)

    def allows(self, user_id: str) -> bool:
        """Whether the client whose ZAP User-Id (its public key in Z85) is ``user_id`` may still be served:
        keys taken out by a reload are refused on connections made before it too."""
        return user_id.encode("ascii", "replace") in self.allowed

    def callback(self, domain: str, client_key: bytes) -> bool:
        """Called by the ZAP authenticator for every CURVE handshake."""
        if client_key in self.allowed:
            self.accepted += 1
            return True
        self.denied += 1
        log.warning("refused a client with an unknown key %s", client_key.decode("ascii", "replace"))
        return False


def apply_server_keys(socket: zmq.Socket, secret_file: KeyPath) -> bytes:
    """Make ``socket`` a CURVE server with the key pair in ``secret_file``; returns its public key."""
    public, secret = load_keypair(secret_file)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True
    socket.zap_domain = ZAP_DOMAIN.encode()
    return public


def apply_client_keys(socket: zmq.Socket, server_key: KeyPath | bytes, client_key: KeyPath) -> bytes:
    """Make ``socket`` a CURVE client of the server whose public key is ``server_key``; returns the client's
    public key."""
    public, secret = load_keypair(client_key)
    socket.curve_serverkey = load_public_key(server_key)
    socket.curve_publickey = public
    socket.curve_secretkey = secret
    return public
