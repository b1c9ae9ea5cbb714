"""The protected example service under a real `bentoml serve` (2 worker processes, one SQLite ledger),
then the Bento that `bentoml build` makes of it, restarted on the same ledger.

Real held-out MNIST digits and DFME-generator images, the committed victim and detector. Expected
answers come from the unprotected service's own API method run in this process and the detector's own
verdict on the same preprocessed tensor: an unflagged row must be the unprotected answer bit for bit, a flagged one DPreds
of it. Everything talks to 127.0.0.1 on free ports; the servers are stopped at the end.
"""

from __future__ import annotations

import io
import os
import re
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("bentoml")
requests = pytest.importorskip("requests")

from guardian_plugin.responses import dpreds  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
DETECTOR = os.environ.get("GUARDIAN_TEST_DETECTOR") or os.path.join(ROOT, "examples", "mnist", "artifacts", "detector")
SERVICE = "bento.service:MNISTGuarded"
TAU = 14  # bento/guard.yaml: tau auto at rho 0.5


from guardian_plugin.devserver.bentoml import BentoServer as Server  # noqa: E402
from serving_fixtures import bento_oracle  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bento_serve")
    e = dict(os.environ)
    e.update({
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GUARDIAN_TORCH_THREADS": "1",
        "BENTOML_HOME": str(tmp / "bentoml_home"), "BENTOML_DO_NOT_TRACK": "True",
        "GUARDIAN_LEDGER": f"sqlite:///{tmp}/ledger.db",
    })
    if os.environ.get("GUARDIAN_TEST_DETECTOR"):  # another artifact than the committed one
        cfg = tmp / "guard.yaml"
        cfg.write_text(f"detector: {DETECTOR}\nnamespace: mnist\n")
        e["GUARDIAN_CONFIG"] = str(cfg)
    e.pop("GUARDIAN_KEY_SECRET", None)
    return {"env": e, "tmp": tmp, "ledger": str(tmp / "ledger.db")}


