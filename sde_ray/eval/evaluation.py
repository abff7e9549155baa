"""The evaluation pass shared by every entry point: datasets prepared, encoded by any `Encoder`
(in-process, on Ray actors, through the embedding cache) and scored one at a time; the gap remedy's
before/after effect; `evaluate_model`, the pass on an in-memory model (no Ray).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from sde_ray.data.mmeb import META_TASKS, DatasetInfo, eval_image_source
from sde_ray.eval.diagnostics import pool_pairs
from sde_ray.eval.encode import ModelEncoder
from sde_ray.eval.gap import fit_remedy, fit_rows
from sde_ray.eval.metrics import DatasetScore, summarize
from sde_ray.eval.roots import select_datasets
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
