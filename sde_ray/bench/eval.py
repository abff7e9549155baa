"""`sde-ray bench eval`: MMEB scoring throughput with and without candidate de-duplication.

Two workloads, each measured in both modes in the same process with the same model
(`config.model`, tiny-clip by default):

- `synthetic`: the synthetic MMEB-eval (`data.synth.num_candidates` candidates per query).
- `mmeb_shaped`: two sets generated here at MMEB-eval's real shape: a classification set whose
  queries (one image each) all share one label set of `LABELS` texts as their candidates (as
  ImageNet-1K does), and a text-to-image retrieval set whose queries draw `CANDIDATES` candidates
  each from a shared pool of `POOL` images (as MSCOCO_t2i does). Naive encoding of 1,000 queries ×
  1,001 items is hours of CPU, so the naive mode encodes the first `NAIVE_ROWS` rows of each set
  (queries/s is a rate) and P@1 is compared on exactly those rows.

Timed: encoding the queries and candidates and scoring them (reading parquet and images is the
same work in both modes and is done once, outside the clock); modes alternate per repeat so
machine load hits both alike. Reported: queries/s of each mode, their ratio, the items each mode
encodes, and whether both give identical hits (they must).

`feed`: how the Ray encoding actors are fed, on MMEB-shaped sets of `FEED_SHAPE` with
`FEED_IMAGE_SIZE`-pixel images, an exported `config.model`, `eval.num_workers` actors, no embedding
cache, passes timed from the first request to the last score, on one local Ray cluster, the two
alternating:
- `before`: the driver reads and decodes each dataset's images, one dataset after another, and the
  actors (`RayEncoderPool`) decode, resize and tokenise each batch, then run its forward; weights
  in fp32 under autocast.
- `after`: `sde_ray.eval.streamed`: Ray Data CPU tasks decode, resize and tokenise, uint8 arrays
  stream to the actors, which run only the forward in the training dtype; all datasets in one
  pipeline.
Reported per mode: queries/s over the whole pass and since the last actor had loaded the model (the
start of an actor is a process start and a model load, which a loaded machine stretches), and the
encoder's input wait over that second window: the share of the actors' time not spent in forwards
(1 − Σ forward seconds / (actors × seconds)); and whether both passes give the same P@1 per dataset
(with deepspeed.precision=fp32 they must).
"""

from __future__ import annotations

import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sde_ray.config import Config
from sde_ray.data.mmeb import eval_image_source
from sde_ray.data.synthetic import write_synthetic_mmeb
from sde_ray.eval.encode import ModelEncoder
from sde_ray.eval.roots import select_datasets
from sde_ray.eval.scoring import dataset_hits, encode_dataset, prepare_dataset, score_dataset

# MMEB-eval's shape: 1,000 queries per set; ImageNet-1K's 1,000 labels; 1,000 candidates per query.
QUERIES, LABELS, CANDIDATES, POOL, NAIVE_ROWS = 1000, 1000, 1000, 2000, 4
QUICK_SHAPE = {"queries": 40, "labels": 40, "candidates": 40, "pool": 80, "naive_rows": 4}
FEED_SHAPE = {"queries": 300, "labels": 300, "candidates": 100, "pool": 600}
FEED_QUICK_SHAPE = {"queries": 16, "labels": 16, "candidates": 8, "pool": 16}
FEED_IMAGE_SIZE = 224  # the tiny models resize to their own size: the decode and resize are real work
SHAPED_SETS = ("ImageNet-1K", "MSCOCO_t2i")  # catalog names, so the built-in catalog describes them


