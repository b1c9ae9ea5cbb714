"""Request bodies for fuzzing the guarded example servers, and the servers themselves.

Shared by tests/test_fuzz_requests.py (bounded, derandomized), benchmarks/fuzz_requests.py (longer) and
benchmarks/load_test.py ("bad" clients). Lives under tests/ (hypothesis is a test dependency), not in
the guardian_plugin package: nothing on the serving path imports it.

A :class:`Case` is one HTTP request body and its Content-Type, drawn by :func:`cases`:

- raw bodies under any content type (image/png, image/jpeg, application/json, text/plain, multipart
  without a boundary, none, nonsense): random bytes, empty, valid images of odd sizes and modes
  (PNG/JPEG/BMP/GIF/TIFF), truncated and byte-mutated PNGs and JPEGs, images whose header claims huge
  dimensions (PNG IHDR, JPEG SOF, BMP, GIF), non-image files (PDF, ZIP, ELF, HTML, SVG, text), base64
  text of any of these (valid, with whitespace, corrupted)
- JSON values of any shape (NaN, Infinity, huge integers, nested lists and objects, tensor-shaped
  lists with NaN/inf, {"data": ...}, {"instances": [...]}, base64 strings)
- multipart/form-data with wrong field names, several files, non-image files, missing filenames, a
  boundary that does not match the header

:class:`Target` sends a case to one guarded endpoint (TorchServe's protected MNIST archive, or the
example BentoML service's ``classify`` / ``classify_batch``) and sends a benign digit the way a real
client of that endpoint does; :func:`check_answer` is the property every answer must have.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

ERROR_KEYS = {"code", "type", "message"}
NUM_CLASSES = 10


# ------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    kind: str                      # which generator made it (for the statistics)
    body: bytes
    content_type: Optional[str]

    def describe(self, n: int = 120) -> str:
        head = self.body[:n]
        return f"Case(kind={self.kind!r}, content_type={self.content_type!r}, {len(self.body)} bytes: {head!r}" \
               f"{'...' if len(self.body) > n else ''})"


# ------------------------------------------------------------------------------------ image bytes
def _encode(a: np.ndarray, fmt: str, mode: Optional[str] = None) -> bytes:
    from PIL import Image

    im = Image.fromarray(a)
    if mode and mode != im.mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    if fmt == "JPEG" and im.mode not in ("L", "RGB", "CMYK"):
        im = im.convert("RGB")
    im.save(buf, fmt)
    return buf.getvalue()


# sizes the MNIST example's victim accepts besides 28 (29-31: every guard mechanism must apply to them,
# issue #25) and their neighbours it refuses (27, 32)
NEAR_NATIVE_SIZES = [(29, 29), (30, 30), (31, 31), (28, 31), (31, 29), (27, 27), (32, 32)]


@st.composite
def valid_images(draw, formats=("PNG", "JPEG", "BMP", "GIF", "TIFF")) -> bytes:
    """A decodable image: mostly 28 x 28 grayscale like a digit, else near-native (29-31 px, which the
    victim accepts) or odd sizes, and other modes and formats: palette, 16-bit and 32-bit integer,
    32-bit float (values in [0, 1], [0, 255] or extreme, NaN and infinities included) and CMYK."""
    fmt = draw(st.sampled_from(formats))
    size = draw(st.one_of(st.just((28, 28)), st.sampled_from(NEAR_NATIVE_SIZES),
                          st.tuples(st.integers(1, 80), st.integers(1, 80))))
    mode = draw(st.sampled_from(["L", "L", "RGB", "RGBA", "P", "1", "I;16", "LA", "I", "F", "CMYK"]))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 3, "P": 3, "CMYK": 4}.get(mode, 1)
    a = rng.integers(0, 256, size=(size[1], size[0], channels) if channels > 1 else (size[1], size[0]),
                     dtype=np.uint8)
    wide = {"I;16": a.astype(np.uint16) * 257, "I": a.astype(np.int32) * 65793 - 2 ** 23}.get(mode)
    if mode == "F":
        scale = draw(st.sampled_from(["unit", "byte", "extreme"]))
        wide = a.astype(np.float32) / 255.0 if scale == "unit" else a.astype(np.float32)
        if scale == "extreme":
            wide = wide * np.float32(1e30) - np.float32(1e32)
            wide.flat[rng.integers(0, wide.size, 3)] = [np.nan, np.inf, -np.inf]
    if wide is not None:  # 16/32-bit integer and float images: PNG (16-bit) and TIFF store them
        from PIL import Image

        buf = io.BytesIO()
        try:
            Image.fromarray(wide).save(buf, fmt if fmt in ("PNG", "TIFF") and mode == "I;16" else "TIFF")
            return buf.getvalue()
        except (OSError, ValueError, KeyError, TypeError):
            return _encode(a, "PNG")
    if mode == "CMYK":
        from PIL import Image

        buf = io.BytesIO()
        Image.frombytes("CMYK", size, a.tobytes()).save(buf, fmt if fmt in ("JPEG", "TIFF") else "TIFF")
        return buf.getvalue()
    try:
        return _encode(a, fmt, mode)
    except (OSError, ValueError, KeyError):
        return _encode(a if a.ndim == 2 else a[..., 0], "PNG")


def digit_png(seed: int = 0) -> bytes:
    """A 28 x 28 grayscale PNG (random pixels)."""
    return _encode(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8), "PNG")


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_with_header(width: int, height: int, color_type: int = 0, bit_depth: int = 8, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR (valid CRC) claims ``width`` x ``height``, with a tiny IDAT: a decompression bomb
    by its header."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat or zlib.compress(b"\x00" * 64))
            + _chunk(b"IEND", b""))


def jpeg_with_header(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 marker is rewritten to claim ``width`` x ``height``."""
    raw = bytearray(_encode(np.zeros((8, 8), np.uint8), "JPEG"))
    i = raw.find(b"\xff\xc0")
    if i >= 0:
        raw[i + 5:i + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
    return bytes(raw)


def bmp_with_header(width: int, height: int) -> bytes:
    """A BMP file header + BITMAPINFOHEADER claiming ``width`` x ``height`` (8-bit), with few pixels."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    pixels = b"\x00" * 64
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + len(pixels), 0, 0, 14 + len(info)) + info + pixels


def gif_with_header(width: int, height: int) -> bytes:
    return (b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + b"\x2c" + struct.pack("<HHHH", 0, 0, width, height)
            + b"\x00\x02\x02\x44\x01\x00\x3b")


@st.composite
def huge_header_images(draw) -> bytes:
    """Images whose header claims huge (or zero) dimensions; no pixel data to match."""
    big = st.one_of(st.integers(0, 4), st.integers(5000, 70000), st.integers(2 ** 16, 2 ** 31 - 1))
    w, h = draw(big), draw(big)
    kind = draw(st.sampled_from(["png", "jpeg", "bmp", "gif"]))
    if kind == "png":
        return png_with_header(w, h, draw(st.sampled_from([0, 2, 4, 6])), draw(st.sampled_from([8, 16])))
    if kind == "jpeg":
        return jpeg_with_header(w, h)
    if kind == "bmp":
        return bmp_with_header(min(w, 2 ** 31 - 1), draw(st.sampled_from([1, -1])) * min(h, 2 ** 31 - 1))
    return gif_with_header(w & 0xFFFF, h & 0xFFFF)


@st.composite
def truncated(draw, images) -> bytes:
    raw = draw(images)
    return raw[:draw(st.integers(0, max(0, len(raw) - 1)))]


@st.composite
def mutated(draw, images) -> bytes:
    """Bytes flipped, inserted or deleted at random positions (CRCs left stale)."""
    raw = bytearray(draw(images))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "set"]))
        pos = draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and raw:
            raw[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]))
        elif op == "insert":
            raw[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif raw:
            del raw[pos:pos + draw(st.integers(1, 16))]
    return bytes(raw)


NON_IMAGES = [
    b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
    b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + b"\x00" * 40,
    b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 56,
    b"<html><body><img src=x onerror=alert(1)></body></html>",
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="28" height="28"><rect width="28" height="28"/></svg>',
    b"hello, this is a text file\n" * 3,
    b"\x00" * 100,
    b"\xff\xd8\xff",          # a JPEG's first three bytes only
    b"\x89PNG\r\n\x1a\n",     # a PNG signature only
    b"GIF89a",
    b"II*\x00\x08\x00\x00\x00",  # a TIFF header only
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
]


def images_and_files():
    pngs, jpegs = valid_images(("PNG",)), valid_images(("JPEG",))
    return st.one_of(
        valid_images(),
        truncated(pngs), truncated(jpegs),
        mutated(pngs), mutated(jpegs),
        huge_header_images(),
        st.sampled_from(NON_IMAGES),
        st.binary(max_size=2048),
        st.just(b""),
    )


@st.composite
def base64_texts(draw) -> bytes:
    """Base64 text of image or other bytes: valid, with whitespace, with a data-URL prefix, or corrupted."""
    raw = base64.b64encode(draw(images_and_files()))
    how = draw(st.sampled_from(["plain", "newlines", "dataurl", "no-padding", "bad-chars", "urlsafe"]))
    if how == "newlines":
        raw = b"\n".join(raw[i:i + 76] for i in range(0, len(raw), 76)) + b"\n"
    elif how == "dataurl":
        raw = b"data:image/png;base64," + raw
    elif how == "no-padding":
        raw = raw.rstrip(b"=")
    elif how == "bad-chars" and raw:
        pos = draw(st.integers(0, len(raw) - 1))
        raw = raw[:pos] + draw(st.sampled_from([b"!", b"*", b"\xff", b" ", b"%"])) + raw[pos:]
    elif how == "urlsafe":
        raw = raw.replace(b"+", b"-").replace(b"/", b"_")
    return raw


# ------------------------------------------------------------------------------------------- JSON
_floats = st.floats(allow_nan=True, allow_infinity=True)
_scalars = st.one_of(st.none(), st.booleans(), _floats, st.integers(), st.integers(-10 ** 400, 10 ** 400),
                     st.text(max_size=40))


def any_json():
    return st.recursive(_scalars, lambda c: st.one_of(st.lists(c, max_size=6),
                                                       st.dictionaries(st.text(max_size=10), c, max_size=6)),
                        max_leaves=40)


@st.composite
def tensor_lists(draw):
    """Nested lists shaped like a model input (1x28x28, 28x28, 3x28x28, ...), with NaN/inf/huge values
    sometimes."""
    shape = draw(st.sampled_from([(1, 28, 28), (28, 28), (1, 1, 28, 28), (3, 28, 28), (1, 28, 27), (0,), (2, 2), (784,),
                                  (1, 0, 28)]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    a = rng.normal(size=shape).astype(np.float64)
    special = draw(st.sampled_from([None, None, math.nan, math.inf, -math.inf, 1e308, 1e-320]))
    if special is not None and a.size:
        a.flat[draw(st.integers(0, a.size - 1))] = special
    return a.tolist()


@st.composite
def json_bodies(draw) -> bytes:
    inner = draw(st.one_of(any_json(), tensor_lists(), base64_texts().map(lambda b: b.decode("latin-1"))))
    wrap = draw(st.sampled_from(["bare", "data", "instances", "image", "images", "body"]))
    value = inner if wrap == "bare" else ({"instances": [inner]} if wrap == "instances" else {wrap: inner})
    text = json.dumps(value, allow_nan=True)  # NaN, Infinity, -Infinity tokens
    if draw(st.booleans()) and draw(st.integers(0, 9)) == 0:
        text = text[:draw(st.integers(0, len(text)))]  # truncated JSON
    return text.encode("utf-8", "surrogatepass")


# -------------------------------------------------------------------------------------- multipart
FIELD_NAMES = ["image", "images", "data", "body", "file", "img", "", "image[]", "IMAGE"]


def multipart(parts: Sequence[Tuple[str, Optional[str], Optional[str], bytes]], boundary: str) -> bytes:
    """multipart/form-data bytes of (field name, filename or None, content type or None, content)."""
    out = io.BytesIO()
    for name, filename, ctype, content in parts:
        out.write(f"--{boundary}\r\n".encode())
        disp = f'Content-Disposition: form-data; name="{name}"'
        if filename is not None:
            disp += f'; filename="{filename}"'
        out.write(disp.encode("utf-8", "replace") + b"\r\n")
        if ctype:
            out.write(f"Content-Type: {ctype}\r\n".encode())
        out.write(b"\r\n" + content + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


@st.composite
def multipart_cases(draw) -> Case:
    n = draw(st.integers(0, 4))
    parts = []
    for _ in range(n):
        name = draw(st.one_of(st.sampled_from(FIELD_NAMES), st.text(st.characters(min_codepoint=32, max_codepoint=126,
                                                                                   exclude_characters='"\\'),
                                                                     max_size=12)))
        filename = draw(st.sampled_from([None, "d.png", "d.jpg", "notes.txt", "x.pdf", "", "../../etc/passwd"]))
        ctype = draw(st.sampled_from([None, "image/png", "image/jpeg", "text/plain", "application/octet-stream",
                                      "application/pdf"]))
        content = draw(st.one_of(images_and_files(), base64_texts()))
        parts.append((name, filename, ctype, content))
    boundary = "fuzzboundary" + str(draw(st.integers(0, 10 ** 6)))
    body = multipart(parts, boundary)
    header = draw(st.sampled_from(["ok", "ok", "ok", "wrong", "none", "empty"]))
    ctype = {"ok": f"multipart/form-data; boundary={boundary}", "wrong": "multipart/form-data; boundary=other",
             "none": "multipart/form-data", "empty": "multipart/form-data; boundary="}[header]
    return Case(f"multipart[{n}]", body, ctype)


CONTENT_TYPES = [None, "image/png", "image/jpeg", "application/json", "text/plain", "application/octet-stream",
                 "multipart/form-data", "application/x-www-form-urlencoded", "image/png; charset=utf-16",
                 "text/plain; charset=latin-1", "x/y", ";;;", "application/json; charset=utf-8"]


@st.composite
def raw_cases(draw) -> Case:
    body = draw(images_and_files())
    return Case("raw", body, draw(st.sampled_from(CONTENT_TYPES)))


@st.composite
def base64_cases(draw) -> Case:
    return Case("base64", draw(base64_texts()), draw(st.sampled_from(["text/plain", None, "application/json",
                                                                        "application/octet-stream"])))


@st.composite
def json_cases(draw) -> Case:
    return Case("json", draw(json_bodies()), draw(st.sampled_from(["application/json", "application/json",
                                                                     "text/plain", None])))


def cases():
    """Every kind of malformed (and some well-formed) request body."""
    return st.one_of(raw_cases(), base64_cases(), json_cases(), multipart_cases())


def sample_cases(n: int, seed: int = 0) -> List[Case]:
    """``n`` cases drawn outside a test (the load test's "bad" clients), the same ones for the same seed:
    hypothesis' generate phase only (no shrinking), with a fixed seed."""
    import hypothesis
    from hypothesis import HealthCheck, Phase

    out: List[Case] = []

    @hypothesis.seed(seed)
    @hypothesis.settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
                         suppress_health_check=list(HealthCheck))
    @hypothesis.given(cases())
    def collect(case):
        out.append(case)

    collect()
    return out


# ------------------------------------------------------------------------------------------ checks
def error_shape_problem(resp) -> Optional[str]:
    """None when a non-200 answer has the JSON body {"code": int (= status), "type": str, "message": str}."""
    try:
        body = json.loads(resp.content)
    except ValueError:
        return f"not JSON: {resp.content[:300]!r}"
    if not isinstance(body, dict) or set(body) != ERROR_KEYS:
        return f"not the {{code, type, message}} shape: {resp.content[:300]!r}"
    if not (isinstance(body["code"], int) and body["code"] == resp.status_code and isinstance(body["type"], str)
            and isinstance(body["message"], str)):
        return f"wrong field types or code != status {resp.status_code}: {resp.content[:300]!r}"
    return None


def rows_of(api: str, resp) -> Optional[List[List[float]]]:
    """The probability rows of a 200 answer (None when it is not well-formed: 10 finite probabilities
    summing to one per row)."""
    try:
        body = resp.json()
    except ValueError:
        return None
    if api == "torchserve":
        rows = [[float(v) for _, v in sorted(body.items(), key=lambda kv: int(kv[0]))]] \
            if isinstance(body, dict) and sorted(body) == sorted(str(k) for k in range(NUM_CLASSES)) else None
    elif api == "classify":
        rows = [body] if isinstance(body, list) and body and not isinstance(body[0], list) else None
    else:
        rows = body if isinstance(body, list) and all(isinstance(r, list) for r in body) else None
    if rows is None:
        return None
    for r in rows:
        if len(r) != NUM_CLASSES or not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in r) \
                or abs(sum(r) - 1) > 1e-3:
            return None
    return rows


