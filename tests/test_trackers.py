"""Experiment trackers through Ray Tune's own callbacks: MLflow on a local SQLite tracking store,
read back with MLflow's client, and W&B in offline mode, read back from its run files."""
from __future__ import annotations

import json
import os

import pytest

from conftest import run_cli
from study import results


def test_a_tracker_that_is_not_set_up_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    for tracker, needs in (("mlflow", "MLFLOW_TRACKING_URI"), ("wandb", "WANDB_API_KEY")):
        p = run_cli("run", "--name", "t", "--storage", str(tmp_path), "--smoke", "--log-to", tracker)
        assert p.returncode == 2, p.stderr
        assert needs in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert "Traceback" not in p.stderr
    assert not (tmp_path / "t").exists()
    p = run_cli("run", "--name", "t", "--storage", str(tmp_path), "--smoke", "--log-to", "neptune")
    assert p.returncode == 2 and "neptune" in p.stderr


def _wandb_records(path) -> list[bytes]:
    """The records of a .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB's
    log format: 32 KiB blocks of records, each with a CRC (4 bytes), a length (2) and a type (1:
    whole, 2/3/4: first/middle/last piece). W&B 0.31 no longer ships a Python reader."""
    import struct

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    out, pos, piece = [], 7, b""
    block = 32768
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += room
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            piece = chunk
        elif kind == 3:
            piece += chunk
        elif kind == 4:
            out.append(piece + chunk)
    return out


