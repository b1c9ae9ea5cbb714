"""Quotas, probation and label-only archives against a REAL TorchServe 0.12, with the example's committed
victim and detector, one SQLite ledger shared by all workers.

One server for the module: the unprotected example archive (top-10 probabilities) and its
`guardian protect`ed copies with a quota of 5 queries a day (2 workers), with probation for 3
queries, with the distribution test in blocks of 40 (the artifact's reference.json), and with the
shipped defense_in_depth settings (guard-config defaults + probation 200; 2 workers); TorchServe's
MNIST-example style label-only archive (postprocess: argmax label) and its protected copy with
``response: {label_only: topk, k: 2}``; and a protected copy in observe-only mode (``mode: observe``,
2 workers, docs/rollout.md).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from examples.mnist import serving as ex  # noqa: E402
from guardian_plugin.devserver.torchserve import build_archive  # noqa: E402
from guardian_plugin.handlers.archive import protect  # noqa: E402
from guardian_plugin.ledger import open_ledger  # noqa: E402
from guardian_plugin.ledger.base import RefusalRule  # noqa: E402
from serving_fixtures import start_torchserve  # noqa: E402

QUOTA, PROBATION, K_TOP, DIST_BLOCK = 5, 3, 2, 40
WORKERS, BATCH, DELAY_MS = 2, 8, 50
GUARDIAN = os.path.join(os.path.dirname(sys.executable), "guardian")


def _guard(path, ledger, namespace, **extra):
    cfg = {"ledger": ledger, "namespace": namespace, "identity": {"headers": ["X-Client-Id"]}, **extra}
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    for p in (ex.VICTIM_TS, os.path.join(ex.DETECTOR, "detector.yaml")):
        assert os.path.exists(p), f"{p} missing: regenerate the example with `make train-example`"
    w = tmp_path_factory.mktemp("torchserve_depth")
    store = str(w / "store")
    ledger = f"sqlite:///{w}/state/ledger.db"
    soft = build_archive("mnist", ex.VICTIM_TS, ex.MNIST_HANDLER, store)
    protect(soft, ex.DETECTOR, os.path.join(store, "quota_g.mar"),
            config=_guard(w / "quota.yaml", ledger, "quota", quota={"queries": QUOTA, "period": "1d"}))
    protect(soft, ex.DETECTOR, os.path.join(store, "prob_g.mar"),
            config=_guard(w / "prob.yaml", ledger, "prob", probation={"queries": PROBATION}))
    protect(soft, ex.DETECTOR, os.path.join(store, "dist_g.mar"),
            config=_guard(w / "dist.yaml", ledger, "dist", distribution={"enabled": True, "block": DIST_BLOCK}))
    protect(soft, ex.DETECTOR, os.path.join(store, "depth_g.mar"),
            config=_guard(w / "depth.yaml", ledger, "depth", probation={"queries": 200}))
    protect(soft, ex.DETECTOR, os.path.join(store, "observe_g.mar"),
            config=_guard(w / "observe.yaml", ledger, "observe", mode="observe", probation={"queries": 3}))
    labels = build_archive("labels", ex.VICTIM_TS, ex.MNIST_LABEL_HANDLER, store)
    protect(labels, ex.DETECTOR, os.path.join(store, "labels_g.mar"),
            config=_guard(w / "labels.yaml", ledger, "labels", rule={"tau": 1000},
                          response={"label_only": "topk", "k": K_TOP}))
    ts = start_torchserve(store, str(w / "server"), {"mnist": 1, "quota_g": WORKERS, "prob_g": 1, "dist_g": 1,
                                                     "depth_g": WORKERS, "labels": 1, "labels_g": 1,
                                                     "observe_g": WORKERS}, BATCH, DELAY_MS)
    digits, _ = ex.real_digits(24)
    yield {"ts": ts, "w": w, "ledger": ledger, "digits": digits, "fakes": ex.generator_images(16, seed=5)}
    ts.stop()


def post(ts, model, body, client):
    return ts.predict(model, body, {"X-Client-Id": client})


def _ledger(served, namespace):
    return open_ledger(served["ledger"], RefusalRule(quota=QUOTA), namespace)


def _check_429(r):
    assert r.status_code == 429, (r.status_code, r.text)
    body = json.loads(r.text)
    assert set(body) == {"code", "type", "message"} and (body["code"], body["type"]) == (429, "QuotaExceeded")
    assert "quota" in body["message"]
    assert 0 < int(r.headers["Retry-After"]) <= 86400, r.headers


def test_quota_429_with_retry_after_others_unaffected_reset_lets_it_back(served):
    ts, digits = served["ts"], served["digits"]
    for i in range(QUOTA):
        r = post(ts, "quota_g", digits[i], "q-alice")
        assert r.status_code == 200 and len(ex.topk(r)) == 10, r.text
    for i in range(2):
        _check_429(post(ts, "quota_g", digits[i], "q-alice"))
    assert post(ts, "quota_g", digits[0], "q-bob").status_code == 200
    s = _ledger(served, "quota").get("q-alice")
    assert (s.queries, s.period_queries) == (QUOTA, QUOTA)  # 429s are not answers
    r = subprocess.run([GUARDIAN, "clients", "reset-quota", "q-alice", "--ledger", served["ledger"],
                        "--namespace", "quota"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert post(ts, "quota_g", digits[0], "q-alice").status_code == 200
    text = ts.metrics()
    lines = [ln for ln in text.splitlines() if ln.startswith("GuardianQuotaExceeded{") and 'ModelName="quota_g"' in ln]
    assert lines and sum(float(ln.rsplit(" ", 1)[1]) for ln in lines) >= 2, lines


def test_a_granted_query_counts_even_when_its_image_fails_to_decode(served):
    ts, digits = served["ts"], served["digits"]
    r = post(ts, "quota_g", b"this is not an image", "q-carl")
    assert r.status_code == 400 and json.loads(r.text)["type"] == "NotAnImage"
    codes = [post(ts, "quota_g", d, "q-carl").status_code for d in digits[:QUOTA]]
    assert codes == [200] * (QUOTA - 1) + [429], codes
    s = _ledger(served, "quota").get("q-carl")
    assert (s.queries, s.period_queries) == (QUOTA - 1, QUOTA)


def test_concurrent_clients_two_workers_never_exceed_the_quota_ledger_equals_answers(served):
    """4 clients x 12 requests at once over 2 workers (batches mix clients): each client is granted
    exactly its quota, every other request gets 429, and the ledger holds exactly the answers."""
    ts, digits = served["ts"], served["digits"]
    clients = [f"q-hammer-{k}" for k in range(4)]
    jobs = [(clients[i % 4], digits[i % len(digits)]) for i in range(48)]
    with ThreadPoolExecutor(12) as pool:
        rs = list(pool.map(lambda j: post(ts, "quota_g", j[1], j[0]), jobs))
    assert {r.status_code for r in rs} <= {200, 429}, [(r.status_code, r.text) for r in rs if r.status_code not in (200, 429)]
    led = _ledger(served, "quota")
    for c in clients:
        answered = sum(1 for (cc, _), r in zip(jobs, rs) if cc == c and r.status_code == 200)
        s = led.get(c)
        assert answered == QUOTA and s.queries == answered and s.period_queries == QUOTA, (c, answered, s)
    for (_, _), r in zip(jobs, rs):
        if r.status_code == 429:
            _check_429(r)


def test_distribution_test_catches_what_the_detector_does_not_flag(served):
    """An untrained generator in BatchNorm eval mode: the per-sample detector flags none of its images,
    but its first block of 40 fails the distribution test, after which its answers are DPreds and its
    queries count as flagged, so the refusal rule refuses it. Real digits from another client pass."""
    ts = served["ts"]
    digits, _ = ex.real_digits(DIST_BLOCK * 2)
    for i, d in enumerate(digits):
        r = post(ts, "dist_g", d, "d-benign")
        assert r.status_code == 200, r.text
    fakes = ex.generator_images(DIST_BLOCK, seed=11, bn_eval=True)
    plain = [dict(ex.topk(post(ts, "mnist", f, "d-plain"))) for f in fakes]  # the unprotected answers
    codes, answers = [], {}
    for i in range(DIST_BLOCK * 3):
        r = post(ts, "dist_g", fakes[i % DIST_BLOCK], "d-bn-eval")
        codes.append(r.status_code)
        if r.status_code == 200:
            answers[i] = dict(ex.topk(r))
    led = open_ledger(served["ledger"], RefusalRule(), "dist")
    s = led.get("d-bn-eval")
    assert s.flagged >= s.queries - DIST_BLOCK  # every query after the first block counted as flagged
    # refused once flagged / queries > 1/2 (the cumulative rule): at query 2 x block + 1
    assert s.refused and s.refused_at_query == 2 * DIST_BLOCK + 1, s
    assert codes == [200] * s.refused_at_query + [403] * (len(codes) - s.refused_at_query)
    # the first block: the model's own answers (not flagged); after it: DPreds, p' = (p + d) / (1 + K d)
    assert all(answers[i] == plain[i] for i in range(DIST_BLOCK))
    for i in range(DIST_BLOCK, s.refused_at_query):
        p = plain[i % DIST_BLOCK]
        assert set(answers[i]) == set(p) and all(abs(answers[i][k] - (p[k] + 0.5) / 6.0) < 1e-4 for k in p), i
    b = led.get("d-benign")
    assert not b.refused and b.flagged <= 2, b  # the detector's own false positives at most


def test_bn_eval_generator_at_29px_is_refused_as_at_28px(served):
    """Issue #25 item 3: the victim takes 28-31 px digits, and the distribution test used to apply only
    at the detector's 28 px (`enabled: auto`): a BatchNorm-eval generator (flagged 0% per sample) padding
    its images to 29 x 29 was never refused. Here, with the shipped defense_in_depth settings, it is
    refused over HTTP (2 workers, batching, 8 requests in flight) within one block of the distribution
    test (200 queries) of where the same images are refused at 28 px, measured in process with the same
    settings; benign digits padded to 29 px are answered."""
    import torch

    from guardian_plugin.attacks.target import QueryRefused, TorchServeTarget
    from guardian_plugin.config import parse_config
    from guardian_plugin.guardian import Guardian

    fakes = ex.decode_pngs(ex.generator_images(400, seed=0, bn_eval=True))
    victim = torch.jit.load(ex.VICTIM_TS, map_location="cpu").eval()
    settings = parse_config({"detector": ex.DETECTOR, "ledger": "memory://", "probation": {"queries": 200}})
    in_process = {size: ex.stream(Guardian.from_config(settings), victim, ex.as_input(ex.pad_to(fakes, size)),
                                  "bn-eval") for size in (28, 29)}
    assert all(t.flagged == 0 and t.refused_at is not None for t in in_process.values()), in_process

    ts = served["ts"]
    for d in served["digits"]:
        r = post(ts, "depth_g", ex.padded_png(d, 29, "center"), "depth-benign-29")
        assert r.status_code == 200, r.text
    target = TorchServeTarget(ts.url, "depth_g", 10, ex.MNIST_MEAN, ex.MNIST_STD, client_id="depth-bn-eval-29")
    x = ex.as_input(ex.pad_to(fakes, 29))
    try:
        for i in range(0, 4 * len(x), 8):
            target.query(x[torch.arange(i, i + 8) % len(x)])
    except QueryRefused:
        pass
    finally:
        target.close()
    s = open_ledger(served["ledger"], RefusalRule(), "depth").get("depth-bn-eval-29")
    print(f"BN-eval generator refused at query: in process 28 px {in_process[28].refused_at}, 29 px "
          f"{in_process[29].refused_at}; HTTP 29 px {target.refused_at} (ledger: refused at {s.refused_at_query})")
    assert s.refused and target.refused_at is not None, (s, target.statuses)
    assert abs(target.refused_at - in_process[28].refused_at) <= 200, (target.refused_at, in_process[28].refused_at)
    assert abs(in_process[29].refused_at - in_process[28].refused_at) <= 200


def _unflagged(digits):
    """Indices of the digits the example detector does not flag (as the served path preprocesses them)."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from guardian_plugin.guardian import Guardian

    torch.set_num_threads(1)
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(io.BytesIO(d)).convert("L"), dtype=np.float32) / 255.0)
                     for d in digits]).unsqueeze(1)
    flags, _ = Guardian.from_artifact(ex.DETECTOR).detect((x - ex.MNIST_MEAN[0]) / ex.MNIST_STD[0])
    return [i for i, f in enumerate(flags.tolist()) if not f]


