"""The model card of an export: the training settings and the evaluation's scores, and the ways to load it."""

from __future__ import annotations

from pathlib import Path

from sde_ray.config import Config, with_values
from sde_ray.embed.card import write_model_card
from sde_ray.eval.encode import model_identity
from sde_ray.eval.evaluation import evaluate_model


def test_card_reports_training_and_scores_and_leaves_the_identity(tmp_path, tiny_export, synthetic_mmeb):
    folder, model, processor = tiny_export
    results = evaluate_model(model, processor, Path(synthetic_mmeb["eval_dir"]), datasets=["SynObject", "SynCaption_t2i"])
    config = with_values(Config(), {"loss.name": "sde", "train.max_steps": 7})
    before = model_identity(folder)
    card = write_model_card(folder, config, results, {"step": 7}).read_text()
    assert model_identity(folder) == before  # documentation only: no cache key changes
    assert "objective: `sde`" in card and "steps: 7 of 7" in card
    for name, row in results["datasets"].items():
        assert f"| {name} | {row['meta_task']} | {row['split']} | {100 * row['p_at_1']:.1f} |" in card
    assert "SentenceTransformer" in card and "get_text_features" in card
    (folder / "README.md").unlink()
