"""SIGTERM (what Kubernetes and Slurm send on preemption) to a real `sde-ray train` driver mid-run:
the workers stop at a step boundary, write a complete checkpoint, the driver exits with
EXIT_PREEMPTED; rerunning the same command resumes from that step (not from an interrupted or
unregistered leftover, which are cleaned away) and finishes the run. Reference: the step counts of
the uninterrupted schedule (max_steps, samples = steps × global batch, every step logged once)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sde_ray.train.checkpoint import TrainState, verify_checkpoint
from sde_ray.train.checkpoint_store import checkpoint_dirs
from sde_ray.train.preemption import EXIT_PREEMPTED

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 10


@pytest.fixture
def drivers():
    """Started `sde-ray train` processes, killed (by their own pid) if a test leaves one running."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def _train(tmp_path: Path, data_cache: Path, drivers: list) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", WANDB_MODE="offline")
    args = [
        "train", "--config", "", f"train.output_dir={tmp_path / 'run'}", f"data.cache_dir={data_cache}",
        "data.synth.train_per_subset=32", "data.synth.eval_per_dataset=16", "data.samples_per_shard=64",
        f"train.max_steps={MAX_STEPS}", "train.global_batch_size=32", "train.log_every=1",
        "train.checkpoint_every=1000", "scaling.num_workers=2", "eval.datasets=[SynColour]",
        "logging.wandb=false", "train.warmup_steps=2",
    ]
    drivers.append(subprocess.Popen([sys.executable, "-m", "sde_ray.cli", *args], cwd=tmp_path, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return drivers[-1]


def _steps(tmp_path: Path) -> list[int]:
    path = tmp_path / "run" / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def test_sigterm_checkpoints_at_a_step_boundary_and_the_rerun_resumes(tmp_path, data_cache, drivers):
    driver = _train(tmp_path, data_cache, drivers)
    deadline = time.time() + 400
    while not any(step >= 2 for step in _steps(tmp_path)):
        assert driver.poll() is None and time.time() < deadline, driver.communicate()[0][-3000:]
        time.sleep(0.2)
    driver.send_signal(signal.SIGTERM)
    output, _ = driver.communicate(timeout=400)
    assert driver.returncode == EXIT_PREEMPTED, output[-3000:]
    (tmp_path / "first.log").write_text(output)
    # Ray's own actors may log tracebacks under load (a timed-out resource request); none of ours.
    assert not re.search(r'File "[^"]*/sde_ray/', output), output[-3000:]
    assert "SIGABRT" not in output and "Aborted" not in output

    run_dir = tmp_path / "run" / "ray" / "sde"
    (checkpoint,) = checkpoint_dirs(run_dir)  # the only one: checkpoint_every is beyond the run
    verify_checkpoint(checkpoint)
    stopped = TrainState.read(checkpoint)
    assert 2 <= stopped.step < MAX_STEPS and stopped.samples == stopped.step * 32
    assert json.loads((tmp_path / "run" / "results.json").read_text())["preempted"] is True

    # Leftovers of interrupted attempts: a checkpoint whose write stopped before its manifest (its
    # state claims a later step, so a "highest step" pick would take it) and a complete copy Ray
    # never registered. The rerun must resume from the preemption's, remove both, and keep
    # train.keep_checkpoints (2) folders.
    dead, stray = run_dir / "checkpoint_000099_dead", run_dir / "checkpoint_000000_stray"
    shutil.copytree(checkpoint, dead)
    shutil.rmtree(dead / "manifest")
    state = json.loads((dead / "state.json").read_text())
    (dead / "state.json").write_text(json.dumps({**state, "step": 99}))
    shutil.copytree(checkpoint, stray)  # copy2 keeps the mtimes: not newer than the original

    rerun = _train(tmp_path, data_cache, drivers)
    output, _ = rerun.communicate(timeout=600)
    (tmp_path / "rerun.log").write_text(output)
    assert rerun.returncode == 0, output[-3000:]
    assert f"resumed at step {stopped.step} from {checkpoint.name}: exact DeepSpeed state" in output
    steps = _steps(tmp_path)
    assert steps == list(range(1, MAX_STEPS + 1))  # every step logged once: none lost, none repeated
    kept = checkpoint_dirs(run_dir)
    assert checkpoint in kept and len(kept) == 2 and not dead.exists() and not stray.exists()
    final = max(kept, key=lambda d: TrainState.read(d).step)
    assert TrainState.read(final).step == MAX_STEPS and TrainState.read(final).samples == MAX_STEPS * 32
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    manifest = json.loads(next(data_cache.glob("*/shards-*/manifest.json")).read_text())
    assert results["preempted"] is False
    assert results["data"]["data_skipped_shards"] == 0 and results["data"]["data_rejected_rows"] == manifest["rejected"]
