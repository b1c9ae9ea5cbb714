"""`guardian keys issue|list|revoke` on a real SQLite file and the suite's real Redis: a key issued by the
CLI is accepted by a Guardian on the same store, `list` never shows it, `revoke` gets it refused."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml

from guardian_plugin.cli import main
from guardian_plugin.config import IdentityConfig
from guardian_plugin.identity import Identity, IdentityError
from guardian_plugin.keys import open_key_store
from ledger_fixtures import fresh_namespace, redis_url  # noqa: F401

SECRET = "cli-test-secret-0123456789"


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path, monkeypatch):
    monkeypatch.setenv("GUARDIAN_KEY_SECRET", SECRET)
    ns = fresh_namespace("keys")
    uri = f"sqlite:///{tmp_path}/ledger.db" if request.param == "sqlite" else redis_url()
    return uri, ns


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _identity(uri, ns, refresh_s=0.0) -> Identity:
    ident = Identity(IdentityConfig(api_key_header="X-Api-Key", key_refresh_s=refresh_s))
    ident.use_key_store(open_key_store(uri, ns))
    return ident


def test_issue_list_revoke(store, capsys):
    uri, ns = store
    rc, out, _ = run(capsys, "keys", "issue", "--owner", "Alice Example <alice@example.org>", "--client-id", "alice",
                     "--ledger", uri, "--namespace", ns)
    assert rc == 0
    header, key = out.strip().splitlines()
    assert "client alice (ledger: key:alice)" in header and "shown once" in header and key.startswith("gk_alice_")
    rc, out, _ = run(capsys, "keys", "issue", "--owner", "bob", "--ledger", uri, "--namespace", ns, "--json")
    bob = json.loads(out)
    assert rc == 0 and bob["client_id"].startswith("c-") and bob["ledger_client"] == "key:" + bob["client_id"]

    ident = _identity(uri, ns)
    assert ident.client_id({"X-Api-Key": key}) == "key:alice"
    assert ident.client_id({"X-Api-Key": bob["key"]}) == bob["ledger_client"]

    rc, out, _ = run(capsys, "keys", "list", "--ledger", uri, "--namespace", ns)
    lines = out.strip().splitlines()
    assert rc == 0 and "(2 key(s))" in lines[0] and lines[1].split() == ["CLIENT_ID", "KEY_ID", "OWNER", "ISSUED",
                                                                          "(UTC)", "REVOKED", "(UTC)"]
    assert lines[2].startswith("alice ") and "Alice Example <alice@example.org>" in lines[2] and lines[2].endswith("-")
    assert key not in out and bob["key"] not in out and key.rsplit("_", 1)[1] not in out  # never the key or its mac

    rc, out, _ = run(capsys, "keys", "revoke", "key:alice", "--ledger", uri, "--namespace", ns, "--json")
    assert rc == 0 and [k["client_id"] for k in json.loads(out)["keys"]] == ["alice"]
    with pytest.raises(IdentityError) as e:
        ident.client_id({"X-Api-Key": key})
    assert (e.value.status, e.value.kind) == (401, "RevokedApiKey")
    assert ident.client_id({"X-Api-Key": bob["key"]}) == bob["ledger_client"]  # only alice's key
    rc, _, err = run(capsys, "keys", "revoke", "alice", "--ledger", uri, "--namespace", ns)
    assert rc == 1 and "no unrevoked key" in err

    rc, out, _ = run(capsys, "keys", "list", "--ledger", uri, "--namespace", ns, "--json")
    revoked = {k["client_id"]: k["revoked_at"] for k in json.loads(out)["keys"]}
    assert revoked["alice"] > time.time() - 60 and revoked[bob["client_id"]] is None
    # a new key for the revoked client id: served under the same ledger id, the old key stays refused
    rc, out, _ = run(capsys, "keys", "issue", "--owner", "Alice", "--client-id", "alice", "--ledger", uri,
                     "--namespace", ns, "--json")
    assert ident.client_id({"X-Api-Key": json.loads(out)["key"]}) == "key:alice"
    with pytest.raises(IdentityError, match="revoked"):
        ident.client_id({"X-Api-Key": key})


def test_sqlite_file_holds_no_key(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GUARDIAN_KEY_SECRET", SECRET)
    db = tmp_path / "ledger.db"
    _, out, _ = run(capsys, "keys", "issue", "--owner", "o", "--client-id", "c1", "--ledger", f"sqlite:///{db}")
    key = out.strip().splitlines()[-1]
    raw = db.read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("ledger.db-*"))
    assert key.encode() not in raw and key.rsplit("_", 1)[1].encode() not in raw
    rows = sqlite3.connect(db).execute("SELECT client_id, owner FROM api_keys").fetchall()
    assert rows == [("c1", "o")]


def test_config_gives_ledger_namespace_and_secret(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GUARDIAN_KEY_SECRET", raising=False)
    ns = fresh_namespace("keys")
    cfg = tmp_path / "guard.yaml"
    cfg.write_text(yaml.safe_dump({"detector": "det", "ledger": f"sqlite:///{tmp_path}/l.db", "namespace": ns,
                                   "identity": {"api_key_header": "X-Api-Key", "key_secret": SECRET}}))
    rc, out, _ = run(capsys, "keys", "issue", "--owner", "o", "--config", str(cfg), "--json")
    key = json.loads(out)["key"]
    assert rc == 0 and f"namespace={ns}" in json.loads(out)["store"]
    ident = Identity(IdentityConfig(api_key_header="X-Api-Key", key_secret=SECRET))
    ident.use_key_store(open_key_store(f"sqlite:///{tmp_path}/l.db", ns))
    assert ident.client_id({"X-Api-Key": key}) == "key:" + json.loads(out)["client_id"]


@pytest.mark.parametrize("argv,message", [
    (["issue", "--owner", "o", "--ledger", "memory://"], "GUARDIAN_KEY_SECRET"),
    (["issue", "--owner", "o", "--client-id", "no spaces", "--ledger", "memory://"], "1-64 characters"),
    (["issue", "--owner", "o"], "--ledger URI, --config guard.yaml or --archive"),
    (["list", "--ledger", "sqlite:////nonexistent/dir/x.db"], "no such SQLite file"),
    (["revoke", "c1", "--ledger", "redis://127.0.0.1:1/0"], "redis key store"),
])
def test_errors_are_one_line_exit_2(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("GUARDIAN_KEY_SECRET", raising=False)
    if "--client-id" in argv:
        monkeypatch.setenv("GUARDIAN_KEY_SECRET", SECRET)
    rc, _, err = run(capsys, "keys", *argv)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_installed_command(tmp_path):
    """The `guardian` entry point itself (a subprocess), as an operator runs it."""
    env = dict(os.environ, GUARDIAN_KEY_SECRET=SECRET)
    exe = os.path.join(os.path.dirname(sys.executable), "guardian")
    out = subprocess.run([exe, "keys", "issue", "--owner", "ops", "--ledger", f"sqlite:///{tmp_path}/l.db"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith("gk_c-")


def test_key_store_base_is_abstract_and_the_three_stores_are_not():
    import inspect

    from guardian_plugin.keys import KeyStore, MemoryKeyStore, RedisKeyStore, SQLiteKeyStore

    with pytest.raises(TypeError, match="abstract"):
        KeyStore()
    assert KeyStore.__abstractmethods__ == {"add", "records", "revoke", "revoked_ids"}
    assert not any(inspect.isabstract(c) for c in (MemoryKeyStore, SQLiteKeyStore, RedisKeyStore))
