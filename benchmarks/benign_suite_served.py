"""The benign-traffic suite on the SERVED path (issue #26): ordinary clients through a real TorchServe.

    python benchmarks/benign_suite_served.py [--datasets cifar10,imagenet] [--clients NAME,PREFIX*,...]
        [--queries 5000] [--configurations shipped,defense_in_depth] [--concurrency 4] [--seed 0]
        [--calibration-images 1000] [--workdir DIR] [--name STEM] [--out-dir benchmarks/results/benign_suite]
    python benchmarks/benign_suite.py --markdown-from benchmarks/results/benign_suite/STEM.json

The served counterpart of benchmarks/benign_suite.py (its clients, streams and report format). Per dataset:

1. The example's archive as the project builds it: CIFAR-10, the ResNet-56 behind TorchServe's built-in
   ``image_classifier`` handler (examples/cifar10/serving.py: Resize 256 + CenterCrop 224, a wrapper back
   to 32 px), protected with ``guardian protect --input-fit area --calibrate DIR`` (DIR: the first
   ``--calibration-images`` of the detector's calibration split as PNG files, as examples/cifar10/demo.py
   does); ImageNet, the pretrained EfficientNet-Lite0 behind the same handler (examples/imagenet/build.py),
   protected with ``guardian protect --calibrate DIR`` (DIR: the 590 colour photos of
   ../shared/data/imagenet-samples/train.npz, their original JPEG files; the 10 greyscale ones are left
   out, as from the traffic: TorchServe's image_classifier handler cannot normalise them). ``--calibrate`` re-sets the
   thresholds and rebuilds the distribution test's reference on the served path, so the test is on
   (docs/refusal-rule.md section 2). One protected archive per configuration: ``shipped`` (the guard-config
   defaults) and ``defense_in_depth`` (+ probation 200); identity = issued API keys only
   (``identity: {api_key_header: X-Api-Key, missing: reject}``; GUARDIAN_KEY_SECRET, a fresh one per run
   unless set), one key per client and configuration from ``guardian keys issue --archive``.
2. One TorchServe serving the unprotected archive beside the protected ones, 2 workers each, batch_size 8,
   max_batch_delay 10 ms (as the demos serve them). Ledgers (SQLite) are fresh every run; with
   ``--workdir`` the built archives are kept there and reused.
3. Each client sends its images one per request (POST /predictions/<model>, the encoded file as body),
   ``--concurrency`` requests in flight, each query to the unprotected archive and to every protected one
   that has not refused or limited it yet. Clients run one after another.

Traffic: CIFAR-10, the ``test`` split (never the calibration split), the in-process suite's clients
(benign_suite.clients_for) with the same seeded streams as ``benign_suite.py --datasets cifar10``, sent as
PNG files (the pixels the in-process suite scores). ImageNet: the 193 colour photos of imagenet-samples/val.npz
(the archive is calibrated on train.npz, disjoint), at full size; untouched photos are sent as their
original JPEG files, the compression clients as that file re-encoded (JPEG quality 95/75/50/30, PNG), the
other transforms saved as JPEG quality 90 (an editing app's save). The transforms that make sense at full
size (PHOTO_TRANSFORMS): blur radius 1.5 instead of 0.5 px (the handler scales a median 375 px photo to
256 px), no 2 px translation (nothing at full size; ``zoom`` crops). No class-mix clients: the photos
are of as many classes, one each.

Per client and configuration (benign_suite's row format): refused (403) or limited (429), at which query
(the first not answered, in send order) and the denial type; answered queries; DPreds / probation /
unprotected answers, told apart by comparing each answer with the unprotected archive's answer to the
same file (unprotected: the same top-5 values within float tolerance; probation: the unprotected top-1 at
1.0, the rest 0.0; DPreds: ``(p + d) / (1 + K d)`` of the unprotected top-5; anything else is counted
``other_answers``); top-1 equal to the unprotected archive's; the per-sample detector's flagged share
from the archive's ``GuardianFlagged`` / ``GuardianQueries`` metrics (clients run one at a time, so the
counter deltas are the client's): ``counted_flagged_share``, the share of answers the refusal rule counted
as flagged, by the per-sample detector or because the client was suspect (the "flagged" column). Not
visible over HTTP: the per-sample detector's own share (``detector_flagged_share`` None), which rule
refused (rule, window) and whether the distribution test's suspicion tipped it (``mechanism`` is the
denial type, ``via_suspicion`` None), and when the client became suspect: ``all_dpreds_from`` is the first query of the final unbroken run of
at least 20 DPreds answers (a suspect client gets DPreds on every answer), shown as ``~N`` in the
"suspect from" column. The JSON and Markdown are rewritten after every client.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import secrets
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import benign_suite as bs  # noqa: E402
from guardian_plugin import nuisance  # noqa: E402

QUERIES = 5000
STEM = "benign_suite_served"
KEY_HEADER = "X-Api-Key"
WORKERS, BATCH_SIZE, MAX_BATCH_DELAY_MS = 2, 8, 10  # examples/torchserve_demo.serve
DATASET_INDEX = {"cifar10": 0, "imagenet": 1}  # the seed scheme of benign_suite.main (cifar10 alone: 0)
ALL_DPREDS_RUN = 20  # all_dpreds_from: the final unbroken run of DPreds answers must be at least this long

# full-size photos: the in-process transforms that make sense at full size, blur scaled up (module docstring)
PHOTO_TRANSFORMS: Dict[str, Callable] = {
    **{k: bs.TRANSFORMS[k] for k in bs.CODECS},
    "downup0.75": bs.TRANSFORMS["downup0.75"], "downup0.5": bs.TRANSFORMS["downup0.5"],
    "blur1.5": nuisance.blur(1.5),
    **{k: bs.TRANSFORMS[k] for k in ("brightness", "contrast", "saturation", "hue", "hflip", "rotate5", "rotate10",
                                      "zoom", "noise")},
}
PHOTO_SAVE = ("JPEG", {"quality": 90})  # how a transformed photo is sent (a codec client: its own codec)


def _encode(im, fmt: str, kw: dict) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


# ------------------------------------------------------------------------------ the served examples
@dataclass
class Served:
    name: str
    split: str
    images: int
    classes: int
    clients: List[bs.Client]
    bodies: Callable[[bs.Client, int, int], Iterator[bytes]]   # (client, n, seed) -> the request bodies
    build: Callable[[str, str], str]                           # (work, store) -> the unprotected .mar
    calibration: Callable[[str], str]                          # (folder) -> the --calibrate folder
    detector: str
    protect_extra: List[str]


def cifar10_example(seed: int, calibration_images: int) -> Served:
    from examples.cifar10 import serving as cx
    from examples.torchserve_demo import png_bodies

    ds = bs.load_dataset("cifar10")

    def bodies(c, n, s):
        if c.name == ATTACKER:
            return iter(png_bodies(bn_eval_generator_images(n, s, ds.mean, ds.std)))
        return iter(png_bodies(bs.client_images(ds, c, n, s)))

    return Served("cifar10", ds.split + "; sent as PNG files", len(ds.y), 10,
                  bs.clients_for(ds, seed) + [ATTACKER_CLIENT], bodies,
                  lambda work, store: cx.build_served_archive(work, store, name="cifar10"),
                  lambda folder: cx.calibration_folder(folder, calibration_images), cx.DETECTOR,
                  ["--input-fit", "area"])


# the attacker control (CIFAR-10; only when --clients names it): what the suite's benign clients are judged
# beside, and the served-path check of issue #26 that a generator client is refused over HTTP
ATTACKER = "ATTACKER_bn_eval_generator"
ATTACKER_CLIENT = bs.Client(ATTACKER, "NOT BENIGN: an untrained DFME generator (GeneratorA) kept in BatchNorm eval mode "
                                      "(its images are not flagged per sample); must be refused")


def bn_eval_generator_images(n: int, seed: int, mean, std) -> np.ndarray:
    """uint8 (n, 3, 32, 32): a randomly initialised DFME generator in BatchNorm eval mode, its tanh output taken
    as the victim's normalised input and mapped to 8-bit pixels, as an attacker's HTTP client sends it."""
    import torch

    from guardian_plugin.nets import GeneratorA

    torch.manual_seed(seed)
    gen = GeneratorA(nz=256, channels=3, size=32).eval()
    with torch.no_grad():
        x = torch.cat([gen(torch.randn(min(500, n - i), 256)) for i in range(0, n, 500)])
    pix = (x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)).clamp(0, 1)
    return (pix * 255).round().to(torch.uint8).numpy()


def photo_clients() -> List[bs.Client]:
    out = [bs.Client("all", "every photo, as published (the control)")]
    out += [bs.Client(t, f"every photo, transform {t}", transform=t) for t in PHOTO_TRANSFORMS]
    out.append(bs.Client("repeat_one", "one photo, repeated", repeat_one=True))
    out.append(bs.Client("near_dup_bursts", "each photo 5-10 times in a row, each copy with noise sigma 2",
                         burst=(5, 10)))
    return out


def rgb_photos(files: List[bytes], labels: List[int]):
    """The colour photos only: TorchServe's image_classifier handler normalises 3 channels and cannot take
    a greyscale JPEG (17 of the 800; the unprotected archive answers them with an error too)."""
    from PIL import Image

    keep = [i for i, b in enumerate(files) if Image.open(io.BytesIO(b)).mode == "RGB"]
    return [files[i] for i in keep], [labels[i] for i in keep]


def imagenet_example(seed: int, calibration_images: int) -> Served:
    from PIL import Image

    from examples.imagenet import build, serving as ix

    files, labels = rgb_photos(*ix.sample_photos("val"))
    y = np.asarray(labels)
    decoded: Dict[int, Image.Image] = {}

    def photo(i):
        if i not in decoded:
            with Image.open(io.BytesIO(files[i])) as im:
                decoded[i] = im.convert("RGB")
        return decoded[i]

    def bodies(c, n, s):
        rng = np.random.default_rng(s)
        tf = bs.client_transform(c, PHOTO_TRANSFORMS)
        for i in bs.client_indices(y, c, n, rng):
            if c.transform in bs.CODECS:
                yield _encode(photo(i), *bs.CODECS[c.transform])
            elif tf is None:
                yield files[i]
            else:
                yield _encode(tf(photo(i), rng), *PHOTO_SAVE)

    def calibration(folder):
        cal, _ = rgb_photos(*ix.sample_photos("train"))
        os.makedirs(folder, exist_ok=True)
        for i, body in enumerate(cal[:calibration_images]):
            with open(os.path.join(folder, f"train-{i:04d}.jpg"), "wb") as f:
                f.write(body)
        return folder

    def archive(work, store):
        build.victim_step(work)
        return build.archive_step(store, work)

    return Served("imagenet", f"imagenet-samples val.npz ({len(files)} colour photos of as many classes, full size; "
                  "the 7 greyscale ones left out: the handler cannot take them; the archive is calibrated on the "
                  "590 colour photos of train.npz); original JPEG files, re-encoded where transformed", len(files), 1000,
                  photo_clients(), bodies, archive, calibration, ix.DETECTOR, [])


EXAMPLES = {"cifar10": cifar10_example, "imagenet": imagenet_example}


# ------------------------------------------------------------------------------ archives and server
def guard_yaml(path: str, ledger: str, namespace: str, configuration: str) -> str:
    """The guard settings of one configuration: the defaults (+ probation for defense_in_depth), one SQLite
    ledger, issued API keys only."""
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump({"ledger": ledger, "namespace": namespace, **bs.CONFIGURATIONS[configuration],
                        "identity": {"api_key_header": KEY_HEADER, "missing": "reject"}}, f)
    return path


def prepare(ex: Served, work: str, configurations: List[str], calibrated: bool) -> dict:
    """The unprotected and protected archives in ``work``/store (reused when there), fresh ledgers."""
    from examples.cifar10.serving import embedded_calibration
    from examples.torchserve_demo import protect_archive

    store = os.path.join(work, "store")
    os.makedirs(store, exist_ok=True)
    mar = os.path.join(store, f"{ex.name}.mar")
    if not os.path.exists(mar):
        os.makedirs(os.path.join(work, "build"), exist_ok=True)
        built = ex.build(os.path.join(work, "build"), store)
        assert os.path.abspath(built) == os.path.abspath(mar), built
    folder = os.path.join(work, "calibration")
    out = {"models": {"unprotected": ex.name}, "calibration": {}, "ledgers": {}, "distribution_test": {}}
    for conf in configurations:
        model = f"{ex.name}_{conf}"
        ledger = os.path.join(work, f"ledger-{model}.db")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(ledger + suffix):
                os.remove(ledger + suffix)
        protected = os.path.join(store, f"{model}.mar")
        if not os.path.exists(protected):
            if calibrated and not os.path.isdir(folder):
                ex.calibration(folder + ".tmp")
                os.replace(folder + ".tmp", folder)
            cfg = guard_yaml(os.path.join(work, f"guard-{conf}.yaml"), f"sqlite:///{ledger}", model, conf)
            protect_archive(mar, ex.detector, cfg, protected, ex.protect_extra + (["--calibrate", folder] if calibrated else []),
                            log=protected + ".protect.log")
        out["models"][conf] = model
        with open(protected + ".protect.log") as f:  # what `guardian protect` said about the distribution test
            out["distribution_test"][conf] = next((line.split(":", 1)[1].strip() for line in f
                                                   if line.startswith("distribution test:")), None)
        out["calibration"][conf] = embedded_calibration(protected)
        out["ledgers"][conf] = ledger
    return out


def issue_key(archive: str, client_id: str) -> str:
    """`guardian keys issue --archive ARCHIVE --client-id ID --json` (GUARDIAN_KEY_SECRET from the environment)."""
    import contextlib

    from guardian_plugin.cli import main as cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli(["keys", "issue", "--archive", archive, "--client-id", client_id, "--owner", "benign suite", "--json"])
    if rc not in (0, None):
        raise RuntimeError(f"guardian keys issue failed ({rc}): {buf.getvalue()}")
    return json.loads(buf.getvalue())["key"]


def guard_counters(text: str, model: str) -> Dict[str, float]:
    """GuardianQueries / GuardianFlagged of ``model`` in TorchServe's Prometheus metrics text (0 when absent)."""
    out = {"GuardianQueries": 0.0, "GuardianFlagged": 0.0}
    for name in out:
        m = re.search(rf'^{name}{{[^}}]*ModelName="{re.escape(model)}"[^}}]*}} ([0-9.eE+-]+)$', text, re.M)
        if m:
            out[name] = float(m.group(1))
    return out


