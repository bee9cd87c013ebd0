"""Cost per trial at scale: many one-epoch trials, the tool against Ray Tune alone, in one run.

A study of N one-epoch trials on the --smoke data (300 training images), 2 slots, ASHA off, no
refit, for N = 50, 100, 200, 400. For each N:

- overhead slot-seconds per trial = (wall x slots - sum of the trials' training seconds) / N;
- the driver's own CPU seconds per result, split by who spends them: the results recorder
  (Parquet rows), Optuna (the searcher: ask, tell, intermediate values), the progress printer,
  and Tune itself (everything else in the driver process: its loop, its state, its loggers).

The baseline is Tune alone in the same Ray runtime: the same trainable, resources and checkpoints
kept per trial, random search over the same space, Tune's default loggers, none of our callbacks.

    python benchmarks/bench_scale.py --json benchmarks/results/scale.json
    python benchmarks/bench_scale.py --sizes 50 100 --json /tmp/scale.json
    python benchmarks/bench_scale.py --sizes 400 --sampler random     # Optuna without TPE's model
    python benchmarks/bench_scale.py --slots 16 --nodes 4 --sizes 1000  # Ray's multi-node Cluster on this machine

With ``--nodes K`` the trials run on K Ray nodes of ``--slots / K`` CPUs each
(``ray.cluster_utils.Cluster`` on 127.0.0.1: a raylet and an object store per node), with a head
node of no CPUs that holds the driver, as on a cluster.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

CPU: dict[str, float] = {}


def _timed(cls: type, names: list[str], who: str) -> None:
    """Count the driver thread's CPU seconds in these methods of cls under ``who``."""
    for name in names:
        if name not in cls.__dict__:
            continue
        original = cls.__dict__[name]

        @functools.wraps(original)
        def wrapper(*a, __f=original, **kw):
            t0 = time.thread_time()
            try:
                return __f(*a, **kw)
            finally:
                CPU[who] = CPU.get(who, 0.0) + time.thread_time() - t0

        setattr(cls, name, wrapper)


def instrument() -> None:
    from study.runner.progress import Progress
    from study.results.recorder import ResultsRecorder
    from study.search.searcher import StudySearch

    hooks = ["on_trial_start", "on_trial_result", "on_trial_complete", "on_trial_error", "on_step_end",
             "on_trial_save", "on_checkpoint", "on_experiment_end", "on_step_begin"]
    _timed(ResultsRecorder, hooks, "recorder")
    _timed(Progress, hooks, "progress")
    # Optuna, through Tune's searcher API: StudySearch's hooks wrap OptunaSearch's, so they
    # hold all of Optuna's time (ask, tell, intermediate values, the SQLite writes)
    _timed(StudySearch, ["suggest", "on_trial_result", "on_trial_complete"], "optuna")
    # Optuna's tell runs inside the recorder (once a trial's row is written): counted under Optuna
    _timed(StudySearch, ["tell_recorded"], "optuna_tell")


