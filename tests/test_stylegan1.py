"""The `stylegan1-discriminator` transformation model (LGrad-compatible StyleGAN v1 discriminator)."""

import pytest
import torch

from guardian_plugin.errors import ArtifactError, ConfigError
from guardian_plugin.stylegan1 import StyleGAN1Discriminator
from guardian_plugin.transform import TransformContext, build_transform

torch.set_num_threads(1)

# Small test architecture: resolution 32, few feature maps (nf(32)=8, nf(16)=16, nf(8)=nf(4)=16).
SMALL = {"resolution": 32, "fmaps_base": 256, "fmaps_max": 16}


def _expected_256():
    """Keys and shapes of LGrad's karras2019stylegan-bedrooms-256x256_discriminator.pth, derived from the
    model it is loaded into with strict=True: chuangchuangtan/LGrad img2gad_pytorch/gen_imggrad.py calls
    genforce's build_model(gan_type='stylegan', module='discriminator', resolution=256, label_size=0,
    image_channels=3), i.e. genforce/genforce models/stylegan_discriminator.py with its defaults
    (fmaps_base 16384, fmaps_max 512, minibatch-stddev group 4 / 1 channel, fused scale at >= 128):
    one FromRGB `input{b}` per block, `layer{2b}` / `layer{2b+1}` per block, a blur kernel buffer in
    each downsampling layer, the `lod` buffer, and the final dense `layer14`."""
    nf = {256: 64, 128: 128, 64: 256, 32: 512, 16: 512, 8: 512, 4: 512, 2: 512}
    e = {"lod": ()}
    for b, res in enumerate([256, 128, 64, 32, 16, 8, 4]):
        e[f"input{b}.weight"], e[f"input{b}.bias"] = (nf[res], 3, 1, 1), (nf[res],)
        if res > 4:
            e[f"layer{2*b}.weight"], e[f"layer{2*b}.bias"] = (nf[res], nf[res], 3, 3), (nf[res],)
            e[f"layer{2*b+1}.weight"], e[f"layer{2*b+1}.bias"] = (nf[res // 2], nf[res], 3, 3), (nf[res // 2],)
            e[f"layer{2*b+1}.blur.kernel"] = (nf[res], 1, 3, 3)
    e["layer12.weight"], e["layer12.bias"] = (512, 513, 3, 3), (512,)  # +1: the minibatch-stddev channel
    e["layer13.weight"], e["layer13.bias"] = (512, 512 * 4 * 4), (512,)
    e["layer14.weight"], e["layer14.bias"] = (1, 512), (1,)
    return e


def test_state_dict_keys_match_lgrad_256():
    with torch.device("meta"):
        d = StyleGAN1Discriminator()  # LGrad's defaults: 256x256, RGB
    got = {k: tuple(v.shape) for k, v in d.state_dict().items()}
    assert got == _expected_256()


def _save_small(path, channels=3, seed=0, **over):
    torch.manual_seed(seed)
    kw = dict(SMALL, **over)
    d = StyleGAN1Discriminator(kw["resolution"], channels, kw["fmaps_base"], kw["fmaps_max"])
    sd = d.state_dict()
    for k in sd:
        if k.endswith("bias"):
            sd[k] = torch.randn_like(sd[k])
    torch.save(sd, path)
    return sd


def _build(path, channels=3, size=32, **over):
    ctx = TransformContext(channels=channels, image_size=size, artifact_dir=str(path.parent))
    return build_transform("stylegan1-discriminator", dict(SMALL, weights=path.name, **over), ctx)


def test_loads_through_registry_and_is_frozen(tmp_path):
    sd = _save_small(tmp_path / "d.pth")
    t = _build(tmp_path / "d.pth")
    loaded = t.model.disc.state_dict()
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert not any(p.requires_grad for p in t.parameters()) and not t.model.training


def test_genforce_checkpoint_layout_is_accepted(tmp_path):
    sd = _save_small(tmp_path / "d.pth")
    torch.save({"generator": {}, "discriminator": sd, "generator_smooth": {}}, tmp_path / "full.pth")
    t = _build(tmp_path / "full.pth")
    assert torch.equal(t.model.disc.layer1.weight, sd["layer1.weight"])


@pytest.mark.parametrize("channels,size", [(3, 32), (1, 28)])
def test_bounds_and_per_sample_independence(tmp_path, channels, size):
    _save_small(tmp_path / "d.pth")
    t = _build(tmp_path / "d.pth", channels=channels, size=size)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, channels, size, size, generator=g)
    r = t(x)
    assert r.shape == x.shape and r.dtype == torch.float32
    assert r.min() >= 0 and r.max() <= 255
    assert torch.allclose(r.flatten(1).amin(1), torch.zeros(4)) and torch.allclose(r.flatten(1).amax(1), torch.full((4,), 255.0))
    other = torch.rand(4, channels, size, size, generator=g)
    other[0] = x[0]
    alone = t(x[:1])
    # sample 0's representation does not depend on the rest of its batch (nor on the batch size)
    assert torch.allclose(t(other)[0], r[0], atol=1e-3)
    assert torch.allclose(alone[0], r[0], atol=1e-3)
    assert not torch.allclose(r[0], r[1])


def test_missing_weights_field_and_file(tmp_path):
    ctx = TransformContext(channels=3, image_size=32, artifact_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="weights"):
        build_transform("stylegan1-discriminator", dict(SMALL), ctx)
    with pytest.raises(ArtifactError, match="nowhere.pth"):
        build_transform("stylegan1-discriminator", dict(SMALL, weights="nowhere.pth"), ctx)


def test_corrupt_file_names_the_file(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"not a torch file")
    with pytest.raises(ArtifactError, match="bad.pth"):
        _build(tmp_path / "bad.pth")


def test_mismatched_file_names_the_file_and_what_it_holds(tmp_path):
    _save_small(tmp_path / "d64.pth", resolution=64)
    with pytest.raises(ArtifactError, match=r"d64\.pth.*resolution 64"):
        _build(tmp_path / "d64.pth")  # built for 32
    sd = _save_small(tmp_path / "d.pth")
    del sd["layer1.blur.kernel"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(ArtifactError, match="partial.pth"):
        _build(tmp_path / "partial.pth")


def test_bad_spec_values(tmp_path):
    _save_small(tmp_path / "d.pth")
    with pytest.raises(ConfigError, match="resolution"):
        _build(tmp_path / "d.pth", resolution=48)
