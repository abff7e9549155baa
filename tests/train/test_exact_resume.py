"""Exact resume: a run interrupted in epoch 1 and resumed from its checkpoint is the run that was
never interrupted (reference: the same config fitted once without interruption, `uninterrupted`,
shared by the tests of this module).

- A worker killed (os._exit on rank 1 after step 8): Ray Train restarts the group from the step-6
  checkpoint; the same rows on the same ranks, the same losses and the same final weights, at
  ZeRO-3 (every parameter partitioned).
- The driver killed (SIGKILL to its whole process group: driver, local Ray, workers) and the same
  `sde-ray train CONFIG` command run again, each in a fresh Python process: the run resumes from
  its latest checkpoint in storage and ends on the same weights, at ZeRO-2.

The two stages are split between the two kinds of interruption (CI time: each case is a whole Ray
run plus its restart): a resume restores the same checkpoint through the same code whichever way
the run was interrupted, so each stage's exact restore is checked once, against its own
uninterrupted reference.

352 synthetic rows, global batch 64 over 2 workers in 2 GradCache chunks each: 5 steps per epoch
(320 rows, a different 32-row tail left out each epoch), so 10 steps are 2 epochs; checkpoints at
steps 3, 6 and 9.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sde_ray.config import load_config

from .conftest import SMALL

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Final weights: every run here is deterministic on CPU (gloo reductions in a fixed order, the
# objective's randomness seeded per step, each rank's RNG state restored from the checkpoint).
# The tolerance leaves room only for float reassociation.
WEIGHT_ATOL = 1e-6
LOSS_RTOL = 1e-6
RESUME = ["train.global_batch_size=64", "train.max_steps=10", "train.checkpoint_every=3",
          "train.micro_batch_size=16", "scaling.max_failures=1", "data.shuffle_window=128", "train.log_every=1"]


def resume_overrides(stage: int) -> list[str]:
    overrides = [*RESUME, f"deepspeed.zero_stage={stage}"]
    if stage == 3:
        overrides.append("deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}")
    return overrides


def step_recorder(log: Path, marker: Path | None = None, kill_at: int = 0):
    """A step hook appending (pid, step, rank, epoch, sample ids, losses) to `log`; with a `marker`,
    rank 1 dies with os._exit after step `kill_at` the first time (a real process death)."""

    def hook(step, rank, world_size, module, sample_ids, epoch, losses):
        with open(log, "a") as handle:
            handle.write(json.dumps({"pid": os.getpid(), "step": step, "rank": rank, "epoch": epoch,
                                     "ids": sample_ids, "losses": losses}) + "\n")
        if marker is not None and step == kill_at and rank == 1 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)

    return hook


def consolidated_weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(checkpoint) / "consolidated.pt", weights_only=True)


def _by_step(log: Path) -> dict[tuple[int, int], dict]:
    """(step, rank) -> the last record written for it (a resumed attempt's record wins)."""
    records = {}
    for line in log.read_text().splitlines():
        record = json.loads(line)
        records[(record["step"], record["rank"])] = record
    return records


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, data_cache, tmp_path_factory):
    """`uninterrupted(stage)` -> (final consolidated weights, step log, final checkpoint's TrainState)
    of the config fitted once without interruption at ZeRO `stage`; each stage runs on first use only."""
    from sde_ray.train.driver import build_trainer

    from sde_ray.train.checkpoint import TrainState

    runs: dict[int, tuple[dict, Path, TrainState]] = {}

    def get(stage: int) -> tuple[dict, Path, TrainState]:
        if stage not in runs:
            root = tmp_path_factory.mktemp(f"uninterrupted{stage}")
            config = load_config(None, SMALL + resume_overrides(stage) + [
                f"data.cache_dir={data_cache}", f"train.output_dir={root / 'run'}",
                f"train.run_name=uninterrupted-{stage}"])
            log = root / "steps.jsonl"
            result = build_trainer(config, step_hook=step_recorder(log)).fit()
            checkpoint = result.checkpoint.path
            runs[stage] = (consolidated_weights(checkpoint), log, TrainState.read(checkpoint))
        return runs[stage]

    return get


