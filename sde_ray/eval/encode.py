"""Encoders for the evaluator: one in-process, one spread over Ray actors.

Both take requests `(side, texts, images)` (side "query" → the model's `qry` side, "target" → its
`pos` side) and return one float32 [n, D] array per request: the raw features, before L2
normalisation (scoring normalises; the spectral diagnostics need them raw).

`RayEncoderPool` starts `num_workers` actors, each loading the exported model folder once (one GPU
each when the cluster has GPUs), cuts every request into batches, keeps all actors busy and shows
a tqdm bar over the batches.

Precision: an encoder runs its forward under `torch.autocast` in `precision` (bf16 / fp16; fp32 =
no autocast) on its model's device; features come back as float32, so scoring and the spectral
diagnostics stay in fp32 whatever the encoder's precision.

`CachedEncoder` keeps the embeddings of every request under a key of (model identity, side,
content of the request: texts and image bytes), in memory and optionally in a folder, so a second
evaluation of the same model on the same data encodes nothing.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sde_ray import storage
from sde_ray.models.embedder import is_host_fact
from sde_ray.models.vlm import trim_patches

PREFIXES = {"query": "qry", "target": "pos"}
MODEL_CARD = "README.md"  # in an export: the model card (sde_ray.embed.card)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of {list(AUTOCAST_DTYPES)}, got {precision!r}")
    return AUTOCAST_DTYPES[precision]


def actor_precision(precision: str, use_gpu: bool) -> str:
    """The precision an encoding actor runs in: fp16 autocast is a GPU mode, so CPU actors of an fp16
    run encode in bf16; checked against the known precisions."""
    precision = "bf16" if precision == "fp16" and not use_gpu else precision
    autocast_dtype(precision)
    return precision


def _prefix(side: str) -> str:
    if side not in PREFIXES:
        raise ValueError(f"side must be one of {list(PREFIXES)}, got {side!r}")
    return PREFIXES[side]


def _batches(count: int, batch_size: int) -> list[slice]:
    return [slice(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


class ModelEncoder:
    """A model and its `BatchProcessor` in this process (validation, tests, the Ray actors).

    `device` moves the model there (default: where its parameters are); `calls` counts the batches
    encoded (what the embedding-cache tests count) and `forward_seconds` the time spent in their
    forwards (what `bench eval` sets against the wall time: the rest the encoder waited for input).
    `cast_weights`: the weights are cast to `precision` (the training dtype: a bf16 run's eval actors
    hold bf16 weights, half the memory and no per-op casts), not only the forward autocast.
    """

    def __init__(self, model: torch.nn.Module, processor, batch_size: int = 64, device: str | None = None,
                 precision: str = "fp32", cast_weights: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.processor, self.batch_size = model, processor, batch_size
        self.device = torch.device(device) if device else next(model.parameters()).device
        if next(model.parameters()).device != self.device:
            model.to(self.device)
        self.precision, self.dtype = precision, autocast_dtype(precision)
        if cast_weights and self.dtype is not None:
            model.to(self.dtype)
        self.calls, self.forward_seconds = 0, 0.0

    def encode_batch(self, side: str, texts: list[str], images: list, frames: list | None = None) -> np.ndarray:
        return self.encode_arrays(side, self.processor.encode_inputs(texts, images, _prefix(side), frames))

    @torch.no_grad()
    def encode_arrays(self, side: str, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """The forward alone, on arrays `BatchProcessor.encode_inputs` made (elsewhere, e.g. in the
        CPU tasks of `sde-ray embed`): float32 [n, D] raw features."""
        prefix = _prefix(side)
        # A VLM's padded patch columns cut to the batch's largest image: only those bytes reach the device.
        arrays = trim_patches(arrays)
        started = time.perf_counter()
        # Per-row facts (has_image, token spans, grids) stay on the host, where the model reads them
        # without waiting on the device (`models.is_host_fact`).
        batch = {key: torch.from_numpy(np.ascontiguousarray(value)).to("cpu" if is_host_fact(key) else self.device)
                 for key, value in arrays.items()}
        was_training = self.model.training
        self.model.eval()
        self.calls += 1
        try:
            with torch.autocast(self.device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
                features = self.model.encode_side(batch, prefix)
        finally:
            self.model.train(was_training)
        out = features.detach().float().cpu().numpy()  # the copy back waits for the device: counted
        self.forward_seconds += time.perf_counter() - started
        return out

    def encode(self, requests: Sequence[tuple]) -> list[np.ndarray]:
        """Requests `(side, texts, images)`, or `(side, texts, images, frames)` with per item a
        video's frames ([] for none; MMEB-V2 video sets, sde_ray/eval/mmeb_v2.py)."""
        out = []
        for side, texts, images, *rest in requests:
            frames = rest[0] if rest else None
            parts = [
                self.encode_batch(side, texts[s], images[s], None if frames is None else frames[s])
                for s in _batches(len(texts), self.batch_size)
            ]
            out.append(np.concatenate(parts) if parts else np.zeros((0, self.embed_dim), dtype=np.float32))
        return out

    @property
    def embed_dim(self) -> int:
        return int(getattr(self.model, "embed_dim", 0))


