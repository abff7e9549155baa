"""`sde-ray compare`: every objective × seed × noisy-correspondence rate on equal terms, one table.

Each run is a normal `sde_ray.train.driver.run_train` with only `loss.name`, `train.seed` and
`data.synth.noisy_correspondence` changed: the data (generator seed, shuffle), the model, the step
budget and the batch are those of the given config for every run. Runs go one after another on one
Ray session (started here unless already connected) under `<output_dir>/nc<rate>/<objective>/seed<k>/`;
a run whose `compare_run.json` matches its config is reused, so an interrupted comparison resumes.

Outputs in `output_dir`: `runs.jsonl` (one flat record per run), `compare.json` (records and the
summary), `compare.md` (mean ± std over seeds: P@1 overall / per meta-task / IND / OOD, then
energy shares and modality gap), `compare.csv` (long format) and `compare.png` (bar plot).
A run that fails is recorded with its error, left out of the means, and counted in the tables.

Objective names are a registered objective (`loss.name`) optionally followed by `-modifier`s from
`MODIFIERS`, each a small set of config deltas: `sde-soft`, `sde-no_hellinger`,
`sde-soft-only_enhancement`. SDE's parts are the enhancement Δ, the Hellinger term, the subspace
term, the SNR term and the λ schedule; `no_<part>` leaves one out, `only_<part>` keeps that part
alone on top of InfoNCE (`sde-no_all` is InfoNCE computed by the SDE objective). Everything not in a
modifier's deltas is the base config's.

Fine-tuning regime: `init_from` (a run directory or model export) warm-starts every run from the same
weights (`model.init_from`); `pretrain_steps` > 0 first trains InfoNCE for that many steps into
`<output_dir>/pretrain` and uses it. The starting spectrum (the pretrained run's final energy
shares) is written next to the table.
"""

from __future__ import annotations

import csv
import json
import math
import traceback
from pathlib import Path
from typing import Any, Iterable, Sequence

from sde_ray import storage
from sde_ray.config import Config, ConfigError, parse_override, to_dict, validate, with_values

P_AT_1_KEYS = ("overall", "ind", "ood")
SPECTRAL_KEYS = tuple(
    f"energy_{subset}_{side}" for side in ("q", "t") for subset in ("strong", "weak", "noise")
) + ("effective_rank_q", "effective_rank_t", "gap_centroid", "loss")
RUN_RECORD = "compare_run.json"

_NO_ENHANCEMENT = ["spectral.eps_strong=0.0", "spectral.eps_weak=0.0", "spectral.eps_noise=0.0"]
# λ ≡ 1 (the `constant` curve with start = end): the instance loss at full weight, no λ-weighted terms.
_LAMBDA_ONE = ["loss.lambda_schedule.kind=constant", "loss.lambda_schedule.start=1.0", "loss.lambda_schedule.end=1.0"]
_PART_OFF = {
    "enhancement": _NO_ENHANCEMENT,
    "hellinger": ["loss.w_hellinger=0.0"],
    "subspace": ["loss.w_subspace=0.0"],
    "snr": ["loss.w_snr=0.0"],
}
# name -> (objectives it applies to, config deltas). Deltas are applied after the base config.
MODIFIERS: dict[str, tuple[tuple[str, ...], list[str]]] = {
    "soft": (("sde",), ["spectral.partition=soft"]),
    "hard": (("sde",), ["spectral.partition=hard"]),
    **{f"no_{part}": (("sde",), deltas) for part, deltas in _PART_OFF.items()},
    # The schedule left out: λ held at the mean of the default linear 0.5 -> 1 curve, so the
    # spectral terms keep the same total weight over training.
    "no_lambda_schedule": (
        ("sde",),
        ["loss.lambda_schedule.kind=constant", "loss.lambda_schedule.start=0.75", "loss.lambda_schedule.end=0.75"],
    ),
    **{
        f"only_{part}": (
            ("sde",),
            [d for other, deltas in _PART_OFF.items() if other != part for d in deltas]
            + (_LAMBDA_ONE if part in ("enhancement", "snr") else []),
        )
        for part in _PART_OFF
    },
    "no_all": (("sde",), [d for deltas in _PART_OFF.values() for d in deltas] + _LAMBDA_ONE),
}