def check_answer(api: str, resp) -> Optional[str]:
    """The property of every answer to a fuzzed request: no 5xx; a 200 carries well-formed rows; any
    other status the guard's JSON error body. None when it holds, else what is wrong."""
    if resp.status_code >= 500:
        return f"HTTP {resp.status_code}: {resp.content[:300]!r}"
    if resp.status_code == 200:
        return None if rows_of(api, resp) is not None else f"200 without well-formed rows: {resp.content[:300]!r}"
    return error_shape_problem(resp)


# ------------------------------------------------------------------------------------------ targets
@dataclass
class Target:
    """One guarded endpoint: ``api`` is "torchserve", "classify" or "classify_batch"."""

    name: str
    api: str
    url: str
    ledger: str        # ledger URI the server writes
    namespace: str
    alive: Callable[[], Optional[str]]   # None when the server and its workers are fine, else why not
    log_tail: Callable[[], str]
    keys: Optional[dict] = None  # issued API keys (start_*(identity="keys")): client -> key, issued lazily

    def headers(self, client: str) -> dict:
        """The identity headers of ``client``: X-Client-Id, or with issued keys X-Api-Key and its key
        (issued in the server's ledger store the first time, as `guardian keys issue` does)."""
        if self.keys is None:
            return {"X-Client-Id": client}
        if client not in self.keys:
            from guardian_plugin.keys import open_key_store

            store = open_key_store(self.ledger, self.namespace)
            try:
                self.keys[client] = store.issue(KEY_SECRET, "load test", client)[0]
            finally:
                store.close()
        return {"X-Api-Key": self.keys[client]}

    def ledger_id(self, client: str) -> str:
        """What the ledger counts ``client`` under."""
        return client if self.keys is None else "key:" + client

    def send(self, session, case: Case, client: str, timeout: float = 60):
        headers = self.headers(client)
        if case.content_type is not None:
            headers["Content-Type"] = case.content_type
        return session.post(self.url, data=case.body, headers=headers, timeout=timeout)

    def benign(self, session, png: bytes, client: str, timeout: float = 60, headers: Optional[dict] = None):
        """A well-formed request for one digit, as a real client of this endpoint sends it (``headers``:
        instead of ``client``'s identity headers)."""
        h = self.headers(client) if headers is None else headers
        if self.api == "torchserve":
            return session.post(self.url, data=png, headers=h, timeout=timeout)
        field = "image" if self.api == "classify" else "images"
        return session.post(self.url, files=[(field, ("d.png", png, "image/png"))], headers=h, timeout=timeout)

    def ledger_queries(self, clients: Sequence[str]) -> dict:
        from guardian_plugin.ledger import open_ledger

        led = open_ledger(self.ledger, namespace=self.namespace)
        try:
            return {c: led.get(self.ledger_id(c)).queries for c in clients}
        finally:
            led.close()

    def ledger_clients(self) -> list:
        """Every client id the server's ledger has a record of."""
        from guardian_plugin.ledger import open_ledger

        led = open_ledger(self.ledger, namespace=self.namespace)
        try:
            return [c.client_id for c in led.clients()]
        finally:
            led.close()


