"""Small network helpers shared by the server launchers (TorchServe, BentoML, redis)."""

from __future__ import annotations

import socket
import subprocess
import time


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on the loopback interface: every socket stays bound until all are
    chosen (one at a time, the kernel can hand a just-released port out again: TorchServe once got the
    same port for metrics and gRPC management and exited)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    return free_ports(1)[0]


def wait_until_ready(proc: subprocess.Popen, url: str, timeout_s: float) -> str | None:
    """Poll ``url`` until it answers 200. Returns None when ready, else why not: the process exited
    (with its code) or the deadline passed."""
    import requests

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            return f"exited with {proc.returncode}"
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return None
        except requests.RequestException:
            pass
        time.sleep(0.5)
    return f"not ready after {timeout_s:.0f} s"
