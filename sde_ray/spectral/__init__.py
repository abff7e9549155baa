"""The spectral core (pure torch): decomposition, partition, schedules, enhancement, diagnostics.

docs/spectral.md states our precise reading of the SDE method and which choices are ours.
"""

from sde_ray.spectral.decompose import (
    MODES,
    Spectrum,
    choose_mode,
    communicated_bytes,
    distributed_gram_spectrum,
    distributed_spectrum,
    gather_spectrum,
    gram_matrix,
    gram_spectrum,
    spectrum_from_gram,
    svd_spectrum,
)
from sde_ray.spectral.diagnostics import (
    centroid_gap,
    effective_rank,
    energy_shares,
    modality_gap,
    principal_angles,
    smallest_principal_angle,
    top_subspace,
)
from sde_ray.spectral.enhance import (
    Enhancement,
    adversarial_signs,
    apply_enhancement,
    enhancement_deltas,
    enhancement_matrix,
    random_signs,
    snr_loss,
)
from sde_ray.spectral.partition import (
    FENCES,
    NOISE_ESTIMATORS,
    Partition,
    PartitionRule,
    estimate_noise_std,
    marchenko_pastur_quantile,
    noise_edge,
    partition_spectrum,
)
from sde_ray.spectral.schedules import SCHEDULE_KINDS, Schedule, schedule_value
from sde_ray.spectral.snapshot import SpectrumRule, spectral_snapshot, spectrum_rule

__all__ = [
    "FENCES",
    "MODES",
    "NOISE_ESTIMATORS",
    "SCHEDULE_KINDS",
    "Enhancement",
    "Partition",
    "PartitionRule",
    "Schedule",
    "Spectrum",
    "SpectrumRule",
    "adversarial_signs",
    "apply_enhancement",
    "centroid_gap",
    "choose_mode",
    "communicated_bytes",
    "distributed_gram_spectrum",
    "distributed_spectrum",
    "effective_rank",
    "energy_shares",
    "enhancement_deltas",
    "enhancement_matrix",
    "estimate_noise_std",
    "gather_spectrum",
    "gram_matrix",
    "gram_spectrum",
    "marchenko_pastur_quantile",
    "modality_gap",
    "noise_edge",
    "partition_spectrum",
    "principal_angles",
    "random_signs",
    "schedule_value",
    "smallest_principal_angle",
    "snr_loss",
    "spectral_snapshot",
    "spectrum_rule",
    "spectrum_from_gram",
    "svd_spectrum",
    "top_subspace",
]
