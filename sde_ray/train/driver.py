"""The main job: `sde-ray train` on the driver — Ray, data, the TorchTrainer, results.

`run_train(config)` resolves every path to an absolute one (Ray Train workers chdir into a run
folder), joins the configured cluster or starts a local Ray with enough logical CPUs for the
workers plus `data.data_cpus`, fails fast when the cluster cannot fit them (Ray Data would otherwise
wait forever for a CPU), prepares the data (synthetic MMEB generated and converted on first use),
fits the trainer from `build_trainer`, and writes `results.json` / `.md` / `.csv` plus the P@1 table
and energy shares on the console. `build_trainer` is also what each Ray Tune trial fits.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sde_ray.config import Config, ConfigError, dump_yaml, is_elastic, replace, to_dict, worker_counts
from sde_ray.train.deepspeed_config import build_deepspeed_config


def _absolute(path: str) -> str:
    if not path or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def resolve_paths(config: Config) -> Config:
    """The config with output, storage, cache and data paths made absolute on the driver."""
    output_dir = _absolute(config.train.output_dir)
    storage = config.train.storage_path or str(Path(output_dir) / "ray")
    overrides = [
        f"train.output_dir={output_dir}",
        f"train.storage_path={_absolute(storage)}",
        f"data.cache_dir={_absolute(config.data.cache_dir)}",
    ]
    for key in ("mmeb_train_dir", "mmeb_eval_dir", "negatives_sidecar"):
        if getattr(config.data, key):
            overrides.append(f"data.{key}={_absolute(getattr(config.data, key))}")
    if config.eval.data_dir:
        overrides.append(f"eval.data_dir={_absolute(config.eval.data_dir)}")
    resolved = replace(config, overrides)
    resolved.data.shards = [_absolute(s) for s in config.data.shards]
    return resolved


def required_cpus(config: Config, workers: int | None = None) -> float:
    """Logical CPUs for `workers` training workers (default: the most the run may use) plus data."""
    count = max(worker_counts(config.scaling)) if workers is None else workers
    return count * config.scaling.cpus_per_worker + config.data.data_cpus


def ensure_ray(config: Config) -> bool:
    """Joins scaling.address / RAY_ADDRESS, or starts a local Ray; True when started here."""
    import ray

    if ray.is_initialized():
        return False
    address = config.scaling.address or os.environ.get("RAY_ADDRESS", "")
    env = {"DS_ACCELERATOR": "cpu"} if not config.scaling.use_gpu else {}
    if address:
        # Inside `ray job submit` the job's runtime_env already set these; repeating a key here is a
        # merge conflict that kills the job, so pass only what the environment lacks.
        env = {key: value for key, value in env.items() if key not in os.environ}
        ray.init(address=address, runtime_env={"env_vars": env} if env else None)
        return False
    os.environ.update(env)  # a local Ray's workers inherit the driver's environment
    ray.init(num_cpus=max(1, int(-(-required_cpus(config) // 1))), include_dashboard=False)
    return True


def check_capacity(config: Config) -> None:
    """Fails fast when the cluster cannot fit the smallest worker group plus the data CPUs, or
    when an elastic run would grow into the data stage's CPUs (its workers take all that fit)."""
    import ray

    scaling, data_cpus = config.scaling, config.data.data_cpus
    needed = required_cpus(config, min(worker_counts(scaling)))
    available = float(ray.cluster_resources().get("CPU", 0.0))
    if available + 1e-9 < needed:
        raise ConfigError(
            f"the Ray cluster has {available:g} CPUs but the run needs {needed:g}: "
            f"{min(worker_counts(scaling))} worker(s) × scaling.cpus_per_worker={scaling.cpus_per_worker:g} "
            f"+ data.data_cpus={data_cpus:g} (Ray Data's preprocessing would wait forever "
            "for a CPU). Lower the workers or cpus_per_worker, or add nodes."
        )
    if is_elastic(scaling):
        grown = min(scaling.max_workers, int((available + 1e-9) // scaling.cpus_per_worker))
        left = available - grown * scaling.cpus_per_worker
        if left + 1e-9 < data_cpus:
            raise ConfigError(
                f"the elastic run would grow to {grown} worker(s) × scaling.cpus_per_worker="
                f"{scaling.cpus_per_worker:g} on this {available:g}-CPU cluster, leaving {left:g} CPUs for "
                f"data.data_cpus={data_cpus:g}: Ray Data would stall. Lower scaling.max_workers or size "
                "cpus_per_worker so that the CPUs left over fit the data stage."
            )


def run_id(storage_path: str, run_name: str) -> str:
    """A wandb run id stable across restarts of the same Ray Train run (same storage + name)."""
    digest = hashlib.sha1(f"{storage_path}/{run_name}".encode()).hexdigest()[:10]
    return f"{run_name}-{digest}"


def _worker_env(config: Config) -> dict[str, str]:
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if not config.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_SILENT", "WANDB_BASE_URL"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def build_trainer(
    config: Config,
    *,
    run_name: str | None = None,
    storage_path: str | None = None,
    callbacks: list | None = None,
    prepared=None,
    step_hook: Callable[..., None] | None = None,
):
    """The TorchTrainer of one training run (what `run_train` and each Tune trial fit).

    `prepared`: the `PreparedData` of `sde_ray.data.pipeline.prepare_data` (computed when None).
    `step_hook(step=, rank=, world_size=, module=)`: called on every worker after each optimizer
    step with the engine's module (instrumentation, fault injection in tests); cloudpickle-able.
    """
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from sde_ray.data.pipeline import build_config_dataset, prepare_data
    from sde_ray.train.metrics import wandb_mode

    config = resolve_paths(config)
    if prepared is None:
        prepared = prepare_data(config)
    name = run_name or config.train.run_name
    storage = _absolute(storage_path) if storage_path else config.train.storage_path
    scaling = config.scaling
    num_workers = (scaling.min_workers, scaling.max_workers) if is_elastic(scaling) else scaling.num_workers
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1
    # The rank-0 progress line is the run's progress display; Ray Data's bars would interleave with it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    factory = _ProcessorFactory(to_dict(config.model), config.loss.negatives_per_query,
                                config.data.negatives_sidecar, prepared.shards)
    dataset = build_config_dataset(config, prepared, factory)
    loop_config: dict[str, Any] = {
        "config": to_dict(config),
        "output_dir": config.train.output_dir,
        "eval_root": config.eval.data_dir or prepared.eval_dir or None,
        "run_id": run_id(storage, name),
        "wandb_mode": wandb_mode(config.logging),
        "step_hook": step_hook,
    }
    from sde_ray.train.loop import train_loop_per_worker

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=scaling.elastic_resize_monitor_interval_s,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": _worker_env(config)},
        ),
        datasets={"train": dataset},
    )


