"""Checks of a request's image before and while it is decoded, shared by every adapter.

A request's image is checked from its header first (no pixel is decoded): more than ``max_pixels``
pixels -> 400 ``ImageTooLarge`` (PIL's decompression-bomb guard too). Decoding failures get a 400 that
says what is wrong: ``NotAnImage`` (no format PIL reads), ``CorruptImage`` (truncated or damaged).
The default pixel limit, 12 megapixels, takes a 4000 x 3000 photo and bounds what one request can cost
a worker (decoding 12 MP takes well under a second here; docs/torchserve.md).
"""

from __future__ import annotations

import io
from typing import Optional, Tuple

from guardian_plugin.config import DEFAULT_MAX_PIXELS
from guardian_plugin.errors import GuardianError
from guardian_plugin.responses import Denial

NOT_AN_IMAGE = "the body is not an image in a format PIL reads (PNG, JPEG, ...)"


class InputError(GuardianError):
    """A request's input that cannot be served: HTTP ``status`` (400) with a JSON reason."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message

    @property
    def denial(self) -> Denial:
        return Denial(self.status, self.kind, self.message)


def image_size(raw: bytes, max_pixels: int) -> Optional[Tuple[int, int]]:
    """(width, height) from the image header, or None when PIL cannot identify the bytes. Raises
    InputError for an image of more than ``max_pixels`` pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as im:  # reads the header only
            w, h = im.size
    except Image.DecompressionBombError as e:
        raise InputError(400, "ImageTooLarge", f"the image is too large: {e}") from None
    except Exception:  # noqa: BLE001 - not an image PIL can identify
        return None
    check_pixels(w, h, max_pixels)
    return w, h


def decode_error(raw: bytes, exc: BaseException | None = None) -> Optional[InputError]:
    """Why the bytes do not decode to an image (None when they do)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return InputError(400, "NotAnImage", NOT_AN_IMAGE)
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
    except UnidentifiedImageError:
        return InputError(400, "NotAnImage", NOT_AN_IMAGE)
    except Image.DecompressionBombError as e:
        return InputError(400, "ImageTooLarge", f"the image is too large: {e}")
    except Exception as e:  # noqa: BLE001
        return InputError(400, "CorruptImage", f"the image is truncated or corrupt ({type(e).__name__}: {e})")
    return None


def check_pixels(w: int, h: int, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise InputError(400, "ImageTooLarge", f"the image is {w}x{h} = {w * h} pixels; at most {max_pixels} "
                                               "are accepted")


def load_checked(im, max_pixels: int = DEFAULT_MAX_PIXELS):
    """A lazily opened PIL image, size-checked from its header, then fully decoded; InputError for an
    image too large, truncated or corrupt."""
    check_pixels(*im.size, max_pixels)
    try:
        im.load()
    except Exception as e:  # noqa: BLE001
        raise InputError(400, "CorruptImage", f"the image is truncated or corrupt ({type(e).__name__}: {e})") from None
    return im
