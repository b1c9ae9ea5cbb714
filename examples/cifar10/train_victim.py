"""Train the CIFAR-10 victim of the paper's setting (a ResNet-34 with the CIFAR stem) from a local copy
of CIFAR-10; nothing is downloaded. Writes victim.pt, victim.torchscript.pt and victim.json.

    python -m examples.cifar10.train_victim --data /path/to/cifar10 --device cuda [--epochs 60]

``--data`` is the directory that holds ``cifar-10-batches-py`` (torchvision's layout). The defender's
own data: the detector config (examples/cifar10/detector-config.yaml) takes its real images from the
same train split and the test split, never from anything an attacker would have.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from guardian_plugin.training.common import resolve_device
from guardian_plugin.training.data import cifar10 as load_cifar10
from guardian_plugin.training.data import normalise, to_float
from guardian_plugin.training.victim import save_victim, train_classifier, victim_arg_parser

HERE = os.path.dirname(os.path.abspath(__file__))
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
VICTIM = {"arch": "resnet34", "arch_params": {"cifar_stem": True}, "num_classes": 10,
          "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD), "channels": 3, "size": 32}


def train_victim(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *,
                 epochs: int, seed: int, device, batch_size: int = 128, lr: float = 0.1, progress: bool = True):
    """The victim on uint8 images: normalised with the CIFAR-10 statistics, random shifts of up to 4
    pixels and horizontal flips, SGD with a one-cycle schedule. Returns (model, history)."""
    xtr = normalise(to_float(x_train), CIFAR10_MEAN, CIFAR10_STD)
    xte = normalise(to_float(x_test), CIFAR10_MEAN, CIFAR10_STD)
    return train_classifier(xtr, torch.from_numpy(y_train), xte, torch.from_numpy(y_test), arch=VICTIM["arch"],
                            arch_params=VICTIM["arch_params"], epochs=epochs, batch_size=batch_size, lr=lr,
                            seed=seed, device=device, progress=progress, shift=4, flip=True)


def main(argv=None):
    ap = victim_arg_parser(__doc__, os.path.join(HERE, "artifacts"), epochs=60)
    ap.add_argument("--data", required=True, help="directory holding cifar-10-batches-py")
    a = ap.parse_args(argv)
    device = resolve_device(a.device)
    t0 = time.time()
    x_train, y_train = load_cifar10(a.data, train=True)
    x_test, y_test = load_cifar10(a.data, train=False)
    model, hist = train_victim(x_train, y_train, x_test, y_test, epochs=a.epochs, seed=a.seed, device=device)
    info = save_victim(model, a.out, {**VICTIM, "seed": a.seed, "epochs": a.epochs, "data": "CIFAR-10 train (50,000)",
                                      "test_accuracy": hist[-1]["test_accuracy"], "history": hist,
                                      "seconds": round(time.time() - t0, 1), "device": str(device),
                                      "command": "python -m examples.cifar10.train_victim"}, (3, 32, 32))
    print(f"victim test accuracy {info['test_accuracy']:.4f} ({info['seconds']} s) -> {a.out}")


if __name__ == "__main__":
    main()
