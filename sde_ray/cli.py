"""The `sde-ray` console script: train | tune | eval | compare | config | data | mine | embed | search | serve | bench.

Every command that reads a config takes `--config PATH` followed by dotted overrides
(`train.lr=3e-4 loss.name=infonce`); precedence is CLI > file > defaults. Config errors are printed
as one clear line and exit with status 2 before anything starts. Heavy modules are imported inside
the handlers so `sde-ray config show` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sde_ray.config import Config, ConfigError, DataConfig, dump_yaml, load_config, with_values

BENCHMARKS = ("spectral", "data", "train", "eval", "models", "search", "serve", "checkpoint", "upload", "startup")


def _add_config_args(parser: argparse.ArgumentParser, default: str | None = "configs/default.yaml") -> None:
    parser.add_argument("--config", default=default, help="YAML config file, relative to the current directory "
                        "(default: %(default)s; '' for the built-in defaults).")
    parser.add_argument("overrides", nargs="*", help="Dotted overrides key.sub=value (CLI > file > defaults).")


def _load(args: argparse.Namespace):
    """The config of `--config` and the dotted overrides: the only place strings become config values.

    `--config` is read relative to the current directory, the default included: run elsewhere, the
    default `configs/default.yaml` is reported missing (never silently replaced by the built-in
    defaults); `--config ''` asks for the built-in defaults explicitly. `--output-dir` is a path and
    is set as a value (`with_values`), never written into an override string and parsed again, so
    `#`, `: `, quotes or spaces in it survive unchanged.
    """
    config = load_config(args.config or None, list(args.overrides))
    if args.command == "train" and args.output_dir:
        config = with_values(config, {"train.output_dir": args.output_dir})
    return config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sde-ray", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="Train on Ray Train + DeepSpeed, then evaluate.")
    _add_config_args(train)
    train.add_argument("--output-dir", help="Run outputs (overrides train.output_dir).")
    train.add_argument("--dry-run", action="store_true", help="Validate, build model and DeepSpeed config, exit.")
    train.add_argument("--verbose", action="store_true", help="Forward every worker's output (DeepSpeed, Ray Data, "
                       "Ray Train) to the console instead of the progress bar; the log files hold it either way.")

    tune = commands.add_parser("tune", help="Ray Tune sweep over curricula and loss weights.")
    _add_config_args(tune, default=None)
    tune.add_argument("--output-dir", help="Sweep outputs (trials.csv, best_config.yaml, plots).")

    evaluate = commands.add_parser("eval", help="MMEB P@1 of a checkpoint; `eval compare A B` diffs two runs.")
    evaluate.add_argument("--checkpoint", required=True, help="Run dir, Ray checkpoint or save_pretrained dir.")
    evaluate.add_argument("--data", default="", help="MMEB-eval layout root (default: synthetic eval split).")
    evaluate.add_argument("--datasets", nargs="*", default=None, help="Subset of datasets.")
    evaluate.add_argument("--output-dir", default=None, help="Where results.{json,md,csv} and plots go.")
    evaluate.add_argument("--gap-remedy", default=None, choices=["none", "procrustes", "shared_projection"])
    evaluate.add_argument("--benchmark", default="mmeb", choices=["mmeb", "mmeb-v2"],
                          help="mmeb: MMEB-eval P@1; mmeb-v2: the video and visdoc sets of a V2-layout --data "
                               "folder (default: the synthetic V2), hit@k / NDCG@5 score files (docs/eval.md).")
    _add_config_args(evaluate, default=None)

    compare = commands.add_parser("compare", help="Train several objectives × seeds on equal terms; table.")
    _add_config_args(compare)
    compare.add_argument("--objectives", default="sde,infonce,fanoise,disncl,dsrsd,gap")
    compare.add_argument("--seeds", type=int, default=3)
    compare.add_argument("--noisy-correspondence", default="0")
    compare.add_argument("--output-dir", default="runs/compare")
    compare.add_argument("--data-orders", type=int, default=1, help="data.shuffle_seed values per seed.")
    compare.add_argument("--init-from", default="", help="Fine-tune every objective from this run/export.")
    compare.add_argument("--pretrain-steps", type=int, default=0, help="First pretrain InfoNCE this long; init from it.")

    config = commands.add_parser("config", help="Config utilities.")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser("show", help="Print the resolved config as YAML.")
    _add_config_args(show)

    data = commands.add_parser("data", help="Dataset tools.")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    convert = data_commands.add_parser("convert-mmeb", help="MMEB-train parquet + images -> WebDataset shards.")
    convert.add_argument("--src", required=True)
    convert.add_argument("--out", required=True)
    convert.add_argument("--subsets", nargs="*", default=None)
    convert.add_argument("--split", default="original")
    convert.add_argument("--samples-per-shard", type=int, default=DataConfig().samples_per_shard)
    convert.add_argument("--workers", type=int, default=1,
                         help="Processes of this machine; with --ray, the local Ray's CPUs when no cluster is joined.")
    convert.add_argument("--ray", action="store_true",
                         help="Convert as Ray tasks on every CPU of the cluster at RAY_ADDRESS (a local Ray of "
                         "--workers CPUs without one); --src and --out must be paths every node shares.")
    verify = data_commands.add_parser(
        "verify", help="Check converted shards against their manifest: sizes, tar headers and sha256 (reads every byte).")
    verify.add_argument("shards", help="The converted folder (local or s3:// / gs://) holding manifest.json.")
    synth = data_commands.add_parser("synth", help="Write the synthetic MMEB (train + eval layouts).")
    synth.add_argument("--out", required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--train-per-subset", type=int, default=384)
    synth.add_argument("--eval-per-dataset", type=int, default=100)
    synth.add_argument("--noisy-correspondence", type=float, default=0.0)
    digits = data_commands.add_parser(
        "digits", help="Write the UCI digits (scikit-learn) as MMEB-train + MMEB-eval: a small real-image check.")
    digits.add_argument("--out", required=True)
    digits.add_argument("--seed", type=int, default=0, help="Seed of the train/test split and eval candidates.")
    digits.add_argument("--image-size", type=int, default=32, help="Side of the stored RGB images, in pixels.")
    digits.add_argument("--resample", default="nearest", choices=("nearest", "bilinear", "bicubic"))

    mine = commands.add_parser("mine", help="Mine hard negatives of the training corpus with a teacher (Ray job).")
    mine.add_argument("--checkpoint", required=True, help="Teacher: run dir, Ray checkpoint or save_pretrained dir.")
    mine.add_argument("--out", required=True, help="Sidecar folder (resumable: finished parts are kept).")
    _add_config_args(mine)

    embed = commands.add_parser("embed", help="Embed a corpus with Ray Data into parquet (id, embedding, modality).")
    embed.add_argument("--checkpoint", required=True, help="Run dir, Ray checkpoint or save_pretrained dir.")
    embed.add_argument("--corpus", required=True, help="Parquet table (file or folder), image folder or .tar shards.")
    embed.add_argument("--out", required=True, help="Output folder (resumable: finished files are kept).")
    _add_config_args(embed, default=None)

    search = commands.add_parser("search", help="Top-k search of text/image queries over an `embed` output.")
    search.add_argument("--embeddings", required=True, help="An `sde-ray embed` output folder.")
    search.add_argument("--text", nargs="*", default=[], help="Text queries.")
    search.add_argument("--image", nargs="*", default=[], help="Image queries (local files).")
    search.add_argument("--k", type=int, default=10)
    search.add_argument("--method", default="exact", choices=("exact", "hnsw"),
                        help="exact: chunked exact top-k; hnsw: the faiss HNSW index (built once, kept beside).")
    search.add_argument("--instruction", default="", help="The queries' instruction (MMEB prompt format).")
    search.add_argument("--checkpoint", default="", help="Query encoder (default: the model that embedded the corpus).")
    _add_config_args(search, default=None)

    serve_cmd = commands.add_parser("serve", help="Serve OpenAI-style /v1/embeddings with Ray Serve.")
    serve_cmd.add_argument("checkpoint", help="Run dir, Ray checkpoint or save_pretrained dir.")
    _add_config_args(serve_cmd, default=None)

    bench = commands.add_parser("bench", help="Benchmarks (ratios measured side by side in one run).")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("--json", default=None, help="Also write the results as JSON here.")
    bench.add_argument("--quick", action="store_true", help="A smaller grid (used by the tests).")
    _add_config_args(bench)
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "config":
        print(dump_yaml(_load(args)), end="")
        return 0
    if args.command == "train":
        from sde_ray.train.console import report_failure
        from sde_ray.train.driver import absolute_path, run_train
        from sde_ray.train.preemption import EXIT_PREEMPTED

        config = _load(args)
        try:
            summary = run_train(config, dry_run=args.dry_run, verbose=args.verbose)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: the reason last, the traceback in a file
            report_failure(exc, absolute_path(config.train.output_dir), verbose=args.verbose)
            return 1
        return EXIT_PREEMPTED if summary.get("preempted") else 0
    if args.command == "tune":
        from sde_ray.tune.driver import run_tune

        if not args.config:
            raise ConfigError("sde-ray tune needs --config configs/sweeps/NAME.yaml")
        run_tune(args.config, list(args.overrides), output_dir=args.output_dir)
        return 0
    if args.command == "eval" and args.benchmark == "mmeb-v2":
        from sde_ray.eval.mmeb_v2 import run_eval_v2

        run_eval_v2(args.checkpoint, args.data, args.output_dir, _load(args), sets=args.datasets)
        return 0
    if args.command == "eval":
        from sde_ray.eval.runner import run_eval

        config = _load(args)
        run_eval(
            checkpoint=args.checkpoint,
            data_dir=args.data,
            datasets=args.datasets,
            output_dir=args.output_dir,
            config=config,
            gap_remedy=args.gap_remedy,
        )
        return 0
    if args.command == "compare":
        from sde_ray.tune.compare import run_compare

        run_compare(
            _load(args),
            objectives=[o.strip() for o in args.objectives.split(",") if o.strip()],
            seeds=args.seeds,
            noisy_correspondence=[float(x) for x in args.noisy_correspondence.split(",") if x.strip()],
            output_dir=args.output_dir,
            data_orders=args.data_orders,
            init_from=args.init_from,
            pretrain_steps=args.pretrain_steps,
        )
        return 0
    if args.command == "data" and args.data_command == "convert-mmeb":
        from sde_ray.data.convert import convert_mmeb

        executor = {"workers": args.workers}
        if args.ray:
            from sde_ray.ray_cluster import connect, conversion_executor

            connect(Config(), local_cpus=args.workers)
            executor = conversion_executor()
        manifest = convert_mmeb(
            args.src, args.out, subsets=args.subsets, split=args.split,
            samples_per_shard=args.samples_per_shard, **executor,
        )
        print(json.dumps({k: manifest[k] for k in ("num_samples", "num_shards", "rejected") if k in manifest}))
        if not manifest["num_samples"]:  # nothing to train on is a failure, whatever the cause
            reasons = {k: v for k, v in manifest["rejected_by_reason"].items() if v}
            print(f"convert-mmeb: 0 samples written to {args.out}; rejected by reason: {json.dumps(reasons)} "
                  f"(details in {Path(args.out) / 'rejects.jsonl'})", file=sys.stderr)
            return 1
        return 0
    if args.command == "data" and args.data_command == "verify":
        from sde_ray import storage
        from sde_ray.data.convert import load_manifest
        from sde_ray.data.shards import check_shards

        manifest = load_manifest(args.shards)  # every shard it lists, a missing one included
        listed = [storage.join(args.shards, entry["name"]) for entry in manifest["shards"]]
        try:
            check = check_shards(listed, manifest, depth="sha256")
            ok, skipped = len(check.paths), check.skipped
        except RuntimeError as error:  # not one shard passed
            ok, skipped = 0, {"all": str(error)}
        print(json.dumps({"listed": len(listed), "ok": ok, "skipped": skipped}, indent=1))
        return 1 if skipped else 0
    if args.command == "data" and args.data_command == "synth":
        from sde_ray.data.synthetic import write_synthetic_mmeb

        write_synthetic_mmeb(
            args.out, seed=args.seed, train_per_subset=args.train_per_subset,
            eval_per_dataset=args.eval_per_dataset, noisy_correspondence=args.noisy_correspondence,
        )
        return 0
    if args.command == "data" and args.data_command == "digits":
        from sde_ray.data.digits import write_digits_mmeb

        summary = write_digits_mmeb(args.out, seed=args.seed, image_size=args.image_size, resample=args.resample)
        print(json.dumps({k: summary[k] for k in ("train_dir", "eval_dir", "train_rows", "eval_rows")}))
        return 0
    if args.command == "mine":
        from sde_ray.mine import run_mine

        summary = run_mine(_load(args), args.checkpoint, args.out)
        print(json.dumps({k: summary[k] for k in ("rows", "counts", "encode_rows_per_s")}))
        return 0
    if args.command == "embed":
        from sde_ray.embed.batch import run_embed

        summary = run_embed(_load(args), args.checkpoint, args.corpus, args.out)
        print(json.dumps({k: summary[k] for k in ("rows", "embedded", "skipped", "files_computed", "rows_per_s")}))
        return 0
    if args.command == "search":
        from sde_ray.embed.search import run_search

        if not args.text and not args.image:
            raise ConfigError("sde-ray search needs at least one --text or --image query")
        for result in run_search(_load(args), args.embeddings, args.text, args.image, args.k, args.method,
                                 instruction=args.instruction, checkpoint=args.checkpoint):
            print(json.dumps(result))
        return 0
    if args.command == "serve":
        from sde_ray.embed.serve import run_serve

        run_serve(_load(args), args.checkpoint)
        return 0
    if args.command == "bench":
        import importlib

        module = importlib.import_module(f"sde_ray.bench.{args.name}")
        module.main(json_path=args.json, config=_load(args), quick=args.quick)
        return 0
    raise AssertionError(f"unhandled command {args.command}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["eval", "compare"]:
        from sde_ray.eval.report import compare_runs

        usage = "usage: sde-ray eval compare RUN_A RUN_B  (two runs' results side by side)"
        if argv[2:] in (["-h"], ["--help"]):
            print(usage)
            return 0
        if len(argv) != 4:
            print(usage, file=sys.stderr)
            return 2
        print(compare_runs(argv[2], argv[3]))
        return 0
    parser = build_parser()
    # Overrides may also follow options (`bench train --json X train.lr=1e-3`), where argparse's
    # subcommands leave them unparsed; anything else unknown is still an error.
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
