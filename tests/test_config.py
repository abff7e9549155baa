"""The config tree: strict loading, overrides, validation, and every shipped config file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from sde_ray.config import (
    Config,
    ConfigError,
    describe,
    dump_yaml,
    from_dict,
    load_config,
    parse_override,
    replace,
    to_dict,
)
from sde_ray.config import _leaves
from sde_ray.cli import main

REPO = Path(__file__).resolve().parents[1]


def _training_configs() -> list[Path]:
    return sorted(p for p in (REPO / "configs").rglob("*.yaml") if "sweeps" not in p.parts)


@pytest.mark.parametrize("path", _training_configs(), ids=lambda p: p.name)
def test_every_shipped_training_config_loads_and_validates(path):
    config = load_config(path)
    assert isinstance(config, Config)
    # Round trip: the resolved YAML reloads to the same tree.
    assert from_dict(yaml.safe_load(dump_yaml(config))) == config


# The patch size of each VLM family's released image processor (preprocessor_config.json of the
# checkpoints; the merge is 2×2 in all): Qwen2-VL and Qwen2.5-VL 14, Qwen3-VL 16.
RECIPE_PATCH = {"qwen3-vl": 16, "qwen2.5-vl": 14, "qwen2-vl": 14}


@pytest.mark.parametrize("path", [p for p in _training_configs() if load_config(p).model.kind == "vlm"],
                         ids=lambda p: p.name)
def test_every_vlm_recipe_sets_its_resolution_and_gives_a_448_image_256_tokens(path):
    """A VLM recipe names its pixel range (no silent processor default) and trains at a resolution a
    document survives: a 448×448 image gets at least 256 visual tokens, counted with the processor's
    own rule (transformers' Qwen2VLImageProcessor with the family's patch size, built here)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model = load_config(path).model
    assert model.min_pixels > 0 and model.max_pixels > 0, f"{path.name}: set model.min_pixels and max_pixels"
    family = next(key for key in RECIPE_PATCH if key in model.name_or_path.lower())
    processor = Qwen2VLImageProcessorPil(patch_size=RECIPE_PATCH[family], merge_size=2,
                                         min_pixels=model.min_pixels, max_pixels=model.max_pixels)
    grid = processor(images=[np.zeros((448, 448, 3), np.uint8)], return_tensors="np")["image_grid_thw"][0]
    assert grid.prod() // 4 >= 256, f"{path.name}: a 448×448 image gets {grid.prod() // 4} visual tokens"


def test_defaults_validate_and_round_trip():
    config = load_config(None)
    assert from_dict(to_dict(config)) == config


def test_precedence_cli_over_file_over_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.5\n  max_steps: 7\n")
    config = load_config(path, ["train.lr=0.25"])
    assert config.train.lr == 0.25  # CLI wins over file
    assert config.train.max_steps == 7  # file wins over default
    assert config.train.seed == Config().train.seed  # default kept


def test_override_values_are_parsed_as_yaml():
    assert parse_override("data.subsets=[A, B]") == (["data", "subsets"], ["A", "B"])
    assert load_config(None, ["train.lr=3e-4"]).train.lr == 3e-4  # YAML 1.1 would say "3e-4"
    config = load_config(None, ["deepspeed.overrides={zero_optimization: {overlap_comm: true}}"])
    assert config.deepspeed.overrides == {"zero_optimization": {"overlap_comm": True}}


@pytest.mark.parametrize(
    "override, fragment",
    [
        (["train.lrr=1"], "train.lrr"),
        (["trian.lr=1"], "trian"),
        (["spectral.alpha.kindd=linear"], "spectral.alpha.kindd"),
    ],
)
def test_unknown_keys_name_the_key_and_close_valid_names(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    message = str(info.value)
    assert fragment in message
    assert "Valid keys" in message


def test_unknown_key_in_file_suggests_the_close_name(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  temprature: 0.1\n")
    with pytest.raises(ConfigError, match=r"loss\.temprature.*Did you mean temperature"):
        load_config(path)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.max_steps=abc", "train.max_steps: expected an integer"),
        ("train.lr=[1]", "train.lr: expected a number"),
        ("model.normalize=maybe", "model.normalize: expected true/false"),
        ("loss.name=contrastive", "loss.name: 'contrastive' is not one of"),
        ("data.subsets=3", "data.subsets: expected a list"),
        ("train=3", "train: expected a mapping"),
    ],
)
def test_wrong_types_are_errors_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.global_batch_size=63"], "global_batch_size"),
        (["scaling.min_workers=1", "scaling.max_workers=3", "train.global_batch_size=64"], "every worker count"),
        (["deepspeed.precision=fp16"], "fp16 needs a GPU"),
        (["deepspeed.zero_stage=4"], "zero_stage"),
        (["scaling.min_workers=3", "scaling.max_workers=2"], "min <= max"),
        (["spectral.alpha.warmup=1.5"], "spectral.alpha.warmup"),
        (["data.source=mmeb"], "mmeb_train_dir"),
        (["spectral.eps_noise=2"], "eps_noise"),
    ],
)
def test_invalid_combinations_are_caught_before_any_worker(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, overrides)


