"""The sweep driver frees a stopped trial's worker placement group, and only that.

A stopped trial's Train controller dies but leaves its workers' placement group behind (Ray Train's
own cleaner needs the state API, which a dashboard-less or multi-instance machine lacks). Here an
actor stands in for the controller: it creates a group the way Train does, then is killed the way
Tune kills a stopped trial; groups of live actors and of the driver must survive.
"""

from __future__ import annotations

import time

import pytest

from sde_ray.tune.placement import _actor_created_placement_groups, release_orphaned_placement_groups

pytestmark = pytest.mark.ray


def test_only_groups_of_dead_creators_are_removed(ray_cluster):
    ray = ray_cluster
    from ray.util.placement_group import placement_group, placement_group_table

    @ray.remote(num_cpus=0)
    class Controller:
        def reserve(self) -> str:
            group = placement_group([{"CPU": 1.0}])
            ray.get(group.ready())
            return group.id.hex()

    stopped, alive = Controller.remote(), Controller.remote()
    stopped_group, alive_group = ray.get([stopped.reserve.remote(), alive.reserve.remote()])
    driver_group = placement_group([{"CPU": 0.5}])  # like Tune's own trial groups
    ray.get(driver_group.ready())
    try:
        assert release_orphaned_placement_groups() == 0  # every creator is alive
        ray.kill(stopped)
        deadline = time.time() + 30
        removed = 0
        while not removed and time.time() < deadline:
            removed = release_orphaned_placement_groups()
            time.sleep(0.5)
        assert removed == 1
        states = {k: v["state"] for k, v in placement_group_table().items()}
        assert states[stopped_group] == "REMOVED"
        assert states[alive_group] == "CREATED" and states[driver_group.id.hex()] == "CREATED"
        assert [e.placement_group_id.hex() for e in _actor_created_placement_groups()] == [alive_group]
    finally:
        ray.kill(alive)
        ray.util.remove_placement_group(driver_group)
        time.sleep(1)
        release_orphaned_placement_groups()
