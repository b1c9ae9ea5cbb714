"""The shared CIFAR-10 JPEG copy and the CIFAR ResNets (docs/cifar10.md): named splits that are
disjoint, deterministic and stratified; a clear error when the data folder is missing; small slices
that load in well under a second; checkpoints that load into the project's own network. Tests that
read the data skip, saying where they looked, only when the shared folder is absent."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from guardian_plugin.nets import build_classifier
from guardian_plugin.training import data
from guardian_plugin.training.common import accuracy
from guardian_plugin.training.data import (CIFAR10_SPLITS, cifar10, cifar10_split, cifar10_split_indices, data_root,
                                           normalise, to_float)

needs_data = pytest.mark.skipif(not os.path.isdir(os.path.join(data_root(), "cifar10-jpeg")),
                                reason=f"no shared CIFAR-10 copy at {data_root()}/cifar10-jpeg (set GUARDIAN_DATA)")


def test_missing_data_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GUARDIAN_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere'}.*GUARDIAN_DATA.*cifar10-jpeg"):
        cifar10_split("test", 10)
    with pytest.raises(FileNotFoundError, match="cifar10-resnets"):
        build_classifier("cifar_resnet20", pretrained=True)


@needs_data
def test_splits_are_disjoint_deterministic_and_stratified():
    idx = {name: cifar10_split_indices(name) for name in CIFAR10_SPLITS}
    for name, (part, i) in idx.items():   # deterministic
        again = cifar10_split_indices(name)
        assert again[0] == part and (again[1] == i).all()
    train = [i for part, i in idx.values() if part == "train"]
    assert sum(len(i) for i in train) == len(np.unique(np.concatenate(train))) == 50000
    # pinned: a changed split would silently mix the victim's training images into the detector's
    assert idx["victim_train"][1][:3].tolist() == [398, 5597, 13488]
    assert idx["calibrate"][1][:3].tolist() == [1849, 6214, 14950]
    for name, (part, i) in idx.items():
        labels = np.load(os.path.join(data_root(), "cifar10-jpeg", f"{part}.npz"))["labels"][i]
        assert len(i) == 10 * CIFAR10_SPLITS[name][1] and len(np.unique(i)) == len(i)
        assert (np.bincount(labels, minlength=10) == CIFAR10_SPLITS[name][1]).all()
        assert (labels[:30] == np.arange(30) % 10).all()   # any prefix is stratified


@needs_data
def test_a_small_slice_decodes_alone_and_matches_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CACHE_DIR", str(tmp_path))   # an empty cache
    x, y = cifar10_split("test", 20)
    assert x.shape == (20, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    assert (y == np.arange(20) % 10).all()
    assert not (tmp_path / "cifar10-jpeg").exists()         # only the slice was decoded
    _, i = cifar10_split_indices("test")
    xa, ya = cifar10("test")                                  # the whole file: decoded and cached
    assert len(list((tmp_path / "cifar10-jpeg").glob("test-*.npy"))) == 2
    assert (xa[i[:20]] == x).all() and (ya[i[:20]] == y).all()
    assert (cifar10_split("test", 20)[0] == x).all()         # now read from the cache


@needs_data
def test_pretrained_cifar_resnets_load_and_score():
    for depth in (20, 32, 44, 56):   # strict loading: every key of every checkpoint matches
        build_classifier(f"cifar_resnet{depth}", pretrained=True)
    x, y = cifar10_split("test", 500)
    m = build_classifier("cifar_resnet20", pretrained=True)
    torch.set_num_threads(1)
    acc = accuracy(m, normalise(to_float(x), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), torch.from_numpy(y))
    assert 0.75 <= acc <= 0.87   # 81.0% on the whole JPEG test split (docs/cifar10.md)