def objective_overrides(name: str) -> list[str]:
    """The config deltas of an objective name `base[-modifier...]` (ConfigError when unknown)."""
    from sde_ray.losses import OBJECTIVES

    base, *modifiers = name.split("-")
    if base not in OBJECTIVES:
        raise ConfigError(f"unknown objective(s) {base} (in {name!r}); valid: {', '.join(sorted(OBJECTIVES))}")
    overrides = [f"loss.name={base}"]
    for modifier in modifiers:
        if modifier not in MODIFIERS:
            raise ConfigError(
                f"unknown modifier {modifier!r} in objective {name!r}; valid: {', '.join(sorted(MODIFIERS))}"
            )
        applies_to, deltas = MODIFIERS[modifier]
        if base not in applies_to:
            raise ConfigError(f"modifier {modifier!r} in {name!r} applies to {', '.join(applies_to)} only")
        overrides += deltas
    return overrides


def objective_deltas(name: str) -> list[tuple[list[str], Any]]:
    """`objective_overrides(name)` as typed (key parts, value) assignments for `with_values`."""
    return [parse_override(text) for text in objective_overrides(name)]


def _format_rate(rate: float) -> str:
    return f"{rate:g}"


def check_request(
    objectives: Sequence[str], seeds: int, noisy_correspondence: Sequence[float], config: Config
) -> None:
    """Rejects an empty, unknown or duplicated objective list, seeds < 1 and rates outside [0, 1]."""
    if not objectives:
        raise ConfigError("compare needs at least one objective (--objectives sde,infonce,...)")
    try:
        validate(config)
        base_valid = True
    except ConfigError:
        base_valid = False  # the base config's own error surfaces when a run starts
    for name in objectives:  # unknown names, and deltas that break the config, fail here
        variant = with_values(config, objective_deltas(name), check=False)
        if base_valid:
            validate(variant)
    if len(set(objectives)) != len(objectives):
        raise ConfigError(f"objectives listed twice in {', '.join(objectives)}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds must be an integer >= 1, got {seeds!r}")
    if not noisy_correspondence:
        raise ConfigError("--noisy-correspondence needs at least one rate")
    for rate in noisy_correspondence:
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"--noisy-correspondence rates must be in [0, 1], got {rate}")
    if any(rate > 0 for rate in noisy_correspondence) and config.data.source != "synthetic":
        raise ConfigError(
            "noisy-correspondence rates > 0 need data.source=synthetic (the generator plants them)"
        )


def run_config(config: Config, objective: str, seed: int, rate: float, run_dir: Path) -> Config:
    """The config of one run: the base config with only objective, seed, noise rate and outputs changed."""
    group = config.logging.wandb_group or "compare"
    return with_values(config, objective_deltas(objective) + list({  # loss.name: the deltas' base name
        "train.seed": config.train.seed + seed,
        "data.synth.noisy_correspondence": rate,
        "train.output_dir": str(run_dir),
        "train.storage_path": str(run_dir / "ray"),
        "train.run_name": f"compare-{objective}-nc{_format_rate(rate)}-s{seed}",
        "logging.wandb_group": group,
    }.items()))


def run_record(result: dict, objective: str, seed: int, rate: float) -> dict[str, Any]:
    """One flat record from `run_train`'s return value: P@1 (fractions), spectral and gap numbers."""
    record: dict[str, Any] = {"objective": objective, "seed": seed, "noisy_correspondence": rate}
    evaluation = result.get("eval") or {}
    for key in P_AT_1_KEYS:
        record[f"p_at_1_{key}"] = evaluation.get(key)
    for task, value in (evaluation.get("meta_tasks") or {}).items():
        record[f"p_at_1_{task}"] = value
    train = result.get("train") or {}
    for key in SPECTRAL_KEYS:
        value = train.get(key)
        record[key] = float(value) if isinstance(value, (int, float)) else None
    record["output_dir"] = result.get("output_dir")
    return record


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n − 1; 0 for a single value); None without values."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def metric_names(records: Iterable[dict]) -> list[str]:
    """Every numeric metric key of the records, P@1 first (overall, IND, OOD, meta-tasks), then the rest."""
    keys: list[str] = []
    for record in records:
        for key in record:
            if key not in keys and key not in (
                "objective",
                "seed",
                "noisy_correspondence",
                "output_dir",
                "error",
                "data_order",
            ):
                keys.append(key)
    fixed = [f"p_at_1_{k}" for k in P_AT_1_KEYS]
    tasks = [k for k in keys if k.startswith("p_at_1_") and k not in fixed]
    rest = [k for k in keys if not k.startswith("p_at_1_")]
    return [k for k in fixed if k in keys] + tasks + rest


