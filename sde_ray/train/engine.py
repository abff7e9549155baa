"""The training module and its DeepSpeed engine, without Ray (the worker loop and the device check
both build them here): the encoder and the objective as one module, open_clip's parameter groups,
`deepspeed.initialize`, and the seeding of every RNG."""

from __future__ import annotations

import contextlib
import random
from typing import NamedTuple

import numpy as np
import torch

from sde_ray.config import Config
from sde_ray.losses import build_objective
from sde_ray.losses.batch import ContrastiveBatch
from sde_ray.models import build_model, tower_of
from sde_ray.train.deepspeed_config import per_group_schedule


# The dtype the weights train in (DeepSpeed casts the module to it; backbones load straight into it).
TRAINING_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Encoded(NamedTuple):
    """`TrainModule.forward` without a context: the features of one chunk (a pair, so `query, target =
    module(batch)` reads as before; NamedTuples let DeepSpeed's ZeRO-3 hooks reach the tensors)."""

    query: torch.Tensor  # (rows × d) fp32 query features
    target: torch.Tensor  # fp32 target features in the per-query layout (positives and negatives)


class Scored(NamedTuple):
    """`TrainModule.forward` with a context: the objective's loss on the step's features."""

    loss: torch.Tensor  # this rank's scalar loss (the mean over ranks is the global loss)
    metrics: dict  # the objective's metrics, floats
    query: torch.Tensor  # every chunk's query features, detached (diagnostics)
    positives: torch.Tensor  # their positives, detached: diagnostics describe the paired rows


class TrainModule(torch.nn.Module):
    """The encoder and the objective under one module, so DeepSpeed optimises both."""

    def __init__(self, model: torch.nn.Module, objective: torch.nn.Module,
                 tower_lr_scales: dict[str, float] | None = None):
        super().__init__()
        self.model = model
        self.objective = objective
        # Each encoder tower's learning rate as a multiple of train.lr (`build_engine` makes the groups).
        self.tower_lr_scales = dict(tower_lr_scales or {})

    def forward(self, batch: dict[str, torch.Tensor], context=None, cached=None,
                side: str | None = None) -> Encoded | Scored | torch.Tensor:
        """Encode `batch`; with a `context`, also the objective, on `batch`'s features followed by the
        `cached` (query, target) features of the step's other chunks (see `sde_ray.train.step`).
        Both run inside the engine's forward, so ZeRO-3 gathers the encoder's and the objective's
        parameters alike. `side` ("qry", "pos"): that side's features alone (`PartitionedEncoder`)."""
        if side is not None:
            return self.model.encode_side(batch, side)
        query, target = self.model(batch)
        # The spectral stage (SVD / eigh, partition thresholds) wants at least fp32 under bf16 too.
        query, target = query.float(), target.float()
        if context is None:
            return Encoded(query, target)
        if cached is not None:
            query, target = torch.cat([query, cached[0]]), torch.cat([target, cached[1]])
        loss, metrics = self.objective(query, target, context)
        positives = ContrastiveBatch.of(query, target).positives  # explicit negatives left out
        return Scored(loss, metrics, query.detach(), positives.detach())


