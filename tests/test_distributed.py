"""sde_ray.distributed: every collective on 2 real gloo ranks against one process on the whole batch,
and the rule that no other file of the package touches torch.distributed.

References: the concatenated global batch of `gloo_workers.global_inputs` (what a gather must equal),
single-process autograd on that batch (what the gathered / reduced gradients must be: world_size ×
the single-process gradient of the rows, since each rank's identical loss contributes once), and
plain Python sums / maxima / minima of the per-rank values.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "spectral"))
import gloo_workers

from sde_ray import distributed

NUM_ROWS, IN_DIM = 12, 5
PACKAGE = Path(__file__).resolve().parents[1] / "sde_ray"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return gloo_workers.launch(gloo_workers.collectives_worker, tmp_path_factory.mktemp("coll"), NUM_ROWS, IN_DIM)


def test_gathers_match_the_global_batch_in_rank_order(ranks):
    inputs = gloo_workers.global_inputs(NUM_ROWS, IN_DIM, seed=3)
    for rank, result in enumerate(ranks):
        assert result["rank"] == rank and result["device"] == "cpu"
        torch.testing.assert_close(result["gathered"], inputs["query"])
        assert result["ids"].dtype == torch.int64
        assert torch.equal(result["ids"], inputs["target_ids"])


def test_autograd_variants_give_each_rank_the_summed_gradient_of_its_rows(ranks):
    inputs = gloo_workers.global_inputs(NUM_ROWS, IN_DIM, seed=3)
    world = gloo_workers.WORLD_SIZE
    query = inputs["query"].clone().requires_grad_(True)
    (query.pow(2).sum(1) * torch.arange(NUM_ROWS, dtype=query.dtype)).sum().backward()
    target = inputs["target"].clone().requires_grad_(True)
    (target.sum(0) * inputs["weight"][0]).sum().backward()
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result["gather_grad"], world * gloo_workers.local_rows(query.grad, rank, world))
        torch.testing.assert_close(result["reduce_grad"], world * gloo_workers.local_rows(target.grad, rank, world))


def test_reductions_keep_the_callers_dtype_and_leave_its_tensor_alone(ranks):
    per_rank = [torch.tensor([r + 1.5, -2.0 * r]) for r in range(len(ranks))]
    for rank, result in enumerate(ranks):
        assert result["sum"].dtype == torch.float32 and result["min"].dtype == torch.int64
        torch.testing.assert_close(result["sum"], sum(per_rank))
        torch.testing.assert_close(result["max"], torch.stack(per_rank).max(0).values)
        assert result["min"].tolist() == [0, 10 - (len(ranks) - 1)]
        torch.testing.assert_close(result["values_after"], per_rank[rank])


def test_agreement_mean_and_broadcast(ranks):
    world = len(ranks)
    for result in ranks:
        assert result["all_true"] is True and result["some_false"] is False
        assert result["mean"] == pytest.approx({"loss": sum(range(world)) / world,
                                                 "acc": sum(2.0 * r + 1 for r in range(world)) / world})
        assert list(result["mean"]) == ["acc", "loss"]
        assert result["broadcast"] == {"from": 0, "tag": "rank0"}
        # The slowest rank's elapsed time, on every rank (what train.checkpoint_every_minutes decides on).
        assert result["slowest_clock"] == [max(pair) for pair in gloo_workers.CLOCK_ELAPSED]


def test_single_process_needs_no_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.gather_with_grad(x, 1) is x
    assert distributed.all_ranks_true(False, 1) is False
    assert distributed.mean_over_ranks({"a": 2.0}, 1) == {"a": 2.0}
    assert distributed.broadcast_object("v", 1) == "v"
    assert distributed.get_rank() == 0 and distributed.group_device() == torch.device("cpu")


def test_no_other_module_touches_torch_distributed():
    """Every collective goes through sde_ray/distributed.py, which puts tensors on the group's device
    (NCCL moves CUDA tensors only); a direct call elsewhere would bring the CPU-tensor crash back."""
    pattern = re.compile(r"torch\.distributed|from\s+torch\s+import\s+[^\n]*\bdistributed\b")
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{number}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PACKAGE / "distributed.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, f"torch.distributed used outside sde_ray/distributed.py: {offenders}"
