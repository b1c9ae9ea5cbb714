"""Identity and admission (guardian_plugin.identity, Guardian.admit): who a request is, and whether it
may reach the model -- the same decisions for every adapter. Issue #10: identities that cannot be
forged, anonymous traffic that one client cannot lock, and one denial shape."""

from __future__ import annotations

import time

import pytest
import torch

from guardian_plugin.config import IdentityConfig, TrustedProxyConfig, parse_config
from guardian_plugin.errors import ConfigError, LedgerUnavailable
from guardian_plugin.guardian import Guardian, Verdict
from guardian_plugin.identity import Identity, IdentityError
from guardian_plugin.keys import MemoryKeyStore, make_key
from guardian_plugin.ledger import RefusalRule, open_ledger
from tests.ledger_fixtures import fresh_namespace, tiny_detector
from tests.serving_fixtures import minted_keys
from guardian_plugin.responses import dpreds

SECRET = "0123456789abcdef-test"


@pytest.fixture()
def flag_all(tmp_path):
    return tiny_detector(str(tmp_path / "det"), threshold=-1e9)  # every row flagged


def _guardian(artifact, identity, tau=3):
    return Guardian.from_artifact(artifact, rule=RefusalRule(tau=tau, rho=0.5), identity=identity)


def _send(g, headers, n=1):
    """n synthetic queries under these headers, as an adapter makes them: admit, then inspect."""
    adm = g.admit_batch([headers] * n)
    live = [a for a in adm if a.ok]
    if live:
        x = torch.rand(len(live), 1, 28, 28)
        g.inspect(x, torch.full((len(live), 10), 0.1), live)
    return adm


def _issued(namespace, *owners, secret=SECRET):
    """Keys issued in the memory key store of ``namespace`` (what `guardian keys issue` does)."""
    store = MemoryKeyStore(namespace)
    return [store.issue(secret, o, o)[0] for o in owners]


def _keyed(artifact, tau=3, refresh_s=5.0, **cfg):
    ns = fresh_namespace("keys")
    g = Guardian.from_artifact(artifact, rule=RefusalRule(tau=tau, rho=0.5), namespace=ns,
                               identity=IdentityConfig(api_key_header="X-Api-Key", key_secret=SECRET,
                                                       key_refresh_s=refresh_s, **cfg))
    return g, ns


def test_api_key_is_the_only_identity_no_header_reaches_another_record(flag_all):
    g, ns = _keyed(flag_all)
    bobs_key, mallorys_key = _issued(ns, "bob", "mallory")
    bob = "key:bob"
    forged = [{"X-Api-Key": mallorys_key, "X-Client-Id": bobs_key},
              {"X-Api-Key": mallorys_key, "X-Client-Id": bob},
              {"X-Api-Key": mallorys_key, "x-api-key": bobs_key},  # a duplicate header: the first is taken
              {"X-Client-Id": bob}, {"X-Client-Id": bobs_key}]
    for h in forged:
        for a in _send(g, h, n=5):
            assert a.client != bob
    assert g.ledger.get(bob).queries == 0 and not g.ledger.get(bob).denied
    mallory = g.admit({"X-Api-Key": mallorys_key})
    assert mallory.denial is not None and mallory.denial.status == 403
    assert "key:" not in str(mallory.denial.body())  # ledger ids never leave the server
    assert g.admit({"X-Api-Key": bobs_key}).client == bob
    # no key: 401, whatever else the request says
    d = g.admit({"X-Client-Id": "anyone"}).denial
    assert d.status == 401 and d.kind == "MissingIdentity"


def test_only_issued_keys_are_served_minted_and_forged_ones_are_a_401_before_any_work(flag_all):
    g, ns = _keyed(flag_all)
    (key,) = _issued(ns, "alice")
    assert [a.client for a in _send(g, {"X-Api-Key": key})] == ["key:alice"]
    for minted in minted_keys(key):
        adm = _send(g, {"X-Api-Key": minted}, n=2)
        assert [(a.denial.status, a.denial.kind) for a in adm] == [(401, "InvalidApiKey")] * 2, minted
        assert set(adm[0].denial.body()) == {"code", "type", "message"} and minted not in adm[0].denial.message
    assert [s.client_id for s in g.ledger.clients()] == ["key:alice"]  # nothing counted for a minted key
    assert g.counters["queries"] == 1  # alice's: no row of theirs reached inspect


