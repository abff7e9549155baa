"""One corpus or request item (text, image bytes) → the model's input arrays, shared by `sde-ray
embed` (in its Ray Data CPU tasks) and `sde-ray serve` (in the HTTP handler, before batching).

The text the model sees is built as the evaluator's: with `instruction` set, MMEB's prompt
(`sde_ray.data.mmeb.format_prompt`: `<|image_1|>\\n<instruction>: <text>\\n`, the image token only
when the item has an image), else the item's text unchanged. The arrays come from the model's own
`BatchProcessor.encode_inputs` (the evaluator's and the training pipeline's code path), so an item
embedded here equals the same item in `sde-ray eval`.

A bad item (undecodable image bytes, nothing to embed) is an `ItemError`: `embed` skips and counts
it, `serve` answers it with an HTTP 4xx.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from sde_ray.data.mmeb import format_prompt
from sde_ray.models.processing import decode_image

MODALITIES = ("text", "image", "image+text")


class ItemError(ValueError):
    """An item that cannot be embedded; `reason` is a short stable tag (counted by embed)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Item:
    text: str  # the prompt the model sees
    image: Image.Image | None
    modality: str


def prepare_item(text: str, image: bytes | Image.Image | None, instruction: str = "",
                 where: str = "item", max_image_pixels: int | None = None) -> Item:
    """Decodes the image and builds the prompt; raises `ItemError` for what cannot be embedded."""
    if not isinstance(text, str):
        raise ItemError("bad_text", f"{where}: text must be a string, got {type(text).__name__}")
    if isinstance(image, (bytes, bytearray)) and max_image_pixels is not None:
        _check_pixels(bytes(image), max_image_pixels, where)
    try:
        decoded = decode_image(image, where)
    except (ValueError, TypeError) as exc:
        raise ItemError("undecodable_image", str(exc)) from exc
    if decoded is not None and max_image_pixels is not None and decoded.width * decoded.height > max_image_pixels:
        raise ItemError("oversized_image", f"{where}: image of {decoded.width}x{decoded.height} pixels exceeds "
                                           f"{max_image_pixels} pixels")
    has_text = bool(text.strip())
    if not has_text and decoded is None:
        raise ItemError("empty", f"{where}: neither text nor an image: nothing to embed")
    modality = "image+text" if has_text and decoded is not None else ("image" if decoded is not None else "text")
    prompt = format_prompt(instruction, text, with_image=decoded is not None) if instruction else text
    return Item(prompt, decoded, modality)


def _check_pixels(data: bytes, max_image_pixels: int, where: str) -> None:
    """Refuses an image whose header declares too many pixels, before decoding it (a decompression bomb)."""
    import io

    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
    except Exception as exc:  # PIL raises several types for corrupt data
        raise ItemError("undecodable_image", f"{where}: cannot decode image bytes ({type(exc).__name__}: {exc})") from exc
    if width * height > max_image_pixels:
        raise ItemError("oversized_image", f"{where}: image of {width}x{height} pixels exceeds {max_image_pixels} pixels")


def encode_items(processor, prefix: str, items: Sequence[Item]) -> dict[str, np.ndarray]:
    """The `{prefix}_*` arrays of prepared items (the model's `BatchProcessor`)."""
    return processor.encode_inputs([i.text for i in items], [i.image for i in items], prefix)
