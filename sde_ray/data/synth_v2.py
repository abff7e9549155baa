"""A tiny, deterministic synthetic MMEB-V2 in exactly the V2 layouts (sde_ray/data/mmeb_v2.py).

- `SynthMotion` (video_cls): short clips of one shape moving in one of four directions, as a frames
  folder; the class is the motion ("moving left", ...).
- `SynthClips` (video_ret): the same kind of clips, retrieved by a caption naming colour, shape and
  motion ("a red circle moving up").
- `SynthDocs` (visdoc): rendered pages of text; each query is a sentence printed on one page
  (grade 2) whose sibling page of the same document is also relevant (grade 1).

Every pixel and every row is a function of `seed`, so two calls write byte-identical trees.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sde_ray.data.mmeb_v2 import ANNOTATIONS, FRAMES_DIR, VIDEO_DIR, VISDOC_DIR

MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
TOPICS = ("energy", "health", "finance", "weather", "farming", "transport", "music", "space")
NOUNS = ("output", "demand", "rates", "prices", "levels", "volume", "costs", "growth")
VERBS = ("rose", "fell", "doubled", "held steady", "recovered", "slowed")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)


def write_clip(folder: Path, shape: str, colour: str, motion: str, num_frames: int, size: int,
               rng: np.random.Generator) -> None:
    """`num_frames` PNG frames of one shape crossing the canvas in one direction."""
    folder.mkdir(parents=True, exist_ok=True)
    dx, dy = MOTIONS[motion]
    r = size / 8
    start = rng.uniform(size * 0.3, size * 0.7, size=2)
    travel = size * 0.5
    for t in range(num_frames):
        progress = t / max(num_frames - 1, 1) - 0.5
        image = Image.new("RGB", (size, size), (245, 245, 245))
        _draw_shape(ImageDraw.Draw(image), shape, start[0] + dx * travel * progress,
                    start[1] + dy * travel * progress, r, COLOURS[colour])
        image.save(folder / f"frame_{t + 1}.png")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")


def write_video_sets(root: Path, rng: np.random.Generator, videos: int, frames: int, size: int) -> None:
    cls_rows, ret_rows = [], []
    for name, group, rows in (("SynthMotion", "video_cls", cls_rows), ("SynthClips", "video_ret", ret_rows)):
        for i in range(videos):
            motion = list(MOTIONS)[i % len(MOTIONS)]
            shape, colour = SHAPES[int(rng.integers(len(SHAPES)))], list(COLOURS)[int(rng.integers(len(COLOURS)))]
            vid = f"{name.lower()}_{i:04d}"
            # Frame counts vary around `frames`, so short clips exercise the sampler's padding.
            count = int(frames + rng.integers(-frames // 2, frames // 2 + 1))
            write_clip(root / VIDEO_DIR / FRAMES_DIR / group / name / vid, shape, colour, motion, count, size, rng)
            if group == "video_cls":
                rows.append({"video_id": vid, "pos_text": f"moving {motion}"})
            else:
                rows.append({"video_id": vid, "caption": f"a {colour} {shape} moving {motion}"})
        _write_jsonl(root / VIDEO_DIR / name / ANNOTATIONS, rows)


def _sentence(rng: np.random.Generator, topic: str) -> str:
    return (f"{topic} {NOUNS[int(rng.integers(len(NOUNS)))]} {VERBS[int(rng.integers(len(VERBS)))]} "
            f"by {int(rng.integers(2, 99))} percent in {int(rng.integers(1990, 2030))}")


def write_visdoc_set(root: Path, rng: np.random.Generator, documents: int, size: int) -> None:
    """Two pages per document, three sentences per page; one query per page."""
    folder = root / VISDOC_DIR / "SynthDocs"
    folder.mkdir(parents=True, exist_ok=True)
    corpus, queries, qrels = [], [], []
    for d in range(documents):
        topic = TOPICS[d % len(TOPICS)]
        pages = [f"doc{d:03d}_p{p}" for p in range(2)]
        for p, cid in enumerate(pages):
            lines = [_sentence(rng, topic) for _ in range(3)]
            page = Image.new("RGB", (size * 2, size), (255, 255, 255))
            draw = ImageDraw.Draw(page)
            draw.text((4, 2), f"{topic.upper()} REPORT page {p + 1}", fill=(0, 0, 0))
            for j, line in enumerate(lines):
                draw.text((4, 16 + 12 * j), line, fill=(20, 20, 20))
            page.save(folder / f"{cid}.png")
            corpus.append({"corpus-id": cid})
            qid = f"q_{cid}"
            queries.append({"query-id": qid, "query": lines[int(rng.integers(3))]})
            qrels.append({"query-id": qid, "corpus-id": cid, "score": 2})
            qrels.append({"query-id": qid, "corpus-id": pages[1 - p], "score": 1})
    _write_jsonl(folder / "corpus.jsonl", corpus)
    _write_jsonl(folder / "queries.jsonl", queries)
    _write_jsonl(folder / "qrels.jsonl", qrels)


def write_synthetic_v2(root: str | os.PathLike, videos: int = 16, frames: int = 12, documents: int = 8,
                       size: int = 32, seed: int = 0) -> Path:
    """Writes the three synthetic sets under `root` in the V2 layouts and returns `root`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    write_video_sets(root, rng, videos, frames, size)
    write_visdoc_set(root, rng, documents, size * 2)
    return root
