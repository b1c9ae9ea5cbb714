"""The TorchServe drop-in against a REAL TorchServe 0.12 (2 workers per guarded model, batching on),
with the example's committed victim and detector artifact.

One server for the module: the unprotected example archive (its own handler file) and its
`guardian protect`ed copy; a `--handler image_classifier` archive and its protected copy; an archive
whose handler is the literal string guardian_plugin.handlers.GuardedImageClassifier.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from examples.mnist import serving as ex  # noqa: E402
from guardian_plugin.handlers.archive import (  # noqa: E402
    GUARDED_HANDLER, GUARDED_IMAGE_CLASSIFIER, _detector_files, protect, read_archive, rewrite_archive)
from guardian_plugin.devserver.torchserve import TorchServe, build_archive  # noqa: E402
from serving_fixtures import start_torchserve  # noqa: E402

D, K = 0.5, 10  # DPreds d (the default) and the number of classes
WORKERS, BATCH, DELAY_MS = 2, 8, 50
TAU = 4
KEY_SECRET = "test-key-secret-0123456789abcdef"  # the literal archive takes issued API keys


def _need_artifacts():
    missing = [p for p in (ex.VICTIM_TS, os.path.join(ex.DETECTOR, "detector.yaml")) if not os.path.exists(p)]
    if missing:
        pytest.fail(f"example artifacts missing: {missing}; regenerate them with `make train-example` "
                    "(they are committed, so a checkout has them)")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    _need_artifacts()
    w = tmp_path_factory.mktemp("torchserve")
    store, build = str(w / "store"), str(w / "build")
    ledger = f"sqlite:///{w}/state/ledger.db"
    guard = ex.guard_yaml(str(w / "guard.yaml"), ledger, tau=TAU)

    mnist = build_archive("mnist", ex.VICTIM_TS, ex.MNIST_HANDLER, store)  # its own handler file
    protect(mnist, ex.DETECTOR, os.path.join(store, "mnist_g.mar"), config=guard)

    rgb_pt = ex.imagenet_victim(str(w / "rgb_victim.pt"))
    rgb = build_archive("rgb", rgb_pt, "image_classifier", store)  # a built-in handler name
    det_rgb = ex.imagenet_detector(ex.DETECTOR, str(w / "detector_imagenet"))
    protect(rgb, det_rgb, os.path.join(store, "rgb_g.mar"), config=guard)

    base = build_archive("literal", ex.VICTIM_TS, "image_classifier", build)
    rewrite_archive(base, os.path.join(store, "literal.mar"), handler=GUARDED_IMAGE_CLASSIFIER, handler_config={
        "image_processing": {"resize": None, "center_crop": None, "mean": ex.MNIST_MEAN, "std": ex.MNIST_STD},
        "topk": 10,
        "guardian": {"guard": {"detector": "guardian/detector", "ledger": ledger, "namespace": "literal",
                               "rule": {"tau": TAU}, "identity": {"api_key_header": "X-Api-Key",
                                                                   "key_secret": KEY_SECRET, "missing": "reject"}}},
    }, extra_files=_detector_files(ex.DETECTOR))

    models = {"mnist": 1, "rgb": 1, "mnist_g": WORKERS, "rgb_g": WORKERS, "literal": WORKERS}
    ts = start_torchserve(store, str(w / "server"), models, BATCH, DELAY_MS)
    digits, labels = ex.real_digits(16)
    fakes = ex.generator_images(16, seed=1)
    state = {"ts": ts, "store": store, "w": w, "digits": digits, "labels": labels, "fakes": fakes,
             "ledger": ledger}
    yield state
    state["ts"].stop()  # the restart test replaces the server
    ts.stop()


def post(ts, model, body, client=None, headers=None):
    h = dict(headers or {})
    if client is not None:
        h["X-Client-Id"] = client
    return ts.predict(model, body, h)


def issue(served, owner, client_id=None) -> str:
    """A key of the literal archive, as `guardian keys issue` makes it (in the ledger's SQLite file)."""
    from guardian_plugin.keys import open_key_store

    store = open_key_store(served["ledger"], "literal")
    try:
        return store.issue(KEY_SECRET, owner, client_id)[0]
    finally:
        store.close()


def relation(r0, r1) -> str:
    """'benign' when the protected response equals the unprotected one exactly, 'flagged' when it is
    DPreds of it (same labels, same order); fails otherwise."""
    assert r0.status_code == 200 and r1.status_code == 200, (r0.status_code, r0.text, r1.status_code, r1.text)
    a, b = ex.topk(r0), ex.topk(r1)
    assert [l for l, _ in a] == [l for l, _ in b], f"label order differs: {a} vs {b}"
    if a == b:
        return "benign"
    for (_, pa), (_, pb) in zip(a, b):
        assert pb == pytest.approx((pa + D) / (1 + K * D), abs=2e-6), (a, b)
    return "flagged"


def test_literal_handler_string_loads_and_serves(served):
    ts = served["ts"]
    manifest, _ = read_archive(os.path.join(served["store"], "literal.mar"))
    assert manifest["model"]["handler"] == "guardian_plugin.handlers.GuardedImageClassifier"
    correct, kinds = 0, []
    for i, (img, y) in enumerate(zip(served["digits"][:8], served["labels"][:8])):
        r = post(ts, "literal", img, headers={"X-Api-Key": issue(served, "test", f"lit-{i}")})
        assert r.status_code == 200, r.text
        probs = dict(ex.topk(r))
        assert sorted(probs) == [str(k) for k in range(10)]
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        correct += max(probs, key=probs.get) == str(y)
        # the same preprocessing as the example's own handler: identical answers unless flagged
        kinds.append(relation(post(ts, "mnist", img), r))
    assert correct >= 7 and kinds.count("benign") >= 6, kinds
    r = post(ts, "literal", served["fakes"][0], headers={"X-Api-Key": issue(served, "test", "lit-fake")})
    assert relation(post(ts, "mnist", served["fakes"][0]), r) == "flagged"
    # identity configured as `missing: reject`: no API key -> 401 with a JSON reason, and with API
    # keys configured a client-chosen X-Client-Id is no identity at all
    for h in ({}, {"X-Client-Id": "someone"}):
        r = post(ts, "literal", served["digits"][0], headers=h)
        assert r.status_code == 401 and json.loads(r.text)["type"] == "MissingIdentity"


@pytest.mark.parametrize("plain,guarded,rgb", [("mnist", "mnist_g", False), ("rgb", "rgb_g", True)],
                         ids=["own-handler-file", "builtin-image_classifier"])
def test_protect_exact_for_benign_dpreds_for_flagged(served, plain, guarded, rgb):
    ts = served["ts"]
    manifest, files = read_archive(os.path.join(served["store"], f"{guarded}.mar"))
    assert manifest["model"]["handler"] == GUARDED_HANDLER
    assert any(n.startswith("guardian/detector/") for n in files)
    conv = ex.to_rgb if rgb else (lambda b: b)
    seen = {"digit": [], "fake": []}
    # one request at a time: both servers run batches of one, so even the float bits must agree
    for kind in ("digit", "fake"):
        for i, img in enumerate(served["digits" if kind == "digit" else "fakes"][:10]):
            body = conv(img)
            seen[kind].append(relation(post(ts, plain, body), post(ts, guarded, body, client=f"{guarded}-{kind}-{i}")))
    assert seen["digit"].count("benign") >= 8, seen  # real held-out digits pass
    assert seen["fake"].count("flagged") >= 9, seen  # generator images are flagged
    # concurrent requests, batched by the server: same relation (batch composition may move the
    # victim's float output by ~1e-5 on either server, so compare to that tolerance here)
    bodies = [conv(b) for b in served["digits"][10:16] + served["fakes"][10:16]]
    with ThreadPoolExecutor(12) as pool:
        r0 = list(pool.map(lambda b: post(ts, plain, b), bodies))
        r1 = list(pool.map(lambda ib: post(ts, guarded, ib[1], client=f"{guarded}-conc-{ib[0]}"), enumerate(bodies)))
    kinds = [approx_relation(a, b) for a, b in zip(r0, r1)]
    assert kinds[6:].count("flagged") >= 5 and kinds[:6].count("benign") >= 4, kinds


def approx_relation(r0, r1) -> str:
    """``relation`` to the float tolerance of a batched answer (batch composition moves the victim's
    float output by ~1e-5 on either server)."""
    assert r0.status_code == 200 and r1.status_code == 200, (r0.status_code, r0.text, r1.status_code, r1.text)
    la, lb = ex.topk(r0), ex.topk(r1)
    pa, pb = np.array([p for _, p in la]), np.array([p for _, p in lb])
    assert [l for l, _ in la][:3] == [l for l, _ in lb][:3], (la, lb)
    if np.allclose(pa, pb, atol=1e-4):
        return "benign"
    assert np.allclose(pb, (pa + D) / (1 + K * D), atol=1e-4), (la, lb)
    return "flagged"


def _refuse(ts, model, client, fakes):
    for i, img in enumerate(fakes):
        r = post(ts, model, img, client=client)
        if r.status_code == 403:
            return i
        assert r.status_code == 200, r.text
    raise AssertionError(f"{client} was never refused after {len(fakes)} generator queries")


def test_batch_mixing_refused_and_benign_client(served):
    ts = served["ts"]
    at = _refuse(ts, "mnist_g", "attacker-1", served["fakes"])
    assert TAU <= at <= TAU + 2  # refused right after tau flagged queries
    body = json.loads(post(ts, "mnist_g", served["fakes"][0], client="attacker-1").text)
    assert body["type"] == "ClientRefused" and "refused" in body["message"]
    # interleaved concurrent requests: the server batches them (batch_size 8, 50 ms delay)
    jobs = [("attacker-1" if i % 2 == 0 else f"benign-mix-{i}", served["digits"][i]) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda j: post(ts, "mnist_g", j[1], client=j[0]), jobs))
    for (client, _), r in zip(jobs, rs):
        if client == "attacker-1":
            assert r.status_code == 403 and json.loads(r.text)["type"] == "ClientRefused"
        else:
            assert r.status_code == 200 and len(ex.topk(r)) == 10
    # header names are case-insensitive
    assert post(ts, "mnist_g", served["digits"][0], headers={"x-client-id": "attacker-1"}).status_code == 403


