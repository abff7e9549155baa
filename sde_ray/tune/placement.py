"""Frees the worker placement groups of Tune trials the scheduler stopped: sde_ray's only use of
private Ray APIs, fenced here.

Why: when the scheduler stops a trial, its Ray Train controller dies with the trial actor, but the
controller's worker placement group lives until the job ends. Ray Train's own PlacementGroupCleaner
removes it only when the state API answers (a dashboard, and one Ray instance per machine), so
without this a stopped trial keeps its workers' CPUs/GPUs and the next trial's data pipeline can
starve. Which private API: `ray._private.state.state` (the GCS accessor) and the generated protobuf
`ray.core.generated.gcs_pb2.PlacementGroupTableData`, as of Ray 2.60 (the version pinned in
pyproject); the public `ray.util.placement_group_table()` omits the creator actor/job fields this
needs. If a Ray upgrade moves them, only `_actor_created_placement_groups` changes, and
tests/tune/test_release.py says so.
"""

from __future__ import annotations

import time

import ray
from ray import tune


def _actor_created_placement_groups() -> list:
    """This job's live placement groups that an actor (a Train controller) created, from GCS's table.

    The creator fields exist only in the raw table (a private API); groups created by the driver
    itself (Tune's trial groups: a nil creator actor) and other jobs' groups are never included.
    """
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    created = gcs_pb2.PlacementGroupTableData.PlacementGroupState.Value("CREATED")
    job_id = bytes.fromhex(ray.get_runtime_context().get_job_id())
    entries = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        entry = gcs_pb2.PlacementGroupTableData.FromString(raw)
        created_by_actor = entry.creator_actor_id and set(entry.creator_actor_id) != {0xFF}
        if entry.state == created and created_by_actor and not entry.is_detached and entry.creator_job_id == job_id:
            entries.append(entry)
    return entries


def release_orphaned_placement_groups() -> int:
    """Removes this job's placement groups whose creating actor is dead: a stopped trial's workers'
    group (see the module docstring); returns how many."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    orphans = [e for e in _actor_created_placement_groups() if e.creator_actor_dead]
    for entry in orphans:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(entry.placement_group_id)))
    return len(orphans)


def release_after_sweep(timeout_s: float = 60.0) -> None:
    """Once every trial is over, waits for the last controllers to die and frees what they left."""
    deadline = time.monotonic() + timeout_s
    while True:
        release_orphaned_placement_groups()
        if not _actor_created_placement_groups() or time.monotonic() > deadline:
            return
        time.sleep(1.0)


class ReleaseStoppedTrials(tune.Callback):
    """Driver-side: frees the worker placement groups of trials the scheduler stopped (see above)."""

    def __init__(self, every_s: float = 2.0):
        self.every_s = every_s
        self._last = 0.0

    def on_step_begin(self, iteration, trials, **info):
        if time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            release_orphaned_placement_groups()
