"""``vae-study``: a thin command line over the vae, study and analysis packages.

Every command parses its arguments and calls one library function. Bad input gives one line
on stderr and exit code 2; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from typing import Any, Sequence

from study.errors import USER_ERRORS, StorageUnreachable, StudyInterrupted

PROG = "vae-study"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _fmt_help(cls: type[argparse.HelpFormatter] = argparse.RawDescriptionHelpFormatter) -> Any:
    return lambda prog: cls(prog, max_help_position=32)


# --------------------------------------------------------------------------- train / evaluate

def _add_config_flags(p: argparse.ArgumentParser, *, for_run: bool = False) -> None:
    """A flag per TrainConfig field, typed by the dataclass and described by the registry; for
    ``run``, those that fix a value for every trial (study.spec.space)."""
    from vae.config import TrainConfig, field_types

    from study.spec import BY_NAME

    types = field_types()
    for f in fields(TrainConfig):
        param = BY_NAME[f.name]
        if for_run and not param.run_flag:
            continue
        tp, _ = types[f.name]
        if tp is bool:
            p.add_argument(param.flag, action="store_true", default=None, help=param.help)
            continue
        if for_run and param.space:
            default = " (default: searched)"
        else:
            default = "" if f.default is None else f" (default: {f.default})"
        p.add_argument(param.flag, type=tp, default=None, metavar=f.name.upper(), help=param.help + default)


def _config_from_args(args: argparse.Namespace) -> Any:
    from vae.config import TrainConfig

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    return TrainConfig.from_dict(values)


def cmd_train(args: argparse.Namespace) -> int:
    """Train one configuration and print its final metrics.

    Example:
        vae-study train --dataset mnist-sample --latent-dim 15 --epochs 15 --out runs/d15
    """
    from vae.train import train_and_save

    config = _config_from_args(args)
    summary = train_and_save(config, out=args.out, log=None if args.format == "json" else _log)
    if args.format == "json":
        print(json.dumps(summary, indent=2))
    else:
        _print_train_summary(summary)
    return 0 if summary["status"] == "completed" else 1


def _log(msg: str) -> None:
    print(msg, flush=True)


def _print_train_summary(s: dict[str, Any]) -> None:
    print(f"status: {s['status']}" + (f" ({s['error']})" if s.get("error") else ""))
    if s.get("best_epoch"):
        print(
            f"best epoch {s['best_epoch']}/{s['epochs_run']}: val -ELBO {s['val_elbo']:.2f} "
            f"(recon {s['val_recon']:.2f}, KL {s['val_kl']:.2f}), val MSE {s['val_mse']:.5f}"
        )
    print(f"{s['images_per_second']:.0f} training images/s on {s['device']}, {s['train_seconds']:.1f} s training")
    if s.get("checkpoint"):
        print(f"checkpoint: {s['checkpoint']}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Per-digit MSE/PSNR of a checkpoint for the three reconstruction modes.

    Example:
        vae-study evaluate runs/d15/model.pt --split test --format table
    """
    from vae.evaluate import evaluate_checkpoint

    modes = tuple(m for part in args.modes for m in part.split(",") if m) if args.modes else None
    report = evaluate_checkpoint(
        args.checkpoint,
        dataset=args.dataset,
        data_dir=args.data_dir,
        split=args.split,
        modes=modes,
        decoder_steps=args.decoder_steps,
        device=args.device,
        download=args.download,
    )
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        _print_eval_table(report)
    return 0


