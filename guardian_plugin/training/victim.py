"""Train (or fine-tune) the example victim on the defender's labelled data."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from guardian_plugin.nets import build_classifier
from guardian_plugin.training.common import accuracy, seed_everything


def random_shift(x: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (zero padding), per sample."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    i = torch.randint(0, 2 * pad + 1, (b,))
    j = torch.randint(0, 2 * pad + 1, (b,))
    return torch.stack([xp[k, :, i[k]:i[k] + h, j[k]:j[k] + w] for k in range(b)])


def train_classifier(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, *,
                     arch: str = "small_resnet", arch_params: dict | None = None, num_classes: int = 10,
                     epochs: int = 15, batch_size: int = 64, lr: float = 0.05, seed: int = 0, device="cpu",
                     progress: bool = True, shift: int = 2, flip: bool = False, model: torch.nn.Module | None = None,
                     schedule: str = "onecycle", weight_decay: float = 5e-4):
    """SGD with random shifts of up to ``shift`` pixels (and horizontal flips with ``flip``); ``x`` is
    already normalised. From scratch (``arch``) with a one-cycle schedule, or fine-tuning ``model``
    with ``schedule="cosine"`` (``lr`` decaying to 0; the history then starts with epoch 0, the
    model as given). Returns (model, history): per epoch, test accuracy and seconds so far."""
    seed_everything(seed)
    if model is None:
        model = build_classifier(arch, in_channels=x.shape[1], num_classes=num_classes, image_size=x.shape[-1],
                                 **(arch_params or {}))
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    else:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    t0 = time.time()
    history = [] if schedule != "cosine" else [{"epoch": 0, "test_accuracy": accuracy(model, x_test, y_test, device)}]
    bar = tqdm(total=steps, desc="victim", disable=not progress)
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for k in range(0, len(x), batch_size):
            idx = perm[k:k + batch_size]
            xb, yb = random_shift(x[idx], shift).to(device), y[idx].to(device)
            if flip:
                mirror = torch.rand(len(xb), device=device) < 0.5
                xb = torch.where(mirror.view(-1, 1, 1, 1), xb.flip(3), xb)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
        history.append({"epoch": ep + 1, "test_accuracy": accuracy(model, x_test, y_test, device),
                        "seconds": round(time.time() - t0, 1)})
        bar.set_postfix(epoch=ep + 1, test_accuracy=f"{history[-1]['test_accuracy']:.4f}")
    bar.close()
    return model.eval(), history


def victim_arg_parser(doc: str, out_default: str, epochs: int):
    """The options every example victim trainer takes: --out, --epochs, --seed, --device, --threads."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=out_default, help="artifact directory (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when present)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    return ap


def save_victim(model: torch.nn.Module, out_dir: str, info: dict, example_shape) -> dict:
    """Write ``victim.pt`` (state dict), ``victim.torchscript.pt`` (traced on CPU with a zero input of
    ``example_shape``) and ``victim.json`` (``info`` plus the torch version) to ``out_dir``."""
    import json
    import os

    model = model.cpu().eval()
    os.makedirs(out_dir, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(out_dir, "victim.pt"))
    torch.jit.trace(model, torch.zeros(1, *example_shape)).save(os.path.join(out_dir, "victim.torchscript.pt"))
    info = {**info, "torch": torch.__version__}
    with open(os.path.join(out_dir, "victim.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info
