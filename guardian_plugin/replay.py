"""``guardian replay``: an operator's own recorded traffic through a protected archive's guard, offline.

    guardian replay --archive PROTECTED.mar DIR [--ledger memory://] [--json report.json]

``DIR`` holds one sub-folder per client (the folder's name is the client id); each file in it is one
request body (an image as the client sent it), and the files are sent in the order of their names
(sorted; number them with leading zeros, ``00001.png``, to keep a recorded order). The archive's own
handler is loaded in this process as a TorchServe worker would load it (handlers/archive.py
``load_archive_handler``), with the guard config it embeds, switched to observe mode (config ``mode:
observe``) and to a fresh ledger (``--ledger``, default ``memory://``; never the archive's production
ledger unless named there; ``GUARDIAN_LEDGER`` is ignored). Each file goes through the guarded handler's
``handle()`` with its client's identity header, one request per call, so every mechanism decides as it
would on the server, and nothing it decides stops the replay. The folder's name is the client's identity
(sent as X-Client-Id whatever identity mode the archive's config sets: the replay measures the detector
and the rules, not the identity check).

Per client the report says: the queries answered, what enforce mode would have answered instead (the
first query it would refuse and by which mechanism: the cumulative ``rule``, the sliding ``window``, a
``quota`` or the ``flagged_quota``; where the distribution test first failed; how many answers would have
been DPreds or the probation response) and the inputs the handler rejects (400s, which the model cannot
answer in either mode). docs/rollout.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from typing import Dict, List

from guardian_plugin.errors import GuardianError


CLIENT_HEADER = "X-Client-Id"  # the replay's identity: each folder's name, in this header


class ReplayError(GuardianError):
    """A replay that cannot run (an empty folder, an archive that is not guarded, ...)."""


def client_folders(root: str) -> Dict[str, List[str]]:
    """{client id: its files in query order (sorted by name)}, one client per sub-folder of ``root``."""
    if not os.path.isdir(root):
        raise ReplayError(f"{root}: no such folder (expected one sub-folder of recorded request bodies per client)")
    entries = sorted(os.listdir(root))
    loose = [e for e in entries if os.path.isfile(os.path.join(root, e)) and not e.startswith(".")]
    if loose:
        raise ReplayError(f"{root} holds files outside client folders ({', '.join(loose[:3])}"
                          f"{', ...' if len(loose) > 3 else ''}): put each client's files in a sub-folder named "
                          "after the client, e.g. DIR/alice/00001.png")
    out = {}
    for e in entries:
        d = os.path.join(root, e)
        if os.path.isdir(d) and not e.startswith("."):
            files = [os.path.join(d, f) for f in sorted(os.listdir(d))
                     if not f.startswith(".") and os.path.isfile(os.path.join(d, f))]
            if not files:
                raise ReplayError(f"{d}: the client folder is empty (one file per recorded request)")
            out[e] = files
    if not out:
        raise ReplayError(f"{root}: no client folders (expected DIR/CLIENT/FILES, one sub-folder per client)")
    return out


class _ReplayContext:
    """The part of TorchServe's request context HandlerGuard.handle reads and writes, for one request."""

    def __init__(self, headers: dict):
        self.headers = headers
        self.status = 200
        self.metrics = None

    def get_all_request_header(self, i: int) -> dict:
        return self.headers

    def set_response_status(self, code, phrase="", idx=0):
        self.status = int(code)

    def set_response_content_type(self, idx, value):
        pass

    def set_response_header(self, idx, key, value):
        pass


def _recording(guardian, results: list):
    """Guardian.inspect, with each InspectResult appended to ``results`` (the replay reads its verdicts)."""
    inspect = guardian.inspect

    def recorded(*args, **kwargs):
        res = inspect(*args, **kwargs)
        results.append(res)
        return res

    return recorded


def _mechanism(rule, counted: List[bool], at: int) -> str:
    """Which rule refused a client at query ``at`` (1-based), given its rows counted as flagged."""
    if rule.triggered(at, sum(counted[:at])):
        return "rule"
    return "window" if rule.window else "rule"


@contextlib.contextmanager
def _without_env(name: str):
    old = os.environ.pop(name, None)
    try:
        yield
    finally:
        if old is not None:
            os.environ[name] = old


