"""The defense-in-depth answers in both adapters, without a server: 429 + Retry-After, probation's
label-only answers, and the label-only archive's response (guardian_plugin.responses.LabelOnlyResponse).

TorchServe: HandlerGuard driving a small stand-in handler (preprocess, inference, postprocess as
TorchServe's template methods) with a recording context. BentoML: the real ASGI app under starlette's
TestClient (as tests/test_bento_inprocess.py). Small detector artifacts built here (flag all / none).
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import typing as t

import numpy as np
import PIL.Image
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from guardian_plugin.config import ProbationConfig, parse_config  # noqa: E402
from guardian_plugin.detector import load_detector  # noqa: E402
from guardian_plugin.guardian import Guardian  # noqa: E402
from guardian_plugin.handlers import guard as g  # noqa: E402
from guardian_plugin.ledger import RefusalRule  # noqa: E402
from guardian_plugin.ledger.memory import MemoryLedger  # noqa: E402
from guardian_plugin.responses import LabelOnlyResponse, dpreds, label_only, topk_label  # noqa: E402
from ledger_fixtures import tiny_detector  # noqa: E402

MEAN, STD, K = 0.1307, 0.3081, 10


# ------------------------------------------------------------------------------ rewriting rows
@pytest.mark.parametrize("kind", ["logits", "probabilities"])
def test_one_hot_rows_come_out_label_only_with_the_unprotected_top1(kind):
    """Probation's label-only answer through either output kind: the postprocess yields exactly 1 for
    the unprotected top-1 and 0 elsewhere; other rows are left bit for bit."""
    gen = torch.Generator().manual_seed(0)
    for spread in (0.1, 1.0, 8.0, 40.0):
        z = torch.randn(16, K, generator=gen) * spread
        p = torch.softmax(z, 1)
        out = z if kind == "logits" else p
        rows = torch.arange(16) % 3 != 0
        res = g.rewrite_flagged(out, p, label_only(p), rows, kind)
        post = torch.softmax(res, 1) if kind == "logits" else res  # ImageClassifier's postprocess step
        for i in range(16):
            if rows[i]:
                assert post[i].tolist() == label_only(p[i:i + 1])[0].tolist(), (spread, i, post[i])
                assert int(torch.topk(post[i], 1).indices) == int(torch.topk(p[i], 1).indices)
            else:
                assert torch.equal(res[i], out[i])


@pytest.mark.parametrize("kind", ["logits", "probabilities"])
def test_free_rows_keep_the_drawn_label_the_others_the_unprotected_ranking(kind):
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(32, K, generator=gen) * 3
    p = torch.softmax(z, 1)
    out = z if kind == "logits" else p
    flagged = torch.ones(32, dtype=torch.bool)
    free = torch.arange(32) % 2 == 0
    new = dpreds(p, 0.5)
    drawn = topk_label(p, 2, torch.Generator().manual_seed(2))
    new[free] = drawn[free]
    res = g.rewrite_flagged(out, p, new, flagged, kind, free)
    post = torch.softmax(res, 1) if kind == "logits" else res
    for i in range(32):
        if free[i]:
            assert post[i].tolist() == drawn[i].tolist()
        else:
            assert torch.equal(torch.topk(post[i], K).indices, torch.topk(p[i], K).indices)
    # both labels of the top 2 were drawn
    assert set(drawn[free].argmax(1).tolist()) & set(p[free].argmax(1).tolist())
    assert (drawn[free].argmax(1) != p[free].argmax(1)).any()


def test_topk_label_is_uniform_over_the_top_k():
    p = torch.softmax(torch.randn(1, K, generator=torch.Generator().manual_seed(3)) * 4, 1).repeat(3000, 1)
    for k in (2, 3):
        lab = topk_label(p, k, torch.Generator().manual_seed(k)).argmax(1)
        top = set(torch.topk(p[0], k).indices.tolist())
        assert set(lab.tolist()) == top
        for c in top:  # 1/k each, within 5 standard deviations
            n = int((lab == c).sum())
            assert abs(n / 3000 - 1 / k) < 5 * (1 / k * (1 - 1 / k) / 3000) ** 0.5, (k, c, n)
    assert LabelOnlyResponse("top1")(p[:4], torch.ones(4, dtype=torch.bool)) is None
    with pytest.raises(ValueError):
        LabelOnlyResponse("topk", k=1)


def test_response_config_label_only():
    cfg = parse_config({"detector": "d", "response": {"label_only": "topk", "k": 3}})
    assert (cfg.response.label_only, cfg.response.k, cfg.response.params()) == ("topk", 3, {"d": 0.5})
    assert parse_config({"detector": "d"}).response.label_only == "top1"
    from guardian_plugin.errors import ConfigError

    for bad in ({"label_only": "top2"}, {"k": 1}):
        with pytest.raises(ConfigError):
            parse_config({"detector": "d", "response": bad})


# ---------------------------------------------------------------------------- a TorchServe handler
def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def _digits(n: int, seed: int = 0) -> t.List[np.ndarray]:
    rng = np.random.RandomState(seed)
    return [rng.randint(0, 256, (28, 28)).astype(np.uint8) for _ in range(n)]


class SoftHandler:
    """A stand-in TorchServe handler: 28 px grey PNG -> normalised tensor, a fixed linear model's
    logits, and a top-10 {label: probability} postprocess (ImageClassifier's)."""

    def __init__(self):
        torch.manual_seed(5)
        self.w = torch.randn(784, K) * 0.05

    def preprocess(self, data):
        xs = [torch.from_numpy(np.asarray(PIL.Image.open(io.BytesIO(r["body"])).convert("L"), dtype=np.float32))
              for r in data]
        return ((torch.stack(xs) / 255.0 - MEAN) / STD).unsqueeze(1)

    def inference(self, x):
        return x.flatten(1) @ self.w

    def postprocess(self, out):
        ps = torch.softmax(out, 1)
        probs, classes = torch.topk(ps, K, dim=1)
        return [{str(c): float(v) for c, v in zip(cs.tolist(), vs.tolist())} for cs, vs in zip(classes, probs)]


class LabelHandler(SoftHandler):
    """TorchServe's MNIST example handler: the argmax label only."""

    def postprocess(self, out):
        return out.argmax(1).tolist()


class Context:
    """What HandlerGuard uses of TorchServe's Context, recorded."""

    def __init__(self, headers):
        self.headers = headers
        self.status, self.resp_headers, self.counters = {}, {}, {}
        self.metrics = self

    def get_all_request_header(self, i):
        return self.headers[i]

    def set_response_status(self, code, phrase, idx=0):
        self.status[idx] = (code, phrase)

    def set_response_content_type(self, idx, ctype):
        pass

    def set_response_header(self, idx, key, value):
        self.resp_headers.setdefault(idx, {})[key] = value

    def add_counter(self, name, value, **kw):
        self.counters[name] = self.counters.get(name, 0) + value

    def add_time(self, name, value, **kw):
        pass


@pytest.fixture(scope="module")
def detectors(tmp_path_factory):
    d = tmp_path_factory.mktemp("det")
    return {"all": tiny_detector(d / "all", threshold=-1e30, mean=[MEAN], std=[STD]),
            "none": tiny_detector(d / "none", threshold=1e30, mean=[MEAN], std=[STD])}


def _handle(guard, bodies, clients):
    ctx = Context([{"X-Client-Id": c} for c in clients])
    out = guard.handle([{"body": b} for b in bodies], ctx)
    return out, ctx


def test_handler_answers_429_with_retry_after_and_counts_it(detectors):
    ledger = MemoryLedger(RefusalRule(tau=1000, quota=3, quota_period_s=3600))
    guard = g.HandlerGuard(SoftHandler(), Guardian(load_detector(detectors["none"]), ledger))
    bodies = [_png(a) for a in _digits(5)]
    out, ctx = _handle(guard, bodies[:4], ["a", "a", "b", "a"])  # a: 3 granted of 3, b: 1
    assert ctx.status == {} and all(isinstance(o, dict) for o in out)
    out, ctx = _handle(guard, bodies[:3], ["a", "b", "a"])
    assert ctx.status == {0: (429, "Too Many Requests"), 2: (429, "Too Many Requests")}, ctx.status
    for i in (0, 2):
        body = json.loads(out[i])
        assert body["code"] == 429 and body["type"] == "QuotaExceeded" and body["message"]
        assert 0 < int(ctx.resp_headers[i]["Retry-After"]) <= 3600
    assert isinstance(out[1], dict) and 1 not in ctx.resp_headers  # b unaffected
    assert ctx.counters["GuardianQuotaExceeded"] == 2 and ctx.counters["GuardianQueries"] == 1
    assert (ledger.get("a").queries, ledger.get("b").queries) == (3, 2)


def test_handler_counts_a_batch_only_once_its_answers_are_built(detectors, monkeypatch):
    """The ledger update comes after every postprocess: a worker that fails (here: its postprocess
    raises, as a killed one never gets past it) before its answers are built leaves no query counted, and
    its quota holds are released after their lease; a batch that is answered is counted and committed."""
    clock = [1000.0]
    for mod in ("base", "memory"):
        monkeypatch.setattr(f"guardian_plugin.ledger.{mod}.now", lambda: clock[0])
    ledger = MemoryLedger(RefusalRule(tau=1000, quota=5, quota_period_s=10**9, quota_lease_s=30))
    inner = SoftHandler()
    guard = g.HandlerGuard(inner, Guardian(load_detector(detectors["none"]), ledger))
    bodies = [_png(a) for a in _digits(3)]
    post = inner.postprocess

    def dies(out):
        raise SystemExit("worker killed")

    inner.postprocess = dies
    with pytest.raises(SystemExit):
        _handle(guard, bodies, ["a", "a", "b"])
    s = ledger.get("a")
    assert (s.queries, s.period_queries) == (0, 2)  # held, not counted as answered
    clock[0] += 31
    assert (ledger.get("a").period_queries, ledger.get("b").period_queries) == (0, 0)  # lease over: released
    inner.postprocess = post
    out, ctx = _handle(guard, bodies + [b"not an image"], ["a", "a", "b", "a"])
    assert ctx.status == {3: (400, "Bad Request")}, ctx.status
    clock[0] += 31
    s, b = ledger.get("a"), ledger.get("b")
    # answered rows counted; the 400 left in the same response, so its grant is spent as documented
    assert (s.queries, s.period_queries, b.queries, b.period_queries) == (2, 3, 1, 1)


def test_handler_probation_answers_label_only_then_the_model(detectors):
    ledger = MemoryLedger(RefusalRule(tau=1000))
    guardian = Guardian(load_detector(detectors["none"]), ledger, probation=ProbationConfig(queries=3))
    inner = SoftHandler()
    guard = g.HandlerGuard(inner, guardian)
    bodies = [_png(a) for a in _digits(6, 1)]
    want = [inner.postprocess(inner.inference(inner.preprocess([{"body": b}])))[0] for b in bodies]
    got = [_handle(guard, [b], ["newbie"])[0][0] for b in bodies]
    for i, (w, r) in enumerate(zip(want, got)):
        top = max(w, key=w.get)
        if i < 3:
            assert r[top] == 1.0 and sum(r.values()) == 1.0 and next(iter(r)) == top, (i, r)
        else:
            assert r == w  # exactly the unprotected answer


def test_label_only_archive_is_detected_warned_and_flagged_rows_drawn_from_the_top_k(detectors, caplog):
    cfg = parse_config({"detector": detectors["all"], "response": {"label_only": "topk", "k": 2}})
    guardian = Guardian(load_detector(detectors["all"]), MemoryLedger(RefusalRule(tau=1000)))
    assert g.probe_label_answers(LabelHandler(), K) == [K - 1, 0]
    assert g.probe_label_answers(SoftHandler(), K) is None

    class Broken(SoftHandler):
        def postprocess(self, out):
            raise RuntimeError("needs a request context")

    assert g.probe_label_answers(Broken(), K) is None
    with caplog.at_level(logging.WARNING, "guardian_plugin.handlers"):
        assert g.label_only_response(SoftHandler(), guardian, cfg) is None
        assert not caplog.records
        resp = g.label_only_response(LabelHandler(), guardian, cfg)
    assert resp is not None and resp.k == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "labels only" in warnings[0] and "top 2" in warnings[0], warnings

    inner = LabelHandler()
    guard = g.HandlerGuard(inner, guardian, label_response=resp)
    bodies = [_png(a) for a in _digits(40, 2)]
    logits = inner.inference(inner.preprocess([{"body": b} for b in bodies]))
    top2 = torch.topk(logits, 2, 1).indices.tolist()
    out, ctx = _handle(guard, bodies, [f"c{i}" for i in range(40)])
    assert ctx.status == {}
    assert all(isinstance(o, int) and o in t2 for o, t2 in zip(out, top2)), (out, top2)
    assert any(o != t2[0] for o, t2 in zip(out, top2)) and any(o == t2[0] for o, t2 in zip(out, top2))
    # top1 (the default) answers flagged rows with the model's own label
    keep = g.HandlerGuard(inner, guardian, label_response=LabelOnlyResponse("top1"))
    out, _ = _handle(keep, bodies, [f"d{i}" for i in range(40)])
    assert out == [t2[0] for t2 in top2]
    # observe mode (docs/rollout.md): every flagged row decided, none drawn: the model's own label
    observer = Guardian(load_detector(detectors["all"]), MemoryLedger(RefusalRule(tau=1000)), observe=True)
    out, ctx = _handle(g.HandlerGuard(inner, observer, label_response=resp), bodies, [f"e{i}" for i in range(40)])
    assert ctx.status == {} and out == [t2[0] for t2 in top2]
    assert ctx.counters["GuardianWouldDPreds"] == 40 and ctx.counters["GuardianWouldRefuse"] == 0


# ------------------------------------------------------------------------------------------ BentoML
bentoml = pytest.importorskip("bentoml")


class Victim:
    def __init__(self):
        torch.manual_seed(1)
        self.w = torch.randn(784, K, dtype=torch.float64)

    def preprocess(self, images):
        imgs = images if isinstance(images, list) else [images]
        x = torch.from_numpy(np.stack([np.asarray(im.convert("L"), dtype=np.float32) for im in imgs])).div_(255.0)
        return ((x - MEAN) / STD).unsqueeze(1)

    def proba(self, x):
        return torch.cat([torch.softmax(r.flatten().double()[None] @ self.w, 1) for r in x])

    @bentoml.api
    def one(self, image: PIL.Image.Image) -> t.List[float]:
        return self.proba(self.preprocess(image))[0].tolist()

    @bentoml.api
    def listed(self, images: t.List[PIL.Image.Image]) -> np.ndarray:  # a list input, not batchable
        return self.proba(self.preprocess(images)).numpy()

    @bentoml.api(batchable=True, max_batch_size=32, max_latency_ms=2000)
    def many(self, images: t.List[PIL.Image.Image]) -> np.ndarray:
        return self.proba(self.preprocess(images)).numpy()


def _service(artifact, ledger, name, probation=0):
    from guardian_plugin.bento import guard

    def make():
        return Guardian(load_detector(artifact), ledger, probation=ProbationConfig(queries=probation))

    sub = type(name, (Victim,), {})
    return bentoml.service(name=name, metrics={"enabled": False})(guard(guardian=make)(sub))


def _files(field, imgs):
    return [(field, (f"{i}.png", _png(a), "image/png")) for i, a in enumerate(imgs)]


def _check_429(r):
    assert r.status_code == 429, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"code", "type", "message"} and body["code"] == 429 and body["type"] == "QuotaExceeded"
    assert 0 < int(r.headers["retry-after"]) <= 3600


