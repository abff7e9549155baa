"""MMEB-train (parquet + images) -> WebDataset `.tar` shards, `manifest.json` and `rejects.jsonl`.

One sample per MMEB-train row, key `<subset>-<row:08d>`, members `json` (subset, source_row,
meta_task, split, qry_text, pos_text, neg_text, target_hash) and the original encoded image bytes
as `qry.img` / `pos.img` / `neg.img` when the row has that image (docs/architecture.md).

- Images come from the unpacked `images/` folder or straight out of `images_zip/<Subset>.zip`
  (member by member, never unpacked to disk).
- Bad rows are never fatal and never dropped silently: each goes to `rejects.jsonl` with a reason
  (`REJECT_REASONS`) and is counted in the manifest.
- Shard assignment is a pure function of the row counts, the subsets and `samples_per_shard`: the
  rows of all subsets are interleaved by a fixed permutation, so every shard mixes subsets.
- Resume: each finished shard is written to a temporary name, renamed, and recorded in
  `_parts/<shard>.json` with its sha256; a rerun keeps shards whose bytes still match and redoes the
  rest (half-written, truncated, or from a different plan).
- Nothing is written outside `out`. Parallel over this machine's processes (`workers`) or as tasks
  of any executor (`run_tasks`: Ray tasks across a cluster, `sde_ray.ray_cluster.ray_tasks`), with a
  tqdm progress bar; the shards are the same bytes either way.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from sde_ray import storage
from sde_ray.data.shards import sha256_of
from sde_ray.data.mmeb import (
    MANIFEST,
    TRAIN_COLUMNS,
    TRAIN_NEG_COLUMNS,
    ArchiveError,
    ImageSource,
    UnsafePathError,
    list_train_subsets,
    load_dataset_catalog,
    meta_task_of_subset,
    train_image_source,
)

SCHEMA_VERSION = 1
FORMAT = "sde_ray.mmeb-webdataset"
PLAN_SEED = 0
REJECTS = "rejects.jsonl"
PARTS_DIR = "_parts"
SHARD_PATTERN = "shard-{:06d}.tar"
REJECT_REASONS = (
    "empty_query", "empty_positive", "absolute_path", "parent_path", "zip_member_escapes",
    "missing_image", "undecodable_image", "corrupt_zip_member", "unreadable_zip",
)
# A parallel executor: runs fn(item) for every item, yields the results in any order.
RunTasks = Callable[[Callable, list], Iterable]
IMAGE_FIELDS = (("qry", "qry_image_path"), ("pos", "pos_image_path"), ("neg", "neg_image_path"))


class RowRejected(Exception):
    def __init__(self, reason: str, field: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail


def sample_key(subset: str, row: int) -> str:
    # WebDataset splits member names at the first dot: keys must have none.
    return f"{subset.replace('.', '_')}-{row:08d}"


def key_subset(key: str) -> str:
    """The subset part of a `sample_key` (dots as `_`): what `data.batching=same_subset` groups by."""
    subset, _, row = key.rpartition("-")
    if not subset or len(row) != 8 or not row.isdigit():
        raise ValueError(f"sample key {key!r} is not <subset>-<row:08d> (the converter's keys): its subset is "
                         "unknown; data.batching=same_subset needs shards written by `sde-ray data convert-mmeb`")
    return subset


def target_hash(text: str, image: bytes | None) -> str:
    """Content id of a target: identical (text, image bytes) pairs share it."""
    digest = hashlib.sha1(text.encode("utf-8"))
    digest.update(b"\0")
    digest.update(image or b"")
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    return sha256_of(str(path))


def check_image(data: bytes) -> None:
    """Decodes the whole image (JPEG at reduced DCT scale, cheap) so truncated files are caught."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning on huge document scans
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()


# ---------------------------------------------------------------------------------------------
# Reading MMEB-train


def subset_parquet_files(src: Path, subset: str, split: str) -> list[Path]:
    return sorted((src / subset).glob(f"{split}-*.parquet"))


def read_subset_rows(src: Path, subset: str, split: str) -> dict[str, list[str]]:
    """All rows of one subset/split as column lists (files concatenated in name order)."""
    columns: dict[str, list[str]] = {}
    for path in subset_parquet_files(src, subset, split):
        names = pq.ParquetFile(path).schema_arrow.names
        missing = [c for c in TRAIN_COLUMNS if c not in names]
        if missing:
            raise ValueError(f"{path}: missing MMEB-train column(s) {missing}; found {names}")
        wanted = list(TRAIN_COLUMNS) + [c for c in TRAIN_NEG_COLUMNS if c in names]
        table = pq.read_table(path, columns=wanted)
        count = table.num_rows
        for name in list(TRAIN_COLUMNS) + list(TRAIN_NEG_COLUMNS):
            values = table.column(name).to_pylist() if name in wanted else [None] * count
            columns.setdefault(name, []).extend(values)
    return columns


