"""The model card (`README.md`) of an export: how the model was trained, on what, with which scores,
and how to load it (sde_ray, plain transformers, sentence-transformers, peft for a kept adapter).

`sde-ray train` writes it into `<run>/model/` after the final evaluation. It is documentation
only: `sde_ray.eval.encode.model_identity` leaves it out, so writing it changes no cache key.
"""

from __future__ import annotations

import json
from pathlib import Path

from sde_ray import storage
from sde_ray.config import Config
from sde_ray.eval.encode import MODEL_CARD
from sde_ray.models.embedder import ADAPTER_DIR, EXPORT_FILE, SENTENCE_TRANSFORMERS_FILES


def _percent(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def model_card(model_dir: str | Path, config: Config, results: dict | None, train: dict | None = None) -> str:
    model_dir = str(model_dir)  # a folder or an object-store URL (sde_ray.storage)
    meta = json.loads(storage.read_text(storage.join(model_dir, EXPORT_FILE)))
    hf = json.loads(storage.read_text(storage.join(model_dir, "config.json")))
    name = storage.basename(model_dir)
    t, d, m = config.train, config.data, config.model
    data = d.mmeb_train_dir or ", ".join(d.shards) or f"the synthetic MMEB (seed {d.synth.seed})"
    lines = [
        f"# {storage.basename(storage.parent(model_dir)) if name == 'model' else name}",
        "",
        f"A {m.kind} embedding model ({hf.get('model_type')}, {meta['embed_dim']}-dimensional embeddings) trained "
        f"with sde_ray from `{meta['source_name_or_path']}`.",
        "",
        "## Training",
        "",
        f"- objective: `{config.loss.name}` (temperature {config.loss.temperature}); spectral mode "
        f"`{config.spectral.mode}`",
        f"- data: `{d.source}`: {data}",
        f"- steps: {(train or {}).get('step', t.max_steps)} of {t.max_steps}, global batch {t.global_batch_size}, "
        f"lr {t.lr}, seed {t.seed}",
        f"- precision `{config.deepspeed.precision}`, DeepSpeed ZeRO stage {config.deepspeed.zero_stage}",
        f"- LoRA: {'merged into the weights' if meta.get('lora_merged') else ('kept as an adapter in ' + ADAPTER_DIR + '/') if meta.get('lora_adapter') else 'none'}",
        "",
        "## Scores",
        "",
    ]
    if results and results.get("datasets"):
        lines += [f"{results.get('benchmark', 'MMEB-eval')}, Precision@1 (%):", "",
                  f"overall **{_percent(results.get('overall'))}**, IND {_percent(results.get('ind'))}, "
                  f"OOD {_percent(results.get('ood'))}", "",
                  "| dataset | meta-task | split | P@1 | queries |", "|---|---|---|---:|---:|"]
        lines += [f"| {name} | {row['meta_task']} | {row['split']} | {_percent(row['p_at_1'])} | {row['num_queries']} |"
                  for name, row in results["datasets"].items()]
    else:
        lines.append("Not evaluated.")
    lines += [
        "",
        "## Use",
        "",
        "Items are MMEB-style prompts: `<|image_1|>\\n<instruction>: <text>\\n` for an item with an image "
        "(`sde_ray.data.mmeb.format_prompt`). Embeddings are compared by cosine.",
        "",
        "```bash",
        "sde-ray embed --checkpoint THIS_FOLDER --corpus CORPUS --out EMBEDDINGS embed.instruction=\"...\"",
        "sde-ray serve THIS_FOLDER",
        "```",
        "",
        "```python",
        "from sde_ray.models import load_pretrained, BatchProcessor",
        "model, config = load_pretrained('THIS_FOLDER')  # model.encode_side(BatchProcessor(config).encode_inputs(...), 'qry')",
        "```",
    ]
    if hf.get("model_type") in ("clip", "siglip"):
        lines += ["", "With plain transformers: an item's embedding is its text's (the prompt; '' for a bare "
                  "image) plus its image's, when it has one:", "",
                  "```python", "from transformers import AutoModel, AutoProcessor",
                  "model, processor = AutoModel.from_pretrained('THIS_FOLDER'), AutoProcessor.from_pretrained('THIS_FOLDER')",
                  f"text = model.get_text_features(**processor(text=[...], padding='max_length', max_length={m.max_text_length}, "
                  "return_tensors='pt')).pooler_output",
                  "image = model.get_image_features(**processor(images=[...], return_tensors='pt')).pooler_output",
                  "```"]
    if hf.get("model_type") in SENTENCE_TRANSFORMERS_FILES:
        lines += ["", "With sentence-transformers (>= 5; modules.json is in this folder):", "", "```python",
                  "from sentence_transformers import SentenceTransformer",
                  "model = SentenceTransformer('THIS_FOLDER')",
                  "item = model.encode(['<prompt>']) + model.encode([pil_image])  # a text-only item: the first term",
                  "```"]
    if meta.get("lora_adapter"):
        lines += ["", "The LoRA adapter is kept unmerged: `PeftModel.from_pretrained(AutoModel.from_pretrained("
                  f"'THIS_FOLDER'), 'THIS_FOLDER/{ADAPTER_DIR}')`."]
    return "\n".join(lines) + "\n"


def write_model_card(model_dir: str | Path, config: Config, results: dict | None, train: dict | None = None) -> str:
    path = storage.join(str(model_dir), MODEL_CARD)
    storage.write_text(path, model_card(model_dir, config, results, train))
    return path
