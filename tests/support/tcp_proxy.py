"""A small TCP proxy that injects network faults between clients and a server.

Clients connect to ``proxy.port``; each connection is relayed to the upstream address by
two pump threads. While running, a test can:

* ``set_latency(seconds)``: delay every chunk relayed, both ways;
* ``stall()`` / ``resume()``: stop relaying (connections stay open, bytes wait);
* ``drop_connections()``: close every open connection at once, as a network cut would;
* ``refuse(True)``: close new connections as soon as they are accepted;
* ``drop_next_reply()``: let the next request through to the server, then cut that
  connection before the server's reply reaches the client (a reply lost in transit:
  the operation took effect, the caller cannot know).

It never talks any protocol: it only moves bytes, or stops moving them.
"""

from __future__ import annotations

import socket
import threading
import time

from support.redis_server import free_port


class TcpProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._latency = 0.0
        self._flowing = threading.Event()
        self._flowing.set()
        self._refusing = False
        self._drop_reply = False
        self._closed = False
        self.dropped_replies = 0
        self._thread = threading.Thread(target=self._accept, name="tcp-proxy-accept", daemon=True)

    # -- controls -------------------------------------------------------------------

    def set_latency(self, seconds: float) -> None:
        self._latency = seconds

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def refuse(self, refusing: bool) -> None:
        self._refusing = refusing

    def drop_next_reply(self) -> None:
        self._drop_reply = True

    def drop_connections(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            _close_pair(pair)

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> "TcpProxy":
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        self._listener.close()
        self.drop_connections()

    def __enter__(self) -> "TcpProxy":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- relaying -------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._refusing:
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            pair = (client, server)
            with self._lock:
                self._pairs.append(pair)
            for source, sink, is_reply in ((client, server, False), (server, client, True)):
                threading.Thread(
                    target=self._pump, args=(pair, source, sink, is_reply), name="tcp-proxy-pump", daemon=True
                ).start()

    def _pump(self, pair: tuple[socket.socket, socket.socket], source: socket.socket, sink: socket.socket, is_reply: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                self._flowing.wait()
                if self._closed:
                    break
                if self._latency:
                    time.sleep(self._latency)
                if is_reply and self._drop_reply:
                    self._drop_reply = False
                    self.dropped_replies += 1
                    break
                sink.sendall(data)
        except OSError:
            pass
        with self._lock:
            if pair in self._pairs:
                self._pairs.remove(pair)
        _close_pair(pair)


def _close_pair(pair: tuple[socket.socket, socket.socket]) -> None:
    for sock in pair:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
