"""MMEB-V2's video and visual-document layouts on disk, and its frame sampler (pure Python/numpy).

The layouts follow the public release and harness (TIGER-AI-Lab/VLM2Vec,
`experiments/public/eval/{video,visdoc}.yaml`, `src/constant/dataset_hflocal_path.py`):

    <root>/video-tasks/<Dataset>/test.jsonl                 annotations, one row per query
    <root>/video-tasks/frames/<group>/<Dataset>/<video_id>/  pre-extracted frames (up to 64)
    <root>/visdoc-tasks/<Dataset>/{queries,corpus,qrels}.jsonl   BEIR columns: query-id/query,
    <root>/visdoc-tasks/<Dataset>/<corpus-id>.png                corpus-id, query-id/corpus-id/score

`group` is `video_cls` (rows `video_id`, `pos_text` = the class label; candidates are all labels,
ranked against the whole label set) or `video_ret` (rows `video_id`, `caption`; the caption
retrieves its video from all videos of the set). The annotations are the columns of the harness's
HF datasets, stored as JSON lines (the release ships them as HF datasets; `datasets` saves either).

Frames are listed in natural order (`frame_2` before `frame_10`) and sampled by the harness's
rule (`sample_frames`): `np.linspace(0, n - 1, num_frames)` truncated to int; a clip with fewer
than `num_frames` frames is padded by repeating its last frame (VLM2Vec since June 2026;
`pad_short=False` gives the earlier rule, which keeps all of a short clip's frames).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VIDEO_GROUPS = ("video_cls", "video_ret")
VIDEO_DIR, VISDOC_DIR, FRAMES_DIR = "video-tasks", "visdoc-tasks", "frames"
ANNOTATIONS = "test.jsonl"

# The harness's task instructions (VLM2Vec eval datasets), used as the prompt text of each side.
INSTRUCTIONS = {
    "video_cls": ("Recognize the category of the video content.", ""),
    "video_ret": ("Find a video that contains the following visual content:",
                  "Understand the content of the provided video."),
    "visdoc": ("Find a document image that matches the given query:",
               "Understand the content of the provided document image."),
}


def natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_frames(frame_dir: str | os.PathLike) -> list[str]:
    """The image files of a frames folder in natural order ([] when the folder does not exist)."""
    frame_dir = Path(frame_dir)
    if not frame_dir.is_dir():
        return []
    names = sorted((n for n in os.listdir(frame_dir) if os.path.splitext(n)[1].lower() in FRAME_EXTENSIONS),
                   key=natural_key)
    return [str(frame_dir / n) for n in names]


def frame_indices(num_available: int, num_frames: int, pad_short: bool = True) -> list[int]:
    """Which frames a model sees: `num_frames` uniform over the clip, as the harness picks them."""
    if num_frames <= 0 or num_available <= 0:
        return []
    if num_available < num_frames:
        keep = list(range(num_available))
        return keep + [num_available - 1] * (num_frames - num_available) if pad_short else keep
    return np.linspace(0, num_available - 1, num_frames, dtype=int).tolist()


def sample_frames(frames: list, num_frames: int, pad_short: bool = True) -> list:
    return [frames[i] for i in frame_indices(len(frames), num_frames, pad_short)]


@dataclass
class Item:
    """One side of a query or one corpus entry: text and/or a list of image paths (the sampled
    frames of a video, or one page)."""

    text: str
    images: list[str] = field(default_factory=list)


@dataclass
class RetrievalSet:
    """One V2 dataset as queries against a corpus with graded qrels (every set is global here:
    both readers' sets rank against the whole corpus or label set)."""

    name: str
    modality: str  # "video" | "visdoc"
    group: str  # "video_cls" | "video_ret" | "visdoc"
    queries: list[Item]
    corpus: list[Item]
    corpus_ids: list[str]
    qrels: list[dict[str, float]]  # per query: corpus id -> grade
    problems: list[str] = field(default_factory=list)  # rows skipped, and why


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _video_frames(root: Path, group: str, name: str, video_id: str, num_frames: int, pad_short: bool) -> list[str]:
    return sample_frames(list_frames(root / VIDEO_DIR / FRAMES_DIR / group / name / video_id), num_frames, pad_short)


def read_video_set(root: str | os.PathLike, name: str, group: str, num_frames: int = 8,
                   pad_short: bool = True) -> RetrievalSet:
    """A video classification or retrieval set; a row whose frames folder is empty is skipped
    and listed in `problems` (the harness would raise)."""
    root = Path(root)
    rows = _jsonl(root / VIDEO_DIR / name / ANNOTATIONS)
    qry_inst, tgt_inst = INSTRUCTIONS[group]
    problems: list[str] = []
    videos: dict[str, list[str]] = {}
    for row in rows:
        vid = str(row["video_id"])
        if vid not in videos:
            videos[vid] = _video_frames(root, group, name, vid, num_frames, pad_short)
            if not videos[vid]:
                problems.append(f"{name}/{vid}: no frames")
    rows = [r for r in rows if videos[str(r["video_id"])]]
    if group == "video_cls":
        labels = sorted({str(r["pos_text"]) for r in rows})
        queries = [Item(qry_inst, videos[str(r["video_id"])]) for r in rows]
        corpus = [Item(label) for label in labels]
        qrels = [{str(r["pos_text"]): 1.0} for r in rows]
        return RetrievalSet(name, "video", group, queries, corpus, labels, qrels, problems)
    if group == "video_ret":
        ids = list(dict.fromkeys(str(r["video_id"]) for r in rows))
        queries = [Item(f"{qry_inst} {r['caption']}") for r in rows]
        corpus = [Item(tgt_inst, videos[vid]) for vid in ids]
        qrels = [{str(r["video_id"]): 1.0} for r in rows]
        return RetrievalSet(name, "video", group, queries, corpus, ids, qrels, problems)
    raise ValueError(f"unknown video group {group!r}; one of {VIDEO_GROUPS}")


def read_visdoc_set(root: str | os.PathLike, name: str) -> RetrievalSet:
    """A BEIR-style visual-document set: text queries, page images, graded qrels (grades <= 0
    dropped and the higher grade kept for a repeated pair, as the harness's `load_qrels_mapping`)."""
    folder = Path(root) / VISDOC_DIR / name
    qry_inst, tgt_inst = INSTRUCTIONS["visdoc"]
    problems: list[str] = []
    corpus_ids, corpus = [], []
    for row in _jsonl(folder / "corpus.jsonl"):
        cid = str(row["corpus-id"])
        page = folder / f"{cid}.png"
        if not page.is_file():
            problems.append(f"{name}/{cid}.png: missing page image")
            continue
        corpus_ids.append(cid)
        corpus.append(Item(tgt_inst, [str(page)]))
    grades: dict[str, dict[str, float]] = {}
    for row in _jsonl(folder / "qrels.jsonl"):
        if float(row["score"]) > 0:
            per_query = grades.setdefault(str(row["query-id"]), {})
            cid = str(row["corpus-id"])
            per_query[cid] = max(per_query.get(cid, 0.0), float(row["score"]))
    queries, qrels = [], []
    for row in _jsonl(folder / "queries.jsonl"):
        qid = str(row["query-id"])
        if qid not in grades:
            problems.append(f"{name}/{qid}: query without a relevant page")
            continue
        queries.append(Item(f"{qry_inst} {row['query']}"))
        qrels.append(grades[qid])
    return RetrievalSet(name, "visdoc", "visdoc", queries, corpus, corpus_ids, qrels, problems)


def discover(root: str | os.PathLike) -> list[tuple[str, str, str]]:
    """(modality, group, dataset) of every V2 set under `root`, sorted: a video set is an
    annotations folder whose frames live under one of the groups; a visdoc set is a folder with
    `queries.jsonl`."""
    root = Path(root)
    found = []
    video = root / VIDEO_DIR
    if video.is_dir():
        for folder in sorted(video.iterdir()):
            if folder.name == FRAMES_DIR or not (folder / ANNOTATIONS).is_file():
                continue
            groups = [g for g in VIDEO_GROUPS if (video / FRAMES_DIR / g / folder.name).is_dir()]
            if len(groups) != 1:
                raise ValueError(f"{folder}: frames expected under exactly one of "
                                 f"{[str(video / FRAMES_DIR / g / folder.name) for g in VIDEO_GROUPS]}")
            found.append(("video", groups[0], folder.name))
    visdoc = root / VISDOC_DIR
    if visdoc.is_dir():
        found += [("visdoc", "visdoc", f.name) for f in sorted(visdoc.iterdir()) if (f / "queries.jsonl").is_file()]
    return found


def read_set(root: str | os.PathLike, group: str, name: str, num_frames: int = 8, pad_short: bool = True) -> RetrievalSet:
    if group == "visdoc":
        return read_visdoc_set(root, name)
    return read_video_set(root, name, group, num_frames, pad_short)
