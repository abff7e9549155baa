"""`sde-ray embed`: Ray Data batch inference of a corpus into parquet files of (id, embedding, modality).

The pipeline, over the pieces of the output files not yet written (`sde_ray.embed.corpus`):

    from_items(pieces) → map_batches(read + decode + tokenize)   CPU tasks, `embed.decode_concurrency`
                       → map_batches(EmbedActor)                 `embed.num_workers` actors, one GPU each
                                                                  when the cluster has GPUs
                       → the driver gathers each file's rows and writes `part-NNNNN.parquet`

Images are decoded and tokenized in the CPU tasks (as in training: the model's `BatchProcessor`
makes uint8 pixels and token ids), the actors run only the forward (`ModelEncoder.encode_arrays`,
the evaluator's encoder), so an item embedded here equals the same item in `sde-ray eval`.
Embeddings are the raw features in float32 (as the evaluator's; search normalises them).

Output folder: `part-NNNNN.parquet` (columns `id` string, `embedding` list<float32>, `modality`
string; the rows of the corpus in order, skipped items left out), `part-NNNNN.rejects.json` beside
each (the skipped rows: id and reason; written first, so a part implies its rejects), and
`embed.json` (the model, settings, files and counts; `complete: true` last).

Resumable: a file whose parquet exists is skipped (both are written atomically). A rerun with
another model, instruction, side or corpus plan is refused before any actor starts, naming what
differs: files of two models must not mix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sde_ray.config import Config
from sde_ray.embed.corpus import Columns, OutputFile, Piece, plan_files, read_piece
from sde_ray.embed.items import ItemError, encode_items, prepare_item

MANIFEST = "embed.json"
REJECTS_SUFFIX = ".rejects.json"
PREFIXES = {"query": "qry", "target": "pos"}


def rejects_path(part: Path) -> Path:
    return part.with_name(part.name.removesuffix(".parquet") + REJECTS_SUFFIX)


def _processor(model_config):
    """The model's `BatchProcessor`, built once per worker process (tokenizer and image processor load)."""
    key = json.dumps(dataclasses.asdict(model_config), sort_keys=True)
    if key not in _PROCESSORS:
        from sde_ray.models import BatchProcessor

        _PROCESSORS.clear()
        _PROCESSORS[key] = BatchProcessor(model_config)
    return _PROCESSORS[key]


_PROCESSORS: dict = {}


def prepare_piece(batch: dict, *, columns: Columns, model_config, instruction: str, prefix: str) -> dict:
    """Ray Data CPU stage: one piece (a batch of one row) → its items' model inputs, ids, modality,
    the reason each bad row is skipped ('' when kept), and where each row goes (file, row)."""
    (piece_fields,) = batch["piece"]
    file_index = int(batch["file"][0])
    piece = Piece(**{k: tuple(v) if k == "names" else v for k, v in piece_fields.items()})
    raw = read_piece(piece, columns)
    rows = len(raw["id"])
    items, errors = [], []
    for row, (text, image) in enumerate(zip(raw["text"], raw["image"])):
        try:
            items.append(prepare_item(text, image, instruction, where=f"{raw['id'][row]}"))
            errors.append("")
        except ItemError as exc:
            items.append(None)
            errors.append(f"{exc.reason}: {exc}")
    kept = [i for i in items if i is not None]
    processor = _processor(model_config)
    arrays = encode_items(processor, prefix, kept)
    out = {key: np.zeros((rows, *value.shape[1:]), dtype=value.dtype) for key, value in arrays.items()}
    index = np.array([i for i, item in enumerate(items) if item is not None], dtype=np.int64)
    for key, value in arrays.items():
        out[key][index] = value
    out.update(
        id=np.array(raw["id"], dtype=object),
        modality=np.array([i.modality if i is not None else "" for i in items], dtype=object),
        error=np.array(errors, dtype=object),
        file=np.full(rows, file_index, dtype=np.int64),
        row=np.arange(piece.start, piece.stop, dtype=np.int64),
    )
    return out


