"""The smoke sweep end to end on the session's local Ray cluster (4 logical CPUs, 2 real cores).

Four real trials (Ray Train + DeepSpeed on CPU, one worker each, two at a time) under ASHA. Checked
from the outputs only: at least one trial was stopped early (fewer validations than a full run and
a last step short of max_steps), a trial ran to the end, every stopped trial's workers were
released, best_config.yaml loads and validates with the best trial's values, the plot is a PNG,
and running the same command again restores the finished sweep instead of starting a new one.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from sde_ray.config import load_config
from sde_ray.tune.driver import load_sweep, run_tune, validation_reports

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "sweeps" / "smoke.yaml"
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _wait_for_free_cpus(ray, timeout_s: float = 60.0) -> float:
    total = ray.cluster_resources()["CPU"]
    deadline = time.time() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < total - 1e-6 and time.time() < deadline:
        time.sleep(1)
    return total - ray.available_resources().get("CPU", 0.0)


def test_smoke_sweep_stops_a_trial_early_and_writes_a_trainable_best_config(ray_cluster, tmp_path):
    sweep = load_sweep(SMOKE)
    full = validation_reports(sweep.config)
    out = tmp_path / "smoke"

    summary = run_tune(SMOKE, [], output_dir=str(out))

    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == summary["num_trials"] >= 4
    assert {r["status"] for r in rows} <= {"completed", "stopped_early"}, rows
    iterations = [int(r["iterations"]) for r in rows]
    stopped = [r for r in rows if r["stopped_early"] == "True"]
    assert stopped, f"ASHA stopped no trial: {iterations}"
    for row in stopped:
        assert int(row["iterations"]) < full and int(row["last_step"]) < int(row["max_steps"])
    assert max(iterations) == full  # the rungs let at least one trial finish
    assert summary["num_stopped_early"] == len(stopped)
    assert {float(r["train.lr"]) for r in rows} == {3e-3, 3e-6, 2e-6, 1e-6}  # the grid, once each

    # Stopped trials released their workers: every CPU of the cluster is free again.
    assert _wait_for_free_cpus(ray_cluster) == pytest.approx(0.0, abs=1e-6)

    best = summary["best"]
    assert best["status"] == "completed"
    completed = [r for r in rows if r["status"] == "completed"]
    assert float(best["val_p_at_1"]) == max(float(r["val_p_at_1"]) for r in completed)
    config = load_config(out / "best_config.yaml")  # what `sde-ray train --config` does
    assert config.train.lr == pytest.approx(float(best["train.lr"]))
    assert config.spectral.eps_strong == pytest.approx(float(best["spectral.eps_strong"]))
    assert config.train.max_steps == sweep.config.train.max_steps and config.tune.space == {}
    assert config.logging.wandb_group == "smoke"
    assert (out / "metric_per_trial.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same command again finds the experiment and restores it: same trials, nothing re-run.
    again = run_tune(SMOKE, [], output_dir=str(out))
    assert sorted(t["trial_id"] for t in again["trials"]) == sorted(r["trial_id"] for r in rows)
    assert [t["iterations"] for t in sorted(again["trials"], key=lambda t: t["trial_id"])] == [
        int(r["iterations"]) for r in sorted(rows, key=lambda r: r["trial_id"])
    ]
