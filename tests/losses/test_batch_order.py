"""Every objective treats a batch as a set of pairs: the order of its rows changes nothing.

The data pipeline relies on it (`sde_ray.data.batches.gather_rows` hands a batch's rows over in
stream order). FANoise draws its noise row by row, so in training it is order-invariant only in
distribution; it is checked with the noise off.
"""

from __future__ import annotations

import pytest
import torch

from sde_ray.config import Config
from sde_ray.losses import OBJECTIVES, StepContext, build_objective

ROWS, DIM = 48, 64
CASES = [(name, training) for name in sorted(OBJECTIVES) for training in (True, False)
         if not (name == "fanoise" and training)]


@pytest.mark.parametrize(("name", "training"), CASES)
def test_loss_and_gradients_ignore_row_order(name: str, training: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(ROWS, 4, generator=generator) @ torch.randn(4, DIM, generator=generator) * 3.0
    query = shared + torch.randn(ROWS, DIM, generator=generator)
    target = shared + torch.randn(ROWS, DIM, generator=generator)
    ids = torch.arange(ROWS) % 40  # a few duplicate targets
    order = torch.randperm(ROWS, generator=generator)
    config = Config()
    config.loss.name = name
    torch.manual_seed(0)
    objective = build_objective(config, DIM)

    def loss_and_grad(permutation: torch.Tensor) -> tuple[float, torch.Tensor]:
        q = query[permutation].clone().requires_grad_()
        context = StepContext(progress=0.3, training=training, target_ids=ids[permutation],
                              generator=torch.Generator().manual_seed(1))
        loss, _ = objective(q, target[permutation], context)
        loss.backward()
        grad = torch.empty_like(q.grad)
        grad[permutation] = q.grad  # back to the original row order
        return float(loss), grad

    loss, grad = loss_and_grad(torch.arange(ROWS))
    loss_permuted, grad_permuted = loss_and_grad(order)
    assert loss_permuted == pytest.approx(loss, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad_permuted, grad, rtol=1e-4, atol=1e-6)
