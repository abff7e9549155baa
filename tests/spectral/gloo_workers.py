"""Two-process gloo runs for the distributed tests (torch.multiprocessing.spawn, no Ray).

Kept in a plain module (not a test file) so that spawned children can import the worker functions:
tests add this folder to sys.path before spawning (pytest runs with --import-mode=importlib).
Every worker builds the same global batch from a seed, takes its rank's rows, and saves what it
computed to `out_dir/rank{r}.pt`; the test compares with one process on the concatenated batch.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
DEFICIENT_ROWS, DEFICIENT_DIM = 24, 32  # N < d (see deficient_inputs)


def launch(worker, out_dir: Path, *args, timeout_s: float | None = None) -> list[dict]:
    """Runs `worker(rank, world_size, rendezvous, out_dir, *args)` on 2 gloo ranks; returns their saved dicts.

    The rendezvous is a fresh file, not a "free" TCP port: with Ray's processes binding ports all
    around, a port probed free could be taken before rank 0 bound it. With `timeout_s`, ranks still
    running after that long are killed and TimeoutError raised: a hang in a collective fails.
    """
    rendezvous = f"file://{Path(out_dir) / f'rendezvous-{uuid.uuid4().hex}'}"
    context = mp.spawn(worker, args=(WORLD_SIZE, rendezvous, str(out_dir), *args), nprocs=WORLD_SIZE, join=False)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not context.join(timeout=5):
        if deadline is not None and time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"the {WORLD_SIZE} ranks did not finish within {timeout_s} s (a hung collective?)")
    return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def start(rank: int, world_size: int, rendezvous: str, timeout_s: float | None = None) -> None:
    """Joins the gloo group; with `timeout_s`, a collective waiting longer raises instead of hanging."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world_size, timeout=timeout)


def finish() -> None:
    # Both ranks leave together: a rank tearing gloo down while its peer is still mid-collective
    # aborted the peer ("terminate called without an active exception") on a loaded machine.
    dist.barrier()
    dist.destroy_process_group()


