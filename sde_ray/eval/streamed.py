"""The evaluation fed like training: one Ray Data pipeline over every dataset's items, images decoded,
resized and tokenised in CPU tasks, uint8 arrays streamed to the encoding actors, which run only the
forward, in the training dtype.

    driver: every dataset's table (parquet only)  ──▶  Ray tasks: each dataset's image bytes read and
            hashed (sha256; not-found listed) — all datasets at once, on the cluster's CPUs
    driver: request keys from texts + digests; the embedding cache answers what it holds
    misses: from_items(chunks of `eval.batch_size` items, every dataset)
            → map_batches(prepare_chunk)   CPU tasks, `eval.decode_concurrency`: read, decode, resize,
                                           tokenise (`BatchProcessor.encode_inputs`, the training path)
            → map_batches(ForwardActor)    `eval.num_workers` actors, one GPU each when the cluster has
                                           GPUs: `ModelEncoder.encode_arrays` on the arrays only
            → the driver files each embedding under its dataset, side and item, and scores a dataset
              as soon as all its items are back, while the others still stream

So the next dataset's images are decoded while the current one encodes (one pipeline: no dataset
boundary stalls the actors), and no actor spends its time on a PIL call. An item's embedding is the
same as `ModelEncoder.encode` makes in process (same processor, same forward).

An image that cannot be decoded is found in the CPU task: its item is encoded without it (as the
in-process path sends it), its row of the embeddings is NaN (what the embedding cache keeps, so a
cache hit knows the image is unusable too), and every row that uses it is a miss.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from sde_ray import storage
from sde_ray.data.mmeb import DatasetInfo, ImageSource, eval_image_source
from sde_ray.eval.dataset import EvalTable, Item, load_table, read_image, undecodable
from sde_ray.eval.encode import PREFIXES, CachedEncoder, actor_precision, digests_key, image_digest
from sde_ray.eval.evaluation import Evaluation
from sde_ray.eval.metrics import DatasetScore
from sde_ray.eval.scoring import EncodedDataset, PreparedDataset, score_dataset, unscorable_reason

DECODE_TASK_MEMORY = 512 << 20  # bytes a CPU task asks for: a chunk of decoded images and their model inputs
# Ray Data hands out work once every actor is up (a model load from a bucket can take minutes), so the
# first actor ready does not take every batch before the others start.
ACTOR_START_S = 600
SIDES = tuple(PREFIXES)  # "query", "target": the side's index travels in the rows
NEUTRAL = "in"  # rows of both sides share one column per array: `in_input_ids`, `in_pixel_values`, ...


def _image_digests(source: ImageSource, paths: list[str]) -> tuple[list[bytes | None], dict[str, str]]:
    """Ray task: each image's sha256 (None where it cannot be read) and why the unreadable ones are missing."""
    digests, missing = [], {}
    for path in paths:
        data, reason = read_image(path, source)
        digests.append(image_digest(data))
        if reason is not None:
            missing[path] = reason
    return digests, missing


_PROCESSORS: dict = {}


def processor_of(model_dir: str):
    """The export's `BatchProcessor`, built once per CPU-task process (from a scratch copy of a
    bucket's export: the tokenizer and image processor are read when it is built)."""
    if model_dir not in _PROCESSORS:
        from sde_ray.models import BatchProcessor, export_config

        with storage.readable_dir(model_dir) as local:
            _PROCESSORS.clear()
            _PROCESSORS[model_dir] = BatchProcessor(export_config(local))
    return _PROCESSORS[model_dir]


