"""The node's state directory: what a node agent shares with the processes it watches.

The control plane names one directory (``<home>/node``, the same path on every
node, as with the simulated-GPU usage directory) and passes it to node agents,
training workers and replicas (``LaunchRequest.node_dir``,
``ReplicaRequest.node_dir``). Each concern keeps its own subdirectory, named
here so that they never collide. Stdlib only: cheap to import in an actor.
"""

from __future__ import annotations

from pathlib import Path

MEMORY_CAPS = "caps"
"""GPU memory caps of live processes, enforced by the node agent's watchdog."""

CPU_CLAIMS = "cores"
"""CPU cores claimed by training processes (their affinity)."""


def subdir(node_dir: str | Path, name: str) -> Path:
    """``node_dir/name``, created if absent."""
    path = Path(node_dir) / name
    path.mkdir(parents=True, exist_ok=True)
    return path
