"""Shared by the serving tests: the expected answers of the BentoML example service and starting a
real TorchServe with its models registered."""

from __future__ import annotations

import io

import numpy as np
import torch


def bento_oracle(detector: str):
    """``answer(images) -> (probabilities, flags)`` for 28 px uint8 images, one image at a time: the
    unprotected service's own API method called in this process, and the verdict of the detector
    artifact at ``detector`` on the same preprocessed tensor."""
    import PIL.Image

    from bento.client import png
    from bento.service import MNISTUnprotected
    from guardian_plugin.guardian import Guardian

    torch.set_num_threads(1)
    unprotected = MNISTUnprotected.inner()
    guardian = Guardian.from_artifact(detector)

    def answer(images):
        out, flags = [], []
        for a in images:
            im = PIL.Image.open(io.BytesIO(png(a)))
            out.append(np.array(unprotected.classify(im), dtype=np.float64))
            flags.append(bool(guardian.detect(unprotected.preprocess(im))[0][0]))
        return np.stack(out), flags

    return answer


def bento_serve_env(tmp, config, workers: int = 1) -> dict:
    """The environment of a test's `bentoml serve` of the example service: one thread, BentoML's home under
    ``tmp``, the guard config ``config`` (GUARDIAN_CONFIG), ``workers`` workers, no ledger or key override."""
    import os

    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GUARDIAN_TORCH_THREADS": "1",
                "BENTOML_HOME": os.path.join(str(tmp), "bentoml_home"), "BENTOML_DO_NOT_TRACK": "True",
                "GUARDIAN_CONFIG": str(config), "MNIST_BENTO_WORKERS": str(workers)})
    env.pop("GUARDIAN_LEDGER", None)
    env.pop("GUARDIAN_KEY_SECRET", None)
    return env


def start_torchserve(store: str, workdir: str, models: dict, batch_size: int, max_batch_delay_ms: int):
    """A started TorchServe on ``store`` with ``models`` ({name: workers}, each ``name.mar``) registered;
    on a failed registration its log tail is printed and the server stopped before the error is raised."""
    from guardian_plugin.devserver.torchserve import TorchServe

    ts = TorchServe(store, workdir).start()
    try:
        for name, workers in models.items():
            ts.register(f"{name}.mar", name, workers=workers, batch_size=batch_size,
                        max_batch_delay_ms=max_batch_delay_ms)
    except Exception:
        print(ts.log_tail(80))
        ts.stop()
        raise
    return ts


def odd_image_bodies(size: int = 28) -> dict:
    """Image files of every kind a client can send, ``name -> (bytes, out_of_range)``: float TIFFs in
    and out of [0, 1] (``out_of_range`` True: a preprocess that keeps float values gives pixels outside
    [0, 1]), constant float TIFFs at 1e3, 1e10, 1e30 and -1e30, a 16-bit PNG, a palette PNG, a CMYK TIFF
    and an RGBA PNG (``out_of_range`` None: depends on the service's preprocess)."""
    import PIL.Image

    rng = np.random.default_rng(0)

    def save(im, fmt):
        buf = io.BytesIO()
        im.save(buf, fmt)
        return buf.getvalue()

    def ftiff(a):
        return save(PIL.Image.fromarray(a.astype(np.float32), mode="F"), "TIFF")

    u = rng.random((size, size))
    out = {
        "float tiff in [0, 1]": (ftiff(u), False),
        "float tiff just above 1": (ftiff(1.0 + 0.05 * u), True),
        "float tiff in [-0.05, 1.05] with noise": (ftiff(-0.05 + 1.1 * u), True),
    }
    for v in (1e3, 1e10, 1e30, -1e30):
        out[f"constant float tiff {v:g}"] = (ftiff(np.full((size, size), v)), True)
    out["16-bit png"] = (save(PIL.Image.fromarray((u * 65535).astype(np.uint16)), "PNG"), None)
    out["palette png"] = (save(PIL.Image.fromarray((u * 255).astype(np.uint8)).convert("P"), "PNG"), None)
    out["cmyk tiff"] = (save(PIL.Image.fromarray((u * 255).astype(np.uint8)).convert("CMYK"), "TIFF"), None)
    out["rgba png"] = (save(PIL.Image.fromarray((u * 255).astype(np.uint8)).convert("RGBA"), "PNG"), None)
    return out


