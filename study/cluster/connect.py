"""The Ray cluster a study runs on: connecting, what it holds now and whether it can grow, and
the checks that keep a study from starting where it would lose its work.
"""
from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass
from typing import Any

from study.errors import StudyError
from study.spec import StudySpec
from study.store import Location

PROBE_TIMEOUT_S = 60.0


def init_ray(address: str | None, num_cpus: int | None) -> None:
    """Connect to a cluster (``address``) or start a local runtime on 127.0.0.1, no dashboard."""
    import ray

    if ray.is_initialized():
        return
    if address:
        _quiet()
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=True, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise StudyError(f"cannot connect to the Ray cluster at {address!r}: {str(exc).splitlines()[0]}") from exc
        return
    # Ray 2.60 on Linux advertises the interface address unless this is set before it starts.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    _quiet()
    ray.init(
        address="local",  # a new runtime, even where `ray start` left a cluster running on this machine
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=True,
        logging_level="ERROR",
        _node_ip_address="127.0.0.1",
    )


def _quiet() -> None:
    """Our own progress table replaces Ray's and Optuna's chatter."""
    import logging

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    logging.getLogger("optuna").setLevel(logging.WARNING)
    # Trial failures are reported, one line each, by our progress table and the trials table.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass(frozen=True)
class ClusterView:
    """What the cluster holds now, and whether an autoscaler may add nodes to it."""

    cpus: float
    gpus: float
    nodes: int
    can_grow: bool


def view() -> ClusterView:
    import ray

    res = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return ClusterView(float(res.get("CPU", 0)), float(res.get("GPU", 0)), len(alive), autoscaler_running())


def autoscaler_running() -> bool:
    """True when the cluster was started with an autoscaling config (``ray up``, or Ray's fake
    multi-node provider), so that pending trials make it add nodes.

    Every head runs Ray's monitor, which publishes a report under ``__autoscaling_status``. A
    cluster started by hand (``ray start``, ``ray.init``, ``ray.cluster_utils.Cluster``) is
    watched by a read-only provider that names each node's type ``node_<node id>``; a cluster
    with an autoscaling config names them by its ``available_node_types``.
    """
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return False
    raw = _internal_kv_get("__autoscaling_status")
    try:
        report = (json.loads(raw) if raw else {}).get("autoscaler_report") or {}
    except ValueError:
        return False
    types = report.get("node_type_mapping") or {}
    return any(kind != f"node_{node}" for node, kind in types.items())


