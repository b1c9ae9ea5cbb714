"""``guardian train-detector``: the offline pipeline that builds a DFMS-Detector artifact.

1. real images in three disjoint splits: train (the real class), calibrate (thresholds), evaluate
2. synthetic sources (cached by their settings), each split into train / test; with ``synthetic_jpeg``
   every synthetic image first goes through that JPEG round trip, like the real images of a JPEG data set;
   with ``served_view`` every real and synthetic image then goes through the served model's Resize +
   CenterCrop (what the guard sees behind TorchServe's image_classifier handler)
3. transformation models (the discriminator is a GAN trained here on the defender's data)
4. one sub-detector per source: equal numbers of real and synthetic training images, augmentation
   before the transform, Adam with a step decay
5. thresholds: the largest common per-sub-detector quantile level whose ENSEMBLE false-positive rate
   is at most ``target_fpr`` on every calibration group
6. report.json (DAcc per source and sub-detector, FPR per held-out real group, ROC-AUC), roc.png,
   and the artifact directory that Guardian.from_artifact loads
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from guardian_plugin.detector import (HEAD_ARCH, Detector, DetectorSpec, Head, ImageSpec, InputMapping, PatchSpec,
                                      SubDetector, SubDetectorSpec, Trunk, TrunkSpec, calibrate, format_version_for,
                                      save_detector)
from guardian_plugin.training.augment import augment, jpeg_roundtrip, random_crops
from guardian_plugin.training.common import resolve_device, seed_everything
from guardian_plugin.training.config import RealEntry, TrainConfig
from guardian_plugin.training.data import (cifar10_split, foolbox_samples, image_folder, mnist_splits, normalise,
                                          photo_crops, served_view, to_float, to_uint8)
from guardian_plugin.training.sources import SourceContext, build_source, uses_victim
from guardian_plugin.transform import TransformContext, TransformModel, build_transform, estimate_scale

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ data
def load_real(e: RealEntry, cfg: TrainConfig, base_dir: str) -> np.ndarray:
    """A real entry's images as the detector will see them: at the config's size, or with ``served_view``
    loaded at its ``resize`` (whole files and the foolbox samples: at their own size) and then through
    the served view (Resize + CenterCrop), which leaves them at the config's size."""
    view = (cfg.served_view.resize, cfg.served_view.crop) if cfg.served_view else None
    size = view[0] if view else cfg.size
    if e.kind == "mnist":
        if cfg.channels != 1 or size != 28:
            raise ValueError(f"real entry {e.name!r}: mnist is 1 x 28 x 28, the config says {cfg.channels} x {size}")
        x = mnist_splits(seed=0)[e.split or "train"][0]
    elif e.kind == "photos":
        x = photo_crops(e.group or "train", e.n or 1000, size, cfg.channels, seed=e.seed, min_side=e.min_side)
    elif e.kind == "folder":
        return _first(image_folder(_path(e.path, base_dir), cfg.size, cfg.channels, view=view), e)
    elif e.kind == "foolbox":
        return _first(foolbox_samples(e.group, cfg.size, cfg.channels, view=view), e)
    else:  # cifar10: a named split of the shared copy
        x = cifar10_split(e.split)[0]
        if cfg.channels == 1:
            x = to_uint8(to_float(x).mean(1, keepdim=True))
        if size != 32:
            x = to_uint8(F.interpolate(to_float(x), size=(size, size), mode="bilinear", antialias=True))
    return as_served(_first(x, e), cfg)


def _first(x: np.ndarray, e: RealEntry) -> np.ndarray:
    """The entry's ``range`` and then its first ``n`` (photos: ``n`` is how many crops were drawn)."""
    if e.range is not None:
        x = x[e.range[0]:e.range[1]]
    if e.n is not None and e.kind != "photos":
        x = x[: e.n]
    return x


def as_served(x: np.ndarray, cfg: TrainConfig) -> np.ndarray:
    """Images through the config's served view, when it has one (synthetic images: generated at the
    config's size, as an attacker sends them; real ones: loaded at the view's ``resize``)."""
    return served_view(x, cfg.served_view.resize, cfg.served_view.crop) if cfg.served_view else x


def _path(p: str | None, base_dir: str) -> str:
    if not p:
        raise ValueError("a path is required")
    return p if os.path.isabs(p) else os.path.join(base_dir, p)