def _print_eval_table(r: dict[str, Any]) -> None:
    print(f"{r['dataset']} {r['split']} split, {r['n_images']} images: -ELBO {r['neg_elbo']:.2f} nats "
          f"(recon {r['recon']:.2f}, KL {r['kl']:.2f})")
    modes = list(r["modes"])
    head = f"{'digit':>5} {'n':>6} " + " ".join(f"{m + ' MSE':>24} {'PSNR':>6}" for m in modes)
    print(head)
    per = {m: {row["digit"]: row for row in r["modes"][m]["per_digit"]} for m in modes}
    for d in sorted(per[modes[0]]):
        cells = " ".join(f"{per[m][d]['mse']:>24.5f} {per[m][d]['psnr']:>6.2f}" for m in modes)
        print(f"{d:>5} {per[modes[0]][d]['n_images']:>6} {cells}")
    cells = " ".join(f"{r['modes'][m]['mean_mse']:>24.5f} {r['modes'][m]['mean_psnr']:>6.2f}" for m in modes)
    print(f"{'mean':>5} {'':>6} {cells}")
    if "decoder_only" in r["modes"]:
        print(f"decoder_only: {r['modes']['decoder_only']['steps']} Adam steps per image through the frozen decoder")


# --------------------------------------------------------------------------- studies

def cmd_run(args: argparse.Namespace) -> int:
    """Run a study: Ray Tune trials, proposed by Optuna (TPE), stopped early by ASHA.

    A TOML config gives everything; flags override it. Results land in
    STORAGE/NAME/{trials,epochs,digits}/*.parquet, the Optuna study in STORAGE/NAME/optuna.log (its journal).
    STORAGE is a folder or a bucket (s3://bucket/prefix, gs://bucket/prefix); on a cluster whose
    nodes do not share a disk, use a bucket. Exit code 1 if no trial finished.

    Examples:
        vae-study run --name demo --storage studies --trials 16 --epochs 10
        vae-study run study.toml --name d-grid --storage studies --grid latent_dim=5,10,15,20
        vae-study run --preset seed-replication --name seed --storage studies --dataset mnist --data-dir ~/mnist
        vae-study run --smoke --name smoke --storage /tmp/studies
        vae-study run --name sweep --storage s3://my-bucket/studies --address auto --gpus-per-trial 0.25
    """
    from study.spec import build_spec, overrides_from_flags, read_toml
    from study.runner import run

    toml = read_toml(args.config) if args.config else None
    overrides = overrides_from_flags(vars(args))
    spec = build_spec(toml, overrides)
    res = run(spec, overwrite=args.overwrite, printer=_log)
    return _finish(res, spec)


def _finish(res: Any, spec: Any) -> int:
    """Print the summary; a study in which no trial finished is a failure (exit 1)."""
    print("\n".join(summary_lines(res, spec)))
    if not res.any_finished:
        print(f"{PROG}: error: no trial of study {res.name!r} finished; the first error: {res.first_error()}",
              file=sys.stderr)
        return 1
    return 0


