"""`sde-ray mine`: offline hard-negative mining with a teacher checkpoint, as a Ray job.

1. The training corpus of `config.data` (the shards `prepare_data` resolves) is read shard by shard.
2. Every shard's queries and targets are encoded by the teacher on `mine.num_workers` Ray actors
   (`sde_ray.eval.encode.RayEncoderPool`: one GPU each when the cluster has GPUs) and cached as
   `DIR/embeddings/<shard>.npz`.
3. With every target encoded, each shard's queries take their top-k targets by cosine after the
   false-negative filter (`sde_ray.data.negatives.mine_negatives`), written as `DIR/parts/<shard>.parquet`.
4. `DIR/sidecar.json` records the teacher, its embedding size, the settings, the shards' sample
   counts, the drop counts per reason, the encoding throughput and the top-k + filter throughput
   (`topk_rows_per_s`, queries per second in this process); `complete: true` last.

Resumable: a shard whose embeddings or part is on disk is skipped (both are written atomically).
A rerun with another teacher embedding size, other settings or other shards is refused, naming
what differs, before any actor starts: parts of two teachers must not mix.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from sde_ray.config import Config
from sde_ray.data.negatives import PARTS, SIDECAR_META, MineCounts, mine_negatives, read_shard, write_part

EMBEDDINGS = "embeddings"


def _stem(path: str) -> str:
    return Path(path).name.removesuffix(".tar")


def _teacher_dim(model_dir: Path) -> int:
    from sde_ray.models.embedder import EXPORT_FILE

    return int(json.loads((model_dir / EXPORT_FILE).read_text())["embed_dim"])


def _plan(config: Config, model_dir: Path, shards: list[str], samples: dict[str, int]) -> dict:
    m = config.mine
    return {
        "teacher": str(model_dir),
        "embed_dim": _teacher_dim(model_dir),
        "top_k": m.top_k,
        "margin": m.margin,
        "within_subset": m.within_subset,
        "cluster_size": m.cluster_size,
        "shards": {Path(p).name: samples.get(p) for p in shards},
    }


def check_resume(out_dir: Path, plan: dict) -> None:
    """Refuses to resume into a sidecar folder mined with another teacher size, settings or corpus."""
    meta_path = out_dir / SIDECAR_META
    if not meta_path.exists():
        return
    previous = json.loads(meta_path.read_text())
    if previous.get("embed_dim") != plan["embed_dim"]:
        raise ValueError(
            f"{out_dir} was mined with a teacher of embedding size {previous.get('embed_dim')}, but "
            f"{plan['teacher']} embeds to {plan['embed_dim']}: use another --out or delete it"
        )
    differs = [k for k in ("top_k", "margin", "within_subset", "cluster_size", "shards") if previous.get(k) != plan[k]]
    if differs:
        raise ValueError(f"{out_dir} was mined with other {', '.join(differs)}: use another --out or delete it")


def _save_npz(path: Path, **arrays) -> None:
    staging = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(staging, **arrays)
    os.replace(staging, path)


def _warm_up(pool, shard: str) -> None:
    import ray

    first = read_shard(shard)
    ray.get([actor.encode_batch.remote("query", first["qry_text"][:1], first["qry_image"][:1])
             for actor in pool.actors])


def encode_corpus(pool, shards: list[str], out_dir: Path, embed_dim: int, progress: bool) -> dict:
    """Encodes every shard not yet cached; returns {rows, seconds} of the encoding done now."""
    from tqdm.auto import tqdm

    folder = out_dir / EMBEDDINGS
    folder.mkdir(parents=True, exist_ok=True)
    rows, seconds = 0, 0.0
    for shard in tqdm(shards, desc="mine: encode shards", unit="shard", disable=not progress):
        path = folder / f"{_stem(shard)}.npz"
        if path.exists():
            continue
        columns = read_shard(shard)
        started = time.perf_counter()
        queries, targets = pool.encode([("query", columns["qry_text"], columns["qry_image"]),
                                        ("target", columns["pos_text"], columns["pos_image"])])
        seconds += time.perf_counter() - started
        for name, array in (("queries", queries), ("targets", targets)):
            if array.shape != (len(columns["key"]), embed_dim):
                raise ValueError(f"teacher returned {name} of shape {array.shape} for {shard}; "
                                 f"expected ({len(columns['key'])}, {embed_dim})")
        _save_npz(path, queries=queries, targets=targets)
        rows += len(columns["key"])
    return {"rows": rows, "seconds": seconds}


def run_mine(config: Config, checkpoint: str, out_dir: str, progress: bool = True) -> dict:
    """Mines `config.data`'s corpus with the teacher `checkpoint` into the sidecar folder `out_dir`."""
    import ray

    from sde_ray.data.batching import cluster_rows
    from sde_ray.data.cache import prepare_data
    from sde_ray.eval.encode import RayEncoderPool
    from sde_ray.eval.checkpoints import resolve_checkpoint
    from sde_ray.ray_cluster import connect

    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare_data(config)
    if prepared.check is None or any(p not in prepared.check.samples for p in prepared.shards):
        raise ValueError("sde-ray mine reads local shards only (remote shards have no sample counts here)")
    model_dir = resolve_checkpoint(checkpoint, out).model_dir
    plan = _plan(config, model_dir, prepared.shards, prepared.check.samples)
    check_resume(out, plan)
    (out / SIDECAR_META).write_text(json.dumps({**plan, "complete": False}, indent=1) + "\n")

    # A local Ray takes the machine's CPUs: the encoding actors are the only work.
    started_ray = connect(config, local_cpus=os.cpu_count() or 1, log_to_driver=False)
    pool = None
    try:
        pending = [s for s in prepared.shards if not (out / EMBEDDINGS / f"{_stem(s)}.npz").exists()]
        encoding = {"rows": 0, "seconds": 0.0}
        if pending:
            pool = RayEncoderPool(model_dir, num_workers=config.mine.num_workers,
                                  batch_size=config.mine.batch_size, progress=progress)
            _warm_up(pool, pending[0])  # actor start-up (model load) stays out of the throughput
            encoding = encode_corpus(pool, pending, out, plan["embed_dim"], progress)
    finally:
        if pool is not None:
            pool.shutdown()
        if started_ray:
            ray.shutdown()

    columns = [read_shard(s) for s in prepared.shards]
    embeddings = [np.load(out / EMBEDDINGS / f"{_stem(s)}.npz") for s in prepared.shards]
    keys = [k for c in columns for k in c["key"]]
    hashes = [h for c in columns for h in c["target_hash"]]
    subsets = [s for c in columns for s in c["subset"]]
    targets = np.concatenate([e["targets"] for e in embeddings])
    clusters = np.full(len(keys), -1, dtype=np.int64)
    if config.mine.cluster_size:
        clusters = cluster_rows(targets, max(1, len(keys) // config.mine.cluster_size), seed=config.train.seed)
    counts, offset, topk = MineCounts(), 0, {"rows": 0, "seconds": 0.0}
    from tqdm.auto import tqdm

    for shard, column, embedding in tqdm(list(zip(prepared.shards, columns, embeddings)), desc="mine: top-k",
                                         unit="shard", disable=not progress):
        rows = range(offset, offset + len(column["key"]))
        offset += len(column["key"])
        part = out / PARTS / f"{_stem(shard)}.parquet"
        counts_path = part.with_suffix(".counts.json")
        if part.exists() and counts_path.exists():
            counts.add(MineCounts(**json.loads(counts_path.read_text())))
            continue
        started = time.perf_counter()
        negatives, scores, positive, part_counts = mine_negatives(
            embedding["queries"], targets, hashes, rows, config.mine.top_k, config.mine.margin,
            groups=subsets if config.mine.within_subset else None,
        )
        topk["seconds"] += time.perf_counter() - started
        topk["rows"] += len(rows)
        counts.add(part_counts)
        counts_path.parent.mkdir(parents=True, exist_ok=True)
        counts_path.write_text(json.dumps(part_counts.as_dict()))  # before the part: a part implies its counts
        keep = negatives >= 0
        write_part(part, column["key"], [[keys[j] for j in r[m]] for r, m in zip(negatives, keep)],
                   [s[m].tolist() for s, m in zip(scores, keep)], positive, clusters[list(rows)])
    summary = {**plan, "rows": len(keys), "counts": counts.as_dict(),
               "encode_rows": encoding["rows"], "encode_seconds": round(encoding["seconds"], 3),
               "encode_rows_per_s": round(encoding["rows"] / encoding["seconds"], 2) if encoding["seconds"] else None,
               "topk_rows": topk["rows"], "topk_seconds": round(topk["seconds"], 3),
               "topk_rows_per_s": round(topk["rows"] / topk["seconds"], 2) if topk["seconds"] else None,
               "complete": True}
    (out / SIDECAR_META).write_text(json.dumps(summary, indent=1) + "\n")
    return summary