@pytest.mark.parametrize("stage", [3])  # ZeRO-2: the driver-kill test below
def test_worker_killed_in_epoch_1_and_resumed_equals_uninterrupted(stage, uninterrupted, small_config, tmp_path,
                                                                   read_metrics):
    from sde_ray.train.checkpoint import TrainState
    from sde_ray.train.driver import build_trainer

    ref_weights, ref_log, ref_state = uninterrupted(stage)
    config = small_config(*resume_overrides(stage), f"train.run_name=resume-{stage}")
    res_log, marker = tmp_path / "resumed.jsonl", tmp_path / "resumed.killed"
    resumed = build_trainer(config, step_hook=step_recorder(res_log, marker, kill_at=8)).fit()

    assert marker.exists(), "the worker was not killed"
    pids = {json.loads(line)["pid"] for line in res_log.read_text().splitlines()}
    assert len(pids) == 4  # two ranks, two attempts: the group really restarted
    expected, got = _by_step(ref_log), _by_step(res_log)
    assert sorted(expected) == sorted(got) == [(s, r) for s in range(1, 11) for r in (0, 1)]
    for key in expected:
        assert got[key]["ids"] == expected[key]["ids"], key  # the same rows on the same rank
        assert got[key]["epoch"] == expected[key]["epoch"], key
        torch.testing.assert_close(torch.tensor(got[key]["losses"]), torch.tensor(expected[key]["losses"]),
                                   rtol=LOSS_RTOL, atol=0.0)
    # Every row of each epoch trained exactly once (5 steps x 64 rows of 352 per epoch).
    for epoch in (0, 1):
        ids = [i for (s, r), rec in got.items() if rec["epoch"] == epoch for i in rec["ids"]]
        assert len(ids) == len(set(ids)) == 5 * 64, epoch
    epochs = [{i for rec in got.values() if rec["epoch"] == e for i in rec["ids"]} for e in (0, 1)]
    assert epochs[0] != epochs[1]  # a different tail of 32 rows is left out each epoch
    # metrics.jsonl: one row per step (log_every=1), the killed attempt's rows for the redone steps
    # 7 and 8 dropped on resume; the run's counters are the uninterrupted schedule's.
    assert [row["step"] for row in read_metrics(config.train.output_dir)] == list(range(1, 11))
    assert resumed.metrics["step"] == 10 and resumed.metrics["samples"] == 10 * 64
    # The final checkpoint's data position: where the uninterrupted run's is (the restart skipped
    # the rows its checkpoint had consumed, no more, no fewer).
    state = TrainState.read(resumed.checkpoint.path)
    assert (state.step, state.samples, state.epoch, state.epoch_rows) == (
        ref_state.step, ref_state.samples, ref_state.epoch, ref_state.epoch_rows) and state.step == 10
    res_weights = consolidated_weights(resumed.checkpoint.path)
    assert ref_weights.keys() == res_weights.keys()
    for name in ref_weights:
        torch.testing.assert_close(res_weights[name], ref_weights[name], atol=WEIGHT_ATOL, rtol=0.0, msg=name)


def _train_command(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "sde_ray.cli", "train", "--config", str(config_path)]


def _driver_env() -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu"}
    env.pop("RAY_ADDRESS", None)  # each driver starts its own local Ray
    return env


def _steps_logged(output_dir: Path) -> list[int]:
    path = output_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@pytest.mark.timeout(1800)  # two driver runs, each starting its own Ray, and maybe the reference
def test_driver_killed_and_rerun_finishes_with_the_uninterrupted_weights(uninterrupted, small_config, tmp_path):
    from sde_ray.config import dump_yaml

    config = small_config(*resume_overrides(2), "train.run_name=restart")
    config_path = tmp_path / "restart.yaml"
    config_path.write_text(dump_yaml(config))
    output_dir = Path(config.train.output_dir)
    with open(tmp_path / "killed.log", "w") as log:
        driver = subprocess.Popen(_train_command(config_path), stdout=log, stderr=subprocess.STDOUT,
                                  env=_driver_env(), start_new_session=True)
        deadline = time.time() + 600
        while max(_steps_logged(output_dir), default=0) < 7:  # past the step-6 checkpoint (epoch 1)
            assert driver.poll() is None, (tmp_path / "killed.log").read_text()[-4000:]
            assert time.time() < deadline
            time.sleep(0.5)
        os.killpg(driver.pid, signal.SIGKILL)  # the driver, its local Ray and the workers
        driver.wait()
    assert not (output_dir / "results.json").exists()

    done = subprocess.run(_train_command(config_path), capture_output=True, text=True, env=_driver_env(),
                          timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "resumed at step" in done.stdout + done.stderr, (done.stdout + done.stderr)[-4000:]

    reference, _, _ = uninterrupted(2)
    checkpoint = json.loads((output_dir / "results.json").read_text())["checkpoint"]
    restarted = consolidated_weights(checkpoint)
    assert reference.keys() == restarted.keys()
    for key in reference:
        torch.testing.assert_close(restarted[key], reference[key], atol=WEIGHT_ATOL, rtol=0.0, msg=key)
