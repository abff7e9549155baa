"""Ray Tune sweeps and the objective comparison harness.

- `sweep`: loading and validating a sweep file (no Ray);
- `space`: search-space specs -> Tune domains, and their validation against the config;
- `driver`: the trial function, the Tuner and `run_tune` (`sde-ray tune`);
- `outputs`: trials.csv, best_config.yaml and the metric plot;
- `placement`: frees stopped trials' placement groups (the only private Ray API use, fenced);
- `compare`: `sde-ray compare`, objectives × seeds on equal terms.
"""
