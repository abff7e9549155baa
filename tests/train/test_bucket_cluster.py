"""Many machines, no shared disk: a run whose output, Ray Train storage and shards all live in an S3
bucket (moto's server on loopback, tests/s3_server.py), on a local cluster of a head and two worker
nodes (`ray start`, stopped by PID), each node with its own scratch folder (`SDE_RAY_SCRATCH`).

One run covers what the storage layer promises, so the cluster starts once:
- training workers and the eval actor ask for the `gpu_node` resource only the two worker nodes
  have, so they run off the head; they read their rows of the shards from the bucket (counts from
  the manifest beside them) and Ray Train uploads checkpoints there (in the background);
- rank 1 dies after step 3; the group restarts from the step-2 checkpoint downloaded from the
  bucket and replays step 3 with the same rows and the same loss the first attempt computed (the
  uninterrupted trajectory is the reference up to the kill; tests/train/test_exact_resume.py covers
  whole runs on a local disk);
- the export, the final evaluation (score files, embedding cache), results, metrics, plots and the
  config record land in the bucket; the driver's working directory and the test's own folder hold
  nothing outside the scratch folders.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
import ray_nodes  # noqa: E402  (the shared ray-start helpers)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

KILL_AT, CHECKPOINT_EVERY, STEPS = 3, 2, 4

DRIVER = """
import json, os, sys
import ray
import ray.train
from sde_ray import storage
from sde_ray.config import load_config
from sde_ray.train.driver import run_train

config = load_config(None, json.loads(sys.argv[1]))
log_prefix = sys.argv[2]
ray.init(address=config.scaling.address, log_to_driver=False)
head = ray.get_runtime_context().get_node_id()  # the driver runs on the head


def hook(step, rank, world_size, module, sample_ids, epoch, losses):
    # Every record goes to the bucket (one object per rank and process: no two writers share one).
    record = {"pid": os.getpid(), "step": step, "rank": rank, "ids": sample_ids, "losses": losses,
              "node": ray.get_runtime_context().get_node_id(), "scratch": os.environ.get("SDE_RAY_SCRATCH")}
    storage.append_text(f"{log_prefix}/rank{rank}-{os.getpid()}.jsonl", json.dumps(record) + "\\n")
    marker = f"{log_prefix}/killed"
    if step == %(kill)d and rank == 1 and not storage.exists(marker):
        # The step-%(ckpt)d checkpoint uploads in the background: die once Ray Train has registered it
        # (this call blocks until every in-flight report of this worker is processed).
        names = [c.checkpoint.path for c in ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=180)]
        assert any("checkpoint_%(ckpt)06d" in name for name in names), names
        storage.write_text(marker, str(os.getpid()))
        os._exit(1)


summary = run_train(config, step_hook=hook)
print("RESULT " + json.dumps({"head": head, "evaluated_by": summary["eval"]["evaluated_by"],
                              "model_dir": summary["model_dir"], "checkpoint": summary["checkpoint"]}))
