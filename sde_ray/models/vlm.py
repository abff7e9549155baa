"""VLM2Vec-style embedder: a vision-language causal LM (Qwen2-VL, Qwen2.5-VL) read out at its last token.

The side's tokens (text with the image block `<|vision_start|><|image_pad|>…<|vision_end|>` where
MMEB had `<|image_1|>`) run through the backbone's own multimodal forward; the embedding is the
final hidden layer (after the last norm) at each row's last non-pad token, for either padding side.
Images arrive as fixed-size uint8 [3, H, W]; `Embedder.side_inputs` normalises them and they are
cut into the backbone's patch layout here.
"""

from __future__ import annotations

import torch
from torch import nn

from sde_ray.models.embedder import Embedder, trim_padding, vision_keepalive

# Same processor, patch layout, M-RoPE index and forward signature.
VLM_TYPES = ("qwen2_vl", "qwen2_5_vl")


def vlm_embed_dim(hf_config) -> int:
    return hf_config.text_config.hidden_size


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """hidden [B, L, D] at each row's last position with attention_mask == 1 (left or right padding)."""
    length = attention_mask.shape[1]
    last = length - 1 - attention_mask.flip(1).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def patchify_qwen2_vl(images: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int):
    """[N, C, H, W] → (patches [N·gh·gw, C·T·P·P], grid_thw [N, 3]) in the Qwen2-VL image
    processor's layout: merge-blocks row-major, then the merge×merge patches inside each block;
    a still image is repeated T times along time."""
    n, c, h, w = images.shape
    p, m = patch_size, merge_size
    gh, gw = h // p, w // p
    x = images.reshape(n, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x.unsqueeze(6).expand(n, gh // m, gw // m, m, m, c, temporal_patch_size, p, p)
    patches = x.reshape(n * gh * gw, c * temporal_patch_size * p * p)
    grid = torch.tensor([[1, gh, gw]] * n, dtype=torch.long, device=images.device)
    return patches, grid


class VLMEmbedder(Embedder):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        hf = self.hf_model()
        vision = hf.config.vision_config
        self._patch = (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
        self._image_token_id = hf.config.image_token_id

    def _multimodal_model(self) -> nn.Module:
        # Qwen2VLForConditionalGeneration.model is the Qwen2VLModel (vision tower + language model);
        # calling it skips the LM head, which an embedder never needs.
        return self.hf_model().model

    def encode_side(self, batch: dict, prefix: str) -> torch.Tensor:
        input_ids, attention_mask, pixel_values, has_image = self.side_inputs(batch, prefix)
        input_ids, attention_mask = trim_padding(input_ids, attention_mask)
        model = self._multimodal_model()
        image_tokens = input_ids == self._image_token_id
        tokens_per_image = (
            pixel_values.shape[-2] * pixel_values.shape[-1] // (self._patch[0] * self._patch[1]) ** 2
        )
        if not torch.equal(image_tokens.sum(1), has_image.long() * tokens_per_image):
            raise ValueError(
                f"{prefix}: image-pad token counts {image_tokens.sum(1).tolist()} do not match has_image × "
                f"{tokens_per_image}; build the batch with a BatchProcessor of the same model config."
            )
        rows = has_image.nonzero().squeeze(1)
        patches = grid = None
        if rows.numel():
            patches, grid = patchify_qwen2_vl(pixel_values[rows], *self._patch)
        token_types = image_tokens.int()
        # Positions from the attention mask (pads skipped) for every batch, so a text-only row gets
        # the same positions whether or not other rows carry images.
        position_ids, _ = model.get_rope_index(
            input_ids, token_types, image_grid_thw=grid, attention_mask=attention_mask
        )
        # One module order whatever the chunk holds: token embedding, vision tower (the chunk's images,
        # or the keepalive's blank one), then the backbone with the language model. ZeRO-3 records the
        # order modules run in, fetches their parameters with collectives in that order and asserts it
        # is the same on every rank, so the image features are computed here and scattered into the
        # embeddings (as the backbone's own forward does), not inside the backbone's call.
        inputs_embeds = model.get_input_embeddings()(input_ids)
        keepalive = None
        if patches is not None:
            image_embeds = torch.cat(list(model.get_image_features(patches, grid).pooler_output))
            image_embeds = image_embeds.to(inputs_embeds.device, inputs_embeds.dtype)
            image_mask, _ = model.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds,
                                                       image_features=image_embeds)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, image_embeds)
        else:
            keepalive = vision_keepalive(
                lambda px: model.get_image_features(*patchify_qwen2_vl(px, *self._patch)).pooler_output,
                pixel_values,
            )
        hidden = model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            mm_token_type_ids=token_types,
            use_cache=False,
        ).last_hidden_state
        features = last_token_pool(hidden, attention_mask)
        return features if keepalive is None else features + keepalive
