"""A bucket outage is ridden out: a study in a bucket (moto's S3 server behind a fault layer that
answers every request 503 SlowDown, 500 InternalError or with a dropped connection for a while,
from the moment the first trial is recorded) waits for its storage for as long as its patience
(``--storage-patience``), and never dies with a traceback.

- An outage shorter than the patience costs only the wait: exit 0, every trial recorded once, no
  trial failed, Optuna whole (``killing.check_whole``), and the progress says since when the
  storage was unreachable and when it came back.
- An outage longer than the patience stops the study cleanly: one line naming the storage and
  the resume command, exit 75, no traceback; ``resume`` (once the bucket answers) finishes it whole.
"""
from __future__ import annotations

import time

import pytest

from conftest import run_cli
from killing import check_whole
from s3 import BUCKET, s3_endpoint
from study.store import Location

TRIALS, EPOCHS = 8, 4
STUDY = ("--trials", str(TRIALS), "--epochs", str(EPOCHS), "--num-cpus", "2", "--max-train-images", "400")


def _optuna_snapshot(study: Location, tmp_path) -> str:
    copy = tmp_path / "optuna.log"
    copy.write_bytes(study.read_bytes("optuna.log"))
    return str(copy)


@pytest.mark.slow
def test_an_outage_shorter_than_the_patience_costs_only_the_wait(tmp_path):
    control: list = []
    with s3_endpoint(control=control) as (_, counts):
        storage = f"s3://{BUCKET}/outage"
        control[0].outage(60, after=r"/trials/")  # from the first trials row on, for a minute
        t0 = time.monotonic()
        r = run_cli("run", "--name", "o", "--storage", storage, *STUDY, "--storage-patience", "120",
                    env={"VAE_STUDY_CACHE": str(tmp_path / "cache")}, timeout=1200)
        wall = time.monotonic() - t0
        print(f"study with a 60 s outage: {wall:.1f} s; outage requests {counts['outage requests']}")
        assert r.returncode == 0, r.stderr[-3000:]
        assert counts["outage started"] == 1 and counts["outage requests"] > 0, dict(counts)
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        assert "unreachable since" in r.stdout and "reachable again after" in r.stdout, r.stdout[-3000:]
        lasted = [ln for ln in r.stdout.splitlines() if "reachable again after" in ln]
        assert lasted and all(int(ln.rsplit("after ", 1)[1].split()[0]) < 120 for ln in lasted), lasted
        study = Location(f"{storage}/o")
        assert check_whole(study, _optuna_snapshot(study, tmp_path), "o", trials=TRIALS, epochs=EPOCHS) == []


@pytest.mark.slow
def test_an_outage_longer_than_the_patience_stops_the_study_in_one_line_and_resume_finishes_it(tmp_path):
    control: list = []
    with s3_endpoint(control=control) as (_, counts):
        storage = f"s3://{BUCKET}/long"
        # the first failing request alone takes the SDK's ~25 s of retries: the patience is out by then
        control[0].outage(50, after=r"/trials/")
        t0 = time.monotonic()
        r = run_cli("run", "--name", "l", "--storage", storage, *STUDY, "--storage-patience", "10",
                    env={"VAE_STUDY_CACHE": str(tmp_path / "c-run")}, timeout=1200)
        stopped = time.monotonic() - t0
        assert r.returncode == 75, (r.returncode, r.stderr[-3000:])
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("vae-study: error:")]
        assert len(errors) == 1, r.stderr[-3000:]
        assert f"storage s3://{BUCKET}" in errors[0] and "--storage-patience 10" in errors[0], errors[0]
        assert f"vae-study resume --name l --storage {storage}" in errors[0], errors[0]
        print(f"stopped after {stopped:.1f} s: {errors[0]}")
        down_at = control[0].down
        assert down_at is not None
        time.sleep(max(0.0, down_at[1] - time.monotonic()) + 1)  # the bucket is back
        res = run_cli("resume", "--name", "l", "--storage", storage,
                      env={"VAE_STUDY_CACHE": str(tmp_path / "c-resume")}, timeout=1200)
        assert res.returncode == 0, res.stderr[-3000:]
        study = Location(f"{storage}/l")
        assert check_whole(study, _optuna_snapshot(study, tmp_path), "l", trials=TRIALS, epochs=EPOCHS) == []


def test_storage_patience_is_checked_and_recorded(tmp_path):
    from study.spec import build_spec
    from study.errors import StudyError

    spec = build_spec(None, {"name": "p", "storage": str(tmp_path), "storage_patience": 45})
    assert spec.storage_patience == 45.0 and spec.to_dict()["storage_patience"] == 45.0
    assert build_spec({"study": {"storage_patience": 600}}, {"name": "p", "storage": str(tmp_path)}).storage_patience == 600
    with pytest.raises(StudyError, match="storage_patience=-1 is out of range"):
        build_spec(None, {"name": "p", "storage": str(tmp_path), "storage_patience": -1})
    r = run_cli("run", "--name", "p", "--storage", str(tmp_path), "--storage-patience", "soon")
    assert r.returncode == 2 and "--storage-patience" in r.stderr


