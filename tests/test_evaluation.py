"""The evaluation harness end to end on benchmarks/attacks_quick.yaml (seconds).

The quick config runs against the committed MNIST example victim on the real held-out digits. Its
detectors are replaced by two stand-in artifacts whose behaviour is known exactly, so every metric
the harness reports can be checked: one flags every query (as the gradient detector), one flags none
(as the raw-image detector).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from guardian_plugin.detector import DetectorSpec, SubDetector, SubDetectorSpec, save_detector
from guardian_plugin.evaluation.config import parse_eval_config
from guardian_plugin.evaluation.harness import run_evaluation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "benchmarks", "attacks_quick.yaml")


def make_detector(path: str, threshold: float) -> str:
    """An identity-transform artifact with one tiny sub-detector and a fixed threshold."""
    torch.manual_seed(0)
    spec = DetectorSpec(format_version=1, input={"mean": [0.1307], "std": [0.3081]},
                        subdetectors=[SubDetectorSpec(name="s", source="dfme", transform="identity",
                                                      arch="small_resnet", arch_params={"width": 4, "blocks": 1},
                                                      weights="s.pt", threshold=threshold)])
    save_detector(path, spec, [SubDetector("small_resnet", 1, 28, width=4, blocks=1)])
    return path


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    n = torch.get_num_threads()  # the quick config sets threads: 1; restore for other tests
    tmp = tmp_path_factory.mktemp("eval")
    with open(QUICK) as f:
        raw = yaml.safe_load(f)
    raw["guard"]["detector"] = make_detector(str(tmp / "flag_all"), -1e9)
    raw["guard"]["raw_detector"] = make_detector(str(tmp / "flag_none"), 1e9)
    raw["cache_dir"] = str(tmp / "cache")
    cfg = parse_eval_config(raw, QUICK, os.path.dirname(QUICK))
    out = str(tmp / "out")
    res = run_evaluation(cfg, out, progress=False, command="pytest", log=lambda s: None)
    yield cfg, res, out
    torch.set_num_threads(n)


def _run(res, attack_id, conf):
    rs = [r for r in res["runs"] if r["attack_id"] == attack_id and r["configuration"] == conf]
    assert len(rs) == 1, (attack_id, conf)
    return rs[0]


def test_every_planned_run_happened_with_exact_accounting(quick_results):
    cfg, res, _ = quick_results
    planned = {(a.id, c) for a in cfg.attacks for c in cfg.configurations_for(a)}
    assert {(r["attack_id"], r["configuration"]) for r in res["runs"]} == planned
    for r in res["runs"]:
        assert r["accounting_ok"] and r["queries_attack"] == r["queries_target"], r["attack_id"]
        assert r["queries_attack"] <= r["budget"]
        assert 0.0 <= r["cacc"] <= 1.0 and r["history"]


def test_no_defense_and_dpreds_only_answer_the_whole_budget(quick_results):
    cfg, res, _ = quick_results
    for a in cfg.attacks:
        for conf in ("no_defense", "dpreds_only"):
            if conf in cfg.configurations_for(a):
                r = _run(res, a.id, conf)
                assert not r["refused"] and r["answered_before_refusal"] == r["queries_attack"]
                assert r["queries_attack"] > r["budget"] // 2  # batches fill the budget
    # DPreds keeps the argmax: benign accuracy is the victim's own
    assert res["benign"]["dpreds_only"]["bacc"] == res["benign"]["no_defense"]["bacc"] > 0.9


def test_flag_everything_detector_refuses_after_the_first_batch(quick_results):
    cfg, res, _ = quick_results
    tau = res["meta"]["tau"]
    for a in cfg.attacks:
        if a.aware:
            continue
        for conf in ("model_guardian", "detector_only"):
            if conf not in cfg.configurations_for(a):
                continue
            r = _run(res, a.id, conf)
            assert r["refused"] and (r["dacc"] == 1.0 or r["queries_attack"] == 0)
            # the rule acts at the row that crosses tau: a request (batch) the client crosses it inside is
            # not answered at all, so no batch size buys more answers than single-image requests (tau)
            assert r["answered_before_refusal"] <= tau
    b = res["benign"]["model_guardian"]
    assert b["fpr"] == 1.0 and b["refused"] > 0 and b["bacc"] < 0.5  # refused benign answers count as wrong


def test_flag_nothing_detector_never_refuses(quick_results):
    cfg, res, _ = quick_results
    r = _run(res, "dfme", "raw_detector")
    assert not r["refused"] and r["dacc"] == 0.0 and r["answered_before_refusal"] == r["queries_attack"]
    assert res["benign"]["raw_detector"]["fpr"] == 0.0
    assert res["benign"]["raw_detector"]["bacc"] == res["benign"]["no_defense"]["bacc"]


def test_defense_aware_attackers(quick_results):
    _, res, _ = quick_results
    rot = _run(res, "dfme-rotate-ids", "model_guardian")
    assert rot["identities"] > 1 and rot["extra"]["identity_refusals"] == rot["identities"] - 1
    # each new id is refused where the rule acts: at most tau answers per identity
    assert rot["queries_attack"] <= res["meta"]["tau"] * rot["identities"]
    mix = _run(res, "dfme-mix-real", "model_guardian")
    # its real images are flagged too by this stand-in detector: mixing buys nothing past the rule
    assert mix["refused"] and mix["queries_attack"] <= res["meta"]["tau"]
    inv = _run(res, "dfme-dpreds-inverter", "dpreds_only")
    assert inv["extra"]["answers_with_dpreds_signature"] == inv["queries_attack"]


def test_defense_in_depth_runs_and_benign_replays(quick_results):
    cfg, res, out = quick_results
    r = _run(res, "dfme", "defense_in_depth")  # the stand-in detector flags everything: refused early
    assert r["refused"] and r["stopped_by"] == "refusal" and r["answered_before_refusal"] <= 32
    assert r["probation_answers"] == r["queries_target"]  # a new identity: label-only answers
    bn = _run(res, "dfme-bn-eval", "no_defense")
    assert bn["aware"] == ["generator_bn_eval"] and bn["queries_attack"] == 256
    rep = res["benign_replay"]
    assert set(rep) == set(cfg.configurations) | {"detector_only", "raw_detector", "dpreds_only", "defense_in_depth"}
    nd = rep["no_defense"]["digits"]
    assert nd["answered"] == 120 and nd["top1_equal_all"] and nd["stopped"] is None and nd["dpreds_answers"] == 0
    assert rep["dpreds_only"]["digits"]["dpreds_answers"] == 120 and rep["dpreds_only"]["digits"]["top1_equal_all"]
    d = rep["defense_in_depth"]["digits"]  # flag-everything detector: refused once the rule can fire
    assert d["stopped"]["status"] == 403 and d["top1_equal_all"]
    text = open(os.path.join(out, "tables.md")).read()
    assert "## Defense in depth: every attacker" in text and "## Benign clients" in text


def test_table_two_windows_and_outputs(quick_results):
    cfg, res, out = quick_results
    for a in cfg.attacks:
        if "no_defense" in cfg.configurations_for(a):
            det = _run(res, a.id, "no_defense")["detection"]
            assert det["gradient"]["50"]["dacc"] == 1.0 and det["raw"]["50"]["dacc"] == 0.0
    assert res["benign_windows"]["model_guardian"]["50"] == 1.0
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved["meta"]["seeds"] == [0] and saved["meta"]["versions"]["torch"] == torch.__version__
    assert saved["meta"]["config"]["victim"]["arch"] == "lenet5"
    tables = open(os.path.join(out, "tables.md")).read()
    for title in ("Table I", "Table II", "Table V", "Table VII", "Defense-aware"):
        assert title in tables
    assert "(unseen)" in tables and "DFME (seen)" in tables
    assert "MISMATCH" not in tables
    assert os.path.getsize(os.path.join(out, "clone_accuracy.png")) > 10_000


def test_resume_skips_finished_runs(quick_results, tmp_path):
    cfg, res, out = quick_results
    again = run_evaluation(cfg, out, attacks=["dfme"], configurations=["no_defense"], resume=True,
                           progress=False, command="pytest", log=lambda s: None)
    assert len(again["runs"]) == len(res["runs"])
    assert _run(again, "dfme", "no_defense")["seconds"] == _run(res, "dfme", "no_defense")["seconds"]


def test_parallel_jobs_give_the_sequential_figures(quick_results, tmp_path):
    """--jobs 2: the same runs in two worker processes give the same figures as one after another (each
    run is seeded on its own and uses one torch thread)."""
    cfg, res, _ = quick_results
    par = run_evaluation(cfg, str(tmp_path / "par"), attacks=["dfme", "maze"], configurations=["no_defense"],
                         progress=False, command="pytest", log=lambda s: None, jobs=2)
    assert len(par["runs"]) == 2
    for r in par["runs"]:
        seq = _run(res, r["attack_id"], "no_defense")
        assert r["accounting_ok"] and r["queries_attack"] == seq["queries_attack"] == r["queries_target"]
        assert r["cacc"] == seq["cacc"], (r["attack_id"], r["cacc"], seq["cacc"])
        assert [h["clone_accuracy"] for h in r["history"]] == [h["clone_accuracy"] for h in seq["history"]]


def test_per_attack_seeds_add_runs_and_the_tables_say_which(quick_results, tmp_path):
    """An attack's `seeds:` mapping gives one configuration more seeds than the rest; resume keeps the
    seed-0 runs, the new seed runs, its cell becomes a mean +- std, and tables.md names that cell."""
    import shutil

    cfg, res, out = quick_results
    dfme = next(a for a in cfg.attacks if a.id == "dfme")
    cfg2 = cfg.model_copy(deep=True)
    next(a for a in cfg2.attacks if a.id == "dfme").seeds = {"no_defense": [0, 1]}
    assert cfg2.seeds_for(next(a for a in cfg2.attacks if a.id == "dfme"), "model_guardian") == cfg.seeds
    new = str(tmp_path / "seeds")
    shutil.copytree(out, new)
    logs = []
    again = run_evaluation(cfg2, new, attacks=["dfme"], resume=True, progress=False, command="pytest",
                           log=logs.append)
    ran = [l for l in logs if l.startswith("[")]
    assert len(ran) == 1 and "dfme / no_defense / seed 1" in ran[0], ran
    seeds = sorted(r["seed"] for r in again["runs"] if r["attack_id"] == "dfme" and r["configuration"] == "no_defense")
    assert seeds == [0, 1] and again["meta"]["seeds"] == [0, 1]
    assert len(again["runs"]) == len(res["runs"]) + 1
    assert all(r["seed"] == 0 for r in again["runs"] if not (r["attack_id"] == "dfme" and r["configuration"] == "no_defense"))
    tables = open(os.path.join(new, "tables.md")).read()
    assert "Seeds: [0] (other cells: DFME / No defense: [0, 1])" in tables
    assert dfme.seeds is None


def test_evaluate_subcommand_is_registered():
    from guardian_plugin.cli import build_parser

    args = build_parser().parse_args(["evaluate", "--config", QUICK, "--out", "x", "--attacks", "dfme,maze",
                                      "--seeds", "0,1", "--resume", "--jobs", "2"])
    assert args.attacks == ["dfme", "maze"] and args.seeds == [0, 1] and args.resume and callable(args.func)
    assert args.jobs == 2


def test_config_errors_name_the_field():
    from guardian_plugin.errors import ConfigError

    with open(QUICK) as f:
        raw = yaml.safe_load(f)
    raw["configurations"] = ["no_defense", "magic"]
    with pytest.raises(ConfigError, match="configurations"):
        parse_eval_config(raw, "quick.yaml")
    raw = yaml.safe_load(open(QUICK))
    raw["guard"]["raw_detector"] = None
    raw["attacks"][0]["configurations"] = ["raw_detector"]
    with pytest.raises(ConfigError, match="raw_detector"):
        parse_eval_config(raw, "quick.yaml")


def test_a_second_resume_on_the_same_out_keeps_the_other_processes_runs(quick_results, tmp_path):
    """Two `evaluate --resume` on one OUT: runs the other process appends while this one works are kept
    in runs.jsonl and in the report, even when this one rewrites the file (new Table II window scores).
    The other process is played by the log hook, which appends a finished run when this one reports."""
    import shutil

    cfg, res, out = quick_results
    new = str(tmp_path / "two")
    shutil.copytree(out, new)
    runs_path = os.path.join(new, "runs.jsonl")
    runs = [json.loads(l) for l in open(runs_path) if l.strip()]
    nd = next(r for r in runs if r["attack_id"] == "dfme" and r["configuration"] == "no_defense")
    del nd["detection"]  # this process re-scores the windows, so it rewrites runs.jsonl at the end
    with open(runs_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in runs)
    foreign = {**nd, "seed": 7, "cacc": 0.123}

    def log(msg):
        if msg.startswith("["):  # this process finished a run: the other one finishes one too
            with open(runs_path, "a") as f:
                f.write(json.dumps(foreign) + "\n")

    again = run_evaluation(cfg, new, attacks=["maze"], configurations=["no_defense"], seeds=[1], resume=True,
                           progress=False, command="pytest", log=log)
    on_disk = [json.loads(l) for l in open(runs_path) if l.strip()]
    keys = [(r["attack_id"], r["configuration"], r["seed"]) for r in on_disk]
    assert ("dfme", "no_defense", 7) in keys and ("maze", "no_defense", 1) in keys
    assert len(keys) == len(set(keys)) == len(runs) + 2
    assert next(r for r in on_disk if r["attack_id"] == "dfme" and r["seed"] == 0
                and r["configuration"] == "no_defense")["detection"]  # re-scored and written back
    assert any(r["seed"] == 7 and r["cacc"] == 0.123 for r in again["runs"])