class _ProcessorFactory:
    """Builds the model's BatchProcessor inside a Ray Data actor (picklable: a plain dict)."""

    def __init__(self, model_config: dict, negatives_per_query: int = 0, sidecar: str = "",
                 shards: list[str] | None = None):
        self.model_config = model_config
        self.negatives_per_query, self.sidecar, self.shards = negatives_per_query, sidecar, shards or []

    def __call__(self):
        from sde_ray.models import BatchProcessor

        processor = BatchProcessor(self.model_config, self.negatives_per_query)
        if self.sidecar and self.negatives_per_query:
            from sde_ray.data.negatives import MinedNegatives

            return MinedNegatives(processor, self.sidecar, self.shards, self.negatives_per_query)
        return processor


def check_negatives(config: Config, shards: list[str]) -> None:
    """A mined sidecar must cover exactly these shards' samples, with enough negatives each: checked
    on the driver, before any worker starts. A batch planner other than `random` is refused until
    the planned data order (issue 15) consumes `sde_ray.data.batching`: silently training on random
    batches would mislabel the run."""
    if config.data.batching != "random":
        raise ConfigError(
            f"data.batching={config.data.batching}: the planners exist (sde_ray/data/batching.py) but the "
            "Ray Data stream does not follow a planned order yet; use data.batching=random."
        )
    if not config.data.negatives_sidecar:
        return
    from sde_ray.data.negatives import check_sidecar, load_sidecar, shard_keys

    if not config.loss.negatives_per_query:
        raise ConfigError("data.negatives_sidecar is set but loss.negatives_per_query=0: the sidecar would be unused.")
    check_sidecar(load_sidecar(config.data.negatives_sidecar), shard_keys(shards),
                  negatives_per_query=config.loss.negatives_per_query)


