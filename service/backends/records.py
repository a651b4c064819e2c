"""What every backend stores and hands back: the run record, a page of runs, an event frame, and the errors.

Nothing here does I/O; ``memory.py`` and ``redis/`` keep these, ``base.py`` says how.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any


STATES = ("PENDING", "RUNNING", "DONE", "ERROR", "CANCELLED")
TERMINAL_STATES = frozenset({"DONE", "ERROR", "CANCELLED"})


def utc_now() -> str:
    """The current time as RFC 3339 UTC with millisecond precision, ending in Z."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


RUN_OVERHEAD_BYTES = 600  # a Run object, its dict entry and index slots, beyond its JSON
LOG_LINES_MAX = 500  # log lines kept per run (the newest), and at most LOG_BYTES_MAX of them
LOG_BYTES_MAX = 256 * 1024
PUBLIC_FIELDS = ("run_id", "agent_type", "user_id", "input", "state", "result", "error", "progress",
                 "created_at", "started_at", "finished_at", "queue_position", "cancelled_by", "webhook",
                 "fencing_token")
ON_BUSY = ("reject", "enqueue", "interrupt")  # what POST /agents/run does when every slot is taken


# Webhook deliveries owed at once (memory: in this process; Redis: in Redis, for every replica) and their bodies'
# bytes; past either, a new one is logged as failed (webhook_failed, final, attempt 0), counted undelivered and
# dropped: a receiver down, or no replica able to send, under a flood of runs.
MAX_OWED = 10000
MAX_OWED_BYTES = 64 * 1024 * 1024
MAX_ATTEMPTS = 6  # attempts per webhook delivery at most, however many replicas make them


class RunRecordInvalid(ValueError):
    """A stored run record this version cannot read (malformed, or missing what every run has)."""


STRICT_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # made once: json.dumps makes one a call


def encode(value: Any) -> bytes:
    """Compact, strict JSON (no NaN or Infinity), as every body the service writes."""
    return STRICT_ENCODER.encode(value).encode()