KEY_SECRET = "fuzz-load-key-secret-0123456789"  # identity="keys": the servers' key secret
IDENTITIES = {"client-id": {"headers": ["X-Client-Id"], "missing": "anonymous"},  # the examples' own
              "keys": {"api_key_header": "X-Api-Key", "key_secret": KEY_SECRET, "missing": "reject"}}


def _with_identity(path: str, identity: str, **extra) -> str:
    """Rewrite the guard YAML at ``path`` with the identity settings ``IDENTITIES[identity]``."""
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f)
    cfg.update(extra, identity=IDENTITIES[identity])
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def start_torchserve(workdir: str, tau: int = 4, workers: int = 2, batch_size: int = 8, max_batch_delay_ms: int = 20,
                     identity: str = "client-id"):
    """The example MNIST archive `guardian protect`ed, under a real TorchServe (``workers`` workers,
    batching on). ``identity``: "client-id" (X-Client-Id) or "keys" (issued keys only, IDENTITIES).
    Returns (TorchServe, Target)."""
    import requests

    from examples.mnist import serving as ex
    from guardian_plugin.devserver.torchserve import TorchServe, build_archive
    from guardian_plugin.handlers.archive import protect

    store = os.path.join(workdir, "store")
    os.makedirs(store, exist_ok=True)
    ledger = f"sqlite:///{workdir}/state/ledger.db"
    guard = _with_identity(ex.guard_yaml(os.path.join(workdir, "guard.yaml"), ledger, tau=tau), identity)
    mar = build_archive("mnist", ex.VICTIM_TS, ex.MNIST_HANDLER, os.path.join(workdir, "build"))
    info = protect(mar, ex.DETECTOR, os.path.join(store, "mnist_g.mar"), config=guard)
    ts = TorchServe(store, os.path.join(workdir, "server")).start()
    try:
        ts.register("mnist_g.mar", "mnist_g", workers=workers, batch_size=batch_size, max_batch_delay_ms=max_batch_delay_ms)
    except Exception:
        print(ts.log_tail(80))
        ts.stop()
        raise

    def alive() -> Optional[str]:
        if ts.proc is None or ts.proc.poll() is not None:
            return "the TorchServe frontend exited"
        desc = requests.get(f"{ts.management_url}/models/mnist_g", timeout=30).json()
        states = [w.get("status") for w in desc[0].get("workers", [])]
        return None if len(states) == workers and all(s == "READY" for s in states) else f"workers: {desc[0].get('workers')}"

    return ts, Target("torchserve", "torchserve", f"{ts.url}/predictions/mnist_g", ledger, info["namespace"], alive,
                      lambda: ts.log_tail(80), {} if identity == "keys" else None)


