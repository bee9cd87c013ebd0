"""Clusters as they are off a laptop: nodes that do not share a disk, and nodes an autoscaler adds.

Each test runs ``tests/nodes.py`` as PID 1 of private PID, network and mount namespaces
(``unshare -p -f -n -m --mount-proc``): ``ray stop`` there sees only that cluster's processes,
and all its traffic stays on the namespace's own loopback.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, require

NODES = REPO / "tests" / "nodes.py"


def _can_unshare() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    probe = subprocess.run(["unshare", "-p", "-f", "-n", "-m", "--mount-proc", "true"], capture_output=True)
    return probe.returncode == 0


def in_namespace(scenario: str, tmp_path, timeout: float = 900) -> dict:
    require(_can_unshare(), "unshare (util-linux), ip (iproute2) and root, for private PID/network/mount namespaces")
    out = tmp_path / "out.json"
    p = subprocess.run(["unshare", "-p", "-f", "-n", "-m", "--mount-proc", sys.executable, str(NODES), scenario,
                        str(out)], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert p.returncode == 0 and out.is_file(), (p.stdout[-3000:], p.stderr[-3000:])
    return json.loads(out.read_text())


def _our_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("vae-study:")]


@pytest.mark.slow
def test_nodes_without_a_shared_disk(tmp_path):
    out = in_namespace("storage", tmp_path)
    assert out["head"]["rc"] == 0 and out["worker"]["rc"] == 0, (out["head"], out["worker"])
    nodes = out["nodes"]
    assert len(nodes) == 2 and {n["ip"] for n in nodes} == {"127.0.0.1"}
    worker = next(n["id"] for n in nodes if n["resources"].get("CPU", 0) > 0)

    # a local folder the worker cannot see: refused up front, one line, nothing written
    local = out["local"]
    assert local["rc"] == 2, local
    lines = _our_lines(local["stderr"])
    assert len(lines) == 1 and "Traceback" not in local["stderr"], local["stderr"]
    assert "cannot see" in lines[0] and "s3://" in lines[0] and worker[:12] in lines[0]
    assert out["local_left"] == []

    # a bucket: every trial completes on the worker node, and the report builds from the bucket
    remote = out["remote"]
    assert remote["rc"] == 0, remote["stderr"]
    rows = out["remote_trials"]
    trials = [t for t in rows if t["status"] != "refit"]
    assert len(trials) == 2 and all(t["status"] == "completed" and t["epochs_run"] == 2 for t in trials)
    # the winner's refit, a Ray task with a trial's resources, ran on the worker too (the head has no CPUs)
    refits = [t for t in rows if t["status"] == "refit"]
    assert {t["node"] for t in trials + refits} == {worker} and len(refits) == 1 and refits[0]["error"] is None
    assert out["report"]["rc"] == 0, out["report"]["stderr"]
    assert {"index.html", "summary.json", "tsne.png", "recon_panel.png"} <= set(out["report"]["files"])


@pytest.mark.slow
def test_autoscaling_gpu_workers_from_zero(tmp_path):
    """Ray's fake multi-node autoscaler: a head with no GPU, GPU workers at min_workers 0. Asking
    for GPUs is not refused; pending trials make the autoscaler add nodes, and the trials run
    there (on the CPU: the GPUs are declared, not real)."""
    out = in_namespace("autoscale", tmp_path)
    before = out["nodes_before"]
    assert len(before) == 1 and not before[0]["resources"].get("GPU")
    head = before[0]["id"]

    refused = out["refused_local"]  # a local folder where nodes come and go: refused up front
    assert refused["rc"] == 2 and len(_our_lines(refused["stderr"])) == 1, refused
    assert "adds nodes as it needs them" in refused["stderr"] and "--shared-storage" in refused["stderr"]

    run = out["run"]
    assert run["rc"] == 0, run["stderr"]
    assert "more as the cluster grows" in run["stdout"]
    added = {n["id"] for n in out["nodes_after"] if n.get("alive") and n["resources"].get("GPU")}
    assert added and head not in added  # the autoscaler added GPU worker nodes
    rows = out["trials"]
    trials = [t for t in rows if t["status"] != "refit"]
    assert len(trials) == 2 and all(t["status"] == "completed" for t in trials)
    assert {t["node"] for t in rows} <= added and all(t["device"] == "cpu" for t in rows)  # the refit's too
