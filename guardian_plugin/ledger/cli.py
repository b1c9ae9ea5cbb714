"""`guardian clients list|show|reset|reset-quota|block|unblock`: look at and manage per-client state.

    guardian clients list    --ledger redis://127.0.0.1:6379/0 --namespace mnist [--denied] [--json]
    guardian clients show    CLIENT --ledger sqlite:///var/lib/guardian/ledger.db
    guardian clients reset   CLIENT [CLIENT ...] --ledger URL      # forget counts and refusal
    guardian clients reset-quota CLIENT [CLIENT ...] --ledger URL  # clear the quota period's counts only
    guardian clients block   CLIENT [CLIENT ...] --ledger URL [--create]  # refuse by hand
    guardian clients unblock CLIENT [CLIENT ...] --ledger URL      # lift a block or a rule refusal

``--config guard.yaml`` takes the ledger, namespace and rule from a guard config instead, ``--archive
PROTECTED.mar`` from the config a `guardian protect`ed archive embeds (whose namespace is the model's
name unless its config gave one: without either, the namespace is 'default'); ``--window``,
``--quota``, ``--flagged-quota`` and ``--quota-period`` override the rule's. With quotas (or once a
client has quota counts) the tables show the current quota period's counts (``PERIOD_Q``, ``PERIOD_F``,
as used/quota when a quota is set): give the period the guard uses (``--quota-period``, default 1d).
Every command prints a table, or JSON with ``--json``. reset, reset-quota, block and unblock act only
on clients the ledger knows:
naming an unknown one changes nothing and exits 1 (``block --create`` blocks a client never seen
yet). The tool never creates a SQLite file. Exit status: 0; 1 for an unknown client; 2 for errors
(unreachable store, bad URI or option), always as one line on stderr.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import replace
from typing import List, Optional

from guardian_plugin.errors import ConfigError
from guardian_plugin.ledger import open_ledger
from guardian_plugin.ledger.base import ClientState, Ledger, RefusalRule, check_client_id, now, parse_duration


def store_options(from_config: str) -> argparse.ArgumentParser:
    """The options every operator command (``guardian clients``, ``guardian keys``) takes to find a
    ledger's store: --ledger, --namespace, --config, --archive (``from_config``: what they take from a
    guard config) and --json."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ledger", help="ledger URI: sqlite:///path.db, redis://host:6379/0, memory://")
    common.add_argument("--namespace", default=None, help="protected model's namespace (default: 'default')")
    common.add_argument("--config", help=f"guard YAML: {from_config} from there")
    common.add_argument("--archive", help="a `guardian protect`ed .mar: its embedded guard config (the namespace is "
                                          "the model's name)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    return common


def register(subparsers) -> None:
    common = store_options("ledger, namespace and rule")
    common.add_argument("--window", type=int, default=None,
                        help="sliding-window size to report window counts for (default: the config's, else 0)")
    common.add_argument("--quota", type=int, default=None, help="queries per client and period (default: the config's)")
    common.add_argument("--flagged-quota", type=int, default=None,
                        help="flagged queries per client and period (default: the config's)")
    common.add_argument("--quota-period", default=None,
                        help="quota period: 3600, 90s, 30m, 12h, 1d (default: the config's, else 1d)")

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
                           ("reset-quota", _reset_quota, "clear the clients' quota period counts only"),
                           ("block", _block, "refuse the clients by hand"),
                           ("unblock", _unblock, "lift a block or a rule refusal (counts are kept)")):
        ap = sub.add_parser(name, parents=[common], help=what)
        ap.add_argument("clients", nargs="+", metavar="CLIENT")
        ap.set_defaults(func=fn)
        if name == "block":
            ap.add_argument("--create", action="store_true",
                            help="also block clients the ledger has never seen (else: exit 1, nothing changed)")


# ---------------------------------------------------------------------------------- helpers
_RULE_FIELD = {"--window": "window", "--quota": "quota", "--flagged-quota": "flagged_quota",
               "--quota-period": "quota_period_s"}


def _open(args) -> Ledger:
    from guardian_plugin.config import operator_config

    uri, ns, rule = args.ledger, args.namespace, None
    cfg = operator_config(args.config, args.archive)
    if cfg is not None:
        uri = uri or cfg.ledger
        ns = ns or cfg.namespace
        rule = cfg.rule.to_rule(cfg.quota)
    if not uri:
        raise ConfigError("give the ledger: --ledger URI, --config guard.yaml or --archive PROTECTED.mar")
    if rule is None:
        rule = RefusalRule()
    given = {o: v for o, v in (("--window", args.window), ("--quota", args.quota),
                               ("--flagged-quota", args.flagged_quota), ("--quota-period", args.quota_period))
             if v is not None}
    try:
        rule = replace(rule, **{_RULE_FIELD[o]: parse_duration(v) if o == "--quota-period" else v
                                for o, v in given.items()})
    except ValueError as e:
        raise ConfigError(f"{'/'.join(given)}: {e}") from None
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


