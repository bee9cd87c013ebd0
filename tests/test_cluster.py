"""cluster.yaml, and real multi-node studies on a 2-node Ray cluster on 127.0.0.1."""
from __future__ import annotations

import os
import copy
import json
import subprocess
import sys
import time
from typing import Any

import pytest
import yaml

from conftest import REPO
from study import results
from study.cluster import launch

CLUSTER_YAML = REPO / "cluster.yaml"


def test_cluster_yaml_validates_with_rays_own_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    # no trial ever runs on the head: no CPUs in the autoscaler's view, none in Ray's
    assert head["resources"] == {"CPU": 0}
    assert any("ray start --head" in c and "--num-cpus=0" in c for c in config["head_start_ray_commands"])
    # spot first, on-demand as the fallback: the same machine, priorities in that order
    spot, ondemand = types["gpu_spot"], types["gpu_ondemand"]
    assert spot["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    assert "InstanceMarketOptions" not in ondemand["node_config"]
    assert spot["priority"] > ondemand["priority"] and spot["min_workers"] == ondemand["min_workers"] == 0
    assert spot["node_config"]["InstanceType"] == ondemand["node_config"]["InstanceType"]
    # every node type names an image, never Ray's latest_dlami (an Ubuntu 18.04 image)
    for name, t in types.items():
        ami = t["node_config"].get("ImageId", "")
        assert ami and ami.lower() != "latest_dlami" and (ami.startswith("ami-") or ami.startswith("resolve:ssm:")), name
    # workers run under the worker profile, the head under its own
    assert {t["node_config"]["IamInstanceProfile"]["Name"] for n, t in types.items() if t is not head} == {"vae-study-worker"}
    assert head["node_config"]["IamInstanceProfile"] == {"Name": "vae-study-head"}
    # the setup installs this project with the cluster extra (Ray's full install), from the copied repository
    assert any('pip install -q -e "$HOME/vae-study[cluster]"' in c for c in config["setup_commands"])
    assert config["file_mounts"]["~/vae-study"] == "."
    # the bucket is named in one place, and reaches every shell on every node
    text = CLUSTER_YAML.read_text()
    assert text.count("s3://YOUR-BUCKET") == 1
    assert launch.storage_of(config) == "s3://YOUR-BUCKET/studies"
    # and a broken file is refused by the same validator, so this test can fail
    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["node_confg"] = {}
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


def test_the_cluster_extra_pins_the_ray_this_machine_runs():
    """The laptop and the nodes install the same extra, so they run the same Ray."""
    import ray
    import tomllib

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["cluster"]
    pins = [r for r in extra if r.startswith("ray[")]
    assert len(pins) == 1 and "default" in pins[0] and pins[0].endswith(f"=={ray.__version__}")


def test_cluster_yaml_has_comments_and_no_secrets():
    text = CLUSTER_YAML.read_text()
    lines = text.splitlines()
    for i, ln in enumerate(lines):
        s = ln.strip()
        if not s or s.startswith(("#", "-")) or ":" not in s or s.endswith(":"):
            continue
        above = lines[i - 1].strip() if i else ""
        assert "#" in ln or above.startswith("#"), f"every key needs a short comment: {ln!r}"
    for secret in ("aws_access_key_id", "aws_secret_access_key", "AKIA", "password", "BEGIN RSA", "private_key"):
        assert secret.lower() not in text.lower()
    import re

    assert not re.search(r"\b\d{12}\b", text), "no AWS account ids"


def test_the_local_config_runs_the_same_commands_and_validates(tmp_path):
    """`vae-study cluster local` derives the on-premises file; Ray's validator accepts it, and it
    runs cluster.yaml's commands word for word. Mistakes get one line and exit 2."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    from conftest import run_cli

    out = tmp_path / "local.yaml"
    p = run_cli("cluster", "local", "--head-ip", "10.0.0.10", "--worker-ips", "10.0.0.11,10.0.0.12",
                "--ssh-user", "ubuntu", "--ssh-key", "~/.ssh/id_ed25519", "--out", str(out))
    assert p.returncode == 0, p.stderr
    local, aws = yaml.safe_load(out.read_text()), yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(prepare_config(copy.deepcopy(local)))
    assert local["provider"] == {"type": "local", "head_ip": "10.0.0.10", "worker_ips": ["10.0.0.11", "10.0.0.12"]}
    assert "available_node_types" not in local
    for key in ("file_mounts", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands", "rsync_filter", "rsync_exclude"):
        assert local[key] == aws[key], key
    # cluster.yaml's on-premises twin must not carry node types: Ray refuses them there
    import click

    with pytest.raises(click.ClickException, match="available_node_types is not supported"):
        validate_config(prepare_config({**copy.deepcopy(local), "available_node_types": aws["available_node_types"]}))
    bad = run_cli("cluster", "local", "--head-ip", "10.0.0.10", "--worker-ips", "10.0.0.10", "--ssh-user", "u",
                  "--ssh-key", "k", "--out", str(tmp_path / "bad.yaml"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "both the head and a worker" in bad.stderr
    assert not (tmp_path / "bad.yaml").exists()
    missing = run_cli("cluster", "local", "--config", str(tmp_path / "nope.yaml"), "--head-ip", "a", "--worker-ips",
                      "b", "--ssh-user", "u", "--ssh-key", "k")
    assert missing.returncode == 2 and "no cluster config" in missing.stderr and "Traceback" not in missing.stderr


@pytest.fixture
def aws(monkeypatch, tmp_path):
    """moto's AWS (EC2, IAM, STS, S3) behind one endpoint, for this process and the CLI it starts.
    moto loads AWS's managed policies, so AmazonEC2FullAccess can be attached and read back."""
    monkeypatch.setenv("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")
    monkeypatch.setenv("HOME", str(tmp_path))  # Ray writes the cluster's key pair under ~/.ssh
    from moto.core.base_backend import BackendDict

    from s3 import s3_server

    BackendDict.reset()  # moto's state is per process: an IAM made by an earlier test lacks the managed policies

    from ray.autoscaler._private.aws import utils

    utils.resource_cache.cache_clear()
    utils.client_cache.cache_clear()
    with s3_server() as env:
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
        yield {**env, "AWS_DEFAULT_REGION": "us-west-2", "HOME": str(tmp_path)}
    utils.resource_cache.cache_clear()
    utils.client_cache.cache_clear()


def _statements(doc: Any) -> list[dict]:
    doc = json.loads(doc) if isinstance(doc, str) else doc
    st = doc["Statement"]
    return st if isinstance(st, list) else [st]


def _listify(x: Any) -> list:
    return x if isinstance(x, list) else [x]


def test_aws_setup_then_rays_own_bootstrap(aws, tmp_path, monkeypatch):
    """The one-time set-up (the real CLI) and Ray's own `bootstrap_aws` on the shipped cluster.yaml,
    against moto. moto does not enforce IAM, so what AWS would enforce is checked here: the head
    may pass exactly the worker role, the worker role reaches exactly the bucket."""
    import boto3
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.util import prepare_config

    from conftest import run_cli

    config = launch.with_storage(launch.read_config(CLUSTER_YAML), "s3://vae-bucket/studies")
    edited = tmp_path / "cluster.yaml"
    edited.write_text(yaml.safe_dump(config))
    placeholder = run_cli("cluster", "aws-setup", env=aws)  # the shipped file still names YOUR-BUCKET
    assert placeholder.returncode == 2 and "name your bucket first" in placeholder.stderr
    p = run_cli("cluster", "aws-setup", "--config", str(edited), env=aws)
    assert p.returncode == 0, p.stderr
    assert "iam:PassRole on the worker role" in p.stdout and "GPU quota" in p.stdout
    again = run_cli("cluster", "aws-setup", "--config", str(edited), env=aws)  # idempotent
    assert again.returncode == 0, again.stderr

    iam = boto3.client("iam")
    account = boto3.client("sts").get_caller_identity()["Account"]
    worker_arn = f"arn:aws:iam::{account}:role/vae-study-worker"
    # the worker role: the bucket and nothing else, no managed policy
    assert iam.list_attached_role_policies(RoleName="vae-study-worker")["AttachedPolicies"] == []
    for name in iam.list_role_policies(RoleName="vae-study-worker")["PolicyNames"]:
        for st in _statements(iam.get_role_policy(RoleName="vae-study-worker", PolicyName=name)["PolicyDocument"]):
            assert all(a.startswith("s3:") for a in _listify(st["Action"])), st
            assert set(_listify(st["Resource"])) <= {"arn:aws:s3:::vae-bucket", "arn:aws:s3:::vae-bucket/*"}, st
    # the head role: EC2 (as Ray's own), and iam:PassRole on exactly the worker role, for EC2 only
    attached = {a["PolicyArn"] for a in iam.list_attached_role_policies(RoleName="vae-study-head")["AttachedPolicies"]}
    assert attached == {"arn:aws:iam::aws:policy/AmazonEC2FullAccess"}
    passes = []
    for name in iam.list_role_policies(RoleName="vae-study-head")["PolicyNames"]:
        doc = iam.get_role_policy(RoleName="vae-study-head", PolicyName=name)["PolicyDocument"]
        passes += [st for st in _statements(doc) if "iam:PassRole" in _listify(st["Action"])]
    for arn in attached:  # the managed policy must not grant PassRole itself (AWS's does not)
        version = iam.get_policy(PolicyArn=arn)["Policy"]["DefaultVersionId"]
        doc = iam.get_policy_version(PolicyArn=arn, VersionId=version)["PolicyVersion"]["Document"]
        assert not any("iam:PassRole" in _listify(st.get("Action", [])) for st in _statements(doc))
    assert len(passes) == 1 and _listify(passes[0]["Resource"]) == [worker_arn]
    assert passes[0]["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
    for profile in ("vae-study-head", "vae-study-worker"):
        roles = iam.get_instance_profile(InstanceProfileName=profile)["InstanceProfile"]["Roles"]
        assert [r["RoleName"] for r in roles] == [profile]

    # Ray's own bootstrap: it keeps our profiles (it makes ray-autoscaler-v1 only for a head without one)
    monkeypatch.setattr(aws_config.time, "sleep", lambda s: None)
    prepared = aws_config.bootstrap_aws(prepare_config(copy.deepcopy(config)))
    types = prepared["available_node_types"]
    assert types["head"]["node_config"]["IamInstanceProfile"] == {"Name": "vae-study-head"}
    assert "ray-autoscaler-v1" not in {r["RoleName"] for r in iam.list_roles()["Roles"]}
    for name, t in types.items():  # Ray did not swap in its Ubuntu 18.04 default
        assert t["node_config"]["ImageId"] == config["available_node_types"][name]["node_config"]["ImageId"]
    # the resources Ray fills in for the autoscaler: what the README promises per GPU worker
    filled = AWSNodeProvider.fillout_available_node_types_resources(prepared)["available_node_types"]
    for name in ("gpu_spot", "gpu_ondemand"):
        assert filled[name]["resources"]["GPU"] == 1 and filled[name]["resources"]["CPU"] == 4, filled[name]
    assert filled["head"]["resources"]["CPU"] == 0 and not filled["head"]["resources"].get("GPU")
    # a worker launched as the autoscaler would: spot, under the worker profile
    provider = AWSNodeProvider(prepared["provider"], prepared["cluster_name"])
    provider.create_node(types["gpu_spot"]["node_config"], {"ray-node-type": "worker"}, 1)
    [inst] = [i for r in boto3.client("ec2").describe_instances()["Reservations"] for i in r["Instances"]
              if i["State"]["Name"] != "terminated"]
    assert inst["InstanceType"] == "g5.xlarge" and inst.get("InstanceLifecycle") == "spot"
    assert inst["IamInstanceProfile"]["Arn"].endswith(":instance-profile/vae-study-worker")

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
@pytest.mark.parametrize("packed", [False, True])
def test_study_runs_on_both_nodes(two_nodes, tmp_path, packed):
    """Trials run on the head and on the worker; packed, each node's trials train in that node's
    own pack (placed there, beside them)."""
    cluster, _ = two_nodes
    p = _run(["run", "--name", "multi", "--storage", str(tmp_path), "--trials", "4", "--epochs", "3",
              "--max-train-images", "400", "--address", cluster.address, "--no-early-stopping",
              *(["--pack", "2"] if packed else ["--no-pack"])])
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    df = results.search_trials(results.load(tmp_path / "multi"))
    assert len(df) == 4 and (df["status"] == "completed").all()
    assert df["node"].nunique() == 2  # Ray node ids: trials ran on the head and on the worker
    assert df["hostname"].nunique() == 1  # both "nodes" are this machine
    assert len(results.load(tmp_path / "multi", "epochs")) == 12
    if packed:  # a pack's name holds its node: vae-pack:<study>:<node id[:12]>:<device>:...
        assert df["pack"].str.split(":").str[2].tolist() == df["node"].str[:12].tolist()
        assert df["pack"].nunique() == 2
    else:
        assert df["pack"].isna().all()


@pytest.mark.slow
def test_killed_worker_node_trial_is_retried_and_study_completes(two_nodes, tmp_path):
    cluster, worker = two_nodes
    worker_id = worker.node_id
    # trials report every epoch here, so rows appear while the worker's trial is young
    p = _run(["run", "--name", "ft", "--storage", str(tmp_path), "--trials", "4", "--epochs", "30",
              "--max-train-images", "800", "--address", cluster.address, "--no-early-stopping",
              "--max-failures", "2"], env={**os.environ, "VAE_STUDY_REPORT_EVERY_S": "0"})
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
    so two share it at once, and train as one pack of two there (the default for trials sharing
    a GPU); the pack falls back to the CPU, and each trial says so in its record."""
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
    assert df["pack"].str.startswith("vae-pack:gpu:").all() and df["pack"].str.contains(":gpu0:").all()
    # two trials held the one GPU at the same time
    first, second = df.iloc[0], df.iloc[1]
    assert second["started_at"] < first["finished_at"]


def test_the_waiting_line_carries_the_autoscalers_launches_and_failures():
    """What a study prints while trials wait for nodes, from Ray's own autoscaler-v2 records."""
    from ray.autoscaler.v2.schema import LaunchRequest

    from study.cluster.connect import summarize_launches

    def req(kind: str, n: int, state: str, failed: int | None = None, details: str | None = None) -> LaunchRequest:
        return LaunchRequest(instance_type_name="g5.xlarge", ray_node_type_name=kind, count=n,
                             state=LaunchRequest.Status[state], request_ts_s=100, failed_ts_s=failed, details=details)

    pending = [req("gpu_spot", 2, "PENDING")]
    failed = [req("gpu_spot", 1, "FAILED", 110, "MaxSpotInstanceCountExceeded"),
              req("gpu_spot", 2, "FAILED", 120, "UnauthorizedOperation: You are not authorized\n to perform iam:PassRole")]
    line = summarize_launches(pending, failed, [object()])
    assert line.startswith("autoscaler: launching 2 gpu_spot; 1 node starting; failed launches: 3 of gpu_spot")
    assert line.endswith("the last: UnauthorizedOperation: You are not authorized to perform iam:PassRole")
    assert "no launch under way" in summarize_launches([], [], [])
