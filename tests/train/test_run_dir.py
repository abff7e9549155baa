"""A run directory remembers its config: the relaunch of the issue (same command plus another
objective, a 10x learning rate and half the batch) is refused with those keys listed, before Ray
starts; a relative and an absolute spelling of the same paths are the same run; fork and override
do what they say."""

from __future__ import annotations

import json

import pytest
import yaml

from sde_ray.config import ConfigError, load_config, to_dict
from sde_ray.train.driver import resolve_paths, run_train
from sde_ray.train.run_dir import claim_run_dir

BASE = ["logging.wandb=false", "train.max_steps=5"]


def _config(*overrides):
    return resolve_paths(load_config(None, [*BASE, *overrides]))


def test_a_changed_config_is_refused_with_the_differing_keys(tmp_path, monkeypatch):
    import ray

    monkeypatch.chdir(tmp_path)
    claim_run_dir(_config("train.output_dir=runs/a", "data.cache_dir=cache"))
    recorded = (tmp_path / "runs/a/config.yaml").read_text()
    changed = load_config(None, [*BASE, "train.output_dir=runs/a", "data.cache_dir=cache", "loss.name=infonce",
                                 "train.lr=0.01", "train.global_batch_size=32"])
    ray_before = ray.is_initialized()  # an earlier test's session may be up; run_train must start none
    with pytest.raises(ConfigError) as info:
        run_train(changed)  # the real entry point: refused before any Ray session
    message = str(info.value)
    for key in ("loss.name", "train.lr", "train.global_batch_size"):
        assert key in message
    assert "train.max_steps" not in message and ray.is_initialized() == ray_before
    assert (tmp_path / "runs/a/config.yaml").read_text() == recorded  # provenance not overwritten


def test_the_same_paths_spelled_differently_are_the_same_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path)
    claim_run_dir(_config("train.output_dir=runs/a", "data.cache_dir=cache", "scaling.num_workers=2"))
    # absolute, through a symlink, with a trailing slash, on a different worker count
    again = _config(f"train.output_dir={tmp_path}/link/runs/a/", f"data.cache_dir={tmp_path}/cache",
                    "scaling.num_workers=1")
    assert claim_run_dir(again).train.output_dir == str(tmp_path / "runs/a")


def test_fork_starts_a_new_run_and_override_records_the_change(tmp_path):
    claim_run_dir(_config(f"train.output_dir={tmp_path}/a"))
    forked = claim_run_dir(_config(f"train.output_dir={tmp_path}/a", "train.lr=0.01", "train.on_config_change=fork"))
    assert forked.train.output_dir.startswith(f"{tmp_path}/a-fork-") and forked.train.run_name.startswith("sde-fork-")
    assert forked.train.storage_path == f"{forked.train.output_dir}/ray"
    assert yaml.safe_load((tmp_path / "a/config.yaml").read_text())["train"]["lr"] == 1e-3  # old run untouched

    kept = claim_run_dir(_config(f"train.output_dir={tmp_path}/a", "train.lr=0.01", "train.on_config_change=override"))
    assert kept.train.output_dir == f"{tmp_path}/a" and kept.train.lr == 0.01
    history = [json.loads(line) for line in (tmp_path / "a/config_history.jsonl").read_text().splitlines()]
    assert [(h["key"], h["old"], h["new"]) for h in history] == [("train.lr", 1e-3, 0.01)]
    assert yaml.safe_load((tmp_path / "a/config.yaml").read_text()) == to_dict(kept)


def test_a_shards_glob_matching_nothing_is_a_config_error_before_ray(tmp_path):
    import ray

    config = load_config(None, [*BASE, f"train.output_dir={tmp_path}/run", "data.source=mmeb",
                                f"data.shards=[{tmp_path}/nowhere/*.tar]"])
    ray_before = ray.is_initialized()
    with pytest.raises(ConfigError, match=r"data.shards\[0\]: .*nowhere/\*.tar' matches no WebDataset shard"):
        run_train(config)
    assert ray.is_initialized() == ray_before and not (tmp_path / "run").exists()


def test_a_record_from_before_a_config_key_existed_is_the_same_run(tmp_path, monkeypatch):
    """A run launched by an older sde_ray has no entry for a key added since (here eval.val_data_dir):
    relaunching it with that key at its default continues the run; at another value it is a change."""
    monkeypatch.chdir(tmp_path)
    config = _config("train.output_dir=runs/a", "data.cache_dir=cache")
    claim_run_dir(config)
    record = tmp_path / "runs/a/config.yaml"
    older = yaml.safe_load(record.read_text())
    del older["eval"]["val_data_dir"]
    record.write_text(yaml.safe_dump(older))
    assert claim_run_dir(config).train.output_dir == str(tmp_path / "runs/a")
    with pytest.raises(ConfigError, match="eval.val_data_dir"):
        claim_run_dir(_config("train.output_dir=runs/a", "data.cache_dir=cache", f"eval.val_data_dir={tmp_path}"))