def _png(rng: np.random.Generator, size: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_mmeb_shaped(root: Path, seed: int, queries: int, labels: int, candidates: int, pool: int,
                      image_size: int = 32) -> Path:
    """An MMEB-eval root with the two MMEB-shaped sets (see the module docstring); returns it."""
    rng = np.random.default_rng(seed)
    images = root / "eval_images"

    def image(name: str) -> str:
        path = images / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png(rng, image_size))
        return name

    label_texts = [f"label {k}" for k in range(labels)]
    rows = {"qry_text": [], "qry_img_path": [], "tgt_text": [], "tgt_img_path": []}
    for q in range(queries):
        truth = int(rng.integers(labels))
        order = [truth] + [k for k in rng.permutation(labels).tolist() if k != truth]
        rows["qry_text"].append("<|image_1|>\nRepresent the given image for classification\n")
        rows["qry_img_path"].append(image(f"ImageNet-1K/q{q}.png"))
        rows["tgt_text"].append([label_texts[k] for k in order])
        rows["tgt_img_path"].append([""] * labels)
    _write(root / SHAPED_SETS[0], rows)

    pool_paths = [image(f"MSCOCO_t2i/p{i}.png") for i in range(pool)]
    rows = {"qry_text": [], "qry_img_path": [], "tgt_text": [], "tgt_img_path": []}
    for q in range(queries):
        drawn = rng.choice(pool, size=candidates, replace=False).tolist()
        rows["qry_text"].append(f"Find me an everyday image that matches the given caption: scene {q}\n")
        rows["qry_img_path"].append("")
        rows["tgt_text"].append(["<|image_1|>\nRepresent the given image.\n"] * candidates)
        rows["tgt_img_path"].append([pool_paths[i] for i in drawn])
    _write(root / SHAPED_SETS[1], rows)
    return root


def _write(folder: Path, rows: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), folder / "test-00000-of-00001.parquet")


def mmeb_shaped(encoder, root: Path, shape: dict, repeats: int) -> dict:
    """Both modes on the MMEB-shaped sets: dedup on every row, naive on the first `naive_rows`."""
    infos = select_datasets(root, list(SHAPED_SETS))
    source = eval_image_source(root)
    dedup = [prepare_dataset(root, info, source) for info in infos]
    naive = [prepare_dataset(root, info, source, dedup=False, max_rows=shape["naive_rows"]) for info in infos]
    source.close()
    times: dict[str, list[float]] = {"dedup": [], "naive": []}
    hits: dict[str, list] = {}
    for _ in range(repeats):
        for mode, prepared in (("naive", naive), ("dedup", dedup)):
            start = time.perf_counter()
            hits[mode] = [dataset_hits(encode_dataset(p, encoder)) for p in prepared]
            times[mode].append(time.perf_counter() - start)
    rows = {"dedup": sum(p.table.num_rows for p in dedup), "naive": sum(p.table.num_rows for p in naive)}
    result: dict = {"sets": list(SHAPED_SETS), **shape, "repeats": repeats}
    for mode, prepared in (("dedup", dedup), ("naive", naive)):
        seconds = statistics.median(times[mode])
        result[mode] = {"queries": rows[mode], "seconds": seconds, "queries_per_s": rows[mode] / seconds,
                        "encoded_items": sum(len(p.table.queries) + len(p.table.candidates) for p in prepared)}
    result["speedup_dedup_over_naive"] = result["dedup"]["queries_per_s"] / result["naive"]["queries_per_s"]
    result["identical_p_at_1"] = all(
        np.array_equal(d[: len(n)], n) for d, n in zip(hits["dedup"], hits["naive"])
    )
    return result


def _timed_pass(prepared, encoder) -> tuple[float, dict[str, int]]:
    start = time.perf_counter()
    correct = {p.info.name: score_dataset(encode_dataset(p, encoder)).num_correct for p in prepared}
    return time.perf_counter() - start, correct