def prepare_chunk(batch: dict, *, source: ImageSource, model_dir: str) -> dict:
    """Ray Data CPU stage: one chunk (a batch of one row: dataset, side, first item, texts, image
    paths) → one row per item: its model inputs under the `in_` prefix, where it goes, and why its
    image is unusable ('' when it is fine or there is none)."""
    from sde_ray.models.processing import decode_image

    (chunk,) = batch["chunk"]
    texts, paths, images, errors = list(chunk["texts"]), list(chunk["paths"]), [], []
    for path in paths:
        data, reason = read_image(path, source) if path else (None, None)
        decoded = None
        if data is not None:
            try:
                decoded = decode_image(data, path)
            except ValueError as exc:
                reason = undecodable(exc.__cause__ or exc)
        images.append(decoded)
        errors.append(reason or "")
    prefix = PREFIXES[SIDES[chunk["side"]]]
    arrays = processor_of(model_dir).encode_inputs(texts, images, prefix)
    rows = len(texts)
    out = {f"{NEUTRAL}_{key.removeprefix(prefix + '_')}": value for key, value in arrays.items()}
    out.update(dataset=np.full(rows, chunk["dataset"], dtype=np.int64), side=np.full(rows, chunk["side"], dtype=np.int64),
               index=np.arange(chunk["start"], chunk["start"] + rows, dtype=np.int64),
               error=np.array(errors, dtype=object), decoded_by=np.full(rows, os.getpid(), dtype=np.int64))
    return out


class Roster:
    """Ray actor (no CPU): every encoding actor signs in once its model is loaded, so the record lists
    each one started, whether or not Ray Data handed it a batch."""

    def __init__(self):
        self.members: list[dict] = []

    def sign_in(self, description: dict) -> None:
        self.members.append(description)

    def everyone(self) -> list[dict]:
        return self.members


class ForwardActor:
    """Ray Data actor: the exported model's forward on prepared arrays (one GPU when given), its
    weights in the training dtype. Each output batch carries its forward's seconds on its first row."""

    def __init__(self, model_dir: str, batch_size: int, use_gpu: bool, precision: str, roster):
        import socket
        import torch

        import ray

        from sde_ray.eval.encode import load_encoder

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        with storage.readable_dir(model_dir) as local:  # a bucket's export: this node's scratch copy
            self.encoder = load_encoder(local, batch_size, "cuda" if use_gpu else "cpu", precision, cast_weights=True)
        weights = next(self.encoder.model.parameters())
        ray.get(roster.sign_in.remote({
            "pid": os.getpid(), "host": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(),
            "device": str(self.encoder.device), "precision": self.encoder.precision,
            "weights_dtype": str(weights.dtype).removeprefix("torch."), "started_at": time.time()}))

    def __call__(self, batch: dict) -> dict:
        rows = len(batch["index"])
        embedding = np.zeros((rows, self.encoder.embed_dim), dtype=np.float32)
        before = self.encoder.forward_seconds
        for side_index in np.unique(batch["side"]):
            side = SIDES[int(side_index)]
            mine = np.flatnonzero(batch["side"] == side_index)
            arrays = {f"{PREFIXES[side]}_{key.removeprefix(NEUTRAL + '_')}": value[mine]
                      for key, value in batch.items() if key.startswith(NEUTRAL + "_")}
            embedding[mine] = self.encoder.encode_arrays(side, arrays)
        forward = np.zeros(rows, dtype=np.float64)
        forward[0] = self.encoder.forward_seconds - before
        return {"dataset": batch["dataset"], "side": batch["side"], "index": batch["index"], "error": batch["error"],
                "decoded_by": batch["decoded_by"], "embedding": embedding, "forward_s": forward}


@dataclasses.dataclass
class _Pending:
    """One dataset on its way: its table, missing images, and each side's embeddings as they arrive."""

    info: DatasetInfo
    table: EvalTable
    missing: dict[str, str]
    keys: list[str]  # the cache key of each side's request
    cached: list[bool]  # per side: the cache had it
    embeddings: list[np.ndarray | None]  # per side; None until its first row arrives
    arrived: list[np.ndarray]  # bool per side's item: its row is in

    def items(self, side: int) -> list[Item]:
        return self.table.queries if side == 0 else self.table.candidates

    def prepared(self) -> PreparedDataset:
        return PreparedDataset(self.info, self.table, {}, self.missing, self.table.scorable(set(self.missing)))


def _chunks(index: int, side: int, items: list[Item], size: int) -> list[dict]:
    return [{"chunk": {"dataset": index, "side": side, "start": start,
                       "texts": [i.text for i in items[start:start + size]],
                       "paths": [i.image for i in items[start:start + size]]}}
            for start in range(0, len(items), size)]


