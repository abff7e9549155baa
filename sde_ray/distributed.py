"""Every collective of sde_ray, in one place: the only module that touches `torch.distributed`.

A process group binds its backend to a device type: NCCL moves CUDA tensors only ("No backend type
associated with device type cpu"), gloo CPU ones. Callers hand in tensors wherever they live (a metric
built on the CPU, a feature matrix on the GPU); each helper moves them to the group's device, runs the
collective, and gives the result back on the caller's device in the caller's dtype. Moving a tensor
with `.to()` is differentiable, so the autograd-aware variants keep their gradients across the move.

Every helper takes `world_size` and is the identity when it is 1, so single-process code (tests,
benchmarks, evaluation) needs no process group. tests/test_distributed.py fails if any other file under sde_ray/ mentions
the torch module.

Gradient semantics of the `*_with_grad` variants (torch's functional collectives,
`torch.distributed._functional_collectives`, which replace the deprecated `torch.distributed.nn.functional`):
the backward of the all-gather is a sum reduce-scatter, handing each rank the sum of every rank's
gradient for its rows; the backward of the all-reduce sums the gradients. A loss computed identically
on every rank from their results therefore has, after the usual averaging of gradients over ranks,
exactly the single-process gradient (tested on gloo; NCCL is these ops' main target). Results are waited on
(`wait_tensor`, differentiable) so callers get a plain tensor, never torch's lazily-waited wrapper.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional_collectives

ReduceName = Literal["sum", "max", "min"]
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank in the default group; 0 without one."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """The default group's size; 1 without one."""
    return dist.get_world_size() if is_initialized() else 1


def start_single_process_group() -> None:
    """A one-rank gloo group on a free loopback port, for a one-process DeepSpeed engine outside Ray
    (benchmarks); `stop_process_group` ends it."""
    import os
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)


def stop_process_group() -> None:
    if is_initialized():
        dist.destroy_process_group()


def group_device() -> torch.device:
    """The device the default group's backend moves: the current CUDA device under NCCL, else the CPU."""
    if is_initialized() and "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _on_group(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().to(group_device())


def all_reduce(x: torch.Tensor, world_size: int, op: ReduceName = "sum") -> torch.Tensor:
    """The sum / max / min of `x` over ranks (no autograd), a new tensor on `x`'s device and dtype."""
    if world_size == 1:
        return x.clone()
    work = _on_group(x.detach()).clone()
    dist.all_reduce(work, op=_OPS[op])
    return work.to(device=x.device, dtype=x.dtype)


def all_reduce_with_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """The sum of `x` over ranks, differentiable (the backward sums the gradients)."""
    if world_size == 1:
        return x
    summed = functional_collectives.all_reduce(_on_group(x), "sum", dist.group.WORLD)
    return functional_collectives.wait_tensor(summed).to(x.device)


def gather_with_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's `x` concatenated along dim 0 in rank order (equal shapes), differentiable."""
    if world_size == 1:
        return x
    gathered = functional_collectives.all_gather_single(_on_group(x), 0, dist.group.WORLD)
    return functional_collectives.wait_tensor(gathered).to(x.device)


def gather_no_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's `x` concatenated along dim 0 in rank order, without autograd (ids, weights, stats)."""
    if world_size == 1:
        return x
    local = _on_group(x.detach())
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local)
    return torch.cat(parts, dim=0).to(device=x.device, dtype=x.dtype)


def all_ranks_true(flag: bool, world_size: int) -> bool:
    """True when `flag` is true on every rank (one int all-reduce; every rank must call it)."""
    if world_size == 1:
        return bool(flag)
    return bool(all_reduce(torch.tensor([int(bool(flag))], dtype=torch.int64, device=group_device()), world_size, op="min").item())


def max_over_ranks(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """The elementwise maximum over ranks (e.g. a step lasts as long as its slowest rank)."""
    return all_reduce(x, world_size, op="max")


def mean_over_ranks(metrics: dict[str, float], world_size: int) -> dict[str, float]:
    """The mean over ranks of every metric (same keys on every rank), in sorted-key order."""
    if world_size == 1 or not metrics:
        return dict(metrics)
    keys = sorted(metrics)
    sums = all_reduce(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=group_device()), world_size)
    return {k: float(v) / world_size for k, v in zip(keys, sums.tolist())}


def all_gather_object(value: Any, world_size: int) -> list:
    """Every rank's picklable `value`, in rank order (staged through the group's device under NCCL)."""
    if world_size == 1:
        return [value]
    out: list = [None] * world_size
    dist.all_gather_object(out, value)  # torch stages the pickles on the current CUDA device under NCCL
    return out


def broadcast_object(value: Any, world_size: int, src: int = 0) -> Any:
    """Rank `src`'s picklable `value` on every rank (staged through the group's device under NCCL)."""
    if world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, device=group_device())
    return box[0]


class SlowestClock:
    """Seconds since `reset`, the slowest rank's (one all-reduce MAX per reading): a wall-clock
    decision (a checkpoint every N minutes) that every rank takes at the same step although their
    clocks differ. `now`: the clock (`time.monotonic`)."""

    def __init__(self, now: Callable[[], float] = time.monotonic):
        self.now = now
        self.reset()

    def reset(self) -> None:
        self.since = self.now()

    def elapsed(self, world_size: int) -> float:
        local = torch.tensor([self.now() - self.since], dtype=torch.float64, device="cpu")
        return float(max_over_ranks(local, world_size).item())
