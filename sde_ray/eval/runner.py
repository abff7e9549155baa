"""MMEB evaluation entry points: `run_eval` (the `sde-ray eval` job, on Ray) and the in-process
`evaluate_model` / `validation_p_at_1` the training loop calls.

The final evaluation of a training run (`final_evaluation`, called by the driver after
`trainer.fit()` returns) and `sde-ray eval` both encode on Ray actors (`evaluate_on_actors`), never
inside the training worker group; validation during training is spread over the training ranks
(`validation_p_at_1` with rank / world size / gather, see `sde_ray.eval.sharded`).

`run_eval(checkpoint, ...)` accepts a run directory (its exported `model/`, else its latest
checkpoint), a Ray Train checkpoint directory (`consolidated.pt` + `state.json`, exported to a
`save_pretrained` folder first) or an exported `save_pretrained` folder. It encodes with
`eval.num_workers` Ray actors (one GPU each when the cluster has GPUs), writes results.json / .md /
.csv, the diagnostics and the plots into the output folder, VLM2Vec-layout score files into its
`vlm2vec/` (see `sde_ray.eval.report.write_vlm2vec_scores`), and logs them to wandb. Embeddings are
cached under `<output>/embedding_cache`, keyed by the model's identity and each dataset's content,
so evaluating the same model on the same data again encodes nothing.

Output folder default: `<run>/eval` for a run directory (or its `model/`), otherwise
`<checkpoint>-eval` beside the checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from sde_ray.config import Config
from sde_ray.data.mmeb import (
    CATALOG_FILE,
    META_TASKS,
    DatasetInfo,
    eval_image_source,
    list_eval_datasets,
    load_dataset_catalog,
    outside_catalog,
)
from sde_ray.eval import plots
from sde_ray.eval.diagnostics import feature_diagnostics, pool_pairs, training_history, write_history_plots
from sde_ray.eval.encode import CachedEncoder, ModelEncoder, RayEncoderPool, model_identity
from sde_ray.eval.gap import fit_remedy, fit_rows
from sde_ray.eval.metrics import DatasetScore, summarize
from sde_ray.eval.report import write_results, write_vlm2vec_scores
from sde_ray.ray_cluster import connect
from sde_ray.eval.scoring import (
    EncodedDataset,
    Encoder,
    PreparedDataset,
    dataset_hits,
    encode_dataset,
    prepare_dataset,
    score_dataset,
    unscorable_reason,
)
from sde_ray.runs import CONSOLIDATED, STATE, checkpoint_step, is_checkpoint, is_complete, wandb_mode

MODEL_FROM_CHECKPOINT = "model_from_checkpoint"
EMBEDDING_CACHE = "embedding_cache"
VLM2VEC_DIR = "vlm2vec"
# What the built-in catalog describes: MMEB-eval as released, scored with VLM2Vec v1's protocol.
MMEB_BENCHMARK = "MMEB-eval v1 (TIGER-Lab/MMEB-eval; VLM2Vec v1 P@1 protocol)"


# ---------------------------------------------------------------------------------------------
# Inputs: checkpoint, data root, datasets


@dataclasses.dataclass
class ResolvedCheckpoint:
    model_dir: Path  # a save_pretrained folder
    run_dir: Path | None  # the training run it belongs to (for metrics.jsonl), when known
    kind: str  # "pretrained" | "run" | "ray_checkpoint"
    source: Path  # the Ray checkpoint exported, for kind ray_checkpoint


def _is_export(path: Path) -> bool:
    from sde_ray.models.embedder import EXPORT_FILE

    return (path / EXPORT_FILE).is_file()


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (highest step, then latest written) under a run directory
    (Ray storage included); folders of an interrupted write or with altered files are passed over."""
    found = [p.parent for p in run_dir.rglob(STATE) if is_checkpoint(p.parent) and is_complete(p.parent)]
    return max(found, key=lambda p: (checkpoint_step(p), (p / STATE).stat().st_mtime)) if found else None


def _run_root(path: Path, top: Path) -> Path:
    """The training output folder a checkpoint or export below `top` belongs to: its nearest
    ancestor holding a run's record (config.yaml / metrics.jsonl / model/), else its Ray run folder."""
    for parent in [path, *path.parents]:
        if parent == top.parent:
            break
        if any((parent / name).exists() for name in ("config.yaml", "metrics.jsonl", "model")):
            return parent
    return path


