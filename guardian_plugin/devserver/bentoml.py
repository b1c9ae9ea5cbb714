"""Start and stop a real `bentoml serve` for tests, benchmarks and the demo (loopback only)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from guardian_plugin.devserver.netutil import free_port, wait_until_ready

__all__ = ["BentoServer", "free_port"]


class BentoServer:
    """A real `bentoml serve TARGET` subprocess on a free loopback port, stopped with stop()."""

    def __init__(self, target: str, env: dict, log_path: str, cwd: str | None = None, timeout_s: float = 240):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "bentoml"), "serve", target, "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        why = wait_until_ready(self.proc, self.url + "/readyz", timeout_s)
        if why:
            log = self.tail()
            self.stop()
            raise RuntimeError(f"bentoml serve {why}:\n{log}")

    def tail(self, n: int = 4000) -> str:
        self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read()[-n:].decode("utf-8", "replace")

    def text(self) -> str:
        self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()
