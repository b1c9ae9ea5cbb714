"""The up-front check of a detector training config (``guardian train-detector --check``, and the first
thing every ``train-detector`` run does): before any data is loaded or anything trained, every real-data
kind, source, transform and architecture the config names is checked against its image size and
channels, files it names are looked for, and the largest things the run will hold in memory are
estimated against this machine's memory.

What each component supports is declared next to it, not listed here: ``supports`` / ``check`` /
``estimate`` on the registered sources (training/sources.py), ``supports`` / ``check`` on the
transforms (transform.py, through :func:`~guardian_plugin.transform.check_transform`) and ``supports``
on the classifier architectures (nets.py, where :class:`~guardian_plugin.nets.DCGANGenerator` and
:class:`~guardian_plugin.nets.GeneratorA` state their sizes). Every problem found is reported at once, in
one :class:`~guardian_plugin.errors.ConfigError` naming the config file and each field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from guardian_plugin.errors import ConfigError

GB = 1024 ** 3
NATIVE_NOTE_PX = 64  # a source generating natively above this size gets a note that suggests upsample_from


@dataclass
class Plan:
    """What a run will do and roughly hold in memory (``--check`` prints it)."""

    config: str
    image: Tuple[int, int]                          # (channels, size)
    device: str
    stages: List[str]
    sources: Dict[str, dict]                        # name -> kind, n, transform, cache
    subdetector: dict                               # arch, params, parameters per representation channels
    memory: List[Tuple[str, str, int]] = field(default_factory=list)   # (field, what, bytes)
    peak_bytes: int = 0
    total_bytes: Optional[int] = None
    available_bytes: Optional[int] = None
    notes: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    times: Optional[object] = None                  # estimate.TimeEstimate (None: not worked out)

    def lines(self) -> List[str]:
        c, s = self.image
        out = [f"config {self.config}: {c} x {s} x {s} images, device {self.device}",
               f"stages ({len(self.stages)}): {', '.join(self.stages)}"]
        for name, v in self.sources.items():
            out.append(f"  source {name}: kind {v['kind']}, {v['n']} images, transform {v['transform']}, {v['cache']}")
        d = self.subdetector
        out.append(f"  sub-detectors: {d['arch']} {d['params']}, "
                   + ", ".join(f"{p / 1e6:.2f}M parameters on {ch}-channel representations"
                               if p is not None else f"{ch}-channel representations" for ch, p in d["parameters"].items()))
        mem = f"{_gb(self.total_bytes)} total, {_gb(self.available_bytes)} available now" if self.total_bytes else "unknown"
        out.append(f"memory (rough peak {_gb(self.peak_bytes)}; this machine: {mem}):")
        out += [f"  {_gb(b):>9}  {what}" for _, what, b in sorted(self.memory, key=lambda m: -m[2]) if b]
        if self.times is not None:
            out += self.times.lines()
        out += [f"note: {n}" for n in self.notes] + [f"warning: {w}" for w in self.warnings]
        return out

    def as_dict(self) -> dict:
        return {"config": self.config, "image": list(self.image), "device": self.device, "stages": self.stages,
                "sources": self.sources, "peak_bytes": self.peak_bytes, "total_bytes": self.total_bytes,
                "available_bytes": self.available_bytes, "warnings": self.warnings}


def _gb(b: Optional[int]) -> str:
    return "?" if b is None else f"{b / GB:.2f} GB" if b >= GB / 100 else f"{b / 1024 ** 2:.1f} MB"


def machine_memory() -> Tuple[Optional[int], Optional[int]]:
    """(total, available) bytes of this machine's memory (psutil, else /proc/meminfo; None if unknown)."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemTotal"), info.get("MemAvailable")
    except (OSError, ValueError, IndexError):
        return None, None


def _real_count(e, base_dir: str) -> Optional[int]:
    """How many images a real entry will hold (None: not known without reading it)."""
    from guardian_plugin.training.data import CIFAR10_SPLITS

    if e.kind == "photos":
        return e.n or 1000
    full = {"mnist": 4000 if (e.split or "train") == "train" else 1000, "foolbox": 20,
            "cifar10": CIFAR10_SPLITS[e.split][1] * 10 if e.split in CIFAR10_SPLITS else None}.get(e.kind)
    if e.range is not None:
        full = e.range[1] - e.range[0] if full is None else max(0, min(e.range[1], full) - e.range[0])
    if e.n is not None:
        full = e.n if full is None else min(full, e.n)
    return full


