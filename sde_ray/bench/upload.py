"""`sde-ray bench upload`: what a periodic checkpoint (save + upload) costs the training loop, in one run.

Two fits of the same run (Ray Train + DeepSpeed, 1 worker, the config's model, `train.output_dir`
as the storage: give it an `s3://` / `gs://` URL to measure uploads to the store), one with
`train.checkpoint_upload=sync` and one with `async`, checkpointing every `CHECKPOINT_EVERY` steps.
Rank 0 stamps the wall clock after every step (the step hook); a step's time is the gap to the
previous stamp, so the step that checkpoints includes its save (and, in sync mode, the upload),
and in async mode the steps after it run while the upload is in flight. Printed side by side:

- plain: the median step with no checkpoint near it (neither at nor right after one);
- checkpoint step: the median step that saves a checkpoint, and its ratio to plain (sync: save +
  upload block the loop; async: the save only);
- after checkpoint: the median step right after one (async: the upload runs meanwhile).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

from sde_ray.config import Config, load_config, with_values

CHECKPOINT_EVERY = 4


class _Stamps:
    """Step hook: appends (step, wall time) of rank 0 to a local file (the bench runs a local Ray)."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, step, rank, world_size, module, **_):
        import time

        if rank == 0:
            with open(self.path, "a") as handle:
                handle.write(json.dumps([step, time.perf_counter()]) + "\n")


def step_times(path: Path) -> dict[int, float]:
    stamps = [json.loads(line) for line in path.read_text().splitlines()]
    return {step: now - before for (_, before), (step, now) in zip(stamps, stamps[1:])}


def summarize(times: dict[int, float], every: int, warmup: int) -> dict:
    """Median step times by kind (steps before `warmup` left out)."""
    kept = {s: t for s, t in times.items() if s > warmup}
    plain = [t for s, t in kept.items() if s % every not in (0, 1)]
    at = [t for s, t in kept.items() if s % every == 0]
    after = [t for s, t in kept.items() if s % every == 1]
    med = statistics.median
    return {"plain_s": med(plain), "checkpoint_step_s": med(at), "after_checkpoint_s": med(after),
            "checkpoint_step_over_plain": med(at) / med(plain), "after_checkpoint_over_plain": med(after) / med(plain),
            "steps": {"plain": len(plain), "checkpoint": len(at), "after": len(after)}}


def main(json_path: str | None = None, config: Config | None = None, quick: bool = False) -> dict:
    import ray

    from sde_ray import storage
    from sde_ray.ray_cluster import start_local
    from sde_ray.train.driver import build_trainer, resolve_paths

    config = resolve_paths(config or load_config(None, []))
    steps = 2 * CHECKPOINT_EVERY + 1 if quick else 8 * CHECKPOINT_EVERY + 1
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    results: dict = {"model": config.model.name_or_path, "storage": config.train.output_dir,
                     "checkpoint_every": CHECKPOINT_EVERY, "max_steps": steps}
    started = start_local(2, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ckpt-", dir=storage.scratch_dir()) as scratch:
            for mode in ("sync", "async"):
                stamps = Path(scratch) / f"{mode}.jsonl"
                output = storage.join(config.train.output_dir, f"bench-checkpoint-{mode}-{os.getpid()}")
                run = with_values(config, {
                    "train.checkpoint_upload": mode, "train.checkpoint_every": CHECKPOINT_EVERY,
                    "train.max_steps": steps, "train.log_every": steps, "train.eval_every": 0,
                    "train.keep_checkpoints": 2, "scaling.num_workers": 1, "train.output_dir": output,
                    "train.storage_path": storage.join(output, "ray"), "train.run_name": f"bench-{mode}",
                    "logging.wandb": False})
                build_trainer(run, step_hook=_Stamps(str(stamps))).fit()
                results[mode] = summarize(step_times(stamps), CHECKPOINT_EVERY, warmup=2)
    finally:
        if started:
            ray.shutdown()
    results["async_checkpoint_step_over_sync"] = (results["async"]["checkpoint_step_s"]
                                                  / results["sync"]["checkpoint_step_s"])
    for mode in ("sync", "async"):
        r = results[mode]
        print(f"{mode:>5}: plain step {r['plain_s'] * 1e3:7.1f} ms | checkpoint step {r['checkpoint_step_s'] * 1e3:7.1f} ms "
              f"({r['checkpoint_step_over_plain']:.2f}x) | step after {r['after_checkpoint_s'] * 1e3:7.1f} ms "
              f"({r['after_checkpoint_over_plain']:.2f}x)")
    print(f"async / sync checkpoint step: {results['async_checkpoint_step_over_sync']:.2f}")
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=1) + "\n")
    return results