def summarize_runs(records: Sequence[dict]) -> list[dict[str, Any]]:
    """Mean ± std over seeds per (noise rate, objective), in first-seen order; failed runs are counted."""
    names = metric_names(r for r in records if "error" not in r)
    groups: dict[tuple[float, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["noisy_correspondence"], record["objective"]), []).append(record)
    rows = []
    for (rate, objective), members in groups.items():
        finished = [m for m in members if "error" not in m]
        row: dict[str, Any] = {
            "noisy_correspondence": rate,
            "objective": objective,
            "num_runs": len(finished),
            "num_failed": len(members) - len(finished),
            "metrics": {},
        }
        for name in names:
            values = [float(m[name]) for m in finished if isinstance(m.get(name), (int, float))]
            mean, std = _mean_std(values)
            row["metrics"][name] = {"mean": mean, "std": std, "n": len(values)}
        rows.append(row)
    return rows


def _cell(stat: dict | None, scale: float, digits: int) -> str:
    if not stat or stat["mean"] is None:
        return "—"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def _title(name: str) -> str:
    from sde_ray.data.mmeb import META_TASK_TITLES

    key = name.removeprefix("p_at_1_")
    return {"overall": "Overall", "ind": "IND", "ood": "OOD"}.get(key, META_TASK_TITLES.get(key, key))