def test_probation_answers_label_only_then_exactly_the_model(served):
    ts, digits = served["ts"], served["digits"]
    ok = _unflagged(digits)[:PROBATION + 3]
    assert len(ok) == PROBATION + 3
    for n, i in enumerate(ok):
        plain = post(ts, "mnist", digits[i], "p-ref")
        r = post(ts, "prob_g", digits[i], "p-newbie")
        assert r.status_code == 200, r.text
        want, got = ex.topk(plain), ex.topk(r)
        if n < PROBATION:  # the unprotected top-1, with probability 1, and nothing else
            assert got[0] == (want[0][0], 1.0) and all(p == 0.0 for _, p in got[1:]), (n, got, want)
        else:
            assert got == want, (n, got, want)  # bit for bit the unprotected answer
    s = _ledger(served, "prob").get("p-newbie")
    assert (s.queries, s.flagged) == (PROBATION + 3, 0)


def _worker_logs(served) -> str:
    text = ""
    for path in glob.glob(os.path.join(str(served["w"]), "server", "**", "*.log"), recursive=True) + \
            [os.path.join(str(served["w"]), "server", "torchserve.out")]:
        try:
            with open(path, errors="replace") as f:
                text += f.read()
        except OSError:
            pass
    return text


def test_label_only_archive_warns_at_load_and_flagged_labels_stay_in_the_top_k(served):
    ts = served["ts"]
    logs = _worker_logs(served)
    warnings = sorted({ln for ln in logs.splitlines() if "answers labels only" in ln})  # a line may be in 2 files
    # once per worker of the label-only archive, and only there
    assert len(warnings) == 1 and "labels_g" in warnings[0] and "top 2" in warnings[0], warnings
    # generator images: flagged; each answer is one of the unprotected top 2, and not always the top 1
    drawn = []
    for i, img in enumerate(served["fakes"]):
        top2 = [int(label) for label, _ in ex.topk(post(ts, "mnist", img, "l-ref"))[:K_TOP]]
        r = post(ts, "labels_g", img, "l-prober")
        assert r.status_code == 200, r.text
        label = json.loads(r.text)
        assert isinstance(label, int) and label in top2, (i, label, top2)
        drawn.append(label == top2[0])
    s = _ledger(served, "labels").get("l-prober")
    assert s.flagged >= len(served["fakes"]) - 2, s
    assert not all(drawn), drawn  # P(all 16 top-1) = 2**-16
    # real digits the detector does not flag: exactly the unprotected label archive's answer
    for i in _unflagged(served["digits"][:8]):
        assert post(ts, "labels_g", served["digits"][i], "l-benign").text == post(ts, "labels", served["digits"][i], "x").text