def slots(spec: StudySpec, cluster: ClusterView) -> int:
    """Trials that fit at once on what the cluster holds now."""
    n = int(cluster.cpus // spec.cpus_per_trial) if spec.cpus_per_trial else 1
    if spec.gpus_per_trial:
        n = min(n, int(cluster.gpus // spec.gpus_per_trial))
    return max(1, n)


def default_concurrency(spec: StudySpec, cluster: ClusterView) -> int:
    """Trials to run at once when ``--max-concurrent`` is not given.

    A fixed cluster: as many as fit. A cluster that can grow: enough pending trials for the
    autoscaler to add nodes, up to a quarter of the study's trials (at least 2), so that TPE
    still learns from finished trials for three quarters of the study; never fewer than fit now.
    """
    now = slots(spec, cluster)
    if not cluster.can_grow:
        return now
    return max(now, min(spec.n_trials, max(2, math.ceil(spec.n_trials / 4))))


def check_gpus(spec: StudySpec, cluster: ClusterView) -> None:
    """Refuse GPUs a cluster cannot give: it has fewer than a trial needs, and cannot grow."""
    if spec.gpus_per_trial > 0 and cluster.gpus < spec.gpus_per_trial and not cluster.can_grow:
        raise StudyError(
            f"--gpus-per-trial {spec.gpus_per_trial:g} asked for, but the Ray cluster has "
            f"{cluster.gpus:g} GPUs and no autoscaler: drop the flag or add GPU workers"
        )


def check_storage_visible(root: Location, cluster: ClusterView, *, shared: bool) -> None:
    """Refuse a local storage folder that the nodes running trials cannot see.

    Every trial node writes its checkpoints to the storage, and a retried trial may continue on
    another node. A bucket is seen by all. For a folder, the driver writes a marker and a small
    task on each alive node that can run trials looks for it. Where nodes will only appear later
    (an autoscaler), a folder is accepted only with ``shared`` (``--shared-storage``).
    """
    if root.visible_everywhere:
        return
    fix = "use --storage s3://bucket/prefix or gs://bucket/prefix, or a folder mounted on every node"
    blind = _nodes_not_seeing(root)
    if blind:
        node, total = blind[0], blind[1]
        raise StudyError(f"--storage {root.uri} is a local folder that {node} cannot see "
                         f"({total} of the cluster's trial nodes cannot): {fix}")
    if cluster.can_grow and not shared:
        raise StudyError(f"--storage {root.uri} is a local folder, and this cluster adds nodes as it needs them, "
                         f"which will not have it: {fix} and pass --shared-storage")


def _nodes_not_seeing(root: Location) -> tuple[str, int] | None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    workers = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here
               and (n["Resources"].get("CPU", 0) > 0 or n["Resources"].get("GPU", 0) > 0)]
    if not workers:
        return None
    token = uuid.uuid4().hex
    marker = os.path.join(root.nearest_existing_dir(), f".vae-study-probe-{token[:12]}")
    with open(marker, "w") as f:
        f.write(token)
    probe = ray.remote(num_cpus=0, max_retries=0)(_sees)
    try:
        refs = {n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(marker, token) for n in workers}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
        blind = [nid for nid, ref in refs.items() if ref not in ready or not _get(ref)]
    finally:
        os.unlink(marker)
    if not blind:
        return None
    ip = next((n["NodeManagerAddress"] for n in workers if n["NodeID"] == blind[0]), "?")
    return f"node {blind[0][:12]} ({ip})", len(blind)


def _sees(path: str, token: str) -> bool:
    try:
        with open(path) as f:
            return f.read() == token
    except OSError:
        return False


def _get(ref: Any) -> bool:
    import ray

    try:
        return bool(ray.get(ref, timeout=5))
    except Exception:  # noqa: BLE001 - a node that cannot answer cannot be trusted with the study
        return False


def free_resources() -> str:
    """What the cluster has free now, e.g. ``3 CPU, 0/1 GPU``."""
    import ray

    try:
        free, total = ray.available_resources(), ray.cluster_resources()
    except Exception:  # noqa: BLE001 - a progress line never stops a study
        return "unknown"
    text = f"{free.get('CPU', 0):g}/{total.get('CPU', 0):g} CPU"
    if total.get("GPU") or free.get("GPU"):
        text += f", {free.get('GPU', 0):g}/{total.get('GPU', 0):g} GPU"
    return text


def autoscaler_note() -> str:
    """What the autoscaler is doing about pending work: its pending and failed launches, with
    the cloud's reason (Ray's autoscaler v2, as `ray up` starts it); a hint otherwise."""
    import ray

    if not autoscaler_running():
        return "this cluster has no autoscaler: add nodes, or lower --cpus-per-trial/--gpus-per-trial"
    hint = "the autoscaler is asked for nodes (`ray status` on the head shows its launches and failures)"
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if not is_autoscaler_v2(fetch_from_server=True):
            return hint  # v1 keeps its launches to itself
        status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=5)
    except Exception:  # noqa: BLE001 - no answer: say where to look
        return hint
    return summarize_launches(status.pending_launches, status.failed_launches, status.pending_nodes)


def summarize_launches(pending: list, failed: list, starting: list) -> str:
    """``autoscaler: launching 2 gpu_spot; 1 starting; failed: gpu_spot x3 (UnauthorizedOperation: ...)``."""
    parts = []
    if pending:
        parts.append("launching " + ", ".join(f"{r.count} {r.ray_node_type_name}" for r in pending))
    if starting:
        parts.append(f"{len(starting)} node{'s' if len(starting) != 1 else ''} starting")
    if failed:
        last = max(failed, key=lambda r: r.failed_ts_s or 0)
        reason = " ".join(str(last.details or "no reason given").split())[:200]
        kinds = sorted({r.ray_node_type_name for r in failed})
        parts.append(f"failed launches: {sum(r.count for r in failed)} of {', '.join(kinds)}, the last: {reason}")
    if not parts:
        return "autoscaler: no launch under way (at its max_workers, or none of its node types fits a trial)"
    return "autoscaler: " + "; ".join(parts)
