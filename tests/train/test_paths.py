"""Paths pass through untouched (issue 12): from the command line, through `resolve_paths`, into what
a training worker receives, a path keeps its `#`, `: `, quotes, spaces and non-ASCII characters.

The reference is the path as the user typed it (made absolute against the working directory with
pathlib), compared with what the dry run prints, what `resolve_paths` returns and what a worker
unpickles; nothing here re-implements the parsing under test.
"""

from __future__ import annotations


import cloudpickle
import pytest
import yaml

from sde_ray import cli
from sde_ray.config import load_config
from sde_ray.train.driver import resolve_paths, worker_payload

# Each would be cut or reshaped by a YAML round trip: ' #' starts a comment, ': ' makes a mapping,
# and quotes get stripped or fail to parse.
NAMES = ["exp #1", "a: b", "it's \"quoted\"", "spaced  out", "données 日本", "mixed #2: 'é' \"q\""]
KEYS = ("data.cache_dir", "data.mmeb_train_dir", "eval.data_dir", "eval.val_data_dir")


def _config_from_cli(argv: list[str]):
    """What `sde-ray train` builds from argv, through the CLI's own parser and loader."""
    args, extra = cli.build_parser().parse_known_args(argv)
    args.overrides = list(args.overrides) + extra
    return cli._load(args)


@pytest.mark.parametrize("name", NAMES)
def test_cli_resolve_and_worker_keep_every_character(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    expected = {key: str(tmp_path / name / key) for key in KEYS}
    argv = ["train", "--config", "", "--output-dir", f"{name}/out", "data.source=mmeb"]  # built-in defaults
    argv += [f"{key}={name}/{key}" for key in KEYS]  # relative: resolve_paths makes them absolute
    config = _config_from_cli(argv)
    assert config.train.output_dir == f"{name}/out"
    assert config.data.cache_dir == f"{name}/data.cache_dir"

    resolved = resolve_paths(config)
    assert resolved.train.output_dir == str(tmp_path / name / "out")
    assert resolved.train.storage_path == str(tmp_path / name / "out" / "ray")
    got = {"data.cache_dir": resolved.data.cache_dir, "data.mmeb_train_dir": resolved.data.mmeb_train_dir,
           "eval.data_dir": resolved.eval.data_dir, "eval.val_data_dir": resolved.eval.val_data_dir}
    assert got == expected
    assert resolve_paths(resolved) == resolved  # idempotent: a second resolution changes nothing

    # What Ray ships to each worker (cloudpickle), unpickled as the worker sees it.
    payload = cloudpickle.loads(cloudpickle.dumps(worker_payload(resolved)))
    assert payload["config"] == resolved
    assert payload["args"].val_root == expected["eval.val_data_dir"]
    assert payload["config"].train.output_dir == str(tmp_path / name / "out")


def test_dry_run_prints_the_untouched_paths(tmp_path, monkeypatch, capsys):
    """The whole `sde-ray train --dry-run` command: the config it prints names the same paths."""
    monkeypatch.chdir(tmp_path)
    name = NAMES[-1]
    code = cli.main(["train", "--config", "", "--dry-run", "--output-dir", str(tmp_path / name), f"data.cache_dir={name}",
                     f"eval.data_dir={tmp_path / name / 'eval'}"])
    assert code == 0
    printed = capsys.readouterr().out
    shown = yaml.safe_load(printed[: printed.index("DeepSpeed config for")])
    assert shown["train"]["output_dir"] == str(tmp_path / name)
    assert shown["data"]["cache_dir"] == str(tmp_path / name)
    assert shown["eval"]["data_dir"] == str(tmp_path / name / "eval")
    assert not (tmp_path / name).exists()  # a dry run writes nothing


def test_quoted_string_values_and_typed_values_still_parse():
    """Only string keys are taken verbatim; a value wholly in quotes is unquoted, numbers and lists
    are still YAML, and URLs are left alone by resolve_paths."""
    config = load_config(None, ["train.run_name='a #b'", "train.lr=3e-4", "data.subsets=[A, B]",
                                "train.storage_path=s3://bucket/x #1"])
    assert config.train.run_name == "a #b"
    assert config.train.lr == 3e-4 and config.data.subsets == ["A", "B"]
    assert resolve_paths(config).train.storage_path == "s3://bucket/x #1"


def test_validation_root_is_disjoint_from_the_evaluation_root_when_the_data_has_one(tmp_path):
    """Synthetic data validates on its own validation split; other data on `eval.val_data_dir`, else
    on the evaluation root itself (which the driver announces)."""
    from sde_ray.config import load_config
    from sde_ray.data.cache import PreparedData
    from sde_ray.train.driver import eval_root_of, val_root_of

    synthetic = PreparedData(shards=[], eval_dir="/c/MMEB-eval", manifest={}, val_dir="/c/MMEB-val")
    config = load_config(None, [])
    assert (eval_root_of(config, synthetic), val_root_of(config, synthetic)) == ("/c/MMEB-eval", "/c/MMEB-val")
    mmeb = PreparedData(shards=[], eval_dir="/m/MMEB-eval", manifest={})
    assert val_root_of(config, mmeb) == "/m/MMEB-eval"
    chosen = load_config(None, [f"eval.val_data_dir={tmp_path}"])
    assert val_root_of(chosen, mmeb) == val_root_of(chosen, synthetic) == str(tmp_path)


def test_relative_model_folders_become_absolute_and_hub_ids_stay(tmp_path, monkeypatch):
    """Issue 32: `model.vision_name_or_path=byo/vit` (a folder relative to the launch directory)
    failed on every Ray Train worker, which runs in another directory."""
    from sde_ray.config import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "byo" / "vit").mkdir(parents=True)
    (tmp_path / "text model #1").mkdir()
    config = load_config(None, ["model.name_or_path=", "model.vision_name_or_path=byo/vit",
                                "model.text_name_or_path=text model #1", "model.init_from=runs/earlier"])
    resolved = resolve_paths(config)
    assert resolved.model.vision_name_or_path == str(tmp_path / "byo" / "vit")
    assert resolved.model.text_name_or_path == str(tmp_path / "text model #1")
    assert resolved.model.init_from == str(tmp_path / "runs" / "earlier")
    hub = resolve_paths(load_config(None, ["model.name_or_path=", "model.vision_name_or_path=google/vit-base-patch16-224",
                                           "model.text_name_or_path=sentence-transformers/all-MiniLM-L6-v2"]))
    assert hub.model.vision_name_or_path == "google/vit-base-patch16-224"
    assert hub.model.text_name_or_path == "sentence-transformers/all-MiniLM-L6-v2"
    assert resolve_paths(resolved) == resolved
