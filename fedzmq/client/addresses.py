"""Checking a worker's address before ZeroMQ sees it.

ZeroMQ reports a malformed endpoint as a bare ``Invalid argument``, and it resolves a host name on its
own thread, retrying quietly: an address with a typo in the host looks exactly like a daemon that is
not up yet, and a connect waits its full timeout. A wrong address is not a slow worker, so it is
refused at once with an ``AddressError`` that says what is wrong and what a right address looks like:
the form is checked when the worker object is made (``check_address``), and the host name is looked up
(``resolve``, on the event loop's resolver thread) before the socket is connected. ZeroMQ is still given
the name, not the number it resolved to, so that it resolves again when it reconnects to a daemon
that moved.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket

from ..errors import AddressError

#: the transports a client connects over: daemons on tcp (or ipc), virtual workers on inproc
TRANSPORTS = ("tcp", "ipc", "inproc")

FORMS = 'a right address looks like "tcp://host:port", "ipc://path" or "inproc://name"'

#: a host name (dot-separated labels of letters, digits, '-' and '_', which container networks use), or an
#: IPv4 literal
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")


def _refuse(address: object, why: str) -> AddressError:
    return AddressError(f"{address!r} is not a worker address: {why}; {FORMS}")


def check_address(address: str) -> str:
    """Return ``address`` if it is a well-formed address to connect to; raise ``AddressError`` otherwise."""
    if not isinstance(address, str):
        raise _refuse(address, f"an address is a string, not {type(address).__name__}")
    scheme, sep, rest = address.partition("://")
    if not sep:
        hint = f" (did you mean 'tcp://{address}'?)" if _split_host_port(address) is not None else ""
        raise _refuse(address, f"it has no transport{hint}")
    if scheme not in TRANSPORTS:
        raise _refuse(address, f"unknown transport {scheme!r} (use one of {', '.join(TRANSPORTS)})")
    if scheme == "ipc" and not rest:
        raise _refuse(address, "the ipc transport needs a socket file path")
    if scheme == "inproc" and not rest:
        raise _refuse(address, "the inproc transport needs a name")
    if scheme == "tcp":
        _check_tcp(address, rest)
    return address


def _split_host_port(rest: str) -> tuple[str, str] | None:
    """``host`` and ``port`` of ``host:port``, or of ZeroMQ's ``source;host:port`` (the source is not checked)."""
    host, sep, port = rest.rpartition(";")[2].rpartition(":")
    return (host, port) if sep else None


def _check_tcp(address: str, rest: str) -> None:
    parts = _split_host_port(rest)
    if parts is None:
        raise _refuse(address, "a tcp address needs a port after the host (host:port)")
    host, port = parts
    if not port:
        raise _refuse(address, "the port after the colon is missing")
    if not port.isdigit():
        raise _refuse(address, f"the port {port!r} is not a number")
    if not 1 <= int(port) <= 65535:
        raise _refuse(address, f"the port {port} is outside 1 to 65535")
    if not host:
        raise _refuse(address, "the host before the port is missing")
    if host == "*":
        raise _refuse(address, "'*' is a host to bind to (a daemon's --bind), not one to connect to")
    if host.startswith("[") or host.endswith("]"):
        try:
            if not (host.startswith("[") and host.endswith("]")):
                raise ValueError(host)
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise _refuse(address, f"the host {host!r} is not an IPv6 address in brackets ([::1])") from None
        return
    if not _HOSTNAME.match(host):
        raise _refuse(address, f"the host {host!r} is not a host name or an IP address")


def tcp_host(address: str) -> tuple[str, int] | None:
    """The host name and port of a tcp address that needs looking up (None: not tcp, or an IP literal)."""
    scheme, _, rest = address.partition("://")
    parts = _split_host_port(rest) if scheme == "tcp" else None
    if parts is None:
        return None
    host, port = parts
    bare = host[1:-1] if host.startswith("[") else host
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        return host, int(port)
    return None


async def resolve(address: str, timeout: float | None = None) -> None:
    """Check that a tcp address's host name resolves, without blocking the event loop (the loop's
    resolver runs on a thread); raise ``AddressError`` if it does not."""
    target = tcp_host(address)
    if target is None:
        return
    host, port = target
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise AddressError(f"cannot resolve the host {host!r} of {address!r} ({exc.strerror}); check the name, "
                           f"or give an IP address; {FORMS}") from None
    except TimeoutError:
        raise AddressError(f"cannot resolve the host {host!r} of {address!r}: no answer from the resolver "
                           f"within {timeout}s; {FORMS}") from None


__all__ = ["FORMS", "TRANSPORTS", "check_address", "resolve", "tcp_host"]
