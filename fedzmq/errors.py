"""The exceptions fedzmq raises, and how a remote failure becomes a local exception.

Catch at the level you care about:

    FedzmqError
    ├── ProtocolError          a message broke the wire protocol (raised by the codec, on either side)
    ├── AddressError(FedzmqError, ValueError): an address is malformed or its host does not resolve
    ├── WorkerError            the daemon could not be used
    │   ├── WorkerDeadError    it stopped answering heartbeats (dead, hung or unreachable)
    │   ├── RequestTimeout     it is alive but did not answer within the deadline you gave
    │   ├── WorkerClosedError  the worker was closed (here, or its session on the daemon before the command ran)
    │   └── HandshakeFailed    connecting failed in ZeroMQ's handshake: keys on one side only, a wrong server key
    │       └── HandshakeRefused  the daemon refused this client's key
    ├── ModelDescriptionError  a model cannot be described as data for a worker
    ├── WrongWorkerError       an operation mixes objects that live on different workers
    ├── ShapeUnknown(FedzmqError, LookupError): a pointer's shape is not known here (``await ptr.info()``)
    ├── HeldBytesExceeded      an aggregator that holds every update of a round would pass its byte budget
    └── RemoteError            the daemon ran the command and it failed there
        ├── ObjectNotFound, PermissionDenied, LimitExceeded, UnknownCommand, ...
        ├── RemoteProtocolError(RemoteError, ProtocolError): the daemon could not decode our request
        ├── RemoteWorkerClosedError(RemoteError, WorkerClosedError): the session closed before it ran
        └── RemoteValueError(RemoteError, ValueError), ... for built-in exception types

A ``RemoteError`` carries the remote type name, message and traceback text. Like Ray's
``RayTaskError``, the error for a built-in remote type is also an instance of that type, so
``except RuntimeError:`` works on both sides of the wire.
"""

from __future__ import annotations

import builtins
import functools
import re
import reprlib
from types import TracebackType
from typing import Any, Callable

#: how a worker names an object of the session in its messages
_OBJECT = re.compile(r"\bobject (\d+)\b")


class FedzmqError(Exception):
    """Base class of every exception fedzmq raises on purpose."""


class ProtocolError(FedzmqError):
    """A message does not follow the protocol; ``request_id`` is set when it could be read."""

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class AddressError(FedzmqError, ValueError):
    """A worker's address is malformed (no transport, no port, a port out of range, ...) or its host
    name does not resolve. Raised at once, before anything is sent: a wrong address is not a slow worker."""


class WorkerError(FedzmqError):
    """The worker could not be reached, or did not answer in time."""


class WorkerDeadError(WorkerError):
    """The worker missed too many heartbeats: it is dead, stopped or unreachable."""


class RequestTimeout(WorkerError, TimeoutError):
    """The deadline given to a request passed before its reply arrived."""


class WorkerClosedError(WorkerError):
    """The client side of the connection was closed; no more requests can be made."""


class HandshakeFailed(WorkerError):
    """``connect`` reached a peer but ZeroMQ's handshake with it failed in a way that trying again does not
    mend: keys on one side only, or a ``server_key`` that is not the daemon's. Raised at once, instead of
    waiting the connect timeout; the message says what to check."""


class HandshakeRefused(HandshakeFailed):
    """The daemon refused this client's key (ZAP): its public half is not, or no longer, in the daemon's
    ``--allowed-keys`` folder."""


class ModelDescriptionError(FedzmqError):
    """A module cannot be described as data (unknown layer, untraceable forward, ...)."""


class WrongWorkerError(FedzmqError, ValueError):
    """An operation mixes pointers of different workers, or a pointer with the wrong worker."""


class ShapeUnknown(FedzmqError, LookupError):
    """A pointer's shape and dtype are not known on the client (a module's forward made it, or an op the
    client cannot work out); ``await ptr.info()`` asks the worker once, and the pointer remembers."""


class HeldBytesExceeded(FedzmqError):
    """A strategy that must hold every update of a round at once (FedMedian, FedTrimmedAvg, Krum, Bulyan)
    would hold more than its ``max_held_bytes``. Raised for the update that would pass the budget, and again by
    the round's result, so a round never silently aggregates only the updates that fitted."""


