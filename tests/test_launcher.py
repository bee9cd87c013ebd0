"""The cluster path a user takes, run with Ray's own launcher: `ray up`, `ray dashboard`,
`ray job submit`, `ray job logs`, `vae-study results` and `report` from the laptop, a worker
machine lost in the middle of a study, and `ray down`.

The machines are sshd's in their own PID, mount and network namespaces on a private bridge,
each with its own disk; `tests/launcher.py` builds them and runs the scenario once (about six
minutes here), and the tests below read what it saw. The config is made from the repository's
cluster.yaml by `vae-study cluster local`, so every machine runs the commands AWS nodes run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, require

LAUNCHER = REPO / "tests" / "launcher.py"


def _can_build_machines() -> str | None:
    """What is missing to build the machines, or None."""
    for tool in ("unshare", "ip", "ssh", "ssh-keygen", "rsync"):
        if not shutil.which(tool):
            return tool
    if not Path("/usr/sbin/sshd").is_file():
        return "sshd (openssh-server)"
    if not shutil.which("python3.11", path="/usr/bin"):
        return "/usr/bin/python3.11 (the machines' system Python)"
    probe = subprocess.run(["unshare", "-p", "-f", "-n", "-m", "--mount-proc", "true"], capture_output=True)
    return None if probe.returncode == 0 else "root, for private PID/network/mount namespaces"


def _wheelhouse() -> Path:
    """Build tools for the machines' offline pip (their image has everything else), kept per user."""
    from vae.data import cache_dir

    house = cache_dir() / "wheelhouse"
    if not any(house.glob("setuptools-*.whl")):
        house.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(house), "setuptools>=68", "wheel"],
                       capture_output=True, timeout=300)
    return house


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict:
    missing = _can_build_machines()
    require(missing is None, f"{missing} (.ci/run installs openssh-server and rsync)")
    house = _wheelhouse()
    require(any(house.glob("setuptools-*.whl")), f"a setuptools wheel in {house} (pip download needs an index)")
    work = tmp_path_factory.mktemp("launcher")
    shutil.copytree(house, work / "wheelhouse")
    p = subprocess.run(["unshare", "-p", "-f", "-n", "-m", "--mount-proc", sys.executable, str(LAUNCHER), str(work)],
                       capture_output=True, text=True, timeout=2400, cwd=REPO,
                       env={k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"})
    out = work / "out.json"
    assert out.is_file(), (p.stdout[-3000:], p.stderr[-3000:])
    seen = json.loads(out.read_text())
    assert "crashed" not in seen, (seen["crashed"], p.stderr[-3000:])
    return seen


def _ok(step: dict) -> bool:
    return step.get("rc") == 0


def _trials(seen: dict) -> list[dict]:
    assert _ok(seen["results"]), seen["results"]
    return json.loads(seen["results"]["stdout"])


@pytest.mark.slow
def test_ray_up_starts_a_head_and_a_worker(launched):
    assert all(launched["machines_up"].values()), {k: v for k, v in launched.items() if k.startswith("sshd_log")}
    assert _ok(launched["config"]), launched["config"]
    assert _ok(launched["up"]), (launched["up"]["stdout"][-3000:], launched["up"]["stderr"][-3000:])
    nodes = launched["nodes"]
    head = [n for n in nodes if n["is_head_node"]]
    workers = [n for n in nodes if not n["is_head_node"]]
    assert [n["node_ip"] for n in head] == ["10.77.0.2"] and [n["node_ip"] for n in workers] == ["10.77.0.3"]
    # the head takes no trial: it advertises no CPU; the worker, which the head's autoscaler set up, does
    assert "CPU" not in head[0]["resources_total"] and workers[0]["resources_total"]["CPU"] >= 1
    # every shell on the head finds the environment and the bucket (ray attach, ray exec, jobs)
    env = launched["attach_env"]
    assert _ok(env) and "storage=s3://studies/launched" in env["stdout"]
    assert "/run/node-home/vae-study-env/bin/vae-study" in env["stdout"]


@pytest.mark.slow
def test_a_submitted_study_runs_its_trials_on_the_worker(launched):
    assert _ok(launched["submit"]) and launched["job"].startswith("raysubmit_"), launched["submit"]
    assert launched["status"] == "SUCCEEDED", launched["logs"]["stdout"][-3000:]
    trials = _trials(launched)
    assert len(trials) == 4 and len({t["trial_id"] for t in trials}) == 4  # none duplicated
    assert all(t["status"] in ("completed", "pruned") for t in trials), trials
    nodes = {n["node_id"]: n for n in launched["nodes_after"]}
    assert all(t["node"] in nodes and not nodes[t["node"]]["is_head_node"] for t in trials), (trials, nodes)
    assert all(nodes[t["node"]]["node_ip"] == "10.77.0.3" for t in trials)


@pytest.mark.slow
def test_ray_job_logs_show_the_study(launched):
    logs = launched["logs"]
    assert _ok(logs), logs
    text = logs["stdout"]
    assert "study 'launch': 4 trials" in text and "results in s3://studies/launched/launch" in text
    assert text.count("  start    ") >= 4 and "[4/4]" in text and "study 'launch' finished" in text


@pytest.mark.slow
def test_results_and_report_from_the_laptop_read_the_bucket(launched):
    assert len(_trials(launched)) == 4
    report = launched["report"]
    assert _ok(report), report["stderr"][-3000:]
    assert {"index.html", "summary.json", "tsne.png", "recon_panel.png"} <= set(launched["report_files"])
    assert launched["secret_in_bucket"] == []  # the machines' keys never reach the study's files


@pytest.mark.slow
def test_a_lost_worker_machine_costs_its_trials_a_retry_and_nothing_else(launched):
    """Every process of the worker machine dies at once mid-study. Its trials are retried from
    their checkpoints in the bucket; while no machine can take them, the study says so; when the
    machine is back, the head's autoscaler restarts Ray there and the study finishes on it."""
    assert launched["checkpointed"] is not None and launched["gone"] is not None
    assert launched["rejoined"] is not None, "the worker did not rejoin"
    trials = _trials(launched)
    retried = [t for t in trials if t["attempts"] > 1]
    assert retried, trials
    # continued, not started over: a trial whose checkpoint the driver had taken when the machine
    # went continues from it or a newer one (held: the epoch of the newest taken, per trial)
    held = launched["checkpoints_at_kill"]
    assert any(held.get(t["trial_id"], 0) for t in retried), (retried, held)
    for t in retried:
        if held.get(t["trial_id"], 0):
            assert t["restored_from_epoch"] >= held[t["trial_id"]], (t, held)
    logs = launched["logs"]["stdout"]
    assert "  retry    " in logs
    assert "  waiting  " in logs and "since" in logs  # not a silent wait
    # later trials ran on the machine that came back: a new Ray node at the same address
    before = {n["node_id"] for n in launched["nodes"] if not n["is_head_node"]}
    after = {n["node_id"] for n in launched["nodes_after"] if n["state"] == "ALIVE" and not n["is_head_node"]}
    assert after and not after & before
    assert any(t["node"] in after for t in trials), trials


@pytest.mark.slow
def test_ray_down_leaves_no_ray_process_on_any_machine(launched):
    """`ray down` stops Ray on the head at once. A worker's raylet leaves once its head is gone;
    Ray's log monitor stays until `ray stop` on that machine (Ray 2.60's local provider logs
    into no worker on `ray down`), which the README tells on-premises users to run."""
    assert _ok(launched["down"]), launched["down"]
    assert launched["left_after_down"]["head"] == []
    assert launched["raylets_gone"] is not None, launched["left_by_ray_down"]
    assert _ok(launched["worker_stop"]), launched["worker_stop"]
    assert launched["stopped"] is not None and launched["left"] == {"head": [], "worker": []}, launched["left"]
