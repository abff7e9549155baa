"""`ray job submit` of the jobs/ entrypoints to a separate local head, as docs/operations.md shows.

The head is this test's own: `ray start --head --block` on free ports with its own temp dir, run as a
child process and stopped by its PID (never `ray stop`, which would stop every cluster on the
machine). Ray 2.60 turns token authentication on for local clusters: the submit works only with
`RAY_AUTH_MODE=token` (the token is in ~/.ray/auth_token), which the first test pins down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
import ray_nodes  # noqa: E402  (the shared ray-start helpers)

REPO = Path(__file__).resolve().parents[2]
RAY = ray_nodes.RAY
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _dashboard_up(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2)
        return True
    except urllib.error.HTTPError:
        return True  # answering at all (401 without a token) means it is up
    except OSError:
        return False


@pytest.fixture(scope="module")
def local_head():
    """A 4-CPU Ray head with a dashboard on free ports; yields its job-submission address."""
    gcs, dashboard, client = ray_nodes.free_ports(3)
    temp_dir = Path(tempfile.mkdtemp(prefix="sdejob", dir="/tmp"))  # short: Ray's socket paths have a length limit
    # Waits for "Ray runtime started", not only for the dashboard: the dashboard answers before the
    # raylet has registered, and on a loaded machine the raylet can still fail its start (it waits a
    # bounded time for the dashboard agent's port file), taking the whole head down mid-test.
    head = ray_nodes.start_node(
        ["--head", f"--port={gcs}", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
         "--num-cpus=4", "--include-dashboard=true", f"--temp-dir={temp_dir}", *ray_nodes.node_port_flags()],
        temp_dir / "head.log",
    )
    try:
        deadline = time.time() + 180
        while not _dashboard_up(dashboard):
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray head did not come up:\n{(temp_dir / 'head.log').read_text()[-3000:]}")
            time.sleep(2)
        yield {"address": f"http://127.0.0.1:{dashboard}", "temp_dir": temp_dir}
    finally:
        ray_nodes.stop(head)


def _head_logs(head: dict) -> str:
    """The head's own record when a submit fails: `ray start --block`'s output (it names a Ray
    process that exited) and the tails of the dashboard, GCS and raylet logs."""
    temp_dir = head["temp_dir"]
    parts = [("head.log", temp_dir / "head.log")]
    logs = temp_dir / "session_latest" / "logs"
    parts += [(name, logs / name) for name in ("dashboard.log", "dashboard.err", "gcs_server.out", "gcs_server.err",
                                              "raylet.out", "raylet.err", "dashboard_agent.log")]
    text = []
    for name, path in parts:
        if path.exists():
            text.append(f"--- {name} ---\n" + path.read_text(errors="replace")[-2500:])
    return "\n".join(text)


def _ray_job(*args: str, auth: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    if auth:
        env["RAY_AUTH_MODE"] = "token"
    else:
        env.pop("RAY_AUTH_MODE", None)
        env.pop("RAY_AUTH_TOKEN", None)
    return subprocess.run([RAY, "job", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _submit(head: dict, entrypoint: list[str], auth: bool = True, submission_id: str | None = None):
    ids = ["--submission-id", submission_id] if submission_id else []
    return _ray_job("submit", "--address", head["address"], "--working-dir", ".", "--runtime-env",
                    "jobs/runtime_env_cpu.yaml", *ids, "--", *entrypoint, auth=auth)


def test_submit_needs_the_token_and_validates_the_config_before_starting(local_head):
    denied = _submit(local_head, ["python", "jobs/train.py", "--dry-run"], auth=False)
    assert denied.returncode != 0
    assert "authentication token" in (denied.stdout + denied.stderr).lower()

    typo = _submit(local_head, ["python", "jobs/train.py", "--config", "configs/default.yaml", "train.max_step=4"])
    output = typo.stdout + typo.stderr
    assert typo.returncode != 0 and "failed" in output, output[-3000:] + _head_logs(local_head)
    assert "Unknown config key 'train.max_step'" in output and "max_steps" in output

    dry = _submit(local_head, ["python", "jobs/train.py", "--config", "configs/default.yaml", "--dry-run",
                               "scaling.num_workers=1"])
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:] + _head_logs(local_head)
    assert "succeeded" in dry.stdout + dry.stderr and "parameters:" in dry.stdout


def test_train_job_runs_end_to_end(local_head, tmp_path):
    output_dir = tmp_path / "run"
    submission_id = f"sde-train-{uuid.uuid4().hex[:8]}"
    done = _submit(
        local_head,
        ["python", "jobs/train.py", "--config", "configs/default.yaml", "train.max_steps=4", "scaling.num_workers=1",
         "train.global_batch_size=8", "train.log_every=2", "train.checkpoint_every=4", "logging.wandb=false",
         "eval.datasets=[SynColour]",  # the job path is under test, not the 36-dataset evaluation
         "--output-dir", str(output_dir)],
        submission_id=submission_id,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:] + _head_logs(local_head)

    status = _ray_job("status", "--address", local_head["address"], submission_id, timeout=120)
    assert f"{submission_id}' succeeded" in status.stdout + status.stderr
    logs = _ray_job("logs", "--address", local_head["address"], submission_id, timeout=120)
    assert logs.returncode == 0 and "jobs/train.py" in logs.stdout

    steps = [json.loads(line)["step"] for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line]
    assert max(steps) == 4
    results = json.loads((output_dir / "results.json").read_text())
    assert results["output_dir"] == str(output_dir)
    assert (output_dir / "model").is_dir() and any((output_dir / "model").iterdir())
