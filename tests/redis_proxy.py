"""A TCP proxy in front of Redis that can drop or hold what a client sends: connections lost mid-transaction."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

from conftest import free_port


class RedisProxy:
    """Forwards 127.0.0.1:<port> to a Redis port. Rules look at each chunk a client sends.

    ``drop(match, times)``: the next ``times`` chunks that ``match`` are not
    forwarded and their connection is closed (the command never reaches Redis).
    ``hold(match, seconds, then)``: a matching chunk calls ``then`` and waits
    ``seconds`` before it is forwarded. ``lose_reply(match, then)``: the next matching chunk reaches Redis,
    but its reply does not: once it is back, ``then`` runs and the connection is closed instead (a connection
    dropped after the command ran). ``drop_reply(match, times)``: the same for the next ``times`` matching
    chunks, with nothing to run. ``cut_all()`` closes every open connection. ``freeze()`` stops forwarding
    anything either way but keeps every socket open (a black-holed network: no reply, no reset) until ``thaw()``.
    It forwards any TCP protocol (PostgreSQL too); ``url`` is only for Redis.
    """

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()  # a given port: a proxy that comes back where the clients knew it
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dropped = 0
        self._drops: list[list] = []  # [match, times left]
        self._holds: list[list] = []  # [match, seconds, then, used]
        self._losses: list[list] = []  # [match, then, times left]
        self._losing: dict[socket.socket, Callable[[], None] | None] = {}  # upstream -> then, reply not passed
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def drop(self, match: Callable[[bytes], bool], times: int) -> None:
        with self._lock:
            self._drops.append([match, times])

    def hold(self, match: Callable[[bytes], bool], seconds: float, then: Callable[[], None]) -> None:
        with self._lock:
            self._holds.append([match, seconds, then, False])

    def lose_reply(self, match: Callable[[bytes], bool], then: Callable[[], None] | None = None,
                   times: int = 1) -> None:
        with self._lock:
            self._losses.append([match, then, times])

    def drop_reply(self, match: Callable[[bytes], bool], times: int) -> None:
        self.lose_reply(match, None, times)

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def cut_all(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            self._close(conn)

    def close(self) -> None:
        self._closed = True
        self._server.close()
        self.cut_all()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if from_client and not self._allowed(chunk):
                    break
                if from_client:
                    self._mark_lost_reply(chunk, sink)
                elif source in self._losing:
                    with self._lock:
                        then = self._losing.pop(source)
                        self.dropped += 1
                    if then is not None:
                        then()
                    break
                self._flowing.wait()
                sink.sendall(chunk)
        except OSError:
            pass
        self._close(source)
        self._close(sink)

    def _allowed(self, chunk: bytes) -> bool:
        with self._lock:
            drops, holds = list(self._drops), list(self._holds)
        for rule in drops:  # matchers run outside the lock: one may itself talk to Redis through this proxy
            if rule[1] > 0 and rule[0](chunk):
                with self._lock:
                    if rule[1] > 0:
                        rule[1] -= 1
                        self.dropped += 1
                        return False
        held = None
        for rule in holds:
            if not rule[3] and rule[0](chunk):
                with self._lock:
                    if not rule[3]:
                        rule[3], held = True, rule
                        break
        if held is not None:
            held[2]()
            time.sleep(held[1])
        return True

    def _mark_lost_reply(self, chunk: bytes, upstream: socket.socket) -> None:
        with self._lock:
            losses = list(self._losses)
        for rule in losses:
            if rule[2] > 0 and rule[0](chunk):
                with self._lock:
                    if rule[2] > 0:
                        rule[2] -= 1
                        self._losing[upstream] = rule[1]
                        return

    def _close(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.discard(conn)
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.close()
