"""The Ray Data pipeline: WebDataset shards -> CPU read+preprocess tasks -> per-worker torch batches.

Driver side:
- `prepare_data(config)`: generates/converts into the cache on first use and returns absolute
  shard paths, the eval root and the manifest (Ray Train chdirs workers, so paths are absolute).
- `check_shards(shards, manifest)`: expands globs/folders and drops corrupt or truncated shards
  (tar headers past the end of the file, sizes or sample counts that disagree with the manifest,
  optionally sha256), reporting each skipped shard with its reason. Nothing is fatal but an empty
  result.
- `build_train_dataset(...)`: `read_webdataset(decoder=None)` (raw bytes) with a seeded file-order
  shuffle that changes every epoch (execution), then `map_batches` that turns rows into the *raw
  batch* of docs/architecture.md and calls the model's batch processor; Ray fuses the two into one
  CPU task per shard (never on the training workers).
- `data_resources(...)`: the CPU reservation rule for the data stage (the train driver's
  `check_capacity` enforces it against the cluster before any worker starts).

Worker side:
- `iter_worker_batches(data_iterator, batch_size, seed=, epoch=, rank=)`: equal-sized torch batches
  gathered straight from Ray's blocks, shuffled across a buffer of whole batches with a generator
  seeded by (seed, epoch, rank). Since Ray Train's `streaming_split(n, equal=True)` gives
  each worker the same number of rows, every worker gets exactly `batches_per_epoch(...)` batches.

This module imports `ray.data` only (never `ray.train`).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# convert/synthetic (pyarrow.parquet, PIL drawing, tqdm) are imported where used: the preprocessing
# tasks unpickle this module, and every import here slows each fresh worker process.
MANIFEST = "manifest.json"

logger = logging.getLogger(__name__)

RAW_TEXT_COLUMNS = ("qry_text", "pos_text", "target_hash", "subset", "key")
RAW_IMAGE_COLUMNS = ("qry_image", "pos_image")

# ---------------------------------------------------------------------------------------------
# Shards: expansion and validation on the driver


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def expand_shards(shards: list[str] | str) -> list[str]:
    """Files from paths, folders (their *.tar) and globs; local paths made absolute; order kept."""
    items = [shards] if isinstance(shards, str) else list(shards)
    out: list[str] = []
    for item in items:
        item = str(item)
        if _is_remote(item):
            if any(ch in item for ch in "*?["):
                import fsspec

                _fs, _, matches = fsspec.get_fs_token_paths(item)
                protocol = item.split("://", 1)[0]
                out.extend(f"{protocol}://{m}" if "://" not in m else m for m in sorted(matches))
            else:
                out.append(item)
            continue
        local = os.path.abspath(os.path.expanduser(item.removeprefix("file://")))
        if os.path.isdir(local):
            out.extend(sorted(glob.glob(os.path.join(local, "*.tar"))))
        elif any(ch in local for ch in "*?["):
            out.extend(sorted(glob.glob(local)))
        else:
            out.append(local)
    if not out:
        raise FileNotFoundError(f"no WebDataset shards match {items}")
    return out


def tar_sample_count(path: str) -> int:
    """Samples in a local tar, reading headers only; raises ValueError for truncated or corrupt files."""
    size = os.path.getsize(path)
    keys = set()
    try:
        with tarfile.open(path, mode="r:") as archive:
            for member in archive:
                if member.offset_data + member.size > size:
                    raise ValueError(f"member {member.name!r} runs past the end of the file (truncated)")
                if member.isreg():
                    keys.add(member.name.split("/")[-1].split(".", 1)[0] if "." in member.name else member.name)
    except tarfile.TarError as exc:
        raise ValueError(f"not a readable tar: {exc}") from None
    return len(keys)


@dataclass
class ShardCheck:
    """Shards that passed the checks, those skipped (path -> reason), and sample counts if known."""

    paths: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)

    @property
    def num_samples(self) -> int | None:
        if any(p not in self.samples for p in self.paths):
            return None
        return sum(self.samples[p] for p in self.paths)


def check_shards(shards: list[str] | str, manifest: dict | None = None, verify_sha256: bool = False) -> ShardCheck:
    """Drops corrupt, truncated or manifest-mismatching local shards (remote ones are taken on trust).

    A shard is checked against the manifest entry with the same file name when one is given: byte
    size, sample count and (with `verify_sha256`) checksum. Empty shards are dropped silently, as
    they carry nothing. Raises only when no usable shard is left.
    """
    expected = {entry["name"]: entry for entry in (manifest or {}).get("shards", [])}
    check = ShardCheck(paths=[])
    for path in expand_shards(shards):
        entry = expected.get(os.path.basename(path))
        if _is_remote(path):
            check.paths.append(path)
            if entry:
                check.samples[path] = entry["num_samples"]
            continue
        try:
            if not os.path.isfile(path):
                raise ValueError("file not found")
            if entry and os.path.getsize(path) != entry["bytes"]:
                raise ValueError(f"size {os.path.getsize(path)} != manifest {entry['bytes']} bytes")
            count = tar_sample_count(path)
            if entry and count != entry["num_samples"]:
                raise ValueError(f"{count} samples != manifest {entry['num_samples']}")
            if entry and verify_sha256:
                from sde_ray.data.convert import sha256_file

                if sha256_file(path) != entry["sha256"]:
                    raise ValueError("sha256 differs from the manifest")
        except (OSError, ValueError) as exc:
            check.skipped[path] = str(exc)
            continue
        if count:
            check.paths.append(path)
            check.samples[path] = count
    if check.skipped:
        logger.warning("skipping %d corrupt shard(s): %s", len(check.skipped),
                       "; ".join(f"{p}: {r}" for p, r in check.skipped.items()))
    if not check.paths:
        raise RuntimeError(f"no usable WebDataset shard left out of {shards}; skipped: {check.skipped}")
    return check


# ---------------------------------------------------------------------------------------------
# Rows -> raw batch -> model batch (runs in the Ray Data CPU tasks)


def _bytes_or_none(value: Any) -> bytes | None:
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None


def raw_batch_from_rows(batch: dict[str, Any]) -> dict[str, list]:
    """A read_webdataset batch (raw bytes, columns json/qry.img/pos.img) -> the raw-batch contract."""
    metas = [json.loads(bytes(value)) for value in batch["json"]]
    n = len(metas)
    raw = {
        "qry_text": [m["qry_text"] for m in metas],
        "pos_text": [m["pos_text"] for m in metas],
        "qry_image": [_bytes_or_none(v) for v in batch["qry.img"]] if "qry.img" in batch else [None] * n,
        "pos_image": [_bytes_or_none(v) for v in batch["pos.img"]] if "pos.img" in batch else [None] * n,
        "target_hash": [m["target_hash"] for m in metas],
        "subset": [m["subset"] for m in metas],
        "key": [str(k) for k in batch["__key__"]] if "__key__" in batch else [""] * n,
    }
    raw.update(own_negatives(metas, batch.get("neg.img") if "neg.img" in batch else [None] * n))
    return raw


def own_negatives(metas: list[dict], images: list) -> dict[str, list[list]]:
    """The dataset's own negatives (MMEB-train's neg_text / neg_image_path, carried by the
    converter as json `neg_text` and member `neg.img`) as per-row lists of 0 or 1 negative.
    Their content ids are computed by the processor, and only when negatives are used."""
    texts, pixels = [], []
    for meta, image in zip(metas, images):
        text, image = meta.get("neg_text") or "", _bytes_or_none(image)
        present = bool(text.strip()) or image is not None
        texts.append([text] if present else [])
        pixels.append([image] if present else [])
    return {"neg_text": texts, "neg_image": pixels}


# Each Ray worker process keeps the processors it has built (keyed by their factory's pickled
# bytes): a tokenizer and image processor are built once per process and reused by every later
# task and epoch, which is what an actor pool would buy, without an actor start per epoch.
_PROCESSORS: "OrderedDict[str, Callable[[dict], dict]]" = OrderedDict()
_PROCESSORS_KEPT = 4


def processor_key(processor_factory: Callable[[], Callable[[dict], dict]]) -> str:
    """A stable name for a processor factory: the sha256 of its cloudpickled bytes."""
    from ray import cloudpickle

    return hashlib.sha256(cloudpickle.dumps(processor_factory)).hexdigest()


def cached_processor(key: str, processor_factory: Callable[[], Callable[[dict], dict]]) -> Callable[[dict], dict]:
    """This process's processor for `key`, built by `processor_factory()` on first use."""
    processor = _PROCESSORS.get(key)
    if processor is None:
        processor = _PROCESSORS[key] = processor_factory()
        while len(_PROCESSORS) > _PROCESSORS_KEPT:
            _PROCESSORS.popitem(last=False)
    _PROCESSORS.move_to_end(key)
    return processor


