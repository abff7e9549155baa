"""Spectral decomposition of one modality's feature matrix, single-process and distributed.

`F` (N × d, rows = samples) is decomposed as `F = U Σ Vᵀ`; we keep the singular values σ (descending)
and the right singular vectors V (d × r, r = min(N, d)), both detached: the enhancement and the
spectral losses never backpropagate through a decomposition (see `sde_ray.losses.dual_domain`).

Two routes give the same σ and V (V up to the sign of each column):
- SVD of the matrix itself (`svd_spectrum`; distributed: all-gather the rows, then SVD);
- eigh of the Gram matrix FᵀF = V Σ² Vᵀ (`gram_spectrum`; distributed: every rank forms its local
  F_localᵀF_local, one all-reduce sums them). The Gram squares the condition number, so it is
  accumulated in float64, and for N < d it carries d − N zero eigenvalues: only the top min(N, d)
  eigenpairs are kept.

Which route is cheaper depends on the shape (`choose_mode`; docs/spectral.md has the measurements).
Every rank of a process group computes the same spectrum, so per-rank decisions derived from it
(partition, enhancement) agree without further communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sde_ray.distributed import all_reduce, gather_with_grad

MODES = ("gather", "gram", "auto")


@dataclass(frozen=True)
class Spectrum:
    """Singular values (descending) and right singular vectors of a global N × d feature matrix."""

    sigma: torch.Tensor  # (r,), r = min(N, d), detached
    basis: torch.Tensor  # (d, r), column i is v_i, detached
    num_rows: int  # N, the global number of rows
    num_cols: int  # d

    @property
    def rank(self) -> int:
        return self.sigma.shape[0]


def _check_shape(features: torch.Tensor, name: str) -> None:
    if features.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (rows × dims) matrix, got shape {tuple(features.shape)}")
    if features.shape[0] < 1 or features.shape[1] < 1:
        raise ValueError(f"{name} is empty: shape {tuple(features.shape)}")


def _check_finite(matrix: torch.Tensor, name: str) -> None:
    if not torch.isfinite(matrix).all():
        raise ValueError(f"{name} contains NaN or Inf; the spectrum is undefined")


def _check_features(features: torch.Tensor, name: str = "features") -> None:
    _check_shape(features, name)
    _check_finite(features, name)


def _working_dtype(features: torch.Tensor) -> torch.dtype:
    # LAPACK has no half/bfloat16 kernels; float64 inputs stay float64.
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def svd_spectrum(features: torch.Tensor) -> Spectrum:
    """σ and V of the whole matrix by a thin SVD (in float32, or float64 for float64 input)."""
    _check_features(features)
    matrix = features.detach().to(_working_dtype(features))
    _, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
    return Spectrum(sigma, vh.mT, features.shape[0], features.shape[1])


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """FᵀF accumulated in float64, without autograd."""
    matrix = features.detach().to(torch.float64)
    return matrix.T @ matrix


def spectrum_from_gram(gram: torch.Tensor, num_rows: int, dtype: torch.dtype = torch.float32) -> Spectrum:
    """σ and V from a (global) float64 Gram matrix FᵀF of `num_rows` rows; keeps the top min(N, d)."""
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square d × d matrix, got shape {tuple(gram.shape)}")
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    dim = gram.shape[0]
    rank = min(num_rows, dim)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram.to(torch.float64))
    # eigh sorts ascending; rounding can leave tiny negative eigenvalues where FᵀF is singular.
    eigenvalues = eigenvalues.flip(0)[:rank].clamp_min(0.0)
    basis = eigenvectors.flip(1)[:, :rank]
    return Spectrum(eigenvalues.sqrt().to(dtype), basis.to(dtype), num_rows, dim)


def gram_spectrum(features: torch.Tensor) -> Spectrum:
    """σ and V through eigh of the float64 Gram matrix (single process)."""
    _check_features(features)
    return spectrum_from_gram(gram_matrix(features), features.shape[0], _working_dtype(features))


def choose_mode(num_rows: int, num_cols: int, mode: str = "auto", auto_gram_ratio: float = 1.0) -> str:
    """Resolves `mode` to gather or gram. auto: gram when N·ratio >= d (big batches, modest d)."""
    if mode not in MODES:
        raise ValueError(f"unknown spectral mode {mode!r}; valid: {', '.join(MODES)}")
    if mode != "auto":
        return mode
    if auto_gram_ratio <= 0:
        raise ValueError(f"auto_gram_ratio must be > 0, got {auto_gram_ratio}")
    return "gram" if num_rows * auto_gram_ratio >= num_cols else "gather"


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def gather_rows(local_features: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's rows in rank order, with a gradient-carrying all-gather (equal row counts)."""
    return gather_with_grad(local_features, world_size)


def gather_spectrum(
    local_features: torch.Tensor, rank: int, world_size: int
) -> tuple[Spectrum, torch.Tensor]:
    """Gather mode: all-gather the rows (with gradient), SVD the global matrix.

    Returns the spectrum and the gathered global features (differentiable w.r.t. every rank's rows).
    """
    _check_rank(rank, world_size)
    _check_shape(local_features, "local_features")
    # Finiteness is checked after the collective, on what every rank sees: a NaN on one rank makes
    # all ranks raise together instead of leaving the others blocked in the next collective.
    global_features = gather_rows(local_features, world_size)
    return svd_spectrum(global_features), global_features


def distributed_gram_spectrum(local_features: torch.Tensor, rank: int, world_size: int) -> Spectrum:
    """Gram mode: all-reduce the float64 local Gram matrices (d × d), eigh on every rank."""
    _check_rank(rank, world_size)
    _check_shape(local_features, "local_features")
    gram = gram_matrix(local_features)
    gram = all_reduce(gram, world_size)
    _check_finite(gram, "the global Gram matrix (some rank's features)")
    num_rows = local_features.shape[0] * world_size
    return spectrum_from_gram(gram, num_rows, _working_dtype(local_features))


def distributed_spectrum(
    local_features: torch.Tensor, rank: int, world_size: int, mode: str = "auto", auto_gram_ratio: float = 1.0
) -> Spectrum:
    """The global spectrum of every rank's rows (equal row counts per rank) by the chosen route."""
    num_rows = local_features.shape[0] * world_size
    resolved = choose_mode(num_rows, local_features.shape[-1], mode, auto_gram_ratio)
    if resolved == "gather":
        return gather_spectrum(local_features, rank, world_size)[0]
    return distributed_gram_spectrum(local_features, rank, world_size)


def communicated_bytes(
    num_rows: int, num_cols: int, world_size: int, mode: str, element_bytes: int = 4
) -> int:
    """Bytes one worker sends for the decomposition: its rows (gather) or the float64 Gram (all-reduce).

    Ring all-gather sends (W−1)/W of the global rows; ring all-reduce sends 2(W−1)/W of the d × d Gram.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    share = (world_size - 1) / world_size
    if mode == "gather":
        return int(share * num_rows * num_cols * element_bytes)
    if mode == "gram":
        return int(2 * share * num_cols * num_cols * 8)
    raise ValueError(f"mode must be gather or gram, got {mode!r}")
