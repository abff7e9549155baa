"""BatchProcessor: shapes and dtypes, placeholders, truncation, uint8 pixels against the HF processors'
resize/crop, pickling, determinism (also across processes) and clear errors on bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sde_ray.config import ModelConfig
from sde_ray.data.mmeb import stable_id
from sde_ray.models import BatchProcessor
from sde_ray.models.processing import IMAGE_PAD, VISION_END, VISION_START, exact_uint8


def processor_for(config: ModelConfig, **changes) -> BatchProcessor:
    return BatchProcessor(dataclasses.replace(config, **changes))


def test_raw_batch_to_fixed_shapes(tiny_config, raw):
    processor = processor_for(tiny_config)
    out = processor(raw)
    rows, length = len(raw["qry_text"]), processor.seq_len
    if tiny_config.kind == "vlm":  # padded patches [max_patches, 3·P·P]: 32² pixels of 8² patches
        assert processor.image_shape == (16, 3 * 8 * 8)
    else:
        assert processor.image_shape == (3, tiny_config.image_size, tiny_config.image_size)
    for side in ("qry", "pos"):
        assert out[f"{side}_input_ids"].shape == (rows, length) and out[f"{side}_input_ids"].dtype == np.int64
        assert out[f"{side}_attention_mask"].shape == (rows, length)
        assert out[f"{side}_attention_mask"].dtype == np.int64
        assert out[f"{side}_pixel_values"].shape == (rows, *processor.image_shape)
        assert out[f"{side}_pixel_values"].dtype == np.uint8
        expected = np.array([image is not None for image in raw[f"{side}_image"]])
        np.testing.assert_array_equal(out[f"{side}_has_image"], expected)
        assert out[f"{side}_has_image"].dtype == np.bool_
        pixels = out[f"{side}_pixel_values"]
        assert not pixels[~expected].any(), "rows without an image must hold zeros"
        assert all(np.abs(p).sum() > 0 for p in pixels[expected])
        assert (out[f"{side}_attention_mask"].sum(1) > 0).all()
        if tiny_config.kind == "vlm":
            grids = out[f"{side}_image_grid_thw"]
            assert grids.dtype == np.int64 and grids.shape == (rows, 3)
            assert (grids[expected] == [1, 4, 4]).all() and not grids[~expected].any()
    assert out["target_id"].dtype == np.int64 and out["target_id"].shape == (rows,)
    assert out["target_id"][0] == out["target_id"][5]  # same target_hash, same id
    assert len(set(out["target_id"][:5].tolist())) == 5


def test_empty_batch_keeps_the_shapes(tiny_config, raw):
    processor = processor_for(tiny_config)
    out = processor({key: [] for key in raw})
    assert out["qry_input_ids"].shape == (0, processor.seq_len)
    assert out["pos_pixel_values"].shape == (0, *processor.image_shape)
    assert out["target_id"].shape == (0,) and out["target_id"].dtype == np.int64


def test_stable_id_is_a_stable_63_bit_hash():
    value = "3f786850e387550fdab836ed7e6dc881de23001b"
    expected = int.from_bytes(hashlib.sha1(value.encode()).digest()[:8], "big") >> 1
    assert stable_id(value) == expected
    assert 0 <= stable_id(value) < 2**63
    assert stable_id("a") != stable_id("b")


def test_pickle_round_trip_and_determinism(tiny_config, raw, arrays_equal):
    processor = processor_for(tiny_config)
    first = processor(raw)
    clone = pickle.loads(pickle.dumps(processor))
    assert arrays_equal(first, clone(raw))
    assert arrays_equal(first, processor(raw))
    assert arrays_equal(first, processor_for(tiny_config)(raw))
    assert len(pickle.dumps(processor)) < 2000  # only the config travels


def test_tiny_tokenizer_is_identical_in_a_fresh_process(tiny_configs):
    """Ray Data actors and training workers tokenise in different processes: ids must agree."""
    text = "<|image_1|>\nRepresent the given image: a mauve dodecahedron ∑ 日本"
    script = (
        "import sys; from sde_ray.config import ModelConfig; from sde_ray.models import BatchProcessor;"
        f"p = BatchProcessor(ModelConfig(kind='vlm', name_or_path='tiny-qwen2-vl'));"
        f"print(p.encode_inputs([{text!r}], None, 'qry')['qry_input_ids'].tolist())"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    here = processor_for(tiny_configs["tiny-qwen2-vl"]).encode_inputs([text], None, "qry")["qry_input_ids"]
    assert result.stdout.strip().splitlines()[-1] == str(here.tolist())


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-siglip"])
def test_dual_encoder_drops_the_image_placeholder(name, tiny_configs):
    processor = processor_for(tiny_configs[name])
    with_placeholder = processor.encode_inputs(["<|image_1|>\nRepresent the given image\n"], None, "qry")
    plain = processor.encode_inputs(["Represent the given image"], None, "qry")
    np.testing.assert_array_equal(with_placeholder["qry_input_ids"], plain["qry_input_ids"])
    tokenizer = processor.tokenizer
    text = "Any text at all: ünïcödé, emoji 🎨, CJK 日本語, tabs\tand <tags>."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level BPE: nothing is unknown
    assert tokenizer.unk_token_id not in ids


def test_dual_encoder_truncates_and_keeps_end_token(tiny_configs):
    processor = processor_for(tiny_configs["tiny-clip"], max_text_length=16)
    out = processor.encode_inputs(["word " * 100], None, "qry")
    ids = out["qry_input_ids"][0]
    assert out["qry_attention_mask"].sum() == 16
    assert ids[0] == processor.tokenizer.bos_token_id and ids[-1] == processor.tokenizer.eos_token_id


def geometry_only(processor: BatchProcessor, images: list, **kwargs) -> dict:
    """The family processor's own output with rescale and normalisation switched off."""
    return processor.image_processor(
        images=images, do_rescale=False, do_normalize=False, return_tensors="np", **kwargs
    )


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-siglip"])
def test_dual_encoder_pixels_are_the_image_processors_resize_and_crop(name, tiny_configs, make_png):
    processor = processor_for(tiny_configs[name])
    data = [make_png("purple", "square", size=48), make_png("teal", "circle", size=45, fmt="JPEG")]
    out = processor.encode_inputs(["x", "y"], data, "qry")
    reference = geometry_only(processor, [Image.open(io.BytesIO(d)).convert("RGB") for d in data])
    reference = reference["pixel_values"]
    # What makes the uint8 cast lossless: the PIL backend leaves whole numbers in 0..255.
    assert np.array_equal(reference, np.rint(reference)) and reference.min() >= 0 and reference.max() <= 255
    assert out["qry_pixel_values"].dtype == np.uint8
    np.testing.assert_array_equal(out["qry_pixel_values"], reference)


