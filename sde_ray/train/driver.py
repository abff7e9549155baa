"""The main job: `sde-ray train` on the driver — Ray, data, the TorchTrainer, results.

`run_train(config)` resolves every path to an absolute one (Ray Train workers chdir into a run
folder), joins the configured cluster or starts a local Ray with enough logical CPUs for the
workers plus `data.data_cpus`, fails fast when the cluster cannot fit them (Ray Data would otherwise
wait forever for a CPU), prepares the data (synthetic MMEB generated and converted on first use),
fits the trainer from `build_trainer`, evaluates the exported model on the eval runner's Ray
actors once `fit()` has returned (`sde_ray.eval.runner.final_evaluation`), and writes
`results.json` / `.md` / `.csv` plus the P@1 table and energy shares on the console. `build_trainer` is also what each Ray Tune trial fits.

The console (`train.console`): Ray keeps the workers' output in its log files (`--verbose`
forwards it, as Ray does by default); rank 0 relays the progress, validations and notices to a
progress bar drawn here, and the last lines name the log folder.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable
from pathlib import Path

import ray
import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from sde_ray import storage
from sde_ray.config import Config, ConfigError, dump_yaml, is_elastic, with_values, worker_counts
from sde_ray.data.cache import prepare_data
from sde_ray.eval.report import results_markdown, write_results
from sde_ray.eval.roots import eval_root, select_datasets
from sde_ray.eval.runner import final_evaluation
from sde_ray.models import count_parameters
from sde_ray.ray_cluster import (
    check_capacity,
    connect,
    conversion_executor,
    logs_dir,
    worker_env,
    worker_node_resources,
)
from sde_ray.runs import METRICS_FILE, run_id, wandb_mode
from sde_ray.train.deepspeed_config import build_deepspeed_config
from sde_ray.train.checkpoint_store import prepare_resume, prune_unregistered
from sde_ray.train.console import ConsoleRelay, ProgressConsole
from sde_ray.train.data import ProcessorFactory, train_data_from_config
from sde_ray.train.loop import RunArgs, build_train_module, train_loop_per_worker
from sde_ray.train.preemption import Preemption
from sde_ray.train.run_dir import claim_run_dir


def absolute_path(path: str) -> str:
    """`path` made absolute on the driver (`~` expanded); URLs (s3://, gs://) and "" pass through."""
    if not path or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def default_storage_path(output_dir: str) -> str:
    """Ray Train's storage when `train.storage_path` is empty: `<output_dir>/ray` (a URL stays one)."""
    return storage.join(output_dir, "ray")


def local_model_path(name_or_path: str) -> str:
    """A model name made absolute when it is a folder on the driver (a hub id such as
    `google/vit-base-patch16-224` passes through): `from_pretrained` on the workers then finds it."""
    if name_or_path and Path(name_or_path).expanduser().is_dir():
        return absolute_path(name_or_path)
    return name_or_path


def resolve_paths(config: Config) -> Config:
    """The config with output, storage, cache, data and local model paths made absolute on the driver
    (Ray Train workers chdir into a run folder). Paths are carried as values: `#`, `: `, quotes or spaces in a
    path survive unchanged. Idempotent. A malformed URL (`s3:/bucket/x` became a folder `s3:` in every
    process's working directory) or an unsupported scheme is a ConfigError naming the key, here,
    before Ray starts (`storage.check_config_locations`)."""
    storage.check_config_locations(config)
    output_dir = absolute_path(config.train.output_dir)
    return with_values(config, {
        "train.output_dir": output_dir,
        "train.storage_path": absolute_path(config.train.storage_path or default_storage_path(output_dir)),
        "data.cache_dir": absolute_path(config.data.cache_dir),
        "data.mmeb_train_dir": absolute_path(config.data.mmeb_train_dir),
        "data.mmeb_eval_dir": absolute_path(config.data.mmeb_eval_dir),
        "data.negatives_sidecar": absolute_path(config.data.negatives_sidecar),
        "data.shards": [absolute_path(shard) for shard in config.data.shards],
        "eval.data_dir": absolute_path(config.eval.data_dir),
        "eval.val_data_dir": absolute_path(config.eval.val_data_dir),
        # A relative checkpoint folder (`model.vision_name_or_path=byo/vit`) failed on every worker.
        "model.name_or_path": local_model_path(config.model.name_or_path),
        "model.vision_name_or_path": local_model_path(config.model.vision_name_or_path),
        "model.text_name_or_path": local_model_path(config.model.text_name_or_path),
        "model.init_from": absolute_path(config.model.init_from),
    })


def check_data_paths(config: Config) -> None:
    """Every local `data.shards` entry names something (a glob matching nothing is a config error
    here, before Ray starts, instead of a traceback in the data stage); remote ones are read later."""
    for index, entry in enumerate(config.data.shards):
        if "://" in entry and not entry.startswith("file://"):
            continue
        local = os.path.expanduser(entry.removeprefix("file://"))
        if any(ch in local for ch in "*?["):
            found = bool(glob.glob(local))
        elif os.path.isdir(local):
            found = bool(glob.glob(os.path.join(local, "*.tar")))
        else:
            found = os.path.isfile(local)
        if not found:
            raise ConfigError(f"data.shards[{index}]: {entry!r} matches no WebDataset shard")


def data_counts(prepared, train_data=None) -> dict[str, int]:
    """What the data stage left out, logged with every metrics row and in results.json: skipped
    shards, rows the converter rejected and, given the epoch order, the rows each epoch leaves out
    (the remainder of `data.batching`: the same count every epoch)."""
    counts = {"data_skipped_shards": len(prepared.skipped_shards),
              "data_rejected_rows": int(prepared.manifest.get("rejected", 0) or 0)}
    if train_data is not None:
        counts["data_epoch_rows_left_out"] = train_data.order(0).dropped_rows
    return counts


def eval_root_of(config: Config, prepared) -> str | None:
    """The MMEB-eval root a run validates and evaluates on (`eval.roots.eval_root`, with the prepared
    synthetic eval split; None: no evaluation)."""
    return eval_root(config, synthetic_dir=getattr(prepared, "eval_dir", "")) or None


def val_root_of(config: Config, prepared) -> str | None:
    """The MMEB-eval-layout root validated on during training: `eval.val_data_dir`, else the synthetic
    set's own validation split, else the eval root (whose first rows the final evaluation scores too)."""
    return config.eval.val_data_dir or getattr(prepared, "val_dir", None) or eval_root_of(config, prepared)


def check_eval_root(config: Config, prepared) -> None:
    """On the driver, before any worker starts: the eval and validation roots' datasets must be
    readable (ones outside the catalog get a one-line notice)."""
    root, val_root = eval_root_of(config, prepared), val_root_of(config, prepared)
    if root:
        select_datasets(Path(root), config.eval.datasets or None)
    if val_root and val_root != root:
        select_datasets(Path(val_root), None, notice=False)
    if val_root and val_root == root and config.train.eval_every > 0:
        print(f"[sde_ray] validation P@1 is measured on the first rows of the evaluation set {root}, which the "
              "final evaluation scores too: tune on a disjoint split (eval.val_data_dir)")


def build_trainer(
    config: Config,
    *,
    callbacks: list | None = None,
    prepared=None,
    step_hook: Callable[..., None] | None = None,
    preemption=None,
    console: ConsoleRelay | None = None,
):
    """The TorchTrainer of one training run (what `run_train` and each Tune trial fit).

    The run is named `train.run_name` and stored under `train.storage_path`. `prepared`: the
    `PreparedData` of `sde_ray.data.cache.prepare_data` (computed when None). `step_hook(step=,
    rank=, world_size=, module=)`: called on every worker after each optimizer step with the engine's
    module (instrumentation, fault injection in tests); cloudpickle-able. The workers receive the
    typed config itself and a `RunArgs`, both pickled by Ray. `preemption`: the flag of a
    `preemption.Preemption`; when raised, the workers checkpoint and stop. `console`: the relay rank 0
    sends its progress and notices through (`train.console`); None: its stdout only.
    """
    config = resolve_paths(config)
    if prepared is None:
        prepared = prepare_data(config, **conversion_executor())
    check_eval_root(config, prepared)  # before Ray Data or a worker starts
    scaling = config.scaling
    num_workers = (scaling.min_workers, scaling.max_workers) if is_elastic(scaling) else scaling.num_workers
    resources = {"CPU": scaling.cpus_per_worker, **worker_node_resources(config)}
    if scaling.use_gpu:
        resources["GPU"] = 1
    # The rank-0 progress line is the run's progress display; Ray Data's bars would interleave with it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    # No Ray Train dataset: each worker reads its rows of the epoch order itself (sde_ray.train.data).
    factory = ProcessorFactory(config.model, config.loss.negatives_per_query,
                                config.data.negatives_sidecar, prepared.shards)
    train_data = train_data_from_config(config, prepared, factory)
    epoch = train_data.order(0)
    print(f"[sde_ray] data.batching={config.data.batching}: {epoch.steps} global batches of {epoch.global_batch} "
          f"per epoch; {epoch.dropped_rows} of {epoch.num_rows} rows left out of each epoch (the remainder)")
    if config.model.kind == "vlm":
        print(visual_token_report(config, scaling.min_workers if is_elastic(scaling) else scaling.num_workers))
    return TorchTrainer(
        train_loop_per_worker,
        # Interrupted checkpoint folders are removed here, once per fit; the newest complete one is offered.
        train_loop_config=worker_payload(
            config, prepared, train_data, step_hook, preemption, console=console,
            resume_dir=prepare_resume(f"{config.train.storage_path}/{config.train.run_name}")),
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=scaling.elastic_resize_monitor_interval_s,
        ),
        run_config=ray.train.RunConfig(
            name=config.train.run_name,
            # An s3:// / gs:// storage goes through the run's own pyarrow file system: the same
            # endpoint and credentials as every other artifact (`sde_ray.storage`).
            **dict(zip(("storage_path", "storage_filesystem"), storage.ray_storage(config.train.storage_path))),
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": worker_env(config)},
        ),
    )


