"""results.{json,md,csv}, `compare_runs`, and every plot: a real, decodable, non-blank PNG."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from sde_ray.eval import plots
from sde_ray.eval.diagnostics import training_history, write_history_plots
from sde_ray.eval.metrics import DatasetScore, summarize
from sde_ray.eval.report import compare_runs, load_results, write_results

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_real_png(path):
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.load()
        pixels = np.asarray(image.convert("RGB"), dtype=float)
    assert pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert pixels.var() > 0


def _results(values):
    scores = {
        name: DatasetScore(
            name, task, split, num_queries=10, num_correct=round(10 * p), num_missing=1 if name == "A" else 0
        )
        for name, task, split, p in values
    }
    return summarize(scores, ("classification", "vqa", "retrieval", "grounding"))


RUN_A = [("A", "classification", "IND", 0.5), ("B", "vqa", "OOD", 0.2), ("C", "retrieval", "IND", 0.9)]
RUN_B = [("A", "classification", "IND", 0.7), ("B", "vqa", "OOD", 0.2), ("D", "grounding", "OOD", 0.4)]


def test_results_files_round_trip(tmp_path):
    results = _results(RUN_A)
    paths = write_results(results, tmp_path)
    assert json.loads(paths["json"].read_text())["overall"] == pytest.approx(1.6 / 3)
    assert load_results(tmp_path) == json.loads(paths["json"].read_text())
    markdown = paths["md"].read_text()
    assert "| A | Classification | IND | 50.0 | 10 | 1 | 0 |" in markdown
    assert "| Overall | 53.3 |" in markdown
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["name"] for r in rows if r["kind"] == "dataset"] == ["A", "B", "C"]
    overall = next(r for r in rows if r["kind"] == "overall")
    assert float(overall["p_at_1"]) == pytest.approx(1.6 / 3)


def test_compare_runs_shows_both_and_the_difference(tmp_path):
    write_results(_results(RUN_A), tmp_path / "a" / "eval")  # a run directory
    write_results(_results(RUN_B), tmp_path / "b")  # an eval output folder
    table = compare_runs(tmp_path / "a", tmp_path / "b" / "results.json")
    assert "| A | 50.0 | 70.0 | +20.0 |" in table
    assert "| B | 20.0 | 20.0 | +0.0 |" in table
    assert "| C | 90.0 | — | — |" in table and "| D | — | 40.0 | — |" in table
    assert "| **Overall** | 53.3 | 43.3 | -10.0 |" in table
    assert "only one run" in table
    with pytest.raises(FileNotFoundError, match="results.json"):
        compare_runs(tmp_path / "a", tmp_path / "missing")


def test_p_at_1_bars_png(tmp_path):
    assert_real_png(plots.plot_p_at_1(_results(RUN_A), tmp_path / "p.png"))


def test_spectrum_png(tmp_path):
    sigma = np.sort(np.random.default_rng(0).gamma(2.0, size=32))[::-1]
    index = np.arange(32)
    spec = {
        "sigma": sigma,
        "strong": index < 3,
        "weak": (index >= 3) & (index < 8),
        "noise": index >= 8,
        "noise_edge": sigma[8],
        "strong_fence": sigma[3],
    }
    assert_real_png(plots.plot_spectrum({"query": spec, "target": spec}, tmp_path / "s.png", title="x"))


def test_history_plots_from_metrics_jsonl(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    lines = []
    for step in range(5, 30, 5):
        row = {"step": step, "loss": 1.0 / step}
        for side in "qt":
            row.update(
                {
                    f"energy_strong_{side}": 0.1 + step / 300,
                    f"energy_weak_{side}": 0.08,
                    f"energy_noise_{side}": 0.82 - step / 300,
                    f"effective_rank_{side}": 10 + step,
                }
            )
        row["gap_centroid"] = 1.0 - step / 100
        if step % 10 == 0:
            row["val_p_at_1"] = step / 100
        lines.append(json.dumps(row))
    lines.append(json.dumps({"step": 25, "loss": 0.0, "energy_strong_q": 0.5}))  # a resumed step: last wins
    jsonl.write_text("\n".join(lines) + "\n")
    history = training_history(jsonl)
    assert [r["step"] for r in history] == [5, 10, 15, 20, 25]
    assert history[-1]["energy_strong_q"] == 0.5
    paths = write_history_plots(history, tmp_path / "plots")
    assert set(paths) == {"energy_over_training", "spectral_over_training"}
    for path in paths.values():
        assert_real_png(path)
    jsonl.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        training_history(jsonl)