def _file(batch: dict, pending: dict[int, _Pending]) -> set[int]:
    """Files each row's embedding under its dataset, side and item; returns the datasets touched."""
    touched = set()
    for d, side, i, error, row in zip(batch["dataset"], batch["side"], batch["index"], batch["error"],
                                      batch["embedding"]):
        p = pending[int(d)]
        if p.embeddings[side] is None:
            p.embeddings[side] = np.full((len(p.items(side)), len(row)), np.nan, dtype=np.float32)
        if error:  # the image could not be had: its row stays NaN, its rows are misses
            p.missing.setdefault(p.items(side)[i].image, error)
        else:
            p.embeddings[side][i] = row
        p.arrived[side][i] = True
        touched.add(int(d))
    return touched


@dataclasses.dataclass
class StreamRecord:
    """What the pass did: who encoded and decoded, the cache's hits and misses, the forward time."""

    actors: list[dict] = dataclasses.field(default_factory=list)
    decoded_by: set[int] = dataclasses.field(default_factory=set)
    forward_seconds: float = 0.0
    hits: int = 0
    misses: int = 0


def evaluate_streamed(
    model_dir: str | os.PathLike,
    eval_root: Path,
    infos: Sequence[DatasetInfo],
    config,
    cache: CachedEncoder,
    keep_encoded: bool = False,
    progress: bool = True,
    resources: dict | None = None,
) -> tuple[Evaluation, StreamRecord]:
    """Scores `infos` (see the module docstring); `cache` is consulted per request (one side of one
    dataset) and filled with what was encoded (its `encoder` is not used). `resources`: a custom
    resource that keeps the actors on the worker nodes (`scaling.worker_node_resource`)."""
    import ray
    from ray.util.annotations import RayDeprecationWarning
    from tqdm.auto import tqdm

    source = eval_image_source(eval_root)
    tables = [load_table(eval_root, info.name) for info in infos]
    digest_task = ray.remote(num_cpus=1)(_image_digests)
    digest_refs = [digest_task.remote(source, table.image_paths()) for table in tables]
    record = StreamRecord()
    pending: dict[int, _Pending] = {}
    unscorable: dict[str, str] = {}
    chunks: list[dict] = []
    for index, (info, table, ref) in enumerate(zip(infos, tables, digest_refs)):
        digests, missing = ray.get(ref)
        by_path = dict(zip(table.image_paths(), digests))
        p = _Pending(info, table, missing, [], [False, False], [None, None],
                     [np.zeros(len(table.queries), bool), np.zeros(len(table.candidates), bool)])
        reason = unscorable_reason(p.prepared())
        if reason is not None:
            unscorable[info.name] = reason
            continue
        for side, name in enumerate(SIDES):
            items = p.items(side)
            key = digests_key(cache.model_id, name, [i.text for i in items],
                              [by_path.get(i.image) if i.image else None for i in items])
            p.keys.append(key)
            found = cache.load(key)
            p.cached[side] = found is not None
            record.hits, record.misses = record.hits + (found is not None), record.misses + (found is None)
            if found is not None or not items:
                p.embeddings[side] = found if found is not None else np.zeros((0, 0), np.float32)
                p.arrived[side][:] = True
            else:  # allocated when its first row arrives (the model's width)
                chunks.extend(_chunks(index, side, items, config.eval.batch_size))
        pending[index] = p

    scores: dict[str, DatasetScore] = {}
    encoded: dict[int, EncodedDataset] = {}
    pairs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def finish(index: int) -> None:
        p = pending.pop(index)
        for side in range(2):
            if not p.cached[side]:
                cache.store(p.keys[side], p.embeddings[side])
            # NaN rows: images a CPU task could not decode, in this pass or the one the cache kept
            for i in np.flatnonzero(np.isnan(p.embeddings[side]).any(axis=1)):
                p.missing.setdefault(p.items(side)[i].image, "undecodable image (found when it was encoded)")
        prepared = p.prepared()
        reason = unscorable_reason(prepared)
        if reason is not None:
            unscorable[p.info.name] = reason
            return
        e = EncodedDataset(p.info, p.table, p.missing, prepared.scorable, p.embeddings[0], p.embeddings[1])
        scores[p.info.name] = score_dataset(e)
        pairs[index] = e.positive_pairs()
        if keep_encoded:
            encoded[index] = e

    for index in [i for i, p in pending.items() if all(a.all() for a in p.arrived)]:
        finish(index)
    if chunks:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        precision = actor_precision(config.deepspeed.precision, use_gpu)
        dataset = ray.data.from_items(chunks, override_num_blocks=len(chunks))
        # On the dataset's own context: `from_items` copies the process's, so a later change to that
        # one never reaches this pipeline (it did not: the second actor could be killed unstarted).
        dataset.context.wait_for_min_actors_s = ACTOR_START_S
        # The tasks' own memory request (a chunk's decoded images and arrays) also keeps Ray Data from fusing
        # this stage into the actors' (it fuses stages with equal resource requests): the actors must not decode.
        dataset = dataset.map_batches(
            prepare_chunk, batch_size=1, num_cpus=1, memory=DECODE_TASK_MEMORY,
            compute=ray.data.TaskPoolStrategy(size=config.eval.decode_concurrency or None),
            fn_kwargs={"source": source, "model_dir": str(model_dir)})
        roster = ray.remote(num_cpus=0)(Roster).remote()
        # Not restarted: a lost actor fails the evaluation, as a lost actor of the in-process pool always
        # did (Ray Data's default, restarting forever, also makes Ray's core worker print an error line
        # on the driver's console for every actor whose arguments sit in the object store). Ray 2.60
        # names no parameter for an actor's restarts; `ray_remote_args_fn`, the one way, warns that it
        # is deprecated (removal announced for 2.64): that warning is silenced here, for this call.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RayDeprecationWarning)
            dataset = dataset.map_batches(
                ForwardActor, batch_size=config.eval.batch_size,
                compute=ray.data.ActorPoolStrategy(size=config.eval.num_workers), ray_remote_args_fn=_not_restarted,
                num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1, resources=dict(resources or {}) or None,
                fn_constructor_args=(str(model_dir), config.eval.batch_size, use_gpu, precision, roster))
        total = sum(len(c["chunk"]["texts"]) for c in chunks)
        try:
            batches = _quiet_console(dataset.iter_batches(batch_size=None, batch_format="numpy"))
            with tqdm(total=total, desc="encoding", unit="item", leave=False,
                      disable=None if progress else True) as bar:
                for batch in batches:
                    record.forward_seconds += float(batch["forward_s"].sum())
                    record.decoded_by.update(int(pid) for pid in np.unique(batch["decoded_by"]))
                    for d in _file(batch, pending):
                        if all(a.all() for a in pending[d].arrived):
                            finish(d)
                    bar.update(len(batch["index"]))
            record.actors = ray.get(roster.everyone.remote())
        finally:
            ray.kill(roster)
    source.close()
    if pending:
        raise RuntimeError(f"eval: the pipeline ended without every item of {[p.info.name for p in pending.values()]}")
    # Report order is the datasets' order, whatever order they finished in.
    order = [info.name for info in infos]
    scores = {name: scores[name] for name in order if name in scores}
    unscorable = {name: unscorable[name] for name in order if name in unscorable}
    for name, reason in unscorable.items():
        print(f"[sde_ray] eval: {name}: {reason}")
    evaluation = Evaluation(scores, [pairs[i] for i in sorted(pairs)], [encoded[i] for i in sorted(encoded)],
                            unscorable)
    return evaluation, record



def _not_restarted() -> dict:
    """The eval actors' remote args over Ray Data's defaults (a function: `map_batches` deprecates
    passing remote args as keywords)."""
    return {"max_restarts": 0, "max_task_retries": 0}


def _quiet_console(batches):
    """`batches`, with Ray Data's own console lines (execution plans, "finished in", warnings) kept
    off the driver's terminal while they stream: they still go to the Ray session's log folder (its
    file handler is untouched). The evaluation prints its own progress and tables."""
    handlers = [h for h in logging.getLogger("ray.data").handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    levels = [h.level for h in handlers]
    for handler in handlers:
        handler.setLevel(logging.ERROR)
    try:
        yield from batches
    finally:
        for handler, level in zip(handlers, levels):
            handler.setLevel(level)
