"""CLIP / SigLIP dual encoders: a text tower and an image tower with projections to one space.

A side with text and an image (an MMEB query such as "<|image_1|> Represent the given image with the
following question: ...") is embedded as the sum of its text and image embeddings, the score-level
fusion of VLM2Vec's CLIP baseline (UniIR's CLIP_SF): with both embeddings L2-normalised downstream,
the dot product of a fused query with a target adds the two modalities' similarities. Text is always
encoded (after removing the placeholder); the image term is added only for rows that have one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sde_ray.models.embedder import Embedder, trim_padding, vision_keepalive


@dataclass(frozen=True)
class Family:
    embed_dim: Callable  # HF config -> joint embedding width
    causal_text: bool  # causal, masked text tower: padding columns can be trimmed exactly


DUAL_ENCODER_TYPES: dict[str, Family] = {
    "clip": Family(lambda config: config.projection_dim, causal_text=True),
    # SigLIP's text tower is bidirectional and pools the last position of the padded sequence.
    "siglip": Family(lambda config: config.text_config.hidden_size, causal_text=False),
}


def dual_encoder_embed_dim(hf_config) -> int:
    return DUAL_ENCODER_TYPES[hf_config.model_type].embed_dim(hf_config)


class DualEncoder(Embedder):
    def encode_side(self, batch: dict, prefix: str) -> torch.Tensor:
        input_ids, attention_mask, pixel_values, has_image = self.side_inputs(batch, prefix)
        model = self.backbone
        if DUAL_ENCODER_TYPES[model.config.model_type].causal_text:
            input_ids, attention_mask = trim_padding(input_ids, attention_mask)
        text = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        rows = has_image.nonzero().squeeze(1)
        if rows.numel() == 0:
            return text + vision_keepalive(
                lambda px: model.get_image_features(pixel_values=px).pooler_output, pixel_values
            )
        image = model.get_image_features(pixel_values=pixel_values[rows]).pooler_output
        return text.index_add(0, rows, image.to(text.dtype))
