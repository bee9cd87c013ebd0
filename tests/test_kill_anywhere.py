"""SIGKILL a study's driver at any moment, then `vae-study resume`: the study comes out whole.

One small seeded study is run whole to time it; then it is started afresh again and again, and
its driver's whole process group (the local Ray runtime included) is killed each time at another
moment: at times spread evenly over the whole run, and at the instant its output shows an event
(study.json written, the first trial started, a trial pruned, a trial completed, the third
finished, the refit, the compaction, the summary). After each kill, `resume` must exit 0 and the
study must hold every trial once, one refit, no epoch twice, and the same trials in Optuna,
none RUNNING or FAIL (``killing.check_whole``). A resume is killed too, and resumed again.
"""
from __future__ import annotations

import random
import time
from typing import Callable

import pytest

import killing
from conftest import require
from killing import EVENTS, Moment, check_whole, recorded, run_until
from s3 import BUCKET, s3_server
from study.store.location import Location

N, EPOCHS = 6, 4
STUDY = ["--trials", str(N), "--epochs", str(EPOCHS), "--num-cpus", "2", "--max-train-images", "400",
         "--grace-period", "1", "--seed", "0"]
pytestmark = pytest.mark.slow


def _moments(whole_s: float, seeds: tuple[int, ...], k: int = 6) -> list[Moment]:
    """``k`` times spread evenly over a whole run for each seed (jittered by it), then every event
    once (an event is the same moment at any seed)."""
    times = []
    for seed in seeds:
        rng = random.Random(seed)
        times += [whole_s * (i + rng.uniform(0.15, 0.85)) / k for i in range(k)]
    return [Moment(f"{t:.1f} s in", after_s=t) for t in times] + list(EVENTS)


