"""The device check: what one accelerator can prove about sde_ray, in one process, without Ray.

    python scripts/device_check.py [--device cuda|cpu] [--out check.json]

Every stage runs the project's own code (objectives, spectral stage, models, `train.step.train_step`
on real DeepSpeed engines, the evaluator's encoder) and is reported pass/fail with its figures in
one JSON (stdout, and `--out`); the exit status is 0 only when every stage passed:

- `objective`: the SDE objective (forward + backward) and the spectral snapshot on the device,
  against the same computation on the CPU in float64;
- `gradcache_zero2`, `gradcache_zero3`: two GradCache steps (2 chunks) of tiny-qwen2-vl with LoRA,
  gradient checkpointing and bf16 under a DeepSpeed engine (world size 1: NCCL on CUDA, gloo on
  the CPU), against a plain fp32 CPU run of the same two steps (torch AdamW, one graph per batch);
- `eval_encoding`: the evaluator's `ModelEncoder` on the device (bf16 autocast on CUDA) against
  fp32 on the CPU;
- `clip_throughput`: samples/s, peak memory and MFU of a CLIP ViT-B/16-sized dual encoder built by
  `models.build_model` from a saved folder and trained by `train_step` on a ZeRO-0 bf16 engine, with
  the host syncs per step (`torch.cuda.set_sync_debug_mode`).

`--device cpu` runs every stage at tiny sizes (CI runs it: tests/test_device_check.py); MFU, peak
memory and host syncs are CUDA figures and are null there. docs/operations.md says what a pass
proves and what only a multi-GPU cluster can.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not an install

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets (SXM parts).
PEAK_BF16_TFLOPS = {"H200": 989.5, "H100": 989.5, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
# Step sizes: Adam with eps = 1 moves by lr·g/(|g|+1), a readable function of the gradient.
ADAM = ["train.weight_decay=0.0", "train.grad_clip=0.0", "train.lr_schedule=constant", "train.warmup_steps=0",
        'deepspeed.overrides={"optimizer": {"params": {"eps": 1.0}}, "scheduler": {"params": {"warmup_min_lr": 0.01}}}',
        "train.lr=0.01"]


def start_process_group(device: str) -> None:
    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)


def relative_error(got, want) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# Stages: each returns its figures and whether it passed.


def stage_objective(device, sizes) -> dict:
    import torch

    from sde_ray.config import load_config
    from sde_ray.losses import StepContext, build_objective
    from sde_ray.spectral import spectral_snapshot, spectrum_rule

    rows, dim = sizes["features"]
    config = load_config(None, ["loss.name=sde", "spectral.noise_estimator=iqr"])
    g = torch.Generator(device="cpu").manual_seed(0)
    shared = torch.randn(rows, 4, generator=g) @ torch.randn(4, dim, generator=g) * 3.0
    query, target = shared + torch.randn(rows, dim, generator=g), shared + torch.randn(rows, dim, generator=g)

    def run(on, dtype):
        objective = build_objective(config, dim).to(on, dtype)
        q = query.to(on, dtype, copy=True).requires_grad_(True)
        t = target.to(on, dtype, copy=True).requires_grad_(True)
        context = StepContext(progress=0.3, generator=torch.Generator(device="cpu").manual_seed(1))
        loss, _ = objective(q, t, context)
        loss.backward()
        snapshot, _ = spectral_snapshot(q.detach(), t.detach(), spectrum_rule(config.spectral), 0, 1)
        return loss.detach().cpu().double(), q.grad.cpu(), snapshot

    loss, grad, snapshot = run(torch.device(device), torch.float32)
    want_loss, want_grad, want_snapshot = run(torch.device("cpu"), torch.float64)
    loss_error, grad_error = relative_error(loss, want_loss), relative_error(grad, want_grad)
    same_partition = all(abs(snapshot[k] - want_snapshot[k]) < 1e-3 for k in want_snapshot)
    return {"pass": loss_error < 1e-4 and grad_error < 1e-3 and same_partition, "loss": float(loss),
            "loss_rel_error": loss_error, "grad_rel_error": grad_error, "snapshot_matches": same_partition}


def _batches(config, count: int, rows: int) -> list[dict]:
    import numpy as np
    import torch

    from sde_ray.bench.models import _raw_batch
    from sde_ray.models import BatchProcessor

    raw = _raw_batch(count * rows, config.model.image_size)
    # The first chunk of every batch has image targets, the second text ones.
    raw["pos_image"] = [image if i % rows < rows // 2 else None for i, image in enumerate(raw["qry_image"][::-1])]
    arrays = BatchProcessor(config.model)(raw)
    arrays["target_id"] = np.arange(count * rows)
    tensors = {k: torch.as_tensor(v, device="cpu") for k, v in arrays.items()}
    return [{k: v[i * rows:(i + 1) * rows] for k, v in tensors.items()} for i in range(count)]


def _context(batch, torch):
    from sde_ray.losses import StepContext

    return StepContext(progress=0.3, target_ids=batch["target_id"], generator=torch.Generator().manual_seed(1))


def stage_gradcache(device, sizes, stage: int) -> dict:
    """Two GradCache steps on the device's engine against two plain fp32 steps on the CPU."""
    import torch

    from sde_ray.config import load_config
    from sde_ray.train.deepspeed_config import build_deepspeed_config
    from sde_ray.train.engine import build_engine, build_train_module, parameter_groups, seed_everything
    from sde_ray.train.step import train_step

    rows = sizes["vlm_rows"]
    overrides = ["model.kind=vlm", "model.name_or_path=tiny-qwen2-vl", "model.lora.enabled=true", "model.lora.dropout=0.0",
                 "model.gradient_checkpointing=true", "loss.name=sde", "loss.learnable_temperature=true",
                 f"train.global_batch_size={rows}", f"train.micro_batch_size={rows // 2}", *ADAM]
    config = load_config(None, [*overrides, "deepspeed.precision=bf16", f"deepspeed.zero_stage={stage}"])
    batches = _batches(config, 2, rows)

    seed_everything(0)
    module = build_train_module(config)
    start = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    engine = build_engine(module, build_deepspeed_config(config, 1))
    losses = []
    for batch in batches:
        inputs = {k: v.to(engine.device) for k, v in batch.items()}
        result = train_step(engine, inputs, _context(inputs, torch), rows // 2, 1)
        losses.append(result.loss if result.finite else float("nan"))
    from deepspeed.utils import safe_get_full_fp32_param

    # The fp32 master weights: a bf16 copy would round small updates away.
    weights = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters() if p.requires_grad}

    # The reference: fp32 on the CPU, one graph per batch, torch's AdamW with the engine's settings.
    seed_everything(0)
    reference = build_train_module(load_config(None, overrides)).train()
    # Its own start: a bf16 build's LoRA adapters are initialised in bf16 (then kept in fp32), an fp32
    # build's in fp32, so the two begin a bf16 rounding apart.
    reference_start = {n: p.detach().clone() for n, p in reference.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(parameter_groups(reference, 0.0, 0.01)[0], lr=0.01, betas=(config.train.adam_beta1,
                                  config.train.adam_beta2), eps=1.0, weight_decay=0.0)
    want_losses = []
    for batch in batches:
        query, target = reference(batch)
        loss, _ = reference.objective(query.float(), target.float(), _context(batch, torch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        want_losses.append(float(loss.detach()))
    # One relative error over every trainable tensor's update together: some adapters barely move in
    # two steps (LoRA's zero-initialised B leaves A's first gradient at 0), where a per-tensor ratio
    # would compare rounding noise.
    names = [name for name, p in reference.named_parameters() if p.requires_grad]
    # The engine's fp32 master copy starts from the bf16-rounded weights: its move is measured from there.
    begin = {n: start[n].to(torch.bfloat16).float() for n in names}
    moved = torch.cat([(weights[n].float().cpu().reshape(start[n].shape) - begin[n]).flatten() for n in names])
    want = torch.cat([(p.detach() - reference_start[n]).flatten()
                      for n, p in reference.named_parameters() if n in names])
    worst = relative_error(moved, want)
    loss_error = max(abs(a - b) / abs(b) for a, b in zip(losses, want_losses))
    return {"pass": engine.global_steps == 2 and worst < 0.1 and loss_error < 0.02, "losses": losses,
            "reference_losses": want_losses, "max_loss_rel_error": loss_error,
            "update_rel_error": worst, "trainable_tensors": len(names), "optimizer_steps": engine.global_steps}


def stage_eval_encoding(device, sizes) -> dict:
    import numpy as np

    from sde_ray.bench.models import _raw_batch
    from sde_ray.config import ModelConfig
    from sde_ray.eval.encode import ModelEncoder
    from sde_ray.models import BatchProcessor, build_model

    config = ModelConfig(name_or_path="tiny-clip")
    raw = _raw_batch(sizes["eval_rows"], config.image_size)
    requests = [("query", raw["qry_text"], raw["qry_image"]), ("target", raw["pos_text"], raw["pos_image"])]
    processor = BatchProcessor(config)
    precision = "bf16" if device == "cuda" else "fp32"
    got = ModelEncoder(build_model(config, seed=0), processor, 16, device, precision).encode(requests)
    want = ModelEncoder(build_model(config, seed=0), processor, 16, "cpu", "fp32").encode(requests)
    cosines = [float(np.min(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))
               for a, b in zip(got, want)]
    return {"pass": min(cosines) > 0.99, "precision": precision, "min_cosine_to_cpu_fp32": min(cosines),
            "rows": 2 * len(raw["qry_text"])}


def clip_folder(directory: Path, sizes) -> Path:
    """A randomly initialised CLIP of the given sizes saved as a `from_pretrained` folder, with the
    tiny CLIP tokenizer and a CLIP image processor at its resolution (nothing is downloaded)."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from sde_ray.models.tiny import CLIP_TOKENS, build_tiny_tokenizer

    v, t = sizes["clip_vision"], sizes["clip_text"]
    tokenizer = build_tiny_tokenizer(CLIP_TOKENS, t["tokens"])
    config = CLIPConfig(
        text_config=dict(hidden_size=t["width"], intermediate_size=4 * t["width"], num_hidden_layers=t["layers"],
                         num_attention_heads=t["heads"], max_position_embeddings=t["tokens"],
                         vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=v["width"], intermediate_size=4 * v["width"], num_hidden_layers=v["layers"],
                           num_attention_heads=v["heads"], image_size=v["image"], patch_size=v["patch"]),
        projection_dim=sizes["clip_projection"])
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    side = v["image"]
    CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(
        directory)
    return directory


def tower_flops(layers: int, width: int, mlp: int, tokens: int) -> float:
    """Forward FLOPs of one sample through a transformer tower (2 per multiply-add)."""
    return layers * (2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width)


def clip_step_flops_per_sample(hf_config, text_tokens: int) -> float:
    """Forward + backward (3× forward) FLOPs of one pair: both towers, patch embedding, projections."""
    v, t, projection = hf_config.vision_config, hf_config.text_config, hf_config.projection_dim
    patches = (v.image_size // v.patch_size) ** 2
    vision = tower_flops(v.num_hidden_layers, v.hidden_size, v.intermediate_size, patches + 1)
    vision += 2 * patches * 3 * v.patch_size ** 2 * v.hidden_size + 2 * v.hidden_size * projection
    text = tower_flops(t.num_hidden_layers, t.hidden_size, t.intermediate_size, text_tokens)
    return 3.0 * (vision + text + 2 * t.hidden_size * projection)


def stage_clip_throughput(device, sizes) -> dict:
    import torch

    from sde_ray.bench.models import _raw_batch
    from sde_ray.config import load_config
    from sde_ray.models import BatchProcessor
    from sde_ray.train.deepspeed_config import build_deepspeed_config
    from sde_ray.train.engine import build_engine, build_train_module, seed_everything
    from sde_ray.train.step import train_step

    cuda = device == "cuda"
    batch_size, steps = sizes["clip_batch"], sizes["clip_steps"]
    with tempfile.TemporaryDirectory(prefix="device_check_clip_") as directory:
        folder = clip_folder(Path(directory), sizes)
        config = load_config(None, [f"model.name_or_path={folder}", "loss.name=infonce",
                                    f"model.max_text_length={sizes['clip_text']['tokens']}",
                                    f"train.global_batch_size={batch_size}", "deepspeed.zero_stage=0",
                                    f"deepspeed.precision={'bf16' if cuda else 'fp32'}"])
        seed_everything(0)
        module = build_train_module(config)
        hf_config = module.model.hf_model().config
        raw = _raw_batch(batch_size, sizes["clip_vision"]["image"])
        batch = {k: torch.as_tensor(v, device="cpu") for k, v in BatchProcessor(config.model)(raw).items()}
    engine = build_engine(module, build_deepspeed_config(config, 1))
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    text_tokens = int(batch["pos_attention_mask"].any(0).sum())

    def step():
        return train_step(engine, batch, _context(batch, torch), batch_size, 1)

    for _ in range(sizes["clip_warmup"]):
        step()
    syncs = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message).lower() for w in caught)
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = [step() for _ in range(steps)]
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    achieved = clip_step_flops_per_sample(hf_config, text_tokens) * batch_size / seconds / 1e12
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None) if cuda else None
    return {"pass": all(r.finite for r in results) and engine.global_steps == steps + sizes["clip_warmup"] + bool(cuda),
            "parameters": sum(p.numel() for p in engine.module.parameters()), "batch": batch_size,
            "step_s": seconds, "samples_per_s": batch_size / seconds, "achieved_tflops": achieved,
            "peak_bf16_tflops": peak, "mfu": achieved / peak if peak else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
            "host_syncs_per_step": syncs}


SIZES = {
    # ViT-B/16 and its text tower (77 tokens, width 512) on one GPU; a few-second toy on the CPU.
    "cuda": {"features": (1024, 256), "vlm_rows": 8, "eval_rows": 64, "clip_batch": 256, "clip_steps": 20,
             "clip_warmup": 3, "clip_projection": 512,
             "clip_vision": {"width": 768, "layers": 12, "heads": 12, "image": 224, "patch": 16},
             "clip_text": {"width": 512, "layers": 12, "heads": 8, "tokens": 77}},
    "cpu": {"features": (64, 32), "vlm_rows": 4, "eval_rows": 8, "clip_batch": 8, "clip_steps": 2,
            "clip_warmup": 1, "clip_projection": 32,
            "clip_vision": {"width": 32, "layers": 2, "heads": 2, "image": 32, "patch": 8},
            "clip_text": {"width": 32, "layers": 2, "heads": 2, "tokens": 16}},
}
STAGES = {
    "objective": stage_objective,
    "gradcache_zero2": lambda device, sizes: stage_gradcache(device, sizes, 2),
    "gradcache_zero3": lambda device, sizes: stage_gradcache(device, sizes, 3),
    "eval_encoding": stage_eval_encoding,
    "clip_throughput": stage_clip_throughput,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed is imported
    else:
        os.environ.pop("DS_ACCELERATOR", None)
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("device_check: --device cuda but torch.cuda.is_available() is False")
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    start_process_group(args.device)
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "versions": {}}
    for package in ("torch", "transformers", "deepspeed", "peft"):
        try:
            report["versions"][package] = __import__(package).__version__
        except ImportError as error:
            report["versions"][package] = f"missing: {error}"
    report["stages"] = {}
    for name in args.stages.split(","):
        began = time.perf_counter()
        try:
            outcome = STAGES[name](args.device, SIZES[args.device])
        except Exception as error:  # noqa: BLE001 - a failed stage is reported, the others still run
            outcome = {"pass": False, "error": f"{type(error).__name__}: {error}",
                       "traceback": traceback.format_exc(limit=-6)}
        outcome["seconds"] = time.perf_counter() - began
        report["stages"][name] = outcome
        print(f"device_check: {name}: {'pass' if outcome['pass'] else 'FAIL'} ({outcome['seconds']:.1f} s)",
              file=sys.stderr, flush=True)
    report["pass"] = all(stage["pass"] for stage in report["stages"].values())
    text = json.dumps(report, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