def count_rows(src: Path, subset: str, split: str) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in subset_parquet_files(src, subset, split))


def plan_shards(counts: dict[str, int], samples_per_shard: int) -> list[list[tuple[str, int]]]:
    """(subset, source_row) lists per shard: all rows interleaved by a fixed permutation."""
    refs = [(subset, row) for subset in sorted(counts) for row in range(counts[subset])]
    order = np.random.default_rng(PLAN_SEED).permutation(len(refs))
    mixed = [refs[i] for i in order]
    return [mixed[i:i + samples_per_shard] for i in range(0, len(mixed), samples_per_shard)]


# ---------------------------------------------------------------------------------------------
# One shard (runs in a worker process)


@dataclass(frozen=True)
class ShardTask:
    src: str
    out: str
    split: str
    name: str
    refs: tuple[tuple[str, int], ...]
    meta_tasks: tuple[tuple[str, str], ...]
    plan_hash: str


_ROWS: dict[tuple[str, str, str], dict[str, list[str]]] = {}
_IMAGES: dict[tuple[str, str], ImageSource] = {}


def _rows(src: str, subset: str, split: str) -> dict[str, list[str]]:
    key = (src, subset, split)
    if key not in _ROWS:
        _ROWS[key] = read_subset_rows(Path(src), subset, split)
    return _ROWS[key]


def _image_source(src: str, subset: str) -> ImageSource:
    if (src, subset) not in _IMAGES:
        _IMAGES[(src, subset)] = train_image_source(src, subset)
    return _IMAGES[(src, subset)]


def _clear_worker_caches() -> None:
    for source in _IMAGES.values():
        source.close()
    _IMAGES.clear()
    _ROWS.clear()


def _load_image(source: ImageSource, path: str, field: str) -> bytes:
    try:
        data = source.read(path)
    except (UnsafePathError, ArchiveError) as exc:
        raise RowRejected(exc.reason, field, str(exc)) from None
    except FileNotFoundError as exc:
        raise RowRejected("missing_image", field, str(exc)) from None
    try:
        check_image(data)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
        # PIL messages may embed object addresses; keep rejects.jsonl reproducible.
        message = re.sub(r" at 0x[0-9a-f]+", "", str(exc))
        raise RowRejected("undecodable_image", field, f"{path!r}: {type(exc).__name__}: {message}") from None
    return data


