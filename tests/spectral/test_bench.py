"""The spectral benchmark runs in quick mode and returns well-formed results (no timing assertions)."""

from __future__ import annotations

import json

import torch

from sde_ray.bench.spectral import main, spectral_stage
from sde_ray.config import Config
from sde_ray.losses.sde import sde_spectral
from sde_ray.spectral import enhancement_matrix, svd_spectrum


def test_quick_bench_is_well_formed(tmp_path, capsys):
    path = tmp_path / "bench.json"
    results = main(json_path=str(path), quick=True)
    assert json.loads(path.read_text()) == results
    assert len(results["cells"]) == 4
    for cell in results["cells"]:
        for key in ("svdvals_s", "svd_s", "gram_eigh_s", "stage_gather_s", "stage_gram_s"):
            assert cell[key] > 0
        assert cell["faster_mode"] in ("gather", "gram")
        assert cell["bytes_gram"] == int(2 * 7 / 8 * cell["cols"] ** 2 * 8)
        assert cell["bytes_gather"] == int(7 / 8 * cell["rows"] * cell["cols"] * 4)
    assert set(results["crossover"]) == {"32", "96"}
    assert "stage:gather" in capsys.readouterr().out


def test_bench_stage_is_the_library_enhancement():
    features = torch.randn(40, 12, dtype=torch.float64)
    config = sde_spectral(Config().spectral)
    out_gather = spectral_stage(features, "gather", config, torch.Generator().manual_seed(0))
    out_gram = spectral_stage(features, "gram", config, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out_gather, out_gram)
    assert not torch.allclose(out_gather, features)
    # F' stays in the row space of F, obtained by a d × d matrix M.
    spectrum = svd_spectrum(features)
    m = torch.linalg.lstsq(features, out_gather).solution
    torch.testing.assert_close(features @ m, out_gather)
    assert enhancement_matrix(spectrum.basis, torch.zeros(12, dtype=torch.float64)).equal(
        torch.eye(12, dtype=torch.float64)
    )
