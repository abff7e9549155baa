"""Fixtures of the eval tests: a small synthetic MMEB and an exported tiny-clip model (once per session)."""

from __future__ import annotations

import pytest

# A few datasets covering every meta-task and both splits keep the end-to-end tests small.
E2E_DATASETS = ["SynObject", "SynObject-Novel", "SynVQA-Colour", "SynCaption_t2i", "SynGround"]


@pytest.fixture(scope="session")
def synthetic_mmeb(tmp_path_factory):
    from sde_ray.data.synthetic import write_synthetic_mmeb

    return write_synthetic_mmeb(
        tmp_path_factory.mktemp("synth"), seed=0, train_per_subset=2, eval_per_dataset=8, num_candidates=4
    )


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """(model folder, model, processor) of a randomly initialised tiny-clip written by save_pretrained."""
    from sde_ray.config import ModelConfig
    from sde_ray.models import BatchProcessor, build_model

    config = ModelConfig(name_or_path="tiny-clip")
    model = build_model(config, seed=0).eval()
    folder = model.save_pretrained(tmp_path_factory.mktemp("export") / "model")
    return folder, model, BatchProcessor(config)
