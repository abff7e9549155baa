"""Tiny, randomly initialised backbones built entirely in code (no downloads).

`tiny-clip`, `tiny-siglip`, `tiny-qwen2-vl`, `tiny-qwen2.5-vl` and `tiny-qwen3-vl` are real
`transformers` models (CLIPModel, SiglipModel, Qwen2VL/Qwen2_5_VL/Qwen3VLForConditionalGeneration)
with small configs, each paired with a real tokenizer
(a byte-level BPE trained deterministically on the built-in corpus below, so it encodes any text and
gives the same ids in every process) and the family's real image processor. They go through the
same processor → model → embedding path as a downloaded checkpoint, and once saved with
`save_pretrained` they reload through the ordinary `from_pretrained` path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from sde_ray.config import ModelConfig

TINY_VOCAB_SIZE = 512
TINY_HIDDEN = 64
TINY_LAYERS = 2
TINY_HEADS = 4
TINY_PATCH = 8

# Enough MMEB-like English for the BPE merges to cover instructions, captions and the synthetic data's
# colours and shapes; bytes outside it still encode, one byte-level token each.
_CORPUS = """\
Represent the given image for classification.
Represent the given image with the following question: What is in the image?
Represent the given news image with the following caption for domain classification:
Represent the given image for binary classification to determine whether it constitutes hateful speech or not.
Identify the object shown in the image. Identify the scene shown in the image.
Find an image caption describing the given everyday image. Find a caption for the news in the given photo.
Find a day-to-day image that looks similar to the provided image.
Given an image, find a similar everyday image with the described changes:
Find me an everyday image that matches the given caption: A cat and a dog.
Find a Wikipedia image that answers this question: Which city is shown on the map?
Select the portion of the image that isolates the object labeled as "hot dog".
Represent the given cropped image of the object. Represent the given image. Represent the given dialogue about an image, which is used for image retrieval:
a red circle, a green square, a blue triangle, a yellow star, a purple cross, an orange diamond, a white ring,
a black bar, a pink heart, a cyan hexagon, a brown oval, a grey line, small, large, big, tiny, left, right, top,
bottom, above, below, next to, beside, on the, in the, center, corner, two, three, four, one, none, many,
The quick brown fox jumps over the lazy dog. Answer: yes no maybe. Question: how many shapes are there?
0 1 2 3 4 5 6 7 8 9 10 100 2024 - _ , . ; : ! ? ' " ( ) [ ] { } / \\ @ # $ % & * + = < > | ~ ^
"""


@dataclass(frozen=True)
class TokenizerSpec:
    """The special tokens a family's tokenizer carries and which of them wrap every sequence."""

    special_tokens: tuple[str, ...]
    pad_token: str
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos: bool = False
    add_eos: bool = False
    padding_side: str = "right"


CLIP_TOKENS = TokenizerSpec(
    special_tokens=("<|startoftext|>", "<|endoftext|>"),
    pad_token="<|endoftext|>",
    bos_token="<|startoftext|>",
    eos_token="<|endoftext|>",
    add_bos=True,
    add_eos=True,
)
SIGLIP_TOKENS = TokenizerSpec(
    special_tokens=("</s>", "<unk>"), pad_token="</s>", eos_token="</s>", add_eos=True
)
# Qwen2-VL's tokenizer adds nothing around a sequence and pads on the left (as VLM2Vec runs it).
QWEN2_VL_TOKENS = TokenizerSpec(
    special_tokens=(
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ),
    pad_token="<|endoftext|>",
    eos_token="<|im_end|>",
    padding_side="left",
)