def _bad_inputs(digit_png: bytes):
    from PIL import Image
    import io

    big = io.BytesIO()
    Image.new("L", (5000, 5000)).save(big, "PNG")  # 25 Mpx of zeros: ~25 kB on the wire
    return {  # name: (body, headers, the JSON `type` expected)
        "empty body": (b"", {}, "EmptyInput"),
        "not an image": (b"this is not an image at all", {}, "NotAnImage"),
        "truncated png": (digit_png[: len(digit_png) // 2], {}, "CorruptImage"),
        "enormous image": (big.getvalue(), {}, "ImageTooLarge"),
        "bad base64": ("%%% definitely not base64 %%%".encode(), {"Content-Type": "text/plain"}, "BadBase64"),
    }


@pytest.mark.parametrize("model", ["mnist_g", "rgb_g"])
def test_bad_inputs_get_400_and_worker_keeps_serving(served, model):
    ts = served["ts"]
    good = served["digits"][3] if model == "mnist_g" else ex.to_rgb(served["digits"][3])
    for what, (body, headers, kind) in _bad_inputs(served["digits"][3]).items():
        r = post(ts, model, body, client=f"bad-{model}-{what}", headers=headers)
        assert r.status_code == 400, (what, r.status_code, r.text)
        msg = json.loads(r.text)
        assert msg["code"] == 400 and msg["type"] == kind and msg["message"], (what, msg)
        ok = post(ts, model, good, client=f"good-after-{model}-{what}")
        assert ok.status_code == 200, (what, ok.text)
    # bad and good requests in one batch: each gets its own status
    bad = _bad_inputs(served["digits"][3])
    jobs = [(bad["not an image"][0], 400), (good, 200), (bad["truncated png"][0], 400), (good, 200)]
    with ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(lambda ij: post(ts, model, ij[1][0], client=f"mixbad-{model}-{ij[0]}"), enumerate(jobs)))
    assert [r.status_code for r in rs] == [c for _, c in jobs]


def test_custom_metrics_at_the_metrics_endpoint(served):
    ts = served["ts"]
    _refuse(ts, "rgb_g", "attacker-metrics", [ex.to_rgb(f) for f in served["fakes"]])
    text = ts.metrics()
    values = {}
    for line in text.splitlines():
        for name in ("GuardianQueries", "GuardianFlagged", "GuardianRefused", "GuardianGuardTime"):
            if line.startswith(name + "{") and 'ModelName="rgb_g"' in line:
                values[name] = float(line.rsplit(" ", 1)[1])
    assert set(values) == {"GuardianQueries", "GuardianFlagged", "GuardianRefused", "GuardianGuardTime"}, values
    assert values["GuardianQueries"] >= TAU and values["GuardianFlagged"] >= TAU and values["GuardianRefused"] >= 1


# ------------------------------------------------------------------ issue #10: the request path
def _ledger(served, namespace):
    from guardian_plugin.ledger import open_ledger

    return open_ledger(f"sqlite:///{served['w']}/state/ledger.db", namespace=namespace)


def _png_of(mode, size, color=0):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def _malformed_for_grey_model():
    """Inputs that used to get 503 (or a NaN answer) from the guarded MNIST archive."""
    return {
        "1x1 png": (_png_of("L", (1, 1)), {}),
        "rgb image": (_png_of("RGB", (28, 28), (10, 200, 30)), {}),
        "rgba image": (_png_of("RGBA", (28, 28), (10, 200, 30, 255)), {}),
        "4096x4096 rgb png": (_png_of("RGB", (4096, 4096)), {}),
        "12 MP grey png of 12 kB": (_png_of("L", (3464, 3464)), {}),  # under the pixel limit: InputTooLarge
        "json tensor [[1.0]]": (json.dumps([[1.0]]).encode(), {"Content-Type": "application/json"}),
        "json tensor of NaN": (json.dumps([[[float("nan")] * 28] * 28]).replace("NaN", "NaN").encode(),
                               {"Content-Type": "application/json"}),
    }


def test_malformed_inputs_get_400_with_a_reason(served):
    import time

    ts = served["ts"]
    for what, (body, headers) in _malformed_for_grey_model().items():
        t0 = time.perf_counter()
        r = post(ts, "mnist_g", body, client=f"malformed-{what}", headers=headers)
        took = time.perf_counter() - t0
        assert r.status_code == 400, (what, r.status_code, r.text)
        msg = json.loads(r.text)
        assert msg["code"] == 400 and msg["type"] and msg["message"], (what, msg)
        assert took < 2.0, (what, took)  # a cheap request cannot hold a worker for long
        ok = post(ts, "mnist_g", served["digits"][1], client=f"after-{what}")
        assert ok.status_code == 200 and len(ex.topk(ok)) == 10, (what, ok.text)
        # a row that was not answered is not counted
        assert _ledger(served, "mnist").get(f"malformed-{what}").queries == 0, what


def test_no_answer_from_an_input_the_detector_did_not_score(served):
    """Float, 16-bit, palette, CMYK and out-of-range TIFF/PNG bodies: the archive's handler keeps float
    values (ToTensor), the detector scores pixels clamped to [0, 1]; an input outside that range is a 400
    InputOutOfRange (the unprotected archive answers it), and every 200 was answered from an input the
    detector scores as it is. The ledger counts exactly the 200s."""
    import io

    from PIL import Image
    from torchvision import transforms

    from serving_fixtures import odd_image_bodies

    ts = served["ts"]
    pre = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])  # the handler's
    led = _ledger(served, "mnist")
    answered = 0
    for what, (body, out_of_range) in odd_image_bodies().items():
        cid = f"odd-{what.replace(' ', '-')}"
        r = post(ts, "mnist_g", body, client=cid)
        assert r.status_code in (200, 400), (what, r.status_code, r.text)
        if out_of_range:
            assert r.status_code == 400 and json.loads(r.text)["type"] == "InputOutOfRange", (what, r.text)
        if what.startswith("float tiff"):
            assert post(ts, "mnist", body).status_code == 200, what  # the unprotected archive answers these
        if r.status_code == 200:
            answered += 1
            pix = pre(Image.open(io.BytesIO(body))) * 0.3081 + 0.1307
            assert -1e-3 <= float(pix.min()) and float(pix.max()) <= 1 + 1e-3, what  # scored as it is
            relation(post(ts, "mnist", body), r)  # the unprotected answer, or DPreds of it
        assert led.get(cid).queries == int(r.status_code == 200), what
    assert answered >= 2  # the float TIFF in [0, 1] and the palette PNG are images this archive takes


