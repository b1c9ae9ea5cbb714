"""Start and stop a local TorchServe (tests, the demo, the benchmark): loopback only, explicit free
ports, token auth off, no config snapshots, its own temp dir (so its pid file and extracted models
never collide with another TorchServe on the host), one torch thread per worker."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Dict, Optional

import requests

from guardian_plugin.devserver.netutil import free_ports, wait_until_ready


def torchserve_bin() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "torchserve")
    return exe if os.path.exists(exe) else (shutil.which("torchserve") or "torchserve")


def build_archive(name: str, serialized_file: str, handler: str, export_path: str, extra_files=(),
                  config_file: Optional[str] = None, version: str = "1.0", model_file: Optional[str] = None) -> str:
    """torch-model-archiver, as a user runs it. Returns the .mar path."""
    exe = os.path.join(os.path.dirname(sys.executable), "torch-model-archiver")
    exe = exe if os.path.exists(exe) else "torch-model-archiver"
    os.makedirs(export_path, exist_ok=True)
    cmd = [exe, "--model-name", name, "--version", version, "--serialized-file", serialized_file,
           "--handler", handler, "--export-path", export_path, "--force"]
    if model_file:
        cmd += ["--model-file", model_file]
    if extra_files:
        cmd += ["--extra-files", ",".join(extra_files)]
    if config_file:
        cmd += ["--config-file", config_file]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return os.path.join(export_path, f"{name}.mar")


class TorchServe:
    """One TorchServe process in ``workdir`` serving ``model_store``."""

    def __init__(self, model_store: str, workdir: str, env: Optional[Dict[str, str]] = None,
                 extra_config: Optional[Dict[str, str]] = None):
        self.model_store = os.path.abspath(model_store)
        self.workdir = os.path.abspath(workdir)
        self.env = dict(env or {})
        self.extra_config = dict(extra_config or {})
        self.proc: Optional[subprocess.Popen] = None
        self.inference_port = self.management_port = self.metrics_port = self.grpc_inference_port = None

    # ------------------------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout_s: float = 120.0) -> "TorchServe":
        os.makedirs(self.workdir, exist_ok=True)
        tmp = os.path.join(self.workdir, "tmp")
        os.makedirs(tmp, exist_ok=True)
        self.inference_port, self.management_port, self.metrics_port, grpc_inf, grpc_mgmt = free_ports(5)
        self.grpc_inference_port = grpc_inf
        conf = {
            "inference_address": f"http://127.0.0.1:{self.inference_port}",
            "management_address": f"http://127.0.0.1:{self.management_port}",
            "metrics_address": f"http://127.0.0.1:{self.metrics_port}",
            # gRPC listens on 7070/7071 by default: two servers on one host would collide
            "grpc_inference_address": "127.0.0.1",
            "grpc_management_address": "127.0.0.1",
            "grpc_inference_port": str(grpc_inf),
            "grpc_management_port": str(grpc_mgmt),
            "model_store": self.model_store,
            "metrics_mode": "prometheus",
            "model_metrics_auto_detect": "true",
            "default_workers_per_model": "1",
            "number_of_netty_threads": "2",
            "netty_client_threads": "2",
            "job_queue_size": "200",
            "default_response_timeout": "120",
            "disable_system_metrics": "true",
        }
        conf.update(self.extra_config)
        conf_path = os.path.join(self.workdir, "config.properties")
        with open(conf_path, "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in conf.items())
        env = dict(os.environ)
        env.update({"TEMP": tmp, "TMPDIR": tmp, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                    "LOG_LOCATION": os.path.join(self.workdir, "logs"),
                    "METRICS_LOCATION": os.path.join(self.workdir, "logs")})
        env.update(self.env)
        self.log_path = os.path.join(self.workdir, "torchserve.out")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [torchserve_bin(), "--start", "--foreground", "--ncs", "--disable-token-auth", "--enable-model-api",
             "--model-store", self.model_store, "--ts-config", conf_path],
            cwd=self.workdir, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        why = wait_until_ready(self.proc, self.url + "/ping", timeout_s)
        if why:
            self.stop()
            raise RuntimeError(f"TorchServe {why} (/ping); see {self.log_path}")
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop the server and its workers (the process group this object started)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        # workers are in the same session; make sure none outlives the frontend
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc = None
        self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------------------ management
    def register(self, mar: str, name: Optional[str] = None, workers: int = 2, batch_size: int = 4,
                 max_batch_delay_ms: int = 20, timeout_s: float = 300.0) -> str:
        """Register a .mar from the model store (synchronously, workers started)."""
        params = {"url": os.path.basename(mar), "initial_workers": workers, "batch_size": batch_size,
                  "max_batch_delay": max_batch_delay_ms, "synchronous": "true", "response_timeout": 120}
        name = name or os.path.splitext(os.path.basename(mar))[0]
        params["model_name"] = name
        r = requests.post(self.management_url + "/models", params=params, timeout=timeout_s)
        if r.status_code != 200:
            raise RuntimeError(f"registering {mar} failed: HTTP {r.status_code} {r.text}; see {self.log_path}")
        return name

    def unregister(self, name: str) -> None:
        requests.delete(f"{self.management_url}/models/{name}", timeout=120)

    def predict(self, model: str, body: bytes, headers: Optional[dict] = None, timeout_s: float = 60.0):
        return requests.post(f"{self.url}/predictions/{model}", data=body, headers=headers or {}, timeout=timeout_s)

    def metrics(self) -> str:
        return requests.get(self.metrics_url, timeout=10).text

    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-n:]).decode("utf-8", "replace")
        except OSError:
            return ""


def new_workdir(prefix: str = "guardian-ts-") -> str:
    return tempfile.mkdtemp(prefix=prefix)
