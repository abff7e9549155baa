"""`sde-ray eval --checkpoint` resolves what it was given: a run folder's newest complete checkpoint
beats an older `model/` export, an interrupted checkpoint is passed over, a folder holding several
runs is an error listing them, and the choice is printed. Reference: the weights saved into each
folder (three differently seeded tiny-clip models), compared with what the resolved folder loads."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from sde_ray.config import load_config, to_dict
from sde_ray.eval.checkpoints import resolve_checkpoint
from sde_ray.models import build_model
from sde_ray.models.build import load_pretrained
from sde_ray.train.checkpoint import write_manifest

CONFIG = load_config(None, ["model.name_or_path=tiny-clip"])


def _model(seed: int):
    return build_model(CONFIG.model, seed=seed)


def _checkpoint(run_dir: Path, step: int, seed: int, complete: bool = True) -> Path:
    directory = run_dir / "ray" / "sde" / f"checkpoint_{step:06d}_abc"
    directory.mkdir(parents=True)
    torch.save({f"model.{k}": v for k, v in _model(seed).state_dict().items()}, directory / "consolidated.pt")
    (directory / "state.json").write_text(json.dumps({"step": step, "world_size": 1, "config": to_dict(CONFIG)}))
    if complete:
        write_manifest(directory, rank=0)
    return directory


def _run(root: Path, exported_step: int) -> Path:
    run_dir = root / "run"
    _model(0).save_pretrained(run_dir / "model")
    (run_dir / "config.yaml").write_text("{}\n")
    (run_dir / "results.json").write_text(json.dumps({"train": {"step": exported_step}}))
    return run_dir


def _same_weights(model_dir: Path, seed: int) -> bool:
    loaded, _ = load_pretrained(model_dir)
    reference = _model(seed).state_dict()
    return all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())


def test_a_newer_complete_checkpoint_beats_an_older_export(tmp_path, capsys):
    run_dir = _run(tmp_path, exported_step=10)
    _checkpoint(run_dir, 10, seed=1)
    newest = _checkpoint(run_dir, 20, seed=2)
    _checkpoint(run_dir, 30, seed=3, complete=False)  # an interrupted write: no manifest
    resolved = resolve_checkpoint(run_dir, tmp_path / "work")
    assert resolved.source == newest and resolved.kind == "ray_checkpoint"
    assert _same_weights(resolved.model_dir, seed=2)
    assert f"evaluating ray_checkpoint: {newest}" in capsys.readouterr().out

    # Once the run's record says the export holds step 20, the export is what a run folder means.
    (run_dir / "results.json").write_text(json.dumps({"train": {"step": 20}}))
    resolved = resolve_checkpoint(run_dir, tmp_path / "work2")
    assert resolved.model_dir == run_dir / "model" and _same_weights(resolved.model_dir, seed=0)


def test_a_folder_with_several_runs_is_an_error_listing_them(tmp_path):
    first = _run(tmp_path / "a", exported_step=5)
    second = tmp_path / "b" / "run"
    _checkpoint(second, 7, seed=1)
    with pytest.raises(ValueError) as info:
        resolve_checkpoint(tmp_path, tmp_path / "work")
    assert str(first) in str(info.value) and str(second) in str(info.value) and "2 runs" in str(info.value)
    # Each run on its own still resolves.
    assert resolve_checkpoint(second, tmp_path / "work").source.name == "checkpoint_000007_abc"
