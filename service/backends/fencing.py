"""Fencing tokens of memory mode: each above the one before, across restarts too.

A token is minted as a run takes its slot. It is the larger of the last token plus one and the clock in
microseconds, and the highest token this process may reach before it writes again is kept in a small file
(FENCING_STATE_PATH): a process that starts reads it and begins above it, so a resource that saw token N
before a restart accepts the next run's. The file is written once per minute of tokens, not per run; if
it is lost, the clock still keeps new tokens above old ones. Redis mode mints in its scripts
(redis/scripts.py, MINT) with the same rule.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

RESERVE_MICROSECONDS = 60_000_000  # tokens a write of the file covers: a minute of the clock


def clock_floor() -> int:
    """The clock in microseconds: the least a token minted now may be."""
    return time.time_ns() // 1000


class TokenMinter:
    """Mints this process's fencing tokens, each strictly greater than every token minted before it."""

    def __init__(self, path: str | None, log: logging.Logger) -> None:
        self.path = path or None
        self.log = log
        self.last = 0  # the highest token minted (or read from the file)
        self._reserved = 0  # every token up to this is covered by the file

    def load(self) -> None:
        """Start above the highest token the file says an earlier process may have minted."""
        if self.path is None:
            return
        try:
            with open(self.path, encoding="ascii") as file:
                self.last = self._reserved = max(0, int(file.read().strip() or "0"))
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            self.log.warning("fencing_state_unreadable", extra={
                "path": self.path, "detail": f"{type(exc).__name__}: {exc}; tokens start at the clock"})

    def mint(self) -> int:
        token = max(self.last + 1, clock_floor())
        if token > self._reserved:
            self._reserve(token + RESERVE_MICROSECONDS)
        self.last = token
        return token

    def _reserve(self, reserved: int) -> None:
        """Write ``reserved`` to the file (a new file renamed over the old: never half written)."""
        self._reserved = reserved
        if self.path is None:
            return
        try:
            # a name of its own, created here (never a link someone left at a name known in advance)
            descriptor, partial = tempfile.mkstemp(prefix=os.path.basename(self.path) + ".", suffix=".tmp",
                                                   dir=os.path.dirname(os.path.abspath(self.path)))
            with os.fdopen(descriptor, "w", encoding="ascii") as file:
                file.write(f"{reserved}\n")
            os.replace(partial, self.path)
        except OSError as exc:
            self.log.warning("fencing_state_not_saved", extra={
                "path": self.path, "detail": f"{type(exc).__name__}: {exc}; after a restart only the clock "
                                             "keeps new tokens above old ones"})
