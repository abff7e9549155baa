"""Explicit negatives: 2 gloo ranks equal a hand-built single-process reference (values, gradients).

The reference builds query i's logits over [every positive ; every negative] of the concatenated
batch with plain matrix products and `F.cross_entropy` (the t→q direction over all queries), which
is the shared-negatives convention of Tevatron / VLM2Vec; the objectives on 2 ranks are compared
with themselves on one process over the concatenated batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "spectral"))
import gloo_workers  # noqa: E402
import negatives_workers as nw  # noqa: E402

from sde_ray.losses.infonce import split_negatives, with_negatives  # noqa: E402

NUM_ROWS, IN_DIM = 12, 8


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return gloo_workers.launch(nw.worker, tmp_path_factory.mktemp("negatives"), NUM_ROWS, IN_DIM)


def _hand_reference(duplicates: str) -> dict:
    data = nw.inputs(NUM_ROWS, IN_DIM)
    weight = data["weight"].clone().requires_grad_()
    q = F.normalize(data["query"] @ weight, dim=-1)
    t = F.normalize(data["target"] @ weight, dim=-1)
    n = F.normalize(data["negatives"] @ weight, dim=-1)
    q2t = 20.0 * q @ torch.cat([t, n]).T
    t2q = 20.0 * t @ q.T
    labels = torch.arange(NUM_ROWS)
    if duplicates == "mask":
        ids = data["target_ids"]
        same = ids[:, None] == torch.cat([ids, data["negative_ids"]])[None, :]
        same[labels, labels] = False
        q2t = q2t.masked_fill(same, float("-inf"))
        t2q = t2q.masked_fill(same[:, :NUM_ROWS], float("-inf"))
    loss = 0.5 * (F.cross_entropy(q2t, labels) + F.cross_entropy(t2q, labels))
    loss.backward()
    return {"loss": loss.detach(), "weight_grad": weight.grad}


def _mean(ranks, name, key):
    return sum(r[name][key] for r in ranks) / len(ranks)


@pytest.mark.parametrize("duplicates", ["ignore", "mask"])
def test_two_ranks_equal_hand_built_logits_over_the_concatenated_batch(ranks, duplicates):
    reference = _hand_reference(duplicates)
    name = f"info_nce_{duplicates}"
    torch.testing.assert_close(_mean(ranks, name, "loss"), reference["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_mean(ranks, name, "weight_grad"), reference["weight_grad"], rtol=1e-4, atol=1e-6)


def test_negatives_change_the_loss():
    data = nw.inputs(NUM_ROWS, IN_DIM)
    from sde_ray.losses.infonce import info_nce

    q, t = F.normalize(data["query"], dim=-1), F.normalize(data["target"], dim=-1)
    n = F.normalize(data["negatives"], dim=-1)
    assert float(info_nce(q, t, 20.0, negatives=n)) > float(info_nce(q, t, 20.0)) + 1e-3


@pytest.mark.parametrize("name", nw.OBJECTIVE_NAMES)
def test_objectives_with_negatives_on_two_ranks_equal_one_process(ranks, name):
    single = nw.run_objective(nw.inputs(NUM_ROWS, IN_DIM), name, 0, 1)
    torch.testing.assert_close(_mean(ranks, name, "loss"), single["loss"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_mean(ranks, name, "weight_grad"), single["weight_grad"], rtol=1e-3, atol=1e-5)


def test_infonce_objective_with_negatives_equals_hand_reference():
    from sde_ray.losses import StepContext, build_objective

    data = nw.inputs(NUM_ROWS, IN_DIM)
    config = nw.objective_config("infonce")
    config.loss.temperature = 0.05
    objective = build_objective(config, IN_DIM)
    loss, _ = objective(data["query"] @ data["weight"],
                        nw.layout(data["target"], data["negatives"]) @ data["weight"], StepContext())
    torch.testing.assert_close(loss, _hand_reference("ignore")["loss"], rtol=1e-5, atol=1e-6)


def test_layout_round_trip_and_bad_shapes():
    data = nw.inputs(NUM_ROWS, IN_DIM)
    stacked = nw.layout(data["target"], data["negatives"])
    positives, negatives, _, _ = split_negatives(data["query"], stacked)
    torch.testing.assert_close(positives, data["target"])
    torch.testing.assert_close(negatives, data["negatives"])
    torch.testing.assert_close(with_negatives(positives, negatives), stacked)
    with pytest.raises(ValueError, match="same shape"):
        split_negatives(data["query"], stacked[:-1])


def test_disncl_refuses_negatives_by_config():
    from sde_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="disncl"):
        load_config(None, ["loss.name=disncl", "loss.negatives_per_query=1"])
