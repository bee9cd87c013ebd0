"""The real `vae-study run` and `vae-study results` commands, in subprocesses."""
from __future__ import annotations

import io
import json

import pandas as pd
import pytest

from conftest import run_cli


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    storage = tmp_path_factory.mktemp("cli")
    r = run_cli("run", "--smoke", "--trials", "3", "--name", "demo", "--storage", str(storage), "--num-cpus", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "best trial" in r.stdout and "finished" in r.stdout
    return storage / "demo"


def test_results_table_default(study_dir):
    r = run_cli("results", str(study_dir))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["trial_id", "status"] and len(lines) == 1 + 3 + 1  # 3 trials, the refit
    assert sum(1 for line in lines if line.split()[1] == "refit") == 1


def test_results_csv_sort_top_columns(study_dir):
    r = run_cli("results", str(study_dir), "--sort", "val_elbo", "--top", "2", "--columns", "trial_id,val_elbo",
                "--format", "csv")
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(io.StringIO(r.stdout))
    assert list(df.columns) == ["trial_id", "val_elbo"] and len(df) == 2
    assert df["val_elbo"].is_monotonic_increasing
    r = run_cli("results", str(study_dir), "--sort", "val_elbo", "--desc", "--format", "csv")
    desc = pd.read_csv(io.StringIO(r.stdout))["val_elbo"]
    assert desc.dropna().is_monotonic_decreasing and desc.iloc[:-1].notna().all()  # the refit (no val) last


def test_results_top_alone_is_the_best_trials_by_the_objective(study_dir):
    import pyarrow.parquet as pq

    from study import results

    r = run_cli("results", str(study_dir), "--top", "2", "--columns", "trial_id,objective", "--format", "csv")
    assert r.returncode == 0, r.stderr
    got = pd.read_csv(io.StringIO(r.stdout))
    rows = pq.read_table(str(study_dir / "trials")).to_pandas()  # every file of the table, as pyarrow reads it
    best = rows[rows["objective"].notna()].sort_values("objective")["trial_id"].head(2).tolist()
    assert got["trial_id"].tolist() == best
    # a study that maximises ranks the other way; rows without an objective go last either way
    df = pd.DataFrame({"study": ["a", "a", "a", "b", "b"], "trial_id": list("pqrst"),
                       "objective": [2.0, None, 1.0, 5.0, 7.0]})
    order = results.best_first(df, {"a": "min", "b": "max"})["trial_id"].tolist()
    assert order == ["t", "s", "r", "p", "q"]


def test_results_where_and_json(study_dir):
    r = run_cli("results", str(study_dir), "--table", "digits", "--where",
                "recon_mode = 'posterior_mean' AND digit < 3", "--format", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 3 * (3 + 1) and {row["digit"] for row in rows} == {0, 1, 2}  # the refit has test rows too
    r = run_cli("results", str(study_dir), "--table", "epochs", "--format", "json")
    assert len(json.loads(r.stdout)) == 3


def test_results_of_a_storage_root_reads_every_study(study_dir):
    r = run_cli("results", str(study_dir.parent), "--format", "csv", "--columns", "study,trial_id")
    assert r.returncode == 0 and set(pd.read_csv(io.StringIO(r.stdout))["study"]) == {"demo"}


@pytest.mark.parametrize(
    "args, words",
    [
        (["--where", "val_elbo <"], "invalid --where"),
        (["--where", "no_such_col > 1"], "invalid --where"),
        (["--sort", "no_such_col"], "unknown column 'no_such_col'"),
        (["--columns", "trial_id,nope"], "unknown column 'nope'"),
        (["--top", "0"], "--top 0"),
        (["--table", "nope"], "invalid choice"),
    ],
)
def test_results_bad_queries(study_dir, args, words):
    r = run_cli("results", str(study_dir), *args)
    assert r.returncode == 2, r.stdout
    assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_results_missing_or_empty_folder(tmp_path):
    r = run_cli("results", str(tmp_path / "nope"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run_cli("results", str(tmp_path))
    assert r.returncode == 2 and "holds no study" in r.stderr


def test_corrupt_parquet_is_reported_and_skipped(study_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(study_dir, copy, ignore=shutil.ignore_patterns("tune"))
    (copy / "trials" / "zzzz.parquet").write_bytes(b"PAR1 this is not parquet")
    r = run_cli("results", str(copy), "--format", "csv")
    assert r.returncode == 0
    assert "skipped unreadable file" in r.stderr and "zzzz.parquet" in r.stderr
    assert len(pd.read_csv(io.StringIO(r.stdout))) == 3 + 1  # 3 trials and the refit


def test_run_existing_name_refused_and_nothing_lost(study_dir):
    before = sorted(p.name for p in (study_dir / "trials").iterdir())
    r = run_cli("run", "--smoke", "--name", "demo", "--storage", str(study_dir.parent), "--num-cpus", "2")
    assert r.returncode == 2 and "already exists" in r.stderr and "vae-study resume" in r.stderr
    assert sorted(p.name for p in (study_dir / "trials").iterdir()) == before


@pytest.mark.parametrize(
    "args, words",
    [
        (["--trials", "0"], "trials=0"),
        (["--epochs", "0"], "epochs=0"),
        (["--dataset", "cifar"], "dataset='cifar'"),
        (["--dataset", "mnist", "--data-dir", "/no/such/dir"], "does not exist"),
        (["--grid", "latent_dim=0,4"], "latent_dim=0"),
        (["--grid", "latent_dim"], "must look like name=v1,v2"),
        (["--gpus-per-trial", "64"], "GPUs and no autoscaler"),  # more than any machine here has
        (["--objective", "train_loss"], "not a recorded metric"),
    ],
)
def test_run_bad_input_writes_nothing(tmp_path, args, words):
    storage = tmp_path / "st"
    r = run_cli("run", "--smoke", "--name", "bad", "--storage", str(storage), "--num-cpus", "2", *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not storage.exists()  # not even an empty storage folder is left behind


def test_run_with_malformed_toml(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text("[space.beta]\nlow = ")
    r = run_cli("run", str(f), "--name", "x", "--storage", str(tmp_path / "st"))
    assert r.returncode == 2 and "not valid TOML" in r.stderr and not (tmp_path / "st").exists()


def test_compact_keeps_every_row_and_readers_agree(study_dir, tmp_path):
    import shutil

    import duckdb
    import polars as pl

    from study import results

    copy = tmp_path / "demo"
    shutil.copytree(study_dir, copy, ignore=shutil.ignore_patterns("tune"))
    before = {t: results.load(copy, t) for t in results.TABLES}
    # a finished study is compacted when it ends: one file per table
    for t in results.TABLES:
        assert sorted(p.name for p in (copy / t).iterdir()) == ["compacted.parquet"], t
    # a trial file written after compaction wins over its compacted rows, and compact merges it
    from study.results.tables import write_rows

    row = before["trials"].iloc[0].to_dict()
    row["status"] = "failed"
    write_rows(copy, "trials", row["trial_id"], [row])
    again = results.load(copy)
    assert len(again) == 4 and (again.set_index("trial_id").loc[row["trial_id"], "status"] == "failed")  # 3 + refit
    before["trials"] = again
    r = run_cli("compact", str(copy))
    assert r.returncode == 0, r.stderr
    assert "trials: 1 files merged" in r.stdout and "epochs: 0 files merged" in r.stdout
    assert sorted(p.name for p in (copy / "trials").iterdir()) == ["compacted.parquet"]
    for t in results.TABLES:
        after = results.load(copy, t)
        key = ["trial_id"] + (["epoch"] if t == "epochs" else ["recon_mode", "digit"] if t == "digits" else [])
        pd.testing.assert_frame_equal(before[t].sort_values(key).reset_index(drop=True),
                                      after.sort_values(key).reset_index(drop=True))
    assert duckdb.sql(f"SELECT count(*) FROM '{copy}/epochs/*.parquet'").fetchall()[0][0] == len(before["epochs"])
    assert pl.read_parquet(copy / "digits" / "*.parquet").height == len(before["digits"])


def test_a_table_read_in_batches_is_the_table_read_at_once(study_dir, tmp_path, monkeypatch):
    """Tables are read a batch of files at a time (a 10,000-trial study's files held at once
    took 0.6 GB): batches that split the trials, their schemas and the compacted file's rows
    give the frame one batch gives."""
    import shutil

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from study import results

    copy = tmp_path / "demo"
    shutil.copytree(study_dir, copy, ignore=shutil.ignore_patterns("tune"))
    for t in results.TABLES:  # every trial's rows in its own file again, the compacted file kept
        whole = pq.read_table(copy / t / "compacted.parquet")
        if t == "trials":  # compacted rows that only a trial's own file (written after) may replace
            stale = whole.to_pandas().assign(status="stale")
            (copy / t / "compacted.parquet").write_bytes(results.parquet_bytes(pa.Table.from_pandas(stale)))
        for k, tid in enumerate(sorted(set(whole.column("trial_id").to_pylist()))):
            own = whole.filter(pc.equal(whole.column("trial_id"), tid))
            if k == 1:  # a file without a column the others have, one with a row of nulls only
                own = own.drop_columns([c for c in own.column_names if c not in ("study", "trial_id", "status", "epoch",
                                                                               "digit", "recon_mode")][:1])
            if k == 2:
                own = own.append_column("note", pa.array([None] * own.num_rows, pa.null()))
            (copy / t / f"{tid}.parquet").write_bytes(results.parquet_bytes(own))
    for t in results.TABLES:
        monkeypatch.setattr(results, "READ_BATCH", 10_000)
        at_once = results.load(copy, t)
        monkeypatch.setattr(results, "READ_BATCH", 2)
        batched = results.load(copy, t)
        assert len(results.table_files(copy, t)) > results.READ_BATCH  # more than one batch
        pd.testing.assert_frame_equal(at_once, batched)
        assert len(batched) == len(pq.read_table(study_dir / t / "compacted.parquet"))
    assert "stale" not in set(results.load(copy)["status"])


def test_the_cluster_yaml_placeholder_bucket_is_refused_with_the_fix(tmp_path):
    r = run_cli("run", "--smoke", "--name", "x", env={"VAE_STUDY_STORAGE": "s3://YOUR-BUCKET/studies"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "name your bucket first" in r.stderr and "cluster.yaml" in r.stderr


@pytest.mark.slow
def test_a_study_in_which_no_trial_finished_exits_1_with_the_first_error(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text('[train]\nbeta = 1000.0\nlatent_dim = 4\n')
    r = run_cli("run", str(toml), "--name", "bad", "--storage", str(tmp_path), "--grid", "lr=9.0,8.0",
                "--epochs", "1", "--max-train-images", "300", "--num-cpus", "2")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "0 completed, 0 pruned, 2 failed" in r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("vae-study:")]
    assert len(lines) == 1 and "no trial of study 'bad' finished" in lines[0] and "non-finite" in lines[0]
