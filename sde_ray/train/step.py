"""One optimizer step on this worker's local batch, GradCache-style, read top to bottom.

The contrastive batch and the spectral batch are the global batch whatever fits in memory (Gao et
al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"). This worker
holds `global_batch_size / world_size` rows and encodes them in chunks of `train.micro_batch_size`:

1. encode every chunk, in order, without a graph, remembering the RNG state (CPU, and CUDA when the
   engine is on a GPU) each one started from, so that dropout replays exactly;
2. run the objective once on all local features, as leaf tensors that require grad. The objective
   all-gathers every rank's rows, so InfoNCE and the spectral stage see the global batch. Chunk 0
   is re-encoded live inside that same engine forward (its RNG state restored, so its features are
   the cached ones) while chunks 1..k-1 enter as leaves: `engine.backward(loss)` then gives the
   objective's own parameter gradients (a learnable temperature), chunk 0's encoder gradients and,
   on the leaves, d loss / d features of every other chunk. Keeping the objective inside an engine
   forward lets ZeRO-3 gather the objective's parameters the way it gathers the encoder's;
3. re-encode chunks 1..k-1 with a graph (RNG state restored) and back-propagate the cached feature
   gradients through each: `backward(Σ features · cached gradient)`.

The dropout masks are those of one forward over the chunks in order, and the step leaves the RNG
where that forward left it. With one chunk (the default) steps 1 and 3 are empty and this is the
plain step: one forward, one backward.

DeepSpeed sees every chunk as one micro-step (`gradient_accumulation_steps` = chunks, see
`deepspeed_config`), so its micro-step counter reaches the accumulation boundary at the last chunk
and the optimizer steps once per global batch. Chunks bounded by a token budget (`chunk_sizes`) vary
in number; every rank runs the largest count any rank needs, and DeepSpeed is told the step owns the
boundary (`managed_gradient_accumulation=false`: the one `engine.step()` at the end). No backward
may be scaled by 1/chunks: the feature gradients are already those of the global loss. DeepSpeed
scales in two places, and `backward` below turns both off (`scale_wrt_gas=False`, and a loss that
is not itself an engine output: see there).
ZeRO-0 and ZeRO-1 reduce gradients once, at the boundary; ZeRO-2 and ZeRO-3 reduce (reduce-scatter)
after every chunk's backward, because they partition gradients as they are produced
(docs/training.md measures the cost).

Non-finite losses: before any backward, all ranks agree (one all-reduce) that the loss is finite.
If not, nothing is back-propagated, no micro-step is counted, the RNG goes back to where the step
started, and the step is skipped whole on every rank; the caller applies `train.nan_policy`.
Non-finite gradients under a finite loss (born in a backward, e.g. a replayed chunk's): the engine's
`grad_guard.GradientGuard` sees every gradient the backwards produce; before the optimizer step all
ranks agree (one more all-reduce) that they were finite, and if not the boundary step runs without
any update (weights, optimizer moments, schedule and counters unchanged), the RNG goes back to where
the step started, and the step is reported skipped like a non-finite loss (`StepResult.skipped`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from sde_ray.distributed import all_ranks_true, group_device, max_over_ranks
from sde_ray.models.embedder import host_fact
from sde_ray.train.grad_guard import GradientGuard


@dataclass
class StepResult:
    """What one `train_step` did. `finite=False`: skipped whole, the weights did not move; `skipped`
    says why ("loss" or "gradient": non-finite on at least one rank). The loss and the objective's
    metrics stay as they were computed (0-dim tensors on the device, or floats): reading `loss` is a
    host sync; the loop's meter sums `loss_value` and the metrics without one."""

    finite: bool
    loss_value: torch.Tensor | float
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)
    query: torch.Tensor | None = None  # this worker's features, detached (diagnostics)
    target: torch.Tensor | None = None
    chunks: int = 1
    skipped: str | None = None

    @property
    def loss(self) -> float:
        """This rank's loss as a float (a host sync when it is a device tensor)."""
        return float(self.loss_value)


def rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def all_ranks_finite(loss: torch.Tensor, world_size: int) -> bool:
    """Whether the loss is finite on every rank (one all-reduce, on the process group's device)."""
    return all_ranks_true(bool(torch.isfinite(loss.detach()).all()), world_size)


def _starts(sizes: list[int]) -> list[int]:
    """The first row of each chunk of `sizes` rows."""
    return [0, *itertools.accumulate(sizes[:-1])]


