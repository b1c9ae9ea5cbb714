"""`guardian clients list|show|reset|block|unblock` on SQLite and Redis, as a table and as JSON."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest
import yaml

from guardian_plugin.cli import main
from guardian_plugin.ledger import open_ledger
from guardian_plugin.ledger.base import RefusalRule
from guardian_plugin.devserver.netutil import free_port
from ledger_fixtures import fresh_namespace, redis_url  # noqa: F401


@pytest.fixture(params=["sqlite", "redis"])
def populated(request, tmp_path):
    """A ledger with an ok client, a rule-refused one and a manually blocked one."""
    ns = fresh_namespace("cli")
    uri = f"sqlite:///{tmp_path}/ledger.db" if request.param == "sqlite" else redis_url()
    led = open_ledger(uri, RefusalRule(tau=4, rho=0.5), ns)
    led.record("alice", 10, 1)
    led.record("mallory", 6, 5)
    led.set_blocked("eve", True)
    yield uri, ns, led
    led.close()


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_list_json(populated, capsys):
    uri, ns, _ = populated
    rc, out, _ = run(capsys, "clients", "list", "--ledger", uri, "--namespace", ns, "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["namespace"] == ns
    got = {c["client_id"]: (c["queries"], c["flagged"], c["status"], c["refused_at_query"]) for c in doc["clients"]}
    assert got == {"alice": (10, 1, "ok", None), "mallory": (6, 5, "refused", 6), "eve": (0, 0, "blocked", None)}
    rc, out, _ = run(capsys, "clients", "list", "--ledger", uri, "--namespace", ns, "--json", "--denied",
                     "--sort", "queries")
    assert [c["client_id"] for c in json.loads(out)["clients"]] == ["mallory", "eve"]


def test_list_table(populated, capsys):
    uri, ns, _ = populated
    rc, out, _ = run(capsys, "clients", "list", "--ledger", uri, "--namespace", ns)
    assert rc == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith("# clients:") and f"namespace={ns}" in lines[0] and "(3 client(s))" in lines[0]
    assert lines[1].split()[:6] == ["CLIENT", "STATUS", "QUERIES", "FLAGGED", "SHARE", "REFUSED_AT"]
    rows = {ln.split()[0]: ln.split()[1:6] for ln in lines[2:]}
    assert rows == {"alice": ["ok", "10", "1", "0.100", "-"], "eve": ["blocked", "0", "0", "0.000", "-"],
                    "mallory": ["refused", "6", "5", "0.833", "6"]}


def test_show_block_unblock_reset(populated, capsys):
    uri, ns, led = populated
    base = ["--ledger", uri, "--namespace", ns]
    rc, out, _ = run(capsys, "clients", "show", "mallory", *base, "--json")
    c = json.loads(out)["client"]
    assert rc == 0 and c["known"] and c["status"] == "refused" and c["flagged_share"] == pytest.approx(5 / 6)
    rc, out, err = run(capsys, "clients", "show", "nobody", *base)
    assert rc == 1 and "no client 'nobody'" in err

    rc, out, _ = run(capsys, "clients", "block", "alice", "bob", *base, "--create")  # bob: never seen
    assert rc == 0 and "# blocked" in out and led.is_denied("alice") and led.is_denied("bob")
    rc, out, _ = run(capsys, "clients", "unblock", "mallory", "alice", *base, "--json")
    states = {c["client_id"]: c for c in json.loads(out)["clients"]}
    assert states["mallory"]["status"] == "ok" and states["mallory"]["queries"] == 6  # counts kept
    assert not led.is_denied("mallory") and not led.is_denied("alice")
    rc, out, _ = run(capsys, "clients", "reset", "mallory", *base, "--json")
    assert rc == 0 and json.loads(out)["clients"][0]["queries"] == 0
    assert led.get("mallory").queries == 0
    rc, out, _ = run(capsys, "clients", "list", *base, "--json")
    assert sorted(c["client_id"] for c in json.loads(out)["clients"]) == ["alice", "bob", "eve"]


def test_config_supplies_ledger_namespace_and_window(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/l.db"
    led = open_ledger(uri, RefusalRule(tau=100, window=5), "cfgns")
    led.record("w", 8, 3)
    cfg = tmp_path / "guard.yaml"
    cfg.write_text(yaml.safe_dump({"detector": "det", "ledger": uri, "namespace": "cfgns",
                                   "rule": {"tau": 100, "window": 5}}))
    rc, out, _ = run(capsys, "clients", "list", "--config", str(cfg))
    assert rc == 0 and "WINDOW" in out and "0/5" in out  # flagged first within the update: 0 of the last 5
    rc, out, _ = run(capsys, "clients", "show", "w", "--config", str(cfg), "--json")
    assert json.loads(out)["client"]["extra"] == {"window": 5, "window_flagged": 0}


@pytest.mark.parametrize("action", ["reset", "block", "unblock"])
def test_unknown_client_exits_1_and_changes_nothing(populated, capsys, action):
    uri, ns, led = populated
    before = led.clients()
    rc, out, err = run(capsys, "clients", action, "alice", "nobody", "--ledger", uri, "--namespace", ns)
    assert rc == 1 and out == "" and "no client 'nobody'" in err and "nothing changed" in err
    assert len(err.strip().splitlines()) == 1
    assert led.clients() == before  # alice untouched as well, and no row for nobody
    assert not led.get("nobody").known


def test_block_create_blocks_a_never_seen_client(populated, capsys):
    uri, ns, led = populated
    rc, out, _ = run(capsys, "clients", "block", "newcomer", "--create", "--ledger", uri, "--namespace", ns, "--json")
    assert rc == 0 and json.loads(out)["clients"][0]["status"] == "blocked"
    assert led.get("newcomer").blocked and led.get("newcomer").known


def _one_line_error(rc, err, code=2):
    assert rc == code and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_bad_sqlite_targets_one_line_nothing_created(tmp_path, capsys):
    # a directory
    line = _one_line_error(*run(capsys, "clients", "list", "--ledger", f"sqlite:///{tmp_path}")[::2])
    assert "directory" in line
    # a file that is not a database: an error, and the file is left as it was
    junk = tmp_path / "notes.txt"
    junk.write_text("not a database\n" * 100)
    for action in (["list"], ["show", "x"], ["block", "x", "--create"]):
        line = _one_line_error(*run(capsys, "clients", *action, "--ledger", f"sqlite:///{junk}")[::2])
        assert "not a database" in line
    assert junk.read_text() == "not a database\n" * 100
    # a SQLite database of something else: not touched
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    line = _one_line_error(*run(capsys, "clients", "list", "--ledger", f"sqlite:///{other}")[::2])
    assert "not a guardian ledger" in line
    assert [r[0] for r in sqlite3.connect(other).execute("SELECT name FROM sqlite_master")] == ["t"]
    # a missing file, in a missing directory: neither is created
    for action in (["list"], ["show", "x"], ["reset", "x"], ["block", "x", "--create"]):
        line = _one_line_error(*run(capsys, "clients", *action, "--ledger", f"sqlite:///{tmp_path}/new/l.db")[::2])
        assert "no such SQLite file" in line
    assert not (tmp_path / "new").exists()


def test_bad_options_and_ids_one_line(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/l.db"
    open_ledger(uri, RefusalRule(tau=4), "default").record("a", 1, 0)
    line = _one_line_error(*run(capsys, "clients", "list", "--ledger", uri, "--window", "-5")[::2])
    assert "--window" in line
    line = _one_line_error(*run(capsys, "clients", "show", "x" * 300, "--ledger", uri)[::2])
    assert "longer than 256" in line
    line = _one_line_error(*run(capsys, "clients", "reset", "", "--ledger", uri)[::2])
    assert "non-empty" in line
    line = _one_line_error(*run(capsys, "clients", "list", "--ledger", uri + "?retention=soon")[::2])
    assert "bad duration" in line
    line = _one_line_error(*run(capsys, "clients", "list", "--ledger", uri + "?colour=red")[::2])
    assert "unknown option" in line


def test_bad_redis_targets_one_line(capsys):
    url = redis_url()
    base = url.rsplit("/", 1)[0]
    line = _one_line_error(*run(capsys, "clients", "list", "--ledger", base + "/99")[::2])
    assert "DB index is out of range" in line
    line = _one_line_error(*run(capsys, "clients", "list", "--ledger", base + "/abc")[::2])
    assert "database number" in line
    line = _one_line_error(*run(capsys, "clients", "list", "--ledger", f"redis://127.0.0.1:{free_port()}/0")[::2])
    assert "ConnectionError" in line


def test_console_script_error_has_no_traceback(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"\x00garbage" * 50)
    exe = os.path.join(os.path.dirname(sys.executable), "guardian")
    r = subprocess.run([exe, "clients", "list", "--ledger", f"sqlite:///{junk}"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_errors_exit_2(tmp_path, capsys):
    rc, _, err = run(capsys, "clients", "list", "--ledger", f"sqlite:///{tmp_path}/missing.db")
    assert rc == 2 and "no such SQLite file" in err
    assert not os.path.exists(tmp_path / "missing.db")
    rc, _, err = run(capsys, "clients", "list", "--ledger", "redis://127.0.0.1:1/0")
    assert rc == 2 and "ConnectionError" in err
    rc, _, err = run(capsys, "clients", "list")
    assert rc == 2 and "--ledger" in err
    rc, _, err = run(capsys, "clients", "list", "--ledger", "mongo://x")
    assert rc == 2 and "unknown scheme" in err


def test_console_script(populated):
    """The installed `guardian` entry point, as an operator runs it."""
    uri, ns, _ = populated
    exe = os.path.join(os.path.dirname(sys.executable), "guardian")
    r = subprocess.run([exe, "clients", "list", "--ledger", uri, "--namespace", ns, "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert {c["client_id"] for c in json.loads(r.stdout)["clients"]} == {"alice", "mallory", "eve"}


def test_archive_supplies_the_protected_models_namespace(tmp_path, capsys):
    """`guardian protect` writes the ledger under the model's name: `clients list --archive MAR` (and `keys
    list --archive MAR`) read the embedded guard config, so they find the clients a worker counted; a
    plain --ledger without a namespace says where to look."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    from examples.mnist import serving as ex
    from guardian_plugin.devserver.torchserve import build_archive
    from guardian_plugin.handlers.archive import protect

    uri = f"sqlite:///{tmp_path}/ledger.db"
    guard = ex.guard_yaml(str(tmp_path / "guard.yaml"), uri, tau=4)
    mar = build_archive("digits", ex.VICTIM_TS, ex.MNIST_HANDLER, str(tmp_path / "build"))
    out = str(tmp_path / "digits_g.mar")
    protect(mar, ex.DETECTOR, out, config=guard)
    open_ledger(uri, RefusalRule(tau=4), "digits").record("alice", 3, 0)  # what a worker of it counts
    rc, text, _ = run(capsys, "clients", "list", "--archive", out, "--json")
    doc = json.loads(text)
    assert rc == 0 and doc["namespace"] == "digits" and [c["client_id"] for c in doc["clients"]] == ["alice"]
    rc, text, err = run(capsys, "clients", "list", "--ledger", uri)
    assert rc == 0 and "alice" not in text and "--archive" in err and "'default' has no clients" in err
    rc, text, _ = run(capsys, "keys", "list", "--archive", out, "--json")
    assert rc == 0 and "namespace=digits" in json.loads(text)["store"]
    rc, _, err = run(capsys, "clients", "list", "--archive", out, "--config", guard)
    assert rc == 2 and "not both" in err
