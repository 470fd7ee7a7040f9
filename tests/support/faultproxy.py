"""A TCP proxy in front of the S3 server that fails the way networks and stores fail.

Modes (`FaultProxy.set`):
- `pass`: bytes flow both ways;
- `refuse`: nothing listens on the port (connection refused) and open connections are reset;
- `blackhole`: connections are accepted, and no byte is forwarded either way on any of them,
  new or open, until the mode changes (a dropped route, a dead load balancer);
- `slow`: every chunk waits `delay` seconds before it is forwarded.
A hung server is the real one stopped with SIGSTOP (see `MotoProcess`), not a proxy mode.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from codistill.net import free_port

MODES = ("pass", "refuse", "blackhole", "slow")
CHUNK = 65536


class FaultProxy:
    def __init__(self, upstream: tuple[str, int], delay: float = 0.5):
        self.upstream, self.delay = upstream, delay
        self.port = free_port()
        self.mode = "pass"
        self.injected: list[str] = []  # every mode set other than pass, in order
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._closed = False
        self._listen()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(self, mode: str) -> None:
        assert mode in MODES, mode
        if mode != "pass":
            self.injected.append(mode)
        previous, self.mode = self.mode, mode
        if mode == "refuse":
            self._unlisten()
            with self._lock:
                for s in list(self._open):
                    _reset(s)
        elif previous == "refuse":
            self._listen()

    def close(self) -> None:
        self._closed = True
        self._unlisten()
        with self._lock:
            for s in list(self._open):
                _reset(s)

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _unlisten(self) -> None:
        if self._listener is not None:
            self._listener.close()  # new connections are refused from now on
            self._listener = None

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by `refuse` or `close`
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        with self._lock:
            if self.mode == "refuse":  # accepted just before the refusal began: reset it too
                for sock in (client, upstream):
                    _reset(sock)
                return
            self._open.update((client, upstream))
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    break
                while self.mode == "blackhole" and not self._closed:
                    time.sleep(0.05)  # held, as a dropped route holds nothing: never delivered
                if self.mode == "slow":
                    time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with self._lock:
                    self._open.discard(s)
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


def _reset(s: socket.socket) -> None:
    """End a connection as a crashed server does, mid-request. The shutdown matters: a close
    alone does not wake a pump thread blocked in recv on it, and then the connection stays open,
    silent, until the client's read timeout (the black hole, not a refusal)."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


class MotoProcess:
    """moto's S3 server as its own process, so a test can hang it (SIGSTOP) and resume it."""

    def __init__(self, log: Path):
        self.port = free_port()
        moto = Path(sys.executable).parent / "moto_server"
        self.proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1)
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"moto_server did not start; see {log}")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hang(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
