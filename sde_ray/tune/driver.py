"""The Ray Tune sweep driver: `sde-ray tune --config configs/sweeps/NAME.yaml [overrides]`.

A sweep file has four top-level keys:

    name: curriculum            # optional, default: the file's stem; also the W&B group
    base: ../default.yaml       # a training config (path, relative to this file or the cwd) or a mapping
    overrides: [train.max_steps=400]   # optional dotted overrides of the base
    tune: {num_samples: 16, scheduler: asha, space: {spectral.eps_strong: {type: uniform, ...}}}

Everything is validated before Ray starts: the base config, the `tune` section and every key and
candidate value of the space. Each trial is a full distributed training run in the Ray Train V2
pattern: the trial function (~0 CPU) builds a TorchTrainer with `build_trainer` and fits it; the
trainer's workers take their own resources, and a callback forwards the training loop's
validation reports to Tune, so ASHA / HyperBand can stop a trial early (stopping the trial kills
its Train controller and workers with it). Each trial's Train run is named after its trial id, so
a sweep restored after the driver died (`Tuner.restore` on the same output dir) resumes every
unfinished trial from its last checkpoint.

Outputs under the output dir: `trials.csv` (config, last metric, iterations, stopped early or not),
`best_config.yaml` (ready for `sde-ray train --config`) and `metric_per_trial.png`.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from sde_ray.config import (
    Config,
    ConfigError,
    TuneConfig,
    _close_names,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_config,
    read_yaml,
    to_dict,
    validate,
    worker_counts,
)
from sde_ray.tune.space import (
    MODEL_BASED_SEARCH,
    build_param_space,
    config_with,
    flatten_space,
    grid_size,
    validate_space,
)

SWEEP_KEYS = ("name", "base", "overrides", "tune")
# The trial function only waits on its trainer; a sliver of CPU keeps it schedulable (Tune
# refuses an empty resource request) without taking a core from the training workers.
TRIAL_DRIVER_CPU = 0.01


@dataclass
class Sweep:
    name: str
    config: Config  # the validated base config, `tune` section included
    base: dict  # the same as plain data: what each trial's assignments are applied to

    @property
    def tune(self) -> TuneConfig:
        return self.config.tune


# ---------------------------------------------------------------------------------------------
# Loading and validation (no Ray)


def _resolve_base(value: Any, sweep_path: Path) -> dict:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{sweep_path}: base must be a config path or a mapping, got {value!r}.")
    candidates = [Path(value)] if Path(value).is_absolute() else [sweep_path.parent / value, Path.cwd() / value]
    for candidate in candidates:
        if candidate.exists():
            return read_yaml(candidate)
    raise ConfigError(f"{sweep_path}: base config not found: {value} (looked at {', '.join(map(str, candidates))}).")


def _validate_tune(t: TuneConfig) -> None:
    if t.num_samples < 1:
        raise ConfigError(f"tune.num_samples must be >= 1, got {t.num_samples}.")
    if t.grace_period < 1:
        raise ConfigError(f"tune.grace_period must be >= 1, got {t.grace_period}.")
    if t.reduction_factor < 2:
        raise ConfigError(f"tune.reduction_factor must be >= 2, got {t.reduction_factor}.")
    if t.max_concurrent_trials < 0:
        raise ConfigError(f"tune.max_concurrent_trials must be >= 0, got {t.max_concurrent_trials}.")
    if not t.metric:
        raise ConfigError("tune.metric must name a reported metric, e.g. val_p_at_1.")
    if t.search_alg in MODEL_BASED_SEARCH and importlib.util.find_spec(t.search_alg) is None:
        raise ConfigError(f"tune.search_alg={t.search_alg} needs `pip install {t.search_alg}`; or use random / grid.")


def check_trial_config(config: Config) -> None:
    """What a trial's training config needs so the sweep metric reaches the scheduler.

    The training loop reports `val_p_at_1` every `train.eval_every` steps, and its final report
    repeats the last step's metrics, so the last step must be a validation step: otherwise the
    last result Tune sees is not the end of the run.
    """
    t = config.train
    if config.tune.metric == "val_p_at_1":
        if t.eval_every <= 0:
            raise ConfigError("train.eval_every must be > 0 in a sweep on val_p_at_1 (it is only reported then).")
        if t.max_steps % t.eval_every:
            raise ConfigError(
                f"train.max_steps ({t.max_steps}) must be a multiple of train.eval_every ({t.eval_every}) "
                "in a sweep on val_p_at_1, so the final report carries the metric."
            )


def load_sweep(path: str | os.PathLike, overrides: list[str] | None = None) -> Sweep:
    """Reads and validates a sweep file; CLI overrides apply to the combined config (tune.* too)."""
    path = Path(path)
    raw = read_yaml(path)
    unknown = [k for k in raw if k not in SWEEP_KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key '{unknown[0]}'.{_close_names(str(unknown[0]), list(SWEEP_KEYS))}")
    if "tune" not in raw or not isinstance(raw["tune"], dict):
        raise ConfigError(f"{path}: a sweep needs a `tune:` mapping with at least `space:`.")
    sweep_overrides = raw.get("overrides") or []
    if not isinstance(sweep_overrides, list):
        raise ConfigError(f"{path}: overrides must be a list of key.sub=value strings.")
    data = dict(_resolve_base(raw.get("base"), path))
    data["tune"] = raw["tune"]
    data = apply_overrides(data, [str(o) for o in sweep_overrides] + list(overrides or []))
    name = str(raw.get("name") or path.stem)
    data.setdefault("logging", {})
    if not data["logging"].get("wandb_group"):
        data["logging"]["wandb_group"] = name
    config = from_dict(data)
    config.tune.space = flatten_space(config.tune.space)
    validate(config)
    _validate_tune(config.tune)
    check_trial_config(config)
    base = to_dict(config)
    validate_space(config.tune.space, base, config.tune.search_alg, check=check_trial_config)
    return Sweep(name=name, config=config, base=base)


def validation_reports(config: Config) -> int:
    """Reports a full run forwards to Tune (ASHA's max_t): one per validation, the last being the final
    report; for another metric, at most one per step."""
    if config.tune.metric == "val_p_at_1":
        return config.train.max_steps // config.train.eval_every
    return config.train.max_steps


def trial_resources(config: Config) -> dict[str, float]:
    """Resources one trial holds at most: its trainer's workers, Ray Data's reserve and the trial driver."""
    s = config.scaling
    workers = max(worker_counts(s))
    needs = {"CPU": workers * s.cpus_per_worker + config.data.data_cpus + TRIAL_DRIVER_CPU}
    if s.use_gpu:
        needs["GPU"] = float(workers)
    return needs


def concurrent_trials(config: Config, cluster: dict[str, float]) -> int:
    """tune.max_concurrent_trials, or as many trials as the cluster's CPUs and GPUs fit (at least 1)."""
    if config.tune.max_concurrent_trials:
        return config.tune.max_concurrent_trials
    fits = [math.floor(cluster.get(name, 0.0) / amount + 1e-9) for name, amount in trial_resources(config).items()]
    return max(1, min(fits))


# ---------------------------------------------------------------------------------------------
# The trial (runs as a Tune function trainable)


class ValidationReportCallback(TuneReportCallback):
    """Forwards to Tune only the reports that carry the sweep metric.

    Tune rejects a result without its metric, and the training loop reports the validation metric
    only at validation points, so each forwarded report is one validation: the scheduler's
    `training_iteration` counts validations.
    """

    def __init__(self, metric: str):
        super().__init__()
        self._metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and self._metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def run_trial(params: dict, *, base: dict, sweep_dir: str, train_storage: str, metric: str, prepared) -> None:
    """One trial: the base config with this trial's assignments, trained to the end or until stopped."""
    from sde_ray.train.driver import build_trainer

    trial_id = tune.get_context().get_trial_id()
    assignments = dict(params["overrides"])
    assignments["train.output_dir"] = f"{sweep_dir}/trials/{trial_id}"
    config = config_with(base, assignments)
    trainer = build_trainer(
        config,
        run_name=f"trial_{trial_id}",
        storage_path=train_storage,
        callbacks=[ValidationReportCallback(metric)],
        prepared=prepared,
    )
    trainer.fit()


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _actor_created_placement_groups() -> list:
    """This job's live placement groups that an actor (a Train controller) created, from GCS's table.

    The creator fields exist only in the raw table (a private API); groups created by the driver
    itself (Tune's trial groups: a nil creator actor) and other jobs' groups are never included.
    """
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    created = gcs_pb2.PlacementGroupTableData.PlacementGroupState.Value("CREATED")
    job_id = bytes.fromhex(ray.get_runtime_context().get_job_id())
    entries = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        entry = gcs_pb2.PlacementGroupTableData.FromString(raw)
        created_by_actor = entry.creator_actor_id and set(entry.creator_actor_id) != {0xFF}
        if entry.state == created and created_by_actor and not entry.is_detached and entry.creator_job_id == job_id:
            entries.append(entry)
    return entries


def release_orphaned_placement_groups() -> int:
    """Removes this job's placement groups whose creating actor is dead: a stopped trial's workers' group.

    When the scheduler stops a trial, its Train controller dies with the trial actor, but the
    controller's worker placement group lives until the job ends. Ray Train's own
    PlacementGroupCleaner removes it only when the state API answers (a dashboard, and one Ray
    instance per machine), so without this a stopped trial keeps its workers' CPUs/GPUs and the next
    trial's data pipeline can starve.
    """
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    orphans = [e for e in _actor_created_placement_groups() if e.creator_actor_dead]
    for entry in orphans:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(entry.placement_group_id)))
    return len(orphans)


