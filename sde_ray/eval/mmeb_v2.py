"""MMEB-V2 score files: one `{Dataset}_score.json` per dataset and one per-model summary.

The layout is the public harness's (TIGER-AI-Lab/VLM2Vec `eval.py` writes the per-dataset files,
`experiments/report_score_v2.py` collects them): `<out>/<modality>/<Dataset>_score.json` holds the
harness's flat metric keys (`hit@1`, `ndcg_linear@5`, ..., `num_pred`, `num_data`), and
`<out>/<model>.json` is `{"metadata": ..., "metrics": {modality: {dataset: score}}}`. We add a
`summary` (per-modality and overall means of each modality's main metric: hit@1 for image and
video, ndcg_linear@5 for visual documents) and stamp every file with the benchmark version and the
model identity, because dataset fixes (page-fixed visdoc sets, the MomentSeeker de-duplication)
moved published scores by 1-4 points: a score without its version is not comparable.

Datasets the catalog does not name (a user's own sets, the synthetic V2 mix) are scored and listed
like the others; the summary's `catalog` means count catalog datasets only and `all` counts
every dataset scored, so a partial or extended run is never mistaken for a leaderboard number.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np

MODALITIES = ("image", "video", "visdoc")
MAIN_METRIC = {"image": "hit@1", "video": "hit@1", "visdoc": "ndcg_linear@5"}
# The version of the benchmark definition our catalog and readers follow: V2 with the page-fixed
# visual-document sets (VLM2Vec `all_scores/v2.1-baselines-visdoc-page-fixed`).
BENCHMARK_VERSION = "mmeb-v2.1-visdoc-page-fixed"

# The 78 datasets by modality, as the harness's report names them (score file stems).
CATALOG: dict[str, tuple[str, ...]] = {
    "image": (
        "ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365", "ImageNet-A",
        "ImageNet-R", "ObjectNet", "Country211", "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA",
        "ChartQA", "Visual7W", "ScienceQA", "VizWiz", "GQA", "TextVQA", "VisDial", "CIRR",
        "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA", "FashionIQ",
        "Wiki-SS-NQ", "OVEN", "EDIS", "MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"),
    "video": (
        "K700", "SmthSmthV2", "HMDB51", "UCF101", "Breakfast", "MVBench", "Video-MME", "NExTQA",
        "EgoSchema", "ActivityNetQA", "DiDeMo", "MSR-VTT", "MSVD", "VATEX", "YouCook2", "QVHighlight",
        "Charades-STA", "MomentSeeker"),
    "visdoc": (
        "ViDoRe_arxivqa", "ViDoRe_docvqa", "ViDoRe_infovqa", "ViDoRe_tabfquad", "ViDoRe_tatdqa",
        "ViDoRe_shiftproject", "ViDoRe_syntheticDocQA_artificial_intelligence",
        "ViDoRe_syntheticDocQA_energy", "ViDoRe_syntheticDocQA_government_reports",
        "ViDoRe_syntheticDocQA_healthcare_industry", "ViDoRe_esg_reports_human_labeled_v2",
        "ViDoRe_biomedical_lectures_v2_multilingual", "ViDoRe_economics_reports_v2_multilingual",
        "ViDoRe_esg_reports_v2_multilingual", "VisRAG_ArxivQA", "VisRAG_ChartQA", "VisRAG_MP-DocVQA",
        "VisRAG_SlideVQA", "VisRAG_InfoVQA", "VisRAG_PlotQA", "ViDoSeek-page-fixed", "ViDoSeek-doc",
        "MMLongBench-page-fixed", "MMLongBench-doc"),
}


def score_path(out: str | os.PathLike, modality: str, dataset: str) -> Path:
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; one of {MODALITIES}")
    return Path(out) / modality / f"{dataset}_score.json"


def write_score_file(out: str | os.PathLike, modality: str, dataset: str, scores: Mapping[str, float],
                     model: str, benchmark_version: str = BENCHMARK_VERSION) -> Path:
    """`<out>/<modality>/<dataset>_score.json`: the harness's flat metric keys plus our stamp."""
    path = score_path(out, modality, dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = dict(scores)
    record.update(benchmark_version=benchmark_version, model=model, in_catalog=dataset in CATALOG[modality])
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=4))
    os.replace(tmp, path)
    return path


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarize_v2(metrics: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict:
    """Per-modality and overall means of the main metric (overall = mean over datasets, not over
    modalities, as the leaderboard computes it), for the catalog datasets and for all datasets,
    with how many of each modality's catalog datasets were scored."""
    summary: dict = {"catalog": {}, "all": {}, "datasets_scored": {}, "outside_catalog": []}
    catalog_all, everything = [], []
    for modality in MODALITIES:
        scored = metrics.get(modality, {})
        values = {name: float(s[MAIN_METRIC[modality]]) for name, s in scored.items()}
        inside = [v for name, v in values.items() if name in CATALOG[modality]]
        summary["catalog"][modality] = _mean(inside)
        summary["all"][modality] = _mean(list(values.values()))
        summary["datasets_scored"][modality] = f"{len(inside)}/{len(CATALOG[modality])}"
        summary["outside_catalog"] += sorted(n for n in values if n not in CATALOG[modality])
        catalog_all += inside
        everything += list(values.values())
    summary["catalog"]["overall"] = _mean(catalog_all)
    summary["all"]["overall"] = _mean(everything)
    summary["complete"] = len(catalog_all) == sum(len(v) for v in CATALOG.values())
    return summary


def write_model_summary(out: str | os.PathLike, model: str, metadata: Mapping | None = None,
                        benchmark_version: str = BENCHMARK_VERSION) -> dict:
    """Collects `<out>/<modality>/*_score.json` into `<out>/<model>.json` (the harness's per-model
    file, plus `summary`) and returns it."""
    out = Path(out)
    metrics: dict[str, dict] = {}
    for modality in MODALITIES:
        for path in sorted((out / modality).glob("*_score.json")):
            record = json.loads(path.read_text())
            if record.get("benchmark_version") not in (None, benchmark_version):
                raise ValueError(f"{path} was scored on {record['benchmark_version']!r}, not {benchmark_version!r}: "
                                 "scores of different benchmark versions are not aggregated")
            metrics.setdefault(modality, {})[path.name[: -len("_score.json")]] = record
    report = {
        "metadata": {"model_name": model, "benchmark_version": benchmark_version, **dict(metadata or {})},
        "metrics": metrics,
        "summary": summarize_v2(metrics),
    }
    (out / f"{model}.json").write_text(json.dumps(report, indent=4))
    return report


def summary_line(summary: Mapping) -> str:
    """`image 0.512 | video 0.400 | visdoc 0.733 | overall 0.548` over every dataset scored."""
    values = summary["all"]
    return " | ".join(f"{key} {'n/a' if values[key] is None else f'{values[key]:.3f}'}"
                      for key in (*MODALITIES, "overall"))