def test_elastic_batch_divisible_by_every_count_passes():
    config = load_config(None, ["scaling.min_workers=1", "scaling.max_workers=2", "train.global_batch_size=64"])
    assert (config.scaling.min_workers, config.scaling.max_workers) == (1, 2)


def test_replace_returns_a_validated_copy():
    base = load_config(None)
    new = replace(base, ["loss.name=infonce"])
    assert new.loss.name == "infonce" and base.loss.name == "sde"
    with pytest.raises(ConfigError):
        replace(base, ["train.global_batch_size=3"])


def test_every_field_is_documented():
    rows = describe()
    undocumented = [key for key, _, text in rows if not text.strip()]
    assert not undocumented, undocumented
    flat = {}

    def flatten(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict) and key not in ("overrides", "space"):
                flatten(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    flatten(to_dict(Config()))
    assert [key for key, _, _ in rows] == list(flat)
    # Nested defaults are the parent's, not the nested class's own.
    shown = {key: default for key, default, _ in rows}
    assert shown["loss.fanoise.schedule.start"] == repr(Config().loss.fanoise.schedule.start)


def test_config_reference_doc_is_current():
    """docs/config.md is generated from the tree (`python -m sde_ray.config_doc`)."""
    from sde_ray.config_doc import render

    assert (REPO / "docs" / "config.md").read_text() == render()


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.global_batch_size=-4", "train.global_batch_size"),
        ("train.global_batch_size=0", "train.global_batch_size"),
        ("train.lr=.nan", "train.lr"),
        ("train.lr=.inf", "train.lr"),
        ("spectral.rho=.nan", "spectral.rho"),
        ("loss.temperature=-.inf", "loss.temperature"),
        ("train.micro_batch_size=-1", "train.micro_batch_size"),
        ("train.warmup_steps=-3", "train.warmup_steps"),
        ("train.grad_clip=-1", "train.grad_clip"),
        ("eval.batch_size=0", "eval.batch_size"),
        ("model.image_size=0", "model.image_size"),
        ("scaling.max_failures=-1", "scaling.max_failures"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints"),
        ("model.lora.dropout=1.5", "model.lora.dropout"),
    ],
)
def test_out_of_range_and_non_finite_values_are_named(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, [override])


def test_every_float_field_is_checked_for_finiteness():
    # The generic pass covers float fields that no per-field rule names, e.g. one added later.
    floats = [key for key, value in _leaves(Config()) if isinstance(value, float)]
    assert len(floats) > 20
    for key in floats:
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(None, [f"{key}=.nan"])


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"train:\n  lr: [1, 2\n", "invalid YAML"),
        (b"train:\n\tlr: 0.1\n", "invalid YAML"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a text file"),
        (b"- a\n- b\n", "top level must be a mapping"),
    ],
)
def test_config_file_problems_are_one_line_naming_the_path(tmp_path, capsys, content, fragment):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    assert main(["config", "show", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: {path}: ") and fragment in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_directory_as_config_is_a_config_error(tmp_path, capsys):
    assert main(["config", "show", "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: {tmp_path}: is a directory") and err.count("\n") == 1


def test_default_config_is_read_relative_to_the_current_directory(tmp_path, monkeypatch, capsys):
    # Run from another directory, the default configs/default.yaml is missing: an error, not the
    # built-in defaults in disguise. `--config ''` asks for those explicitly.
    monkeypatch.chdir(tmp_path)
    assert main(["config", "show"]) == 2
    assert "config error: configs/default.yaml: config file not found" in capsys.readouterr().err
    assert main(["config", "show", "--config", ""]) == 0
    assert from_dict(yaml.safe_load(capsys.readouterr().out)) == Config()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "default.yaml").write_text("train:\n  max_steps: 7\n")
    assert main(["config", "show"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["max_steps"] == 7


def test_a_bad_value_stops_sde_ray_train_before_ray_starts(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sde_ray.cli", "train", "--config", "", f"train.output_dir={tmp_path}",
         "train.global_batch_size=-4"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "config error: train.global_batch_size must be >= 1, got -4."]
    assert not list(tmp_path.iterdir())  # nothing written, no Ray session started
