"""Search efficiency: an exhaustive grid against TPE + ASHA, in trial-epochs, on mnist-sample.

Grid: latent_dim in {5, 10, 15, 20} x beta in {0.1, 0.3, 1, 3}, every trial to the full epochs.
TPE + ASHA: the default continuous space (latent_dim 2-32, beta 0.01-10, lr 1e-4-3e-3), ASHA
with grace period 1 and reduction factor 2, over several sampler seeds.

For each method: the trial-epochs spent until its best validation -ELBO so far is within 1% of
the grid's best (trials counted in the order they finished). Writes a figure of best-so-far
against cumulative trial-epochs.

    python benchmarks/bench_search.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def epochs_to_reach(curve, target: float) -> int | None:
    hit = curve[curve["best_so_far"] <= target]
    return None if hit.empty else int(hit["cumulative_epochs"].iloc[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--tpe-trials", type=int, default=48)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--grace-period", type=int, default=1)
    ap.add_argument("--reduction-factor", type=float, default=2.0)
    ap.add_argument("--startup-trials", type=int, default=None, help="TPE's start-up trials (default: the tool's)")
    ap.add_argument("--startup", choices=("sobol", "random"), default=None,
                    help="how the start-up trials are drawn (default: the tool's)")
    ap.add_argument("--constant-liar", action=argparse.BooleanOptionalAction, default=None,
                    help="TPE's constant liar (default: the tool's, on with trials at once)")
    ap.add_argument("--grid-from", help="reuse the grid measured by an earlier run (its JSON); the grid's trials "
                    "run to the end in any order, so its results do not change")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    import ray

    from analysis import figures as F
    from analysis import metrics as M
    from study import cluster, results
    from study.runner import recipes
    from study.spec.spec import build_spec

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cluster.init_ray(None, args.num_cpus)
    curves = {}
    summary = {"epochs": args.epochs, "grace_period": args.grace_period, "reduction_factor": args.reduction_factor,
               "startup_trials": args.startup_trials, "constant_liar": args.constant_liar,
               "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.grid_from:
            import pandas as pd

            earlier = json.loads(Path(args.grid_from).read_text())
            grid_best, target = earlier["grid_best_val_elbo"], earlier["target"]
            summary.update(grid_best_val_elbo=grid_best, target=target, grid_from=args.grid_from)
            summary["runs"]["grid"] = earlier["runs"]["grid"]
            curves["grid (16 trials, full epochs)"] = pd.DataFrame(
                earlier["curves"]["grid (16 trials, full epochs)"], columns=["cumulative_epochs", "best_so_far"])
        else:
            t0 = time.perf_counter()
            grid = build_spec(None, {"name": "grid", "storage": tmp, "epochs": args.epochs, "scheduler": "none",
                                     "grid": {"latent_dim": [5, 10, 15, 20], "beta": [0.1, 0.3, 1.0, 3.0]},
                                     "refit": False})
            g = recipes.run(grid, printer=lambda s: None)
            grid_wall = time.perf_counter() - t0
            gdf = results.load(g.folder)
            grid_best = float(gdf["val_elbo"].min())
            target = grid_best * 1.01
            curves["grid (16 trials, full epochs)"] = M.best_so_far(gdf)
            summary["grid_best_val_elbo"] = grid_best
            summary["target"] = target
            summary["runs"]["grid"] = {
                "trial_epochs_total": int(gdf["epochs_run"].sum()),
                "trial_epochs_to_target": epochs_to_reach(curves["grid (16 trials, full epochs)"], target),
                "wall_seconds": grid_wall, "best": grid_best,
                "best_params": gdf.loc[gdf["val_elbo"].idxmin(), ["param_latent_dim", "param_beta", "param_lr"]].to_dict(),
            }
        for seed in args.seeds:
            t0 = time.perf_counter()
            spec = build_spec(None, {"name": f"tpe{seed}", "storage": tmp, "trials": args.tpe_trials,
                                     "epochs": args.epochs, "seed": seed, "grace_period": args.grace_period,
                                     "reduction_factor": args.reduction_factor,
                                     "startup_trials": args.startup_trials, "startup": args.startup,
                                     "constant_liar": args.constant_liar, "refit": False})
            r = recipes.run(spec, printer=lambda s: None)
            df = results.load(r.folder)
            curve = M.best_so_far(df)
            curves[f"TPE+ASHA seed {seed}"] = curve
            summary["runs"][f"tpe_seed{seed}"] = {
                "trial_epochs_total": int(df["epochs_run"].sum()),
                "trial_epochs_to_target": epochs_to_reach(curve, target),
                "wall_seconds": time.perf_counter() - t0,
                "best": float(df["val_elbo"].min()),
                "pruned": int((df["status"] == "pruned").sum()),
                "best_params": df.loc[df["val_elbo"].idxmin(), ["param_latent_dim", "param_beta", "param_lr"]].to_dict(),
            }
    ray.shutdown()
    ax = F.plot_search_efficiency(curves, target=target)
    lowest = min(float(c["best_so_far"].min()) for c in curves.values())
    ax.set_ylim(lowest - 0.02 * grid_best, grid_best * 1.15)
    tag = (f"rf{args.reduction_factor:g}" + (f"_startup{args.startup_trials}" if args.startup_trials else "")
           + (f"_{args.startup}" if args.startup else "")
           + ("" if args.constant_liar is None else "_liar" if args.constant_liar else "_noliar"))
    summary["curves"] = {name: c[["cumulative_epochs", "best_so_far"]].values.tolist() for name, c in curves.items()}
    ax.set_title(f"Search efficiency (ASHA grace {args.grace_period}, reduction factor {args.reduction_factor:g})")
    ax.figure.savefig(out / f"search_efficiency_{tag}.png", dpi=150)
    (out / f"search_efficiency_{tag}.json").write_text(json.dumps(summary, indent=2, default=float))
    g = summary["runs"]["grid"]
    print(f"grid best val -ELBO {grid_best:.2f}; target (within 1%) {target:.2f}")
    print(f"grid: {g['trial_epochs_to_target']} trial-epochs to target, {g['trial_epochs_total']} in all, {g['wall_seconds']:.0f} s")
    for name, run in summary["runs"].items():
        if name == "grid":
            continue
        reach = run["trial_epochs_to_target"]
        ratio = "never" if reach is None else f"{reach / g['trial_epochs_total']:.2f} of the grid's epochs"
        print(f"{name}: {reach} trial-epochs to target ({ratio}); best {run['best']:.2f}; "
              f"{run['trial_epochs_total']} epochs in all, {run['pruned']} pruned, {run['wall_seconds']:.0f} s")
    shares = [None if r["trial_epochs_to_target"] is None else r["trial_epochs_to_target"] / g["trial_epochs_total"]
              for name, r in summary["runs"].items() if name != "grid"]
    import statistics

    ordered = sorted(x if x is not None else float("inf") for x in shares)
    print(f"median share over {len(shares)} seeds: {statistics.median(ordered):.2f} "
          f"(every seed: {', '.join('never' if x is None else f'{x:.2f}' for x in shares)})")


if __name__ == "__main__":
    main()