def load_encoder(model_dir: str | os.PathLike, batch_size: int, device: str | None = None,
                 precision: str = "fp32", cast_weights: bool = False) -> ModelEncoder:
    """A `ModelEncoder` for an exported `save_pretrained` folder (the forward runs under autocast in
    `precision`; the weights are cast to it with `cast_weights`, else kept as saved)."""
    from sde_ray.models import BatchProcessor, load_pretrained

    model, model_config = load_pretrained(str(model_dir))
    return ModelEncoder(model, BatchProcessor(model_config), batch_size, device, precision, cast_weights)


def model_identity(model_dir: str | os.PathLike) -> str:
    """A digest of an exported model folder's files (names and bytes; not its model card): equal
    folders, equal ids."""
    digest = hashlib.sha256()
    root = Path(model_dir)
    # The model card documents the model; writing it after the evaluation changes no embedding.
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root) != Path(MODEL_CARD)):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def module_identity(model: torch.nn.Module) -> str:
    """A digest of an in-memory model's weights (its state dict, names and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode() + str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def image_digest(image: bytes | None) -> bytes | None:
    return hashlib.sha256(image).digest() if image is not None else None


def request_key(model_id: str, side: str, texts: Sequence[str], images: Sequence) -> str:
    """The cache key of one request: the model, the side and every item's text and image bytes."""
    return digests_key(model_id, side, texts, [image_digest(image) for image in images])


def digests_key(model_id: str, side: str, texts: Sequence[str], digests: Sequence[bytes | None]) -> str:
    """`request_key` from each image's sha256 digest (None: no image), made where the bytes were read."""
    digest = hashlib.sha256(f"{model_id}\0{_prefix(side)}\0{len(texts)}".encode())
    for text, image in zip(texts, digests):
        digest.update(text.encode() + b"\0")
        digest.update(image if image is not None else b"-")
    return digest.hexdigest()


