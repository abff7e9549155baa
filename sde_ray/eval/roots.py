"""The MMEB-eval root and its datasets: one rule for which root a run, a validation or `sde-ray eval`
reads (`eval_root`), the datasets scored under it (`select_datasets`) and what the root holds
(`benchmark_version`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from sde_ray.config import Config
from sde_ray.data.mmeb import CATALOG_FILE, DatasetInfo, list_eval_datasets, load_dataset_catalog, outside_catalog

# What the built-in catalog describes: MMEB-eval as released, scored with VLM2Vec v1's protocol.
MMEB_BENCHMARK = "MMEB-eval v1 (TIGER-Lab/MMEB-eval; VLM2Vec v1 P@1 protocol)"


def eval_root(config: Config, data_dir: str | os.PathLike | None = "", synthetic_dir: str | None = None) -> str:
    """The MMEB-eval root, by one rule: `data_dir` (`sde-ray eval --data`), else `eval.data_dir`, else
    `data.mmeb_eval_dir`, else, for the synthetic source, its eval split (`synthetic_dir` when the
    caller has prepared it, "" when it has none; None: generated on first use); "" when there is none."""
    chosen = data_dir or config.eval.data_dir or config.data.mmeb_eval_dir
    if chosen:
        return str(chosen)
    if config.data.source != "synthetic":
        return ""
    if synthetic_dir is not None:
        return synthetic_dir
    from sde_ray.data.cache import synthetic_eval_dir

    return synthetic_eval_dir(config)  # generates the synthetic MMEB if needed, converts nothing


def resolve_eval_root(data_dir: str | os.PathLike | None, config: Config) -> Path:
    """`eval_root`, checked: an existing folder, or an error naming what to set."""
    chosen = eval_root(config, data_dir)
    if not chosen:
        raise ValueError("no MMEB-eval root: pass --data DIR or set eval.data_dir / data.mmeb_eval_dir")
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
