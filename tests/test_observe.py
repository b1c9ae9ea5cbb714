"""Observe-only mode (guard config ``mode: observe``) in process, and ``guardian replay`` on a protected
archive: the example's committed victim and detector, real digits and the example's generator images.

Each observe-mode check runs the same traffic under enforce mode beside it: observe must decide exactly
what enforce decides (the ledger's refused / refused_at_query, the denials) and answer every query with
the unprotected model's probabilities.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from examples.mnist import serving as ex  # noqa: E402
from guardian_plugin.config import parse_config  # noqa: E402
from guardian_plugin.guardian import Guardian  # noqa: E402

GUARDIAN = os.path.join(os.path.dirname(sys.executable), "guardian")
N_FAKES = 40


@pytest.fixture(scope="module")
def victim():
    return torch.jit.load(ex.VICTIM_TS, map_location="cpu").eval()


@pytest.fixture(scope="module")
def fakes():
    return ex.generator_images(N_FAKES, seed=5)


def _guardian(mode, **extra):
    return Guardian.from_config(parse_config({"detector": ex.DETECTOR, "ledger": "memory://", "mode": mode,
                                              "identity": {"headers": ["X-Client-Id"]}, **extra}))


def _send(g, victim, bodies, client, per_request=1):
    """Requests of ``per_request`` images each, in order: (status per image, answer per image or None)."""
    x_all = ex.as_input(ex.decode_pngs(bodies))
    codes, answers, model = [], [], []
    for s in range(0, len(bodies), per_request):
        x = x_all[s:s + per_request]
        p = torch.softmax(victim(x), -1).detach()
        a = g.admit({"X-Client-Id": client} if client else {})
        model += list(p)
        if not a.ok:
            codes += [a.denial.status] * len(x)
            answers += [None] * len(x)
            continue
        r = g.inspect(x, p, [a] * len(x))
        for i, d in enumerate(r.cut):
            codes.append(200 if d is None else d.status)
            answers.append(r.probs[i] if d is None else None)
    return codes, answers, model


@pytest.mark.parametrize("per_request", [1, 4])
def test_observe_answers_what_the_model_answers_and_records_what_enforce_decides(victim, fakes, per_request):
    enforce, observe = _guardian("enforce"), _guardian("observe")
    e_codes, e_ans, model = _send(enforce, victim, fakes, "gen", per_request)
    o_codes, o_ans, _ = _send(observe, victim, fakes, "gen", per_request)
    first = e_codes.index(403)
    assert 0 < first < N_FAKES and set(e_codes[first:]) == {403}, e_codes
    assert any(not torch.equal(a, m) for a, m in zip(e_ans[:first], model)), "enforce gave no DPreds"
    assert o_codes == [200] * N_FAKES
    assert all(torch.equal(a, m) for a, m in zip(o_ans, model))  # bit for bit: no DPreds, nothing refused
    se, so = enforce.ledger.get("gen"), observe.ledger.get("gen")
    assert so.refused and so.refused_at_query == se.refused_at_query, (se, so)
    assert so.queries == N_FAKES and se.queries == se.refused_at_query  # observe keeps counting
    assert observe.counters["would_deny"] == N_FAKES - first and observe.counters["refused"] == 0


def test_observe_quota_probation_and_missing_identity_are_would_be_only(victim):
    digits, _ = ex.real_digits(6)
    x = ex.as_input(ex.decode_pngs(digits))
    p = torch.softmax(victim(x), -1).detach()
    g = _guardian("observe", quota={"queries": 4, "period": "1d"}, probation={"queries": 3})
    would, prob = [], []
    for i in range(6):
        a = g.admit({"X-Client-Id": "q"})
        assert a.ok
        r = g.inspect(x[i:i + 1], p[i:i + 1], [a])
        assert torch.equal(r.probs, p[i:i + 1]) and r.cut == [None] and r.deceived == [False]
        would.append(r.would[0].status if r.would[0] is not None else 200)
        prob.append(r.would_probation[0])
    assert would == [200] * 4 + [429, 429] and prob[:3] == [True] * 3
    assert g.ledger.get("q").queries == 6
    a = g.admit({})  # no identity: served as an anonymous row, the 401 kept as what enforce would answer
    assert a.ok and a.client is None and a.would.status == 401
    r = g.inspect(x[:1], p[:1], [a])
    assert torch.equal(r.probs, p[:1]) and r.would[0].status == 401
    assert _guardian("enforce").admit({}).denial.status == 401


def test_observe_with_the_store_down_answers_and_keeps_the_503_as_would_be(victim):
    """ledger_failure: closed answers 503 while the store is down; observe mode answers, unrecorded."""
    from guardian_plugin.devserver.redis import RedisServer

    digits, _ = ex.real_digits(1)
    x = ex.as_input(ex.decode_pngs(digits))
    p = torch.softmax(victim(x), -1).detach()
    with RedisServer(durable=False) as srv:
        g = _guardian("observe", ledger=srv.url, ledger_failure="closed")
        srv.kill()
        a = g.admit({"X-Client-Id": "c"})
        assert a.ok and a.client == "c" and a.would.status == 503
        for record in (True, False):
            r = g.inspect(x, p, [a], record=record)
            assert torch.equal(r.probs, p) and r.would[0].status == 503
        g.commit([r], [a])  # the deferred write fails quietly too (logged)
        g.ledger.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis", "resilient"])
def test_observe_deferred_commit_refuses_at_the_query_enforce_does_on_every_backend(victim, fakes, kind, tmp_path):
    """TorchServe's path (inspect(record=False), then commit): a batch whose later rows enforce mode would
    not answer is recorded as two updates of one client in one record_many call; every backend applies
    them in order, so refused_at_query is the query enforce mode refuses at, not the batch's last."""
    from ledger_fixtures import fresh_namespace, open_backend

    x = ex.as_input(ex.decode_pngs(fakes))
    p = torch.softmax(victim(x), -1).detach()
    enforce = _guardian("enforce")
    _send(enforce, victim, fakes, "gen")
    at = enforce.ledger.get("gen").refused_at_query
    g = _guardian("observe")
    g.ledger = open_backend(kind, g.ledger.rule, fresh_namespace("observe"), tmp_path)
    for s in range(0, N_FAKES, 8):  # batches of 8 one-image requests
        adm = g.admit_batch([{"X-Client-Id": "gen"}] * len(x[s:s + 8]))
        r = g.inspect(x[s:s + 8], p[s:s + 8], adm, record=False)
        assert torch.equal(r.probs, p[s:s + 8])
        g.commit([r], adm)
    st = g.ledger.get("gen")
    assert st.refused and st.refused_at_query == at and st.queries == N_FAKES, (st, at)
    assert at % 8 != 0  # the crossing lies inside a batch


