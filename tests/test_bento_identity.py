"""Identity and store outages under a real `bentoml serve` of the example service (2 workers), with
issued API keys (signed with GUARDIAN_KEY_SECRET), anonymous requests allowed, and a Redis ledger:

- only issued keys are served: minted ones (random strings, other formats, forged HMACs) get 401
  before any work, and a revoked key gets 401 within key_refresh_s (5 s, the default);
- no header value lets client A change client B's record, and no answer reveals a ledger id;
- an anonymous attacker cannot get a benign anonymous client refused (docs/request-path.md);
- with the store down (`ledger_failure: closed`, the default) every guarded request is answered 503
  with the guard's JSON body and Retry-After -- TorchServe's answer too (tests/test_multi_instance.py)
  -- and the service answers again once the store is back."""

from __future__ import annotations

import os
import time

import pytest
import yaml

pytest.importorskip("bentoml")
requests = pytest.importorskip("requests")

from guardian_plugin.devserver.bentoml import BentoServer  # noqa: E402
from guardian_plugin.devserver.redis import RedisServer  # noqa: E402
from serving_fixtures import post_exact_headers, spoofing_parts  # noqa: E402

SERVICE = "bento.service:MNISTGuarded"
KEY_SECRET = "bento-test-key-secret-0123456789"
TAU = 14  # tau: auto
EXPECTED = {"code": 503, "type": "LedgerUnavailable", "message": "the per-client store is unavailable; try again later"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bento_outage")
    redis_srv = RedisServer(durable=True).start()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = tmp / "guard.yaml"
    cfg.write_text(yaml.safe_dump({
        "detector": os.path.join(root, "examples", "mnist", "artifacts", "detector"), "ledger": redis_srv.url,
        "namespace": "mnist", "identity": {"api_key_header": "X-Api-Key", "missing": "anonymous"}}))
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GUARDIAN_TORCH_THREADS": "1",
                "BENTOML_HOME": str(tmp / "bentoml_home"), "BENTOML_DO_NOT_TRACK": "True",
                "GUARDIAN_CONFIG": str(cfg), "GUARDIAN_KEY_SECRET": KEY_SECRET})
    srv = BentoServer(SERVICE, env, str(tmp / "serve.log"))
    yield srv, redis_srv
    srv.stop()
    redis_srv.stop()


def issue(redis_srv, owner, client_id=None) -> str:
    """A key of the service, as `guardian keys issue` makes it (in the ledger's Redis)."""
    from guardian_plugin.keys import open_key_store

    store = open_key_store(redis_srv.url, "mnist")
    try:
        return store.issue(KEY_SECRET, owner, client_id)[0]
    finally:
        store.close()


def _post(url, path, field, img, key=None, headers=None, parts=()):
    """``parts``: more multipart parts ((name, content, content type), ...) after the image."""
    from bento.client import png

    h = dict(headers or {})
    if key is not None:
        h["X-Api-Key"] = key
    files = [(field, ("d.png", png(img), "image/png"))] + [(n, (None, v, ct)) for n, v, ct in parts]
    return requests.post(url + path, files=files, headers=h, timeout=120)


def test_api_keys_cannot_be_spoofed(stack):
    from bento.client import real_digits, synthetic_digits

    from guardian_plugin.ledger import open_ledger

    srv, redis_srv = stack
    bob, bobs_key, mallorys_key = "key:bob", issue(redis_srv, "bob", "bob"), issue(redis_srv, "mallory", "mallory")
    codes = []
    for img in synthetic_digits(2 * TAU, seed=3):
        r = _post(srv.url, "/classify", "image", img, key=mallorys_key, headers={"X-Client-Id": bob})
        codes.append(r.status_code)
        assert "key:" not in r.text
    assert codes[-1] == 403 and 200 in codes, codes
    assert _post(srv.url, "/classify", "image", real_digits(1)[0][0], key=bobs_key).status_code == 200
    led = open_ledger(redis_srv.url, namespace="mnist")
    assert led.get(bob).queries == 1 and not led.get(bob).denied