class EmbedActor:
    """Ray Data actor: the forward of the exported model on the prepared arrays (one GPU when given)."""

    def __init__(self, model_dir: str, batch_size: int, use_gpu: bool, precision: str, side: str):
        import torch

        from sde_ray.eval.encode import load_encoder

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.encoder = load_encoder(model_dir, batch_size, "cuda" if use_gpu else "cpu", precision)
        self.side, self.prefix = side, PREFIXES[side]

    def __call__(self, batch: dict) -> dict:
        kept = np.flatnonzero(batch["error"] == "")
        dim = self.encoder.embed_dim
        embedding = np.zeros((len(batch["id"]), dim), dtype=np.float32)
        if len(kept):
            arrays = {k: v[kept] for k, v in batch.items() if k.startswith(self.prefix + "_")}
            embedding[kept] = self.encoder.encode_arrays(self.side, arrays)
        return {name: batch[name] for name in ("id", "modality", "error", "file", "row")} | {"embedding": embedding}


def _plan(config: Config, model_dir: Path, corpus: Path, kind: str, files: list[OutputFile]) -> dict:
    from sde_ray.eval.encode import model_identity
    from sde_ray.models.embedder import EXPORT_FILE

    e = config.embed
    return {
        "model_dir": str(model_dir),
        "model_sha256": model_identity(model_dir),
        "embed_dim": int(json.loads((model_dir / EXPORT_FILE).read_text())["embed_dim"]),
        "instruction": e.instruction,
        "side": e.side,
        "columns": dataclasses.asdict(Columns(e.text_column, e.image_column, e.id_column)),
        "corpus": str(corpus),
        "corpus_kind": kind,
        "rows_per_file": e.rows_per_file,
        "files": {f.name: f.rows for f in files},
    }


RESUME_KEYS = ("model_sha256", "instruction", "side", "columns", "corpus", "rows_per_file", "files")


def check_resume(out_dir: Path, plan: dict) -> None:
    """Refuses to resume into an output folder written with another model, prompt or corpus plan."""
    path = out_dir / MANIFEST
    if not path.exists():
        return
    previous = json.loads(path.read_text())
    differs = [k for k in RESUME_KEYS if previous.get(k) != plan[k]]
    if differs:
        raise ValueError(f"{out_dir} holds embeddings made with another {', '.join(differs)}: "
                         "use another --out or delete it")


