"""Sources that generate the way attacks on large models do (issue #14): ``upsample_from`` on the dfme,
gan and diffusion sources (and on the tanh-generator attacks), the up-front check of those settings,
the served view (TorchServe's Resize + CenterCrop) and photo crops at large sizes. Tiny budgets: the
224 px timings are benchmarks/sources_224.py's."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from guardian_plugin.attacks.dfme import DFME
from guardian_plugin.attacks.target import InProcessTarget
from guardian_plugin.errors import ConfigError
from guardian_plugin.nets import build_classifier
from guardian_plugin.training import data, pipeline
from guardian_plugin.training.config import load_train_config
from guardian_plugin.training.sources import SourceContext, build_source
from guardian_plugin.training.validate import check_config

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "data", "tiny-detector-config.yaml")


# ------------------------------------------------------------------------ what upsampling leaves
def blocks_constant(x: np.ndarray, k: int) -> bool:
    """Every k x k block of every image holds one value (nearest upsampling by k)."""
    n, c, h, w = x.shape
    b = x.reshape(n, c, h // k, k, w // k, k)
    return bool((b == b[:, :, :, :1, :, :1]).all())


def bilinear_2x_residual(x: np.ndarray) -> float:
    """Largest miss (in 0-255 levels) of the 2x bilinear (align_corners=False) relation along the rows:
    rows 2i+1, 2i+2 are 3:1 and 1:3 mixes of source rows i, i+1, so source row i = (3 r[2i+1] - r[2i+2]) / 2
    and row 2i = (a[i-1] + 3 a[i]) / 4. Zero (up to rounding) only for 2x bilinear upsampled images."""
    r = x.astype(np.float64)
    a = (3 * r[:, :, 1:-1:2] - r[:, :, 2::2]) / 2       # source rows 0 .. h/2 - 2
    pred = (a[:, :, :-1] + 3 * a[:, :, 1:]) / 4          # output rows 2, 4, ..., h - 4
    return float(np.abs(pred - r[:, :, 2:-2:2]).max())


def test_upsample_modes_leave_their_structure():
    x = torch.rand(2, 3, 16, 16)
    u8 = lambda t: data.to_uint8(t)  # noqa: E731
    assert blocks_constant(u8(data.upsample(x, 48, "nearest")), 3)
    up = u8(data.upsample(x, 32, "bilinear"))
    assert not blocks_constant(up, 2) and bilinear_2x_residual(up) <= 2.5
    assert bilinear_2x_residual(u8(torch.rand(2, 3, 32, 32))) > 50  # native noise breaks the relation
    cubic = data.upsample(x * 4 - 2, 32, "bicubic", (-1.0, 1.0))
    assert cubic.shape == (2, 3, 32, 32) and cubic.abs().max() <= 1
    with pytest.raises(ValueError, match="nearest, bilinear, bicubic"):
        data.upsample(x, 32, "area")


# --------------------------------------------------------------------------------- the sources
@pytest.fixture(scope="module")
def real64():
    return data.upsample(torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(0)), 64)


def test_gan_and_diffusion_work_at_upsample_from_and_upsample(real64):
    ctx = SourceContext(real64, progress=False)
    g = build_source("gan")(ctx, 16, epochs=1, width=8, batch_size=16, upsample_from=32, upsample_mode="nearest")
    assert g.shape == (16, 3, 64, 64) and g.dtype == np.uint8 and blocks_constant(g, 2)
    assert g[:, :, ::2, ::2].reshape(16, -1).std(1).min() > 1   # the 32 px images are not flat
    assert ctx.info["gan"]["upsample_from"] == 32
    g = build_source("gan")(ctx, 16, epochs=1, width=8, batch_size=16, upsample_from=32)  # bilinear
    assert not blocks_constant(g, 2) and bilinear_2x_residual(g) <= 2.5
    d = build_source("diffusion")(ctx, 6, steps=3, width=8, sample_steps=2, batch_size=8, upsample_from=32,
                                  upsample_mode="nearest")
    assert d.shape == (6, 3, 64, 64) and blocks_constant(d, 2) and d[:, :, ::2, ::2].std() > 10


class Recorded(torch.nn.Module):
    """A victim that keeps the shape of every batch it answers."""

    def __init__(self, net):
        super().__init__()
        self.net, self.shapes = net, []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return self.net(x)


def test_dfme_generates_small_and_queries_the_victim_at_full_size():
    torch.manual_seed(0)
    victim = Recorded(build_classifier("lenet5", in_channels=3, num_classes=10, image_size=64))
    target = InProcessTarget(victim, 10)
    clone = build_classifier("lenet5", in_channels=3, num_classes=10, image_size=64)
    atk = DFME(target, clone, budget=200, image_shape=(3, 64, 64), seed=3, progress=False, batch_size=8,
               clone_steps=1, nz=16, ngf=8, upsample_from=32, upsample_mode="nearest", mean=[0.5] * 3, std=[0.5] * 3)
    assert atk.generator(atk.z(2)).shape[-1] == 32   # the generator works at 32 px
    atk.run()
    assert victim.shapes and all(s[1:] == (3, 64, 64) for s in victim.shapes)
    assert atk.queries == target.queries == sum(s[0] for s in victim.shapes) == 192  # 8 iterations of 8 x (2 + 1)
    x = atk.sample(5)
    assert x.shape == (5, 3, 64, 64) and blocks_constant(data.to_uint8((x + 1) / 2), 2)
    with pytest.raises(ValueError, match="upsample_from .96. is above"):
        DFME(target, clone, budget=10, image_shape=(3, 64, 64), upsample_from=96, progress=False)


def test_dfme_source_with_upsample_from_and_a_small_clone():
    torch.manual_seed(0)
    victim = build_classifier("lenet5", in_channels=3, num_classes=10, image_size=64)
    ctx = SourceContext(torch.rand(4, 3, 64, 64), victim, [0.5] * 3, [0.5] * 3, progress=False)
    x = build_source("dfme")(ctx, 12, budget=96, checkpoints=1, batch_size=8, clone_steps=1, nz=16, ngf=8, memory=0,
                             upsample_from=32, clone_size=16)
    assert x.shape == (12, 3, 64, 64) and ctx.info["dfme"]["queries"] == 96
    assert bilinear_2x_residual(x) <= 2.5


# ------------------------------------------------------------------------------- the check
def config_224(tmp_path, sources, edit=None):
    raw = yaml.safe_load(open(TINY))
    raw.pop("victim")
    raw.update(channels=3, size=224, mean=[0.5] * 3, std=[0.5] * 3, cache=str(tmp_path / "cache"))
    for split, entries in raw["real"].items():
        for i, e in enumerate(entries):
            entries[i] = {"name": e["name"], "kind": "photos", "group": split, "n": 100, "seed": i}
    raw["detector"]["transform"] = "npr"
    raw["sources"] = sources
    if edit:
        edit(raw)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_check_accepts_sources_at_224_with_upsample_from(tmp_path):
    victim = tmp_path / "victim.pt"
    torch.save(build_classifier("small_resnet", in_channels=3, num_classes=10, width=4).state_dict(), victim)
    path = config_224(tmp_path, {
        "dfme": {"kind": "dfme", "n": 3000, "params": {"budget": 20000, "memory": 0, "upsample_from": 32,
                                                       "clone_size": 32}},
        "gan": {"kind": "gan", "n": 3000, "params": {"epochs": 10, "upsample_from": 32}},
        "diffusion": {"kind": "diffusion", "n": 3000, "params": {"steps": 400, "upsample_from": 64,
                                                                 "upsample_mode": "bicubic"}}},
        lambda raw: raw.update(victim={"arch": "small_resnet", "arch_params": {"width": 4}, "num_classes": 10,
                                       "weights": str(victim)},
                               served_view={"resize": 256, "crop": 224}))
    plan = check_config(*load_train_config(str(path)), str(path))
    notes = "\n".join(plan.notes)
    assert "dfme: the generator works at 32 px" in notes and "gan: the DCGAN works at 32 px" in notes
    assert "diffusion: images padded to 64 px" in notes and "upsampled (bicubic) to 224 px" in notes
    assert any("(2.1M in its first Linear" in n for n in plan.notes), plan.notes  # 256 x 128 x 8^2
    gens = next(b for f, what, b in plan.memory if what.startswith("dfme generators"))
    assert gens < 150 * 1024 ** 2  # at 224 px without upsample_from: 4 GB (6 states of a 103M generator)
    assert plan.peak_bytes < 4 * 1024 ** 3


def test_the_check_refuses_what_cannot_run_and_suggests_upsample_from(tmp_path):
    path = config_224(tmp_path, {
        "gan": {"kind": "gan", "n": 100, "params": {"epochs": 1}},
        "gan48": {"kind": "gan", "n": 100, "params": {"upsample_from": 48}},
        "big": {"kind": "diffusion", "n": 100, "params": {"upsample_from": 256}},
        "mode": {"kind": "diffusion", "n": 100, "params": {"upsample_from": 32, "upsample_mode": "area"}},
        "dfme30": {"kind": "dfme", "n": 100, "params": {"upsample_from": 30}},
        "diffusion": {"kind": "diffusion", "n": 100, "params": {}}})
    with pytest.raises(ConfigError) as e:
        check_config(*load_train_config(str(path)), str(path))
    lines = {line.split(":")[0].strip(): line for line in str(e.value).splitlines()[1:]}
    assert "28, 32 or 64 px, not 224" in lines["sources.gan"]
    assert "set params.upsample_from: 32 or 64" in lines["sources.gan"]
    assert "28, 32 or 64 px, not 48" in lines["sources.gan48.params.upsample_from"]
    assert "above the config's size (224)" in lines["sources.big.params.upsample_from"]
    assert "nearest, bilinear, bicubic" in lines["sources.mode.params.upsample_mode"]
    assert "multiple of 4, not 30" in lines["sources.dfme30.params.upsample_from"]
    assert "sources.diffusion" not in lines  # it can run at 224 px, slowly: a note suggests upsample_from
    plan = e.value.plan
    assert any(n.startswith("sources.diffusion: the diffusion generator works at 224 px itself") and
               "upsample_from: 32 or 64" in n for n in plan.notes)


def test_served_view_crop_must_be_the_size_and_mnist_cannot_be_resized(tmp_path):
    path = config_224(tmp_path, {"gan": {"kind": "gan", "n": 100, "params": {"upsample_from": 32}}},
                      lambda raw: raw.update(served_view={"resize": 256, "crop": 200}))
    with pytest.raises(ConfigError, match=r"served_view.crop \(200\) must equal size \(224\)"):
        load_train_config(str(path))
    raw = yaml.safe_load(open(TINY))
    raw.update(served_view={"resize": 32, "crop": 28}, cache=str(tmp_path / "c"))
    raw["victim"]["weights"] = os.path.join(os.path.dirname(TINY), raw["victim"]["weights"])
    path = tmp_path / "mnist.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"real.train.0 \(digits\): mnist images are 1 x 28 x 28.*served_view"):
        check_config(*load_train_config(str(path)), str(path))


# ------------------------------------------------------------------------------ served view
def test_served_view_is_what_torchserves_image_classifier_does(tmp_path):
    from ts.torch_handler.image_classifier import ImageClassifier

    rng = np.random.RandomState(0)
    handler = ImageClassifier.image_processing  # Resize(256), CenterCrop(224), ToTensor, Normalize
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

    def served(im):
        return (handler(im) * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()

    x = rng.randint(0, 256, (2, 3, 224, 224), dtype=np.uint8)   # a synthetic image as sent: 224 px
    ours = data.served_view(x, 256, 224)
    assert ours.shape == (2, 3, 224, 224)
    for a, o in zip(x, ours):
        assert np.abs(served(Image.fromarray(a.transpose(1, 2, 0))).astype(int) - o).max() <= 1
    # whole files of any shape (a folder entry) go through the view from their own size
    photo = (data._load_photo("chelsea")[0] * 255).round().astype(np.uint8)   # 300 x 451
    os.makedirs(tmp_path / "imgs")
    Image.fromarray(photo).save(tmp_path / "imgs" / "cat.png")
    got = data.image_folder(str(tmp_path / "imgs"), 224, 3, view=(256, 224))[0]
    assert np.abs(served(Image.fromarray(photo)).astype(int) - got).max() <= 1


def test_every_split_goes_through_the_served_view(tmp_path):
    """prepare-only run at 64 px with a 72 / 64 view: real images loaded at 72, every image 64 px."""
    path = config_224(tmp_path, {"gan": {"kind": "gan", "n": 20, "params": {"epochs": 1, "width": 8,
                                                                           "upsample_from": 32}}},
                      lambda raw: raw.update(size=64, served_view={"resize": 72, "crop": 64}))
    cfg, base = load_train_config(str(path))
    for split in (cfg.real.train, cfg.real.calibrate, cfg.real.evaluate):
        split[0].n = 10
    e = cfg.real.train[0]
    x = pipeline.load_real(e, cfg, base)
    crops = data.photo_crops(e.group, e.n, 72, 3, seed=e.seed)   # loaded at the view's resize, then cropped
    assert x.shape == (10, 3, 64, 64) and np.array_equal(x, crops[:, :, 4:68, 4:68])
    report = pipeline.train_detector(cfg, base, str(tmp_path / "out"), progress=False, prepare_only=True)
    assert report["sources"]["gan"]["served_view"] == {"resize": 72, "crop": 64}
    raw = np.load(report["sources"]["gan"]["cache"])["x"]           # the cache keeps the source's own images
    assert raw.shape == (20, 3, 64, 64)
    served = pipeline.as_served(raw, cfg)
    assert served.shape == raw.shape and not np.array_equal(served, raw)
    assert pipeline.source_cache_key(cfg, cfg.sources["gan"], None) != pipeline.source_cache_key(
        cfg.model_copy(update={"served_view": None}), cfg.sources["gan"], None)


# -------------------------------------------------------------------------------- photo crops
def test_photo_crops_at_large_sizes_are_never_upscaled_more_than_2x():
    assert data.photo_side_range(303, 224) == (227, 303)          # coins: native or larger, never below 224
    assert data.photo_side_range(300, 224) == (225, 300)
    assert data.photo_side_range(172, 224) == (129, 172)          # text: at most 224 / 129 = 1.7x
    assert data.photo_side_range(25, 224) is None                 # LFW faces: 9x, left out
    assert data.photo_side_range(102, 224) is None                # microaneurysms
    assert data.photo_side_range(25, 28) == (18, 25)              # 28 / 32 px: as before (the MNIST example)
    assert data.photo_side_range(25, 32) == (18, 25) and data.photo_side_range(25, 64) is None
    inv = data.photo_inventory(224)
    for group, v in inv.items():
        print(f"photos at 224 px, group {group}: {len(v['used'])} photos used "
              f"({', '.join(n for n, *_ in v['used'])}); left out: {len(v['left_out'])}")
    assert [len(inv[g]["used"]) for g in ("train", "calibrate", "evaluate")] == [8, 5, 8]
    assert not any(n.startswith("lfw") for v in inv.values() for n, *_ in v["used"])
    x = data.photo_crops("calibrate", 6, 224, 3, seed=0)
    assert x.shape == (6, 3, 224, 224) and x.std() > 5


def test_dcgan_generator_makes_the_size_it_is_built_for():
    from guardian_plugin.nets import DCGANGenerator

    for size in DCGANGenerator.SIZES:  # 64 px came out at 32 px before the third 2x step
        assert DCGANGenerator(8, 3, size, 8).eval()(torch.randn(2, 8)).shape == (2, 3, size, size)
