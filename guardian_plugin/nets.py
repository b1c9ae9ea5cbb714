"""Network architectures shared by the victim example, the detector and the attacks.

Everything here is plain torch and sized for 28-64 px images; larger inputs use torchvision models
through :func:`build_classifier`.
"""

from __future__ import annotations

import os
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from guardian_plugin.registry import Registry

CLASSIFIERS: Registry = Registry("classifier architecture")


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm. Where the shape changes, the shortcut is a 1x1 conv + batch norm
    (option B), or with ``pad_shortcut`` He et al.'s parameter-free option A: stride-2 subsampling
    ``x[:, :, ::2, ::2]`` and zero-padded channels."""

    def __init__(self, cin: int, cout: int, stride: int = 1, pad_shortcut: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        self.pad = (cout - cin) // 2 if pad_shortcut and (stride != 1 or cin != cout) else None
        if self.pad is None and (stride != 1 or cin != cout):
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)  # in place: the same values, fewer allocations
        out = self.bn2(self.conv2(out))
        if self.pad is not None:
            x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        elif self.short is not None:
            x = self.short(x)
        out += x
        return F.relu(out, inplace=True)


class SmallResNet(nn.Module):
    """A ResNet for 28-64 px inputs: stem conv, three stages of ``blocks`` basic blocks, global pool.

    ``width`` is the first stage's channels (doubled per stage). Batch norm runs in eval mode at
    inference, so one sample's output never depends on the rest of its batch.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, blocks: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        layers, cin = [], width
        for i, cout in enumerate((width, width * 2, width * 4)):
            for b in range(blocks):
                layers.append(BasicBlock(cin, cout, stride=2 if (i > 0 and b == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (depth 6n+2): a 3x3 conv, three stages of ``n`` basic blocks with 16, 32,
    64 channels and option-A shortcuts, global pool, linear. Its state-dict keys are those of the
    pretrained checkpoints in ../shared/data/cifar10-resnets (akamaster/pytorch_resnet_cifar10)."""

    def __init__(self, depth: int = 20, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for i, cout in enumerate((16, 32, 64), 1):
            blocks = [BasicBlock(cin if b == 0 else cout, cout, 2 if (i > 1 and b == 0) else 1, pad_shortcut=True)
                      for b in range(n)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = cout
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def load_cifar_resnet_checkpoint(model: CifarResNet, depth: int) -> CifarResNet:
    """Load the shared pretrained ResNet-``depth`` (``module.``-prefixed keys) into ``model``."""
    import glob

    from guardian_plugin.training.data import data_path

    folder = data_path("cifar10-resnets")
    files = sorted(glob.glob(os.path.join(folder, f"resnet{depth}-*.th")))
    if not files:
        raise FileNotFoundError(f"no resnet{depth}-*.th checkpoint in {folder}")
    sd = torch.load(files[0], map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()})
    return model


class LeNet5(nn.Module):
    """The classic small CNN, a cheap clone architecture for the MNIST example."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(256), nn.ReLU(), nn.Linear(256, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


@CLASSIFIERS.register("small_resnet")
def _small_resnet(in_channels=1, num_classes=10, width=16, blocks=1, **_):
    """A small ResNet (``width``, ``blocks`` per stage), any channels and size: the detectors' default."""
    return SmallResNet(in_channels, num_classes, width, blocks)


def _cifar_resnet(depth):
    def make(in_channels=3, num_classes=10, pretrained=False, **_):
        """The CIFAR ResNet of that depth (32 px inputs); ``pretrained``: the shared checkpoint (CIFAR-10 trained, inputs normalised with ImageNet's
        mean and std)."""
        m = CifarResNet(depth, in_channels, num_classes)
        return load_cifar_resnet_checkpoint(m, depth) if pretrained else m

    return make


for _depth in (20, 32, 44, 56):
    CLASSIFIERS.register(f"cifar_resnet{_depth}")(_cifar_resnet(_depth))


@CLASSIFIERS.register("lenet5")
def _lenet(in_channels=1, num_classes=10, image_size=28, **_):
    """LeNet-5 (the MNIST example's victim), any channels and size."""
    m = LeNet5(in_channels, num_classes)
    m(torch.zeros(1, in_channels, image_size, image_size))  # materialise the lazy layer
    return m


def _torchvision(arch):
    def make(in_channels=3, num_classes=10, cifar_stem=False, **_):
        """torchvision's ResNet of that depth, untrained; ``cifar_stem`` swaps the ImageNet stem (7x7 stride-2 conv, max-pool) for
        one 3x3 stride-1 conv, the CIFAR variant DFME and the paper use for 32x32 inputs."""
        import torchvision

        m = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        if cifar_stem:
            m.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            m.maxpool = nn.Identity()
        elif in_channels != 3:
            m.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        return m

    return make


for _arch in ("resnet18", "resnet34", "resnet50"):
    CLASSIFIERS.register(_arch)(_torchvision(_arch))


@CLASSIFIERS.register("effnet_lite0_head")
def _effnet_lite0_head(**kw):
    """The frozen ImageNet-pretrained EfficientNet-Lite0 with a small trainable head (pretrained.py)."""
    from guardian_plugin.pretrained import EffNetLite0Head

    return EffNetLite0Head(**kw)


@CLASSIFIERS.register("effnet_lite0_imagenet")
def _effnet_lite0_imagenet(in_channels=3, num_classes=1000, **_):
    """The ImageNet-pretrained EfficientNet-Lite0 classifier taking ImageNet-normalised input (pretrained.py;
    the ImageNet example's victim): 3 channels, 1000 classes, the weights from its pip package."""
    from guardian_plugin.errors import ConfigError
    from guardian_plugin.pretrained import ImageNetInputLite0

    if (in_channels, num_classes) != (3, 1000):
        raise ConfigError(f"effnet_lite0_imagenet is the pretrained 3-channel, 1000-class network, not "
                          f"{in_channels} channels / {num_classes} classes")
    return ImageNetInputLite0()


def build_classifier(arch: str, **kw) -> nn.Module:
    return CLASSIFIERS.get(arch)(**kw)


def architectures() -> List[Tuple[str, str]]:
    """(name, first sentence of its factory's docstring) for every registered classifier architecture,
    what a detector config's ``victim.arch`` and ``detector.arch`` may name (the `--check` error and
    docs/detector.md are generated from it: ``python -m guardian_plugin.nets``)."""
    out = []
    for name in CLASSIFIERS:
        doc = " ".join((CLASSIFIERS.get(name).__doc__ or "").split())
        out.append((name, doc.split(". ")[0].rstrip(".") if doc else "(no description)"))
    return out


def architectures_markdown() -> str:
    """The table of :func:`architectures` docs/detector.md holds (a test compares the two)."""
    trunk = set(trunk_archs())
    rows = ["| `arch` | what it is | shared trunk |", "|---|---|---|"]
    rows += [f"| `{n}` | {d.replace('|', '/').replace('``', '`')} | {'yes' if n in trunk else ''} |" for n, d in architectures()]
    return "\n".join(rows) + "\n"


# A shared trunk (the detector's ``trunks``): the classifier without its last linear layer, which each
# architecture that can be split names here as ``head`` (the attribute holding that layer).
_small_resnet.head = "fc"
for _arch in ("resnet18", "resnet34", "resnet50"):
    CLASSIFIERS.get(_arch).head = "fc"


def fold_pairs(pairs) -> None:
    """Merge, in place, each ``(module, conv attribute, batch-norm attribute)`` pair: the convolution
    gets the folded weight and bias, the batch norm becomes an identity (eval-mode statistics)."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    for m, c, n in pairs:
        conv, bn = getattr(m, c), getattr(m, n)
        w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        conv.weight, conv.bias = nn.Parameter(w.detach(), conv.weight.requires_grad), nn.Parameter(b.detach(), conv.weight.requires_grad)
        setattr(m, n, nn.Identity())


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` with every batch norm that follows a convolution merged into it
    (``convN``/``bnN`` attribute pairs, and a conv followed by a batch norm in a Sequential: the layouts
    of SmallResNet, BasicBlock and torchvision's ResNets); ``model`` itself is unchanged. The same
    function as in eval mode, one pass over the activations fewer per convolution, different rounding."""
    import copy

    m = copy.deepcopy(model).eval()
    pairs = []
    for mod in m.modules():
        if isinstance(mod, nn.Sequential):
            pairs += [(mod, str(i), str(i + 1)) for i in range(len(mod) - 1)
                      if isinstance(mod[i], nn.Conv2d) and isinstance(mod[i + 1], nn.BatchNorm2d)]
        pairs += [(mod, f"conv{k}", f"bn{k}") for k in (1, 2, 3)
                  if isinstance(getattr(mod, f"conv{k}", None), nn.Conv2d)
                  and isinstance(getattr(mod, f"bn{k}", None), nn.BatchNorm2d)]
    fold_pairs(pairs)
    return m


def _grouped_conv(convs, shared_input: bool) -> nn.Conv2d:
    """K convolutions of one shape as one: side by side on a shared input, else grouped (K groups) on
    the K inputs stacked along the channels."""
    c0, k = convs[0], len(convs)
    w = c0.weight
    out = nn.Conv2d(c0.in_channels * (1 if shared_input else k), c0.out_channels * k, c0.kernel_size, c0.stride,
                    c0.padding, groups=1 if shared_input else k, bias=True, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat([c.weight for c in convs]))
        out.bias.copy_(torch.cat([c.bias if c.bias is not None else w.new_zeros(c.out_channels) for c in convs]))
    return out.requires_grad_(False)


class _FusedBlock(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.conv1 = _grouped_conv([b.conv1 for b in blocks], False)
        self.conv2 = _grouped_conv([b.conv2 for b in blocks], False)
        self.short = _grouped_conv([b.short[0] for b in blocks], False) if blocks[0].short is not None else None

    def forward(self, x):
        out = self.conv2(F.relu(self.conv1(x), inplace=True))
        out += self.short(x) if self.short is not None else x
        return F.relu(out, inplace=True)


class FusedSmallResNets(nn.Module):
    """K single-output SmallResNets of one shape on the same input, run as one network: batch norms
    folded, the K stems side by side, every later convolution grouped (K groups), each net's linear layer
    on its own slice of the pooled features. (B, C, H, W) -> (B, K): the K nets' outputs (eval mode),
    rounded differently. One pass of K-times-wider layers instead of K passes: for the small shapes of
    28-32 px detectors, fewer and larger kernels (benchmarks/guard_cost.py)."""

    def __init__(self, nets):
        super().__init__()
        if not self.fusable(nets):
            raise ValueError("FusedSmallResNets needs two or more single-output SmallResNets of one shape")
        folded = [fold_batchnorm(n) for n in nets]
        self.k = len(folded)
        self.stem = _grouped_conv([n.stem[0] for n in folded], True)
        self.layers = nn.Sequential(*[_FusedBlock([n.layers[i] for n in folded]) for i in range(len(folded[0].layers))])
        self.register_buffer("fc_weight", torch.stack([n.fc.weight[0].detach() for n in folded]))  # (K, F)
        self.register_buffer("fc_bias", torch.cat([n.fc.bias.detach() for n in folded]))  # (K,)

    @staticmethod
    def fusable(nets) -> bool:
        if len(nets) < 2 or not all(isinstance(n, SmallResNet) and n.fc.out_features == 1 for n in nets):
            return False
        shapes = [[tuple(v.shape) for v in n.state_dict().values()] for n in nets]
        return all(s == shapes[0] for s in shapes) and all(b.pad is None for n in nets for b in n.layers)

    def forward(self, x):
        h = self.layers(F.relu(self.stem(x), inplace=True))
        feats = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1).view(x.shape[0], self.k, -1)
        return (feats * self.fc_weight).sum(2) + self.fc_bias


def trunk_archs() -> list:
    """The architectures that can serve as a shared trunk."""
    return [n for n in CLASSIFIERS if getattr(CLASSIFIERS.get(n), "head", None)]


def build_trunk(arch: str, **kw) -> nn.Module:
    """``arch`` up to its pooled features: (B, C, H, W) -> (B, ``out_features``); the classifier's last
    linear layer becomes an identity, so the trunk's state dict is the classifier's without it."""
    head = getattr(CLASSIFIERS.get(arch), "head", None)
    if head is None:
        raise ValueError(f"architecture {arch!r} cannot be a shared trunk; these can: {', '.join(trunk_archs())}")
    m = build_classifier(arch, **{**kw, "num_classes": 1})
    m.out_features = getattr(m, head).in_features
    setattr(m, head, nn.Identity())
    return m


# What each architecture can take, next to it: ``supports(size, channels, **arch_params)`` returns None or
# why not (checked by ``guardian train-detector --check`` before anything is trained). ``dry_build = False``
# marks factories that load weights when built, which the check must not build on the meta device.
_lenet.supports = lambda size, channels, **_: (None if size >= 4 else
                                               f"LeNet-5 pools twice by 2 and needs at least 4 px, not {size}")
_effnet_lite0_head.supports = lambda size, channels, **_: (
    None if channels in (1, 3) else f"effnet_lite0_head takes 1- or 3-channel inputs, not {channels}")
_effnet_lite0_head.dry_build = False
_effnet_lite0_imagenet.supports = lambda size, channels, **_: (
    None if channels == 3 else f"effnet_lite0_imagenet takes 3-channel inputs, not {channels}")
_effnet_lite0_imagenet.dry_build = False  # loads the pretrained weights when built


def _cifar_supports(size, channels, pretrained=False, **_):
    if pretrained and channels != 3:
        return f"the pretrained CIFAR ResNet checkpoints take 3 channels, not {channels}"
    return None


for _depth in (20, 32, 44, 56):
    CLASSIFIERS.get(f"cifar_resnet{_depth}").supports = _cifar_supports
    CLASSIFIERS.get(f"cifar_resnet{_depth}").dry_build = False  # pretrained=True loads a checkpoint


# ----------------------------------------------------------------------------------------- GANs
class DCGANGenerator(nn.Module):
    """DCGAN-style generator for ``size`` in {28, 32, 64}: transposed convolutions (the upsampling
    whose checkerboard artefacts the detector learns). Output in [0, 1] pixel space."""

    SIZES = (28, 32, 64)  # the layouts below; train-detector's check reads them (supports)

    @classmethod
    def supports(cls, size: int) -> str | None:
        """None when ``size`` is one of :attr:`SIZES`, else why not."""
        return None if size in cls.SIZES else (f"the DCGAN generator supports {', '.join(map(str, cls.SIZES[:-1]))} "
                                               f"or {cls.SIZES[-1]} px, not {size}")

    def __init__(self, nz: int = 64, channels: int = 1, size: int = 28, width: int = 64):
        super().__init__()
        if self.supports(size):
            raise ValueError(f"DCGANGenerator: {self.supports(size)}")
        self.nz, self.size = nz, size
        s0 = 7 if size == 28 else 4 if size == 32 else 8
        self.s0 = s0
        self.fc = nn.Sequential(nn.Linear(nz, width * 4 * s0 * s0), nn.BatchNorm1d(width * 4 * s0 * s0), nn.ReLU())
        ups = [
            nn.ConvTranspose2d(width * 4, width * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2), nn.ReLU(),
            nn.ConvTranspose2d(width * 2, width, 4, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        ]
        if size in (32, 64):  # 4 -> 32 and 8 -> 64: a third 2x step (64 px came out at 32 px without it)
            ups += [nn.ConvTranspose2d(width, width, 4, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        ups += [nn.Conv2d(width, channels, 3, 1, 1), nn.Sigmoid()]
        self.net = nn.Sequential(*ups)
        self.width = width

    def forward(self, z):
        return self.net(self.fc(z).view(z.shape[0], self.width * 4, self.s0, self.s0))


class DCGANDiscriminator(nn.Module):
    """Strided-conv discriminator with no batch-coupling layer (no batch norm, no minibatch stddev):
    each sample's output depends on that sample alone, so one backward pass over a batch gives every
    sample's own input gradient. Input: [0, 1] pixel images; returns one logit per sample."""

    def __init__(self, channels: int = 1, width: int = 64):
        super().__init__()
        sn = nn.utils.spectral_norm
        self.net = nn.Sequential(
            sn(nn.Conv2d(channels, width, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(width, width * 2, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(width * 2, width * 4, 3, 2, 1)), nn.LeakyReLU(0.2),
        )
        self.fc = sn(nn.Linear(width * 4, 1))

    def forward(self, x):
        h = self.net(x * 2 - 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)).squeeze(1)


class GeneratorA(nn.Module):
    """The DFME / DisGUIDE / Dual Students generator ("GeneratorA"): nearest-neighbour upsampling and
    convolutions, tanh output in [-1, 1] fed to the victim as an already-normalised input."""

    @staticmethod
    def supports(size: int) -> str | None:
        """Two 2x nearest upsamplings from ``size // 4``: the output is ``size`` px only for multiples of 4."""
        return None if size % 4 == 0 and size >= 4 else f"GeneratorA needs a size that is a multiple of 4, not {size}"

    def __init__(self, nz: int = 256, channels: int = 1, size: int = 28, ngf: int = 64):
        super().__init__()
        self.nz = nz
        self.s0 = size // 4
        self.l1 = nn.Linear(nz, ngf * 2 * self.s0 * self.s0)
        self.ngf = ngf
        self.bn0 = nn.BatchNorm2d(ngf * 2)
        self.conv1 = nn.Conv2d(ngf * 2, ngf * 2, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ngf * 2)
        self.conv2 = nn.Conv2d(ngf * 2, ngf, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ngf)
        self.conv3 = nn.Conv2d(ngf, channels, 3, 1, 1)
        self.bn3 = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z, pre_x: bool = False):
        x = self.bn0(self.l1(z).view(z.shape[0], self.ngf * 2, self.s0, self.s0))
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = F.leaky_relu(self.bn1(self.conv1(x)), 0.2)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = F.leaky_relu(self.bn2(self.conv2(x)), 0.2)
        x = self.bn3(self.conv3(x))
        return x if pre_x else torch.tanh(x)


if __name__ == "__main__":  # the architecture table of docs/detector.md
    print(architectures_markdown(), end="")