def load_open_clip_loss():
    """open_clip's loss module by file path: the package __init__ needs torchvision, the loss only torch."""
    spec = importlib.util.find_spec("open_clip")
    path = Path(spec.submodule_search_locations[0]) / "loss.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_loss_reference", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def global_inputs(num_rows: int, in_dim: int, seed: int) -> dict[str, torch.Tensor]:
    """A spiked global batch (some strong/weak/noise structure), a shared projection and target ids."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(num_rows, 4, generator=g) @ torch.randn(4, in_dim, generator=g) * 2.0
    query = base + torch.randn(num_rows, in_dim, generator=g)
    target = base + torch.randn(num_rows, in_dim, generator=g)
    weight = torch.eye(in_dim) + 0.1 * torch.randn(in_dim, in_dim, generator=g)
    target_ids = torch.randint(0, num_rows // 3, (num_rows,), generator=g)
    return {"query": query, "target": target, "weight": weight, "target_ids": target_ids}


def local_rows(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    return x.chunk(world_size, dim=0)[rank]


def sde_cases() -> list[tuple[str, ...]]:
    """(spectral.mode, spectral.strong_perturbation, loss.subspace_form[, spectral.partition]) compared."""
    return [
        ("gather", "random", "surrogate"),
        ("gram", "random", "surrogate"),
        ("gram", "adversarial", "projector"),
        ("gather", "adversarial", "projector"),
        ("gram", "adversarial", "surrogate", "soft"),
    ]


def sde_config(mode: str, perturbation: str, subspace_form: str, partition: str = "hard"):
    from sde_ray.config import Config

    config = Config()
    config.spectral.mode = mode
    config.spectral.strong_perturbation = perturbation
    config.spectral.rho = 0.3
    config.spectral.partition = partition
    config.loss.subspace_form = subspace_form
    config.loss.subspace_k = 3
    config.loss.learnable_temperature = True
    return config


def run_sde(inputs, config, rank: int, world_size: int, seed: int = 7) -> dict:
    """One SDE step through a shared linear layer; returns the loss and the parameter gradients."""
    from sde_ray.losses import StepContext, build_objective

    objective = build_objective(config, inputs["weight"].shape[1])
    weight = inputs["weight"].clone().requires_grad_()
    query = local_rows(inputs["query"], rank, world_size) @ weight
    target = local_rows(inputs["target"], rank, world_size) @ weight
    context = StepContext(
        progress=0.4,
        rank=rank,
        world_size=world_size,
        training=True,
        generator=torch.Generator().manual_seed(seed),
    )
    loss, metrics = objective(query, target, context)
    loss.backward()
    return {
        "loss": loss.detach(),
        "weight_grad": weight.grad,
        "scale_grad": objective.scale.log_scale.grad,
        "metrics": metrics,
    }


def deficient_inputs(num_rows: int, in_dim: int, seed: int = 5) -> dict[str, torch.Tensor]:
    """Fewer rows than dimensions and rank-deficient targets, as synthetic MMEB's batches are: each
    target row appears 3 times (a repeated label text), one random explicit negative per query.

    The target spectrum then has numerically-zero singular values whose singular vectors are
    rounding noise, and V (top min(N, d)) does not span R^d: the gradient may depend on neither."""
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(num_rows, 4, generator=g) @ torch.randn(4, in_dim, generator=g) * 3.0
    query = signal + 0.3 * torch.randn(num_rows, in_dim, generator=g)
    distinct = signal[::3] + 0.3 * torch.randn(num_rows // 3, in_dim, generator=g)
    target = distinct.repeat_interleave(3, dim=0)
    negatives = 2.0 * torch.randn(num_rows, in_dim, generator=g)
    return {"query": query, "target": target, "negatives": negatives}


def deficient_cases() -> list[tuple[str, str, str]]:
    """(spectral.mode, spectral.partition, negatives) compared on `deficient_inputs`."""
    return [(mode, partition, negatives) for mode in ("gather", "gram") for partition in ("hard", "soft")
            for negatives in ("none", "negatives")]


def run_sde_on_features(inputs, case, rank: int, world_size: int, dtype=torch.float32, seed: int = 7) -> dict:
    """The SDE objective on this rank's rows of `inputs` as leaf features; loss, feature gradients."""
    from sde_ray.losses import StepContext, build_objective

    mode, partition, negatives = case
    objective = build_objective(sde_config(mode, "random", "surrogate", partition), inputs["query"].shape[1])
    query = local_rows(inputs["query"], rank, world_size).to(dtype).requires_grad_()
    target = local_rows(inputs["target"], rank, world_size).to(dtype).requires_grad_()
    negative = local_rows(inputs["negatives"], rank, world_size).to(dtype).requires_grad_()
    # One negative per query: the per-query target layout (positive, negative) of sde_ray.losses.infonce.
    targets = target if negatives == "none" else torch.stack([target, negative], dim=1).flatten(0, 1)
    context = StepContext(progress=0.4, rank=rank, world_size=world_size, training=True,
                          generator=torch.Generator().manual_seed(seed))
    loss, metrics = objective(query, targets, context)
    loss.backward()
    return {"loss": loss.detach(), "query_grad": query.grad, "target_grad": target.grad,
            "negative_grad": negative.grad if negatives != "none" else None,
            "scale_grad": objective.scale.log_scale.grad, "metrics": metrics}


def spectral_worker(rank: int, world_size: int, rendezvous: str, out_dir: str, num_rows: int, in_dim: int) -> None:
    from sde_ray.spectral import distributed_gram_spectrum, enhancement_matrix, gather_spectrum

    start(rank, world_size, rendezvous)
    inputs = global_inputs(num_rows, in_dim, seed=0)
    local = local_rows(inputs["query"], rank, world_size)
    scale = torch.linspace(-0.3, 0.3, min(num_rows, in_dim))
    result = {}
    gather, _ = gather_spectrum(local, rank, world_size)
    gram = distributed_gram_spectrum(local, rank, world_size)
    for name, spectrum in (("gather", gather), ("gram", gram)):
        result[f"{name}_sigma"] = spectrum.sigma
        result[f"{name}_matrix"] = enhancement_matrix(spectrum.basis, scale)
    for case in sde_cases():
        result[case] = run_sde(inputs, sde_config(*case), rank, world_size)
    deficient = deficient_inputs(DEFICIENT_ROWS, DEFICIENT_DIM)
    for case in deficient_cases():
        result[case] = run_sde_on_features(deficient, case, rank, world_size)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finish()


