"""Shared by the attack tests: one torch thread and the tiny seeded victim."""

from __future__ import annotations

import contextlib

import torch

from guardian_plugin.nets import SmallResNet

MEAN, STD = [0.1307], [0.3081]  # the MNIST normalisation the tiny victim is queried with


@contextlib.contextmanager
def one_torch_thread():
    """Tiny networks on a shared machine: one thread avoids oversubscription (100x slower otherwise).
    The previous thread count is restored on exit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_victim() -> SmallResNet:
    """SmallResNet(1 -> 10, width 4, one block) in eval mode, initialised from torch seed 0 (the global
    random stream continues from there)."""
    torch.manual_seed(0)
    return SmallResNet(1, 10, width=4, blocks=1).eval()