def preprocess_shard(frame, *, processor_factory: Callable[[], Callable[[dict], dict]], cache_key: str,
                     chunk_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """One shard's rows (a pandas DataFrame of raw bytes) -> model batches of at most `chunk_rows` rows.

    Runs fused with the shard read in one Ray Data task. Ray's WebDataset reader builds pandas
    blocks, so taking them as pandas costs no conversion. Yielding chunk by chunk keeps the memory
    of a task at one chunk of decoded pixels, whatever the shard size. A sample the processor
    rejects (an undecodable image, a malformed record) is dropped and logged with its key and
    shard, rather than failing the task and with it the run (`process_rows`).
    """
    processor = cached_processor(cache_key, processor_factory)
    columns = {name: frame[name].tolist() for name in frame.columns}
    shard = columns.get("__url__", ["?"])[0] if len(frame) else "?"
    for start in range(0, len(frame), chunk_rows):
        out = process_rows({name: values[start:start + chunk_rows] for name, values in columns.items()},
                           processor, shard)
        if out is not None:
            yield out


# What a processor raises for one bad sample: PIL's UnidentifiedImageError and truncation errors are
# OSErrors; our processors raise ValueError; a record without its json member gives a KeyError or
# TypeError in `raw_batch_from_rows`.
SAMPLE_ERRORS = (ValueError, OSError, KeyError, TypeError)


def process_rows(rows: dict[str, list], processor: Callable[[dict], dict], shard: str = "?") -> dict | None:
    """`processor(raw_batch_from_rows(rows))`; if that fails, the rows one by one, dropping (and
    logging) those that fail alone. None when no row is left."""
    try:
        return processor(raw_batch_from_rows(rows))
    except SAMPLE_ERRORS:
        pass  # rare: find the culprits row by row
    count = len(next(iter(rows.values())))
    outputs, skipped = [], []
    for i in range(count):
        row = {name: values[i:i + 1] for name, values in rows.items()}
        try:
            outputs.append(processor(raw_batch_from_rows(row)))
        except SAMPLE_ERRORS as exc:
            skipped.append(f"{row.get('__key__', ['?'])[0]} ({type(exc).__name__}: {exc})")
    logger.warning("skipped %d of %d samples of shard %s that the processor rejects: %s",
                   len(skipped), count, shard, "; ".join(skipped))
    if not outputs:
        return None
    # Processor outputs are arrays with the row on axis 0: the kept rows' outputs stack as they are.
    return {name: np.concatenate([out[name] for out in outputs]) for name in outputs[0]}


class SimpleProcessor:
    """A model-free batch processor (the data benchmark's and the tests' stand-in for the model's).

    Decodes each image to RGB `image_size`² uint8 pixels (zeros when absent; the model normalises,
    as with `sde_ray.models.BatchProcessor`) and hashes text into `max_len` int64 token ids, so its
    cost resembles a real processor's decode + tokenize. Also emits `key_id` (a stable int64 per
    sample key) so tests can count samples.
    """

    def __init__(self, image_size: int = 32, max_len: int = 16, vocab: int = 4096) -> None:
        self.image_size, self.max_len, self.vocab = image_size, max_len, vocab

    def _pixels(self, images: list) -> tuple[np.ndarray, np.ndarray]:
        import io

        from PIL import Image

        out = np.zeros((len(images), 3, self.image_size, self.image_size), dtype=np.uint8)
        present = np.zeros(len(images), dtype=bool)
        for i, data in enumerate(images):
            if data is None:
                continue
            with Image.open(io.BytesIO(data)) as image:
                rgb = image.convert("RGB").resize((self.image_size, self.image_size), Image.BILINEAR)
            out[i] = np.asarray(rgb).transpose(2, 0, 1)
            present[i] = True
        return out, present

    def _tokens(self, texts: list[str]) -> np.ndarray:
        ids = np.zeros((len(texts), self.max_len), dtype=np.int64)
        for i, text in enumerate(texts):
            words = text.split()[: self.max_len]
            ids[i, : len(words)] = [1 + int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest(), "little")
                                    % (self.vocab - 1) for w in words]
        return ids

    def __call__(self, raw: dict[str, list]) -> dict[str, np.ndarray]:
        out = {}
        for side in ("qry", "pos"):
            out[f"{side}_input_ids"] = self._tokens(raw[f"{side}_text"])
            out[f"{side}_attention_mask"] = (out[f"{side}_input_ids"] > 0).astype(np.int64)
            out[f"{side}_pixel_values"], out[f"{side}_has_image"] = self._pixels(raw[f"{side}_image"])
        out["target_id"] = np.array([stable_id(h) for h in raw["target_hash"]], dtype=np.int64)
        out["key_id"] = np.array([stable_id(k) for k in raw["key"]], dtype=np.int64)
        return out


