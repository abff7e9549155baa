"""The driver process killed mid-run (SIGKILL to its whole process group: driver, local Ray, workers)
and the same command run again: the run resumes from its latest checkpoint in storage and finishes
with the weights of a run that was never interrupted (reference: the same config fitted once
without interruption, the session's `uninterrupted_run` that the exact-resume tests share).

`sde-ray train CONFIG` is what a user re-runs; the driver here is that command's entry point,
`run_train`, in a fresh Python process each time.
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

sys.path.insert(0, str(Path(__file__).parent))
from resume_runs import consolidated_weights, resume_overrides  # noqa: E402

# Two driver runs (each starting its own Ray) and possibly the shared reference run.
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1800)]

WEIGHT_ATOL = 1e-6  # as in test_exact_resume: deterministic CPU runs, room for reassociation only


def _command(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "sde_ray.cli", "train", "--config", str(config_path)]


def _env() -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu"}
    env.pop("RAY_ADDRESS", None)  # each driver starts its own local Ray
    return env


def _final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return consolidated_weights(json.loads((output_dir / "results.json").read_text())["checkpoint"])


def _steps_logged(output_dir: Path) -> list[int]:
    path = output_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def test_driver_killed_and_rerun_finishes_with_the_uninterrupted_weights(uninterrupted_run, small_config,
                                                                         tmp_path):
    from sde_ray.config import dump_yaml

    config = small_config(*resume_overrides(2), "train.run_name=restart")
    config_path = tmp_path / "restart.yaml"
    config_path.write_text(dump_yaml(config))
    output_dir = Path(config.train.output_dir)
    log = open(tmp_path / "killed.log", "w")
    driver = subprocess.Popen(_command(config_path), stdout=log, stderr=subprocess.STDOUT, env=_env(),
                              start_new_session=True)
    deadline = time.time() + 600
    while max(_steps_logged(output_dir), default=0) < 7:  # past the step-6 checkpoint (epoch 1)
        assert driver.poll() is None, (tmp_path / "killed.log").read_text()[-4000:]
        assert time.time() < deadline
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver, its local Ray and the workers
    driver.wait()
    log.close()
    assert not (output_dir / "results.json").exists()

    done = subprocess.run(_command(config_path), capture_output=True, text=True, env=_env(), timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "resumed at step" in done.stdout + done.stderr, (done.stdout + done.stderr)[-4000:]

    reference, _ = uninterrupted_run(2)
    restarted = _final_weights(output_dir)
    assert reference.keys() == restarted.keys()
    for key in reference:
        torch.testing.assert_close(restarted[key], reference[key], atol=WEIGHT_ATOL, rtol=0.0, msg=key)
