"""An independent reference for the digits real-image check: a single-process plain PyTorch InfoNCE loop.

No Ray, no DeepSpeed, none of sde_ray's data path, losses or evaluator: the converted data
(`sde-ray data digits --out DIR`) is read with pyarrow and PIL, the loss is CLIP's symmetric
cross-entropy written out below, the optimizer is torch's AdamW, and P@1 is computed here from the
MMEB-eval parquet files (candidate 0 is the positive). Only the towers are shared, to compare like
with like: `--towers tiny-clip` is the framework's tiny CLIP (sde_ray.models.tiny: the same config,
tokenizer and CLIP pixel normalisation), `--towers vit-bert` a tiny ViT + tiny BERT from transformers
configs (CLS pooling, linear projections) with the same tokenizer.

`--pairs plain`: each training pair is (digit image, its label text), the 1,347 rows of Digits_i2t,
the image tower on the image and the text tower on the label (what a "40-line loop" does).
`--pairs mmeb`: the rows of both MMEB-train subsets as the framework reads them, each side the sum
of its text and (if any) image embedding (the framework's score-level fusion), instruction prompts
included, both directions mixed in a batch.

    PYTHONPATH=. nice -n 10 python scripts/digits_reference.py --data /tmp/h17/digits --steps 200 --seed 0
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from sde_ray.config import ModelConfig
from sde_ray.models.tiny import CLIP_TOKENS, build_tiny_tokenizer, tiny_backbone

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
IMAGE_TOKEN = "<|image_1|>"


def pixels(data: bytes, size: int) -> torch.Tensor:
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


class Towers(torch.nn.Module):
    def __init__(self, kind: str, tokenizer, size: int, max_length: int):
        super().__init__()
        self.kind, self.tokenizer, self.size, self.max_length = kind, tokenizer, size, max_length
        if kind == "tiny-clip":
            self.model = tiny_backbone("tiny-clip", ModelConfig(image_size=size, max_text_length=max_length), tokenizer)
        else:
            from transformers import BertConfig, BertModel, ViTConfig, ViTModel

            self.vit = ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=128, image_size=size, patch_size=8),
                                add_pooling_layer=False)
            self.bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=128,
                                             max_position_embeddings=max_length, pad_token_id=tokenizer.pad_token_id),
                                  add_pooling_layer=False)
            self.image_proj, self.text_proj = torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 64, bias=False)

    def text(self, texts: list[str]) -> torch.Tensor:
        texts = [t.replace(IMAGE_TOKEN, "").strip() for t in texts]
        # Padded to the batch's longest text: exact for CLIP's causal, end-of-text-pooled tower and
        # for BERT's masked attention, and cheaper than max_length.
        tokens = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        if self.kind == "tiny-clip":
            return self.model.get_text_features(**tokens).pooler_output
        hidden = self.bert(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        return self.text_proj(hidden[:, 0])

    def image(self, images: torch.Tensor) -> torch.Tensor:
        images = (images - CLIP_MEAN) / CLIP_STD
        if self.kind == "tiny-clip":
            return self.model.get_image_features(pixel_values=images).pooler_output
        return self.image_proj(self.vit(pixel_values=images).last_hidden_state[:, 0])

    def side(self, texts: list[str], images: list[torch.Tensor | None], fuse: bool) -> torch.Tensor:
        """fuse: text embedding + image embedding where there is an image; else the image alone if
        there is one, the text alone otherwise."""
        rows = [i for i, im in enumerate(images) if im is not None]
        out = self.text(texts) if (fuse or len(rows) < len(texts)) else None
        if rows:
            image = self.image(torch.stack([images[i] for i in rows]))
            if out is None:
                return image
            index = torch.tensor(rows)
            out = out.index_add(0, index, image) if fuse else out.index_copy(0, index, image)
        return out


def load_train(root: Path, pairs: str, size: int):
    cache: dict[str, torch.Tensor] = {}

    def image(path: str):
        if not path:
            return None
        if path not in cache:
            cache[path] = pixels((root / path).read_bytes(), size)
        return cache[path]

    subsets = ["Digits_i2t"] if pairs == "plain" else ["Digits_i2t", "Digits_t2i"]
    rows = []
    for subset in subsets:
        table = pq.read_table(root / subset / "original-00000-of-00001.parquet").to_pylist()
        for r in table:
            if pairs == "plain":  # (image, label text)
                rows.append(("", image(r["qry_image_path"]), r["pos_text"], None, r["pos_text"], r["qry_image_path"], subset))
            else:
                rows.append((r["qry"], image(r["qry_image_path"]), r["pos_text"], image(r["pos_image_path"]),
                             r["pos_text"] + "\0" + r["pos_image_path"], r["qry"] + "\0" + r["qry_image_path"], subset))
    return rows


def load_eval(root: Path, size: int, pairs: str):
    archive = zipfile.ZipFile(root / "images.zip")
    cache: dict[str, torch.Tensor] = {}

    def image(path: str):
        if not path:
            return None
        if path not in cache:
            cache[path] = pixels(archive.read(path), size)
        return cache[path]

    sets = {}
    for name in ("Digits_i2t", "Digits_t2i"):
        table = pq.read_table(root / name / "test-00000-of-00001.parquet").to_pylist()
        queries = [(r["qry_text"], image(r["qry_img_path"])) for r in table]
        candidates = [[(t, image(p)) for t, p in zip(r["tgt_text"], r["tgt_img_path"])] for r in table]
        if pairs == "plain":  # the label text alone (T->I queries are "...caption: <label>")
            queries = [(re.sub(r"^.*: ", "", t).strip() if im is None else "", im) for t, im in queries]
            candidates = [[("" if im is not None else t, im) for t, im in row] for row in candidates]
        sets[name] = (queries, candidates)
    return sets


@torch.no_grad()
def evaluate(model: Towers, sets, fuse: bool) -> dict[str, float]:
    model.eval()
    out = {}
    for name, (queries, candidates) in sets.items():
        flat = [c for row in candidates for c in row]
        unique_q = {(t, id(im)): (t, im) for t, im in queries}
        unique_c = {(t, id(im)): (t, im) for t, im in flat}
        emb = {}
        for group in (unique_q, unique_c):
            keys = list(group)
            for start in range(0, len(keys), 256):
                chunk = [group[k] for k in keys[start:start + 256]]
                e = F.normalize(model.side([t for t, _ in chunk], [im for _, im in chunk], fuse), dim=-1)
                emb.update({(id(group),) + k: v for k, v in zip(keys[start:start + 256], e)})
        hits = 0
        for (qt, qi), row in zip(queries, candidates):
            q = emb[(id(unique_q), qt, id(qi))]
            scores = torch.stack([emb[(id(unique_c), t, id(im))] @ q for t, im in row])
            hits += int(scores.argmax() == 0)
        out[name] = hits / len(queries)
    model.train()
    return out


def clip_loss(q: torch.Tensor, t: torch.Tensor, scale: float, same: torch.Tensor | None, mode: str) -> torch.Tensor:
    logits = scale * F.normalize(q, dim=-1) @ F.normalize(t, dim=-1).T
    labels = torch.arange(len(q))
    total = 0.0
    for lg in (logits, logits.T):
        if mode == "ignore" or same is None:
            total = total + F.cross_entropy(lg, labels)
        elif mode == "mask":
            total = total + F.cross_entropy(lg.masked_fill(same & ~torch.eye(len(q), dtype=torch.bool), -math.inf), labels)
        else:  # multi_positive
            total = total + (torch.logsumexp(lg, 1) - torch.logsumexp(lg.masked_fill(~same, -math.inf), 1)).mean()
    return total / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the output folder of `sde-ray data digits`")
    ap.add_argument("--towers", default="tiny-clip", choices=("tiny-clip", "vit-bert"))
    ap.add_argument("--pairs", default="plain", choices=("plain", "mmeb"))
    ap.add_argument("--duplicates", default="ignore", choices=("ignore", "mask", "multi_positive"))
    ap.add_argument("--duplicate-key", default="target", choices=("target", "pair"),
                    help="target: rows with identical targets are duplicates; pair: rows sharing their target "
                         "or their query (the connected rows of the batch)")
    ap.add_argument("--batching", default="random", choices=("random", "same_subset"),
                    help="same_subset: every batch is drawn from one training subset (one direction)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--schedule", default="constant", choices=("constant", "cosine"))
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--beta2", type=float, default=0.999, help="AdamW's beta2 (torch's default; the framework: 0.98)")
    ap.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW's eps (torch's default; the framework: 1e-6)")
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a shared 2-core box: 1)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    data = Path(args.data)
    tokenizer = build_tiny_tokenizer(CLIP_TOKENS, args.max_length)
    model = Towers(args.towers, tokenizer, args.image_size, args.max_length)
    rows = load_train(data / "MMEB-train", args.pairs, args.image_size)
    sets = load_eval(data / "MMEB-eval", args.image_size, args.pairs)
    fuse = args.pairs == "mmeb"
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  betas=(0.9, args.beta2), eps=args.adam_eps)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        if args.schedule == "constant":
            return args.lr
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * 0.5 * (1 + math.cos(math.pi * progress))

    start, order, history = time.time(), np.array([], dtype=int), []
    subsets = sorted({r[6] for r in rows})
    pools = {name: np.array([i for i, r in enumerate(rows) if r[6] == name]) for name in subsets}
    orders = {name: np.array([], dtype=int) for name in subsets}
    for step in range(args.steps):
        if args.batching == "same_subset":
            name = subsets[rng.integers(len(subsets))]
            if len(orders[name]) < args.batch:
                orders[name] = np.concatenate([orders[name], rng.permutation(pools[name])])
            batch, orders[name] = [rows[i] for i in orders[name][: args.batch]], orders[name][args.batch:]
        else:
            if len(order) < args.batch:
                order = np.concatenate([order, rng.permutation(len(rows))])
            batch, order = [rows[i] for i in order[: args.batch]], order[args.batch:]
        q = model.side([r[0] for r in batch], [r[1] for r in batch], fuse)
        t = model.side([r[2] for r in batch], [r[3] for r in batch], fuse)
        keys = [r[4] for r in batch]
        same = torch.tensor([[a == b for b in keys] for a in keys])
        if args.duplicate_key == "pair":  # close "shares a query or a target" transitively
            queries = [r[5] for r in batch]
            same = same | torch.tensor([[a == b for b in queries] for a in queries])
            for _ in range(len(batch)):
                closed = (same.float() @ same.float()) > 0
                if torch.equal(closed, same):
                    break
                same = closed
        loss = clip_loss(q, t, 1.0 / args.temperature, same, args.duplicates)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            history.append({"step": step + 1, "loss": float(loss.detach()), **evaluate(model, sets, fuse)})
            print(json.dumps(history[-1]), flush=True)
    result = {**vars(args), "train_seconds": round(time.time() - start, 1), "final_loss": float(loss.detach()),
              **evaluate(model, sets, fuse), "history": history}
    print(json.dumps({k: result[k] for k in ("towers", "pairs", "duplicates", "duplicate_key", "batching", "seed", "steps", "lr", "warmup",
                                             "train_seconds", "final_loss", "Digits_i2t", "Digits_t2i")}))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
