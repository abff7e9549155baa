"""An export loads outside sde_ray and gives our loader's embeddings within 1e-5: with plain
transformers (CLIP, SigLIP), with sentence-transformers (CLIP, through the module files the export
writes), and with LoRA merged or kept as an adapter (our loader and transformers + peft).

A dual encoder embeds an item as its text's embedding plus, when it has one, its image's (the text
is the prompt; '' for a bare image), so an image item is `text_features('') + image_features(image)`
outside sde_ray."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sde_ray.config import LoraConfig, ModelConfig
from sde_ray.eval.encode import load_encoder
from sde_ray.models import build_model

TEXTS = ["a red circle", "two blue squares on white", "what colour is the triangle?"]


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(2)]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def ours(folder) -> tuple[np.ndarray, np.ndarray]:
    """(text items, bare image items) embeddings through sde_ray's loader and processor (the
    evaluator's encoder)."""
    encoder = load_encoder(folder, 8)
    return (encoder.encode_batch("target", TEXTS, [None] * len(TEXTS)),
            encoder.encode_batch("target", [""] * 2, [png(i) for i in images()]))


def plain_transformers(folder, max_length: int, model=None) -> tuple[np.ndarray, np.ndarray]:
    from transformers import AutoModel, AutoProcessor

    model = (model or AutoModel.from_pretrained(str(folder))).eval()
    processor = AutoProcessor.from_pretrained(str(folder))
    with torch.no_grad():
        text = model.get_text_features(**processor(text=TEXTS + [""], padding="max_length", max_length=max_length,
                                                   truncation=True, return_tensors="pt")).pooler_output
        image = model.get_image_features(**processor(images=images(), return_tensors="pt")).pooler_output
    return text[:-1].numpy(), (text[-1:] + image).numpy()


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-siglip"])
def test_plain_transformers_gives_our_embeddings(tmp_path, name):
    config = ModelConfig(name_or_path=name)
    folder = build_model(config, seed=3).save_pretrained(tmp_path / "model")
    for got, want in zip(plain_transformers(folder, config.max_text_length), ours(folder)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sentence_transformers_gives_our_embeddings(tmp_path):
    from sentence_transformers import SentenceTransformer

    folder = build_model(ModelConfig(name_or_path="tiny-clip"), seed=4).save_pretrained(tmp_path / "model")
    assert (folder / "modules.json").is_file() and (folder / "sentence_bert_config.json").is_file()
    model = SentenceTransformer(str(folder), device="cpu")
    text, image = ours(folder)
    np.testing.assert_allclose(model.encode(TEXTS, convert_to_numpy=True), text, rtol=1e-5, atol=1e-5)
    bare = model.encode([""], convert_to_numpy=True) + model.encode(images(), convert_to_numpy=True)
    np.testing.assert_allclose(bare, image, rtol=1e-5, atol=1e-5)


def test_lora_merged_and_kept_as_adapter_give_the_trained_model(tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    config = ModelConfig(name_or_path="tiny-clip",
                         lora=LoraConfig(enabled=True, r=4, target_modules=["q_proj", "v_proj"]))
    model = build_model(config, seed=5).eval()
    with torch.no_grad():  # a trained adapter: B is zero at initialisation, which would hide a lost adapter
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    merged = model.save_pretrained(tmp_path / "merged")
    adapter = model.save_pretrained(tmp_path / "adapter", merge_lora=False)
    assert (adapter / "adapter" / "adapter_config.json").is_file()

    from sde_ray.eval.encode import ModelEncoder
    from sde_ray.models import BatchProcessor

    live = ModelEncoder(model, BatchProcessor(config))
    want = live.encode_batch("target", TEXTS, [None] * len(TEXTS))
    for folder in (merged, adapter):
        np.testing.assert_allclose(ours(folder)[0], want, rtol=1e-5, atol=1e-5)
    # Outside sde_ray: transformers on the merged folder; transformers + peft on the kept adapter.
    np.testing.assert_allclose(plain_transformers(merged, config.max_text_length)[0], want, rtol=1e-5, atol=1e-5)
    with_adapter = PeftModel.from_pretrained(AutoModel.from_pretrained(str(adapter)), str(adapter / "adapter"))
    np.testing.assert_allclose(plain_transformers(adapter, config.max_text_length, with_adapter)[0], want,
                               rtol=1e-5, atol=1e-5)
    # The adapter matters: the base weights alone give other embeddings.
    assert np.abs(plain_transformers(adapter, config.max_text_length)[0] - want).max() > 1e-3
