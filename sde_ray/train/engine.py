"""The training module and its DeepSpeed engine, without Ray (the worker loop and the device check
both build them here): the encoder and the objective as one module, open_clip's parameter groups,
`deepspeed.initialize`, and the seeding of every RNG."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from sde_ray.config import Config
from sde_ray.losses import build_objective
from sde_ray.losses.infonce import split_negatives
from sde_ray.models import build_model


class TrainModule(torch.nn.Module):
    """The encoder and the objective under one module, so DeepSpeed optimises both."""

    def __init__(self, model: torch.nn.Module, objective: torch.nn.Module):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict[str, torch.Tensor], context=None, cached=None):
        """Encode `batch`; with a `context`, also the objective, on `batch`'s features followed by the
        `cached` (query, target) features of the step's other chunks (see `sde_ray.train.step`).
        Both run inside the engine's forward, so ZeRO-3 gathers the encoder's and the objective's
        parameters alike."""
        query, target = self.model(batch)
        # The spectral stage (SVD / eigh, partition thresholds) wants at least fp32 under bf16 too.
        query, target = query.float(), target.float()
        if context is None:
            return query, target
        if cached is not None:
            query, target = torch.cat([query, cached[0]]), torch.cat([target, cached[1]])
        loss, metrics = self.objective(query, target, context)
        # Diagnostics (spectra, gap) describe the paired rows: explicit negatives are left out.
        return loss, metrics, query.detach(), split_negatives(query, target)[0].detach()


def build_train_module(config: Config) -> TrainModule:
    model = build_model(config.model, seed=config.train.seed)
    return TrainModule(model, build_objective(config, model.embed_dim))


@contextlib.contextmanager
def scalar_parameters_as_vectors(module: torch.nn.Module):
    """Holds 0-dim parameters as shape (1,) while DeepSpeed builds its engine.

    DeepSpeed 0.19 broadcasts every parameter as a uint8 view at `initialize`, which fails for a
    0-dim tensor (CLIP's `logit_scale`, a learnable temperature). Afterwards each frozen one gets
    its shape back as a view of the same storage. A trainable one stays (1,) for the engine's life:
    ZeRO-1/2 flatten it and re-point it at a (1,) view of their buffer, so restoring () would make
    its shape flip between forward and backward (autograd then rejects the gradient). A ZeRO-3
    partition (empty on this rank) keeps (1,) too, and the consolidated copies are reshaped on load
    (`checkpoint.match_shapes`); `losses.objectives.Temperature` returns a 0-dim scale either way.
    """
    scalars = [p for p in module.parameters() if p.dim() == 0]
    for parameter in scalars:
        parameter.data = parameter.data.reshape(1)
    try:
        yield
    finally:
        for parameter in scalars:
            if parameter.data.numel() == 1 and not parameter.requires_grad:
                parameter.data = parameter.data.view(())


def parameter_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two AdamW groups, as open_clip does: weight decay on matrices only.

    Biases, norm gains and other vectors (ndim < 2) and the learnable temperature (a scalar) get
    no decay: decaying a norm's gain or a temperature pulls it toward 0 for no regularising gain.
    """
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        exempt = parameter.ndim < 2 or "bias" in name or "norm" in name or "log_scale" in name or "logit_scale" in name
        (no_decay if exempt else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_engine(module: torch.nn.Module, ds_config: dict):
    """`deepspeed.initialize` on the trainable parameters (Ray already set up the process group).

    DeepSpeed builds the configured optimizer from these groups; a group's own `weight_decay`
    overrides the config's (torch.optim semantics, kept by DeepSpeed 0.19's ZeRO optimizers).
    """
    import deepspeed  # here, not at the top: DeepSpeed picks its accelerator from DS_ACCELERATOR on import

    weight_decay = ds_config.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0)
    with scalar_parameters_as_vectors(module):
        engine, _, _, _ = deepspeed.initialize(
            model=module, model_parameters=parameter_groups(module, weight_decay), config=ds_config
        )
    return engine


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
