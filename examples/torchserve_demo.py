"""What the TorchServe demos (`python -m examples.mnist.demo`, `python -m examples.cifar10.demo`) share:
the guard settings, the `guardian protect` step, benign accuracy from ImageClassifier answers, the
ledger's view of each client and the printed summary."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import yaml
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULE = "{tau: auto, rho: 0.5}"


def png(a: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def png_bodies(x: np.ndarray) -> List[bytes]:
    """uint8 (N, 3, H, W) -> one PNG per image, as a client sends them."""
    return [png(np.ascontiguousarray(a.transpose(1, 2, 0))) for a in x]


def handler_preprocess(bodies: Sequence[bytes]):
    """What TorchServe's built-in image_classifier handler gives the model for these request bodies: its
    own transform (Resize 256, CenterCrop 224, ToTensor, ImageNet Normalize) on the decoded images."""
    import torch
    from ts.torch_handler.image_classifier import ImageClassifier

    return torch.stack([ImageClassifier.image_processing(Image.open(io.BytesIO(b))) for b in bodies])


def add_common_args(ap) -> None:
    """The options every demo takes."""
    ap.add_argument("--attack-budget", type=int, default=4000, help="DFME query budget (it is refused long before)")
    ap.add_argument("--workdir", default=None, help="where the archives, server logs and ledger go (default: temp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")


def workdir(path: Optional[str], prefix: str, namespace: str) -> Tuple[str, str, str, str]:
    """(work dir, model store, ledger URI, guard.yaml) of one demo run; a temp dir unless ``path``."""
    import tempfile

    work = os.path.abspath(path or tempfile.mkdtemp(prefix=prefix))
    store = os.path.join(work, "model-store")
    os.makedirs(store, exist_ok=True)
    ledger_uri = f"sqlite:///{work}/ledger.db"
    return work, store, ledger_uri, write_guard_yaml(os.path.join(work, "guard.yaml"), ledger_uri, namespace)


def serve(store: str, work: str, names: Sequence[str]):
    """A started TorchServe serving ``names`` (NAME.mar in ``store``), 2 workers each, batching on."""
    from guardian_plugin.devserver.torchserve import TorchServe

    ts = TorchServe(store, os.path.join(work, "server"))
    ts.start()
    try:
        for name in names:
            ts.register(f"{name}.mar", name, workers=2, batch_size=8, max_batch_delay_ms=10)
    except Exception:
        ts.stop()
        raise
    return ts


def write_guard_yaml(path: str, ledger_uri: str, namespace: str) -> str:
    """The demo's guard settings: one SQLite ledger, the default rule and DPreds, clients named by
    X-Client-Id (anonymous requests served, never refused)."""
    with open(path, "w") as f:
        f.write(f"ledger: {ledger_uri}\nnamespace: {namespace}\nrule: {RULE}\n"
                "response: {policy: dpreds, d: 0.5}\nidentity: {headers: [X-Client-Id], missing: anonymous}\n")
    return path


def protect_archive(mar: str, detector: str, guard_yaml: str, out: str, extra: Sequence[str] = (),
                    log: Optional[str] = None) -> str:
    """`guardian protect` as a user runs it (a subprocess), printing the command; its output goes to the
    file ``log`` when given (else nowhere)."""
    cmd = [sys.executable, "-m", "guardian_plugin.cli", "protect", mar, "--detector", detector,
           "--config", guard_yaml, "-o", out, *extra]
    shown = os.path.relpath(detector, ROOT) if os.path.abspath(detector).startswith(ROOT + os.sep) else detector
    print(f"      guardian protect {os.path.basename(mar)} --detector {shown} "
          f"--config guard.yaml -o {os.path.basename(out)} {' '.join(extra)}".rstrip(), flush=True)
    if log is None:
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    else:
        with open(log, "w") as f:
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=f)
    return out


def accuracy(responses, labels: Sequence[int], names: Optional[Sequence[str]] = None) -> float:
    """Top-1 accuracy of ImageClassifier answers (``{label: probability}``); a non-200 answer is wrong.
    ``names``: the archive's index_to_name labels (default: the class indices as strings)."""
    ok = 0
    for r, y in zip(responses, labels):
        if r.status_code == 200:
            probs = json.loads(r.text)
            ok += max(probs, key=probs.get) == (names[y] if names is not None else str(y))
    return ok / len(labels)