def _runs_below(path: Path) -> list[Path]:
    from sde_ray.models.embedder import EXPORT_FILE

    roots = {_run_root(p.parent.parent, path) for p in path.rglob(STATE) if is_checkpoint(p.parent)}
    roots |= {_run_root(p.parent.parent, path) for p in path.rglob(EXPORT_FILE)
              if p.parent.name != MODEL_FROM_CHECKPOINT}
    return sorted(roots)


def _export_is_current(run_dir: Path, checkpoint: Path | None) -> bool:
    """The run's `model/` export holds its newest weights: no complete checkpoint is newer than the
    step its results.json records (a relaunched run may have checkpointed past an older export)."""
    if checkpoint is None:
        return True
    try:
        results = json.loads((run_dir / "results.json").read_text())
        exported_step = int(results["train"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return False  # no record of what the export holds: the checkpoint is the known state
    return exported_step >= checkpoint_step(checkpoint)


def _state_dict_prefix(saved_keys: Sequence[str], model_keys: Sequence[str]) -> str:
    """The prefix under which the model's parameters sit in a training module's state dict: the one
    under which the saved keys that are the model's are found (a trainable-only checkpoint holds some
    of them, a full one all)."""
    saved, own = set(saved_keys), set(model_keys)
    for model_key in model_keys:
        for key in saved_keys:
            if key.endswith(model_key):
                prefix = key[: len(key) - len(model_key)]
                if all(k[len(prefix):] in own for k in saved if k.startswith(prefix)):
                    return prefix
    raise KeyError(f"the checkpoint's weights do not contain this model's parameters (e.g. {model_keys[0]!r})")


def export_ray_checkpoint(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Rebuilds the encoder of a training checkpoint from its saved config and consolidated weights,
    and writes it as a `save_pretrained` folder (what the encoding actors load)."""
    import torch

    from sde_ray.config import from_dict
    from sde_ray.models import build_model, load_trained_weights

    checkpoint_dir = Path(checkpoint_dir)
    state = json.loads((checkpoint_dir / STATE).read_text())
    if "config" not in state:
        raise ValueError(f"{checkpoint_dir / STATE} has no 'config': cannot rebuild the model")
    config = from_dict(state["config"], Config)
    model = build_model(config.model, seed=config.train.seed)
    weights = torch.load(checkpoint_dir / CONSOLIDATED, map_location="cpu", weights_only=True)
    model_keys = list(model.state_dict())
    prefix = _state_dict_prefix(list(weights), model_keys)
    # A trainable-only checkpoint lacks the frozen weights: they stay as built from the base it names
    # (checked against its content hash).
    load_trained_weights(model, {k[len(prefix):]: v for k, v in weights.items()
                                 if k.startswith(prefix) and k[len(prefix):] in model_keys},
                         state.get("base") if state.get("trainable_only") else None)
    return model.save_pretrained(out_dir, in_place=True)


def resolve_checkpoint(checkpoint: str | os.PathLike, work_dir: Path) -> ResolvedCheckpoint:
    """Finds (or, for a training checkpoint, exports into `work_dir`) the model folder to evaluate.

    An export or a checkpoint folder is used as given. A run folder resolves to its newest complete
    checkpoint unless its `model/` export is at least as new; a folder holding several runs is an
    error listing them (never a silent pick). Prints what it used."""
    path = Path(checkpoint).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    resolved = _resolve(path, work_dir)
    print(f"[sde_ray] evaluating {resolved.kind}: {resolved.source}")
    return resolved


def _resolve(path: Path, work_dir: Path) -> ResolvedCheckpoint:
    if _is_export(path):
        run_dir = path.parent if (path.parent / "metrics.jsonl").is_file() else None
        return ResolvedCheckpoint(path, run_dir, "pretrained", path)
    if is_checkpoint(path):
        return ResolvedCheckpoint(export_ray_checkpoint(path, work_dir / MODEL_FROM_CHECKPOINT), None,
                                  "ray_checkpoint", path)
    runs = _runs_below(path)
    if len(runs) > 1:
        listed = ", ".join(str(r) for r in runs)
        raise ValueError(f"{path} holds {len(runs)} runs ({listed}): pass one of them as --checkpoint")
    source = latest_checkpoint(path)
    if _is_export(path / "model") and _export_is_current(path, source):
        return ResolvedCheckpoint(path / "model", path, "run", path / "model")
    if source is None:
        raise FileNotFoundError(
            f"{path} is not an exported model (no sde_ray_model.json), a run directory (no model/ and no "
            "complete checkpoint below it) or a Ray Train checkpoint (consolidated.pt + state.json)"
        )
    model_dir = export_ray_checkpoint(source, work_dir / MODEL_FROM_CHECKPOINT)
    return ResolvedCheckpoint(model_dir, path, "ray_checkpoint", source)


def default_output_dir(checkpoint: str | os.PathLike) -> Path:
    path = Path(checkpoint).expanduser().resolve()
    if not _is_export(path) and not is_checkpoint(path):
        return path / "eval"  # a run directory
    if _is_export(path) and (path.parent / "metrics.jsonl").is_file():
        return path.parent / "eval"  # a run's exported model/
    return path.parent / f"{path.name}-eval"


def resolve_eval_root(data_dir: str | os.PathLike | None, config: Config) -> Path:
    """`data_dir`, else `eval.data_dir`, else `data.mmeb_eval_dir`, else the synthetic eval split."""
    chosen = data_dir or config.eval.data_dir or config.data.mmeb_eval_dir
    if not chosen:
        if config.data.source != "synthetic":
            raise ValueError("no MMEB-eval root: pass --data DIR or set eval.data_dir / data.mmeb_eval_dir")
        from sde_ray.data.cache import synthetic_eval_dir

        chosen = synthetic_eval_dir(config)  # generates the synthetic MMEB if needed, converts nothing
    root = Path(chosen).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"MMEB-eval root not found: {root}")
    return root


def select_datasets(eval_root: Path, names: Sequence[str] | None = None, notice: bool = True) -> list[DatasetInfo]:
    """The datasets to evaluate: catalogued ones in the catalog's report order, then those no catalog
    describes (scored in a group of their own, see `OUTSIDE_CATALOG`; a one-line notice names them).
    Names asked for but absent are errors, as is a root without any dataset."""
    catalog = load_dataset_catalog(eval_root)
    present = list_eval_datasets(eval_root)
    if names:
        absent = [n for n in names if n not in present]
        if absent:
            raise ValueError(f"dataset(s) {absent} not found under {eval_root}; available: {present}")
    wanted = list(names) if names else present
    if not wanted:
        raise ValueError(f"no datasets (folders with test-*.parquet) under {eval_root}")
    unknown = sorted(n for n in wanted if n not in catalog)
    if unknown and notice:
        print(f"[sde_ray] {len(unknown)} dataset(s) under {eval_root} are not in the MMEB catalog (nor in a "
              f"{CATALOG_FILE} there): scored in their own group, outside the meta-tasks, IND/OOD and "
              f"overall: {', '.join(unknown)}", flush=True)
    return [info for name, info in catalog.items() if name in wanted] + [outside_catalog(n) for n in unknown]


def benchmark_version(eval_root: Path) -> str:
    """What the eval root holds: the built-in MMEB-eval, or the source its own catalog declares."""
    path = Path(eval_root) / CATALOG_FILE
    if path.is_file():
        payload = json.loads(path.read_text())
        return f"{payload.get('source', 'custom')} catalog (schema {payload.get('schema_version')}) at {path}"
    return MMEB_BENCHMARK


# ---------------------------------------------------------------------------------------------
# The shared evaluation pass


@dataclasses.dataclass
class Evaluation:
    scores: dict[str, DatasetScore]
    pairs: list[tuple[np.ndarray, np.ndarray]]  # per dataset (queries, positives) of scorable rows
    encoded: list[EncodedDataset]  # kept only when a gap remedy needs a second look
    unscorable: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> why nothing was scored

    def results(self) -> dict:
        return {**summarize(self.scores, META_TASKS), "unscorable": dict(self.unscorable)}


def evaluate_prepared(
    prepared: Sequence[PreparedDataset] | None,
    encoder: Encoder,
    *,
    eval_root: Path | None = None,
    infos: Sequence[DatasetInfo] = (),
    max_rows: int | None = None,
    keep_encoded: bool = False,
    progress: bool = False,
) -> Evaluation:
    """Scores datasets one at a time: already prepared ones, or `infos` read from `eval_root`."""
    from tqdm.auto import tqdm

    scores, pairs, encoded, unscorable = {}, [], [], {}
    source = eval_image_source(eval_root) if eval_root is not None else None
    items = list(prepared) if prepared is not None else list(infos)
    try:
        # A bar on a terminal only (disable=None): in a log file or CI every redraw would be a line.
        for item in tqdm(items, desc="datasets", unit="dataset", disable=None if progress else True):
            p = (
                item
                if isinstance(item, PreparedDataset)
                else prepare_dataset(eval_root, item, source, max_rows=max_rows)
            )
            reason = unscorable_reason(p)
            if reason is not None:  # reported by name, kept out of the averages; the rest is scored
                print(f"[sde_ray] eval: {p.info.name}: {reason}")
                unscorable[p.info.name] = reason
                continue
            e = encode_dataset(p, encoder)
            scores[e.info.name] = score_dataset(e)
            pairs.append(e.positive_pairs())
            if keep_encoded:
                encoded.append(e)
    finally:
        if source is not None:
            source.close()
    return Evaluation(scores, pairs, encoded, unscorable)


def gap_remedy_effect(encoded: Sequence[EncodedDataset], remedy: str, k: int) -> dict:
    """P@1 on every dataset's odd rows before and after a remedy fitted on all even rows (pooled)."""
    fit = [e.positive_pairs(fit_rows(e.table.num_rows)) for e in encoded]
    query, target = pool_pairs(fit, max_rows=None)
    query_map, candidate_map = fit_remedy(remedy, query, target, k)
    before, after = {}, {}
    for e in encoded:
        measured = ~fit_rows(e.table.num_rows)
        before[e.info.name] = score_dataset(e, measured)
        after[e.info.name] = score_dataset(e, measured, dataset_hits(e, query_map, candidate_map))
    summary_before, summary_after = summarize(before, META_TASKS), summarize(after, META_TASKS)
    return {
        "name": remedy,
        "fit_on": f"the even rows of every dataset, pooled ({len(query)} query-positive pairs)",
        "evaluated_on": "the odd rows of every dataset",
        "datasets": {
            name: {
                "p_at_1_before": before[name].p_at_1,
                "p_at_1_after": after[name].p_at_1,
                "num_queries": before[name].num_queries,
            }
            for name in before
        },
        "overall_before": summary_before["overall"],
        "overall_after": summary_after["overall"],
        "meta_tasks_before": summary_before["meta_tasks"],
        "meta_tasks_after": summary_after["meta_tasks"],
    }


# ---------------------------------------------------------------------------------------------
# In-process entry points (the training loop)


def evaluate_model(
    model,
    processor,
    eval_root: str | os.PathLike,
    datasets: Sequence[str] | None = None,
    max_queries: int | None = None,
    batch_size: int = 64,
) -> dict:
    """P@1 results dict of an in-memory model (no Ray); `max_queries` caps the rows per dataset."""
    root = Path(eval_root)
    infos = select_datasets(root, datasets)
    evaluation = evaluate_prepared(
        None, ModelEncoder(model, processor, batch_size), eval_root=root, infos=infos, max_rows=max_queries
    )
    return evaluation.results()


@functools.lru_cache(maxsize=4)
def _validation_slice(
    eval_root: str, names: tuple[str, ...] | None, max_queries: int
) -> tuple[PreparedDataset, ...]:
    root = Path(eval_root)
    infos = select_datasets(root, names)
    per_dataset = max(1, math.ceil(max_queries / len(infos)))
    source = eval_image_source(root)
    try:
        return tuple(prepare_dataset(root, info, source, max_rows=per_dataset) for info in infos)
    finally:
        source.close()


def validation_p_at_1(
    model,
    processor,
    eval_root: str | os.PathLike,
    max_queries: int = 200,
    batch_size: int = 64,
    datasets: Sequence[str] | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    gather=None,
    precision: str = "fp32",
) -> float:
    """Mean P@1 over datasets on a small fixed slice: the first ⌈max_queries / #datasets⌉ rows of each.

    The slice is read and its images loaded once per process, then only re-encoded. With
    `world_size > 1` every rank calls it with its own copy of the model on its device and encodes
    its share of the distinct items; `gather` (every rank's object in rank order, default
    `sharded.all_gather_objects`) joins them and every rank returns the same value.
    """
    from sde_ray.eval.sharded import all_gather_objects, sharded_encode

    prepared = _validation_slice(
        str(Path(eval_root).resolve()), tuple(datasets) if datasets else None, max_queries
    )
    encoder = ModelEncoder(model, processor, batch_size, precision=precision)
    encoded = sharded_encode(prepared, encoder, rank, world_size, gather or all_gather_objects)
    scores = {e.info.name: score_dataset(e) for e in encoded}
    overall = summarize(scores, META_TASKS)["overall"]
    if overall is None:  # only datasets outside the catalog: their mean stands in
        overall = summarize(scores, META_TASKS)["outside_catalog"]
    return float(overall)


# ---------------------------------------------------------------------------------------------
# The `sde-ray eval` job


def eval_precision(config: Config) -> str:
    """The precision the eval actors encode in: the training precision (fp16 only on GPUs)."""
    return config.deepspeed.precision


def evaluate_on_actors(
    model_dir: Path,
    eval_root: Path,
    infos: Sequence[DatasetInfo],
    config: Config,
    cache_dir: Path | None = None,
    keep_encoded: bool = False,
) -> tuple[Evaluation, dict]:
    """Encodes on `eval.num_workers` Ray actors (GPU actors when the cluster has GPUs) through the
    embedding cache; returns the evaluation and a record of the run: where each actor ran (pid,
    host, device, precision) and the cache's hits / misses (requests = one side of one dataset)."""
    pool = RayEncoderPool(model_dir, config.eval.num_workers, config.eval.batch_size,
                          precision=eval_precision(config))
    try:
        actors = pool.describe()
        encoder = CachedEncoder(pool, model_identity(model_dir), cache_dir)
        evaluation = evaluate_prepared(
            None, encoder, eval_root=eval_root, infos=infos, keep_encoded=keep_encoded, progress=True
        )
    finally:
        pool.shutdown()
    record = {"evaluated_by": actors, "embedding_cache": {"hits": encoder.hits, "misses": encoder.misses,
                                                          "dir": str(cache_dir) if cache_dir else None}}
    return evaluation, record


def model_stamp(model_dir: Path) -> dict:
    """The evaluated model's identity, stamped on every score file."""
    from sde_ray.models.embedder import EXPORT_FILE

    meta = json.loads((Path(model_dir) / EXPORT_FILE).read_text())
    return {"model_dir": str(model_dir), "sha256": model_identity(model_dir),
            "source_name_or_path": meta.get("source_name_or_path")}


def final_evaluation(model_dir: str | os.PathLike, eval_root: str | os.PathLike, config: Config,
                     output_dir: str | os.PathLike) -> dict:
    """The end-of-training evaluation (the driver calls it after `fit()`): the exported model on
    the eval actors; VLM2Vec score files and the embedding cache under `<output_dir>/eval`."""
    model_dir, eval_root = Path(model_dir), Path(eval_root)
    out = Path(output_dir) / "eval"
    infos = select_datasets(eval_root, config.eval.datasets or None, notice=False)
    evaluation, record = evaluate_on_actors(model_dir, eval_root, infos, config, out / EMBEDDING_CACHE)
    results = evaluation.results()
    results.update(record, model=model_stamp(model_dir), benchmark=benchmark_version(eval_root),
                   model_dir=str(model_dir), data_dir=str(eval_root))
    write_vlm2vec_scores(results, out / VLM2VEC_DIR)
    if config.data.synth_v2:  # the synthetic MMEB-V2 mix: image / video / visdoc / overall
        from sde_ray.eval.mmeb_v2 import final_evaluation_v2

        results["mmeb_v2"] = final_evaluation_v2(model_dir, results, config, out / "mmeb_v2")
    log_to_wandb(results, {}, config, out)  # the workers' wandb run has finished: a job_type=eval run
    return results


def run_eval(
    checkpoint: str | os.PathLike,
    data_dir: str | os.PathLike | None = "",
    datasets: Sequence[str] | None = None,
    output_dir: str | os.PathLike | None = None,
    config: Config | None = None,
    gap_remedy: str | None = None,
) -> dict:
    """Evaluates a checkpoint on MMEB-eval (see module docstring); returns the results dict."""
    import ray

    config = config or Config()
    remedy = gap_remedy if gap_remedy is not None else config.eval.gap_remedy
    remedy = None if remedy in (None, "", "none") else remedy
    out = Path(output_dir).expanduser().resolve() if output_dir else default_output_dir(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    resolved = resolve_checkpoint(checkpoint, out)
    eval_root = resolve_eval_root(data_dir, config)
    infos = select_datasets(eval_root, datasets or config.eval.datasets or None)

    # A local Ray takes the machine's CPUs: the encoding actors are the only work.
    started_ray = connect(config, local_cpus=os.cpu_count() or 1, log_to_driver=False)
    try:
        evaluation, record = evaluate_on_actors(
            resolved.model_dir, eval_root, infos, config, out / EMBEDDING_CACHE, keep_encoded=bool(remedy)
        )
    finally:
        if started_ray:
            ray.shutdown()

    results = evaluation.results()
    results["checkpoint"] = str(Path(checkpoint).expanduser().resolve())
    results["model_dir"] = str(resolved.model_dir)
    results["data_dir"] = str(eval_root)
    results.update(record, model=model_stamp(resolved.model_dir), benchmark=benchmark_version(eval_root))
    write_vlm2vec_scores(results, out / VLM2VEC_DIR)
    if remedy:
        results["gap_remedy"] = gap_remedy_effect(evaluation.encoded, remedy, config.loss.gap.k)

    plot_dir = out / "plots"
    plot_paths = {"p_at_1": plots.plot_p_at_1(results, plot_dir / "p_at_1.png")}
    query, target = pool_pairs(evaluation.pairs, seed=config.train.seed)
    if len(query) >= 2:
        diagnostics, spectra = feature_diagnostics(query, target, config)
        results["diagnostics"] = diagnostics
        plot_paths["spectrum"] = plots.plot_spectrum(
            spectra, plot_dir / "spectrum.png", title=f"eval-set spectrum ({len(query)} pairs)"
        )
    if resolved.run_dir is not None and (resolved.run_dir / "metrics.jsonl").is_file():
        history = training_history(resolved.run_dir / "metrics.jsonl")
        plot_paths.update(write_history_plots(history, plot_dir))
    results["plots"] = {name: str(path) for name, path in plot_paths.items()}
    write_results(results, out)
    log_to_wandb(results, plot_paths, config, out)
    print(
        f"MMEB P@1 overall {100 * (results['overall'] or 0):.1f} over {len(results['datasets'])} datasets "
        f"-> {out}",
        flush=True,
    )
    return results


def log_to_wandb(results: dict, plot_paths: dict[str, Path], config: Config, output_dir: Path) -> None:
    """Logs P@1 (per dataset and aggregated), the diagnostics and the plots to the active wandb run,
    or to a new `job_type=eval` run when logging.wandb is on and none is active. wandb is imported
    only then: an active run means the caller imported it already, and with logging.wandb off a
    machine without wandb (or without its network) must still evaluate."""
    active = sys.modules.get("wandb")
    run = active.run if active is not None else None
    mode = wandb_mode(config.logging)
    if run is None and (not config.logging.wandb or mode == "disabled"):
        return
    import wandb

    started = run is None
    if started:
        run = wandb.init(
            project=config.logging.wandb_project,
            group=config.logging.wandb_group or None,
            job_type="eval",
            dir=str(output_dir),
            mode=mode,
            reinit="finish_previous",
            config={"checkpoint": results.get("checkpoint"), "data_dir": results.get("data_dir")},
            # Offline, wandb's own lines (banner, run summary) repeat the table the console prints;
            # online they carry the run's URL.
            settings=wandb.Settings(silent=mode != "online"),
        )
    payload: dict = {f"eval/p_at_1/{name}": row["p_at_1"] for name, row in results["datasets"].items()}
    payload.update({f"eval/meta_task/{task}": value for task, value in results["meta_tasks"].items()})
    payload.update(
        {f"eval/{key}": results[key] for key in ("ind", "ood", "overall") if results[key] is not None}
    )
    payload.update(
        {f"eval/diagnostics/{key}": value for key, value in results.get("diagnostics", {}).items()}
    )
    payload.update({f"eval/plots/{name}": wandb.Image(str(path)) for name, path in plot_paths.items()})
    columns = ["dataset", "meta_task", "split", "p_at_1", "num_queries", "num_missing", "num_malformed"]
    payload["eval/results"] = wandb.Table(
        columns=columns,
        data=[[name] + [row[c] for c in columns[1:]] for name, row in results["datasets"].items()],
    )
    run.log(payload)
    run.summary["eval/overall"] = results["overall"]
    if started:
        run.finish()
