"""CLIP / SigLIP dual encoders: a text tower and an image tower with projections to one space.

A side with text and an image (an MMEB query such as "<|image_1|> Represent the given image with the
following question: ...") is embedded as the sum of its text and image embeddings, the score-level
fusion of VLM2Vec's CLIP baseline (UniIR's CLIP_SF): with both embeddings L2-normalised downstream,
the dot product of a fused query with a target adds the two modalities' similarities. Text is always
encoded (after removing the placeholder); the image term is added only for rows that have one.

Besides CLIP and SigLIP checkpoints, a dual encoder can be assembled from any HF vision checkpoint and
any text checkpoint (transformers' VisionTextDualEncoderModel, `model.vision_name_or_path` +
`model.text_name_or_path`). Its towers are pooled by `model.pooling`: the first token (cls) or the
attention-masked mean of the last hidden states (mean, sentence-transformers' pooling), then the
model's linear projections.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sde_ray.models.embedder import Embedder, token_span, trim_padding, vision_keepalive


def _head_text(model, input_ids, attention_mask, pooling):
    return model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def _head_image(model, pixel_values, pooling):
    return model.get_image_features(pixel_values=pixel_values).pooler_output


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """First token (cls) or the mask-weighted mean over positions (mean) of (B, L, H) hidden states."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling != "mean":
        raise ValueError(f"model.pooling must be cls or mean, got {pooling!r}")
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _assembled_text(model, input_ids, attention_mask, pooling):
    hidden = model.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return model.text_projection(pool(hidden, attention_mask, pooling))


def _assembled_image(model, pixel_values, pooling):
    hidden = model.vision_model(pixel_values=pixel_values).last_hidden_state
    return model.visual_projection(pool(hidden, None, pooling))


@dataclass(frozen=True)
class Family:
    embed_dim: Callable  # HF config -> joint embedding width
    causal_text: bool  # causal, masked text tower: padding columns can be trimmed exactly
    text_features: Callable = _head_text  # (model, ids, mask, pooling) -> (B, D)
    image_features: Callable = _head_image  # (model, pixel_values, pooling) -> (B, D)


DUAL_ENCODER_TYPES: dict[str, Family] = {
    "clip": Family(lambda config: config.projection_dim, causal_text=True),
    # SigLIP's text tower is bidirectional and pools the last position of the padded sequence.
    "siglip": Family(lambda config: config.text_config.hidden_size, causal_text=False),
    # Bidirectional text towers (BERT) with masked pooling: trailing pads change no real token, but
    # trimming is left to the causal families.
    "vision-text-dual-encoder": Family(
        lambda config: config.projection_dim,
        causal_text=False,
        text_features=_assembled_text,
        image_features=_assembled_image,
    ),
}


def dual_encoder_embed_dim(hf_config) -> int:
    return DUAL_ENCODER_TYPES[hf_config.model_type].embed_dim(hf_config)


class DualEncoder(Embedder):
    def encode_side(self, batch: dict, prefix: str) -> torch.Tensor:
        input_ids, attention_mask, pixel_values, has_image = self.side_inputs(batch, prefix)
        model = self.backbone
        family = DUAL_ENCODER_TYPES[model.config.model_type]
        pooling = self.model_config.pooling
        if family.causal_text:
            span = token_span(batch, prefix, attention_mask)
            input_ids, attention_mask = trim_padding(input_ids, attention_mask, span)
        text = family.text_features(model, input_ids, attention_mask, pooling)
        rows = has_image.nonzero().squeeze(1)  # on the host: the batch's per-row fact
        if rows.numel() == 0:
            return text + vision_keepalive(lambda px: family.image_features(model, px, pooling), pixel_values)
        rows = rows.to(text.device)  # a host-to-device copy: nothing waits
        image = family.image_features(model, pixel_values.index_select(0, rows), pooling)
        return text.index_add(0, rows, image.to(text.dtype))
