"""Ray Tune sweeps (search spaces, schedulers, the sweep driver) and the objective comparison harness."""
