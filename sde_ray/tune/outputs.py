"""A sweep's outputs: `trials.csv` (config, last metric, iterations, stopped early or not),
`best_config.yaml` (ready for `sde-ray train --config`) and `metric_per_trial.png`."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from sde_ray.config import TuneConfig, dump_yaml, load_config, with_values
from sde_ray.tune.sweep import Sweep


def trial_rows(results, sweep: Sweep) -> list[dict]:
    metric = sweep.tune.metric
    rows = []
    for result in results:
        assignments = dict((result.config or {}).get("overrides", {}))
        history = result.metrics_dataframe
        last = result.metrics or {}
        values = list(history[metric].dropna()) if history is not None and metric in history else []
        max_steps = with_values(sweep.config, assignments).train.max_steps
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


def write_csv(rows: list[dict], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns and not k.startswith("_"))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in columns})


def best_row(rows: list[dict], metric: str, mode: str) -> dict | None:
    """The best last metric among completed trials (a stopped trial's early value is not comparable)."""
    scored = [r for r in rows if r[metric] is not None and r["status"] == "completed"]
    scored = scored or [r for r in rows if r[metric] is not None]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda r: r[metric])


def write_best_config(sweep: Sweep, best: dict, space_keys: list[str], path: Path) -> None:
    config = with_values(
        sweep.config,
        {k: best[k] for k in space_keys}
        | {"train.output_dir": f"runs/{sweep.name}-best", "train.run_name": f"{sweep.name}-best"},
    )
    config = dataclasses.replace(config, tune=TuneConfig())  # a training config: the sweep section is not its
    header = (
        f"# Best trial {best['trial_id']} of sweep '{sweep.name}': {sweep.tune.metric} = {best[sweep.tune.metric]}\n"
        f"# Train it with: sde-ray train --config {path}\n"
    )
    path.write_text(header + dump_yaml(config))
    load_config(path)  # what `sde-ray train --config` will do: fail here, not there


def plot(rows: list[dict], metric: str, path: Path, title: str) -> None:
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
