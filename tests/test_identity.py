"""Identity and admission (guardian_plugin.identity, Guardian.admit): who a request is, and whether it
may reach the model -- the same decisions for every adapter. Issue #10: identities that cannot be
forged, anonymous traffic that one client cannot lock, and one denial shape."""

from __future__ import annotations

import pytest
import torch

from guardian_plugin.config import IdentityConfig, TrustedProxyConfig
from guardian_plugin.errors import ConfigError, LedgerUnavailable
from guardian_plugin.guardian import Guardian, Verdict
from guardian_plugin.identity import Identity, IdentityError, hash_key
from guardian_plugin.ledger import RefusalRule, open_ledger
from guardian_plugin.responses import dpreds
from tests.ledger_fixtures import tiny_detector

SALT = "0123456789abcdef-test"


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


def test_api_key_is_the_only_identity_no_header_reaches_another_record(flag_all):
    g = _guardian(flag_all, IdentityConfig(api_key_header="X-Api-Key", salt=SALT))
    bob = hash_key("bobs-key", SALT)
    forged = [{"X-Api-Key": "mallory", "X-Client-Id": "bobs-key"},
              {"X-Api-Key": "mallory", "X-Client-Id": bob},
              {"X-Api-Key": "mallory", "x-api-key": "bobs-key"},  # a duplicate header: the first is taken
              {"X-Client-Id": bob}, {"X-Client-Id": "bobs-key"}]
    for h in forged:
        for a in _send(g, h, n=5):
            assert a.client != bob
    assert g.ledger.get(bob).queries == 0 and not g.ledger.get(bob).denied
    mallory = g.admit({"X-Api-Key": "mallory"})
    assert mallory.denial is not None and mallory.denial.status == 403
    assert "key:" not in str(mallory.denial.body())  # hashed ids never leave the server
    assert g.admit({"X-Api-Key": "bobs-key"}).ok
    # no key: 401, whatever else the request says
    d = g.admit({"X-Client-Id": "anyone"}).denial
    assert d.status == 401 and d.kind == "MissingIdentity"


@pytest.mark.parametrize("salt", [None, "", "short"])
def test_api_keys_need_a_secret_salt(monkeypatch, salt):
    monkeypatch.delenv("GUARDIAN_ID_SALT", raising=False)
    with pytest.raises(ConfigError, match="GUARDIAN_ID_SALT"):
        Identity(IdentityConfig(api_key_header="X-Api-Key", salt=salt))
    monkeypatch.setenv("GUARDIAN_ID_SALT", SALT)
    assert Identity(IdentityConfig(api_key_header="X-Api-Key")).client_id({"x-api-key": "k"}) == hash_key("k", SALT)


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