def test_a_bad_image_never_fails_its_batch_neighbours(served):
    """A 1x1 PNG batched with 7 benign requests, 20 rounds: every benign request gets its own correct
    200 (the unprotected archive's answer or DPreds of it) and the ledger counts exactly the answers."""
    ts = served["ts"]
    bad = _png_of("L", (1, 1))
    digits = served["digits"][:7]
    expected = [post(ts, "mnist", d) for d in digits]
    statuses = {"bad": [], "good": []}
    with ThreadPoolExecutor(8) as pool:
        for rnd in range(20):
            jobs = [("bad", bad, "nb-bad")] + [("good", d, f"nb-good-{j}") for j, d in enumerate(digits)]
            rs = list(pool.map(lambda j: post(ts, "mnist_g", j[1], client=j[2]), jobs))
            for (kind, _, _), r in zip(jobs, rs):
                statuses[kind].append(r.status_code)
            for e, r in zip(expected, rs[1:]):
                approx_relation(e, r)  # 200, same labels in the same order, unprotected or DPreds
    assert statuses["bad"] == [400] * 20 and statuses["good"] == [200] * 140, statuses
    led = _ledger(served, "mnist")
    assert led.get("nb-bad").queries == 0
    assert sum(led.get(f"nb-good-{j}").queries for j in range(7)) == 140