def send_with_progress(target, bodies: List[bytes], desc: str, chunk: int = 64) -> list:
    """``target.send`` in chunks, with a tqdm bar."""
    from tqdm import tqdm

    out = []
    with tqdm(total=len(bodies), desc=desc, unit="img", leave=False) as bar:
        for i in range(0, len(bodies), chunk):
            out += target.send(bodies[i:i + chunk])
            bar.update(len(bodies[i:i + chunk]))
    return out


def ledger_summary(guard_yaml: str, ledger_uri: str, namespace: str, attack_target, attack_result,
                   benign: str = "benign-user", attacker: str = "attacker") -> dict:
    """The ledger's counts of the benign client and the attacker, and the attack's outcome."""
    from guardian_plugin.config import RuleConfig
    from guardian_plugin.ledger import open_ledger

    with open(guard_yaml) as f:
        rule_cfg = RuleConfig.model_validate(yaml.safe_load(f)["rule"])
    ledger = open_ledger(ledger_uri, rule_cfg.to_rule(), namespace)
    att, ben = ledger.get(attacker), ledger.get(benign)
    return {
        "benign_queries": ben.queries,
        "benign_flagged_share": ben.flagged / max(ben.queries, 1),
        "benign_refused": ben.refused,
        "attacker_queries_answered": att.queries,
        "attacker_flagged_share": att.flagged / max(att.queries, 1),
        "attacker_refused": att.refused,
        "attacker_refused_at_query": att.refused_at_query,
        "attacker_first_403_after": attack_target.refused_at,
        "attacker_clone_accuracy": attack_result.clone_accuracy,
        "rule": {"tau": rule_cfg.resolve_tau(), "rho": rule_cfg.rho},
    }


def print_summary(title: str, s: dict, benign_what: str, extra: Iterable[Tuple[str, str]] = ()) -> None:
    """The demos' summary: benign accuracy through both endpoints, ``extra`` (label, text) lines, then
    the attacker's flagged share, refusal and clone accuracy."""
    def line(label: str, text: str) -> None:
        print(f"  {label:<38}: {text}")

    print()
    print(title)
    line("benign accuracy, unprotected endpoint", f"{s['benign_accuracy_unprotected']:.3f} ({benign_what})")
    line("benign accuracy, protected endpoint", f"{s['benign_accuracy_protected']:.3f} "
         f"(flagged {s['benign_flagged_share']:.1%} of its {s['benign_queries']} queries, "
         f"refused: {'yes' if s['benign_refused'] else 'no'})")
    for label, text in extra:
        line(label, text)
    line("attacker (DFME) flagged share",
         f"{s['attacker_flagged_share']:.1%} of {s['attacker_queries_answered']} answered queries")
    if s["attacker_refused"]:
        line("attacker refused at query", f"{s['attacker_refused_at_query']} (rule: refuse once queries >= "
             f"tau={s['rule']['tau']} and flagged share > {s['rule']['rho']}); its first HTTP 403 came after "
             f"{s['attacker_first_403_after']} answers")
    else:
        line("attacker refused", "no (budget exhausted first)")
    line("attacker's clone accuracy", f"{s['attacker_clone_accuracy']:.3f} (trained on what it got)")


def finish(work: str, keep: bool, summary: dict) -> None:
    """Write demo-summary.json, print the total time, and remove a temporary work directory."""
    import shutil

    with open(os.path.join(work, "demo-summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if keep:
        print(f"  {'total time':<38}: {summary['total_seconds']:.0f} s; details in {work}/demo-summary.json")
    else:
        shutil.rmtree(work, ignore_errors=True)
        print(f"  {'total time':<38}: {summary['total_seconds']:.0f} s")