class CheckpointMismatch(FedzmqError, ValueError):
    """A run was pointed at a checkpoint folder written by another run: another model (its entries or
    shapes differ) or another strategy (whose server state would be dropped or misread). The message
    names the checkpoint and what differs; give the run its own checkpoint folder."""


class RemoteError(FedzmqError):
    """A command failed on the worker. ``remote_type``, ``remote_message`` and
    ``remote_traceback`` are the worker's own words (the client names the pointers it knows in the
    message: ``<TensorPointer 3 on 'bob'>`` where the worker said ``object 3``).

    The text is the message, then the remote traceback if any. The remote type leads it only when the
    local class does not already say it (a type this client does not know): Python prints the class
    name in front, and ``PermissionDenied: PermissionDenied: ...`` says it twice."""

    def __init__(self, remote_type: str, remote_message: str, remote_traceback: str = "") -> None:
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        named = type(self).__name__ in (remote_type, "Remote" + remote_type)
        text = remote_message if named else f"{remote_type}: {remote_message}"
        if remote_traceback:
            text += "\n\nRemote traceback:\n" + remote_traceback.rstrip()
        super().__init__(text)

    def naming(self, names: Callable[[int], str | None]) -> "RemoteError":
        """This error, with each ``object N`` of the worker's message replaced by ``names(N)`` (the pointer
        the client knows by that id; None leaves the number). The same error when nothing changes."""
        def name(match: re.Match[str]) -> str:
            known = names(int(match.group(1)))
            return known if known is not None else match.group(0)

        message = _OBJECT.sub(name, self.remote_message)
        if message == self.remote_message:
            return self
        renamed = remote_error(self.remote_type, message, self.remote_traceback)
        renamed.__cause__, renamed.__traceback__ = self.__cause__, self.__traceback__
        return renamed

    @classmethod
    def new(cls, message: str) -> "RemoteError":
        """Raise-able on the worker itself: the type name sent back is the class name."""
        return cls(cls.__name__ if cls is not RemoteError else "RemoteError", message)

    def __reduce__(self):  # keep exceptions copyable (pytest, logging) despite the custom __init__
        return (_rebuild, (type(self).__name__, self.remote_type, self.remote_message, self.remote_traceback))


def _rebuild(_cls_name: str, remote_type: str, message: str, tb: str) -> RemoteError:
    return remote_error(remote_type, message, tb)


# Errors a worker raises on purpose. The same classes are raised locally when the remote type matches.
class ObjectNotFound(RemoteError, KeyError):
    """The object id is unknown in this session (never made, deleted, or another session's)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return RemoteError.__str__(self)


class PermissionDenied(RemoteError, PermissionError):
    """The worker's policy refuses this request."""


class LimitExceeded(RemoteError):
    """A size, count or rate limit of the worker would be exceeded."""


class UnknownCommand(RemoteError):
    """The worker does not know the command or operation (not on its allowlist)."""


class BadRequest(RemoteError, ValueError):
    """The request was well formed on the wire but its arguments make no sense."""


class RemoteProtocolError(RemoteError, ProtocolError):
    """The worker could not decode our message: a protocol error, reported by the other side (so
    ``except ProtocolError:`` catches both a bad reply and a request the worker refused to decode)."""


class RemoteWorkerClosedError(RemoteError, WorkerClosedError):
    """The worker refused a command because its session had closed before it ran (the commands queued
    behind a close): ``except WorkerClosedError:`` catches it as it catches the client's own refusal."""


_FEDZMQ_REMOTE_TYPES: dict[str, type[RemoteError]] = {
    cls.__name__: cls
    for cls in (ObjectNotFound, PermissionDenied, LimitExceeded, UnknownCommand, BadRequest)
}
_FEDZMQ_REMOTE_TYPES["ProtocolError"] = RemoteProtocolError
_FEDZMQ_REMOTE_TYPES["WorkerClosedError"] = RemoteWorkerClosedError


@functools.cache
def _builtin_remote_class(name: str) -> type[RemoteError]:
    base = getattr(builtins, name)
    return type(f"Remote{name}", (RemoteError, base), {"__module__": __name__, "__str__": RemoteError.__str__})