def summary_lines(res: Any, spec: Any) -> list[str]:
    """The end of a study, as `run` and `resume` print it: counts, the winner, its refit, where things are."""
    df = res.trials
    counts = df["status"].value_counts().to_dict() if len(df) else {}
    lines = [
        f"study {res.name!r} finished in {res.wall_seconds:.1f} s: "
        + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("completed", "pruned", "failed")),
    ]
    if getattr(spec, "pack", 0) and "pack" in df:
        packed = df[df["status"] != "refit"]["pack"].dropna()
        lines.append(f"packed: {len(packed)} trials trained in {packed.nunique()} pack(s) of up to {spec.pack}")
    b = res.best
    if b:
        params = " ".join(
            f"{k}={b[f'param_{k}']:.4g}" if isinstance(b[f"param_{k}"], float) else f"{k}={b[f'param_{k}']}"
            for k in ("latent_dim", "beta", "lr", "arch") if f"param_{k}" in b
        )
        lines.append(f"best trial {b['trial_id']}: {params}")
        lines.append(
            f"  val -ELBO {b['val_elbo']:.2f} (recon {b['val_recon']:.2f}, KL {b['val_kl']:.2f}) at epoch "
            f"{int(b['best_epoch'])}/{int(b['epochs_run'])}; test MSE {b['test_mse']:.5f}, PSNR {b['test_psnr']:.2f} dB"
        )
        ck = b["checkpoint"]
        lines.append(f"  checkpoint: {f'{res.location.uri}/{ck}' if ck else None}")
    r = res.refit
    if r and r.get("test_psnr") is not None:
        lines.append(f"refit {r['trial_id']} (the winner retrained on training + validation, {int(r['epochs_run'])} "
                     f"epochs): test MSE {r['test_mse']:.5f}, PSNR {r['test_psnr']:.2f} dB")
    if b and str(b.get("dataset", "")).startswith("mnist") and not spec.multi_objective:
        from analysis.metrics import reference_line
        from vae.data import train_images

        note = reference_line(objective=spec.objective[0], train_images=train_images(spec.base_config()))
        if note:
            lines.append(note)
    lines.append(f"results: {res.location}  (vae-study results {res.location})")
    where = res.optuna_storage or ""
    if "://" in where and not where.startswith("sqlite:"):
        lines.append(f"optuna:  {where}  (study name {res.name!r}; optuna-dashboard takes this URL)")
    elif res.location.local_path() is None:
        lines.append(f"optuna:  {res.location.uri}/{where.rsplit('/', 1)[-1]}, a snapshot "
                     f"(study name {res.name!r})")
    else:
        lines.append(f"optuna:  {where}  (study name {res.name!r}; optuna-dashboard {where})")
    return lines


def cmd_resume(args: argparse.Namespace) -> int:
    """Finish an interrupted study (driver killed, Ctrl-C, machine lost) where it stopped.

    Completed trials are kept, unfinished ones continue from their last checkpoint, and the
    Optuna study carries on from its storage (for a study in a bucket, its last published
    snapshot). Exit code 1 if no trial finished.

    A study folder is trusted input: resuming unpickles Ray Tune's own experiment state
    (tune/tuner.pkl and the searcher's state). Only resume a folder or bucket you trust;
    `results` and `report` never unpickle anything.

    Examples:
        vae-study resume --name demo --storage studies
        vae-study resume --name sweep --storage s3://my-bucket/studies --address auto
    """
    import os

    from study.errors import StudyError
    from study.spec import read_spec
    from study.runner import resume

    args.storage = args.storage or os.environ.get("VAE_STUDY_STORAGE")
    if not args.storage:
        raise StudyError("pass --storage: the folder or bucket URI the study was run with (or set VAE_STUDY_STORAGE)")
    res = resume(args.storage, args.name, printer=_log, address=args.address, num_cpus=args.num_cpus,
                 shared_storage=True if args.shared_storage else None, storage_patience=args.storage_patience)
    return _finish(res, read_spec(args.storage, args.name))


