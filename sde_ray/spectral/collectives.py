"""The two differentiable collectives the spectral stage needs; identity when world_size == 1.

Both are autograd-aware (`torch.distributed.nn.functional`): the backward of the all-gather hands
each rank the sum of every rank's gradient for its rows, the backward of the all-reduce sums the
gradients. A loss computed identically on every rank from their results therefore has, after the
usual averaging of gradients over ranks, exactly the single-process gradient.
"""

from __future__ import annotations

import torch


def all_gather_rows(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's `x` concatenated along dim 0 in rank order (equal shapes on every rank)."""
    if world_size == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x.contiguous()), dim=0)


def all_reduce_sum(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """The sum of `x` over ranks, differentiable."""
    if world_size == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return dist_fn.all_reduce(x)