# ------------------------------------------------------------------------------ answers
def _close(a, b) -> bool:
    return abs(a - b) <= 1e-4 + 1e-3 * abs(b)


def answer_kind(answer: dict, plain: dict, classes: int, d: float) -> str:
    """``plain``, ``probation``, ``dpreds`` or ``other``: a protected archive's ImageClassifier answer
    (``{label: probability}``, top 5) against the unprotected archive's answer to the same file."""
    keys, vals = list(answer), list(answer.values())
    top = max(plain, key=plain.get)
    common = [k for k in answer if k in plain]
    if keys[0] == top and vals[0] == 1.0 and all(v == 0.0 for v in vals[1:]):
        return "probation"
    if common and all(_close(answer[k], plain[k]) for k in common):
        return "plain"
    if common and all(_close(answer[k], (plain[k] + d) / (1 + classes * d)) for k in common):
        return "dpreds"
    return "other"


def run_client(ts, ex: Served, setup: dict, c: bs.Client, n: int, seed: int, concurrency: int, d: float,
               progress=None) -> Dict[str, dict]:
    """Client ``c``'s ``n`` queries to the unprotected archive and every protected one; one row per configuration."""
    import requests

    confs = [k for k in setup["models"] if k != "unprotected"]
    keys = {conf: issue_key(os.path.join(ts.model_store, f"{setup['models'][conf]}.mar"), c.name) for conf in confs}
    before = {conf: guard_counters(ts.metrics(), setup["models"][conf]) for conf in confs}
    status: Dict[str, Dict[int, int]] = {conf: {} for conf in confs}
    kinds: Dict[str, Dict[int, str]] = {conf: {} for conf in confs}
    same: Dict[str, Dict[int, bool]] = {conf: {} for conf in confs}
    denial: Dict[str, Dict[int, str]] = {conf: {} for conf in confs}
    stopped = {conf: None for conf in confs}   # the first query (0-based) seen not answered
    lock, local = threading.Lock(), threading.local()
    errors: List[str] = []

    def post(model, body, headers=None):
        s = getattr(local, "s", None)
        if s is None:
            s = local.s = requests.Session()
        return s.post(f"{ts.url}/predictions/{model}", data=body, headers=headers or {}, timeout=300)

    def one(i, body):
        r = post(setup["models"]["unprotected"], body)
        if r.status_code != 200:
            with lock:
                errors.append(f"query {i + 1}: the unprotected archive answered {r.status_code}: {r.text[:200]}")
            return
        plain = json.loads(r.text)
        for conf in confs:
            with lock:
                if stopped[conf] is not None and stopped[conf] < i:
                    continue
            a = post(setup["models"][conf], body, {KEY_HEADER: keys[conf]})
            with lock:
                status[conf][i] = a.status_code
                if a.status_code == 200:
                    ans = json.loads(a.text)
                    kinds[conf][i] = answer_kind(ans, plain, ex.classes, d)
                    same[conf][i] = max(ans, key=ans.get) == max(plain, key=plain.get)
                else:
                    try:
                        denial[conf][i] = json.loads(a.text).get("type", str(a.status_code))
                    except ValueError:
                        denial[conf][i] = a.text[:80]
                    if stopped[conf] is None or i < stopped[conf]:
                        stopped[conf] = i

    t0 = time.time()
    gate = threading.Semaphore(concurrency)
    with ThreadPoolExecutor(concurrency) as pool:
        futures = []
        for i, body in enumerate(ex.bodies(c, n, seed)):
            if all(v is not None for v in stopped.values()):
                break
            gate.acquire()
            f = pool.submit(one, i, body)
            f.add_done_callback(lambda _: (gate.release(), progress.update(1) if progress else None))
            futures.append(f)
        for f in futures:
            f.result()
    seconds = time.time() - t0
    if errors:
        raise RuntimeError(f"{c.name}: " + "; ".join(errors[:5]))
    rows = {}
    for conf in confs:
        model = setup["models"][conf]
        answered = sorted(i for i, s in status[conf].items() if s == 200)
        deadline, after = time.time() + 30, before[conf]
        while time.time() < deadline:  # the workers' metric lines reach the frontend asynchronously
            after = guard_counters(ts.metrics(), model)
            if after["GuardianQueries"] - before[conf]["GuardianQueries"] >= len(answered):
                break
            time.sleep(0.5)
        counted = int(after["GuardianQueries"] - before[conf]["GuardianQueries"])
        flagged = int(after["GuardianFlagged"] - before[conf]["GuardianFlagged"])
        k = kinds[conf]
        dp = [i for i in answered if k[i] == "dpreds"]
        pr = [i for i in answered if k[i] == "probation"]
        run_from = None
        for i in reversed(answered):
            if k[i] != "dpreds":
                break
            run_from = i
        if run_from is not None and sum(1 for i in answered if i >= run_from) < ALL_DPREDS_RUN:
            run_from = None
        first = stopped[conf]
        refusal = None
        if first is not None:
            refusal = {"at_query": first + 1, "answered_before": sum(1 for i in answered if i < first),
                       "status": status[conf][first], "mechanism": denial[conf][first], "via_suspicion": None}
        a = len(answered)
        rows[conf] = {
            "client": c.name, "configuration": conf, "sent": len(status[conf]), "answered": a,
            "refused": refusal is not None, "refusal": refusal,
            "answered_after_refusal": sum(1 for i in answered if first is not None and i > first),
            # GuardianFlagged counts the rows the refusal rule counted: the detector's or a suspect client's
            "detector_flagged": None, "detector_flagged_share": None,
            "counted_flagged": flagged if counted == a else None,
            "counted_flagged_share": round(flagged / a, 4) if a and counted == a else None,
            "metrics_queries": counted,
            "first_suspect_query": None, "all_dpreds_from": run_from + 1 if run_from is not None else None,
            "suspect_answers": None,
            "dpreds_answers": len(dp), "dpreds_share": round(len(dp) / a, 4) if a else None,
            "first_dpreds_query": dp[0] + 1 if dp else None,
            "probation_answers": len(pr), "last_probation_query": pr[-1] + 1 if pr else None,
            "other_answers": sum(1 for i in answered if k[i] == "other"),
            "top1_equal": sum(same[conf][i] for i in answered),
            "top1_equal_share": round(sum(same[conf][i] for i in answered) / a, 4) if a else None,
            "seconds": round(seconds, 1), "client_queries_per_s": round(max(len(s) for s in status.values()) / seconds, 2),
        }
    return rows


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="cifar10,imagenet")
    ap.add_argument("--clients", default=None, help="comma-separated names or shell patterns (class*, jpeg*)")
    ap.add_argument("--configurations", default=",".join(bs.CONFIGURATIONS))
    ap.add_argument("--queries", type=int, default=QUERIES, help=f"queries per client (default {QUERIES:,})")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight per client (default 4)")
    ap.add_argument("--calibration-images", type=int, default=1000,
                    help="CIFAR-10: calibration-split images for `guardian protect --calibrate` (default 1,000, as "
                         "the demo); ImageNet: colour photos of train.npz (at most 590, all by default); 0: no --calibrate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="keep (and reuse) the archives here (default: a temporary dir)")
    ap.add_argument("--out-dir", default=bs.OUT_DIR)
    ap.add_argument("--name", default=None, help=f"report file stem (default {STEM})")
    args = ap.parse_args(argv)
    import tempfile

    import torch
    from tqdm import tqdm

    from guardian_plugin.config import ResponseConfig
    from guardian_plugin.devserver.torchserve import TorchServe

    torch.set_num_threads(1)
    confs = args.configurations.split(",")
    bad = [c for c in confs if c not in bs.CONFIGURATIONS]
    if bad:
        raise SystemExit(f"--configurations: unknown {bad}; known: {', '.join(bs.CONFIGURATIONS)}")
    unknown = [d for d in args.datasets.split(",") if d not in EXAMPLES]
    if unknown:
        raise SystemExit(f"--datasets: unknown {unknown}; known: {', '.join(EXAMPLES)}")
    os.environ.setdefault("GUARDIAN_KEY_SECRET", secrets.token_hex(32))
    patterns = args.clients.split(",") if args.clients else None
    d = ResponseConfig().d
    work_root = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="guardian-benign-served-"))
    t0 = time.time()
    result = {"benchmark": STEM, "title": "served through TorchServe",
              "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
              "git_commit": bs._git("rev-parse", "HEAD"), "dirty": bool(bs._git("status", "--porcelain", "--untracked-files=no")),
              "seed": args.seed, "quick": False, "configurations": {c: bs.CONFIGURATIONS[c] for c in confs},
              "how": f"1 image per request over HTTP (the encoded file), {args.concurrency} requests in flight per client, "
                     f"clients one after another; a real TorchServe, {WORKERS} workers per model, batch_size {BATCH_SIZE}, "
                     f"max_batch_delay {MAX_BATCH_DELAY_MS} ms; issued API keys, one per client",
              "configurations_text": "`shipped` = `guardian protect --calibrate` with the guard-config defaults (rule tau auto / "
                                     "rho 0.5, window 200 / 0.3, quota 10,000 + 1,000 flagged per day, the distribution test on "
                                     "with the reference rebuilt on the served path, probation off); `defense_in_depth` = the "
                                     "same + probation 200.",
              "columns_text": "refused at query (the first query not answered, in send order; the denial type: which rule "
                              "and whether suspicion tipped it is not visible over HTTP), flagged (the share of answers "
                              "counted as flagged, by the detector or the distribution test's suspicion: the archive's "
                              "GuardianFlagged / GuardianQueries metrics; the detector's own share is not visible over HTTP), suspect from (`~N`: the final unbroken "
                              "run of DPreds answers starts at N), DPreds share, probation answers (both read from the "
                              "answers against the unprotected archive's), top-1 equal to the unprotected archive's.",
              "torch": torch.__version__, "cpus": os.cpu_count(), "datasets": {}}
    for name in args.datasets.split(","):
        ex = EXAMPLES[name](args.seed, args.calibration_images)
        every = ex.clients
        # the attacker control runs only when named
        cl = bs.select(every, patterns) if patterns else [c for c in every if c.name != ATTACKER]
        work = os.path.join(work_root, name)
        setup = prepare(ex, work, confs, calibrated=args.calibration_images > 0)
        ts = TorchServe(os.path.join(work, "store"), os.path.join(work, "server"),
                        env={"GUARDIAN_KEY_SECRET": os.environ["GUARDIAN_KEY_SECRET"], "GUARDIAN_TORCH_THREADS": "1"}).start()
        dd = result["datasets"][name] = {
            "split": ex.split, "images": ex.images, "queries": args.queries, "clients": {},
            "served_calibration": {c: ({k: v for k, v in r.items() if k != "thresholds_before"} if r else None)
                                   for c, r in setup["calibration"].items()},
            "distribution_test": setup["distribution_test"], "archives": setup["models"], "workdir": work}
        try:
            for model in setup["models"].values():
                ts.register(f"{model}.mar", model, workers=WORKERS, batch_size=BATCH_SIZE,
                            max_batch_delay_ms=MAX_BATCH_DELAY_MS)
            for c in cl:
                seed = args.seed * 1000 + DATASET_INDEX[name] * 100 + [e.name for e in every].index(c.name)
                with tqdm(total=args.queries, desc=f"{name} {c.name}", unit="q", leave=False) as bar:
                    rows = run_client(ts, ex, setup, c, args.queries, seed, args.concurrency, d, bar)
                entry = dd["clients"].setdefault(c.name, {"what": c.what, "transform": c.transform})
                for conf, r in rows.items():
                    r["seed"] = seed
                    entry[conf] = r
                    tqdm.write(f"{name} {c.name:16s} {conf:17s} answered {r['answered']:5d} "
                               f"{'REFUSED at ' + str(r['refusal']['at_query']) + ' (' + str(r['refusal']['status']) + ' ' + r['refusal']['mechanism'] + ')' if r['refused'] else 'never refused'}; "
                               f"counted flagged {r['counted_flagged_share']}, all DPreds from {r['all_dpreds_from']}, DPreds {r['dpreds_share']}, "
                               f"probation {r['probation_answers']}, other {r['other_answers']}, top-1 eq {r['top1_equal_share']} "
                               f"({r['seconds']} s, {r['client_queries_per_s']} client queries/s)")
                bs.write(result, args, t0, done=False, default_stem=STEM)
        except Exception:
            print(ts.log_tail(60))
            raise
        finally:
            ts.stop()
    bs.write(result, args, t0, done=True, default_stem=STEM)
    if not args.workdir:
        shutil.rmtree(work_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