def infonce_worker(rank: int, world_size: int, rendezvous: str, out_dir: str, num_rows: int, in_dim: int) -> None:
    from sde_ray.losses.infonce import info_nce

    start(rank, world_size, rendezvous)
    clip_loss = load_open_clip_loss().ClipLoss(
        local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size
    )
    inputs = global_inputs(num_rows, in_dim, seed=1)
    result = {}
    for name in ("ours", "open_clip", "ours_multi_positive", "ours_mask"):
        weight = inputs["weight"].clone().requires_grad_()
        query = torch.nn.functional.normalize(local_rows(inputs["query"], rank, world_size) @ weight, dim=-1)
        target = torch.nn.functional.normalize(
            local_rows(inputs["target"], rank, world_size) @ weight, dim=-1
        )
        ids = local_rows(inputs["target_ids"], rank, world_size)
        if name == "open_clip":
            loss = clip_loss(query, target, torch.tensor(20.0))
        elif name == "ours":
            loss = info_nce(query, target, 20.0, rank, world_size)
        else:
            loss = info_nce(query, target, 20.0, rank, world_size, ids, name.removeprefix("ours_"))
        loss.backward()
        result[name] = {"loss": loss.detach(), "weight_grad": weight.grad}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finish()


# Seconds since the last reset on (rank 0, rank 1) at successive readings: the ranks' clocks differ.
CLOCK_ELAPSED = [[10.0, 20.0], [59.0, 61.0], [30.0, 5.0]]


def slowest_clock_readings(coll, rank: int, world_size: int) -> list[float]:
    """`SlowestClock.elapsed` on this rank's fake clock at each of `CLOCK_ELAPSED`'s readings."""
    now = [0.0]
    clock = coll.SlowestClock(now=lambda: now[0])
    readings = []
    for elapsed in CLOCK_ELAPSED:
        now[0] = clock.since + elapsed[rank]
        readings.append(clock.elapsed(world_size))
    return readings


def collectives_worker(rank: int, world_size: int, rendezvous: str, out_dir: str, num_rows: int, in_dim: int) -> None:
    """Every helper of sde_ray.distributed on this rank's rows of `global_inputs`; what each returned."""
    from sde_ray import distributed as coll

    start(rank, world_size, rendezvous)
    inputs = global_inputs(num_rows, in_dim, seed=3)
    rows = local_rows(inputs["query"], rank, world_size).clone().requires_grad_(True)
    gathered = coll.gather_with_grad(rows, world_size)
    # The same scalar loss on every rank from the gathered rows; its gradient reaches every rank's rows.
    (gathered.pow(2).sum(1) * torch.arange(num_rows, dtype=gathered.dtype)).sum().backward()
    local = local_rows(inputs["target"], rank, world_size).clone().requires_grad_(True)
    reduced = coll.all_reduce_with_grad(local.sum(0), world_size)
    (reduced * inputs["weight"][0]).sum().backward()
    values = torch.tensor([rank + 1.5, -2.0 * rank], dtype=torch.float32)
    counts = torch.tensor([rank, 10 - rank], dtype=torch.int64)
    result = {
        "rank": coll.get_rank(),
        "device": str(coll.group_device()),
        "gathered": gathered.detach(),
        "gather_grad": rows.grad,
        "reduce_grad": local.grad,
        "ids": coll.gather_no_grad(local_rows(inputs["target_ids"], rank, world_size), world_size),
        "sum": coll.all_reduce(values, world_size),
        "max": coll.max_over_ranks(values, world_size),
        "min": coll.all_reduce(counts, world_size, op="min"),
        "values_after": values,  # all_reduce must not overwrite the caller's tensor
        "all_true": coll.all_ranks_true(True, world_size),
        "some_false": coll.all_ranks_true(rank == 0, world_size),
        "mean": coll.mean_over_ranks({"loss": float(rank), "acc": 2.0 * rank + 1}, world_size),
        "broadcast": coll.broadcast_object({"from": rank, "tag": f"rank{rank}"}, world_size),
        "slowest_clock": slowest_clock_readings(coll, rank, world_size),
    }
    finish()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