def visual_token_report(config: Config, world_size: int) -> str:
    """What a VLM run feeds its vision tower and language model: visual tokens per image (the range, and
    a 448×448 image's) and per micro-batch (a GradCache chunk's rows × their image sides)."""
    from sde_ray.config import chunk_size
    from sde_ray.models.processing import VisualGeometry, load_processors

    geometry = VisualGeometry.of(load_processors(config.model)[1], config.model)
    cell = geometry.factor**2
    fewest, most, at_448 = max(1, -(-geometry.min_pixels // cell)), geometry.max_tokens, geometry.tokens(448, 448)
    chunk = chunk_size(config, world_size)
    images = chunk * (2 + config.loss.negatives_per_query)  # query, positive and negatives of each row
    return (f"[sde_ray] visual tokens per image: {fewest}..{most} (model.min_pixels={geometry.min_pixels}, "
            f"max_pixels={geometry.max_pixels}, one token per {geometry.factor}×{geometry.factor} pixels); a 448×448 "
            f"image: {at_448}. Per micro-batch of {chunk} rows ({images} image sides): up to {images * most} visual "
            f"tokens, {images * at_448} if every side were a 448×448 image"
            + (f"; chunks end at {config.train.chunk_tokens} token positions (train.chunk_tokens)"
               if config.train.chunk_tokens else ""))


def worker_payload(config: Config, prepared=None, train_data=None, step_hook: Callable[..., None] | None = None,
                   preemption=None, resume_dir: str | None = None,
                   console: ConsoleRelay | None = None) -> dict:
    """What every training worker receives (Ray Train's `train_loop_config` must be a dict): the
    resolved typed config and the run arguments, pickled as they are."""
    args = RunArgs(
        val_root=val_root_of(config, prepared),
        run_id=run_id(config.train.storage_path, config.train.run_name),
        wandb_mode=wandb_mode(config.logging),
        step_hook=step_hook,
        train_data=train_data,
        resume_dir=resume_dir,
        preemption=preemption,
        data_counts=data_counts(prepared, train_data) if prepared is not None else {},
        console=console,
    )
    return {"config": config, "args": args}


def check_negatives(config: Config, shards: list[str]) -> None:
    """A mined sidecar must cover exactly these shards' samples, with enough negatives each: checked
    on the driver, before any worker starts. A sidecar feeds mined negatives
    (`loss.negatives_per_query`), teacher clusters (`data.batching=teacher_cluster`), or both; the
    batch planner's own inputs are checked where the order is built (`train_data_from_config`)."""
    if not config.data.negatives_sidecar:
        return
    from sde_ray.data.negatives import check_sidecar, load_sidecar, shard_keys

    if not config.loss.negatives_per_query and config.data.batching != "teacher_cluster":
        raise ConfigError("data.negatives_sidecar is set but loss.negatives_per_query=0 and data.batching is not "
                          "teacher_cluster: the sidecar would be unused.")
    check_sidecar(load_sidecar(config.data.negatives_sidecar), shard_keys(shards),
                  negatives_per_query=config.loss.negatives_per_query)


def dry_run_report(config: Config) -> dict:
    """Validates, builds the model and every DeepSpeed config the run may use; starts no worker."""
    config = resolve_paths(config)
    module = build_train_module(config)
    counts = {"encoder": count_parameters(module.model), "objective": count_parameters(module.objective)}
    ds_configs = {str(w): build_deepspeed_config(config, w) for w in worker_counts(config.scaling)}
    print(dump_yaml(config), end="")
    for world, ds_config in ds_configs.items():
        print(f"DeepSpeed config for {world} worker(s):\n{json.dumps(ds_config, indent=1)}")
    print(f"parameters: {json.dumps(counts)}")
    print(f"embedding dim: {module.model.embed_dim}; outputs: {config.train.output_dir}")
    return {"dry_run": True, "parameters": counts, "deepspeed": ds_configs, "output_dir": config.train.output_dir}


def _energy_table(metrics: dict) -> str:
    lines = ["| Modality | strong | weak | noise | effective rank |", "|---|---:|---:|---:|---:|"]
    for side, title in (("q", "query"), ("t", "target")):
        if f"energy_strong_{side}" not in metrics:
            continue
        shares = [100.0 * metrics[f"energy_{s}_{side}"] for s in ("strong", "weak", "noise")]
        lines.append(f"| {title} | {shares[0]:.1f}% | {shares[1]:.1f}% | {shares[2]:.1f}% "
                     f"| {metrics.get(f'effective_rank_{side}', float('nan')):.1f} |")
    return "\n".join(lines)


def _evaluate_after_fit(config: Config, prepared, metrics: dict) -> dict | None:
    """The final MMEB evaluation of the exported model on the eval actors (the training worker
    group is gone by now, so its GPUs are free and no rank waits in a collective meanwhile)."""
    root = eval_root_of(config, prepared)
    if not root or not metrics.get("model_dir"):
        return None
    return final_evaluation(metrics["model_dir"], root, config, config.train.output_dir)


def run_train(config: Config, dry_run: bool = False, verbose: bool = False,
              step_hook: Callable[..., None] | None = None) -> dict:
    """The main job. Returns the summary also written to `<output_dir>/results.json`.
    `step_hook`: as `build_trainer`'s (instrumentation, fault injection in tests).

    `verbose`: Ray forwards every worker's output to this console (DeepSpeed, Ray Data, Ray Train
    and the workers' own progress lines) instead of the progress bar; the log files hold it either way."""
    if dry_run:
        return dry_run_report(config)
    config = resolve_paths(config)
    check_data_paths(config)
    config = claim_run_dir(config)  # refuses a relaunch under another config
    output_dir = config.train.output_dir
    started = connect(config, log_to_driver=verbose)
    try:
        check_capacity(config)
        prepared = prepare_data(config, **conversion_executor())
        check_negatives(config, prepared.shards)
        relay = None if verbose else ConsoleRelay.start()
        with Preemption() as preemption, ProgressConsole.around(relay, config.logging.console_every):
            # SIGTERM: checkpoint at the next step and return
            result = build_trainer(config, prepared=prepared, preemption=preemption.flag, console=relay,
                                   step_hook=step_hook).fit()
        metrics = dict(result.metrics or {})
        evaluation = None if metrics.get("preempted") else _evaluate_after_fit(config, prepared, metrics)
    finally:
        if started:
            ray.shutdown()
    run_dir = f"{config.train.storage_path}/{config.train.run_name}"
    prune_unregistered(run_dir, [checkpoint.path for checkpoint, _ in result.best_checkpoints or []])
    summary = {
        "train": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "model_dir": metrics.get("model_dir"),
        "output_dir": output_dir,
        "metrics_jsonl": storage.join(output_dir, METRICS_FILE),
        "spectrum_plot": storage.join(output_dir, "plots", "spectrum.png"),
        "logs": logs_dir(),  # every process's full output (Ray's session logs)
        "preempted": bool(metrics.get("preempted")),
        "data": {**data_counts(prepared), "data_rows_replaced": int(metrics.get("data_rows_replaced", 0)),
                 "skipped_shards": dict(prepared.skipped_shards),
                 "rejected_by_reason": prepared.manifest.get("rejected_by_reason", {})},
    }
    if summary["preempted"]:
        print(f"[sde_ray] preempted (SIGTERM) at step {metrics.get('step')}: checkpoint {summary['checkpoint']}; "
              "rerun the same command to resume")
    if summary["model_dir"] and not summary["preempted"]:
        from sde_ray.embed.card import write_model_card

        write_model_card(summary["model_dir"], config, evaluation, summary["train"])
    if evaluation:
        write_results({**evaluation, **summary}, output_dir)
        print(results_markdown(evaluation))
    else:
        storage.write_text(storage.join(output_dir, "results.json"), json.dumps(summary, indent=2) + "\n")
    print(_energy_table(metrics))
    for key in ("output_dir", "model_dir", "checkpoint", "metrics_jsonl", "spectrum_plot", "logs"):
        print(f"{key}: {summary[key]}")
    return {**summary, "eval": evaluation}