def stable_id(text: str) -> int:
    """A non-negative int64 from a string, the same in every process (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


# ---------------------------------------------------------------------------------------------
# CPU reservation for the data stage


@dataclass(frozen=True)
class DataResources:
    """How the data stage's CPUs are spent: `concurrency` read+preprocess tasks of `task_cpus` each."""

    task_cpus: float
    concurrency: int

    @property
    def total(self) -> float:
        return self.task_cpus * self.concurrency


def data_resources(data_cpus: float, preprocess_concurrency: int) -> DataResources:
    """Splits `data_cpus` evenly over `preprocess_concurrency` concurrent read+preprocess tasks.

    The trap (DESIGN.md): Ray Data's read tasks ask for 1 CPU by default, and once the training
    workers hold the rest of the cluster a read that cannot be scheduled stalls forever. Sizing the
    tasks to fit inside `data_cpus` (which the train driver keeps out of the training workers' share)
    means the whole stage always fits. The concurrency is capped too: fractional tasks without a
    cap start many cold worker processes at once (measured here: 7x slower on 2 cores).
    """
    if data_cpus <= 0:
        raise ValueError(f"data.data_cpus must be > 0 for a Ray Data pipeline, got {data_cpus}")
    if preprocess_concurrency < 1:
        raise ValueError(f"data.preprocess_concurrency must be >= 1, got {preprocess_concurrency}")
    return DataResources(task_cpus=data_cpus / preprocess_concurrency, concurrency=preprocess_concurrency)


