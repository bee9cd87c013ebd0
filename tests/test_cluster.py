"""cluster.yaml, and real multi-node studies on a 2-node Ray cluster on 127.0.0.1."""
from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from study import results

CLUSTER_YAML = REPO / "cluster.yaml"


def test_cluster_yaml_validates_with_rays_own_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types and any("gpu" in t for t in types)
    # the setup installs this project, from the repository copied to every node
    assert any("pip install -e ~/vae-study" in c for c in config["setup_commands"])
    assert config["file_mounts"]["~/vae-study"] == "."
    # the bucket is named in one place, and reaches the jobs on the head as VAE_STUDY_STORAGE
    text = CLUSTER_YAML.read_text()
    assert text.count("s3://YOUR-BUCKET") == 1
    assert any("export VAE_STUDY_STORAGE=s3://YOUR-BUCKET/" in c and "ray start --head" in c
               for c in config["head_start_ray_commands"])
    # GPU workers reach it through an instance profile, never keys; they start at zero
    gpu = types["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["node_config"]["IamInstanceProfile"] == {"Name": "ray-autoscaler-v1"}
    # and a broken file is refused by the same validator, so this test can fail
    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["node_confg"] = {}
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


def test_cluster_yaml_has_comments_and_no_secrets():
    text = CLUSTER_YAML.read_text()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    keyed = [ln for ln in lines if ":" in ln and not ln.strip().startswith("-")]
    uncommented = [ln for ln in keyed if "#" not in ln and not ln.rstrip().endswith(":")]
    assert not uncommented, f"every key needs a short comment: {uncommented[:3]}"
    for secret in ("aws_access_key_id", "aws_secret_access_key", "AKIA", "password", "BEGIN RSA", "private_key"):
        assert secret.lower() not in text.lower()
    import re

    assert not re.search(r"\b\d{12}\b", text), "no AWS account ids"


@pytest.fixture
def two_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster, worker
    finally:
        cluster.shutdown()


def _run(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "study", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_a_fixed_cluster_without_gpus_refuses_them(two_nodes, tmp_path):
    """A cluster with no autoscaler cannot grow: asking for GPUs it lacks is refused, one line."""
    cluster, _ = two_nodes
    p = _run(["run", "--name", "g", "--storage", str(tmp_path / "s"), "--trials", "2", "--epochs", "1",
              "--address", cluster.address, "--gpus-per-trial", "0.5"])
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("vae-study:")]
    assert len(lines) == 1 and "0 GPUs and no autoscaler" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "s").exists()  # nothing written


@pytest.mark.slow
def test_study_runs_on_both_nodes(two_nodes, tmp_path):
    cluster, _ = two_nodes
    p = _run(["run", "--name", "multi", "--storage", str(tmp_path), "--trials", "4", "--epochs", "3",
              "--max-train-images", "400", "--address", cluster.address, "--no-early-stopping"])
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    df = results.search_trials(results.load(tmp_path / "multi"))
    assert len(df) == 4 and (df["status"] == "completed").all()
    assert df["node"].nunique() == 2  # Ray node ids: trials ran on the head and on the worker
    assert df["hostname"].nunique() == 1  # both "nodes" are this machine
    assert len(results.load(tmp_path / "multi", "epochs")) == 12


@pytest.mark.slow
def test_killed_worker_node_trial_is_retried_and_study_completes(two_nodes, tmp_path):
    cluster, worker = two_nodes
    worker_id = worker.node_id
    p = _run(["run", "--name", "ft", "--storage", str(tmp_path), "--trials", "4", "--epochs", "30",
              "--max-train-images", "800", "--address", cluster.address, "--no-early-stopping",
              "--max-failures", "2"])
    epochs_dir = tmp_path / "ft" / "epochs"
    deadline = time.time() + 300
    # wait until the trial on the worker node has reported a few epochs
    import pyarrow.parquet as pq

    def worker_trial_running() -> bool:
        for f in epochs_dir.glob("*.parquet") if epochs_dir.is_dir() else []:
            try:
                if pq.read_table(f).num_rows >= 3:
                    return True
            except Exception:
                pass
        return False

    while time.time() < deadline and not worker_trial_running():
        time.sleep(0.2)
    assert worker_trial_running(), "no trial got going"
    cluster.remove_node(worker)  # the worker machine dies, with its trial process
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    df = results.search_trials(results.load(tmp_path / "ft"))
    assert len(df) == 4 and df["trial_id"].is_unique
    assert (df["status"] == "completed").all() and (df["epochs_run"] == 30).all()
    retried = df[df["attempts"] > 1]
    assert len(retried) >= 1, df[["trial_id", "attempts", "node"]]
    # the retry finished on the surviving head node
    assert (retried["node"] != worker_id).all()
    ep = results.load(tmp_path / "ft", "epochs")
    assert (ep.groupby("trial_id")["epoch"].nunique() == 30).all()


@pytest.mark.slow
def test_fractional_gpus_pack_trials_on_one_gpu(tmp_path):
    """Placement only: the node declares 1 GPU (there is no CUDA here), trials ask for 0.5 each,
    so two share it at once; each then falls back to the CPU, and says so in its record."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1, "include_dashboard": False})
    try:
        p = _run(["run", "--name", "gpu", "--storage", str(tmp_path), "--trials", "4", "--epochs", "8",
                  "--max-train-images", "800", "--address", cluster.address, "--no-early-stopping",
                  "--gpus-per-trial", "0.5"])
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        assert "2 at a time" in out
    finally:
        cluster.shutdown()
    df = results.search_trials(results.load(tmp_path / "gpu")).sort_values("started_at")
    import torch

    # the declared GPU is real on a CUDA machine (Ray hands its id 0 to the trials), else the CPU
    expect = "cuda" if torch.cuda.is_available() else "cpu"
    assert len(df) == 4 and df["device"].str.startswith(expect).all() and (df["precision"] == "fp32").all()
    # two trials held the one GPU at the same time
    first, second = df.iloc[0], df.iloc[1]
    assert second["started_at"] < first["finished_at"]
