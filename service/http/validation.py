"""JSON in and out of HTTP: read and validate request bodies and query values, write JSON responses.

Every refusal is an ``HTTPException`` whose detail says exactly what is wrong.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

import agents
from service import settings
from service.backends.records import encode
from service.http.limits import BODY_TIMEOUT_SCOPE_KEY
from service.logs import log
from service.webhook_http import WebhookRefused, check_url, resolve

MAX_JSON_DEPTH = 32  # request bodies nested deeper are refused with 400
REQUEST_FIELDS = ("agent_type", "user_id", "input", "on_busy", "webhook")
ON_BUSY_VALUES = ("reject", "enqueue", "interrupt")
IDEMPOTENCY_KEY_CHARS = 255  # a key: 1 to this many printable ASCII characters
IDEMPOTENCY_HEADER_RE = re.compile(r"[\x20-\x7e]{1,%d}" % (2 * IDEMPOTENCY_KEY_CHARS + 2))  # its quoted form too
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def json_response(content: Any, status_code: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    if not isinstance(content, bytes):  # strict JSON: NaN and Infinity raise rather than reach a client
        content = encode(content)
    return Response(content, status_code=status_code, headers=headers, media_type="application/json")


def short(value: Any) -> str:
    """A value as it appears in an error message, cut to a readable length."""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_uuid(value: str, name: str) -> str:
    if not UUID_RE.fullmatch(value):
        raise HTTPException(400, f"{name} must be a UUID, got {short(value)}")
    return value.lower()


def json_depth_exceeds(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class NonFiniteNumber(ValueError):
    """A JSON number too large for a float (1e999): it would be stored as inf and served back as Infinity."""


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NonFiniteNumber(text)
    return value


STRICT_JSON = json.JSONDecoder(parse_constant=reject_constant, parse_float=finite_float)  # made once, not per body


def header(request: Request, name: bytes) -> str | None:
    """The first value of a request header (``name`` in lower case, as ASGI gives names), or None.

    On the hot paths instead of ``request.headers.get``, which builds a Headers
    object and, for a missing header, raises and catches a KeyError.
    """
    for key, value in request.scope["headers"]:
        if key == name:
            found: str = value.decode("latin-1")
            return found
    return None


async def read_json(request: Request) -> Any:
    """The request's JSON body, or an HTTPException saying exactly what is wrong with it."""
    media_type, _, params = (header(request, b"content-type") or "").partition(";")
    if media_type.strip().lower() != "application/json":
        raise HTTPException(415, "Content-Type must be application/json")
    charset = params.strip().lower()
    if charset and charset.replace(" ", "").replace('"', "") not in ("charset=utf-8", "charset=utf8"):
        raise HTTPException(415, "Content-Type charset must be utf-8")
    limit = settings.current.max_body_bytes
    declared = header(request, b"content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"Request body is larger than {limit} bytes")
    body, more = b"", True
    while more:  # ASGI messages read here rather than through request.stream(), an async generator per body
        message = await request.receive()
        if message["type"] == "http.disconnect":  # nobody is left to answer; the access line records a 400
            raise HTTPException(400, "Client disconnected before the request body was complete")
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if more and BODY_TIMEOUT_SCOPE_KEY in request.scope:  # set by limits.py when the body missed its deadline
            raise HTTPException(408, f"Request body was not complete within "
                                     f"{settings.current.body_timeout_seconds:g} seconds")
        if len(body) > limit:
            raise HTTPException(413, f"Request body is larger than {limit} bytes")
    if not body.strip():
        raise HTTPException(400, "Request body is empty; send a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(400, "Request body is not valid UTF-8") from None
    try:
        if text.startswith("\ufeff"):  # refused by json.loads, which checks this before decoding
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        data = STRICT_JSON.decode(text)
    except RecursionError:
        raise HTTPException(400, f"Request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except NonFiniteNumber as exc:
        raise HTTPException(400, f"Request body has a number too large to be finite: {short(str(exc))}") from None
    except ValueError as exc:
        raise HTTPException(400, f"Request body is not valid JSON: {exc}") from None
    # Nesting needs an opening bracket per level: a body with fewer brackets than the limit needs no walk.
    if body.count(b"{") + body.count(b"[") > MAX_JSON_DEPTH and json_depth_exceeds(data, MAX_JSON_DEPTH):
        raise HTTPException(400, f"Request body is nested deeper than {MAX_JSON_DEPTH} levels")
    return data


def parse_run_request(data: Any) -> tuple[type[agents.BaseAgent], str, dict[str, Any], str, str | None]:
    """Validate a POST /agents/run body; returns the agent class, user_id, input, on_busy and webhook.

    The webhook URL is checked here without I/O; ``check_webhook_resolves`` checks where it points.
    """
    if not isinstance(data, dict):
        raise HTTPException(400, "Request body must be a JSON object")
    unknown = sorted(set(data) - set(REQUEST_FIELDS))
    if unknown:
        named = ", ".join(short(name) for name in unknown[:5])
        if len(unknown) > 5:
            named += f" and {len(unknown) - 5} more"
        raise HTTPException(400, f"Unknown field(s): {named}; allowed: {', '.join(REQUEST_FIELDS)}")
    for name in ("agent_type", "user_id"):
        if name not in data:
            raise HTTPException(400, f"{name} is required")
        if not isinstance(data[name], str):
            raise HTTPException(400, f"{name} must be a string")
    user_id = check_uuid(data["user_id"], "user_id")
    agent_input = data.get("input", {})
    if not isinstance(agent_input, dict):
        raise HTTPException(400, "input must be a JSON object")
    on_busy = data.get("on_busy", settings.current.on_busy)
    if on_busy not in ON_BUSY_VALUES:
        raise HTTPException(400, f"on_busy must be one of {', '.join(ON_BUSY_VALUES)}, got {short(on_busy)}")
    webhook = data.get("webhook")
    if webhook is not None:
        if not isinstance(webhook, str):
            raise HTTPException(400, "webhook must be a string: an http:// or https:// URL")
        if not settings.current.webhook_secret:
            raise HTTPException(400, "webhook: webhooks are off on this service (WEBHOOK_SECRET is not set)")
        try:
            check_url(webhook, settings.current.webhook_allowed_hosts)
        except WebhookRefused as exc:
            raise HTTPException(400, f"webhook {exc}") from None
    agent_type = data["agent_type"]
    agent_cls = agents.registry.get(agent_type)
    if agent_cls is None:
        supported = ", ".join(sorted(agents.registry))
        log.warning("unsupported_agent_type", extra={"agent_type": agent_type[:200], "user_id": user_id})
        raise HTTPException(400, f"Unsupported agent_type {short(agent_type)}; supported types: {supported}")
    return agent_cls, user_id, agent_input, on_busy, webhook


async def check_webhook_resolves(webhook: str) -> None:
    """400 unless the webhook's host resolves, and only to addresses it may call (checked again at delivery)."""
    config = settings.current
    try:
        await resolve(check_url(webhook, config.webhook_allowed_hosts), config.webhook_timeout_seconds)
    except WebhookRefused as exc:
        raise HTTPException(400, f"webhook {exc}") from None


def check_idempotency_key(values: list[str]) -> str:
    """The key the one Idempotency-Key header names: 1 to 255 printable ASCII characters, sent as they are
    (a token, as before the draft) or as a Structured Field string (RFC 8941: ``"abc"``, with ``\\"`` and
    ``\\\\`` escapes), which the IETF draft defines; ``"abc"`` and ``abc`` are the same key."""
    if len(values) != 1:
        raise HTTPException(400, f"Send one Idempotency-Key header, not {len(values)}")
    value = values[0]
    key = unquote_sf_string(value) if value.startswith('"') and IDEMPOTENCY_HEADER_RE.fullmatch(value) else value
    if not IDEMPOTENCY_HEADER_RE.fullmatch(value) or not 1 <= len(key) <= IDEMPOTENCY_KEY_CHARS:
        raise HTTPException(400, f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_CHARS} printable ASCII characters, "
                                 f"bare or as a quoted string, got {short(value)}")
    return key


def unquote_sf_string(value: str) -> str:
    """The characters an RFC 8941 sf-string (``"..."``, printable ASCII, ``\\"`` and ``\\\\`` escapes) holds;
    HTTPException 400 for one that is unterminated, has another escape, or anything after its closing quote."""
    chars: list[str] = []
    escaped = False
    for position, char in enumerate(value[1:], 1):
        if escaped:
            if char not in '"\\':
                raise HTTPException(400, f"Idempotency-Key {short(value)}: \\{char} is not an escape a quoted "
                                         'string may hold (only \\" and \\\\)')
            chars.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            if position != len(value) - 1:
                raise HTTPException(400, f"Idempotency-Key {short(value)} has characters after its closing quote")
            if not chars:
                raise HTTPException(400, 'Idempotency-Key "" is empty: a key has 1 character or more')
            return "".join(chars)
        else:
            chars.append(char)
    raise HTTPException(400, f"Idempotency-Key {short(value)} is an unterminated quoted string")


def parse_wait(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        wait = float(raw)
    except ValueError:
        wait = math.nan
    if not 0 < wait <= 60:  # also refuses nan
        raise HTTPException(400, f"wait must be a number of seconds greater than 0 and at most 60, got {short(raw)}")
    return wait


def parse_limit(raw: str | None) -> int:
    if raw is None:
        return 50
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise HTTPException(400, f"limit must be an integer from 1 to 1000, got {short(raw)}")
    return int(raw)
