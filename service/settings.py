"""Settings: every environment variable, read once at start into a frozen dataclass.

``settings.current`` is the configuration in force; ``service.http.startup.configure``
replaces it at start (under every launcher), nothing else does.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import ipaddress
import math
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class ConfigError(Exception):
    """A bad setting; the process stops at start with one log line naming the variable."""

    def __init__(self, variable: str, detail: str) -> None:
        super().__init__(f"{variable}: {detail}")
        self.variable = variable
        self.detail = detail


def _env_number(env: Mapping[str, str], name: str, default: float, *, integer: bool,
                minimum: float, maximum: float = math.inf, above_minimum: bool = False) -> Any:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise ConfigError(name, f"must be {'an integer' if integer else 'a number'}, got {raw!r}") from None
    too_small = value <= minimum if above_minimum else value < minimum
    if not math.isfinite(value) or too_small or value > maximum:
        bound = f"> {minimum:g}" if above_minimum else f">= {minimum:g}"
        if maximum != math.inf:
            bound += f" and <= {maximum:g}"
        raise ConfigError(name, f"must be {bound}, got {raw!r}")
    return value


HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _is_host(host: str) -> bool:
    """An IP address, or a syntactically valid host name (checked here, not resolved)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    # "256.1.1.1" is neither an address nor a name: a name's last label is never all digits.
    last_label = host.rstrip(".").rsplit(".", 1)[-1]
    return len(host) <= 253 and bool(HOST_NAME.fullmatch(host)) and not last_label.isdigit()


SWAGGER_UI_VERSION = "5.35.0"  # what /docs loads; agent_runner holds the SRI hashes of its files
DOCS_ASSETS_DEFAULT = f"https://cdn.jsdelivr.net/npm/swagger-ui-dist@{SWAGGER_UI_VERSION}"

