"""REDIS_URL to a redis-py client: one server, a Sentinel-managed primary, or a Redis Cluster.

``redis://``, ``rediss://`` and ``unix://`` are redis-py's own URLs. ``redis+sentinel://`` and
``redis+cluster://`` (``rediss+...`` for TLS) name several seed nodes, comma-separated; their credentials and
query options (``ssl_ca_certs``, ``ssl_cert_reqs``...) are read as redis-py reads a plain URL's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig
from redis.utils import HIREDIS_AVAILABLE

if HIREDIS_AVAILABLE:
    import hiredis

SENTINEL_PORT, REDIS_PORT = 26379, 6379
# What a failing store raises: unreachable, an error reply, or (a cluster client's own, not a RedisError) no
# reachable node, a slot nobody serves.
STORE_ERRORS = (RedisError, RedisClusterException, OSError)


@dataclass(frozen=True)
class Endpoint:
    """Where REDIS_URL points: ``kind`` is single, sentinel or cluster; ``options`` are connection keywords."""

    url: str
    kind: str = "single"
    tls: bool = False
    nodes: tuple[tuple[str, int], ...] = ()
    master: str = ""  # the Sentinel service name
    options: dict[str, Any] = field(default_factory=dict)

    def key_prefix(self, prefix: str) -> str:
        """The prefix every key starts with: in a cluster a hash tag, so all keys share one slot (scripts stay
        atomic, a MULTI spans them) and move together on resharding."""
        return f"{{{prefix}}}" if self.kind == "cluster" else prefix


def _node(text: str, default_port: int) -> tuple[str, int]:
    host, port = text, ""
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    if not host:
        raise ValueError(f"a node without a host: {text!r}")
    if port and not port.isdigit():
        raise ValueError(f"port is not a number: {text!r}")
    return host, int(port) if port else default_port


def parse(url: str) -> Endpoint:
    """``url`` read; ValueError saying what is wrong."""
    scheme = url.partition("://")[0].lower()
    if scheme in ("redis", "rediss", "unix"):
        parse_url(url)
        return Endpoint(url)
    tls, _, kind = scheme.partition("+")
    if tls not in ("redis", "rediss") or kind not in ("sentinel", "cluster"):
        raise ValueError("must start with redis://, rediss://, unix://, redis+sentinel://, rediss+sentinel://, "
                         "redis+cluster:// or rediss+cluster://")
    parts = urlsplit(url)
    credentials, _, hosts = parts.netloc.rpartition("@")
    nodes = tuple(_node(host, SENTINEL_PORT if kind == "sentinel" else REDIS_PORT)
                  for host in hosts.split(",") if host)
    if not nodes:
        raise ValueError(f"{scheme}:// needs at least one host:port")
    path = [unquote(part) for part in parts.path.split("/") if part]
    if kind == "sentinel" and not 1 <= len(path) <= 2:
        raise ValueError("redis+sentinel:// needs the master's name as its path: /<master name>[/<db>]")
    if kind == "cluster" and path and path != ["0"]:
        raise ValueError("redis+cluster:// takes no database number (a cluster has only db 0)")
    db = path[1] if kind == "sentinel" and len(path) == 2 else "0"
    # Credentials, db and query options as redis-py reads them from a plain URL (it checks their values too).
    plain = f"{tls}://{credentials + '@' if credentials else ''}127.0.0.1/{db}?{parts.query}"
    options = {key: value for key, value in parse_url(plain).items()
               if key not in ("host", "port", "connection_class")}
    if kind == "cluster":
        options.pop("db", None)
    if tls == "rediss":
        options["ssl"] = True
    return Endpoint(url, kind, tls == "rediss", nodes, path[0] if kind == "sentinel" else "", options)


class _PackedInC:
    """A connection that packs its commands with hiredis, as redis-py's synchronous connections do when it is
    installed (its asyncio ones pack in Python): 5 µs instead of 40 for a handoff's 55 arguments, on the path from
    one run's end to the next one's start. The same bytes; an argument of no known type is a DataError, as before."""

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0].encode() if isinstance(args[0], str) else args[0]
        if b" " in name:  # CONFIG GET, SCRIPT LOAD...: sent as two words
            args = (*name.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:
            raise DataError(str(exc)) from None


_PACKED_IN_C: dict[type[Any], type[Any]] = {}


def _packed_in_c(connection_class: type[Any]) -> type[Any]:
    packed = _PACKED_IN_C.get(connection_class)
    if packed is None:
        packed = _PACKED_IN_C[connection_class] = type(connection_class.__name__, (_PackedInC, connection_class), {})
    return packed


def _pack_in_c(client: Redis) -> Redis:
    """``client``, its connections (made from now on) packing commands in C when hiredis is installed and strings
    are sent as UTF-8, strictly (hiredis's only way: not with ``?encoding=`` or ``?encoding_errors=`` in the URL)."""
    cluster = client if isinstance(client, RedisCluster) else None
    options = cluster.nodes_manager.connection_kwargs if cluster else client.connection_pool.connection_kwargs
    utf8 = options.get("encoding", "utf-8").lower().replace("_", "-") in ("utf-8", "utf8")
    if not HIREDIS_AVAILABLE or not utf8 or options.get("encoding_errors", "strict") != "strict":
        return client
    if cluster is not None:
        options["connection_class"] = _packed_in_c(options["connection_class"])
        for node in cluster.nodes_manager.startup_nodes.values():
            node.connection_class = _packed_in_c(node.connection_class)
    else:
        pool = client.connection_pool
        pool.connection_class = _packed_in_c(pool.connection_class)
    return client


def _retry() -> dict[str, Any]:
    # Retry twice on a dropped connection, so pooled connections left over from before a Redis restart or a
    # failover do not turn into 503s.
    return {"retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2),
            "retry_on_error": [RedisConnectionError, RedisTimeoutError]}


def open_client(endpoint: Endpoint, socket_timeout: float = 2, pooled: bool = True) -> Redis:
    """A client of ``endpoint``. A cluster client is typed as ``Redis``: the commands the backend sends are the
    same, routed by key (every key in one slot, ``key_prefix``)."""
    timeouts: dict[str, Any] = {"socket_timeout": socket_timeout, "socket_connect_timeout": 2}
    # no CLIENT MAINT_NOTIFICATIONS handshake on each new connection (redis-py 8's default with RESP3): a round trip
    # open-source Redis refuses, and a race in it during a cluster failover raised AttributeError (a 500)
    quiet = MaintNotificationsConfig(enabled=False)
    if endpoint.kind == "sentinel":
        sentinel_options = {**timeouts, **{key: value for key, value in endpoint.options.items()
                                           if key.startswith("ssl")}}
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(endpoint.nodes), sentinel_kwargs=sentinel_options)
        return _pack_in_c(cast(Redis, sentinel.master_for(endpoint.master, **endpoint.options, **timeouts, **_retry())))
    if endpoint.kind == "cluster":
        nodes = [ClusterNode(host, port) for host, port in endpoint.nodes]
        return _pack_in_c(cast(Redis, RedisCluster(startup_nodes=nodes, **endpoint.options, **timeouts, **_retry(),
                                                   max_connections=64, maint_notifications_config=quiet)))
    if not pooled:
        return _pack_in_c(Redis.from_url(endpoint.url, **timeouts, maint_notifications_config=quiet))
    # A blocking pool: a burst of requests waits briefly for a connection instead of failing.
    pool = BlockingConnectionPool.from_url(endpoint.url, max_connections=64, timeout=5, **timeouts, **_retry(),
                                           maint_notifications_config=quiet)
    return _pack_in_c(Redis(connection_pool=pool))
