"""The uint8 pixel contract: the model's own normalisation against the Hugging Face image processor's
full output, bf16, refusal of float pixels, and state that neither exports nor precision casts touch."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sde_ray.config import ModelConfig
from sde_ray.models import BatchProcessor, build_model, pack_patches


def encoded(height: int, width: int, fmt: str, seed: int) -> bytes:
    """A real encoded photo-like image of an odd size: a smooth gradient plus noise (JPEG artefacts
    included), so every channel spans most of 0..255."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([255 * x / width, 255 * y / height, 255 * (x + y) / (width + height)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


IMAGES = [encoded(37, 53, "PNG", 0), encoded(61, 29, "JPEG", 1), encoded(33, 33, "JPEG", 2)]


def reference_pixels(processor: BatchProcessor, images: list[bytes]) -> np.ndarray:
    """The family image processor's full output (rescale and normalisation on) for the same images;
    for Qwen2-VL its packed patches at each image's own size."""
    decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    return processor.image_processor(images=decoded, return_tensors="np")["pixel_values"]


def image_pixels(processor: BatchProcessor, out: dict) -> torch.Tensor:
    """uint8 pixels of a side in the [N, 3, h, w] form `normalize_pixels` takes: images for the dual
    encoders, every real patch (packed) for a VLM."""
    pixels = torch.as_tensor(out["qry_pixel_values"])
    if processor.config.kind != "vlm":
        return pixels
    patch = processor.geometry.patch_size
    return pack_patches(pixels, torch.as_tensor(out["qry_image_grid_thw"])).view(-1, 3, patch, patch)


def model_pixels(model, processor: BatchProcessor, out: dict) -> np.ndarray:
    """The model's normalised pixels of the rows with an image, in the processor's layout."""
    batch = {k: torch.as_tensor(v) for k, v in out.items()}
    if processor.config.kind != "vlm":
        _, _, normalised, has_image = model.side_inputs(batch, "qry")
        return normalised[has_image].numpy()
    packed = pack_patches(batch["qry_pixel_values"], batch["qry_image_grid_thw"])
    return model.normalize_patches(packed, "qry_pixel_values").numpy()


def test_model_side_normalisation_equals_the_image_processor(tiny_config):
    processor = BatchProcessor(tiny_config)
    model = build_model(tiny_config)
    out = processor.encode_inputs(["a", "b", "c", "d"], IMAGES[:2] + [None] + IMAGES[2:], "qry")
    pixels = out["qry_pixel_values"]
    assert pixels.dtype == np.uint8 and pixels.shape == (4, *processor.image_shape)
    assert not pixels[2].any() and pixels[[0, 1, 3]].std() > 40  # a blank row; real images
    assert out["qry_has_image"].tolist() == [True, True, False, True]
    expected = reference_pixels(processor, IMAGES)
    got = model_pixels(model, processor, out)
    assert got.dtype == np.float32
    # float32 rescale vs the processor's float64 rescale rounded to float32: within an ulp or two.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert expected.min() < -0.9  # mean-subtracted values, not 0..1 or 0..255


def test_normalisation_follows_the_processors_switches():
    """A processor with normalisation off (and another rescale factor) is followed, not assumed."""
    config = ModelConfig(kind="dual_encoder", name_or_path="tiny-siglip")
    model = build_model(config)
    processor = model.image_processor
    processor.do_normalize, processor.rescale_factor = False, 1 / 127.5
    model = type(model)(model.backbone, model.tokenizer, processor, config, model.embed_dim)
    pixels = BatchProcessor(config).encode_inputs(["x"], IMAGES[:1], "qry")[
        "qry_pixel_values"
    ]
    reference = processor(images=[Image.open(io.BytesIO(IMAGES[0])).convert("RGB")], return_tensors="np")[
        "pixel_values"
    ]
    assert reference.max() > 1.5  # 0..2: the rescale factor took effect
    np.testing.assert_allclose(model.normalize_pixels(pixels).numpy(), reference, rtol=0, atol=1e-6)


def test_bf16_model_gets_bf16_pixels_rounded_once_from_float32(tiny_config):
    processor = BatchProcessor(tiny_config)
    pixels = image_pixels(processor, processor.encode_inputs(["x", "y"], IMAGES[:2], "qry"))
    model = build_model(tiny_config)
    in_float32 = model.normalize_pixels(pixels)
    model = model.to(torch.bfloat16)  # what DeepSpeed's bf16 does to the module
    in_bf16 = model.normalize_pixels(pixels)
    assert in_bf16.dtype == torch.bfloat16
    assert torch.equal(in_bf16, in_float32.to(torch.bfloat16))
    # By hand from the processor's attributes: the module cast left the constants unrounded.
    hf = processor.image_processor
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (hf.image_mean, hf.image_std))
    manual = (pixels.float() * hf.rescale_factor - mean) / std
    assert torch.equal(in_bf16, manual.to(torch.bfloat16))
    if tiny_config.name_or_path == "tiny-siglip":
        return  # SigLIP's 0.5 / 0.5 are exact in bf16
    # ...which matters: CLIP's constants rounded to bf16 (as a buffer would be) give other pixels.
    rounded = (pixels.float() * hf.rescale_factor - mean.bfloat16().float()) / std.bfloat16().float()
    assert not torch.equal(in_bf16, rounded.to(torch.bfloat16))


def test_float_pixels_are_refused_with_the_contract(tiny_configs, raw):
    config = tiny_configs["tiny-clip"]
    model = build_model(config)
    batch = {k: torch.as_tensor(v) for k, v in BatchProcessor(config)(raw).items()}
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        bad = dict(batch, pos_pixel_values=batch["pos_pixel_values"].to(dtype))
        with pytest.raises(
            TypeError, match=rf"'pos_pixel_values' has dtype {dtype}; pixel values must be uint8"
        ):
            model(bad)
    numpy_float = dict(batch, qry_pixel_values=batch["qry_pixel_values"].numpy().astype(np.float32))
    with pytest.raises(TypeError, match="'qry_pixel_values' has dtype torch.float32"):
        model(numpy_float)
    with pytest.raises(ValueError, match=r"'qry_pixel_values' has shape \(6, 32, 32, 3\)"):
        model(dict(batch, qry_pixel_values=batch["qry_pixel_values"].permute(0, 2, 3, 1)))


def test_normalisation_adds_no_state(tiny_config):
    """State dicts (checkpoints) and exports hold the backbone's weights only."""
    model = build_model(tiny_config)
    assert list(model.state_dict()) == [f"backbone.{k}" for k in model.backbone.state_dict()]
    assert list(model.buffers()) == list(model.backbone.buffers())
    model.normalize_pixels(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))  # device constants are made
    assert list(model.state_dict()) == [f"backbone.{k}" for k in model.backbone.state_dict()]
