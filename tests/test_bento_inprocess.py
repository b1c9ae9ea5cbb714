"""The BentoML adapter in process: BentoML's real ASGI app (Service.to_asgi()) under starlette's
TestClient, with a small detector artifact built here, so every expected answer is computed exactly.

The oracle for each row: the unprotected probabilities from the same model, and the detector's own
verdict on the same preprocessed tensor (Guardian.detect); a flagged row must be DPreds of the
unprotected row, an unflagged one must be returned bit for bit.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import threading
import typing as t

import numpy as np
import PIL.Image
import pytest
import torch

bentoml = pytest.importorskip("bentoml")
from starlette.testclient import TestClient  # noqa: E402

from guardian_plugin.bento import GuardianMiddleware, guard, protect  # noqa: E402
from guardian_plugin.detector import (DetectorSpec, ImageSpec, InputMapping, SubDetector,  # noqa: E402
                                      SubDetectorSpec, save_detector)
from guardian_plugin.guardian import Guardian  # noqa: E402
from guardian_plugin.ledger import RefusalRule  # noqa: E402
from guardian_plugin.ledger.memory import MemoryLedger  # noqa: E402
from guardian_plugin.responses import dpreds  # noqa: E402

MEAN, STD = 0.1307, 0.3081
# BentoML registers its own request metrics once per app; several apps in one process would collide
NO_METRICS = {"enabled": False}


# ------------------------------------------------------------------------------------ fixtures
def _images(n: int, seed: int) -> t.List[np.ndarray]:
    """uint8 28x28 images of varied content: smooth blobs and noise, so the detector's scores vary."""
    rng = np.random.RandomState(seed)
    out = []
    yy, xx = np.mgrid[0:28, 0:28]
    for i in range(n):
        if i % 2:
            a = rng.randint(0, 256, (28, 28))
        else:
            cy, cx, r = rng.randint(8, 20), rng.randint(8, 20), rng.randint(3, 9)
            a = 255.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * r * r))
        out.append(np.asarray(a, dtype=np.uint8))
    return out


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def _pre(a_list) -> torch.Tensor:
    x = torch.from_numpy(np.stack(a_list).astype(np.float32)).div_(255.0).unsqueeze(1)
    return (x - MEAN) / STD


def _artifact(directory: str, threshold: float) -> str:
    torch.manual_seed(0)
    spec = DetectorSpec(format_version=1, image=ImageSpec(channels=1, size=28),
                        input=InputMapping(mean=[MEAN], std=[STD]),
                        subdetectors=[SubDetectorSpec(name="raw", transform="identity", weights="raw.pt",
                                                      threshold=threshold, arch_params={"width": 4})])
    save_detector(directory, spec, [SubDetector("small_resnet", 1, 28, width=4)])
    return directory


@pytest.fixture(scope="module")
def median_artifact(tmp_path_factory):
    """An untrained detector whose threshold is the median score of the test images: about half of
    them are flagged, and exactly which is known from Guardian.detect."""
    d = str(tmp_path_factory.mktemp("median"))
    _artifact(d, 0.0)
    g = Guardian.from_artifact(d)
    _, s = g.detect(_pre(_images(24, 1)))
    return _artifact(d, float(s[:, 0].median()))


@pytest.fixture(scope="module")
def flag_all_artifact(tmp_path_factory):
    return _artifact(str(tmp_path_factory.mktemp("all")), float("-inf"))


class Victim:
    """A plain class with the guard's contract: preprocess + API methods returning probabilities."""

    log: t.List[int] = []  # rows per call of the user's methods (each test's subclass gets its own)

    def __init__(self):
        torch.manual_seed(1)
        self.w = torch.randn(784, 10, dtype=torch.float64)

    def preprocess(self, images):
        imgs = images if isinstance(images, list) else [images]
        if any(im.size != (28, 28) for im in imgs):
            raise ValueError("images must be 28 x 28")
        return _pre([np.asarray(im.convert("L"), dtype=np.uint8) for im in imgs])

    def proba(self, x):  # row by row: the same answer whatever batch a row arrives in
        return torch.cat([torch.softmax(r.flatten().double()[None] @ self.w, 1) for r in x])

    @bentoml.api
    def one(self, image: PIL.Image.Image) -> t.List[float]:
        type(self).log.append(1)
        return self.proba(self.preprocess(image))[0].tolist()

    @bentoml.api
    async def one_async(self, image: PIL.Image.Image, ctx: bentoml.Context) -> np.ndarray:
        assert ctx.request.headers.get("x-client-id") is not None
        await asyncio.sleep(0)
        type(self).log.append(1)
        return self.proba(self.preprocess(image))[0].float().numpy()

    @bentoml.api(batchable=True, max_batch_size=32, max_latency_ms=20000)
    def many(self, images: t.List[PIL.Image.Image]) -> np.ndarray:
        type(self).log.append(len(images))
        import time

        time.sleep(0.05)  # let concurrent requests queue up behind this batch
        return self.proba(self.preprocess(images)).numpy()


