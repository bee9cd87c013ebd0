"""SIGKILL the driver of a real study mid-way, then `vae-study resume`: no trial lost, none duplicated."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest
import pyarrow.parquet as pq

from conftest import REPO, run_cli
from study import results
from study.store.optuna_storage import open_optuna

N = 6


def test_resume_after_sigkill(tmp_path):
    storage = tmp_path / "studies"
    cmd = [sys.executable, "-m", "study", "run", "--name", "k", "--storage", str(storage), "--trials", str(N),
           "--epochs", "4", "--num-cpus", "2", "--max-train-images", "400", "--no-early-stopping"]
    driver = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trials_dir = storage / "k" / "trials"
    deadline = time.time() + 240
    while time.time() < deadline:
        done = list(trials_dir.glob("*.parquet")) if trials_dir.is_dir() else []
        if len(done) >= 2:
            break
        time.sleep(0.2)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    assert 2 <= len(done) < N, "the kill must land mid-study"
    before = {p.stem: pq.read_table(p).column("finished_at")[0].as_py() for p in done}

    r = run_cli("resume", "--name", "k", "--storage", str(storage), "--num-cpus", "2", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    everything = results.load(storage / "k")
    df = results.search_trials(everything)
    assert (everything["status"] == results.REFIT).sum() == 1
    assert len(df) == N and df["trial_id"].is_unique
    assert (df["status"] == "completed").all() and (df["epochs_run"] == 4).all()
    # the trials that had finished before the kill were kept as they were, not run again
    for tid, finished in before.items():
        assert df.set_index("trial_id").loc[tid, "finished_at"] == finished
    # every trial has each of its epochs exactly once
    ep = results.load(storage / "k", "epochs")
    counts = ep.groupby("trial_id")["epoch"].agg(["count", "nunique", "max"])
    assert (counts["count"] == 4).all() and (counts["nunique"] == 4).all() and (counts["max"] == 4).all()
    # Optuna agrees: N finished trials, nothing left RUNNING, no extra completed ones
    study = optuna.load_study(study_name="k", storage=open_optuna(str(storage / "k" / "optuna.log")))
    states = [t.state for t in study.get_trials()]
    assert states.count(optuna.trial.TrialState.COMPLETE) == N
    assert optuna.trial.TrialState.RUNNING not in states
    assert sorted(t.params["latent_dim"] for t in study.get_trials() if t.state.name == "COMPLETE") == sorted(
        df["param_latent_dim"].tolist()
    )


def test_resume_of_unknown_study_is_a_clear_error(tmp_path):
    r = run_cli("resume", "--name", "nope", "--storage", str(tmp_path))
    assert r.returncode == 2 and "no study 'nope'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _epochs_run(path) -> int:
    try:
        return pq.read_table(path).num_rows
    except Exception:  # not written yet
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("objective, packed", [("val_elbo", False), ("val_mse", False), ("val_elbo", True)])
def test_a_resumed_trial_continues_from_its_checkpoint_exactly(tmp_path, objective, packed):
    """Kill the driver after the trial persisted a checkpoint at epoch k (an ASHA rung); after
    `resume` the trial continues at k+1 (restored_from_epoch = k), its epoch rows are 1..N once
    each, and every epoch equals an uninterrupted run of the same configuration: the restored
    weights and optimiser state are the checkpoint's, and so is the best epoch so far by the
    study's objective (val_mse: the trial selects its best epoch by it)."""
    toml = tmp_path / "s.toml"
    # a wide MLP makes an epoch take a couple of seconds, so the kill can land between rungs
    toml.write_text('[train]\nhidden = 4000\nlatent_dim = 8\n\n[scheduler]\ntype = "asha"\n')
    storage = tmp_path / "studies"
    args = [str(toml), "--storage", str(storage), "--grid", "lr=0.001", "--epochs", "12", "--num-cpus", "1",
            "--grace-period", "1", "--reduction-factor", "2", "--no-refit",  # the refit is not what is tested
            "--objective", objective, *(["--pack", "1"] if packed else ["--no-pack"])]
    ref = run_cli("run", "--name", "ref", *args)
    assert ref.returncode == 0, ref.stderr[-2000:]

    driver = subprocess.Popen([sys.executable, "-m", "study", "run", "--name", "cut", *args], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    epochs_dir = storage / "cut" / "epochs"
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        files = list(epochs_dir.glob("*.parquet")) if epochs_dir.is_dir() else []
        if files and _epochs_run(files[0]) >= 5:  # the rung-4 checkpoint is persisted; rung 8 is not
            break
        time.sleep(0.1)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    seen = _epochs_run(files[0])
    assert 5 <= seen < 12, f"the kill must land between rungs ({seen} epochs)"

    r = run_cli("resume", "--name", "cut", "--storage", str(storage), "--num-cpus", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    trial = results.load(storage / "cut").iloc[0]
    assert str(trial["pack"]).startswith("vae-pack:cut:") if packed else pd.isna(trial["pack"])
    k = int(trial["restored_from_epoch"])
    assert k in (1, 2, 4, 8) and k <= seen, k  # continued from a persisted rung, not from scratch
    assert trial["status"] == "completed" and trial["epochs_run"] == 12
    ep = results.load(storage / "cut", "epochs").sort_values("epoch")
    assert ep["epoch"].tolist() == list(range(1, 13))
    ref_ep = results.load(storage / "ref", "epochs").sort_values("epoch")
    for col in ("train_loss", "val_elbo", "val_mse"):
        assert ep[col].tolist() == pytest.approx(ref_ep[col].tolist(), rel=1e-6), col
    ref_trial = results.load(storage / "ref").iloc[0]
    assert trial["best_epoch"] == ref_trial["best_epoch"] == ep["epoch"][ep[objective].idxmin()]
    assert trial["objective"] == pytest.approx(ref_trial["objective"], rel=1e-6)


def test_reconcile_makes_tunes_saved_state_and_optuna_agree_with_the_trials_rows(tmp_path):
    """What a killed driver leaves, built by hand: Tune's saved state older than the rows and the
    Optuna study (it saves every few seconds), a row written but not told, Optuna trials asked
    that Tune never saved. ``reconcile`` (Tune's own files, read and written with Tune's own
    helpers; a real SQLite Optuna study, asked through the study's searcher) mends each, and the
    restored searcher hands the orphans to the next trials Tune makes."""
    import json

    from ray.tune.utils.util import _atomic_save, _load_newest_checkpoint

    from study import build_spec
    from study.search.searcher import TUNE_TRIAL
    from study.runner.restore import reconcile
    from study.search.searcher import make_searcher
    from study.store.location import Location
    from study.store.optuna_storage import OptunaDB

    spec = build_spec(None, {"name": "s", "storage": str(tmp_path), "trials": 8, "epochs": 4})
    study = Location(tmp_path / "s")
    db = OptunaDB(study)
    searcher = make_searcher(spec, db, concurrent=3)
    asked = {tid: searcher.suggest(tid) for tid in "abcdef"}  # each Optuna trial names its Tune trial
    searcher._ot_study.ask()  # asked, then killed before it was named
    state = optuna.trial.TrialState

    def row(tid: str, status: str, objective: float | None) -> None:
        results.write_trial(study, tid, {"status": status, "objective": objective, "val_elbo": objective,
                                         "finished_at": None}, [], [])

    # recorded and told (the normal case), recorded and not told (killed between the two),
    # recorded and never saved by Tune, a refit's row (never a trial of the search)
    row("d", "pruned", None)
    searcher.tell_recorded("d", {"status": "pruned"})
    row("a", "completed", 150.5)
    row("e", "completed", 149.0)
    row("refit-e", "refit", None)
    searcher.save(str(tmp_path / "searcher.pkl"))
    # what Tune saves every few seconds: not the Optuna study and its cache of every trial (the
    # restore reads those from the storage), but which Optuna trial each Tune trial is
    import pickle

    saved_searcher = pickle.loads((tmp_path / "searcher.pkl").read_bytes())
    assert "_ot_study" not in saved_searcher and "_storage" not in saved_searcher
    assert saved_searcher["_ot_trials"] == {tid: t._trial_id for tid, t in searcher._ot_trials.items()}
    assert set(saved_searcher["_ot_trials"]) == set("abcdef")

    tune_dir = tmp_path / "s" / "tune"
    tune_dir.mkdir()
    entry = lambda tid, status, err=None: [json.dumps({"trial_id": tid, "status": status}),  # noqa: E731
                                           json.dumps({"error_filename": err, "pickled_error_filename": err})]
    saved = {"trial_data": [entry("a", "PENDING"), entry("b", "PENDING"), entry("c", "ERROR", "error.txt"),
                            entry("d", "TERMINATED")], "runner_data": {}, "stats": {}}
    (tune_dir / "experiment_state-2026.json").write_text(json.dumps(saved))
    gen = "search_gen_state-2026.json"
    _atomic_save({"counter": 4, "total_samples": 8, "finished": False, "experiment": None,
                  "name:ConcurrencyLimiter": {"live_trials": {"a", "b", "c"}, "num_unfinished_live_trials": 3}},
                 str(tune_dir), gen, "t")

    fixed = reconcile(study, db, spec)
    assert fixed.recorded == 3 and fixed.saved == ["a", "b", "c", "d"]
    assert fixed.finished_in_tune == ["a"] and fixed.continued == ["c"] and fixed.unfinished == ["b", "c"]
    assert fixed.unsaved_recorded == ["e"] and fixed.counter == (4, 5) and sorted(fixed.told) == ["a", "e"]
    assert fixed.made == []
    trials = {json.loads(t[0])["trial_id"]: (json.loads(t[0])["status"], json.loads(t[1])["error_filename"])
              for t in json.loads((tune_dir / "experiment_state-2026.json").read_text())["trial_data"]}
    assert trials == {"a": ("TERMINATED", None), "b": ("PENDING", None), "c": ("PENDING", None),
                      "d": ("TERMINATED", None)}
    g = _load_newest_checkpoint(str(tune_dir), gen)
    assert g["counter"] == 5 and g["finished"] is False
    assert g["name:ConcurrencyLimiter"]["live_trials"] == {"b", "c"}
    assert g["name:ConcurrencyLimiter"]["num_unfinished_live_trials"] == 2
    ot = {t.system_attrs.get(TUNE_TRIAL): t for t in
          optuna.load_study(study_name="s", storage=open_optuna(db.url)).get_trials(deepcopy=False)}
    assert ot["a"].state == state.COMPLETE and ot["a"].value == 150.5
    assert ot["e"].state == state.COMPLETE and ot["d"].state == state.PRUNED
    assert ot["b"].state == ot["c"].state == ot["f"].state == state.RUNNING
    assert fixed.orphans == [ot["f"]._trial_id, ot[None]._trial_id]  # f: never saved by Tune; the unnamed one
    again = reconcile(study, db, spec)
    assert again.told == [] and again.made == []  # a second pass changes nothing more

    # Tune's restore of the searcher: the map from Tune trials to Optuna trials, and which are
    # finished, come from the storage; the next trials Tune makes take the orphans, in order.
    searcher.attach(db, orphans=fixed.orphans)
    searcher.restore(str(tmp_path / "searcher.pkl"))
    assert searcher._completed_trials == {"a", "d", "e"}
    assert searcher.suggest("g") == asked["f"]
    # the unnamed orphan was killed before Optuna stored any of its parameters: they are drawn now
    h = searcher.suggest("h")
    assert set(h) == set(asked["a"]) == {"latent_dim", "beta", "lr"}
    trials = optuna.load_study(study_name="s", storage=open_optuna(db.url)).trials
    assert {t.system_attrs.get(TUNE_TRIAL) for t in trials} == set("abcdegh") and len(trials) == 7
    assert next(t for t in trials if t.system_attrs.get(TUNE_TRIAL) == "h").params == h


def test_reconcile_makes_what_a_stale_optuna_snapshot_lacks_from_the_rows_and_tunes_state(tmp_path):
    """A study in a bucket resumes from an Optuna snapshot published every 30 s: it may lack a
    trial recorded since (made from its row: parameters, intermediate values from the epochs
    table, result) and one Tune saved unfinished (made from Tune's config of it), and a start-up
    point it still holds as waiting is taken rather than asked again."""
    import json

    from study import build_spec
    from study.search.searcher import TUNE_TRIAL
    from study.runner.restore import reconcile
    from study.search.searcher import make_searcher
    from study.store.location import Location
    from study.store.optuna_storage import OptunaDB

    spec = build_spec(None, {"name": "s", "storage": str(tmp_path), "trials": 8, "epochs": 4, "startup_trials": 3})
    study = Location(tmp_path / "s")
    db = OptunaDB(study)
    searcher = make_searcher(spec, db, concurrent=2)  # three Sobol start-up points wait in Optuna
    ot = searcher._ot_study
    sobol = [t.system_attrs["fixed_params"] for t in ot.get_trials() if t.state.name == "WAITING"]
    assert len(sobol) == 3
    # "r": recorded on a start-up point's parameters; "n": a new configuration, recorded;
    # "u": saved unfinished by Tune, with two epochs recorded; none of them in the snapshot
    new = {"latent_dim": 7, "beta": 0.5, "lr": 1e-3}
    for tid, params, status, epochs in (("r", sobol[1], "completed", [(1, 200.0), (2, 190.0), (3, 195.0), (4, 185.0)]),
                                        ("n", new, "pruned", [(1, 250.0)])):
        best = min(v for _, v in epochs)
        results.write_trial(study, tid, {"status": status, "objective": best, "val_elbo": best, "finished_at": None,
                                         **{f"param_{k}": v for k, v in params.items()}},
                            [{"epoch": e, "val_elbo": v} for e, v in epochs], [])
    # "v": asked, and in the snapshot, before the two epochs it reported since
    v_params = searcher.suggest("v")
    for tid in ("u", "v"):
        results.write_rows(study, "epochs", tid, [{"study": "s", "trial_id": tid, "epoch": e, "val_elbo": v}
                                                  for e, v in ((1, 300.0), (2, 280.0))])
    tune_dir = tmp_path / "s" / "tune"
    tune_dir.mkdir()
    meta = json.dumps({"error_filename": None, "pickled_error_filename": None})
    entries = [[json.dumps({"trial_id": "u", "status": "PENDING", "config": {**sobol[2], "epochs": 4}}), meta],
               [json.dumps({"trial_id": "v", "status": "PENDING", "config": {**v_params, "epochs": 4}}), meta]]
    (tune_dir / "experiment_state-2026.json").write_text(json.dumps({"trial_data": entries, "runner_data": {}}))

    fixed = reconcile(study, db, spec)
    assert sorted(fixed.made) == ["n", "r", "u"] and sorted(fixed.told) == ["n", "r"] and fixed.orphans == []
    got = {t.system_attrs.get(TUNE_TRIAL): t for t in optuna.load_study(study_name="s", storage=open_optuna(db.url)).get_trials()}
    assert got["r"].state.name == "COMPLETE" and got["r"].value == 185.0 and got["r"].params == sobol[1]
    assert got["r"].intermediate_values == {1: 200.0, 2: 190.0, 3: 190.0, 4: 185.0}  # best -ELBO so far
    assert got["n"].state.name == "PRUNED" and got["n"].params == new and got["n"].intermediate_values == {1: 250.0}
    assert got["u"].state.name == "RUNNING" and got["u"].params == sobol[2] and got["v"].params == sobol[0]
    assert got["u"].intermediate_values == {1: 300.0, 2: 280.0} == got["v"].intermediate_values
    assert got["v"].state.name == "RUNNING" and "v" not in fixed.made
    # "v" took the first start-up point when it was asked; "r" and "u" the next two: none is left
    # waiting, and none was asked again
    assert len(got) == 4 and None not in got


@pytest.mark.parametrize("where", ["folder", "bucket"])
def test_reconcile_remakes_the_checkpoint_tunes_saved_state_names_where_tune_deleted_it(tmp_path, where):
    """What a kill leaves between Tune's deletion of a trial's oldest checkpoint (the instant a
    newer one registers) and its next save of the state: the state names checkpoints 0 and 1;
    0 and 1 are gone, 2 and 3 were registered since, and 4 was being written. The resume remakes
    1 (the newest named) from 2 (the oldest newer one with optimiser state), stands a marker in
    for 0 (Tune deletes it again, and fails on a path that is gone), and deletes 2 to 4 (the
    trial writes them again). A resume killed as it remade 1 (its state.pt not yet written) is
    mended by the next. The real kill: tests/test_kill_anywhere.py."""
    import contextlib

    from ray import tune
    from ray.train._internal.checkpoint_manager import _CheckpointManager, _TrainingResult
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    from s3 import BUCKET, s3_server
    from study.runner.restore import _STAND_IN, Reconciled, _mend_checkpoints
    from study.store.location import Location

    with (s3_server() if where == "bucket" else contextlib.nullcontext()):
        study = Location(f"s3://{BUCKET}/mend" if where == "bucket" else str(tmp_path / "s"))
        folder = "tune/trial_t"
        meta = _TrainingRunMetadata()
        meta.checkpoint_manager = _CheckpointManager(tune.CheckpointConfig(num_to_keep=2))
        for i in (0, 1):
            path = f"{study.path}/{folder}/checkpoint_00000{i}"
            meta.checkpoint_manager.register_checkpoint(
                _TrainingResult(checkpoint=tune.Checkpoint(path, study.fs), metrics={"epoch": 2 * i + 1}))
        saved = meta.get_json_state()
        for i in (2, 3):
            for name in ("model.pt", "state.pt"):
                study.write_bytes(f"{folder}/checkpoint_00000{i}/{name}", f"{name} {i}".encode())
        study.write_bytes(f"{folder}/checkpoint_000004/model.pt", b"model.pt 4")  # cut short by the kill
        study.write_bytes(f"{folder}/result.json", b"{}")

        def files() -> dict[str, bytes]:
            return {p.removeprefix(f"{folder}/"): study.read_bytes(p) for p in study.walk(folder)}

        out = Reconciled()
        _mend_checkpoints(study, "t", saved, out)
        assert out.remade == ["t"]
        assert files() == {"checkpoint_000001/model.pt": b"model.pt 2", "checkpoint_000001/state.pt": b"state.pt 2",
                           f"checkpoint_000000/{_STAND_IN}": files()[f"checkpoint_000000/{_STAND_IN}"],
                           "result.json": b"{}"}
        again = Reconciled()
        _mend_checkpoints(study, "t", saved, again)  # nothing more to do
        assert again.remade == [] and len(files()) == 4

        # a resume killed as it remade checkpoint 1: its state.pt not yet written, 2 still there
        study.delete(f"{folder}/checkpoint_000001/state.pt")
        for name in ("model.pt", "state.pt"):
            study.write_bytes(f"{folder}/checkpoint_000002/{name}", f"{name} 2".encode())
        third = Reconciled()
        _mend_checkpoints(study, "t", saved, third)
        assert third.remade == ["t"] and files()["checkpoint_000001/state.pt"] == b"state.pt 2"
        assert not any(p.startswith("checkpoint_000002") for p in files())


def test_a_checkpoint_continues_with_the_best_score_of_its_own_rule():
    """state.pt holds the best epoch's score and the rule that chose it; one written before trials
    selected by their objective holds best_val_elbo only, and a val_mse study then continues from
    the MSE its best values recorded at that epoch."""
    from study.runner.trainable import _restored_score
    from vae.train import score

    new = {"best_score": 0.031, "select": ["val_mse", "min"], "best_val_elbo": 999.0}
    assert _restored_score(new, {}, "val_mse", "min", score) == 0.031
    old = {"best_val_elbo": 120.5}
    assert _restored_score(old, {"best_val_mse": 0.04}, "val_elbo", "min", score) == 120.5
    assert _restored_score(old, {"best_val_mse": 0.04}, "val_mse", "min", score) == 0.04
    assert _restored_score(old, {"best_val_kl": 20.0}, "val_kl", "max", score) == -20.0
    assert _restored_score(old, {}, "val_mse", "min", score) == float("inf")  # nothing recorded: the next epoch is best