# ---------------------------------------------------------------------------------------------
# The dataset


def epoch_seed(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:4], "little")


def build_config_dataset(config, prepared: PreparedData, processor_factory: Callable[[], Callable[[dict], dict]],
                         *, epoch: int = 0):
    """`build_train_dataset` with every knob taken from `config.data` (what the train driver calls)."""
    data = config.data
    resources = data_resources(data.data_cpus, data.preprocess_concurrency)
    return build_train_dataset(
        prepared.shards, processor_factory, seed=data.shuffle_seed, epoch=epoch,
        concurrency=resources.concurrency, num_cpus_per_task=resources.task_cpus,
        preprocess_batch_size=data.preprocess_batch_size, target_block_mb=data.target_block_mb,
        check=prepared.check)


def build_train_dataset(shards: list[str] | str, processor_factory: Callable[[], Callable[[dict], dict]], *,
                        seed: int, epoch: int = 0, concurrency: int = 1, num_cpus_per_task: float | None = None,
                        preprocess_batch_size: int = 64, target_block_mb: float = 32.0,
                        manifest: dict | None = None, check: ShardCheck | None = None,
                        preserve_order: bool = True):
    """The training Dataset: shuffled shard order -> raw rows -> `processor_factory()`, in CPU tasks.

    One Ray Data task per shard reads it and runs the processor on it, `preprocess_batch_size` rows
    at a time (Ray fuses the read and the `map_batches` into one operator: the shard's raw bytes
    never go through the object store, and no actor has to start each epoch; the processor is
    cached per worker process, see `cached_processor`). At most `concurrency` tasks run at once,
    each holding `num_cpus_per_task` CPUs (default: one CPU shared by them all). Output blocks
    aim at `target_block_mb`: Ray's 128 MB default made each task glue several processor chunks
    into one block, a copy of every pixel (0.61-0.71 -> 0.76-0.84x the floor per CPU at 224 px).

    The shard order is a seeded permutation that Ray re-draws at every execution (each epoch's
    `iter_*` call) from (seed, epoch): `FileShuffleConfig(seed=epoch_seed(seed, epoch),
    reseed_after_execution=True)`. `preserve_order` keeps the stream in that order (reproducible).
    Corrupt shards are dropped by `check_shards` first (pass `check` to reuse one).
    """
    import ray.data
    from ray.data import FileShuffleConfig

    if check is None:
        check = check_shards(shards, manifest)
    if preprocess_batch_size < 1:
        raise ValueError(f"data.preprocess_batch_size must be >= 1, got {preprocess_batch_size}")
    if num_cpus_per_task is None:
        num_cpus_per_task = data_resources(1.0, concurrency).task_cpus
    # Same CPUs and the same concurrency on both operators, and no batch size on the map: the
    # conditions under which Ray fuses Read -> MapBatches into one task.
    dataset = ray.data.read_webdataset(
        check.paths,
        decoder=None,  # raw bytes: decoding belongs to the processor
        shuffle=FileShuffleConfig(seed=epoch_seed(seed, epoch), reseed_after_execution=True),
        override_num_blocks=len(check.paths),
        num_cpus=num_cpus_per_task,
        concurrency=concurrency,
    )
    dataset = dataset.map_batches(
        preprocess_shard,
        fn_kwargs={"processor_factory": processor_factory, "cache_key": processor_key(processor_factory),
                   "chunk_rows": preprocess_batch_size},
        batch_size=None,
        batch_format="pandas",
        zero_copy_batch=True,
        num_cpus=num_cpus_per_task,
        compute=ray.data.TaskPoolStrategy(size=concurrency),
    )
    dataset.context.execution_options.preserve_order = preserve_order
    dataset.context.target_max_block_size = int(target_block_mb * 2**20)
    return dataset