def _unprotected(a_list) -> np.ndarray:
    return Victim().proba(_pre(a_list)).numpy()


def _expected_flags(artifact, a_list) -> t.List[bool]:
    f, _ = Guardian.from_artifact(artifact).detect(_pre(a_list))
    return f.tolist()


def _service(artifact, tau=1000, identity=None, cls=Victim, name="victim"):
    ledger = MemoryLedger(RefusalRule(tau=tau, rho=0.5))
    holder = {}

    def make():
        g = Guardian.from_artifact(artifact, ledger=ledger)
        holder["g"] = g
        return g

    sub = type(name, (cls,), {"log": []})
    svc = bentoml.service(name=name, metrics=NO_METRICS)(guard(guardian=make)(sub))
    if identity is not None:
        svc.inner.__guardian_guard__.config = {"detector": artifact, "identity": identity}
        svc.inner.__guardian_guard__.guardian = make
    return svc, ledger, holder


def _post_one(c, path, a, cid="alice"):
    return c.post(path, files={"image": ("x.png", _png(a), "image/png")}, headers={"X-Client-Id": cid})


def _post_many(c, a_list, cid="alice"):
    return c.post("/many", files=[("images", (f"{i}.png", _png(a), "image/png")) for i, a in enumerate(a_list)],
                  headers={"X-Client-Id": cid})


# -------------------------------------------------------------------------------------- tests
def test_decorator_keeps_sync_async_batchable_and_adds_ctx(median_artifact):
    svc, _, _ = _service(median_artifact)
    apis = svc.apis
    assert set(apis) == {"one", "one_async", "many"}
    assert not inspect.iscoroutinefunction(apis["one"].func)
    assert inspect.iscoroutinefunction(apis["one_async"].func)
    assert apis["many"].batchable and not apis["one"].batchable
    # ctx added where the method had none, the method's own kept; the input schema unchanged
    assert apis["one"].ctx_param == "ctx" and "ctx" in inspect.signature(apis["one"].func).parameters
    assert apis["one_async"].ctx_param == "ctx"
    assert list(apis["one"].input_spec.model_fields) == ["image"]
    assert list(apis["many"].input_spec.model_fields) == ["images"]
    assert [m for m, _ in svc.middlewares] == [GuardianMiddleware]
    # the original class is untouched (guard applied to a subclass)
    assert not hasattr(Victim.one.func, "__guardian_original__")


@pytest.mark.parametrize("path", ["/one", "/one_async"])
def test_single_image_apis_answer_exactly_or_with_dpreds(median_artifact, path):
    imgs = _images(24, 1)
    flags = _expected_flags(median_artifact, imgs)
    assert 0 < sum(flags) < len(flags)
    want = _unprotected(imgs)
    svc, ledger, _ = _service(median_artifact)
    with TestClient(svc.to_asgi()) as c:
        for a, f, p in zip(imgs, flags, want):
            r = _post_one(c, path, a)
            assert r.status_code == 200, r.text
            got = np.array(r.json())
            if path == "/one_async":  # float32 array in, float32 array out
                p = p.astype(np.float32)
            if f:
                np.testing.assert_allclose(got, dpreds(torch.from_numpy(p).double(), 0.5).numpy(), rtol=1e-6)
                assert got.argmax() == p.argmax() and not np.array_equal(got, p)
            else:
                assert got.tolist() == p.tolist()  # exactly the unprotected answer
    st = ledger.get("alice")
    assert (st.queries, st.flagged) == (len(imgs), sum(flags))


