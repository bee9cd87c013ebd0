"""Kill a study's driver at a chosen moment, resume it, and check that the study came out whole.

A moment is either a line of the study's own output (the driver is SIGKILLed, with its whole
process group, the local Ray runtime included, the instant that line shows: the windows that
matter are milliseconds wide) or a time since the start. :func:`check_whole` states what a
resumed study must hold, whatever the moment was.
"""
from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import optuna

from conftest import REPO
from study import results
from study.search.searcher import TUNE_TRIAL
from study.store.optuna_storage import open_optuna


@dataclass(frozen=True)
class Moment:
    name: str
    line: str | None = None  # a regex: kill the instant the driver prints a matching line
    after_s: float | None = None  # or this long after the driver started
    gone: str | None = None  # or the instant a path matching this glob, once seen, is gone


# The moments a study's output shows, each the instant after something happened.
AT_SPEC = Moment("study.json written, before any trial", line=r"^study '.*': \d+ trials")
AT_FIRST_START = Moment("first trial started", line=r"^  start ")
AT_PRUNED = Moment("just after a trial was pruned", line=r"^  pruned ")
AT_DONE = Moment("just after a trial completed", line=r"^  done ")
AT_THIRD = Moment("just after the third trial finished", line=r"\[3/\d+\]$")
AT_REFIT = Moment("during the refit", line=r"^refit: ")
AT_COMPACTION = Moment("during the compaction (the refit just recorded)", line=r"^refit refit-")
AT_SUMMARY = Moment("after the compaction, before exit", line=r"^study '.*' finished in")
EVENTS = (AT_SPEC, AT_FIRST_START, AT_PRUNED, AT_DONE, AT_THIRD, AT_REFIT, AT_COMPACTION, AT_SUMMARY)


@dataclass
class Killed:
    moment: Moment
    at_s: float | None  # when the kill landed, seconds after start (None: the driver ended first)
    line: str | None  # the line it was killed on
    lines: list[str] = field(default_factory=list)
    returncode: int | None = None


