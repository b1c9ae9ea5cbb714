"""A throwaway local redis-server (Debian's ``redis-server`` binary) for tests, benchmarks and demos.

    with RedisServer(durable=True) as srv:     # a free loopback port, its own data directory
        url = srv.url                          # redis://127.0.0.1:PORT/0
        srv.kill()                             # SIGKILL, as a crash would
        srv.start()                            # same port, same data: the AOF is reloaded

``durable=True`` turns on the append-only file with ``appendfsync always``: every write the server
acknowledged survives a SIGKILL, which is what a store that must not lose counts is run with.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Optional

from guardian_plugin.devserver.netutil import free_port


class RedisServer:
    def __init__(self, port: Optional[int] = None, durable: bool = True, data_dir: Optional[str] = None,
                 binary: Optional[str] = None, appendfsync: str = "always"):
        self.binary = binary or shutil.which("redis-server")
        if not self.binary:
            raise RuntimeError("redis-server not found: install Debian's redis-server (scripts/setup.sh does)")
        self.port = port or free_port()
        self.durable = durable
        self.appendfsync = appendfsync  # always | everysec (survives a redis-server crash, not a power cut)
        self._own_dir = data_dir is None
        self.dir = data_dir or tempfile.mkdtemp(prefix="guardian-redis-")
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--save", "", "--logfile", os.path.join(self.dir, "redis.log")]
        args += ["--appendonly", "yes", "--appendfsync", self.appendfsync] if self.durable else ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self.proc.returncode}); log: {self.log_tail()}")
            if self._ready():
                return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} not ready after {timeout_s}s; log: {self.log_tail()}")

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log")) as f:
                return f.read()[-n:]
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no goodbye to clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
