"""Train the MNIST example victim on the 4,000-digit train split; write its state dict and TorchScript.

    python -m examples.mnist.train_victim [--device cpu|cuda] [--out examples/mnist/artifacts]
"""

from __future__ import annotations

import os
import time

import torch

from guardian_plugin.training.common import resolve_device
from guardian_plugin.training.data import MNIST_MEAN, MNIST_STD, mnist_splits, normalise, to_float
from guardian_plugin.training.victim import save_victim, train_classifier, victim_arg_parser

HERE = os.path.dirname(os.path.abspath(__file__))
VICTIM = {"arch": "lenet5", "arch_params": {}, "num_classes": 10,
          "mean": list(MNIST_MEAN), "std": list(MNIST_STD), "channels": 1, "size": 28}


def load_victim(directory: str = os.path.join(HERE, "artifacts"), device="cpu") -> torch.nn.Module:
    from guardian_plugin.nets import build_classifier

    path = os.path.join(directory, "victim.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run `python -m examples.mnist.train_victim`")
    m = build_classifier(VICTIM["arch"], in_channels=1, num_classes=10, image_size=28, **VICTIM["arch_params"])
    m.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return m.eval().to(device)


def main(argv=None):
    ap = victim_arg_parser(__doc__, os.path.join(HERE, "artifacts"), epochs=15)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    t0 = time.time()
    s = mnist_splits(seed=0)
    xtr, ytr = normalise(to_float(s["train"][0]), MNIST_MEAN, MNIST_STD), torch.from_numpy(s["train"][1])
    xte, yte = normalise(to_float(s["test"][0]), MNIST_MEAN, MNIST_STD), torch.from_numpy(s["test"][1])
    model, hist = train_classifier(xtr, ytr, xte, yte, arch=VICTIM["arch"], arch_params=VICTIM["arch_params"],
                                   epochs=a.epochs, seed=a.seed, device=device)
    info = save_victim(model, a.out, {**VICTIM, "seed": a.seed, "split_seed": 0, "epochs": a.epochs,
                                      "test_accuracy": hist[-1]["test_accuracy"], "history": hist,
                                      "seconds": round(time.time() - t0, 1),
                                      "command": "python -m examples.mnist.train_victim"}, (1, 28, 28))
    print(f"victim test accuracy {info['test_accuracy']:.4f} ({info['seconds']} s) -> {a.out}")


if __name__ == "__main__":
    main()
