"""`sde-ray bench eval`: MMEB scoring throughput with and without candidate de-duplication.

Both modes run in the same process on the same synthetic MMEB-eval and the same model
(`config.model`, tiny-clip by default), alternating per repeat so machine load hits both alike.
Timed: encoding the queries and candidates and scoring them (reading parquet and images is the
same work in both modes and is done once, outside the clock). Reported: queries/s of each mode,
their ratio, the items each mode encodes, and whether both give identical P@1 (they must).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sde_ray.config import Config, to_dict
from sde_ray.data.mmeb import eval_image_source
from sde_ray.data.synthetic import write_synthetic_mmeb
from sde_ray.eval.encode import ModelEncoder
from sde_ray.eval.runner import select_datasets
from sde_ray.eval.scoring import encode_dataset, prepare_dataset, score_dataset


def _timed_pass(prepared, encoder) -> tuple[float, dict[str, int]]:
    start = time.perf_counter()
    correct = {p.info.name: score_dataset(encode_dataset(p, encoder)).num_correct for p in prepared}
    return time.perf_counter() - start, correct


def main(json_path: str | None = None, config: Config | None = None, quick: bool = False) -> dict:
    from sde_ray.models import BatchProcessor, build_model

    config = config or Config()
    synth = config.data.synth
    per_dataset = 8 if quick else synth.eval_per_dataset
    repeats = 1 if quick else 3
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, seed=config.train.seed).eval()
    encoder = ModelEncoder(model, BatchProcessor(to_dict(config.model)), config.eval.batch_size)

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

    print(f"eval bench: {queries} queries over {len(infos)} datasets, {synth.num_candidates} candidates each")
    for mode in ("naive", "dedup"):
        row = result[mode]
        print(f"  {mode:<6} {row['queries_per_s']:8.1f} queries/s  ({row['encoded_items']} items encoded)")
    print(
        f"  dedup / naive: {result['speedup_dedup_over_naive']:.2f}x; "
        f"identical P@1: {result['identical_p_at_1']}"
    )
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result
