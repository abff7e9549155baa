"""The distributed spectral stage on 2 Ray Train workers equals one process on the concatenated
batch, in both modes: the same σ, the same SDE loss (mean of the per-rank losses), and gradients
that, summed over ranks by the gather's backward, are W × the single-process gradient."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.ray]

ROWS, DIM, WORLD = 48, 16, 2


def _features(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    signal = torch.randn(ROWS, 3, generator=generator, dtype=torch.float64) @ torch.randn(
        3, DIM, generator=generator, dtype=torch.float64) * 4
    query = signal + torch.randn(ROWS, DIM, generator=generator, dtype=torch.float64)
    target = signal + torch.randn(ROWS, DIM, generator=generator, dtype=torch.float64)
    return query, target


def _sde_step(config, query, target, rank, world_size):
    from sde_ray.losses import StepContext, build_objective
    from sde_ray.spectral import distributed_spectrum

    objective = build_objective(config, DIM).double()
    query = query.clone().requires_grad_()
    target = target.clone().requires_grad_()
    context = StepContext(progress=0.4, rank=rank, world_size=world_size, training=True,
                          generator=torch.Generator().manual_seed(7))
    loss, _ = objective(query, target, context)
    loss.backward()
    sigma = distributed_spectrum(query.detach(), rank, world_size, config.spectral.mode).sigma
    return sigma, loss.detach(), query.grad, target.grad


@pytest.mark.parametrize("mode", ["gather", "gram"])
def test_two_ray_workers_match_one_process(mode, ray_cluster, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer

    from sde_ray.config import load_config

    config = load_config(None, ["loss.name=sde", f"spectral.mode={mode}", "loss.temperature=0.1"])

    def worker(loop_config):
        import torch.distributed as dist

        worker_config = loop_config["config"]  # the typed Config pickles, as in the driver's payload
        rank = ray.train.get_context().get_world_rank()
        query, target = _features(3)
        rows = slice(rank * ROWS // WORLD, (rank + 1) * ROWS // WORLD)
        sigma, loss, grad_q, grad_t = _sde_step(worker_config, query[rows], target[rows], rank, WORLD)
        dist.all_reduce(loss)
        grads = [torch.empty_like(grad_q) for _ in range(WORLD)]
        dist.all_gather(grads, grad_q.contiguous())
        grads_t = [torch.empty_like(grad_t) for _ in range(WORLD)]
        dist.all_gather(grads_t, grad_t.contiguous())
        if rank == 0:  # Ray Train keeps metrics only with checkpoints: hand the numbers over in a file
            torch.save({"sigma": sigma, "mean_loss": loss / WORLD, "grad_q": torch.cat(grads),
                        "grad_t": torch.cat(grads_t)}, loop_config["out"])

    out = tmp_path / "distributed.pt"
    TorchTrainer(
        worker,
        train_loop_config={"config": config, "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=WORLD),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path), name=f"spectral_{mode}"),
    ).fit()

    query, target = _features(3)
    sigma, loss, grad_q, grad_t = _sde_step(config, query, target, rank=0, world_size=1)
    distributed = torch.load(out, weights_only=True)
    torch.testing.assert_close(distributed["sigma"], sigma, rtol=1e-9, atol=1e-9)
    assert float(distributed["mean_loss"]) == pytest.approx(float(loss), rel=1e-9)
    # Rank r's rows receive ∂(Σ_r' L_r')/∂x_r = W · ∂L/∂x_r, L = mean of the per-rank losses.
    torch.testing.assert_close(distributed["grad_q"], WORLD * grad_q,
                               rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(distributed["grad_t"], WORLD * grad_t,
                               rtol=1e-7, atol=1e-9)