def _feed_pass(mode: str, model_dir: Path, root: Path, config: Config) -> dict:
    """One whole pass of `mode`: its seconds, the seconds since the last actor had loaded the model,
    the forward seconds summed over the actors, and the P@1 per dataset."""
    import ray

    from sde_ray.eval.encode import CachedEncoder, RayEncoderPool
    from sde_ray.eval.evaluation import evaluate_prepared
    from sde_ray.eval.streamed import evaluate_streamed

    infos = select_datasets(root, list(SHAPED_SETS))
    start = time.perf_counter()
    if mode == "before":
        pool = RayEncoderPool(model_dir, config.eval.num_workers, config.eval.batch_size, progress=False,
                              precision=config.deepspeed.precision)
        try:
            evaluation = evaluate_prepared(None, pool, eval_root=root, infos=infos)
            seconds, ended = time.perf_counter() - start, time.time()
            forward = sum(ray.get([actor.forward_seconds.remote() for actor in pool.actors]))
            actors = pool.describe()
        finally:
            pool.shutdown()
    else:
        evaluation, record = evaluate_streamed(model_dir, root, infos, config, CachedEncoder(None, mode),
                                               progress=False)
        seconds, ended = time.perf_counter() - start, time.time()
        forward, actors = record.forward_seconds, record.actors
    return {"seconds": seconds, "since_ready": ended - max(a["started_at"] for a in actors), "forward": forward,
            "p_at_1": {name: score.p_at_1 for name, score in evaluation.scores.items()}}


def feed(config: Config, tmp: Path, quick: bool) -> dict:
    """`before` and `after` (see the module docstring), alternating, on one local Ray cluster."""
    import os

    import ray

    from sde_ray.models import build_model
    from sde_ray.ray_cluster import start_local

    shape = FEED_QUICK_SHAPE if quick else FEED_SHAPE
    root = write_mmeb_shaped(tmp / "mmeb-shaped-feed", config.data.synth.seed, shape["queries"], shape["labels"],
                             shape["candidates"], shape["pool"], image_size=FEED_IMAGE_SIZE)
    model_dir = build_model(config.model, seed=config.train.seed).save_pretrained(tmp / "feed-model")
    repeats = 1 if quick else 2
    started = start_local(max(4, os.cpu_count() or 1), log_to_driver=False, fresh=True)
    passes: dict[str, list[dict]] = {"before": [], "after": []}
    try:
        for _ in range(repeats):
            for mode in ("before", "after"):
                passes[mode].append(_feed_pass(mode, model_dir, root, config))
    finally:
        if started:
            ray.shutdown()
    queries = 2 * shape["queries"]
    result: dict = {"sets": list(SHAPED_SETS), **shape, "image_size": FEED_IMAGE_SIZE, "repeats": repeats,
                    "num_workers": config.eval.num_workers, "precision": config.deepspeed.precision,
                    "decode_concurrency": config.eval.decode_concurrency}
    workers = config.eval.num_workers
    for mode, runs in passes.items():
        result[mode] = {
            "queries": queries,
            "seconds": statistics.median(r["seconds"] for r in runs),
            "queries_per_s": statistics.median(queries / r["seconds"] for r in runs),
            "seconds_since_actors_ready": statistics.median(r["since_ready"] for r in runs),
            "queries_per_s_since_actors_ready": statistics.median(queries / r["since_ready"] for r in runs),
            "encoder_input_wait": statistics.median(1 - r["forward"] / (workers * r["since_ready"]) for r in runs),
            "p_at_1": runs[-1]["p_at_1"],
        }
    for rate in ("queries_per_s", "queries_per_s_since_actors_ready"):
        result[f"after_over_before_{rate}"] = result["after"][rate] / result["before"][rate]
    result["identical_p_at_1"] = all(b["p_at_1"] == a["p_at_1"] for b, a in zip(passes["before"], passes["after"]))
    return result