def split_rows(batch: dict[str, torch.Tensor], sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    """The batch as consecutive chunks of `sizes[i]` rows (every value is split along dim 0)."""
    rows = len(next(iter(batch.values())))
    if sum(sizes) != rows or min(sizes) < 1:
        raise ValueError(f"a local batch of {rows} rows does not split into chunks of {sizes} rows")
    return [{key: value[start:start + size] for key, value in batch.items()}
            for start, size in zip(_starts(sizes), sizes)]


def row_spans(batch: dict) -> list[np.ndarray]:
    """Per side (`{prefix}_token_span`, read on the host), each row's token spans as int64 [rows, m, 2]:
    m = 1 for queries and targets, K for K negatives per row."""
    spans = [host_fact(batch, key).numpy() for key in sorted(batch) if key.endswith("_token_span")]
    return [span.reshape(span.shape[0], -1, 2) for span in spans]


@dataclass
class _Extents:
    """One side's rows reduced to what a chunk's width needs: sequences per row, and each row's first
    used column and one past its last (none used: +inf / -inf, so such rows never widen a chunk)."""

    sequences: int
    first: list[float]
    last: list[float]

    @staticmethod
    def of(span: np.ndarray) -> "_Extents":
        used = span[..., 1] > span[..., 0]
        first = np.where(used, span[..., 0], np.inf).min(axis=1)
        last = np.where(used, span[..., 1], -np.inf).max(axis=1)
        return _Extents(span.shape[1], first.tolist(), last.tolist())


def _chunk_tokens(rows: int, sides: list[tuple[int, float, float]]) -> int:
    """Padded token positions of `rows` rows whose sides have (sequences, first, last) extents."""
    return sum(rows * sequences * int(max(0.0, last - first)) for sequences, first, last in sides)


def padded_tokens(spans: list[np.ndarray]) -> int:
    """The token positions one forward over these rows computes: per side, its sequences × the width
    the model trims them to (`models.embedder.trim_padding`: first used column to last, over every row)."""
    sides = [_Extents.of(span) for span in spans]
    return _chunk_tokens(len(spans[0]), [(e.sequences, min(e.first, default=np.inf),
                                          max(e.last, default=-np.inf)) for e in sides])


def token_budget_sizes(spans: list[np.ndarray], budget: int, max_rows: int) -> list[int]:
    """Consecutive chunks, each as long as it fits: a chunk ends before the row that would take its
    `padded_tokens` over `budget` or its rows over `max_rows` (a row over the budget on its own is a
    chunk of one). Rows keep their order: the objective sees the local batch as it came. Each side's
    extent is carried along as rows join (one pass over the rows: this runs every step)."""
    sides = [_Extents.of(span) for span in spans]
    rows = spans[0].shape[0]
    sizes, start = [], 0
    while start < rows:
        extent = [(e.sequences, e.first[start], e.last[start]) for e in sides]
        end = start + 1
        while end < rows and end - start < max_rows:
            wider = [(n, min(first, e.first[end]), max(last, e.last[end]))
                     for (n, first, last), e in zip(extent, sides)]
            if _chunk_tokens(end + 1 - start, wider) > budget:
                break
            extent, end = wider, end + 1
        sizes.append(end - start)
        start = end
    return sizes


def split_to_count(sizes: list[int], spans: list[np.ndarray], count: int) -> list[int]:
    """`sizes` cut further until there are `count` chunks (count <= rows): the chunk with the most
    padded tokens among those of two or more rows is halved, each time. Every rank then runs the same
    number of forwards and backwards, which ZeRO-3's gathers and ZeRO-2/3's reduce-scatters need."""
    sizes = list(sizes)
    while len(sizes) < count:
        cost = [padded_tokens([span[a:a + n] for span in spans]) if n > 1 else -1
                for a, n in zip(_starts(sizes), sizes)]
        i = int(np.argmax(cost))
        sizes[i:i + 1] = [sizes[i] // 2, sizes[i] - sizes[i] // 2]
    return sizes


def chunk_sizes(batch: dict, chunk: int, token_budget: int, world_size: int) -> list[int]:
    """The rows of each GradCache chunk of this rank's local batch: `chunk` rows each, or, with a
    token budget (`train.chunk_tokens`), `token_budget_sizes` capped at `chunk` rows, as many chunks on
    every rank as the rank that needs most (one all-reduce, read on the host)."""
    rows = len(next(iter(batch.values())))
    if not token_budget:
        if rows % chunk:
            raise ValueError(f"a local batch of {rows} rows does not split into chunks of {chunk}")
        return [chunk] * (rows // chunk)
    spans = row_spans(batch)
    if not spans:
        raise ValueError("train.chunk_tokens needs the batch's {qry,pos}_token_span (the BatchProcessor's)")
    sizes = token_budget_sizes(spans, token_budget, chunk)
    count = int(max_over_ranks(torch.tensor([len(sizes)], dtype=torch.int64, device=group_device()),
                               world_size).item()) if world_size > 1 else len(sizes)
    return split_to_count(sizes, spans, count)


def backward(engine, loss: torch.Tensor) -> None:
    """`engine.backward` with the gradient of `loss` itself, unscaled, whatever the ZeRO stage.

    `scale_wrt_gas=False` stops the loss division by `gradient_accumulation_steps`. DeepSpeed 0.19
    also hooks every tensor an engine forward returns with a gradient division by the same factor,
    skipped only in a backward that `engine.backward` has registered, and it registers by a hook on
    the tensor it is handed. A tensor's hooks run in the order they were added, so when that tensor
    is the engine output itself (the objective's loss), the division runs first. ZeRO-1/2/3 hide
    this (their loss scaler hands backward a new tensor, loss × 1); ZeRO-0 does not (fp32 has no
    ZeRO optimizer, and DeepSpeed's bf16 optimizer no loss scaler): there the objective's gradients,
    the cached feature gradients with them, came out divided by the chunk count. A view of the
    loss is a new autograd node, whose hook fires before any output hook.
    """
    engine.backward(loss.view_as(loss), scale_wrt_gas=False)


def train_step(engine, batch: dict[str, torch.Tensor], context, chunk: int, world_size: int,
               token_budget: int = 0) -> StepResult:
    """One optimizer step of `engine` (a DeepSpeed engine around `loop.TrainModule`) on this worker's
    local `batch`, encoded `chunk` rows at a time, or in chunks of at most `token_budget` padded tokens
    (`chunk_sizes`; the engine's accumulation is then the caller's, see `deepspeed_config`). `context`
    is the objective's `StepContext` for the whole local batch; every rank must call this together
    (the objective and the checks collect)."""
    device = engine.device
    sizes = chunk_sizes(batch, chunk, token_budget, world_size)
    pieces = split_rows(batch, sizes)
    # DeepSpeed counts micro-steps to find the optimizer step, unless told the caller owns it (a
    # chunk count that changes from step to step): then `engine.step()` runs once, at the end.
    counted = engine.managed_gradient_accumulation()
    step_start = rng_state(device)
    guard = GradientGuard.of(engine)
    guard.begin()

    # 1. Every chunk without a graph, each one's RNG state kept for its replay (one chunk: nothing to cache).
    replay_states, cached_query, cached_target = [], [], []
    if len(pieces) > 1:
        with torch.no_grad():
            for piece in pieces:
                replay_states.append(rng_state(device))
                query, target = engine(piece)  # an `engine.Encoded`
                cached_query.append(query)
                cached_target.append(target)
    after_encode = rng_state(device)

    # 2. The objective once, on every local row. Chunk 0 is re-encoded live inside the same engine
    # forward (its RNG replayed), the other chunks enter as leaves: the one backward then carries the
    # objective's parameter gradients, chunk 0's encoder gradients and d loss / d features of the rest.
    leaves = None
    if cached_query:
        set_rng_state(replay_states[0], device)
        leaves = (torch.cat(cached_query[1:]).requires_grad_(True), torch.cat(cached_target[1:]).requires_grad_(True))
    loss, metrics, query, target = engine(pieces[0], context, leaves)  # an `engine.Scored`
    if not all_ranks_finite(loss, world_size):
        set_rng_state(step_start, device)  # a skipped step leaves no trace, randomness included
        return StepResult(finite=False, loss_value=loss.detach(), chunks=len(pieces), skipped="loss")
    backward(engine, loss)

    # 3. Replay each cached chunk with a graph and push its cached feature gradients through it.
    if leaves is not None:
        query_grads, target_grads = leaves[0].grad.split(sizes[1:]), leaves[1].grad.split(sizes[1:])
        for piece, state, query_grad, target_grad in zip(pieces[1:], replay_states[1:], query_grads, target_grads):
            if counted:
                engine.step()  # closes the previous chunk's micro-step (the boundary is the last chunk's, below)
            set_rng_state(state, device)
            chunk_query, chunk_target = engine(piece)
            surrogate = (chunk_query * query_grad).sum() + (chunk_target * target_grad).sum()
            backward(engine, surrogate)

    # 4. The optimizer step, unless some rank's gradient is not finite.
    if not guard.all_ranks_finite(world_size):
        with guard.skipped_update():
            engine.step()  # the boundary: DeepSpeed clears its gradients, nothing is updated
        set_rng_state(step_start, device)
        return StepResult(finite=False, loss_value=loss.detach(), chunks=len(pieces), skipped="gradient")
    engine.step()
    if leaves is not None:
        # The replays redrew chunks 1..k-1's masks: return to where the one pass over the chunks ended.
        # (One chunk: nothing was replayed, and `after_encode` is the step's start, not its end.)
        set_rng_state(after_encode, device)

    # The objectives all-gather equal shapes, so the objective and its spectral stage saw local × world rows.
    rows = query.shape[0] * world_size
    metrics = {**metrics, "rows_objective": float(rows), "rows_spectral": float(rows),
               "chunks": float(len(pieces))}
    return StepResult(finite=True, loss_value=loss.detach(), metrics=metrics, query=query, target=target,
                      chunks=len(pieces))
