"""Which model `sde-ray eval` (and `sde-ray embed`, `sde-ray mine`) scores: a run directory (its
exported `model/`, else its newest complete checkpoint), a Ray Train checkpoint (`consolidated.pt` +
`state.json`, exported to a `save_pretrained` folder first; a trainable-only one onto its base, rebuilt
from the saved config and refused unless its frozen weights hash to the recorded sha256) or an exported
`save_pretrained` folder; and the default output folder: `<run>/eval` for a run directory (or its
`model/`), otherwise `<checkpoint>-eval` beside the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

from sde_ray.config import Config
from sde_ray.runs import CONSOLIDATED, STATE, checkpoint_step, is_checkpoint, is_complete

MODEL_FROM_CHECKPOINT = "model_from_checkpoint"


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