@dataclass(slots=True)
class Run:
    """One run of one agent, as clients see it (plus the lock holder's token).

    ``input`` and ``result`` are kept as their encoded JSON, not as object
    trees: what is kept is what is counted against RUN_RETENTION_MB, and a
    small body cannot become megabytes of Python objects.
    """

    run_id: str
    agent_type: str
    user_id: str
    input_json: bytes = b"{}"
    state: str = "PENDING"
    result_json: bytes = b"null"
    error: str | None = None
    progress: float | None = None
    created_at: str = field(default_factory=utc_now)
    started_at: str | None = None
    finished_at: str | None = None
    queue_position: int | None = None  # 1 = next, while the run waits in the queue
    cancelled_by: str | None = None  # the run that interrupted this one
    webhook: str | None = None  # POSTed the run once it is terminal (webhooks.py)
    holder: str | None = None  # token of the run lock taken for this run; not shown to clients
    trace: str | None = None  # the run's trace context (service/tracing.py), stored with it; not shown to clients
    fencing_token: int | None = None  # minted when the run took its slot (fencing.py); last in its JSON
    _json: bytes | None = field(default=None, repr=False, compare=False)

    @classmethod
    def new(cls, run_id: str, agent_type: str, user_id: str, input: dict[str, Any], holder: str | None,
            webhook: str | None = None, trace: str | None = None) -> Run:
        return cls(run_id, agent_type, user_id, encode(input), holder=holder, webhook=webhook, trace=trace)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def size(self) -> int:
        """Bytes this run costs in a store: its JSON plus a fixed overhead."""
        return len(self.json()) + RUN_OVERHEAD_BYTES

    def update(self, **changes: Any) -> None:
        """Change fields; the cached JSON is rebuilt on the next read."""
        for name, value in changes.items():
            setattr(self, name, value)
        self._json = None

    def json(self) -> bytes:
        """The client-facing JSON, serialised once per change rather than per request."""
        if self._json is None:
            head = encode({"run_id": self.run_id, "agent_type": self.agent_type, "user_id": self.user_id})
            tail = encode({"error": self.error, "progress": self.progress, "created_at": self.created_at,
                           "started_at": self.started_at, "finished_at": self.finished_at,
                           "queue_position": self.queue_position, "cancelled_by": self.cancelled_by,
                           "webhook": self.webhook, "fencing_token": self.fencing_token})
            self._json = b"".join((head[:-1], b',"input":', self.input_json, b',"state":', encode(self.state),
                                   b',"result":', self.result_json, b",", tail[1:]))
        return self._json

    def record(self) -> bytes:
        """What a store keeps: the client-facing JSON, with the trace context (when the run has one) just before
        ``fencing_token``, which stays last (the Redis scripts read and write it there)."""
        if self.trace is None:
            return self.json()
        public = self.json()
        at = public.rindex(b',"fencing_token":')
        return public[:at] + b',"trace":' + encode(self.trace) + public[at:]

    def copy(self) -> Run:
        return Run(self.run_id, self.agent_type, self.user_id, self.input_json, self.state, self.result_json,
                   self.error, self.progress, self.created_at, self.started_at, self.finished_at,
                   queue_position=self.queue_position, cancelled_by=self.cancelled_by, webhook=self.webhook,
                   holder=self.holder, fencing_token=self.fencing_token, trace=self.trace, _json=self._json)

    @classmethod
    def from_json(cls, raw: bytes, holder: str | None = None) -> Run:
        """A run read back from its client-facing JSON, tolerantly: a record written by another version
        (unknown fields, optional ones missing) is read; one without what every run has raises RunRecordInvalid."""
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise RunRecordInvalid("not JSON") from None
        if not isinstance(data, dict):
            raise RunRecordInvalid("not a JSON object")
        for name in ("run_id", "agent_type", "user_id"):
            if not isinstance(data.get(name), str):
                raise RunRecordInvalid(f"{name} is missing or not a string")
        if data.get("state") not in STATES:
            raise RunRecordInvalid("state is missing or unknown")

        def text(name: str) -> str | None:
            value = data.get(name)
            return value if isinstance(value, str) else None

        progress = data.get("progress")
        input = data.get("input")
        position = data.get("queue_position")
        token = data.get("fencing_token")
        try:
            run = cls(
                run_id=data["run_id"], agent_type=data["agent_type"], user_id=data["user_id"],
                input_json=encode(input if isinstance(input, dict) else {}), state=data["state"],
                result_json=encode(data.get("result")), error=text("error"),
                progress=float(progress) if isinstance(progress, (int, float)) and not isinstance(progress, bool)
                else None,
                created_at=text("created_at") or "", started_at=text("started_at"),
                finished_at=text("finished_at"), cancelled_by=text("cancelled_by"), webhook=text("webhook"),
                holder=holder, trace=text("trace"),
                fencing_token=token if isinstance(token, int) and not isinstance(token, bool) else None,
                queue_position=position if isinstance(position, int) and not isinstance(position, bool) else None)
        except ValueError:  # a non-finite number somewhere
            raise RunRecordInvalid("holds a number JSON cannot carry") from None
        fields = tuple(data)
        if (isinstance(input, dict) and run.progress == progress and run.queue_position == position
                and tuple(name for name in fields if name != "trace") == PUBLIC_FIELDS
                and ("trace" not in data or run.trace is not None)):
            public, trace = split_record(raw) if run.trace is not None else (raw, None)
            if trace == run.trace:
                run._json = public  # served as read (without the trace context): this version wrote it
        return run


TRACE_SUFFIX = re.compile(rb',"trace":"([0-9a-f -]{1,200})"(,"fencing_token":[0-9nul]{1,20})?\}\Z')


def split_record(raw: bytes) -> tuple[bytes, str | None]:
    """A stored record (a webhook's body) as the client-facing JSON and the run's trace field, if it has one."""
    match = TRACE_SUFFIX.search(raw)
    if match is None:
        return raw, None
    return raw[:match.start()] + (match[2] or b"") + b"}", match[1].decode()


class Page:
    """One answer of GET /agents/runs: the runs that match, newest first, up to ``limit`` and ``max_bytes``.

    Stores offer runs in order until ``offer`` answers False. The byte cap
    keeps at least one run, so paging with ``before`` always moves on.
    """

    def __init__(self, limit: int, *, state: str | None = None, agent_type: str | None = None,
                 user_id: str | None = None, max_bytes: int | None = None) -> None:
        self.limit, self.max_bytes = limit, max_bytes
        self.state, self.agent_type, self.user_id = state, agent_type, user_id
        self.runs: list[Run] = []
        self._bytes = 0

    def offer(self, run: Run) -> bool:
        """Take ``run`` if it matches the filters; False once the page is full."""
        if ((self.state is None or run.state == self.state)
                and (self.agent_type is None or run.agent_type == self.agent_type)
                and (self.user_id is None or run.user_id == self.user_id)):
            self._bytes += len(run.json()) + 1
            if self.max_bytes is not None and self.runs and self._bytes > self.max_bytes:
                return False
            self.runs.append(run)
        return len(self.runs) < self.limit


