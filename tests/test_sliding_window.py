"""The optional sliding-window rule: flagged share over the last N queries, alongside the cumulative
rule, identical on memory, SQLite and Redis."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardian_plugin.config import parse_config
from guardian_plugin.errors import ConfigError
from guardian_plugin.ledger import open_ledger
from guardian_plugin.ledger.base import RefusalRule, window_push
from ledger_fixtures import core, fresh_namespace, old_sqlite_ledger, open_backend, redis_url  # noqa: F401

BACKENDS = ["memory", "sqlite", "redis"]


def _reference(updates, size):
    """Per-query simulation: each update's flagged queries first, then the others; keep the last N."""
    d = deque(maxlen=size)
    for q, f in updates:
        d.extend([1] * f + [0] * (q - f))
    return "".join(map(str, d))


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 12), updates=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), max_size=30))
def test_window_push_matches_per_query_simulation(size, updates):
    updates = [(q, min(f, q)) for q, f in updates]
    w = ""
    for q, f in updates:
        w = window_push(w, q, f, size)
    assert w == _reference(updates, size)


def test_window_off_by_default_and_validated():
    r = RefusalRule(10, 0.5)
    assert r.window == 0 and not r.window_triggered("1" * 100)
    assert RefusalRule(10, 0.5, window=20).window_rho == 0.5
    assert RefusalRule(10, 0.5, window=20, window_rho=0.2).window_rho == 0.2
    for bad in (dict(window=-1), dict(window=10**6), dict(window=5, window_rho=1.0), dict(window=5, window_rho=-0.1)):
        with pytest.raises(ValueError):
            RefusalRule(10, 0.5, **bad)


def test_config_window_fields():
    cfg = parse_config({"detector": "d", "rule": {"tau": 10, "window": 50, "window_rho": 0.3}})
    assert cfg.rule.to_rule() == RefusalRule(10, 0.5, window=50, window_rho=0.3)
    # on by default in a guard config (docs/refusal-rule.md); `window: 0` turns it off
    assert parse_config({"detector": "d", "rule": {"tau": 10}}).rule.to_rule() == RefusalRule(10, 0.5, 200, 0.3)
    assert parse_config({"detector": "d", "rule": {"tau": 10, "window": 0}}).rule.to_rule().window == 0
    with pytest.raises(ConfigError, match="rule.window"):
        parse_config({"detector": "d", "rule": {"window": -3}})
    with pytest.raises(ConfigError, match="rule.window_rho"):
        parse_config({"detector": "d", "rule": {"window": 3, "window_rho": 1.5}})


def _dilution(led):
    """1,000 real queries, then a burst of synthetic ones: returns the query at which it was refused."""
    for _ in range(1000):
        led.record("mallory", 1, 0)
    for i in range(200):
        s = led.record("mallory", 1, 1)
        if s.refused:
            return s.refused_at_query
    return None


@pytest.mark.parametrize("kind", BACKENDS)
def test_dilution_beats_cumulative_rule_not_window(kind, tmp_path):
    ns = fresh_namespace("dil")
    cumulative = open_backend(kind, RefusalRule(tau=20, rho=0.5), ns, tmp_path)
    assert _dilution(cumulative) is None  # 200 of 1,200 flagged: the paper's rule never fires
    windowed = open_backend(kind, RefusalRule(tau=20, rho=0.5, window=50), ns + "w", tmp_path)
    # the 26th synthetic query makes 26 of the last 50 flagged (> 0.5)
    assert _dilution(windowed) == 1026
    s = windowed.get("mallory")
    assert s.refused and s.extra == {"window": 50, "window_flagged": 26}


@pytest.mark.parametrize("kind", BACKENDS)
def test_window_needs_a_full_window_and_uses_window_rho(kind, tmp_path):
    led = open_backend(kind, RefusalRule(tau=1000, rho=0.9, window=10, window_rho=0.2), fresh_namespace(), tmp_path)
    s = led.record("c", 9, 9)  # 9 of 9 flagged, but fewer than 10 queries: the window is not full
    assert not s.refused and s.extra == {"window": 9, "window_flagged": 9}
    s = led.record("c", 1, 0)  # 9/10 > 0.2
    assert s.refused and s.refused_at_query == 10
    other = led.record("d", 10, 2)  # exactly window_rho: not refused
    assert not other.refused
    other = led.record("d", 1, 1)  # the oldest flagged query slides out: still 2 of the last 10
    assert not other.refused and other.extra == {"window": 10, "window_flagged": 2}
    other = led.record("d", 1, 1)
    assert not other.refused and other.extra["window_flagged"] == 2
    other = led.record("d", 1, 1)  # 3 of the last 10
    assert other.refused and other.refused_at_query == 13 and other.extra["window_flagged"] == 3


@pytest.mark.parametrize("kind", BACKENDS)
def test_batched_updates_read_flagged_first(kind, tmp_path):
    """One update of 10 queries with 3 flagged, window 5: the flagged ones count as the oldest."""
    led = open_backend(kind, RefusalRule(tau=1000, rho=0.5, window=5), fresh_namespace(), tmp_path)
    s = led.record("c", 10, 3)
    assert s.extra == {"window": 5, "window_flagged": 0} and not s.refused
    s = led.record("c", 4, 4)
    assert s.extra == {"window": 5, "window_flagged": 4} and s.refused


@settings(max_examples=40, deadline=None)
@given(updates=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=60),
       window=st.integers(1, 15), wrho=st.sampled_from([0.0, 0.3, 0.5, 0.8]))
def test_backends_agree_on_window_refusal(tmp_path_factory, updates, window, wrho):
    rule = RefusalRule(tau=10**6, rho=0.99, window=window, window_rho=wrho)  # only the window can refuse
    ns = fresh_namespace("wprop")
    tmp = tmp_path_factory.mktemp("w")
    leds = [open_backend(k, rule, ns, tmp) for k in BACKENDS]
    expect_at = None
    for q, f in updates:
        f = min(f, q)
        got = [core(led.record("c", q, f)) for led in leds]
        assert got[0] == got[1] == got[2]
    # and the refusal point is the first update after which the reference window passes window_rho
    total = 0
    seen = []
    for q, f in updates:
        f = min(f, q)
        total += q
        seen.append((q, f))
        ref = _reference(seen, window)
        if len(ref) >= window and ref.count("1") / window > wrho:
            expect_at = total
            break
    assert leds[0].get("c").refused_at_query == expect_at


def test_sqlite_file_from_before_the_window_is_migrated(tmp_path):
    uri = old_sqlite_ledger(tmp_path / "old.db", with_window=False)
    led = open_ledger(uri, RefusalRule(tau=5, window=3))
    assert (led.get("old").queries, led.get("old").flagged) == (7, 2)
    s = led.record("old", 3, 2)  # window starts empty for old rows: 2 of the last 3 flagged
    assert (s.queries, s.flagged, s.refused, s.refused_at_query) == (10, 4, True, 10)
