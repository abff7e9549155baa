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


def _assemble_dual_encoder(config: ModelConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """VisionTextDualEncoderModel from two checkpoints; projection_dim 0: identity-initialised text width."""
    from transformers import AutoConfig, VisionTextDualEncoderModel

    text_width = AutoConfig.from_pretrained(config.text_name_or_path).hidden_size
    width = config.projection_dim or text_width
    model = VisionTextDualEncoderModel.from_vision_text_pretrained(
        config.vision_name_or_path, config.text_name_or_path, projection_dim=width, dtype=dtype
    )
    if not config.projection_dim:
        with torch.no_grad():  # start from the towers' own pooled embeddings where the shapes allow
            for projection in (model.text_projection, model.visual_projection):
                if projection.weight.shape[0] == projection.weight.shape[1]:
                    projection.weight.copy_(torch.eye(width, device=projection.weight.device))
    return model


def _load_backbone(config: ModelConfig, tokenizer, dtype: torch.dtype) -> nn.Module:
    if config.vision_name_or_path:
        return _assemble_dual_encoder(config, dtype)
    if config.name_or_path in TINY_MODELS:
        return tiny_backbone(config.name_or_path, config, tokenizer).to(dtype)
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(config.name_or_path)
    _check_model_type(config, hf_config.model_type)  # before loading any weights
    auto = getattr(transformers, KINDS[config.kind].auto_class)
    # Straight into the training dtype (DeepSpeed keeps fp32 master copies of the trainable weights
    # only): a 7B in bf16 holds 15 GB of host memory while it loads, not 30 in fp32 then a cast.
    # transformers 5 loads shard by shard onto an empty model (low_cpu_mem_usage is its default).
    return auto.from_pretrained(config.name_or_path, config=hf_config, dtype=dtype)


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


def build_model(model_config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> Embedder:
    """The encoder of `model_config`. `seed` fixes every random initialisation (tiny weights, LoRA
    adapters) without touching torch's global RNG: pass the same seed on every rank. The backbone's
    weights are loaded in `dtype` (the training precision: no fp32 copy of a bf16 run's backbone);
    tiny models are initialised in fp32 and cast, so every dtype starts from the same values."""
    if model_config.kind not in KINDS:
        raise ValueError(f"model.kind={model_config.kind!r}; expected one of {', '.join(KINDS)}.")
    tokenizer, image_processor = load_processors(model_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = _load_backbone(model_config, tokenizer, dtype)
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
    dtype = next(backbone.parameters()).dtype  # one copy in the training dtype, not an fp32 one
    source = getattr(transformers, KINDS[kind].auto_class).from_pretrained(str(export), dtype=dtype)
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


def weights_fingerprint(named_tensors) -> dict:
    """The content hash of `(name, tensor)` pairs: sha256 over each name, dtype, shape and bytes, in
    name order, and their element count. A checkpoint that holds the trainable parameters only
    records it for the frozen ones (the base it was trained on), so a resume or an export rebuilds
    them from the base and refuses another base. One pass over the bytes, read in place (no copy)."""
    import hashlib

    digest, numel = hashlib.sha256(), 0
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        tensor = tensor.detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(memoryview(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        numel += tensor.numel()
    return {"sha256": digest.hexdigest(), "numel": numel}


def check_base(found: dict, base: dict) -> None:
    """Refuses a base whose frozen weights (`weights_fingerprint` of the rebuilt ones) are not the
    ones a checkpoint was trained on (`base`, as the checkpoint recorded it)."""
    if (found["sha256"], found["numel"]) != (base["sha256"], base["numel"]):
        raise ValueError(
            f"the frozen weights rebuilt from the base ({base.get('name_or_path', '?')}) differ from the ones "
            f"the checkpoint was trained on: sha256 {found['sha256'][:12]} ({found['numel']} values), "
            f"recorded {base['sha256'][:12]} ({base['numel']} values)")


def load_trained_weights(module: nn.Module, weights: dict[str, torch.Tensor], base: dict | None = None,
                         verify_base: bool = True) -> None:
    """Loads a checkpoint's `weights` into a freshly built `module`. Every key of `weights` must be
    the module's (shapes may differ only by a 0-dim <-> (1,) view); the keys it lacks are the frozen
    part, kept as built from the base the checkpoint names (`base`), whose content hash is checked
    here unless the caller checked it already (`verify_base=False`: the training loop hashes once,
    on rank 0). A full checkpoint (no key missing) needs no base."""
    own = module.state_dict()
    unknown = sorted(set(weights) - set(own))
    if unknown:
        raise KeyError(f"the checkpoint holds weights this model lacks: {unknown[:5]}")
    missing = [key for key in own if key not in weights]
    if missing and verify_base:
        if not base:
            raise KeyError(f"the checkpoint lacks weights of this model and names no base: {missing[:5]}")
        check_base(weights_fingerprint((key, own[key]) for key in missing), base)
    module.load_state_dict(match_shapes(weights, module), strict=not missing)


def match_shapes(weights: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """`weights` with each tensor viewed in the module's shape where only the shape differs
    (0-dim parameters travel through DeepSpeed as shape (1,))."""
    own = module.state_dict()
    return {
        key: value.reshape(own[key].shape) if key in own and value.shape != own[key].shape
        and value.numel() == own[key].numel() else value
        for key, value in weights.items()
    }


def count_parameters(model: nn.Module) -> dict[str, int]:
    """{"total", "trainable"} parameter counts (full sizes even when ZeRO-3 has partitioned them)."""
    total = trainable = 0
    for parameter in model.parameters():
        numel = getattr(parameter, "ds_numel", parameter.numel())
        total += numel
        trainable += numel if parameter.requires_grad else 0
    return {"total": total, "trainable": trainable}
