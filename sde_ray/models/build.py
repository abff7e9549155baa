"""Builds an encoder from `ModelConfig`, reloads an exported one, counts parameters.

The backbone comes from `from_pretrained(model.name_or_path)` through the Auto class of its kind
(the tiny names build one in code instead); then, in this order: unused heads are frozen, gradient
checkpointing is switched on, LoRA adapters are added, and the kind's wrapper goes around it.
With `model.vision_name_or_path` + `model.text_name_or_path` the backbone is a VisionTextDualEncoderModel
assembled from the two towers' `from_pretrained`. With `model.init_from` the weights of an exported
model are copied in before LoRA (a warm start: the architecture must match, checked key by key).
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


def _assemble_dual_encoder(config: ModelConfig) -> nn.Module:
    """VisionTextDualEncoderModel from two checkpoints; projection_dim 0: identity-initialised text width."""
    from transformers import AutoConfig, VisionTextDualEncoderModel

    text_width = AutoConfig.from_pretrained(config.text_name_or_path).hidden_size
    width = config.projection_dim or text_width
    model = VisionTextDualEncoderModel.from_vision_text_pretrained(
        config.vision_name_or_path, config.text_name_or_path, projection_dim=width, dtype=torch.float32
    )
    if not config.projection_dim:
        with torch.no_grad():  # start from the towers' own pooled embeddings where the shapes allow
            for projection in (model.text_projection, model.visual_projection):
                if projection.weight.shape[0] == projection.weight.shape[1]:
                    projection.weight.copy_(torch.eye(width, device=projection.weight.device))
    return model


def _load_backbone(config: ModelConfig, tokenizer) -> nn.Module:
    if config.vision_name_or_path:
        return _assemble_dual_encoder(config)
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
    for tower in ("text_model", "vision_model"):  # assembled encoders pool last_hidden_state themselves
        pooler = getattr(getattr(backbone, tower, None), "pooler", None) if backbone.config.model_type == "vision-text-dual-encoder" else None
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)
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
        if model_config.init_from:
            warm_start(backbone, model_config.init_from)
        _freeze_unused(backbone)
        if model_config.gradient_checkpointing:
            # Non-reentrant: works when the inputs need no grad (frozen embeddings under LoRA).
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if model_config.lora.enabled:
            backbone = apply_lora(backbone, model_config.lora)
    kind = KINDS[model_config.kind]
    embed_dim = kind.embed_dim(backbone.config)
    return kind.wrapper(backbone, tokenizer, image_processor, model_config, embed_dim)


def resolve_export(path: str | Path) -> Path:
    """The model export named by `path`: an export folder itself, or a run directory's `model/`."""
    path = Path(path).expanduser().resolve()
    for candidate in (path, path / "model"):
        if (candidate / EXPORT_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"model.init_from={str(path)!r} is neither a model export ({EXPORT_FILE}) nor a run directory with one in model/."
    )


def warm_start(backbone: nn.Module, init_from: str | Path) -> None:
    """Copies the exported backbone weights of `init_from` into `backbone` (same architecture)."""
    import transformers

    export = resolve_export(init_from)
    meta = json.loads((export / EXPORT_FILE).read_text())
    kind = meta["model_config"]["kind"]
    source = getattr(transformers, KINDS[kind].auto_class).from_pretrained(str(export), dtype=torch.float32)
    theirs, ours = source.state_dict(), backbone.state_dict()
    missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    mismatched = [k for k in ours if k in theirs and theirs[k].shape != ours[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"model.init_from={str(export)!r} does not match the configured architecture: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {mismatched[:5]}."
        )
    backbone.load_state_dict(theirs, strict=True)


def export_config(directory: str | Path) -> ModelConfig:
    """The `ModelConfig` of a folder written by `model.save_pretrained`, naming that folder (so
    `BatchProcessor(config)` reads the saved tokenizer and image processor)."""
    directory = Path(directory).resolve()
    meta_path = directory / EXPORT_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{directory} is not an sde_ray model export: {EXPORT_FILE} is missing.")
    meta = json.loads(meta_path.read_text())
    config = from_dict(meta["model_config"], ModelConfig)
    # The export is self-contained: no tower assembly, no warm start on reload.
    return dataclasses.replace(
        config, name_or_path=str(directory), vision_name_or_path="", text_name_or_path="", init_from=""
    )


def load_pretrained(directory: str | Path) -> tuple[Embedder, ModelConfig]:
    """Reloads a folder written by `model.save_pretrained`, through `from_pretrained(directory)`.
    The returned config names that folder, so `BatchProcessor(config)` reads the saved
    tokenizer and image processor. The model is in eval mode."""
    config = export_config(directory)
    model = build_model(config)
    adapter = json.loads((Path(directory) / EXPORT_FILE).read_text()).get("lora_adapter", "")
    if adapter:  # LoRA kept as an adapter: applied to the base weights and merged for inference
        from peft import PeftModel

        model.backbone = PeftModel.from_pretrained(model.backbone, str(Path(directory) / adapter)).merge_and_unload()
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