def test_revoked_key_is_refused_within_the_refresh_delay_and_a_new_key_for_the_same_client_works(flag_all):
    g, ns = _keyed(flag_all, tau=100, refresh_s=0.3)
    (old,) = _issued(ns, "alice")
    assert g.admit({"X-Api-Key": old}).ok
    revoked_at = time.monotonic()
    assert [r.client_id for r in MemoryKeyStore(ns).revoke("alice", time.time())] == ["alice"]
    while g.admit({"X-Api-Key": old}).ok:
        assert time.monotonic() - revoked_at < 0.3 + 0.2, "a revoked key was served after the refresh delay"
        time.sleep(0.02)
    d = g.admit({"X-Api-Key": old}).denial
    assert (d.status, d.kind) == (401, "RevokedApiKey")
    (new,) = _issued(ns, "alice")  # a replacement: same client id (same history), new key id
    assert new != old and g.admit({"X-Api-Key": new}).client == "key:alice"
    assert g.admit({"X-Api-Key": old}).denial.kind == "RevokedApiKey"


def test_store_down_keeps_the_last_revoked_set_and_reads_it_again_when_back(flag_all, caplog):
    g, ns = _keyed(flag_all, tau=100, refresh_s=0.0)
    alice, bob = _issued(ns, "alice", "bob")
    MemoryKeyStore(ns).revoke("bob", time.time())
    assert g.admit({"X-Api-Key": bob}).denial.kind == "RevokedApiKey"
    store = g.identity.key_store
    real = store.revoked_ids
    store.revoked_ids = lambda: (_ for _ in ()).throw(ConnectionError("store down"))  # the store's failure
    assert g.admit({"X-Api-Key": alice}).ok and g.admit({"X-Api-Key": bob}).denial.kind == "RevokedApiKey"
    assert sum("cannot read revoked API keys" in r.message for r in caplog.records) == 1  # logged once
    store.revoked_ids = real
    MemoryKeyStore(ns).revoke("alice", time.time())
    assert g.admit({"X-Api-Key": alice}).denial.kind == "RevokedApiKey"


@pytest.mark.parametrize("failure,status", [("closed", 503), ("open", 200)])
def test_store_never_read_closed_is_a_503_open_checks_the_hmac_only(failure, status):
    class Down(MemoryKeyStore):
        def revoked_ids(self):
            raise ConnectionError("store down")

    ident = Identity(IdentityConfig(api_key_header="X-Api-Key", key_secret=SECRET))
    ident.use_key_store(Down("never-read"), failure)
    key = make_key(SECRET, "alice", "0123456789abcdef")
    if status == 200:
        assert ident.client_id({"X-Api-Key": key}) == "key:alice"
    else:
        with pytest.raises(IdentityError) as e:
            ident.client_id({"X-Api-Key": key})
        assert (e.value.status, e.value.kind, e.value.retry_after) == (503, "LedgerUnavailable", 5)
    with pytest.raises(IdentityError, match="not an API key issued"):  # a minted key is a 401 either way
        ident.client_id({"X-Api-Key": "mallory"})


def test_secret_rotation_previous_secret_accepted_until_removed(flag_all):
    g, ns = _keyed(flag_all)
    (old,) = _issued(ns, "alice")
    new_secret = "the-new-secret-0123456789"
    rotated = Identity(IdentityConfig(api_key_header="X-Api-Key", key_secret=new_secret, key_secret_previous=SECRET))
    rotated.use_key_store(MemoryKeyStore(ns))
    (new,) = _issued(ns, "alice", secret=new_secret)
    assert rotated.client_id({"X-Api-Key": old}) == rotated.client_id({"X-Api-Key": new}) == "key:alice"
    done = Identity(IdentityConfig(api_key_header="X-Api-Key", key_secret=new_secret), environ={})
    done.use_key_store(MemoryKeyStore(ns))
    assert done.client_id({"X-Api-Key": new}) == "key:alice"
    with pytest.raises(IdentityError, match="not an API key issued"):
        done.client_id({"X-Api-Key": old})


