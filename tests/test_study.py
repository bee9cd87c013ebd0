"""Real studies: Ray Tune on 127.0.0.1 with 2 CPUs, a real SQLite Optuna storage, real Parquet."""
from __future__ import annotations


import duckdb
import numpy as np
import optuna
import pandas as pd
import pyarrow.parquet as pq
import pytest

from study import results
from study.errors import StudyError
from study.spec.spec import build_spec
from study.store.layout import OPTUNA_LOG
from study.store.optuna_storage import open_optuna
from study.cli import summary_lines
from study.runner.recipes import run


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from study.cluster.connect import init_ray

    init_ray(None, 2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def four(ray_local, tmp_path_factory):
    storage = tmp_path_factory.mktemp("studies")
    spec = build_spec(None, {"name": "four", "storage": str(storage), "trials": 4, "epochs": 1,
                             "max_train_images": 300, "num_cpus": 2})
    lines: list[str] = []
    res = run(spec, printer=lines.append)
    return spec, res, lines


def test_four_trials_land_in_parquet_read_by_pyarrow_duckdb_polars(four):
    spec, res, _ = four
    folder = res.folder
    t = pq.read_table(folder / "trials")
    assert t.num_rows == 5  # 4 trials of the search, and the winner's refit
    statuses = t.column("status").to_pylist()
    assert statuses.count("refit") == 1 and set(statuses) - {"refit"} <= {"completed", "pruned"}
    con = duckdb.connect()
    n_trials = con.execute(f"SELECT count(*) FROM read_parquet('{folder}/trials/*.parquet')").fetchone()[0]
    n_epochs = con.execute(f"SELECT count(*) FROM read_parquet('{folder}/epochs/*.parquet')").fetchone()[0]
    digits = con.execute(
        f"SELECT recon_mode, count(*), sum(n_images) FROM read_parquet('{folder}/digits/*.parquet') "
        "WHERE split = 'test' GROUP BY recon_mode ORDER BY recon_mode"
    ).fetchall()
    assert n_trials == 5 and n_epochs == 4  # one epoch each; the refit keeps no epoch rows
    # every trial and the refit: 10 digits x 2 modes, each digit over all test images of the (smoke) split
    assert [(m, c) for m, c, _ in digits] == [("posterior_mean", 50), ("posterior_sample", 50)]
    import polars as pl

    assert pl.read_parquet(folder / "trials" / "*.parquet").height == 5


def test_tunes_result_grid_reads_a_trials_frame_only_when_asked(four):
    """Tune's ResultGrid reads every trial's result.json into a DataFrame as it is made (0.7 GB
    at 10,000 trials); the study's reads one when it is asked for, and gives what Tune gives."""
    import pandas as pd
    from ray.tune import ResultGrid
    from ray.tune.analysis import ExperimentAnalysis

    _, res, _ = four
    grid = res.result_grid
    assert isinstance(grid, ResultGrid) and len(grid) == 4
    frames = grid._experiment_analysis._trial_dataframes
    assert len(frames) == 4 and not frames._read  # nothing read yet
    best = grid.get_best_result()
    assert best.metrics["trial_id"] in set(res.trials["trial_id"]) and len(frames._read) == 1
    # what Tune's own, eager, analysis reads of the same trial
    eager = ExperimentAnalysis(grid.experiment_path, default_metric="best_val_elbo", default_mode="min")
    pd.testing.assert_frame_equal(best.metrics_dataframe, eager.trial_dataframes[best.metrics["trial_id"]])
    assert len(best.metrics_dataframe) == 1  # one epoch, one row
    assert sorted(r.metrics["trial_id"] for r in grid) == sorted(r.metrics["trial_id"] for r in ResultGrid(eager))
    assert grid[-1].path == grid[3].path and len(grid[1:3]) == 2 and len(frames._read) == 4
    with pytest.raises(IndexError):
        grid[4]
    from ray.tune.impl import tuner_internal

    assert tuner_internal.ResultGrid is ResultGrid  # put back after the run


def test_trials_table_records_params_results_and_provenance(four):
    _, res, _ = four
    df = results.load(res.folder)
    df = df[df["status"] != results.REFIT]
    assert len(df) == 4 and df["trial_id"].is_unique
    for col in ("param_latent_dim", "param_beta", "param_lr", "val_elbo", "test_mse", "test_psnr",
                "node", "hostname", "device", "torch_version", "ray_version", "optuna_version",
                "checkpoint", "started_at", "finished_at", "train_seconds", "images_per_second"):
        assert df[col].notna().all(), col
    assert (df["param_latent_dim"].between(2, 64)).all() and (df["param_beta"].between(0.01, 10)).all()
    assert df["param_latent_dim"].nunique() > 1  # Optuna really proposed different configs
    assert (df["schema_version"] == results.SCHEMA_VERSION).all()
    # no --gpus-per-trial: Ray hides every GPU from the trials (CUDA_VISIBLE_DEVICES=""), so "auto"
    # means the CPU on any machine
    assert (df["device"] == "cpu").all()
    for ck in df["checkpoint"]:  # relative to the study folder, and loadable safely
        from vae import checkpoint

        assert not ck.startswith("/")
        model, config, payload = checkpoint.load(res.folder / ck)
        assert config.epochs == 1 and payload["epoch"] == 1


def test_optuna_storage_holds_the_same_trials(four):
    spec, res, _ = four
    study = optuna.load_study(study_name=spec.name, storage=open_optuna(str(res.folder / OPTUNA_LOG)))
    trials = study.get_trials()
    assert len(trials) == 4
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
    df = results.load(res.folder)
    df = df[df["status"] != results.REFIT]  # the refit is not a trial of the search
    assert sorted(t.params["latent_dim"] for t in trials) == sorted(df["param_latent_dim"].tolist())
    best_optuna = min(t.value for t in trials if t.value is not None)
    assert best_optuna == pytest.approx(df["objective"].min())


def test_progress_and_summary(four):
    _, res, lines = four
    assert any(line.strip().startswith("start") for line in lines)
    assert sum(1 for line in lines if line.split()[0] in ("done", "pruned")) == 4
    assert res.best is not None and res.best["val_elbo"] == pytest.approx(res.trials["val_elbo"].min())


def test_refit_retrains_the_winner_on_train_and_validation(four):
    """The winner (chosen on validation) is trained again on training + validation images for its
    best epoch count: its own row, marked, never ranked, with a loadable checkpoint."""
    spec, res, lines = four
    df = results.load(res.folder)
    refit = df[df["status"] == results.REFIT]
    assert len(refit) == 1
    row = refit.iloc[0]
    win = results.winner(df, spec.mode)
    assert win["status"] != results.REFIT and row["refit_of"] == win["trial_id"] == res.best["trial_id"]
    assert row["trial_id"] == f"refit-{win['trial_id']}"
    assert row["epochs_run"] == win["best_epoch"] and row["param_latent_dim"] == win["param_latent_dim"]
    assert row["param_beta"] == pytest.approx(win["param_beta"]) and row["param_lr"] == pytest.approx(win["param_lr"])
    assert pd.isna(row["objective"]) and pd.isna(row["val_elbo"])  # validation cannot judge it
    assert np.isfinite(row["test_psnr"]) and row["test_psnr"] != win["test_psnr"]
    from vae import checkpoint
    from vae.data import load

    model, config, payload = checkpoint.load(res.folder / row["checkpoint"])
    data = load(config)
    assert payload["refit"] is True and payload["n_train"] == len(data.train) + len(data.val)
    assert config.epochs == win["best_epoch"]
    assert res.refit is not None and res.refit["trial_id"] == row["trial_id"]
    assert any(line.startswith("refit ") and "test MSE" in line for line in lines)
    # the refit's worker was started while the search's last trials ran, and took both CPUs
    assert any(line.startswith("refit: ") and line.endswith("2 CPU threads, in a worker warmed during the search")
               for line in lines), [line for line in lines if line.startswith("refit")]
    assert any(line.startswith("refit refit-") for line in summary_lines(res, spec))
    # it trains alone: on the study's own runtime it takes every free CPU, on a cluster a trial's share
    import dataclasses

    from study.runner.refit import refit_cpus

    assert refit_cpus(spec) == 2.0
    assert refit_cpus(dataclasses.replace(spec, address="auto")) == spec.cpus_per_trial == 1.0


def test_existing_study_is_not_overwritten(four):
    spec, res, _ = four
    before = sorted(p.name for p in (res.folder / "trials").iterdir())
    with pytest.raises(StudyError, match="already exists.*resume"):
        run(spec)
    assert sorted(p.name for p in (res.folder / "trials").iterdir()) == before


@pytest.mark.slow
def test_failing_trial_is_recorded_and_study_goes_on(ray_local, tmp_path):
    # lr = 9 with beta = 1000 diverges to NaN within the first epoch; lr = 1e-3 trains fine.
    spec = build_spec({"train": {"beta": 1000.0, "latent_dim": 4}},
                      {"name": "nan", "storage": str(tmp_path), "epochs": 2, "max_train_images": 300,
                       "grid": {"lr": [9.0, 0.001]}, "num_cpus": 2})
    res = run(spec, printer=lambda s: None)
    df = res.trials.set_index("param_lr")
    assert len(df) == 2
    assert df.loc[9.0, "status"] == "failed" and "non-finite" in df.loc[9.0, "error"]
    assert df.loc[0.001, "status"] == "completed" and df.loc[0.001, "epochs_run"] == 2
    study = optuna.load_study(study_name="nan", storage=open_optuna(str(res.folder / OPTUNA_LOG)))
    states = sorted(t.state.name for t in study.get_trials())
    assert states == ["COMPLETE", "FAIL"]


@pytest.mark.slow
def test_asha_prunes_weak_trials(ray_local, tmp_path):
    spec = build_spec(None, {"name": "asha", "storage": str(tmp_path), "trials": 6, "epochs": 4,
                             "max_train_images": 300, "num_cpus": 2, "max_concurrent": 1,
                             "grace_period": 1, "reduction_factor": 2})
    res = run(spec, printer=lambda s: None)
    df = res.trials
    assert len(df) == 6
    assert (df["status"] == "pruned").any(), df[["status", "epochs_run"]]
    pruned = df[df.status == "pruned"]
    assert (pruned["epochs_run"] < 4).all()
    epochs = results.load(res.folder, "epochs")
    assert len(epochs) == df["epochs_run"].sum()
    # Optuna tells the same story, read back through its own API as optuna-dashboard does:
    # ASHA's stopped trials are PRUNED, and every trial has a value for every epoch it ran.
    study = optuna.load_study(study_name="asha", storage=open_optuna(str(res.folder / OPTUNA_LOG)))
    by_params = {(t.params["latent_dim"], round(t.params["lr"], 12)): t for t in study.trials}
    assert len(study.trials) == 6
    for _, row in df.iterrows():
        t = by_params[(row["param_latent_dim"], round(row["param_lr"], 12))]
        want = optuna.trial.TrialState.PRUNED if row["status"] == "pruned" else optuna.trial.TrialState.COMPLETE
        assert t.state == want, (row["trial_id"], row["status"], t.state)
        assert sorted(t.intermediate_values) == list(range(1, int(row["epochs_run"]) + 1))
        # the value at each epoch is the best -ELBO so far, as ASHA saw it
        ep = epochs[epochs.trial_id == row["trial_id"]].sort_values("epoch")
        assert [t.intermediate_values[e] for e in ep["epoch"]] == pytest.approx(ep["val_elbo"].cummin().tolist())


def _tensorboard_scalars(folder, tag: str) -> dict[int, float]:
    """step -> value of one scalar in a trial's TensorBoard event files (TFRecord framing: length,
    its CRC, the Event proto, its CRC), read with tensorboardX's own protobuf classes."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[int, float] = {}
    for path in folder.glob("events.out.tfevents.*"):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                if v.tag == tag:
                    out[event.step] = v.simple_value
    return out


@pytest.mark.slow
def test_reports_carry_the_epochs_between_decisions(ray_local, tmp_path):
    """Without ASHA a trial reports at its last epoch (and every few seconds); the epochs before
    it ride along in that report, and every per-epoch record still gets every epoch: the epochs
    table, Optuna's intermediate values, Tune's progress.csv, TensorBoard, a user's callback."""
    from ray import tune

    import study as api

    class Count(tune.Callback):
        def __init__(self):
            self.results, self.epochs = 0, []

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.results += 1
            self.epochs += [(trial.trial_id, r["epoch"]) for r in api.each_epoch(result)]

    count = Count()
    spec = build_spec(None, {"name": "carry", "storage": str(tmp_path), "trials": 2, "epochs": 5,
                             "max_train_images": 300, "num_cpus": 2, "scheduler": "none", "refit": False})
    res = api.run(spec, printer=lambda s: None, callbacks=[count])
    df = res.trials
    assert list(df["status"]) == ["completed", "completed"]
    assert sorted(count.epochs) == sorted((t, e) for t in df["trial_id"] for e in range(1, 6))
    assert count.results < len(count.epochs)  # 5 epochs of 300 images take well under the 5 s between reports
    epochs = results.load(res.folder, "epochs")
    assert len(epochs) == 10 and epochs.groupby("trial_id")["val_elbo"].nunique().tolist() == [5, 5]
    study = optuna.load_study(study_name="carry", storage=open_optuna(str(res.folder / OPTUNA_LOG)))
    assert [sorted(t.intermediate_values) for t in study.trials] == [[1, 2, 3, 4, 5]] * 2
    for tid in df["trial_id"]:
        ep = epochs[epochs.trial_id == tid].sort_values("epoch")
        trial_dir = res.folder / "tune" / f"trial_{tid}"
        csv = pd.read_csv(trial_dir / "progress.csv")
        assert csv["epoch"].tolist() == [1, 2, 3, 4, 5] and csv["training_iteration"].tolist() == [1, 2, 3, 4, 5]
        assert csv["val_elbo"].tolist() == pytest.approx(ep["val_elbo"].tolist())
        board = _tensorboard_scalars(trial_dir, "ray/tune/val_elbo")
        assert sorted(board) == [1, 2, 3, 4, 5]
        assert [board[e] for e in range(1, 6)] == pytest.approx(ep["val_elbo"].tolist(), rel=1e-6)
    # Optuna's value at each epoch is the best -ELBO so far, for every epoch of both trials
    want = sorted(v for tid in df["trial_id"]
                  for v in epochs[epochs.trial_id == tid].sort_values("epoch")["val_elbo"].cummin())
    got = sorted(v for t in study.trials for v in t.intermediate_values.values())
    assert got == pytest.approx(want)


@pytest.mark.slow
def test_a_val_mse_study_keeps_and_reports_each_trials_best_mse_epoch(ray_local, tmp_path):
    """With --objective val_mse a trial's best epoch is its lowest validation MSE's, not its lowest
    -ELBO's: at beta 0.002 the two differ (the -ELBO is best at epoch 1 and rises while the MSE
    falls). The trials row, the checkpoint it keeps and Optuna's values all follow the MSE."""
    from vae import checkpoint as ckpt_io
    from vae.train import evaluate_loss

    spec = build_spec(None, {"name": "mse", "storage": str(tmp_path), "epochs": 4, "objective": ["val_mse"],
                             "grid": {"beta": [0.002, 1.0]}, "latent_dim": 32, "lr": 3e-3,
                             "max_train_images": 1200, "scheduler": "none", "refit": False, "num_cpus": 2})
    assert spec.select == ("val_mse", "min")
    res = run(spec, printer=lambda s: None)
    epochs = results.load(res.folder, "epochs")
    study = optuna.load_study(study_name="mse", storage=open_optuna(str(res.folder / OPTUNA_LOG)))
    differs = 0
    for _, row in res.trials.iterrows():
        ep = epochs[epochs.trial_id == row["trial_id"]].sort_values("epoch").reset_index(drop=True)
        at = int(ep["val_mse"].idxmin())
        assert row["best_epoch"] == ep["epoch"][at] and row["objective"] == pytest.approx(ep["val_mse"][at])
        assert row["val_elbo"] == pytest.approx(ep["val_elbo"][at])  # every metric read at that epoch
        differs += int(ep["epoch"][int(ep["val_elbo"].idxmin())] != row["best_epoch"])
        model, config, payload = ckpt_io.load(res.folder / row["checkpoint"])
        assert payload["epoch"] == row["best_epoch"]
        from vae.data import load
        x_val = load(config).val.pixels()
        assert evaluate_loss(model, x_val, config.beta)["mse"] == pytest.approx(row["objective"], rel=1e-5)
        t = next(t for t in study.trials if np.isclose(t.params["beta"], row["param_beta"]))
        assert [t.intermediate_values[e] for e in ep["epoch"]] == pytest.approx(ep["val_mse"].cummin().tolist())
        assert t.value == pytest.approx(row["objective"])
    assert differs >= 1  # the case the rule is for happened


@pytest.mark.slow
def test_rate_distortion_pareto_study(ray_local, tmp_path):
    spec = build_spec(None, {"name": "rd", "storage": str(tmp_path), "trials": 3, "epochs": 2,
                             "max_train_images": 300, "objective": ["val_recon", "val_kl"], "num_cpus": 2})
    assert spec.multi_objective and spec.scheduler == "none"
    res = run(spec, printer=lambda s: None)
    assert len(res.trials) == 3 and (res.trials["status"] == "completed").all()
    study = optuna.load_study(study_name="rd", storage=open_optuna(str(res.folder / OPTUNA_LOG)))
    assert len(study.directions) == 2 and len(study.best_trials) >= 1
    for t in study.trials:  # Optuna got (recon, KL) at each trial's best -ELBO epoch
        df = res.trials
        row = df[(df["param_latent_dim"] == t.params["latent_dim"]) & np.isclose(df["param_beta"], t.params["beta"])
                 & np.isclose(df["param_lr"], t.params["lr"])]
        assert len(row) == 1
        assert t.values == pytest.approx([row.iloc[0]["val_recon"], row.iloc[0]["val_kl"]])


@pytest.mark.slow
def test_a_study_reruns_exactly_with_one_trial_at_a_time(ray_local, tmp_path):
    """--seed fixes TPE's proposals and every trial's initialisation, batches and noise; with one
    trial at a time the proposals cannot depend on which trial finished first, so the same study
    twice gives the same trials table, timings and ids apart."""
    def once(name: str) -> pd.DataFrame:
        spec = build_spec(None, {"name": name, "storage": str(tmp_path), "trials": 5, "epochs": 3, "seed": 3,
                                 "max_train_images": 300, "num_cpus": 2, "max_concurrent": 1})
        df = run(spec, printer=lambda s: None).trials.sort_values("started_at").reset_index(drop=True)
        return df[["status", "param_latent_dim", "param_beta", "param_lr", "epochs_run", "best_epoch",
                   "val_elbo", "val_mse", "test_mse", "objective"]]

    first, second = once("a"), once("b")
    assert first["param_latent_dim"].nunique() > 1  # a real search, not one point
    pd.testing.assert_frame_equal(first, second, rtol=1e-9, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["tpe", "random", "qmc", "cmaes", "gp", "nsgaii"])
def test_every_sampler_runs_a_seeded_study_that_reruns_exactly(ray_local, tmp_path, sampler):
    """Each sampler, on a smoke-size study with one trial at a time: it proposes, it is recorded
    in study.json and in Optuna's storage, and the same seed gives the same trials again."""
    import json

    lines: list[str] = []

    def once(name: str) -> pd.DataFrame:
        spec = build_spec(None, {"name": name, "storage": str(tmp_path), "trials": 5, "epochs": 2, "seed": 5,
                                 "max_train_images": 200, "num_cpus": 2, "max_concurrent": 1, "sampler": sampler,
                                 "refit": False})
        df = run(spec, printer=lines.append).trials.sort_values("started_at").reset_index(drop=True)
        return df[["status", "param_latent_dim", "param_beta", "param_lr", "epochs_run", "val_elbo"]]

    first = once("a")
    recorded = json.loads((tmp_path / "a" / "study.json").read_text())
    assert recorded["sampler"] == sampler
    # one trial at a time: TPE had nothing to lie about, and study.json says what ran
    assert recorded["constant_liar"] is (False if sampler == "tpe" else None)
    assert any(f"sampler {sampler}" in ln for ln in lines)
    assert len(first) == 5 and first["param_latent_dim"].nunique() > 1  # it searched
    stored = optuna.load_study(study_name="a", storage=open_optuna(str(tmp_path / "a" / OPTUNA_LOG)))
    assert len(stored.trials) == 5
    pd.testing.assert_frame_equal(first, once("b"), rtol=1e-9, atol=0)


def test_optuna_dashboard_opens_the_journal_the_summary_names(four):
    """The summary's line for optuna-dashboard works as printed: the dashboard reads the study's
    journal file and shows its trials."""
    import json
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from study.cli import summary_lines

    spec, res, _ = four
    path = str(res.folder / OPTUNA_LOG)
    line = next(ln for ln in summary_lines(res, spec) if ln.startswith("optuna:"))
    assert f"optuna-dashboard {path}" in line, line
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = os.path.join(os.path.dirname(sys.executable), "optuna-dashboard")
    dash = subprocess.Popen([exe, path, "--port", str(port), "--host", "127.0.0.1", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    shown = None
    try:
        deadline = time.time() + 60
        while time.time() < deadline and dash.poll() is None and shown is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    listing = json.loads(r.read())
                sid = next(s["study_id"] for s in listing["study_summaries"] if s["study_name"] == "four")
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{sid}", timeout=5) as r:
                    shown = json.loads(r.read())
            except OSError:
                time.sleep(0.3)
    finally:
        dash.terminate()
        err = dash.communicate(timeout=30)[1].decode(errors="replace")
    assert shown is not None, err[-2000:]
    assert len(shown["trials"]) == 4


@pytest.mark.slow
def test_a_packed_study_trains_each_trial_as_it_would_alone(ray_local, tmp_path):
    """--pack 2 on the CPU: two trials at a time train as one stacked model in a pack actor, and
    each is still a trial everywhere: its own rows, checkpoint and Optuna trial, ASHA's stops,
    and every epoch's validation -ELBO equals its configuration trained alone by fit (same
    seed). A stopped trial stops costing compute: the packs trained exactly the epochs recorded."""
    from vae import checkpoint as ckpt_io
    from vae.config import TrainConfig
    from vae.data import load
    from vae.train import fit

    spec = build_spec(None, {"name": "packed", "storage": str(tmp_path), "trials": 6, "epochs": 4,
                             "max_train_images": 300, "num_cpus": 2, "pack": 2, "grace_period": 1,
                             "refit": False})
    assert spec.pack == 2
    lines: list[str] = []
    res = run(spec, printer=lines.append)
    assert any(line.startswith("pack: up to 2") for line in lines)
    said = next(line for line in lines if line.startswith("packs: "))  # what the packs did, counted by them
    assert f"trained {len(results.load(res.folder, 'epochs'))} trial-epochs" in said, said
    df = res.trials
    assert len(df) == 6 and set(df["status"]) == {"completed", "pruned"}, df["status"]
    assert df["pack"].notna().all() and df["pack"].str.startswith("vae-pack:packed:").all()
    epochs = results.load(res.folder, "epochs")
    assert epochs["pack_members"].max() == 2  # two trials trained in one round
    study = optuna.load_study(study_name="packed", storage=open_optuna(str(res.folder / OPTUNA_LOG)))
    assert len(study.trials) == 6 and {t.state.name for t in study.trials} == {"COMPLETE", "PRUNED"}
    for _, row in df.iterrows():
        _, config, payload = ckpt_io.load(res.folder / row["checkpoint"])
        alone = fit(TrainConfig.from_dict(config.to_dict()), load(config))
        ep = epochs[epochs.trial_id == row["trial_id"]].sort_values("epoch")
        assert len(ep) == row["epochs_run"]
        want = [h["val_elbo"] for h in alone.history[:len(ep)]]
        assert ep["val_elbo"].tolist() == pytest.approx(want, rel=2e-4)
        assert row["best_epoch"] == payload["epoch"] == 1 + int(np.argmin(want))
    from study.runner.packing import pack_actors

    assert pack_actors("packed") == []  # removed at the end


@pytest.mark.slow
def test_a_pack_whose_worker_is_killed_mid_study_retries_its_members_from_their_checkpoints(ray_local, tmp_path):
    """SIGKILL the pack actor's process while its members train: each member's trial fails as a
    trial whose worker died, Tune retries it (--max-failures) from its last checkpoint in a new
    pack, and the study ends whole: every trial completed, every epoch recorded once."""
    import os
    import signal
    import threading

    import ray
    from ray import tune

    from study.runner.packing import pack_actors

    killed: list[int] = []

    class KillPackOnce(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if killed or result.get("epoch", 0) < 2:
                return
            actors = pack_actors("packkill")
            if actors:
                pid = ray.get(actors[0].info.remote())["pid"]
                killed.append(pid)
                threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()  # mid-round, not mid-report

    # ASHA's rungs (1, 2, 4) are where checkpoints persist: a retried trial continues from one
    spec = build_spec(None, {"name": "packkill", "storage": str(tmp_path), "trials": 4, "epochs": 5,
                             "max_train_images": 600, "num_cpus": 2, "pack": 2, "grace_period": 1,
                             "refit": False, "max_failures": 3, "hidden": 1000})
    res = run(spec, printer=lambda s: None, callbacks=[KillPackOnce()])
    assert killed, "the pack was never killed"
    df = res.trials
    assert len(df) == 4 and df["status"].isin(["completed", "pruned"]).all(), df[["status", "error"]]
    retried = df[df["attempts"] > 1]
    assert len(retried) and (retried["restored_from_epoch"] >= 1).any(), df[["attempts", "restored_from_epoch"]]
    epochs = results.load(res.folder, "epochs")
    counts = epochs.groupby("trial_id")["epoch"].agg(["count", "nunique", "max"])
    runs = df.set_index("trial_id")["epochs_run"]
    assert (counts["count"] == runs[counts.index]).all() and (counts["nunique"] == counts["count"]).all()