# Event backlogs kept for Last-Event-ID, the same in both backends
RUN_BACKLOG_FRAMES = 200  # frames kept per run
RUN_BACKLOG_BYTES = 1024 * 1024
GLOBAL_BACKLOG_FRAMES = 1000  # frames of GET /agents/events kept
GLOBAL_BACKLOG_BYTES = 4 * 1024 * 1024
ALL_EVENTS_MAX = 10000  # the newest events of all runs every replica's reader can catch up on, at most
ALL_EVENTS_BYTES = 16 * 1024 * 1024  # and their data (the newest one always)
RUN_STREAM_TTL_SECONDS = 600  # Redis mode: a run's event backlog expires this long after its last event
EVENT_ID = re.compile(r"(\d{1,20})-(\d{1,20})")


def parse_event_id(raw: str | None) -> tuple[int, int] | None:
    """A Last-Event-ID as a comparable key; None for a missing or foreign one (then it is ignored)."""
    match = EVENT_ID.fullmatch(raw.strip()) if raw else None
    if match is None or int(match[1]) >= 2 ** 63 or int(match[2]) >= 2 ** 63:  # past any id made here or by Redis
        return None
    return int(match[1]), int(match[2])


class Frame:
    """One event as it goes on the wire, encoded once and shared by every client that receives it."""

    __slots__ = ("id", "key", "kind", "run_id", "terminal", "wire", "local")

    def __init__(self, event_id: str, kind: str, run_id: str, state: str, data: bytes) -> None:
        self.id = event_id
        self.key = parse_event_id(event_id) or (0, 0)
        self.kind = kind  # "run", "log" or "gap"
        self.run_id = run_id
        self.terminal = kind == "run" and state in TERMINAL_STATES
        self.local = not event_id  # made by this process for its own clients: no id, never replayed
        id_line = b"id: %s\n" % event_id.encode() if event_id else b""
        self.wire = b"%sevent: %s\ndata: %s\n\n" % (id_line, kind.encode(), data)

    @classmethod
    def snapshot(cls, event_id: str, run: Run) -> Frame:
        """A ``run`` frame of the run as it stands (read from the store), under the id of the last event seen."""
        return cls(event_id, "run", run.run_id, run.state, run.json())

    @classmethod
    def position(cls, run: Run) -> Frame:
        """A waiting run's new queue position, for this process's clients: a ``run`` frame without an id (a
        client resuming from the id before it gets the run as it stands)."""
        return cls("", "run", run.run_id, run.state, run.json())

    @classmethod
    def gap(cls, run_id: str, first_kept: str | None) -> Frame:
        """A ``gap`` frame: the run's events before ``first_kept`` are no longer kept. It has no id, so an
        EventSource's Last-Event-ID stays that of the event before it."""
        frame = cls("0-0", "gap", run_id, "", b'{"run_id":"%s","first_kept_event_id":%s,"logs":"/agents/logs/%s"}'
                    % (run_id.encode(), b'"%s"' % first_kept.encode() if first_kept else b"null", run_id.encode()))
        frame.id, frame.key = "", (-1, -1)
        frame.wire = frame.wire.partition(b"\n")[2]  # without its "id:" line
        return frame


@dataclass(slots=True)
class RunBacklog:
    """What an event transport keeps of one run: its frames from an id on (or all), whether that id is among
    them (or, for all, whether they start with the run's first event), and the newest id (None: nothing kept)."""

    frames: list[Frame]
    found: bool
    newest: str | None


class StoreUnavailable(Exception):
    """The run store (Redis) cannot be reached; the request gets 503."""


class LockLost(Exception):
    """The run lock was taken over or expired while its holder still ran (Redis mode)."""


class WriteRefused(Exception):
    """A write of a run the writer no longer holds: the run is terminal already, or held by another token."""