def cmd_results(args: argparse.Namespace) -> int:
    """Query a study's results table (or every study under a root folder).

    PATH is a folder or a bucket URI (s3://bucket/prefix/study). WHERE takes a SQL condition,
    run by DuckDB over the table.

    Examples:
        vae-study results studies/demo --top 5 --sort val_elbo
        vae-study results studies/demo --where "status = 'completed' AND param_latent_dim >= 10" --format csv
        vae-study results studies/demo --table digits --where "recon_mode = 'posterior_mean'" --columns trial_id,digit,mse
        vae-study results s3://my-bucket/studies          # every study under a storage root
    """
    from study import results

    def skipped(path: Any, reason: str) -> None:
        print(f"{PROG}: warning: skipped unreadable file {path}: {reason}", file=sys.stderr)

    df = results.load(args.path, args.table, on_skip=skipped)
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    if columns is None and args.format == "table":
        columns = [c for c in _DEFAULT_COLUMNS[args.table] if c in df.columns] or None
    if args.top is not None and args.sort is None and args.table == "trials" and "objective" in df.columns:
        # --top alone means the best trials, by each study's objective and direction
        df = results.best_first(results.query(df, where=args.where), results.study_modes(args.path))
        df = results.query(df, top=args.top, columns=columns)
    else:
        df = results.query(df, where=args.where, sort=args.sort, desc=args.desc, top=args.top, columns=columns)
    if args.format == "csv":
        df.to_csv(sys.stdout, index=False)
    elif args.format == "json":
        print(df.to_json(orient="records", date_format="iso", indent=2))
    else:
        if len(df) == 0:
            print("(no rows)")
        else:
            import pandas as pd

            with pd.option_context("display.max_rows", 500, "display.max_columns", 50, "display.width", 200,
                                   "display.float_format", "{:.5g}".format):
                print(df.to_string(index=False))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Build the figures and a self-contained HTML report of a study (finished or running).

    Writes PNGs, index.html (opens from a file, no server) and summary.json to --out
    (default: STUDY/report; for a study in a bucket, the report goes there too). Arrays
    computed from the winner's checkpoint are cached there, so a second run is fast.

    Examples:
        vae-study report studies/demo
        vae-study report studies/demo --out paper-figs --trial 3f2a1b7c
        vae-study report s3://my-bucket/studies/sweep --out sweep-report
    """
    from analysis.report import Options, build

    opts = Options(trial=args.trial, device=args.device, tsne_points=args.tsne_points,
                   gap_images=args.gap_images, decoder_steps=args.decoder_steps)
    index = build(args.study, args.out, options=opts, printer=_log)
    print(f"report: {index}")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    """Merge a finished study's per-trial Parquet files into one file per table.

    Queries over thousands of trials then read three files instead of thousands. The rows do
    not change; pandas, DuckDB and polars read the folders as before. Refused while the study runs.

    Example:
        vae-study compact studies/big-sweep
    """
    from study.runner import compact_study

    merged = compact_study(args.study)
    print(", ".join(f"{table}: {n} files merged" for table, n in merged.items()))
    return 0


def cmd_cluster_local(args: argparse.Namespace) -> int:
    """Write the on-premises version of cluster.yaml: machines you already have, the same commands.

    Ray's local provider takes no node types, so it needs its own file; this one is made from
    cluster.yaml (name your bucket there first) and runs exactly its setup and start commands.
    Every machine needs Python 3.11 (or sudo to install it), and the ssh user must reach all
    of them with the key. The first address is the head: it runs the study's driver, no trials.

    Example:
        vae-study cluster local --head-ip 10.0.0.10 --worker-ips 10.0.0.11,10.0.0.12 \\
            --ssh-user ubuntu --ssh-key ~/.ssh/id_ed25519 --out cluster-local.yaml
        RAY_UP_enable_autoscaler_v2=0 ray up cluster-local.yaml
    """
    from pathlib import Path

    from study.cluster import launch

    config = launch.read_config(args.config)
    workers = [ip.strip() for ip in args.worker_ips.split(",") if ip.strip()]
    local = launch.local_config(config, head_ip=args.head_ip, worker_ips=workers, ssh_user=args.ssh_user,
                                ssh_private_key=str(Path(args.ssh_key).expanduser()))
    text = launch.dump(local, args.config)
    if args.out in (None, "-"):
        print(text, end="")
    else:
        _write_whole(Path(args.out), text)
        print(f"wrote {args.out}: `RAY_UP_enable_autoscaler_v2=0 ray up {args.out}` starts the head at {args.head_ip} "
              f"and {len(workers)} worker(s) (Ray 2.60's autoscaler v2 starts no workers on machines you name)")
    return 0


def cmd_cluster_aws_setup(args: argparse.Namespace) -> int:
    """Once per AWS account: the roles and instance profiles that cluster.yaml's nodes run under.

    Workers get a role that may use the study's bucket (VAE_STUDY_STORAGE in cluster.yaml) and
    nothing else; the head gets EC2 for the autoscaler, the bucket, and iam:PassRole on the
    worker role alone, so that it may launch workers. Safe to run again: the policies are
    brought up to date. The policy documents are in study/cluster/iam/. Uses your own AWS credentials
    and writes no key anywhere. Prints the region's GPU quotas: spot and on-demand G instances
    have separate vCPU quotas, often 0 on a new account.

    Example:
        vae-study cluster aws-setup            # reads ./cluster.yaml
    """
    from study.cluster import launch

    config = launch.read_config(args.config)
    done = launch.aws_setup(config)
    print(f"account {done['account']}, region {done['region']}, bucket s3://{done['bucket']}")
    print(f"head role:   {done['head_role']} (EC2, the bucket, iam:PassRole on the worker role)")
    print(f"worker role: {done['worker_role']} (the bucket only)")
    for kind, value in done["gpu_vcpu_quota"].items():
        need = "" if value is None or value >= 4 else "  <- a g5.xlarge needs 4: ask for more under Service Quotas"
        shown = "unknown (no servicequotas:GetServiceQuota)" if value is None else f"{value:g} vCPUs"
        print(f"GPU quota, {kind} G instances: {shown}{need}")
    print("next: ray up cluster.yaml (a new instance profile can take a few seconds to be usable)")
    return 0


def _write_whole(path: Any, text: str) -> None:
    """A file appears whole or not at all."""
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


_DEFAULT_COLUMNS = {
    "trials": ["trial_id", "status", "param_arch", "param_latent_dim", "param_beta", "param_lr",
               "epochs_run", "val_elbo", "val_mse", "test_mse", "test_psnr", "train_seconds", "error"],
    "epochs": ["trial_id", "epoch", "train_loss", "val_elbo", "val_recon", "val_kl", "val_mse", "seconds"],
    "digits": ["trial_id", "split", "recon_mode", "digit", "n_images", "mse", "psnr"],
}


# --------------------------------------------------------------------------- parser and main

def _command(sub: Any, name: str, func: Any, help: str) -> argparse.ArgumentParser:
    """A subcommand whose --help is its function's docstring; every command takes --debug."""
    p = sub.add_parser(name, help=help, description=func.__doc__, formatter_class=_fmt_help())
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Distributed hyperparameter studies for beta-VAEs on MNIST.",
                     formatter_class=_fmt_help())
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = _command(sub, "train", cmd_train, "train one configuration")
    _add_config_flags(p)
    p.add_argument("--out", metavar="DIR", help="write model.pt and metrics.json here")
    p.add_argument("--format", choices=("table", "json"), default="table")

    p = _command(sub, "evaluate", cmd_evaluate, "per-digit metrics of a checkpoint")
    p.add_argument("checkpoint", help="model.pt written by train or a study")
    p.add_argument("--dataset", help="default: the checkpoint's dataset")
    p.add_argument("--data-dir", help="folder with the four IDX files")
    p.add_argument("--download", action="store_true", help="allow a torchvision download")
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    p.add_argument("--modes", nargs="+", metavar="MODE",
                   help="posterior_mean posterior_sample decoder_only (default: all three)")
    p.add_argument("--decoder-steps", type=int, default=None, metavar="N",
                   help="Adam steps of decoder_only latent optimisation (default: 150)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--format", choices=("table", "json"), default="table")

    p = _command(sub, "run", cmd_run, "run a study")
    p.add_argument("config", nargs="?", help="TOML file (optional; flags override it)")
    p.add_argument("--name", help="study name (a folder under --storage)")
    p.add_argument("--storage", help="folder or bucket (s3://bucket/prefix, gs://bucket/prefix) that holds studies "
                   "(default: $VAE_STUDY_STORAGE)")
    p.add_argument("--shared-storage", action="store_true",
                   help="the --storage folder is mounted on every node, including nodes an autoscaler adds later")
    p.add_argument("--storage-patience", type=float, metavar="SECONDS",
                   help="how long a study in a bucket waits out an outage of it before it stops, to be resumed "
                        "(default 300)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing study of this name")
    p.add_argument("--smoke", action="store_true", help="tiny study: 2 trials, 1 epoch, 300 images")
    p.add_argument("--preset", help="seed-replication: the reference project's experiment")
    g = p.add_argument_group("budget and search")
    g.add_argument("--trials", type=int, help="number of trials (default 16)")
    g.add_argument("--epochs", type=int, help="max epochs per trial (default 10)")
    g.add_argument("--seed", type=int, help="seeds the sampler (default 0)")
    from study.spec import SAMPLERS, TRACKERS

    g.add_argument("--sampler", choices=SAMPLERS,
                   help="Optuna's sampler, seeded by --seed (default: tpe; nsgaii for two objectives)")
    g.add_argument("--constant-liar", action=argparse.BooleanOptionalAction, default=None,
                   help="TPE: count running trials as bad results when asking (default: on with 2+ trials at once)")
    g.add_argument("--startup-trials", type=int, help="TPE: start-up trials before it models, spread over the space "
                   "by a seeded Sobol sequence (default: min(10, max(2, trials/4)))")
    g.add_argument("--grid", action="append", metavar="NAME=V1,V2", help="plain grid, e.g. latent_dim=5,10,15,20 (repeatable)")
    g.add_argument("--objective", help="val_elbo (default), val_mse (then d 2-128 and beta 0.001-10 by default), ...; "
                   "two, comma-separated, for a Pareto study; each trial keeps its best epoch by the objective (a Pareto study: by -ELBO)")
    g.add_argument("--mode", choices=("min", "max"))
    g.add_argument("--no-early-stopping", action="store_true", help="turn ASHA off")
    g.add_argument("--grace-period", type=int, help="ASHA: epochs before a trial may be stopped")
    g.add_argument("--reduction-factor", type=float, help="ASHA: keep 1/N at each rung")
    g.add_argument("--optuna-storage", metavar="URL",
                   help="a PostgreSQL (or MySQL) database for the Optuna study, shared by every driver: "
                        "postgresql://user@host:5432/db, the password in PGPASSWORD or ~/.pgpass "
                        "(default: optuna.log, a journal file, in the study folder)")
    g.add_argument("--log-to", action="append", choices=TRACKERS,
                   help="log every trial to MLflow or W&B (repeatable), set up from the environment: "
                        "MLFLOW_TRACKING_URI; WANDB_API_KEY or WANDB_MODE=offline")
    g.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                   help="retrain the winner on training + validation images for its best epoch count and "
                        "record it as its own row (default: on)")
    g.add_argument("--keep", metavar="POLICY",
                   help="the best weights kept of finished trials: all (default), top-K (e.g. top-10) or winner; "
                        "a running trial keeps what its exact resume needs")
    g = p.add_argument_group("training values, fixed for every trial (a fixed value is not searched)")
    _add_config_flags(g, for_run=True)
    g = p.add_argument_group("resources")
    g.add_argument("--cpus-per-trial", type=float)
    g.add_argument("--gpus-per-trial", type=float,
                   help="a fraction shares a GPU, e.g. 0.25; the trials sharing one train as one pack (--pack)")
    g.add_argument("--pack", type=int, metavar="K",
                   help="train up to K trials of one device as one stacked model; default: "
                        "1/--gpus-per-trial when that is a fraction, else off")
    g.add_argument("--no-pack", action="store_true", help="train every trial alone, also on a shared GPU")
    g.add_argument("--max-concurrent", type=int, help="trials at once (default: the free slots)")
    g.add_argument("--max-failures", type=int, help="retries of a trial whose worker died or raised")
    g.add_argument("--address", help="Ray cluster to join ('auto' works); default: a local runtime")
    g.add_argument("--num-cpus", type=int, help="CPUs of the local runtime (default: all)")

    p = _command(sub, "resume", cmd_resume, "finish an interrupted study")
    p.add_argument("--name", required=True)
    p.add_argument("--storage", help="the folder or bucket URI the study was run with (default: $VAE_STUDY_STORAGE)")
    p.add_argument("--address")
    p.add_argument("--num-cpus", type=int)
    p.add_argument("--shared-storage", action="store_true", help="as for run")
    p.add_argument("--storage-patience", type=float, metavar="SECONDS", help="as for run (default: the study's)")

    p = _command(sub, "results", cmd_results, "query the results table")
    p.add_argument("path", help="a study folder or URI, or a storage root holding several")
    p.add_argument("--table", choices=("trials", "epochs", "digits"), default="trials")
    p.add_argument("--where", help="SQL condition, e.g. \"status = 'completed' AND val_elbo < 150\"")
    p.add_argument("--sort", metavar="COL", help="sort by this column (ascending; --desc for descending)")
    p.add_argument("--desc", action="store_true")
    p.add_argument("--top", type=int, metavar="K", help="the first K rows; without --sort, of the trials table: "
                   "the best K by each study's own objective")
    p.add_argument("--columns", metavar="A,B,...")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")

    p = _command(sub, "report", cmd_report, "figures and an HTML report of a study")
    p.add_argument("study", help="the study folder or URI (STORAGE/NAME)")
    p.add_argument("--out", metavar="DIR", help="a folder or URI; default: STUDY/report")
    p.add_argument("--trial", metavar="ID", help="analyse this trial instead of the winner")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto for the checkpoint computations")
    p.add_argument("--tsne-points", type=int, default=10000, metavar="N")
    p.add_argument("--gap-images", type=int, default=1000, metavar="N", help="images for the decoder-only gap")
    p.add_argument("--decoder-steps", type=int, default=150, metavar="N")

    p = _command(sub, "compact", cmd_compact, "merge a finished study's files")
    p.add_argument("study", help="the study folder or URI (STORAGE/NAME)")

    p = sub.add_parser("cluster", help="set up a Ray cluster for studies", formatter_class=_fmt_help(),
                       description="Set up a Ray cluster for studies, from cluster.yaml: `aws-setup` once per AWS "
                       "account, `local` for machines you already have.\n\nExamples:\n"
                       "    vae-study cluster aws-setup && ray up cluster.yaml\n"
                       "    vae-study cluster local --head-ip 10.0.0.10 --worker-ips 10.0.0.11 --ssh-user ubuntu "
                       "--ssh-key ~/.ssh/id_ed25519 --out cluster-local.yaml")
    csub = p.add_subparsers(dest="cluster_command", metavar="COMMAND", parser_class=_Parser, required=True)
    p = _command(csub, "aws-setup", cmd_cluster_aws_setup, "once per AWS account: the nodes' IAM roles")
    p.add_argument("--config", default="cluster.yaml", help="the cluster config (default: cluster.yaml)")
    p = _command(csub, "local", cmd_cluster_local, "the on-premises version of cluster.yaml")
    p.add_argument("--config", default="cluster.yaml", help="the cloud config it is made from (default: cluster.yaml)")
    p.add_argument("--head-ip", required=True, help="the machine that runs the head (no trials)")
    p.add_argument("--worker-ips", required=True, metavar="IP,IP,...", help="the machines that run trials")
    p.add_argument("--ssh-user", required=True, help="an account every machine lets in with the key")
    p.add_argument("--ssh-key", required=True, help="the private key's path on this machine")
    p.add_argument("--out", metavar="FILE", help="write it here (default: standard output)")

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = bool(args.debug) or "--debug" in argv
    try:
        return int(args.func(args) or 0)
    except StorageUnreachable as exc:
        if debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 75  # EX_TEMPFAIL: the study can be resumed once its storage is back
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except StudyInterrupted as exc:
        print(f"{PROG}: interrupted: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
