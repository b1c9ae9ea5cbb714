"""Observe-only mode (``mode: observe``, docs/rollout.md) on a real `bentoml serve` of the example service
(one worker, a SQLite ledger), with the committed victim and detector: a generator client (the DFME
generator's digits, bento.client.synthetic_digits) gets the unprotected service's answers beyond the query
where enforce mode refuses it (measured in process with the same config), and the would-be refusal is in
the ledger and on /metrics.
"""

from __future__ import annotations

import io
import os
import sys

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
from serving_fixtures import bento_oracle, bento_serve_env  # noqa: E402

DETECTOR = os.environ.get("GUARDIAN_TEST_DETECTOR") or os.path.join(ROOT, "examples", "mnist", "artifacts", "detector")
SERVICE = "bento.service:MNISTGuarded"
N = 40


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bento_observe")
    guard = {"detector": DETECTOR, "ledger": f"sqlite:///{tmp}/ledger.db", "namespace": "observe",
             "identity": {"headers": ["X-Client-Id"]}}
    cfg = tmp / "guard.yaml"
    cfg.write_text(yaml.safe_dump({**guard, "mode": "observe"}))
    env = bento_serve_env(tmp, cfg)
    server = BentoServer(SERVICE, env, str(tmp / "serve.log"), ROOT)
    yield {"server": server, "guard": guard}
    server.stop()


def _enforce_refused_at(guard: dict, images) -> int:
    """The query at which enforce mode (the same config, a fresh ledger) refuses a client sending ``images``
    one per request, through the unprotected service's own preprocess and API method in this process."""
    import PIL.Image
    import torch

    from bento.client import png
    from bento.service import MNISTUnprotected
    from guardian_plugin.config import parse_config
    from guardian_plugin.guardian import Guardian

    g = Guardian.from_config(parse_config({**guard, "ledger": "memory://"}))
    inner = MNISTUnprotected.inner()
    for a in images:
        adm = g.admit({"X-Client-Id": "gen"})
        if not adm.ok:
            break
        im = PIL.Image.open(io.BytesIO(png(a)))
        g.inspect(inner.preprocess(im), torch.tensor(inner.classify(im))[None], [adm])
    return g.ledger.get("gen").refused_at_query


def test_observe_mode_serves_the_unprotected_answers_and_records_the_would_be_refusal(observed):
    from bento.client import files, png, synthetic_digits

    fakes = synthetic_digits(N, seed=3)
    at = _enforce_refused_at(observed["guard"], fakes)
    assert at is not None and at < N - 4, at
    want, flags = bento_oracle(DETECTOR)(fakes)
    url = observed["server"].url
    for i, a in enumerate(fakes):
        r = requests.post(url + "/classify", files={"image": ("d.png", png(a), "image/png")},
                          headers={"X-Client-Id": "o-generator"}, timeout=120)
        assert r.status_code == 200, (i, r.text)
        assert r.json() == want[i].tolist(), i  # bit for bit, beyond `at` too: no DPreds, no 403
    r = requests.post(url + "/classify_batch", files=files(fakes[:4]), headers={"X-Client-Id": "o-generator"},
                      timeout=120)  # a list request of the refused client: answered whole
    # (the model's batched float sums differ from one image's by ~1e-8; DPreds would move them by > 0.05)
    assert r.status_code == 200 and np.allclose(np.array(r.json()), want[:4], rtol=0, atol=1e-6), r.text
    r = requests.post(url + "/classify", files={"image": ("d.png", png(fakes[0]), "image/png")}, timeout=120)
    assert r.status_code == 200 and r.json() == want[0].tolist(), r.text  # no identity: served, a would-be 401
    s = open_ledger(observed["guard"]["ledger"], RefusalRule(), "observe").get("o-generator")
    assert s.refused and s.refused_at_query == at and s.queries == N + 4, (s, at)
    text = requests.get(url + "/metrics", timeout=30).text

    def total(name):
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(name + "{"))

    assert total("guardian_would_refuse_requests_total") == N - at + 1, text  # + the list request, once
    assert total("guardian_would_dpreds_total") == sum(flags[:at]), (total("guardian_would_dpreds_total"), flags)
    assert total("guardian_would_deny_requests_total") == 1
    assert total("guardian_refused_requests_total") == 0 and total("guardian_clients_refused_total") == 1