def test_batchable_api_rows_keep_their_own_client(median_artifact):
    imgs = _images(24, 1)
    flags = _expected_flags(median_artifact, imgs)
    want = _unprotected(imgs)
    svc, ledger, _ = _service(median_artifact)
    clients = [f"c{i}" for i in range(6)]
    chunks = {c: list(range(i * 4, i * 4 + 4)) for i, c in enumerate(clients)}
    results, errors = {}, []
    with TestClient(svc.to_asgi()) as c:
        def send(cid):
            try:
                results[cid] = _post_many(c, [imgs[i] for i in chunks[cid]], cid)
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        for _ in range(2):  # two waves of six concurrent requests
            ths = [threading.Thread(target=send, args=(cid,)) for cid in clients]
            [th.start() for th in ths]
            [th.join() for th in ths]
            assert not errors
            for cid in clients:
                r = results[cid]
                assert r.status_code == 200, r.text
                got = np.array(r.json())
                for row, i in zip(got, chunks[cid]):
                    p = want[i]
                    if flags[i]:
                        np.testing.assert_allclose(row, dpreds(torch.from_numpy(p), 0.5).numpy(), rtol=1e-12)
                        assert row.argmax() == p.argmax()
                    else:
                        assert row.tolist() == p.tolist()
    for cid in clients:
        st = ledger.get(cid)
        assert st.queries == 8, cid
        assert st.flagged == 2 * sum(flags[i] for i in chunks[cid]), cid


def test_batchable_api_merges_requests(median_artifact):
    """BentoML's adaptive batching still merges requests of different clients into one call."""
    svc, ledger, _ = _service(median_artifact, name="merging")
    imgs = _images(8, 3)
    with TestClient(svc.to_asgi()) as c:
        for _ in range(3):
            ths = [threading.Thread(target=_post_many, args=(c, [imgs[i]], f"m{i}")) for i in range(8)]
            [th.start() for th in ths]
            [th.join() for th in ths]
    assert sum(svc.inner.log) == 24 and max(svc.inner.log) > 1, svc.inner.log  # merged calls
    assert [ledger.get(f"m{i}").queries for i in range(8)] == [3] * 8


def test_refused_client_gets_403_before_the_body_is_read(flag_all_artifact):
    svc, ledger, _ = _service(flag_all_artifact, tau=3)
    imgs = _images(6, 2)
    with TestClient(svc.to_asgi()) as c:
        for a in imgs[:3]:
            assert _post_one(c, "/one", a, "mallory").status_code == 200
        assert ledger.get("mallory").refused
        r = _post_one(c, "/one", imgs[3], "mallory")
        assert r.status_code == 403 and r.json()["type"] == "ClientRefused" and "refused" in r.json()["message"]
        # the middleware answers before the body is parsed: garbage from a refused client is a 403
        r = c.post("/many", files=[("images", ("x.png", b"not an image", "image/png"))],
                   headers={"x-client-id": "MALLORY".lower()})
        assert r.status_code == 403
        assert _post_many(c, imgs[:2], "mallory").status_code == 403
        assert _post_one(c, "/one_async", imgs[0], "mallory").status_code == 403
        assert sum(svc.inner.log) == 3  # the API method never ran for the refused requests
        # nobody else is affected; the refused client's requests were not counted
        assert _post_one(c, "/one", imgs[4], "bob").status_code == 200
        assert ledger.get("mallory").queries == 3
        # bad input from a client in good standing: 400, and the service keeps serving
        r = c.post("/one", files={"image": ("x.png", b"not an image", "image/png")}, headers={"X-Client-Id": "bob"})
        assert r.status_code == 400
        r = c.post("/many", files=[("images", ("x.png", b"\x89PNG broken", "image/png"))],
                   headers={"X-Client-Id": "bob"})
        assert r.status_code == 400
        assert _post_many(c, imgs[:2], "bob").status_code == 200
        # input the service's preprocess rejects (ValueError): 400 before the method runs
        n = len(svc.inner.log)
        big = np.zeros((30, 30), np.uint8)
        for path in ("/one", "/one_async"):
            r = _post_one(c, path, big, "carl")
            assert r.status_code == 400 and "28 x 28" in r.text, r.text
        assert _post_many(c, [imgs[0], big], "carl").status_code == 400
        assert len(svc.inner.log) == n and ledger.get("carl").queries == 0