class CachedEncoder:
    """Wraps an encoder: a request seen before (same model, side and content) is not encoded again.

    `cache_dir` keeps the arrays on disk (`<key>.npy`) so another process or a later `sde-ray eval`
    of the same model reuses them; without it they live in this object only.
    """

    def __init__(self, encoder, model_id: str, cache_dir: str | os.PathLike | None = None):
        self.encoder, self.model_id = encoder, model_id
        self.cache_dir = str(cache_dir) if cache_dir else None  # a folder or an object-store URL
        self.memory: dict[str, np.ndarray] = {}
        self.hits = self.misses = 0

    def load(self, key: str) -> np.ndarray | None:
        """The cached embeddings of a request key (None when absent)."""
        if key in self.memory:
            return self.memory[key]
        path = storage.join(self.cache_dir, f"{key}.npy") if self.cache_dir else None
        if path is not None and storage.is_file(path):
            self.memory[key] = np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
            return self.memory[key]
        return None

    def store(self, key: str, array: np.ndarray) -> None:
        self.memory[key] = array
        if self.cache_dir is None:
            return
        path = storage.join(self.cache_dir, f"{key}.npy")
        if storage.is_remote(path):  # an object appears whole when its upload completes
            buffer = io.BytesIO()
            np.save(buffer, array)
            storage.write_bytes(path, buffer.getvalue())
            return
        os.makedirs(self.cache_dir, exist_ok=True)
        tmp = storage.join(self.cache_dir, f"{key}.tmp.npy")
        np.save(tmp, array)
        os.replace(tmp, path)  # never a half-written entry

    def encode(self, requests: Sequence[tuple[str, list[str], list]]) -> list[np.ndarray]:
        keys = [request_key(self.model_id, side, texts, images) for side, texts, images in requests]
        found = [self.load(key) for key in keys]
        todo = [i for i, array in enumerate(found) if array is None]
        self.hits, self.misses = self.hits + len(keys) - len(todo), self.misses + len(todo)
        # One call for everything missing, so a parallel encoder still sees all the work at once.
        for i, array in zip(todo, self.encoder.encode([requests[i] for i in todo]) if todo else []):
            found[i] = array
            self.store(keys[i], array)
        return found


class _EncoderActor:
    def __init__(self, model_dir: str, batch_size: int, use_gpu: bool, precision: str):
        import time

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        # An export in the bucket is copied to this node's scratch for loading, then removed.
        with storage.readable_dir(model_dir) as local:
            self.encoder = load_encoder(local, batch_size, "cuda" if use_gpu else "cpu", precision)
        self.started_at = time.time()

    def encode_batch(self, side: str, texts: list[str], images: list) -> np.ndarray:
        return self.encoder.encode_batch(side, texts, images)

    def forward_seconds(self) -> float:
        """Seconds spent in forwards so far (`bench eval`: the rest of the wall time was input)."""
        return self.encoder.forward_seconds

    def describe(self) -> dict:
        """Where this actor runs (recorded in the results: which process evaluated)."""
        import socket

        import ray

        return {"pid": os.getpid(), "host": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(),
                "device": str(self.encoder.device),
                "precision": self.encoder.precision, "started_at": self.started_at}


class RayEncoderPool:
    """`num_workers` Ray actors sharing the batches of every request; results keep request order."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        num_workers: int = 1,
        batch_size: int = 64,
        use_gpu: bool | None = None,
        cpus_per_worker: float = 1.0,
        progress: bool = True,
        precision: str = "fp32",
        resources: dict | None = None,
    ):
        import ray

        if num_workers < 1:
            raise ValueError(f"eval.num_workers must be >= 1, got {num_workers}")
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        # `resources`: a custom one (scaling.worker_node_resource) that keeps the actors on the worker nodes.
        actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0,
                           resources=dict(resources or {}))(_EncoderActor)
        precision = actor_precision(precision, use_gpu)
        self.actors = [actor.remote(str(model_dir), batch_size, use_gpu, precision) for _ in range(num_workers)]
        self.batch_size, self.progress = batch_size, progress

    def encode(self, requests: Sequence[tuple[str, list[str], list]]) -> list[np.ndarray]:
        import ray
        from tqdm.auto import tqdm

        jobs = []  # (request index, ref)
        for index, (side, texts, images) in enumerate(requests):
            for part in _batches(len(texts), self.batch_size):
                actor = self.actors[len(jobs) % len(self.actors)]
                jobs.append((index, actor.encode_batch.remote(side, texts[part], images[part])))
        pending = [ref for _, ref in jobs]
        # On a terminal only, and cleared when done (one bar per request would stack up otherwise).
        with tqdm(total=len(pending), desc="encoding", unit="batch", leave=False,
                  disable=None if self.progress else True) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
                bar.update(len(done))
        parts: list[list[np.ndarray]] = [[] for _ in requests]
        for index, ref in jobs:
            parts[index].append(ray.get(ref))
        return [np.concatenate(p) if p else np.zeros((0, 0), dtype=np.float32) for p in parts]

    def describe(self) -> list[dict]:
        import ray

        return ray.get([actor.describe.remote() for actor in self.actors])

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