@pytest.fixture
def fresh_outage(monkeypatch):
    from study.store import outage

    outage.reset()
    monkeypatch.setattr(outage, "BACKOFF_S", (0.01, 0.05))
    patience = outage.patience()
    yield outage
    outage.reset()
    outage.set_patience(patience)


class _Heard:
    def __init__(self):
        self.heard = []

    def down(self, uri, since, reason):
        self.heard.append(("down", reason))

    def up(self, uri, lasted):
        self.heard.append(("up", round(lasted, 1)))

    def gave_up(self, error):
        self.heard.append(("gave up", str(error)))


def _failing(times: int, message: str = "AWS Error SLOW_DOWN during PutObject operation: injected"):
    """A call that fails ``times`` times as the bucket would, then answers."""
    calls = []

    def call():
        calls.append(time.monotonic())
        if len(calls) <= times:
            raise OSError(f"When uploading object with key 'a' in bucket 'b': {message}")
        return "answered"

    return call, calls


def test_a_call_waits_out_an_outage_shorter_than_the_patience(fresh_outage):
    heard = _Heard()
    stop = fresh_outage.listen(heard)
    try:
        call, calls = _failing(5)
        assert fresh_outage.patiently(call, uri="s3://b", patience=30) == "answered"
    finally:
        stop()
    assert len(calls) == 6
    assert [h[0] for h in heard.heard] == ["down", "up"] and heard.heard[0][1] == "AWS Error SLOW_DOWN"
    assert fresh_outage.gave_up() is None and fresh_outage.waited_s() > 0


def test_a_call_gives_up_at_the_patience_and_every_later_call_fails_at_once(fresh_outage):
    from study.errors import StorageUnreachable

    heard = _Heard()
    stop = fresh_outage.listen(heard)
    try:
        call, calls = _failing(10**6, "AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 52")
        t0 = time.monotonic()
        with pytest.raises(StorageUnreachable, match=r"storage s3://b unreachable for 0.3 s .*NETWORK_CONNECTION"):
            fresh_outage.patiently(call, uri="s3://b", patience=0.3)
        assert 0.3 <= time.monotonic() - t0 < 2
        answered, later = _failing(0)
        with pytest.raises(StorageUnreachable):
            fresh_outage.patiently(answered, uri="s3://b", patience=30)
        assert later == []  # not even tried
    finally:
        stop()
    assert [h[0] for h in heard.heard] == ["down", "gave up"]


@pytest.mark.parametrize("message,transient", [
    ("AWS Error SLOW_DOWN during PutObject operation", True),
    ("AWS Error UNKNOWN (HTTP status 503) during HeadObject operation", True),
    ("AWS Error NETWORK_CONNECTION during ListObjectsV2 operation: curlCode: 7, Couldn't connect to server", True),
    ("AWS Error ACCESS_DENIED during PutObject operation: Access Denied", False),
    ("AWS Error NO_SUCH_BUCKET during PutObject operation", False),
])
def test_only_a_bucket_that_does_not_answer_is_waited_for(fresh_outage, message, transient):
    call, calls = _failing(1, message)
    if transient:
        assert fresh_outage.patiently(call, uri="s3://b", patience=30) == "answered"
    else:
        with pytest.raises(OSError, match=message.split(" during")[0]):
            fresh_outage.patiently(call, uri="s3://b", patience=30)
        assert len(calls) == 1
    assert not fresh_outage.transient(FileNotFoundError("AWS Error SLOW_DOWN"))  # a missing file is an answer


def test_a_bucket_store_waits_for_a_real_endpoint_that_comes_back(tmp_path, fresh_outage, monkeypatch):
    """Through the study's own object store on moto's S3 server: writes and reads wait out an
    outage, then the same store gives up on a longer one, and fails at once after. (The SDK's own
    retries, about 25 s of them per request in a study, are cut to 2 attempts here.)"""
    from study.errors import StorageUnreachable
    from study.store import objectstore

    monkeypatch.setattr(objectstore, "S3_ATTEMPTS", 2)
    control: list = []
    with s3_endpoint(control=control):
        loc = Location(f"s3://{BUCKET}/patience")
        fresh_outage.set_patience(60)
        control[0].outage(8)
        t0 = time.monotonic()
        loc.write_bytes("a.txt", b"kept")
        assert 8 <= time.monotonic() - t0 < 60
        assert loc.read_bytes("a.txt") == b"kept"
        fresh_outage.set_patience(3)
        control[0].outage(120)
        with pytest.raises(StorageUnreachable, match=f"storage s3://{BUCKET} unreachable for 3 s"):
            loc.read_bytes("a.txt")
        t0 = time.monotonic()
        with pytest.raises(StorageUnreachable):
            loc.write_bytes("b.txt", b"never")
        assert time.monotonic() - t0 < 1
