"""Webhooks: when a run with a ``webhook`` URL reaches a terminal state, POST the run object there, signed.

The delivery is owed from the moment the terminal state is stored: the
backend hands it to its delivery queue in the same step (memory: its save
calls the queue's ``owe``; Redis: the FINISH script writes it next to the
record, see backends/redis/webhooks.py). The ``Deliverer`` takes due deliveries
from the queue and makes at most ``MAX_ATTEMPTS`` attempts, backing off
exponentially; the run's state never waits on any of this.

A traced run's delivery carries the run span's ``traceparent`` header (docs/tracing.md).

Signatures (service/webhook_signing.py): ``Agent-Runner-Signature`` and the
Standard Webhooks ``webhook-id``/``webhook-timestamp``/``webhook-signature``,
made afresh for each attempt with every WEBHOOK_SECRET; the id is the
delivery's, the same on every attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from service import settings
from service import metrics
from service.backends.base import Backend, Deliveries, Delivery
from service.cancelling import cancel_and_wait
from service.backends.records import MAX_ATTEMPTS, Run, StoreUnavailable, split_record
from service.logs import log
from service.tracing import traceparent
from service.webhook_http import WebhookRefused, WebhookUnresolved, check_url, post, resolve
from service.webhook_signing import signature_headers

MAX_PARALLEL = 16  # attempts in flight at once per process; a slow receiver holds one for the timeout at most
POLL_SECONDS = 1.0  # the queue is looked at this often at least (Redis: other replicas' deliveries, leases)
REPORT_RETRY_SECONDS = 0.5


def backoff_seconds(attempt: int) -> float:
    """The wait after failed attempt ``attempt`` (1-based): base, 2 base, 4 base... (10 s base: ~5 min in all)."""
    return settings.current.webhook_backoff_seconds * 2.0 ** (attempt - 1)


def not_owed(run: Run, detail: str) -> None:
    """A delivery past the bound on those owed: dropped, logged as failed (attempt 0) and counted undelivered."""
    metrics.WEBHOOKS_UNDELIVERED.inc()
    log.error("webhook_failed", extra={"run_id": run.run_id, "attempt": 0, "status": None, "final": True,
                                       "detail": detail})


def owed_without_secret(run: Run) -> None:
    log.warning("webhook_owed_without_secret", extra={
        "run_id": run.run_id, "detail": "this replica has no WEBHOOK_SECRET and sends no webhooks: the delivery "
                                        "waits in Redis for a replica that has it"})


class Deliverer:
    """Takes due deliveries from a queue and attempts them, up to MAX_PARALLEL at once."""

    def __init__(self, queue: Deliveries) -> None:
        self.queue = queue
        self.wake = asyncio.Event()
        queue.on_owed = self.wake.set
        self.in_flight: set[asyncio.Task[None]] = set()
        self.task: asyncio.Task[None] | None = None
        self.stopping = False  # with a queue that is not durable, an attempt that fails now is the last

    def start(self) -> None:
        self.task = asyncio.create_task(self.deliver_forever(), name="webhook-deliverer")

    async def deliver_forever(self) -> None:
        while True:
            self.wake.clear()  # before claiming: a delivery owed meanwhile sets it again
            try:
                delivery, wait = await self.queue.claim()
            except StoreUnavailable:
                delivery, wait = None, POLL_SECONDS
            except Exception as exc:  # a reply it cannot read, say: logged, and it goes on (it must not die)
                log.error("webhook_deliverer_error", exc_info=exc, extra={"error": f"{type(exc).__name__}: {exc}"})
                delivery, wait = None, POLL_SECONDS
            if delivery is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), max(0.01, min(wait, POLL_SECONDS)))
                continue
            if delivery.exhausted:
                self.log_failed(delivery, None, "every attempt was made (the replica making the last one stopped)",
                                final=True)
                continue
            task = asyncio.create_task(self.attempt(delivery))
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)
            if len(self.in_flight) >= MAX_PARALLEL:
                await asyncio.wait(self.in_flight, return_when=asyncio.FIRST_COMPLETED)

    async def attempt(self, delivery: Delivery, last: bool = False) -> None:
        """One attempt: check the URL and its addresses again, POST, then record delivered, retry or give up."""
        config = settings.current
        status: int | None = None
        detail: str | None = None
        final = delivery.attempt >= MAX_ATTEMPTS
        started = time.monotonic()
        try:
            async with asyncio.timeout(config.webhook_timeout_seconds):
                target = check_url(delivery.url, config.webhook_allowed_hosts)
                addresses = await resolve(target, config.webhook_timeout_seconds)
                body, trace = split_record(delivery.body)  # the record's trace context is not the client's
                headers = signature_headers(config.webhook_secrets, delivery.message_id, int(time.time()), body)
                if trace is not None:
                    headers["traceparent"] = traceparent(trace) or ""
                status = await post(target, addresses, body, headers, send_by=delivery.send_by)
        except WebhookUnresolved as exc:  # a DNS failure may pass: retried like a network error
            detail = str(exc)
        except WebhookRefused as exc:  # the settings or the DNS changed since the run was accepted
            detail, final = f"refused: {exc}", True
        except TimeoutError:
            detail = f"timed out after {config.webhook_timeout_seconds:g} s"
        except Exception as exc:  # OSError (network, TLS, a malformed answer), or anything unforeseen: retried
            detail = f"{type(exc).__name__}: {exc}"
        duration_ms = round((time.monotonic() - started) * 1000, 1)
        if status is not None and 200 <= status < 300:
            metrics.WEBHOOK_ATTEMPTS.labels("delivered").inc()
            log.info("webhook_delivered", extra={"run_id": delivery.run_id, "attempt": delivery.attempt,
                                                 "status": status, "duration_ms": duration_ms})
            await self.report(delivery, None)
            return
        if status is not None and 300 <= status < 400:
            detail, final = "redirects are not followed", True
        elif status is not None and 400 <= status < 500 and status not in (408, 429):
            detail, final = "the receiver refused it (4xx)", True
        elif status is not None:
            detail = f"the receiver answered {status}"
        if not final and (last or (self.stopping and not self.queue.durable)):
            detail, final = f"{detail}; the service shut down (memory mode keeps no queue)", True
        self.log_failed(delivery, status, detail, final, duration_ms)
        await self.report(delivery, None if final else backoff_seconds(delivery.attempt))

    def log_failed(self, delivery: Delivery, status: int | None, detail: str | None, final: bool,
                   duration_ms: float | None = None) -> None:
        metrics.WEBHOOK_ATTEMPTS.labels("failed").inc()
        fields: dict[str, Any] = {"run_id": delivery.run_id, "attempt": delivery.attempt, "status": status,
                                  "detail": detail, "final": final, "duration_ms": duration_ms}
        if final:
            metrics.WEBHOOKS_UNDELIVERED.inc()
        else:
            fields["retry_in_s"] = backoff_seconds(delivery.attempt)
        log.log(logging.ERROR if final else logging.WARNING, "webhook_failed", extra=fields)

    async def report(self, delivery: Delivery, retry_in: float | None) -> None:
        """Record an outcome; if the store stays away, the lease ends and another attempt follows (at least once)."""
        deadline = time.monotonic() + settings.current.webhook_timeout_seconds
        while True:
            try:
                await self.queue.report(delivery, retry_in)
                self.wake.set()  # the loop may be waiting out a poll: let it see the new due time
                return
            except StoreUnavailable:
                if time.monotonic() >= deadline:
                    return
                await asyncio.sleep(REPORT_RETRY_SECONDS)

    async def stop(self) -> None:
        """Stop taking deliveries and let the attempts in flight end (they are bounded by the timeout).

        A queue that is not durable (memory): every delivery still owed gets one
        last attempt now, in parallel, within WEBHOOK_TIMEOUT_SECONDS; one that
        fails is logged ``webhook_failed`` with ``final`` true. A durable queue
        (Redis) keeps what is owed for the other replicas.
        """
        self.stopping = True
        if self.task is not None:
            await cancel_and_wait(self.task)
        if not self.queue.durable:
            for delivery in self.queue.take_all():
                delivery.attempt += 1
                task = asyncio.create_task(self.attempt(delivery, last=True))
                self.in_flight.add(task)
                task.add_done_callback(self.in_flight.discard)
        if self.in_flight:
            await asyncio.wait(set(self.in_flight), timeout=settings.current.webhook_timeout_seconds + 1)
        for task in list(self.in_flight):
            task.cancel()


def start_delivering(backend: Backend) -> Deliverer | None:
    """With WEBHOOK_SECRET set: the backend's delivery queue, wired to it, and a deliverer started on it.

    Without it no delivery is sent from here; with a shared backend a run this replica ends may still owe one
    (another replica, with the secret, accepted it): it waits there for a replica that has the secret, and is
    logged.
    """
    backend.on_not_owed = not_owed
    if not settings.current.webhook_secret:
        backend.on_finished = owed_without_secret
        return None
    queue = backend.webhook_deliveries(settings.current.webhook_timeout_seconds)
    backend.on_finished = queue.owe
    deliverer = Deliverer(queue)
    deliverer.start()
    return deliverer