def _check_real(cfg, base_dir: str, problems: list) -> None:
    load = cfg.served_view.resize if cfg.served_view else cfg.size  # real images are loaded at this size
    for split in ("train", "calibrate", "evaluate"):
        for i, e in enumerate(getattr(cfg.real, split)):
            where = f"real.{split}.{i} ({e.name})"
            if e.kind == "mnist" and (cfg.channels, cfg.size, load) != (1, 28, 28):
                problems.append((where, f"mnist images are 1 x 28 x 28, the config's are {cfg.channels} x {cfg.size}"
                                        + (f" (loaded at served_view.resize {load})" if load != cfg.size else "")
                                        + f"; at {cfg.size} px use kind photos, folder, foolbox or cifar10 (resized)"))
            elif e.kind == "foolbox":
                import importlib.util

                if importlib.util.find_spec("foolbox") is None:
                    problems.append((where, "kind foolbox reads the samples the foolbox package ships: pip install "
                                            "foolbox==3.3.4 (the `train` extra)"))
            elif e.kind == "folder":
                path = e.path if not e.path or os.path.isabs(e.path) else os.path.join(base_dir, e.path)
                if not path or not os.path.isdir(path):
                    problems.append((f"{where}.path", f"{path or '(none)'} is not a directory of images"
                                     + _missing_hint(cfg)))
            elif e.kind == "cifar10":
                from guardian_plugin.training.data import CIFAR10_SPLITS, data_path

                try:
                    data_path("cifar10-jpeg", f"{CIFAR10_SPLITS[e.split][0]}.npz")
                except FileNotFoundError as err:
                    problems.append((where, str(err)))


def _arch_problem(arch: str, channels: int, size: int, params: dict, num_classes: int) -> Tuple[Optional[str], Optional[int]]:
    """(why ``arch`` cannot take channels x size inputs, or None; its parameter count when built dry)."""
    import torch

    from guardian_plugin.nets import CLASSIFIERS, build_classifier

    if arch not in CLASSIFIERS:
        from guardian_plugin.nets import architectures

        return (f"unknown architecture {arch!r}; the registered ones (guardian_plugin/nets.py, docs/detector.md): "
                + "; ".join(f"{n} ({d})" for n, d in architectures())), None
    why = CLASSIFIERS.unsupported(arch, size, channels, **params)
    if why or not getattr(CLASSIFIERS.get(arch), "dry_build", True):
        return why, None
    try:  # the real constraint: build it on the meta device and push a batch of that shape through
        with torch.device("meta"):
            m = build_classifier(arch, in_channels=channels, num_classes=num_classes, image_size=size, **params)
            m.eval()(torch.empty(2, channels, size, size))
        return None, sum(p.numel() for p in m.parameters())
    except Exception as e:  # noqa: BLE001  shape errors, bad settings
        return f"{arch} {params} cannot take {channels} x {size} x {size} inputs ({type(e).__name__}: {e})", None