def remote_error(remote_type: str, message: str, traceback_text: str = "") -> RemoteError:
    """Build the local exception for a remote failure, of the most specific class we know."""
    cls: type[RemoteError] = RemoteError
    if remote_type in _FEDZMQ_REMOTE_TYPES:
        cls = _FEDZMQ_REMOTE_TYPES[remote_type]
    else:
        candidate = getattr(builtins, remote_type, None)
        if (
            isinstance(candidate, type)
            and issubclass(candidate, Exception)
            and not issubclass(candidate, (KeyboardInterrupt, SystemExit))
        ):
            try:
                cls = _builtin_remote_class(remote_type)
            except TypeError:  # a built-in whose layout cannot be combined with ours
                cls = RemoteError
    error = cls.__new__(cls)
    RemoteError.__init__(error, remote_type, message, traceback_text)
    return error


def compact_traceback(exc: BaseException) -> str:
    """``exc``'s traceback as a worker sends it: what Python prints (the chain of causes, each frame's
    file, line and function, a line repeated many times collapsed, the exception's line) without
    source lines. Python's own text reads and parses the source of every frame, which cost a daemon
    several times the command that failed, for whatever failure a peer chose to cause."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain) and len(chain) < MAX_CHAIN:
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    lines: list[str] = []
    for earlier, part in zip([None, *reversed(chain)], reversed(chain)):  # the first cause first
        if earlier is not None:
            lines += ["", "The above exception was the direct cause of the following exception:"
                      if part.__cause__ is earlier else "During handling of the above exception, another "
                      "exception occurred:", ""]
        lines += _frame_lines(part.__traceback__)
        lines.append(f"{_qualified_name(type(part))}: {safe_message(part)}")
    return "\n".join(lines) + "\n"


#: causes and contexts a worker's traceback follows back from the exception it reports
MAX_CHAIN = 8


def _frame_lines(frame: TracebackType | None) -> list[str]:
    """One line per frame; a line repeated more than 3 times in a row (a recursion) is said once more
    with its count, as Python does."""
    lines = ["Traceback (most recent call last):"] if frame is not None else []
    previous, repeats = "", 0
    while frame is not None:
        line = _frame_line(frame)
        repeats = repeats + 1 if line == previous else 0
        if repeats < 3:
            lines.append(line)
        previous, frame = line, frame.tb_next
        if repeats >= 3 and (frame is None or _frame_line(frame) != line):
            lines.append(f"  [Previous line repeated {repeats - 2} more times]")
    return lines


def _frame_line(frame: TracebackType) -> str:
    code = frame.tb_frame.f_code
    return f'  File "{code.co_filename}", line {frame.tb_lineno}, in {code.co_name}'


def _qualified_name(cls: type) -> str:
    return cls.__qualname__ if cls.__module__ in ("builtins", "__main__") else f"{cls.__module__}.{cls.__qualname__}"


#: the longest error message a worker sends; what an error quotes of a request is shorter still (``quoted``)
MAX_ERROR_MESSAGE = 2000

def _quoting() -> reprlib.Repr:
    """How values from the wire are quoted in error messages: ``reprlib`` cuts strings, bytes and
    containers before it formats them, so a 4 MiB field costs neither a 16 MiB reply nor its time."""
    quote = reprlib.Repr()  # its limits are attributes (keywords only from Python 3.12)
    quote.maxlevel, quote.maxstring, quote.maxother, quote.maxlong = 2, 60, 60, 40
    quote.maxlist = quote.maxtuple = quote.maxdict = quote.maxset = 6
    return quote


_QUOTE = _quoting()


def quoted(value: Any) -> str:
    """A value a peer sent, quoted in an error message: its repr, cut to a few dozen characters."""
    return _QUOTE.repr(value)


def safe_message(exc: BaseException) -> str:
    """``str(exc)``, or a placeholder when that raises: an error report must not fail in turn."""
    try:
        return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    except Exception:
        return "<exception str() failed>"


def error_payload(exc: BaseException, traceback_text: str) -> dict[str, Any]:
    """What a worker sends back for an exception (the inverse of ``remote_error``)."""
    if isinstance(exc, RemoteError):  # re-raised failure of an earlier command: keep its identity
        return {
            "type": exc.remote_type,
            "message": exc.remote_message,
            "traceback": exc.remote_traceback or traceback_text,
        }
    message = safe_message(exc)
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[:MAX_ERROR_MESSAGE] + " [cut]"
    return {"type": type(exc).__name__, "message": message, "traceback": traceback_text}