# Every environment variable: name, default, meaning. --help, the README and .env.example show this table.
SETTINGS_TABLE = (
    ("HOST", "127.0.0.1", "bind address (the Dockerfile sets ::, IPv6 and IPv4 on one socket)"),
    ("PORT", "8000", "bind port"),
    ("LOG_LEVEL", "info", "debug, info, warning or error"),
    ("AGENT_SLEEP_SECONDS", "5", "how long the built-in agents work (0 allowed)"),
    ("MAX_BODY_BYTES", "65536", "largest accepted request body"),
    ("AGENT_MODULES", "", "comma-separated importable modules; each is imported at start and registers agents"),
    ("DOCS_ASSETS_URL", DOCS_ASSETS_DEFAULT,
     f"where /docs loads Swagger UI's assets from; they must be swagger-ui-dist {SWAGGER_UI_VERSION}'s files"),
    ("RUN_TIMEOUT_SECONDS", "300", "a run still going after this is stopped and marked ERROR"),
    ("RUN_RETENTION", "10000", "finished runs kept; the oldest finished run is dropped first"),
    ("RUN_RETENTION_MB", "256", "size of the finished runs kept (their JSON); past it the oldest are dropped first"),
    ("API_TOKEN", "", "when set, every /agents... endpoint needs Authorization: Bearer <token>"),
    ("CORS_ALLOW_ORIGINS", "",
     "comma-separated origins (https://app.example.com) whose pages may call the API and read streams; * any; none "
     "when empty"),
    ("SHUTDOWN_GRACE_SECONDS", "30", "on SIGTERM/SIGINT, how long a running run may still take"),
    ("REDIS_URL", "", "e.g. redis://host:6379/0, redis+sentinel://host:26379/mymaster or redis+cluster://host:6379; "
                      "when set, the lock and all run records live in Redis"),
    ("REDIS_PREFIX", "agent-runner", "prefix of every Redis key, so several deployments can share one Redis"),
    ("DATABASE_URL", "",
     "e.g. postgresql://user:pass@host:5432/db?sslmode=require; when set, the lock and all run records live in "
     "PostgreSQL (not with REDIS_URL)"),
    ("DATABASE_SCHEMA", "agent_runner", "the PostgreSQL schema of every table, so several deployments can share one "
                                        "database"),
    ("LOCK_TTL_SECONDS", "30", "the run lock's expiry in Redis or PostgreSQL; the holder renews it every TTL/3"),
    ("MAX_CONCURRENT_RUNS", "1",
     "how many runs may be RUNNING at once (across all replicas in Redis or PostgreSQL mode)"),
    ("ON_BUSY", "reject", "what POST /agents/run does when every slot is taken: reject, enqueue or interrupt"),
    ("QUEUE_MAX", "100", "how many runs may wait in the queue; past it an enqueue is refused with 409"),
    ("LOG_FORMAT", "auto", "json, console (one readable line per event) or auto (console when stdout is a terminal)"),
    ("NO_COLOR", "", "when set (not empty), console log lines have no colours"),
    ("WEBHOOK_SECRET", "",
     "signs webhook deliveries (HMAC-SHA256): whsec_<base64> or 16+ characters; several comma-separated "
     "(rotation); webhooks are refused while unset"),
    ("WEBHOOK_ALLOWED_HOSTS", "",
     "comma-separated hosts webhooks may call (required with WEBHOOK_SECRET): a name, *.domain, or * for any"),
    ("WEBHOOK_BACKOFF_SECONDS", "10", "wait before a webhook's 2nd attempt; it doubles for each next (6 at most)"),
    ("WEBHOOK_TIMEOUT_SECONDS", "5",
     "one webhook attempt (resolve, connect, send, status line) gives up after this; at most 30"),
    ("IDEMPOTENCY_TTL_SECONDS", "86400",
     "how long an Idempotency-Key of an accepted POST /agents/run is remembered (replayed to retries)"),
    ("EVENTS_KEEPALIVE_SECONDS", "15", "an idle event stream gets a keep-alive comment this often"),
    ("ROOT_PATH", "", "the path prefix a proxy serves the service under (e.g. /runner); links and pages carry it"),
    ("FORWARDED_ALLOW_IPS", "",
     "comma-separated proxy addresses or networks (or *) whose X-Forwarded-For/-Proto are trusted; none when empty"),
    ("KEEPALIVE_SECONDS", "75", "an idle keep-alive connection is closed after this many seconds (over the usual 60)"),
    ("BODY_TIMEOUT_SECONDS", "10", "a request body not complete this long after its headers is answered 408"),
    ("WRITE_TIMEOUT_SECONDS", "30",
     "a client that leaves more than 64 KiB of an answer or stream unread for this long is disconnected"),
    ("FENCING_STATE_PATH", "/tmp/agent-runner-fencing-token",
     "memory mode: the file that keeps the highest fencing token across restarts (empty: none, the clock only)"),
)

LOG_FORMATS = ("auto", "json", "console")
SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,39}")  # short enough for its NOTIFY channels (63 bytes at most)
WEBHOOK_SECRET_MIN_CHARS = 16
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "rediss+sentinel://", "redis+cluster://",
                 "rediss+cluster://")
MAX_CONCURRENT_RUNS_LIMIT = 64  # in Redis mode, every replica counts a run on any of these slots as alive


WEBHOOK_SECRET_PREFIX = "whsec_"  # the Standard Webhooks form: the key is the base64 after it


def webhook_key(secret: str) -> bytes:
    """The HMAC key of one WEBHOOK_SECRET entry: the base64-decoded part of ``whsec_<base64>``, else its UTF-8."""
    if secret.startswith(WEBHOOK_SECRET_PREFIX):
        encoded = secret[len(WEBHOOK_SECRET_PREFIX):]
        return base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)  # padding may be left out
    return secret.encode()


