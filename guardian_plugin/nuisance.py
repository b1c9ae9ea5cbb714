"""Nuisance changes of real photographs: what ordinary clients' images go through (compression, a
low-resolution camera, focus, sensor noise, framing), as PIL transforms.

The distribution test's benign envelope (guardian_plugin.distribution) is declared as a list of specs,
``NAME:PARAMETER``: the reference's rates cover the reference images as they are and under each of them.
The benign-traffic suite (benchmarks/benign_suite.py) draws its clients' changes from the same
functions, at its own parameters.

=============  ==========================================================  ======================
spec           change                                                      parameter
=============  ==========================================================  ======================
jpeg:Q         a JPEG round trip at quality Q                              1-100
png            a PNG round trip (lossless)                                 -
downup:S       down-sampled to S of the side (bilinear), then back up      0 < S < 1
blur:R         a Gaussian blur of radius R px (PIL GaussianBlur)           R > 0
noise:S        additive Gaussian sensor noise, sigma S (0-255 scale)       S > 0
rotate:D       a rotation by a uniform angle in [-D, D] degrees            D > 0
translate:F    a shift by up to F of the side, each axis                   0 < F < 0.5
zoom:F         a random crop of F..1 of the side, resized back             0 < F < 1
brightness:F   brightness scaled by a uniform factor in [1 - F, 1 + F]     0 < F < 1
contrast:F     contrast scaled by a uniform factor in [1 - F, 1 + F]       0 < F < 1
saturation:F   colour saturation scaled by a uniform factor in [1-F, 1+F]  0 < F < 1 (colour only)
hue:F          the hue shifted by a uniform F in [-F, F] of the circle     0 < F < 0.5 (colour only)
hflip          mirrored left-right                                         -
=============  ==========================================================  ======================
"""

from __future__ import annotations

import io
from typing import Callable, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from guardian_plugin.errors import ConfigError

# The envelope the examples' references are built with (docs/refusal-rule.md): the strongest change of
# each kind a defender of a photo service would call ordinary. Photometric changes (brightness, contrast,
# colour) and flips are deliberately not in it: the benign-traffic suite measures them as changes the
# envelope was not told about.
DEFAULT_ENVELOPE = ("jpeg:30", "downup:0.5", "blur:1.0", "noise:4", "rotate:10", "translate:0.08", "zoom:0.85")

Transform = Callable[[Image.Image, np.random.Generator], Image.Image]


def codec(fmt: str, **kw) -> Transform:
    def f(im, rng):
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        return Image.open(io.BytesIO(buf.getvalue())).convert(im.mode)
    return f


def down_up(scale: float) -> Transform:
    def f(im, rng):
        w, h = im.size
        small = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        return small.resize((w, h), Image.BILINEAR)
    return f


def blur(radius: float) -> Transform:
    return lambda im, rng: im.filter(ImageFilter.GaussianBlur(radius))


def enhance(kind, lo: float, hi: float) -> Transform:
    return lambda im, rng: kind(im).enhance(float(rng.uniform(lo, hi)))


def hue(delta: float) -> Transform:
    def f(im, rng):
        h, s, v = im.convert("HSV").split()
        shift = int(round(rng.uniform(-delta, delta) * 255))
        h = h.point(lambda p: (p + shift) % 256)
        return Image.merge("HSV", (h, s, v)).convert("RGB")
    return f


def edge_fill(im: Image.Image):
    """Fill for pixels a rotation or shift uncovers: the mean border colour (black for digits)."""
    a = np.asarray(im).astype(np.float64)
    border = np.concatenate([a[0].reshape(-1, *a.shape[2:]), a[-1].reshape(-1, *a.shape[2:]),
                             a[:, 0].reshape(-1, *a.shape[2:]), a[:, -1].reshape(-1, *a.shape[2:])])
    m = border.mean(0)
    return int(round(float(m))) if np.ndim(m) == 0 else tuple(int(round(v)) for v in m)


def rotate(deg: float) -> Transform:
    return lambda im, rng: im.rotate(float(rng.uniform(-deg, deg)), Image.BILINEAR, fillcolor=edge_fill(im))


def zoom(lo: float, hi: float = 1.0) -> Transform:
    """A random crop of lo..hi of the side, resized back (a slightly zoomed-in shot)."""
    def f(im, rng):
        w, h = im.size
        s = float(rng.uniform(lo, hi))
        cw, ch = max(2, round(w * s)), max(2, round(h * s))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BILINEAR)
    return f


