"""The Optuna study in a shared PostgreSQL database (--optuna-storage), against a real server
these tests start themselves (tests/postgres.py): a study runs, is watched live through
optuna-dashboard's API, is killed and resumed with no trial lost or doubled, and two drivers
resuming it at once from two folders are told apart by the database's own lock."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import postgres
from conftest import REPO, require, run_cli
from study import results
from study.errors import StudyError
from study.store.optuna_storage import check_rdb_url

N = 5


def test_a_password_in_the_url_is_refused_and_never_echoed(tmp_path):
    secret = "hunter2-never-shown"
    for url in (f"postgresql://vae:{secret}@db.example.com:5432/vae",
                f"postgresql://vae@db.example.com/vae?password={secret}"):
        with pytest.raises(StudyError) as exc:
            check_rdb_url(url)
        assert secret not in str(exc.value) and "PGPASSWORD" in str(exc.value)
        p = run_cli("run", "--name", "x", "--storage", str(tmp_path), "--smoke", "--optuna-storage", url)
        assert p.returncode == 2 and secret not in p.stderr + p.stdout, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    for bad, says in (("sqlite:///x.db", "postgresql://"), ("postgresql://vae@db.example.com:99999/vae", "parse"),
                      ("postgresql://vae@db1:5432,db2:x/vae", "parse")):
        with pytest.raises(StudyError, match=says):
            check_rdb_url(bad)
    assert check_rdb_url("postgresql://vae@db.example.com:5432/vae")
    assert not (tmp_path / "x").exists()


def test_libpq_url_forms_without_a_secret_are_accepted_with_a_password_anywhere_refused():
    for url in ("postgresql://vae@db.example.com/vae", "postgresql://vae:@/vae?host=/run/pg&port=5433",
                "postgresql://vae@%2Frun%2Fpg:5433/vae", "postgresql://vae@db1:5432,db2:5433/vae?target_session_attrs=any",
                "postgresql://vae@[2001:db8::1]:5432/vae?sslmode=require", "postgresql://", "postgres:///vae",
                "postgresql://vae@db.example.com/vae?passfile=/home/vae/.pgpass&connect_timeout=5"):
        assert check_rdb_url(url) == url
    secret = "hunter2-never-shown"
    for url in (f"postgresql://vae:{secret}@/vae?host=/run/pg", f"postgresql://vae@db1,db2/vae?sslmode=require&password={secret}",
                f"postgresql://vae:{secret}@db1:5432,db2:5433/vae"):
        with pytest.raises(StudyError) as exc:
            check_rdb_url(url)
        assert secret not in str(exc.value) and "refused" in str(exc.value)


@pytest.fixture(scope="module")
def pg():
    require(postgres.available(), "PostgreSQL binaries (the pgserver wheel) and a user nobody")
    server = postgres.start()
    yield server
    server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())
    except OSError:
        return None


@pytest.mark.slow
def test_a_study_in_postgresql_runs_is_watched_live_killed_and_resumed_by_one_driver_of_two(pg, tmp_path):
    # the password comes from a .pgpass file for the drivers, from PGPASSWORD for the dashboard
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:{pg.port}:*:{postgres.USER}:{pg.password}\n")
    pgpass.chmod(0o600)
    env = {**os.environ, "PGPASSFILE": str(pgpass)}
    env.pop("PGPASSWORD", None)
    first = tmp_path / "first"
    cmd = [sys.executable, "-m", "study", "run", "--name", "pgs", "--storage", str(first), "--trials", str(N),
           "--epochs", "6", "--num-cpus", "2", "--max-train-images", "600", "--no-early-stopping",
           "--optuna-storage", pg.url]
    port = _free_port()
    sa_url = pg.url.replace("postgresql://", "postgresql+psycopg://")
    live: list[int] = []  # trials the dashboard showed while the driver ran
    done: list[str] = []
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    dashboard = None
    try:
        # a user opens the dashboard on the URL the run prints, once the study is there
        deadline = time.time() + 120
        while time.time() < deadline and driver.poll() is None and "optuna-dashboard" not in log.read_text():
            time.sleep(0.2)
        dashboard = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "optuna-dashboard"), sa_url,
                                      "--port", str(port), "--host", "127.0.0.1", "--quiet"],
                                     env={**os.environ, "PGPASSWORD": pg.password}, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and driver.poll() is None:
            listing = _get(f"http://127.0.0.1:{port}/api/studies")
            for s in (listing or {}).get("study_summaries", []):
                if s["study_name"] == "pgs":
                    detail = _get(f"http://127.0.0.1:{port}/api/studies/{s['study_id']}")
                    if detail:
                        live.append(len(detail["trials"]))
            done = sorted(p.name for p in (first / "pgs" / "trials").glob("*.parquet")) \
                if (first / "pgs" / "trials").is_dir() else []
            if len(done) >= 2 and live:
                break
            time.sleep(0.3)
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray runtime it started
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        if dashboard is not None:
            os.killpg(dashboard.pid, signal.SIGTERM)
            dashboard.wait(timeout=30)
    text = log.read_text()
    assert 2 <= len(done) < N, f"the kill must land mid-study ({done}): {text[-2000:]}"
    assert live and max(live) >= 1, "optuna-dashboard never showed the running study"
    assert "optuna-dashboard postgresql+psycopg://" in text
    assert not {"optuna.db", "optuna.log"} & {p.name for p in (first / "pgs").iterdir()}  # the database holds it

    # A second folder with the same study (another machine's copy): two resumes at once.
    second = tmp_path / "second"
    shutil.copytree(first, second)
    resumes = [subprocess.Popen([sys.executable, "-m", "study", "resume", "--name", "pgs", "--storage", str(where),
                                 "--num-cpus", "1"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env) for where in (first, second)]
    outs = [p.communicate(timeout=600) for p in resumes]
    codes = [p.returncode for p in resumes]
    assert sorted(codes) == [0, 2], (codes, [o[1][-1500:] for o in outs])
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    refusal = outs[loser][1].strip().splitlines()
    assert len(refusal) == 1 and "running from another driver" in refusal[0], refusal

    # none lost, none doubled: in the trials table and in the database
    folder = (first, second)[winner] / "pgs"
    df = results.search_trials(results.load(folder))
    assert len(df) == N and df["trial_id"].is_unique
    assert (df["status"] == "completed").all() and (df["epochs_run"] == 6).all()
    import optuna

    os.environ["PGPASSFILE"] = str(pgpass)
    try:
        states = [t.state for t in optuna.load_study(study_name="pgs", storage=sa_url).get_trials()]
    finally:
        os.environ.pop("PGPASSFILE")
    assert states.count(optuna.trial.TrialState.COMPLETE) == N, states
    assert optuna.trial.TrialState.RUNNING not in states

    # the password is nowhere in what the study wrote or said
    assert pg.password not in text + "".join(o[0] + o[1] for o in outs)
    for path in folder.rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000:
            assert pg.password.encode() not in path.read_bytes(), path
    assert json.loads((folder / "study.json").read_text())["optuna_storage"] == pg.url

    # a new study of that name on that database is refused; --overwrite replaces it
    p = run_cli("run", "--name", "pgs", "--storage", str(tmp_path / "third"), "--smoke", "--optuna-storage", pg.url,
                "--num-cpus", "2", env={"PGPASSFILE": str(pgpass)})
    assert p.returncode == 2 and "is in postgresql://" in p.stderr, p.stderr[-2000:]
    # and the report reads the Optuna study from the database
    p = run_cli("report", str(folder), "--tsne-points", "200", "--gap-images", "50", "--decoder-steps", "5",
                env={"PGPASSFILE": str(pgpass)})
    assert p.returncode == 0, p.stderr[-2000:]
    assert (folder / "report" / "optuna_history.png").is_file()


@pytest.mark.slow
def test_a_wrong_password_is_one_line(pg, tmp_path):
    p = run_cli("run", "--name", "w", "--storage", str(tmp_path), "--smoke", "--num-cpus", "1",
                "--optuna-storage", pg.url, env={"PGPASSWORD": "wrong", "PGPASSFILE": str(tmp_path / "none")})
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1 and "password authentication failed" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_libpq_url_forms_reach_the_real_server_over_tcp_and_its_socket(pg, tmp_path, monkeypatch):
    """Each form a user may paste (pgserver's own among them) opens the study's database, takes
    its lock and holds an Optuna study, on the server the tests start: TCP, its Unix-domain
    socket, an empty password, a dead host before the live one."""
    import optuna

    from study.store.location import Location
    from study.store.optuna_storage import OptunaDB

    monkeypatch.setenv("PGPASSWORD", pg.password)
    sock, port, user, db = pg.socket_dir, pg.port, postgres.USER, postgres.DATABASE
    quoted = str(sock).replace("/", "%2F")
    forms = {
        "pgserver's (empty password, socket)": f"postgresql://{user}:@/{db}?host={sock}&port={port}",
        "socket as the host": f"postgresql://{user}@{quoted}:{port}/{db}",
        "empty password over TCP": f"postgresql://{user}:@127.0.0.1:{port}/{db}",
        "sslmode and options": f"postgresql://{user}@127.0.0.1:{port}/{db}?sslmode=disable&connect_timeout=5",
        "failover: a dead host first": f"postgresql://{user}@127.0.0.1:{_free_port()},127.0.0.1:{port}/{db}",
        "postgres:// and localhost": f"postgres://{user}@localhost:{port}/{db}",
    }
    for i, (what, url) in enumerate(forms.items()):
        optuna_db = OptunaDB(Location(tmp_path / f"s{i}"), check_rdb_url(url))
        with optuna_db.lock(f"forms-{i}"):
            study = optuna.create_study(study_name=f"forms-{i}", storage=optuna_db.storage())
            study.tell(study.ask(), 1.0)
        assert optuna_db.has_study(f"forms-{i}"), what
    # the whole tool, through the CLI, on the socket form pgserver hands out
    r = run_cli("run", "--name", "sock", "--storage", str(tmp_path), "--smoke", "--num-cpus", "1", "--no-refit",
                "--optuna-storage", forms["pgserver's (empty password, socket)"], env={"PGPASSWORD": pg.password})
    assert r.returncode == 0, r.stderr[-2000:]
    assert pg.password not in r.stdout + r.stderr
    loaded = optuna.load_study(study_name="sock", storage=f"postgresql+psycopg://{user}@/{db}?host={sock}&port={port}")
    assert len(loaded.trials) == 2