def write_part(path: Path, rows: dict[str, list], embed_dim: int) -> dict[str, int]:
    """Writes one output file (kept rows in corpus order) and its rejects; returns rejects by reason."""
    order = np.argsort(np.asarray(rows["row"]))
    errors = [rows["error"][i] for i in order]
    kept = [i for i, error in zip(order, errors) if not error]
    rejects = [{"id": rows["id"][i], "reason": rows["error"][i]} for i in order if rows["error"][i]]
    staging = path.with_name(f".{path.name}.tmp")
    rejects_file = rejects_path(path)
    rejects_file.with_name(f".{rejects_file.name}.tmp").write_text(json.dumps(rejects, indent=1) + "\n")
    os.replace(rejects_file.with_name(f".{rejects_file.name}.tmp"), rejects_file)
    embeddings = np.stack([rows["embedding"][i] for i in kept]) if kept else np.zeros((0, embed_dim), np.float32)
    table = pa.table({
        "id": pa.array([str(rows["id"][i]) for i in kept], pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), pa.float32()), embed_dim),
        "modality": pa.array([str(rows["modality"][i]) for i in kept], pa.string()),
    })
    pq.write_table(table, staging)
    os.replace(staging, path)
    counts: dict[str, int] = {}
    for reject in rejects:
        reason = reject["reason"].split(":", 1)[0]
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def run_embed(config: Config, checkpoint: str, corpus: str, out_dir: str, progress: bool = True) -> dict:
    """Embeds `corpus` with the model of `checkpoint` into `out_dir`; returns the summary (embed.json)."""
    import ray
    from tqdm.auto import tqdm

    from sde_ray.eval.checkpoints import resolve_checkpoint

    from sde_ray.eval.encode import actor_precision
    from sde_ray.eval.runner import eval_precision
    from sde_ray.ray_cluster import connect

    e = config.embed
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    corpus_path = Path(corpus).expanduser().resolve()
    kind, files = plan_files(corpus_path, e.rows_per_file, e.batch_size)
    model_dir = resolve_checkpoint(checkpoint, out).model_dir
    plan = _plan(config, model_dir, corpus_path, kind, files)
    check_resume(out, plan)
    (out / MANIFEST).write_text(json.dumps({**plan, "complete": False}, indent=1) + "\n")
    pending = [i for i, f in enumerate(files) if not (out / f.name).exists()]
    print(f"[sde_ray] embed: {len(files)} file(s) of {sum(f.rows for f in files)} rows from {corpus_path} "
          f"({kind}); {len(files) - len(pending)} already written, {len(pending)} to compute", flush=True)

    computed, rejected, seconds, rows_done = [], {}, 0.0, 0
    if pending:
        from sde_ray.models import export_config

        model_config = export_config(model_dir)
        started_ray = connect(config, local_cpus=os.cpu_count() or 1, log_to_driver=False)
        try:
            use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
            precision = actor_precision(eval_precision(config), use_gpu)
            items = [{"file": i, "piece": dataclasses.asdict(p)} for i in pending for p in files[i].pieces]
            dataset = ray.data.from_items(items, override_num_blocks=len(items))
            dataset = dataset.map_batches(
                prepare_piece, batch_size=1, num_cpus=1, concurrency=e.decode_concurrency,
                fn_kwargs={"columns": Columns(e.text_column, e.image_column, e.id_column),
                           "model_config": model_config, "instruction": e.instruction,
                           "prefix": PREFIXES[e.side]},
            )
            dataset = dataset.map_batches(
                EmbedActor, batch_size=e.batch_size, concurrency=e.num_workers,
                num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1,
                fn_constructor_args=(str(model_dir), e.batch_size, use_gpu, precision, e.side),
            )
            gathered: dict[int, dict[str, list]] = {}
            started = time.perf_counter()
            with tqdm(total=len(pending), desc="embed: files", unit="file", disable=not progress) as bar:
                for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    for j, file_index in enumerate(batch["file"]):
                        rows = gathered.setdefault(int(file_index), {k: [] for k in batch})
                        for key in batch:
                            rows[key].append(batch[key][j])
                    for file_index in [i for i, r in gathered.items() if len(r["id"]) == files[i].rows]:
                        rows = gathered.pop(file_index)
                        for reason, count in write_part(out / files[file_index].name, rows, plan["embed_dim"]).items():
                            rejected[reason] = rejected.get(reason, 0) + count
                        computed.append(files[file_index].name)
                        rows_done += files[file_index].rows
                        bar.update(1)
            seconds = time.perf_counter() - started
        finally:
            if started_ray:
                ray.shutdown()
        missing = [files[i].name for i in pending if files[i].name not in computed]
        if missing:
            raise RuntimeError(f"embed: the pipeline ended without rows for {missing}")

    kept = sum(pq.ParquetFile(out / f.name).metadata.num_rows for f in files)
    summary = {**plan, "rows": sum(f.rows for f in files), "embedded": kept,
               "skipped": sum(f.rows for f in files) - kept, "files_computed": sorted(computed),
               "rejected_now": rejected, "rows_per_s": round(rows_done / seconds, 2) if seconds else None,
               "complete": True}
    (out / MANIFEST).write_text(json.dumps(summary, indent=1) + "\n")
    if summary["skipped"]:
        print(f"[sde_ray] embed: {summary['skipped']} row(s) skipped (reasons in {out}/*{REJECTS_SUFFIX})", flush=True)
    return summary
