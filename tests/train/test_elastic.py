"""Elastic training on a separate local cluster: a head that fits one training worker (+ the data
CPUs), a trainer with ScalingConfig(num_workers=(1, 2)); adding a node with `ray start --address`
makes the run restart from its latest checkpoint with 2 workers (consolidated weights, since the
ZeRO partitioning changed) and finish all its steps.

Every process is this test's own: the head and the extra node run `ray start --block` on free
ports with their own temp dir and are stopped by PID (never `ray stop`). Ray 2.60 enables token
auth on local clusters, so the driver runs with RAY_AUTH_MODE=token.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import ray_nodes  # noqa: E402  (the shared ray-start helpers)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Two epochs of the training fixture's 352 rows at 32 per step, no more: every epoch starts a new
# Ray Data pipeline, which on a busy 2-core box is the slowest part of the run.
MAX_STEPS = 22

DRIVER = """
import json, sys, time
from pathlib import Path
import torch
from sde_ray.config import load_config
from sde_ray.ray_cluster import check_capacity, connect
from sde_ray.train.driver import build_trainer

config = load_config(None, json.loads(sys.argv[1]))
connect(config)
check_capacity(config)

weights = Path(sys.argv[2])

def slow_while_alone(step, rank, world_size, module):
    # The weights after every step on rank 0, flattened: what the resize resumed from, and where it went.
    if rank == 0:
        flat = torch.cat([p.detach().float().flatten().cpu() for p in module.parameters()])
        torch.save(flat, weights / f"w{world_size}_{step}.pt")
    if world_size == 1 and step >= 8:  # the test adds a node after step 8: leave the controller time to see it
        time.sleep(4)

result = build_trainer(config, step_hook=slow_while_alone).fit()
print("RESULT " + json.dumps({"step": result.metrics["step"], "world_size": result.metrics["world_size"]}))
"""


def _metrics(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_run_grows_from_one_to_two_workers(small_config, tmp_path):
    temp_dir = Path(tempfile.mkdtemp(prefix="sdeel", dir="/tmp"))  # short: socket paths have a length limit
    processes = []
    try:
        head, gcs = ray_nodes.start_head(temp_dir, num_cpus=2)
        processes.append(head)
        # 2 CPUs: one 1.5-CPU worker + the 0.5 data CPUs. The elastic policy takes every worker that
        # fits, so a 1-CPU worker would take both CPUs and starve Ray Data (check_capacity refuses it).
        config = small_config("scaling.min_workers=1", "scaling.max_workers=2", "scaling.cpus_per_worker=1.5",
                              "data.data_cpus=0.5", "scaling.elastic_resize_monitor_interval_s=2",
                              "scaling.max_failures=4", f"train.max_steps={MAX_STEPS}", "train.checkpoint_every=2",
                              f"scaling.address=127.0.0.1:{gcs}")
        from sde_ray.config import to_dict

        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
        env.pop("RAY_ADDRESS", None)
        script = tmp_path / "driver.py"
        script.write_text(DRIVER)
        driver_log = tmp_path / "driver.log"
        flat = _flatten(to_dict(config))
        with open(driver_log, "w") as log:
            driver = subprocess.Popen([sys.executable, str(script), json.dumps(flat), str(tmp_path)], stdout=log,
                                      stderr=subprocess.STDOUT, env=env, start_new_session=True)
        processes.append(driver)
        output_dir = Path(config.train.output_dir)

        deadline = time.time() + 400
        # 1 worker running past the warm-up (lr 0 at step 1, half at step 2) until step 8 is logged, so
        # the checkpoint of step 6 is complete: the weights the resize resumes from (step >= 6) are then
        # clearly away from the initial ones.
        while not any(r["step"] >= 8 for r in _metrics(output_dir)):
            assert driver.poll() is None, driver_log.read_text()[-4000:]
            assert time.time() < deadline, driver_log.read_text()[-4000:]
            time.sleep(1)
        processes.append(ray_nodes.start_node(
            [f"--address=127.0.0.1:{gcs}", "--num-cpus=2", *ray_nodes.node_port_flags()], temp_dir / "node.log"))

        driver.wait(timeout=600)
        output = driver_log.read_text()
        assert driver.returncode == 0, output[-4000:]
        result = json.loads(output.split("RESULT ", 1)[1].splitlines()[0])
        assert result == {"step": MAX_STEPS, "world_size": 2}
        sizes = [r["world_size"] for r in _metrics(output_dir)]
        assert sizes[0] == 1 and sizes[-1] == 2, sizes
        assert [r["step"] for r in _metrics(output_dir)] == list(range(2, MAX_STEPS + 1, 2))
        assert "consolidated weights, fresh optimizer state (world size 1 -> 2)" in output
        # The weights continue from the checkpoint. With a fresh AdamW state the first 2-worker step N+1
        # moves every coordinate by at most lr(N+1) * (1 + weight_decay * |w|) (a first Adam step is
        # lr * g / (|g| + eps)), measured from the weights the 1-worker attempt had at the checkpointed
        # step N. The same bound from the initial weights (w after step 1, taken at lr 0) must fail,
        # so a restart from fresh weights could not pass.
        resumed_at = int(re.findall(r"resumed at step (\d+) from \S+ consolidated weights, fresh optimizer state "
                                    r"\(world size 1 -> 2\)", output)[-1])
        assert resumed_at >= 6 and resumed_at % 2 == 0
        reference = _reference_lrs(config, MAX_STEPS)
        at_checkpoint = torch.load(tmp_path / f"w1_{resumed_at}.pt")
        after_resize = torch.load(tmp_path / f"w2_{resumed_at + 1}.pt")
        initial = torch.load(tmp_path / "w1_1.pt")
        lr = reference[resumed_at]  # the lr step N+1 uses: the schedule after N steps
        bound = lr * (1 + config.train.weight_decay * at_checkpoint.abs().max()) * (1 + 1e-4) + 1e-7
        assert (after_resize - at_checkpoint).abs().max() <= bound, ((after_resize - at_checkpoint).abs().max(), bound)
        assert (after_resize - initial).abs().max() > 2 * bound, ((after_resize - initial).abs().max(), bound)
        # The learning rate at every logged step, before and after the resize, is the uninterrupted
        # schedule's: DeepSpeed's own scheduler, stepped once per optimizer step from a fresh start.
        for row in _metrics(output_dir):
            assert row["lr"] == pytest.approx(reference[row["step"]], rel=1e-9, abs=1e-12), row
    finally:
        for process in reversed(processes):
            ray_nodes.stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _reference_lrs(config, steps: int) -> dict[int, float]:
    """step -> the lr after `step` optimizer steps of the configured DeepSpeed schedule."""
    import torch
    from deepspeed.runtime import lr_schedules

    from sde_ray.train.deepspeed_config import build_deepspeed_config

    scheduler_block = build_deepspeed_config(config, 1)["scheduler"]
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.train.lr)
    scheduler = getattr(lr_schedules, scheduler_block["type"])(optimizer, **scheduler_block["params"])
    lrs = {}
    for step in range(1, steps + 1):
        optimizer.step()
        scheduler.step()
        lrs[step] = scheduler.get_last_lr()[0]
    return lrs


def _flatten(tree: dict, prefix: str = "") -> list[str]:
    """Dotted `key=value` overrides (values as JSON, which the YAML override parser reads)."""
    out = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("overrides", "space"):
            out.extend(_flatten(value, dotted + "."))
        else:
            out.append(f"{dotted}={json.dumps(value)}")
    return out
