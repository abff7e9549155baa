"""Benchmarks behind `sde-ray bench ...`: each measures side by side in one run and prints ratios."""
