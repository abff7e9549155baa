"""The Ray Tune sweep driver: `sde-ray tune --config configs/sweeps/NAME.yaml [overrides]`.

The sweep file is loaded and validated by `tune.sweep` before Ray starts. Each trial is a full
distributed training run in the Ray Train V2 pattern: the trial function (~0 CPU) builds a
TorchTrainer with `build_trainer` from the typed base config plus its assignments and fits it; the
trainer's workers take their own resources, and a callback forwards the training loop's validation
reports to Tune, so ASHA / HyperBand can stop a trial early (stopping the trial kills its Train
controller and workers with it; `tune.placement` frees what they leave). Each trial's Train run is
named after its trial id, so a sweep restored after the driver died (`Tuner.restore` on the same
output dir) resumes every unfinished trial from its last checkpoint. Outputs: `tune.outputs`.
"""

from __future__ import annotations

import os
from pathlib import Path

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from sde_ray import storage
from sde_ray.config import Config, TuneConfig, with_values
from sde_ray.data.cache import prepare_data
from sde_ray.ray_cluster import TRIAL_DRIVER_CPU, check_capacity, connect, conversion_executor, run_resources
from sde_ray.train.driver import build_trainer, resolve_paths
from sde_ray.tune.outputs import best_row, plot, trial_rows, write_best_config, write_csv
from sde_ray.tune.placement import ReleaseStoppedTrials, release_after_sweep
from sde_ray.tune.space import build_param_space, grid_size
from sde_ray.tune.sweep import Sweep, concurrent_trials, load_sweep, validation_reports

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


def run_trial(params: dict, *, base: Config, sweep_dir: str, train_storage: str, prepared) -> None:
    """One trial: the (path-resolved) base config with this trial's assignments, trained to the end or
    until stopped. Its Train run is named after the trial, so a restored sweep resumes it."""
    trial_id = tune.get_context().get_trial_id()
    config = with_values(base, {
        **params["overrides"],
        "train.output_dir": f"{sweep_dir}/trials/{trial_id}",
        "train.storage_path": train_storage,
        "train.run_name": f"trial_{trial_id}",
    })
    trainer = build_trainer(config, callbacks=[ValidationReportCallback(config.tune.metric)], prepared=prepared)
    trainer.fit()


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


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


def _storage_paths(sweep: Sweep, output_dir: Path) -> tuple[str, str]:
    """(Tune experiment storage, Train storage of the trials): shared storage when configured."""
    root = sweep.config.train.storage_path.rstrip("/") if sweep.config.train.storage_path else str(output_dir)
    return f"{root}/tune", f"{root}/trials_ray"


# ---------------------------------------------------------------------------------------------
# The entry point


def run_tune(sweep_path: str | os.PathLike, overrides: list[str] | None = None, output_dir: str | None = None) -> dict:
    """Runs (or resumes) a sweep and writes trials.csv, best_config.yaml and metric_per_trial.png."""
    sweep = load_sweep(sweep_path, overrides)
    t = sweep.tune
    storage.require_local(output_dir or "", "sde-ray tune --output-dir")
    out = Path(output_dir or f"runs/sweeps/{sweep.name}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    tune_storage, train_storage = _storage_paths(sweep, out)
    experiment_path = f"{tune_storage}/{sweep.name}"

    # A local Ray is sized for the machine (several trials at once), not for one run.
    connect(sweep.config, local_cpus=max(os.cpu_count() or 1, run_resources(sweep.config, trial=True)["CPU"]))
    check_capacity(sweep.config, trial=True)
    max_concurrent = concurrent_trials(sweep.config, ray.cluster_resources())
    max_t = validation_reports(sweep.config)
    # Trial actors run in their own directories: give them absolute paths. Data is generated /
    # converted once here, not raced for by concurrent trials.
    resolved = resolve_paths(sweep.config)
    prepared = prepare_data(resolved, **conversion_executor())
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=resolved, sweep_dir=str(out), train_storage=train_storage,
                             prepared=prepared),
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
    release_after_sweep()
    if results.num_terminated + results.num_errors < len(results):
        print(f"[sde-ray tune] sweep interrupted with unfinished trials; run the same command again to resume "
              f"({experiment_path}).")
        return {"name": sweep.name, "output_dir": str(out), "experiment_path": experiment_path, "interrupted": True}

    rows = trial_rows(results, sweep)
    space_keys = list(t.space)
    trials_csv, best_yaml, plot_png = out / "trials.csv", out / "best_config.yaml", out / "metric_per_trial.png"
    write_csv(rows, trials_csv)
    plot(rows, t.metric, plot_png, f"sweep {sweep.name}: {t.metric} per trial ({t.scheduler})")
    best = best_row(rows, t.metric, t.mode)
    if best is not None:
        write_best_config(sweep, best, space_keys, best_yaml)
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
