"""The only writer of the analysis package: PNGs, a self-contained index.html and summary.json.

``build(study_dir)`` reads the Parquet results (a folder or a bucket, through ``study.store``),
picks the winner (``study.results.winner``), has ``analysis.compute`` gather what needs its
checkpoint (t-SNE, reconstruction panel, decoder-only gap,
traversals, prior samples), caches those arrays in ``<out>/cache/`` and draws every figure.
A figure that cannot be made is left out with a visible note, never a crash.
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from analysis import compute as C
from analysis import figures as F
from analysis import metrics as M
from study import results
from study.errors import StudyError
from study.store import Location, OptunaDB, REPORT_DIR, SPEC_FILE, is_study
from vae.evaluate import psnr

DPI = 200
CACHE_VERSION = 2


@dataclass
class Section:
    title: str
    images: list[str] = field(default_factory=list)
    tables: list[tuple] = field(default_factory=list)  # (title, table) or (title, table, a note read first)
    notes: list[str] = field(default_factory=list)
    text: str = ""


@dataclass
class Options:
    """How the report is made; a value out of range is refused here (StudyError, one line)."""

    trial: str | None = None
    device: str = "cpu"
    tsne_points: int = 10000
    gap_images: int = 1000
    decoder_steps: int = 150
    k: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("tsne_points", 5), ("gap_images", 10), ("decoder_steps", 1), ("k", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise StudyError(f"--{name.replace('_', '-')} {value} must be at least {low}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise StudyError(f"--device {self.device!r} is not allowed: choose cpu, cuda or auto")


# --------------------------------------------------------------------------- entry point

def build(study_dir: str | os.PathLike | Location, out: str | os.PathLike | Location | None = None, *,
          options: Options | None = None, printer: Callable[[str], None] | None = None) -> Path | str:
    """Build the report of one study; returns where ``index.html`` is: a Path, or a bucket URI.

    ``study_dir`` and ``out`` are folders or bucket URIs (``s3://``, ``gs://``). A report bound
    for a bucket is drawn in a local staging folder, then each file is uploaded whole.

    Raises:
        StudyError: the folder holds no study, or the study has no trials yet.
    """
    study = Location(study_dir)
    if not study.exists():
        raise StudyError(f"study folder {study} does not exist")
    if not is_study(study):
        raise StudyError(f"{study} holds no study (no study.json or trials/); pass the folder of one study")
    dest = Location(out) if out is not None else study / REPORT_DIR
    local = dest.local_path()
    if local is not None:
        return _build(study, local, dest, options, printer)
    with tempfile.TemporaryDirectory(prefix="vae-report-") as tmp:
        index = _build(study, Path(tmp), dest, options, printer)
        for rel in sorted(p.relative_to(tmp).as_posix() for p in Path(tmp).rglob("*") if p.is_file()):
            if rel != index.name:
                dest.upload(Path(tmp) / rel, rel)
        dest.upload(index, index.name)  # last: its presence means the report is whole
    return f"{dest.uri}/{index.name}"


def _build(study: Location, out: Path, dest: Location, options: Options | None,
           printer: Callable[[str], None] | None) -> Path:
    opts = options or Options()
    say = printer or (lambda s: None)
    spec = _read_spec(study)
    skipped: list[str] = []
    trials = results.load(study, "trials", on_skip=lambda p, r: skipped.append(f"skipped unreadable {Path(str(p)).name}: {r}"))
    if trials.empty:
        raise StudyError(f"study {study.name} has no trials recorded yet; run or resume it first")
    # A refit (study.runner.refit) is the winner retrained on train+validation: shown beside the
    # winner, never ranked or counted with the search's trials.
    refits = trials[trials["status"] == results.REFIT]
    trials = results.search_trials(trials).reset_index(drop=True)
    epochs = results.load(study, "epochs")
    digits = results.load(study, "digits")
    out.mkdir(parents=True, exist_ok=True)
    mode = spec.get("mode", "min")
    name = spec.get("name", study.name)

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    sections: list[Section] = []
    summary: dict[str, Any] = {"study": name, "folder": study.uri, "objective": spec.get("objective", ["val_elbo"]),
                               "mode": mode, "sampler": _sampler_text(spec), "counts": M.status_counts(trials),
                               "compute": M.total_compute(trials, epochs), "notes": list(skipped)}

    if opts.trial is not None:
        if opts.trial not in set(trials["trial_id"]):
            raise StudyError(f"trial {opts.trial!r} is not in study {name}; see `vae-study results {study}`")
        win = trials[trials["trial_id"] == opts.trial].iloc[0]
    else:
        win = results.winner(trials, mode)
    summary["winner"] = None if win is None else _jsonable(win.to_dict())
    mine = refits[refits["refit_of"] == win["trial_id"]] if win is not None and len(refits) else refits.iloc[:0]
    refit = mine.iloc[0] if len(mine) else None
    summary["refit"] = None if refit is None else _jsonable(refit.to_dict())

    def step(label: str, fn: Callable[[], Section | None]) -> None:
        s0 = time.perf_counter()
        try:
            section = fn()
        except Exception as exc:  # a figure that cannot be made is noted, not fatal
            section = Section(label, notes=[f"not drawn: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"])
        timings[label] = time.perf_counter() - s0
        if section is not None:
            sections.append(section)
        say(f"  {label:<34} {timings[label]:6.1f} s")

    summary["reference_note"] = _reference_note(spec, win)
    step("Summary", lambda: _summary_section(trials, win, digits, summary, refit))
    step("Per-digit MSE and PSNR vs latent size", lambda: _digits_vs_latent(out, trials, digits, mode, win, summary))
    step("Loss curves", lambda: _loss_curves(out, epochs, win))
    data: C.WinnerData | None = None
    if win is not None:
        try:
            s0 = time.perf_counter()
            data = _winner_data(study, out, dest, win, opts, say)
            timings["winner computations"] = time.perf_counter() - s0
        except Exception as exc:
            sections.append(Section("Winner's checkpoint", notes=[f"figures that need the checkpoint are left out: {exc}"]))
    if data is not None:
        d = data
        step("t-SNE of the latent space", lambda: _tsne(out, d.tsne))
        step("Reconstruction panel", lambda: _panel(out, d.panel))
        step("Amortisation gap", lambda: _gap(out, d.gap, summary))
        step("Latent traversals", lambda: _traversals(out, d.traversals))
        step("Samples from the prior", lambda: _prior(out, d.prior))
    step("Rate-distortion plane", lambda: _rate_distortion(out, trials, win))
    step("Search progress", lambda: _search_progress(out, trials))
    step("Study plots (Optuna)", lambda: _optuna(out, study, spec))
    step("Top trials", lambda: _top_trials(trials, mode))
    summary["timings_seconds"] = {k: round(v, 3) for k, v in timings.items()}
    summary["seconds"] = round(time.perf_counter() - t0, 3)

    index = out / "index.html"
    _atomic_write(out / "summary.json", json.dumps(summary, indent=2, default=str))
    _atomic_write(index, _html(name, study.uri, sections, summary, out))
    if spec.get("log_to") and win is not None:
        from study.runner.trackers import log_report

        log_report(spec["log_to"], name, str(win["trial_id"]), out, say)
    return index


# --------------------------------------------------------------------------- sections

def _summary_section(trials: pd.DataFrame, win: pd.Series | None, digits: pd.DataFrame, summary: dict,
                     refit: pd.Series | None = None) -> Section:
    s = Section("Summary")
    c, comp = summary["counts"], summary["compute"]
    s.text = (f"{len(trials)} trials: {c['completed']} completed, {c['pruned']} pruned by ASHA, {c['failed']} failed; "
              f"{comp['trial_epochs']} trial-epochs, {comp['train_seconds']:.1f} s of training in all.")
    if win is None:
        s.notes.append("no trial finished with a usable model, so there is no winner to analyse")
        return s
    cfg = {k.removeprefix("param_"): win[k] for k in win.index if k.startswith("param_")}
    cfg.update({k: win[k] for k in ("dataset", "best_epoch", "epochs_run", "val_elbo", "val_recon", "val_kl",
                                    "val_mse", "test_elbo", "test_mse", "test_psnr", "device", "checkpoint")})
    s.tables.append((f"Winner {win['trial_id']}", pd.DataFrame({"value": cfg}).reset_index(names="setting")))
    d = digits[digits["trial_id"] == win["trial_id"]]
    if not d.empty:
        pv = d.pivot_table(index="digit", columns="recon_mode", values=["mse", "psnr"], aggfunc="first")
        pv.columns = [f"{m} {k}" for k, m in pv.columns]
        n = d.groupby("digit")["n_images"].first()
        s.tables.append(("Winner's per-digit test metrics", pv.assign(n_images=n).reset_index()))
    if refit is not None:
        title, table = _refit_table(win, refit, digits)
        s.tables.append((title, table, summary.get("reference_note")))
    return s


def _refit_table(win: pd.Series, refit: pd.Series, digits: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """The winner beside its refit on train+validation: test MSE (posterior_mean) per digit, and
    the reference project's d = 15 row."""
    def mse(tid: str) -> pd.Series:
        d = digits[(digits["trial_id"] == tid) & (digits["split"] == "test") & (digits["recon_mode"] == "posterior_mean")]
        return d.set_index("digit")["mse"].astype(float)

    table = pd.DataFrame({f"winner {win['trial_id']}": mse(win["trial_id"]),
                          f"refit ({int(refit['epochs_run'])} epochs, train+val)": mse(refit["trial_id"]),
                          "reference d = 15 (posterior_sample)": pd.Series(M.REFERENCE_DIGITS[15])})
    table.index.name = "digit"
    table = table.reset_index()
    means = {c: float(table[c].mean()) for c in table.columns if c != "digit"}
    psnrs = {c: float(psnr(table[c].to_numpy(dtype=float)).mean()) for c in table.columns if c != "digit"}
    table = pd.concat([table, pd.DataFrame([{"digit": "mean MSE", **means}, {"digit": "mean PSNR dB", **psnrs}])],
                      ignore_index=True)
    return ("The winner and its refit: test MSE per digit (posterior_mean; chosen on validation, "
            "then retrained on training + validation for the winner's best epoch count)", table)


def _digits_vs_latent(out: Path, trials: pd.DataFrame, digits: pd.DataFrame, mode: str,
                      win: pd.Series | None, summary: dict) -> Section:
    s = Section("Per-digit MSE and PSNR vs latent size")
    # Sizes compare fairly only at full training: ASHA-pruned trials stopped early, so they count
    # only when fewer than two sizes have a completed trial.
    winners = results.winners_by_latent(trials[trials["status"] == "completed"], mode)
    if winners["param_latent_dim"].nunique() >= 2:
        s.text = "For each latent size, its best completed trial by the study objective; test split, posterior mean."
    else:
        winners = results.winners_by_latent(trials, mode)
        s.text = ("For each latent size, its best trial by the study objective, pruned trials included (fewer than two "
                  "sizes have a completed trial); test split, posterior mean.")
    if winners["param_latent_dim"].nunique() < 2:
        s.notes.append("left out: the study has fewer than two latent sizes with a finished trial "
                       "(the seed-replication preset, or --grid latent_dim=5,10,15,20, gives four)")
        return s
    mse = M.digit_matrix(digits, winners, metric="mse")
    psnr_matrix = M.digit_matrix(digits, winners, metric="psnr")
    for metric, matrix, fname in (("MSE", mse, "digits_mse.png"), ("PSNR", psnr_matrix, "digits_psnr.png")):
        ax = F.plot_digit_metric_vs_latent(matrix, metric=metric)
        _save(ax, out / fname)
        s.images.append(fname)
    s.tables.append(("Per-digit test MSE (posterior_mean) of the best trial per latent size",
                     mse.rename(columns=lambda d: f"d={d}").rename_axis(columns=None).reset_index()))
    dataset = str(win["dataset"]) if win is not None else ""
    if dataset.startswith("mnist"):
        sample = M.digit_matrix(digits, winners, metric="mse", recon_mode="posterior_sample")
        ref = M.reference_comparison(mse, sample)
        if not ref.empty:
            s.tables.append(("Against the reference project: its decoder row decodes z ~ q(z|x), our posterior_sample "
                             "(sample columns, like for like); our posterior_mean (the full VAE) beside them. Its "
                             "numbers: the full 10k MNIST test set", ref, summary.get("reference_note")))
            summary["reference_comparison"] = ref.to_dict(orient="records")
            if dataset == "mnist-sample":
                s.notes.append("this study used the 5,000-digit embedded sample (1,000 test images); the reference "
                               "trained on 48,000 images, 15x more")
    return s


def _loss_curves(out: Path, epochs: pd.DataFrame, win: pd.Series | None) -> Section:
    s = Section("Loss curves")
    if win is None or epochs[epochs["trial_id"] == win["trial_id"]].empty:
        s.notes.append("left out: no epochs recorded for a winner")
        return s
    fig = F.plot_loss_curves(epochs, str(win["trial_id"]))
    _save(fig, out / "loss_curves.png")
    s.images.append("loss_curves.png")
    return s


def _tsne(out: Path, t: C.TsneData) -> Section:
    s = Section("t-SNE of the latent space")
    _save(F.plot_tsne(t.embedding, t.labels), out / "tsne.png")
    s.images.append("tsne.png")
    s.text = (f"openTSNE, PCA initialisation, seed {t.seed}, on the winner's latent means of "
              f"{len(t.labels)} test images; computed in {t.seconds:.1f} s.")
    return s


def _panel(out: Path, p: C.PanelData) -> Section:
    s = Section("Reconstruction panel")
    label = {"posterior_mean": "full VAE (posterior_mean)"}
    rows = {label.get(m, m): (p.recon[m], p.mse[m]) for m in C.PANEL_MODES}
    _save(F.plot_recon_panel(p.original, rows, [int(d) for d in p.digits]), out / "recon_panel.png")
    s.images.append("recon_panel.png")
    s.text = ("One representative test image per digit (chosen without the model: the median-typical of "
              f"{p.k} evenly spaced by distance to the digit's mean image); test-set positions "
              f"{', '.join(str(int(i)) for i in p.index)}. The full-VAE row decodes the posterior mean: "
              "a real reconstruction, unlike the reference project's row, which showed the input.")
    return s


def _gap(out: Path, g: C.GapData, summary: dict) -> Section:
    s = Section("Amortisation gap")
    gap = M.amortisation_gap(g.per_digit)
    _save(F.plot_amortisation_gap(gap), out / "amortisation_gap.png")
    s.images.append("amortisation_gap.png")
    s.tables.append(("Per-digit MSE: encoder vs decoder-only", gap))
    s.text = (f"decoder_only: z* = argmin BCE(decode(z), x) + 1/2|z|^2 by {g.steps} Adam steps through "
              f"the frozen decoder, on {g.n_images} test images (a stratified subset when the split is larger).")
    summary["amortisation_gap"] = gap.to_dict(orient="records")
    return s


def _traversals(out: Path, t: C.TraversalData) -> Section:
    s = Section("Latent traversals")
    _save(F.plot_traversals(t.images, t.plan), out / "traversals.png")
    s.images.append("traversals.png")
    n_inactive = int((t.kl_all < M.INACTIVE_KL).sum())
    s.text = (f"Each row sweeps one latent dimension from the mean code of the test set; {n_inactive} of "
              f"{len(t.kl_all)} dimensions carry under {M.INACTIVE_KL} nats (inactive).")
    return s


def _prior(out: Path, prior: np.ndarray) -> Section:
    s = Section("Samples from the prior")
    _save(F.plot_image_grid(prior, title="decode(z), z ~ N(0, I): pixel probabilities"), out / "prior_samples.png")
    s.images.append("prior_samples.png")
    return s


def _rate_distortion(out: Path, trials: pd.DataFrame, win: pd.Series | None) -> Section:
    s = Section("Rate-distortion plane")
    ok = results.finished(trials).dropna(subset=["val_kl", "val_recon", "param_beta"])
    if len(ok) < 2:
        s.notes.append("left out: fewer than two finished trials")
        return s
    ax = F.plot_rate_distortion(ok, winner_id=None if win is None else str(win["trial_id"]))
    _save(ax, out / "rate_distortion.png")
    s.images.append("rate_distortion.png")
    return s


def _search_progress(out: Path, trials: pd.DataFrame) -> Section:
    s = Section("Search progress")
    curve = M.best_so_far(trials)
    finite = curve["best_so_far"].replace([np.inf, -np.inf], np.nan).dropna()
    if finite.empty:
        s.notes.append("left out: no finished trial")
        return s
    ax = F.plot_search_efficiency({"this study": curve})
    lo, hi = float(finite.min()), float(finite.max())
    ax.set_ylim(lo - 0.02 * (hi - lo + 1), hi + 0.02 * (hi - lo + 1))
    _save(ax, out / "search_progress.png")
    s.images.append("search_progress.png")
    s.text = ("Best validation -ELBO so far against the trial-epochs spent, trials in the order they finished; "
              "ASHA's pruned trials cost only the epochs they ran. benchmarks/bench_search.py compares this with a grid.")
    return s


def _optuna(out: Path, folder: Location, spec: dict) -> Section:
    with OptunaDB(folder, spec.get("optuna_storage")).read_copy() as db:
        if db is None:
            s = Section("Study plots (Optuna)")
            s.notes.append("left out: no Optuna study (optuna.log) in the study folder")
            return s
        return _optuna_plots(out, db, spec.get("name", folder.name), spec)


def _optuna_plots(out: Path, db: Any, name: str, spec: dict) -> Section:
    import optuna
    from optuna.visualization import matplotlib as ovm

    s = Section("Study plots (Optuna)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=db)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if len(study.directions) > 1:
            ax = ovm.plot_pareto_front(study, target_names=[f"best {m}" for m in spec.get("objective", [])])
            _save(ax, out / "optuna_pareto.png")
            s.images.append("optuna_pareto.png")
            return s
        if not done:
            s.notes.append("left out: no completed Optuna trials")
            return s
        ax = ovm.plot_optimization_history(study)
        _save(ax, out / "optuna_history.png")
        s.images.append("optuna_history.png")
        if len(done) >= 3 and len(study.best_trial.params) >= 2:
            ax = ovm.plot_param_importances(study)
            _save(ax, out / "optuna_importances.png")
            s.images.append("optuna_importances.png")
        else:
            s.notes.append("parameter importances left out: they need 3+ completed trials and 2+ searched parameters")
    return s


def _top_trials(trials: pd.DataFrame, mode: str) -> Section:
    s = Section("Top trials")
    cols = ["trial_id", "status", "param_arch", "param_latent_dim", "param_beta", "param_lr", "epochs_run",
            "objective", "val_elbo", "val_mse", "test_mse", "train_seconds"]
    ranked = results.rank(trials, mode)
    s.tables.append(("Best 10 by the study objective", ranked[[c for c in cols if c in ranked]].head(10)))
    failed = trials[trials["status"] == "failed"]
    if not failed.empty:
        s.tables.append(("Failed trials", failed[["trial_id", "error"]]))
    return s


# --------------------------------------------------------------------------- checkpoint computations

def _winner_data(study: Location, out: Path, dest: Location, win: pd.Series, opts: Options,
                 say: Callable[[str], None]) -> C.WinnerData:
    ckpt = win.get("checkpoint")
    if not isinstance(ckpt, str) or not ckpt:
        raise StudyError(f"trial {win['trial_id']} has no checkpoint recorded")
    # Relative to the study folder (an absolute path, from an older study, stays as it is).
    where = Location(ckpt) if ckpt.startswith("/") or "://" in ckpt else study / ckpt
    if not where.is_file():
        raise StudyError(f"checkpoint {where} of trial {win['trial_id']} is missing")
    settings = C.Settings(opts.tsne_points, opts.gap_images, opts.decoder_steps, opts.k, opts.seed, opts.device)
    size, mtime = where.stat()
    key = hashlib.sha256(json.dumps([CACHE_VERSION, where.uri, mtime, size, settings[:5]]).encode()).hexdigest()[:16]
    rel = f"cache/{win['trial_id']}-{key}.npz"
    cache = out / rel
    if not cache.is_file() and dest.local_path() is None and dest.is_file(rel):
        dest.download(rel, cache)
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            say(f"  winner arrays from cache {cache.name}")
            return C.from_arrays({k: z[k] for k in z.files})
    with tempfile.TemporaryDirectory(prefix="vae-ckpt-") as tmp:
        local = where.local_path() or where.parent.download(where.name, Path(tmp) / "model.pt")
        data = C.winner_data(local, settings, say)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmpf = cache.with_name(f".{cache.name}.{uuid.uuid4().hex[:6]}.tmp")
    with open(tmpf, "wb") as f:
        np.savez_compressed(f, **C.to_arrays(data))
    os.replace(tmpf, cache)
    return data


# --------------------------------------------------------------------------- output

def _save(obj: Any, path: Path) -> None:
    fig = obj if hasattr(obj, "savefig") else obj.figure
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:6]}.png")
    fig.savefig(tmp, dpi=DPI)
    os.replace(tmp, path)
    F.close(fig)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _sampler_text(spec: dict[str, Any]) -> str:
    """The study's sampler as study.json records it (a study from before samplers were chosen: TPE)."""
    sampler = spec.get("sampler") or ("grid" if spec.get("grid") else "tpe")
    liar = spec.get("constant_liar")
    return sampler + ("" if liar is None or sampler != "tpe" else f", constant liar {'on' if liar else 'off'}")