def run_until(args: list[str], moment: Moment | None, env: dict[str, str], timeout: float = 600) -> Killed:
    """Run ``python -m study ARGS`` in a session of its own; SIGKILL its process group at
    ``moment`` (None: let it finish)."""
    proc = subprocess.Popen([sys.executable, "-m", "study", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"})
    t0 = time.monotonic()
    out = Killed(moment or Moment("none"), None, None)
    lock = threading.Lock()

    def kill(line: str | None) -> None:
        with lock:
            if out.at_s is None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                out.at_s, out.line = time.monotonic() - t0, line

    pattern = re.compile(moment.line) if moment and moment.line else None

    def read() -> None:
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            out.lines.append(line)
            if pattern is not None and pattern.search(line):
                kill(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = t0 + timeout
    seen: set[str] = set()
    while proc.poll() is None and time.monotonic() < deadline:
        if moment is not None and moment.after_s is not None and time.monotonic() - t0 >= moment.after_s:
            kill(None)
        if moment is not None and moment.gone is not None and out.at_s is None:
            now = set(glob.glob(moment.gone))
            if seen - now:  # polled tightly: the window after a deletion is milliseconds wide
                kill(f"gone: {', '.join(sorted(seen - now))}")
            seen = now
            time.sleep(0.0002)
            continue
        time.sleep(0.005)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    # the driver's Ray runtime is in its process group; make sure nothing of it lingers
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    out.returncode = proc.returncode
    return out


def recorded(study: Any) -> dict[str, Any]:
    """finished_at of each trials row in storage now (the rows a kill must not change)."""
    try:
        df = results.search_trials(results.load(study))
    except Exception:  # noqa: BLE001 - no study yet
        return {}
    return dict(zip(df["trial_id"], df["finished_at"]))


def check_whole(study: Any, optuna_url: str, name: str, *, trials: int, epochs: int,
                before: dict[str, Any] | None = None) -> list[str]:
    """Everything a finished study must hold after any kill and resume; returns what is wrong."""
    wrong: list[str] = []
    everything = results.load(study)
    df = results.search_trials(everything)
    if len(df) != trials or not df["trial_id"].is_unique:
        wrong.append(f"{len(df)} trials rows for {trials} trials ({sorted(df['trial_id'])})")
    if not df["status"].isin(["completed", "pruned"]).all():
        failed = df[~df["status"].isin(["completed", "pruned"])]
        why = "; ".join(f"{r.trial_id} {r.status}: {r.error}" for r in failed.itertuples())
        wrong.append(f"statuses {df['status'].value_counts().to_dict()} ({why})")
    refits = everything[everything["status"] == results.REFIT]
    win = results.winner(df)
    if len(refits) != 1:
        wrong.append(f"{len(refits)} refit rows")
    elif win is not None and refits.iloc[0]["refit_of"] != win["trial_id"]:
        wrong.append(f"the refit is of {refits.iloc[0]['refit_of']}, the winner is {win['trial_id']}")
    ep = results.load(study, "epochs")
    if ep.duplicated(["trial_id", "epoch"]).any():
        wrong.append(f"{int(ep.duplicated(['trial_id', 'epoch']).sum())} (trial, epoch) rows twice")
    by_trial = ep.groupby("trial_id")["epoch"].apply(lambda s: sorted(s)).to_dict()
    rows = df.set_index("trial_id")
    for tid, row in rows.iterrows():
        if by_trial.get(tid) != list(range(1, int(row["epochs_run"]) + 1)):
            wrong.append(f"trial {tid}: epoch rows {by_trial.get(tid)} for {row['epochs_run']} epochs run")
    if set(by_trial) - set(rows.index):
        wrong.append(f"epoch rows of trials that are not in the table: {sorted(set(by_trial) - set(rows.index))}")
    for tid, finished_at in (before or {}).items():
        if tid not in rows.index or rows.loc[tid, "finished_at"] != finished_at:
            wrong.append(f"trial {tid}, recorded before the kill, was recorded again")
    # what finished trials keep (study.results.retention, keep = "all"): their row's checkpoint, weights only
    ckpts: dict[str, set[str]] = {}
    for path in study.walk("tune"):
        parts = path.split("/")
        if len(parts) >= 4 and parts[1].startswith("trial_") and parts[2].startswith("checkpoint_"):
            ckpts.setdefault(parts[1].removeprefix("trial_"), set()).add(f"{parts[2]}/{parts[3]}")
    for tid, row in rows.iterrows():
        have = {f for f in ckpts.get(tid, set()) if not f.split("/")[1].startswith(".")}
        want = {row["checkpoint"].split("/", 2)[2]} if isinstance(row["checkpoint"], str) else set()
        if have != want:
            wrong.append(f"trial {tid} keeps {sorted(have)}, its row names {sorted(want)}")
    ot = optuna.load_study(study_name=name, storage=open_optuna(optuna_url)).get_trials(deepcopy=False)
    states = sorted(t.state.name for t in ot)
    if len(ot) != trials or set(states) - {"COMPLETE", "PRUNED"}:
        wrong.append(f"Optuna holds {len(ot)} trials for {trials}: {states}")
    named = {t.system_attrs.get(TUNE_TRIAL): t for t in ot}
    if set(named) != set(rows.index):
        wrong.append(f"Optuna's trials name {sorted(map(str, named))}, the table {sorted(rows.index)}")
    for tid, t in named.items():
        if tid not in rows.index:
            continue
        row = rows.loc[tid]
        want = {"completed": "COMPLETE", "pruned": "PRUNED"}.get(row["status"])
        if t.state.name != want:
            wrong.append(f"trial {tid}: {row['status']} in the table, {t.state.name} in Optuna")
        if want == "COMPLETE" and t.value != row["objective"]:
            wrong.append(f"trial {tid}: objective {row['objective']} in the table, {t.value} in Optuna")
        if sorted(t.intermediate_values) != list(range(1, int(row["epochs_run"]) + 1)):
            wrong.append(f"trial {tid}: Optuna's steps {sorted(t.intermediate_values)}, {row['epochs_run']} epochs run")
        for k, v in t.params.items():
            if row[f"param_{k}"] != v:
                wrong.append(f"trial {tid}: {k} = {row[f'param_{k}']} in the table, {v} in Optuna")
    return wrong
