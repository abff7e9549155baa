"""Writes MMEB results as JSON, Markdown and CSV, and compares two runs side by side.

P@1 is stored as a fraction in [0, 1] in results.json and results.csv, and shown as a percentage
with one decimal (the papers' format) in results.md and `compare_runs`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from sde_ray import storage
from sde_ray.data.mmeb import META_TASK_TITLES

RESULTS_JSON, RESULTS_MD, RESULTS_CSV = "results.json", "results.md", "results.csv"
CSV_FIELDS = (
    "name",
    "kind",
    "meta_task",
    "split",
    "p_at_1",
    "num_queries",
    "num_correct",
    "num_missing",
    "num_malformed",
)


def percent(value: float | None) -> str:
    return "—" if value is None else f"{100.0 * value:.1f}"


def _summary_rows(results: dict) -> list[tuple[str, str, float | None]]:
    """(label, kind, value) for each meta-task mean, IND, OOD and overall."""
    rows = [
        (META_TASK_TITLES.get(task, task), "meta_task", value)
        for task, value in results["meta_tasks"].items()
    ]
    rows += [
        ("IND", "ind", results["ind"]),
        ("OOD", "ood", results["ood"]),
        ("Overall", "overall", results["overall"]),
    ]
    if results.get("outside_catalog") is not None:  # user datasets: their own mean, outside Overall
        rows.append((META_TASK_TITLES["outside_catalog"], "outside_catalog", results["outside_catalog"]))
    return rows


def results_markdown(results: dict) -> str:
    lines = [
        "| Dataset | Meta-task | Split | P@1 (%) | Queries | Missing | Malformed |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, row in results["datasets"].items():
        lines.append(
            f"| {name} | {META_TASK_TITLES.get(row['meta_task'], row['meta_task'])} | {row['split']} "
            f"| {percent(row['p_at_1'])} | {row['num_queries']} | {row['num_missing']} "
            f"| {row['num_malformed']} |"
        )
    lines += ["", "| Aggregate | P@1 (%) |", "|---|---:|"]
    lines += [f"| {label} | {percent(value)} |" for label, _, value in _summary_rows(results)]
    remedy = results.get("gap_remedy")
    if remedy:
        lines += [
            "",
            f"Modality-gap remedy `{remedy['name']}` (fitted on {remedy['fit_on']}):",
            "",
            "| Dataset | P@1 before (%) | P@1 after (%) | Δ |",
            "|---|---:|---:|---:|",
        ]
        for name, row in remedy["datasets"].items():
            lines.append(
                f"| {name} | {percent(row['p_at_1_before'])} | {percent(row['p_at_1_after'])} "
                f"| {_signed(row['p_at_1_after'] - row['p_at_1_before'])} |"
            )
    return "\n".join(lines) + "\n"


def write_results(results: dict, output_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes results.json, results.md and results.csv into `output_dir`; returns their paths."""
    out = str(output_dir)  # a folder or an object-store URL (sde_ray.storage)
    paths = {"json": storage.join(out, RESULTS_JSON), "md": storage.join(out, RESULTS_MD),
             "csv": storage.join(out, RESULTS_CSV)}
    storage.write_text(paths["json"], json.dumps(results, indent=2) + "\n")
    storage.write_text(paths["md"], results_markdown(results))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for name, row in results["datasets"].items():
        writer.writerow({"name": name, "kind": "dataset", **{k: row[k] for k in CSV_FIELDS[2:]}})
    for label, kind, value in _summary_rows(results):
        writer.writerow({"name": label, "kind": kind, "p_at_1": "" if value is None else value})
    storage.write_text(paths["csv"], table.getvalue())
    return {key: Path(path) if not storage.is_remote(path) else path for key, path in paths.items()}


VLM2VEC_SCORE_SUFFIX = "_score.json"


def write_vlm2vec_scores(results: dict, output_dir: str | os.PathLike) -> list[Path]:
    """One `<Dataset>_score.json` per dataset in VLM2Vec v1's layout (`eval.py`: `acc` = P@1,
    `num_correct`, `num_pred` = queries), so published per-dataset scores compare file by file.
    Each file also carries `benchmark` and `model` (the evaluated model's identity) from `results`.
    """
    out = str(output_dir)
    paths = []
    for name, row in results["datasets"].items():
        payload = {
            "acc": row["p_at_1"],
            "num_correct": row["num_correct"],
            "num_pred": row["num_queries"],
            "benchmark": results.get("benchmark"),
            "model": results.get("model"),
        }
        path = storage.join(out, f"{name}{VLM2VEC_SCORE_SUFFIX}")
        storage.write_text(path, json.dumps(payload, indent=2) + "\n")
        paths.append(Path(path) if not storage.is_remote(path) else path)
    return paths


def load_results(path: str | os.PathLike) -> dict:
    """results.json from a file, an eval output folder, or a run directory (`<run>/eval/`)."""
    path = Path(path)
    for candidate in (path, path / RESULTS_JSON, path / "eval" / RESULTS_JSON):
        if candidate.is_file():
            results = json.loads(candidate.read_text())
            if "datasets" not in results:
                raise ValueError(f"{candidate} is not an sde_ray results.json (no 'datasets' key)")
            return results
    raise FileNotFoundError(
        f"no results.json at {path}, {path / RESULTS_JSON} or {path / 'eval' / RESULTS_JSON}"
    )


def _signed(delta: float | None) -> str:
    return "—" if delta is None else f"{100.0 * delta:+.1f}"


def compare_runs(a: str | os.PathLike, b: str | os.PathLike) -> str:
    """Markdown table of two runs' P@1 (per dataset, meta-task, IND, OOD, overall) and B − A."""
    first, second = load_results(a), load_results(b)
    lines = [f"A: {a}", f"B: {b}", "", "| | A P@1 (%) | B P@1 (%) | B − A |", "|---|---:|---:|---:|"]

    def line(label: str, x: float | None, y: float | None) -> str:
        delta = None if x is None or y is None else y - x
        return f"| {label} | {percent(x)} | {percent(y)} | {_signed(delta)} |"

    names = list(first["datasets"]) + [n for n in second["datasets"] if n not in first["datasets"]]
    for name in names:
        x = first["datasets"].get(name, {}).get("p_at_1")
        y = second["datasets"].get(name, {}).get("p_at_1")
        lines.append(line(name, x, y))
    tasks = list(first["meta_tasks"]) + [t for t in second["meta_tasks"] if t not in first["meta_tasks"]]
    for task in tasks:
        lines.append(
            line(
                f"**{META_TASK_TITLES.get(task, task)}**",
                first["meta_tasks"].get(task),
                second["meta_tasks"].get(task),
            )
        )
    for key, label in (("ind", "**IND**"), ("ood", "**OOD**"), ("overall", "**Overall**")):
        lines.append(line(label, first.get(key), second.get(key)))
    only = sorted(set(first["datasets"]) ^ set(second["datasets"]))
    if only:
        lines += ["", f"Datasets in only one run (aggregates are not like for like): {', '.join(only)}"]
    return "\n".join(lines)