def start_bento(workdir: str, identity: str = "client-id"):
    """The example service (bento.service:MNISTGuarded, 2 workers) under a real `bentoml serve`;
    ``identity`` as in start_torchserve. Returns (BentoServer, [Target classify, Target classify_batch])."""
    from guardian_plugin.devserver.bentoml import BentoServer

    os.makedirs(workdir, exist_ok=True)
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GUARDIAN_TORCH_THREADS": "1",
                "BENTOML_HOME": os.path.join(workdir, "bentoml_home"), "BENTOML_DO_NOT_TRACK": "True",
                "GUARDIAN_LEDGER": f"sqlite:///{workdir}/ledger.db"})
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("GUARDIAN_KEY_SECRET", None)
    if identity != "client-id":  # the example's guard.yaml with other identity settings
        import shutil

        cfg = shutil.copy(os.path.join(ROOT, "bento", "guard.yaml"), os.path.join(workdir, "guard.yaml"))
        env["GUARDIAN_CONFIG"] = _with_identity(cfg, identity, detector=os.path.join(ROOT, "examples", "mnist",
                                                                                     "artifacts", "detector"),
                                                ledger=env["GUARDIAN_LEDGER"])
    srv = BentoServer("bento.service:MNISTGuarded", env, os.path.join(workdir, "serve.log"), cwd=ROOT)

    def alive() -> Optional[str]:
        import requests

        if srv.proc.poll() is not None:
            return f"bentoml serve exited with {srv.proc.returncode}"
        r = requests.get(srv.url + "/readyz", timeout=30)
        return None if r.status_code == 200 else f"/readyz answered {r.status_code}"

    ledger, keys = env["GUARDIAN_LEDGER"], {} if identity == "keys" else None
    return srv, [Target(api, api, f"{srv.url}/{api}", ledger, "mnist", alive, lambda: srv.tail(6000), keys)
                 for api in ("classify", "classify_batch")]


