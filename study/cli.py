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

from study.errors import USER_ERRORS

PROG = "vae-study"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _fmt_help(cls: type[argparse.HelpFormatter] = argparse.RawDescriptionHelpFormatter) -> Any:
    return lambda prog: cls(prog, max_help_position=32)


# --------------------------------------------------------------------------- train / evaluate

_TRAIN_HELP = {
    "arch": "mlp (784-hidden-d) or conv (the reference project's network)",
    "latent_dim": "latent size d",
    "beta": "KL weight: loss = recon_sum + beta * KL_sum per image",
    "lr": "Adam learning rate",
    "batch_size": "images per step",
    "epochs": "passes over the training split",
    "hidden": "hidden width of the mlp",
    "seed": "seeds init, batch order and sampling",
    "dataset": "mnist, fashion-mnist or mnist-sample (5,000 embedded real MNIST digits, offline)",
    "data_dir": "folder with the four IDX files (.gz or not); default: the per-user cache",
    "val_fraction": "share of the training set held out for validation",
    "split_seed": "seeds the train/validation split",
    "device": "auto, cpu or cuda",
    "precision": "fp32, tf32 or bf16 (GPU only; fp32 on a CPU)",
    "max_train_images": "cap on training images (smoke runs)",
    "download": "allow downloading MNIST with torchvision when it is missing",
}


def _add_config_flags(p: argparse.ArgumentParser, *, required_defaults: bool = True) -> None:
    from vae.config import TrainConfig

    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "download":
            p.add_argument(flag, action="store_true", default=None, help=_TRAIN_HELP[f.name])
            continue
        tp = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        p.add_argument(flag, type=tp, default=None, metavar=f.name.upper(),
                       help=f"{_TRAIN_HELP[f.name]} (default: {f.default})")


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


# --------------------------------------------------------------------------- parser and main

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Distributed hyperparameter studies for beta-VAEs on MNIST.",
                     formatter_class=_fmt_help())
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("train", help="train one configuration", description=cmd_train.__doc__,
                       formatter_class=_fmt_help())
    _add_config_flags(p)
    p.add_argument("--out", metavar="DIR", help="write model.pt and metrics.json here")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="per-digit metrics of a checkpoint", description=cmd_evaluate.__doc__,
                       formatter_class=_fmt_help())
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
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_evaluate)

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
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