def translate(px: float) -> Transform:
    """A shift by up to ``px`` pixels each axis (a float below 1: that share of the side)."""
    def f(im, rng):
        lim = [max(1, round(px * s)) if px < 1 else int(px) for s in im.size]
        dx, dy = (int(rng.integers(-m, m + 1)) for m in lim)
        return im.transform(im.size, Image.AFFINE, (1, 0, dx, 0, 1, dy), fillcolor=edge_fill(im))
    return f


def noise(sigma: float) -> Transform:
    def f(im, rng):
        a = np.asarray(im).astype(np.float32)
        return Image.fromarray(np.clip(a + rng.normal(0, sigma, a.shape), 0, 255).round().astype(np.uint8))
    return f


def hflip() -> Transform:
    return lambda im, rng: im.transpose(Image.FLIP_LEFT_RIGHT)


# name -> (factory of the parameter, whether it takes one, the parameter's allowed range (lo, hi, open))
_KINDS = {
    "jpeg": (lambda q: codec("JPEG", quality=int(q)), (1, 100)),
    "png": (lambda: codec("PNG"), None),
    "downup": (down_up, (0.0, 1.0)),
    "blur": (blur, (0.0, 50.0)),
    "noise": (noise, (0.0, 255.0)),
    "rotate": (rotate, (0.0, 180.0)),
    "translate": (translate, (0.0, 0.5)),
    "zoom": (zoom, (0.0, 1.0)),
    "brightness": (lambda f: enhance(ImageEnhance.Brightness, 1 - f, 1 + f), (0.0, 1.0)),
    "contrast": (lambda f: enhance(ImageEnhance.Contrast, 1 - f, 1 + f), (0.0, 1.0)),
    "saturation": (lambda f: enhance(ImageEnhance.Color, 1 - f, 1 + f), (0.0, 1.0)),
    "hue": (hue, (0.0, 0.5)),
    "hflip": (hflip, None),
}
COLOUR_ONLY = {"saturation", "hue"}


def parse(spec: str) -> Transform:
    """The transform of one spec (module docstring); a ConfigError naming the allowed specs otherwise."""
    name, _, arg = str(spec).partition(":")
    if name not in _KINDS:
        raise ConfigError(f"nuisance {spec!r}: unknown kind {name!r}; known: {', '.join(sorted(_KINDS))} "
                          "(guardian_plugin/nuisance.py)")
    make, bounds = _KINDS[name]
    if bounds is None:
        if arg:
            raise ConfigError(f"nuisance {spec!r}: {name} takes no parameter")
        return make()
    try:
        v = float(arg)
    except ValueError:
        raise ConfigError(f"nuisance {spec!r}: {name} needs a number, as {name}:{bounds[1] / 2:g}") from None
    lo, hi = bounds
    if not lo < v <= hi or (name in ("downup", "zoom") and v >= 1.0):
        raise ConfigError(f"nuisance {spec!r}: the parameter must lie in ({lo:g}, {hi:g}{')' if name in ('downup', 'zoom') else ']'}")
    return make(v)


def check(specs: Sequence[str], channels: int) -> List[str]:
    """``specs`` validated (parse), colour-only kinds refused for grayscale images."""
    out = []
    for s in specs:
        parse(s)
        if channels == 1 and s.partition(":")[0] in COLOUR_ONLY:
            raise ConfigError(f"nuisance {s!r}: a colour change, and the images are grayscale")
        out.append(str(s))
    return out


def to_pil(a: np.ndarray) -> Image.Image:
    """A uint8 (C, H, W) array as a PIL image (L or RGB)."""
    return Image.fromarray(a[0]) if a.shape[0] == 1 else Image.fromarray(a.transpose(1, 2, 0))


def to_array(im: Image.Image, channels: int) -> np.ndarray:
    a = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def apply(spec_or_fn, x: np.ndarray, seed: int = 0, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """uint8 (N, C, H, W) images under one nuisance (a spec or a transform), fresh random parameters per
    image from ``seed`` (or ``rng``)."""
    fn = parse(spec_or_fn) if isinstance(spec_or_fn, str) else spec_or_fn
    rng = rng if rng is not None else np.random.default_rng(seed)
    c = x.shape[1]
    return np.stack([to_array(fn(to_pil(a), rng), c) for a in x]) if len(x) else x.copy()