# ------------------------------------------------------------------------------ one case, a whole run
def top1(row: Sequence[float]) -> int:
    return max(range(len(row)), key=row.__getitem__)


# Java exceptions of netty's HttpPostRequestDecoder, which TorchServe's frontend runs on multipart and
# url-encoded bodies in InferenceRequestHandler.parseRequest, before the request reaches any worker
NETTY_DECODER_ERRORS = {"StringIndexOutOfBoundsException", "ErrorDataDecoderException"}


def known_upstream(target: Target, case: Case, resp) -> Optional[str]:
    """A 5xx that TorchServe's Java frontend answers while decoding a multipart or url-encoded body,
    before any handler runs (so no adapter can change it; an unprotected model answers the same), or
    None. Seen: ``multipart/form-data; boundary=`` (empty boundary) -> StringIndexOutOfBoundsException;
    a multipart part with ``name=""`` -> ErrorDataDecoderException "empty name"; a binary body sent as
    application/x-www-form-urlencoded -> ErrorDataDecoderException "Bad string"."""
    if target.api != "torchserve" or resp.status_code != 500:
        return None
    try:
        kind = resp.json().get("type")
    except (ValueError, AttributeError):
        return None
    ctype = (case.content_type or "").strip().lower()
    if kind in NETTY_DECODER_ERRORS and (ctype.startswith("multipart/") or
                                         ctype.startswith("application/x-www-form-urlencoded")):
        return f"TorchServe frontend (netty body decoder): {kind}"
    return None


