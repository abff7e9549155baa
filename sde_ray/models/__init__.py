"""Single-device encoders (pure torch + transformers/peft; no Ray, no DeepSpeed).

- `build_model(model_config, seed=0)`: a CLIP/SigLIP dual encoder or a Qwen2-VL / Qwen2.5-VL /
  Qwen3-VL last-token embedder with `encode_side(batch, prefix) -> [B, D]`, `forward(batch) -> (query, target)`, `embed_dim` and
  `save_pretrained(dir)`.
- `load_pretrained(dir) -> (model, model_config)` reloads an export; `warm_start` / `resolve_export`
  serve `model.init_from`.
- `BatchProcessor(model_config)`: raw MMEB batch -> fixed-shape numpy arrays (Ray Data actors);
  `pack_patches` packs a VLM side's padded patches as the Hugging Face processors do;
  `is_host_fact(key)`: the batch's per-row facts the model reads on the host, where
  `to_model_inputs(batch, device, float_dtype)` leaves them when it moves a batch to the device.
- `count_parameters(model) -> {"total", "trainable"}`.
- `weights_fingerprint`, `check_base`, `load_trained_weights`: a checkpoint that holds the trainable
  weights only names its base by a content hash of the frozen ones, and is loaded onto a rebuilt base.

The names `tiny-clip`, `tiny-siglip`, `tiny-qwen2-vl`, `tiny-qwen2.5-vl`, `tiny-qwen3-vl` build small
random models in code; any other `model.name_or_path` goes through `from_pretrained`. See docs/models.md.
"""

from sde_ray.models.build import (
    KINDS,
    apply_lora,
    build_model,
    check_base,
    count_parameters,
    export_config,
    load_pretrained,
    load_trained_weights,
    resolve_export,
    warm_start,
    weights_fingerprint,
)
from sde_ray.models.dual_encoder import DualEncoder
from sde_ray.models.embedder import Embedder, is_host_fact, tower_of
from sde_ray.models.inputs import to_model_inputs
from sde_ray.models.processing import BatchProcessor, decode_image
from sde_ray.models.tiny import TINY_MODELS
from sde_ray.models.vlm import VLMEmbedder, last_token_pool, pack_patches

__all__ = [
    "KINDS",
    "TINY_MODELS",
    "BatchProcessor",
    "DualEncoder",
    "Embedder",
    "VLMEmbedder",
    "apply_lora",
    "build_model",
    "check_base",
    "count_parameters",
    "decode_image",
    "export_config",
    "is_host_fact",
    "last_token_pool",
    "load_pretrained",
    "load_trained_weights",
    "pack_patches",
    "resolve_export",
    "to_model_inputs",
    "tower_of",
    "warm_start",
    "weights_fingerprint",
]