def batches_per_epoch(num_samples: int, num_workers: int, batch_size: int) -> int:
    """Batches every worker gets per epoch: streaming_split(equal=True) then drop_last batching."""
    if num_workers < 1 or batch_size < 1:
        raise ValueError(f"num_workers and batch_size must be >= 1, got {num_workers}, {batch_size}")
    return (num_samples // num_workers) // batch_size


def iter_worker_batches(data_iterator, batch_size: int, *, seed: int = 0, epoch: int = 0, rank: int = 0,
                        shuffle_buffer: int = 256, device=None, prefetch_batches: int = 1,
                        merge_chunk_bytes: int | None = None) -> Iterator[dict]:
    """Equal-sized torch batches for one training worker, reshuffled every epoch.

    The stream is cut into chunks of one shuffle buffer (`shuffle_buffer` rows rounded down to
    whole batches, at least one batch; `config.data.shuffle_buffer`); each chunk is permuted with a
    generator seeded by (seed, epoch, rank) and cut into full batches. Every chunk but the last
    holds whole batches, and the rows of the last that fill no batch are dropped, so a worker gets
    exactly `rows // batch_size` batches, the same on every worker. (Ray's own local shuffle buffer
    can emit short batches mid-stream, which would desynchronise the workers' collectives.)

    Rows are taken from Ray's blocks without re-batching: each Arrow record batch becomes a
    zero-copy torch piece, and a batch's rows are gathered from the pieces straight into the
    batch (`gather_rows`), the only copy on this side. Ray's `iter_torch_batches` would first
    combine a chunk's record batches into one array, a second copy of every pixel (a third of the
    pipeline's overhead at 224 px, `sde-ray bench data`). A chunk smaller than
    `merge_chunk_bytes` (default `MERGE_CHUNK_BYTES`) is concatenated first instead. Batches stay
    on the CPU unless `device` is given (the training loop moves them to its engine's device).
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunk_rows = max(1, shuffle_buffer // batch_size) * batch_size
    merge_chunk_bytes = MERGE_CHUNK_BYTES if merge_chunk_bytes is None else merge_chunk_bytes
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch * 1_000_003 + rank))
    blocks = data_iterator.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=prefetch_batches)
    for chunk in stream_chunks((piece for block in blocks for piece in torch_pieces(block)), chunk_rows):
        if len(chunk) > 1 and sum(value.nbytes for piece in chunk for value in piece.values()) < merge_chunk_bytes:
            chunk = [{name: torch.cat([piece[name] for piece in chunk]) for name in chunk[0]}]
        rows = sum(piece_rows(piece) for piece in chunk)
        order = torch.randperm(rows, generator=generator)
        for start in range(0, rows - batch_size + 1, batch_size):
            batch = gather_rows(chunk, order[start:start + batch_size])
            yield batch if device is None else {name: value.to(device) for name, value in batch.items()}


# Below this many bytes a chunk's pieces are concatenated before cutting: one small copy costs less
# than gathering every batch from many small pieces (per-op overhead). Measured on the consumer
# alone per epoch: 32 px chunks (1.6 MB in ~5 pieces), 0.12 CPU-s gathering vs 0.08 merged; 224 px
# chunks (77 MB), 0.09 gathering vs 0.28 with Ray's combine.
MERGE_CHUNK_BYTES = 8 * 2**20


def torch_pieces(table) -> list[dict]:
    """A pyarrow Table -> one dict of torch tensors per record batch, sharing the Arrow memory.

    The tensors are read-only views of the object store (never written: `gather_rows` copies out).
    """
    import warnings

    import pyarrow as pa
    import torch
    from ray.data.block import BlockAccessor

    pieces = []
    for record_batch in table.to_batches():
        if not record_batch.num_rows:
            continue
        arrays = BlockAccessor.for_block(pa.Table.from_batches([record_batch])).to_batch_format("numpy")
        with warnings.catch_warnings():  # torch warns that the object store's arrays are read-only
            warnings.simplefilter("ignore")
            pieces.append({name: torch.as_tensor(value) for name, value in arrays.items()})
    return pieces


def piece_rows(piece: dict) -> int:
    return len(next(iter(piece.values())))


def stream_chunks(pieces: Iterator[dict], chunk_rows: int) -> Iterator[list[dict]]:
    """Consecutive runs of exactly `chunk_rows` rows of the stream (the last may be shorter), each
    a list of pieces and views of pieces: nothing is copied."""
    held, held_rows = [], 0
    for piece in pieces:
        offset, rows = 0, piece_rows(piece)
        while offset < rows:
            take = min(rows - offset, chunk_rows - held_rows)
            held.append(piece if take == rows else {name: value[offset:offset + take] for name, value in piece.items()})
            offset, held_rows = offset + take, held_rows + take
            if held_rows == chunk_rows:
                yield held
                held, held_rows = [], 0
    if held:
        yield held


def gather_rows(pieces: list[dict], index) -> dict:
    """The rows `index` of the pieces' concatenation as one batch, in stream order.

    Sorting the index makes each piece's rows a contiguous slice of the batch, which
    `index_select(out=)` fills directly. So the pieces are never concatenated, and each row is
    copied once. Which rows share a batch is what the shuffle decides. The order inside a batch
    carries no information: every objective here treats a batch as a set of pairs.
    """
    import torch

    index = index.sort().values
    out = {name: value.new_empty((len(index), *value.shape[1:])) for name, value in pieces[0].items()}
    begin, piece_start = 0, 0
    for piece in pieces:
        piece_end = piece_start + piece_rows(piece)
        end = int(torch.searchsorted(index, piece_end))
        if end > begin:
            local = index[begin:end] - piece_start
            for name, value in piece.items():
                # index_select copies whole rows; advanced indexing (value[index]) goes element by
                # element and was 20x slower on uint8 images (bench data, 224 px).
                torch.index_select(value, 0, local, out=out[name][begin:end])
        begin, piece_start = end, piece_end
    return out


# ---------------------------------------------------------------------------------------------
# From config to shards on disk


@dataclass
class PreparedData:
    """Absolute shard paths, the eval root, the manifest, and shards skipped as corrupt."""

    shards: list[str]
    eval_dir: str
    manifest: dict
    skipped_shards: dict[str, str] = field(default_factory=dict)
    check: ShardCheck | None = None

    @property
    def num_samples(self) -> int:
        """Samples in the usable shards (corrupt ones excluded)."""
        if self.check is not None and self.check.num_samples is not None:
            return self.check.num_samples
        return self.manifest.get("num_samples", 0)


def synthetic_cache_key(synth) -> str:
    from sde_ray.data.synthetic import SYNTH_VERSION

    settings = {"v": SYNTH_VERSION, "seed": synth.seed, "train": synth.train_per_subset,
                "eval": synth.eval_per_dataset, "k": synth.num_candidates,
                "noise": synth.noisy_correspondence, "size": synth.image_size}
    return "synth-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _ensure_synthetic(cache: Path, synth) -> Path:
    """Generates the synthetic MMEB once (atomically: a temp folder renamed into place)."""
    from sde_ray.data.synthetic import write_synthetic_mmeb

    target = cache / synthetic_cache_key(synth)
    if (target / "synthetic.json").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache))
    try:
        write_synthetic_mmeb(staging, seed=synth.seed, train_per_subset=synth.train_per_subset,
                             eval_per_dataset=synth.eval_per_dataset,
                             noisy_correspondence=synth.noisy_correspondence,
                             num_candidates=synth.num_candidates, image_size=synth.image_size)
        # synthetic.json records absolute paths: rewrite them for the final location.
        summary = json.loads((staging / "synthetic.json").read_text())
        summary.update(train_dir=str(target / "MMEB-train"), eval_dir=str(target / "MMEB-eval"))
        (staging / "synthetic.json").write_text(json.dumps(summary, indent=1) + "\n")
        try:
            os.rename(staging, target)
        except OSError:  # another process finished first
            if not (target / "synthetic.json").exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def _converted(train_dir: Path, shard_dir: Path, config) -> dict:
    """Converts once; a complete manifest for the same source and settings is reused as is."""
    from sde_ray.data.convert import convert_mmeb, load_manifest

    manifest_path = shard_dir / MANIFEST
    if manifest_path.exists():
        manifest = load_manifest(shard_dir)
        if (manifest.get("source") == str(train_dir) and manifest.get("split") == config.data.split
                and manifest.get("samples_per_shard") == config.data.samples_per_shard
                and sorted(manifest["subsets"]) == sorted(config.data.subsets or manifest["subsets"])):
            return manifest
    return convert_mmeb(train_dir, shard_dir, subsets=config.data.subsets or None, split=config.data.split,
                        samples_per_shard=config.data.samples_per_shard, workers=1, progress=False)


@contextlib.contextmanager
def _locked_cache(config) -> Iterator[Path]:
    """The cache folder, held under an exclusive file lock (concurrent Tune trials fill it once)."""
    import fcntl

    cache = Path(config.data.cache_dir).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield cache


def prepare_data(config) -> PreparedData:
    """Shards and eval root for `config.data`: generate/convert into the cache on first use.

    Safe to call from concurrent processes (e.g. Tune trials): the cache is locked while it is
    filled, and later callers reuse what the first one wrote.
    """
    with _locked_cache(config) as cache:
        return _prepare_locked(config, cache)


def synthetic_eval_dir(config) -> str:
    """The synthetic MMEB-eval root for `config.data.synth`, generated on first use (no shards are
    converted: evaluation needs only the eval split)."""
    with _locked_cache(config) as cache:
        return str(_ensure_synthetic(cache, config.data.synth) / "MMEB-eval")


def _prepare_locked(config, cache: Path) -> PreparedData:
    data = config.data
    if data.source == "synthetic":
        root = _ensure_synthetic(cache, data.synth)
        train_dir, eval_dir = root / "MMEB-train", root / "MMEB-eval"
        shard_dir = root / f"shards-{data.split}-{data.samples_per_shard}"
        manifest = _converted(train_dir, shard_dir, config)
        shards = [str(shard_dir / entry["name"]) for entry in manifest["shards"]]
    elif data.shards:
        shards = expand_shards(data.shards)
        first = shards[0]
        manifest_dir = os.path.dirname(first)
        from sde_ray.data.convert import load_manifest

        manifest = load_manifest(manifest_dir) if not _is_remote(first) and \
            os.path.exists(os.path.join(manifest_dir, MANIFEST)) else {}
        eval_dir = Path(data.mmeb_eval_dir).expanduser().resolve() if data.mmeb_eval_dir else None
    else:
        train_dir = Path(data.mmeb_train_dir).expanduser().resolve()
        key = hashlib.sha256(str(train_dir).encode()).hexdigest()[:12]
        shard_dir = cache / f"mmeb-{key}-{data.split}-{data.samples_per_shard}"
        manifest = _converted(train_dir, shard_dir, config)
        shards = [str(shard_dir / entry["name"]) for entry in manifest["shards"]]
        eval_dir = Path(data.mmeb_eval_dir).expanduser().resolve() if data.mmeb_eval_dir else None
    check = check_shards(shards, manifest)
    return PreparedData(shards=check.paths, eval_dir=str(eval_dir) if eval_dir else "",
                        manifest=manifest, skipped_shards=check.skipped, check=check)
