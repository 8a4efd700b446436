"""How many secure-aggregation rounds each data holder of this daemon has given a masked update to
(``--secagg-max-rounds``, ``--secagg-ledger``).

A secure round releases, per worker, an update masked for summing and noised (``--secagg-min-noise``).
The noise protects one round; a coordinator that repeats rounds averages it away, as DP composition
says (the privacy loss grows with the rounds a holder's data takes part in). The data owner caps the
rounds. Counts are kept per data holder: the daemon's own datasets (holder ``""``) and each client it
hosts (``--clients-from``), across all sessions and connections; with a ledger file, across restarts
too (one file per daemon: two daemons writing one file would overwrite each other's counts). A masked
update is counted before it leaves and the count given back only if it did not leave.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from ..errors import FedzmqError, PermissionDenied, quoted

#: the ledger file's format version
LEDGER_VERSION = 1


class LedgerError(FedzmqError, ValueError):
    """A ledger file could not be read: the daemon does not start rather than forget what was counted."""


def holder_name(holder: str) -> str:
    """How a data holder is named in messages: a hosted client by its id, the daemon's own datasets so."""
    return f"client {quoted(holder)}" if holder else "this daemon's own datasets"


def check_apart(ledgers: dict[str, str | os.PathLike[str] | None]) -> None:
    """``LedgerError`` if two ledgers (by flag) name one file: each writes its own counts whole over it, in
    one format, so a secure round's count overwrote the evaluations counted (and the other way round), and
    a restart read the one as the other: a data holder had its budget back."""
    seen: dict[Path, str] = {}
    for flag, path in ledgers.items():
        if path is None:
            continue
        where = Path(path).resolve()
        if where in seen:
            raise LedgerError(f"{seen[where]} and {flag} name one file, {path}: each ledger needs a file of its own")
        seen[where] = flag


class ReleaseLedger:
    """Releases given per data holder, within ``max_rounds`` each (None: no limit, only counted): by default
    masked updates of secure rounds; ``what``, ``flag`` and ``why`` name another kind of release in messages
    (the evaluations of ``--max-evaluations``)."""

    def __init__(self, max_rounds: int | None = None, path: str | os.PathLike[str] | None = None, *,
                 what: str = "secure rounds", flag: str = "--secagg-max-rounds",
                 why: str = "more rounds would average its privacy noise away") -> None:
        if max_rounds is not None and max_rounds < 0:
            raise ValueError(f"{flag} must be 0 or more")
        self.max_rounds = max_rounds
        self.what, self.flag, self.why = what, flag, why
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()  # secure steps of different sessions may run on different threads
        self._counts: dict[str, int] = self._load() if self.path is not None else {}
        try:
            self._save()  # now, so that a ledger the daemon cannot write stops it at start, not mid-round
        except OSError as exc:
            raise LedgerError(f"cannot write the {self.what} ledger {self.path}: {exc}") from None

    def used(self, holder: str) -> int:
        with self._lock:
            return self._counts.get(holder, 0)

    def charge(self, holders: Iterable[str]) -> None:
        """Count one more round for each holder, or none if any of them has no round left
        (``PermissionDenied``). Saved before returning: the caller releases after this."""
        wanted = sorted(set(holders))
        with self._lock:
            if self.max_rounds is not None:
                spent = [h for h in wanted if self._counts.get(h, 0) >= self.max_rounds]
                if spent:
                    raise PermissionDenied.new(
                        f"the limit of {self.max_rounds} {self.what} per data holder ({self.flag}) is "
                        f"reached for {holder_name(spent[0])}: {self.why}")
            for holder in wanted:
                self._counts[holder] = self._counts.get(holder, 0) + 1
            try:
                self._save()
            except BaseException:
                self._take_back(wanted)
                raise

    def refund(self, holders: Iterable[str]) -> None:
        """Give back the rounds ``charge`` counted, for an update that did not leave."""
        with self._lock:
            self._take_back(sorted(set(holders)))
            self._save()

    def _take_back(self, holders: list[str]) -> None:
        for holder in holders:
            left = self._counts.get(holder, 0) - 1
            if left > 0:
                self._counts[holder] = left
            else:
                self._counts.pop(holder, None)

    def _load(self) -> dict[str, int]:
        assert self.path is not None
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise LedgerError(f"cannot read the {self.what} ledger {self.path}: {exc}") from None
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        rounds = data.get("rounds") if isinstance(data, dict) and data.get("version") == LEDGER_VERSION else None
        if not isinstance(rounds, dict) or not all(type(k) is str and type(v) is int and v >= 0
                                                   for k, v in rounds.items()):
            raise LedgerError(f"{self.path} is not a fedzmq {self.what} ledger (version {LEDGER_VERSION}); "
                              "move it away only if you mean to forget what it counted")
        return dict(rounds)

    def _save(self) -> None:
        """Write the counts whole to a new file, then rename it over the ledger: a crash leaves the old
        ledger or the new one, never half of one."""
        if self.path is None:
            return
        fresh = self.path.with_name(self.path.name + ".new")
        try:
            with open(fresh, "w") as f:
                json.dump({"version": LEDGER_VERSION, "rounds": self._counts}, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(fresh, self.path)
        except BaseException:
            fresh.unlink(missing_ok=True)
            raise
        folder = os.open(self.path.parent, os.O_RDONLY)  # the rename itself reaches the disk
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


__all__ = ["LEDGER_VERSION", "LedgerError", "ReleaseLedger", "check_apart", "holder_name"]
