"""Driver and loop pieces that need no training workers: dry run, path resolution, the CPU
capacity check, the batch stream's resume arithmetic, metrics.jsonl truncation on resume."""

from __future__ import annotations

import json

import pytest
import torch

from sde_ray.config import ConfigError, load_config
from sde_ray.train.checkpoint import match_shapes
from sde_ray.ray_cluster import run_resources
from sde_ray.train.driver import dry_run_report, resolve_paths
from sde_ray.train.data import BatchStream
from sde_ray.runs import RunLogger


def test_dry_run_builds_model_and_every_deepspeed_config(capsys, tmp_path):
    config = load_config(None, ["scaling.min_workers=1", "scaling.max_workers=2", "train.global_batch_size=32",
                                f"train.output_dir={tmp_path}/out", "deepspeed.zero_stage=3"])
    report = dry_run_report(config)
    assert report["parameters"]["encoder"]["trainable"] > 0
    assert {w: d["train_micro_batch_size_per_gpu"] for w, d in report["deepspeed"].items()} == {"1": 32, "2": 16}
    assert all(d["zero_optimization"]["stage"] == 3 for d in report["deepspeed"].values())
    out = capsys.readouterr().out
    assert "parameters:" in out and "DeepSpeed config for 2 worker(s)" in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing and starts nothing


def test_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = resolve_paths(load_config(None, ["train.output_dir=runs/x", "data.cache_dir=cache"]))
    assert config.train.output_dir == str(tmp_path / "runs" / "x")
    assert config.train.storage_path == str(tmp_path / "runs" / "x" / "ray")
    assert config.data.cache_dir == str(tmp_path / "cache")
    keep = resolve_paths(load_config(None, ["train.storage_path=s3://bucket/runs"]))
    assert keep.train.storage_path == "s3://bucket/runs"


def test_run_resources_count_workers_data_and_the_trial_driver():
    config = load_config(None, ["scaling.num_workers=2", "scaling.cpus_per_worker=1.5", "data.data_cpus=1"])
    assert run_resources(config) == {"CPU": 4.0}
    assert run_resources(config, trial=True)["CPU"] == pytest.approx(4.01)
    elastic = load_config(None, ["scaling.min_workers=1", "scaling.max_workers=4", "train.global_batch_size=48"])
    assert run_resources(elastic)["CPU"] == 5.0 and run_resources(elastic, 1)["CPU"] == 2.0
    gpu = load_config(None, ["scaling.num_workers=2", "scaling.use_gpu=true"])
    assert run_resources(gpu)["GPU"] == 2.0


@pytest.mark.ray
def test_capacity_check_fails_fast_with_the_numbers(ray_cluster):
    from sde_ray.ray_cluster import check_capacity

    check_capacity(load_config(None, ["scaling.num_workers=2"]))  # 2 + 1 data CPU fit in 4
    with pytest.raises(ConfigError, match=r"has 4 CPUs but the run needs 5: 4 worker\(s\).*data.data_cpus=1"):
        check_capacity(load_config(None, ["scaling.num_workers=4"]))
    # Elastic (1, 4) with 1-CPU workers would grow to all 4 CPUs and starve the data stage.
    with pytest.raises(ConfigError, match=r"grow to 4 worker\(s\).*leaving 0 CPUs"):
        check_capacity(load_config(None, ["scaling.min_workers=1", "scaling.max_workers=4",
                                          "train.global_batch_size=48"]))
    check_capacity(load_config(None, ["scaling.min_workers=1", "scaling.max_workers=3",
                                      "train.global_batch_size=48"]))


def _epochs(rows_per_epoch: int, batch: int, opened: list):
    """Epochs of `rows_per_epoch // batch` batches; records each (epoch, start_step) it is opened at."""
    def open_epoch(epoch: int, start_step: int):
        opened.append((epoch, start_step))
        for start in range(start_step * batch, rows_per_epoch - batch + 1, batch):
            yield {"row": torch.arange(start, start + batch) + 1000 * epoch}
    return open_epoch


def test_batch_stream_rolls_epochs_and_resumes_at_the_saved_step():
    opened = []
    stream = BatchStream(_epochs(40, 8, opened), global_rows=8, epoch=0, epoch_rows=0)
    rows = [int(stream.next()["row"][0]) for _ in range(7)]
    assert rows == [0, 8, 16, 24, 32, 1000, 1008]
    assert (stream.epoch, stream.epoch_rows) == (1, 16)
    # A resume opens the saved epoch at the saved step (nothing before it is produced).
    opened = []
    resumed = BatchStream(_epochs(40, 8, opened), global_rows=8, epoch=1, epoch_rows=16)
    assert int(resumed.next()["row"][0]) == 1016 and opened == [(1, 2)]
    with pytest.raises(ValueError, match="whole number of global batches"):
        BatchStream(_epochs(40, 8, []), global_rows=8, epoch=1, epoch_rows=12)