def main(json_path: str | None = None, config: Config | None = None, quick: bool = False) -> dict:
    from sde_ray.models import BatchProcessor, build_model

    config = config or Config()
    synth = config.data.synth
    per_dataset = 8 if quick else synth.eval_per_dataset
    repeats = 1 if quick else 3
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, seed=config.train.seed).eval()
    encoder = ModelEncoder(model, BatchProcessor(config.model), config.eval.batch_size)

    shape = QUICK_SHAPE if quick else {"queries": QUERIES, "labels": LABELS, "candidates": CANDIDATES,
                                       "pool": POOL, "naive_rows": NAIVE_ROWS}
    with tempfile.TemporaryDirectory(prefix="sde_ray_bench_eval_") as tmp:
        summary = write_synthetic_mmeb(
            tmp,
            seed=synth.seed,
            train_per_subset=1,
            eval_per_dataset=per_dataset,
            num_candidates=synth.num_candidates,
            image_size=synth.image_size,
        )
        root = Path(summary["eval_dir"])
        infos = select_datasets(root, config.eval.datasets or None)
        if quick:
            infos = infos[:3]
        source = eval_image_source(root)
        modes = {
            mode: [prepare_dataset(root, info, source, dedup=(mode == "dedup")) for info in infos]
            for mode in ("dedup", "naive")
        }
        source.close()
        times: dict[str, list[float]] = {"dedup": [], "naive": []}
        correct: dict[str, dict[str, int]] = {}
        for _ in range(repeats):
            for mode in ("naive", "dedup"):
                elapsed, correct[mode] = _timed_pass(modes[mode], encoder)
                times[mode].append(elapsed)
        shaped_root = write_mmeb_shaped(Path(tmp) / "mmeb-shaped", synth.seed, shape["queries"], shape["labels"],
                                        shape["candidates"], shape["pool"], synth.image_size)
        # One repeat: at a ratio of hundreds, load noise cannot change the conclusion, and a naive
        # pass over 1,001-item rows costs minutes of CPU.
        shaped = mmeb_shaped(encoder, shaped_root, shape, repeats=1)
        fed = feed(config, Path(tmp), quick)

    queries = sum(p.table.num_rows for p in modes["dedup"])
    result = {
        "benchmark": "eval",
        "model": config.model.name_or_path,
        "datasets": len(infos),
        "queries": queries,
        "candidates_per_query": synth.num_candidates,
        "repeats": repeats,
        "batch_size": config.eval.batch_size,
        "torch_threads": torch.get_num_threads(),
    }
    for mode in ("dedup", "naive"):
        seconds = statistics.median(times[mode])
        result[mode] = {
            "seconds": seconds,
            "queries_per_s": queries / seconds,
            "encoded_items": sum(len(p.table.queries) + len(p.table.candidates) for p in modes[mode]),
        }
    result["speedup_dedup_over_naive"] = result["dedup"]["queries_per_s"] / result["naive"]["queries_per_s"]
    result["identical_p_at_1"] = correct["dedup"] == correct["naive"]
    result["mmeb_shaped"] = shaped
    result["feed"] = fed

    print(f"eval bench: {queries} queries over {len(infos)} datasets, {synth.num_candidates} candidates each")
    for mode in ("naive", "dedup"):
        row = result[mode]
        print(f"  {mode:<6} {row['queries_per_s']:8.1f} queries/s  ({row['encoded_items']} items encoded)")
    print(
        f"  dedup / naive: {result['speedup_dedup_over_naive']:.2f}x; "
        f"identical P@1: {result['identical_p_at_1']}"
    )
    print(f"MMEB-shaped: {shaped['queries']} queries per set; classification over one set of {shaped['labels']} "
          f"labels, retrieval of {shaped['candidates']} candidates from a pool of {shaped['pool']} images")
    for mode in ("naive", "dedup"):
        row = shaped[mode]
        print(f"  {mode:<6} {row['queries_per_s']:8.1f} queries/s  ({row['encoded_items']} items encoded "
              f"for {row['queries']} queries)")
    print(
        f"  dedup / naive: {shaped['speedup_dedup_over_naive']:.1f}x; "
        f"identical P@1 on the naive rows: {shaped['identical_p_at_1']}"
    )
    print(f"Feeding the eval actors: {fed['queries']} + {fed['queries']} MMEB-shaped queries, "
          f"{fed['image_size']} px images, {fed['num_workers']} actor(s), {fed['precision']}")
    for mode in ("before", "after"):
        row = fed[mode]
        print(f"  {mode:<6} {row['queries_per_s']:8.1f} queries/s whole pass, "
              f"{row['queries_per_s_since_actors_ready']:8.1f} since the actors were ready; encoder waiting "
              f"for input {100 * row['encoder_input_wait']:.0f}% of that time")
    print(f"  after / before: {fed['after_over_before_queries_per_s']:.2f}x whole pass, "
          f"{fed['after_over_before_queries_per_s_since_actors_ready']:.2f}x since ready; "
          f"identical P@1: {fed['identical_p_at_1']}")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result
