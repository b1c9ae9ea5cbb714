"""Loading weight files: every missing, corrupt or ill-fitting file raises ArtifactError naming it.

One module for the transformation models (transform.py), the StyleGAN discriminator (stylegan1.py)
and the sub-detectors (detector.py), so none of them imports another to read a file.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from guardian_plugin.errors import ArtifactError


def load_state(path: str, what: str) -> dict:
    """A state dict from ``path`` (a ``{'state_dict': ...}`` checkpoint is unwrapped)."""
    if not os.path.exists(path):
        raise ArtifactError(f"{what}: weights file {path} is missing")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ArtifactError(f"{what}: weights file {path} is corrupt or not a torch state dict ({e})") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd


def load_into(model: nn.Module, path: str, what: str) -> nn.Module:
    """``model`` with the state dict of ``path`` loaded strictly."""
    sd = load_state(path, what)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ArtifactError(f"{what}: weights file {path} does not fit the architecture ({e})") from e
    return model


def load_torchscript(path: str, what: str) -> nn.Module:
    """A TorchScript module from ``path``, on the CPU."""
    if not os.path.exists(path):
        raise ArtifactError(f"{what}: TorchScript file {path} is missing")
    try:
        return torch.jit.load(path, map_location="cpu")
    except Exception as e:
        raise ArtifactError(f"{what}: {path} is not a loadable TorchScript file ({e})") from e