# ---------------------------------------------------------------------------------- issued API keys
def minted_keys(key: str) -> list:
    """Keys an attacker can make without the service's key secret, given one issued ``key`` it holds
    (guardian_plugin.keys): random strings, other formats, forged HMACs, another secret's."""
    from guardian_plugin.keys import make_key

    _, client, key_id, mac = key.split("_")
    other = "bob" if client != "bob" else "carol"
    return ["mallory", "k" * 5000, "gk_" + "a" * 200, key.upper(), key + "0", key[:-1], "key:" + client,
            f"gk_{other}_{key_id}_{mac}",                                 # another client id, same mac
            f"gk_{client}_{'0' * 16}_{mac}",                              # another key id
            f"gk_{client}_{key_id}_{'%032x' % (int(mac, 16) ^ 1)}",      # one bit of the mac flipped
            "gk_" + "_".join([client, key_id, mac[:16]]),                 # a short mac
            make_key("another-secret-0123456789", client, key_id),        # signed with another secret
            make_key("another-secret-0123456789", other, "0123456789abcdef")]


def refused_within(send, revoke, delay_s: float, margin_s: float = 1.0, after: int = 8) -> float:
    """Revoke a key (``revoke()``), keep sending with it (``send() -> HTTP status``) for ``delay_s`` +
    ``margin_s`` seconds, then ``after`` more times: every answer must be 200 or 401, no request sent
    later than ``delay_s`` + ``margin_s`` after the revocation may be served, and the last ``after`` must
    all be 401. Returns the seconds from the revocation to the send of the last request served (0.0
    when none was)."""
    import time

    t0 = time.monotonic()
    revoke()
    last_served = 0.0
    while time.monotonic() - t0 < delay_s + margin_s:
        sent = time.monotonic() - t0
        code = send()
        assert code in (200, 401), code
        if code == 200:
            last_served = sent
            assert sent <= delay_s + margin_s, f"a revoked key was served {sent:.2f} s after its revocation"
        time.sleep(0.05)
    codes = [send() for _ in range(after)]
    assert codes == [401] * after, codes
    print(f"refused_within: the revoked key was last served {last_served:.2f} s after its revocation "
          f"(allowed: {delay_s} + {margin_s} s)")
    return last_served


def torchserve_grpc(port: int, out_dir: str):
    """``(stub, pb2)``: a client of TorchServe's gRPC inference API on 127.0.0.1:``port``, made the way
    TorchServe's docs make it (``grpc_tools.protoc`` on inference.proto), from the protos inside the
    installed frontend jar (inference.proto imports google/rpc/status.proto, shipped there too). Needs
    the test extra's grpcio and grpcio-tools."""
    import glob
    import importlib
    import os
    import sys
    import zipfile

    import grpc
    from grpc_tools import protoc

    import ts

    jar = glob.glob(os.path.join(os.path.dirname(ts.__file__), "frontend", "model-server.jar"))[0]
    src = os.path.join(out_dir, "proto")
    with zipfile.ZipFile(jar) as z:
        for name in ("inference.proto", "google/rpc/status.proto"):
            z.extract(name, src)
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{src}", f"-I{include}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
                      "inference.proto", "google/rpc/status.proto"])
    if rc != 0:
        raise RuntimeError(f"grpc_tools.protoc failed on TorchServe's inference.proto ({rc})")
    if out_dir not in sys.path:
        sys.path.insert(0, out_dir)
    importlib.invalidate_caches()
    import google.rpc  # noqa: F401 - the namespace package now includes out_dir/google/rpc

    pb2 = importlib.import_module("inference_pb2")
    pb2_grpc = importlib.import_module("inference_pb2_grpc")
    return pb2_grpc.InferenceAPIsServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}")), pb2


IDENTITY_HEADERS = ("X-Client-Id", "X-Gateway-Secret", "X-Api-Key")
LETTER_CASES = (str.lower, str.upper, lambda s: s, str.swapcase)  # x-client-id X-CLIENT-ID X-Client-Id x-cLIENT-iD


def spoofing_parts(value: str):
    """Multipart parts ``(name, content, content type)`` named like each identity header in every letter
    case, with ``value`` both as content and as content type (TorchServe's worker shows a part in its
    header map as ``{"content-type": ...}``)."""
    return [(case(h), value.encode(), value) for h in IDENTITY_HEADERS for case in LETTER_CASES]


def post_exact_headers(url: str, headers, body: bytes):
    """``(status, text)`` of a POST to ``url`` sending ``headers`` ([(name, value), ...]) exactly as
    given, plus Content-Length (requests would merge names that differ only in case)."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    try:
        c.putrequest("POST", u.path)
        for k, v in list(headers) + [("Content-Length", str(len(body)))]:
            c.putheader(k, v)
        c.endheaders(body)
        r = c.getresponse()
        return r.status, r.read().decode()
    finally:
        c.close()