@pytest.mark.parametrize("path,field", [("/one", "image"), ("/listed", "images"), ("/many", "images")])
def test_bento_quota_429_with_retry_after_counts_every_image(detectors, path, field):
    """Each image of a request counts against the quota (not each request); a request whose images the
    quota cannot all cover gets 429 as a whole, with the JSON body and Retry-After; others unaffected."""
    from starlette.testclient import TestClient

    ledger = MemoryLedger(RefusalRule(tau=1000, quota=5, quota_period_s=3600))
    svc = _service(detectors["none"], ledger, "quota" + path.strip("/"))
    imgs = _digits(5, 3)
    per = 1 if path == "/one" else 2
    with TestClient(svc.to_asgi()) as c:
        def send(cid, n=per):
            return c.post(path, files=_files(field, imgs[:n]), headers={"X-Client-Id": cid})

        for _ in range(5 // per):
            assert send("alice").status_code == 200
        r = send("alice")
        if per == 2:  # 4 used, 1 left: a request of 2 images is refused whole; the one granted is spent
            _check_429(r)
            assert ledger.get("alice").period_queries == 5
            r = send("alice")
        _check_429(r)
        assert send("bob").status_code == 200
        assert ledger.get("alice").queries == 5 // per * per
        ledger.reset_quota("alice")
        assert send("alice").status_code == 200


def test_bento_grants_stay_spent_after_the_lease_for_answers_and_errors(detectors, monkeypatch):
    """BentoML commits a request's quota holds with its answer (Guardian.inspect) or, for an error answer
    (a 400 for an image that fails to decode), once that answer is sent; only a request that got no
    answer at all (the worker died) has its grants released after the lease."""
    from starlette.testclient import TestClient

    clock = [1000.0]
    for mod in ("base", "memory"):
        monkeypatch.setattr(f"guardian_plugin.ledger.{mod}.now", lambda: clock[0])
    ledger = MemoryLedger(RefusalRule(tau=1000, quota=5, quota_period_s=10**9, quota_lease_s=30))
    svc = _service(detectors["none"], ledger, "holds")
    with TestClient(svc.to_asgi()) as c:
        assert c.post("/many", files=_files("images", _digits(2, 3)), headers={"X-Client-Id": "a"}).status_code == 200
        bad = [("images", ("x.png", b"not an image", "image/png"))]
        assert c.post("/many", files=bad, headers={"X-Client-Id": "a"}).status_code == 400
        ledger.reserve_many([("a", 1)])  # a worker that died before answering: never committed
        assert ledger.get("a").period_queries == 4
        clock[0] += 31
        s = ledger.get("a")
        assert (s.queries, s.period_queries) == (2, 3), s


def test_bento_probation_label_only_then_exact(detectors):
    from starlette.testclient import TestClient

    ledger = MemoryLedger(RefusalRule(tau=1000))
    svc = _service(detectors["none"], ledger, "probation", probation=3)
    imgs = _digits(6, 4)
    want = Victim().proba(Victim().preprocess([PIL.Image.fromarray(a) for a in imgs])).numpy()
    with TestClient(svc.to_asgi()) as c:
        got = [c.post("/one", files=_files("image", [a]), headers={"X-Client-Id": "new"}).json() for a in imgs[:4]]
        many = c.post("/many", files=_files("images", imgs[4:]), headers={"X-Client-Id": "new2"}).json()
    for i, r in enumerate(got):
        if i < 3:
            assert r == np.eye(K)[want[i].argmax()].tolist()
        else:
            assert r == want[i].tolist()
    assert np.array_equal(np.array(many), np.eye(K)[want[4:].argmax(1)])