class PartitionedEncoder(torch.nn.Module):
    """A ZeRO-3 engine's encoder as the evaluator's `ModelEncoder` sees a model (`encode_side`,
    `parameters`, `train`/`eval`, `embed_dim`), every forward run through the engine. Calling the
    partitioned module directly gathers each layer's own weights in its forward but not those a layer
    reads from its children outside theirs (CLIP's text embeddings read the position table's size):
    DeepSpeed fetches such external parameters only inside the engine's forward."""

    def __init__(self, engine):
        super().__init__()
        object.__setattr__(self, "engine", engine)  # not a submodule: its parameters are the engine's

    def encode_side(self, batch: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
        return self.engine(batch, side=prefix)

    def parameters(self, recurse: bool = True):
        return self.engine.module.model.parameters(recurse)

    def train(self, mode: bool = True) -> "PartitionedEncoder":
        super().train(mode)
        self.engine.module.model.train(mode)
        return self

    @property
    def embed_dim(self) -> int:
        return self.engine.module.model.embed_dim


def build_train_module(config: Config, dtype: torch.dtype | None = None, ds_config: dict | None = None) -> TrainModule:
    """The encoder and the objective, with the towers' learning-rate scales (`sde_ray.models.tower_of`);
    a tower whose scale is 0 is frozen. The backbone loads in `dtype`, by default the training
    precision's (DeepSpeed would cast it to that anyway). With `deepspeed.zero_init` and the run's
    `ds_config` (every rank calls it then: a collective), the backbone loads partitioned."""
    dtype = dtype or TRAINING_DTYPES[config.deepspeed.precision]
    with zero3_partitioned_load(ds_config if config.deepspeed.zero_init else None):
        model = build_model(config.model, seed=config.train.seed, dtype=dtype)
    scales = {"vision": config.train.vision_lr_scale, "text": config.train.text_lr_scale}
    for name, parameter in model.named_parameters():
        if scales[tower_of(name)] == 0:
            parameter.requires_grad_(False)
    return TrainModule(model, build_objective(config, model.embed_dim), scales)


@contextlib.contextmanager
def zero3_partitioned_load(ds_config: dict | None):
    """transformers' `from_pretrained` inside the block loads each weight straight into its ZeRO-3
    partition (DeepSpeed's zero.Init, which transformers enters while it sees a live HfDeepSpeedConfig
    of stage 3): no rank holds the whole model, and the weights equal a plain load's. No-op for None."""
    if ds_config is None:
        yield
        return
    import deepspeed
    import torch._dynamo  # noqa: F401  (imported inside zero.Init, which patches Tensor.__new__, it fails)
    import transformers.modeling_utils  # noqa: F401  (it imports torch._dynamo on first use)
    from transformers.integrations import HfDeepSpeedConfig

    skip_cpu_shared_memory_kernel()
    deepspeed.init_distributed()  # wraps the process group Ray Train (or the caller) set up
    keep_alive = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference to it
    try:
        yield
    finally:
        del keep_alive


def gathered(parameters: list[torch.nn.Parameter], modifier_rank: int | None = None):
    """ZeRO-3 partitioned `parameters` whole on every rank inside the block (a collective: every rank
    enters it); with `modifier_rank`, that rank's changes are partitioned back. Plain parameters: no-op."""
    partitioned = [p for p in parameters if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)


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


def parameter_groups(module: torch.nn.Module, weight_decay: float, lr: float,
                     lr_scales: dict[str, float] | None = None) -> tuple[list[dict], list[float]]:
    """(AdamW groups of the trainable parameters, each group's learning-rate scale): weight decay on
    matrices only, as open_clip does, and per encoder tower (`model.*` parameters,
    `sde_ray.models.tower_of`) the learning rate `lr × lr_scales[tower]`; the objective's parameters
    keep `lr`. Groups at `lr` itself come first (the logged `lr` is the first group's).

    Biases, norm gains and other vectors (ndim < 2) and the learnable temperature (a scalar) get
    no decay: decaying a norm's gain or a temperature pulls it toward 0 for no regularising gain.
    """
    lr_scales = lr_scales or {}
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        exempt = parameter.ndim < 2 or "bias" in name or "norm" in name or "log_scale" in name or "logit_scale" in name
        scale = lr_scales.get(tower_of(name), 1.0) if name.startswith("model.") else 1.0
        groups.setdefault((scale, exempt), []).append(parameter)
    order = sorted(groups, key=lambda key: (key[0] != 1.0, key[0], key[1]))
    return ([{"params": groups[key], "weight_decay": 0.0 if key[1] else weight_decay, "lr": lr * key[0]}
             for key in order], [key[0] for key in order])


def build_engine(module: torch.nn.Module, ds_config: dict):
    """`deepspeed.initialize` on the trainable parameters (Ray already set up the process group).

    DeepSpeed builds the configured optimizer from these groups; a group's own `weight_decay` and
    `lr` override the config's (torch.optim semantics, kept by DeepSpeed 0.19's ZeRO optimizers), and
    the schedule scales every group's own learning rate (`deepspeed_config.per_group_schedule`).
    """
    import deepspeed  # here, not at the top: DeepSpeed picks its accelerator from DS_ACCELERATOR on import

    skip_cpu_shared_memory_kernel()
    params = ds_config.get("optimizer", {}).get("params", {})
    lr = params.get("lr", 1e-3)
    lr_scales = getattr(module, "tower_lr_scales", None)
    groups, scales = parameter_groups(module, params.get("weight_decay", 0.0), lr, lr_scales)
    ds_config = per_group_schedule(ds_config, scales)
    with scalar_parameters_as_vectors(module):
        engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=groups, config=ds_config)
    return engine


def skip_cpu_shared_memory_kernel() -> None:
    """On DeepSpeed's CPU accelerator, do not build its shared-memory all-reduce kernel.

    DeepSpeed's communication backend JIT-compiles that C++ kernel when it first starts in an
    environment (measured: 60-80 s on 2 cores, and again whenever another Python environment
    rebuilt the shared torch_extensions cache), yet uses it only for `inference_all_reduce`:
    training's reductions go through the process group (gloo here) either way. DeepSpeed keeps its
    probed op table as one module-level dict so that edits to it persist; marking the op
    incompatible makes the backend fall back to the process group without compiling anything.
    GPU accelerators never build this op, so this is a no-op there.
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
