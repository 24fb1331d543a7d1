"""What the joined Ray cluster can hold: its nodes now and, on an autoscaling cluster, the
node types the autoscaler may add (from the cluster config the autoscaler publishes in the
GCS, which Ray Train reads the same way). A cluster that scales from zero has no worker
node when the sweep starts: sized by what it has then, it would refuse to run at all."""

from __future__ import annotations

import logging
import sys

import ray

log = logging.getLogger(__name__)


def node_groups() -> list[dict[str, float]]:
    """The resources of one node of each type the autoscaler may launch (none without an
    autoscaler)."""
    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception as err:  # a private API: without it, the cluster is what it is now
        log.debug("no autoscaler config (%s)", err)
        return []
    if config is None:
        return []
    return [
        dict(group.resources)
        for group in config.node_group_configs
        if group.max_count != 0 and group.resources
    ]


def nodes() -> list[dict]:
    """`ray.nodes()`, plus one node of each type the autoscaler may add (`autoscaled`)."""
    grown = [{"Alive": True, "Resources": r, "autoscaled": True} for r in node_groups()]
    return [*ray.nodes(), *grown]


def capacity() -> dict[str, float]:
    """Each resource: what the cluster has now, or what the autoscaler may grow it to."""
    now = dict(ray.cluster_resources())
    try:
        most = ray._private.state.state.get_max_resources_from_cluster_config() or {}
    except Exception:
        most = {}
    for key, value in most.items():
        if value and value != sys.maxsize:
            now[key] = max(now.get(key, 0.0), float(value))
    return now
