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


def odd_image_bodies(size: int = 28) -> dict:
    """Image files of every kind a client can send, ``name -> (bytes, out_of_range)``: float TIFFs in
    and out of [0, 1] (``out_of_range`` True: a preprocess that keeps float values gives pixels outside
    [0, 1]), constant float TIFFs at 1e3, 1e10, 1e30 and -1e30, a 16-bit PNG, a palette PNG, a CMYK TIFF
    and an RGBA PNG (``out_of_range`` None: depends on the service's preprocess)."""
    import PIL.Image

    rng = np.random.default_rng(0)

    def save(im, fmt):
        buf = io.BytesIO()
        im.save(buf, fmt)
        return buf.getvalue()

    def ftiff(a):
        return save(PIL.Image.fromarray(a.astype(np.float32), mode="F"), "TIFF")

    u = rng.random((size, size))
    out = {
        "float tiff in [0, 1]": (ftiff(u), False),
        "float tiff just above 1": (ftiff(1.0 + 0.05 * u), True),
        "float tiff in [-0.05, 1.05] with noise": (ftiff(-0.05 + 1.1 * u), True),
    }
    for v in (1e3, 1e10, 1e30, -1e30):
        out[f"constant float tiff {v:g}"] = (ftiff(np.full((size, size), v)), True)
    out["16-bit png"] = (save(PIL.Image.fromarray((u * 65535).astype(np.uint16)), "PNG"), None)
    out["palette png"] = (save(PIL.Image.fromarray((u * 255).astype(np.uint8)).convert("P"), "PNG"), None)
    out["cmyk tiff"] = (save(PIL.Image.fromarray((u * 255).astype(np.uint8)).convert("CMYK"), "TIFF"), None)
    out["rgba png"] = (save(PIL.Image.fromarray((u * 255).astype(np.uint8)).convert("RGBA"), "PNG"), None)
    return out
