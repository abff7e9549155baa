"""The in-process encoder under autocast, and the embedding cache: a second evaluation of the same
model on the same data encodes nothing (counted in encoder calls), another model or changed data
does encode, and the cached embeddings equal fresh ones."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sde_ray.eval.encode import CachedEncoder, ModelEncoder, module_identity
from sde_ray.eval.evaluation import evaluate_prepared
from sde_ray.eval.roots import select_datasets
from sde_ray.eval.scoring import prepare_dataset
from sde_ray.data.mmeb import eval_image_source

from .conftest import E2E_DATASETS


@pytest.fixture(scope="module")
def prepared(synthetic_mmeb):
    root = Path(synthetic_mmeb["eval_dir"])
    source = eval_image_source(root)
    try:
        return [prepare_dataset(root, info, source) for info in select_datasets(root, E2E_DATASETS)]
    finally:
        source.close()


def test_second_evaluation_encodes_nothing(prepared, tiny_export, tmp_path):
    _, model, processor = tiny_export
    plain = ModelEncoder(model, processor, batch_size=4)
    reference = evaluate_prepared(prepared, plain, keep_encoded=True)

    counted = ModelEncoder(model, processor, batch_size=4)
    cached = CachedEncoder(counted, module_identity(model), tmp_path / "cache")
    first = evaluate_prepared(prepared, cached, keep_encoded=True)
    calls = counted.calls
    assert calls == plain.calls > 0
    assert evaluate_prepared(prepared, cached).results() == reference.results()
    assert counted.calls == calls  # nothing encoded twice (memory)

    # A new process's cache over the same folder: still nothing encoded (disk), same embeddings.
    fresh = ModelEncoder(model, processor, batch_size=4)
    reloaded = evaluate_prepared(prepared, CachedEncoder(fresh, module_identity(model), tmp_path / "cache"),
                                 keep_encoded=True)
    assert fresh.calls == 0
    for a, b, c in zip(reference.encoded, first.encoded, reloaded.encoded):
        np.testing.assert_array_equal(a.candidate_embeddings, c.candidate_embeddings)
        np.testing.assert_array_equal(b.query_embeddings, c.query_embeddings)

    # Another model (other weights) encodes everything again.
    from sde_ray.config import ModelConfig
    from sde_ray.models import build_model

    other_model = build_model(ModelConfig(name_or_path="tiny-clip"), seed=1).eval()
    assert module_identity(other_model) != module_identity(model)
    other = ModelEncoder(other_model, processor, batch_size=4)
    evaluate_prepared(prepared, CachedEncoder(other, module_identity(other_model), tmp_path / "cache"))
    assert other.calls == calls


def test_changed_dataset_content_is_encoded_again(synthetic_mmeb, tiny_export, tmp_path):
    """Same dataset name, one candidate text changed: its candidate request misses, its queries hit."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, model, processor = tiny_export
    root = tmp_path / "eval"
    shutil.copytree(synthetic_mmeb["eval_dir"], root)
    name = E2E_DATASETS[0]
    source = eval_image_source(root)
    info = select_datasets(root, [name])[0]
    encoder = CachedEncoder(ModelEncoder(model, processor, batch_size=4), module_identity(model))
    evaluate_prepared([prepare_dataset(root, info, source)], encoder)
    path = next(Path(root, name).glob("test-*.parquet"))
    table = pq.read_table(path).to_pylist()
    table[0]["tgt_text"] = ["a changed label"] + table[0]["tgt_text"][1:]
    pq.write_table(pa.Table.from_pylist(table), path)
    evaluate_prepared([prepare_dataset(root, info, source)], encoder)
    source.close()
    assert (encoder.hits, encoder.misses) == (1, 3)


def test_bf16_autocast_features_are_fp32_and_close(prepared, tiny_export):
    _, model, processor = tiny_export
    side, texts, images = prepared[0].requests()[1]
    fp32 = ModelEncoder(model, processor, batch_size=8).encode([(side, texts, images)])[0]
    bf16 = ModelEncoder(model, processor, batch_size=8, precision="bf16").encode([(side, texts, images)])[0]
    assert bf16.dtype == np.float32 and not np.array_equal(fp32, bf16)  # autocast really ran in bf16
    cosine = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cosine.min() > 0.99
    # The eval actors' mode: the weights themselves in the training dtype (a copy: the fixture's stays fp32).
    import copy

    cast = ModelEncoder(copy.deepcopy(model), processor, batch_size=8, precision="bf16", cast_weights=True)
    assert {p.dtype for p in cast.model.parameters()} == {torch.bfloat16}
    weights_bf16 = cast.encode([(side, texts, images)])[0]
    assert weights_bf16.dtype == np.float32 and cast.forward_seconds > 0
    cosine = (fp32 * weights_bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(weights_bf16, axis=1)
    assert cosine.min() > 0.99


@pytest.mark.gpu
def test_gpu_bf16_encoder_matches_cpu_fp32(prepared, tiny_export):
    """On CUDA: the encoder runs on the GPU in bf16 and agrees with the CPU fp32 features."""
    import copy

    _, model, processor = tiny_export
    side, texts, images = prepared[0].requests()[1]
    reference = ModelEncoder(model, processor, batch_size=8).encode([(side, texts, images)])[0]
    gpu = ModelEncoder(copy.deepcopy(model), processor, batch_size=8, device="cuda", precision="bf16")
    assert next(gpu.model.parameters()).device.type == "cuda"
    features = gpu.encode([(side, texts, images)])[0]
    cosine = (reference * features).sum(1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(features, axis=1)
    assert features.dtype == np.float32 and cosine.min() > 0.99