def test_missing_identity_is_rejected_when_configured(flag_all_artifact):
    svc, _, _ = _service(flag_all_artifact, identity={"missing": "reject"}, name="strict")
    with TestClient(svc.to_asgi()) as c:
        r = c.post("/one", files={"image": ("x.png", _png(_images(1, 0)[0]), "image/png")})
        assert r.status_code == 401 and "X-Client-Id" in r.json()["message"]
        assert _post_one(c, "/one", _images(1, 0)[0], "carol").status_code == 200


def test_protect_function_form_leaves_the_original_service_alone(flag_all_artifact):
    plain = bentoml.service(name="plain", metrics=NO_METRICS)(type("Plain", (Victim,), {}))
    ledger = MemoryLedger(RefusalRule(tau=1000, rho=0.5))
    guarded = protect(plain, guardian=lambda: Guardian.from_artifact(flag_all_artifact, ledger=ledger),
                      apis=["one"], name="plain_guarded")
    assert guarded.name == "plain_guarded" and plain.middlewares == []
    assert [m for m, _ in guarded.middlewares] == [GuardianMiddleware]
    a = _images(2, 5)[0]
    p = _unprotected([a])[0]
    with TestClient(plain.to_asgi()) as c:
        assert _post_one(c, "/one", a).json() == p.tolist()
    with TestClient(guarded.to_asgi()) as c:
        got = np.array(_post_one(c, "/one", a).json())
        np.testing.assert_allclose(got, dpreds(torch.from_numpy(p), 0.5).numpy(), rtol=1e-12)
        # only the named API is guarded
        assert _post_many(c, [a]).json() == [p.tolist()]
    assert ledger.get("alice").queries == 1


def test_guard_goes_under_the_service_decorator():
    svc = bentoml.service(name="wrong_order")(type("W", (Victim,), {}))
    with pytest.raises(TypeError, match="UNDER"):
        guard(guardian=lambda: None)(svc)
    with pytest.raises(TypeError, match="no @bentoml.api method nope"):
        guard(guardian=lambda: None, apis=["nope"])(type("W2", (Victim,), {}))


def test_the_readme_example_works_as_written(tmp_path, monkeypatch):
    """The README's BentoML block, saved as a module and run from the repository root."""
    import importlib
    import os
    import re
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md")) as f:
        readme = f.read()
    section = readme.split("## BentoML", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) == 5
    assert "@guard(" in code and "@bentoml.service" in code
    (tmp_path / "readme_service.py").write_text(code)
    detector = os.environ.get("GUARDIAN_TEST_DETECTOR")
    if detector:  # another artifact than the committed one
        (tmp_path / "guard.yaml").write_text(f"detector: {detector}\nnamespace: mnist\n")
        monkeypatch.setenv("GUARDIAN_CONFIG", str(tmp_path / "guard.yaml"))
    monkeypatch.setenv("GUARDIAN_LEDGER", f"sqlite:///{tmp_path}/ledger.db")
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(root)
    mod = importlib.import_module("readme_service")
    svc = mod.MNIST
    assert isinstance(svc, bentoml.Service) and [m for m, _ in svc.middlewares] == [GuardianMiddleware]
    sys.modules.pop("readme_service", None)

    from bento.client import real_digits, synthetic_digits

    victim = svc.inner()
    g = svc.inner.__guardian_guard__.runtime().guardian

    def flagged(a):
        return bool(g.detect(victim.preprocess(PIL.Image.fromarray(a)))[0][0])

    reals = [a for a in real_digits(10, offset=300)[0] if not flagged(a)]
    fakes = [a for a in synthetic_digits(4, seed=9) if flagged(a)]
    assert len(reals) >= 8 and len(fakes) >= 3, (len(reals), len(fakes))
    real, fake = reals[0], fakes[0]
    x_real = victim.preprocess(PIL.Image.fromarray(real))
    x_fake = victim.preprocess(PIL.Image.fromarray(fake))
    with TestClient(svc.to_asgi()) as c:
        r = _post_one(c, "/classify", real, "reader")
        assert r.status_code == 200 and r.json() == victim.predict_proba(x_real)[0].tolist()
        r = _post_one(c, "/classify", fake, "reader")
        p = victim.predict_proba(x_fake)[0].double()
        np.testing.assert_allclose(r.json(), dpreds(p, 0.5).numpy(), rtol=1e-12)