def test_only_issued_keys_are_served_and_revoked_ones_refused_within_the_delay(stack):
    from concurrent.futures import ThreadPoolExecutor

    from bento.client import real_digits
    from guardian_plugin.cli import main
    from guardian_plugin.ledger import open_ledger
    from serving_fixtures import minted_keys, refused_within

    srv, redis_srv = stack
    img = real_digits(1)[0][0]
    key = issue(redis_srv, "Carol", "carol")
    routes = (("/classify", "image"), ("/classify_batch", "images"))
    for path, field in routes:
        assert _post(srv.url, path, field, img, key).status_code == 200
    minted = minted_keys(key)
    with ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(lambda a: _post(srv.url, *routes[a[0] % 2], img, a[1]), enumerate(minted)))
    for k, r in zip(minted, rs):
        assert r.status_code == 401 and r.json() == {
            "code": 401, "type": "InvalidApiKey",
            "message": "the X-Api-Key header is not an API key issued by this service; ask the operator for one"}, k
    led = open_ledger(redis_srv.url, namespace="mnist")
    assert {s.client_id for s in led.clients() if s.client_id.startswith("key:")} <= {"key:bob", "key:mallory",
                                                                                        "key:carol"}
    assert led.get("key:carol").queries == 2

    def revoke():
        assert main(["keys", "revoke", "carol", "--ledger", redis_srv.url, "--namespace", "mnist"]) == 0

    def send():
        path, field = routes[int(time.monotonic() * 20) % 2]
        r = _post(srv.url, path, field, img, key)
        if r.status_code == 401:
            assert r.json()["type"] == "RevokedApiKey"
        return r.status_code

    refused_within(send, revoke, delay_s=5.0)


def test_anonymous_attacker_cannot_lock_out_anonymous_users(stack):
    from bento.client import real_digits, synthetic_digits

    srv, _ = stack
    for img in synthetic_digits(2 * TAU, seed=4):
        assert _post(srv.url, "/classify", "image", img).status_code == 200
    for img in real_digits(3)[0]:
        r = _post(srv.url, "/classify", "image", img)
        assert r.status_code == 200 and len(r.json()) == 10


def test_parts_named_like_identity_headers_are_never_the_api_key(stack):
    """BentoML reads identity from starlette's request.headers, which holds the real headers only: a
    multipart part named like X-Api-Key (or X-Client-Id, X-Gateway-Secret), in any letter case, is body
    content (answered 400 BadMultipart: not an input of the API) and never an identity; the request is
    admitted, counted, or refused as its real header says."""
    from bento.client import real_digits, synthetic_digits

    from guardian_plugin.ledger import open_ledger

    srv, redis_srv = stack
    led = open_ledger(redis_srv.url, namespace="mnist")
    img = real_digits(1)[0][0]
    mallory = issue(redis_srv, "mallory", "parts-mallory")
    fresh, carol = issue(redis_srv, "fresh", "parts-fresh"), issue(redis_srv, "carol", "parts-carol")
    codes = [_post(srv.url, "/classify", "image", a, key=mallory).status_code
             for a in synthetic_digits(2 * TAU, seed=5)]
    assert codes[-1] == 403, codes  # refused
    r = _post(srv.url, "/classify", "image", img, key=mallory, parts=spoofing_parts(fresh))
    assert r.status_code == 403 and r.json()["type"] == "ClientRefused", r.text
    for path, field in (("/classify", "image"), ("/classify_batch", "images")):
        r = _post(srv.url, path, field, img, key=carol, parts=spoofing_parts(fresh))
        assert r.status_code == 400 and r.json()["type"] == "BadMultipart", r.text
        r = _post(srv.url, path, field, img, parts=spoofing_parts(fresh))  # anonymous, not fresh's client
        assert r.status_code == 400 and r.json()["type"] == "BadMultipart", r.text
    assert led.get("key:parts-carol").period_queries == 2  # each admission reserved one query
    assert not led.get("key:parts-fresh").known
    status, body = post_exact_headers(srv.url + "/classify", [("X-Api-Key", carol), ("x-api-key", fresh)], b"")
    assert status == 400 and "AmbiguousIdentity" in body, body


def test_store_down_is_503_with_the_guards_body_then_served_again(stack):
    from bento.client import real_digits

    srv, redis_srv = stack
    img = real_digits(1)[0][0]
    routes = (("/classify", "image"), ("/classify_batch", "images"))
    known, new = issue(redis_srv, "ops", "outage-client"), issue(redis_srv, "ops", "outage-new-client")
    for path, field in routes:
        assert _post(srv.url, path, field, img, known).status_code == 200
    redis_srv.kill()
    # a client unknown to the store (its admission needs the store) and a known one
    try:
        for path, field in routes:
            for key in (known, new):  # clients known and unknown to the ledger alike
                r = _post(srv.url, path, field, img, key)
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert r.json() == EXPECTED and r.headers.get("Retry-After") == "5", (path, r.text, r.headers)
    finally:
        redis_srv.start()
    # each worker finds the store again on its own next try (a stale connection may cost it one more
    # 503, which Retry-After covers): within the deadline, both routes answer 200 several times running
    deadline, ok = time.time() + 60, 0
    while time.time() < deadline and ok < 8:
        path, field = routes[ok % 2]
        ok = ok + 1 if _post(srv.url, path, field, img, known).status_code == 200 else 0
        if ok == 0:
            time.sleep(0.5)
    assert ok >= 8, "the service did not recover after the store came back"


