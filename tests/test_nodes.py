"""Clusters as they are off a laptop: nodes that do not share a disk, and nodes an autoscaler adds.

Each test runs ``tests/nodes.py`` as PID 1 of private PID, network and mount namespaces
(``unshare -p -f -n -m --mount-proc``): ``ray stop`` there sees only that cluster's processes,
and all its traffic stays on the namespace's own loopback.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

NODES = REPO / "tests" / "nodes.py"


def _can_unshare() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    probe = subprocess.run(["unshare", "-p", "-f", "-n", "-m", "--mount-proc", "true"], capture_output=True)
    return probe.returncode == 0


def in_namespace(scenario: str, tmp_path, timeout: float = 900) -> dict:
    if not _can_unshare():
        if os.environ.get("CI") == "true":
            pytest.fail("CI needs unshare (util-linux), ip (iproute2) and root to build private namespaces")
        pytest.skip("needs unshare, ip and root for private PID/network/mount namespaces")
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
    trials = out["remote_trials"]
    assert len(trials) == 2 and all(t["status"] == "completed" and t["epochs_run"] == 2 for t in trials)
    assert {t["node"] for t in trials} == {worker}
    assert out["report"]["rc"] == 0, out["report"]["stderr"]
    assert {"index.html", "summary.json", "tsne.png", "recon_panel.png"} <= set(out["report"]["files"])