def test_observe_mode_serves_the_unprotected_answers_and_records_the_would_be_refusal(served):
    """Issue #26: a generator client of an observe-mode archive (2 workers, batching, 8 requests in flight)
    gets the unprotected model's answers on every query, also beyond the query where enforce mode refuses
    it (measured in process with the same settings); the ledger holds that refusal (refused,
    refused_at_query) and the metrics the would-be 403s and probation answers."""
    from guardian_plugin.config import parse_config
    from guardian_plugin.guardian import Guardian

    import torch

    n = 48
    fakes = ex.generator_images(n, seed=7)
    enforce = Guardian.from_config(parse_config({"detector": ex.DETECTOR, "ledger": "memory://",
                                                 "probation": {"queries": 3}}))
    victim = torch.jit.load(ex.VICTIM_TS, map_location="cpu").eval()
    ex.stream(enforce, victim, ex.as_input(ex.decode_pngs(fakes)), "gen", batch=1)
    at = enforce.ledger.get("gen").refused_at_query
    assert at is not None and at < n - 8, at
    ts = served["ts"]
    plain = [ex.topk(post(ts, "mnist", f, "o-plain")) for f in fakes]
    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda f: post(ts, "observe_g", f, "o-generator"), fakes))
    assert [r.status_code for r in rs] == [200] * n, [(r.status_code, r.text) for r in rs if r.status_code != 200]
    for r, want in zip(rs, plain):  # beyond `at` too: no DPreds, no probation label, no 403; the model's
        got = ex.topk(r)               # batched and one-row float sums differ by ~1e-7 (DPreds: by > 0.05)
        assert [k for k, _ in got] == [k for k, _ in want], (got, want)
        assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(got, want)), (got, want)
    s = open_ledger(served["ledger"], RefusalRule(), "observe").get("o-generator")
    assert s.refused and s.queries == n and s.refused_at_query == at, (s, at)
    anon = ts.predict("observe_g", fakes[0], {})  # no identity: served (anonymous), the 401 a would-be one
    assert anon.status_code == 200 and ex.topk(anon) == plain[0], anon.text
    text = ts.metrics()

    def total(name):
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                   if ln.startswith(name + "{") and 'ModelName="observe_g"' in ln)

    # admissions read the ledger as committed: requests in flight when the refusal was committed (at most
    # 8) were admitted before it
    assert n - at - 8 <= total("GuardianWouldRefuse") <= n - at, (total("GuardianWouldRefuse"), at)
    # every query of an all-flagged client is on probation (fewer than 3 unflagged answers, ever): enforce
    # mode would have answered all it answers with the top-1 label only (the probation response)
    assert total("GuardianWouldProbation") >= at - 8 and total("GuardianWouldDPreds") == 0
    assert total("GuardianWouldDeny") >= 1 and total("GuardianRefused") == 0