def _release_after_sweep(timeout_s: float = 60.0) -> None:
    """Once every trial is over, waits for the last controllers to die and frees what they left."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        release_orphaned_placement_groups()
        if not _actor_created_placement_groups() or time.monotonic() > deadline:
            return
        time.sleep(1.0)


class ReleaseStoppedTrials(tune.Callback):
    """Driver-side: frees the worker placement groups of trials the scheduler stopped (see above)."""

    def __init__(self, every_s: float = 2.0):
        self.every_s = every_s
        self._last = 0.0

    def on_step_begin(self, iteration, trials, **info):
        import time

        if time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            release_orphaned_placement_groups()


# ---------------------------------------------------------------------------------------------
# Building the Tuner


def _search_alg(t: TuneConfig, seed: int, max_concurrent: int):
    """The searcher, carrying the concurrency limit (Tune ignores max_concurrent_trials for a generator)."""
    from ray.tune.search import ConcurrencyLimiter

    if t.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=max_concurrent)
    if t.search_alg == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return ConcurrencyLimiter(HyperOptSearch(random_state_seed=seed), max_concurrent=max_concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # random and grid: grid dimensions are enumerated, the others sampled (seeded: reproducible).
    return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)


def _scheduler(t: TuneConfig, max_t: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler

    if t.scheduler == "asha":
        return ASHAScheduler(
            time_attr="training_iteration", max_t=max_t, grace_period=min(t.grace_period, max_t),
            reduction_factor=t.reduction_factor,
            # A trial that reaches max_t must still write its final report, checkpoint and export.
            stop_last_trials=False,
        )
    if t.scheduler == "hyperband":
        # Synchronous HyperBand pauses trials; a resumed trial re-runs its function, whose Train
        # run (same name) continues from its own last checkpoint.
        return HyperBandScheduler(
            time_attr="training_iteration", max_t=max_t, reduction_factor=t.reduction_factor, stop_last_trials=False
        )
    return FIFOScheduler()


def _ensure_ray(config: Config) -> None:
    """Joins the configured cluster, or starts a local Ray sized for the machine (not for one run)."""
    from sde_ray.train.driver import ensure_ray

    if ray.is_initialized() or config.scaling.address or os.environ.get("RAY_ADDRESS"):
        ensure_ray(config)
        return
    if not config.scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # local workers inherit the driver's environment
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(trial_resources(config)["CPU"])), include_dashboard=False)


def _check_capacity(config: Config, cluster: dict[str, float]) -> None:
    """Fails fast when a CPU-only cluster cannot fit one trial (GPU clusters may still autoscale)."""
    needs = trial_resources(config)
    if "GPU" not in needs and cluster.get("CPU", 0.0) + 1e-9 < needs["CPU"]:
        raise ConfigError(
            f"the Ray cluster has {cluster.get('CPU', 0.0):g} CPUs but one trial needs {needs['CPU']:g} "
            f"(workers × scaling.cpus_per_worker + data.data_cpus + {TRIAL_DRIVER_CPU} for the trial driver)."
        )


def _storage_paths(sweep: Sweep, output_dir: Path) -> tuple[str, str]:
    """(Tune experiment storage, Train storage of the trials): shared storage when configured."""
    root = sweep.config.train.storage_path.rstrip("/") if sweep.config.train.storage_path else str(output_dir)
    return f"{root}/tune", f"{root}/trials_ray"


# ---------------------------------------------------------------------------------------------
# Outputs


def _trial_rows(results, sweep: Sweep) -> list[dict]:
    metric = sweep.tune.metric
    rows = []
    for result in results:
        assignments = dict((result.config or {}).get("overrides", {}))
        history = result.metrics_dataframe
        last = result.metrics or {}
        values = list(history[metric].dropna()) if history is not None and metric in history else []
        max_steps = config_with(sweep.base, assignments).train.max_steps
        last_step = int(last["step"]) if "step" in last else None
        errored = result.error is not None
        stopped_early = (not errored) and last_step is not None and last_step < max_steps
        status = "error" if errored else "no_report" if last_step is None else (
            "stopped_early" if stopped_early else "completed")
        rows.append({
            "trial_id": last.get("trial_id") or Path(result.path).name.removeprefix("trial_"),
            "status": status,
            **assignments,
            metric: values[-1] if values else None,
            f"best_{metric}": (max(values) if sweep.tune.mode == "max" else min(values)) if values else None,
            "iterations": int(last.get("training_iteration", len(values))),
            "last_step": last_step,
            "max_steps": max_steps,
            "stopped_early": stopped_early,
            "error": str(result.error).splitlines()[0][:200] if errored else "",
            "_history": history,
        })
    return rows


def _write_csv(rows: list[dict], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns and not k.startswith("_"))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in columns})


def _best_row(rows: list[dict], metric: str, mode: str) -> dict | None:
    """The best last metric among completed trials (a stopped trial's early value is not comparable)."""
    scored = [r for r in rows if r[metric] is not None and r["status"] == "completed"]
    scored = scored or [r for r in rows if r[metric] is not None]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda r: r[metric])


