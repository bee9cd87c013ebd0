"""Optuna's own cost per trial, outside Ray: what a study's searcher pays at the least.

One trial = an ask with the study's three parameters (fixed distributions, as Ray's OptunaSearch
asks), the attribute naming its Tune trial, one intermediate value and a tell, 400 times, random
sampler, on each storage, in one run (the machine is noisy: compare within a run):

    python benchmarks/bench_optuna.py                 # SQLite, Optuna's journal file, the study's journal
    python benchmarks/bench_optuna.py --rounds 3 --trials 400

The study's journal (``study.store.optuna_storage.journal_storage``) is Optuna's journal file without the fsync
after each append.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def storages(tmp: str) -> dict:
    from optuna.storages.journal import JournalFileBackend

    from study.store.optuna_storage import journal_storage

    return {
        "SQLite (a study before the journal)": lambda i: optuna.storages.RDBStorage(f"sqlite:///{tmp}/{i}.db"),
        "Optuna's journal file (fsync per append)":
            lambda i: optuna.storages.JournalStorage(JournalFileBackend(f"{tmp}/{i}.optuna.log")),
        "the study's journal (study.store.optuna_storage.journal_storage)": lambda i: journal_storage(f"{tmp}/{i}.log"),
    }


def per_trial(storage, n: int) -> tuple[float, float]:
    study = optuna.create_study(storage=storage, sampler=optuna.samplers.RandomSampler(seed=0))
    od = optuna.distributions
    space = {"latent_dim": od.IntDistribution(2, 64), "beta": od.FloatDistribution(0.01, 10.0, log=True),
             "lr": od.FloatDistribution(1e-4, 3e-3, log=True)}
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(n):
        trial = study.ask(space)
        study._storage.set_trial_system_attr(trial._trial_id, "tune_trial", f"t{i:05d}")
        trial.report(1.0 / (i + 1), 1)
        study.tell(trial, 1.0 / (i + 1))
    return (time.process_time() - c0) / n * 1000, (time.perf_counter() - w0) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # a real disk, not tmpfs: an fsync costs there what it costs a study folder
    with tempfile.TemporaryDirectory(prefix="bench-optuna-", dir=os.environ.get("BENCH_DIR", str(Path.home()))) as tmp:
        made = storages(tmp)
        for r in range(args.rounds):
            for name, make in made.items():
                cpu, wall = per_trial(make(f"{r}-{len(name)}"), args.trials)
                print(f"round {r + 1}: {name}: {cpu:.2f} ms of CPU, {wall:.2f} ms wall per trial ({args.trials} trials)")


if __name__ == "__main__":
    main()
