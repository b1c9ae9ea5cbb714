"""Synthetic sources for the detector's fake classes, one registry entry each.

A source turns the training context into ``n`` uint8 pixel images (N, C, H, W). Every source can be
replaced by an ImageFolder of images the defender already has: ``{kind: folder, path: DIR}``.

- ``dfme``       simulate DFME against the defender's own victim (zeroth-order generator training)
                 and sample its generator at several checkpoints
- ``gan``        a DCGAN trained on the defender's real data
- ``diffusion``  a small DDPM trained on the defender's real data (diffusers), sampled with DDIM
- ``folder``     images from a directory

``dfme``, ``gan`` and ``diffusion`` take ``upsample_from: S`` (and ``upsample_mode``: nearest, bilinear
or bicubic, default bilinear): the generator works at S px and its output is upsampled to the config's
size, the way attacks on 224 px models generate (DFME's generator outputs S px, upsampled inside the
generation before every query, so the victim is queried at full size; the GAN and the DDPM learn the
generative data brought down to S px by area averaging). Their checks and estimates below are at S.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from guardian_plugin.registry import Registry
from guardian_plugin.training.data import UPSAMPLE_MODES, denormalise, downsample_area, image_folder, to_uint8, upsample

SOURCES: Registry = Registry("synthetic source")
log = logging.getLogger(__name__)


class SourceContext:
    """What sources may use: real training images in [0, 1], the victim and its normalisation."""

    def __init__(self, real01: torch.Tensor, victim=None, mean=None, std=None, num_classes: int = 10,
                 device="cpu", seed: int = 0, progress: bool = True):
        self.real01 = real01
        self.victim = victim
        self.mean, self.std = mean, std
        self.num_classes = num_classes
        self.device = device
        self.seed = seed
        self.progress = progress
        self.channels, self.size = real01.shape[1], real01.shape[-1]
        self.info: dict = {}  # what the source measured (written to report.json)


@SOURCES.register("dfme")
def dfme_source(ctx: SourceContext, n: int, budget: int = 15_000, checkpoints: int = 5, runs: int = 1,
                variants: list | None = None, batch_size: int = 128, clone_arch: str = "lenet5",
                eval_share: float = 0.25, clone_size: int | None = None, **params) -> np.ndarray:
    """DFME against the victim (no defence). For every variant (a dict of DFME settings, e.g. its
    ``output`` mode or ``lr_g``) ``runs`` independent attacks are run (seeds 1000 + seed + k, apart
    from any seed an evaluation uses), each generator sampled at its initial state and at
    ``checkpoints`` evenly spaced points of its budget. Samples are drawn as the attack sends them
    (train-mode batch statistics), ``eval_share`` of them with the running statistics instead.

    One long run sampled late teaches the detector one generator: measured on the MNIST example, a
    detector trained that way flagged 0% of another seed's generator before ~5k queries and 52% at
    10k, so an attacker's first queries passed. Early states, several runs and variants cover that.

    ``clone_size: S``: the attack's clone sees each query brought down to S px (area averaging), so at
    224 px it costs what it costs at S (the clone only steers the generator; the source keeps its
    images, never the clone). The victim is always queried at the config's size."""
    if ctx.victim is None:
        raise ValueError("source 'dfme' needs the victim model (config: victim)")
    import copy

    from guardian_plugin.attacks.dfme import DFME
    from guardian_plugin.attacks.target import InProcessTarget
    from guardian_plugin.nets import build_classifier

    states, queries, k = [], 0, 0
    for variant in variants or [{}]:
        for _ in range(runs):
            seed = 1000 + ctx.seed + k
            k += 1
            target = InProcessTarget(ctx.victim, ctx.num_classes, device=ctx.device)
            torch.manual_seed(seed)
            clone = build_classifier(clone_arch, in_channels=ctx.channels, num_classes=ctx.num_classes,
                                     image_size=clone_size or ctx.size)
            if clone_size and clone_size != ctx.size:
                clone = torch.nn.Sequential(AreaDown(clone_size), clone)
            atk = DFME(target, clone, budget=budget, image_shape=(ctx.channels, ctx.size, ctx.size),
                       device=ctx.device, seed=seed, progress=ctx.progress, batch_size=batch_size,
                       checkpoint_every=max(budget // checkpoints, 1), mean=ctx.mean, std=ctx.std,
                       **{**params, **variant})
            initial = copy.deepcopy(atk.generator.state_dict())
            atk.run()
            if atk.queries != target.queries:
                raise RuntimeError(f"query accounting mismatch: attack {atk.queries}, target {target.queries}")
            queries += atk.queries
            states += [(atk, sd) for sd in [initial] + atk.checkpoints]
    per = [n // len(states) + (1 if i < n % len(states) else 0) for i in range(len(states))]
    imgs = []
    for m, (a, sd) in zip(per, states):
        n_eval = int(round(m * eval_share))
        for mode, cnt in (("train", m - n_eval), ("eval", n_eval)):
            if cnt:
                imgs.append(denormalise(a.sample(cnt, sd, mode=mode).cpu(), ctx.mean, ctx.std))
    ctx.info["dfme"] = {"queries": queries, "runs": k, "generator_states": len(states),
                        **_upsampled_info(params.get("upsample_from"), params.get("upsample_mode", "bilinear"))}
    return to_uint8(torch.cat(imgs))


class AreaDown(torch.nn.Module):
    """Images brought down to ``size`` px by area averaging (the dfme source's ``clone_size``)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x):
        return downsample_area(x, self.size)


@SOURCES.register("gan")
def gan_source(ctx: SourceContext, n: int, epochs: int = 20, width: int = 32, nz: int = 64,
               upsample_from: int | None = None, upsample_mode: str = "bilinear", **params) -> np.ndarray:
    """A DCGAN trained on the generative data; with ``upsample_from: S`` it learns that data brought
    down to S px (area) and its samples are upsampled to the config's size by ``upsample_mode``."""
    from guardian_plugin.training.gan import sample_generator, train_dcgan

    g, _, hist = train_dcgan(downsample_area(ctx.real01, upsample_from or ctx.size), epochs=epochs, width=width,
                             nz=nz, seed=ctx.seed, device=ctx.device, progress=ctx.progress, desc="gan source", **params)
    ctx.info["gan"] = {"epochs": epochs, "history": hist[-1:], **_upsampled_info(upsample_from, upsample_mode)}
    return to_uint8(upsample(sample_generator(g, n, seed=ctx.seed + 1, device=ctx.device), ctx.size, upsample_mode))


@SOURCES.register("diffusion")
def diffusion_source(ctx: SourceContext, n: int, steps: int = 1500, width: int = 16, sample_steps: int = 50,
                     upsample_from: int | None = None, upsample_mode: str = "bilinear", **params) -> np.ndarray:
    """A small DDPM trained on the generative data and sampled with DDIM; with ``upsample_from: S`` it
    learns that data brought down to S px (area) and its samples are upsampled to the config's size."""
    from guardian_plugin.training.diffusion import sample_ddim, train_ddpm

    native = upsample_from or ctx.size
    unet, hist = train_ddpm(downsample_area(ctx.real01, native), steps=steps, width=width, seed=ctx.seed,
                            device=ctx.device, progress=ctx.progress, **params)
    ctx.info["diffusion"] = {"train_steps": steps, "sample_steps": sample_steps, "history": hist[-1:],
                             **_upsampled_info(upsample_from, upsample_mode)}
    x = sample_ddim(unet, n, native, ctx.channels, steps=sample_steps, seed=ctx.seed + 1, device=ctx.device,
                    progress=ctx.progress)
    return to_uint8(upsample(x, ctx.size, upsample_mode))


def _upsampled_info(upsample_from, mode) -> dict:
    return {"upsample_from": upsample_from, "upsample_mode": mode} if upsample_from else {}


@SOURCES.register("folder")
def folder_source(ctx: SourceContext, n: int, path: str = "", **_) -> np.ndarray:
    x = image_folder(path, ctx.size, ctx.channels)
    if len(x) < n:
        log.warning("folder source %s has %d images, fewer than the %d asked for", path, len(x), n)
    idx = np.random.RandomState(ctx.seed).permutation(len(x))[:n]
    return x[idx]


dfme_source.uses_victim = True  # the others never touch ctx.victim: their cache keys leave it out


# ------------------------------------------------------------------------------ up-front checks
# ``guardian train-detector`` checks the config before it loads data (training/validate.py). Each source
# says, next to its code, what it supports and what it will hold in memory:
#   supports(size, channels) -> None or why not (the image formats the source can generate)
#   check(params, cfg) -> [(field under sources.NAME, problem)]   (its settings; cfg is the TrainConfig)
#   estimate(n, params, cfg) -> ([(what, bytes)], [notes])     (the largest things it holds at once)
def dry_parameters(factory) -> int:
    """Parameters of the module ``factory()`` builds, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return sum(p.numel() for p in factory().parameters())


def _f32(*shape) -> int:
    return 4 * int(np.prod(shape))


_DFME_SOURCE_KEYS = ("budget", "checkpoints", "runs", "variants", "batch_size", "clone_arch", "eval_share",
                     "clone_size")


def _dfme_settings(params: dict, cfg):
    """(source-level settings, [DFME.Params per variant]) as dfme_source would run them."""
    from guardian_plugin.attacks.dfme import DFME

    src = {"budget": 15_000, "checkpoints": 5, "runs": 1, "variants": None, "batch_size": 128, "clone_arch": "lenet5",
           "eval_share": 0.25, "clone_size": None, **{k: v for k, v in params.items() if k in _DFME_SOURCE_KEYS}}
    rest = {k: v for k, v in params.items() if k not in _DFME_SOURCE_KEYS}
    variants = src["variants"] or [{}]
    return src, [DFME.check_params({**rest, **v, "batch_size": src["batch_size"], "mean": list(cfg.mean),
                                    "std": list(cfg.std)}) for v in variants]


def _dfme_supports(size: int, channels: int):
    from guardian_plugin.nets import GeneratorA

    return GeneratorA.supports(size)


UPSAMPLE_KEYS = ("upsample_from", "upsample_mode")


def native_size(params: dict, size: int) -> int:
    """The size a source's generator works at: ``upsample_from`` when set (and usable), else ``size``."""
    s = params.get("upsample_from")
    return s if isinstance(s, int) and not isinstance(s, bool) and 0 < s <= size else size


def _upsample_check(kind: str, params: dict, cfg) -> list:
    """``upsample_from`` / ``upsample_mode``: a size the source's generator supports, at most the config's."""
    out = []
    s = params.get("upsample_from")
    size, channels = getattr(cfg, "size", None), getattr(cfg, "channels", 3)  # cfg None: no config to compare with
    if s is not None:
        if not isinstance(s, int) or isinstance(s, bool) or s < 1:
            out.append(("params.upsample_from", f"must be a positive integer (px), got {s!r}"))
        elif size is not None and s > size:
            out.append(("params.upsample_from", f"{s} px is above the config's size ({size}): the samples are "
                                                "upsampled to the config's size, never shrunk"))
        elif SOURCES.unsupported(kind, s, channels):
            out.append(("params.upsample_from", f"{SOURCES.unsupported(kind, s, channels)}; use a size the generator "
                                                f"supports, e.g. {_upsample_sizes(kind, size or 224, channels)}"))
    mode = params.get("upsample_mode", "bilinear")
    if mode not in UPSAMPLE_MODES:
        out.append(("params.upsample_mode", f"must be one of {', '.join(UPSAMPLE_MODES)}, got {mode!r}"))
    return out


def _upsample_sizes(kind: str, size: int, channels: int) -> str:
    """The sizes to suggest for ``upsample_from`` (what attackers against large models generate at)."""
    sizes = [n for n in (32, 64, 28) if n <= size and not SOURCES.unsupported(kind, n, channels)][:2]
    return " or ".join(map(str, sorted(sizes))) or "a smaller size"


def upsample_advice(kind: str, cfg) -> str:
    """The sentence that suggests ``upsample_from`` for a source at the config's size."""
    return (f"set params.upsample_from: {_upsample_sizes(kind, cfg.size, cfg.channels)} (the generator works at that "
            f"size and its images are upsampled to {cfg.size} px, as attacks on {cfg.size} px models generate)")


def _dfme_check(params: dict, cfg):
    from guardian_plugin.nets import CLASSIFIERS

    out = []
    if cfg.victim is None:
        out.append(("", "the dfme source attacks the victim: add `victim:` (arch, num_classes, weights) to the config"))
    variants = params.get("variants")
    if variants is not None and not (isinstance(variants, list) and all(isinstance(v, dict) for v in variants)):
        return out + [("params.variants", f"must be a list of mappings of DFME settings, got {variants!r}")]
    try:
        src, _ = _dfme_settings(params, cfg)
    except Exception as e:  # AttackParamError: unknown or bad DFME setting
        return out + [("params", str(e))]
    for k in ("budget", "checkpoints", "runs", "batch_size"):
        if not isinstance(src[k], int) or isinstance(src[k], bool) or src[k] < 1:
            out.append((f"params.{k}", f"must be a positive integer, got {src[k]!r}"))
    out += [p for v in (variants or [{}]) for p in _upsample_check("dfme", {**params, **v}, cfg)]
    arch, cs = src["clone_arch"], src["clone_size"]
    if cs is not None and (not isinstance(cs, int) or isinstance(cs, bool) or not 0 < cs <= cfg.size):
        return out + [("params.clone_size", f"must be a size in px from 1 to the config's {cfg.size}, got {cs!r}")]
    if arch not in CLASSIFIERS:
        out.append(("params.clone_arch", f"unknown architecture {arch!r}; known: {', '.join(CLASSIFIERS)}"))
    elif CLASSIFIERS.unsupported(arch, cs or cfg.size, cfg.channels):
        out.append(("params.clone_arch", CLASSIFIERS.unsupported(arch, cs or cfg.size, cfg.channels)))
    return out


def _dfme_estimate(n: int, params: dict, cfg):
    """Every attack (runs x variants) stays alive until sampling: its generator with Adam's two moments
    and a gradient, its initial state and ``checkpoints`` deep-copied state dicts, its clone (SGD with
    momentum) and its replay buffer of answered queries (min(memory, budget) float32 rows)."""
    from guardian_plugin.nets import CLASSIFIERS, GeneratorA, build_classifier

    src, ps = _dfme_settings(params, cfg)
    c, s, k = cfg.channels, cfg.size, cfg.victim.num_classes if cfg.victim else 10
    attacks = src["runs"] * len(ps)
    native = [p.upsample_from or s for p in ps]   # the generator's own size
    gens = [dry_parameters(lambda p=p, g=g: GeneratorA(p.nz, c, g, p.ngf)) for p, g in zip(ps, native)]
    first = [p.nz * p.ngf * 2 * (g // 4) ** 2 for p, g in zip(ps, native)]
    clone = (dry_parameters(lambda: build_classifier(src["clone_arch"], in_channels=c, num_classes=k,
                                                     image_size=src["clone_size"] or s))
             if getattr(CLASSIFIERS.get(src["clone_arch"]), "dry_build", True) else 0)
    states = 1 + src["checkpoints"]
    big = max(ps, key=lambda p: p.ngf)
    pieces = [
        (f"dfme generators: {attacks} attack(s) x ({states} kept states + weights, gradient, Adam)",
         src["runs"] * sum(4 * g * (states + 4) for g in gens)),
        (f"dfme replay buffers ({attacks} x min(memory, budget) rows of {c}x{s}x{s})",
         src["runs"] * sum(_f32(min(p.memory, src["budget"]), c * s * s + k) for p in ps)),
        (f"dfme clones ({src['clone_arch']}, {attacks} x weights, gradient, momentum)", attacks * 3 * 4 * clone),
        (f"dfme generator activations (one batch of {src['batch_size']} at {max(native)} px)",
         _f32(src["batch_size"], max(native), max(native), 7 * big.ngf + 3 * c)),
        (f"dfme queries (one zeroth-order batch: (m + 1) x {src['batch_size']} images at {s} px)",
         max(_f32((p.m + 1) * src["batch_size"], c, s, s) for p in ps)),
        (f"dfme samples ({n} float32 images)", _f32(n, c, s, s)),
    ]
    notes = [f"dfme GeneratorA: {max(gens) / 1e6:.1f}M parameters ({max(first) / 1e6:.1f}M in its first Linear, "
             f"nz x 2 ngf x (size/4)^2); {attacks} attack(s) x {states} states kept"]
    notes += [f"dfme: the generator works at {g} px, its images upsampled ({mode}) to {s} px before every query"
              for g, mode in sorted({(g, p.upsample_mode) for g, p in zip(native, ps) if g != s})]
    return pieces, notes


def _gan_supports(size: int, channels: int):
    from guardian_plugin.nets import DCGANGenerator

    return DCGANGenerator.supports(size)


def _positive_ints(params: dict, keys) -> list:
    return [(f"params.{k}", f"must be a positive integer, got {params[k]!r}") for k in keys
            if k in params and (not isinstance(params[k], int) or isinstance(params[k], bool) or params[k] < 1)]


def _known(params: dict, known) -> list:
    unknown = sorted(set(params) - set(known))
    return [("params", f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")] if unknown else []


def _gan_check(params: dict, cfg):
    return (_known(params, ("epochs", "width", "nz", "batch_size", "lr") + UPSAMPLE_KEYS)
            + _positive_ints(params, ("epochs", "width", "nz", "batch_size")) + _upsample_check("gan", params, cfg))


def _gan_estimate(n: int, params: dict, cfg):
    g = native_size(params, cfg.size)
    return ([(f"gan samples ({n} float32 images)", _f32(n, cfg.channels, cfg.size, cfg.size))],
            [f"gan: the DCGAN works at {g} px on the generative data brought down to it (area), its samples "
             f"upsampled ({params.get('upsample_mode', 'bilinear')}) to {cfg.size} px"] if g != cfg.size else [])


def _diffusion_check(params: dict, cfg):
    out = (_known(params, ("steps", "width", "sample_steps", "batch_size", "lr") + UPSAMPLE_KEYS)
           + _positive_ints(params, ("steps", "width", "sample_steps", "batch_size"))
           + _upsample_check("diffusion", params, cfg))
    w = params.get("width", 16)
    if isinstance(w, int) and w % 8:
        out.append(("params.width", f"the UNet normalises in groups of 8 channels: width must be a multiple of 8, got {w}"))
    return out


def _diffusion_estimate(n: int, params: dict, cfg):
    from guardian_plugin.training.diffusion import _pad_size

    g = native_size(params, cfg.size)
    c, pad, w, b = cfg.channels, _pad_size(g), params.get("width", 16), params.get("batch_size", 64)
    notes = [f"diffusion: images padded to {pad} px; attention over {(pad // 4) ** 2} positions"]
    if g != cfg.size:
        notes.append(f"diffusion: the DDPM works at {g} px on the generative data brought down to it (area), its "
                     f"samples upsampled ({params.get('upsample_mode', 'bilinear')}) to {cfg.size} px")
    return ([(f"diffusion UNet activations (batch {b} at {pad} px, rough)", _f32(b, w, pad, pad, 12)),
             (f"diffusion samples ({n} float32 images)", _f32(n, c, cfg.size, cfg.size))], notes)


def _folder_check(params: dict, cfg):
    import os

    path = params.get("path", "")
    if not path:
        return [("params.path", "the folder source needs `path:` (a directory of images)")]
    if not os.path.isdir(path):
        return [("params.path", f"{path} is not a directory (relative paths are taken from the working directory "
                                f"{os.getcwd()})")]
    return []


dfme_source.supports, dfme_source.check, dfme_source.estimate = _dfme_supports, _dfme_check, _dfme_estimate
gan_source.supports, gan_source.check, gan_source.estimate = _gan_supports, _gan_check, _gan_estimate
diffusion_source.check, diffusion_source.estimate = _diffusion_check, _diffusion_estimate
folder_source.check = _folder_check
# sources whose generator can work at ``upsample_from`` px (the check asks ``supports`` at that size)
dfme_source.upsamples = gan_source.upsamples = diffusion_source.upsamples = True


def build_source(kind: str) -> Callable[..., np.ndarray]:
    return SOURCES.get(kind)


def uses_victim(kind: str) -> bool:
    """Whether a source's images depend on the victim (its cache key must then include the victim)."""
    return bool(getattr(SOURCES.get(kind), "uses_victim", False))
dfme_source.memory_advice = ("Lower the dfme source's params: upsample_from (e.g. 32: the generator works at that "
                             "size, its images upsampled to the victim's), checkpoints, runs or variants (every "
                             "attack and its kept states live until sampling), ngf or nz (the first Linear has nz x "
                             "2 ngf x (size/4)^2 parameters) or memory (replay rows, e.g. 0: the source never uses "
                             "them).")