def ours(n: int, root: str, slots: int, sampler: str = "tpe") -> dict:
    from study import results
    from study.runner import recipes
    from study.spec.spec import build_spec

    spec = build_spec(None, {"name": f"scale{n}", "storage": root, "trials": n, "epochs": 1, "smoke": True,
                             "scheduler": "none", "refit": False, "num_cpus": slots, "max_concurrent": slots,
                             "sampler": sampler})
    CPU.clear()
    c0, t0 = time.process_time(), time.perf_counter()
    res = recipes.run(spec, printer=lambda s: None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    trials = results.load(res.folder)
    train = float(trials["train_seconds"].sum())
    mine = {k: CPU.get(k, 0.0) for k in ("recorder", "optuna", "progress")}
    mine["recorder"] -= CPU.get("optuna_tell", 0.0)
    mine["optuna"] += CPU.get("optuna_tell", 0.0)
    return _row(n, slots, wall, train, cpu, mine)


def tune_alone(n: int, root: str, slots: int) -> dict:
    from ray import tune

    from study.runner import recipes
    from study.spec.spec import build_spec

    spec = build_spec(None, {"name": f"alone{n}", "storage": root, "trials": n, "epochs": 1, "smoke": True,
                             "scheduler": "none", "refit": False, "num_cpus": slots})
    space = {**recipes.fixed_params(spec), "latent_dim": tune.randint(2, 65), "beta": tune.loguniform(0.01, 10.0),
             "lr": tune.loguniform(1e-4, 3e-3)}
    t = tune.Tuner(recipes.make_trainable(spec), param_space=space,
                   tune_config=tune.TuneConfig(num_samples=n, max_concurrent_trials=slots, reuse_actors=True,
                                               metric="val_elbo", mode="min", search_alg=tune.search.BasicVariantGenerator(random_state=0)),
                   run_config=tune.RunConfig(name=f"alone{n}", storage_path=root, verbose=0,
                                             checkpoint_config=tune.CheckpointConfig(num_to_keep=recipes.KEEP_CHECKPOINTS)))
    c0, t0 = time.process_time(), time.perf_counter()
    grid = t.fit()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    train = sum(float(r.metrics.get("seconds", 0.0)) for r in grid)
    assert len(grid) == n and not grid.errors, grid.errors
    return _row(n, slots, wall, train, cpu, {})


def _row(n: int, slots: int, wall: float, train: float, cpu: float, mine: dict) -> dict:
    ours_cpu = sum(mine.values())
    return {"trials": n, "wall_s": round(wall, 2), "train_s": round(train, 2),
            "overhead_slot_s_per_trial": round((wall * slots - train) / n, 3),
            "driver_cpu_s": round(cpu, 2), "driver_cpu_ms_per_result": round(1000 * cpu / n, 2),
            "callbacks_ms_per_result": {k: round(1000 * v / n, 2) for k, v in mine.items()},
            "tune_itself_ms_per_result": round(1000 * (cpu - ours_cpu) / n, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 400])
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--sampler", default="tpe", help="the study's sampler (tpe, the default; random shows "
                    "Optuna's bookkeeping without TPE's model)")
    ap.add_argument("--nodes", type=int, default=0, help="run the trials on this many Ray nodes of this machine "
                    "(ray.cluster_utils.Cluster), --slots CPUs among them")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.nodes and args.slots % args.nodes:
        ap.error("--slots must split evenly over --nodes")

    import ray

    from study import cluster

    instrument()
    fake = None
    if args.nodes:
        from ray.cluster_utils import Cluster

        fake = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        for _ in range(args.nodes):
            fake.add_node(num_cpus=args.slots // args.nodes)
        fake.wait_for_nodes()
        ray.init(address=fake.address, log_to_driver=False, logging_level="ERROR")
    else:
        cluster.init_ray(None, args.slots)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vae-scale-") as root:
        for n in args.sizes:  # interleaved, so the machine's noise hits both alike
            a = ours(n, root, args.slots, args.sampler)
            b = tune_alone(n, root, args.slots)
            rows.append({"ours": a, "tune_alone": b})
            print(f"N={n:4d}  ours: wall {a['wall_s']:7.1f} s, overhead {a['overhead_slot_s_per_trial']:.2f} slot-s/trial, "
                  f"driver {a['driver_cpu_ms_per_result']:.1f} ms/result ({a['callbacks_ms_per_result']}, "
                  f"Tune {a['tune_itself_ms_per_result']:.1f})", flush=True)
            print(f"        Tune alone: wall {b['wall_s']:7.1f} s, overhead {b['overhead_slot_s_per_trial']:.2f} "
                  f"slot-s/trial, driver {b['driver_cpu_ms_per_result']:.1f} ms/result", flush=True)
    ray.shutdown()
    if fake is not None:
        fake.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps({"slots": args.slots, "nodes": args.nodes or 1, "sampler": args.sampler,
                                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
