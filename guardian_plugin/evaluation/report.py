"""results.json, tables.md (the layout of the paper's Tables I, II, V and VII) and the clone-accuracy
plot, all built from the list of finished runs. Every figure is a mean over seeds, with the standard
deviation after "±" when there is more than one seed."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Dict, List, Optional

import numpy as np

from guardian_plugin.evaluation.config import CONFIG_TITLES, CONFIGURATIONS

ATTACK_TITLES = {"dfme": "DFME", "maze": "MAZE", "dast": "DaST", "dfms": "DFMS-HL", "disguide": "DisGUIDE",
                 "dual_students": "Dual Students", "quda": "QUDA"}


def _stats(values: List[Optional[float]]) -> Optional[dict]:
    v = [float(x) for x in values if x is not None]
    if not v:
        return None
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def summarize(results: dict) -> dict:
    groups: Dict[tuple, list] = defaultdict(list)
    for r in results["runs"]:
        groups[(r["attack_id"], r["configuration"])].append(r)
    cells = {}
    for (aid, conf), rs in groups.items():
        cells.setdefault(aid, {})[conf] = {
            "cacc": _stats([r["cacc"] for r in rs]),
            "dacc": _stats([r.get("dacc") for r in rs]),
            "answered": _stats([r["answered_before_refusal"] for r in rs]),
            "queries": _stats([r["queries_target"] for r in rs]),
            "refused_share": float(np.mean([r["refused"] for r in rs])),
            "identities": _stats([r.get("identities", 1) for r in rs]),
            "seconds": _stats([r["seconds"] for r in rs]),
            "accounting_ok": all(r["accounting_ok"] for r in rs),
            "seeds": sorted(r["seed"] for r in rs),
            "stopped_by": sorted({str(r.get("stopped_by")) for r in rs}),
            "probation_answers": _stats([r.get("probation_answers") for r in rs]),
            "suspect_answers": _stats([r.get("suspect_answers") for r in rs]),
        }
    detection = {}
    for r in results["runs"]:
        for which, d in (r.get("detection") or {}).items():
            for b, w in d.items():
                detection.setdefault(r["attack_id"], {}).setdefault(which, {}).setdefault(b, []).append(w.get("dacc"))
    detection = {a: {w: {b: _stats(v) for b, v in bs.items()} for w, bs in ws.items()} for a, ws in detection.items()}
    return {"cells": cells, "detection": detection}


def _pct(s: Optional[dict], digits: int = 2) -> str:
    if not s:
        return "n/a"
    m = f"{100 * s['mean']:.{digits}f}"
    return m if s["n"] == 1 else f"{m} ± {100 * s['std']:.{digits}f}"


def _num(s: Optional[dict]) -> str:
    if not s:
        return "n/a"
    return f"{s['mean']:.0f}" if s["n"] == 1 else f"{s['mean']:.0f} ± {s['std']:.0f}"


def _attack_meta(results: dict) -> Dict[str, dict]:
    meta = {}
    for r in results["runs"]:
        meta.setdefault(r["attack_id"], {"attack": r["attack"], "label_mode": r["label_mode"], "seen": r["seen"],
                                         "aware": r["aware"], "budget": r["budget"]})
    return meta


def _col(aid: str, m: dict) -> str:
    name = ATTACK_TITLES.get(m["attack"], m["attack"])
    if m["label_mode"] == "hard" and m["attack"] != "dfms":
        name += " (hard)"
    if m["label_mode"] == "soft" and m["attack"] == "dfms":
        name = "DFMS-SL"
    if aid not in (m["attack"], f"{m['attack']}-{m['label_mode']}"):
        name = f"{name} [{aid}]"
    return name


def _table(header: List[str], rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _seeds_line(cells: dict, meta: Dict[str, dict]) -> str:
    """'Seeds: [0]', or the most common seed list and the cells that ran other seeds."""
    lists = [tuple(cell["seeds"]) for a in cells for cell in cells[a].values()]
    if not lists:
        return "Seeds: none"
    common = max(set(lists), key=lists.count)
    others = [f"{_col(a, meta[a])} / {CONFIG_TITLES.get(c, c)}: {list(cell['seeds'])}"
              for a in cells for c, cell in cells[a].items() if tuple(cell["seeds"]) != common]
    return f"Seeds: {list(common)}" + (f" (other cells: {'; '.join(others)})" if others else "")


def render_tables(results: dict, summary: dict) -> str:
    cells, det = summary["cells"], summary["detection"]
    meta = _attack_meta(results)
    plain = [a for a, m in meta.items() if not m["aware"]]
    plain.sort(key=lambda a: (not meta[a]["seen"], list(ATTACK_TITLES).index(meta[a]["attack"])
                              if meta[a]["attack"] in ATTACK_TITLES else 99, a))
    aware = sorted(a for a, m in meta.items() if m["aware"])
    confs = [c for c in CONFIGURATIONS if any(c in cells.get(a, {}) for a in meta) or c in results["benign"]]
    benign = results["benign"]
    m = results["meta"]
    lines = [f"# Attack evaluation: {m['name']}", "",
             f"Command: `{m['command']}`  ",
             f"{_seeds_line(cells, meta)}; tau = {m['tau']}, rho = {m['config']['guard']['rho']}, DPreds d = "
             f"{m['config']['guard']['d']}; device {m['device']}, {m['threads']} thread(s); "
             f"torch {m['versions'].get('torch')}, commit {m['versions'].get('git_commit')}.  ",
             "Figures are percentages: mean over seeds, ± the standard deviation when there is more than one seed. "
             "CAcc: clone accuracy on the victim's test set; BAcc: the protected model's accuracy for a benign "
             "client through the same response path; DAcc: share of the attack's answered queries flagged.  ",
             "**Seen** attacks are those whose source the detector trained on (dfme); every other attack is "
             "**unseen** by the detector and is reported apart.", ""]
    # budgets
    lines += ["Budgets (queries): " + ", ".join(f"{_col(a, meta[a])} {meta[a]['budget']:,}" for a in plain + aware), ""]

    def bacc_cell(c):
        b = benign.get(c)
        if not b:
            return "n/a"
        base = benign.get("no_defense", {}).get("bacc")
        s = f"{100 * b['bacc']:.2f}"
        return s + (f" ({100 * (b['bacc'] - base):+.2f})" if base is not None and c != "no_defense" else "")

    seen = [a for a in plain if meta[a]["seen"]]
    unseen = [a for a in plain if not meta[a]["seen"]]
    # ---------------------------------------------------------------- Table I
    header = ["Method", "BAcc"] + [f"{_col(a, meta[a])} (seen)" for a in seen] + \
             [f"{_col(a, meta[a])} (unseen)" for a in unseen] + ["Unseen avg."]
    rows = []
    for c in confs:
        row = [CONFIG_TITLES[c], bacc_cell(c)]
        for a in seen + unseen:
            row.append(_pct(cells.get(a, {}).get(c, {}).get("cacc")))
        vals = [cells[a][c]["cacc"]["mean"] for a in unseen if cells.get(a, {}).get(c, {}).get("cacc")]
        row.append(f"{100 * np.mean(vals):.2f}" if vals and len(vals) == len(unseen) else "n/a")
        rows.append(row)
    lines += ["## Table I: CAcc under each defense configuration (paper Table I layout)", "", _table(header, rows), ""]
    # detection during the runs
    rows = []
    for c in confs:
        if c not in ("model_guardian", "detector_only", "raw_detector", "prada"):
            continue
        row = [CONFIG_TITLES[c], _pct({"mean": benign[c]["fpr"], "std": 0, "n": 1}) if "fpr" in benign.get(c, {}) else "n/a"]
        for a in seen + unseen:
            cell = cells.get(a, {}).get(c)
            row.append("n/a" if not cell else f"{_pct(cell['dacc'])} / {_num(cell['answered'])}")
        rows.append(row)
    if rows:
        lines += ["### Detection and refusal during the attacks", "",
                  "Each cell: DAcc (share of the attack's answered queries flagged) / queries answered before "
                  "refusal (the budget when never refused); PRADA has no per-sample detector (DAcc n/a). Second "
                  "column: FPR on the benign test set.", "",
                  _table(["Method", "FPR"] + [_col(a, meta[a]) for a in seen + unseen], rows), ""]
    # ---------------------------------------------------------------- Table II
    rows = []
    fpr_conf = {"gradient": next((c for c in ("model_guardian", "detector_only") if c in results.get("benign_windows", {})), None),
                "raw": "raw_detector" if "raw_detector" in results.get("benign_windows", {}) else None}
    for which, title in (("gradient", "Model-Guardian"), ("raw", "Raw-image detector")):
        if not any(which in det.get(a, {}) for a in plain):
            continue
        for b in [str(x) for x in results["meta"]["config"]["detection_windows"]]:
            row = [title, b]
            for a in seen + unseen:
                s = det.get(a, {}).get(which, {}).get(b)
                fc = fpr_conf[which]
                fpr = results.get("benign_windows", {}).get(fc, {}).get(b) if fc else None
                row.append(_pct(s))
                row.append("n/a" if fpr is None else f"{100 * fpr:.2f}")
            rows.append(row)
    if rows:
        header = ["Method", "Batch"]
        for a in seen + unseen:
            header += [f"{_col(a, meta[a])} DAcc", "FPR"]
        lines += ["## Table II: per-batch detection at 50 and 500 queries (paper Table II layout)", "",
                  "DAcc: share flagged among B consecutive queries of the attack, averaged over windows spread "
                  "along its no-defense run (scored offline, so refusal does not cut the stream). FPR: share "
                  "flagged among B consecutive benign test images.", "", _table(header, rows), ""]
    # ---------------------------------------------------------------- Table V
    if any("dpreds_only" in cells.get(a, {}) and "no_defense" in cells.get(a, {}) for a in plain):
        r1, r2, r3 = ["No defense"], ["w/ DPreds"], ["Decline"]
        for a in seen + unseen:
            n, d = cells.get(a, {}).get("no_defense", {}).get("cacc"), cells.get(a, {}).get("dpreds_only", {}).get("cacc")
            r1.append(_pct(n))
            r2.append(_pct(d))
            r3.append(f"{100 * (n['mean'] - d['mean']):.2f}" if n and d else "n/a")
        lines += [f"## Table V: DPreds alone (d = {m['config']['guard']['d']}) (paper Table V layout)", "",
                  _table(["Method"] + [_col(a, meta[a]) for a in seen + unseen], [r1, r2, r3]), ""]
    # ---------------------------------------------------------------- Table VII
    order = [("no_defense", "No defense"), ("model_guardian", "Model-Guardian"),
             ("raw_detector", "w/o Gradient Trans."), ("dpreds_only", "w/o DFMS-Detector"),
             ("detector_only", "w/o DPreds")]
    rows = [[t] + [_pct(cells.get(a, {}).get(c, {}).get("cacc")) for a in seen + unseen] for c, t in order if c in confs]
    if rows and seen + unseen:
        lines += ["## Table VII: contribution of each module, CAcc (paper Table VII layout)", "",
                  _table(["Method"] + [_col(a, meta[a]) for a in seen + unseen], rows), ""]
    # ---------------------------------------------------------------- defense-aware
    if aware:
        aconfs = [c for c in confs if any(c in cells.get(a, {}) for a in aware)]
        rows = []
        for a in aware:
            row = [_col(a, meta[a]), ", ".join(meta[a]["aware"])]
            for c in aconfs:
                cell = cells.get(a, {}).get(c)
                if not cell:
                    row.append("n/a")
                    continue
                s = _pct(cell["cacc"])
                if cell["dacc"]:
                    s += f" / {_pct(cell['dacc'])} / {_num(cell['answered'])}"
                s += f" / {_num(cell['queries'])}"
                if cell["identities"] and cell["identities"]["mean"] > 1:
                    s += f" / {_num(cell['identities'])} ids"
                row.append(s)
            rows.append(row)
        lines += ["## Defense-aware attackers (beyond the paper)", "",
                  "Each cell: CAcc [/ DAcc / queries answered before the first refusal] / queries answered in all "
                  "[/ client ids used].", "",
                  _table(["Attacker", "Strategies"] + [CONFIG_TITLES[c] for c in aconfs], rows), ""]
    lines += _depth_tables(results, cells, meta)
    bad = [(a, c) for a, cs in cells.items() for c, cell in cs.items() if not cell["accounting_ok"]]
    lines += ["Query accounting: " + ("the target's count equals the attack's own count in every run."
                                      if not bad else f"MISMATCH in {bad}."), ""]
    return "\n".join(lines)


def _depth_tables(results: dict, cells: dict, meta: dict) -> List[str]:
    """Every attacker against defense_in_depth, and the benign replays through every configuration."""
    lines: List[str] = []
    ids = [a for a in sorted(meta, key=lambda a: (bool(meta[a]["aware"]), not meta[a]["seen"], a))
           if "defense_in_depth" in cells.get(a, {})]
    if ids:
        rows = []
        for a in ids:
            c = cells[a]["defense_in_depth"]
            rows.append([_col(a, meta[a]), ", ".join(meta[a]["aware"]) or "-", _pct(c["cacc"]), _num(c["answered"]),
                         ", ".join(x for x in c["stopped_by"] if x != "None") or "never", _pct(c["dacc"]),
                         _num(c["suspect_answers"]), _num(c["probation_answers"]), _num(c["queries"]),
                         _num(c["identities"])])
        lines += ["## Defense in depth: every attacker (beyond the paper)", "",
                  "CAcc: clone accuracy (mean ± std over the seeds); answered: queries answered before the first "
                  "refusal (403) or quota stop (429) of the first identity; stopped by: what ended the first "
                  "identity's answers; DAcc: share of answered queries the detector flagged; suspect: answers "
                  "given while the client failed the distribution test (counted as flagged, DPreds) and not flagged "
                  "by the detector; probation: label-only answers; answered in all: over every identity.", "",
                  _table(["Attacker", "Strategies", "CAcc", "answered", "stopped by", "DAcc", "suspect",
                          "probation", "answered in all", "ids"], rows), ""]
    replays = results.get("benign_replay") or {}
    if replays:
        rows = []
        for conf, kinds in replays.items():
            for kind, r in kinds.items():
                stop = r["stopped"]
                rows.append([CONFIG_TITLES.get(conf, conf), kind, f"{r['answered']}/{r['queries']}",
                             f"{stop['status']} at query {stop['at_query']}" if stop else "never",
                             f"{r['probation_answers']} (last at query {r['last_probation_query']})"
                             if r["probation_answers"] else "0",
                             str(r["dpreds_answers"]), str(r["detector_flagged"]), str(r["suspect_answers"]),
                             "yes" if r["top1_equal_all"] else f"no ({r['top1_equal']}/{r['answered']})"])
        lines += ["## Benign clients: one identity replaying the held-out test set, and one sending photos", "",
                  "digits: the victim's held-out test set sent over and over by one identity; photos: natural photo "
                  "crops (never used to train or calibrate the detector) sent by another. Response-policy answers: "
                  "answers the configuration's policy was applied to (DPreds; for the detector-only configuration, "
                  "whose policy answers unchanged, the flagged ones).", "",
                  _table(["Configuration", "client", "answered", "stopped", "probation answers",
                          "response-policy answers", "detector flags", "suspect", "top-1 = unprotected"], rows), ""]
    return lines


def plot_curves(results: dict, path: str) -> Optional[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = _attack_meta(results)
    ids = sorted(meta, key=lambda a: (bool(meta[a]["aware"]), not meta[a]["seen"], a))
    if not ids:
        return None
    cols = min(4, len(ids))
    rows = (len(ids) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    colours = {c: f"C{i}" for i, c in enumerate(CONFIGURATIONS)}
    for ax, aid in zip(axes.flat, ids):
        labelled = set()
        for r in results["runs"]:
            if r["attack_id"] != aid or not r["history"]:
                continue
            q = [h["queries"] for h in r["history"]]
            acc = [100 * h["clone_accuracy"] for h in r["history"]]
            c = r["configuration"]
            ax.plot(q, acc, marker="o", ms=3, color=colours[c], alpha=0.8,
                    label=CONFIG_TITLES[c].split(" (")[0] if c not in labelled else None)
            labelled.add(c)
        ax.set_title(_col(aid, meta[aid]) + (" (seen)" if meta[aid]["seen"] else ""), fontsize=10)
        ax.set_xlabel("queries answered")
        ax.set_ylabel("clone accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_xlim(0, meta[aid]["budget"] * 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(ids):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: dict, cfg, out_dir: str) -> None:
    results["summary"] = summarize(results)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "tables.md"), "w") as f:
        f.write(render_tables(results, results["summary"]))
    plot_curves(results, os.path.join(out_dir, "clone_accuracy.png"))
