"""The one place sde_ray joins or starts Ray, and what one training run needs of a cluster.

`connect` is what `sde-ray train`, `tune` and `eval` call before touching Ray: it joins
`scaling.address` (or RAY_ADDRESS, as inside `ray job submit`), or starts a local Ray with the given
number of logical CPUs. `run_resources` is the single sizing rule (workers × cpus_per_worker plus
Ray Data's `data.data_cpus`, plus a sliver for a Tune trial's driver, one GPU per worker), used by the
local start, the capacity checks and Tune's concurrency. `worker_env` is the environment a training
worker needs; `start_local` the fixed-size local Ray of the benchmarks; `logs_dir` where the Ray
session this process joined keeps every process's log files (what `log_to_driver=False` keeps off
the console). `ray_tasks` / `conversion_executor`: the MMEB conversion as Ray tasks across the
cluster's CPUs (the in-job path and `sde-ray data convert-mmeb --ray`). Application side: the
library (spectral, losses, models, data) never imports this.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

from sde_ray.config import Config, ConfigError, is_elastic, worker_counts

# A Tune trial's function only waits on its trainer; a sliver of CPU keeps it schedulable (Tune
# refuses an empty resource request) without taking a core from the training workers.
TRIAL_DRIVER_CPU = 0.01

# The session directory of the Ray this process started or joined (`ray.init`'s answer).
_session: dict[str, str] = {}


def run_resources(config: Config, workers: int | None = None, trial: bool = False) -> dict[str, float]:
    """Logical resources of one run with `workers` training workers (default: the most it may use),
    Ray Data's reserve included, and the trial driver's sliver when `trial` (a Tune trial)."""
    s = config.scaling
    count = max(worker_counts(s)) if workers is None else workers
    needs = {"CPU": count * s.cpus_per_worker + config.data.data_cpus + (TRIAL_DRIVER_CPU if trial else 0.0)}
    if s.use_gpu:
        needs["GPU"] = float(count)
    return needs


NODE_RESOURCE_SHARE = 0.001  # of scaling.worker_node_resource per worker/actor: a placement mark, not a quota


def worker_node_resources(config: Config) -> dict[str, float]:
    """The custom resource that keeps training workers and eval actors on the marked nodes ({}: anywhere)."""
    name = config.scaling.worker_node_resource
    return {name: NODE_RESOURCE_SHARE} if name else {}


def worker_env(config: Config) -> dict[str, str]:
    """Environment of the training workers: DeepSpeed's CPU accelerator without GPUs, wandb's keys."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if not config.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_SILENT", "WANDB_BASE_URL", *STORAGE_ENV):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


# What the object store needs on every node (sde_ray.storage): the endpoint of a non-AWS S3 server
# and its region, and credentials where the driver has them in its environment (on a cloud cluster,
# instance or pod roles give them to every node and these stay unset).
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
               "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS")


def connect(config: Config, local_cpus: float | None = None, log_to_driver: bool = True) -> bool:
    """Joins scaling.address / RAY_ADDRESS, or starts a local Ray with `local_cpus` logical CPUs
    (default: what this run needs); True when this call initialised Ray (the caller shuts it down).

    Without an address the local Ray is always a new instance of this process's own: Ray would
    otherwise join the last `ray start` cluster on this machine and refuse our CPU count in a long
    traceback (to join one, set scaling.address=auto or RAY_ADDRESS). `log_to_driver=False` keeps
    the workers' output in Ray's log files (`logs_dir()`) and Ray's own INFO lines off this console."""
    import ray

    if ray.is_initialized():
        return False
    address = config.scaling.address or os.environ.get("RAY_ADDRESS", "")
    env = {"DS_ACCELERATOR": "cpu"} if not config.scaling.use_gpu else {}
    # The eval actors and Ray Data tasks read the bucket too: the job's environment carries the store's.
    env.update({key: os.environ[key] for key in STORAGE_ENV if os.environ.get(key)})
    if address:
        # Inside `ray job submit` the job's runtime_env already set these; repeating a key here is a
        # merge conflict that kills the job, so pass only what the environment lacks.
        env = {key: value for key, value in env.items() if key not in os.environ}
        _remember(ray.init(address=address, runtime_env={"env_vars": env} if env else None,
                           log_to_driver=log_to_driver, logging_level=_driver_log_level(log_to_driver)))
        return True
    os.environ.update(env)  # a local Ray's workers inherit the driver's environment
    cpus = run_resources(config)["CPU"] if local_cpus is None else local_cpus
    return start_local(max(1, math.ceil(cpus - 1e-9)), log_to_driver=log_to_driver, fresh=True)


