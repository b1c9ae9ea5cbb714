"""Fine-tune the CIFAR-10 victim: a pretrained CIFAR ResNet (../shared/data/cifar10-resnets, trained on
the lossless images) on the JPEG copy's victim_train split, tested on its test split (docs/cifar10.md).
Writes victim.pt, victim.torchscript.pt and victim.json (per-epoch test accuracy, seconds, command).

    python -m examples.cifar10.train_victim [--arch cifar_resnet56] [--epochs 8] [--device cuda] [--threads 1]

The defender's own data: the detector config (examples/cifar10/detector-config.yaml) takes its real
images from the other named splits, never from anything an attacker would have.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

from guardian_plugin.nets import build_classifier
from guardian_plugin.training.common import resolve_device
from guardian_plugin.training.data import CIFAR10_SPLIT_SEED, cifar10_split, normalise, to_float
from guardian_plugin.training.victim import save_victim, train_classifier, victim_arg_parser

HERE = os.path.dirname(os.path.abspath(__file__))
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)   # the pretrained checkpoints' normalisation
VICTIM = {"arch": "cifar_resnet56", "arch_params": {}, "num_classes": 10,
          "mean": list(MEAN), "std": list(STD), "channels": 3, "size": 32}
ARCHS = ("cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56")


def train_victim(x_train, y_train, x_test, y_test, *, arch: str = VICTIM["arch"], pretrained: bool = True,
                 epochs: int, seed: int, device, batch_size: int = 128, lr: float = 0.01, progress: bool = True):
    """Fine-tune on uint8 images: SGD with momentum, ``lr`` decaying to 0 on a cosine, random shifts of
    up to 4 pixels and horizontal flips. Returns (model, history); history[0] is the model before."""
    model = build_classifier(arch, pretrained=pretrained)
    xtr, xte = normalise(to_float(x_train), MEAN, STD), normalise(to_float(x_test), MEAN, STD)
    return train_classifier(xtr, torch.from_numpy(y_train), xte, torch.from_numpy(y_test), model=model,
                            schedule="cosine", epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=1e-4,
                            seed=seed, device=device, progress=progress, shift=4, flip=True)


def main(argv=None):
    ap = victim_arg_parser(__doc__, os.path.join(HERE, "artifacts"), epochs=8)
    ap.add_argument("--arch", default=VICTIM["arch"], choices=ARCHS)
    ap.add_argument("--lr", type=float, default=0.01)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    t0 = time.time()
    x_train, y_train = cifar10_split("victim_train")
    x_test, y_test = cifar10_split("test")
    model, hist = train_victim(x_train, y_train, x_test, y_test, arch=a.arch, epochs=a.epochs, lr=a.lr,
                               seed=a.seed, device=device)
    info = save_victim(model, a.out, {
        **VICTIM, "arch": a.arch, "pretrained": f"../shared/data/cifar10-resnets/resnet{a.arch[12:]}-*.th",
        "seed": a.seed, "epochs": a.epochs, "lr": a.lr, "batch_size": 128,
        "data": {"train": f"cifar10-jpeg victim_train ({len(y_train):,})", "test": f"cifar10-jpeg test ({len(y_test):,})",
                 "split_seed": CIFAR10_SPLIT_SEED},
        "pretrained_test_accuracy": hist[0]["test_accuracy"], "test_accuracy": hist[-1]["test_accuracy"],
        "history": hist, "seconds": round(time.time() - t0, 1), "device": str(device), "threads": torch.get_num_threads(),
        "command": " ".join(["python -m examples.cifar10.train_victim", *(sys.argv[1:] if argv is None else argv)]),
        "commit": commit or None}, (3, 32, 32))
    print(f"victim test accuracy {info['test_accuracy']:.4f} (pretrained {info['pretrained_test_accuracy']:.4f}, "
          f"{info['seconds']} s) -> {a.out}")


if __name__ == "__main__":
    main()
