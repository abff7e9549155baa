"""Sweep files: loading and validation, before Ray starts (no Ray import).

A sweep file has four top-level keys:

    name: curriculum            # optional, default: the file's stem; also the W&B group
    base: ../default.yaml       # a training config (path, relative to this file or the cwd) or a mapping
    overrides: [train.max_steps=400]   # optional dotted overrides of the base
    tune: {num_samples: 16, scheduler: asha, space: {spectral.eps_strong: {type: uniform, ...}}}

Everything is validated here: the base config, the `tune` section and every key and candidate value
of the space. `concurrent_trials` sizes the sweep for a cluster with `ray_cluster.run_resources`.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sde_ray.config import Config, ConfigError, TuneConfig, _close_names, from_dict, read_yaml, replace, with_values
from sde_ray.ray_cluster import run_resources
from sde_ray.tune.space import MODEL_BASED_SEARCH, flatten_space, validate_space

SWEEP_KEYS = ("name", "base", "overrides", "tune")


@dataclass
class Sweep:
    name: str
    config: Config  # the validated base config, `tune` section included: what each trial's assignments change

    @property
    def tune(self) -> TuneConfig:
        return self.config.tune


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
    data = {**_resolve_base(raw.get("base"), path), "tune": raw["tune"]}
    config = replace(from_dict(data), [str(o) for o in sweep_overrides] + list(overrides or []))
    name = str(raw.get("name") or path.stem)
    config = with_values(config, {"tune.space": flatten_space(config.tune.space)}
                         | ({} if config.logging.wandb_group else {"logging.wandb_group": name}))
    _validate_tune(config.tune)
    check_trial_config(config)
    validate_space(config.tune.space, config, config.tune.search_alg, check=check_trial_config)
    return Sweep(name=name, config=config)


def validation_reports(config: Config) -> int:
    """Reports a full run forwards to Tune (ASHA's max_t): one per validation, the last being the final
    report; for another metric, at most one per step."""
    if config.tune.metric == "val_p_at_1":
        return config.train.max_steps // config.train.eval_every
    return config.train.max_steps


def concurrent_trials(config: Config, cluster: dict[str, float]) -> int:
    """tune.max_concurrent_trials, or as many trials as the cluster's CPUs and GPUs fit (at least 1)."""
    if config.tune.max_concurrent_trials:
        return config.tune.max_concurrent_trials
    needs = run_resources(config, trial=True)
    fits = [math.floor(cluster.get(name, 0.0) / amount + 1e-9) for name, amount in needs.items()]
    return max(1, min(fits))
