"""From config to shards on disk: the synthetic MMEB and converted shards, cached under a file lock.

`prepare_data(config)` generates/converts into `data.cache_dir` on first use and returns absolute
shard paths (Ray Train chdirs workers), the eval root, the manifest and the shard check (shards
that disagree with the manifest dropped, per-shard sample counts: the input of the epoch order,
`sde_ray.data.order`). A launch with a warm cache reads the manifest and stats each shard: no
shard is opened (`data.shard_check`, `sde_ray.data.shards.SHARD_CHECKS`).
Concurrent callers (Tune trials) serialise on an exclusive lock and reuse what the first wrote.
No Ray here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sde_ray import storage
from sde_ray.data.shards import ShardCheck, check_shards, expand_shards

MANIFEST = "manifest.json"



@dataclass
class PreparedData:
    """Absolute shard paths, the eval and validation roots, the manifest, and shards skipped as corrupt."""

    shards: list[str]
    eval_dir: str
    manifest: dict
    skipped_shards: dict[str, str] = field(default_factory=dict)
    check: ShardCheck | None = None
    val_dir: str = ""  # a validation split disjoint from eval_dir's queries ("": none, see eval.val_data_dir)

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
    if synth.mixed_sizes:  # only when set: the square datasets keep their cache keys
        settings["mixed"] = True
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
                             num_candidates=synth.num_candidates, image_size=synth.image_size,
                             mixed_sizes=synth.mixed_sizes)
        # synthetic.json records absolute paths: rewrite them for the final location.
        summary = json.loads((staging / "synthetic.json").read_text())
        summary.update(train_dir=str(target / "MMEB-train"), eval_dir=str(target / "MMEB-eval"),
                       val_dir=str(target / "MMEB-val"))
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


def _converted(train_dir: Path, shard_dir: Path, config, executor: dict) -> dict:
    """Converts once (`executor`: `convert_mmeb`'s `run_tasks`/`workers`, e.g. Ray tasks); a
    complete manifest for the same source and settings is reused as is."""
    from sde_ray.data.convert import convert_mmeb, load_manifest

    manifest_path = shard_dir / MANIFEST
    if manifest_path.exists():
        manifest = load_manifest(shard_dir)
        if (manifest.get("source") == str(train_dir) and manifest.get("split") == config.data.split
                and manifest.get("samples_per_shard") == config.data.samples_per_shard
                and sorted(manifest["subsets"]) == sorted(config.data.subsets or manifest["subsets"])):
            return manifest
    return convert_mmeb(train_dir, shard_dir, subsets=config.data.subsets or None, split=config.data.split,
                        samples_per_shard=config.data.samples_per_shard, progress=False,
                        **({"workers": 1} | executor))


# The synthetic MMEB-V2's training and held-out evaluation folders (different seeds: no clip or
# page is shared) and the frames each training video keeps.
SYNTH_V2_TRAIN, SYNTH_V2_EVAL = "MMEB-V2-train", "MMEB-V2-eval"


def synthetic_v2_root(cache: Path, split: str) -> Path:
    from sde_ray.data.synth_v2 import write_synthetic_v2

    target = cache / "synthetic_v2" / split
    if not (target / "done").exists():
        if split == SYNTH_V2_TRAIN:
            write_synthetic_v2(target, videos=96, documents=32, seed=0)
        else:
            write_synthetic_v2(target, videos=32, documents=12, seed=1)
        (target / "done").write_text("")
    return target


def _with_synthetic_v2(cache: Path, config, manifest: dict, shards: list[str]) -> tuple[dict, list[str]]:
    """The image shards plus the synthetic V2's (converted once, frames sampled as the model will
    see them), under one merged manifest."""
    from sde_ray.data.convert import load_manifest
    from sde_ray.data.convert_v2 import convert_v2

    frames = config.model.video_frames or 8
    shard_dir = cache / "synthetic_v2" / f"shards-{frames}-{config.data.samples_per_shard}"
    if (shard_dir / MANIFEST).exists():
        v2 = load_manifest(shard_dir)
    else:
        v2 = convert_v2(synthetic_v2_root(cache, SYNTH_V2_TRAIN), shard_dir, num_frames=frames,
                        samples_per_shard=config.data.samples_per_shard)
    merged = {**manifest, "num_samples": manifest["num_samples"] + v2["num_samples"],
              "subsets": {**manifest["subsets"], **v2["subsets"]}, "shards": manifest["shards"] + v2["shards"]}
    return merged, shards + [str(shard_dir / entry["name"]) for entry in v2["shards"]]


def synthetic_v2_eval_dir(config) -> str:
    with _locked_cache(config) as cache:
        return str(synthetic_v2_root(cache, SYNTH_V2_EVAL))


@contextlib.contextmanager
def _locked_cache(config) -> Iterator[Path]:
    """The cache folder, held under an exclusive file lock (concurrent Tune trials fill it once)."""
    import fcntl

    cache = Path(config.data.cache_dir).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield cache


def prepare_data(config, run_tasks=None, workers: int = 1) -> PreparedData:
    """Shards and eval root for `config.data`: generate/convert into the cache on first use (as
    `convert_mmeb` with `run_tasks`/`workers`: the drivers pass Ray tasks over the cluster's CPUs),
    then check the shards against their manifest (`data.shard_check`).

    Safe to call from concurrent processes (e.g. Tune trials): the cache is locked while it is
    filled, and later callers reuse what the first one wrote.
    """
    with _locked_cache(config) as cache:
        return _prepare_locked(config, cache, {"run_tasks": run_tasks, "workers": workers} if run_tasks else {})


def synthetic_eval_dir(config) -> str:
    """The synthetic MMEB-eval root for `config.data.synth`, generated on first use (no shards are
    converted: evaluation needs only the eval split)."""
    with _locked_cache(config) as cache:
        return str(_ensure_synthetic(cache, config.data.synth) / "MMEB-eval")


def _prepare_locked(config, cache: Path, executor: dict) -> PreparedData:
    data = config.data
    val_dir = None  # only the synthetic set ships a validation split of its own
    if data.source == "synthetic":
        root = _ensure_synthetic(cache, data.synth)
        train_dir, eval_dir, val_dir = root / "MMEB-train", root / "MMEB-eval", root / "MMEB-val"
        shard_dir = root / f"shards-{data.split}-{data.samples_per_shard}"
        manifest = _converted(train_dir, shard_dir, config, executor)
        shards = [str(shard_dir / entry["name"]) for entry in manifest["shards"]]
        if data.synth_v2:
            manifest, shards = _with_synthetic_v2(cache, config, manifest, shards)
    elif data.shards:
        shards = expand_shards(data.shards)
        first = shards[0]
        manifest_dir = storage.parent(first)
        from sde_ray.data.convert import load_manifest

        # The manifest beside the shards (local or in the bucket) gives every shard's sample count.
        manifest = load_manifest(manifest_dir) if storage.exists(storage.join(manifest_dir, MANIFEST)) else {}
        eval_dir = Path(data.mmeb_eval_dir).expanduser().resolve() if data.mmeb_eval_dir else None
    else:
        train_dir = Path(data.mmeb_train_dir).expanduser().resolve()
        key = hashlib.sha256(str(train_dir).encode()).hexdigest()[:12]
        shard_dir = cache / f"mmeb-{key}-{data.split}-{data.samples_per_shard}"
        manifest = _converted(train_dir, shard_dir, config, executor)
        shards = [str(shard_dir / entry["name"]) for entry in manifest["shards"]]
        eval_dir = Path(data.mmeb_eval_dir).expanduser().resolve() if data.mmeb_eval_dir else None
    check = check_shards(shards, manifest, depth=data.shard_check)
    return PreparedData(shards=check.paths, eval_dir=str(eval_dir) if eval_dir else "",
                        manifest=manifest, skipped_shards=check.skipped, check=check,
                        val_dir=str(val_dir) if val_dir else "")
