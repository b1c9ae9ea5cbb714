"""`guardian keys issue|list|revoke`: the API keys a guard with ``identity.api_key_header`` accepts.

    guardian keys issue  --owner NAME [--client-id ID] --ledger sqlite:///var/lib/guardian/ledger.db --namespace mnist
    guardian keys list   --ledger redis://127.0.0.1:6379/0 --namespace mnist [--json]
    guardian keys revoke CLIENT_ID --config guard.yaml

``--config guard.yaml`` takes the ledger, namespace and key secret from a guard config instead. The keys
are kept in the ledger's store (guardian_plugin.keys). ``issue`` signs the key with the service's key
secret (the environment variable GUARDIAN_KEY_SECRET, or the config's ``identity.key_secret``) and
prints it once: only its client id, key id, owner and times are stored, never the key. The ledger counts
the key's requests as ``key:<client id>`` (what ``guardian clients`` shows). ``--client-id`` defaults to
a random ``c-<12 hex>``; issuing for a client id that has keys already adds a key (e.g. a replacement:
revoke the old ones, then issue with the same ``--client-id`` to keep the client's history).

``revoke`` revokes every key of the client (``key:`` prefix optional): the guard refuses them (401
RevokedApiKey) within ``identity.key_refresh_s`` seconds (default 5). Exit status: 0; 1 when the client
has no unrevoked key; 2 for errors (unreachable store, no secret, bad option), as one line on stderr.
"""

from __future__ import annotations

import json
import sys
import time

from guardian_plugin.errors import ConfigError
from guardian_plugin.identity import KEY_PREFIX
from guardian_plugin.keys import KeyStore, key_secrets, open_key_store
from guardian_plugin.ledger.cli import _time, store_options


def register(subparsers) -> None:
    from guardian_plugin.cli import command_group

    common = store_options("ledger, namespace and key secret")
    sub = command_group(subparsers, "keys", "issue, list and revoke API keys", __doc__)
    ip = sub.add_parser("issue", parents=[common], help="a new key (printed once)")
    ip.add_argument("--owner", required=True, help="who the key is for (stored beside its client id)")
    ip.add_argument("--client-id", default=None, help="1-64 of A-Z a-z 0-9 . _ - (default: random c-<hex>)")
    ip.set_defaults(func=_issue)
    sub.add_parser("list", parents=[common], help="every issued key's client id, owner, times (never the key)"
                   ).set_defaults(func=_list)
    rp = sub.add_parser("revoke", parents=[common], help="revoke every key of a client")
    rp.add_argument("client", metavar="CLIENT_ID")
    rp.set_defaults(func=_revoke)


def _settings(args):
    from guardian_plugin.config import operator_config

    uri, ns = args.ledger, args.namespace
    cfg = operator_config(args.config, args.archive)
    if cfg is not None:
        uri, ns = uri or cfg.ledger, ns or cfg.namespace
    if not uri:
        raise ConfigError("give the ledger: --ledger URI, --config guard.yaml or --archive PROTECTED.mar")
    return uri, ns or "default", cfg


def _open(args, must_exist: bool) -> KeyStore:
    uri, ns, _ = _settings(args)
    return open_key_store(uri, ns, must_exist=must_exist)


def _store_error(store: KeyStore, e: Exception) -> ConfigError:
    return ConfigError(f"{store.where}: {type(e).__name__}: {e}")


def _issue(args) -> int:
    uri, ns, cfg = _settings(args)
    ident = cfg.identity if cfg is not None else None
    secret = key_secrets(ident.key_secret if ident else None, None,
                         setting="the guard config's identity.key_secret (--config)")[0]
    store = open_key_store(uri, ns)
    try:
        try:
            key, rec = store.issue(secret, args.owner, args.client_id)
        except ConfigError:
            raise
        except Exception as e:
            raise _store_error(store, e) from None
        if args.json:
            print(json.dumps({"key": key, "client_id": rec.client_id, "ledger_client": KEY_PREFIX + rec.client_id,
                              "key_id": rec.key_id, "owner": rec.owner, "issued_at": rec.issued_at,
                              "store": store.where}, indent=2))
        else:
            print(f"# issued in {store.where}: client {rec.client_id} (ledger: {KEY_PREFIX}{rec.client_id}), "
                  f"key id {rec.key_id}, owner {rec.owner!r}. The key is shown once and not stored:")
            print(key)
    finally:
        store.close()
    return 0


def _table(recs, out=None) -> None:
    out = out or sys.stdout
    head = ["CLIENT_ID", "KEY_ID", "OWNER", "ISSUED (UTC)", "REVOKED (UTC)"]
    rows = [[r.client_id, r.key_id, r.owner, _time(r.issued_at), _time(r.revoked_at)] for r in recs]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
    for row in [head] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)


def _emit(args, store: KeyStore, recs, title: str) -> None:
    if args.json:
        print(json.dumps({"store": store.where, "keys": [vars(r) for r in recs]}, indent=2))
    else:
        print(f"# {title}: {store.where} ({len(recs)} key(s))")
        if recs:
            _table(recs)


def _list(args) -> int:
    store = _open(args, must_exist=True)
    try:
        try:
            recs = store.records()
        except Exception as e:
            raise _store_error(store, e) from None
        _emit(args, store, recs, "API keys")
    finally:
        store.close()
    return 0


def _revoke(args) -> int:
    client = args.client[len(KEY_PREFIX):] if args.client.startswith(KEY_PREFIX) else args.client
    store = _open(args, must_exist=True)
    try:
        try:
            recs = store.revoke(client, time.time())
        except Exception as e:
            raise _store_error(store, e) from None
        if not recs:
            print(f"guardian keys revoke: client {client!r} has no unrevoked key in {store.where}; nothing changed",
                  file=sys.stderr)
            return 1
        _emit(args, store, recs, "revoked (refused within identity.key_refresh_s, default 5 s)")
    finally:
        store.close()
    return 0