def replay(archive: str, folder: str, ledger: str = "memory://", progress: bool = True) -> dict:
    """The report (see the module docstring) of replaying ``folder`` through ``archive``'s guard."""
    from guardian_plugin.handlers.archive import load_archive_handler, model_config, read_archive
    from guardian_plugin.handlers.settings import SECTION

    manifest, files = read_archive(archive)
    clients = client_folders(folder)
    name, cfg = model_config(manifest, files)
    section = ((cfg.get("handler") or {}).get(SECTION) or {}) if isinstance(cfg.get("handler"), dict) else {}
    if not isinstance(section.get("guard"), dict):
        raise ReplayError(f"{archive} is not a protected archive (no handler.{SECTION}.guard in {name}): "
                          "protect it first with `guardian protect`")
    # the folder names are the client ids: sent in one plain header, whatever identity the server takes
    section["guard"] = {**section["guard"], "ledger": ledger, "mode": "observe", "identity": {"headers": [CLIENT_HEADER]}}
    files = {**files, name: json.dumps(cfg).encode()}  # YAML is a superset of JSON
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with the training extras
        tqdm = None
    total = sum(len(v) for v in clients.values())
    with tempfile.TemporaryDirectory(prefix="guardian-replay-") as tmp, _without_env("GUARDIAN_LEDGER"):
        handler = load_archive_handler(manifest, files, tmp)
        guard = handler.guard
        guardian = guard.guardian
        ident = CLIENT_HEADER
        results: list = []
        guardian.inspect = _recording(guardian, results)
        bar = tqdm(total=total, unit="img", desc="replay", disable=not progress, file=sys.stderr) if tqdm else None
        report = {"archive": archive, "folder": folder, "ledger": ledger, "identity_header": ident,
                  "rule": {"tau": guardian.ledger.rule.tau, "rho": guardian.ledger.rule.rho,
                           "window": guardian.ledger.rule.window, "window_rho": guardian.ledger.rule.window_rho,
                           "quota": guardian.ledger.rule.quota, "flagged_quota": guardian.ledger.rule.flagged_quota},
                  "clients": {}}
        for client, paths in clients.items():
            rows = []  # per query: (status, would denial or None, counted, dpreds, probation, suspect)
            bad = []
            for q, path in enumerate(paths, 1):
                try:
                    with open(path, "rb") as f:
                        body = f.read()
                except OSError as e:
                    raise ReplayError(f"{path}: cannot read ({e})") from None
                ctx = _ReplayContext({ident: client})
                n_before = len(results)
                out = guard.handle([{"body": body}], ctx)
                if ctx.status != 200:
                    try:
                        msg = json.loads(out[0])
                    except (TypeError, ValueError):
                        msg = {"type": "Error", "message": str(out[0])}
                    bad.append({"query": q, "file": os.path.relpath(path, folder), "status": ctx.status,
                                "type": msg.get("type"), "message": msg.get("message")})
                    rows.append(None)
                else:
                    res = results[n_before] if len(results) > n_before else None
                    if res is None:
                        rows.append(None)
                    else:
                        rows.append((res.would[0] if res.would else None, bool(res.flagged[0]),
                                     bool(res.would_deceived[0]) and not bool(res.would_probation[0]),
                                     bool(res.would_probation[0]), bool(res.flagged[0]) and not bool(res.detected[0])))
                if bar is not None:
                    bar.update(1)
            report["clients"][client] = _client_report(guardian, client, rows, bad)
        if bar is not None:
            bar.close()
    return report


def _client_report(guardian, client: str, rows: list, bad: list) -> dict:
    rule = guardian.ledger.rule
    st = guardian.ledger.get(client)
    answered = [r for r in rows if r is not None]
    counted = [r[1] for r in answered]
    first = next(((q, r[0]) for q, r in enumerate(rows, 1) if r is not None and r[0] is not None), None)
    would = None
    if first is not None:
        q, d = first
        why = {403: "blocked" if d.kind == "ClientBlocked" else "refused", 429: "quota"}.get(d.status, d.kind)
        if d.status == 403 and d.kind != "ClientBlocked" and st.refused_at_query is not None:
            why = _mechanism(rule, counted, st.refused_at_query)
        elif d.status == 429 and rule.flagged_quota and st.period_flagged >= rule.flagged_quota:
            why = "flagged_quota"
        would = {"query": q, "status": d.status, "type": d.kind, "mechanism": why}
    suspect_at = next((q for q, r in enumerate(rows, 1) if r is not None and r[4]), None)
    n = len(answered)
    dp = sum(r[2] for r in answered)
    return {"queries": len(rows), "answered": n, "bad_inputs": bad,
            "would_deny_first": would,
            "would_denied": sum(1 for r in answered if r[0] is not None),
            "refused": bool(st.refused), "refused_at_query": st.refused_at_query,
            "flagged": int(st.flagged), "distribution_failed_at_query": suspect_at,
            "would_dpreds": dp, "would_dpreds_share": round(dp / n, 4) if n else 0.0,
            "would_probation": sum(r[3] for r in answered)}


def format_report(report: dict) -> str:
    lines = [f"replay of {report['folder']} through {report['archive']} (observe mode, ledger {report['ledger']})",
             f"{'client':24} {'queries':>7} {'answered':>8}  what enforce mode would do"]
    for c, r in report["clients"].items():
        w = r["would_deny_first"]
        if w is None:
            what = "never refused or limited"
        else:
            what = f"{w['status']} from query {w['query']} ({w['mechanism']}; {r['would_denied']} queries in all)"
        extra = [f"DPreds on {r['would_dpreds']} ({100 * r['would_dpreds_share']:.1f}%)"]
        if r["would_probation"]:
            extra.append(f"probation answers {r['would_probation']}")
        if r["distribution_failed_at_query"]:
            extra.append(f"distribution test failed at query {r['distribution_failed_at_query']}")
        if r["bad_inputs"]:
            extra.append(f"{len(r['bad_inputs'])} inputs rejected (400), first: {r['bad_inputs'][0]['file']}: "
                         f"{r['bad_inputs'][0]['message']}")
        lines.append(f"{c:24} {r['queries']:>7} {r['answered']:>8}  {what}; " + "; ".join(extra))
    return "\n".join(lines)


def _run(args) -> int:
    report = replay(args.archive, args.folder, args.ledger, progress=not args.quiet)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"report written to {args.json}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "replay", help="replay recorded client traffic through a protected archive's guard, offline",
        description="Replays DIR (one sub-folder per client, named after it; its files are that client's "
                    "request bodies, sent in the order of their names) through the guard a protected archive "
                    "embeds, in observe mode and on a fresh ledger, and reports per client what enforce mode "
                    "would have refused or limited, at which query and by which mechanism (docs/rollout.md).")
    p.add_argument("folder", metavar="DIR", help="one sub-folder per client, one file per request")
    p.add_argument("--archive", required=True, help="the `guardian protect`ed .mar (its model, preprocess and guard config)")
    p.add_argument("--ledger", default="memory://",
                   help="the ledger the replay counts in (default memory://; never the archive's own unless named)")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
