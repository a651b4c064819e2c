"""The signature headers of a webhook attempt: Agent-Runner-Signature and the Standard Webhooks three.

Every secret in WEBHOOK_SECRET signs every attempt (rotation: a receiver
that knows any one of them verifies it).

- ``Agent-Runner-Signature: t=<unix time>,v1=<hex>[,v1=<hex>...]``, each an
  HMAC-SHA256 of ``"<t>.<body>"`` keyed with a secret's UTF-8 bytes as
  written (Stripe's scheme: its verifier accepts it).
- ``webhook-id`` (the delivery's, the same on every attempt), ``webhook-timestamp``
  (this attempt's) and ``webhook-signature: v1,<base64>[ v1,<base64>...]``, each
  an HMAC-SHA256 of ``"<id>.<timestamp>.<body>"`` keyed with a secret's key
  (``settings.webhook_key``: the base64-decoded part of ``whsec_<base64>``,
  else its UTF-8 bytes), as the Standard Webhooks specification says.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from service.settings import webhook_key


def agent_runner_signature(secrets: tuple[str, ...], timestamp: int, body: bytes) -> str:
    """The Agent-Runner-Signature header value for ``body`` sent at ``timestamp``."""
    signed = str(timestamp).encode() + b"." + body
    return ",".join([f"t={timestamp}", *(f"v1={hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()}"
                                         for secret in secrets)])


def standard_signature(secrets: tuple[str, ...], message_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header value: one ``v1,<base64>`` per secret, space-separated."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac.new(webhook_key(secret), signed, hashlib.sha256).digest()).decode()
                    for secret in secrets)


def signature_headers(secrets: tuple[str, ...], message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Every signature header of one attempt of the delivery ``message_id``, made at ``timestamp``."""
    return {"Agent-Runner-Signature": agent_runner_signature(secrets, timestamp, body),
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": standard_signature(secrets, message_id, timestamp, body)}