""" % {"kill": KILL_AT, "ckpt": CHECKPOINT_EVERY}


def _flatten(node: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in node.items():
        if isinstance(value, dict) and key not in ("overrides", "space"):
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_bucket_only_run_on_three_nodes(s3_server, s3_bucket, small_config, data_cache, tmp_path):
    from sde_ray import storage
    from sde_ray.config import to_dict
    from sde_ray.data.cache import prepare_data

    # The converted shards and their manifest, uploaded to the bucket as a user would.
    shard_dir = Path(prepare_data(small_config()).shards[0]).parent
    storage.upload_dir(shard_dir, f"{s3_bucket}/data/shards")
    eval_dir = str(next(data_cache.glob("*/MMEB-eval")))  # read-only input, as a mounted dataset
    scratch = {name: tmp_path / "scratch" / name for name in ("head", "node1", "node2")}
    for folder in scratch.values():
        folder.mkdir(parents=True)
    cwd = tmp_path / "cwd"  # the driver's working directory: must stay empty
    cwd.mkdir()
    before = _files(tmp_path)

    temp_dir = Path(tempfile.mkdtemp(prefix="sdeb", dir="/tmp"))  # short: socket paths have a length limit
    processes = []
    try:
        head, gcs = ray_nodes.start_head(temp_dir, num_cpus=1, extra_env={"SDE_RAY_SCRATCH": str(scratch["head"])})
        processes.append(head)
        for name in ("node1", "node2"):
            processes.append(ray_nodes.start_node(
                [f"--address=127.0.0.1:{gcs}", "--num-cpus=2", "--resources={\"gpu_node\": 1}",
                 *ray_nodes.node_port_flags()], temp_dir / f"{name}.log",
                extra_env={"SDE_RAY_SCRATCH": str(scratch[name])}, attempts=5))
        config = small_config(
            f"train.output_dir={s3_bucket}/runs/bucket", "train.run_name=bucket", "data.source=mmeb",
            f"data.shards=[{s3_bucket}/data/shards]", f"data.mmeb_eval_dir={eval_dir}", f"eval.data_dir={eval_dir}",
            f"data.cache_dir={scratch['head'] / 'cache'}", f"train.max_steps={STEPS}",
            f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.log_every=1", "scaling.max_failures=1",
            "scaling.worker_node_resource=gpu_node", "eval.num_workers=1", "data.data_cpus=0.5",
            f"scaling.address=127.0.0.1:{gcs}")
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
               "SDE_RAY_SCRATCH": str(scratch["head"]), "WANDB_MODE": "offline"}
        env.pop("RAY_ADDRESS", None)
        log_prefix = f"{s3_bucket}/hook"
        driver = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(_flatten(to_dict(config))), log_prefix],
                                cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
        output = driver.stdout + driver.stderr
        assert driver.returncode == 0, output[-6000:]
    finally:
        for process in reversed(processes):
            ray_nodes.stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)
    result = json.loads(output.split("RESULT ", 1)[1].splitlines()[0])

    # Exact resume from the bucket: 2 ranks x 2 attempts; the replayed step 3 equals the first one.
    records = [json.loads(line) for path in storage.list_files(log_prefix, ".jsonl")
               for line in storage.read_text(path).splitlines()]
    assert len({r["pid"] for r in records}) == 4, records
    by_attempt: dict[tuple[int, int], list[dict]] = {}
    for record in records:
        by_attempt.setdefault((record["step"], record["rank"]), []).append(record)
    for rank in (0, 1):
        first, replay = by_attempt[(KILL_AT, rank)]
        assert first["pid"] != replay["pid"]
        assert replay["ids"] == first["ids"] and replay["losses"] == pytest.approx(first["losses"], rel=1e-6, abs=0)
    assert sorted(by_attempt) == [(s, r) for s in range(1, STEPS + 1) for r in (0, 1)]
    assert all(len(v) == 1 for k, v in by_attempt.items() if k[0] != KILL_AT)  # resumed after step 2
    assert f"resumed at step {CHECKPOINT_EVERY}" in output
    # Off the head, each node writing into its own scratch only.
    assert {r["node"] for r in records}.isdisjoint({result["head"]})
    assert {r["scratch"] for r in records} <= {str(scratch["node1"]), str(scratch["node2"])}
    assert [a["node_id"] for a in result["evaluated_by"]] != [result["head"]]
    assert result["head"] not in {a["node_id"] for a in result["evaluated_by"]}

    # Everything the run leaves is in the bucket.
    run = f"{s3_bucket}/runs/bucket"
    assert result["model_dir"] == f"{run}/model" and result["checkpoint"].startswith(run.removeprefix("s3://"))
    for name in ("config.yaml", "metrics.jsonl", "results.json", "results.md", "results.csv",
                 "plots/spectrum.png", "model/config.json", "model/README.md"):
        assert storage.is_file(f"{run}/{name}"), name
    saved = json.loads(storage.read_text(f"{run}/results.json"))
    assert saved["overall"] is not None and saved["train"]["step"] == STEPS
    assert [json.loads(line)["step"] for line in storage.read_text(f"{run}/metrics.jsonl").splitlines()] == \
        list(range(1, STEPS + 1))
    assert storage.list_files(f"{run}/eval/vlm2vec", "_score.json")
    assert storage.list_files(f"{run}/eval/embedding_cache", ".npy")
    assert storage.is_file(f"{run}/ray/bucket/checkpoint_manager_snapshot.json")

    # Nothing on the local disk outside the scratch folders; the checkpoints' staging was removed.
    assert not list(cwd.iterdir())
    assert {p for p in _files(tmp_path) - before if not p.startswith("scratch/")} == set()
    leftovers = {p for name in ("node1", "node2") for p in _files(scratch[name]) if "ckpt-" in p}
    assert not leftovers, leftovers
