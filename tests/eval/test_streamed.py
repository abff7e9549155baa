"""The evaluation fed by Ray Data (`sde_ray.eval.streamed`; end to end, with an undecodable image and
the decoding processes checked: tests/eval/test_runner.py): its embedding-cache keys are the
in-process path's, so a cache that path wrote answers every request, nothing is encoded and the
scores are the same."""

from __future__ import annotations

import pytest

from sde_ray.config import load_config
from sde_ray.eval.encode import CachedEncoder, ModelEncoder, model_identity
from sde_ray.eval.evaluation import evaluate_prepared
from sde_ray.eval.roots import select_datasets
from sde_ray.eval.runner import evaluate_on_actors

from .conftest import E2E_DATASETS

pytestmark = [pytest.mark.ray]


def test_a_cache_written_in_process_answers_the_streamed_pass(ray_cluster, synthetic_mmeb, tiny_export, tmp_path):
    folder, model, processor = tiny_export
    root = synthetic_mmeb["eval_dir"]
    infos = select_datasets(root, E2E_DATASETS)
    in_process = evaluate_prepared(None, CachedEncoder(ModelEncoder(model, processor, 16), model_identity(folder),
                                                       tmp_path / "cache"), eval_root=root, infos=infos)
    config = load_config(None, ["eval.num_workers=1"])
    evaluation, record = evaluate_on_actors(folder, root, infos, config, cache_dir=tmp_path / "cache")
    assert record["embedding_cache"]["hits"] == 2 * len(infos) and record["embedding_cache"]["misses"] == 0
    assert record["evaluated_by"] == []  # no actor started: nothing to encode
    assert evaluation.results() == in_process.results()
