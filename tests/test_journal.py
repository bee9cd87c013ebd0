"""The study's Optuna journal (``optuna.log``): what a killed driver leaves in it is mended before
the next driver appends, and a study made before the journal keeps its SQLite file."""
from __future__ import annotations

import os
import time

import optuna
import pytest

from study.store.layout import OPTUNA_DB, OPTUNA_LOG
from study.store.location import Location
from study.store.optuna_storage import OptunaDB, journal_storage, open_optuna

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study_with_trials(storage, n: int) -> None:
    study = optuna.create_study(study_name="s", storage=storage)
    for i in range(n):
        study.add_trial(optuna.trial.create_trial(params={"x": float(i)}, value=float(i),
                                                  distributions={"x": optuna.distributions.FloatDistribution(0, 9)}))


def _killed_mid_append(path) -> None:
    """What a SIGKILL in the middle of Optuna's append leaves: part of a line, and its lock held."""
    with open(path, "ab") as f:
        f.write(b'{"op_code":4,"worker_id":"dead","study_id":0,"datetime_st')
    lock = f"{path}.lock"
    os.symlink(path, lock)
    old = time.time() - 60
    os.utime(lock, (old, old), follow_symlinks=False)


def test_a_journal_cut_mid_append_by_a_kill_is_mended_before_the_next_driver_appends(tmp_path):
    # without the mend, the next append joins the cut line: the journal no longer reads
    broken = tmp_path / "broken" / OPTUNA_LOG
    broken.parent.mkdir()
    _study_with_trials(journal_storage(broken), 3)
    _killed_mid_append(broken)
    os.unlink(f"{broken}.lock")  # (Optuna itself would wait 30 s for it, then take it)
    with pytest.raises((AttributeError, ValueError)):  # Optuna cannot read back what it appended
        optuna.load_study(study_name="s", storage=journal_storage(broken)).enqueue_trial({"x": 1.0})
        optuna.load_study(study_name="s", storage=journal_storage(broken)).get_trials()

    study = Location(tmp_path / "study")
    path = tmp_path / "study" / OPTUNA_LOG
    path.parent.mkdir()
    _study_with_trials(journal_storage(path), 3)
    whole = path.read_bytes()
    _killed_mid_append(path)
    db = OptunaDB(study)
    assert db.file == OPTUNA_LOG and db.journal
    t0 = time.monotonic()
    storage = db.storage()  # the driver's: the cut line is gone, and the dead driver's lock
    assert path.read_bytes() == whole and not os.path.lexists(f"{path}.lock")
    optuna.load_study(study_name="s", storage=storage).enqueue_trial({"x": 2.0})
    assert time.monotonic() - t0 < 10  # no wait for the stale lock
    trials = optuna.load_study(study_name="s", storage=open_optuna(str(path))).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3 + ["WAITING"]
    assert db.storage() is storage  # replayed once per driver


def test_a_fresh_lock_is_left_to_its_holder(tmp_path):
    path = tmp_path / OPTUNA_LOG
    _study_with_trials(journal_storage(path), 1)
    os.symlink(path, f"{path}.lock")  # held right now, by optuna-dashboard say
    OptunaDB(Location(tmp_path)).storage()
    assert os.path.lexists(f"{path}.lock")
    os.unlink(f"{path}.lock")


def test_a_study_from_before_the_journal_keeps_its_sqlite_file(tmp_path):
    old = Location(tmp_path / "old")
    (tmp_path / "old").mkdir()
    _study_with_trials(f"sqlite:///{tmp_path / 'old' / OPTUNA_DB}", 2)
    db = OptunaDB(old)
    assert db.file == OPTUNA_DB and not db.journal and db.url.startswith("sqlite:///")
    assert isinstance(db.storage(), optuna.storages.RDBStorage)
    with db.read_copy() as storage:
        assert len(optuna.load_study(study_name="s", storage=storage).trials) == 2
    assert not (tmp_path / "old" / OPTUNA_LOG).exists()
    # a new study (run --overwrite, or a new name) keeps a journal
    db.reset()
    assert db.file == OPTUNA_LOG and db.journal and db.url == str(tmp_path / "old" / OPTUNA_LOG)
    # a folder with neither: a journal, and nothing to read yet
    empty = OptunaDB(Location(tmp_path / "none"))
    assert empty.file == OPTUNA_LOG
    with empty.read_copy() as storage:
        assert storage is None
