"""Shared fixtures: one session-scoped local Ray for every test that needs it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


SIM_NODE = "jobworker_sim_node_"  # workers.ray_cluster.SIM_NODE_RESOURCE


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A 3-node Ray cluster on this machine: the head is the simulated node "local" of
    configs/cluster/local_sim.yaml, the two workers are "node-a" and "node-b" of
    configs/cluster/two_nodes_sim.yaml."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 4,
            "include_dashboard": False,
            "resources": {f"{SIM_NODE}local": 1},
        },
    )
    for name in ("node-a", "node-b"):
        cluster.add_node(num_cpus=2, resources={f"{SIM_NODE}{name}": 1})
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
    cluster.shutdown()