def start_local(num_cpus: int, log_to_driver: bool = True, fresh: bool = False) -> bool:
    """A local Ray with `num_cpus` logical CPUs, unless Ray is already initialised; True when started.

    `fresh`: a new local instance even when RAY_ADDRESS names a running one or a `ray start`
    cluster runs on this machine (the benchmarks size their own cluster, so their numbers do not
    depend on what else runs there; `connect` starts its own for the same reason)."""
    import ray

    if ray.is_initialized():
        return False
    for attempt in range(3):
        try:
            _remember(ray.init(address="local" if fresh else None, num_cpus=num_cpus, include_dashboard=False,
                               log_to_driver=log_to_driver, logging_level=_driver_log_level(log_to_driver)))
            return True
        except Exception as error:  # noqa: BLE001 - Ray raises a plain Exception for its start-up timeout
            # A local node must register within Ray's fixed 30 s; on a saturated machine it can miss
            # that window (seen at load 10-20 on 2 cores). That says nothing about the run: try again.
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(error):
                raise
    return True


def ray_tasks(fn, items: list) -> Iterator:
    """`fn(item)` for every item as Ray tasks of one CPU each, spread over the cluster's CPUs; the
    results as they finish. Each task gets a fresh worker process (`max_calls=1`): what a task's
    process loaded (the converter's parquet rows, its open zips) is returned to the node when the
    task ends, not kept by a pooled worker that Ray Data or training would reuse."""
    import ray

    remote = ray.remote(num_cpus=1, max_calls=1)(fn)
    pending = [remote.remote(item) for item in items]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


def conversion_executor() -> dict:
    """The `prepare_data` / `convert_mmeb` arguments that convert as Ray tasks on every CPU of the
    cluster this process joined (before training starts, they are all free); none without one."""
    import ray

    if not ray.is_initialized():
        return {}
    return {"run_tasks": ray_tasks, "workers": max(1, int(ray.cluster_resources().get("CPU", 1)))}


def _driver_log_level(log_to_driver: bool) -> int:
    """Ray's logger on the driver: its INFO lines (instance started, cluster joined) only when the
    workers' output is forwarded too (a verbose console); warnings and errors always."""
    return logging.INFO if log_to_driver else logging.WARNING


def _remember(context) -> None:
    session_dir = (getattr(context, "address_info", None) or {}).get("session_dir")
    if session_dir:
        _session["dir"] = session_dir


def logs_dir() -> str | None:
    """The log folder of the Ray session this process started or joined (on its head node): one
    `worker-*.out|err` pair per process, Ray Data's `ray-data/`, the raylet's and GCS's logs."""
    return str(Path(_session["dir"]) / "logs") if "dir" in _session else None


def check_capacity(config: Config, trial: bool = False) -> None:
    """Fails fast when the cluster cannot fit the smallest worker group plus the data CPUs (Ray Data
    would otherwise wait forever for a CPU), or when an elastic run would grow into the data stage's
    CPUs (its workers take all that fit). For a Tune trial on GPUs the check is left to the
    scheduler: a GPU cluster may still autoscale."""
    import ray

    scaling, data_cpus = config.scaling, config.data.data_cpus
    if trial and scaling.use_gpu:
        return
    smallest = min(worker_counts(scaling))
    needed = run_resources(config, smallest, trial=trial)["CPU"]
    available = float(ray.cluster_resources().get("CPU", 0.0))
    if available + 1e-9 < needed:
        driver = f" + {TRIAL_DRIVER_CPU} for the trial driver" if trial else ""
        raise ConfigError(
            f"the Ray cluster has {available:g} CPUs but the run needs {needed:g}: "
            f"{smallest} worker(s) × scaling.cpus_per_worker={scaling.cpus_per_worker:g} "
            f"+ data.data_cpus={data_cpus:g}{driver} (Ray Data's preprocessing would wait forever "
            "for a CPU). Lower the workers or cpus_per_worker, or add nodes."
        )
    if is_elastic(scaling) and not trial:  # concurrent trials share the cluster: no single-run rule
        grown = min(scaling.max_workers, int((available + 1e-9) // scaling.cpus_per_worker))
        left = available - grown * scaling.cpus_per_worker
        if left + 1e-9 < data_cpus:
            raise ConfigError(
                f"the elastic run would grow to {grown} worker(s) × scaling.cpus_per_worker="
                f"{scaling.cpus_per_worker:g} on this {available:g}-CPU cluster, leaving {left:g} CPUs for "
                f"data.data_cpus={data_cpus:g}: Ray Data would stall. Lower scaling.max_workers or size "
                "cpus_per_worker so that the CPUs left over fit the data stage."
            )
