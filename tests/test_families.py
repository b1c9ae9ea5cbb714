"""The held-out generator families (guardian_plugin/evaluation/families.py) at tiny sizes."""

import numpy as np
import pytest
import torch

from guardian_plugin.evaluation.families import FAMILIES, FamilyContext, generate, hf_energy_rule
from guardian_plugin.training.augment import AugmentConfig, augment
from guardian_plugin.training.data import to_float, to_uint8

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
TINY = {  # one or two training steps, narrow networks
    "vae": {"epochs": 1, "width": 8, "nz": 8, "batch_size": 16},
    "gan_transposed": {"epochs": 1, "width": 8, "nz": 8, "batch_size": 16},
    "gan_bilinear": {"epochs": 1, "width": 8, "nz": 8, "batch_size": 16},
    "random_bn_train": {"inits": 2, "ngf": 8, "nz": 16},
    "random_bn_eval": {"inits": 2, "ngf": 8, "nz": 16},
    "ddim_few_steps": {"steps": 3, "width": 8, "batch_size": 4, "sample_steps": (2, 3)},  # OneCycleLR needs 3
}


@pytest.fixture(scope="module")
def real01():
    return torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def ctx_of(real01, cache_dir):
    return FamilyContext(real01, MEAN, STD, seed=3, cache_dir=str(cache_dir))


def test_registry_names():
    assert set(FAMILIES.names()) == set(TINY) | {"laundered"}


@pytest.mark.parametrize("name", sorted(TINY))
def test_shape_dtype_and_determinism(name, real01, tmp_path):
    a = generate(name, ctx_of(real01, tmp_path / "a"), 6, **TINY[name])
    b = generate(name, ctx_of(real01, tmp_path / "b"), 6, **TINY[name])  # fitted again, not cached
    assert a.shape == (6, 3, 32, 32) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_eval_mode_has_lower_contrast(real01, tmp_path):
    ctx = ctx_of(real01, tmp_path)
    std = {m: to_float(generate(f"random_bn_{m}", ctx, 8, jpeg75=False, **TINY["random_bn_train"])).flatten(1).std(1)
           for m in ("train", "eval")}
    assert std["eval"].mean() < 0.5 * std["train"].mean()


def test_laundered_differs_from_its_input(real01, tmp_path):
    ctx = ctx_of(real01, tmp_path)
    raw = generate("random_bn_train", ctx, 6, jpeg75=False, **TINY["random_bn_train"])
    washed = generate("laundered:random_bn_train", ctx, 6, jpeg75=False, **TINY["random_bn_train"])
    assert washed.shape == raw.shape
    assert all((w != r).any() for w, r in zip(washed, raw))
    with pytest.raises(ValueError, match="laundered:<family>"):
        generate("laundered", ctx, 2)


def test_jpeg75_changes_the_output(real01, tmp_path):
    ctx = ctx_of(real01, tmp_path)
    assert (generate("random_bn_train", ctx, 2, **TINY["random_bn_train"])
            != generate("random_bn_train", ctx, 2, jpeg75=False, **TINY["random_bn_train"])).any()


def test_cache_is_hit_the_second_time(real01, tmp_path):
    ctx = ctx_of(real01, tmp_path)
    first = generate("gan_bilinear", ctx, 4, **TINY["gan_bilinear"])
    assert ctx.info["cached"] == [] and len(list(tmp_path.glob("gan_bilinear-*.pt"))) == 1
    second = generate("gan_bilinear", ctx, 4, **TINY["gan_bilinear"])
    assert ctx.info["cached"] == ["gan_bilinear"]
    np.testing.assert_array_equal(first, second)
    generate("gan_bilinear", ctx, 4, **{**TINY["gan_bilinear"], "epochs": 2})  # other settings: another entry
    assert ctx.info["cached"] == [] and len(list(tmp_path.glob("gan_bilinear-*.pt"))) == 2


def test_hf_rule_flags_blur_not_real(real01):
    calib = to_uint8(real01)
    rule = hf_energy_rule(calib)
    assert rule(calib).mean() <= 0.07  # outside the 2.5-97.5th percentiles: about 5% of its own images
    blurred = to_uint8(augment(real01[:4], AugmentConfig(crop_pad=0, flip=0, blur=1, blur_sigma=(1.0, 1.0), jpeg=0)))
    assert rule(blurred).all()