def _shows_quota(args, rule: RefusalRule, states: List[ClientState]) -> bool:
    """Whether to show quota counts: the rule has quotas or a period was given, or a client has counts."""
    return rule.quotas or args.quota_period is not None or any(s.period is not None for s in states)


def _quota_usage(rule: RefusalRule, s: ClientState, t: float) -> dict:
    """The client's counts in the quota period ``t`` falls in, with the quotas and when it ends."""
    q, f = s.period_counts(rule, t)
    return {"period": rule.period(t), "queries": q, "flagged": f, "quota": rule.quota,
            "flagged_quota": rule.flagged_quota, "period_s": rule.quota_period_s, "resets_in_s": rule.retry_after(t)}


def _as_json(s: ClientState, rule: RefusalRule, quota: bool, t: float) -> dict:
    d = s.to_dict()
    d["status"] = _status(s)
    if quota:
        d["quota_usage"] = _quota_usage(rule, s, t)
    return d


def _used(n: int, limit: int) -> str:
    return f"{n}/{limit}" if limit else str(n)


def _table(states: List[ClientState], rule: Optional[RefusalRule] = None, quota: bool = False, out=None) -> None:
    out = out or sys.stdout
    rule = rule or RefusalRule()
    window = any("window" in s.extra for s in states)
    head = ["CLIENT", "STATUS", "QUERIES", "FLAGGED", "SHARE", "REFUSED_AT"] + (["WINDOW"] if window else []) + \
           (["PERIOD_Q", "PERIOD_F"] if quota else []) + ["FIRST_SEEN (UTC)", "LAST_SEEN (UTC)"]
    rows, t = [], now()
    for s in states:
        row = [s.client_id, _status(s), str(s.queries), str(s.flagged), f"{s.flagged_share:.3f}",
               "-" if s.refused_at_query is None else str(s.refused_at_query)]
        if window:
            row.append(f"{s.extra.get('window_flagged', 0)}/{s.extra.get('window', 0)}")
        if quota:
            q, f = s.period_counts(rule, t)
            row += [_used(q, rule.quota), _used(f, rule.flagged_quota)]
        rows.append(row + [_time(s.first_seen), _time(s.last_seen)])
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
    numeric = {"QUERIES", "FLAGGED", "SHARE", "REFUSED_AT", "WINDOW", "PERIOD_Q", "PERIOD_F"}
    for r in [head] + rows:
        cells = [c.rjust(w) if h in numeric else c.ljust(w) for c, w, h in zip(r, widths, head)]
        print("  ".join(cells).rstrip(), file=out)


def _emit(args, ledger, states: List[ClientState], title: str) -> None:
    quota, t = _shows_quota(args, ledger.rule, states), now()
    if quota and not ledger.rule.quotas and args.quota_period is None:
        print(f"guardian clients: quota counts are of {ledger.rule.quota_period_s} s periods: give the guard's "
              "--quota-period (or --config) if it uses another", file=sys.stderr)
    if args.json:
        print(json.dumps({"ledger": _uri(ledger, args), "namespace": ledger.namespace,
                          "clients": [_as_json(s, ledger.rule, quota, t) for s in states]}, indent=2))
    else:
        print(f"# {title}: {_uri(ledger, args)} namespace={ledger.namespace} ({len(states)} client(s))")
        if states:
            _table(states, ledger.rule, quota)


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
        if not states and ledger.namespace == "default" and not (args.namespace or args.config or args.archive):
            print("guardian clients list: namespace 'default' has no clients; `guardian protect` writes under the "
                  "model's name: give --namespace NAME, or --archive PROTECTED.mar", file=sys.stderr)
    return 0


def _show(args) -> int:
    with _open(args) as ledger:
        s = ledger.get(_client_ids([args.client])[0])
        if args.json:
            d = _as_json(s, ledger.rule, _shows_quota(args, ledger.rule, [s]), now())
            d["known"] = s.known
            print(json.dumps({"ledger": _uri(ledger, args), "namespace": ledger.namespace, "client": d}, indent=2))
        elif s.known:
            _emit(args, ledger, [s], "client")
        else:
            print(f"no client {args.client!r} in {_uri(ledger, args)} namespace={ledger.namespace}", file=sys.stderr)
        return 0 if s.known else 1


def _each_known(args, act, title: str) -> int:
    """``act(ledger, client)`` for every named client, if the ledger knows them all (else exit 1)."""
    clients = _client_ids(args.clients)
    with _open(args) as ledger:
        if _unknown(args, ledger, clients):
            return 1
        for c in clients:
            act(ledger, c)
        _emit(args, ledger, [ledger.get(c) for c in clients], title)
    return 0


def _reset(args) -> int:
    return _each_known(args, Ledger.reset, "reset")


def _reset_quota(args) -> int:
    return _each_known(args, Ledger.reset_quota, "quota reset")


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
