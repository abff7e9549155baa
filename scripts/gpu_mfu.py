"""Throughput, peak memory and MFU of a CLIP ViT-B/16-sized dual encoder on one CUDA GPU.

The model is built from a `transformers` CLIPConfig with ViT-B/16's sizes (vision: 224 px, patch
16, width 768, 12 layers; text: 77 tokens, width 512, 12 layers; projection 512), randomly
initialised, so nothing is downloaded. One training step = both towers forward under bf16
autocast, symmetric InfoNCE over the batch, backward, AdamW step. FLOPs are counted from the
config (matmuls of every layer, attention scores, patch embedding and projections; backward = 2×
forward), MFU = achieved FLOP/s / the device's dense bf16 peak (`PEAK_TFLOPS` overrides the table).

    python scripts/gpu_mfu.py [--batch 256] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets (SXM parts).
PEAK_BF16_TFLOPS = {"H200": 989.5, "H100": 989.5, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def vit_b16_config():
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                         max_position_embeddings=77, vocab_size=49408),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=16),
        projection_dim=512,
    )


def tower_flops(layers: int, width: int, mlp: int, tokens: int) -> float:
    """Forward FLOPs of one sample through a transformer tower (2 per multiply-add)."""
    qkvo = 4 * width * width
    per_layer = 2 * tokens * (qkvo + 2 * width * mlp) + 2 * 2 * tokens * tokens * width
    return layers * per_layer


def step_flops_per_sample(config) -> float:
    v, t = config.vision_config, config.text_config
    patches = (v.image_size // v.patch_size) ** 2
    vision = tower_flops(v.num_hidden_layers, v.hidden_size, v.intermediate_size, patches + 1)
    vision += 2 * patches * 3 * v.patch_size**2 * v.hidden_size + 2 * v.hidden_size * config.projection_dim
    text = tower_flops(t.num_hidden_layers, t.hidden_size, t.intermediate_size, t.max_position_embeddings)
    text += 2 * t.hidden_size * config.projection_dim
    return 3.0 * (vision + text)  # forward + backward (2× forward)


def peak_tflops(name: str) -> float | None:
    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"])
    return next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)


def main() -> None:
    from transformers import CLIPModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_mfu.py needs a CUDA GPU")
    device = torch.device("cuda")
    config = vit_b16_config()
    model = CLIPModel(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    pixels = torch.randn(args.batch, 3, 224, 224, device=device)
    ids = torch.randint(0, 49407, (args.batch, 77), device=device)
    labels = torch.arange(args.batch, device=device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            image = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels), dim=-1)
            text = torch.nn.functional.normalize(model.get_text_features(input_ids=ids), dim=-1)
            logits = (image @ text.T).float() / 0.07
        loss = (torch.nn.functional.cross_entropy(logits, labels)
                + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    name = torch.cuda.get_device_name(device)
    achieved = step_flops_per_sample(config) * args.batch / seconds / 1e12
    peak = peak_tflops(name)
    result = {
        "model": "CLIP ViT-B/16-sized (random init)",
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": name,
        "batch": args.batch,
        "step_s": seconds,
        "samples_per_s": args.batch / seconds,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "achieved_tflops": achieved,
        "peak_bf16_tflops": peak,
        "mfu": achieved / peak if peak else None,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
