"""The evaluator's scoring and diagnostics with a CPU model while torch's default device is `meta`
(tests/conftest.py `meta_default_device`): encoding (tokens and uint8 pixels to the model's device,
pixel normalisation, the forward), P@1 and the spectral diagnostics of the encoded pairs. A tensor
made without an explicit device lands on `meta` and fails, as a CPU-made one fails beside a CUDA
model. Reference: the same evaluation outside the mode."""

from __future__ import annotations

from sde_ray.config import Config
from sde_ray.eval.diagnostics import feature_diagnostics
from sde_ray.eval.evaluation import evaluate_prepared
from sde_ray.eval.roots import select_datasets

DATASETS = ["SynObject", "SynCaption_t2i"]  # image → text and text → image


def _evaluate(tiny_export, root) -> tuple[dict, dict]:
    from sde_ray.eval.encode import ModelEncoder

    _, model, processor = tiny_export
    infos = select_datasets(root, DATASETS)
    evaluation = evaluate_prepared(None, ModelEncoder(model, processor, batch_size=8), eval_root=root, infos=infos)
    query, target = evaluation.pairs[0]
    diagnostics, _ = feature_diagnostics(query, target, Config(), k=4)
    return evaluation.results(), diagnostics


def test_scoring_and_diagnostics_run_with_meta_as_the_default_device(meta_default_device, synthetic_mmeb,
                                                                     tiny_export):
    want = _evaluate(tiny_export, synthetic_mmeb["eval_dir"])
    with meta_default_device():
        got = _evaluate(tiny_export, synthetic_mmeb["eval_dir"])
    assert set(want[0]["datasets"]) == set(DATASETS)
    assert got == want