def _wandb_history(run_dir) -> list[dict]:
    """The metrics rows an offline W&B run wrote to its .wandb file, decoded with W&B's protobufs."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    rows = []
    for data in _wandb_records(path):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
    return rows


def _wandb_story(run_dirs, trial_id: str, stderr: str) -> str:
    """What to read when a W&B run misses epochs: its own log's end and the study's stderr."""
    (d,) = [d for d in run_dirs if d.name.endswith(trial_id)]
    log = d / "logs" / "debug.log"
    tail = log.read_text().splitlines()[-15:] if log.exists() else ["(no debug.log)"]
    sizes = {f.name: f.stat().st_size for f in d.glob("run-*.wandb")}
    return "\n".join([f"run {d.name}, {sizes}", *tail, "--- study stderr:", stderr[-2000:]])


def test_a_w_and_b_run_keeps_its_logged_epochs_when_its_logging_loop_fails(tmp_path, monkeypatch):
    """The study's W&B logging actor, run in this process on a real offline W&B run: the loop
    fails at its third item (a result Tune's loop cannot read), and the two epochs logged before
    are in the run's file, the run finished (Tune's own loop lost them: an offline run writes
    nothing until it finishes)."""
    import queue

    from ray.air.integrations.wandb import _QueueItem

    from study.runner.trackers import _WandbRunActor

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    q = queue.Queue()
    for epoch in (1, 2):
        q.put((_QueueItem.RESULT, {"training_iteration": epoch, "val_elbo": 200.0 - epoch, "config": {"beta": 1.0}}))
    q.put((_QueueItem.RESULT, None))  # _handle_result raises on it
    (tmp_path / "trial").mkdir()
    actor = _WandbRunActor(str(tmp_path / "trial"), q, [], [], project="vae-study-test", id="t0001", reinit=True)
    cwd = os.getcwd()
    try:
        with pytest.raises(AttributeError):
            actor.run()
    finally:
        os.chdir(cwd)  # Tune's actor moves into its trial's folder
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*-t0001")
    assert [r["val_elbo"] for r in _wandb_history(run_dir) if "val_elbo" in r] == [199.0, 198.0]
    import wandb
    assert wandb.run is None


@pytest.mark.slow
def test_mlflow_and_wandb_hold_every_trials_parameters_and_epochs_and_the_report(tmp_path):
    """One study logged to both: every trial is a run in each, with its parameters and one
    metrics row per epoch it trained (pruned trials included); the report goes to the
    winner's run; no tracker address is written into the study."""
    import mlflow

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "WANDB_MODE": "offline",
           "WANDB_DIR": str(tmp_path / "wb"), "WANDB_PROJECT": "vae-study-test", "WANDB_SILENT": "true"}
    (tmp_path / "wb").mkdir()
    p = run_cli("run", "--name", "tracked", "--storage", str(tmp_path / "studies"), "--trials", "4", "--epochs", "3",
                "--max-train-images", "400", "--num-cpus", "2", "--no-refit", "--log-to", "mlflow",
                "--log-to", "wandb", env=env, timeout=600, cwd=tmp_path)  # MLflow's artifacts: ./mlruns
    assert p.returncode == 0, p.stderr[-3000:]
    assert "W&B:" not in p.stderr, p.stderr[-3000:]  # no trial's W&B run failed
    study = tmp_path / "studies" / "tracked"
    trials = results.load(study).set_index("trial_id")
    epochs = results.load(study, "epochs")
    assert len(trials) == 4
    spec = json.loads((study / "study.json").read_text())
    assert spec["log_to"] == ["mlflow", "wandb"]
    assert "mlflow.db" not in (study / "study.json").read_text()

    # MLflow: an experiment named after the study, one run per trial
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    try:
        client = mlflow.MlflowClient()
        exp = client.get_experiment_by_name("tracked")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 4
        by_trial = {r.data.tags["trial_name"].rsplit("_", 1)[-1]: r for r in runs}
        assert set(by_trial) == set(trials.index)
        for tid, run in by_trial.items():
            assert int(run.data.params["latent_dim"]) == trials.loc[tid, "param_latent_dim"]
            assert float(run.data.params["beta"]) == pytest.approx(trials.loc[tid, "param_beta"])
            history = client.get_metric_history(run.info.run_id, "val_elbo")
            mine = epochs[epochs["trial_id"] == tid].sort_values("epoch")
            assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(mine["epoch"])
            assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(list(mine["val_elbo"]))

        # W&B, offline: one run folder per trial, holding every epoch's metrics
        run_dirs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
        assert len(run_dirs) == 4, run_dirs
        seen = {}
        for d in run_dirs:
            rows = [r for r in _wandb_history(d) if "val_elbo" in r]
            seen[d.name.rsplit("-", 1)[-1]] = [r["val_elbo"] for r in rows]  # the W&B run id is the trial id
        assert set(seen) == set(trials.index)
        for tid, values in seen.items():
            mine = epochs[epochs["trial_id"] == tid].sort_values("epoch")
            assert values == pytest.approx(list(mine["val_elbo"])), _wandb_story(run_dirs, tid, p.stderr)

        # the report goes to the winner's run
        p = run_cli("report", str(study), "--tsne-points", "200", "--gap-images", "50", "--decoder-steps", "5",
                    env=env, timeout=600, cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        winner = json.loads((study / "report" / "summary.json").read_text())["winner"]["trial_id"]
        assert "report logged to mlflow" in p.stderr + p.stdout, p.stderr[-2000:]
        arts = {a.path for a in client.list_artifacts(by_trial[winner].info.run_id, "report")}
        assert {"report/index.html", "report/summary.json"} <= arts and not any("cache" in a for a in arts)
        assert "report logged to wandb" in p.stderr + p.stdout
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.mark.slow
def test_a_killed_and_resumed_study_keeps_logging_and_leaves_no_run_open(tmp_path):
    """The driver is SIGKILLed mid-study and the study resumed: every trial ends with a finished
    MLflow run that reached its last epoch (a trial continued from a checkpoint logs the rest to
    a new run), the runs the killed driver left open are closed (KILLED), W&B keeps logging, and
    nothing prints a traceback at exit."""
    import signal
    import subprocess
    import sys
    import time

    import mlflow

    from conftest import REPO

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "WANDB_MODE": "offline",
           "WANDB_DIR": str(tmp_path / "wb"), "WANDB_SILENT": "true"}
    (tmp_path / "wb").mkdir()
    cmd = [sys.executable, "-m", "study", "run", "--name", "k", "--storage", str(tmp_path / "s"), "--trials", "5",
           "--epochs", "6", "--num-cpus", "2", "--max-train-images", "600", "--no-early-stopping",
           "--log-to", "mlflow", "--log-to", "wandb"]
    driver = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    rows = tmp_path / "s" / "k" / "trials"
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None and len(list(rows.glob("*.parquet"))) < 2:
        time.sleep(0.3)
    done = len(list(rows.glob("*.parquet")))
    if driver.poll() is None:
        os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    assert 2 <= done < 5, done
    p = subprocess.run([sys.executable, "-m", "study", "resume", "--name", "k", "--storage", str(tmp_path / "s"),
                        "--num-cpus", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr[-3000:]
    trials = results.load(tmp_path / "s" / "k")
    trials = trials[trials["status"] != results.REFIT]
    epochs = results.load(tmp_path / "s" / "k", "epochs")
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    try:
        client = mlflow.MlflowClient()
        runs = client.search_runs([client.get_experiment_by_name("k").experiment_id])
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    assert not [r for r in runs if r.info.status == "RUNNING"], [(r.data.tags["trial_name"], r.info.status) for r in runs]
    for tid in trials["trial_id"]:
        mine = [r for r in runs if r.data.tags["trial_name"].endswith(tid) and r.info.status == "FINISHED"]
        assert int((epochs["trial_id"] == tid).sum()) == 6
        assert any(r.data.metrics.get("epoch") == 6 for r in mine), \
            (tid, [(r.info.status, r.data.metrics.get("epoch")) for r in mine])
    assert len(list((tmp_path / "wb" / "wandb").glob("offline-run-*"))) >= 5


def test_a_run_the_killed_driver_left_open_ends_finished_with_its_epochs_when_its_trial_was_recorded(
        tmp_path, monkeypatch):
    """The killed driver wrote a trial's row (the trial is finished and never runs again) but died
    before closing its MLflow run, after logging 4 of its 6 epochs: the resume's end gives that
    run its last two epochs from the epochs table and closes it FINISHED. A run whose trial has
    no row (a resumed trial continued it in a new run) ends KILLED."""
    import mlflow
    import pandas as pd

    from study.runner import trackers

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    exp = client.create_experiment("k")
    runs = {}
    for tid in ("aaaa0001", "aaaa0002"):
        run = client.create_run(exp, tags={"trial_name": f"train_{tid}"})
        for epoch in range(1, 5):
            client.log_metric(run.info.run_id, "epoch", epoch, step=epoch)
            client.log_metric(run.info.run_id, "val_elbo", 200.0 - epoch, step=epoch)
        runs[tid] = run.info.run_id
    trials = pd.DataFrame({"trial_id": ["aaaa0001"], "status": ["completed"]})
    epochs = pd.DataFrame({"study": "k", "trial_id": "aaaa0001", "epoch": range(1, 7),
                           "val_elbo": [200.0 - e for e in range(1, 7)], "seconds": 0.5})

    assert trackers.close_stale_runs(["mlflow"], "k", trials, lambda: epochs) == 2

    done = client.get_run(runs["aaaa0001"])
    assert done.info.status == "FINISHED"
    history = sorted(client.get_metric_history(runs["aaaa0001"], "val_elbo"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(e, 200.0 - e) for e in range(1, 7)]
    assert done.data.metrics["epoch"] == 6
    assert client.get_run(runs["aaaa0002"]).info.status == "KILLED"
    assert len(client.get_metric_history(runs["aaaa0002"], "val_elbo")) == 4
