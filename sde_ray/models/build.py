"""Builds an encoder from `ModelConfig`, reloads an exported one, counts parameters.

The backbone comes from `from_pretrained(model.name_or_path)` through the Auto class of its kind
(the tiny names build one in code instead); then, in this order: unused heads are frozen, gradient
checkpointing is switched on, LoRA adapters are added, and the kind's wrapper goes around it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from sde_ray.config import LoraConfig, ModelConfig, from_dict
from sde_ray.models.dual_encoder import DUAL_ENCODER_TYPES, DualEncoder, dual_encoder_embed_dim
from sde_ray.models.embedder import EXPORT_FILE, Embedder
from sde_ray.models.processing import load_processors
from sde_ray.models.tiny import TINY_MODELS, tiny_backbone
from sde_ray.models.vlm import VLM_TYPES, VLMEmbedder, vlm_embed_dim


@dataclasses.dataclass(frozen=True)
class Kind:
    wrapper: type[Embedder]
    auto_class: str  # transformers Auto class that loads a checkpoint of this kind
    model_types: tuple[str, ...]
    embed_dim: Callable


KINDS: dict[str, Kind] = {
    "dual_encoder": Kind(DualEncoder, "AutoModel", tuple(DUAL_ENCODER_TYPES), dual_encoder_embed_dim),
    "vlm": Kind(VLMEmbedder, "AutoModelForImageTextToText", VLM_TYPES, vlm_embed_dim),
}


def _check_model_type(config: ModelConfig, model_type: str) -> None:
    supported = KINDS[config.kind].model_types
    if model_type not in supported:
        raise ValueError(
            f"model.name_or_path={config.name_or_path!r} is a {model_type!r} model; model.kind={config.kind} "
            f"supports {', '.join(supported)}."
        )


def _load_backbone(config: ModelConfig, tokenizer) -> nn.Module:
    if config.name_or_path in TINY_MODELS:
        return tiny_backbone(config.name_or_path, config, tokenizer)
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(config.name_or_path)
    _check_model_type(config, hf_config.model_type)  # before loading any weights
    auto = getattr(transformers, KINDS[config.kind].auto_class)
    # float32 master weights whatever the checkpoint stores; DeepSpeed casts for bf16/fp16.
    return auto.from_pretrained(config.name_or_path, config=hf_config, dtype=torch.float32)


def _check_compatible(config: ModelConfig, backbone: nn.Module) -> None:
    _check_model_type(config, backbone.config.model_type)
    if config.kind == "dual_encoder":
        limit = backbone.config.text_config.max_position_embeddings
        if config.max_text_length > limit:
            raise ValueError(
                f"model.max_text_length={config.max_text_length} exceeds the text tower's "
                f"{limit} positions ({config.name_or_path})."
            )


def _freeze_unused(backbone: nn.Module) -> None:
    """Parameters the embedder never uses would get no gradient (DeepSpeed/DDP dislike that)."""
    for name in ("logit_scale", "logit_bias"):  # CLIP/SigLIP contrastive heads; our loss has its own
        parameter = getattr(backbone, name, None)
        if isinstance(parameter, nn.Parameter):
            parameter.requires_grad_(False)
    output = backbone.get_output_embeddings()
    if (
        output is not None and output.weight is not backbone.get_input_embeddings().weight
    ):  # an untied LM head
        output.weight.requires_grad_(False)


def apply_lora(backbone: nn.Module, lora: LoraConfig) -> nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    linear_names = {
        name.rsplit(".", 1)[-1] for name, module in backbone.named_modules() if isinstance(module, nn.Linear)
    }
    if not set(lora.target_modules) & linear_names:
        raise ValueError(
            f"model.lora.target_modules={lora.target_modules} match no linear layer; this backbone's are "
            f"named {sorted(linear_names)}."
        )
    peft_config = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
    )
    return get_peft_model(backbone, peft_config)


def build_model(model_config: ModelConfig, seed: int = 0) -> Embedder:
    """The encoder of `model_config`. `seed` fixes every random initialisation (tiny weights, LoRA
    adapters) without touching torch's global RNG: pass the same seed on every rank."""
    if model_config.kind not in KINDS:
        raise ValueError(f"model.kind={model_config.kind!r}; expected one of {', '.join(KINDS)}.")
    tokenizer, image_processor = load_processors(model_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = _load_backbone(model_config, tokenizer)
        _check_compatible(model_config, backbone)
        _freeze_unused(backbone)
        if model_config.gradient_checkpointing:
            # Non-reentrant: works when the inputs need no grad (frozen embeddings under LoRA).
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if model_config.lora.enabled:
            backbone = apply_lora(backbone, model_config.lora)
    kind = KINDS[model_config.kind]
    embed_dim = kind.embed_dim(backbone.config)
    return kind.wrapper(backbone, tokenizer, image_processor, model_config, embed_dim)


def load_pretrained(directory: str | Path) -> tuple[Embedder, ModelConfig]:
    """Reloads a folder written by `model.save_pretrained`, through `from_pretrained(directory)`.
    The returned config names that folder, so `BatchProcessor(asdict(config))` reads the saved
    tokenizer and image processor. The model is in eval mode."""
    directory = Path(directory).resolve()
    meta_path = directory / EXPORT_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{directory} is not an sde_ray model export: {EXPORT_FILE} is missing.")
    meta = json.loads(meta_path.read_text())
    config = from_dict(meta["model_config"], ModelConfig)
    config = dataclasses.replace(config, name_or_path=str(directory))
    model = build_model(config)
    model.eval()
    return model, config


def count_parameters(model: nn.Module) -> dict[str, int]:
    """{"total", "trainable"} parameter counts (full sizes even when ZeRO-3 has partitioned them)."""
    total = trainable = 0
    for parameter in model.parameters():
        numel = getattr(parameter, "ds_numel", parameter.numel())
        total += numel
        trainable += numel if parameter.requires_grad else 0
    return {"total": total, "trainable": trainable}