def test_anonymous_attacker_cannot_lock_out_anonymous_users(served):
    """`missing: anonymous` (the mnist_g archive): anonymous requests are never refused and always get
    DPreds, so 3 x tau synthetic queries from one anonymous attacker change nothing for a benign
    anonymous client, whose answers keep the unprotected ranking and top-1."""
    ts = served["ts"]
    for img in served["fakes"][:3 * TAU]:
        r = post(ts, "mnist_g", img)
        assert r.status_code == 200, r.text
    for img in served["digits"][:4]:
        r = post(ts, "mnist_g", img)
        assert r.status_code == 200
        assert relation(post(ts, "mnist", img), r) == "flagged"  # DPreds: same order, flattened


def test_api_keys_cannot_be_spoofed(served):
    """The literal archive identifies clients by X-Api-Key only: an attacker who sends another
    client's X-Client-Id, or its ledger id, changes nothing of that client's record; responses never
    reveal a ledger id."""
    ts = served["ts"]
    victim_key, mallory = issue(served, "bob", "bob"), issue(served, "mallory", "mallory")
    for i, img in enumerate(served["fakes"][:3 * TAU]):
        r = post(ts, "literal", img, headers={"X-Api-Key": mallory, "X-Client-Id": "key:bob"})
        assert r.status_code in (200, 403)
        assert "key:" not in r.text
    assert r.status_code == 403 and json.loads(r.text)["type"] == "ClientRefused"
    r = post(ts, "literal", served["digits"][0], headers={"X-Api-Key": victim_key})
    assert r.status_code == 200
    led = _ledger(served, "literal")
    assert led.get("key:bob").queries == 1 and not led.get("key:bob").refused


