"""Ray Data's helper actors left pinned to a node that has gone (docker compose: the `ray-build` container of
the previous build) must not fail the next build: ``release_stranded_helpers`` (index_builder/distributed.py).

A two-node local cluster (``ray.cluster_utils.Cluster``): the head, and a node without CPUs standing in for
a finished job's container."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import pytest

from index_builder.distributed import RAY_DATA_HELPERS, release_stranded_helpers

ray = pytest.importorskip("ray", reason="the Ray extra is not installed (pip install 'hat-search[ray]')")

pytestmark = pytest.mark.slow


def _pipeline() -> list[int]:
    """A Ray Data pipeline with an actor pool, as the build's encoding step has."""
    import ray.data

    class _Double:  # defined here: Ray's workers get it by value (they cannot import this test module)
        def __call__(self, batch):
            return {"id": batch["id"] * 2}

    ds = ray.data.range(8, override_num_blocks=4).map_batches(_Double, compute=ray.data.ActorPoolStrategy(size=1),
                                                              num_cpus=0.5)  # fmt: skip
    return sorted(int(r["id"]) for r in ds.iter_rows())


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    ray.init(address=cluster.address, logging_level=logging.WARNING)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _named() -> set[tuple[str, str]]:
    return {(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)}


def test_the_list_covers_the_helpers_ray_data_creates(two_nodes):
    before = _named()
    assert _pipeline() == [2 * i for i in range(8)]
    created = _named() - before
    assert ("ActorLocationTracker", "ActorLocationTracker") in created, created
    missed = created - set(RAY_DATA_HELPERS)
    assert not missed, f"Ray Data created helpers RAY_DATA_HELPERS misses: {missed}"
    assert release_stranded_helpers(timeout=30) == []  # all alive on a live node: none touched
    assert _named() >= created


def _running(title: str) -> bool:
    """A process whose command line (Ray sets it to ``ray::CLASS``) contains ``title`` (Linux /proc)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if title.encode() in cmdline.read_bytes():
                return True
    return False


def _strand_a_tracker(cluster) -> None:
    """An ActorLocationTracker as Ray Data creates it, by a driver on a node that then vanishes (SIGKILL)."""
    from ray.data._internal.execution.node_trackers.actor_location import ActorLocationTracker

    deadline = time.monotonic() + 60
    while ("ActorLocationTracker", "ActorLocationTracker") in _named():  # the previous one's name is free
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor("ActorLocationTracker", namespace="ActorLocationTracker"), no_restart=True)
        assert time.monotonic() < deadline
        time.sleep(0.1)
    deadline = time.monotonic() + 60
    gone = cluster.add_node(num_cpus=0)
    cluster.wait_for_nodes()
    node_id = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerPort"] == gone.node_manager_port)
    pinned = ActorLocationTracker.options(
        name="ActorLocationTracker", namespace="ActorLocationTracker", lifetime="detached",
        label_selector={ray._raylet.RAY_NODE_ID_KEY: node_id},
    ).remote()  # fmt: skip
    ray.get(pinned.__ray_ready__.remote(), timeout=60)
    cluster.remove_node(gone, allow_graceful=False)
    # A container that exits takes its processes with it: wait for the tracker's worker to go too.
    while _running("ray::ActorLocationTracker"):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_helper_pinned_to_a_gone_node_is_released(two_nodes):
    _strand_a_tracker(two_nodes)
    with pytest.raises(Exception, match=r"ActorUnschedulable|not schedulable"):  # the failure CI saw in Docker
        _pipeline()
    _strand_a_tracker(two_nodes)
    assert release_stranded_helpers(timeout=60) == ["ActorLocationTracker"]
    assert _pipeline() == [2 * i for i in range(8)]
    assert release_stranded_helpers(timeout=30) == []
