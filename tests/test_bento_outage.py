"""The store goes down under a real `bentoml serve` of the example service (2 workers) with a Redis
ledger and `ledger_failure: closed` (the default): every guarded request is answered 503 with the
guard's JSON body and Retry-After -- the same answer as TorchServe's (tests/test_multi_instance.py) --
and the service answers again once the store is back."""

from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("bentoml")
requests = pytest.importorskip("requests")

from guardian_plugin.devserver.bentoml import BentoServer  # noqa: E402
from guardian_plugin.devserver.redis import RedisServer  # noqa: E402

SERVICE = "bento.service:MNISTGuarded"
EXPECTED = {"code": 503, "type": "LedgerUnavailable", "message": "the per-client store is unavailable; try again later"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bento_outage")
    redis_srv = RedisServer(durable=True).start()
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GUARDIAN_TORCH_THREADS": "1",
                "BENTOML_HOME": str(tmp / "bentoml_home"), "BENTOML_DO_NOT_TRACK": "True",
                "GUARDIAN_LEDGER": redis_srv.url})
    srv = BentoServer(SERVICE, env, str(tmp / "serve.log"))
    yield srv, redis_srv
    srv.stop()
    redis_srv.stop()


def _post(url, path, field, img, cid):
    from bento.client import png

    return requests.post(url + path, files=[(field, ("d.png", png(img), "image/png"))],
                         headers={"X-Client-Id": cid}, timeout=120)


def test_store_down_is_503_with_the_guards_body_then_served_again(stack):
    from bento.client import real_digits

    srv, redis_srv = stack
    img = real_digits(1)[0][0]
    routes = (("/classify", "image"), ("/classify_batch", "images"))
    for path, field in routes:
        assert _post(srv.url, path, field, img, "outage-client").status_code == 200
    redis_srv.kill()
    try:
        for path, field in routes:
            for cid in ("outage-client", "outage-new-client"):  # known and unknown clients alike
                r = _post(srv.url, path, field, img, cid)
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert r.json() == EXPECTED and r.headers.get("Retry-After") == "5", (path, r.text, r.headers)
    finally:
        redis_srv.start()
    deadline = time.time() + 30
    while time.time() < deadline:
        if _post(srv.url, "/classify", "image", img, "outage-client").status_code == 200:
            break
        time.sleep(0.5)
    for path, field in routes:
        assert _post(srv.url, path, field, img, "outage-client").status_code == 200
