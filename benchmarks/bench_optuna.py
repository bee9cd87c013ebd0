"""Optuna's own CPU cost per trial, outside Ray: what a study's searcher pays at the least.

One trial = an ask with the study's three parameters (fixed distributions, as Ray's OptunaSearch
asks), one intermediate value and a tell, 400 times, random sampler, on the storage given:

    python benchmarks/bench_optuna.py sqlite:////tmp/bench-optuna.db    # the file format a study keeps
    python benchmarks/bench_optuna.py /tmp/bench-optuna.journal         # Optuna's journal file, to compare
"""
from __future__ import annotations

import sys
import time

import optuna


def main() -> None:
    where = sys.argv[1] if len(sys.argv) > 1 else "sqlite:////tmp/bench-optuna.db"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 400
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if where.startswith(("sqlite:", "postgresql", "mysql")):
        storage = optuna.storages.RDBStorage(where)
    else:
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(where))
    study = optuna.create_study(storage=storage, sampler=optuna.samplers.RandomSampler(seed=0))
    od = optuna.distributions
    space = {"latent_dim": od.IntDistribution(2, 64), "beta": od.FloatDistribution(0.01, 10.0, log=True),
             "lr": od.FloatDistribution(1e-4, 3e-3, log=True)}
    c0 = time.process_time()
    for i in range(n):
        trial = study.ask(space)
        trial.report(1.0 / (i + 1), 1)
        study.tell(trial, 1.0 / (i + 1))
    ms = (time.process_time() - c0) / n * 1000
    print(f"{where.split(':')[0] if ':' in where else 'journal'}: {ms:.2f} ms of CPU per trial "
          f"(ask with 3 parameters, 1 intermediate value, tell), {n} trials")


if __name__ == "__main__":
    main()
