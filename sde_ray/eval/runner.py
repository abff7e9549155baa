"""MMEB evaluation jobs on Ray: `run_eval` (the `sde-ray eval` job) and `final_evaluation` (the
driver's, after `trainer.fit()` returns), both encoding on Ray actors (`evaluate_on_actors`), never
inside the training worker group; and the wandb record of either.

The pieces live by concern: which model is scored (`eval.checkpoints`), which root and datasets
(`eval.roots`, one eval-root rule), the pass itself (`eval.evaluation`), and validation during
training, spread over the training ranks (`eval.validation`).

`run_eval(checkpoint, ...)` resolves the checkpoint (`eval.checkpoints.resolve_checkpoint`), encodes with
`eval.num_workers` Ray actors (one GPU each when the cluster has GPUs) fed by Ray Data CPU tasks that
decode and tokenise (`eval.streamed`), writes results.json / .md /
.csv, the diagnostics and the plots into the output folder, VLM2Vec-layout score files into its
`vlm2vec/` (see `sde_ray.eval.report.write_vlm2vec_scores`), and logs them to wandb. Embeddings are
cached under `<output>/embedding_cache`, keyed by the model's identity and each dataset's content,
so evaluating the same model on the same data again encodes nothing.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence

from sde_ray import storage
from sde_ray.config import Config
from sde_ray.data.mmeb import DatasetInfo
from sde_ray.eval import plots
from sde_ray.eval.checkpoints import default_output_dir, resolve_checkpoint
from sde_ray.eval.diagnostics import feature_diagnostics, pool_pairs, training_history, write_history_plots
from sde_ray.eval.encode import CachedEncoder, model_identity
from sde_ray.eval.evaluation import Evaluation, gap_remedy_effect
from sde_ray.eval.report import write_results, write_vlm2vec_scores
from sde_ray.eval.roots import benchmark_version, resolve_eval_root, select_datasets
from sde_ray.ray_cluster import connect, worker_node_resources
from sde_ray.runs import wandb_dir, wandb_mode

EMBEDDING_CACHE = "embedding_cache"
VLM2VEC_DIR = "vlm2vec"


def eval_precision(config: Config) -> str:
    """The precision the eval actors encode in: the training precision (fp16 only on GPUs)."""
    return config.deepspeed.precision


def evaluate_on_actors(
    model_dir: str | Path,
    eval_root: Path,
    infos: Sequence[DatasetInfo],
    config: Config,
    cache_dir: str | Path | None = None,
    keep_encoded: bool = False,
    model_id: str | None = None,
) -> tuple[Evaluation, dict]:
    """Encodes on `eval.num_workers` Ray actors (GPU actors when the cluster has GPUs), fed by Ray Data
    CPU tasks that decode and tokenise (`sde_ray.eval.streamed`), through the embedding cache;
    returns the evaluation and a record of the run: where each actor ran (pid, host, device,
    precision, weights' dtype) and the cache's hits / misses (requests = one side of one dataset)."""
    from sde_ray.eval.streamed import evaluate_streamed

    cache = CachedEncoder(None, model_id or model_identity(model_dir), cache_dir)
    evaluation, stream = evaluate_streamed(model_dir, eval_root, infos, config, cache,
                                           keep_encoded=keep_encoded, resources=worker_node_resources(config))
    record = {"evaluated_by": stream.actors, "decoded_by": sorted(stream.decoded_by),
              "embedding_cache": {"hits": stream.hits, "misses": stream.misses,
                                  "dir": str(cache_dir) if cache_dir else None}}
    return evaluation, record


def model_stamp(model_dir: Path) -> dict:
    """The evaluated model's identity, stamped on every score file."""
    from sde_ray.models.embedder import EXPORT_FILE

    meta = json.loads((Path(model_dir) / EXPORT_FILE).read_text())
    return {"model_dir": str(model_dir), "sha256": model_identity(model_dir),
            "source_name_or_path": meta.get("source_name_or_path")}


def score_export(model_dir: str | os.PathLike, eval_root: Path, infos: Sequence[DatasetInfo], config: Config,
                 out: str | os.PathLike, keep_encoded: bool = False) -> tuple[Evaluation, dict]:
    """An exported model scored on the eval actors: the evaluation and its results dict, stamped with
    the model, the benchmark and where they came from; VLM2Vec score files under `<out>/vlm2vec`.
    `model_dir` and `out`: folders or object-store URLs."""
    model_dir, out = str(model_dir), str(out)
    with storage.readable_dir(model_dir) as local:  # the driver's copy, for the identity only
        stamp = {**model_stamp(local), "model_dir": model_dir}
    # The actors load the export themselves (each node its own scratch copy of a remote one).
    evaluation, record = evaluate_on_actors(model_dir, eval_root, infos, config, storage.join(out, EMBEDDING_CACHE),
                                            keep_encoded=keep_encoded, model_id=stamp["sha256"])
    results = evaluation.results()
    results.update(record, model=stamp, benchmark=benchmark_version(eval_root),
                   model_dir=model_dir, data_dir=str(eval_root))
    write_vlm2vec_scores(results, storage.join(out, VLM2VEC_DIR))
    return evaluation, results


def final_evaluation(model_dir: str | os.PathLike, eval_root: str | os.PathLike, config: Config,
                     output_dir: str | os.PathLike) -> dict:
    """The end-of-training evaluation (the driver calls it after `fit()`): the exported model on
    the eval actors; VLM2Vec score files and the embedding cache under `<output_dir>/eval` (folders
    or URLs)."""
    model_dir, eval_root, out = str(model_dir), Path(eval_root), storage.join(str(output_dir), "eval")
    infos = select_datasets(eval_root, config.eval.datasets or None, notice=False)
    _, results = score_export(model_dir, eval_root, infos, config, out)
    if config.data.synth_v2:  # the synthetic MMEB-V2 mix: image / video / visdoc / overall
        from sde_ray.eval.mmeb_v2 import final_evaluation_v2

        # It reads the model and writes its score files with local file APIs: scratch copies of remote ones.
        with storage.readable_dir(model_dir) as local, storage.writable_dir(storage.join(out, "mmeb_v2")) as v2:
            results["mmeb_v2"] = final_evaluation_v2(str(local), results, config, v2)
    # The workers' wandb run has finished: a job_type=eval run (node-local files under a remote output).
    log_to_wandb(results, {}, config, wandb_dir(out, "eval"))
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
        evaluation, results = score_export(resolved.model_dir, eval_root, infos, config, out,
                                           keep_encoded=bool(remedy))
    finally:
        if started_ray:
            ray.shutdown()
    results["checkpoint"] = str(Path(checkpoint).expanduser().resolve())
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