def test_mode_is_validated():
    from guardian_plugin.errors import ConfigError

    with pytest.raises(ConfigError, match="mode"):
        parse_config({"detector": ex.DETECTOR, "mode": "watch"})


# ------------------------------------------------------------------------------------------ replay
@pytest.fixture(scope="module")
def protected(tmp_path_factory):
    from guardian_plugin.devserver.torchserve import build_archive
    from guardian_plugin.handlers.archive import protect

    w = tmp_path_factory.mktemp("replay")
    store = str(w / "store")
    soft = build_archive("mnist", ex.VICTIM_TS, ex.MNIST_HANDLER, store)
    cfg = w / "guard.yaml"
    cfg.write_text(json.dumps({"ledger": f"sqlite:///{w}/production.db", "identity": {"headers": ["X-Client-Id"]}}))
    out = os.path.join(store, "mnist_g.mar")
    protect(soft, ex.DETECTOR, out, config=str(cfg))
    return w, out


def test_replay_reports_the_generator_refused_where_enforce_refuses_it_and_digits_never(protected, victim, fakes):
    w, mar = protected
    traffic = w / "traffic"
    digits, _ = ex.real_digits(30, offset=100)
    for client, bodies in (("digits", digits), ("generator", fakes)):
        (traffic / client).mkdir(parents=True)
        for i, b in enumerate(bodies):
            (traffic / client / f"{i:05d}.png").write_bytes(b)
    (traffic / "digits" / "99999.png").write_bytes(b"not an image")
    out = w / "report.json"
    r = subprocess.run([GUARDIAN, "replay", "--archive", mar, str(traffic), "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    enforce = _guardian("enforce")
    e_codes, _, _ = _send(enforce, victim, fakes, "gen")
    gen, dig = rep["clients"]["generator"], rep["clients"]["digits"]
    assert gen["refused"] and gen["refused_at_query"] == enforce.ledger.get("gen").refused_at_query
    assert gen["would_deny_first"] == {"query": e_codes.index(403) + 1, "status": 403, "type": "ClientRefused",
                                       "mechanism": "rule"}, gen
    assert gen["answered"] == N_FAKES and gen["would_dpreds"] >= gen["refused_at_query"] // 2
    assert dig["would_deny_first"] is None and not dig["refused"] and dig["answered"] == 30
    assert [b["type"] for b in dig["bad_inputs"]] == ["NotAnImage"] and dig["bad_inputs"][0]["query"] == 31
    assert "generator" in r.stdout and f"403 from query {e_codes.index(403) + 1} (rule" in r.stdout, r.stdout
    assert "never refused or limited" in r.stdout
    assert not os.path.exists(w / "production.db")  # a fresh memory:// ledger, never the archive's own


def test_replay_of_two_benign_suite_clients(protected):
    """Issue #26: `guardian replay` on two of the benign-traffic suite's clients (benchmarks/benign_suite.py:
    up-scaled low-resolution digits and near-duplicate bursts, 400 queries each, as PNG files): neither
    would be refused, limited or answered on probation."""
    from benchmarks import benign_suite as bs

    w, mar = protected
    ds = bs.load_dataset("mnist")
    traffic = w / "suite"
    for name in ("downup0.5", "near_dup_bursts"):
        c = next(c for c in bs.clients_for(ds, 0) if c.name == name)
        (traffic / name).mkdir(parents=True)
        for i, a in enumerate(bs.client_images(ds, c, 400, seed=1)):
            (traffic / name / f"{i:05d}.png").write_bytes(ex.png(a[0]))
    out = w / "suite.json"
    r = subprocess.run([GUARDIAN, "replay", "--archive", mar, str(traffic), "--json", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())["clients"]
    for name in ("downup0.5", "near_dup_bursts"):
        assert rep[name]["answered"] == 400 and rep[name]["would_deny_first"] is None and not rep[name]["refused"], rep[name]


@pytest.mark.parametrize("layout, message", [
    ({}, "no client folders"),
    ({"alice": []}, "the client folder is empty"),
    ({"": ["x.png"]}, "outside client folders"),
])
def test_replay_errors_name_what_to_do(protected, tmp_path, capsys, layout, message):
    from guardian_plugin.cli import main

    _, mar = protected
    for client, names in layout.items():
        (tmp_path / client).mkdir(exist_ok=True)
        for n in names:
            (tmp_path / client / n).write_bytes(b"x")
    assert main(["replay", "--archive", mar, str(tmp_path), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert main(["replay", "--archive", ex.VICTIM_TS, str(tmp_path)]) == 2
    assert "not a TorchServe model archive" in capsys.readouterr().err
