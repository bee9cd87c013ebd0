"""Studies whose storage is a bucket: a real S3 endpoint on 127.0.0.1 (moto), real Ray, real
Optuna; everything read back from the bucket with pyarrow, DuckDB, boto3 and Optuna's API."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from conftest import REPO, run_cli
from s3 import BUCKET, SECRET, bucket_keys, get_object, s3_server
from study import results
from study.errors import StudyError
from study.store.location import Location
from study.store.optuna_storage import open_optuna

ROOT = f"s3://{BUCKET}/root"


@pytest.fixture(scope="module")
def s3():
    with s3_server() as env:
        yield env


@pytest.fixture(scope="module")
def s3_study(s3, tmp_path_factory):
    """A finished 4-trial study with ASHA on, its storage in the bucket."""
    cache = tmp_path_factory.mktemp("driver-cache")
    r = run_cli("run", "--name", "s", "--storage", ROOT, "--trials", "4", "--epochs", "3", "--num-cpus", "2",
                "--max-train-images", "400", env={"VAE_STUDY_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(params=["folder", "bucket"])
def store(request, tmp_path):
    """Each kind of store, fresh: what every backend must do, one test for all of them."""
    if request.param == "folder":
        yield Location(tmp_path / "unit")
    else:
        with s3_server():
            yield Location(f"{ROOT}/unit")


def test_every_store_reads_writes_lists_and_locks_the_same_way(store, tmp_path):
    import pickle

    from study.store.location import Bucket, Folder, Store

    assert isinstance(store, (Folder, Bucket)) and isinstance(store, Store)  # all the protocol asks
    assert store.name == "unit" and not store.has_content()
    store.write_text("a/b.txt", "hello")
    assert store.read_text("a/b.txt") == "hello" and store.is_file("a/b.txt") and store.is_dir("a")
    assert store.files("a") == ["b.txt"] and store.folders() == ["a"] and store.walk() == ["a/b.txt"]
    assert store.has_content() and not store.exists("nope") and not store.is_dir("nope")
    # a local path where there is one; a working copy in the per-user cache where there is not
    local = store.local_path("a/b.txt")
    assert (local is not None and local.read_text() == "hello") == isinstance(store, Folder)
    assert store.working_path("x.db") == (store.local_path("x.db") or store.working_path("x.db"))
    assert isinstance(store, Folder) == (store.working_path("x.db") == store.local_path("x.db"))
    # Ray is told where the experiment goes by the store, and syncs artefacts only to a bucket
    ray = store.ray_storage()
    if ray.get("storage_filesystem") is None:
        assert ray["storage_path"] == store.uri
    else:  # a bucket: through the study's own filesystem (object_store), credentials not in it
        assert ray["storage_path"] == store.path and ray["storage_filesystem"] is store.fs
        assert SECRET.encode() not in pickle.dumps(ray["storage_filesystem"])
    assert ("sync_config" in store.ray_storage()) == store.over_network == store.visible_everywhere
    # one process at a time
    with store.lock():
        with pytest.raises(StudyError, match="being run by another process"):
            with Location(store.uri).lock():
                pass
    # pickled (into Ray's state) without its file system, and comes back as the same kind
    back = pickle.loads(pickle.dumps(store))
    assert type(back) is type(store) and back.uri == store.uri and back.read_text("a/b.txt") == "hello"
    store.delete_tree()
    assert not store.exists("a/b.txt")
    with pytest.raises(FileNotFoundError):
        store.read_bytes("a/b.txt")


def test_credentials_or_options_in_the_uri_are_refused_without_echoing_them(s3, tmp_path):
    r = run_cli("run", "--smoke", "--name", "x", "--storage", f"s3://AKIAEXAMPLE:{SECRET}@{BUCKET}/p")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "credentials in the URI are refused" in r.stderr and SECRET not in r.stderr and "AKIAEXAMPLE" not in r.stderr
    r = run_cli("run", "--smoke", "--name", "x", "--storage", f"s3://{BUCKET}/p?secret_key={SECRET}")
    assert r.returncode == 2 and SECRET not in r.stderr
    r = run_cli("run", "--smoke", "--name", "x", "--storage", "ftp://host/p")
    assert r.returncode == 2 and "unknown scheme" in r.stderr


def test_a_missing_bucket_is_refused_before_any_trial(s3):
    r = run_cli("run", "--smoke", "--name", "x", "--storage", "s3://no-such-bucket/p", "--num-cpus", "1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "not writable" in r.stderr and SECRET not in r.stderr


def test_everything_a_study_keeps_is_in_the_bucket(s3_study):
    # (pyarrow leaves an empty "folder/" marker object where it deleted a folder's last object)
    keys = [k for k in bucket_keys("root/s/") if not k.endswith("/")]
    rel = [k.removeprefix("root/s/") for k in keys]
    assert "study.json" in rel and "optuna.log" in rel
    # a finished study is compacted: a reader reads one object per table (the trials' own files
    # stay in a bucket, older than it: see test_compact_on_a_bucket)
    for table in results.TABLES:
        assert f"{table}/compacted.parquet" in rel
        read = {r.split("/")[1] for _, r in results.table_files(f"{ROOT}/s", table)}
        # besides it, only a file written in the same second (S3 keeps whole seconds; the reader
        # prefers a trial's own file, so a row is never read twice)
        mtime = Location(f"{ROOT}/s").files_modified(table, ".parquet")
        assert "compacted.parquet" in read and all(mtime[n] == mtime["compacted.parquet"] for n in read)
        assert len(read) < len([k for k in rel if k.startswith(f"{table}/")])
    assert any(k.startswith("tune/") and k.endswith("tuner.pkl") for k in rel)
    everything = results.load(f"{ROOT}/s")
    trials = results.search_trials(everything)
    assert len(trials) == 4 and set(trials["status"]) <= {"completed", "pruned"}
    assert (trials["status"] == "completed").any()
    # the winner's refit ran in a Ray worker and handed its weights to the driver, which put them in the bucket
    refit = everything[everything["status"] == results.REFIT]
    assert len(refit) == 1 and refit.iloc[0]["checkpoint"] == f"refit/{refit.iloc[0]['refit_of']}/model.pt"
    # every trial's best checkpoint (and the refit's) is an object in the study's prefix, recorded relative to it
    for ck in everything["checkpoint"]:
        assert not ck.startswith("/") and f"root/s/{ck}" in keys
    # pyarrow reads the objects unchanged; DuckDB queries the Arrow table
    t = pq.read_table(io.BytesIO(get_object("root/s/trials/compacted.parquet")))
    assert t.num_rows == 4 + 1
    import duckdb

    arrow = results.read_arrow(f"{ROOT}/s", "epochs")
    n = duckdb.sql("SELECT count(*) FROM arrow").fetchall()[0][0]
    assert n == int(trials["epochs_run"].sum())
    # the Optuna snapshot is a whole journal that Optuna opens
    import optuna

    snap = REPO / ".pytest-optuna-snapshot.log"
    try:
        snap.write_bytes(get_object("root/s/optuna.log"))
        assert snap.read_bytes().endswith(b"\n")
        study = optuna.load_study(study_name="s", storage=open_optuna(str(snap)))
        assert len(study.get_trials()) == 4
        assert optuna.trial.TrialState.RUNNING not in {t.state for t in study.get_trials()}
    finally:
        snap.unlink(missing_ok=True)


def test_no_credential_is_written_or_printed(s3_study):
    assert SECRET not in s3_study.stdout and SECRET not in s3_study.stderr
    for key in bucket_keys("root/s/"):
        assert SECRET.encode() not in get_object(key), key
    spec = json.loads(get_object("root/s/study.json"))
    assert spec["storage"] == ROOT


def test_results_over_a_bucket_root_and_a_study(s3_study):
    r = run_cli("results", ROOT, "--format", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 4 + 1 and {row["trial_id"] for row in rows} == set(results.load(f"{ROOT}/s")["trial_id"])
    r = run_cli("results", f"{ROOT}/s", "--table", "digits", "--where", "recon_mode = 'posterior_mean'",
                "--format", "csv")
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 1 + (4 + 1) * 10  # 4 trials and the refit
    r = run_cli("results", f"s3://{BUCKET}/nothing-here")
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_report_from_another_machine_lands_in_the_bucket(s3_study, tmp_path):
    # a fresh cache: nothing from the driver's machine is used
    r = run_cli("report", f"{ROOT}/s", "--tsne-points", "300", "--gap-images", "50", "--decoder-steps", "5",
                env={"VAE_STUDY_CACHE": str(tmp_path / "laptop-cache")}, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"report: {ROOT}/s/report/index.html" in r.stdout
    keys = bucket_keys("root/s/report/")
    assert "root/s/report/index.html" in keys and "root/s/report/summary.json" in keys
    assert {"root/s/report/tsne.png", "root/s/report/recon_panel.png", "root/s/report/optuna_history.png"} <= set(keys)
    summary = json.loads(get_object("root/s/report/summary.json"))
    assert summary["winner"]["trial_id"] == results.winner(results.load(f"{ROOT}/s"))["trial_id"]
    assert not [n for n in summary["notes"] if "skipped" in n]
    html = get_object("root/s/report/index.html").decode()
    assert html.count("data:image/png;base64,") >= 5 and "left out: no Optuna study" not in html


def test_compact_on_a_bucket(s3_study):
    loc = Location(f"{ROOT}/s")
    before = results.load(loc)
    row = before.iloc[0].to_dict()
    row["error"] = "rewritten after compaction"
    time.sleep(1.1)  # S3 keeps times in whole seconds: a file of the compaction's second is read too
    results.write_rows(loc, "trials", row["trial_id"], [row])
    assert results.load(loc).set_index("trial_id").loc[row["trial_id"], "error"] == "rewritten after compaction"
    time.sleep(1.1)
    r = run_cli("compact", f"{ROOT}/s")
    # the rewritten file, and any the study wrote in its own compaction's second (its refit's)
    assert r.returncode == 0 and re.search(r"trials: [12] files merged", r.stdout), r.stderr
    # a reader reads the compacted file alone: the trials' own files stay in a bucket (removing
    # them cost four requests each), and are skipped as older than it
    assert [rel for _, rel in results.table_files(loc, "trials")] == ["trials/compacted.parquet"]
    assert len([k for k in bucket_keys("root/s/trials/") if not k.endswith("/")]) == len(before) + 1
    after = results.load(loc)
    assert len(after) == len(before) and after.set_index("trial_id").loc[row["trial_id"], "error"] == row["error"]


N = 5


@pytest.mark.slow
def test_sigkill_of_the_driver_then_resume_from_the_bucket_on_another_machine(s3, tmp_path):
    cmd = [sys.executable, "-m", "study", "run", "--name", "k", "--storage", ROOT, "--trials", str(N), "--epochs", "4",
           "--num-cpus", "2", "--max-train-images", "400", "--no-early-stopping"]
    env = {**os.environ, "VAE_STUDY_CACHE": str(tmp_path / "head-cache")}
    driver = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                              start_new_session=True)
    study = Location(f"{ROOT}/k")
    deadline = time.time() + 300
    done: list[str] = []
    while time.time() < deadline and driver.poll() is None:
        done = study.files("trials", ".parquet")
        if len(done) >= 2:
            break
        time.sleep(0.3)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray runtime it started
    driver.wait(timeout=30)
    assert 2 <= len(done) < N, f"the kill must land mid-study ({done})"
    cols = ["val_elbo", "best_epoch", "test_mse"]
    before = {n.removesuffix(".parquet"): pq.read_table(io.BytesIO(study.read_bytes(f"trials/{n}")))
              .select(cols).to_pylist()[0] for n in done}

    # another machine: an empty cache, so Optuna's working copy comes from the published snapshot
    r = run_cli("resume", "--name", "k", "--storage", ROOT, "--num-cpus", "2",
                env={"VAE_STUDY_CACHE": str(tmp_path / "other-cache")}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    everything = results.load(study)
    df = results.search_trials(everything)
    assert (everything["status"] == results.REFIT).sum() == 1
    assert len(df) == N and df["trial_id"].is_unique
    assert (df["status"] == "completed").all() and (df["epochs_run"] == 4).all()
    # A finished trial keeps its results. (One that finished in the seconds before the kill, while
    # Ray's state upload to the bucket was still in flight, may be run again from its last
    # checkpoint; training is exact, so its results are the same.)
    for tid, row in before.items():
        assert df.set_index("trial_id").loc[tid, cols].tolist() == pytest.approx(list(row.values()), rel=1e-9)
    ep = results.load(study, "epochs")
    counts = ep.groupby("trial_id")["epoch"].agg(["count", "nunique"])
    assert (counts["count"] == 4).all() and (counts["nunique"] == 4).all()
    import optuna

    snap = tmp_path / "snapshot.log"
    snap.write_bytes(get_object("root/k/optuna.log"))
    states = [t.state for t in optuna.load_study(study_name="k", storage=open_optuna(str(snap))).get_trials()]
    assert states.count(optuna.trial.TrialState.COMPLETE) == N
    assert optuna.trial.TrialState.RUNNING not in states


def test_storage_errors_are_one_line(s3):
    with pytest.raises(StudyError, match="names no bucket"):
        Location("s3://")
    with pytest.raises(StudyError, match="holds no study"):
        Location(f"{ROOT}/unit2").write_text("x.txt", "x") or results.load(f"{ROOT}/unit2")


@pytest.mark.slow
@pytest.mark.parametrize("share", [0.15, 0.25])
def test_a_study_in_a_bucket_that_fails_a_share_of_its_requests_finishes_whole(tmp_path, share):
    """Every bucket request, the study's and Ray's (through the filesystem it is handed), retries
    with backoff: with 15% (and 25%) of requests answered 503 SlowDown, 500 InternalError or a
    dropped connection, no trial fails, and the results and report read through the same faults.
    (pyarrow's default of 3 attempts fails about 1 request in 64 at 25%: trials died.)"""
    from s3 import s3_endpoint

    with s3_endpoint(faults=share, seed=7) as (_, counts):
        root = f"s3://{BUCKET}/faulty"
        r = run_cli("run", "--name", "f", "--storage", root, "--trials", "8", "--epochs", "3", "--num-cpus", "2",
                    "--max-train-images", "400", env={"VAE_STUDY_CACHE": str(tmp_path / "cache")}, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        everything = results.load(f"{root}/f")
        df = results.search_trials(everything)
        assert len(df) == 8 and df["status"].isin(["completed", "pruned"]).all(), df[["trial_id", "status", "error"]]
        assert (everything["status"] == results.REFIT).sum() == 1
        rep = run_cli("report", f"{root}/f", "--out", str(tmp_path / "rep"))
        assert rep.returncode == 0, rep.stderr[-2000:]
        faults = {k: v for k, v in counts.items() if k.startswith("fault")}
        assert sum(faults.values()) >= 0.66 * share * counts["requests"], (faults, counts["requests"])
        assert set(faults) == {"fault slowdown", "fault internal", "fault drop"}