def _reference_note(spec: dict[str, Any], win: pd.Series | None) -> str | None:
    """Why the winner's numbers are not the reference project's, for a study on MNIST."""
    if win is None or not str(win.get("dataset", "")).startswith("mnist"):
        return None
    from vae.config import TrainConfig
    from vae.data import train_images

    try:
        config = TrainConfig.from_dict({**spec.get("train", {}), "dataset": str(win["dataset"])})
    except Exception:  # noqa: BLE001 - a study.json from elsewhere: no note rather than no report
        return None
    epochs = win.get("param_epochs")
    return M.reference_note(objective=list(spec.get("objective", ["val_elbo"]))[0], train_images=train_images(config),
                            epochs=int(epochs) if pd.notna(epochs) else int(spec.get("epochs", 15)),
                            arch=str(win.get("param_arch") or config.arch))


def _code_spans(text: str) -> str:
    """Escaped text, with `backticked` commands set as code."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _read_spec(study: Location) -> dict[str, Any]:
    try:
        return json.loads(study.read_text(SPEC_FILE))
    except (OSError, ValueError, StudyError):
        return {"name": study.name}


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, (np.integer,)):
            v = int(v)
        elif isinstance(v, (np.floating, float)):
            v = None if not np.isfinite(v) else float(v)
        elif isinstance(v, pd.Timestamp):
            v = v.isoformat()
        elif v is pd.NaT:
            v = None
        out[k] = v
    return out


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
img{max-width:100%;height:auto;display:block;margin:1em 0;border:1px solid #eee}
table{border-collapse:collapse;font-size:.85em;margin:.8em 0}th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.note{background:#fff6dd;border-left:4px solid #e0b000;padding:.4em .8em}.muted{color:#666;font-size:.9em}
nav a{margin-right:1em}.wide{overflow-x:auto}
"""