def check_config(cfg, base_dir: str, config_path: Optional[str] = None, out_dir: Optional[str] = None,
                 device: Optional[str] = None, prepare_only: bool = False) -> Plan:
    """Check ``cfg`` without loading data or training; returns the :class:`Plan` or raises one
    ConfigError listing every problem, each with its field."""
    from guardian_plugin.training.sources import SOURCES, native_size, upsample_advice
    from guardian_plugin.transform import TransformContext, check_transform

    where = config_path or "<config>"
    problems: List[Tuple[str, str]] = []
    c, s = cfg.channels, cfg.size
    if c not in (1, 3):
        problems.append(("channels", f"must be 1 (grey) or 3 (RGB), got {c}"))
    if len(cfg.mean) not in (1, c) or len(cfg.std) not in (1, c):
        problems.append(("mean/std", f"need 1 or {c} values each, got {len(cfg.mean)} / {len(cfg.std)}"))
    dev = device or cfg.device
    if dev not in (None, "auto", "cpu"):
        import torch

        if str(dev).startswith("cuda") and not torch.cuda.is_available():
            problems.append(("device", f"{dev}: CUDA is not available on this machine (use cpu or auto)"))

    _check_real(cfg, base_dir, problems)

    victim_params = None
    if cfg.victim is not None:
        v = cfg.victim
        why, victim_params = _arch_problem(v.arch, c, s, v.arch_params, v.num_classes)
        if why:
            problems.append(("victim.arch", why))
        path = v.weights if os.path.isabs(v.weights) else os.path.join(base_dir, v.weights)
        if not os.path.exists(path):
            problems.append(("victim.weights", f"{path} does not exist: the victim's weights (a state dict of "
                                               f"{v.arch}, or a TorchScript file) are read from there"
                             + _missing_hint(cfg)))
    elif cfg.reference_group is not None:
        problems.append(("reference_group", "the distribution test's reference needs `victim:`"))

    # sources: each one's own supports / check / estimate (training/sources.py)
    memory: List[Tuple[str, str, int]] = []
    notes: List[str] = []
    stage_peaks: List[Tuple[str, int]] = []
    for name, src in cfg.sources.items():
        f = f"sources.{name}"
        if src.kind not in SOURCES:
            problems.append((f, f"unknown source kind {src.kind!r}; known: {', '.join(SOURCES)}"))
            continue
        fn = SOURCES.get(src.kind)
        upsamples = getattr(fn, "upsamples", False)  # its generator may work at params.upsample_from px instead
        why = None if upsamples and "upsample_from" in src.params else SOURCES.unsupported(src.kind, s, c)
        if why:
            works = [k for k in SOURCES.supporting(s, c) if k != src.kind]
            problems.append((f, f"kind {src.kind!r} cannot make {c} x {s} x {s} images: {why}; "
                                + (f"{upsample_advice(src.kind, cfg)}, or " if upsamples else "")
                                + f"at {s} px use kind " + ", ".join(repr(k) for k in works)
                                + " ('folder': images you generated elsewhere at that size), or remove the source"))
            continue
        if upsamples and s > NATIVE_NOTE_PX and native_size(dict(src.params), s) == s:
            notes.append(f"{f}: the {src.kind} generator works at {s} px itself, (s / 32)^2 = {(s / 32) ** 2:.0f}x "
                            f"the pixels of a 32 px one (issue #14: days on 2 cores at 224 px); "
                            + upsample_advice(src.kind, cfg))
        found = getattr(SOURCES.get(src.kind), "check", lambda p, cfg: [])(dict(src.params), cfg)
        problems += [(f + (f".{sub}" if sub else ""), msg) for sub, msg in found]
        estimate = getattr(SOURCES.get(src.kind), "estimate", None)
        if estimate is not None and not found:
            try:
                pieces, more = estimate(src.n, dict(src.params), cfg)
            except Exception as e:  # noqa: BLE001  an estimate never blocks a run
                pieces, more = [], [f"{f}: no memory estimate ({type(e).__name__}: {e})"]
            notes += more
            memory += [(f, what, b) for what, b in pieces]
            stage_peaks.append((f, sum(b for _, b in pieces)))

    # transforms (transform.py: check_transform and each factory's supports / check)
    default = cfg.detector.transform
    names = {src: cfg.detector.per_source_transform.get(src, default) for src in cfg.sources}
    for src in cfg.detector.per_source_transform:
        if src not in cfg.sources:
            problems.append((f"detector.per_source_transform.{src}", f"{src!r} is not a source of the config "
                                                                     f"({', '.join(cfg.sources)})"))
    tctx = TransformContext(c, s, artifact_dir=out_dir, has_victim=cfg.victim is not None)
    rep_channels: Dict[str, int] = {}
    for tname in sorted(set(names.values())):
        users = [src for src, t in names.items() if t == tname]
        f = ("detector.transform" if any(src not in cfg.detector.per_source_transform for src in users)
             else f"detector.per_source_transform.{users[0]}")
        try:
            rep_channels[tname] = check_transform(tname, dict(cfg.detector.transform_params.get(tname, {})), tctx)
        except ConfigError as e:
            problems.append((f, str(e)))

    # sub-detectors (nets.py: the architecture's supports, then a dry build at the representation's shape)
    d = cfg.detector
    sub_size = s
    if d.patch is not None:  # patches are cut from the image at native resolution
        if d.patch.size > s:
            problems.append(("detector.patch.size", f"{d.patch.size} px patches do not fit {s} px images"))
        else:
            sub_size = d.patch.size
    if d.shared_trunk:
        from guardian_plugin.nets import trunk_archs

        if d.arch not in trunk_archs():
            problems.append(("detector.arch", f"shared_trunk needs an architecture that splits into a trunk and a "
                                              f"head ({', '.join(trunk_archs())}), not {d.arch!r}"))
    sub_params: Dict[int, Optional[int]] = {}
    for ch in sorted(set(rep_channels.values())):
        why, sub_params[ch] = _arch_problem(d.arch, ch, sub_size, d.arch_params, 1)
        if why:
            problems.append(("detector.arch", why))
    if not (0 < cfg.test_fraction + cfg.val_fraction < 1):
        problems.append(("test_fraction", f"test_fraction + val_fraction must be below 1, got "
                                          f"{cfg.test_fraction} + {cfg.val_fraction}"))

    # memory: what stays resident for the whole run, plus the largest single stage
    px = c * s * s
    counts = {(split, e.name): _real_count(e, base_dir) for split in ("train", "calibrate", "evaluate")
              for e in getattr(cfg.real, split)}
    known = sum(n for n in counts.values() if n)
    resident = [("real", f"real images, uint8 ({known} images"
                         + (", some entries of unknown size)" if None in counts.values() else ")"), known * px)]
    n_gen = counts.get(("train", cfg.generative_data))
    if n_gen:
        resident.append(("generative_data", f"generative data '{cfg.generative_data}' as float32 ({n_gen} images)",
                         4 * n_gen * px))
    n_fake = sum(src.n for src in cfg.sources.values())
    resident.append(("sources", f"synthetic images, uint8 ({n_fake} images)", n_fake * px))
    if victim_params:
        resident.append(("victim", f"victim {cfg.victim.arch} weights ({victim_params / 1e6:.1f}M parameters)",
                         4 * victim_params))
    if d.precompute and not prepare_only:
        n_max = max(int(round(src.n * (1 - cfg.test_fraction - cfg.val_fraction))) for src in cfg.sources.values())
        ch = max(rep_channels.values(), default=c)
        b = d.precompute_views * 2 * n_max * ch * s * s * 2
        memory.append(("detector.precompute", f"precomputed representations ({d.precompute_views} views x "
                                              f"{2 * n_max} images x {ch} x {s} x {s}, float16)", b))
        stage_peaks.append(("detector.precompute", b))
    memory = resident + memory
    peak_field, peak_stage = max(stage_peaks, key=lambda p: p[1], default=("", 0))
    peak = sum(b for _, _, b in resident) + peak_stage
    total, available = machine_memory()
    warnings: List[str] = []
    if total and peak > total:
        big = [f"{what} {_gb(b)}" for fl, what, b in memory if fl == peak_field]
        problems.append((peak_field or "(memory)",
                         f"the run needs roughly {_gb(peak)} of memory at its peak, more than this machine's "
                         f"{_gb(total)} ({'; '.join(big)}; `guardian train-detector --check` prints the whole "
                         "estimate). " + getattr(_source_fn(cfg, peak_field), "memory_advice",
                                                 "Use fewer or smaller images, or a machine with more memory.")))
    if available and peak > available:
        warnings.append(f"the rough peak of {_gb(peak)} is more than the {_gb(available)} of memory available now "
                        f"(largest stage: {peak_field})")

    stages = ["real_data"] + (["victim"] if cfg.victim else []) + [f"source_{n}" for n in cfg.sources] + ["transforms"]
    if not prepare_only:
        stages += ([f"trunk_{t}" for t in dict.fromkeys(names[n] for n in cfg.sources)] if d.shared_trunk
                   else [f"subdetector_{n}" for n in cfg.sources]) + ["calibration", "evaluation", "artifact"]
    caches = {n: _cache_state(cfg, base_dir, n) for n in cfg.sources}
    from guardian_plugin.training.estimate import estimate_times

    try:
        times = estimate_times(cfg, base_dir, stages, {n: st == "cached" for n, st in caches.items()}, counts)
    except Exception as e:  # noqa: BLE001  an estimate never blocks a run
        from guardian_plugin.training.estimate import TimeEstimate

        times = TimeEstimate(None, None, notes=[f"could not be worked out ({type(e).__name__}: {e})"])
    plan = Plan(config=where, image=(c, s), device=str(dev or "auto"), stages=stages,
                sources={n: {"kind": src.kind, "n": src.n, "transform": names.get(n, default),
                             "cache": caches[n]} for n, src in cfg.sources.items()},
                subdetector={"arch": d.arch, "params": d.arch_params, "parameters": sub_params},
                memory=memory, peak_bytes=peak, total_bytes=total, available_bytes=available, notes=notes,
                warnings=warnings, times=times)
    if problems:
        err = ConfigError(f"{where}: {len(problems)} problem{'s' if len(problems) > 1 else ''} found before loading "
                          "data or training anything:\n" + "\n".join(f"  {fld}: {msg}" for fld, msg in problems))
        err.plan = plan  # what could be worked out (--check prints it above the problems)
        raise err
    return plan


def _missing_hint(cfg) -> str:
    if cfg.prepared_by:
        return f"; run `{cfg.prepared_by}` first (the config's prepared_by: it writes it)"
    return ("; write it there first (the config names no command that makes it: add `prepared_by: COMMAND` to the "
            "config to have --check name it)")


def _source_fn(cfg, fld: str):
    from guardian_plugin.training.sources import SOURCES

    name = fld.split(".", 1)[1] if fld.startswith("sources.") else None
    return SOURCES.get(cfg.sources[name].kind) if name in cfg.sources else None


def _cache_state(cfg, base_dir: str, name: str) -> str:
    """'cached' when the source's cache entry exists, else 'to build' (the victim's weights are hashed
    only for sources that query it)."""
    from guardian_plugin.training.pipeline import source_cache_path, victim_file_hash
    from guardian_plugin.training.sources import uses_victim

    try:
        vh = victim_file_hash(cfg, base_dir) if uses_victim(cfg.sources[name].kind) else None
        return "cached" if os.path.exists(source_cache_path(cfg, base_dir, name, vh)) else "to build"
    except (OSError, KeyError):  # no victim weights yet, an unknown kind (reported as a problem)
        return "to build"
