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


# ---------------------------------------------------------------------------------------------
# Scoring a folder of V2 sets with an encoder


def _item_inputs(items, video: bool, as_video: bool) -> tuple[list[str], list, list]:
    """(texts, images, frames) of a list of `mmeb_v2.Item`s: a page is an image; a video (any item
    with images in a video set) is its frames when the model has a video path (`as_video`), else
    its middle sampled frame as an image."""
    texts, images, frames = [], [], []
    for item in items:
        paths = item.images
        texts.append(item.text)
        if video and paths and as_video:
            images.append(None)
            frames.append([Path(p).read_bytes() for p in paths])
        else:
            # The middle sampled frame of a video; a page is its only image.
            images.append(Path(paths[len(paths) // 2]).read_bytes() if paths else None)
            frames.append([])
    return texts, images, frames


def score_set(data, encoder, video_as_video: bool, k_list=(1, 5, 10)) -> dict[str, float]:
    """One V2 set (`mmeb_v2.RetrievalSet`): queries and the corpus encoded once each, every query
    ranked over the whole corpus (chunked), the harness's metrics."""
    from sde_ray.eval.retrieval import corpus_topk, ranking_scores

    video = data.modality == "video"
    q_texts, q_images, q_frames = _item_inputs(data.queries, video, video_as_video)
    c_texts, c_images, c_frames = _item_inputs(data.corpus, video, video_as_video)
    requests = [("query", q_texts, q_images, q_frames), ("target", c_texts, c_images, c_frames)]
    if not (video and video_as_video):  # frames only where the model takes video
        requests = [r[:3] for r in requests]
    queries, corpus = encoder.encode(requests)
    top = corpus_topk(queries, corpus, max(k_list))
    rankings = [[data.corpus_ids[i] for i in row] for row in top.index]
    scores = ranking_scores(rankings, data.qrels, k_list)
    scores["num_corpus"] = len(data.corpus)
    scores["skipped"] = list(data.problems)
    return scores


def evaluate_v2(root: str | os.PathLike, encoder, out: str | os.PathLike, model: str, num_frames: int = 8,
                video_as_video: bool = True, sets: list[str] | None = None, metadata: Mapping | None = None,
                benchmark_version: str = BENCHMARK_VERSION) -> dict:
    """Scores every V2 set under `root` (or the named ones): a score file each and the per-model
    summary (which also collects image score files already under `out/image`). Returns the report."""
    from sde_ray.data.mmeb_v2 import discover, read_set

    if not Path(root).is_dir():
        raise FileNotFoundError(f"MMEB-V2 data folder {root} does not exist")
    found = [f for f in discover(root) if not sets or f[2] in sets]
    if not found:
        raise ValueError(f"no MMEB-V2 video or visdoc set under {root}"
                         + (f" among {sets}" if sets else "") + " (see docs/eval.md for the layouts)")
    for modality, group, name in found:
        data = read_set(root, group, name, num_frames=num_frames)
        write_score_file(out, modality, name, score_set(data, encoder, video_as_video), model, benchmark_version)
    settings = {"num_frames": num_frames, "video_input": "video" if video_as_video else "middle_frame",
                "data_dir": str(Path(root).resolve())}
    return write_model_summary(out, model, {**settings, **dict(metadata or {})}, benchmark_version)


DEFAULT_NUM_FRAMES = 8  # VLM2Vec's eval configs (experiments/public/eval/video.yaml)


def run_eval_v2(checkpoint: str | os.PathLike, data_dir: str | os.PathLike | None, output_dir: str | os.PathLike | None,
                config, sets: list[str] | None = None) -> dict:
    """`sde-ray eval --benchmark mmeb-v2`: a checkpoint scored on a folder of V2 sets (the held-out
    synthetic V2 of the data cache when `data_dir` is empty), encoded in this process; prints the
    summary line."""
    from sde_ray.data.cache import synthetic_v2_eval_dir
    from sde_ray.eval.checkpoints import default_output_dir, resolve_checkpoint
    from sde_ray.eval.encode import load_encoder
    from sde_ray.eval.runner import model_stamp

    out = Path(output_dir).expanduser().resolve() if output_dir else default_output_dir(checkpoint) / "mmeb_v2"
    out.mkdir(parents=True, exist_ok=True)
    resolved = resolve_checkpoint(checkpoint, out)
    root = Path(data_dir).expanduser().resolve() if data_dir else Path(synthetic_v2_eval_dir(config))
    encoder = load_encoder(resolved.model_dir, config.eval.batch_size)
    model_config = encoder.processor.config
    as_video = model_config.kind == "vlm" and model_config.video_frames > 0
    stamp = model_stamp(resolved.model_dir)
    report = evaluate_v2(root, encoder, out, model=f"{Path(stamp['model_dir']).name}-{stamp['sha256'][:12]}",
                         num_frames=model_config.video_frames or DEFAULT_NUM_FRAMES, video_as_video=as_video,
                         sets=sets, metadata={"model": stamp})
    print(f"MMEB-V2 ({report['metadata']['benchmark_version']}; {report['metadata']['video_input']} input): "
          f"{summary_line(report['summary'])}  -> {out}")
    return report


def final_evaluation_v2(model_dir: str | os.PathLike, image_results: Mapping, config, out: str | os.PathLike) -> dict:
    """After training on the synthetic V2 mix: the image datasets' P@1 (hit@1, just computed by the
    MMEB evaluation) as image score files, the held-out synthetic V2 scored in this process, and
    the summary line printed. Returns the summary."""
    from sde_ray.data.cache import synthetic_v2_eval_dir
    from sde_ray.eval.encode import load_encoder
    from sde_ray.runs import say

    out = Path(out)
    encoder = load_encoder(model_dir, config.eval.batch_size)
    model_config = encoder.processor.config
    model = Path(model_dir).name
    for name, score in image_results.get("datasets", {}).items():
        write_score_file(out, "image", name, {"hit@1": score["p_at_1"], "num_data": score["num_queries"]}, model)
    as_video = model_config.kind == "vlm" and model_config.video_frames > 0
    report = evaluate_v2(synthetic_v2_eval_dir(config), encoder, out, model,
                         num_frames=model_config.video_frames or DEFAULT_NUM_FRAMES, video_as_video=as_video)
    say(f"MMEB-V2 (synthetic, {'video' if as_video else 'middle-frame'} input): {summary_line(report['summary'])}")
    return report["summary"]