def test_batch_stream_opens_the_next_epoch_ahead_with_the_same_batches():
    """Look-ahead moves only the opening: the rows are the plain stream's, epoch 1 is opened while
    epoch 0 still has its last `lead_steps` batches to give, and no epoch past `batches_left`."""
    plain = BatchStream(_epochs(40, 8, []), global_rows=8, epoch=0, epoch_rows=0)
    expected = [plain.next()["row"].tolist() for _ in range(12)]
    opened, when = [], []
    stream = BatchStream(_epochs(40, 8, opened), global_rows=8, epoch=0, epoch_rows=0,
                         epoch_steps=lambda epoch: 5, lead_steps=2, batches_left=12)
    rows = []
    for _ in range(12):
        rows.append(stream.next()["row"].tolist())
        if stream.ahead is not None:
            stream.ahead.thread.join()  # the thread has opened its epoch: record when, in batches
        when.append(list(opened))
    assert rows == expected
    assert (stream.epoch, stream.epoch_rows) == (plain.epoch, plain.epoch_rows) == (2, 16)
    # Epoch 1 is open once 2 batches of epoch 0 are left (after its 3rd), epoch 2 after epoch 1's 3rd
    # (the 8th batch); the 12 batches end inside epoch 2, so epoch 3 is never opened.
    assert when[1] == [(0, 0)] and when[2] == [(0, 0), (1, 0)]
    assert when[7] == [(0, 0), (1, 0), (2, 0)] and opened == [(0, 0), (1, 0), (2, 0)]
    # A resume mid-epoch opens the saved epoch at the saved step, then looks ahead the same way.
    opened = []
    resumed = BatchStream(_epochs(40, 8, opened), global_rows=8, epoch=1, epoch_rows=16,
                          epoch_steps=lambda epoch: 5, lead_steps=2)
    assert [resumed.next()["row"].tolist() for _ in range(4)] == expected[7:11] and opened[:2] == [(1, 2), (2, 0)]


def test_batch_stream_raises_the_look_ahead_threads_error_when_the_epoch_is_due():
    def open_epoch(epoch: int, start_step: int):
        if epoch == 1:
            raise OSError("shard gone")
        return iter([{"row": torch.tensor([epoch])}] * 2)

    stream = BatchStream(open_epoch, global_rows=1, epoch=0, epoch_rows=0, epoch_steps=lambda epoch: 2, lead_steps=2)
    assert stream.next()["row"].tolist() == [0] and stream.next()["row"].tolist() == [0]
    with pytest.raises(OSError, match="shard gone"):
        stream.next()


def test_batch_stream_names_a_dataset_smaller_than_one_batch():
    stream = BatchStream(_epochs(4, 8, []), global_rows=8, epoch=0, epoch_rows=0)
    with pytest.raises(RuntimeError, match="no full global batch of 8 rows"):
        stream.next()


def test_metrics_jsonl_is_truncated_to_the_resumed_step(tmp_path):
    config = load_config(None, ["logging.wandb=false"])
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4, 5, 6)))
    logger = RunLogger(config, str(tmp_path), "run-id", "disabled", resumed_step=5)
    logger.log(6, {"loss": 0.5})
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [2, 4, 5, 6]
    assert json.loads(path.read_text().splitlines()[-1])["loss"] == 0.5


def test_match_shapes_restores_scalar_parameters():
    module = torch.nn.Module()
    module.scale = torch.nn.Parameter(torch.tensor(2.0))
    module.weight = torch.nn.Parameter(torch.ones(3))
    fixed = match_shapes({"scale": torch.tensor([5.0]), "weight": torch.zeros(3)}, module)
    module.load_state_dict(fixed)
    assert module.scale.shape == () and module.scale.item() == 5.0


def test_training_checks_its_eval_root_on_the_driver(small_config, tmp_path):
    """An unusable eval root fails in build_trainer, before Ray Data or any worker starts."""
    from sde_ray.train.driver import build_trainer

    empty = tmp_path / "empty-eval"
    empty.mkdir()
    config = small_config(f"eval.data_dir={empty}", "eval.datasets=[]")
    with pytest.raises(ValueError, match="no datasets"):
        build_trainer(config)  # before a worker (or the trainer) exists
