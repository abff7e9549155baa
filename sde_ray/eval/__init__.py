"""MMEB evaluation: P@1 per dataset / meta-task / IND / OOD, spectral and modality-gap diagnostics,
eval-time gap remedies, plots and reports (docs/eval.md).

- `metrics`: the pure P@1 maths and aggregation conventions;
- `dataset`: reading MMEB-eval parquet as released, de-duplicated indexing, image loading;
- `scoring`: one dataset from rows to `DatasetScore` through any encoder;
- `encode`: the in-process encoder (autocast precision), the Ray actor pool, the embedding cache;
- `sharded`: validation spread over the ranks of a process group (rank / world size / gather as
  arguments);
- `runner`: `run_eval` (`sde-ray eval`), `final_evaluation` (the driver, after `fit()`),
  `evaluate_model` and `validation_p_at_1` (training loop);
- `gap`, `diagnostics`, `plots`, `report`: remedies, spectra, PNGs, results files and comparisons.
"""
