"""Ray clusters whose nodes do not share a disk, and autoscaling clusters, on one machine.

Run as PID 1 of private PID, network and mount namespaces (see ``in_namespace`` in
``test_nodes.py``)::

    unshare -p -f -n -m --mount-proc python tests/nodes.py SCENARIO OUT.json

so that ``ray stop`` sees only these processes, every node binds to this namespace's loopback
(the only interface there), and nothing outlives the run: when PID 1 exits, the kernel ends the
rest. PID 1 reaps orphans (Ray's daemons) and runs the scenario in a child; the scenario writes
what it saw to OUT.json, which the tests check.

Scenarios:
    storage    a head with no CPUs, and a worker node in its own mount namespace with an empty
               tmpfs over the local storage folder; an S3 endpoint (moto) beside them
    autoscale  Ray's fake multi-node autoscaler: a head with no GPU, GPU workers at min_workers 0
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
PORT = 6379
STUDY_ARGS = ["--trials", "2", "--epochs", "2", "--max-train-images", "300", "--no-early-stopping"]


def sh(cmd: list[str], timeout: float = 600, **kw: Any) -> dict[str, Any]:
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, **kw)
    return {"rc": p.returncode, "stdout": p.stdout[-6000:], "stderr": p.stderr[-6000:], "seconds": time.time() - t0}


def cli(*args: str, timeout: float = 600) -> dict[str, Any]:
    return sh([sys.executable, "-m", "study", *args], timeout=timeout)


def ray_nodes() -> list[dict[str, Any]]:
    code = ("import json, ray; ray.init(address='auto', log_to_driver=False); "
            "print(json.dumps([{'id': n['NodeID'], 'alive': n['Alive'], 'ip': n['NodeManagerAddress'], "
            "'resources': n['Resources']} for n in ray.nodes()]))")
    out = sh([sys.executable, "-c", code], timeout=120)
    return json.loads(out["stdout"].strip().splitlines()[-1]) if out["rc"] == 0 else [{"error": out["stderr"]}]


def wait_nodes(n: int, timeout: float = 120) -> list[dict[str, Any]]:
    deadline = time.time() + timeout
    nodes: list[dict[str, Any]] = []
    while time.time() < deadline:
        nodes = [x for x in ray_nodes() if x.get("alive")]
        if len(nodes) >= n:
            break
        time.sleep(1)
    return nodes


def setup(work: Path) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # A home of its own: Ray makes its auth token there (~/.ray/auth_token) as on a fresh machine,
    # and nothing is left in the real one. The digits' cache stays where it is.
    from vae.data import cache_dir

    os.environ["VAE_STUDY_CACHE"] = str(cache_dir())
    os.environ["HOME"] = str(work / "home")
    (work / "home").mkdir(exist_ok=True)
    # Ray's session files stay private to this namespace.
    os.makedirs("/tmp/ray", exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/tmp/ray"], check=True)
    os.environ["PATH"] = f"{BIN}:{os.environ['PATH']}"
    # Multi-node `ray start` needs this; inside a namespace whose only interface is lo, the
    # nodes bind to 127.0.0.1.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    # Ray 2.60 heads started by `ray start` turn token authentication on; every node and driver
    # then needs it too. On a fresh machine there is no token yet: make one, in the home above,
    # which all the nodes and drivers here share.
    os.environ["RAY_AUTH_MODE"] = "token"
    subprocess.run(["ray", "get-auth-token", "--generate"], check=True, capture_output=True)


def bucket_trials(uri: str) -> list[dict[str, Any]]:
    from study import results

    df = results.load(uri)
    return [{k: (None if v != v else v) for k, v in r.items()}
            for r in df[["trial_id", "status", "node", "device", "error", "epochs_run"]].to_dict("records")]


def report(uri: str) -> dict[str, Any]:
    out = cli("report", uri, "--tsne-points", "200", "--gap-images", "50", "--decoder-steps", "5")
    from study.store.location import Location

    out["files"] = Location(uri).files("report")
    return out


def scenario_storage(out: dict[str, Any], work: Path) -> None:
    from s3 import s3_server

    store = work / "store"
    store.mkdir()
    with s3_server():
        out["head"] = sh(["ray", "start", "--head", f"--port={PORT}", "--num-cpus=0", "--include-dashboard=false",
                          "--disable-usage-stats"])
        # The worker node: its own mount namespace, with an empty tmpfs where the driver's
        # storage folder is, as on a real cluster where that folder is on the head's disk only.
        out["worker"] = sh(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            f"mount -t tmpfs tmpfs {store} && exec ray start --address=127.0.0.1:{PORT} "
                            "--num-cpus=2 --disable-usage-stats"])
        out["nodes"] = wait_nodes(2)
        address = f"127.0.0.1:{PORT}"
        out["local"] = cli("run", "--name", "local", "--storage", str(store), "--address", address, *STUDY_ARGS)
        out["local_left"] = sorted(p.name for p in store.iterdir())
        uri = "s3://studies/nodes"
        out["remote"] = cli("run", "--name", "remote", "--storage", uri, "--address", address, *STUDY_ARGS)
        if out["remote"]["rc"] == 0:
            out["remote_trials"] = bucket_trials(f"{uri}/remote")
            out["report"] = report(f"{uri}/remote")
        sh(["ray", "stop", "--force"])


def scenario_autoscale(out: dict[str, Any], work: Path) -> None:
    from ray.cluster_utils import AutoscalingCluster

    from s3 import s3_server

    workers = {"gpu_worker": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0,
                              "max_workers": 2}}
    cluster = AutoscalingCluster(head_resources={"CPU": 1}, worker_node_types=workers)
    with s3_server():
        cluster.start()
        try:
            out["nodes_before"] = wait_nodes(1)
            uri = "s3://studies/auto"
            out["refused_local"] = cli("run", "--name", "l", "--storage", str(work / "store"), "--address", "auto",
                                       "--gpus-per-trial", "0.5", *STUDY_ARGS)
            out["run"] = cli("run", "--name", "a", "--storage", uri, "--address", "auto", "--gpus-per-trial", "0.5",
                             *STUDY_ARGS)
            out["nodes_after"] = ray_nodes()
            if out["run"]["rc"] == 0:
                out["trials"] = bucket_trials(f"{uri}/a")
        finally:
            cluster.shutdown()


def _base_config(self: Any, head: dict, workers: dict, autoscaler_v2: bool = False, **kw: Any) -> dict:
    """AutoscalingCluster's config, given in code: the Ray 2.60 wheel lacks fake_multi_node/example.yaml."""
    return {
        "cluster_name": "fake-multinode", "max_workers": 8, "upscaling_speed": 1.0, "idle_timeout_minutes": 1,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"}, "docker": {},
        "available_node_types": {**workers, "ray.head.default": {"resources": head, "node_config": {}, "max_workers": 0}},
        "head_node_type": "ray.head.default", "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], **kw,
    }


def reap_as_pid1(argv: list[str]) -> int | None:
    """As PID 1 of a namespace: run ``argv`` in a child, reap every orphan (Ray's daemons), and
    return the child's exit code. Anywhere else: None."""
    if os.getpid() != 1:
        return None
    child = os.fork()
    if child == 0:
        os.execv(argv[0], argv)
    while True:
        pid, status = os.wait()
        if pid == child:
            return os.waitstatus_to_exitcode(status)


def main() -> int:
    scenario, out_path = sys.argv[1], Path(sys.argv[2])
    code = reap_as_pid1([sys.executable, *sys.argv])
    if code is not None:
        return code
    sys.path[:0] = [str(REPO), str(HERE)]
    from ray.cluster_utils import AutoscalingCluster

    AutoscalingCluster._generate_config = _base_config  # type: ignore[method-assign]
    setup(out_path.parent)
    out: dict[str, Any] = {"scenario": scenario}
    try:
        {"storage": scenario_storage, "autoscale": scenario_autoscale}[scenario](out, out_path.parent)
    finally:
        out_path.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
