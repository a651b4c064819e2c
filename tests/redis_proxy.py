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
    ``seconds`` before it is forwarded. ``drop_reply(match, times)``: the next
    ``times`` chunks that ``match`` reach Redis, but the reply does not come back:
    the connection is closed when it arrives (a command that ran, its answer lost).
    ``cut_all()`` closes every open connection.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dropped = 0
        self._drops: list[list] = []  # [match, times left]
        self._holds: list[list] = []  # [match, seconds, then, used]
        self._reply_drops: list[list] = []  # [match, times left]
        self._swallow: set[socket.socket] = set()  # upstream sockets whose next reply is dropped
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def drop(self, match: Callable[[bytes], bool], times: int) -> None:
        with self._lock:
            self._drops.append([match, times])

    def hold(self, match: Callable[[bytes], bool], seconds: float, then: Callable[[], None]) -> None:
        with self._lock:
            self._holds.append([match, seconds, then, False])

    def drop_reply(self, match: Callable[[bytes], bool], times: int) -> None:
        with self._lock:
            self._reply_drops.append([match, times])

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
                if from_client and self._reply_dropped(chunk):
                    with self._lock:
                        self._swallow.add(sink)
                if not from_client and source in self._swallow:
                    with self._lock:
                        self._swallow.discard(source)
                        self.dropped += 1
                    break
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

    def _reply_dropped(self, chunk: bytes) -> bool:
        with self._lock:
            rules = list(self._reply_drops)
        for rule in rules:
            if rule[1] > 0 and rule[0](chunk):
                with self._lock:
                    if rule[1] > 0:
                        rule[1] -= 1
                        return True
        return False

    def _close(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.discard(conn)
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.close()
