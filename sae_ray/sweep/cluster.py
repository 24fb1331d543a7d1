"""What the joined Ray cluster can hold: its nodes now and, on an autoscaling cluster, what
the autoscaler may add. A cluster that scales from zero has no worker node when the sweep
starts: sized by what it has then, it would refuse to run at all. The autoscaler's node
types come from the cluster config it publishes in the GCS (autoscaler v2; Ray Train reads
it the same way); a v1 autoscaler publishes only its status, so the cluster is then known
to grow, not how far (None)."""

from __future__ import annotations

import json
import logging
import math
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


def autoscaled() -> bool:
    """Whether an autoscaler with node types of its own watches this cluster. Every head
    runs the autoscaler's monitor and publishes its status; without a cluster config it
    runs read-only, where each node's type is `node_<id>`: a type named otherwise comes
    from an `available_node_types` the autoscaler launches from."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        status = json.loads(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) or "{}")
    except Exception:
        return False
    report = status.get("autoscaler_report") or {}
    types = set((report.get("node_type_mapping") or {}).values()) | set(
        report.get("active_nodes") or {}
    )
    return any(not str(t).startswith("node_") for t in types)


def nodes() -> list[dict]:
    """`ray.nodes()`, plus one node of each type the autoscaler may add (`autoscaled`;
    `Resources` None when the autoscaler does not say)."""
    groups = node_groups()
    grown = [{"Alive": True, "Resources": r, "autoscaled": True} for r in groups]
    if not groups and autoscaled():
        grown = [{"Alive": True, "Resources": None, "autoscaled": True}]
    return [*ray.nodes(), *grown]


def capacity() -> dict[str, float]:
    """Each resource: what the cluster has now, or what the autoscaler may grow it to
    (CPU infinite when it grows by an amount it does not publish)."""
    now = dict(ray.cluster_resources())
    if not node_groups() and autoscaled():
        return {**now, "CPU": math.inf}
    try:
        most = ray._private.state.state.get_max_resources_from_cluster_config() or {}
    except Exception:
        most = {}
    for key, value in most.items():
        if value and value != sys.maxsize:
            now[key] = max(now.get(key, 0.0), float(value))
    return now