def reference_top1(target: Target, session, digits) -> List[int]:
    """Top-1 of each benign digit sent alone."""
    out = []
    for i, png in enumerate(digits[0]):
        r = target.benign(session, png, f"ref-{target.name}-{i}")
        rows = rows_of(target.api, r) if r.status_code == 200 else None
        if rows is None or len(rows) != 1:
            raise AssertionError(f"{target.name}: a benign digit got {r.status_code} {r.text[:300]}")
        out.append(top1(rows[0]))
    return out


def probe(target: Target, case: Case, i: int, sessions, pool, digits, top: Sequence[int]) -> dict:
    """Send one fuzzed case (client fuzz-<target>-<i>) with a benign digit alongside (client
    benign-<target>-<i>, so both can share a server batch). The record says what each got, and
    ``problem`` / ``benign_problem`` what broke (None when nothing did)."""
    cid, bid = f"fuzz-{target.name}-{i}", f"benign-{target.name}-{i}"
    k = i % len(digits[0])
    fut = pool.submit(target.benign, sessions[1], digits[0][k], bid)
    r = target.send(sessions[0], case, cid)
    b = fut.result()
    rows = rows_of(target.api, r) if r.status_code == 200 else None
    problem = check_answer(target.api, r)
    upstream = known_upstream(target, case, r) if problem else None
    brows = rows_of(target.api, b) if b.status_code == 200 else None
    if brows is None or len(brows) != 1:
        bproblem = f"benign neighbour got {b.status_code} {b.text[:300]}"
    elif top1(brows[0]) != top[k]:
        bproblem = f"benign neighbour's top-1 changed: {brows[0]}"
    else:
        bproblem = None
    return {"client": cid, "kind": case.kind.split("[")[0], "status": r.status_code, "rows": len(rows or []),
            "type": _error_type(r), "benign": bid, "benign_status": b.status_code,
            "problem": None if upstream else problem, "upstream": upstream, "benign_problem": bproblem,
            "case": case.describe()}


