"""`guardian clients list|show|reset|block|unblock`: look at and manage per-client state.

    guardian clients list    --ledger redis://127.0.0.1:6379/0 --namespace mnist [--denied] [--json]
    guardian clients show    CLIENT --ledger sqlite:///var/lib/guardian/ledger.db
    guardian clients reset   CLIENT [CLIENT ...] --ledger URL      # forget counts and refusal
    guardian clients block   CLIENT [CLIENT ...] --ledger URL [--create]  # refuse by hand
    guardian clients unblock CLIENT [CLIENT ...] --ledger URL      # lift a block or a rule refusal

``--config guard.yaml`` takes the ledger, namespace and rule from a guard config instead. Every command
prints a table, or JSON with ``--json``. reset, block and unblock act only on clients the ledger knows:
naming an unknown one changes nothing and exits 1 (``block --create`` blocks a client never seen
yet). The tool never creates a SQLite file. Exit status: 0; 1 for an unknown client; 2 for errors
(unreachable store, bad URI or option), always as one line on stderr.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import List

from guardian_plugin.errors import ConfigError
from guardian_plugin.ledger import open_ledger
from guardian_plugin.ledger.base import ClientState, Ledger, RefusalRule, check_client_id


def register(subparsers) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ledger", help="ledger URI: sqlite:///path.db, redis://host:6379/0, memory://")
    common.add_argument("--namespace", default=None, help="protected model's namespace (default: 'default')")
    common.add_argument("--config", help="guard YAML: ledger, namespace and rule from there")
    common.add_argument("--window", type=int, default=None,
                        help="sliding-window size to report window counts for (default: the config's, else 0)")
    common.add_argument("--json", action="store_true", help="machine-readable output")

    p = subparsers.add_parser("clients", help="list, inspect, reset, block and unblock clients of a ledger",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    lp = sub.add_parser("list", parents=[common], help="every client of the namespace")
    lp.add_argument("--denied", action="store_true", help="only refused or blocked clients")
    lp.add_argument("--sort", choices=["client", "queries", "flagged", "share", "last_seen"], default="client")
    lp.set_defaults(func=_list)
    sp = sub.add_parser("show", parents=[common], help="one client's state")
    sp.add_argument("client")
    sp.set_defaults(func=_show)
    for name, fn, what in (("reset", _reset, "forget the clients' counts and refusal"),
                           ("block", _block, "refuse the clients by hand"),
                           ("unblock", _unblock, "lift a block or a rule refusal (counts are kept)")):
        ap = sub.add_parser(name, parents=[common], help=what)
        ap.add_argument("clients", nargs="+", metavar="CLIENT")
        ap.set_defaults(func=fn)
        if name == "block":
            ap.add_argument("--create", action="store_true",
                            help="also block clients the ledger has never seen (else: exit 1, nothing changed)")


# ---------------------------------------------------------------------------------- helpers
def _open(args) -> Ledger:
    uri, ns, rule = args.ledger, args.namespace, None
    if args.config:
        from guardian_plugin.config import load_config

        cfg = load_config(args.config)
        uri = uri or cfg.ledger
        ns = ns or cfg.namespace
        rule = cfg.rule.to_rule()
    if not uri:
        raise ConfigError("give the ledger: --ledger URI or --config guard.yaml")
    if rule is None:
        rule = RefusalRule()
    if args.window is not None:
        try:
            rule = RefusalRule(rule.tau, rule.rho, window=args.window,
                               window_rho=rule.window_rho if rule.window else None)
        except ValueError as e:
            raise ConfigError(f"--window: {e}") from None
    return open_ledger(uri, rule, ns or "default", must_exist=True)


def _client_ids(ids: List[str]) -> List[str]:
    try:
        return [check_client_id(c) for c in ids]
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _unknown(args, ledger, clients: List[str]) -> bool:
    """Say so (stderr) and return True when a client is not in the ledger."""
    missing = [c for c in clients if not ledger.get(c).known]
    if missing:
        print(f"guardian clients {args.action}: no client {', '.join(map(repr, missing))} in {_uri(ledger, args)} "
              f"namespace={ledger.namespace}; nothing changed", file=sys.stderr)
    return bool(missing)


def _uri(ledger: Ledger, args) -> str:
    return getattr(ledger, "safe_url", None) or args.ledger or ""


def _status(s: ClientState) -> str:
    return "blocked" if s.blocked else "refused" if s.refused else "ok"


def _time(t) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _as_json(s: ClientState) -> dict:
    d = s.to_dict()
    d["status"] = _status(s)
    return d


def _table(states: List[ClientState], out=None) -> None:
    out = out or sys.stdout
    window = any("window" in s.extra for s in states)
    head = ["CLIENT", "STATUS", "QUERIES", "FLAGGED", "SHARE", "REFUSED_AT"] + (["WINDOW"] if window else []) + \
           ["FIRST_SEEN (UTC)", "LAST_SEEN (UTC)"]
    rows = []
    for s in states:
        row = [s.client_id, _status(s), str(s.queries), str(s.flagged), f"{s.flagged_share:.3f}",
               "-" if s.refused_at_query is None else str(s.refused_at_query)]
        if window:
            row.append(f"{s.extra.get('window_flagged', 0)}/{s.extra.get('window', 0)}")
        rows.append(row + [_time(s.first_seen), _time(s.last_seen)])
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
    numeric = {"QUERIES", "FLAGGED", "SHARE", "REFUSED_AT", "WINDOW"}
    for r in [head] + rows:
        cells = [c.rjust(w) if h in numeric else c.ljust(w) for c, w, h in zip(r, widths, head)]
        print("  ".join(cells).rstrip(), file=out)


def _emit(args, ledger, states: List[ClientState], title: str) -> None:
    if args.json:
        print(json.dumps({"ledger": _uri(ledger, args), "namespace": ledger.namespace,
                          "clients": [_as_json(s) for s in states]}, indent=2))
    else:
        print(f"# {title}: {_uri(ledger, args)} namespace={ledger.namespace} ({len(states)} client(s))")
        if states:
            _table(states)


# --------------------------------------------------------------------------------- commands
_SORT = {
    "client": (lambda s: s.client_id, False),
    "queries": (lambda s: s.queries, True),
    "flagged": (lambda s: s.flagged, True),
    "share": (lambda s: s.flagged_share, True),
    "last_seen": (lambda s: s.last_seen or 0.0, True),
}


def _list(args) -> int:
    with _open(args) as ledger:
        states = ledger.clients()
        if args.denied:
            states = [s for s in states if s.denied]
        key, rev = _SORT[args.sort]
        states.sort(key=key, reverse=rev)
        _emit(args, ledger, states, "clients")
    return 0


def _show(args) -> int:
    with _open(args) as ledger:
        s = ledger.get(_client_ids([args.client])[0])
        if args.json:
            d = _as_json(s)
            d["known"] = s.known
            print(json.dumps({"ledger": _uri(ledger, args), "namespace": ledger.namespace, "client": d}, indent=2))
        elif s.known:
            _emit(args, ledger, [s], "client")
        else:
            print(f"no client {args.client!r} in {_uri(ledger, args)} namespace={ledger.namespace}", file=sys.stderr)
        return 0 if s.known else 1


def _reset(args) -> int:
    clients = _client_ids(args.clients)
    with _open(args) as ledger:
        if _unknown(args, ledger, clients):
            return 1
        for c in clients:
            ledger.reset(c)
        _emit(args, ledger, [ledger.get(c) for c in clients], "reset")
    return 0


def _set_blocked(args, blocked: bool) -> int:
    clients = _client_ids(args.clients)
    with _open(args) as ledger:
        if not getattr(args, "create", False) and _unknown(args, ledger, clients):
            return 1
        states = [ledger.set_blocked(c, blocked) for c in clients]
        _emit(args, ledger, states, "blocked" if blocked else "unblocked")
    return 0


def _block(args) -> int:
    return _set_blocked(args, True)


def _unblock(args) -> int:
    return _set_blocked(args, False)
