"""Two-rank gloo worker for the explicit-negatives tests (a plain module: spawned children import it).

Every rank builds the same global batch (queries, positives, K negatives per query, content ids),
takes its rank's queries with their positives and negatives in the per-query target layout of
`sde_ray.losses.infonce`, runs `info_nce` and the objectives through a shared linear layer, and
saves losses and gradients; the test compares them with one process on the concatenated batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "spectral"))
import gloo_workers  # noqa: E402

K = 2
OBJECTIVE_NAMES = ("infonce", "sde", "fanoise", "dsrsd", "gap")


def inputs(num_rows: int, in_dim: int, seed: int = 3) -> dict[str, torch.Tensor]:
    base = gloo_workers.global_inputs(num_rows, in_dim, seed)
    g = torch.Generator().manual_seed(seed + 100)
    # Hard negatives: near each row's own positive, so they matter to the loss.
    negatives = base["target"].repeat_interleave(K, 0) + 0.7 * torch.randn(num_rows * K, in_dim, generator=g)
    negative_ids = torch.randint(0, num_rows // 3, (num_rows * K,), generator=g)
    negative_ids[::5] = base["target_ids"].repeat_interleave(K)[::5]  # some negatives equal a positive
    return {**base, "negatives": negatives, "negative_ids": negative_ids}


def layout(positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Per-query target layout, built independently of the library's helper."""
    rows = []
    for i in range(positives.shape[0]):
        rows.append(positives[i : i + 1])
        rows.append(negatives[i * K : (i + 1) * K])
    return torch.cat(rows)


def objective_config(name: str):
    config = gloo_workers.sde_config("gather", "random", "surrogate")
    config.loss.name = name
    config.loss.negatives_per_query = K
    config.loss.dsrsd.shared_dim = 4
    config.loss.gap.k = 3
    return config


def run_objective(data, name: str, rank: int, world_size: int) -> dict:
    from sde_ray.losses import StepContext, build_objective

    torch.manual_seed(0)  # heads (DSRSD) start equal on every rank and in the reference
    objective = build_objective(objective_config(name), data["weight"].shape[1])
    weight = data["weight"].clone().requires_grad_()
    rows = lambda x: gloo_workers.local_rows(x, rank, world_size)  # noqa: E731
    query = rows(data["query"]) @ weight
    target = layout(rows(data["target"]), rows(data["negatives"])) @ weight
    context = StepContext(progress=0.4, rank=rank, world_size=world_size, training=True,
                          generator=torch.Generator().manual_seed(7))
    loss, _ = objective(query, target, context)
    loss.backward()
    return {"loss": loss.detach(), "weight_grad": weight.grad}


def run_info_nce(data, rank: int, world_size: int, duplicates: str) -> dict:
    from sde_ray.losses.infonce import info_nce

    weight = data["weight"].clone().requires_grad_()
    rows = lambda x: gloo_workers.local_rows(x, rank, world_size)  # noqa: E731
    norm = torch.nn.functional.normalize
    loss = info_nce(
        norm(rows(data["query"]) @ weight, dim=-1), norm(rows(data["target"]) @ weight, dim=-1), 20.0,
        rank, world_size, rows(data["target_ids"]), duplicates,
        norm(rows(data["negatives"]) @ weight, dim=-1), rows(data["negative_ids"]),
    )
    loss.backward()
    return {"loss": loss.detach(), "weight_grad": weight.grad}


def worker(rank: int, world_size: int, rendezvous: str, out_dir: str, num_rows: int, in_dim: int) -> None:
    gloo_workers.start(rank, world_size, rendezvous)
    data = inputs(num_rows, in_dim)
    result = {f"info_nce_{d}": run_info_nce(data, rank, world_size, d) for d in ("ignore", "mask")}
    result.update({name: run_objective(data, name, rank, world_size) for name in OBJECTIVE_NAMES})
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    gloo_workers.finish()