# ------------------------------------------------------------- a trusted gateway, identity required
GATEWAY_SECRET = "bento-gateway-secret-0123456789"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bento_gateway")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = tmp / "guard.yaml"
    cfg.write_text(yaml.safe_dump({
        "detector": os.path.join(root, "examples", "mnist", "artifacts", "detector"),
        "ledger": f"sqlite:///{tmp}/ledger.db", "namespace": "mnist",
        "identity": {"headers": ["X-Client-Id"], "trusted_proxy": {"secret_header": "X-Gateway-Secret"},
                     "missing": "reject"}}))
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GUARDIAN_TORCH_THREADS": "1",
                "BENTOML_HOME": str(tmp / "bentoml_home"), "BENTOML_DO_NOT_TRACK": "True",
                "GUARDIAN_CONFIG": str(cfg), "GUARDIAN_GATEWAY_SECRET": GATEWAY_SECRET})
    env.pop("GUARDIAN_LEDGER", None)
    srv = BentoServer(SERVICE, env, str(tmp / "serve.log"))
    yield srv, f"sqlite:///{tmp}/ledger.db"
    srv.stop()


def test_parts_never_stand_in_for_the_gateway_secret_or_the_client_id(gateway):
    """`trusted_proxy` with `missing: reject`: parts named like X-Gateway-Secret (holding the secret),
    X-Client-Id or X-Api-Key in every letter case never make a request trusted, never give it an id,
    never free a refused client; counts go to the real header's id only."""
    from bento.client import real_digits, synthetic_digits

    from guardian_plugin.ledger import open_ledger

    srv, ledger = gateway
    img = real_digits(1)[0][0]
    trusted = {"X-Gateway-Secret": GATEWAY_SECRET}
    for p in spoofing_parts(GATEWAY_SECRET):
        r = _post(srv.url, "/classify", "image", img, headers={"X-Client-Id": "gw-alice"}, parts=[p])
        assert r.status_code == 401 and r.json()["type"] == "UntrustedGateway", (p, r.text)
        r = _post(srv.url, "/classify", "image", img, headers=trusted, parts=[p])
        assert r.status_code == 401 and r.json()["type"] == "MissingIdentity", (p, r.text)
    r = _post(srv.url, "/classify", "image", img, headers={**trusted, "X-Client-Id": "gw-alice"},
              parts=spoofing_parts("gw-mallory"))
    assert r.status_code == 400 and r.json()["type"] == "BadMultipart", r.text
    assert _post(srv.url, "/classify", "image", img, headers={**trusted, "X-Client-Id": "gw-alice"}).status_code == 200
    codes = [_post(srv.url, "/classify", "image", a, headers={**trusted, "X-Client-Id": "gw-attacker"}).status_code
             for a in synthetic_digits(2 * TAU, seed=5)]
    assert codes[-1] == 403, codes
    r = _post(srv.url, "/classify", "image", img, headers={**trusted, "X-Client-Id": "gw-attacker"},
              parts=spoofing_parts("gw-fresh"))
    assert r.status_code == 403 and r.json()["type"] == "ClientRefused", r.text
    led = open_ledger(ledger, namespace="mnist")
    alice = led.get("gw-alice")
    assert (alice.queries, alice.period_queries) == (1, 2)  # answered once; the 400 reserved one too
    assert not led.get("gw-mallory").known and not led.get("gw-fresh").known and led.get("gw-attacker").refused
    for dup in ([("X-Client-Id", "gw-a"), ("x-client-id", "gw-b")],
                [("X-Client-Id", "gw-a"), ("x-gateway-secret", "wrong-secret-0123456789")]):
        status, body = post_exact_headers(srv.url + "/classify", dup + [("X-Gateway-Secret", GATEWAY_SECRET)], b"")
        assert status == 400 and "AmbiguousIdentity" in body, (dup, body)