def jpeg_images(x: np.ndarray, quality: int) -> np.ndarray:
    """uint8 (N, C, H, W) images through one JPEG round trip at ``quality`` (PIL, 4:2:0 chroma subsampling:
    the same quantisation tables and subsampling as the CIFAR-10 JPEG files at quality 75)."""
    return np.stack([to_uint8(jpeg_roundtrip(img, quality)) for img in to_float(x)]) if len(x) else x


def source_splits(x: np.ndarray, cfg: TrainConfig) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A source's images (after its JPEG round trip) as (train, validation, test): one seeded
    permutation, ``test_fraction`` and ``val_fraction`` of it held out. Reports rebuild the same splits."""
    perm = np.random.RandomState(cfg.seed).permutation(len(x))
    n_test = int(round(len(x) * cfg.test_fraction))
    n_val = int(round(len(x) * cfg.val_fraction))
    return x[perm[n_test + n_val:]], x[perm[n_test:n_test + n_val]], x[perm[:n_test]]


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _entry_key(e: RealEntry) -> dict:
    """A real entry's settings for cache keys; ``min_side`` only when set, so that the keys of configs
    written before it existed (and their cached sources) stay the same."""
    d = e.model_dump()
    if d.get("min_side") is None:
        d.pop("min_side", None)
    return d


def source_cache_key(cfg: TrainConfig, source, victim_hash: Optional[str]) -> str:
    """Everything a source's images depend on: its settings, the seed, the generative data and image
    size, and the victim's weights only for sources that query the victim (a new victim regenerates
    the dfme source, not the GAN or diffusion ones)."""
    key = {"kind": source.kind, "n": source.n, "params": source.params, "seed": cfg.seed,
           "victim": victim_hash if uses_victim(source.kind) else None,
           "data": [_entry_key(e) for e in cfg.real.train if e.name == cfg.generative_data],
           "size": cfg.size, "channels": cfg.channels}
    if cfg.served_view is not None:  # the generative data went through it (absent otherwise: keys made before it stay)
        key["served_view"] = cfg.served_view.model_dump()
    return _hash(key)


def source_cache_path(cfg: TrainConfig, base_dir: str, name: str, victim_hash: Optional[str]) -> str:
    """Where source ``name``'s images are cached (the config's cache folder, keyed by source_cache_key)."""
    return os.path.join(_path(cfg.cache, base_dir), f"source-{name}-{source_cache_key(cfg, cfg.sources[name], victim_hash)}.npz")


def victim_file_hash(cfg: TrainConfig, base_dir: str) -> Optional[str]:
    return _file_hash(_path(cfg.victim.weights, base_dir)) if cfg.victim else None


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()[:12]


def load_victim(cfg: TrainConfig, base_dir: str, device) -> torch.nn.Module:
    from guardian_plugin.nets import build_classifier

    path = _path(cfg.victim.weights, base_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"victim weights {path} are missing (train the victim first)")
    m = build_classifier(cfg.victim.arch, in_channels=cfg.channels, num_classes=cfg.victim.num_classes,
                         image_size=cfg.size, **cfg.victim.arch_params)
    m.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return m.eval().to(device)


# --------------------------------------------------------------------------------- training
def scores_of(detector: Detector, x, batch: int = 256, device="cpu") -> np.ndarray:
    """(N, K) sub-detector logits for uint8 pixel images (numpy) or [0, 1] pixel tensors."""
    out = []
    for k in range(0, len(x), batch):
        xb = to_float(x[k:k + batch]) if isinstance(x, np.ndarray) else x[k:k + batch].float()
        out.append(detector.scores(xb.to(device)).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, len(detector.subs)), np.float32)


def _batch_reps(transform: TransformModel, x: np.ndarray, idx: torch.Tensor, views: Optional[List[torch.Tensor]],
                ep: int, d, gen: torch.Generator, device) -> torch.Tensor:
    """The training representations of images ``x[idx]`` in epoch ``ep``: augmented pixels through the
    transform (or the epoch's precomputed view, cropped and flipped), then with ``d.patch`` one random
    P x P crop of each at native resolution.

    The transform runs on the WHOLE image and the patch is cut from its output, as at inference: a
    gradient transform (discriminator, victim) is a function of the whole image, and the NPR residual
    x - up(down(x)) is only the same as on the whole image when the 2 x 2 grid it down-samples on is the
    image's own; a crop at an odd offset would shift that grid and see another residual. For NPR the
    whole-image residual costs a few element-wise passes, nothing beside the sub-detector."""
    if views is not None:  # crop / flip the stored representation of this epoch's view
        geometric = d.augment.model_copy(update={"blur": 0.0, "jpeg": 0.0})
        rep = augment(views[ep % len(views)][idx].float(), geometric, gen).to(device)
    else:
        rep = transform(augment(to_float(x[idx.numpy()]), d.augment, gen).to(device))
    if d.patch is not None:
        rep = random_crops(rep, d.patch.size, d.patch.size, gen)
    return rep.contiguous(memory_format=torch.channels_last) if _channels_last(d) else rep


def _channels_last(d) -> bool:
    """The new shapes (patches, a shared trunk) train and run channels-last (faster convolutions on CPU)."""
    return d.patch is not None or d.shared_trunk


def _optimiser(params, d):
    opt = torch.optim.Adam(params, lr=d.lr)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=d.lr_step, gamma=d.lr_gamma)


def train_subdetector(name: str, transform: TransformModel, real: np.ndarray, fake: np.ndarray, cfg: TrainConfig,
                      device, seed: int, progress: bool = True) -> Tuple[SubDetector, List[dict]]:
    d = cfg.detector
    seed_everything(seed)
    size = d.patch.size if d.patch is not None else cfg.size
    sub = SubDetector(d.arch, transform.out_channels or cfg.channels, size, **d.arch_params).to(device)
    if _channels_last(d):
        sub = sub.to(memory_format=torch.channels_last)
    opt, sched = _optimiser(sub.parameters(), d)
    x = np.concatenate([real, fake])
    y = torch.cat([torch.zeros(len(real)), torch.ones(len(fake))])
    gen = torch.Generator().manual_seed(seed)
    views = _precomputed_views(transform, x, d, gen, device, name, progress) if d.precompute else None
    hist = []
    bar = tqdm(range(d.epochs), desc=f"sub-detector {name}", disable=not progress)
    for ep in bar:
        sub.train()
        perm = torch.randperm(len(x), generator=gen)
        tot = correct = 0
        loss_sum = 0.0
        for k in range(0, len(x), d.batch_size):
            idx = perm[k:k + d.batch_size]
            logit = sub(_batch_reps(transform, x, idx, views, ep, d, gen, device))
            yb = y[idx].to(device)
            loss = F.binary_cross_entropy_with_logits(logit, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += int(((logit > 0).float() == yb).sum())
            tot += len(idx)
        sched.step()
        hist.append({"epoch": ep + 1, "loss": loss_sum / tot, "train_accuracy": correct / tot})
        bar.set_postfix(loss=f"{loss_sum / tot:.4f}", acc=f"{correct / tot:.3f}")
    return sub.eval(), hist


def train_shared_trunk(tname: str, transform: TransformModel, real: np.ndarray, fakes: Dict[str, np.ndarray],
                       cfg: TrainConfig, device, seed: int, progress: bool = True
                       ) -> Tuple[Trunk, Dict[str, Head], Dict[str, List[dict]]]:
    """One trunk on transform ``tname`` and a linear head per source of ``fakes``, trained jointly.

    Every step holds ``batch_size / 2`` real images, the negatives of EVERY head, and
    ``batch_size / (2 K)`` images of each of the K sources, the positives of that source's head only (no
    head is trained to call another source's images real or fake). Each head's loss is half the mean over
    the real images and half the mean over its own source's, so it stays balanced whatever K is; the loss
    is the mean over heads. An epoch runs until the largest of those sets has been seen once (the smaller
    ones cycle). Returns (trunk, heads by source, per-source history: joint loss, that head's accuracy)."""
    d = cfg.detector
    seed_everything(seed)
    names = list(fakes)
    size = d.patch.size if d.patch is not None else cfg.size
    trunk = Trunk(d.arch, transform.out_channels or cfg.channels, size, **d.arch_params).to(device)
    trunk = trunk.to(memory_format=torch.channels_last)
    fused = torch.nn.Linear(trunk.out_features, len(names)).to(device)
    opt, sched = _optimiser(list(trunk.parameters()) + list(fused.parameters()), d)
    x = np.concatenate([real] + [fakes[n] for n in names])
    starts = np.cumsum([0, len(real)] + [len(fakes[n]) for n in names])
    groups = [torch.arange(starts[g], starts[g + 1]) for g in range(len(names) + 1)]  # 0: real, k + 1: source k
    per_step = [max(1, d.batch_size // 2)] + [max(1, d.batch_size // (2 * len(names)))] * len(names)
    steps = max(-(-len(g) // b) for g, b in zip(groups, per_step))
    gen = torch.Generator().manual_seed(seed)
    views = _precomputed_views(transform, x, d, gen, device, tname, progress) if d.precompute else None
    hist: Dict[str, List[dict]] = {n: [] for n in names}
    bar = tqdm(range(d.epochs), desc=f"trunk {tname} ({', '.join(names)})", disable=not progress)
    for ep in bar:
        trunk.train()
        perms = [g[torch.randperm(len(g), generator=gen)] for g in groups]
        loss_sum, right, seen = 0.0, np.zeros(len(names)), np.zeros(len(names))
        for step in range(steps):
            picks = [p[(step * b + torch.arange(b)) % len(p)] for p, b in zip(perms, per_step)]
            logits = fused(trunk(_batch_reps(transform, x, torch.cat(picks), views, ep, d, gen, device)))
            n_real = per_step[0]
            real_logits = logits[:n_real]
            real_loss = F.binary_cross_entropy_with_logits(real_logits, torch.zeros_like(real_logits), reduction="none").mean(0)
            own, off = [], n_real
            for k, b in enumerate(per_step[1:]):
                own.append(logits[off:off + b, k])
                off += b
            fake_loss = torch.stack([F.binary_cross_entropy_with_logits(o, torch.ones_like(o)) for o in own])
            loss = 0.5 * (real_loss + fake_loss).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += loss.item()
            with torch.no_grad():
                right += (real_logits <= 0).sum(0).cpu().numpy() + np.array([int((o > 0).sum()) for o in own])
                seen += n_real + np.array(per_step[1:])
        sched.step()
        for k, n in enumerate(names):
            hist[n].append({"epoch": ep + 1, "loss": loss_sum / steps, "train_accuracy": float(right[k] / seen[k])})
        bar.set_postfix(loss=f"{loss_sum / steps:.4f}")
    heads = {}
    for k, n in enumerate(names):
        heads[n] = Head(trunk.out_features)
        heads[n].fc.weight.data.copy_(fused.weight.data[k:k + 1].cpu())
        heads[n].fc.bias.data.copy_(fused.bias.data[k:k + 1].cpu())
    return trunk.eval(), heads, hist


def _precomputed_views(transform: TransformModel, x: np.ndarray, d, gen: torch.Generator, device, name: str,
                       progress: bool, batch: int = 256) -> List[torch.Tensor]:
    """``d.precompute_views`` representations of every image (CPU, float16 for memory: the
    representations are in [0, 255], where float16 keeps 0.1 resolution), each of an independently
    augmented copy (blur and JPEG included; crop and flip are redone per epoch on the representation)."""
    views = []
    for v in range(d.precompute_views):
        out = []
        for k in tqdm(range(0, len(x), batch), desc=f"representations {name} (view {v + 1}/{d.precompute_views})",
                      disable=not progress, leave=False):
            xb = augment(to_float(x[k:k + batch]), d.augment, gen).to(device)
            out.append(transform(xb).detach().cpu().half())
        views.append(torch.cat(out))
    return views


def _roc(real: np.ndarray, fake: np.ndarray):
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.r_[np.zeros(len(real)), np.ones(len(fake))]
    s = np.r_[real, fake]
    fpr, tpr, _ = roc_curve(y, s)
    return float(roc_auc_score(y, s)), fpr, tpr


# ----------------------------------------------------------------------------- stages, timings
TIMINGS_FILE = "timings.json"
stage_log = logging.getLogger("guardian_plugin.training.stages")  # one line per stage start and end


class StageClock:
    """Times the pipeline's stages, logs one line as each starts and ends (``stage_log``, INFO), and
    rewrites ``OUT/timings.json`` each time: the finished stages' seconds, the running stage, and on a
    failure the stage that failed and its error, so a run that dies late keeps what it measured."""

    def __init__(self, out_dir: str, planned: List[str], config_path: Optional[str]):
        self.path = os.path.join(out_dir, TIMINGS_FILE)
        self.planned, self.config_path = planned, config_path
        self.timings: Dict[str, float] = {}
        self.t0 = time.time()
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.current: Optional[str] = None
        self._stage_t0 = 0.0
        self.status, self.failure = "running", None

    def elapsed(self) -> float:
        return time.time() - self.t0

    def _position(self, name: str) -> str:
        return f"{self.planned.index(name) + 1}/{len(self.planned)}" if name in self.planned else "-"

    def start(self, name: str) -> None:
        self.current, self._stage_t0 = name, time.time()
        stage_log.info("stage %s (%s) started at %.1f s", name, self._position(name), self.elapsed())
        self.write()

    def end(self) -> None:
        name, secs = self.current, time.time() - self._stage_t0
        self.timings[name] = secs
        self.current = None
        stage_log.info("stage %s (%s) done in %.1f s (%.1f s elapsed)", name, self._position(name), secs, self.elapsed())
        self.write()

    def stage(self, name: str):
        """``with clock.stage(name):`` times the block (a failure is recorded by :meth:`fail`)."""
        import contextlib

        @contextlib.contextmanager
        def timed():
            self.start(name)
            yield
            self.end()

        return timed()

    def fail(self, exc: BaseException) -> None:
        self.status = "failed"
        self.failure = {"stage": self.current, "error": f"{type(exc).__name__}: {exc}",
                        "stage_seconds": round(time.time() - self._stage_t0, 3) if self.current else None,
                        "elapsed_s": round(self.elapsed(), 3)}
        stage_log.error("stage %s failed after %.1f s (%.1f s elapsed): %s: %s", self.current, time.time() - self._stage_t0,
                        self.elapsed(), type(exc).__name__, exc)
        self.write()

    def finish(self, status: str = "finished") -> None:
        self.status = status
        stage_log.info("train-detector %s in %.1f s", status, self.elapsed())
        self.write()

    def write(self) -> None:
        doc = {"status": self.status, "config": self.config_path, "started": self.started,
               "elapsed_s": round(self.elapsed(), 3), "stages_planned": self.planned,
               "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
               "running": ({"stage": self.current, "since_s": round(self._stage_t0 - self.t0, 3)}
                           if self.current and self.status == "running" else None)}
        if self.failure:
            doc["failed"] = self.failure
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(doc, f, indent=2)
            os.replace(tmp, self.path)
        except OSError as e:  # the timings never stop a run
            log.warning("could not write %s: %s", self.path, e)


# -------------------------------------------------------------------------------------- run
def train_detector(cfg: TrainConfig, base_dir: str, out_dir: str, device: str | None = None, progress: bool = True,
                   config_path: str | None = None, prepare_only: bool = False, check: bool = True) -> dict:
    """Run the pipeline; with ``prepare_only`` stop once the sources and transformation models are
    cached (several such runs, one source each, can fill the cache in parallel).

    First the config is checked (training/validate.py; ``check=False`` skips it): a ConfigError names
    every problem before any data is loaded. Each stage's start and end is logged on ``stage_log`` and
    ``OUT/timings.json`` is rewritten as each stage starts and ends (on a failure: the stage and error)."""
    from guardian_plugin.training.validate import check_config

    if check:
        plan = check_config(cfg, base_dir, config_path, out_dir=out_dir, device=device, prepare_only=prepare_only)
        planned = plan.stages
        stage_log.info("config checked: %d stages planned (%s); rough memory peak %.2f GB", len(planned),
                       ", ".join(planned), plan.peak_bytes / 1024 ** 3)
        for w in plan.warnings:
            stage_log.warning("warning: %s", w)
    else:
        planned = []
    os.makedirs(out_dir, exist_ok=True)
    clock = StageClock(out_dir, planned, config_path)
    try:
        report = _run_stages(cfg, base_dir, out_dir, device, progress, config_path, prepare_only, clock)
    except BaseException as e:
        clock.fail(e)
        raise
    clock.finish("prepared" if prepare_only else "finished")
    return report


def _run_stages(cfg: TrainConfig, base_dir: str, out_dir: str, device: str | None, progress: bool,
                config_path: str | None, prepare_only: bool, clock: StageClock) -> dict:
    t_start = clock.t0
    timings = clock.timings
    dev = resolve_device(device or cfg.device)
    seed_everything(cfg.seed)
    cache = _path(cfg.cache, base_dir)
    os.makedirs(cache, exist_ok=True)

    # 1. real data
    with clock.stage("real_data"):
        real = {split: {e.name: load_real(e, cfg, base_dir) for e in getattr(cfg.real, split)}
                for split in ("train", "calibrate", "evaluate")}
    victim = None
    if cfg.victim:
        with clock.stage("victim"):
            victim = load_victim(cfg, base_dir, dev)
    victim_hash = victim_file_hash(cfg, base_dir)

    # 2. synthetic sources (cached)
    gen_data = to_float(real["train"][cfg.generative_data])
    sctx = SourceContext(gen_data, victim, cfg.mean, cfg.std, cfg.victim.num_classes if cfg.victim else 10,
                         dev, cfg.seed, progress)
    fake_train, fake_val, fake_test, source_info = {}, {}, {}, {}
    for name, s in cfg.sources.items():
        path = source_cache_path(cfg, base_dir, name, victim_hash)
        with clock.stage(f"source_{name}"):
            t = time.time()
            if os.path.exists(path):
                x = np.load(path)["x"]
                info = json.loads(str(np.load(path)["info"]))
                info["cached"] = True
            else:
                sctx.info = {}
                x = build_source(s.kind)(sctx, s.n, **s.params)
                info = {**sctx.info.get(s.kind, {}), "seconds": round(time.time() - t, 1)}
                np.savez_compressed(path, x=x, info=json.dumps(info))
                info["cached"] = False
            if cfg.synthetic_jpeg is not None:
                x = jpeg_images(x, cfg.synthetic_jpeg)
                info["jpeg_quality"] = cfg.synthetic_jpeg
            if cfg.served_view is not None:  # after the JPEG round trip: the server decodes what was sent
                x = as_served(x, cfg)
                info["served_view"] = cfg.served_view.model_dump()
        fake_train[name], fake_val[name], fake_test[name] = source_splits(x, cfg)
        source_info[name] = {**info, "kind": s.kind, "train": len(fake_train[name]), "val": len(fake_val[name]),
                             "test": len(fake_test[name]), "cache": path}

    # 3. transformation models (a fixed `normalise: scale` is estimated on real training images)
    real_pool = np.concatenate(list(real["train"].values()))
    names = {src: cfg.detector.per_source_transform.get(src, cfg.detector.transform) for src in cfg.sources}
    tctx = TransformContext(cfg.channels, cfg.size, artifact_dir=out_dir, victim=victim,
                            victim_mean=cfg.mean, victim_std=cfg.std)
    transform_specs: Dict[str, dict] = {}
    transforms: Dict[str, TransformModel] = {}
    with clock.stage("transforms"):
        for tname in sorted(set(names.values())):
            spec = dict(cfg.detector.transform_params.get(tname, {}))
            if tname == "discriminator":
                spec.update(weights="transform_discriminator.pt", width=cfg.discriminator.width)
                dpath = _train_discriminator(cfg, gen_data, cache, dev, progress)
                shutil.copyfile(dpath, os.path.join(out_dir, spec["weights"]))
            elif tname == "victim":
                if victim is None:
                    raise ValueError("transform 'victim' needs `victim:` in the config")
                spec.update(weights="transform_victim.torchscript.pt", mean=cfg.mean, std=cfg.std)
                torch.jit.trace(victim.cpu().eval(), torch.zeros(1, cfg.channels, cfg.size, cfg.size)).save(
                    os.path.join(out_dir, spec["weights"]))
                victim.to(dev)
            tm = transforms[tname] = build_transform(tname, spec, tctx).to(dev)
            if tm.model is not None and tm.normalise == "scale" and tm.scale is None:
                sample = to_float(real_pool[np.random.RandomState(cfg.seed).permutation(len(real_pool))[:512]]).to(dev)
                spec["scale"] = tm.scale = estimate_scale(tm, sample, spec.get("scale_quantile", 0.99))
            transform_specs[tname] = spec
    if prepare_only:
        return {"prepared": True, "sources": source_info, "transforms": names,
                "timings_s": {k: round(v, 1) for k, v in timings.items()}}

    # 4. sub-detectors: each gets as many real training images as it has synthetic ones (a shared trunk:
    #    as many as all of its sources together, every one a negative of every head)
    dseed = cfg.seed if cfg.detector.seed is None else cfg.detector.seed
    d = cfg.detector
    trained, histories, trunks, trunk_specs = {}, {}, {}, {}
    if d.shared_trunk:
        for g, tname in enumerate(dict.fromkeys(names[src] for src in fake_train)):
            srcs = [src for src in fake_train if names[src] == tname]
            with clock.stage(f"trunk_{tname}"):
                rng = np.random.RandomState(dseed + 100 + g)
                n = sum(len(fake_train[src]) for src in srcs)
                idx = rng.choice(len(real_pool), n, replace=n > len(real_pool))
                trunks[tname], heads, hist = train_shared_trunk(tname, transforms[tname], real_pool[idx],
                                                                {src: fake_train[src] for src in srcs}, cfg, dev,
                                                                dseed + 10 + g, progress)
            trunk_specs[tname] = TrunkSpec(transform=tname, arch=d.arch, arch_params=d.arch_params,
                                           weights=f"trunk_{tname}.pt")
            trained.update(heads)
            histories.update(hist)
    else:
        for i, (src, x_fake) in enumerate(fake_train.items()):
            with clock.stage(f"subdetector_{src}"):
                rng = np.random.RandomState(dseed + 100 + i)
                n = len(x_fake)
                idx = rng.choice(len(real_pool), n, replace=n > len(real_pool))
                trained[src], histories[src] = train_subdetector(src, transforms[names[src]], real_pool[idx], x_fake,
                                                                 cfg, dev, dseed + 10 + i, progress)
    subs = [trained[src] for src in fake_train]
    sub_specs = [SubDetectorSpec(name=src, source=cfg.sources[src].kind, transform=names[src],
                                 **({"arch": HEAD_ARCH, "trunk": names[src], "weights": f"head_{src}.pt"} if d.shared_trunk
                                    else {"arch": d.arch, "arch_params": d.arch_params, "weights": f"subdetector_{src}.pt"}),
                                 threshold=0.0) for src in fake_train]
    patches = PatchSpec(size=d.patch.size, grid=d.patch.grid) if d.patch is not None else None
    spec = DetectorSpec(format_version=format_version_for(patches, trunk_specs),
                        image=ImageSpec(channels=cfg.channels, size=cfg.size),
                        input=InputMapping(mean=cfg.mean, std=cfg.std), target_fpr=cfg.target_fpr,
                        num_classes=cfg.victim.num_classes if cfg.victim else None,
                        transforms=transform_specs, patches=patches, trunks=trunk_specs, subdetectors=sub_specs)
    detector = Detector(spec, transforms, subs, trunks).to(dev)

    # 5. calibration on held-out real images
    with clock.stage("calibration"):
        cal_scores = {g: scores_of(detector, x, device=dev) for g, x in real["calibrate"].items()}
        thr, level, cal_fpr = calibrate(cal_scores, cfg.target_fpr)
        for s, v in zip(spec.subdetectors, thr):
            s.threshold = float(v)
        detector.thresholds.copy_(torch.from_numpy(thr))

    # 6. evaluation on data no step above has seen
    clock.start("evaluation")
    ev_real = {g: scores_of(detector, x, device=dev) for g, x in real["evaluate"].items()}
    ev_fake = {src: scores_of(detector, x, device=dev) for src, x in fake_test.items()}
    margin = lambda s: (s - thr).max(1)  # noqa: E731  ensemble score: flagged iff >= 0
    val = {src: float((scores_of(detector, x, device=dev) >= thr).any(1).mean()) for src, x in fake_val.items() if len(x)}
    report = {
        "format_version": spec.format_version,
        "seed": cfg.seed,
        "detector_seed": dseed,
        "target_fpr": cfg.target_fpr,
        "synthetic_jpeg": cfg.synthetic_jpeg,  # JPEG quality every synthetic image went through (None: none)
        "quantile_level": level,
        "thresholds": {s.name: s.threshold for s in spec.subdetectors},
        "calibration_fpr": cal_fpr,
        "fpr": {g: {"ensemble": float((s >= thr).any(1).mean()),
                    **{n: float((s[:, k] >= thr[k]).mean()) for k, n in enumerate(detector.names)}, "n": len(s)}
                for g, s in ev_real.items()},
        "dacc": {src: {"ensemble": float((s >= thr).any(1).mean()),
                       **{n: float((s[:, k] >= thr[k]).mean()) for k, n in enumerate(detector.names)}, "n": len(s)}
                 for src, s in ev_fake.items()},
        "roc_auc": {},
        "validation_dacc": val,  # synthetic validation split: for choosing settings, never reported as results
        "sources": source_info,
        "transforms": names,
        "data": {split: {g: int(len(x)) for g, x in d.items()} for split, d in real.items()},
        "training_history": histories,
        "timings_s": {},
        "device": str(dev),
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "guardian_plugin": __import__("guardian_plugin").__version__},
        "config": cfg.model_dump(),
        "config_path": config_path,
    }
    curves = {}
    for src, s in ev_fake.items():
        report["roc_auc"][src] = {}
        for g, r in ev_real.items():
            auc, fpr, tpr = _roc(margin(r), margin(s))
            report["roc_auc"][src][g] = auc
            curves[(src, g)] = (fpr, tpr, auc)
    clock.end()
    report["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    report["timings_s"]["total"] = round(time.time() - t_start, 1)

    with clock.stage("artifact"):  # (not in report.json's timings: the report is written here)
        save_detector(out_dir, spec, [s.cpu() for s in subs], {t: m.cpu() for t, m in trunks.items()})
        if victim is not None:  # the distribution test's benign reference (guardian_plugin.distribution)
            group = cfg.reference_group or cfg.real.calibrate[0].name
            ref = distribution_reference(detector, victim, real["calibrate"][group], cfg, dev, f"calibrate:{group}")
            ref.save(out_dir)
            report["distribution_reference"] = {"group": group, "n": ref.n, "bins": ref.bins}
        with open(os.path.join(out_dir, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
        _plot_roc(curves, os.path.join(out_dir, "roc.png"), cfg.target_fpr)
    return report


def distribution_reference(detector: Detector, victim: torch.nn.Module, x: np.ndarray, cfg: TrainConfig, device,
                           source: str, progress: bool = False):
    """The distribution test's reference: the victim's probabilities and the detector's scores on
    benign uint8 images ``x``, as they are and under each nuisance of ``cfg.reference_envelope`` (on the
    first ``cfg.reference_envelope_images`` of them) (guardian_plugin.distribution.build_reference)."""
    from tqdm import tqdm

    from guardian_plugin import nuisance
    from guardian_plugin.distribution import build_reference

    def features(imgs: np.ndarray):
        probs = []
        with torch.no_grad():
            for k in range(0, len(imgs), 256):
                xb = normalise(to_float(imgs[k:k + 256]), cfg.mean, cfg.std).to(device)
                probs.append(torch.softmax(victim(xb), 1).cpu())
        return torch.cat(probs), torch.from_numpy(scores_of(detector, imgs, device=device))

    probs, scores = features(x)
    envelope = {}
    sub = x[:cfg.reference_envelope_images] if cfg.reference_envelope_images else x
    for i, spec in enumerate(tqdm(cfg.reference_envelope, desc="reference envelope", unit="nuisance",
                                  disable=not progress, leave=False)):
        envelope[spec] = (*features(nuisance.apply(spec, sub, seed=cfg.seed * 100 + i)), np.arange(len(sub)))
    return build_reference(probs, scores, detector.thresholds.cpu(), source, envelope)


def _train_discriminator(cfg: TrainConfig, data01: torch.Tensor, cache: str, dev, progress: bool) -> str:
    from guardian_plugin.training.gan import train_dcgan

    d = cfg.discriminator
    key = _hash({**d.model_dump(), "n": len(data01), "sum": float(data01.sum()), "shape": list(data01.shape)})
    path = os.path.join(cache, f"transform-discriminator-{key}.pt")
    if not os.path.exists(path):
        _, disc, _ = train_dcgan(data01, epochs=d.epochs, width=d.width, nz=d.nz, seed=d.seed, device=dev,
                                 progress=progress, desc="transform GAN")
        torch.save(disc.cpu().state_dict(), path)
    return path


def _plot_roc(curves, path: str, target_fpr: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({g for _, g in curves})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4.2), squeeze=False)
    for ax, g in zip(axes[0], groups):
        for (src, gg), (fpr, tpr, auc) in sorted(curves.items()):
            if gg == g:
                ax.plot(fpr, tpr, label=f"{src} (AUC {auc:.4f})")
        ax.axvline(target_fpr, ls=":", c="grey", label=f"target FPR {target_fpr:g}")
        ax.set_xscale("log")
        ax.set_xlim(1e-3, 1)
        ax.set_xlabel(f"false-positive rate on held-out real '{g}'")
        ax.set_ylabel("detection rate (ensemble)")
        ax.set_title(f"ensemble ROC vs real '{g}'")
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(report: dict) -> None:
    print(f"target FPR {report['target_fpr']:.2%} (calibration: "
          + ", ".join(f"{g} {v:.2%}" for g, v in report["calibration_fpr"].items()) + ")")
    print("held-out real (FPR):  " + ", ".join(f"{g} {v['ensemble']:.2%} (n={v['n']})" for g, v in report["fpr"].items()))
    for src, v in report["dacc"].items():
        per = ", ".join(f"{k} {x:.1%}" for k, x in v.items() if k not in ("ensemble", "n"))
        aucs = ", ".join(f"{g} {a:.4f}" for g, a in report["roc_auc"][src].items())
        print(f"source {src:10s} DAcc ensemble {v['ensemble']:.2%} (n={v['n']}; {per}); ROC-AUC vs {aucs}")
    print(f"total {report['timings_s']['total']:.0f} s: " + ", ".join(f"{k} {v:.0f}" for k, v in report["timings_s"].items() if k != "total"))