def _write_best_config(sweep: Sweep, best: dict, space_keys: list[str], path: Path) -> None:
    config = config_with(
        sweep.base,
        {k: best[k] for k in space_keys}
        | {"train.output_dir": f"runs/{sweep.name}-best", "train.run_name": f"{sweep.name}-best"},
    )
    plain = to_dict(config)
    plain["tune"] = to_dict(TuneConfig())
    header = (
        f"# Best trial {best['trial_id']} of sweep '{sweep.name}': {sweep.tune.metric} = {best[sweep.tune.metric]}\n"
        f"# Train it with: sde-ray train --config {path}\n"
    )
    path.write_text(header + dump_yaml(from_dict(plain)))
    load_config(path)  # what `sde-ray train --config` will do: fail here, not there


def _plot(rows: list[dict], metric: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        history = row["_history"]
        if history is None or metric not in history:
            continue
        points = history[[c for c in ("step", "training_iteration", metric) if c in history]].dropna(subset=[metric])
        x = points["step"] if "step" in points else points["training_iteration"]
        style = "--" if row["stopped_early"] else "-"
        ax.plot(x, points[metric], style, marker="o", label=f"{row['trial_id']} ({row['status']})")
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The entry point


def run_tune(sweep_path: str | os.PathLike, overrides: list[str] | None = None, output_dir: str | None = None) -> dict:
    """Runs (or resumes) a sweep and writes trials.csv, best_config.yaml and metric_per_trial.png."""
    sweep = load_sweep(sweep_path, overrides)
    t = sweep.tune
    out = Path(output_dir or f"runs/sweeps/{sweep.name}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    tune_storage, train_storage = _storage_paths(sweep, out)
    experiment_path = f"{tune_storage}/{sweep.name}"

    _ensure_ray(sweep.config)
    cluster = ray.cluster_resources()
    _check_capacity(sweep.config, cluster)
    max_concurrent = concurrent_trials(sweep.config, cluster)
    max_t = validation_reports(sweep.config)
    # Data is generated / converted once here, not raced for by concurrent trials.
    from sde_ray.data.cache import prepare_data
    from sde_ray.train.driver import resolve_paths

    # Trial actors run in their own directories: give them absolute paths.
    resolved = resolve_paths(sweep.config)
    prepared = prepare_data(resolved)
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, base=to_dict(resolved), sweep_dir=str(out), train_storage=train_storage, metric=t.metric,
            prepared=prepared,
        ),
        {"CPU": TRIAL_DRIVER_CPU},
    )
    param_space = {"overrides": build_param_space(t.space, t.search_alg)}
    num_trials = t.num_samples * grid_size(t.space, t.search_alg)
    print(
        f"[sde-ray tune] sweep '{sweep.name}': {num_trials} trials, {max_concurrent} at a time, "
        f"{t.scheduler} on {t.metric} ({t.mode}), {max_t} validation reports per full trial -> {out}"
    )
    if tune.Tuner.can_restore(experiment_path):
        print(f"[sde-ray tune] resuming the sweep at {experiment_path}")
        tuner = tune.Tuner.restore(
            experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
            param_space=param_space,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=t.metric,
                mode=t.mode,
                search_alg=_search_alg(t, sweep.config.train.seed, max_concurrent),
                scheduler=_scheduler(t, max_t),
                num_samples=t.num_samples,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=sweep.name, storage_path=tune_storage, verbose=1, callbacks=[ReleaseStoppedTrials()]
            ),
        )
    results = tuner.fit()
    _release_after_sweep()
    if results.num_terminated + results.num_errors < len(results):
        print(f"[sde-ray tune] sweep interrupted with unfinished trials; run the same command again to resume "
              f"({experiment_path}).")
        return {"name": sweep.name, "output_dir": str(out), "experiment_path": experiment_path, "interrupted": True}

    rows = _trial_rows(results, sweep)
    space_keys = list(t.space)
    trials_csv, best_yaml, plot_png = out / "trials.csv", out / "best_config.yaml", out / "metric_per_trial.png"
    _write_csv(rows, trials_csv)
    _plot(rows, t.metric, plot_png, f"sweep {sweep.name}: {t.metric} per trial ({t.scheduler})")
    best = _best_row(rows, t.metric, t.mode)
    if best is not None:
        _write_best_config(sweep, best, space_keys, best_yaml)
    for row in rows:
        print(
            f"  {row['trial_id']:>12}  {row['status']:<13} {t.metric}={row[t.metric]}  "
            f"iterations={row['iterations']}  " + " ".join(f"{k}={row[k]}" for k in space_keys)
        )
    summary = {
        "name": sweep.name,
        "output_dir": str(out),
        "experiment_path": experiment_path,
        "trials_csv": str(trials_csv),
        "best_config": str(best_yaml) if best is not None else None,
        "plot": str(plot_png),
        "num_trials": len(rows),
        "num_stopped_early": sum(r["stopped_early"] for r in rows),
        "num_errors": sum(r["status"] == "error" for r in rows),
        "best": {k: v for k, v in best.items() if not k.startswith("_")} if best else None,
        "trials": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
    }
    if best is None:
        raise RuntimeError(f"sweep '{sweep.name}': no trial reported {t.metric}; see {trials_csv}")
    print(f"[sde-ray tune] best trial {best['trial_id']}: {t.metric}={best[t.metric]} -> {best_yaml}")
    return summary