def _html(name: str, folder: str, sections: list[Section], summary: dict, out: Path) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>vae-study report: {html.escape(name)}</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<h1>β-VAE study <code>{html.escape(name)}</code></h1>",
             f"<p class='muted'>{html.escape(folder)} · built {time.strftime('%Y-%m-%d %H:%M:%S')} in "
             f"{summary['seconds']:.1f} s · objective {html.escape('+'.join(summary['objective']))} ({summary['mode']}) · "
             f"sampler {html.escape(summary['sampler'])}</p>",
             "<nav>" + "".join(f"<a href='#s{i}'>{html.escape(s.title)}</a>" for i, s in enumerate(sections)) + "</nav>"]
    for note in summary.get("notes", []):
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    for i, s in enumerate(sections):
        parts.append(f"<h2 id='s{i}'>{html.escape(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{html.escape(s.text)}</p>")
        for note in s.notes:
            parts.append(f"<p class='note'>{html.escape(note)}</p>")
        for img in s.images:
            data = base64.b64encode((out / img).read_bytes()).decode()
            parts.append(f"<img alt='{html.escape(img)}' src='data:image/png;base64,{data}'>")
        for title, df, *lead in s.tables:
            parts.append(f"<h3>{html.escape(title)}</h3>")
            if lead and lead[0]:  # read before the numbers: what the table does not show
                parts.append(f"<p class='note'>{_code_spans(lead[0])}</p>")
            parts.append("<div class='wide'>" + df.to_html(index=False, float_format=lambda v: f"{v:.5g}", na_rep="",
                                                           border=0) + "</div>")
    parts.append("</body></html>")
    return "\n".join(parts)
