"""Every objective, forward and backward, with CPU features while torch's default device is `meta`
(tests/conftest.py `meta_default_device`): a tensor the objective makes without stating its device
would land on `meta` and fail, as a CPU-made tensor fails beside CUDA features on a GPU (the
spectral partition's quantile probabilities did: SDE died at step 1 on every GPU run).
Reference: the same objective on the same inputs outside the mode (same loss, same gradients)."""

from __future__ import annotations

import pytest
import torch

from sde_ray.config import load_config
from sde_ray.losses import OBJECTIVES, StepContext, build_objective

ROWS, DIM = 16, 64
# Each objective at its defaults, plus SDE's other spectral routes (Gram, the IQR noise estimator
# and the soft partition, the adversarial strong perturbation) and InfoNCE's duplicate handling.
CASES = [(name, []) for name in sorted(OBJECTIVES)] + [
    ("sde", ["spectral.mode=gram", "spectral.noise_estimator=iqr", "spectral.partition=soft"]),
    ("sde", ["spectral.mode=gather", "spectral.strong_perturbation=adversarial", "spectral.fence=energy"]),
    ("sde", ["spectral.fence=log_gap", "loss.subspace_form=projector", "loss.hellinger_on=energy"]),
    ("infonce", ["loss.duplicate_targets=multi_positive", "loss.duplicate_key=target"]),
    ("infonce", ["loss.duplicate_targets=mask", "loss.duplicate_key=target"]),
]


def _run(objective, query, target, target_ids):
    query, target = query.clone().requires_grad_(True), target.clone().requires_grad_(True)
    context = StepContext(progress=0.3, target_ids=target_ids, generator=torch.Generator().manual_seed(3))
    loss, metrics = objective(query, target, context)
    loss.backward()
    return loss.detach(), metrics, query.grad, target.grad


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_objective_runs_with_meta_as_the_default_device(meta_default_device, name, overrides):
    config = load_config(None, [f"loss.name={name}", "loss.learnable_temperature=true", *overrides])
    objective = build_objective(config, DIM)
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(ROWS, 4, generator=g) @ torch.randn(4, DIM, generator=g) * 3.0
    query, target = shared + torch.randn(ROWS, DIM, generator=g), shared + torch.randn(ROWS, DIM, generator=g)
    target_ids = torch.arange(ROWS) % 5  # repeated targets: the duplicate paths run
    want = _run(objective, query, target, target_ids)
    objective.zero_grad()
    with meta_default_device():
        got = _run(objective, query, target, target_ids)
    assert got[0].device.type == "cpu" and torch.isfinite(got[0])
    torch.testing.assert_close(got[0], want[0])
    assert got[1] == want[1]
    for got_grad, want_grad in zip(got[2:], want[2:]):
        torch.testing.assert_close(got_grad, want_grad)
