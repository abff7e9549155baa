"""What a LoRA run's checkpoints and export cost, before and after trainable-only checkpoints:
`sde-ray bench checkpoint [--quick] [--json PATH]`.

Two models, each with LoRA on q/k/v/o under bf16 and ZeRO-2 (the LoRA recipes' setting): the tiny
Qwen2-VL, and (not with --quick) a ~1B-parameter Qwen2-VL built from a config (2048 wide, 16
layers), written once as a local `from_pretrained` folder. For each, two fresh processes run side
by side, one per way of working, each on a real one-process DeepSpeed engine after one training
step (the tiny model; the 1B saves before its first step, see `STEP_BELOW`):

- before: the backbone loaded in fp32 (DeepSpeed casts it to bf16), whole checkpoints
  (`train.checkpoint_frozen=true`: the frozen backbone in consolidated.pt and in DeepSpeed's
  model states), the export as it was (a cloned state dict loaded into an fp32 rebuild, LoRA
  merged on a deep copy);
- after: the backbone loaded straight in bf16, trainable-only checkpoints, the export merged in
  place in the training dtype.

Reported per phase (load, save, export): seconds, and peak host memory above the phase's start
(the process's VmHWM, reset before the phase through /proc/self/clear_refs); the checkpoint's bytes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

MiB = 2**20
# Models this large save before any step: a bf16 step of the 1B on a shared 2-core CPU ran past 13
# minutes. Its AdamW moments (2 × the 0.1 % that trains) are then absent from both ways alike.
STEP_BELOW = 100_000_000
# ~1B parameters: 16 layers × (attention 12.6M + MLP 50.3M) + embeddings; the tiny tokenizer's vocab.
BILLION = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 16,
           "num_key_value_heads": 8}


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class Phase:
    """Wall seconds and peak resident memory above the start of a `with` block (Linux)."""

    def __enter__(self):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.start_rss, self.start = _rss_bytes("VmRSS"), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.peak_mib = (_rss_bytes("VmHWM") - self.start_rss) / MiB


def write_billion_model(folder: Path) -> int:
    """A ~1B Qwen2-VL (random bf16 weights) with the tiny processors, as a `from_pretrained` folder;
    returns its parameter count."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from sde_ray.config import ModelConfig
    from sde_ray.models.processing import load_processors
    from sde_ray.models.tiny import tiny_backbone

    tiny = ModelConfig(kind="vlm", name_or_path="tiny-qwen2-vl")
    tokenizer, image_processor = load_processors(tiny)
    config = tiny_backbone("tiny-qwen2-vl", tiny, tokenizer).config.to_dict()
    head_dim = BILLION["hidden_size"] // BILLION["num_attention_heads"]
    config["text_config"].update(BILLION, head_dim=head_dim)
    config["text_config"].pop("layer_types", None)  # per-layer lists of the tiny depth: rebuilt for 16
    config["text_config"]["rope_parameters"]["mrope_section"] = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    config["vision_config"]["hidden_size"] = BILLION["hidden_size"]  # the merger's output width
    hf_config = Qwen2VLConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    model = Qwen2VLForConditionalGeneration._from_config(hf_config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def _config(name_or_path: str, whole: bool):
    from sde_ray.config import load_config

    return load_config(None, [
        "model.kind=vlm", f"model.name_or_path={name_or_path}", "model.lora.enabled=true",
        "deepspeed.precision=bf16", "deepspeed.zero_stage=2", "train.global_batch_size=4",
        "train.micro_batch_size=0", "scaling.num_workers=1", "logging.wandb=false",
        f"train.checkpoint_frozen={str(whole).lower()}"])


def _old_export(engine, config, directory: Path) -> None:
    """The export before this change: a cloned consolidated state dict, loaded into an fp32 rebuild,
    saved with LoRA merged on a deep copy."""
    from sde_ray.models.build import match_shapes
    from sde_ray.train.checkpoint import consolidated_state_dict
    from sde_ray.train.engine import build_train_module

    weights = consolidated_state_dict(engine)
    copy = build_train_module(config, dtype=torch.float32)
    copy.load_state_dict(match_shapes({k: v.float() for k, v in weights.items()}, copy))
    copy.model.save_pretrained(directory)


def measure(name_or_path: str, before: bool, out: str) -> None:
    """One way of working on one model in this (fresh) process; writes its numbers as JSON to `out`."""
    from sde_ray import distributed
    from sde_ray.bench.models import _raw_batch
    from sde_ray.models import BatchProcessor
    from sde_ray.train.checkpoint import TrainState, base_identity, save_checkpoint
    from sde_ray.train.deepspeed_config import build_deepspeed_config
    from sde_ray.train.engine import build_engine, build_train_module, seed_everything
    from sde_ray.train.loop import step_context, to_model_inputs
    from sde_ray.train.step import train_step

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    distributed.start_single_process_group()
    config = _config(name_or_path, whole=before)
    seed_everything(0)
    with Phase() as load:
        module = build_train_module(config, dtype=torch.float32 if before else None)
        engine = build_engine(module, build_deepspeed_config(config, 1))
    base = base_identity(config, engine.module.model) if not before else {}
    raw = _raw_batch(4, config.model.image_size)
    batch = to_model_inputs(BatchProcessor(config.model)(raw), engine.device, torch.bfloat16)
    state = TrainState(world_size=1, zero_stage=2, base=base)
    if sum(p.numel() for p in engine.module.parameters()) < STEP_BELOW:
        train_step(engine, batch, step_context(config, state, 0, 1, batch), 4, 1)
        state.step = 1
    # Counted before the export, which merges the adapters into the base in place.
    parameters = sum(p.numel() for p in engine.module.parameters())
    trainable = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    work = Path(tempfile.mkdtemp(prefix="sde_ray_bench_ckpt_"))
    try:
        with Phase() as save:
            save_checkpoint(work / "checkpoint", engine, state, config, rank=0)
        checkpoint_bytes = sum(f.stat().st_size for f in (work / "checkpoint").rglob("*") if f.is_file())
        with Phase() as export:
            if before:
                _old_export(engine, config, work / "export")
            else:
                engine.module.model.save_pretrained(work / "export", in_place=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(out).write_text(json.dumps({
        "parameters": parameters, "trainable": trainable, "checkpoint_mib": checkpoint_bytes / MiB,
        **{f"{label}_{key}": value for label, phase in (("load", load), ("save", save), ("export", export))
           for key, value in (("s", phase.seconds), ("peak_mib", phase.peak_mib))}}))
    distributed.stop_process_group()


def _in_fresh_process(name_or_path: str, before: bool) -> dict:
    context = multiprocessing.get_context("spawn")
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        process = context.Process(target=measure, args=(name_or_path, before, out.name))
        process.start()
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"the measurement of {name_or_path} (before={before}) failed: exit {process.exitcode}")
        return json.loads(Path(out.name).read_text())


def main(json_path: str | None = None, config=None, quick: bool = False) -> list[dict]:
    del config  # the benchmark fixes its models and settings
    rows = []
    with tempfile.TemporaryDirectory(prefix="sde_ray_bench_1b_") as folder:
        models = [("tiny-qwen2-vl", "tiny-qwen2-vl")]
        if not quick:
            write_billion_model(Path(folder))
            models.append(("qwen2-vl ~1B (from config)", folder))
        for label, name_or_path in models:
            before, after = _in_fresh_process(name_or_path, True), _in_fresh_process(name_or_path, False)
            rows.append({"model": label, "before": before, "after": after})
    print("LoRA (q/k/v/o, r=8) under bf16, ZeRO-2, one process; before -> after (ratio after/before)")
    for row in rows:
        before, after = row["before"], row["after"]
        print(f"{row['model']}: {after['parameters'] / 1e6:.1f}M parameters, {after['trainable'] / 1e6:.4f}M trainable")
        for key, unit in (("checkpoint_mib", "MiB"), ("save_s", "s"), ("save_peak_mib", "MiB"), ("load_s", "s"),
                          ("load_peak_mib", "MiB"), ("export_s", "s"), ("export_peak_mib", "MiB")):
            ratio = after[key] / before[key] if before[key] > 0 else float("nan")
            row[f"{key}_ratio"] = ratio
            print(f"  {key:<16}{before[key]:>10.2f} -> {after[key]:>10.2f} {unit:<4} ({ratio:.3f})")
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
