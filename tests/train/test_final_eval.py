"""The final MMEB evaluation of `run_train` runs after `fit()` on the eval runner's Ray actors (not
in a training worker), scores the export exactly like an in-process evaluation of it, writes the
VLM2Vec-layout score files, and a second `sde-ray eval` of the same run encodes nothing. The same
command relaunched on the finished run trains no step and reports the run's last training metrics
(what `sde-ray compare` records), not an empty summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_final_eval_on_eval_actors_after_fit(ray_cluster, small_config):
    from sde_ray.eval.encode import model_identity
    from sde_ray.eval.evaluation import evaluate_model
    from sde_ray.eval.runner import run_eval
    from sde_ray.models import BatchProcessor, load_pretrained
    from sde_ray.train.driver import run_train

    config = small_config("train.max_steps=4", "train.eval_every=2", "eval.num_workers=2",
                          "eval.datasets=[SynColour,SynCaption_t2i]")
    result = run_train(config)
    evaluation, train = result["eval"], result["train"]
    actors = evaluation["evaluated_by"]
    assert len(actors) == 2
    training_pids = {train["train_worker_pid"], os.getpid()}
    for actor in actors:
        assert actor["pid"] not in training_pids and actor["device"] == "cpu"
        assert actor["started_at"] > train["train_finished_at"]  # the worker group had finished
    assert evaluation["embedding_cache"]["misses"] == 4 and evaluation["embedding_cache"]["hits"] == 0

    # Reference: the exported model evaluated in this process.
    model, model_config = load_pretrained(result["model_dir"])
    eval_root = evaluation["data_dir"]
    local = evaluate_model(model, BatchProcessor(model_config), eval_root,
                           datasets=["SynColour", "SynCaption_t2i"])
    assert {n: r["p_at_1"] for n, r in evaluation["datasets"].items()} == {
        n: r["p_at_1"] for n, r in local["datasets"].items()
    }
    on_disk = json.loads((Path(result["output_dir"]) / "results.json").read_text())
    assert on_disk["overall"] == evaluation["overall"]

    score_dir = Path(result["output_dir"]) / "eval" / "vlm2vec"
    for name, row in local["datasets"].items():
        score = json.loads((score_dir / f"{name}_score.json").read_text())
        assert score["acc"] == row["p_at_1"] and score["num_pred"] == row["num_queries"] == 16
        assert score["model"]["sha256"] == model_identity(result["model_dir"])
        assert "synthetic" in score["benchmark"]

    # Relaunched on the finished run: resumed at max_steps, no step trained, the same training summary.
    relaunch = run_train(config)
    assert relaunch["train"]["step"] == 4
    logged = [json.loads(line) for line in (Path(result["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if "loss" in row][-1] == 4  # nothing appended by the relaunch
    for key in ("loss", "energy_strong_q", "effective_rank_q", "gap_centroid"):
        assert relaunch["train"][key] == train[key], key

    # `sde-ray eval` of the run: same output folder, same model, same data -> every request cached.
    again = run_eval(result["output_dir"], eval_root, datasets=["SynColour", "SynCaption_t2i"],
                     config=small_config("logging.wandb=false"))
    assert again["embedding_cache"] == {**evaluation["embedding_cache"], "hits": 4, "misses": 0}
    assert {n: r["p_at_1"] for n, r in again["datasets"].items()} == {
        n: r["p_at_1"] for n, r in local["datasets"].items()
    }
