"""Worker functions for the 2-rank gloo evaluation tests (a plain module so spawned children can
import them; the launch helpers are the spectral tests' `gloo_workers`)."""

from __future__ import annotations

from pathlib import Path

import torch

import gloo_workers


def validation_worker(rank: int, world_size: int, rendezvous: str, out_dir: str, eval_root: str,
                      datasets: list[str], max_queries: int) -> None:
    """Distributed validation P@1 of a seed-0 tiny-clip; saves the value, the items it encoded and the
    images it loaded."""
    from sde_ray.config import ModelConfig
    from sde_ray.eval import encode
    from sde_ray.eval.validation import _validation_slice, validation_p_at_1
    from sde_ray.models import BatchProcessor, build_model

    gloo_workers.start(rank, world_size, rendezvous)
    config = ModelConfig(name_or_path="tiny-clip")
    model = build_model(config, seed=0).eval()
    encoded = []
    original = encode.ModelEncoder.encode_batch

    def counting(self, side, texts, images, frames=None):  # records what this rank encoded (real encoding runs)
        encoded.append(len(texts))
        return original(self, side, texts, images, frames)

    encode.ModelEncoder.encode_batch = counting
    value = validation_p_at_1(model, BatchProcessor(config), eval_root, max_queries=max_queries,
                              batch_size=4, datasets=datasets, rank=rank, world_size=world_size)
    shares = _validation_slice(str(Path(eval_root).resolve()), tuple(datasets), max_queries, rank, world_size)
    loaded = sorted({f"{p.info.name}/{path}" for p in shares for path in p.images})  # the images this rank read
    torch.save({"p_at_1": value, "items": sum(encoded), "images": loaded}, Path(out_dir) / f"rank{rank}.pt")
    gloo_workers.finish()