def _webhook_secrets(raw: str) -> tuple[str, ...]:
    """WEBHOOK_SECRET as its comma-separated secrets, each checked: valid base64 after whsec_, and a key of
    16 bytes or more (a plain secret: 16 characters or more)."""
    secrets = tuple(entry.strip() for entry in raw.split(",") if entry.strip())
    for number, secret in enumerate(secrets, 1):
        try:
            key = webhook_key(secret)
        except (binascii.Error, ValueError):
            raise ConfigError("WEBHOOK_SECRET", f"secret {number} starts with {WEBHOOK_SECRET_PREFIX} but the rest is "
                                                "not valid base64") from None
        if len(key) < WEBHOOK_SECRET_MIN_CHARS:
            raise ConfigError("WEBHOOK_SECRET", f"secret {number} must be at least {WEBHOOK_SECRET_MIN_CHARS} "
                                                "characters long (a whsec_ one: 16 bytes once decoded)")
    return secrets


def _allowed_hosts(raw: str) -> tuple[str, ...]:
    """WEBHOOK_ALLOWED_HOSTS as lower-case entries: host names or addresses, ``*.domain`` or ``*``."""
    hosts = []
    for entry in raw.split(","):
        host = entry.strip().lower().rstrip(".")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host:
            continue
        name = host[2:] if host.startswith("*.") else host
        if host != "*" and not _is_host(name):
            raise ConfigError("WEBHOOK_ALLOWED_HOSTS",
                              f"each entry must be a host name, an address, *.domain or *; got {entry.strip()!r}")
        hosts.append(host)
    return tuple(hosts)


ROOT_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._~-]+")  # safe unescaped in a URL, a header, HTML and a script


def _root_path(raw: str) -> str:
    """ROOT_PATH as ``/a/b`` (no trailing slash), or "" for none."""
    path = raw.strip().rstrip("/")
    if not path:
        return ""
    segments = path.split("/")
    if segments[0] != "" or not all(ROOT_PATH_SEGMENT.fullmatch(segment) for segment in segments[1:]):
        raise ConfigError("ROOT_PATH", "must be a path such as /runner (segments of letters, digits and ._~-); "
                                       f"got {raw!r}")
    return path


def _cors_allow_origins(raw: str) -> tuple[str, ...]:
    """CORS_ALLOW_ORIGINS as origins as browsers send them (lower case, no trailing slash), or ``*``."""
    origins = []
    for entry in raw.split(","):
        origin = entry.strip().rstrip("/").lower()
        if not origin:
            continue
        if origin != "*":
            try:
                parts = urllib.parse.urlsplit(origin)
                valid = (parts.scheme in ("http", "https") and parts.port != 0 and not parts.path
                         and not parts.query and not parts.fragment and "@" not in parts.netloc
                         and _is_host(parts.hostname or ""))
            except ValueError:  # a port that is not a number
                valid = False
            if not valid:
                raise ConfigError("CORS_ALLOW_ORIGINS", "each entry must be an origin such as https://app.example.com "
                                                        f"(scheme, host, optional port, no path) or *; got {entry.strip()!r}")
        origins.append(origin)
    return tuple(origins)


def _forwarded_allow_ips(raw: str) -> tuple[str, ...]:
    """FORWARDED_ALLOW_IPS as addresses and networks (``*`` trusts every peer)."""
    entries = tuple(entry.strip() for entry in raw.split(",") if entry.strip())
    for entry in entries:
        if entry == "*":
            continue
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ConfigError("FORWARDED_ALLOW_IPS",
                              f"each entry must be an IP address, a network (10.0.0.0/8) or *; got {entry!r}") from None
    return entries


