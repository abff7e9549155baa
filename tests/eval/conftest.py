"""Datasets of the eval tests' end-to-end runs (the synthetic MMEB and tiny-clip export fixtures are
shared: tests/conftest.py)."""

from __future__ import annotations

# A few datasets covering every meta-task and both splits keep the end-to-end tests small.
E2E_DATASETS = ["SynObject", "SynObject-Novel", "SynVQA-Colour", "SynCaption_t2i", "SynGround"]
