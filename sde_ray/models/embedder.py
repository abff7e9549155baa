"""What every encoder shares: batch → tensors, the (query, target) forward, and export.

An `Embedder` wraps one Hugging Face backbone (optionally inside a peft LoRA wrapper) together with
its tokenizer and image processor. Subclasses implement only `encode_side(batch, prefix)`.

Pixels arrive as uint8 [B, 3, H, W] (the image processor's resize/crop only, see
sde_ray/models/processing.py) and are normalised here, on the model's device, with the image
processor's own rescale and normalisation: (x · rescale_factor − image_mean) / image_std in float32,
then cast to the parameters' dtype.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sde_ray.config import ModelConfig

EXPORT_FILE = "sde_ray_model.json"
EXPORT_FORMAT = 1
ADAPTER_DIR = "adapter"

# sentence-transformers (>= 5) reads a CLIP folder as one multimodal Transformer module: text through
# `get_text_features`, images through `get_image_features`, the pooled projections (what our dual
# encoder emits for a text-only or image-only item). These are the files its `save` writes for one.
_ST_CLIP_MODALITIES = {"text": {"method": "get_text_features", "method_output_name": "pooler_output"},
                       "image": {"method": "get_image_features", "method_output_name": "pooler_output"}}
SENTENCE_TRANSFORMERS_FILES: dict[str, dict[str, object]] = {
    "clip": {
        "modules.json": [{"idx": 0, "name": "0", "path": "",
                          "type": "sentence_transformers.base.modules.transformer.Transformer"}],
        "sentence_bert_config.json": {"transformer_task": "feature-extraction",
                                      "modality_config": _ST_CLIP_MODALITIES,
                                      "module_output_name": "sentence_embedding"},
        "config_sentence_transformers.json": {"model_type": "SentenceTransformer",
                                              "prompts": {"query": "", "document": ""},
                                              "default_prompt_name": None, "similarity_fn_name": "cosine"},
    },
}

PIXEL_CONTRACT = (
    "pixel values must be uint8 [B, 3, H, W], the image after the image processor's resize/crop and "
    "before rescale/normalisation, as sde_ray.models.BatchProcessor emits them (the model normalises)"
)


@dataclasses.dataclass(frozen=True)
class PixelNormalization:
    """The image processor's value steps, in its order: x · scale, then (x − mean) / std per channel."""

    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of(cls, image_processor: Any) -> PixelNormalization:
        """Read from the processor's `do_rescale`, `rescale_factor`, `do_normalize`, `image_mean`,
        `image_std` (a step switched off becomes the identity)."""
        name = type(image_processor).__name__

        def attribute(key: str) -> Any:
            value = getattr(image_processor, key, None)
            if value is None:
                raise ValueError(f"image processor {name} has no {key}; cannot normalise uint8 pixels.")
            return value

        scale = float(attribute("rescale_factor")) if attribute("do_rescale") else 1.0
        if not attribute("do_normalize"):
            return cls(scale, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        per_channel = []
        for key in ("image_mean", "image_std"):
            value = attribute(key)
            values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
            if len(values) != 3:
                raise ValueError(
                    f"image processor {name}: {key}={value!r}; expected one value or three (RGB)."
                )
            per_channel.append(tuple(values))
        return cls(scale, *per_channel)


class Embedder(nn.Module):
    """Base of the dual encoder and the VLM embedder (one level, no further hierarchy)."""

    def __init__(
        self, backbone: nn.Module, tokenizer: Any, image_processor: Any, config: ModelConfig, embed_dim: int
    ):
        super().__init__()
        self.backbone = backbone
        # Plain attributes, not submodules: they travel with the model for export only.
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_config = config
        self.embed_dim = embed_dim
        # Python floats, not buffers: state_dicts and exports stay the backbone's own, and a bf16 cast
        # of the module (DeepSpeed) cannot round them. Device copies are made once per device.
        self.pixel_normalization = PixelNormalization.of(image_processor)
        self._pixel_constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._inputs_checked = False  # see `inputs_checked`

    def encode_side(self, batch: dict, prefix: str) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(query features, target features), both [B, embed_dim], before L2 normalisation.

        With explicit negatives in the batch (`neg_*` arrays [B, K, ...]), the target features are
        [B·(1+K), embed_dim] in the per-query layout of `sde_ray.losses.infonce`: the objectives'
        input carries the negatives, and a chunk of rows carries its own."""
        query, target = self.encode_side(batch, "qry"), self.encode_side(batch, "pos")
        if "neg_input_ids" not in batch:
            return query, target
        from sde_ray.losses.infonce import with_negatives

        device = next(self.parameters()).device
        negatives = {key: torch.as_tensor(value, device="cpu" if is_host_fact(key) else device).flatten(0, 1)
                     for key, value in batch.items() if key.startswith("neg_") and key != "neg_target_id"}
        return query, with_negatives(target, self.encode_side(negatives, "neg"))

    # ------------------------------------------------------------------------------------------
    def hf_model(self) -> nn.Module:
        """The `transformers` model, seen through a peft wrapper if there is one."""
        get_base = getattr(self.backbone, "get_base_model", None)
        return get_base() if callable(get_base) else self.backbone

    def parameter_dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    def normalize_pixels(self, pixels: Any, key: str = "pixel_values") -> torch.Tensor:
        """uint8 [B, 3, H, W] (numpy or torch, any device) → the image processor's normalised pixels,
        computed in float32 on the model's device, returned in the parameters' dtype."""
        device = next(self.parameters()).device
        # To the device at once: the copy moves the uint8 bytes; the float32 image exists only there.
        pixels = torch.as_tensor(pixels, device=device)
        if pixels.dtype != torch.uint8:
            raise TypeError(f"model batch key '{key}' has dtype {pixels.dtype}; {PIXEL_CONTRACT}.")
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"model batch key '{key}' has shape {tuple(pixels.shape)}; {PIXEL_CONTRACT}.")
        if device not in self._pixel_constants:
            norm = self.pixel_normalization
            self._pixel_constants[device] = tuple(
                torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)
                for values in (norm.mean, norm.std)
            )
        mean, std = self._pixel_constants[device]
        x = pixels.to(torch.float32).mul_(self.pixel_normalization.scale)
        return x.sub_(mean).div_(std).to(self.parameter_dtype())

    def text_inputs(self, batch: dict, prefix: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, has_image) of one side: the tokens on the model's device, cut to
        the batch's real columns (`trim_padding`, causal towers only: `trim`), and `has_image` on the
        host (`host_fact`)."""
        device = next(self.parameters()).device
        names = [f"{prefix}_{key}" for key in ("input_ids", "attention_mask", "pixel_values", "has_image")]
        missing = [name for name in names if name not in batch]
        if missing:
            raise KeyError(f"model batch lacks {missing}; build it with sde_ray.models.BatchProcessor.")
        ids, mask = (torch.as_tensor(batch[names[i]], device=device) for i in (0, 1))
        return ids.long(), mask.long(), host_fact(batch, names[3]).bool()

    def inputs_checked(self) -> bool:
        """Whether this forward may skip the batch checks that read the device (a host sync each):
        they run on the model's first forward, and on every one under `model.check_inputs`."""
        checked, self._inputs_checked = self._inputs_checked, True
        return checked and not self.model_config.check_inputs

    def side_inputs(
        self, batch: dict, prefix: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, pixel_values, has_image) of one side, as tensors on the model's
        device; uint8 pixels come back normalised, in the model's dtype (bf16 under DeepSpeed bf16)."""
        ids, mask, has_image = self.text_inputs(batch, prefix)
        key = f"{prefix}_pixel_values"
        return ids, mask, self.normalize_pixels(batch[key], key), has_image

    # ------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, merge_lora: bool = True, in_place: bool = False) -> Path:
        """Writes a folder that `sde_ray.models.load_pretrained` (and plain `from_pretrained`) reads:
        the backbone, tokenizer, image processor and our ModelConfig. LoRA adapters are merged into
        the weights (`merge_lora`), or kept: the base weights at the top (what plain `from_pretrained`
        loads) and the adapter in `adapter/` (peft's `PeftModel.from_pretrained(base, dir/adapter)`).
        CLIP exports also get sentence-transformers' module files (`SENTENCE_TRANSFORMERS_FILES`).
        Call it on an unpartitioned model (with ZeRO-3, load consolidated weights into a fresh
        `build_model` first). The weights are written in the model's dtype. `in_place`: the adapters
        are merged into (or removed from) this model's own weights, with no second copy of the
        backbone; the model has no adapters afterwards (for a model about to be dropped)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        backbone = self.backbone
        has_lora = hasattr(backbone, "merge_and_unload")
        if has_lora:
            if not merge_lora:
                backbone.save_pretrained(directory / ADAPTER_DIR)
            if not in_place:  # merge a copy: the model keeps its adapters
                backbone = copy.deepcopy(backbone)
            # Merged: each adapted weight += B·A in its own dtype, layer by layer; else the base weights.
            backbone = backbone.merge_and_unload() if merge_lora else backbone.unload()
            if in_place:
                self.backbone = backbone
        backbone.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        if backbone.config.model_type in SENTENCE_TRANSFORMERS_FILES:
            for name, payload in SENTENCE_TRANSFORMERS_FILES[backbone.config.model_type].items():
                (directory / name).write_text(json.dumps(payload, indent=2) + "\n")
        # The folder is a whole checkpoint: it is loaded by name, never re-assembled or re-warm-started.
        config = dataclasses.replace(
            self.model_config,
            lora=dataclasses.replace(self.model_config.lora, enabled=False),
            vision_name_or_path="",
            text_name_or_path="",
            init_from="",
        )
        meta = {
            "format": EXPORT_FORMAT,
            "model_config": dataclasses.asdict(config),
            "source_name_or_path": self.model_config.name_or_path
            or f"{self.model_config.vision_name_or_path} + {self.model_config.text_name_or_path}",
            "lora_merged": has_lora and merge_lora,
            "lora_adapter": ADAPTER_DIR if has_lora and not merge_lora else "",
            "embed_dim": self.embed_dim,
        }
        (directory / EXPORT_FILE).write_text(json.dumps(meta, indent=2))
        return directory


# Parameter-name pieces of a vision tower: CLIP/SigLIP/assembled `vision_model.` and `visual_projection.`,
# Qwen2-VL's `model.visual.` (its patch embedding, blocks and merger). Everything else in a backbone is
# the text side (a VLM's language model).
VISION_TOWER_MARKERS = ("vision_model.", "visual_projection.", "visual.")


def tower_of(parameter_name: str) -> str:
    """"vision" or "text": the tower a backbone parameter belongs to (any prefix, a LoRA wrapper's too)."""
    return "vision" if any(marker in parameter_name for marker in VISION_TOWER_MARKERS) else "text"


# The per-row facts of a side the BatchProcessor computes on the host (`{prefix}<suffix>`): the model
# reads them there, so a forward never waits on the device to learn them. The training loop keeps
# them on the host when it moves a batch (`sde_ray.models.to_model_inputs`).
HOST_FACT_SUFFIXES = ("_has_image", "_token_span", "_image_grid_thw", "_video_grid_thw")


def is_host_fact(key: str) -> bool:
    return key.endswith(HOST_FACT_SUFFIXES)


def host_fact(batch: dict, key: str) -> torch.Tensor:
    """`batch[key]` as a CPU tensor. From the BatchProcessor it is one (numpy, or kept on the host by
    the loop); a batch built by hand with device tensors pays one host sync here."""
    return torch.as_tensor(batch[key], device="cpu")


def token_span(batch: dict, prefix: str, attention_mask: torch.Tensor) -> tuple[int, int]:
    """(first, one past the last) column any row of the side uses: from the rows' `{prefix}_token_span`
    on the host, or, for a batch without it (built by hand), from the mask (one host sync)."""
    key = f"{prefix}_token_span"
    if key in batch:
        spans = host_fact(batch, key)
        used = spans[:, 1] > spans[:, 0]
        if not bool(used.any()):
            return 0, attention_mask.shape[1]
        return int(spans[used, 0].min()), int(spans[used, 1].max())
    used = attention_mask.any(dim=0).nonzero()
    if used.numel() == 0:
        return 0, attention_mask.shape[1]
    return int(used[0]), int(used[-1]) + 1


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 span: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Drops the columns outside `span` (`token_span`): those that are padding in every row
    (trailing for right padding, leading for left).

    Batches arrive padded to a fixed max length; most rows are far shorter. For a causal tower with
    an attention mask (CLIP's text tower, a decoder LM) no real token sees a pad, so the result is
    unchanged and the cost falls with the real length. Not for bidirectional towers that pool at a
    fixed position (SigLIP)."""
    start, end = span
    return input_ids[:, start:end], attention_mask[:, start:end]


def vision_keepalive(run_vision: Callable[[torch.Tensor], Any], pixel_values: torch.Tensor) -> torch.Tensor:
    """A zero that depends on every vision parameter, for batches with no image at all.

    Running the vision tower once on a blank image keeps the set of modules run (and parameters
    with gradients) the same on every rank and step, which ZeRO-3's parameter gathering and
    DDP-style gradient reduction both rely on."""
    blank = torch.zeros_like(pixel_values[:1])
    out = run_vision(blank)
    parts = out if isinstance(out, (tuple, list)) else (out,)
    return 0.0 * sum(part.float().sum() for part in parts)
