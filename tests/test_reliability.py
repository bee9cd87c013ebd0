"""What happens if... a user hits Ctrl-C, runs two studies at once, reads while trials write,
points at storage that cannot take files, or a trial keeps failing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest

from conftest import REPO, require, run_cli
from study import results


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "study", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout: float = 300) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _leftovers(folder):
    return [p for p in folder.rglob("*") if p.is_file() and (p.name.endswith(".tmp") or ".tmp" in p.name)
            and "tune" not in p.parts]


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_resume_finishes(tmp_path):
    p = _start("run", "--name", "c", "--storage", str(tmp_path), "--trials", "6", "--epochs", "10",
               "--num-cpus", "2", "--no-early-stopping")
    trials = tmp_path / "c" / "trials"
    assert _wait_for(lambda: trials.is_dir() and any(trials.glob("*.parquet")))
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "vae-study resume --name c" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    # every file under its final name is whole, and nothing half-written is left about
    for f in (tmp_path / "c").glob("*/*.parquet"):
        pq.read_table(f)
    assert not _leftovers(tmp_path / "c")
    done_before = len(results.load(tmp_path / "c"))
    assert 1 <= done_before < 6
    r = run_cli("resume", "--name", "c", "--storage", str(tmp_path), "--num-cpus", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    everything = results.load(tmp_path / "c")
    df = results.search_trials(everything)
    assert len(df) == 6 and df["trial_id"].is_unique and (df["status"] == "completed").all()
    assert (everything["status"] == results.REFIT).sum() == 1  # refitted once, after the resume


@pytest.mark.slow
def test_two_studies_at_once_in_one_root_and_a_reader_alongside(tmp_path):
    seen: dict[str, list[int]] = {"a": [], "b": []}
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            for name in ("a", "b"):
                folder = tmp_path / name
                if (folder / "trials").is_dir():
                    try:  # a reader must never see a half-written file
                        n = len(results.load(folder, on_skip=lambda f, r: errors.append(RuntimeError(f"{f}: {r}"))))
                        results.load(folder, "epochs", on_skip=lambda f, r: errors.append(RuntimeError(f"{f}: {r}")))
                        seen[name].append(n)
                    except Exception as exc:  # noqa: BLE001
                        errors.append(exc)
            time.sleep(0.05)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    pa_ = _start("run", "--name", "a", "--storage", str(tmp_path), "--trials", "4", "--epochs", "4",
                 "--num-cpus", "1", "--max-train-images", "600")
    pb_ = _start("run", "--name", "b", "--storage", str(tmp_path), "--trials", "3", "--epochs", "4",
                 "--num-cpus", "1", "--max-train-images", "600")
    outs = [pr.communicate(timeout=600) for pr in (pa_, pb_)]
    stop.set()
    t.join(timeout=10)
    assert pa_.returncode == 0 and pb_.returncode == 0, [o[1][-1500:] for o in outs]
    assert not errors, errors[:3]
    a, b = results.search_trials(results.load(tmp_path / "a")), results.search_trials(results.load(tmp_path / "b"))
    assert len(a) == 4 and len(b) == 3
    assert set(a["study"]) == {"a"} and set(b["study"]) == {"b"}
    for name, counts in seen.items():
        assert counts == sorted(counts), f"{name}: a reader saw rows disappear"
    both = results.load(tmp_path)
    assert len(results.search_trials(both)) == 7 and (both["status"] == results.REFIT).sum() == 2


def test_a_reader_never_pairs_one_version_of_a_file_with_another(tmp_path):
    """A running trial rewrites its epochs file after every epoch (a new file, then os.replace).
    A reader that opened the file twice, once for the footer and once for the pages, could
    pair the old footer with the new pages ("Page was smaller than expected"); found by the
    test above in CI. Here a writer replaces the file as fast as it can while a reader reads."""
    import pyarrow as pa

    from study.results import tables
    from study.store import Location

    loc = Location(tmp_path)
    write = lambda n: loc.write_bytes("epochs/t.parquet", tables.parquet_bytes(  # noqa: E731
        pa.Table.from_pylist([{"epoch": i, "loss": float(i)} for i in range(n % 50 + 1)])))
    write(0)
    stop = threading.Event()

    def writer() -> None:
        n = 1
        while not stop.is_set():
            write(n)
            n += 1

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        got = [tables._read_one(loc, "epochs/t.parquet") for _ in range(1500)]
    finally:
        stop.set()
        t.join(timeout=10)
    errors = [g for g in got if isinstance(g, BaseException)]
    assert not errors, (len(errors), errors[:2])
    assert len({g.num_rows for g in got}) > 1  # the reader did see the file change under it


@pytest.mark.slow
def test_same_study_twice_at_once_is_refused_by_the_lock(tmp_path):
    """Two drivers for the same new study, started at the same moment: both find no study, so
    only the lock can keep one out. Exactly one runs; the other is refused with one line."""
    args = ("run", "--name", "same", "--storage", str(tmp_path), "--trials", "2", "--epochs", "6",
            "--num-cpus", "1", "--max-train-images", "600")
    drivers = [_start(*args), _start(*args)]
    outs = [d.communicate(timeout=600) for d in drivers]
    codes = sorted(d.returncode for d in drivers)
    assert codes == [0, 2], [o[1][-1500:] for o in outs]
    err = next(o[1] for d, o in zip(drivers, outs) if d.returncode == 2)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "being run by another process" in lines[0], err
    assert len(results.search_trials(results.load(tmp_path / "same"))) == 2


def test_unwritable_storage_is_refused_before_trials_start(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = run_cli("run", "--smoke", "--name", "x", "--storage", str(blocker / "studies"))
    assert r.returncode == 2 and "not writable" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_full_storage_is_refused_before_trials_start(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(mnt)], capture_output=True).returncode:
        require(False, "root and mount rights, to mount a tiny tmpfs")
    try:
        r = run_cli("run", "--smoke", "--name", "x", "--storage", str(mnt))
        assert r.returncode == 2 and "not writable" in r.stderr and "No space" in r.stderr
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.slow
def test_retries_are_configurable_and_a_failing_trial_is_recorded(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text('[train]\nbeta = 1000.0\nlatent_dim = 4\n')
    r = run_cli("run", str(toml), "--name", "r", "--storage", str(tmp_path), "--grid", "lr=9.0,0.001",
                "--epochs", "2", "--max-train-images", "300", "--num-cpus", "2", "--max-failures", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    df = results.search_trials(results.load(tmp_path / "r")).set_index("param_lr")
    assert df.loc[9.0, "status"] == "failed" and df.loc[9.0, "attempts"] == 2  # tried, then retried once
    assert "non-finite" in df.loc[9.0, "error"]
    assert df.loc[0.001, "status"] == "completed" and df.loc[0.001, "attempts"] == 1


def test_local_ray_binds_loopback_without_dashboard():
    import ray

    from study.cluster.connect import init_ray

    init_ray(None, 1)
    try:
        nodes = ray.nodes()
        assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
        import urllib.request

        with pytest.raises(OSError):  # no dashboard on its default port
            urllib.request.urlopen("http://127.0.0.1:8265", timeout=2)
    finally:
        ray.shutdown()


def test_every_torch_load_is_weights_only_and_no_pickle_load():
    """What this checks: checkpoints are loaded with weights_only=True, and our code calls no
    pickle.load. What it cannot see: `resume` restores Ray Tune's own pickled experiment state
    (tuner.pkl), so a study folder is trusted input to `resume` (its --help says so); `results`
    and `report` unpickle nothing."""
    import pathlib

    ours = ("study", "vae", "analysis", "benchmarks")
    paths = [p for top in ours for p in (pathlib.Path(REPO) / top).rglob("*.py")]
    assert len(paths) > 30 and any(p.name == "train.py" for p in paths)
    for path in paths:
        text = path.read_text()
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"
        assert "pickle.load" not in text, path
    r = run_cli("resume", "--help")
    assert r.returncode == 0 and "trusted input" in r.stdout.replace("\n", " ")
