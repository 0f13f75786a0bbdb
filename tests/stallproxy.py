"""A TCP proxy in front of PostgreSQL that can stall: while stalled it
forwards nothing either way and closes nothing, as a network that drops
every packet looks to both ends (no RST, no FIN; the kernel's own ACKs
aside). New connections are accepted and stalled too."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading


class StallProxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        self._pairs: dict[socket.socket, socket.socket] = {}
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()
        self._wake_w.send(b"x")

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        self._wake_w.send(b"x")
        self._thread.join(5)
        with self._lock:
            for s in [*self._pairs, *self._held]:
                s.close()
        self.listener.close()

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        while not self._closed:
            for key, _ in sel.select(timeout=0.2):
                if key.data == "wake":
                    self._wake_r.recv(64)
                elif key.data == "accept":
                    client, _ = self.listener.accept()
                    try:
                        server = socket.create_connection(self.target, timeout=5)
                    except OSError:
                        # Nothing behind it: hold the client, a black hole.
                        self._held.append(client)
                        continue
                    with self._lock:
                        self._pairs[client] = server
                        self._pairs[server] = client
                    sel.register(client, selectors.EVENT_READ, "data")
                    sel.register(server, selectors.EVENT_READ, "data")
                elif self._flowing.is_set():
                    self._forward(sel, key.fileobj)  # type: ignore[arg-type]
            if not self._flowing.is_set():
                # Stalled: read nothing, so the kernels' buffers fill and the
                # senders wait, as on a network that drops their packets.
                self._flowing.wait(0.2)

    def _forward(self, sel: selectors.BaseSelector, src: socket.socket) -> None:
        dst = self._pairs.get(src)
        try:
            data = src.recv(65536)
        except OSError:
            data = b""
        if data and dst is not None:
            try:
                dst.sendall(data)
                return
            except OSError:
                pass
        for s in (src, dst):
            if s is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(s)
            with self._lock:
                self._pairs.pop(s, None)
            s.close()