def test_only_issued_keys_are_served_and_revoked_ones_refused_within_the_delay(served):
    """Issued keys only (2 workers, batching): a key from `guardian keys issue` is served; random
    strings, other formats and forged HMACs get 401 InvalidApiKey with the guard's JSON body, counted
    nowhere; `guardian keys revoke` gets the key refused (401 RevokedApiKey) by both workers within
    key_refresh_s (the default, 5 s)."""
    from concurrent.futures import ThreadPoolExecutor

    from guardian_plugin.cli import main
    from serving_fixtures import minted_keys, refused_within

    ts, img = served["ts"], served["digits"][0]
    key = issue(served, "Carol", "carol")
    assert post(ts, "literal", img, headers={"X-Api-Key": key}).status_code == 200
    minted = minted_keys(key)
    with ThreadPoolExecutor(4) as pool:  # concurrent, so batches mix them with the issued key's requests
        rs = list(pool.map(lambda k: post(ts, "literal", img, headers={"X-Api-Key": k}), minted + [key] * 4))
    for k, r in zip(minted, rs):
        assert r.status_code == 401 and json.loads(r.text) == {
            "code": 401, "type": "InvalidApiKey",
            "message": "the X-Api-Key header is not an API key issued by this service; ask the operator for one"}, k
    assert [r.status_code for r in rs[len(minted):]] == [200] * 4
    led = _ledger(served, "literal")
    issued = {"key:bob", "key:carol", "key:mallory", "key:lit-fake"} | {f"key:lit-{i}" for i in range(8)}
    assert {s.client_id for s in led.clients()} <= issued  # nothing counted for a minted key
    assert led.get("key:carol").queries == 5

    def revoke():
        assert main(["keys", "revoke", "carol", "--ledger", served["ledger"], "--namespace", "literal"]) == 0

    def send():
        r = post(ts, "literal", img, headers={"X-Api-Key": key})
        if r.status_code == 401:
            assert json.loads(r.text)["type"] == "RevokedApiKey"
        return r.status_code

    refused_within(send, revoke, delay_s=5.0)


# last: replaces the module's server
def test_refusal_persists_across_restart(served):
    ts = served["ts"]
    if post(ts, "mnist_g", served["fakes"][0], client="attacker-restart").status_code != 403:
        _refuse(ts, "mnist_g", "attacker-restart", served["fakes"])
    ts.stop()
    ts2 = TorchServe(served["store"], str(served["w"] / "server2"))
    served["ts"] = ts2  # the fixture stops whichever server is current
    ts2.start()
    ts2.register("mnist_g.mar", "mnist_g", workers=WORKERS, batch_size=BATCH, max_batch_delay_ms=DELAY_MS)
    r = post(ts2, "mnist_g", served["digits"][0], client="attacker-restart")  # even a real digit
    assert r.status_code == 403 and json.loads(r.text)["type"] == "ClientRefused"
    assert post(ts2, "mnist_g", served["digits"][0], client="fresh-after-restart").status_code == 200