@pytest.fixture(scope="module")
def server(env):
    s = Server(SERVICE, env["env"], str(env["tmp"] / "serve.log"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oracle():
    """The unprotected service's own answers (its API method called in this process, one image at a
    time) and the detector's verdict on the same preprocessed tensor."""
    return bento_oracle(DETECTOR)


def _classify(url, a, cid):
    from bento.client import png

    return requests.post(url + "/classify", files={"image": ("d.png", png(a), "image/png")},
                         headers={"X-Client-Id": cid}, timeout=120)


def _classify_batch(url, imgs, cid):
    from bento.client import files

    return requests.post(url + "/classify_batch", files=files(imgs), headers={"X-Client-Id": cid}, timeout=120)


def _ledger(path, cid):
    con = sqlite3.connect(path)
    try:
        row = con.execute("SELECT queries, flagged, refused FROM clients WHERE namespace='mnist' AND client_id=?",
                          (cid,)).fetchone()
    finally:
        con.close()
    return row


def _check_rows(got, want, flags, exact=True):
    """Flagged rows are DPreds of the unprotected answer (same top-1); unflagged rows are the unprotected
    answer: bit for bit where the oracle computed the same batch (one image), else to float32 rounding
    (a batched API's rows depend on which requests BentoML batched together, protected or not)."""
    for g, p, f in zip(got, want, flags):
        g = np.asarray(g, dtype=np.float64)
        assert g.argmax() == p.argmax()
        if f:
            np.testing.assert_allclose(g, dpreds(torch.from_numpy(p), 0.5).numpy(), rtol=1e-6, atol=1e-9)
            assert not np.allclose(g, p, rtol=1e-3)
        elif exact:
            assert g.tolist() == p.tolist()
        else:
            np.testing.assert_allclose(g, p, rtol=1e-4, atol=1e-7)


# -------------------------------------------------------------------------------------- tests
def test_real_digits_get_exactly_the_unprotected_answer(server, oracle, env):
    from bento.client import real_digits

    imgs, labels = real_digits(40)
    want, flags = oracle(imgs)
    assert sum(flags) <= 2, f"the detector flags {sum(flags)} of 40 real digits"
    got = []
    for a in imgs:
        r = _classify(server.url, a, "benign")
        assert r.status_code == 200, r.text
        got.append(r.json())
    _check_rows(got, want, flags)
    assert np.mean(np.argmax(got, 1) == np.array(labels)) >= 0.9
    assert _ledger(env["ledger"], "benign") == (40, sum(flags), 0)
    # both worker processes answered, and both counted into the one ledger
    workers = set(re.findall(r"entry_service:mnist_guarded:(\d+)\].*path=/classify,", server.text()))
    assert workers == {"1", "2"}, workers


def test_synthetic_queries_get_dpreds_with_the_same_top1(server, oracle, env):
    from bento.client import synthetic_digits

    imgs = synthetic_digits(12, seed=1)
    want, flags = oracle(imgs)
    assert all(flags), flags
    got = []
    for a in imgs[:6]:
        r = _classify(server.url, a, "prober")
        assert r.status_code == 200, r.text
        got.append(r.json())
    _check_rows(got, want[:6], flags[:6])
    r = _classify_batch(server.url, imgs[6:], "prober")
    assert r.status_code == 200, r.text
    _check_rows(r.json(), want[6:], flags[6:], exact=False)
    assert _ledger(env["ledger"], "prober")[:2] == (12, 12)


def test_batch_rows_of_concurrent_clients_are_counted_apart(server, oracle, env):
    from concurrent.futures import ThreadPoolExecutor

    from bento.client import real_digits, synthetic_digits

    real, _ = real_digits(24, offset=100)
    fake = synthetic_digits(24, seed=2)
    want_r, flags_r = oracle(real)
    want_f, flags_f = oracle(fake)
    jobs = [(real[i:i + 3], f"mix-real-{i // 3}") for i in range(0, 24, 3)]
    jobs += [(fake[i:i + 3], f"mix-fake-{i // 3}") for i in range(0, 24, 3)]
    with ThreadPoolExecutor(8) as ex:
        resps = list(ex.map(lambda j: _classify_batch(server.url, *j), jobs))
    for (imgs, cid), r in zip(jobs, resps):
        assert r.status_code == 200, r.text
    got_r = sum((r.json() for r in resps[:8]), [])
    got_f = sum((r.json() for r in resps[8:]), [])
    _check_rows(got_r, want_r, flags_r, exact=False)
    _check_rows(got_f, want_f, flags_f, exact=False)
    for k in range(8):
        assert _ledger(env["ledger"], f"mix-real-{k}")[:2] == (3, sum(flags_r[3 * k:3 * k + 3]))
        assert _ledger(env["ledger"], f"mix-fake-{k}")[:2] == (3, sum(flags_f[3 * k:3 * k + 3]))


def test_bad_input_is_a_400_and_the_service_keeps_serving(server):
    from bento.client import real_digits

    for path, field in (("/classify", "image"), ("/classify_batch", "images")):
        r = requests.post(server.url + path, files=[(field, ("x.png", b"definitely not a png", "image/png"))],
                          headers={"X-Client-Id": "clumsy"}, timeout=60)
        assert r.status_code == 400, (path, r.status_code, r.text)
    r = requests.post(server.url + "/classify", data=b"{}", headers={"Content-Type": "application/json",
                                                                   "X-Client-Id": "clumsy"}, timeout=60)
    assert r.status_code == 400
    a = real_digits(1)[0][0]
    assert _classify(server.url, a, "clumsy").status_code == 200
    assert _classify_batch(server.url, [a, a], "clumsy").status_code == 200


def _png_bytes(mode, size):
    buf = io.BytesIO()
    import PIL.Image

    PIL.Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


def _malformed_uploads():
    """(field value, content type) that used to get 500 from the example service (issue #10)."""
    from bento.client import png, real_digits

    good = png(real_digits(1)[0][0])
    return {
        "truncated png": (good[: len(good) // 2], "image/png"),
        "decompression bomb": (_png_bytes("1", (20000, 20000)), "image/png"),  # 400 Mpx, ~50 kB
        "13000x13000 image": (_png_bytes("L", (13000, 13000)), "image/png"),
        "json in the image field": (b'{"image": [[1.0]]}', "application/json"),
        "base64 in the image field": (__import__("base64").b64encode(good), "text/plain"),
    }


@pytest.mark.parametrize("path,field", [("/classify", "image"), ("/classify_batch", "images")])
def test_malformed_uploads_get_400_with_the_guards_body(server, env, path, field):
    from bento.client import real_digits

    for what, (body, ctype) in _malformed_uploads().items():
        cid = f"malformed-{path[1:]}-{what.replace(' ', '-')}"
        r = requests.post(server.url + path, files=[(field, ("x.png", body, ctype))],
                          headers={"X-Client-Id": cid}, timeout=60)
        assert r.status_code == 400, (what, r.status_code, r.text)
        msg = r.json()
        assert set(msg) == {"code", "type", "message"} and msg["code"] == 400, (what, msg)
        # not answered, not counted (the quota's reservation at admission may have created the row)
        assert (_ledger(env["ledger"], cid) or (0,))[0] == 0, what
    a = real_digits(1)[0][0]
    assert _classify(server.url, a, "after-malformed").status_code == 200


def test_no_answer_from_an_input_the_detector_did_not_score(server, env):
    """Float, 16-bit, palette, CMYK and out-of-range TIFF/PNG bodies on both APIs: a 400, or the
    unprotected service's answer (or DPreds of it) computed from the very tensor the detector scores,
    whose pixels lie in [0, 1] (this service's preprocess converts every image to 8-bit grey). The
    ledger counts exactly the answers."""
    import PIL.Image

    from bento.service import MNISTUnprotected
    from guardian_plugin.guardian import Guardian
    from serving_fixtures import odd_image_bodies

    unprotected = MNISTUnprotected.inner()
    guardian = Guardian.from_artifact(DETECTOR)
    for what, (body, _) in odd_image_bodies().items():
        for path, field in (("/classify", "image"), ("/classify_batch", "images")):
            cid = f"odd-{path[1:]}-{what.replace(' ', '-')}"
            r = requests.post(server.url + path, files=[(field, ("x.tiff", body, "application/octet-stream"))],
                              headers={"X-Client-Id": cid}, timeout=60)
            assert r.status_code in (200, 400), (what, path, r.status_code, r.text)
            queries = (_ledger(env["ledger"], cid) or (0,))[0]
            if r.status_code == 400:
                assert queries == 0, (what, path)
                continue
            im = PIL.Image.open(io.BytesIO(body))
            x = unprotected.preprocess(im)
            assert guardian.check_inputs(x) == [None], what  # in range: the detector scores it as it is
            got = np.asarray(r.json() if path == "/classify" else r.json()[0], dtype=np.float64)
            want = np.asarray(unprotected.classify(im), dtype=np.float64)
            flagged = bool(guardian.detect(x)[0][0])
            _check_rows([got], [want], [flagged], exact=False)
            assert queries == 1, (what, path)


def test_a_bad_image_never_fails_its_batch_neighbours(server, oracle, env):
    """A truncated PNG sent to classify_batch together with benign requests (adaptive batching joins
    them): every benign request gets its correct 200, the bad one its 400, the ledger counts answers."""
    from concurrent.futures import ThreadPoolExecutor

    from bento.client import real_digits

    imgs = real_digits(7)[0]
    want, flags = oracle(imgs)
    bad = _malformed_uploads()["truncated png"][0]
    rounds = 5

    def send(job):
        kind, k = job
        if kind == "bad":
            return requests.post(server.url + "/classify_batch", files=[("images", ("b.png", bad, "image/png"))],
                                 headers={"X-Client-Id": "nb-bad"}, timeout=120)
        return _classify_batch(server.url, [imgs[k]], f"nb-good-{k}")

    with ThreadPoolExecutor(8) as pool:
        for _ in range(rounds):
            rs = list(pool.map(send, [("bad", 0)] + [("good", k) for k in range(7)]))
            assert rs[0].status_code == 400 and rs[0].json()["type"] == "CorruptImage", rs[0].text
            assert [r.status_code for r in rs[1:]] == [200] * 7, [r.text for r in rs[1:]]
            _check_rows(sum((r.json() for r in rs[1:]), []), want, flags, exact=False)
    assert (_ledger(env["ledger"], "nb-bad") or (0,))[0] == 0  # its grants were spent, nothing answered
    assert all(_ledger(env["ledger"], f"nb-good-{k}")[0] == rounds for k in range(7))


def test_metrics_endpoint_has_the_guard_counters(server):
    text = requests.get(server.url + "/metrics", timeout=30).text

    def value(name, **labels):
        lab = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        m = re.search(rf"^{name}{{{re.escape(lab)}}} ([0-9.e+]+)$", text, re.M)
        return float(m.group(1)) if m else None

    q = value("guardian_queries_total", api="classify", service="mnist_guarded")
    f = value("guardian_flagged_total", api="classify", service="mnist_guarded")
    qb = value("guardian_queries_total", api="classify_batch", service="mnist_guarded")
    assert q is not None and q >= 40 + 6 + 1, text[-3000:]
    assert f is not None and f >= 6
    assert qb is not None and qb >= 6 + 48 + 2
    assert value("guardian_guard_seconds_count", api="classify", service="mnist_guarded") >= 47


def test_distribution_test_refuses_a_generator_the_detector_does_not_flag(server, env):
    """An untrained generator in BatchNorm eval mode through the HTTP QueryTarget (16 images a request):
    the example detector flags almost none of its images, but the distribution test (on by default:
    the artifact has reference.json; blocks of 200) fails its first block, its queries then count as
    flagged, and the sliding window (30% of the last 200, the default) refuses it."""
    from bento.client import BentoTarget
    from guardian_plugin.attacks.target import QueryRefused
    from guardian_plugin.nets import GeneratorA

    torch.manual_seed(21)
    with torch.no_grad():
        x = GeneratorA(256, 1, 28, 64).eval()(torch.randn(600, 256))  # tanh output = normalised input (DFME)
    target = BentoTarget(server.url, client_id="bn-eval")
    for i in range(0, 600, 16):
        try:
            target.query(x[i:i + 16])
        except QueryRefused:
            break
    queries, flagged, refused = _ledger(env["ledger"], "bn-eval")
    assert refused == 1 and 200 < target.refused_at <= 300, target.refused_at
    # counted as flagged: the detector's own flags in the first block (few) + every query after it
    assert queries - 208 <= flagged <= queries - 208 + 10, (queries, flagged)


def test_attacker_is_refused_and_stays_refused_in_the_built_bento(server, oracle, env):
    """A DFME-style client through the HTTP QueryTarget: refused once tau queries are mostly flagged,
    403 with a JSON reason from then on, also after the server is replaced by the built Bento."""
    from bento.client import BentoTarget, real_digits, synthetic_digits
    from guardian_plugin.attacks.target import QueryRefused

    fake = synthetic_digits(2 * TAU, seed=3)
    x = (torch.from_numpy(np.stack(fake)).float().div(255).unsqueeze(1) - 0.1307) / 0.3081
    target = BentoTarget(server.url, client_id="dfme")
    for i in range(0, 2 * TAU, 4):
        try:
            target.query(x[i:i + 4])
        except QueryRefused:
            break
    # the rule acts at the row that crosses tau: the 4-image request it falls inside is not answered
    assert target.refused_at is not None and TAU - 4 < target.refused_at <= TAU, target.refused_at
    queries, flagged, refused = _ledger(env["ledger"], "dfme")
    assert refused == 1 and queries == target.refused_at and flagged / queries > 0.5
    r = _classify(server.url, fake[0], "dfme")
    assert r.status_code == 403 and r.json()["type"] == "ClientRefused" and "dfme" not in r.text

    # restart: the Bento that `bentoml build` makes of bento/, on the same ledger file
    server.stop()
    b = subprocess.run([os.path.join(BIN, "bentoml"), "build", "-f", "bento/bentofile.yaml", "-o", "tag", "."],
                       cwd=ROOT, env=env["env"], capture_output=True, text=True, timeout=300)
    assert b.returncode == 0, b.stdout[-2000:] + b.stderr[-2000:]
    tag = b.stdout.strip().splitlines()[-1].replace("__tag__:", "").strip()
    assert tag.startswith("mnist_guarded:"), b.stdout
    # served from outside the repository: the service, its guard.yaml and the artifacts come from the Bento
    elsewhere = env["tmp"] / "elsewhere"
    elsewhere.mkdir()
    built = Server(tag, env["env"], str(env["tmp"] / "serve-built.log"), cwd=str(elsewhere))
    try:
        assert "Starting production HTTP BentoServer from \"mnist_guarded:" in built.text()
        r = _classify(built.url, fake[1], "dfme")
        assert r.status_code == 403 and r.json()["type"] == "ClientRefused"
        assert _classify_batch(built.url, fake[:2], "dfme").status_code == 403
        assert _ledger(env["ledger"], "dfme")[0] == queries  # refused requests are not counted
        # and it serves protected: real digits exact, synthetic ones with DPreds
        real = real_digits(4, offset=200)[0]
        imgs = real + synthetic_digits(4, seed=4)
        want, flags = oracle(imgs)
        r = _classify_batch(built.url, imgs, "after-restart")
        assert r.status_code == 200, r.text
        _check_rows(r.json(), want, flags, exact=False)
        assert all(flags[4:])
        r = _classify(built.url, real[0], "after-restart")
        _check_rows([r.json()], want[:1], flags[:1])
    finally:
        built.stop()