def build_sample(src: str, split: str, subset: str, row: int, meta_task: str) -> dict:
    """The WebDataset sample of one row, or RowRejected."""
    rows = _rows(src, subset, split)
    if row >= len(rows["qry"]):
        raise ValueError(f"{subset} row {row} does not exist ({len(rows['qry'])} rows): source changed mid-run?")
    value = {name: (rows[name][row] or "") for name in rows}
    if not value["qry"].strip() and not value["qry_image_path"]:
        raise RowRejected("empty_query", "qry", "query has neither text nor image")
    if not value["pos_text"].strip() and not value["pos_image_path"]:
        raise RowRejected("empty_positive", "pos_text", "positive has neither text nor image")
    source = _image_source(src, subset)
    images = {}
    for prefix, field in IMAGE_FIELDS:
        if value[field]:
            images[prefix] = _load_image(source, value[field], field)
    meta = {
        "subset": subset, "source_row": row, "meta_task": meta_task, "split": split,
        "qry_text": value["qry"], "pos_text": value["pos_text"], "neg_text": value["neg_text"],
        "target_hash": target_hash(value["pos_text"], images.get("pos")),
    }
    sample = {"__key__": sample_key(subset, row), "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
    for prefix, data in images.items():
        sample[f"{prefix}.img"] = data
    return sample


def write_sample(archive: tarfile.TarFile, sample: dict) -> None:
    """Appends one sample as webdataset's TarWriter lays it out (USTAR, `<key>.<suffix>` members
    adjacent and sorted, fixed mtime so that the same rows give byte-identical shards). Written with
    the standard library because importing webdataset pulls in torch (seconds per worker process)."""
    key = sample["__key__"]
    for suffix in sorted(k for k in sample if k != "__key__"):
        data = sample[suffix]
        info = tarfile.TarInfo(f"{key}.{suffix}")
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uname = info.gname = "bigdata"
        archive.addfile(info, io.BytesIO(data))


def convert_shard(task: ShardTask) -> dict:
    out = Path(task.out)
    meta_tasks = dict(task.meta_tasks)
    final = out / task.name
    temporary = out / f"{task.name}.tmp-{os.getpid()}"
    rejects, subset_counts = [], {}
    with open(temporary, "wb") as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            for subset, row in task.refs:
                try:
                    sample = build_sample(task.src, task.split, subset, row, meta_tasks.get(subset, "unknown"))
                except RowRejected as exc:
                    rejects.append({"subset": subset, "source_row": row, "reason": exc.reason,
                                    "field": exc.field, "detail": exc.detail, "shard": task.name})
                    continue
                write_sample(archive, sample)
                subset_counts[subset] = subset_counts.get(subset, 0) + 1
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    record = {"name": task.name, "num_samples": sum(subset_counts.values()), "sha256": sha256_file(final),
              "bytes": final.stat().st_size, "subsets": subset_counts, "rejects": rejects,
              "plan_hash": task.plan_hash}
    part = out / PARTS_DIR / f"{task.name}.json"
    part_tmp = part.with_suffix(f".json.tmp-{os.getpid()}")
    part_tmp.write_text(json.dumps(record))
    os.replace(part_tmp, part)
    return record


def convert_shard_group(tasks: Sequence[ShardTask]) -> list[dict]:
    """Converts a group of shards one after another in this process (one task of a conversion run
    as Ray tasks), then lets go of the parquet rows and image archives it opened: a task reads each
    subset's rows once for its whole group, and its process keeps nothing afterwards."""
    try:
        return [convert_shard(task) for task in tasks]
    finally:
        _clear_worker_caches()


def shard_groups(tasks: Sequence[ShardTask], groups: int) -> list[list[ShardTask]]:
    """`tasks` cut into at most `groups` consecutive runs whose lengths differ by at most one."""
    groups = max(1, min(groups, len(tasks)))
    size, extra = divmod(len(tasks), groups)
    bounds = np.cumsum([0] + [size + (i < extra) for i in range(groups)])
    return [list(tasks[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


# Groups per worker when converting as tasks: enough that a slow group (image-heavy rows) does not
# leave the other CPUs idle at the end, few enough that each subset's parquet is read only a few
# times per worker (every shard mixes all subsets, so every group reads every subset's rows).
GROUPS_PER_WORKER = 2


def _finished(out: Path, name: str, plan_hash: str) -> dict | None:
    """The recorded result of a shard if its file is complete and unchanged, else None."""
    part, shard = out / PARTS_DIR / f"{name}.json", out / name
    if not (part.exists() and shard.exists()):
        return None
    try:
        record = json.loads(part.read_text())
    except ValueError:
        return None
    if record.get("plan_hash") != plan_hash or record.get("bytes") != shard.stat().st_size:
        return None
    return record if sha256_file(shard) == record.get("sha256") else None


# ---------------------------------------------------------------------------------------------
# The whole conversion


def convert_mmeb(src: str | os.PathLike, out: str | os.PathLike, subsets: list[str] | None = None,
                 split: str = "original", samples_per_shard: int = 1024, workers: int = 1,
                 progress: bool | None = None, run_tasks: RunTasks | None = None) -> dict:
    """Converts an MMEB-train root to WebDataset shards under `out`; returns the manifest.

    `workers` > 1: that many processes of this machine. `run_tasks(fn, items)`: an executor that
    runs `fn(item)` for every item in parallel and yields the results in any order (Ray tasks across
    a cluster's CPUs, `sde_ray.ray_cluster.ray_tasks`): the shards are cut into `workers` x
    `GROUPS_PER_WORKER` groups, one task each; `src` and `out` must then be paths every node reads
    and writes. Every path writes the same bytes (each shard is a pure function of its rows)."""
    src, out = Path(src).expanduser().resolve(), Path(out).expanduser().resolve()
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if out == src or src.is_relative_to(out):
        raise ValueError(f"--out {out} must not be the MMEB source {src} or contain it")
    available = list_train_subsets(src, split)
    if subsets:
        missing = sorted(set(subsets) - set(available))
        if missing:
            raise ValueError(f"subset(s) {missing} have no '{split}-*.parquet' under {src}; found {available}")
        chosen = sorted(set(subsets))
    else:
        chosen = available
    if not chosen:
        raise ValueError(f"no MMEB-train subset with a '{split}-*.parquet' file under {src}")

    catalog = load_dataset_catalog(src)
    meta_tasks = {s: meta_task_of_subset(s, catalog) for s in chosen}
    counts = {s: count_rows(src, s, split) for s in chosen}
    plan = plan_shards(counts, samples_per_shard)
    names = [SHARD_PATTERN.format(i) for i in range(len(plan))]
    plan_hash = hashlib.sha256(json.dumps(
        {"v": SCHEMA_VERSION, "split": split, "counts": counts, "per_shard": samples_per_shard,
         "seed": PLAN_SEED, "src": str(src)}, sort_keys=True).encode()).hexdigest()

    out.mkdir(parents=True, exist_ok=True)
    (out / PARTS_DIR).mkdir(exist_ok=True)
    for stale in list(out.glob("shard-*.tar.tmp-*")) + list((out / PARTS_DIR).glob("*.tmp-*")):
        stale.unlink()  # an interrupted run's half-written files
    for stale in out.glob("shard-*.tar"):
        if stale.name not in names:
            stale.unlink()
            (out / PARTS_DIR / f"{stale.name}.json").unlink(missing_ok=True)

    records: dict[str, dict] = {}
    tasks = []
    for name, refs in zip(names, plan):
        done = _finished(out, name, plan_hash)
        if done is not None:
            records[name] = done
        else:
            tasks.append(ShardTask(str(src), str(out), split, name, tuple(refs),
                                   tuple(sorted(meta_tasks.items())), plan_hash))
    bar = tqdm(total=len(names), initial=len(records), unit="shard", desc="convert-mmeb",
               disable=(None if progress is None else not progress))
    if run_tasks is not None and tasks:
        for group in run_tasks(convert_shard_group, shard_groups(tasks, workers * GROUPS_PER_WORKER)):
            records.update((record["name"], record) for record in group)
            bar.update(len(group))
    elif workers == 1 or len(tasks) <= 1:
        try:
            for task in tasks:
                records[task.name] = convert_shard(task)
                bar.update()
        finally:
            _clear_worker_caches()
    else:
        # spawn: the workers start clean instead of inheriting the parent's arrow thread pools.
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            for record in pool.map(convert_shard, tasks, chunksize=1):
                records[record["name"]] = record
                bar.update()
    bar.close()
    _check_written(out, names, records)
    return _write_outputs(out, src, split, samples_per_shard, plan_hash, names, records, counts, meta_tasks)


def _check_written(out: Path, names: list[str], records: dict[str, dict]) -> None:
    """Every shard is in `out` at the size its writer recorded (a stat each): a task that ran on a
    node without `out` on a shared file system wrote its shards where this process cannot see them."""
    absent = [name for name in names
              if not (out / name).is_file() or (out / name).stat().st_size != records[name]["bytes"]]
    if absent:
        raise RuntimeError(f"{len(absent)} converted shard(s) are not in {out} as their writers recorded "
                           f"({', '.join(absent[:3])}{', ...' if len(absent) > 3 else ''}): conversion tasks on "
                           "other nodes wrote elsewhere; convert into a folder every node shares "
                           "(--out / data.cache_dir)")


def _write_outputs(out: Path, src: Path, split: str, samples_per_shard: int, plan_hash: str,
                   names: list[str], records: dict[str, dict], counts: dict[str, int],
                   meta_tasks: dict[str, str]) -> dict:
    rejects = [reject for name in names for reject in records[name]["rejects"]]
    by_reason = {reason: 0 for reason in REJECT_REASONS}
    subsets = {s: {"rows": counts[s], "samples": 0, "rejected": 0, "meta_task": meta_tasks[s]} for s in counts}
    for reject in rejects:
        by_reason[reject["reason"]] = by_reason.get(reject["reason"], 0) + 1
        subsets[reject["subset"]]["rejected"] += 1
    for name in names:
        for subset, n in records[name]["subsets"].items():
            subsets[subset]["samples"] += n
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "format": FORMAT,
        "source": str(src),
        "split": split,
        "samples_per_shard": samples_per_shard,
        "plan_hash": plan_hash,
        "num_shards": len(names),
        "num_samples": sum(records[n]["num_samples"] for n in names),
        "rejected": len(rejects),
        "rejected_by_reason": by_reason,
        "subsets": subsets,
        "shards": [{k: records[n][k] for k in ("name", "num_samples", "sha256", "bytes")} for n in names],
    }
    _atomic_write(out / REJECTS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    _atomic_write(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def _atomic_write(path: Path, text: str) -> None:
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


def load_manifest(shard_dir: str | os.PathLike) -> dict:
    """The manifest.json of a converted shard folder, checked for our format and schema version."""
    path = storage.join(str(shard_dir), MANIFEST)  # a folder or an object-store prefix
    try:
        manifest = json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"no {MANIFEST} in {shard_dir}: convert with `sde-ray data convert-mmeb`") from None
    if manifest.get("format") != FORMAT or manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: format {manifest.get('format')!r} v{manifest.get('schema_version')} "
                         f"is not {FORMAT!r} v{SCHEMA_VERSION}")
    return manifest
