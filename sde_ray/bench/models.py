"""Step cost of the tiny encoders, side by side: `sde-ray bench models [--quick] [--json PATH]`.

For each tiny model, on one fixed batch of MMEB-like pairs (queries: image + instruction, targets:
captions) and the same number of torch threads (1 by default): BatchProcessor time per batch and
the forward + backward + AdamW step time (median; wall and process CPU time), plus parameter
counts. Ratios (of CPU time) are against tiny-clip, the default model.
"""

from __future__ import annotations

import io
import json
import statistics
import time

import numpy as np
import torch
from PIL import Image

from sde_ray.config import ModelConfig
from sde_ray.models.build import build_model, count_parameters
from sde_ray.models.processing import BatchProcessor
from sde_ray.models.tiny import TINY_MODELS


def _raw_batch(size: int, image_size: int) -> dict:
    rng = np.random.default_rng(0)

    def png() -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)).save(buffer, "PNG")
        return buffer.getvalue()

    return {
        "qry_text": [
            "<|image_1|>\nRepresent the given image with the following question: what is left of the circle?\n"
        ]
        * size,
        "pos_text": [f"a small red circle in the top left and {i} blue squares" for i in range(size)],
        "qry_image": [png() for _ in range(size)],
        "pos_image": [None] * size,
        "target_hash": [str(i) for i in range(size)],
        "subset": ["bench"] * size,
    }


def _median_seconds(fn, repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median (wall, CPU) seconds per call. With one thread, the process CPU time is what the call
    costs on a dedicated core, even on a shared, oversubscribed machine."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def bench_model(name: str, batch_size: int, repeats: int) -> dict:
    config = ModelConfig(kind=TINY_MODELS[name].kind, name_or_path=name)
    processor = BatchProcessor(config)
    raw = _raw_batch(batch_size, config.image_size)
    process_s, process_cpu_s = _median_seconds(lambda: processor(raw), repeats)
    batch = {key: torch.as_tensor(value, device="cpu") for key, value in processor(raw).items()}
    model = build_model(config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    labels = torch.arange(batch_size)

    def step() -> None:
        query, target = model(batch)
        query = torch.nn.functional.normalize(query, dim=-1)
        target = torch.nn.functional.normalize(target, dim=-1)
        loss = torch.nn.functional.cross_entropy(query @ target.T / 0.05, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step_s, step_cpu_s = _median_seconds(step, repeats)
    return {
        "model": name,
        "batch": batch_size,
        "seq_len": processor.seq_len,
        **count_parameters(model),
        "process_ms": 1e3 * process_s,
        "process_cpu_ms": 1e3 * process_cpu_s,
        "step_ms": 1e3 * step_s,
        "step_cpu_ms": 1e3 * step_cpu_s,
    }


def main(json_path: str | None = None, config=None, quick: bool = False, batch_size: int = 32, threads: int = 1) -> list[dict]:
    del config  # the benchmark always compares the three tiny models on one fixed batch
    repeats = 2 if quick else 10
    torch.set_num_threads(threads)
    rows = [bench_model(name, batch_size, repeats) for name in TINY_MODELS]
    base = rows[0]["step_cpu_ms"]
    print(f"batch {batch_size}, {threads} thread(s); ms per batch as wall / process CPU time")
    print(
        f"{'model':<15}{'params':>9}{'L':>4}{'BatchProcessor':>17}{'fwd+bwd+AdamW':>17}{'CPU × tiny-clip':>17}"
    )
    for row in rows:
        row["step_cpu_ratio"] = row["step_cpu_ms"] / base
        print(
            f"{row['model']:<15}{row['total']:>9}{row['seq_len']:>4}"
            f"{row['process_ms']:>9.1f} /{row['process_cpu_ms']:>6.1f}"
            f"{row['step_ms']:>9.1f} /{row['step_cpu_ms']:>6.1f}{row['step_cpu_ratio']:>17.2f}"
        )
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(rows, handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