def test_vlm_places_an_image_block_of_each_images_own_size(tiny_configs, raw, make_png):
    config = dataclasses.replace(tiny_configs["tiny-qwen2-vl"], min_pixels=16 * 16, max_pixels=64 * 64)
    processor = BatchProcessor(config)
    vocab = processor.tokenizer.get_vocab()
    raw = dict(raw, qry_image=[make_png("red", size=64), Image.new("RGB", (90, 20)), None, None,
                               Image.new("RGB", (30, 100)), None])
    out = processor(raw)
    # 64² at most -> 16 tokens of 16×16-pixel cells; every row padded to that many.
    assert processor.seq_len == config.max_text_length + 16 + 2
    # smart_resize by hand: 64×64 stays (16 tokens); 90×20 -> 96×16 (6); 30×100 -> 32×96 (12).
    expected_tokens = {"qry": [16, 6, 0, 0, 12, 0], "pos": [0, 0, 4, 0, 0, 0]}
    for side in ("qry", "pos"):
        grids = out[f"{side}_image_grid_thw"]
        np.testing.assert_array_equal(grids.prod(1) // 4, expected_tokens[side])
        for row, ids in enumerate(out[f"{side}_input_ids"]):
            real = ids[out[f"{side}_attention_mask"][row] == 1].tolist()
            tokens = expected_tokens[side][row]
            assert real.count(vocab[IMAGE_PAD]) == tokens
            if tokens:
                start = real.index(vocab[VISION_START])
                assert real[start + 1 + tokens] == vocab[VISION_END]
                # MMEB's placeholder leads the text, so the block opens the sequence.
                assert start == 0
            else:
                assert vocab[VISION_START] not in real
            assert "<|image_1|>" not in processor.tokenizer.decode(real)
    # Qwen2-VL pads on the left: every row's last column is a real token.
    assert (out["qry_attention_mask"][:, -1] == 1).all()


def test_vlm_truncation_never_cuts_the_image(tiny_configs, make_png):
    processor = processor_for(tiny_configs["tiny-qwen2-vl"], max_text_length=8)
    vocab = processor.tokenizer.get_vocab()
    out = processor.encode_inputs(
        ["a long prefix " * 20 + "<|image_1|>" + " and a long suffix" * 20, "<|image_1|> " + "word " * 50],
        [make_png("red"), make_png("blue")],
        "qry",
    )
    for row in range(2):
        ids = out["qry_input_ids"][row][out["qry_attention_mask"][row] == 1].tolist()
        assert ids.count(vocab[IMAGE_PAD]) == 4 and vocab[VISION_END] in ids
        assert len(ids) == 8 + 4 + 2


def _photo(height: int, width: int, seed: int) -> Image.Image:
    """Noise over a gradient: resampling errors cannot hide in flat regions."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([255 * x / width, 255 * y / height, 255 * (x + y) / (width + height)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_vlm_patches_and_grids_equal_the_transformers_image_processor(name):
    """At several sizes and aspects (square, wide, tall, smaller than min_pixels, larger than
    max_pixels, odd sizes): our per-row uint8 patches, packed, are the transformers
    Qwen2VLImageProcessor's own pixel_values (rescale/normalise off, its T copies of a still image
    collapsed) and our grids its image_grid_thw; the processor is built here from its class."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    config = ModelConfig(kind="vlm", name_or_path=name, min_pixels=20 * 20, max_pixels=80 * 80)
    processor = BatchProcessor(config)
    sizes = [(32, 32), (20, 90), (100, 30), (7, 9), (80, 80), (300, 200), (41, 67), (16, 250)]
    images = [_photo(h, w, seed) for seed, (h, w) in enumerate(sizes)]
    out = processor.encode_inputs(["<|image_1|> x"] * len(images), images, "qry")
    reference = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                         min_pixels=20 * 20, max_pixels=80 * 80)
    expected = reference(images=images, return_tensors="np", do_rescale=False, do_normalize=False)
    np.testing.assert_array_equal(out["qry_image_grid_thw"], expected["image_grid_thw"])
    assert len({tuple(g) for g in expected["image_grid_thw"].tolist()}) >= 7  # sizes of their own
    theirs = expected["pixel_values"].reshape(-1, 3, 2, 8 * 8)  # [Σ patches, C, T, P·P]
    assert np.array_equal(theirs[:, :, 0], theirs[:, :, 1])
    ours = np.concatenate([row[: grid.prod()] for row, grid in zip(out["qry_pixel_values"], out["qry_image_grid_thw"])])
    np.testing.assert_array_equal(ours.reshape(-1, 3, 8 * 8), theirs[:, :, 0])
    for row, grid in zip(out["qry_pixel_values"], out["qry_image_grid_thw"]):
        assert not row[grid.prod():].any()  # the padding is zeros
    pads = (out["qry_input_ids"] == processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)).sum(1)
    np.testing.assert_array_equal(pads, expected["image_grid_thw"].prod(1) // 4)


def test_vlm_pixel_range_errors_name_the_keys():
    with pytest.raises(ValueError, match="max_pixels must be >= 256"):
        BatchProcessor(ModelConfig(kind="vlm", name_or_path="tiny-qwen2-vl", max_pixels=100))
    processor = BatchProcessor(ModelConfig(kind="vlm", name_or_path="tiny-qwen2-vl", min_pixels=1000,
                                           max_pixels=1024))
    with pytest.raises(ValueError, match="over max_pixels=1024"):  # a row the data stage would skip
        processor.encode_inputs(["x"], [Image.new("RGB", (30, 10))], "qry")


def test_exact_uint8_refuses_values_a_cast_would_change():
    whole = np.array([0.0, 17.0, 255.0], dtype=np.float32)
    np.testing.assert_array_equal(exact_uint8(whole, "p"), [0, 17, 255])
    assert exact_uint8(whole, "p").dtype == np.uint8
    for bad in ([0.5, 1.0], [-1.0, 3.0], [256.0, 0.0], [-0.48, 1.2]):  # fractions, out of range, normalised
        with pytest.raises(ValueError, match="my-model.*not all integers in 0..255"):
            exact_uint8(np.array(bad, dtype=np.float32), "my-model")


def test_accepts_numpy_object_columns_as_ray_data_gives_them(tiny_configs, raw, arrays_equal):
    processor = processor_for(tiny_configs["tiny-clip"])
    as_numpy = {key: np.array(values, dtype=object) for key, values in raw.items()}
    assert arrays_equal(processor(raw), processor(as_numpy))


def test_bad_input_errors_name_the_problem(tiny_configs, raw, make_png):
    processor = processor_for(tiny_configs["tiny-clip"])
    missing = dict(raw)
    del missing["pos_image"]
    with pytest.raises(KeyError, match="pos_image"):
        processor(missing)
    short = dict(raw, pos_text=raw["pos_text"][:2])
    with pytest.raises(ValueError, match="pos_text"):
        processor(short)
    corrupt = dict(raw, qry_image=[b"not an image"] + raw["qry_image"][1:])
    with pytest.raises(ValueError, match=r"qry_image\[0\]"):
        processor(corrupt)
    wrong_type = dict(raw, pos_image=[123] + raw["pos_image"][1:])
    with pytest.raises(TypeError, match=r"pos_image\[0\]"):
        processor(wrong_type)
    with pytest.raises(TypeError, match=r"qry_text\[1\]"):
        processor.encode_inputs(["ok", None], None, "qry")
    vlm = processor_for(tiny_configs["tiny-qwen2-vl"])
    with pytest.raises(ValueError, match="placeholders"):
        vlm.encode_inputs(["<|image_1|> and <|image_1|>"], [make_png("red")], "qry")
    with pytest.raises(ValueError, match="neither text nor an image"):
        vlm.encode_inputs([""], [None], "pos")
    with pytest.raises(ValueError, match="vlm model but model.kind=dual_encoder"):
        BatchProcessor(ModelConfig(kind="dual_encoder", name_or_path="tiny-qwen2-vl"))
    with pytest.raises(TypeError, match="takes a ModelConfig, got dict"):
        BatchProcessor(dataclasses.asdict(ModelConfig()))
