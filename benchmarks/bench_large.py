"""Large studies as a user runs them: the CLI, many one-epoch trials, and what each trial costs
the driver, the disk and (optionally) a bucket.

For each N it runs, as a user would,

    vae-study run --smoke --trials N --epochs 1 --no-refit --cpus-per-trial 1 --num-cpus 2 [--keep K]

and reports, from the driver process itself (its own CPU, all threads, and its peak RSS, read by
``resource.getrusage`` as it exits):

- wall seconds, and the overhead in slot-seconds per trial: (wall x 2 - the trials' training
  seconds) / N, start-up included;
- the driver's CPU per trial;
- the study folder on disk, per trial, and Tune's experiment state file;
- with ``--bucket``, the study goes to moto's S3 server on 127.0.0.1, and every request it answers
  is counted (PUTs, bytes uploaded).

Tune alone (``bench_scale.tune_alone``: the same trainable, random search, Tune's defaults) runs in
the same session at each N for the overhead baseline.

    python benchmarks/bench_large.py --sizes 250 1000 --json benchmarks/results/large.json
    python benchmarks/bench_large.py --sizes 100 400 --bucket --json benchmarks/results/large_bucket.json
    python benchmarks/bench_large.py --sizes 10000 --keep winner --no-baseline --profile benchmarks/results/profile
    python benchmarks/profile_summary.py benchmarks/results/profile/driver_10000.txt   # where the driver's time goes
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# The driver: the real CLI, reporting its own resource use as it exits.
DRIVER = (
    "import atexit, json, resource, sys\n"
    "def _usage():\n"
    "    u = resource.getrusage(resource.RUSAGE_SELF)\n"
    "    sys.stderr.write('RUSAGE ' + json.dumps({'cpu_s': u.ru_utime + u.ru_stime, 'maxrss_kb': u.ru_maxrss}) + '\\n')\n"
    "atexit.register(_usage)\n"
    "from study.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_cli(n: int, storage: str, keep: str | None, env: dict, profile: str | None = None) -> dict:
    args = ["run", "--smoke", "--name", f"large{n}", "--storage", storage, "--trials", str(n), "--epochs", "1",
            "--no-refit", "--cpus-per-trial", "1", "--num-cpus", "2", "--overwrite"]
    if keep:
        args += ["--keep", keep]
    cmd = [sys.executable, "-c", DRIVER, *args]
    if profile:  # py-spy samples the driver alone (every thread, 20 Hz), as collapsed stacks
        Path(profile).mkdir(parents=True, exist_ok=True)
        cmd = [str(Path(sys.executable).with_name("py-spy")), "record", "--rate", "20", "--threads", "--nonblocking",
               "--format", "raw", "-o", str(Path(profile) / f"driver_{n}.txt"), "--", *cmd]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, text=True, env={**os.environ, **env})
        rss = RssSampler(proc.pid, wrapped=bool(profile))
        rss.start()
        proc.wait()
        wall = time.perf_counter() - t0
        rss.stop()
        out.seek(0), err.seek(0)
        p = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    if p.returncode != 0:
        raise SystemExit(f"the study failed ({p.returncode}): {p.stderr[-3000:]}")
    usage = json.loads(next(ln for ln in p.stderr.splitlines() if ln.startswith("RUSAGE "))[7:])
    from study import results

    trials = results.load(f"{storage}/large{n}")
    train = float(trials["train_seconds"].sum())
    # per trial finished: a study stopped early (Ctrl-C; py-spy's exit status is its own) has fewer
    done = int(trials["status"].isin(["completed", "pruned"]).sum())
    return {"trials": n, "finished": done, "wall_s": round(wall, 1), "train_s": round(train, 1),
            "overhead_slot_s_per_trial": round((wall * 2 - train) / done, 3),
            "driver_cpu_ms_per_trial": round(1000 * usage["cpu_s"] / done, 1),
            "driver_peak_rss_mb": round(usage["maxrss_kb"] / 1024, 0),
            "driver_rss_mb_over_time": rss.series(),
            "trials_per_s_over_the_last_200": rates(trials)}


class RssSampler(threading.Thread):
    """The driver's resident memory every second (the Python child of py-spy when ``wrapped``),
    to tell memory held through the study from a peak at its end."""

    def __init__(self, pid: int, wrapped: bool) -> None:
        super().__init__(daemon=True)
        self.pid, self.wrapped, self.t0 = pid, wrapped, time.perf_counter()
        self.samples: list[tuple[float, float]] = []
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.done.wait(1.0):
            try:
                proc = psutil.Process(self.pid)
                if self.wrapped:
                    kids = proc.children()
                    if not kids:
                        continue
                    proc = kids[0]
                rss = proc.memory_info().rss
                if rss:  # 0 once it has exited
                    self.samples.append((time.perf_counter() - self.t0, rss / 2**20))
            except psutil.Error:
                pass

    def stop(self) -> None:
        self.done.set()
        self.join()

    def series(self, points: int = 20) -> list[list[float]]:
        """[seconds, MB] at up to ``points`` evenly spaced samples, the last and the largest."""
        s = self.samples
        if not s:
            return []
        picks = {round(i * (len(s) - 1) / max(points - 1, 1)) for i in range(points)}
        picks.add(max(range(len(s)), key=lambda i: s[i][1]))
        return [[round(s[i][0], 1), round(s[i][1], 0)] for i in sorted(picks)]


def rates(trials, window: int = 200) -> dict[int, float]:
    """How fast the study finished trials as it grew: at each k-th finished trial (500, 1,000,
    then every 1,000, and the last), trials finished per second over the ``window`` before it,
    from the rows' ``finished_at``."""
    done = trials[trials["status"].isin(["completed", "pruned"])]["finished_at"].sort_values()
    stamps = [t.timestamp() for t in done]
    marks = sorted({k for k in (500, *range(1000, len(stamps) + 1, 1000)) if window < k <= len(stamps)}
                   | ({len(stamps)} if len(stamps) > window else set()))
    return {k: round(window / max(stamps[k - 1] - stamps[k - 1 - window], 1e-9), 2) for k in marks}