def build_tiny_tokenizer(spec: TokenizerSpec, max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `_CORPUS`; identical vocab and merges in every process."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(spec.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    if spec.add_bos or spec.add_eos:
        wrap = (
            ([spec.bos_token] if spec.add_bos else []) + ["$A"] + ([spec.eos_token] if spec.add_eos else [])
        )
        specials = [(t, bpe.token_to_id(t)) for t in (spec.bos_token, spec.eos_token) if t]
        bpe.post_processor = processors.TemplateProcessing(single=" ".join(wrap), special_tokens=specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=spec.pad_token,
        bos_token=spec.bos_token,
        eos_token=spec.eos_token,
        additional_special_tokens=[
            t for t in spec.special_tokens if t not in (spec.pad_token, spec.bos_token, spec.eos_token)
        ],
        model_max_length=max_length,
        padding_side=spec.padding_side,
    )
    return tokenizer


def _tower(**extra) -> dict:
    return dict(
        hidden_size=TINY_HIDDEN,
        intermediate_size=2 * TINY_HIDDEN,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        **extra,
    )


def _clip_image_processor(config: ModelConfig):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    side = config.image_size
    return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def _clip_backbone(config: ModelConfig, tokenizer: PreTrainedTokenizerFast):
    from transformers import CLIPConfig, CLIPModel

    hf_config = CLIPConfig(
        text_config=_tower(
            vocab_size=len(tokenizer),
            max_position_embeddings=config.max_text_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=_tower(image_size=config.image_size, patch_size=TINY_PATCH),
        projection_dim=TINY_HIDDEN,
    )
    return CLIPModel(hf_config)


def _siglip_image_processor(config: ModelConfig):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size={"height": config.image_size, "width": config.image_size})


def _siglip_backbone(config: ModelConfig, tokenizer: PreTrainedTokenizerFast):
    from transformers import SiglipConfig, SiglipModel

    hf_config = SiglipConfig(
        text_config=_tower(
            vocab_size=len(tokenizer),
            max_position_embeddings=config.max_text_length,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=_tower(image_size=config.image_size, patch_size=TINY_PATCH),
    )
    return SiglipModel(hf_config)


def _qwen2_vl_image_processor(config: ModelConfig):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    factor = 2 * TINY_PATCH  # patch × merge
    side = -(-config.image_size // factor) * factor
    return Qwen2VLImageProcessorPil(
        patch_size=TINY_PATCH, merge_size=2, temporal_patch_size=2, min_pixels=factor**2, max_pixels=side**2
    )


def _qwen_text_config(tokenizer: PreTrainedTokenizerFast, **extra) -> dict:
    head_dim = TINY_HIDDEN // TINY_HEADS
    return _tower(
        vocab_size=len(tokenizer),
        num_key_value_heads=TINY_HEADS // 2,
        max_position_embeddings=1024,
        # M-RoPE splits the head_dim/2 rotary frequencies over (temporal, height, width).
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16],
            **extra.pop("rope_extra", {}),
        },
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _vision_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


# The vision towers' shared shape: patch 8, merge 2 (a 16-pixel cell per visual token), two blocks.
_VISION = {"depth": TINY_LAYERS, "patch_size": TINY_PATCH, "spatial_merge_size": 2, "temporal_patch_size": 2}


def _qwen2_vl_backbone(config: ModelConfig, tokenizer: PreTrainedTokenizerFast):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    hf_config = Qwen2VLConfig(
        text_config=_qwen_text_config(tokenizer),
        vision_config={**_VISION, "embed_dim": TINY_HIDDEN // 2, "hidden_size": TINY_HIDDEN, "num_heads": 2,
                       "mlp_ratio": 2},
        tie_word_embeddings=True,
        **_vision_token_ids(tokenizer),
    )
    return Qwen2VLForConditionalGeneration(hf_config)


def _qwen2_5_vl_backbone(config: ModelConfig, tokenizer: PreTrainedTokenizerFast):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    hf_config = Qwen2_5_VLConfig(
        text_config=_qwen_text_config(tokenizer),
        # Window attention over 2×2-cell windows in block 0, full attention in block 1 (as 2.5's
        # fullatt_block_indexes interleave them), so both attention paths run.
        vision_config={**_VISION, "hidden_size": TINY_HIDDEN // 2, "intermediate_size": TINY_HIDDEN,
                       "num_heads": 2, "out_hidden_size": TINY_HIDDEN, "window_size": 4 * TINY_PATCH,
                       "fullatt_block_indexes": [1]},
        tie_word_embeddings=True,
        **_vision_token_ids(tokenizer),
    )
    return Qwen2_5_VLForConditionalGeneration(hf_config)


def _qwen3_vl_backbone(config: ModelConfig, tokenizer: PreTrainedTokenizerFast):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    hf_config = Qwen3VLConfig(
        # Qwen3-VL interleaves the M-RoPE sections over the frequencies.
        text_config=_qwen_text_config(tokenizer, head_dim=TINY_HIDDEN // TINY_HEADS,
                                      rope_extra={"mrope_interleaved": True}),
        # Deepstack: block 0's merged features are added to the LM's first hidden states.
        vision_config={**_VISION, "hidden_size": TINY_HIDDEN // 2, "intermediate_size": TINY_HIDDEN,
                       "num_heads": 2, "out_hidden_size": TINY_HIDDEN, "num_position_embeddings": 64,
                       "deepstack_visual_indexes": [0]},
        tie_word_embeddings=True,
        **_vision_token_ids(tokenizer),
    )
    return Qwen3VLForConditionalGeneration(hf_config)


@dataclass(frozen=True)
class TinyRecipe:
    kind: str  # the model.kind this backbone serves
    tokens: TokenizerSpec
    image_processor: Callable[[ModelConfig], object]
    backbone: Callable[[ModelConfig, PreTrainedTokenizerFast], object]


TINY_MODELS: dict[str, TinyRecipe] = {
    "tiny-clip": TinyRecipe("dual_encoder", CLIP_TOKENS, _clip_image_processor, _clip_backbone),
    "tiny-siglip": TinyRecipe("dual_encoder", SIGLIP_TOKENS, _siglip_image_processor, _siglip_backbone),
    "tiny-qwen2-vl": TinyRecipe("vlm", QWEN2_VL_TOKENS, _qwen2_vl_image_processor, _qwen2_vl_backbone),
    "tiny-qwen2.5-vl": TinyRecipe("vlm", QWEN2_VL_TOKENS, _qwen2_vl_image_processor, _qwen2_5_vl_backbone),
    "tiny-qwen3-vl": TinyRecipe("vlm", QWEN2_VL_TOKENS, _qwen2_vl_image_processor, _qwen3_vl_backbone),
}


def tiny_processors(name: str, config: ModelConfig) -> tuple[PreTrainedTokenizerFast, object]:
    """(tokenizer, image_processor) of a tiny model; cheap (a few ms), deterministic."""
    recipe = TINY_MODELS[name]
    return build_tiny_tokenizer(recipe.tokens, config.max_text_length), recipe.image_processor(config)


def tiny_backbone(name: str, config: ModelConfig, tokenizer: PreTrainedTokenizerFast):
    """A randomly initialised tiny `transformers` model (initialised from torch's global RNG)."""
    return TINY_MODELS[name].backbone(config, tokenizer)


def save_tiny_checkpoint(name: str, config: ModelConfig, folder) -> None:
    """A tiny model written as a Hub download holds one (the backbone's own `save_pretrained`, the
    tokenizer, the image processor; no sde_ray files), so it loads through the `from_pretrained`
    path a real checkpoint takes. Its weights are `tiny_backbone`'s from torch's global RNG."""
    tokenizer, image_processor = tiny_processors(name, config)
    tiny_backbone(name, config, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
