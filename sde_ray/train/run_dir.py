"""A run directory remembers its config: a relaunch under a different one is refused.

`<output_dir>/config.yaml` is the run's record (the resolved config of its first launch). A relaunch
resumes the run's checkpoints, so a relaunch with another objective, learning rate or batch would
continue the old run under new settings and overwrite its provenance. `claim_run_dir` compares the
new resolved config with the record and, per `train.on_config_change`:

- `refuse` (default): a ConfigError listing every differing key, before Ray starts;
- `fork`: a new run beside the old one (`<output_dir>-fork-<hash>`, run name likewise), which starts
  from scratch and leaves the old run untouched;
- `override`: continue the run under the new config on purpose; the change is appended to
  `<output_dir>/config_history.jsonl` (time, key, old, new) so the provenance stays true.

Both configs are compared after `driver.resolve_paths`, so a relative and an absolute spelling of
the same path are equal. Keys that change how the run is executed but not what it computes (the
cluster address, worker counts under a fixed global batch, data CPUs, logging) may differ freely.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import yaml

from sde_ray import storage
from sde_ray.config import Config, ConfigError, dump_yaml, replace, to_dict

RECORD = "config.yaml"
HISTORY = "config_history.jsonl"
# Execution settings: the same run may be relaunched on another cluster shape (the elastic resume
# keeps the global batch), with other data-stage CPUs, or with other logging.
OPERATIONAL_PREFIXES = (
    "scaling.address", "scaling.max_failures", "scaling.elastic_resize_monitor_interval_s",
    "scaling.num_workers", "scaling.min_workers", "scaling.max_workers", "scaling.cpus_per_worker",
    "data.data_cpus", "data.preprocess_concurrency", "data.target_block_mb",
    "eval.num_workers", "eval.batch_size", "logging.", "train.on_config_change",
    "scaling.worker_node_resource", "train.checkpoint_every_minutes", "train.checkpoint_upload",
)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and not prefix.endswith(("overrides.", "space.")):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if isinstance(value, dict) and key not in ("overrides", "space"):
                out.update(_flatten(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out
    return {prefix.rstrip("."): node}


def recorded_values(recorded: dict) -> dict[str, Any]:
    """A recorded config as dotted key -> value, where a key the record lacks (added to the config
    tree after the run was launched) counts as recorded at its default: upgrading sde_ray must not
    make every run it started a different run."""
    return {**_flatten(to_dict(Config())), **_flatten(recorded)}


def config_changes(recorded: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (recorded value, new value) for every key that differs and matters (a key
    missing from the record: see `recorded_values`)."""
    old, cur = recorded_values(recorded), _flatten(new)
    return {
        key: (old.get(key), cur.get(key))
        for key in sorted(set(old) | set(cur))
        if old.get(key) != cur.get(key) and not key.startswith(OPERATIONAL_PREFIXES)
    }


def _fork(config: Config) -> Config:
    digest = hashlib.sha256(json.dumps(to_dict(config), sort_keys=True, default=str).encode()).hexdigest()[:8]
    train = config.train
    output_dir = f"{train.output_dir}-fork-{digest}"
    overrides = [f"train.output_dir={output_dir}", f"train.run_name={train.run_name}-fork-{digest}"]
    if train.storage_path == storage.join(train.output_dir, "ray"):  # the default follows the output dir
        overrides.append(f"train.storage_path={storage.join(output_dir, 'ray')}")
    return replace(config, overrides)


def claim_run_dir(config: Config) -> Config:
    """The config to run with (a fork's, when asked), after checking it against the run's record.
    `config` must be resolved (`driver.resolve_paths`). Writes the record."""
    output_dir = config.train.output_dir  # a folder or an object-store URL (sde_ray.storage)
    record = storage.join(output_dir, RECORD)
    if storage.exists(record):
        recorded = yaml.safe_load(storage.read_text(record)) or {}
        changes = config_changes(recorded, to_dict(config))
        policy = config.train.on_config_change
        if changes and policy == "refuse":
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
            raise ConfigError(
                f"{record}: this run was launched with a different config ({listed}). Relaunching would "
                "continue its checkpoints under the new values. Use another train.output_dir, "
                "train.on_config_change=fork (a new run beside it) or train.on_config_change=override "
                "(continue on purpose; recorded in config_history.jsonl)."
            )
        if changes and policy == "fork":
            forked = _fork(config)
            print(f"[sde_ray] config differs from {record} in {', '.join(changes)}: "
                  f"forking a new run in {forked.train.output_dir}")
            return claim_run_dir(forked)
        if changes:
            history = storage.join(output_dir, HISTORY)
            storage.append_text(history, "".join(
                json.dumps({"time": time.time(), "key": key, "old": old, "new": new}) + "\n"
                for key, (old, new) in changes.items()))
            print(f"[sde_ray] continuing {output_dir} under a changed config ({', '.join(changes)}); "
                  f"recorded in {history}")
    storage.write_text(record, dump_yaml(config))
    return config
