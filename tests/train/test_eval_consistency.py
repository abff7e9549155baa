"""The evaluator embeds a training row exactly as the training forward does (eval mode), for every
model kind: a CLIP dual encoder, a dual encoder assembled from transformers-made checkpoints (a ViT +
the real all-MiniLM-L6-v2) and a Qwen2-VL embedder.

Training side: samples read from the real training shards, through the data pipeline's own steps
(`raw_batch_from_rows`, the model's `BatchProcessor`, the loop's `to_model_inputs`) into the
`TrainModule` forward, as one batch. Evaluator side: the same rows' raw texts and image bytes handed
to the evaluator's `ModelEncoder` in batches of another size. A difference between the two — a
text or image transformed in one path only, an embedding depending on its batch neighbours or on
padding, a fusion applied in one path only — would make held-out scores measure another model than
the one trained."""

from __future__ import annotations

import pytest
import torch

from sde_ray.config import load_config

# Three shards' rows 0, 5 and 9: several subsets, sides with and without images.
ROWS = [0, 5, 9]


def model_overrides(kind: str, vit: str, minilm: str) -> list[str]:
    if kind == "assembled":
        return ["model.name_or_path=", f"model.vision_name_or_path={vit}", f"model.text_name_or_path={minilm}",
                "model.pooling=mean"]
    return {"dual_encoder": ["model.name_or_path=tiny-clip"],
            "vlm": ["model.kind=vlm", "model.name_or_path=tiny-qwen2-vl"]}[kind]


@pytest.mark.parametrize("kind", ["dual_encoder", "assembled", "vlm"])
def test_evaluator_embeds_a_training_row_like_the_training_forward(small_config, kind, vit, minilm):
    from sde_ray.data.batches import raw_batch_from_rows
    from sde_ray.data.cache import prepare_data
    from sde_ray.data.shards import read_samples
    from sde_ray.eval.encode import ModelEncoder
    from sde_ray.models import BatchProcessor
    from sde_ray.train.loop import build_train_module, to_model_inputs

    config = small_config(*model_overrides(kind, vit, minilm))
    shards = prepare_data(config).shards[:3]
    raws = [raw_batch_from_rows(read_samples(shard, ROWS)) for shard in shards]
    raw = {key: [value for part in raws for value in part[key]] for key in raws[0]}
    assert any(raw["qry_image"]) and not all(raw["qry_image"])  # sides with and without an image
    assert len(set(raw["subset"])) > 1

    module = build_train_module(config).eval()
    arrays = BatchProcessor(config.model)(raw)
    batch = to_model_inputs({k: torch.as_tensor(v) for k, v in arrays.items()}, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        query, target = module(batch)

    encoder = ModelEncoder(module.model, BatchProcessor(config.model), batch_size=4)
    eval_query, eval_target = encoder.encode([("query", raw["qry_text"], raw["qry_image"]),
                                              ("target", raw["pos_text"], raw["pos_image"])])
    torch.testing.assert_close(torch.from_numpy(eval_query), query, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(eval_target), target, rtol=1e-4, atol=1e-5)
    assert not module.training  # the encoder restores the mode it found