def disk(study: Path) -> dict:
    states = sorted((study / "tune").glob("experiment_state-*.json"))
    total = du(study)
    optuna_file = next((study / f for f in ("optuna.log", "optuna.db") if (study / f).is_file()), None)
    return {"study_mb": round(total / 1e6, 1), "tune_state_mb": round(states[-1].stat().st_size / 1e6, 2) if states else 0,
            "optuna_file_mb": round(optuna_file.stat().st_size / 1e6, 2) if optuna_file else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[250, 1000])
    ap.add_argument("--keep", help="the study's checkpoint policy (default: the tool's)")
    ap.add_argument("--bucket", action="store_true", help="store the study in moto's S3 server, counting requests")
    ap.add_argument("--no-baseline", action="store_true", help="skip Tune alone")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--root", help="write the studies here and leave them (default: a temporary folder)")
    ap.add_argument("--profile", metavar="DIR", help="py-spy the driver (20 Hz, collapsed stacks in DIR/driver_N.txt)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="vae-large-") as tmp:
        root = args.root or tmp
        for n in args.sizes:
            row: dict = {"keep": args.keep or "default"}
            if args.bucket:
                from s3 import s3_endpoint, stored_bytes

                with s3_endpoint() as (env, counts):
                    row.update(run_cli(n, "s3://studies/large", args.keep, env))
                    row["requests"] = dict(sorted(counts.items()))
                    row["requests_per_trial"] = round(counts["requests"] / n, 1)
                    row["put_mb"] = round(counts["put_bytes"] / 1e6, 1)
                    row["put_mb_per_trial"] = round(counts["put_bytes"] / 1e6 / n, 2)
                    row["bucket_mb"] = round(stored_bytes("large/") / 1e6, 1)
            else:
                row.update(run_cli(n, root, args.keep, {}, args.profile))
                row.update(disk(Path(root) / f"large{n}"))
                row["study_mb_per_trial"] = round(row["study_mb"] / row["finished"], 2)
            if not args.no_baseline:
                row["tune_alone"] = tune_alone(n, root)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2))


def tune_alone(n: int, root: str) -> dict:
    import ray

    from bench_scale import tune_alone as alone
    from study import cluster

    cluster.init_ray(None, 2)
    try:
        r = alone(n, root, 2)
    finally:
        ray.shutdown()
    return {"wall_s": r["wall_s"], "overhead_slot_s_per_trial": r["overhead_slot_s_per_trial"],
            "driver_cpu_ms_per_trial": r["driver_cpu_ms_per_result"]}


if __name__ == "__main__":
    main()
