"""Where a webhook may go, and the one HTTP POST that takes it there.

``check_url`` reads a webhook URL against WEBHOOK_ALLOWED_HOSTS (no I/O);
``resolve`` looks its host up without blocking the event loop and refuses
loopback, private, link-local and metadata addresses unless the host is
listed by name; ``post`` connects to exactly the addresses ``resolve``
approved (a DNS answer cannot change between the check and the connection)
and sends one HTTP/1.1 POST. It reads only the status line: a redirect is an
answer like any other, never followed. The standard library is enough; no
HTTP client is pulled into the runtime.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import re
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass

MAX_URL_CHARS = 2048
URL_CHARS = re.compile(r"[!-~]+")  # printable ASCII, no space: nothing that could end the request line
STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?: [^\r\n]*)?\r?\n")
# Cloud metadata services; most are link-local or private anyway, named here so the intent is plain.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(address) for address in (
    "169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254"))

# IPv6 prefixes whose last 32 bits are an IPv4 address the packet may reach: NAT64 (well-known and local-use),
# IPv4-translated (SIIT, RFC 2765) and the deprecated IPv4-compatible form. (IPv4-mapped and 6to4 have their own
# properties in ipaddress.)
IPV4_CARRYING = tuple(ipaddress.ip_network(prefix) for prefix in (
    "64:ff9b::/96", "64:ff9b:1::/48", "::ffff:0:0:0/96", "::/96"))


class WebhookRefused(ValueError):
    """A webhook URL or address this service will not call; the message says why."""


class WebhookUnresolved(WebhookRefused):
    """The host's lookup failed (no answer, a timeout): refused on a request, retried at delivery."""


@dataclass(frozen=True)
class Target:
    """A checked webhook URL: where to connect and what to send in the request line and Host header."""

    url: str
    scheme: str
    host: str  # lower case; an IPv6 address without brackets
    port: int
    path: str  # path and query, as given ("/" when empty)
    listed: bool  # the host is named in WEBHOOK_ALLOWED_HOSTS (not only matched by * or *.domain)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def host_allowed(host: str, allowed: tuple[str, ...]) -> tuple[bool, bool]:
    """(allowed, listed by name) for ``host`` against WEBHOOK_ALLOWED_HOSTS entries."""
    if host in allowed:
        return True, True
    for entry in allowed:
        if entry == "*" or (entry.startswith("*.") and host.endswith(entry[1:])):
            return True, False
    return False, False


def check_url(url: str, allowed: tuple[str, ...]) -> Target:
    """The webhook URL as a Target, or WebhookRefused: http(s), no credentials, a host WEBHOOK_ALLOWED_HOSTS allows,
    and, for an address written in the URL and not listed by name, a public one."""
    if len(url) > MAX_URL_CHARS:
        raise WebhookRefused(f"is longer than {MAX_URL_CHARS} characters")
    if not URL_CHARS.fullmatch(url):
        raise WebhookRefused("must be printable ASCII without spaces (percent-encode the rest)")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookRefused(f"is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise WebhookRefused("must be an http:// or https:// URL")
    if port == 0:
        raise WebhookRefused("has port 0, which nothing listens on")
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused("must not carry credentials (user:password@)")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise WebhookRefused("has no host")
    allowed_host, listed = host_allowed(host, allowed)
    if not allowed_host:
        raise WebhookRefused(f"host {host!r} is not in WEBHOOK_ALLOWED_HOSTS")
    target = Target(url, scheme, host, port or (443 if scheme == "https" else 80),
                    (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), listed)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a name: resolve() checks what it resolves to
        try:
            host.encode("idna")  # what the lookup does first; an empty or over-long label fails here, not there
        except UnicodeError:
            raise WebhookRefused(f"host {short_host(host)!r} is not a valid host name") from None
        return target
    check_address(target, address)
    return target


def short_host(host: str) -> str:
    return host if len(host) <= 80 else host[:80] + "..."


def check_address(target: Target, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    """Refuse a loopback, private, link-local, metadata (or any other non-public) address, unless listed by name."""
    if target.listed:
        return
    judged: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv6Address):  # one that carries an IPv4 address is judged by that one too
        carried = address.ipv4_mapped or address.sixtofour
        if carried is None and any(address in prefix for prefix in IPV4_CARRYING):
            carried = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        judged = [address.ipv4_mapped] if address.ipv4_mapped is not None else [address, *filter(None, [carried])]
    for one in judged:
        site_local = isinstance(one, ipaddress.IPv6Address) and one.is_site_local
        if one in METADATA_ADDRESSES or not one.is_global or one.is_multicast or site_local:
            raise WebhookRefused(f"host {target.host!r} resolves to {one}, a loopback, private, link-local or "
                                 "metadata address; list the host by name in WEBHOOK_ALLOWED_HOSTS to allow it")


async def resolve(target: Target, timeout: float) -> list[str]:
    """The addresses to connect to, every one checked; DNS runs in a thread, so the event loop never waits on it."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM), timeout)
    except (OSError, TimeoutError) as exc:
        raise WebhookUnresolved(f"host {target.host!r} does not resolve: {exc or 'timed out'}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        check_address(target, ipaddress.ip_address(address.split("%", 1)[0]))
    if not addresses:
        raise WebhookRefused(f"host {target.host!r} does not resolve")
    return addresses


_tls: ssl.SSLContext | None = None


def tls_context() -> ssl.SSLContext:
    global _tls
    if _tls is None:
        _tls = ssl.create_default_context()  # certificates verified against the system's CAs, host name checked
    return _tls


async def post(target: Target, addresses: list[str], body: bytes, headers: dict[str, str],
               send_by: float = math.inf) -> int:
    """POST ``body`` to the first of ``addresses`` that connects; returns the response's status code.

    Raises OSError (connection, TLS, a malformed answer); the caller bounds the time. Nothing is sent
    after ``send_by`` (time.monotonic()): a claim on the delivery may have passed to another replica.
    """
    head = "".join(f"{name}: {value}\r\n" for name, value in {
        "Host": target.host_header, "User-Agent": "agent-runner-webhook", "Content-Type": "application/json",
        "Content-Length": str(len(body)), **headers, "Connection": "close"}.items())
    request = f"POST {target.path} HTTP/1.1\r\n{head}\r\n".encode() + body
    tls = tls_context() if target.scheme == "https" else None
    error: OSError | None = None
    for address in addresses:
        try:
            reader, writer = await asyncio.open_connection(
                address, target.port, ssl=tls, server_hostname=target.host if tls else None)
        except OSError as exc:
            error = exc
            continue
        try:
            if time.monotonic() > send_by:  # the event loop stalled past the lease: another replica may send it
                raise OSError("the claim on the delivery ran out before it was sent")
            writer.write(request)
            await writer.drain()
            line = await reader.readline()
        except ValueError:  # a status line longer than the reader's limit
            raise OSError("the status line is too long") from None
        finally:
            writer.transport.abort()  # the status line is all we read; nothing to wait for
        match = STATUS_LINE.fullmatch(line)
        if match is None:
            raise OSError(f"not an HTTP/1.x status line: {line[:80]!r}")
        return int(match.group(1))
    raise error or OSError("no address to connect to")
