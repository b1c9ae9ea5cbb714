"""Quotas and probation on two real `bentoml serve` replicas of the example service (one worker each)
sharing the suite's Redis ledger (GUARDIAN_TEST_REDIS_URL, as tests/ledger_fixtures.py), with the
committed victim and detector: `quota: {queries: 8, period: 1d}`, `probation: {queries: 3}`.

Expected answers come from the unprotected service's own API method run in this process and the
detector's own verdict on the same preprocessed tensor (as tests/test_bento_serve.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import yaml

pytest.importorskip("bentoml")
requests = pytest.importorskip("requests")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from guardian_plugin.devserver.bentoml import BentoServer  # noqa: E402
from guardian_plugin.ledger import open_ledger  # noqa: E402
from guardian_plugin.ledger.base import RefusalRule  # noqa: E402
from ledger_fixtures import fresh_namespace, redis_url  # noqa: E402
from serving_fixtures import bento_oracle, bento_serve_env  # noqa: E402

DETECTOR = os.environ.get("GUARDIAN_TEST_DETECTOR") or os.path.join(ROOT, "examples", "mnist", "artifacts", "detector")
SERVICE = "bento.service:MNISTGuarded"
QUOTA, PROBATION = 8, 3
GUARDIAN = os.path.join(os.path.dirname(sys.executable), "guardian")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    url = redis_url()
    tmp = tmp_path_factory.mktemp("bento_depth")
    ns = fresh_namespace("bento-depth")
    cfg = tmp / "guard.yaml"
    cfg.write_text(yaml.safe_dump({
        "detector": DETECTOR, "ledger": url, "namespace": ns, "identity": {"headers": ["X-Client-Id"]},
        "quota": {"queries": QUOTA, "period": "1d"}, "probation": {"queries": PROBATION}}))
    env = bento_serve_env(tmp, cfg)
    with ThreadPoolExecutor(2) as pool:  # start both at once: each waits for its own /readyz
        futs = [pool.submit(BentoServer, SERVICE, env, str(tmp / f"serve-{k}.log"), ROOT) for k in "ab"]
        servers = []
        for f in futs:
            try:
                servers.append(f.result())
            except Exception:
                for s in servers:
                    s.stop()
                raise
    yield {"a": servers[0], "b": servers[1], "url": url, "ns": ns,
           "ledger": open_ledger(url, RefusalRule(quota=QUOTA), ns)}
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def oracle():
    """(unprotected probabilities, detector verdicts) of 28 px uint8 images, one image at a time."""
    return bento_oracle(DETECTOR)


def classify(server, a, cid):
    from bento.client import png

    return requests.post(server.url + "/classify", files={"image": ("d.png", png(a), "image/png")},
                         headers={"X-Client-Id": cid}, timeout=120)


def classify_batch(server, imgs, cid):
    from bento.client import files

    return requests.post(server.url + "/classify_batch", files=files(imgs), headers={"X-Client-Id": cid}, timeout=120)


def _check_429(r):
    assert r.status_code == 429, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"code", "type", "message"} and (body["code"], body["type"]) == (429, "QuotaExceeded"), body
    assert 0 < int(r.headers["Retry-After"]) <= 86400, dict(r.headers)


def test_quota_429_on_either_replica_others_unaffected_reset_quota_lets_it_back(replicas):
    from bento.client import real_digits

    imgs, _ = real_digits(QUOTA, offset=300)
    for i, a in enumerate(imgs):
        r = classify(replicas["ab"[i % 2]], a, "alice")
        assert r.status_code == 200, r.text
    _check_429(classify(replicas["a"], imgs[0], "alice"))
    _check_429(classify_batch(replicas["b"], imgs[:2], "alice"))
    assert classify(replicas["b"], imgs[0], "bob").status_code == 200
    s = replicas["ledger"].get("alice")
    assert (s.queries, s.period_queries) == (QUOTA, QUOTA)
    r = subprocess.run([GUARDIAN, "clients", "reset-quota", "alice", "--ledger", replicas["url"],
                        "--namespace", replicas["ns"]], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert classify(replicas["b"], imgs[0], "alice").status_code == 200
    assert classify_batch(replicas["a"], imgs[:2], "alice").status_code == 200
    text = requests.get(replicas["a"].url + "/metrics", timeout=30).text + \
        requests.get(replicas["b"].url + "/metrics", timeout=30).text
    assert "guardian_quota_exceeded_requests_total" in text


def test_a_batch_the_quota_cannot_cover_gets_429_whole(replicas):
    from bento.client import real_digits

    imgs, _ = real_digits(QUOTA, offset=320)
    assert classify_batch(replicas["a"], imgs[:QUOTA - 2], "carl").status_code == 200  # 6 of 8
    _check_429(classify_batch(replicas["b"], imgs[:3], "carl"))  # 3 > 2 left: refused whole, 2 spent
    s = replicas["ledger"].get("carl")
    assert (s.queries, s.period_queries) == (QUOTA - 2, QUOTA)


def test_probation_label_only_then_exactly_the_model(replicas, oracle):
    from bento.client import real_digits

    imgs, _ = real_digits(16, offset=400)
    want, flags = oracle(imgs)
    ok = [i for i, f in enumerate(flags) if not f][:PROBATION + 3]
    assert len(ok) == PROBATION + 3
    for n, i in enumerate(ok):
        r = classify(replicas["ab"[n % 2]], imgs[i], "newbie")
        assert r.status_code == 200, r.text
        if n < PROBATION:  # label only: the unprotected top-1 with probability 1
            assert r.json() == np.eye(10)[want[i].argmax()].tolist(), (n, r.json())
        else:
            assert r.json() == want[i].tolist()  # bit for bit the unprotected answer
    # a new client's first batch: every row label only
    r = classify_batch(replicas["b"], [imgs[i] for i in ok[:2]], "newbie-batch")
    assert r.status_code == 200 and np.array_equal(np.array(r.json()), np.eye(10)[want[ok[:2]].argmax(1)]), r.text


def test_clients_hammering_both_replicas_never_exceed_the_quota_ledger_equals_answers(replicas):
    """4 clients at once over both replicas, single images and batches of 2: no client is answered more
    than its quota of images, none is granted more (the Redis reservation is atomic across replicas),
    and the ledger holds exactly the images answered."""
    from bento.client import real_digits

    imgs, _ = real_digits(8, offset=500)
    clients = [f"hammer-{k}" for k in range(4)]
    jobs = [(clients[i % 4], "ab"[(i // 4) % 2], 1 + (i // 8) % 2) for i in range(40)]  # 15 images asked each

    def send(job):
        cid, srv, n = job
        r = classify(replicas[srv], imgs[0], cid) if n == 1 else classify_batch(replicas[srv], imgs[:n], cid)
        return r.status_code, (r.json() if r.status_code in (200, 429) else r.text)

    with ThreadPoolExecutor(12) as pool:
        res = list(pool.map(send, jobs))
    assert {c for c, _ in res} <= {200, 429}, [r for r in res if r[0] not in (200, 429)]
    for (_, _, n), (code, body) in zip(jobs, res):
        if code == 429:
            assert body["type"] == "QuotaExceeded", body
    for c in clients:
        answered = sum(n for (cc, _, n), (code, _) in zip(jobs, res) if cc == c and code == 200)
        s = replicas["ledger"].get(c)
        print(f"{c}: answered {answered} images, granted {s.period_queries}, ledger {s.queries}")
        # a batch refused whole spends what was granted for it, so granted may exceed answered
        assert s.queries == answered and 0 < answered <= s.period_queries <= QUOTA, (c, answered, s)
