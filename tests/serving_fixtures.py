"""Shared by the serving tests: the expected answers of the BentoML example service and starting a
real TorchServe with its models registered."""

from __future__ import annotations

import io

import numpy as np
import torch


def bento_oracle(detector: str):
    """``answer(images) -> (probabilities, flags)`` for 28 px uint8 images, one image at a time: the
    unprotected service's own API method called in this process, and the verdict of the detector
    artifact at ``detector`` on the same preprocessed tensor."""
    import PIL.Image

    from bento.client import png
    from bento.service import MNISTUnprotected
    from guardian_plugin.guardian import Guardian

    torch.set_num_threads(1)
    unprotected = MNISTUnprotected.inner()
    guardian = Guardian.from_artifact(detector)

    def answer(images):
        out, flags = [], []
        for a in images:
            im = PIL.Image.open(io.BytesIO(png(a)))
            out.append(np.array(unprotected.classify(im), dtype=np.float64))
            flags.append(bool(guardian.detect(unprotected.preprocess(im))[0][0]))
        return np.stack(out), flags

    return answer


def start_torchserve(store: str, workdir: str, models: dict, batch_size: int, max_batch_delay_ms: int):
    """A started TorchServe on ``store`` with ``models`` ({name: workers}, each ``name.mar``) registered;
    on a failed registration its log tail is printed and the server stopped before the error is raised."""
    from guardian_plugin.devserver.torchserve import TorchServe

    ts = TorchServe(store, workdir).start()
    try:
        for name, workers in models.items():
            ts.register(f"{name}.mar", name, workers=workers, batch_size=batch_size,
                        max_batch_delay_ms=max_batch_delay_ms)
    except Exception:
        print(ts.log_tail(80))
        ts.stop()
        raise
    return ts
