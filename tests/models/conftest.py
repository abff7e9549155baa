"""Fixtures for the encoder tests: small PNGs made with PIL and raw MMEB-style batches."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sde_ray.config import ModelConfig

TINY = {
    "tiny-clip": ModelConfig(kind="dual_encoder", name_or_path="tiny-clip"),
    "tiny-siglip": ModelConfig(kind="dual_encoder", name_or_path="tiny-siglip"),
    "tiny-qwen2-vl": ModelConfig(kind="vlm", name_or_path="tiny-qwen2-vl"),
}


def png(color: str, shape: str = "circle", size: int = 32, fmt: str = "PNG") -> bytes:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def raw_batch() -> dict:
    """Six rows mixing MMEB's side types: I→T, T→I, I+T→T and T→T, with rows lacking images."""
    return {
        "qry_text": [
            "<|image_1|>\nRepresent the given image for classification\n",
            "<|image_1|>\nRepresent the given image with the following question: what shape is it?\n",
            "Find me an everyday image that matches the given caption: a blue square.",
            "a green circle",
            "<|image_1|>\nFind an image caption describing the given everyday image.\n",
            "what colour is the square?",
        ],
        "pos_text": [
            "red circle",
            "a circle",
            "<|image_1|>\nRepresent the given image.\n",
            "a green ring",
            "a yellow square on white",
            "blue",
        ],
        "qry_image": [
            png("red"),
            png("green", "square"),
            None,
            None,
            png("yellow", "square", fmt="JPEG"),
            None,
        ],
        "pos_image": [None, None, png("blue", "square"), None, None, None],
        "target_hash": ["h0", "h1", "h2", "h3", "h4", "h0"],
        "subset": ["A", "A", "B", "C", "D", "A"],
    }


@pytest.fixture
def raw() -> dict:
    return raw_batch()


@pytest.fixture
def make_png():
    return png


@pytest.fixture(params=list(TINY))
def tiny_config(request) -> ModelConfig:
    return TINY[request.param]


@pytest.fixture
def tiny_configs() -> dict[str, ModelConfig]:
    return dict(TINY)


@pytest.fixture
def arrays_equal():
    def equal(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    return equal
