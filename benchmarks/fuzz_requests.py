"""Longer fuzzing of request bodies against real servers: the cases of tests/test_fuzz_requests.py
(tests/fuzz_strategies.py), for more examples or seconds.

    python benchmarks/fuzz_requests.py [--examples 500 | --seconds 120] [--seed 0] [--targets torchserve,classify,classify_batch]

TorchServe 0.12 with the example MNIST archive `guardian protect`ed (2 workers, batch_size 8,
max_batch_delay 20 ms) and `bentoml serve bento.service:MNISTGuarded` (2 workers; APIs classify and
classify_batch). Each case is sent with its own X-Client-Id and a benign digit from another client
alongside. Cases are drawn in chunks of 50 (hypothesis' generate phase, seed = --seed + chunk), so the
same arguments send the same cases. --seconds is per target.

Prints, per target: cases tried, status counts, 5xx count, shape problems, benign-neighbour problems,
then the after-run checks (workers alive, benign digits right, ledger queries = answered rows). Writes
benchmarks/results/fuzz_requests.json. Exit status 1 when anything broke.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

import requests  # noqa: E402

import fuzz_strategies as fz  # noqa: E402
from examples.mnist import serving as ex  # noqa: E402

OUT = os.path.join(ROOT, "benchmarks", "results", "fuzz_requests.json")
CHUNK = 50


def fuzz_target(target, digits, examples: int | None, seconds: float | None, seed: int):
    sessions = (requests.Session(), requests.Session())
    top = fz.reference_top1(target, sessions[0], digits)
    records, i, chunk = [], 0, 0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:
        while True:
            for case in fz.sample_cases(CHUNK, seed=seed + chunk):
                if (examples is not None and i >= examples) or (seconds is not None and time.perf_counter() - t0 >= seconds):
                    return records, time.perf_counter() - t0
                rec = fz.probe(target, case, i, sessions, pool, digits, top)
                records.append(rec)
                i += 1
                if rec["problem"] or rec["benign_problem"]:
                    print(f"  ! {target.name} #{i}: {rec['case']}\n    -> {rec['problem'] or ''} {rec['benign_problem'] or ''}",
                          flush=True)
            chunk += 1


def versions() -> dict:
    """The evaluation harness's versions (python, torch, git commit, ...) and the serving packages'."""
    import importlib.metadata as md

    from guardian_plugin.evaluation.harness import versions as base

    out = base()
    for pkg in ("torchserve", "bentoml", "hypothesis", "requests", "pillow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def write_report(path: str, out: dict, failures: list, ok: str) -> int:
    """Write a benchmark's JSON (with versions, commit and machine) and say where; exit status."""
    v = versions()
    out = {**out, "git_commit": v.get("git_commit", ""), "versions": v, "machine": platform.machine(),
           "cpus": os.cpu_count(), "failures": failures}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nwrote {path}; {'FAILURES: ' + ', '.join(failures) if failures else ok}")
    return 1 if failures else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=None, help="cases per target (default 300 unless --seconds)")
    ap.add_argument("--seconds", type=float, default=None, help="fuzz each target for this long")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", default="torchserve,classify,classify_batch")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    if args.examples is None and args.seconds is None:
        args.examples = 300
    wanted = args.targets.split(",")
    digits = ex.real_digits(8)
    work = tempfile.mkdtemp(prefix="guardian-fuzz-")
    servers, targets = [], []
    try:
        if "torchserve" in wanted:
            ts, t = fz.start_torchserve(os.path.join(work, "torchserve"))
            servers.append(ts)
            targets.append(t)
        if {"classify", "classify_batch"} & set(wanted):
            srv, ts_ = fz.start_bento(os.path.join(work, "bento"))
            servers.append(srv)
            targets += [t for t in ts_ if t.api in wanted]
        results, failures = [], []
        for t in targets:
            records, wall = fuzz_target(t, digits, args.examples, args.seconds, args.seed)
            s = fz.summary(t.name, records, wall)
            after = fz.after_run_problems(t, digits, records)
            s["after_run_problems"] = after
            s["examples_of_problems"] = [{"case": r["case"], "status": r["status"], "problem": r["problem"],
                                          "benign_problem": r["benign_problem"]}
                                         for r in records if r["problem"] or r["benign_problem"]][:10]
            s["examples_of_upstream"] = [r["case"] for r in records if r["upstream"]][:3]
            results.append(s)
            print(fz.summary_line(s), flush=True)
            print(f"        error types: {s['error_types']}")
            for p in after:
                print(f"        after the run: {p}")
            if s["5xx"] or s["problems"] or s["benign_problems"] or after:
                failures.append(t.name)
    finally:
        for srv in servers:
            srv.stop()
    return write_report(args.out, {"benchmark": "fuzz_requests", "examples": args.examples, "seconds": args.seconds,
                                   "seed": args.seed, "targets": results}, failures, "no failures")


if __name__ == "__main__":
    sys.exit(main())
