"""What finished trials keep of their checkpoints (``--keep``): a real study under each policy,
its files on disk, and the report, the refit and `results` working under them."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from conftest import run_cli
from study import results
from study.errors import StudyError
from study.results.retention import kept
from study.spec.spec import top_k

STUDY = ["--trials", "8", "--epochs", "4", "--max-train-images", "400", "--num-cpus", "2", "--grace-period", "1"]


def checkpoint_files(study: Path) -> dict[str, list[str]]:
    """trial id -> its checkpoint files (checkpoint_n/name), sorted."""
    out: dict[str, list[str]] = {}
    for f in sorted((study / "tune").glob("trial_*/checkpoint_*/*")):
        out.setdefault(f.parent.parent.name.removeprefix("trial_"), []).append(f"{f.parent.name}/{f.name}")
    return out


def test_policies_parse_and_rank():
    assert (top_k("all"), top_k("winner"), top_k("top-3")) == (None, 1, 3)
    for bad in ("best", "top-0", "top-", "top-x", "3"):
        with pytest.raises(StudyError, match="choose all, winner or top-K"):
            top_k(bad)
    t = pd.DataFrame({"trial_id": ["a", "b", "c", "d"], "status": ["completed", "pruned", "failed", "completed"],
                      "objective": [3.0, 1.0, None, 2.0], "val_elbo": [3.0, 1.0, None, 2.0]})
    assert kept(t, "all", "min") == {"a", "b", "d"} and kept(t, "top-2", "min") == {"b", "d"}
    assert kept(t, "winner", "max") == {"a"}


@pytest.mark.slow
@pytest.mark.parametrize("keep", ["all", "top-2"])
def test_finished_trials_keep_their_best_weights_by_the_policy_and_no_optimiser_state(tmp_path, keep):
    storage = tmp_path / "studies"
    r = run_cli("run", "--name", "k", "--storage", str(storage), *STUDY, "--keep", keep)
    assert r.returncode == 0, r.stderr[-2000:]
    study = storage / "k"
    trials = results.search_trials(results.load(study))
    files = checkpoint_files(study)
    # no optimiser state is left anywhere, and a trial keeps one checkpoint: its row's
    assert not [f for fs in files.values() for f in fs if f.endswith("state.pt")], files
    for tid, fs in files.items():
        row = trials.set_index("trial_id").loc[tid]
        assert fs == [row["checkpoint"].split("/", 2)[2]], (tid, fs, row["checkpoint"])
    want = set(trials["trial_id"]) if keep == "all" else set(results.rank(trials).head(2)["trial_id"])
    assert set(files) == want
    assert results.winner(trials)["trial_id"] in files
    for tid in want:  # what is kept is whole: the report and `evaluate` read it
        ev = run_cli("evaluate", str(study / trials.set_index("trial_id").loc[tid, "checkpoint"]), "--format", "json")
        assert ev.returncode == 0, ev.stderr[-1000:]
    if keep == "all":
        return
    # the report of the winner, and of a trial whose weights went: left out with a note, not a crash
    rep = run_cli("report", str(study), "--out", str(tmp_path / "rep"))
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert "Reconstruction panel" in (tmp_path / "rep" / "index.html").read_text()
    gone = sorted(set(trials["trial_id"]) - want)[0]
    rep = run_cli("report", str(study), "--out", str(tmp_path / "rep2"), "--trial", gone)
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert "figures that need the checkpoint are left out" in (tmp_path / "rep2" / "index.html").read_text()
    assert (results.load(study)["status"] == "refit").sum() == 1  # the refit trains from the configuration
