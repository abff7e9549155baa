"""Encoders for the evaluator: one in-process, one spread over Ray actors.

Both take requests `(side, texts, images)` (side "query" → the model's `qry` side, "target" → its
`pos` side) and return one float32 [n, D] array per request: the raw features, before L2
normalisation (scoring normalises; the spectral diagnostics need them raw).

`RayEncoderPool` starts `num_workers` actors, each loading the exported model folder once (one GPU
each when the cluster has GPUs), cuts every request into batches, keeps all actors busy and shows
a tqdm bar over the batches.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

PREFIXES = {"query": "qry", "target": "pos"}


def _prefix(side: str) -> str:
    if side not in PREFIXES:
        raise ValueError(f"side must be one of {list(PREFIXES)}, got {side!r}")
    return PREFIXES[side]


def _batches(count: int, batch_size: int) -> list[slice]:
    return [slice(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


class ModelEncoder:
    """A model and its `BatchProcessor` in this process (validation, tests, the Ray actors)."""

    def __init__(self, model: torch.nn.Module, processor, batch_size: int = 64, device: str | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.processor, self.batch_size = model, processor, batch_size
        self.device = torch.device(device) if device else next(model.parameters()).device

    @torch.no_grad()
    def encode_batch(self, side: str, texts: list[str], images: list) -> np.ndarray:
        prefix = _prefix(side)
        arrays = self.processor.encode_inputs(texts, images, prefix)
        batch = {key: torch.from_numpy(value).to(self.device) for key, value in arrays.items()}
        was_training = self.model.training
        self.model.eval()
        try:
            features = self.model.encode_side(batch, prefix)
        finally:
            self.model.train(was_training)
        return features.detach().float().cpu().numpy()

    def encode(self, requests: Sequence[tuple[str, list[str], list]]) -> list[np.ndarray]:
        out = []
        for side, texts, images in requests:
            parts = [
                self.encode_batch(side, texts[s], images[s]) for s in _batches(len(texts), self.batch_size)
            ]
            out.append(np.concatenate(parts) if parts else np.zeros((0, self.embed_dim), dtype=np.float32))
        return out

    @property
    def embed_dim(self) -> int:
        return int(getattr(self.model, "embed_dim", 0))


def load_encoder(model_dir: str | os.PathLike, batch_size: int, device: str | None = None) -> ModelEncoder:
    """A `ModelEncoder` for an exported `save_pretrained` folder."""
    from sde_ray.config import to_dict
    from sde_ray.models import BatchProcessor, load_pretrained

    model, model_config = load_pretrained(str(model_dir))
    if device:
        model = model.to(device)
    return ModelEncoder(model, BatchProcessor(to_dict(model_config)), batch_size, device)


class _EncoderActor:
    def __init__(self, model_dir: str, batch_size: int, use_gpu: bool):
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.encoder = load_encoder(model_dir, batch_size, "cuda" if use_gpu else "cpu")

    def encode_batch(self, side: str, texts: list[str], images: list) -> np.ndarray:
        return self.encoder.encode_batch(side, texts, images)


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
    ):
        import ray

        if num_workers < 1:
            raise ValueError(f"eval.num_workers must be >= 1, got {num_workers}")
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0)(_EncoderActor)
        self.actors = [actor.remote(str(model_dir), batch_size, use_gpu) for _ in range(num_workers)]
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
        with tqdm(total=len(pending), desc="encoding", unit="batch", disable=not self.progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
                bar.update(len(done))
        parts: list[list[np.ndarray]] = [[] for _ in requests]
        for index, ref in jobs:
            parts[index].append(ray.get(ref))
        return [np.concatenate(p) if p else np.zeros((0, 0), dtype=np.float32) for p in parts]

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
