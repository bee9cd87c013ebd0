"""Where a driver's time goes, from py-spy's collapsed stacks (``bench_large.py --profile``).

    python benchmarks/profile_summary.py benchmarks/results/profile/driver_1000.txt.gz [--top 25]

Prints the share of samples by thread and, across all threads, by the frames that own them: for
each sample, the first frame (from the leaf up) in a package of interest names its owner, so a
sample inside SQLite under Optuna's ``ask`` counts as Optuna's; then, for the busy samples of the
main thread (Tune's loop), the innermost function of this project, Ray Tune or Optuna in each, the
ones that take most. Idle samples (py-spy's
``--nonblocking`` records a thread in a blocking call too) are counted apart."""
from __future__ import annotations

import argparse
import re
from collections import Counter

# The owner of a sample: the first of these found walking from the leaf up (module path fragments).
OWNERS = (
    ("study: recorder (Parquet rows, retention)", ("study/results/",)),
    ("study: searcher (Optuna ask/tell/report)", ("study/search/",)),
    ("study: restore / reconcile", ("study/runner/restore.py", "study/search/mend.py")),
    ("study: other", ("study/",)),
    ("optuna", ("optuna/",)),
    ("sqlalchemy / sqlite", ("sqlalchemy/", "sqlite3")),
    ("pyarrow / pandas", ("pyarrow/", "pandas/")),
    ("tensorboard / tensorboardX loggers", ("tensorboardX/", "tensorboard/", "tune/logger/")),
    ("ray tune: experiment state, sync", ("tune/execution/experiment_state", "train/_internal/storage", "tune/impl/tuner_internal")),
    ("ray tune: controller", ("tune/",)),
    ("ray core", ("ray/",)),
    ("imports (start-up)", ("<frozen importlib",)),
)
# Inclusive shares: a sample counts for each of these that has a frame anywhere in its stack.
INCLUSIVE = (
    ("Optuna and its storage (ask, report, tell, attributes)", ("optuna/",)),
    ("the results recorder (study.results: rows, retention)",
     ("study/results/recorder.py", "study/results/retention.py")),
    ("Tune's loggers (CSV, JSON, TensorBoard)", ("tune/logger/", "tensorboardX/")),
    ("Tune saving its experiment state", ("experiment_state",)),
    ("imports (start-up)", ("<frozen importlib",)),
    ("the table read back and compacted at the end",
     ("load (study/results/tables.py", "compact (study/results/tables.py")),
)
# The main thread's functions: the innermost frame from one of these (the code a change could reach).
OWN_CODE = ("(study/", "ray/tune/", "optuna/")
IDLE = re.compile(r"\((threading|selectors|queue|socket)\.py|wait \(|select \(|poll \(|_wait_for_tstate_lock|epoll")


def owner(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for name, parts in OWNERS:
            if any(p in frame for p in parts):
                return name
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    by_owner, by_thread, inclusive, idle, total = Counter(), Counter(), Counter(), 0, 0
    functions, main_busy = Counter(), 0
    import gzip

    opener = gzip.open if args.file.endswith(".gz") else open
    for line in opener(args.file, "rt"):
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        total += count
        leaf = stack.rsplit(";", 1)[-1]
        if IDLE.search(leaf):
            idle += count
            continue
        thread = stack.split(";", 1)[0]
        by_thread[re.sub(r"\(\d+\)|\d+", "N", thread)] += count
        by_owner[owner(stack)] += count
        for name, parts in INCLUSIVE:
            if any(p in stack for p in parts):
                inclusive[name] += count
        if "MainThread" in thread:
            main_busy += count
            own = [f for f in stack.split(";") if any(p in f for p in OWN_CODE)]
            functions[own[-1].split(" (")[0] if own else "other"] += count
    busy = total - idle
    print(f"{total} samples, {busy} busy ({100 * busy / max(total, 1):.1f}%), {idle} idle")
    print("\nbusy samples by owner:")
    for name, n in by_owner.most_common(args.top):
        print(f"  {100 * n / max(busy, 1):5.1f}%  {name}")
    print("\nbusy samples with a frame of (inclusive: they overlap):")
    for name, _ in INCLUSIVE:
        print(f"  {100 * inclusive[name] / max(busy, 1):5.1f}%  {name}")
    print("\nbusy samples by thread:")
    for name, n in by_thread.most_common(8):
        print(f"  {100 * n / max(busy, 1):5.1f}%  {name[:100]}")
    print("\nthe main thread's busy samples by function (the innermost of study/, Ray Tune, Optuna):")
    for name, n in functions.most_common(args.top):
        print(f"  {100 * n / max(main_busy, 1):5.1f}%  {name}")


if __name__ == "__main__":
    main()