@pytest.mark.parametrize("secret", [None, "", "short"])
def test_api_keys_need_a_key_secret(monkeypatch, secret):
    monkeypatch.delenv("GUARDIAN_KEY_SECRET", raising=False)
    with pytest.raises(ConfigError, match="GUARDIAN_KEY_SECRET"):
        Identity(IdentityConfig(api_key_header="X-Api-Key", key_secret=secret))
    monkeypatch.setenv("GUARDIAN_KEY_SECRET", SECRET)
    assert Identity(IdentityConfig(api_key_header="X-Api-Key")).key_secrets == [SECRET]


def test_the_old_salt_setting_says_what_to_do_instead():
    with pytest.raises(ConfigError, match="guardian keys issue"):
        parse_config({"detector": "d", "identity": {"api_key_header": "X-Api-Key", "salt": SECRET}})


def test_trusted_gateway_secret_required_for_header_ids():
    cfg = IdentityConfig(trusted_proxy=TrustedProxyConfig(secret_header="X-Gateway-Secret", secret_env="GW"))
    with pytest.raises(ConfigError, match="GW"):
        Identity(cfg, environ={})
    ident = Identity(cfg, environ={"GW": "gateway-secret-123456"})
    assert ident.client_id({"X-Gateway-Secret": "gateway-secret-123456", "X-Client-Id": "alice"}) == "alice"
    for h in ({"X-Client-Id": "alice"}, {"X-Gateway-Secret": "wrong", "X-Client-Id": "alice"}):
        with pytest.raises(IdentityError) as e:
            ident.client_id(h)
        assert e.value.status == 401 and e.value.kind == "UntrustedGateway"


@pytest.mark.parametrize("value", ["x" * 129, "tab\there", "nul\x00", "key:0123abcd", "ünïcode"])
def test_malformed_client_ids_are_a_400(value):
    with pytest.raises(IdentityError) as e:
        Identity(IdentityConfig()).client_id({"X-Client-Id": value})
    assert e.value.status == 400 and e.value.kind == "InvalidIdentity"
    assert Identity(IdentityConfig()).client_id({"X-Client-Id": "x" * 128}) == "x" * 128


def test_missing_identity_rejected_by_default():
    with pytest.raises(IdentityError) as e:
        Identity().client_id({})
    assert e.value.status == 401


def test_anonymous_attacker_cannot_lock_out_anonymous_users(flag_all):
    """`missing: anonymous`: anonymous rows are never refused and always answered with DPreds (top-1
    kept); they are not counted under any client. An attacker and a benign anonymous client side by
    side: the benign one keeps being served."""
    g = _guardian(flag_all, IdentityConfig(missing="anonymous"), tau=2)
    for _ in range(10):
        assert all(a.ok and a.anonymous for a in _send(g, {}, n=4))  # 40 flagged anonymous queries
    benign = g.admit({})
    assert benign.ok and benign.anonymous
    p = torch.softmax(torch.randn(1, 10), 1)
    r = g.inspect(torch.rand(1, 1, 28, 28), p, [benign])
    assert r.deceived == [True] and torch.equal(r.probs.argmax(1), p.argmax(1))
    assert torch.allclose(r.probs, dpreds(p, 0.5))
    assert g.ledger.clients() == []


def test_store_down_is_a_503_with_retry_after(flag_all):
    class Down(type(open_ledger("memory://"))):
        def _get(self, client_id):  # what admission reads (through reserve_many)
            raise LedgerUnavailable("down")

        _reserve_many = _get

    g = Guardian.from_artifact(flag_all, ledger=Down(RefusalRule()))
    d = g.admit({"X-Client-Id": "a"}).denial
    assert d.status == 503 and d.kind == "LedgerUnavailable" and d.headers() == {"Retry-After": "5"}
    assert set(d.body()) == {"code", "type", "message"}


def test_admit_batch_reads_each_client_once_and_inspect_counts_only_admitted_rows(flag_all):
    g = _guardian(flag_all, IdentityConfig(), tau=3)
    _send(g, {"X-Client-Id": "a"}, n=3)  # refused after this batch
    adm = g.admit_batch([{"X-Client-Id": "a"}, {"X-Client-Id": "b"}, {}])
    assert [a.denial.status if a.denial else 200 for a in adm] == [403, 200, 401]
    r = g.inspect(torch.rand(3, 1, 28, 28), torch.full((3, 10), 0.1), adm)
    assert r.verdicts == [Verdict.REFUSED, Verdict.FLAGGED, Verdict.REFUSED]
    assert g.ledger.get("a").queries == 3 and g.ledger.get("b").queries == 1