def _error_type(resp) -> Optional[str]:
    if resp.status_code == 200:
        return None
    try:
        body = resp.json()
        return str(body.get("type")) if isinstance(body, dict) else None
    except ValueError:
        return None


def after_run_problems(target: Target, digits, records: Sequence[dict]) -> List[str]:
    """What is wrong after a run: a dead worker, a benign digit not answered correctly, ledger counts
    that are not the answered rows (each fuzzed and benign client's ``queries`` = rows of its 200s)."""
    import requests

    problems = []
    why = target.alive()
    if why:
        problems.append(f"{target.name}: {why}")
    s = requests.Session()
    right = 0
    for i, (png, y) in enumerate(zip(*digits)):
        r = target.benign(s, png, f"after-{target.name}-{i}")
        rows = rows_of(target.api, r) if r.status_code == 200 else None
        if rows is None or len(rows) != 1:
            problems.append(f"{target.name}: benign digit after the run got {r.status_code} {r.text[:300]}")
            continue
        right += top1(rows[0]) == y
    if right < len(digits[1]) - 1:
        problems.append(f"{target.name}: only {right}/{len(digits[1])} benign digits right after the run")
    want = {}
    for r in records:
        want[r["client"]] = r["rows"]
        want[r["benign"]] = 1 if r["benign_status"] == 200 else 0
    got = target.ledger_queries(list(want))
    wrong = {c: (got[c], w) for c, w in want.items() if got[c] != w}
    if wrong:
        problems.append(f"{target.name}: ledger queries != answered rows for {len(wrong)} clients (got, want): "
                        f"{dict(list(wrong.items())[:10])}")
    return problems


def summary(target_name: str, records: Sequence[dict], wall: float) -> dict:
    from collections import Counter

    statuses = Counter(r["status"] for r in records)
    return {"target": target_name, "cases": len(records), "seconds": round(wall, 1),
            "status_counts": {str(k): v for k, v in sorted(statuses.items())},
            "5xx": sum(1 for r in records if r["status"] >= 500 and not r["upstream"]),
            "upstream_5xx": sum(1 for r in records if r["upstream"]),
            "problems": sum(1 for r in records if r["problem"]),
            "benign_problems": sum(1 for r in records if r["benign_problem"]),
            "kinds": dict(sorted(Counter(r["kind"] for r in records).items())),
            "error_types": dict(sorted(Counter(r["type"] for r in records if r["type"]).items()))}


def summary_line(s: dict) -> str:
    up = f" (+{s['upstream_5xx']} known TorchServe-frontend 500s, before any handler)" if s["upstream_5xx"] else ""
    return (f"[fuzz] {s['target']}: {s['cases']} cases tried in {s['seconds']} s; status counts {s['status_counts']}; "
            f"5xx: {s['5xx']}{up}; shape/5xx problems: {s['problems']}; benign-neighbour problems: "
            f"{s['benign_problems']}")