def dry_run_report(config: Config) -> dict:
    """Validates, builds the model and every DeepSpeed config the run may use; starts no worker."""
    from sde_ray.models import count_parameters
    from sde_ray.train.loop import build_train_module

    config = resolve_paths(config)
    module = build_train_module(config)
    counts = {"encoder": count_parameters(module.model), "objective": count_parameters(module.objective)}
    ds_configs = {str(w): build_deepspeed_config(config, w) for w in worker_counts(config.scaling)}
    print(dump_yaml(config), end="")
    for world, ds_config in ds_configs.items():
        print(f"DeepSpeed config for {world} worker(s):\n{json.dumps(ds_config, indent=1)}")
    print(f"parameters: {json.dumps(counts)}")
    print(f"embedding dim: {module.model.embed_dim}; outputs: {config.train.output_dir}")
    return {"dry_run": True, "parameters": counts, "deepspeed": ds_configs, "output_dir": config.train.output_dir}


def _energy_table(metrics: dict) -> str:
    lines = ["| Modality | strong | weak | noise | effective rank |", "|---|---:|---:|---:|---:|"]
    for side, title in (("q", "query"), ("t", "target")):
        if f"energy_strong_{side}" not in metrics:
            continue
        shares = [100.0 * metrics[f"energy_{s}_{side}"] for s in ("strong", "weak", "noise")]
        lines.append(f"| {title} | {shares[0]:.1f}% | {shares[1]:.1f}% | {shares[2]:.1f}% "
                     f"| {metrics.get(f'effective_rank_{side}', float('nan')):.1f} |")
    return "\n".join(lines)


def run_train(config: Config, dry_run: bool = False) -> dict:
    """The main job. Returns the summary also written to `<output_dir>/results.json`."""
    if dry_run:
        return dry_run_report(config)
    import ray

    from sde_ray.data.pipeline import prepare_data

    config = resolve_paths(config)
    output_dir = Path(config.train.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(dump_yaml(config))
    started = ensure_ray(config)
    try:
        check_capacity(config)
        prepared = prepare_data(config)
        check_negatives(config, prepared.shards)
        trainer = build_trainer(config, prepared=prepared)
        result = trainer.fit()
    finally:
        if started:
            ray.shutdown()
    metrics = dict(result.metrics or {})
    evaluation = metrics.pop("eval", None)
    summary = {
        "train": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "model_dir": metrics.get("model_dir"),
        "output_dir": str(output_dir),
        "metrics_jsonl": str(output_dir / "metrics.jsonl"),
        "spectrum_plot": str(output_dir / "plots" / "spectrum.png"),
    }
    if evaluation:
        from sde_ray.eval.report import results_markdown, write_results

        write_results({**evaluation, **summary}, output_dir)
        print(results_markdown(evaluation))
    else:
        (output_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(_energy_table(metrics))
    for key in ("output_dir", "model_dir", "checkpoint", "metrics_jsonl", "spectrum_plot"):
        print(f"{key}: {summary[key]}")
    return {**summary, "eval": evaluation}
