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
from sde_ray.models import BatchProcessor, patchify_qwen2_vl
from sde_ray.models.processing import IMAGE_PAD, VISION_END, VISION_START, exact_uint8


def processor_for(config: ModelConfig, **changes) -> BatchProcessor:
    return BatchProcessor(dataclasses.replace(config, **changes))


def test_raw_batch_to_fixed_shapes(tiny_config, raw):
    processor = processor_for(tiny_config)
    out = processor(raw)
    rows, length = len(raw["qry_text"]), processor.seq_len
    channels, height, width = processor.image_shape
    assert channels == 3 and height == width == tiny_config.image_size
    for side in ("qry", "pos"):
        assert out[f"{side}_input_ids"].shape == (rows, length) and out[f"{side}_input_ids"].dtype == np.int64
        assert out[f"{side}_attention_mask"].shape == (rows, length)
        assert out[f"{side}_attention_mask"].dtype == np.int64
        assert out[f"{side}_pixel_values"].shape == (rows, 3, height, width)
        assert out[f"{side}_pixel_values"].dtype == np.uint8
        expected = np.array([image is not None for image in raw[f"{side}_image"]])
        np.testing.assert_array_equal(out[f"{side}_has_image"], expected)
        assert out[f"{side}_has_image"].dtype == np.bool_
        pixels = out[f"{side}_pixel_values"]
        assert not pixels[~expected].any(), "rows without an image must hold zeros"
        assert all(np.abs(p).sum() > 0 for p in pixels[expected])
        assert (out[f"{side}_attention_mask"].sum(1) > 0).all()
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


def test_vlm_places_a_fixed_image_block(tiny_configs, raw):
    processor = processor_for(tiny_configs["tiny-qwen2-vl"])
    vocab = processor.tokenizer.get_vocab()
    out = processor(raw)
    tokens_per_image = (32 // 8) ** 2 // 4
    assert processor.seq_len == tiny_configs["tiny-qwen2-vl"].max_text_length + tokens_per_image + 2
    for side in ("qry", "pos"):
        for row, ids in enumerate(out[f"{side}_input_ids"]):
            real = ids[out[f"{side}_attention_mask"][row] == 1].tolist()
            pads = real.count(vocab[IMAGE_PAD])
            if out[f"{side}_has_image"][row]:
                assert pads == tokens_per_image
                start = real.index(vocab[VISION_START])
                assert real[start + 1 + tokens_per_image] == vocab[VISION_END]
                # MMEB's placeholder leads the text, so the block opens the sequence.
                assert start == 0
            else:
                assert pads == 0 and vocab[VISION_START] not in real
            text = processor.tokenizer.decode(real)
            assert "<|image_1|>" not in text
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


def test_vlm_pixels_match_the_qwen2_vl_image_processor(tiny_configs, make_png):
    """Our uint8 [3, H, W] storage re-patchified by the model equals the processor's own patch layout
    (rescale and normalisation off; the model does those, see test_pixels.py)."""
    processor = processor_for(tiny_configs["tiny-qwen2-vl"], image_size=40)  # rounds up to 48
    image = Image.open(io.BytesIO(make_png("orange", "square", size=57))).convert("RGB")
    gradient = Image.fromarray(np.arange(48 * 48 * 3, dtype=np.uint32).reshape(48, 48, 3).astype(np.uint8))
    out = processor.encode_inputs(["a", "b"], [image, gradient], "qry")
    assert out["qry_pixel_values"].shape == (2, 3, 48, 48)
    assert out["qry_pixel_values"].dtype == np.uint8
    patches, grid = patchify_qwen2_vl(torch.from_numpy(out["qry_pixel_values"]), 8, 2, 2)
    resized = [image.resize((48, 48), Image.BICUBIC), gradient]
    reference = geometry_only(processor, resized, size={"shortest_edge": 48 * 48, "longest_edge": 48 * 48})
    assert np.array_equal(reference["pixel_values"], np.rint(reference["pixel_values"]))
    np.testing.assert_array_equal(patches.numpy(), reference["pixel_values"])
    np.testing.assert_array_equal(grid.numpy(), reference["image_grid_thw"])


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