def comparison_markdown(rows: Sequence[dict]) -> str:
    """Two tables per noise rate: P@1 (%) and spectrum/gap, each cell mean ± std over seeds."""
    names = []
    for row in rows:
        names += [n for n in row["metrics"] if n not in names]
    p_names = [n for n in names if n.startswith("p_at_1_")]
    other = [n for n in names if not n.startswith("p_at_1_")]
    energy_names = [n for n in other if n.startswith("energy_")]
    rest = [n for n in other if n not in energy_names]
    lines: list[str] = []
    for rate in dict.fromkeys(row["noisy_correspondence"] for row in rows):
        section = [row for row in rows if row["noisy_correspondence"] == rate]
        lines += [
            f"### Noisy correspondence {_format_rate(rate)}",
            "",
            "P@1 (%), mean ± std over seeds:",
            "",
            "| Objective | runs | " + " | ".join(_title(n) for n in p_names) + " |",
            "|---|---:|" + "---:|" * len(p_names),
        ]
        for row in section:
            runs = f"{row['num_runs']}" + (f" ({row['num_failed']} failed)" if row["num_failed"] else "")
            cells = [_cell(row["metrics"].get(n), 100.0, 1) for n in p_names]
            lines.append(f"| {row['objective']} | {runs} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Energy shares (%) of the final training batch, modality gap and final loss:",
            "",
            "| Objective | " + " | ".join(_other_title(n) for n in energy_names + rest) + " |",
            "|---|" + "---:|" * len(other),
        ]
        for row in section:
            cells = [_cell(row["metrics"].get(n), 100.0, 1) for n in energy_names]
            cells += [_cell(row["metrics"].get(n), 1.0, 3) for n in rest]
            lines.append(f"| {row['objective']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _other_title(name: str) -> str:
    side = {"q": "query", "t": "target"}.get(name.rsplit("_", 1)[-1], "")
    if name.startswith("energy_"):
        return f"{name.split('_')[1]} ({side})"
    if name.startswith("effective_rank_"):
        return f"eff. rank ({side})"
    return {"gap_centroid": "modality gap", "loss": "final loss"}.get(name, name)


def write_csv(rows: Sequence[dict], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["noisy_correspondence", "objective", "metric", "mean", "std", "n", "num_runs", "num_failed"]
        )
        for row in rows:
            for name, stat in row["metrics"].items():
                writer.writerow(
                    [
                        row["noisy_correspondence"],
                        row["objective"],
                        name,
                        "" if stat["mean"] is None else stat["mean"],
                        "" if stat["std"] is None else stat["std"],
                        stat["n"],
                        row["num_runs"],
                        row["num_failed"],
                    ]
                )
    return path


def plot_comparison(rows: Sequence[dict], path: Path) -> Path:
    """Bars of overall P@1 and of the modality gap per objective (mean ± std), one colour per noise rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    objectives = list(dict.fromkeys(row["objective"] for row in rows))
    rates = list(dict.fromkeys(row["noisy_correspondence"] for row in rows))
    width = 0.8 / len(rates)
    figure, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.6 * len(objectives) * 2), 4))
    for axis, (metric, scale, label) in zip(
        axes,
        (
            ("p_at_1_overall", 100.0, "Overall P@1 (%)"),
            ("gap_centroid", 1.0, "Modality gap (centroid distance)"),
        ),
    ):
        for index, rate in enumerate(rates):
            by_objective = {row["objective"]: row for row in rows if row["noisy_correspondence"] == rate}
            stats = [by_objective.get(o, {}).get("metrics", {}).get(metric) for o in objectives]
            means = [scale * s["mean"] if s and s["mean"] is not None else np.nan for s in stats]
            stds = [scale * s["std"] if s and s["std"] is not None else 0.0 for s in stats]
            positions = np.arange(len(objectives)) + (index - (len(rates) - 1) / 2) * width
            axis.bar(positions, means, width, yerr=stds, capsize=3, label=f"noise {_format_rate(rate)}")
        axis.set_xticks(np.arange(len(objectives)), objectives)
        axis.set_ylabel(label)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend()
    figure.suptitle("Objectives compared (mean ± std over seeds)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def init_markdown(init_record: dict) -> str:
    """The starting point of a fine-tuning comparison: its P@1 and energy shares."""
    cells = [_cell({"mean": init_record.get(f"p_at_1_{k}"), "std": 0.0}, 100.0, 1) for k in P_AT_1_KEYS]
    energies = [
        _cell({"mean": init_record.get(f"energy_{subset}_{side}"), "std": 0.0}, 100.0, 1)
        for side in ("q", "t")
        for subset in ("strong", "weak", "noise")
    ]
    return "\n".join(
        [
            f"### Starting point: {init_record.get('output_dir')}",
            "",
            "| P@1 overall | IND | OOD | strong (q) | weak (q) | noise (q) | strong (t) | weak (t) | noise (t) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            "| " + " | ".join(c.replace(" ± 0.0", "") for c in cells + energies) + " |",
            "",
            "",
        ]
    )


def write_comparison(
    records: Sequence[dict], output_dir: str | Path, init_record: dict | None = None
) -> dict[str, Any]:
    """Summarises `records` and writes compare.{json,md,csv,png}; returns the summary and paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize_runs(records)
    paths = {
        "json": out / "compare.json",
        "md": out / "compare.md",
        "csv": out / "compare.csv",
        "png": out / "compare.png",
    }
    paths["json"].write_text(
        json.dumps({"runs": list(records), "summary": rows, "init": init_record}, indent=2) + "\n"
    )
    paths["md"].write_text((init_markdown(init_record) if init_record else "") + comparison_markdown(rows))
    write_csv(rows, paths["csv"])
    plot_comparison(rows, paths["png"])
    return {"runs": list(records), "summary": rows, "paths": {k: str(v) for k, v in paths.items()}}


def _reusable(run_dir: Path, config: Config) -> dict | None:
    marker = run_dir / RUN_RECORD
    if not marker.is_file():
        return None
    from sde_ray.train.run_dir import recorded_values

    saved = json.loads(marker.read_text())
    # Every key must match; one added to the config tree since the run counts at its default.
    if not isinstance(saved.get("config"), dict):
        return None
    return saved["record"] if recorded_values(saved["config"]) == recorded_values(to_dict(config)) else None


def _train_or_reuse(run_config_: Config, run_dir: Path, objective: str, seed: int, rate: float, label: str) -> dict:
    """The flat record of one run: the saved one when its config is unchanged, else from a new run."""
    record = _reusable(run_dir, run_config_)
    if record is not None:
        return record
    from sde_ray.train.driver import run_train

    print(f"[compare] {label} -> {run_dir}", flush=True)
    record = run_record(run_train(run_config_), objective, seed, rate)
    (run_dir / RUN_RECORD).write_text(json.dumps({"config": to_dict(run_config_), "record": record}, indent=1) + "\n")
    return record


def pretrain(config: Config, steps: int, output_dir: Path) -> dict[str, Any]:
    """InfoNCE for `steps` steps into `<output_dir>/pretrain` (reused when unchanged); its record."""
    run_dir = output_dir / "pretrain"
    this_config = with_values(config, {
        "loss.name": "infonce",
        "train.max_steps": steps,
        "train.output_dir": str(run_dir),
        "train.storage_path": str(run_dir / "ray"),
        "train.run_name": "compare-pretrain",
    })
    rate = config.data.synth.noisy_correspondence
    return _train_or_reuse(this_config, run_dir, "pretrain-infonce", 0, rate, f"pretrain infonce {steps} steps")


def _init_record(init_from: str | Path) -> dict[str, Any] | None:
    """The starting point's own compare record when `init_from` is a compare/pretrain run directory
    or its `model/` export (what `resolve_export` turns a run directory into)."""
    export = Path(init_from)
    for marker in (export / RUN_RECORD, export.parent / RUN_RECORD):
        if marker.is_file():
            return json.loads(marker.read_text())["record"]
    return None


def run_compare(
    config: Config,
    objectives: Sequence[str],
    seeds: int,
    noisy_correspondence: Sequence[float],
    output_dir: str,
    data_orders: int = 1,
    init_from: str = "",
    pretrain_steps: int = 0,
) -> dict[str, Any]:
    """Trains every objective × seed × data order × rate with `run_train`, then writes and returns the
    comparison. `init_from` / `pretrain_steps`: the fine-tuning regime (module docstring)."""
    import ray

    from sde_ray.ray_cluster import connect

    check_request(objectives, seeds, noisy_correspondence, config)
    if isinstance(data_orders, bool) or not isinstance(data_orders, int) or data_orders < 1:
        raise ConfigError(f"--data-orders must be an integer >= 1, got {data_orders!r}")
    if init_from and pretrain_steps:
        raise ConfigError("give --init-from RUN or --pretrain-steps N, not both")
    if pretrain_steps < 0:
        raise ConfigError(f"--pretrain-steps must be >= 0, got {pretrain_steps}")
    if init_from:
        from sde_ray.models import resolve_export

        init_from = str(resolve_export(init_from))  # a clear error before any run starts
    storage.require_local(str(output_dir), "sde-ray compare --output-dir")
    out = Path(output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    # One Ray session for all runs (run_train leaves an initialised one alone); the workers' output
    # stays in Ray's log files, each run shows its progress bar (train.console).
    started = connect(config, log_to_driver=False)
    init_record = None
    try:
        if pretrain_steps:
            init_record = pretrain(config, pretrain_steps, out)
            init_from = str(init_record["output_dir"])
        elif init_from:
            init_record = _init_record(init_from)
        if init_from:
            config = with_values(config, {"model.init_from": init_from})
        with (out / "runs.jsonl").open("w") as log:
            for rate in noisy_correspondence:
                for objective in objectives:
                    for seed in range(seeds):
                        for order in range(data_orders):
                            leaf = f"seed{seed}" if data_orders == 1 else f"seed{seed}-order{order}"
                            run_dir = out / f"nc{_format_rate(rate)}" / objective / leaf
                            this_config = run_config(config, objective, seed, rate, run_dir)
                            if data_orders > 1:
                                this_config = with_values(
                                    this_config, {"data.shuffle_seed": config.data.shuffle_seed + order}
                                )
                            label = f"{objective} seed {seed} order {order} noise {_format_rate(rate)}"
                            try:
                                record = _train_or_reuse(this_config, run_dir, objective, seed, rate, label)
                            except Exception as exc:  # noqa: BLE001 - a failed run is a result too
                                traceback.print_exc()
                                record = {
                                    "objective": objective,
                                    "seed": seed,
                                    "noisy_correspondence": rate,
                                    "output_dir": str(run_dir),
                                    "error": f"{type(exc).__name__}: {exc}",
                                }
                            record["data_order"] = order
                            records.append(record)
                            log.write(json.dumps(record) + "\n")
                            log.flush()
    finally:
        if started:
            ray.shutdown()
    result = write_comparison(records, out, init_record)
    print(Path(result["paths"]["md"]).read_text())
    return result