@dataclass(frozen=True)
class Settings:
    """The service's configuration; see the README's table for each variable."""

    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    agent_sleep_seconds: float = 5.0
    max_body_bytes: int = 65536
    agent_modules: tuple[str, ...] = ()
    docs_assets_url: str = DOCS_ASSETS_DEFAULT
    run_timeout_seconds: float = 300.0
    run_retention: int = 10000
    run_retention_bytes: int = 256 * 1024 * 1024
    api_token: str | None = field(default=None, repr=False)
    cors_allow_origins: tuple[str, ...] = ()
    shutdown_grace_seconds: float = 30.0
    redis_url: str | None = field(default=None, repr=False)
    redis_prefix: str = "agent-runner"
    database_url: str | None = field(default=None, repr=False)
    database_schema: str = "agent_runner"
    lock_ttl_seconds: float = 30.0
    max_concurrent_runs: int = 1
    on_busy: str = "reject"
    queue_max: int = 100
    log_format: str = "auto"
    no_color: bool = False
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_secrets: tuple[str, ...] = field(default=(), repr=False)  # WEBHOOK_SECRET's entries: each signs every delivery
    webhook_allowed_hosts: tuple[str, ...] = ()
    webhook_backoff_seconds: float = 10.0
    webhook_timeout_seconds: float = 5.0
    idempotency_ttl_seconds: float = 86400.0
    events_keepalive_seconds: float = 15.0
    root_path: str = ""
    forwarded_allow_ips: tuple[str, ...] = ()
    keepalive_seconds: int = 75
    body_timeout_seconds: float = 10.0
    write_timeout_seconds: float = 30.0
    fencing_state_path: str = "/tmp/agent-runner-fencing-token"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        log_level = env.get("LOG_LEVEL", "info").strip().lower() or "info"
        if log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError("LOG_LEVEL", f"must be one of debug, info, warning, error; got {log_level!r}")
        host = env.get("HOST", cls.host).strip()
        if not host:
            raise ConfigError("HOST", "must not be empty")
        if not _is_host(host):
            raise ConfigError("HOST", f"must be an IP address or a host name, got {host!r}")
        on_busy = env.get("ON_BUSY", "").strip().lower() or cls.on_busy
        if on_busy not in ("reject", "enqueue", "interrupt"):
            raise ConfigError("ON_BUSY", f"must be one of reject, enqueue, interrupt; got {on_busy!r}")
        log_format = env.get("LOG_FORMAT", "").strip().lower() or cls.log_format
        if log_format not in LOG_FORMATS:
            raise ConfigError("LOG_FORMAT", f"must be one of {', '.join(LOG_FORMATS)}; got {log_format!r}")
        webhook_secrets = _webhook_secrets(env.get("WEBHOOK_SECRET", ""))
        webhook_secret = ",".join(webhook_secrets) or None
        allowed_hosts = _allowed_hosts(env.get("WEBHOOK_ALLOWED_HOSTS", ""))
        if webhook_secret is not None and not allowed_hosts:
            raise ConfigError("WEBHOOK_ALLOWED_HOSTS", "is required when WEBHOOK_SECRET is set (webhooks are on)")
        redis_url = env.get("REDIS_URL", "").strip() or None
        if redis_url is not None and not redis_url.lower().startswith(REDIS_SCHEMES):
            raise ConfigError("REDIS_URL", f"must start with {', '.join(REDIS_SCHEMES[:-1])} or {REDIS_SCHEMES[-1]}")
        database_url = env.get("DATABASE_URL", "").strip() or None
        if database_url is not None and not database_url.startswith(("postgresql://", "postgres://")):
            raise ConfigError("DATABASE_URL", "must start with postgresql:// or postgres://")
        if database_url is not None and redis_url is not None:
            raise ConfigError("DATABASE_URL", "REDIS_URL is set too: choose one store (Redis or PostgreSQL)")
        database_schema = env.get("DATABASE_SCHEMA", "").strip() or cls.database_schema
        if not SCHEMA_NAME.fullmatch(database_schema):
            raise ConfigError("DATABASE_SCHEMA", "must be a lower-case SQL identifier (a letter or _, then letters, "
                                                 f"digits or _; at most 40 characters), got {database_schema!r}")
        return cls(
            host=host,
            port=_env_number(env, "PORT", cls.port, integer=True, minimum=1, maximum=65535),
            log_level=log_level,
            agent_sleep_seconds=_env_number(env, "AGENT_SLEEP_SECONDS", cls.agent_sleep_seconds,
                                            integer=False, minimum=0),
            max_body_bytes=_env_number(env, "MAX_BODY_BYTES", cls.max_body_bytes, integer=True, minimum=1),
            agent_modules=tuple(name.strip() for name in env.get("AGENT_MODULES", "").split(",") if name.strip()),
            docs_assets_url=env.get("DOCS_ASSETS_URL", "").strip().rstrip("/") or cls.docs_assets_url,
            run_timeout_seconds=_env_number(env, "RUN_TIMEOUT_SECONDS", cls.run_timeout_seconds,
                                            integer=False, minimum=0, above_minimum=True),
            run_retention=_env_number(env, "RUN_RETENTION", cls.run_retention, integer=True, minimum=1),
            run_retention_bytes=round(_env_number(env, "RUN_RETENTION_MB", 256, integer=False, minimum=1)
                                      * 1024 * 1024),
            api_token=env.get("API_TOKEN") or None,
            cors_allow_origins=_cors_allow_origins(env.get("CORS_ALLOW_ORIGINS", "")),
            shutdown_grace_seconds=_env_number(env, "SHUTDOWN_GRACE_SECONDS", cls.shutdown_grace_seconds,
                                               integer=False, minimum=0),
            redis_url=redis_url,
            redis_prefix=env.get("REDIS_PREFIX", "").strip() or cls.redis_prefix,
            database_url=database_url,
            database_schema=database_schema,
            lock_ttl_seconds=_env_number(env, "LOCK_TTL_SECONDS", cls.lock_ttl_seconds,
                                         integer=False, minimum=0.3),
            max_concurrent_runs=_env_number(env, "MAX_CONCURRENT_RUNS", cls.max_concurrent_runs, integer=True,
                                            minimum=1, maximum=MAX_CONCURRENT_RUNS_LIMIT),
            on_busy=on_busy,
            queue_max=_env_number(env, "QUEUE_MAX", cls.queue_max, integer=True, minimum=0, maximum=100000),
            log_format=log_format,
            no_color=bool(env.get("NO_COLOR")),
            webhook_secret=webhook_secret,
            webhook_secrets=webhook_secrets,
            webhook_allowed_hosts=allowed_hosts,
            webhook_backoff_seconds=_env_number(env, "WEBHOOK_BACKOFF_SECONDS", cls.webhook_backoff_seconds,
                                                integer=False, minimum=0, above_minimum=True, maximum=3600),
            # at most 30: a keyed POST looks its webhook up while its key is pending, which a retry may take
            # over after STALE_PENDING_SECONDS (60, service/backends/redis/idempotency.py)
            webhook_timeout_seconds=_env_number(env, "WEBHOOK_TIMEOUT_SECONDS", cls.webhook_timeout_seconds,
                                                integer=False, minimum=0, above_minimum=True, maximum=30),
            idempotency_ttl_seconds=_env_number(env, "IDEMPOTENCY_TTL_SECONDS", cls.idempotency_ttl_seconds,
                                                integer=False, minimum=1, maximum=30 * 86400),
            events_keepalive_seconds=_env_number(env, "EVENTS_KEEPALIVE_SECONDS", cls.events_keepalive_seconds,
                                                 integer=False, minimum=0.05, maximum=3600),
            root_path=_root_path(env.get("ROOT_PATH", "")),
            forwarded_allow_ips=_forwarded_allow_ips(env.get("FORWARDED_ALLOW_IPS", "")),
            keepalive_seconds=_env_number(env, "KEEPALIVE_SECONDS", cls.keepalive_seconds, integer=True,
                                          minimum=1, maximum=3600),
            body_timeout_seconds=_env_number(env, "BODY_TIMEOUT_SECONDS", cls.body_timeout_seconds,
                                             integer=False, minimum=0, above_minimum=True, maximum=3600),
            write_timeout_seconds=_env_number(env, "WRITE_TIMEOUT_SECONDS", cls.write_timeout_seconds,
                                              integer=False, minimum=0, above_minimum=True, maximum=3600),
            fencing_state_path=env.get("FENCING_STATE_PATH", cls.fencing_state_path).strip(),
        )


def load_agent_modules(names: tuple[str, ...]) -> None:
    """Import each AGENT_MODULES entry so its @register decorators run."""
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # any failure to import stops the process at start
            raise ConfigError("AGENT_MODULES", f"cannot import {name!r}: {type(exc).__name__}: {exc}") from exc


current = Settings()  # replaced once at start by service.http.startup.configure