def _kill_and_resume(storage: str, name: str, moment: Moment, optuna_url: Callable[[Location], str],
                     env_run: dict | None = None, env_resume: dict | None = None,
                     extra: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """Run the study, kill it at ``moment``, resume it (or run it again where it was killed before
    it wrote its study.json: then nothing was written, and ``run`` must work again); returns what
    happened and what is wrong with the study. ``optuna_url(study)``: where to read Optuna's."""
    killed = run_until(["run", "--name", name, "--storage", storage, *STUDY, *extra], moment, env_run or {})
    study = Location(f"{storage}/{name}")
    before = recorded(study)
    r = run_until(["resume", "--name", name, "--storage", storage, "--num-cpus", "2"], None, env_resume or {})
    text = "\n".join(r.lines)
    if r.returncode == 2 and "no study" in text:
        assert killed.at_s is not None and not study.is_file("study.json"), text[-2000:]
        r = run_until(["run", "--name", name, "--storage", storage, *STUDY, *extra], None, env_resume or {})
        text = "\n".join(r.lines)
    assert r.returncode == 0, f"{moment.name}: exit {r.returncode}\n{text[-3000:]}"
    what = f"{moment.name}: killed at {killed.at_s and round(killed.at_s, 2)} s on {killed.line!r}, {len(before)} rows"
    return what, check_whole(study, optuna_url(study), name, trials=N, epochs=EPOCHS, before=before)


def _local_optuna(study: Location) -> str:
    return str(study.local_path("optuna.log"))


def test_a_study_killed_at_any_moment_resumes_whole(tmp_path):
    """Killed at 6 times spread over the run at each of two seeds, and at every event once."""
    storage = str(tmp_path / "studies")
    whole = run_until(["run", "--name", "whole", "--storage", storage, *STUDY], None, {})
    assert whole.returncode == 0, "\n".join(whole.lines[-30:])
    assert check_whole(Location(f"{storage}/whole"), f"{storage}/whole/optuna.log", "whole",
                       trials=N, epochs=EPOCHS) == []
    t0 = time.monotonic()
    run_until(["run", "--name", "timed", "--storage", storage, *STUDY], None, {})
    whole_s = time.monotonic() - t0
    moments = _moments(whole_s, seeds=(0, 1))
    assert len(moments) >= 8 + 12
    report, problems = [], {}
    for i, moment in enumerate(moments):
        name = f"k{i}"
        what, wrong = _kill_and_resume(storage, name, moment, _local_optuna)
        report.append(f"{what}: {'; '.join(wrong) or 'whole'}")
        if wrong:
            problems[what] = wrong
    print("\n".join(report))
    assert not problems, problems


def test_a_packed_study_killed_at_any_moment_resumes_whole(tmp_path):
    """The same with --pack 2 (two trials train as one stacked model in a pack actor): killed at
    6 times spread over the run and at every event once; resume packs again (study.json)."""
    storage = str(tmp_path / "studies")
    packed = ("--pack", "2")
    t0 = time.monotonic()
    whole = run_until(["run", "--name", "whole", "--storage", storage, *STUDY, *packed], None, {})
    whole_s = time.monotonic() - t0
    assert whole.returncode == 0, "\n".join(whole.lines[-30:])
    assert any(line.startswith("pack: up to 2") for line in whole.lines), whole.lines[:6]
    assert check_whole(Location(f"{storage}/whole"), f"{storage}/whole/optuna.log", "whole",
                       trials=N, epochs=EPOCHS) == []
    report, problems = [], {}
    for i, moment in enumerate(_moments(whole_s, seeds=(2,))):
        what, wrong = _kill_and_resume(storage, f"p{i}", moment, _local_optuna, extra=packed)
        report.append(f"{what}: {'; '.join(wrong) or 'whole'}")
        if wrong:
            problems[what] = wrong
    print("\n".join(report))
    assert not problems, problems


def test_a_study_killed_the_instant_tune_deletes_a_checkpoint_its_saved_state_names_resumes_whole(tmp_path):
    """Tune deletes a trial's oldest checkpoint the instant a newer one registers, and saves the
    state that names the newer one later. With Tune's periodic save turned down, its saves come
    every second checkpoint of a trial, so a trial's third checkpoint deletes the one the saved
    state names: the driver is killed the instant that happens. Before the resume remade it,
    every such kill failed the trial for good ("Could not recover from checkpoint")."""
    storage = str(tmp_path / "studies")
    trials, epochs = 4, 10  # checkpoints at ASHA's rungs 1, 3, 9 and the last epoch
    study_args = ["--trials", str(trials), "--epochs", str(epochs), "--num-cpus", "2",
                  "--max-train-images", "400", "--grace-period", "1", "--seed", "0"]
    report, problems, remade = [], {}, 0
    for i in range(3):  # until a kill lands in the window (the first does, in every run seen)
        name = f"d{i}"
        moment = Moment("a checkpoint_000001 deleted", gone=f"{storage}/{name}/tune/trial_*/checkpoint_000001")
        killed = run_until(["run", "--name", name, "--storage", storage, *study_args], moment,
                           {"TUNE_GLOBAL_CHECKPOINT_S": "1000"})
        assert killed.at_s is not None, "\n".join(killed.lines[-20:])
        study = Location(f"{storage}/{name}")
        before = recorded(study)
        r = run_until(["resume", "--name", name, "--storage", storage, "--num-cpus", "2"], None, {})
        assert r.returncode == 0, "\n".join(r.lines[-30:])
        remade += any("remade from" in line for line in r.lines)
        wrong = check_whole(study, f"{storage}/{name}/optuna.log", name, trials=trials, epochs=epochs, before=before)
        report.append(f"killed at {killed.at_s:.2f} s on {killed.line!r}, {len(before)} rows: {'; '.join(wrong) or 'whole'}")
        if wrong:
            problems[name] = wrong
        if remade:
            break
    print("\n".join(report))
    assert not problems, problems
    assert remade, "no kill landed between Tune's deletion and its save:\n" + "\n".join(report)


def test_a_killed_resume_is_resumed_again(tmp_path):
    """A `resume` is a driver like any other: kill it mid-way, and resume again."""
    storage = str(tmp_path / "studies")
    first = run_until(["run", "--name", "r", "--storage", storage, *STUDY], killing.AT_DONE, {})
    assert first.at_s is not None, "\n".join(first.lines[-20:])
    study = Location(f"{storage}/r")
    before = recorded(study)
    second = run_until(["resume", "--name", "r", "--storage", storage, "--num-cpus", "2"],
                       Moment("a trial finished in the resume", line=r"^  (done|pruned) "), {})
    assert second.at_s is not None, "the resume ended before the kill:\n" + "\n".join(second.lines[-20:])
    assert any(line.startswith("resuming study 'r'") for line in second.lines), second.lines[:5]
    third = run_until(["resume", "--name", "r", "--storage", storage, "--num-cpus", "2"], None, {})
    assert third.returncode == 0, "\n".join(third.lines[-30:])
    assert check_whole(study, f"{storage}/r/optuna.log", "r", trials=N, epochs=EPOCHS, before=before) == []


def test_a_study_in_a_bucket_killed_at_any_moment_resumes_whole_from_an_empty_cache(tmp_path):
    """The same kills for a study in a bucket (moto's S3 server); each resume runs on "another
    machine": an empty cache, so Optuna's working copy comes from the published snapshot."""
    with s3_server():
        storage = f"s3://{BUCKET}/kill"
        t0 = time.monotonic()
        whole = run_until(["run", "--name", "whole", "--storage", storage, *STUDY], None,
                          {"VAE_STUDY_CACHE": str(tmp_path / "c-whole")})
        whole_s = time.monotonic() - t0
        assert whole.returncode == 0, "\n".join(whole.lines[-30:])
        moments = _moments(whole_s, seeds=(2,), k=3)  # 11: three times and every event
        report, problems = [], {}
        for i, moment in enumerate(moments):
            name = f"b{i}"
            snapshot = tmp_path / f"{name}.log"

            def published(study: Location) -> str:
                snapshot.write_bytes(study.read_bytes("optuna.log"))
                return str(snapshot)

            what, wrong = _kill_and_resume(storage, name, moment, published,
                                           {"VAE_STUDY_CACHE": str(tmp_path / f"c-{name}-run")},
                                           {"VAE_STUDY_CACHE": str(tmp_path / f"c-{name}-resume")})
            report.append(f"{what}: {'; '.join(wrong) or 'whole'}")
            if wrong:
                problems[what] = wrong
        print("\n".join(report))
        assert not problems, problems


def test_a_study_in_postgresql_killed_at_any_moment_frees_its_lock_and_resumes_whole(tmp_path):
    import os

    import postgres

    require(postgres.available(), "PostgreSQL's binaries (the pgserver wheel)")
    pg = postgres.start()
    try:
        env = {"PGPASSWORD": pg.password}
        os.environ["PGPASSWORD"] = pg.password  # check_whole reads the database from this process
        storage = str(tmp_path / "studies")
        url = pg.url.replace("postgresql://", "postgresql+psycopg://")
        report, problems = [], {}
        for i, moment in enumerate([killing.AT_SPEC, killing.AT_PRUNED, killing.AT_DONE, killing.AT_REFIT]):
            name = f"p{i}"
            what, wrong = _kill_and_resume(storage, name, moment, lambda _: url, env, env,
                                           ("--optuna-storage", pg.url))
            report.append(f"{what}: {'; '.join(wrong) or 'whole'}")
            if wrong:
                problems[what] = wrong
        print("\n".join(report))
        assert not problems, problems
    finally:
        os.environ.pop("PGPASSWORD", None)
        pg.stop()
